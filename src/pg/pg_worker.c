/*
 * pg_worker.c — an inference background worker: it owns the loaded models
 * and runs every request sent to it (protocol: pg_protocol.h).
 *
 * The loop, once per step:
 *   1. follow the model registry (load / unload models);
 *   2. admit new requests from the slots assigned to this worker, receive
 *      their request messages, restore their states;
 *   3. drop requests whose backend cancelled or went away;
 *   4. build one batch: every decoding sequence feeds its last sampled token,
 *      and prompts are prefilled in chunks that share a budget of
 *      kimi_linear.prefill_chunk tokens per step, so one long prompt never
 *      stalls the others (continuous batching);
 *   5. one kl_forward() per model for the whole batch; sample; stream the
 *      tokens back; finish requests (state parts, DONE);
 *   6. sleep on the latch when there is nothing to do.
 *
 * The engine uses malloc and its own threads (which block signals); nothing
 * here may ereport(ERROR) out of the loop: problems with one request become
 * an ERROR message to its backend, and the worker carries on.
 */
#include "postgres.h"

#include <math.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/shm_mq.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "kl.h"
#include "pg_shmem.h"
#include "tokenizer.h"

PGDLLEXPORT void kl_worker_main(Datum arg);

typedef struct LoadedModel
{
	bool		used;
	int			entry;			/* registry index */
	uint32		generation;		/* registry entry generation it was loaded for */
	kl_model   *model;
	kl_ctx	   *ctx;
	int			vocab;
	int32		eos;
} LoadedModel;

/* an outgoing message not yet (completely) sent */
typedef struct OutMsg
{
	struct OutMsg *next;
	Size		len;
	char		data[FLEXIBLE_ARRAY_MEMBER];
} OutMsg;

typedef enum WPhase
{
	W_RECEIVING,				/* waiting for the request message */
	W_PREFILL,					/* feeding input */
	W_DECODE,					/* feeding sampled tokens */
	W_FLUSHING,					/* finished; sending what is left */
} WPhase;

typedef struct WReq
{
	bool		used;
	int			slot;
	uint64		request_id;
	dsm_segment *seg;
	shm_mq_handle *in,
			   *out;
	WPhase		phase;
	KlRequest	hdr;
	LoadedModel *lm;
	kl_seq	   *seq;
	int32	   *input;			/* pending token, closing eos, prompt */
	int			n_input;
	int			fed;
	int32		next_token;		/* sampled, to feed in the next decode step */
	int			generated;
	int32	   *stop_ids;
	kl_tokens	recent;			/* prompt and generated ids: repetition penalty */
	kl_rng		rng;
	kl_sampling sp;
	float	   *logits;
	int64		pages_from;		/* the loaded state's pages end here */
	kl_detok_stream ds;
	char	   *hold;			/* decoded text held back (a stop string may start in it) */
	size_t		hold_len,
				hold_cap;
	OutMsg	   *outq,
			   *outq_tail;
	int			reason;
	double		t_admit,
				t_prefilled;
	int			prompt_tokens;
} WReq;

static int	my_index;
static uint32 my_generation;
static LoadedModel models[KL_MAX_MODELS];
static WReq *reqs;				/* [n_slots] indexed like the slots */

/* ------------------------------------------------------------------ messages */

static void
queue_msg(WReq *r, const void *a, Size alen, const void *b, Size blen, const void *c, Size clen)
{
	OutMsg	   *m = malloc(offsetof(OutMsg, data) + alen + blen + clen);

	if (!m)
		return;					/* out of memory: the backend sees a short reply and an error */
	m->next = NULL;
	m->len = alen + blen + clen;
	memcpy(m->data, a, alen);
	if (blen)
		memcpy(m->data + alen, b, blen);
	if (clen)
		memcpy(m->data + alen + blen, c, clen);
	if (r->outq_tail)
		r->outq_tail->next = m;
	else
		r->outq = m;
	r->outq_tail = m;
}

static void
queue_error(WReq *r, int code, const char *fmt,...) pg_attribute_printf(3, 4);

