/*
 * forward.c — the Kimi Linear forward pass, top to bottom.
 *
 *     h = embed_tokens[token]
 *     for each layer i:  h = h + Mixer_i(RMSNorm(h; input_layernorm))      KDA or MLA
 *                        h = h + FFN_i(RMSNorm(h; post_attention_layernorm)) dense MLP or MoE
 *     logits = lm_head(RMSNorm(h; model.norm))
 *
 * (docs/model.md has the math.)  A step runs a ragged batch:
 * the rows of all sequences go through the linear layers together, so a
 * weight matrix is read once per step whatever the number of sequences; the
 * mixers work per sequence.  All arithmetic is fp32; the backend (backend.h)
 * does the work.
 */
#include <stdlib.h>
#include <string.h>

#include "model.h"

#define DEFAULT_STEP_TOKENS 512
#define LOGIT_ROWS 64			/* lm_head rows computed at once for all_logits */

struct kl_ctx
{
	kl_model   *m;
	kl_backend *be;
	int			max_tokens;
	bool		force_recurrent;
	bool		profile;
	double		prof[KL_PROF_N];

	/* activations, [max_tokens, width] each (backend memory) */
	float	   *x;				/* the residual stream h */
	float	   *xn;				/* normalized input of a block */
	/* projection scratch, [max_tokens, width]: the blocks share the buffers
	 * (sized for the widest role), so each is named after what it holds
	 * (roles per block are listed at each block below) */
	float	   *q_gate;			/* q (KDA, MLA); MLP gate; MoE output */
	float	   *k_up;			/* k (KDA); MLA latent rows; MLP up */
	float	   *v_hidden;		/* v (KDA); MLA attention output; MLP hidden */
	float	   *decay;			/* KDA f, the decay before softplus */
	float	   *out_gate;		/* KDA output gate before sigmoid */
	float	   *low_rank;		/* low-rank half of f (KDA); of q (MLA) */
	float	   *mixer_out;		/* KDA output before o_proj */
	float	   *beta;			/* KDA beta before sigmoid */
	float	   *gate_low_rank;	/* low-rank half of the KDA output gate */
	float	   *lrows;			/* rows whose logits are wanted [LOGIT_ROWS, D] */
	float	   *logits;			/* [LOGIT_ROWS, vocab] */
	float	   *logits_host;	/* staging for download */

	/* host-side step description */
	int32_t    *ids;			/* [max_tokens] */
	int		   *row0;
	int64_t    *pos0;
	kl_seq	  **seqs;
};

static inline int
imax(int a, int b)
{
	return a > b ? a : b;
}

/* Run an op, charging its time to a part when profiling. */
#define TIMED(c, part, ...) \
	do { \
		double		t0_ = (c)->profile ? kl_now() : 0; \
		__VA_ARGS__; \
		if ((c)->profile) \
		{ \
			(c)->be->ops->sync((c)->be); \
			(c)->prof[part] += kl_now() - t0_; \
		} \
	} while (0)

/* Several products of one stage at once (one dispatch on the CPU). */
static void
matmuls(kl_ctx *c, const kl_matmul_job *jobs, int count)
{
	if (c->be->ops->matmul_batch)
		c->be->ops->matmul_batch(c->be, jobs, count);
	else
		for (int i = 0; i < count; i++)
			c->be->ops->matmul(c->be, jobs[i].y, jobs[i].ldy, jobs[i].x, jobs[i].ldx, jobs[i].n, jobs[i].W);
}

/* ------------------------------------------------------------------ the mixers */

/*
 * The weights read right after a mixer's small kernels (its o_proj, then the
 * MoE router and shared expert, in the order they are read): a backend that can (ops->prefetch) starts fetching them while
 * those kernels run.  Called once the mixer's input products are queued.
 */
