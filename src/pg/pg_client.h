/*
 * pg_client.h — a backend's side of an inference request (protocol:
 * pg_protocol.h), and the model registry operations backends perform.
 */
#ifndef KL_PG_CLIENT_H
#define KL_PG_CLIENT_H

#include "postgres.h"

#include "lib/stringinfo.h"
#include "storage/dsm.h"
#include "storage/shm_mq.h"

#include "pg_protocol.h"
#include "tokenizer.h"

typedef struct KlStatePart
{
	int			kind;			/* KL_STATE_ROWS or KL_STATE_HEAD */
	int64		from_pos,
				to_pos;
	bytea	   *blob;
} KlStatePart;

/* One request in flight. */
typedef struct KlClient
{
	int			slot;
	uint64		request_id;
	int			worker;
	uint32		worker_generation;
	dsm_segment *seg;
	shm_mq_handle *req,
			   *rep;
	bool		finished;

	/* what came back (in the memory context current at submit) */
	StringInfoData text;
	int32	   *ids;
	int			n_ids,
				cap_ids;
	KlStatePart *parts;
	int			n_parts,
				cap_parts;
	KlMsgDone	done;
	MemoryContext mcxt;
} KlClient;

/*
 * Submit: takes a slot (ERROR when all kimi_linear.max_requests are in use),
 * sends the request and returns.  state parts may be NULL.
 */
void		kl_client_submit(KlClient *c, const KlRequest *hdr, const int32 *stop_ids,
							 const int32 *prompt, int n_prompt, bytea **state_parts, int n_state_parts);

/*
 * Wait for the next reply message and fold it into c.  Returns the text that
 * message added (palloc'd, possibly empty) for TOKENS, NULL when the request
 * is finished (DONE).  ERRORs on a worker error, a dead worker, cancellation.
 */
char	   *kl_client_next(KlClient *c);

/* Read everything until DONE. */
void		kl_client_wait(KlClient *c);

/* Give the slot back (after DONE, or to abandon a request). */
void		kl_client_release(KlClient *c);

/* ------------------------------------------------------------------ models */

/*
 * The registry entry for a model name (NULL: the default model), loading the
 * default on first use.  Returns its index; ERROR if unknown or failed.
 */
int			kl_model_resolve(const char *name);
/* Register and load a model from path (relative to model_dir or inside it). */
void		kl_model_register(const char *name, const char *path, bool check_privilege);
void		kl_model_unregister(const char *name);
/* The tokenizer of a registered model, loaded in this backend and cached. */
const kl_tokenizer *kl_model_tokenizer_for(int entry);
/* The model entry's name (copied). */
void		kl_model_entry_name(int entry, char *out);

#endif