static void
queue_error(WReq *r, int code, const char *fmt,...)
{
	KlMsgError e;
	char		msg[1200];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	e.type = KL_MSG_ERROR;
	e.code = code;
	e.len = (int32) strlen(msg);
	queue_msg(r, &e, sizeof(e), msg, e.len, NULL, 0);
}

/* Send what can be sent without blocking; false if the backend is gone. */
static bool
flush_out(WReq *r)
{
	while (r->outq)
	{
		OutMsg	   *m = r->outq;
		shm_mq_result res = shm_mq_send(r->out, m->len, m->data, true, true);

		if (res == SHM_MQ_WOULD_BLOCK)
			return true;
		if (res == SHM_MQ_DETACHED)
			return false;
		r->outq = m->next;
		if (!r->outq)
			r->outq_tail = NULL;
		free(m);
	}
	return true;
}

/* ------------------------------------------------------------------ requests */

static void
set_progress(WReq *r, KlPhase phase)
{
	KlSlot	   *s = &kl_shared->slots[r->slot];
	double		dt = kl_now() - r->t_admit;

	SpinLockAcquire(&s->mutex);
	s->phase = phase;
	s->prompt_done = r->fed < r->n_input ? r->fed : r->n_input;
	s->prompt_total = r->n_input;
	s->generated = r->generated;
	if (phase == KL_PHASE_PREFILL && dt > 0)
		s->tokens_per_second = r->fed / dt;
	else if (phase == KL_PHASE_DECODE && r->t_prefilled > 0 && kl_now() > r->t_prefilled)
		s->tokens_per_second = r->generated / (kl_now() - r->t_prefilled);
	SpinLockRelease(&s->mutex);
}

/* Forget a request: free everything, hand the slot back to its backend. */
static void
release_req(WReq *r)
{
	KlSlot	   *s = &kl_shared->slots[r->slot];
	PGPROC	   *backend = NULL;

	while (r->outq)
	{
		OutMsg	   *m = r->outq;

		r->outq = m->next;
		free(m);
	}
	if (r->seq)
		kl_seq_free(r->seq);
	free(r->input);
	free(r->stop_ids);
	free(r->logits);
	free(r->hold);
	kl_tokens_free(&r->recent);
	if (r->seg)
		dsm_detach(r->seg);

	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	if (s->request_id == r->request_id && s->state != KL_SLOT_FREE)
	{
		s->state = KL_SLOT_FINISHED;
		backend = s->backend_proc;
	}
	if (kl_shared->workers[my_index].active > 0)
		kl_shared->workers[my_index].active--;
	LWLockRelease(kl_shared->lock);
	SpinLockAcquire(&s->mutex);
	s->phase = KL_PHASE_DONE;
	SpinLockRelease(&s->mutex);
	if (backend)
		SetLatch(&backend->procLatch);
	memset(r, 0, sizeof(*r));
}

/* Stop a request with an error; what remains is flushed by the loop. */
static void
fail_req(WReq *r, int code, const char *msg)
{
	queue_error(r, code, "%s", msg);
	r->phase = W_FLUSHING;
}

static LoadedModel *
find_loaded(const char *name)
{
	for (int i = 0; i < KL_MAX_MODELS; i++)
		if (models[i].used && strcmp(kl_shared->models[models[i].entry].name, name) == 0 &&
			kl_shared->models[models[i].entry].generation == models[i].generation)
			return &models[i];
	return NULL;
}

