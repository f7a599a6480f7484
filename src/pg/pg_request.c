/*
 * pg_request.c — the backend side of the request protocol (pg_protocol.h).
 *
 * Why a DSM segment per request: a request may carry a 100k-token prompt or
 * a conversation's state (megabytes), which the worker reads in place; the
 * reply queue lives in the same segment, so one detach ends everything, and
 * the detach callback (run on commit, abort or backend exit alike) is the one
 * place that cancels a request and releases its slot.
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "pg_errors.h"
#include "pg_request.h"
#include "pg_shmem.h"

struct KlCall
{
	dsm_segment *seg;
	shm_mq_handle *mqh;
	KlRequest  *req;
	int			slot;
	uint64		request_id;
	bool		submitted;
	bool		done;
	bool		cache_miss_ok;
	bool		cache_miss;
	uint64		parts_at;		/* where the next state part goes */
	int			parts_left;
	/* the request failed (kl_call_poll returned KL_NEXT_ERROR) */
	KlCallError error;
	/* batch progress shown in the activity view (0: not part of a batch) */
	int64		batch_id;
	int64		batch_done;
	int64		batch_total;
};

/* (the protocol aligns to 8; the reply queue must be MAXALIGNed) */
StaticAssertDecl(MAXIMUM_ALIGNOF <= 8, "the request protocol aligns to 8 bytes");

/*
 * Runs whenever this backend detaches from the request's segment: after a
 * normal end, at transaction abort (cancel, statement_timeout, any ERROR),
 * at backend exit.  The worker sees the flag before its next step.
 */
static void
call_detach_cb(dsm_segment *seg, Datum arg)
{
	int			i = DatumGetInt32(arg);
	KlRequest  *req = dsm_segment_address(seg);
	KlSlot	   *slot;
	int			worker = -1;

	if (kl_shared == NULL || i < 0 || i >= kl_shared->n_slots)
		return;
	slot = &kl_shared->slots[i];
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	if (slot->state != KL_SLOT_FREE && slot->request_id == req->request_id)
	{
		if (slot->state == KL_SLOT_SUBMITTED || req->reply_complete)
		{
			/* the worker never saw it, or has said all it had to say */
			slot->worker_done = true;
		}
		else
		{
			pg_atomic_write_u32(&slot->cancel, 1);
			worker = slot->worker;
		}
		slot->backend_done = true;
		kl_slot_release_locked(slot);
	}
	LWLockRelease(kl_shared->lock);
	if (worker >= 0)
		kl_wake_workers(worker);
}

KlCall *
kl_call_begin(const KlReqSpec *spec, Size parts_bytes, int n_parts)
{
	KlCall	   *call = palloc0(sizeof(KlCall));
	KlReqLayout l;
	char	   *base;
	shm_mq	   *mq;

	kl_require_shared();
	kl_request_layout(spec, parts_bytes, n_parts, &l);
	call->seg = dsm_create(l.total, DSM_CREATE_NULL_IF_MAXSEGMENTS);
	if (call->seg == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("too many dynamic shared memory segments for a kimi_linear request"),
				 errhint("Lower the number of concurrent requests, or raise max_connections.")));
	base = dsm_segment_address(call->seg);
	kl_request_encode(base, spec, n_parts, &l);
	call->req = (KlRequest *) base;
	call->parts_at = l.parts_off;
	call->parts_left = n_parts;

	mq = shm_mq_create(base + l.mq_off, l.mq_size);
	shm_mq_set_receiver(mq, MyProc);
	call->mqh = shm_mq_attach(mq, call->seg, NULL);
	call->slot = -1;
	return call;
}

void
kl_call_add_part(KlCall *call, const void *data, Size len)
{
	uint64		next;

	if (call->parts_left <= 0)
		elog(ERROR, "kimi_linear: more state parts than announced");
	next = kl_request_put_part(dsm_segment_address(call->seg), call->parts_at, call->req->data_end, data, len);
	if (next == 0)
		elog(ERROR, "kimi_linear: more state bytes than announced");
	call->parts_at = next;
	call->parts_left--;
}