static void
prefetch_after_mixer(kl_ctx *c, const kl_layer *L, const kl_weight *o_proj)
{
	kl_backend *be = c->be;

	if (!be->ops->prefetch)
		return;
	be->ops->prefetch(be, o_proj);
	if (!L->is_moe)
		return;
	be->ops->prefetch(be, &L->moe.router);
	if (L->moe.has_shared)
	{
		be->ops->prefetch(be, &L->moe.shared.gate);
		be->ops->prefetch(be, &L->moe.shared.up);
		be->ops->prefetch(be, &L->moe.shared.down);
	}
}

/*
 * KDA: projections, then the backend's fused op (short conv, normalization,
 * decay, delta rule, gated norm), then o_proj.
 *   q_gate, k_up, v_hidden = q, k, v (pre-conv), decay = f (pre-softplus),
 *   out_gate = gate (pre-sigmoid), low_rank, gate_low_rank = the low-rank
 *   halves of f and gate, beta (pre-sigmoid), mixer_out = the mixer output
 *   before o_proj.
 */
static void
kda_mixer(kl_ctx *c, const kl_step *st, const kl_layer *L)
{
	kl_backend *be = c->be;
	const kl_kda_layer *w = &L->kda;
	const kl_config *cfg = &c->m->cfg;
	int			n = st->n_tokens;
	int			D = cfg->hidden_size;
	int			HK = cfg->kda_heads * cfg->kda_head_dim;
	int			K = cfg->kda_head_dim;
	kl_kda_args a;

	TIMED(c, KL_PROF_LINEAR, {
		/* q, k, v, f and gate are read by the KDA op only: a backend may keep them in bf16 (result16) */
		kl_matmul_job from_x[] = {
			{c->q_gate, HK, c->xn, D, n, &w->q_proj, KL_R16_KDA_IN},
			{c->k_up, HK, c->xn, D, n, &w->k_proj, KL_R16_KDA_IN},
			{c->v_hidden, HK, c->xn, D, n, &w->v_proj, KL_R16_KDA_IN},
			{c->low_rank, K, c->xn, D, n, &w->f_a, 0},
			{c->gate_low_rank, K, c->xn, D, n, &w->g_a, 0},
			{c->beta, cfg->kda_heads, c->xn, D, n, &w->b_proj, 0},
		};
		kl_matmul_job low_rank[] = {
			{c->decay, HK, c->low_rank, K, n, &w->f_b, KL_R16_KDA_IN},
			{c->out_gate, HK, c->gate_low_rank, K, n, &w->g_b, KL_R16_KDA_GATE},
		};

		matmuls(c, from_x, 6);
		prefetch_after_mixer(c, L, &w->o_proj);
		matmuls(c, low_rank, 2);
	});

	a.w = w;
	a.kda_index = L->kind_index;
	a.q = c->q_gate;
	a.k = c->k_up;
	a.v = c->v_hidden;
	a.f = c->decay;
	a.b = c->beta;
	a.gate = c->out_gate;
	a.out = c->mixer_out;
	TIMED(c, KL_PROF_KDA, be->ops->kda(be, st, &a));

	TIMED(c, KL_PROF_LINEAR, be->ops->matmul(be, c->xn, D, c->mixer_out, HK, n, &w->o_proj));
}

/*
 * MLA: q (directly or through the low-rank q_a/q_b), the latent row
 * [c, k_pe] = kv_a_proj_with_mqa(x) with c normalized by kv_a_layernorm, then
 * the backend's attention over the latent cache, then o_proj.
 *   q_gate = q, k_up = latent rows, low_rank = q low-rank scratch,
 *   v_hidden = attention output.
 */