/* The request message has arrived: check it and set the request up. */
static void
start_req(WReq *r, const char *data, Size len)
{
	const KlRequest *h = (const KlRequest *) data;
	const char *p;
	const char *end = data + len;
	kl_err		err;
	kl_blob    *parts = NULL;
	int32		pending;

	if (len < sizeof(KlRequest) || h->magic != KL_PROTOCOL_MAGIC || h->version != KL_PROTOCOL_VERSION)
	{
		fail_req(r, KL_ERR_INTERNAL, "malformed request (protocol mismatch between backend and worker)");
		return;
	}
	r->hdr = *h;
	r->hdr.model[KL_MODEL_NAME_LEN - 1] = 0;
	if (h->n_stop_ids < 0 || h->n_stop_ids > KL_MAX_STOP_IDS || h->n_prompt < 0 || h->n_state_parts < 0 ||
		h->n_state_parts > 1 << 20 || h->n_stop_strings < 0 || h->n_stop_strings > KL_MAX_STOP_STRINGS ||
		h->max_tokens < 0 || h->page_size < 0 ||
		(Size) (end - (data + sizeof(KlRequest))) < sizeof(int32) * ((Size) h->n_stop_ids + h->n_prompt))
	{
		fail_req(r, KL_ERR_INTERNAL, "malformed request (sizes)");
		return;
	}
	r->lm = find_loaded(r->hdr.model);
	if (!r->lm)
	{
		fail_req(r, KL_ERR_MODEL, "model is not loaded in the inference worker (it may have been unloaded)");
		return;
	}
	p = data + sizeof(KlRequest);
	r->stop_ids = malloc(sizeof(int32) * (h->n_stop_ids + 1));
	r->input = malloc(sizeof(int32) * ((Size) h->n_prompt + 2));
	r->logits = malloc(sizeof(float) * r->lm->vocab);
	if (!r->stop_ids || !r->input || !r->logits)
	{
		fail_req(r, KL_ERR_RESOURCES, "out of memory in the inference worker");
		return;
	}
	memcpy(r->stop_ids, p, sizeof(int32) * h->n_stop_ids);
	p += sizeof(int32) * h->n_stop_ids;

	if (kl_seq_new(r->lm->model, &r->seq, &err) != KL_OK)
	{
		fail_req(r, KL_ERR_RESOURCES, err.msg);
		return;
	}
	/* the state, if any: pages then a head, each (uint64 length, bytes) */
	p += sizeof(int32) * h->n_prompt;
	if (h->n_state_parts > 0)
	{
		parts = malloc(sizeof(kl_blob) * h->n_state_parts);
		if (!parts)
		{
			fail_req(r, KL_ERR_RESOURCES, "out of memory in the inference worker");
			return;
		}
		for (int i = 0; i < h->n_state_parts; i++)
		{
			uint64		plen;

			if ((Size) (end - p) < sizeof(uint64))
			{
				free(parts);
				fail_req(r, KL_ERR_INTERNAL, "malformed request (state parts)");
				return;
			}
			memcpy(&plen, p, sizeof(uint64));
			p += sizeof(uint64);
			if (plen > (uint64) (end - p))
			{
				free(parts);
				fail_req(r, KL_ERR_INTERNAL, "malformed request (state part length)");
				return;
			}
			parts[i].data = (const uint8_t *) p;
			parts[i].len = plen;
			p += plen;
		}
		if (kl_state_load(r->seq, parts, h->n_state_parts, &err) != KL_OK)
		{
			free(parts);
			fail_req(r, KL_ERR_INVALID, err.msg);
			return;
		}
		{
			kl_state_info info;

			if (kl_state_info_read(parts[h->n_state_parts - 1].data, parts[h->n_state_parts - 1].len,
								   &info, &err) == KL_OK)
				r->pages_from = info.from_pos;
		}
		free(parts);
	}

	/* input: the pending token, a closing eos for a cut-off chat reply, the prompt */
	pending = kl_seq_pending(r->seq);
	if (pending >= 0)
		r->input[r->n_input++] = pending;
	if ((h->flags & KL_REQ_CHAT_TURN) && pending >= 0 && pending != r->lm->eos && r->lm->eos >= 0)
		r->input[r->n_input++] = r->lm->eos;
	memcpy(r->input + r->n_input, data + sizeof(KlRequest) + sizeof(int32) * h->n_stop_ids,
		   sizeof(int32) * h->n_prompt);
	r->n_input += h->n_prompt;
	kl_seq_set_pending(r->seq, -1);
	r->prompt_tokens = h->n_prompt;
	for (int i = 0; i < r->n_input; i++)
		if (r->input[i] < 0 || r->input[i] >= r->lm->vocab)
		{
			fail_req(r, KL_ERR_INVALID, "token id outside the model's vocabulary");
			return;
		}
	if (r->n_input == 0)
	{
		fail_req(r, KL_ERR_INVALID, "empty prompt and no state to continue from");
		return;
	}
	if (kl_seq_positions(r->seq) + r->n_input + (int64) h->max_tokens > kl_max_context)
	{
		char		msg[256];

		snprintf(msg, sizeof(msg), "the sequence would reach %lld positions (%lld of history, %d of input, up to "
				 "%d new), more than kimi_linear.max_context (%d)",
				 (long long) (kl_seq_positions(r->seq) + r->n_input + h->max_tokens),
				 (long long) kl_seq_positions(r->seq), r->n_input, h->max_tokens, kl_max_context);
		fail_req(r, KL_ERR_RESOURCES, msg);
		return;
	}
	for (int i = 0; i < h->n_prompt; i++)
		(void) kl_tokens_push(&r->recent, r->input[r->n_input - h->n_prompt + i], &err);
	kl_sampling_default(&r->sp);
	r->sp.temperature = h->temperature;
	r->sp.top_k = h->top_k;
	r->sp.top_p = h->top_p;
	r->sp.min_p = h->min_p;
	r->sp.repetition_penalty = h->repetition_penalty;
	r->sp.seed = h->seed;
	if (kl_sampling_validate(&r->sp, &err) != KL_OK)
	{
		fail_req(r, KL_ERR_INVALID, err.msg);
		return;
	}
	kl_rng_seed(&r->rng, h->seed);
	if (kl_model_tokenizer(r->lm->model))
		kl_detok_stream_init(&r->ds, kl_model_tokenizer(r->lm->model));
	r->phase = W_PREFILL;
	set_progress(r, KL_PHASE_PREFILL);
}

