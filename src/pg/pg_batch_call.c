/*
 * pg_batch_call.c — many requests from one backend at once (pg_batch_call.h).
 *
 * Each input goes through: prepared (the caller's callback, in a
 * subtransaction so that its ERROR becomes the input's result) -> a KlCall
 * created -> submitted when a request slot is free -> its reply gathered ->
 * ready -> handed back.  Every reply queue has this backend as its receiver,
 * so one latch wakes us for whichever request has something to say; the
 * worker sends a non-streaming reply whole at the end, so a slow consumer
 * of the rows never holds up the worker.
 *
 * The KlCalls are created outside the subtransactions, under the resource
 * owner of the statement: a rolled-back input never takes the others'
 * segments with it, and the statement's end (or abort) detaches them all.
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/executor.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/wait_event.h"

#include "pg_batch_call.h"
#include "pg_guc.h"
#include "pg_shmem.h"

typedef struct BatchItem
{
	struct BatchItem *next;		/* in the ready queue */
	MemoryContext cxt;			/* everything of this input */
	KlBatchRequest req;
	KlCall	   *call;
	KlCallError prep_error;		/* prepare failed */
	KlBatchResult result;
	StringInfoData text;		/* the reply as it arrives */
	int			cap_ids;
	int			cap_parts;
} BatchItem;

struct KlBatchCall
{
	MemoryContext cxt;
	KlBatchOptions opts;
	int			limit;			/* requests in flight at most */
	int64		batch_id;
	int			next_input;		/* inputs taken so far */
	int			completed;		/* inputs finished (ready or handed back) */
	BatchItem **inflight;		/* submitted */
	int			n_inflight;
	BatchItem  *waiting;		/* created, waiting for a free request slot */
	BatchItem  *ready_head,
			   *ready_tail;
	BatchItem  *handed;			/* handed back; freed on the next call */
	bool		progress_dirty;
	bool		ended;
	ExprContext *econtext;		/* where end_callback is registered (NULL: not) */
};

KlBatchCall *
kl_batch_call_begin(const KlBatchOptions *opts)
{
	KlBatchCall *b;
	MemoryContext cxt;

	kl_require_shared();
	cxt = AllocSetContextCreate(CurrentMemoryContext, "kimi_linear batch", ALLOCSET_DEFAULT_SIZES);
	b = MemoryContextAllocZero(cxt, sizeof(KlBatchCall));
	b->cxt = cxt;
	b->opts = *opts;
	b->limit = kl_max_requests_per_call;
	if (opts->concurrency > 0 && opts->concurrency < b->limit)
		b->limit = opts->concurrency;
	b->limit = Min(b->limit, kl_shared->n_slots);
	b->limit = Max(b->limit, 1);
	b->inflight = MemoryContextAllocZero(cxt, sizeof(BatchItem *) * b->limit);
	/* ids come from the requests' sequence: a batch id never equals another batch's */
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	b->batch_id = (int64) kl_shared->next_request_id++;
	LWLockRelease(kl_shared->lock);
	return b;
}

int64
kl_batch_call_id(const KlBatchCall *b)
{
	return b->batch_id;
}

/* ------------------------------------------------------------------ inputs */

static void
push_ready(KlBatchCall *b, BatchItem *it)
{
	it->next = NULL;
	if (b->ready_tail)
		b->ready_tail->next = it;
	else
		b->ready_head = it;
	b->ready_tail = it;
	b->completed++;
	b->progress_dirty = true;
}

/*
 * Errors that are not the input's fault end the statement even when
 * errors go on rows: cancellation and shutdown (class 57), out of memory.
 */
static bool
input_error(const ErrorData *e)
{
	return ERRCODE_TO_CATEGORY(e->sqlerrcode) != ERRCODE_OPERATOR_INTERVENTION &&
		e->sqlerrcode != ERRCODE_OUT_OF_MEMORY;
}