static void
mla_mixer(kl_ctx *c, const kl_step *st, const kl_layer *L)
{
	kl_backend *be = c->be;
	const kl_mla_layer *w = &L->mla;
	const kl_config *cfg = &c->m->cfg;
	int			n = st->n_tokens;
	int			D = cfg->hidden_size;
	int			Ha = cfg->mla_heads;
	int			Dq = cfg->qk_nope_dim + cfg->qk_rope_dim;
	int			Wkv = kl_mla_row(cfg);
	kl_mla_args a;

	TIMED(c, KL_PROF_LINEAR, {
		kl_matmul_job from_x[2] = {
			{c->k_up, Wkv, c->xn, D, n, &w->kv_a, 0},
			{c->q_gate, Ha * Dq, c->xn, D, n, &w->q_proj, 0},
		};

		if (cfg->q_lora_rank > 0)
		{
			kl_matmul_job qa = {c->low_rank, cfg->q_lora_rank, c->xn, D, n, &w->q_a, 0};

			from_x[1] = qa;
		}
		matmuls(c, from_x, 2);
		prefetch_after_mixer(c, L, &w->o_proj);
		if (cfg->q_lora_rank > 0)
		{
			be->ops->rmsnorm(be, c->low_rank, cfg->q_lora_rank, c->low_rank, cfg->q_lora_rank, w->q_a_norm, n,
							 cfg->q_lora_rank, cfg->rms_norm_eps);
			be->ops->matmul(be, c->q_gate, Ha * Dq, c->low_rank, cfg->q_lora_rank, n, &w->q_b);
		}

		/* normalize the first R numbers of each row in place; k_pe stays raw */
		be->ops->rmsnorm(be, c->k_up, Wkv, c->k_up, Wkv, w->kv_a_norm, n, cfg->kv_lora_rank, cfg->rms_norm_eps);
	});

	a.w = w;
	a.mla_index = L->kind_index;
	a.q = c->q_gate;
	a.kv = c->k_up;
	a.out = c->v_hidden;
	TIMED(c, KL_PROF_MLA, be->ops->mla(be, st, &a));

	TIMED(c, KL_PROF_LINEAR, be->ops->matmul(be, c->xn, D, c->v_hidden, Ha * cfg->v_head_dim, n, &w->o_proj));
}

/* ------------------------------------------------------------------ feed-forward */

/* Dense SwiGLU MLP: down(silu(gate x) * up x).  q_gate = gate, k_up = up,
 * v_hidden = h. */
static void
dense_mlp(kl_ctx *c, int n, const kl_mlp *mlp, int I)
{
	kl_backend *be = c->be;
	int			D = c->m->cfg.hidden_size;

	kl_matmul_job gate_up[] = {
		{c->q_gate, I, c->xn, D, n, &mlp->gate, 0},
		{c->k_up, I, c->xn, D, n, &mlp->up, 0},
	};

	matmuls(c, gate_up, 2);
	be->ops->swiglu(be, c->v_hidden, c->q_gate, c->k_up, n, I, I);
	be->ops->matmul(be, c->xn, D, c->v_hidden, I, n, &mlp->down);
}

/* The feed-forward block of layer L; returns the buffer holding its output
 * (the MoE writes q_gate, so that no copy back to xn is needed). */
static float *
ffn(kl_ctx *c, int n, const kl_layer *L)
{
	if (L->is_moe)
	{
		TIMED(c, KL_PROF_MOE, c->be->ops->moe(c->be, &c->m->cfg, &L->moe, c->q_gate, c->xn, n));
		return c->q_gate;
	}
	TIMED(c, KL_PROF_LINEAR, dense_mlp(c, n, &L->mlp, c->m->cfg.intermediate_size));
	return c->xn;
}

/* ------------------------------------------------------------------ one step */

/*
 * Run the layers over the rows of one step; afterwards ctx->x holds the final
 * hidden states (before model.norm).
 */
