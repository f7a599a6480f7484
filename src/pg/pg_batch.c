/*
 * pg_batch.c — the inference worker's scheduler (see pg_batch.h).
 *
 * Memory: bookkeeping of a request lives in its own memory context; engine
 * objects (sequences, state blobs, detokenized text) are malloc'd by the
 * engine and freed here explicitly.  Nothing in this file lets an ERROR
 * escape for a request's bad input: such problems become an ERROR message
 * to that request's backend, and the worker goes on with the others.
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "miscadmin.h"
#include "storage/latch.h"
#include "storage/shm_mq.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "pg_batch.h"

KlWModel	kl_wmodels[KL_MAX_MODELS];
int			kl_worker_index = -1;

typedef enum KlReqPhase
{
	RQ_PREFILL,
	RQ_DECODE,
	RQ_FINISHING,				/* replies queued; detach when delivered */
} KlReqPhase;

/* a reply message waiting to be (completely) sent */
typedef struct KlOut
{
	struct KlOut *next;
	char	   *head;			/* palloc'd */
	Size		head_len;
	char	   *body;			/* palloc'd or malloc'd (body_malloced) */
	Size		body_len;
	bool		body_malloced;
} KlOut;

typedef struct KlReq
{
	struct KlReq *next;
	MemoryContext cxt;
	int			slot;
	uint64		request_id;
	dsm_segment *seg;
	shm_mq_handle *mqh;
	KlRequest	req;			/* copy of the header */
	KlWModel   *wm;
	kl_seq	   *seq;
	KlReqPhase	phase;

	int32	   *input;			/* pending token (if any) + prompt */
	int			n_input;
	int			fed;
	int32		next_token;		/* decode: the token to feed */

	int32	   *stop_ids;
	int			n_stop_ids;
	char	  **stops;			/* stop strings */
	int		   *stop_lens;
	int			n_stops;

	kl_sampling sampling;
	kl_rng		rng;
	kl_grammar *grammar;		/* output constraint, or NULL (malloc'd by the engine) */
	kl_constraint *con;
	uint32_t   *mask;			/* allowed ids of the step (malloc'd) */
	kl_tokens	recent;			/* repetition penalty window (malloc'd) */
	int			generated;
	int			reason;
	bool		want_text;

	/* detokenized text not yet sent (held back while it could start a stop string) */
	kl_detok_stream detok;
	char	   *text;			/* malloc'd by the engine */
	size_t		text_len,
				text_cap;

	KlOut	   *out_head,
			   *out_tail;

	/* not streaming: ids and text gathered for one TOKENS message */
	int32	   *acc_ids;
	int			n_acc,
				cap_acc;
	StringInfoData acc_text;

	bool		cache_hit;
	double		t_submitted,
				t_start,
				t_decode,
				t_end;
} KlReq;

static KlReq *requests = NULL;	/* all requests this worker holds, oldest first */
static int	n_requests = 0;
static MemoryContext batch_cxt = NULL;
static uint64 prefill_rr = 0;	/* round-robin position among prefilling requests */

/* ------------------------------------------------------------------ conversation state cache */

/*
 * A finished conversation turn leaves its sequence here, keyed by the
 * conversation id, with a copy of the head it returned.  The next turn that
 * presents the same head (byte for byte) continues from the cached sequence
 * instead of rebuilding it from the stored pages; a rolled-back turn simply
 * presents an older head and misses.
 */
typedef struct KlCacheEntry
{
	struct KlCacheEntry *next;
	int64		key;
	KlWModel   *wm;
	uint32		generation;
	kl_seq	   *seq;
	char	   *head;			/* malloc'd copy */
	size_t		head_len;
	size_t		bytes;			/* what it holds: seq_bytes() */
	double		used;
} KlCacheEntry;

static KlCacheEntry *cache = NULL;
static size_t cache_bytes = 0;

/*
 * What keeping a sequence costs: what the engine allocated for it (KDA state
 * and MLA pages, kl_seq_bytes), the copy of its head, the entry.  The cache's
 * total of these stays within kimi_linear.state_cache.
 */
static size_t
seq_bytes(const kl_seq *seq, size_t head_len)
{
	return kl_seq_bytes(seq) + head_len + sizeof(KlCacheEntry);
}

static void
cache_free_entry(KlCacheEntry *e)
{
	kl_seq_free(e->seq);
	free(e->head);
	cache_bytes -= e->bytes;
	pfree(e);
}

void
kl_cache_drop_model(KlWModel *wm)
{
	KlCacheEntry **pp = &cache;

	while (*pp)
	{
		KlCacheEntry *e = *pp;

		if (wm == NULL || e->wm == wm)
		{
			*pp = e->next;
			cache_free_entry(e);
		}
		else
			pp = &e->next;
	}
}

void
kl_cache_trim(void)
{
	size_t		limit = (size_t) kl_state_cache_mb * 1024 * 1024;
	bool		freed = false;

	while (cache && cache_bytes > limit)
	{
		KlCacheEntry **pp = &cache,
				  **oldest = &cache;

		for (; *pp; pp = &(*pp)->next)
			if ((*pp)->used < (*oldest)->used)
				oldest = pp;
		{
			KlCacheEntry *e = *oldest;

			*oldest = e->next;
			cache_free_entry(e);
			freed = true;
		}
	}
#ifdef __GLIBC__
	/*
	 * Give the freed pages back to the system: glibc keeps freed heap memory
	 * (the MLA pages are below its adaptive mmap threshold once one was
	 * freed), so without this a smaller cache would not make a smaller
	 * worker.
	 */
	if (freed)
		malloc_trim(0);
#endif
}