static bool
is_stop_id(WReq *r, int32 id)
{
	if (!r->hdr.ignore_eos && id == r->lm->eos)
		return true;
	for (int i = 0; i < r->hdr.n_stop_ids; i++)
		if (r->stop_ids[i] == id)
			return true;
	return false;
}

/*
 * Emit the decoded text of a new token, holding back any tail that could be
 * the start of a stop string.  Returns true when a stop string appeared (its
 * text and whatever follows are not emitted).
 */
static bool
emit_token(WReq *r, int32 id, bool final)
{
	KlMsgTokens m;
	kl_err		err;
	size_t		emit;
	bool		stopped = false;

	if (kl_model_tokenizer(r->lm->model))
	{
		(void) kl_detok_stream_push(&r->ds, id, &r->hold, &r->hold_len, &r->hold_cap, &err);
		if (final)
			(void) kl_detok_stream_finish(&r->ds, &r->hold, &r->hold_len, &r->hold_cap, &err);
	}
	emit = r->hold_len;
	for (int s = 0; s < r->hdr.n_stop_strings; s++)
	{
		const char *stop = r->hdr.stop_strings[s];
		size_t		sl = strnlen(stop, KL_MAX_STOP_LEN);

		if (sl == 0 || !r->hold)
			continue;
		/* a complete occurrence */
		for (size_t i = 0; i + sl <= r->hold_len; i++)
			if (memcmp(r->hold + i, stop, sl) == 0)
			{
				if (i < emit || !stopped)
					emit = i;
				stopped = true;
				break;
			}
		/* a tail that may grow into one */
		if (!stopped && !final)
			for (size_t k = sl - 1; k > 0; k--)
				if (k <= r->hold_len && memcmp(r->hold + r->hold_len - k, stop, k) == 0)
				{
					if (r->hold_len - k < emit)
						emit = r->hold_len - k;
					break;
				}
	}
	m.type = KL_MSG_TOKENS;
	m.n_ids = 1;
	m.text_len = (int32) emit;
	queue_msg(r, &m, sizeof(m), &id, sizeof(int32), r->hold, emit);
	if (r->hold)
	{
		memmove(r->hold, r->hold + emit, r->hold_len - emit);
		r->hold_len -= emit;
		if (stopped)
			r->hold_len = 0;
	}
	return stopped;
}