static int
run_layers(kl_ctx *c, const kl_step *st, kl_err *err)
{
	kl_model   *m = c->m;
	kl_backend *be = c->be;
	const kl_config *cfg = &m->cfg;
	int			n = st->n_tokens;
	int			D = cfg->hidden_size;
	size_t		nD = (size_t) n * D;

	TIMED(c, KL_PROF_OTHER, be->ops->embed(be, c->x, &m->embed, c->ids, n));
	for (int i = 0; i < cfg->n_layers; i++)
	{
		const kl_layer *L = &m->layers[i];

		TIMED(c, KL_PROF_OTHER, be->ops->rmsnorm(be, c->xn, D, c->x, D, L->input_norm, n, D, cfg->rms_norm_eps));
		if (L->kind == KL_LAYER_KDA)
			kda_mixer(c, st, L);
		else
			mla_mixer(c, st, L);
		TIMED(c, KL_PROF_OTHER, be->ops->add(be, c->x, c->xn, nD));

		TIMED(c, KL_PROF_OTHER, be->ops->rmsnorm(be, c->xn, D, c->x, D, L->post_norm, n, D, cfg->rms_norm_eps));
		{
			float	   *out = ffn(c, n, L);

			TIMED(c, KL_PROF_OTHER, be->ops->add(be, c->x, out, nD));
		}

		if (be->failed)
		{
			kl_errc(err, be->err.code, "layer %d: %s", i, be->err.msg);
			be->failed = false;
			return KL_FAIL;
		}
	}
	return KL_OK;
}

/*
 * Logits are computed for a list of (row of ctx->x, host destination) pairs,
 * LOGIT_ROWS at a time, so that a batch's last-token rows share one pass over
 * lm_head (the largest matrix of small models).  A row may also carry a
 * sampling request (kl_batch_item.sample): its token is chosen on the device
 * where the backend can (only the id comes back), else on the host.
 *
 * Computing (final norm, lm_head) and delivering (download, sampling) are
 * separate: a step computes its logits before end_step, so that a decode
 * step's graph holds them, and delivers them after.
 */
typedef struct logit_queue
{
	int			n;
	bool		computed;		/* the queued rows' logits are in ctx->logits */
	int			row[LOGIT_ROWS];
	float	   *dst[LOGIT_ROWS];
	const kl_sample_req *req[LOGIT_ROWS];	/* sampling request of this row, or NULL */
	int32_t    *token[LOGIT_ROWS];	/* where its token goes */
} logit_queue;

static void
logits_compute(kl_ctx *c, logit_queue *q)
{
	kl_backend *be = c->be;
	const kl_config *cfg = &c->m->cfg;
	int			D = cfg->hidden_size;
	int			V = cfg->vocab_size;
	bool		in_order = true;
	double		t0 = kl_now();

	if (q->n == 0 || q->computed)
		return;
	for (int r = 0; r < q->n; r++)
		in_order &= q->row[r] == r;
	if (in_order)
	{
		/* rows 0 .. n-1 (decode): normalized straight out of the residual stream */
		be->ops->rmsnorm(be, c->lrows, D, c->x, D, c->m->final_norm, q->n, D, cfg->rms_norm_eps);
	}
	else
	{
		for (int r = 0; r < q->n; r++)
			be->ops->copy(be, c->lrows + (size_t) r * D, c->x + (size_t) q->row[r] * D,
						  sizeof(float) * (size_t) D);
		be->ops->rmsnorm(be, c->lrows, D, c->lrows, D, c->m->final_norm, q->n, D, cfg->rms_norm_eps);
	}
	be->ops->matmul(be, c->logits, V, c->lrows, D, q->n, &c->m->lm_head);
	q->computed = true;
	if (c->profile)
	{
		be->ops->sync(be);
		c->prof[KL_PROF_LOGITS] += kl_now() - t0;
	}
}