/* Take the cached sequence of `key` if its head is exactly `head`. */
static kl_seq *
cache_take(int64 key, KlWModel *wm, const char *head, size_t head_len)
{
	KlCacheEntry **pp;

	for (pp = &cache; *pp; pp = &(*pp)->next)
	{
		KlCacheEntry *e = *pp;

		if (e->key != key)
			continue;
		*pp = e->next;
		if (e->wm == wm && e->generation == wm->generation && e->head_len == head_len &&
			memcmp(e->head, head, head_len) == 0)
		{
			kl_seq	   *seq = e->seq;

			e->seq = NULL;
			cache_bytes -= e->bytes;
			free(e->head);
			pfree(e);
			return seq;
		}
		cache_free_entry(e);
		return NULL;
	}
	return NULL;
}

/* Keep seq (ownership passes) as the state after `head`; copies head. */
static void
cache_put(int64 key, KlWModel *wm, kl_seq *seq, const char *head, size_t head_len)
{
	KlCacheEntry *e;
	char	   *copy;

	if (kl_state_cache_mb <= 0 || (copy = malloc(head_len)) == NULL)
	{
		kl_seq_free(seq);
		return;
	}
	(void) cache_take(key, wm, "", 0);	/* drop an older entry of this key */
	memcpy(copy, head, head_len);
	e = MemoryContextAllocZero(batch_cxt, sizeof(KlCacheEntry));
	e->key = key;
	e->wm = wm;
	e->generation = wm->generation;
	e->seq = seq;
	e->head = copy;
	e->head_len = head_len;
	e->bytes = seq_bytes(seq, head_len);
	e->used = kl_now();
	e->next = cache;
	cache = e;
	cache_bytes += e->bytes;
	kl_cache_trim();
}

/* ------------------------------------------------------------------ replies */

static void
out_push(KlReq *r, const void *head, Size head_len, char *body, Size body_len, bool body_malloced)
{
	KlOut	   *o = MemoryContextAllocZero(r->cxt, sizeof(KlOut));

	o->head = MemoryContextAlloc(r->cxt, head_len);
	memcpy(o->head, head, head_len);
	o->head_len = head_len;
	o->body = body;
	o->body_len = body_len;
	o->body_malloced = body_malloced;
	if (r->out_tail)
		r->out_tail->next = o;
	else
		r->out_head = o;
	r->out_tail = o;
}

static void
send_error(KlReq *r, int code, const char *msg, const char *hint)
{
	KlMsgError e;
	Size		ml = strlen(msg),
				hl = hint ? strlen(hint) : 0;
	char	   *body = MemoryContextAlloc(r->cxt, ml + hl + 1);

	memset(&e, 0, sizeof(e));
	e.type = KL_MSG_ERROR;
	e.code = code;
	e.msg_len = (int32) ml;
	e.hint_len = (int32) hl;
	memcpy(body, msg, ml);
	if (hl)
		memcpy(body + ml, hint, hl);
	out_push(r, &e, sizeof(e), body, ml + hl, false);
	r->phase = RQ_FINISHING;
}

/* An engine error, with the code the engine gave it (pg_errors.c maps it). */
static void
send_engine_error(KlReq *r, const kl_err *err, const char *hint)
{
	send_error(r, err->code, err->msg, hint);
}

static void queue_tokens(KlReq *r, const int32 *ids, int n_ids, const char *text, size_t text_len);

/* what the generation produced: streamed at once, or gathered until the end (flush_tokens) */
static void
send_tokens(KlReq *r, const int32 *ids, int n_ids, const char *text, size_t text_len)
{
	MemoryContext old;

	if (r->req.flags & KL_REQ_STREAM)
	{
		queue_tokens(r, ids, n_ids, text, text_len);
		return;
	}
	old = MemoryContextSwitchTo(r->cxt);
	if (r->acc_text.data == NULL)
		initStringInfo(&r->acc_text);
	if (r->n_acc + n_ids > r->cap_acc)
	{
		r->cap_acc = Max(256, 2 * (r->n_acc + n_ids));
		r->acc_ids = r->acc_ids ? repalloc(r->acc_ids, sizeof(int32) * r->cap_acc)
			: palloc(sizeof(int32) * r->cap_acc);
	}
	memcpy(r->acc_ids + r->n_acc, ids, sizeof(int32) * n_ids);
	r->n_acc += n_ids;
	if (text_len > 0)
		appendBinaryStringInfo(&r->acc_text, text, (int) text_len);
	MemoryContextSwitchTo(old);
}

static void
flush_tokens(KlReq *r)
{
	if (r->n_acc > 0 || (r->acc_text.data && r->acc_text.len > 0))
		queue_tokens(r, r->acc_ids, r->n_acc, r->acc_text.data, r->acc_text.len);
	r->n_acc = 0;
	if (r->acc_text.data)
		resetStringInfo(&r->acc_text);
}