/* Run the caller's prepare; false: it failed and it->prep_error says why. */
static bool
prepare_item(KlBatchCall *b, BatchItem *it)
{
	MemoryContext old = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	bool		ok = true;

	if (b->opts.abort_on_error)
	{
		MemoryContextSwitchTo(it->cxt);
		b->opts.prepare(b->opts.arg, it->result.index, &it->req);
		MemoryContextSwitchTo(old);
		return true;
	}
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(it->cxt);
	PG_TRY();
	{
		b->opts.prepare(b->opts.arg, it->result.index, &it->req);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(old);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *e;

		MemoryContextSwitchTo(it->cxt);
		e = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(old);
		CurrentResourceOwner = owner;
		if (!input_error(e))
			ReThrowError(e);
		it->prep_error.sqlerrcode = e->sqlerrcode;
		it->prep_error.message = e->message ? e->message : pstrdup("error");
		it->prep_error.detail = e->detail;
		it->prep_error.hint = e->hint;
		it->result.error = &it->prep_error;
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/* Take the next input: prepared and its call created (or failed: ready). */
static BatchItem *
take_input(KlBatchCall *b)
{
	BatchItem  *it;
	MemoryContext cxt,
				old;
	Size		parts_bytes = 0;

	cxt = AllocSetContextCreate(b->cxt, "kimi_linear batch input", ALLOCSET_SMALL_SIZES);
	it = MemoryContextAllocZero(cxt, sizeof(BatchItem));
	it->cxt = cxt;
	it->result.index = b->next_input++;
	if (!prepare_item(b, it))
	{
		push_ready(b, it);
		return NULL;
	}
	it->result.user = it->req.user;
	old = MemoryContextSwitchTo(it->cxt);
	for (int i = 0; i < it->req.n_parts; i++)
		parts_bytes += it->req.part_lens[i];
	it->call = kl_call_begin(&it->req.spec, parts_bytes, it->req.n_parts);
	for (int i = 0; i < it->req.n_parts; i++)
		kl_call_add_part(it->call, it->req.parts[i], it->req.part_lens[i]);
	if (it->req.run_flags & KL_RUN_CACHE_MISS_OK)
		kl_call_set_cache_miss_ok(it->call);
	kl_call_set_batch(it->call, b->batch_id, b->completed, b->opts.n_inputs);
	initStringInfo(&it->text);
	it->cap_ids = 64;
	it->cap_parts = 4;
	it->result.run.ids = palloc(sizeof(int32) * it->cap_ids);
	it->result.run.parts = palloc(sizeof(KlStatePart) * it->cap_parts);
	MemoryContextSwitchTo(old);
	return it;
}

/* Keep up to `limit` requests in flight; stops when the request table is full. */
static void
fill(KlBatchCall *b)
{
	while (b->n_inflight < b->limit && (b->waiting || b->next_input < b->opts.n_inputs))
	{
		BatchItem  *it = b->waiting;

		if (!it && (it = take_input(b)) == NULL)
			continue;			/* that input failed before being sent */
		if (!kl_call_try_submit(it->call))
		{
			b->waiting = it;	/* other sessions hold every slot: try again soon */
			return;
		}
		b->waiting = NULL;
		b->inflight[b->n_inflight++] = it;
	}
}

/* ------------------------------------------------------------------ replies */

/* gather one event of the reply, as kl_run does */
static void
gather(BatchItem *it, const KlEvent *ev)
{
	KlRunResult *out = &it->result.run;

	if (ev->type == KL_EV_TOKENS)
	{
		if (out->n_ids + ev->n_ids > it->cap_ids)
		{
			it->cap_ids = Max(it->cap_ids * 2, out->n_ids + ev->n_ids);
			out->ids = repalloc(out->ids, sizeof(int32) * it->cap_ids);
		}
		memcpy(out->ids + out->n_ids, ev->ids, sizeof(int32) * ev->n_ids);
		out->n_ids += ev->n_ids;
		appendBinaryStringInfo(&it->text, ev->text, ev->text_len);
	}
	else if (ev->type == KL_EV_STATE)
	{
		KlStatePart *p;

		if (ev->state_len > MaxAllocSize - VARHDRSZ)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("a state of %zu bytes exceeds the 1 GB limit of a value", ev->state_len)));
		if (out->n_parts == it->cap_parts)
		{
			it->cap_parts *= 2;
			out->parts = repalloc(out->parts, sizeof(KlStatePart) * it->cap_parts);
		}
		p = &out->parts[out->n_parts++];
		p->kind = ev->state_kind;
		p->from_pos = ev->from_pos;
		p->to_pos = ev->to_pos;
		p->blob = palloc(VARHDRSZ + ev->state_len);
		SET_VARSIZE(p->blob, VARHDRSZ + ev->state_len);
		memcpy(VARDATA(p->blob), ev->state, ev->state_len);
	}
}