static int
logits_deliver(kl_ctx *c, logit_queue *q, kl_err *err)
{
	kl_backend *be = c->be;
	int			V = c->m->cfg.vocab_size;
	bool		any_dst = false,
				any_sample = false;
	double		t0 = kl_now();
	int			rc = KL_OK;

	if (q->n == 0)
		return KL_OK;
	logits_compute(c, q);
	for (int r = 0; r < q->n; r++)
	{
		any_dst |= q->dst[r] != NULL;
		any_sample |= q->req[r] != NULL;
	}
	if (any_dst || (any_sample && !be->ops->sample))
	{
		be->ops->download(be, c->logits_host, c->logits, sizeof(float) * (size_t) q->n * V);
		for (int r = 0; r < q->n; r++)
			if (q->dst[r])
				memcpy(q->dst[r], c->logits_host + (size_t) r * V, sizeof(float) * (size_t) V);
	}
	if (any_sample && be->ops->sample)
	{
		kl_sample_row rows[LOGIT_ROWS];
		int32_t		ids[LOGIT_ROWS];
		int			ns = 0;

		for (int r = 0; r < q->n; r++)
			if (q->req[r])
			{
				const kl_sample_req *req = q->req[r];

				rows[ns].row = r;
				rows[ns].s = req->sampling;
				rows[ns].u0 = kl_sample_uniform(req->sampling, req->rng);
				rows[ns].recent = req->recent;
				rows[ns].n_recent = req->n_recent;
				rows[ns].allowed = req->allowed;
				ns++;
			}
		rc = be->ops->sample(be, c->logits, V, rows, ns, ids, err);
		ns = 0;
		for (int r = 0; r < q->n && rc == KL_OK; r++)
			if (q->req[r])
				*q->token[r] = ids[ns++];
	}
	else if (any_sample)
		for (int r = 0; r < q->n; r++)
			if (q->req[r])
			{
				const kl_sample_req *req = q->req[r];

				*q->token[r] = kl_sample_masked(req->sampling, req->rng, c->logits_host + (size_t) r * V, V,
													 req->recent, req->n_recent, req->allowed);
			}
	q->n = 0;
	q->computed = false;
	if (c->profile)
		c->prof[KL_PROF_LOGITS] += kl_now() - t0;
	return rc;
}

/* Which rows of its part of a step a batch item wants logits of: none, all
 * of them, or the last (the step that feeds its last token).  The step's
 * logit queue and its key (kl_step.logit_key) both follow this. */
enum logit_rows
{
	LR_NONE, LR_ALL, LR_LAST
};

static enum logit_rows
logit_rows_of(const kl_batch_item *it, const kl_sample_req *req, int done, int take)
{
	if (!it->logits && !req)
		return LR_NONE;
	if (it->all_logits)
		return LR_ALL;
	return done + take == it->n ? LR_LAST : LR_NONE;
}

/* queue a row; a full queue is delivered first (never the case in a decode
 * step, which has at most LOGIT_ROWS rows) */
static int
logits_want(kl_ctx *c, logit_queue *q, int row, float *dst, const kl_sample_req *req, int32_t *token, kl_err *err)
{
	if (q->n == LOGIT_ROWS && logits_deliver(c, q, err) != KL_OK)
		return KL_FAIL;
	q->row[q->n] = row;
	q->dst[q->n] = dst;
	q->req[q->n] = req;
	q->token[q->n] = token;
	q->n++;
	return KL_OK;
}

/* ------------------------------------------------------------------ sequences' caches */

/* Make room in every MLA layer's cache of `s` for positions up to `upto`. */
static int
reserve_mla(kl_ctx *c, kl_seq *s, int64_t upto, kl_err *err)
{
	const kl_config *cfg = &c->m->cfg;
	int64_t		need = (upto + KL_MLA_PAGE - 1) / KL_MLA_PAGE;
	size_t		page_bytes = kl_mla_page_bytes(c->be, cfg);

	for (int j = 0; j < cfg->n_mla_layers; j++)
	{
		kl_mla_cache *mc = &s->mla[j];

		if (need > INT32_MAX / 2)
			return kl_errc(err, KL_E_RESOURCES, "sequence too long");
		if (need > mc->cap_pages)
		{
			int			cap = mc->cap_pages ? mc->cap_pages : 4;
			float	  **np;

			while (cap < need)
				cap *= 2;
			np = realloc(mc->pages, sizeof(float *) * (size_t) cap);
			if (!np)
				return kl_errc(err, KL_E_RESOURCES, "out of memory growing the attention cache");
			mc->pages = np;
			mc->cap_pages = cap;
		}
		while (mc->n_pages < need)
		{
			float	   *p = c->be->ops->alloc(c->be, page_bytes);

			if (!p)
				return kl_errc(err, KL_E_RESOURCES, "out of %s memory for the attention cache (%lld positions)",
							   c->be->ops->name, (long long) upto);
			mc->pages[mc->n_pages++] = p;
		}
	}
	return KL_OK;
}