static void
queue_state(WReq *r, int kind, int64 from, int64 to)
{
	kl_err		err;
	uint8_t    *blob;
	size_t		len;
	KlMsgState m;
	int			rc = kind == KL_STATE_HEAD ? kl_state_save(r->seq, from, &blob, &len, &err)
		: kl_state_save_rows(r->seq, from, to, &blob, &len, &err);

	if (rc != KL_OK)
	{
		queue_error(r, KL_ERR_RESOURCES, "%s", err.msg);
		return;
	}
	m.type = KL_MSG_STATE;
	m.kind = kind;
	m.from_pos = from;
	m.to_pos = kind == KL_STATE_HEAD ? kl_seq_positions(r->seq) : to;
	m.len = len;
	queue_msg(r, &m, sizeof(m), blob, len, NULL, 0);
	free(blob);
}

static void
finish_req(WReq *r, int32 last, int reason)
{
	KlMsgDone	d;

	kl_seq_set_pending(r->seq, last);
	if (r->hdr.flags & KL_REQ_WANT_STATE)
	{
		int64		pos = kl_seq_positions(r->seq);
		int64		P = r->hdr.page_size;

		if (P <= 0)
			queue_state(r, KL_STATE_HEAD, 0, pos);
		else
		{
			int64		boundary = pos / P * P;

			for (int64 p = r->pages_from; p + P <= boundary; p += P)
				queue_state(r, KL_STATE_ROWS, p, p + P);
			queue_state(r, KL_STATE_HEAD, boundary > r->pages_from ? boundary : r->pages_from, pos);
		}
	}
	d.type = KL_MSG_DONE;
	d.reason = reason;
	d.prompt_tokens = r->prompt_tokens;
	d.generated = r->generated;
	d.positions = kl_seq_positions(r->seq);
	d.prefill_seconds = (r->t_prefilled > 0 ? r->t_prefilled : kl_now()) - r->t_admit;
	d.decode_seconds = r->t_prefilled > 0 ? kl_now() - r->t_prefilled : 0;
	queue_msg(r, &d, sizeof(d), NULL, 0, NULL, 0);
	r->phase = W_FLUSHING;
	set_progress(r, KL_PHASE_DONE);
}

/* Logits are ready: sample, stream, decide whether to go on. */
static void
after_logits(WReq *r)
{
	int32		tok;
	bool		stop_id,
				stop_str,
				limit;
	kl_err		err;

	if (r->t_prefilled == 0)
		r->t_prefilled = kl_now();
	tok = kl_sample(&r->sp, &r->rng, r->logits, r->lm->vocab, r->recent.ids, (int) r->recent.n);
	r->generated++;
	(void) kl_tokens_push(&r->recent, tok, &err);
	stop_id = is_stop_id(r, tok);
	limit = r->generated >= r->hdr.max_tokens;
	stop_str = emit_token(r, tok, stop_id || limit);
	if (stop_id || stop_str || limit)
		finish_req(r, tok, stop_str ? KL_STOP_STRING : stop_id ? (tok == r->lm->eos ? KL_STOP_EOS : KL_STOP_STOP_ID)
				   : KL_STOP_MAX_TOKENS);
	else
	{
		r->next_token = tok;
		r->phase = W_DECODE;
	}
}

/* ------------------------------------------------------------------ models */