static void
queue_tokens(KlReq *r, const int32 *ids, int n_ids, const char *text, size_t text_len)
{
	KlMsgTokens t;
	char	   *body;

	memset(&t, 0, sizeof(t));
	t.type = KL_MSG_TOKENS;
	t.n_ids = n_ids;
	t.text_len = (int32) text_len;
	body = MemoryContextAlloc(r->cxt, sizeof(int32) * n_ids + text_len + 1);
	memcpy(body, ids, sizeof(int32) * n_ids);
	if (text_len)
		memcpy(body + sizeof(int32) * n_ids, text, text_len);
	out_push(r, &t, sizeof(t), body, sizeof(int32) * n_ids + text_len, false);
}

/*
 * Deliver queued messages, without blocking: a reader that falls behind only
 * holds up its own request.  Returns false when the backend has gone away.
 */
static bool
flush(KlReq *r)
{
	while (r->out_head)
	{
		KlOut	   *o = r->out_head;
		shm_mq_iovec iov[2];
		shm_mq_result res;

		iov[0].data = o->head;
		iov[0].len = o->head_len;
		iov[1].data = o->body;
		iov[1].len = o->body_len;
		res = shm_mq_sendv(r->mqh, iov, o->body_len ? 2 : 1, true, true);
		if (res == SHM_MQ_WOULD_BLOCK)
			return true;
		if (res == SHM_MQ_DETACHED)
			return false;
		r->out_head = o->next;
		if (!r->out_head)
			r->out_tail = NULL;
		if (o->body_malloced)
			free(o->body);
		else if (o->body)
			pfree(o->body);
		pfree(o->head);
		pfree(o);
	}
	return true;
}

/* ------------------------------------------------------------------ request lifetime */

static void
progress(KlReq *r, KlPhase phase)
{
	KlSlot	   *s = &kl_shared->slots[r->slot];
	double		now = kl_now();
	double		tps = 0;

	if (phase == KL_PHASE_DECODE && r->generated > 0 && now > r->t_decode)
		tps = r->generated / (now - r->t_decode);
	else if (phase == KL_PHASE_PREFILL && r->fed > 0 && now > r->t_start)
		tps = r->fed / (now - r->t_start);
	SpinLockAcquire(&s->mutex);
	s->phase = phase;
	s->prompt_done = r->fed;
	s->prompt_total = r->n_input;
	s->generated = r->generated;
	s->tokens_per_second = tps;
	SpinLockRelease(&s->mutex);
}

/* Let go of a request: detach, release the slot, free everything. */
static void
release(KlReq *r)
{
	KlReq	  **pp;

	for (pp = &requests; *pp; pp = &(*pp)->next)
		if (*pp == r)
		{
			*pp = r->next;
			break;
		}
	n_requests--;
	if (r->seg)
		dsm_detach(r->seg);
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	{
		KlSlot	   *s = &kl_shared->slots[r->slot];

		if (s->request_id == r->request_id)
		{
			PGPROC	   *p = s->backend_proc;

			s->worker_done = true;
			kl_slot_release_locked(s);
			if (p)
				SetLatch(&p->procLatch);
		}
		if (kl_shared->workers[kl_worker_index].active > 0)
			kl_shared->workers[kl_worker_index].active--;
	}
	LWLockRelease(kl_shared->lock);
	for (KlOut *o = r->out_head; o; o = o->next)
		if (o->body_malloced)
			free(o->body);
	kl_seq_free(r->seq);
	kl_tokens_free(&r->recent);
	free(r->text);
	kl_constraint_free(r->con);
	kl_grammar_free(r->grammar);
	free(r->mask);
	MemoryContextDelete(r->cxt);
}

/*
 * The request's output constraint: compile the spec, and bind it to the
 * model's vocabulary (indexed once per model, on first use) with the tokens
 * that end it: the eos unless ignore_eos, and the stop ids.
 */
static bool
setup_constraint(KlReq *r, const char *spec, int len)
{
	KlWModel   *wm = r->wm;
	kl_err		err;
	int32	   *ends = palloc(sizeof(int32) * (r->n_stop_ids + 1));
	int			n_ends = 0;

	if (!wm->tok)
	{
		send_error(r, KL_E_INVALID, "structured output needs a model with a tokenizer", NULL);
		return false;
	}
	if (!wm->cvocab && kl_vocab_from_tokenizer(wm->tok, wm->vocab, &wm->cvocab, &err) != KL_OK)
	{
		send_engine_error(r, &err, NULL);
		return false;
	}
	if (!r->req.ignore_eos && wm->eos >= 0)
		ends[n_ends++] = wm->eos;
	for (int i = 0; i < r->n_stop_ids; i++)
		if (r->stop_ids[i] != wm->eos || r->req.ignore_eos)
			ends[n_ends++] = r->stop_ids[i];
	r->mask = malloc(sizeof(uint32_t) * kl_mask_words(wm->vocab));
	if (!r->mask)
	{
		send_error(r, KL_E_RESOURCES, "out of memory for a token mask", NULL);
		return false;
	}
	if (kl_grammar_compile(spec, (size_t) len, &r->grammar, &err) != KL_OK ||
		kl_constraint_new(r->grammar, wm->cvocab, ends, n_ends, &r->con, &err) != KL_OK)
	{
		send_engine_error(r, &err, NULL);
		return false;
	}
	return true;
}

/* The worker's copy of the model the request names; false: r got an error reply. */
static bool
setup_model(KlReq *r)
{
	KlRequest  *q = &r->req;

	for (int i = 0; i < KL_MAX_MODELS; i++)
		if (kl_wmodels[i].in_use && strcmp(kl_wmodels[i].name, q->model) == 0 &&
			kl_wmodels[i].generation == q->model_generation)
			r->wm = &kl_wmodels[i];
	if (!r->wm)
	{
		char		msg[256];

		snprintf(msg, sizeof(msg), "model \"%s\" is not loaded (it was unloaded or replaced)", q->model);
		send_error(r, KL_ERR_MODEL, msg, "Load it with kimi_linear.load_model(name, path) and retry.");
		return false;
	}
	return true;
}