/* ------------------------------------------------------------------ public */

int
kl_ctx_new(kl_model *m, int max_step_tokens, kl_ctx **out, kl_err *err)
{
	const kl_config *cfg = &m->cfg;
	kl_backend *be = m->be;
	kl_ctx	   *c;
	int			T = max_step_tokens > 0 ? max_step_tokens : DEFAULT_STEP_TOKENS;
	int			HK = cfg->kda_heads * cfg->kda_head_dim;
	int			Ha = cfg->mla_heads;
	int			Dq = cfg->qk_nope_dim + cfg->qk_rope_dim;
	int			I = imax(cfg->intermediate_size, cfg->n_shared_experts * cfg->moe_intermediate);
	size_t		w1,
				w2,
				w3,
				w6;

	*out = NULL;
	if (T > (1 << 20))
		return kl_errc(err, KL_E_RESOURCES, "max_step_tokens %d is too large", T);
	c = kl_calloc(1, sizeof(kl_ctx), err);
	if (!c)
		return KL_FAIL;
	c->m = m;
	c->be = be;
	c->max_tokens = T;
	w1 = (size_t) imax(imax(HK, Ha * Dq), I);
	w2 = (size_t) imax(imax(HK, kl_mla_row(cfg)), I);
	w3 = (size_t) imax(imax(HK, Ha * cfg->v_head_dim), I);
	w6 = (size_t) imax(cfg->kda_head_dim, cfg->q_lora_rank);
#define ALLOC(field, count) \
	do { \
		c->field = be->ops->alloc(be, sizeof(float) * (size_t) (count)); \
		if (!c->field) { kl_errc(err, KL_E_RESOURCES, "out of %s memory for activations (%d tokens per step)", \
								 be->ops->name, T); goto fail; } \
	} while (0)
	ALLOC(x, (size_t) T * cfg->hidden_size);
	ALLOC(xn, (size_t) T * cfg->hidden_size);
	ALLOC(q_gate, T * w1);
	ALLOC(k_up, T * w2);
	ALLOC(v_hidden, T * w3);
	ALLOC(decay, (size_t) T * imax(HK, 1));
	ALLOC(out_gate, (size_t) T * imax(HK, 1));
	ALLOC(low_rank, T * imax((int) w6, 1));
	ALLOC(mixer_out, (size_t) T * imax(HK, 1));
	ALLOC(beta, (size_t) T * imax(cfg->kda_heads, 1));
	ALLOC(gate_low_rank, (size_t) T * imax(cfg->kda_head_dim, 1));
	ALLOC(lrows, (size_t) LOGIT_ROWS * cfg->hidden_size);
	ALLOC(logits, (size_t) LOGIT_ROWS * cfg->vocab_size);
#undef ALLOC
	c->ids = kl_calloc((size_t) T, sizeof(int32_t), err);
	c->row0 = kl_calloc((size_t) T + 1, sizeof(int), err);
	c->pos0 = kl_calloc((size_t) T, sizeof(int64_t), err);
	c->seqs = kl_calloc((size_t) T, sizeof(kl_seq *), err);
	c->logits_host = kl_malloc(sizeof(float) * (size_t) LOGIT_ROWS * cfg->vocab_size, err);
	if (!c->ids || !c->row0 || !c->pos0 || !c->seqs || !c->logits_host)
		goto fail;
	*out = c;
	return KL_OK;
fail:
	kl_ctx_free(c);
	return KL_FAIL;
}