/* The live worker with the fewest requests; a dead one if none lives (it restarts). */
static int
choose_worker(void)
{
	int			best = 0;
	int			best_score = INT_MAX;

	for (int i = 0; i < kl_shared->n_workers; i++)
	{
		KlWorkerInfo *w = &kl_shared->workers[i];
		int			score = w->active + (w->pid == 0 ? 1000000 : 0);

		if (score < best_score)
		{
			best = i;
			best_score = score;
		}
	}
	return best;
}

void
kl_call_submit(KlCall *call)
{
	if (!kl_call_try_submit(call))
		ereport(ERROR,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("too many kimi_linear requests in flight (kimi_linear.max_requests = %d)",
						kl_shared->n_slots),
				 errhint("Retry later, or raise kimi_linear.max_requests (needs a server restart).")));
}

bool
kl_call_try_submit(KlCall *call)
{
	int			found = -1;
	int			worker;

	if (call->parts_left != 0)
		elog(ERROR, "kimi_linear: %d announced state parts were not added", call->parts_left);

	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < kl_shared->n_slots; i++)
		if (kl_shared->slots[i].state == KL_SLOT_FREE)
		{
			found = i;
			break;
		}
	if (found < 0)
	{
		LWLockRelease(kl_shared->lock);
		return false;
	}
	{
		KlSlot	   *s = &kl_shared->slots[found];

		worker = choose_worker();
		/* a conversation goes to the worker that may hold its state in cache */
		if (call->req->cache_key != 0)
		{
			int			w = (int) ((uint64) call->req->cache_key % (uint64) kl_shared->n_workers);

			if (kl_shared->workers[w].pid != 0)
				worker = w;
		}
		call->request_id = kl_shared->next_request_id++;
		call->req->request_id = call->request_id;
		s->state = KL_SLOT_SUBMITTED;
		s->request_id = call->request_id;
		s->worker = worker;
		s->handle = dsm_segment_handle(call->seg);
		s->backend_pid = MyProcPid;
		s->backend_proc = MyProc;
		s->backend_done = false;
		s->worker_done = false;
		strlcpy(s->model, call->req->model, KL_MODEL_NAME_LEN);
		pg_atomic_write_u32(&s->cancel, 0);
		SpinLockAcquire(&s->mutex);
		s->phase = KL_PHASE_QUEUED;
		s->prompt_done = 0;
		s->prompt_total = call->req->n_prompt;
		s->generated = 0;
		s->max_tokens = call->req->max_tokens;
		s->submitted_at = GetCurrentTimestamp();
		s->started_at = 0;
		s->tokens_per_second = 0;
		s->batch_id = call->batch_id;
		s->batch_done = call->batch_done;
		s->batch_total = call->batch_total;
		SpinLockRelease(&s->mutex);
	}
	LWLockRelease(kl_shared->lock);
	call->slot = found;
	call->submitted = true;
	on_dsm_detach(call->seg, call_detach_cb, Int32GetDatum(found));
	kl_wake_workers(worker);
	return true;
}

void
kl_call_set_cache_miss_ok(KlCall *call)
{
	call->cache_miss_ok = true;
}

bool
kl_call_cache_miss(const KlCall *call)
{
	return call->cache_miss;
}

void
kl_call_set_batch(KlCall *call, int64 batch_id, int64 done, int64 total)
{
	call->batch_id = batch_id;
	call->batch_done = done;
	call->batch_total = total;
	if (call->submitted && call->seg)
	{
		KlSlot	   *s = &kl_shared->slots[call->slot];

		/* the slot is ours until our detach callback frees it */
		SpinLockAcquire(&s->mutex);
		s->batch_id = batch_id;
		s->batch_done = done;
		s->batch_total = total;
		SpinLockRelease(&s->mutex);
	}
}

/*
 * The worker's ERROR message: recorded in call->error (the caller throws it,
 * or a batch puts it on the input's row).  A cache miss the caller asked to
 * handle is not an error: the call is just done.
 */