/* Sampling settings and limits, checked again (the backend checked them first). */
static bool
setup_sampling(KlReq *r)
{
	KlRequest  *q = &r->req;
	kl_err		err;

	kl_sampling_default(&r->sampling);
	r->sampling.temperature = q->temperature;
	r->sampling.top_p = q->top_p;
	r->sampling.top_k = q->top_k;
	r->sampling.min_p = q->min_p;
	r->sampling.repetition_penalty = q->repetition_penalty;
	r->sampling.seed = q->seed;
	if (kl_sampling_validate(&r->sampling, &err) != KL_OK)
	{
		send_engine_error(r, &err, NULL);
		return false;
	}
	if (q->max_tokens < 0)
	{
		send_error(r, KL_E_INVALID, "max_tokens must not be negative", NULL);
		return false;
	}
	kl_rng_seed(&r->rng, q->seed);
	r->want_text = (q->flags & KL_REQ_WANT_TEXT) != 0 && r->wm->tok != NULL;
	return true;
}

/* Stop ids and strings, copied out of the segment. */
static bool
setup_stops(KlReq *r, const KlReqView *v)
{
	r->n_stop_ids = v->hdr.n_stop_ids;
	r->stop_ids = palloc(sizeof(int32) * (r->n_stop_ids + 1));
	memcpy(r->stop_ids, v->stop_ids, sizeof(int32) * r->n_stop_ids);
	r->n_stops = v->n_stops;
	r->stops = palloc(sizeof(char *) * (v->n_stops + 1));
	r->stop_lens = palloc(sizeof(int) * (v->n_stops + 1));
	for (int i = 0; i < v->n_stops; i++)
	{
		r->stops[i] = pnstrdup(v->stops[i], v->stop_lens[i]);
		r->stop_lens[i] = v->stop_lens[i];
	}
	if (r->n_stops > 0 && r->wm->tok == NULL)
	{
		send_error(r, KL_E_INVALID, "stop strings need a model with a tokenizer", "Use stop token ids instead.");
		return false;
	}
	return true;
}

/* The sequence: the cached one, the one the state parts describe, or a fresh one. */
static bool
setup_sequence(KlReq *r, const KlReqView *v)
{
	const KlRequest *q = &v->hdr;
	kl_blob    *parts = palloc(sizeof(kl_blob) * (q->n_parts + 1));
	const kl_blob *head = NULL; /* the last part */
	kl_err		err;

	kl_request_parts(dsm_segment_address(r->seg), v, parts);
	if (q->n_parts > 0)
		head = &parts[q->n_parts - 1];
	if (q->cache_key != 0 && head)
		r->seq = cache_take(q->cache_key, r->wm, (const char *) head->data, head->len);
	if (r->seq)
	{
		r->cache_hit = true;
		return true;
	}
	if (kl_seq_new(r->wm->m, &r->seq, &err) != KL_OK)
	{
		send_engine_error(r, &err, NULL);
		return false;
	}
	if (head)
	{
		kl_state_info info;

		/* a head alone that does not start at 0 was sent hoping for the cache */
		if (q->cache_key != 0 && kl_state_info_read(head->data, head->len, &info, &err) == KL_OK &&
			info.kind == KL_STATE_HEAD && info.from_pos > 0 && q->n_parts == 1)
		{
			send_error(r, KL_ERR_CACHE_MISS, "conversation state is not cached", NULL);
			return false;
		}
		if (kl_state_load(r->seq, parts, q->n_parts, &err) != KL_OK)
		{
			send_engine_error(r, &err,
							  "The state must come from this model (kimi_linear.generate_with_state or a conversation) and be passed back unchanged.");
			return false;
		}
	}
	return true;
}

/* What to feed: the pending token (if any), then the prompt, exactly as kl_generate. */
static bool
setup_input(KlReq *r, const KlReqView *v)
{
	const KlRequest *q = &v->hdr;
	KlWModel   *wm = r->wm;
	int			pending = kl_seq_pending(r->seq);
	int64		positions = kl_seq_positions(r->seq);
	int			first = pending >= 0 ? 1 : 0;
	kl_err		err;

	r->n_input = q->n_prompt + first;
	if (r->n_input == 0)
	{
		send_error(r, KL_E_INVALID, "empty prompt: there is nothing to continue from",
				   "Give a non-empty prompt.");
		return false;
	}
	if (positions + r->n_input > q->max_context)
	{
		char		msg[256];

		snprintf(msg, sizeof(msg),
				 "the input does not fit in the context: %lld positions of history + %d new tokens > kimi_linear.max_context (%lld)",
				 (long long) positions, r->n_input, (long long) q->max_context);
		send_error(r, KL_E_RESOURCES, msg, "Shorten the prompt, start a new conversation, or raise kimi_linear.max_context.");
		return false;
	}
	r->input = palloc(sizeof(int32) * r->n_input);
	if (pending >= 0)
		r->input[0] = pending;
	memcpy(r->input + first, v->prompt, sizeof(int32) * q->n_prompt);
	for (int i = 0; i < r->n_input; i++)
		if (r->input[i] < 0 || r->input[i] >= wm->vocab)
		{
			char		msg[256];

			snprintf(msg, sizeof(msg), "token id %d is outside the vocabulary of model \"%s\" [0, %d)",
					 r->input[i], wm->name, wm->vocab);
			send_error(r, KL_E_INVALID, msg, NULL);
			return false;
		}
	/* the repetition penalty sees the prompt, not the pending token (as kl_generate) */
	for (int i = 0; i < q->n_prompt; i++)
		if (kl_tokens_push(&r->recent, r->input[i + first], &err) != KL_OK)
		{
			send_engine_error(r, &err, NULL);
			return false;
		}
	kl_seq_set_pending(r->seq, -1);
	if (r->want_text)
		kl_detok_stream_init(&r->detok, wm->tok);
	return true;
}