void
kl_ctx_free(kl_ctx *c)
{
	if (!c)
		return;
	float	   *bufs[] = {c->x, c->xn, c->q_gate, c->k_up, c->v_hidden, c->decay, c->out_gate, c->low_rank, c->mixer_out, c->beta, c->gate_low_rank,
	c->lrows, c->logits};

	for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
		if (bufs[i])
			c->be->ops->release(c->be, bufs[i]);
	free(c->ids);
	free(c->row0);
	free(c->pos0);
	free(c->seqs);
	free(c->logits_host);
	free(c);
}

void
kl_ctx_force_recurrent(kl_ctx *c, bool on)
{
	c->force_recurrent = on;
}

void
kl_ctx_profile(kl_ctx *c, bool on)
{
	c->profile = on;
	memset(c->prof, 0, sizeof(c->prof));
}

void
kl_ctx_profile_read(const kl_ctx *c, double out[KL_PROF_N])
{
	memcpy(out, c->prof, sizeof(c->prof));
}

/* An op that failed outside run_layers' per-layer check (a GPU backend's
 * end_step or download): report it for this call. */
static bool
backend_failed(kl_ctx *c, kl_err *err)
{
	if (!c->be->failed)
		return false;
	kl_errc(err, c->be->err.code, "%s", c->be->err.msg);
	c->be->failed = false;
	return true;
}

/*
 * Split the batch into steps of at most max_tokens rows.  Each step takes the
 * next tokens of every item in turn; an item's logits come from the step that
 * holds its last token (or from every step, for all_logits).
 */
int
kl_forward(kl_ctx *c, kl_batch_item *items, int n_items, kl_err *err)
{
	return kl_forward_sample(c, items, n_items, NULL, NULL, err);
}