static KlNext
worker_error(KlCall *call, const char *data, Size nbytes)
{
	KlMsgError e;

	if (nbytes < sizeof(KlMsgError))
		elog(ERROR, "kimi_linear: malformed error message from the inference worker");
	memcpy(&e, data, sizeof(e));
	if (e.msg_len < 0 || e.hint_len < 0 || sizeof(KlMsgError) + (Size) e.msg_len + e.hint_len > nbytes)
		elog(ERROR, "kimi_linear: malformed error message from the inference worker");
	call->req->reply_complete = 1;
	call->done = true;
	if (e.code == KL_ERR_CACHE_MISS && call->cache_miss_ok)
	{
		call->cache_miss = true;
		return KL_NEXT_DONE;
	}
	call->error.message = pnstrdup(data + sizeof(KlMsgError), e.msg_len);
	call->error.hint = pnstrdup(data + sizeof(KlMsgError) + e.msg_len, e.hint_len);
	call->error.detail = NULL;
	call->error.sqlerrcode = kl_sqlstate(e.code);
	kl_call_end(call);
	return KL_NEXT_ERROR;
}

static KlNext
worker_gone(KlCall *call)
{
	call->done = true;
	call->error.sqlerrcode = ERRCODE_OPERATOR_INTERVENTION;
	call->error.message = pstrdup("the kimi_linear inference worker stopped before finishing this request");
	call->error.detail = pstrdup("The worker was terminated (pg_terminate_backend, server shutdown) or failed; it is restarted automatically.");
	call->error.hint = pstrdup("Run the statement again.");
	kl_call_end(call);
	return KL_NEXT_ERROR;
}

/* One message from the queue, if there is one. */
static KlNext
receive(KlCall *call, KlEvent *ev, bool *nothing)
{
	Size		nbytes;
	void	   *data;
	shm_mq_result res = shm_mq_receive(call->mqh, &nbytes, &data, true);
	const char *d = data;

	*nothing = false;
	if (res == SHM_MQ_DETACHED)
		return worker_gone(call);
	if (res != SHM_MQ_SUCCESS)
	{
		*nothing = true;
		return KL_NEXT_WAIT;
	}
	if (nbytes < 1)
		elog(ERROR, "kimi_linear: empty message from the inference worker");
	memset(ev, 0, sizeof(*ev));
	switch (d[0])
	{
		case KL_MSG_TOKENS:
			{
				KlMsgTokens t;

				if (nbytes < sizeof(t))
					break;
				memcpy(&t, d, sizeof(t));
				if (t.n_ids < 0 || t.text_len < 0 ||
					sizeof(t) + sizeof(int32) * (Size) t.n_ids + t.text_len > nbytes)
					break;
				ev->type = KL_EV_TOKENS;
				ev->n_ids = t.n_ids;
				ev->ids = (const int32 *) (d + sizeof(t));
				ev->text = d + sizeof(t) + sizeof(int32) * t.n_ids;
				ev->text_len = t.text_len;
				return KL_NEXT_EVENT;
			}
		case KL_MSG_STATE:
			{
				KlMsgState s;

				if (nbytes < sizeof(s))
					break;
				memcpy(&s, d, sizeof(s));
				if (s.len > nbytes - sizeof(s))
					break;
				ev->type = KL_EV_STATE;
				ev->state_kind = s.kind;
				ev->from_pos = s.from_pos;
				ev->to_pos = s.to_pos;
				ev->state = d + sizeof(s);
				ev->state_len = s.len;
				return KL_NEXT_EVENT;
			}
		case KL_MSG_DONE:
			if (nbytes < sizeof(KlMsgDone))
				break;
			ev->type = KL_EV_DONE;
			memcpy(&ev->done, d, sizeof(KlMsgDone));
			call->done = true;
			call->req->reply_complete = 1;
			return KL_NEXT_DONE;
		case KL_MSG_ERROR:
			return worker_error(call, d, nbytes);
	}
	elog(ERROR, "kimi_linear: malformed message (type %d, %zu bytes) from the inference worker",
		 d[0], nbytes);
	return KL_NEXT_ERROR;		/* not reached */
}

KlNext
kl_call_poll(KlCall *call, KlEvent *ev)
{
	bool		nothing;
	bool		let_go;
	KlNext		r;

	Assert(call->submitted);
	if (call->done)
		return call->error.message ? KL_NEXT_ERROR : KL_NEXT_DONE;
	r = receive(call, ev, &nothing);
	if (!nothing)
		return r;

	/*
	 * Nothing yet.  A worker that took the request and died before attaching
	 * to the queue is noticed through worker_done (set by the dying worker,
	 * or by its successor at start).  It may have let go after sending
	 * everything, so poll the queue once more first.
	 */
	{
		KlSlot	   *s = &kl_shared->slots[call->slot];

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		let_go = s->request_id == call->request_id && s->state == KL_SLOT_RUNNING && s->worker_done;
		LWLockRelease(kl_shared->lock);
	}
	if (!let_go)
		return KL_NEXT_WAIT;
	r = receive(call, ev, &nothing);
	return nothing ? worker_gone(call) : r;
}