static void
sync_models(void)
{
	for (int e = 0; e < KL_MAX_MODELS; e++)
	{
		KlModelEntry *me = &kl_shared->models[e];
		KlModelState state;
		uint32		gen;
		uint8		mine;
		char		path[MAXPGPATH];
		int			device;
		LoadedModel *lm = NULL;

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		state = me->state;
		gen = me->generation;
		mine = me->wload[my_index];
		strlcpy(path, me->path, sizeof(path));
		device = me->device;
		LWLockRelease(kl_shared->lock);

		for (int i = 0; i < KL_MAX_MODELS; i++)
			if (models[i].used && models[i].entry == e)
				lm = &models[i];
		/* loaded for an older use of the entry, or being unloaded: release */
		if (lm && (lm->generation != gen || state == KL_MODEL_UNLOADING || state == KL_MODEL_FREE))
		{
			for (int s = 0; s < kl_shared->n_slots; s++)
				if (reqs[s].used && reqs[s].lm == lm)
				{
					if (reqs[s].phase != W_FLUSHING)
						fail_req(&reqs[s], KL_ERR_MODEL, "the model was unloaded during the request");
					reqs[s].lm = NULL;
				}
			kl_ctx_free(lm->ctx);
			kl_model_free(lm->model);
			memset(lm, 0, sizeof(*lm));
			lm = NULL;
			LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
			if (me->generation == gen)
				me->wload[my_index] = KL_WLOAD_NONE;
			LWLockRelease(kl_shared->lock);
		}
		if (state == KL_MODEL_UNLOADING)
		{
			/* the last worker out frees the entry */
			bool		all = true;

			LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
			if (me->generation == gen)
			{
				me->wload[my_index] = KL_WLOAD_NONE;
				for (int w = 0; w < kl_shared->n_workers; w++)
					if (me->wload[w] != KL_WLOAD_NONE)
						all = false;
				if (all)
				{
					me->state = KL_MODEL_FREE;
					me->generation++;
				}
			}
			LWLockRelease(kl_shared->lock);
			continue;
		}
		if ((state == KL_MODEL_LOADING || state == KL_MODEL_READY) && mine == KL_WLOAD_NONE && !lm)
		{
			kl_load_opts opts = {0};
			kl_err		err;
			kl_model   *m = NULL;
			kl_ctx	   *ctx = NULL;
			int			rc;
			int			slot = -1;

			for (int i = 0; i < KL_MAX_MODELS; i++)
				if (!models[i].used)
				{
					slot = i;
					break;
				}
			opts.device = kl_device_name(device);
			rc = kl_model_load(path, &opts, &m, &err);
			if (rc == KL_OK)
				rc = kl_ctx_new(m, kl_prefill_chunk + 256, &ctx, &err);
			if (rc == KL_OK && slot < 0)
			{
				rc = KL_FAIL;
				snprintf(err.msg, sizeof(err.msg), "too many models loaded");
			}
			LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
			if (me->generation != gen)
			{
				/* unloaded while we loaded it */
				LWLockRelease(kl_shared->lock);
				kl_ctx_free(ctx);
				kl_model_free(m);
				continue;
			}
			if (rc == KL_OK)
			{
				const kl_config *c = kl_model_config(m);

				me->wload[my_index] = KL_WLOAD_READY;
				me->n_params = kl_model_n_params(m);
				me->bytes = (int64) kl_model_weight_bytes(m);
				strlcpy(me->device_name, kl_model_device(m), sizeof(me->device_name));
				me->vocab_size = c->vocab_size;
				if (me->loaded_at == 0)
					me->loaded_at = GetCurrentTimestamp();
				models[slot].used = true;
				models[slot].entry = e;
				models[slot].generation = gen;
				models[slot].model = m;
				models[slot].ctx = ctx;
				models[slot].vocab = c->vocab_size;
				models[slot].eos = c->eos_id;
				if (kl_model_tokenizer(m) && kl_tokenizer_eos(kl_model_tokenizer(m)) >= 0)
					models[slot].eos = kl_tokenizer_eos(kl_model_tokenizer(m));
			}
			else
			{
				me->wload[my_index] = KL_WLOAD_FAILED;
				strlcpy(me->error, err.msg, sizeof(me->error));
				me->state = KL_MODEL_FAILED;
				kl_ctx_free(ctx);
				kl_model_free(m);
			}
			/* ready when every running worker has it */
			if (me->state == KL_MODEL_LOADING)
			{
				bool		all = true;

				for (int w = 0; w < kl_shared->n_workers; w++)
					if (kl_shared->workers[w].pid != 0 && me->wload[w] != KL_WLOAD_READY)
						all = false;
				if (all)
					me->state = KL_MODEL_READY;
			}
			LWLockRelease(kl_shared->lock);
			/* backends waiting for the load poll; wake them all */
			for (int s = 0; s < kl_shared->n_slots; s++)
				;
		}
	}
}

/* ------------------------------------------------------------------ the loop */