int
kl_forward_sample(kl_ctx *c, kl_batch_item *items, int n_items, const kl_sample_req *const *reqs, int32_t *tokens,
				  kl_err *err)
{
	const kl_config *cfg = &c->m->cfg;
	int			V = cfg->vocab_size;
	int		   *done;
	int			rc = KL_FAIL;
	logit_queue q;

	if (n_items < 0 || (n_items > 0 && !items))
		return kl_errc(err, KL_E_INVALID, "invalid batch");
	for (int i = 0; i < n_items; i++)
	{
		kl_batch_item *it = &items[i];

		if (!it->seq || it->seq->model != c->m)
			return kl_errc(err, KL_E_INVALID, "batch item %d: sequence missing or of another model", i);
		if (it->n < 0 || (it->n > 0 && !it->ids))
			return kl_errc(err, KL_E_INVALID, "batch item %d: invalid token count %d", i, it->n);
		if (it->n == 0 && (it->logits || (reqs && reqs[i])))
			return kl_errc(err, KL_E_INVALID, "batch item %d: logits requested for zero tokens", i);
		if (reqs && reqs[i])
		{
			const kl_sample_req *sr = reqs[i];
			kl_err		why;

			if (it->all_logits)
				return kl_errc(err, KL_E_INVALID,
							   "batch item %d: sampling is for the last token only, not with all_logits", i);
			if (!tokens)
				return kl_errc(err, KL_E_INVALID, "sampling requested without room for the tokens");
			if (!sr->sampling || (sr->sampling->temperature != 0.0f && !sr->rng) ||
				sr->n_recent < 0 || (sr->n_recent > 0 && !sr->recent))
				return kl_errc(err, KL_E_INVALID,
							   "batch item %d: invalid sampling request (settings, generator or ids missing)", i);
			if (kl_sampling_validate(sr->sampling, &why) != KL_OK)
				return kl_errc(err, why.code, "batch item %d: %s", i, why.msg);
		}
		for (int j = 0; j < it->n; j++)
			if (it->ids[j] < 0 || it->ids[j] >= V)
				return kl_errc(err, KL_E_INVALID, "token id %d at position %d is outside the vocabulary [0, %d)",
							   it->ids[j], j, V);
		for (int j = 0; j < i; j++)
			if (items[j].seq == it->seq)
				return kl_errc(err, KL_E_INVALID, "a sequence appears twice in one batch");
		if (reserve_mla(c, it->seq, it->seq->pos + it->n, err) != KL_OK)
			return KL_FAIL;
	}
	done = kl_calloc((size_t) (n_items > 0 ? n_items : 1), sizeof(int), err);
	if (!done)
		return KL_FAIL;

	for (;;)
	{
		kl_step		st;
		int			rows = 0,
					ns = 0;
		int			item_of_seq[1024];	/* step seq -> item */
		int			n_take[1024];

		for (int i = 0; i < n_items && rows < c->max_tokens && ns < 1024; i++)
		{
			int			take = items[i].n - done[i];

			if (take <= 0)
				continue;
			if (take > c->max_tokens - rows)
				take = c->max_tokens - rows;
			c->seqs[ns] = items[i].seq;
			c->row0[ns] = rows;
			c->pos0[ns] = items[i].seq->pos;
			memcpy(c->ids + rows, items[i].ids + done[i], sizeof(int32_t) * (size_t) take);
			item_of_seq[ns] = i;
			n_take[ns] = take;
			rows += take;
			ns++;
		}
		if (ns == 0)
			break;
		c->row0[ns] = rows;
		st.n_tokens = rows;
		st.n_seqs = ns;
		st.seqs = c->seqs;
		st.row0 = c->row0;
		st.pos0 = c->pos0;
		st.force_recurrent = c->force_recurrent;
		/* the rows that will want logits: a backend that records the step's
		 * ops (CUDA graphs) keys the recording by them, since the logits
		 * product ends the step */
		st.logit_key = 0;
		for (int s = 0; s < ns; s++)
		{
			int			i = item_of_seq[s];

			st.logit_key = st.logit_key * 31 + 1 +
				(uint64_t) logit_rows_of(&items[i], reqs ? reqs[i] : NULL, done[i], n_take[s]);
		}

		if (c->be->ops->begin_step && c->be->ops->begin_step(c->be, &st, err) != KL_OK)
			goto out;
		if (run_layers(c, &st, err) != KL_OK)
			goto out;

		/* logits wanted from this step: computed inside the step (a decode
		 * step's graph holds them), delivered after it */
		q.n = 0;
		q.computed = false;
		for (int s = 0; s < ns; s++)
		{
			int			i = item_of_seq[s];
			kl_batch_item *it = &items[i];

			const kl_sample_req *req = reqs ? reqs[i] : NULL;
			enum logit_rows want = logit_rows_of(it, req, done[i], n_take[s]);

			if (want == LR_NONE)
				continue;
			if (want == LR_ALL)
			{
				for (int r = 0; r < n_take[s]; r++)
					if (logits_want(c, &q, c->row0[s] + r, it->logits + (size_t) (done[i] + r) * V, NULL, NULL,
									err) != KL_OK)
						goto out;
			}
			else if (logits_want(c, &q, c->row0[s + 1] - 1, it->logits, req, req ? &tokens[i] : NULL, err) != KL_OK)
				goto out;
		}
		logits_compute(c, &q);
		if (c->be->ops->end_step)
			c->be->ops->end_step(c->be, &st);
		if (backend_failed(c, err))
			goto out;
		if (logits_deliver(c, &q, err) != KL_OK)
			goto out;
		if (backend_failed(c, err))	/* e.g. a GPU fault seen by the logits download */
			goto out;
		for (int s = 0; s < ns; s++)
		{
			c->seqs[s]->pos += n_take[s];
			done[item_of_seq[s]] += n_take[s];
		}
	}
	c->be->ops->sync(c->be);
	if (backend_failed(c, err))
		goto out;
	rc = KL_OK;
out:
	free(done);
	return rc;
}
