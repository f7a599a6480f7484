/*
 * pg_batch.h — the inference worker's scheduler: the requests it has taken,
 * their sequences, and the forward steps that advance them all together.
 *
 * Loop (pg_worker.c calls these):
 *     kl_batch_admit()    take SUBMITTED slots addressed to this worker
 *     kl_batch_poll()     drop cancelled requests, push out queued replies
 *     kl_batch_step()     one round: every decoding sequence advances one
 *                         token (one kl_forward per group of up to 64
 *                         sequences of a model), then prompt chunks of
 *                         prefilling sequences up to kimi_linear.prefill_chunk
 *                         tokens, round-robin
 * Semantics per request are exactly kl_generate()'s (src/engine/generate.c):
 * feed the pending token and the prompt, sample (among the tokens its output
 * constraint allows, if it has one), stop at eos (unless ignore_eos), a stop
 * id, a stop string or max_tokens; the last sampled token becomes the
 * sequence's pending token.
 *
 * Why groups of at most 64 and one prefill chunk per kl_forward: the CPU
 * backend computes up to 64 rows with its GEMV kernels, whose per-row results
 * do not depend on the other rows (and attention is split per sequence),
 * while larger products go through sgemm, whose rounding depends on the row
 * count; prompt chunks are aligned like the engine's own 512-token steps.  So
 * a request gives bit-for-bit the result it gives alone (and the CLI's),
 * however many others share the worker.  The price: a decode step waits for
 * the prefill chunk before it (kimi_linear.prefill_chunk bounds that wait).
 */
#ifndef KL_PG_BATCH_H
#define KL_PG_BATCH_H

#include "postgres.h"

#include "json_constraint.h"
#include "kl.h"
#include "tokenizer.h"

#include "pg_shmem.h"

#define KL_DECODE_GROUP KL_BATCH_INVARIANT_ROWS

/* A model as this worker holds it. */
typedef struct KlWModel
{
	bool		in_use;
	int			entry;			/* registry index */
	uint32		generation;
	char		name[KL_MODEL_NAME_LEN];
	kl_model   *m;
	kl_ctx	   *ctx;
	int			ctx_tokens;		/* max_step_tokens ctx was made with */
	const kl_tokenizer *tok;
	int			vocab;
	int32		eos;
	kl_vocab   *cvocab;			/* its vocabulary for output constraints, built on first use */
} KlWModel;

extern KlWModel kl_wmodels[KL_MAX_MODELS];
extern int	kl_worker_index;

void		kl_batch_init(void);
void		kl_batch_admit(void);
void		kl_batch_poll(void);
/* true when there is compute to do right away (no need to sleep) */
bool		kl_batch_runnable(void);
void		kl_batch_step(void);
/* number of requests held */
int			kl_batch_count(void);
/* fail every request (of one model, or all when wm is NULL) with a message; code: as in KlMsgError */
void		kl_batch_fail_all(KlWModel *wm, int code, const char *msg, const char *hint);
/* try to deliver the final messages of failed requests, briefly (shutdown) */
void		kl_batch_drain(int timeout_ms);
/* forget cached conversation states of a model (unload) */
void		kl_cache_drop_model(KlWModel *wm);
void		kl_cache_trim(void);

#endif