/*
 * Turn a decoded request (its sizes and offsets checked: kl_request_decode)
 * into a sequence ready to prefill, in its own memory context; false: r got
 * an error reply.
 */
static bool
setup(KlReq *r, const KlReqView *v)
{
	MemoryContext old = MemoryContextSwitchTo(r->cxt);
	bool		ok;

	r->req = v->hdr;
	ok = setup_model(r) && setup_sampling(r) && setup_stops(r, v) &&
		(v->grammar == NULL || setup_constraint(r, v->grammar, v->grammar_len)) &&
		setup_sequence(r, v) && setup_input(r, v);
	MemoryContextSwitchTo(old);
	if (ok)
		r->phase = RQ_PREFILL;
	return ok;
}

void
kl_batch_init(void)
{
	batch_cxt = AllocSetContextCreate(TopMemoryContext, "kimi_linear worker", ALLOCSET_DEFAULT_SIZES);
}

int
kl_batch_count(void)
{
	return n_requests;
}

/* Take the oldest request submitted to this worker: its slot (-1: none), segment and id. */
static int
claim_slot(dsm_handle *handle, uint64 *rid)
{
	int			found = -1;

	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < kl_shared->n_slots; i++)
	{
		KlSlot	   *s = &kl_shared->slots[i];

		if (s->state == KL_SLOT_SUBMITTED && s->worker == kl_worker_index)
		{
			/* oldest first: request ids grow */
			if (found < 0 || s->request_id < kl_shared->slots[found].request_id)
				found = i;
		}
	}
	if (found >= 0)
	{
		KlSlot	   *s = &kl_shared->slots[found];

		s->state = KL_SLOT_RUNNING;
		*handle = s->handle;
		*rid = s->request_id;
		kl_shared->workers[kl_worker_index].active++;
		SpinLockAcquire(&s->mutex);
		s->started_at = GetCurrentTimestamp();
		SpinLockRelease(&s->mutex);
	}
	LWLockRelease(kl_shared->lock);
	return found;
}

/* A new request of slot `slot`, at the end of the list (it stays in arrival order). */
static KlReq *
new_request(int slot, uint64 rid)
{
	KlReq	   *r = MemoryContextAllocZero(batch_cxt, sizeof(KlReq));
	KlReq	  **pp = &requests;

	r->cxt = AllocSetContextCreate(batch_cxt, "kimi_linear request", ALLOCSET_SMALL_SIZES);
	r->slot = slot;
	r->request_id = rid;
	r->t_submitted = r->t_start = kl_now();
	r->next = NULL;
	while (*pp)
		pp = &(*pp)->next;
	*pp = r;
	n_requests++;
	return r;
}

void
kl_batch_admit(void)
{
	for (;;)
	{
		dsm_handle	handle = 0;
		uint64		rid = 0;
		int			slot = claim_slot(&handle, &rid);
		KlReq	   *r;
		KlReqView	v;
		KlDecodeResult res;
		const char *why;
		shm_mq	   *mq;

		if (slot < 0)
			return;
		r = new_request(slot, rid);
		r->seg = dsm_attach(handle);
		/* the backend already gave up, or gives up now */
		if (r->seg == NULL || pg_atomic_read_u32(&kl_shared->slots[slot].cancel))
		{
			release(r);
			continue;
		}
		res = kl_request_decode(dsm_segment_address(r->seg), dsm_segment_map_length(r->seg), rid, &v, &why);
		if (res == KL_DECODE_NO_QUEUE)
		{
			release(r);
			continue;
		}
		r->req = v.hdr;			/* (the reply, even an error, reads the flags) */
		mq = (shm_mq *) ((char *) dsm_segment_address(r->seg) + v.hdr.mq_off);
		shm_mq_set_sender(mq, MyProc);
		r->mqh = shm_mq_attach(mq, r->seg, NULL);
		if (res == KL_DECODE_MALFORMED)
		{
			char		msg[256];

			snprintf(msg, sizeof(msg), "malformed kimi_linear request: %s", why);
			send_error(r, KL_E_INTERNAL, msg, NULL);
		}
		else if (setup(r, &v))
			progress(r, KL_PHASE_PREFILL);
	}
}

/* ------------------------------------------------------------------ generation */

static bool
is_stop_id(KlReq *r, int32 id)
{
	if (!r->req.ignore_eos && r->wm->eos >= 0 && id == r->wm->eos)
	{
		r->reason = KL_STOP_EOS;
		return true;
	}
	for (int i = 0; i < r->n_stop_ids; i++)
		if (r->stop_ids[i] == id)
		{
			r->reason = KL_STOP_STOP_ID;
			return true;
		}
	return false;
}

