/*
 * pg_request.h — the backend side of the request protocol (pg_protocol.h):
 * build a request, submit it to a worker, read its reply.
 *
 *     KlCall *c = kl_call_begin(&spec, parts_bytes, n_parts);
 *     kl_call_add_part(c, data, len);  ...            (state parts, in order)
 *     kl_call_submit(c);
 *     while (kl_call_next(c, &ev)) { ... }             (TOKENS, STATE events)
 *     ... ev.done has the summary ...
 *     kl_call_end(c);
 *
 * Any failure (the worker's error, cancellation, a dead worker, a full
 * request table) is an ereport(ERROR); the transaction's cleanup then detaches
 * the segment, whose detach callback cancels the request and frees its slot.
 *
 * Several calls at once (pg_batch_call.h) use the non-throwing pieces:
 * kl_call_try_submit (false when the request table is full) and kl_call_poll
 * (never waits; a failed request is reported, not thrown).
 */
#ifndef KL_PG_REQUEST_H
#define KL_PG_REQUEST_H

#include "postgres.h"

#include "storage/dsm.h"
#include "storage/shm_mq.h"

#include "pg_protocol.h"

/* (KlReqSpec, what a SQL function asks for: pg_protocol.h) */

typedef enum KlEventType
{
	KL_EV_TOKENS,
	KL_EV_STATE,
	KL_EV_DONE
} KlEventType;

/* Pointers are valid until the next kl_call_next. */
typedef struct KlEvent
{
	KlEventType type;
	/* TOKENS */
	int			n_ids;
	const int32 *ids;
	const char *text;
	int			text_len;
	/* STATE */
	int			state_kind;
	int64		from_pos;
	int64		to_pos;
	const char *state;
	Size		state_len;
	/* DONE */
	KlMsgDone	done;
} KlEvent;

typedef struct KlCall KlCall;

/* Why a request failed: the worker's error, or the worker's death. */
typedef struct KlCallError
{
	int			sqlerrcode;
	char	   *message;		/* NULL: no error */
	char	   *detail;
	char	   *hint;
} KlCallError;

typedef enum KlNext
{
	KL_NEXT_EVENT,				/* ev filled (TOKENS or STATE) */
	KL_NEXT_DONE,				/* DONE read (ev->done), or a cache miss the caller handles */
	KL_NEXT_WAIT,				/* nothing yet: wait on the latch and poll again */
	KL_NEXT_ERROR				/* failed: kl_call_error(); the call is ended */
} KlNext;

/* Everything a finished call returned (palloc'd in the caller's context). */
typedef struct KlStatePart
{
	int			kind;			/* KL_STATE_ROWS or KL_STATE_HEAD */
	int64		from_pos,
				to_pos;
	bytea	   *blob;
} KlStatePart;

typedef struct KlRunResult
{
	char	   *text;			/* UTF-8, NUL-terminated */
	int			text_len;
	int32	   *ids;			/* generated ids */
	int			n_ids;
	KlStatePart *parts;
	int			n_parts;
	KlMsgDone	done;
	bool		cache_miss;		/* only with KL_RUN_CACHE_MISS_OK */
} KlRunResult;

#define KL_RUN_CACHE_MISS_OK 0x01

/* Submit, read to the end, detach.  parts: state parts in order (may be NULL). */
void		kl_run(const KlReqSpec *spec, const char *const *parts, const Size *part_lens, int n_parts,
				   int run_flags, KlRunResult *out);

KlCall	   *kl_call_begin(const KlReqSpec *spec, Size parts_bytes, int n_parts);
void		kl_call_add_part(KlCall *call, const void *data, Size len);
void		kl_call_submit(KlCall *call);
/* false, and nothing submitted, when every request slot is taken */
bool		kl_call_try_submit(KlCall *call);
/* false once DONE has been read (ev->done filled); waits; throws the request's error */
bool		kl_call_next(KlCall *call, KlEvent *ev);
/* the next event without waiting (a submitted call) */
KlNext		kl_call_poll(KlCall *call, KlEvent *ev);
/* the failure kl_call_poll reported (NULL if none) */
const KlCallError *kl_call_error(const KlCall *call);
void		kl_call_throw(const KlCallError *e) pg_attribute_noreturn();
/* a KL_ERR_CACHE_MISS reply ends the call (kl_call_cache_miss) instead of failing it */
void		kl_call_set_cache_miss_ok(KlCall *call);
bool		kl_call_cache_miss(const KlCall *call);
/*
 * The batch this call belongs to, shown in the activity view (batch_id,
 * batch_done of batch_total inputs); may be called before or after submitting.
 */
void		kl_call_set_batch(KlCall *call, int64 batch_id, int64 done, int64 total);
void		kl_call_end(KlCall *call);

#endif