/* Read what has arrived for every request in flight; finished ones become ready. */
static void
poll_all(KlBatchCall *b)
{
	for (int i = 0; i < b->n_inflight;)
	{
		BatchItem  *it = b->inflight[i];
		MemoryContext old = MemoryContextSwitchTo(it->cxt);
		KlEvent		ev;
		KlNext		r;

		while ((r = kl_call_poll(it->call, &ev)) == KL_NEXT_EVENT)
			gather(it, &ev);
		if (r == KL_NEXT_DONE)
		{
			it->result.run.cache_miss = kl_call_cache_miss(it->call);
			if (!it->result.run.cache_miss)
				it->result.run.done = ev.done;
			it->result.run.text = it->text.data;
			it->result.run.text_len = it->text.len;
			kl_call_end(it->call);
		}
		else if (r == KL_NEXT_ERROR)
		{
			if (b->opts.abort_on_error)
				kl_call_throw(kl_call_error(it->call));
			it->result.error = kl_call_error(it->call);
		}
		MemoryContextSwitchTo(old);
		if (r == KL_NEXT_WAIT)
		{
			i++;
			continue;
		}
		it->call = NULL;
		b->inflight[i] = b->inflight[--b->n_inflight];
		push_ready(b, it);
	}
}

/* batch_done in the activity rows of the requests still in flight */
static void
show_progress(KlBatchCall *b)
{
	if (!b->progress_dirty)
		return;
	b->progress_dirty = false;
	for (int i = 0; i < b->n_inflight; i++)
		kl_call_set_batch(b->inflight[i]->call, b->batch_id, b->completed, b->opts.n_inputs);
	if (b->waiting)
		kl_call_set_batch(b->waiting->call, b->batch_id, b->completed, b->opts.n_inputs);
}

KlBatchResult *
kl_batch_call_next(KlBatchCall *b)
{
	if (b->handed)
	{
		MemoryContextDelete(b->handed->cxt);
		b->handed = NULL;
	}
	if (b->ended)
		return NULL;
	for (;;)
	{
		poll_all(b);
		fill(b);
		show_progress(b);
		if (b->ready_head)
		{
			BatchItem  *it = b->ready_head;

			b->ready_head = it->next;
			if (!b->ready_head)
				b->ready_tail = NULL;
			b->handed = it;
			return &it->result;
		}
		if (b->n_inflight == 0 && !b->waiting && b->next_input >= b->opts.n_inputs)
		{
			b->ended = true;
			return NULL;
		}

		/*
		 * Our requests' replies set the latch.  A slot freed by another
		 * session does not: while waiting for one, look again soon.
		 */
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 b->waiting ? 10 : 1000, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

static void end_callback(Datum arg);

void
kl_batch_call_end(KlBatchCall *b)
{
	/*
	 * The batch lives in the SRF's multi-call memory, which SRF_RETURN_DONE
	 * frees: the query's end must not call back into it afterwards.
	 */
	if (b->econtext)
	{
		UnregisterExprContextCallback(b->econtext, end_callback, PointerGetDatum(b));
		b->econtext = NULL;
	}
	if (b->ended && b->n_inflight == 0 && !b->waiting)
		return;
	b->ended = true;
	/* detaching cancels each request and frees its slot (pg_request.c) */
	for (int i = 0; i < b->n_inflight; i++)
		kl_call_end(b->inflight[i]->call);
	b->n_inflight = 0;
	if (b->waiting)
		kl_call_end(b->waiting->call);
	b->waiting = NULL;
}

static void
end_callback(Datum arg)
{
	KlBatchCall *b = (KlBatchCall *) DatumGetPointer(arg);

	b->econtext = NULL;			/* being called: already unregistered */
	kl_batch_call_end(b);
}

void
kl_batch_call_end_with_query(KlBatchCall *b, FunctionCallInfo fcinfo)
{
	ReturnSetInfo *rsi = (ReturnSetInfo *) fcinfo->resultinfo;

	if (rsi && IsA(rsi, ReturnSetInfo))
	{
		RegisterExprContextCallback(rsi->econtext, end_callback, PointerGetDatum(b));
		b->econtext = rsi->econtext;
	}
}

/* ------------------------------------------------------------------ SQL arguments */

int
kl_concurrency_arg(FunctionCallInfo fcinfo, int i)
{
	int			c;

	if (PG_NARGS() <= i || PG_ARGISNULL(i))
		return 0;
	c = PG_GETARG_INT32(i);
	if (c < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("concurrency must be at least 1, got %d", c),
				 errhint("NULL uses the limit, kimi_linear.max_requests_per_call (%d).", kl_max_requests_per_call)));
	return c;
}

bool
kl_on_error_abort_arg(FunctionCallInfo fcinfo, int i)
{
	char	   *v;

	if (PG_NARGS() <= i || PG_ARGISNULL(i))
		return false;
	v = text_to_cstring(PG_GETARG_TEXT_PP(i));
	if (strcmp(v, "row") == 0)
		return false;
	if (strcmp(v, "abort") == 0)
		return true;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("on_error must be 'row' or 'abort', got '%s'", v),
			 errhint("'row' (the default): an input's error comes back in its row's error column; 'abort': it ends the statement.")));
	return false;
}