/* Longest tail of text that is a proper prefix of some stop string (held back). */
static size_t
holdback(KlReq *r)
{
	size_t		best = 0;

	for (int i = 0; i < r->n_stops; i++)
	{
		size_t		maxk = Min((size_t) r->stop_lens[i] - 1, r->text_len);

		for (size_t k = maxk; k > best; k--)
			if (memcmp(r->text + r->text_len - k, r->stops[i], k) == 0)
			{
				best = k;
				break;
			}
	}
	return best;
}

/* Find a stop string in text[from...]; returns its offset or -1. */
static ssize_t
find_stop(KlReq *r, size_t from)
{
	ssize_t		best = -1;

	for (int i = 0; i < r->n_stops; i++)
	{
		size_t		l = r->stop_lens[i];

		for (size_t p = from; p + l <= r->text_len; p++)
			if (memcmp(r->text + p, r->stops[i], l) == 0)
			{
				if (best < 0 || (ssize_t) p < best)
					best = p;
				break;
			}
	}
	return best;
}

/* Send what of the text can no longer become part of a stop string (all at the end). */
static void
emit(KlReq *r, const int32 *ids, int n_ids, bool final)
{
	size_t		n = final ? r->text_len : r->text_len - holdback(r);

	if (n == 0 && n_ids == 0)
		return;
	send_tokens(r, ids, n_ids, r->text, n);
	memmove(r->text, r->text + n, r->text_len - n);
	r->text_len -= n;
}

static void
finish(KlReq *r)
{
	KlMsgDone	d;
	kl_err		err;

	r->t_end = kl_now();
	if (r->want_text)
	{
		if (r->reason != KL_STOP_STRING &&
			kl_detok_stream_finish(&r->detok, &r->text, &r->text_len, &r->text_cap, &err) != KL_OK)
		{
			send_engine_error(r, &err, NULL);
			return;
		}
		emit(r, NULL, 0, true);
	}
	flush_tokens(r);
	progress(r, KL_PHASE_FINISHING);

	if (r->req.flags & KL_REQ_WANT_STATE)
	{
		int64		pos = kl_seq_positions(r->seq);
		int64		upto = 0;
		uint8_t    *blob;
		size_t		len;

		if (r->req.page_size > 0)
		{
			int64		ps = r->req.page_size;

			upto = Max(r->req.pages_upto, 0);
			if (upto > pos)
				upto = pos;
			while (upto + ps <= pos)
			{
				KlMsgState s;

				if (kl_state_save_rows(r->seq, upto, upto + ps, &blob, &len, &err) != KL_OK)
				{
					send_engine_error(r, &err, NULL);
					return;
				}
				memset(&s, 0, sizeof(s));
				s.type = KL_MSG_STATE;
				s.kind = KL_STATE_ROWS;
				s.from_pos = upto;
				s.to_pos = upto + ps;
				s.len = len;
				out_push(r, &s, sizeof(s), (char *) blob, len, true);
				upto += ps;
			}
		}
		if (kl_state_save(r->seq, upto, &blob, &len, &err) != KL_OK)
		{
			send_engine_error(r, &err, NULL);
			return;
		}
		{
			KlMsgState s;

			memset(&s, 0, sizeof(s));
			s.type = KL_MSG_STATE;
			s.kind = KL_STATE_HEAD;
			s.from_pos = upto;
			s.to_pos = pos;
			s.len = len;
			out_push(r, &s, sizeof(s), (char *) blob, len, true);
		}
		/* keep the sequence for the conversation's next turn */
		if (r->req.cache_key != 0 && kl_state_cache_mb > 0)
		{
			cache_put(r->req.cache_key, r->wm, r->seq, (const char *) blob, len);
			r->seq = NULL;
		}
	}

	memset(&d, 0, sizeof(d));
	d.type = KL_MSG_DONE;
	d.reason = r->reason;
	d.prompt_tokens = r->req.n_prompt;
	d.generated = r->generated;
	d.positions = r->seq ? kl_seq_positions(r->seq) : 0;
	d.pending = r->seq ? kl_seq_pending(r->seq) : -1;
	if (!r->seq && r->out_tail)
	{
		/* the head we just queued knows */
		kl_state_info info;
		KlOut	   *o = r->out_tail;

		if (kl_state_info_read((const uint8_t *) o->body, o->body_len, &info, &err) == KL_OK)
		{
			d.positions = info.positions;
			d.pending = info.pending;
		}
	}
	d.cache_hit = r->cache_hit;
	d.queue_seconds = r->t_start - r->t_submitted;
	d.prefill_seconds = (r->t_decode ? r->t_decode : r->t_end) - r->t_start;
	d.decode_seconds = r->t_decode ? r->t_end - r->t_decode : 0;
	out_push(r, &d, sizeof(d), NULL, 0, false);
	r->phase = RQ_FINISHING;
}

/*
 * A token was sampled: record it, stream its text, decide whether to stop.
 * Mirrors the loop body of kl_generate().
 */