static void
admit_requests(void)
{
	for (int s = 0; s < kl_shared->n_slots; s++)
	{
		KlSlot	   *slot = &kl_shared->slots[s];
		WReq	   *r = &reqs[s];
		dsm_handle	h;
		uint64		id;

		if (r->used || slot->state != KL_SLOT_SUBMITTED || slot->worker != my_index)
			continue;
		LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
		if (slot->state != KL_SLOT_SUBMITTED || slot->worker != my_index ||
			slot->worker_generation != my_generation)
		{
			LWLockRelease(kl_shared->lock);
			continue;
		}
		slot->state = KL_SLOT_RUNNING;
		h = slot->handle;
		id = slot->request_id;
		kl_shared->workers[my_index].active++;
		LWLockRelease(kl_shared->lock);

		memset(r, 0, sizeof(*r));
		r->used = true;
		r->slot = s;
		r->request_id = id;
		r->t_admit = kl_now();
		r->seg = dsm_attach(h);
		if (!r->seg)
		{
			/* the backend is already gone */
			release_req(r);
			continue;
		}
		{
			char	   *base = dsm_segment_address(r->seg);
			Size		half = (dsm_segment_map_length(r->seg) - MAXALIGN(sizeof(uint64))) / 2;
			shm_mq	   *req_mq = (shm_mq *) (base + MAXALIGN(sizeof(uint64)));
			shm_mq	   *rep_mq = (shm_mq *) (base + MAXALIGN(sizeof(uint64)) + half);

			shm_mq_set_receiver(req_mq, MyProc);
			shm_mq_set_sender(rep_mq, MyProc);
			r->in = shm_mq_attach(req_mq, r->seg, NULL);
			r->out = shm_mq_attach(rep_mq, r->seg, NULL);
		}
		r->phase = W_RECEIVING;
	}
}

static bool
cancelled(WReq *r)
{
	KlSlot	   *s = &kl_shared->slots[r->slot];

	return pg_atomic_read_u32(&s->cancel) != 0 || s->request_id != r->request_id;
}

/* One step: returns true if there was anything to do. */
static bool
step(void)
{
	bool		busy = false;
	bool		blocked = false;

	for (int li = 0; li < KL_MAX_MODELS; li++)
	{
		LoadedModel *lm = &models[li];
		kl_batch_item *items;
		WReq	  **owner;
		int			n = 0,
					budget = kl_prefill_chunk;
		kl_err		err;

		if (!lm->used)
			continue;
		items = palloc(sizeof(kl_batch_item) * kl_shared->n_slots);
		owner = palloc(sizeof(WReq *) * kl_shared->n_slots);
		/* decoding sequences first: one token each */
		for (int s = 0; s < kl_shared->n_slots; s++)
		{
			WReq	   *r = &reqs[s];

			if (!r->used || r->lm != lm || r->phase != W_DECODE)
				continue;
			items[n].seq = r->seq;
			items[n].ids = &r->next_token;
			items[n].n = 1;
			items[n].logits = r->logits;
			items[n].all_logits = false;
			owner[n++] = r;
		}
		/* prompts in chunks, sharing the budget */
		for (int s = 0; s < kl_shared->n_slots && budget > 0; s++)
		{
			WReq	   *r = &reqs[s];
			int			take;

			if (!r->used || r->lm != lm || r->phase != W_PREFILL)
				continue;
			take = r->n_input - r->fed;
			if (take > budget)
				take = budget;
			items[n].seq = r->seq;
			items[n].ids = r->input + r->fed;
			items[n].n = take;
			items[n].logits = (r->fed + take == r->n_input && r->hdr.max_tokens > 0) ? r->logits : NULL;
			items[n].all_logits = false;
			owner[n++] = r;
			budget -= take;
		}
		if (n == 0)
		{
			pfree(items);
			pfree(owner);
			continue;
		}
		busy = true;
		kl_set_threads(kl_threads);
		if (kl_forward(lm->ctx, items, n, &err) != KL_OK)
		{
			for (int i = 0; i < n; i++)
				fail_req(owner[i], KL_ERR_RESOURCES, err.msg);
		}
		else
			for (int i = 0; i < n; i++)
			{
				WReq	   *r = owner[i];

				if (r->phase == W_DECODE)
				{
					after_logits(r);
					set_progress(r, KL_PHASE_DECODE);
				}
				else
				{
					r->fed += items[i].n;
					if (r->fed == r->n_input)
					{
						if (r->hdr.max_tokens == 0)
							finish_req(r, -1, KL_STOP_MAX_TOKENS);
						else
							after_logits(r);
					}
					set_progress(r, r->phase == W_PREFILL ? KL_PHASE_PREFILL : KL_PHASE_DECODE);
				}
			}
		pfree(items);
		pfree(owner);
	}

	/* send, and retire finished requests */
	for (int s = 0; s < kl_shared->n_slots; s++)
	{
		WReq	   *r = &reqs[s];

		if (!r->used)
			continue;
		if (!flush_out(r))
		{
			release_req(r);		/* backend detached */
			continue;
		}
		if (r->outq)
			blocked = true;
		else if (r->phase == W_FLUSHING)
			release_req(r);
	}
	return busy || blocked;
}