const KlCallError *
kl_call_error(const KlCall *call)
{
	return call->error.message ? &call->error : NULL;
}

void
kl_call_throw(const KlCallError *e)
{
	ereport(ERROR,
			(errcode(e->sqlerrcode),
			 errmsg("%s", e->message),
			 e->detail && e->detail[0] ? errdetail("%s", e->detail) : 0,
			 e->hint && e->hint[0] ? errhint("%s", e->hint) : 0));
}

bool
kl_call_next(KlCall *call, KlEvent *ev)
{
	for (;;)
	{
		switch (kl_call_poll(call, ev))
		{
			case KL_NEXT_EVENT:
				return true;
			case KL_NEXT_DONE:
				return false;	/* DONE read, or a cache miss the caller handles */
			case KL_NEXT_ERROR:
				kl_call_throw(&call->error);
				break;
			case KL_NEXT_WAIT:
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 1000,
								 PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
				CHECK_FOR_INTERRUPTS();
				break;
		}
	}
}

void
kl_call_end(KlCall *call)
{
	if (call->seg)
	{
		dsm_segment *seg = call->seg;

		call->seg = NULL;
		call->mqh = NULL;
		dsm_detach(seg);
	}
}

void
kl_run(const KlReqSpec *spec, const char *const *parts, const Size *part_lens, int n_parts, int run_flags,
	   KlRunResult *out)
{
	Size		total = 0;
	KlCall	   *call;
	KlEvent		ev;
	StringInfoData text;
	int			cap_ids = 64,
				cap_parts = 4;

	memset(out, 0, sizeof(*out));
	for (int i = 0; i < n_parts; i++)
		total += part_lens[i];
	call = kl_call_begin(spec, total, n_parts);
	call->cache_miss_ok = (run_flags & KL_RUN_CACHE_MISS_OK) != 0;
	for (int i = 0; i < n_parts; i++)
		kl_call_add_part(call, parts[i], part_lens[i]);
	kl_call_submit(call);

	initStringInfo(&text);
	out->ids = palloc(sizeof(int32) * cap_ids);
	out->parts = palloc(sizeof(KlStatePart) * cap_parts);
	while (kl_call_next(call, &ev))
	{
		if (ev.type == KL_EV_TOKENS)
		{
			if (out->n_ids + ev.n_ids > cap_ids)
			{
				cap_ids = Max(cap_ids * 2, out->n_ids + ev.n_ids);
				out->ids = repalloc(out->ids, sizeof(int32) * cap_ids);
			}
			memcpy(out->ids + out->n_ids, ev.ids, sizeof(int32) * ev.n_ids);
			out->n_ids += ev.n_ids;
			appendBinaryStringInfo(&text, ev.text, ev.text_len);
		}
		else if (ev.type == KL_EV_STATE)
		{
			KlStatePart *p;

			if (ev.state_len > MaxAllocSize - VARHDRSZ)
				ereport(ERROR,
						(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
						 errmsg("a state of %zu bytes exceeds the 1 GB limit of a value", ev.state_len),
						 errhint("Use a conversation (kimi_linear.say), which stores long histories in pages.")));
			if (out->n_parts == cap_parts)
			{
				cap_parts *= 2;
				out->parts = repalloc(out->parts, sizeof(KlStatePart) * cap_parts);
			}
			p = &out->parts[out->n_parts++];
			p->kind = ev.state_kind;
			p->from_pos = ev.from_pos;
			p->to_pos = ev.to_pos;
			p->blob = palloc(VARHDRSZ + ev.state_len);
			SET_VARSIZE(p->blob, VARHDRSZ + ev.state_len);
			memcpy(VARDATA(p->blob), ev.state, ev.state_len);
		}
	}
	out->cache_miss = call->cache_miss;
	if (!call->cache_miss)
		out->done = ev.done;
	kl_call_end(call);
	out->text = text.data;
	out->text_len = text.len;
}