static void
accept_token(KlReq *r, int32 tok)
{
	kl_err		err;
	bool		stop;
	bool		id_stop;
	int64		pos = kl_seq_positions(r->seq);

	r->generated++;
	if (kl_tokens_push(&r->recent, tok, &err) != KL_OK)
	{
		send_engine_error(r, &err, NULL);
		return;
	}
	id_stop = is_stop_id(r, tok);
	stop = id_stop;
	if (!stop && r->generated >= r->req.max_tokens)
	{
		stop = true;
		r->reason = KL_STOP_MAX_TOKENS;
	}
	if (!stop && pos + 1 > r->req.max_context)
	{
		/* feeding this token would pass the context limit */
		stop = true;
		r->reason = KL_STOP_CONTEXT;
	}

	if (r->want_text && !(id_stop && (r->req.flags & KL_REQ_SKIP_STOP_TEXT)))
	{
		size_t		before = r->text_len;

		if (kl_detok_stream_push(&r->detok, tok, &r->text, &r->text_len, &r->text_cap, &err) != KL_OK)
		{
			send_engine_error(r, &err, NULL);
			return;
		}
		if (r->n_stops > 0)
		{
			size_t		maxl = 0;
			ssize_t		at;

			for (int i = 0; i < r->n_stops; i++)
				maxl = Max(maxl, (size_t) r->stop_lens[i]);
			at = find_stop(r, before >= maxl ? before - maxl + 1 : 0);
			if (at >= 0)
			{
				r->text_len = at;
				stop = true;
				r->reason = KL_STOP_STRING;
			}
		}
	}
	if (stop)
	{
		kl_seq_set_pending(r->seq, tok);
		if (r->want_text)
			emit(r, &tok, 1, false);
		else
			send_tokens(r, &tok, 1, NULL, 0);
		finish(r);
		return;
	}
	if (r->want_text)
		emit(r, &tok, 1, false);
	else
		send_tokens(r, &tok, 1, NULL, 0);
	r->next_token = tok;
}

/*
 * Before a pass that samples r's next token: r's sampling request for
 * kl_forward_sample (settings, generator, the recent ids for the penalty, and
 * the output constraint's mask, computed here per step for the sequences that
 * have one).  The pass draws the token where the model runs (on the GPU only
 * the ids come back), as ./kl generate does.  false: r got an error reply.
 */
static bool
sample_prepare(KlReq *r, kl_sample_req *sr)
{
	kl_err		err;

	if (r->con && kl_constraint_mask(r->con, r->mask, NULL, &err) != KL_OK)
	{
		send_error(r, err.code == KL_E_RESOURCES ? KL_E_RESOURCES : KL_E_INTERNAL, err.msg, NULL);
		return false;
	}
	memset(sr, 0, sizeof(*sr));
	sr->sampling = &r->sampling;
	sr->rng = &r->rng;
	sr->recent = r->recent.ids;
	sr->n_recent = (int) r->recent.n;
	sr->allowed = r->con ? r->mask : NULL;
	return true;
}

/*
 * After the pass: the constraint advances by the token drawn.  It was
 * compiled and checked in setup: failing here (a dead end, a token the mask
 * allowed refused) is our bug, not the caller's input.  false: r got an
 * error reply.
 */
static bool
sample_accept(KlReq *r, int32 tok)
{
	kl_err		err;

	if (r->con && kl_constraint_accept(r->con, tok, &err) != KL_OK)
	{
		send_error(r, KL_E_INTERNAL, err.msg, NULL);
		return false;
	}
	return true;
}

/* ------------------------------------------------------------------ scheduling */

void
kl_batch_poll(void)
{
	KlReq	   *r = requests;

	while (r)
	{
		KlReq	   *next = r->next;

		if (pg_atomic_read_u32(&kl_shared->slots[r->slot].cancel) || !r->mqh)
		{
			release(r);
			r = next;
			continue;
		}
		if (!flush(r))
		{
			release(r);			/* the backend went away */
			r = next;
			continue;
		}
		if (r->phase == RQ_FINISHING && r->out_head == NULL)
			release(r);
		r = next;
	}
}

bool
kl_batch_runnable(void)
{
	for (KlReq *r = requests; r; r = r->next)
		if (r->phase == RQ_PREFILL || (r->phase == RQ_DECODE && r->out_head == NULL))
			return true;
	return false;
}

static void
fail_group(KlReq **group, int n, const kl_err *err)
{
	for (int i = 0; i < n; i++)
		send_engine_error(group[i], err, NULL);
}

/* Make sure a model's ctx can take steps of `tokens` rows. */
static bool
ensure_ctx(KlWModel *wm, int tokens, kl_err *err)
{
	if (wm->ctx && wm->ctx_tokens >= tokens)
		return true;
	kl_ctx_free(wm->ctx);
	wm->ctx = NULL;
	if (kl_ctx_new(wm->m, tokens, &wm->ctx, err) != KL_OK)
		return false;
	wm->ctx_tokens = tokens;
	return true;
}

static void
decode_group(KlWModel *wm, KlReq **group, int n)
{
	kl_batch_item items[KL_DECODE_GROUP];
	kl_sample_req sreq[KL_DECODE_GROUP];
	const kl_sample_req *reqs[KL_DECODE_GROUP];
	int32_t		tokens[KL_DECODE_GROUP];
	KlReq	   *live[KL_DECODE_GROUP];
	int			m = 0;
	kl_err		err;

	for (int i = 0; i < n; i++)
	{
		KlReq	   *r = group[i];

		if (!sample_prepare(r, &sreq[m]))
			continue;
		live[m] = r;
		reqs[m] = &sreq[m];
		items[m].seq = r->seq;
		items[m].ids = &r->next_token;
		items[m].n = 1;
		items[m].logits = NULL;
		items[m].all_logits = false;
		m++;
	}
	if (m == 0)
		return;
	if (!ensure_ctx(wm, Max(kl_prefill_chunk, KL_DECODE_GROUP), &err) ||
		kl_forward_sample(wm->ctx, items, m, reqs, tokens, &err) != KL_OK)
	{
		fail_group(live, m, &err);
		return;
	}
	kl_shared->workers[kl_worker_index].steps++;
	kl_shared->workers[kl_worker_index].tokens += m;
	for (int i = 0; i < m; i++)
	{
		KlReq	   *r = live[i];

		if (!sample_accept(r, tokens[i]))
			continue;
		accept_token(r, tokens[i]);
		progress(r, r->phase == RQ_FINISHING ? KL_PHASE_FINISHING : KL_PHASE_DECODE);
	}
}