static void
receive_and_check(void)
{
	for (int s = 0; s < kl_shared->n_slots; s++)
	{
		WReq	   *r = &reqs[s];

		if (!r->used)
			continue;
		if (cancelled(r))
		{
			release_req(r);
			continue;
		}
		if (r->phase == W_RECEIVING)
		{
			Size		len;
			void	   *data;
			shm_mq_result res = shm_mq_receive(r->in, &len, &data, true);

			if (res == SHM_MQ_SUCCESS)
				start_req(r, data, len);
			else if (res == SHM_MQ_DETACHED)
				release_req(r);
		}
		else if (r->phase != W_FLUSHING && r->lm == NULL)
			fail_req(r, KL_ERR_MODEL, "the model was unloaded during the request");
	}
}

static void
worker_exit(int code, Datum arg)
{
	/* let the backends waiting on this worker notice at once */
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	kl_shared->workers[my_index].pid = 0;
	kl_shared->workers[my_index].proc = NULL;
	kl_shared->workers[my_index].generation++;
	kl_shared->workers[my_index].active = 0;
	for (int s = 0; s < kl_shared->n_slots; s++)
		if (kl_shared->slots[s].state != KL_SLOT_FREE && kl_shared->slots[s].worker == my_index &&
			kl_shared->slots[s].backend_proc)
			SetLatch(&kl_shared->slots[s].backend_proc->procLatch);
	LWLockRelease(kl_shared->lock);
}

void
kl_worker_main(Datum arg)
{
	my_index = DatumGetInt32(arg);

	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	BackgroundWorkerUnblockSignals();
	kl_require_shared();

	reqs = MemoryContextAllocZero(TopMemoryContext, sizeof(WReq) * kl_shared->n_slots);
	LWLockAcquire(kl_shared->lock, LW_EXCLUSIVE);
	kl_shared->workers[my_index].pid = MyProcPid;
	kl_shared->workers[my_index].proc = MyProc;
	kl_shared->workers[my_index].generation++;
	kl_shared->workers[my_index].active = 0;
	my_generation = kl_shared->workers[my_index].generation;
	/* a fresh process has no models: load everything registered again */
	for (int e = 0; e < KL_MAX_MODELS; e++)
		kl_shared->models[e].wload[my_index] = KL_WLOAD_NONE;
	LWLockRelease(kl_shared->lock);
	before_shmem_exit(worker_exit, 0);
	kl_set_threads(kl_threads);

	elog(LOG, "kimi_linear inference worker %d started", my_index);
	for (;;)
	{
		bool		busy;

		if (ShutdownRequestPending)
			break;
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		ResetLatch(MyLatch);
		sync_models();
		admit_requests();
		receive_and_check();
		busy = step();
		if (!busy)
		{
			bool		waiting = false;

			for (int s = 0; s < kl_shared->n_slots; s++)
				if (reqs[s].used)
					waiting = true;
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 waiting ? 10 : 1000, PG_WAIT_EXTENSION);
		}
	}
	/* shutting down: tell everyone still waiting */
	for (int s = 0; s < kl_shared->n_slots; s++)
		if (reqs[s].used)
		{
			queue_error(&reqs[s], KL_ERR_INTERNAL, "the inference worker is shutting down");
			(void) flush_out(&reqs[s]);
			release_req(&reqs[s]);
		}
	elog(LOG, "kimi_linear inference worker %d stopping", my_index);
	/* exit code 1: the postmaster restarts us (unless the server is stopping) */
	proc_exit(1);
}
