/*
 * pg_batch_call.h — many requests from one backend at once: the machinery of
 * the set-based functions (generate_each, chat_each, summarize_each, and any
 * other function that runs one request per input).
 *
 * A caller describes N inputs and a prepare callback that turns input i into
 * a request (tokenizing, checking); the batch keeps up to `concurrency` of
 * them in flight together (each its own KlCall: DSM segment, request slot,
 * reply queue), waits on the latch for whichever reply comes, and hands back
 * finished inputs in the order they finish, with their index so the caller
 * can attach the input's key:
 *
 *     KlBatchOptions o = {.n_inputs = n, .prepare = my_prepare, .arg = my_state};
 *     KlBatchCall *b = kl_batch_call_begin(&o);
 *     while ((r = kl_batch_call_next(b)) != NULL)
 *         ... r->index, r->error or r->run ...
 *     kl_batch_call_end(b);
 *
 * Limits: at most min(concurrency, kimi_linear.max_requests_per_call) in
 * flight.  When the request table is full (other sessions hold the slots),
 * the batch waits for a free slot instead of failing.
 *
 * Errors of one input: an ERROR raised by prepare (run in a subtransaction)
 * or the worker's error for that request becomes that input's result
 * (r->error), unless abort_on_error, in which case it ends the statement.
 * Cancellation (pg_cancel_backend, statement_timeout) always ends the
 * statement; the transaction's cleanup then detaches every request's segment,
 * which cancels it and frees its slot; kl_batch_call_end does the same when a
 * query stops early (a closed cursor, LIMIT).
 *
 * Subtransactions are not allowed in parallel mode (PostgreSQL 15), so the
 * SQL functions built on this are PARALLEL UNSAFE; they spread the work over
 * the workers' batch themselves.
 */
#ifndef KL_PG_BATCH_CALL_H
#define KL_PG_BATCH_CALL_H

#include "postgres.h"

#include "fmgr.h"

#include "pg_request.h"

/* One input's request, filled by the prepare callback. */
typedef struct KlBatchRequest
{
	KlReqSpec	spec;
	int			n_parts;		/* state parts, in order (0: none) */
	const char *const *parts;
	const Size *part_lens;
	int			run_flags;		/* KL_RUN_CACHE_MISS_OK: a cache miss is a result (run.cache_miss) */
	void	   *user;			/* given back with the result */
} KlBatchRequest;

/*
 * Fill req for input `index` (0-based).  Runs in the input's memory context
 * (what it allocates lives until the input's result has been handed back and
 * the next one asked for); may ereport(ERROR).
 */
typedef void (*KlBatchPrepare) (void *arg, int index, KlBatchRequest *req);

typedef struct KlBatchOptions
{
	int			n_inputs;
	int			concurrency;	/* <= 0: kimi_linear.max_requests_per_call (it is also the cap) */
	bool		abort_on_error; /* an input's error ends the statement */
	KlBatchPrepare prepare;
	void	   *arg;
} KlBatchOptions;

typedef struct KlBatchResult
{
	int			index;			/* the input's position, 0-based */
	void	   *user;			/* req->user */
	const KlCallError *error;	/* NULL: it succeeded, see run */
	KlRunResult run;			/* text, ids, state parts, done: as kl_run returns them */
} KlBatchResult;

typedef struct KlBatchCall KlBatchCall;

/* Starts nothing yet: requests go out on the first kl_batch_call_next. */
KlBatchCall *kl_batch_call_begin(const KlBatchOptions *opts);

/*
 * The next finished input (waits for one), or NULL when every input has
 * been handed back.  The result, and what prepare allocated for it, stay
 * valid until the next call.
 */
KlBatchResult *kl_batch_call_next(KlBatchCall *b);

/*
 * Cancel what is still in flight and let go of everything.  Idempotent.  An
 * SRF calls it before SRF_RETURN_DONE (which frees the batch's memory).
 */
void		kl_batch_call_end(KlBatchCall *b);

/* The batch's id in kimi_linear.activity (batch_id). */
int64		kl_batch_call_id(const KlBatchCall *b);

/*
 * For a set-returning function in value-per-call mode: end the batch when
 * the query ends, however it ends (kl_batch_call_end as an ExprContext
 * shutdown callback).
 */
void		kl_batch_call_end_with_query(KlBatchCall *b, FunctionCallInfo fcinfo);

/* SQL arguments: concurrency (NULL: the limit; else 1 or more) and on_error ('row' or 'abort'). */
int			kl_concurrency_arg(FunctionCallInfo fcinfo, int i);
bool		kl_on_error_abort_arg(FunctionCallInfo fcinfo, int i);

#endif