static void
prefill_chunk(KlReq *r)
{
	KlWModel   *wm = r->wm;
	int			chunk = kl_prefill_chunk;
	int			take = chunk - r->fed % chunk;
	bool		last,
				sample;
	kl_batch_item item;
	kl_sample_req sreq;
	const kl_sample_req *reqs[1] = {&sreq};
	int32_t		tok = -1;
	kl_err		err;

	if (take > r->n_input - r->fed)
		take = r->n_input - r->fed;
	last = r->fed + take == r->n_input;
	/* the last chunk's pass also draws the first new token */
	sample = last && r->req.max_tokens > 0;
	if (sample && !sample_prepare(r, &sreq))
		return;
	item.seq = r->seq;
	item.ids = r->input + r->fed;
	item.n = take;
	item.logits = NULL;
	item.all_logits = false;
	if (!ensure_ctx(wm, Max(chunk, KL_DECODE_GROUP), &err) ||
		kl_forward_sample(wm->ctx, &item, 1, sample ? reqs : NULL, sample ? &tok : NULL, &err) != KL_OK)
	{
		send_engine_error(r, &err, NULL);
		return;
	}
	kl_shared->workers[kl_worker_index].steps++;
	kl_shared->workers[kl_worker_index].tokens += take;
	r->fed += take;
	if (!last)
	{
		progress(r, KL_PHASE_PREFILL);
		return;
	}
	r->t_decode = kl_now();
	if (!sample)
	{
		r->reason = KL_STOP_NONE;
		finish(r);
		return;
	}
	r->phase = RQ_DECODE;
	if (!sample_accept(r, tok))
		return;
	accept_token(r, tok);
	progress(r, r->phase == RQ_FINISHING ? KL_PHASE_FINISHING : KL_PHASE_DECODE);
}

void
kl_batch_step(void)
{
	/* 1. decode: every decoding sequence one token, grouped per model */
	for (int mi = 0; mi < KL_MAX_MODELS; mi++)
	{
		KlWModel   *wm = &kl_wmodels[mi];
		KlReq	   *group[KL_DECODE_GROUP];
		int			n = 0;

		if (!wm->in_use)
			continue;
		for (KlReq *r = requests; r; r = r->next)
		{
			/* a reader that has not taken the last tokens waits (backpressure) */
			if (r->wm != wm || r->phase != RQ_DECODE || r->out_head != NULL)
				continue;
			group[n++] = r;
			if (n == KL_DECODE_GROUP)
			{
				decode_group(wm, group, n);
				n = 0;
			}
		}
		if (n > 0)
			decode_group(wm, group, n);
	}

	/*
	 * 2. prefill: chunks of waiting prompts, round-robin, up to the budget
	 * (one chunk's worth of tokens unless kimi_linear.prefill_budget says
	 * more: prefill must keep up with the sequences that finish decoding, or
	 * the decode group runs below its size).  Each chunk is a forward pass of
	 * its own, cut as when the sequence runs alone, so results do not depend
	 * on the other requests.
	 */
	{
		int			n_pre = 0;
		int			budget = kl_prefill_budget > 0 ? kl_prefill_budget : kl_prefill_chunk;
		KlReq	   *order[1024];

		for (KlReq *r = requests; r && n_pre < 1024; r = r->next)
			if (r->phase == RQ_PREFILL)
				order[n_pre++] = r;
		for (int k = 0; k < n_pre && budget > 0; k++)
		{
			KlReq	   *r = order[(prefill_rr + k) % n_pre];
			int			before = r->fed;

			prefill_chunk(r);
			budget -= Max(r->fed - before, 1);
		}
		prefill_rr++;
	}
	/* push out what the step produced */
	for (KlReq *r = requests; r; r = r->next)
		(void) flush(r);
}

void
kl_batch_fail_all(KlWModel *wm, int code, const char *msg, const char *hint)
{
	for (KlReq *r = requests; r; r = r->next)
	{
		if (wm && r->wm != wm)
			continue;
		if (!(r->phase == RQ_FINISHING && r->out_tail && r->out_tail->head[0] == KL_MSG_DONE))
			send_error(r, code, msg, hint);
		/* nothing computes for it any more; its sequence may belong to a model about to be freed */
		if (r->phase == RQ_FINISHING)
		{
			kl_seq_free(r->seq);
			r->seq = NULL;
			if (wm)
				r->wm = NULL;
		}
	}
}

void
kl_batch_drain(int timeout_ms)
{
	double		until = kl_now() + timeout_ms / 1000.0;

	while (requests && kl_now() < until)
	{
		kl_batch_poll();
		if (!requests)
			break;
		pg_usleep(1000);
	}
}
