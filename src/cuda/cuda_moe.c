/*
 * cuda_moe.c — the mixture-of-experts feed-forward on the GPU.
 *
 * Routing runs on the device (kernels/moe.cu, the same rule as
 * src/engine/moe_route.c).  Then:
 *   decode-sized batches (at most 64 tokens): the pairs are grouped by expert
 *     on the device and each used expert's matrices stream once through the
 *     expert GEMV kernel — no host round trip, so the step can be a graph;
 *     in bf16 precision, steps of 8 tokens or more use the tensor-core form
 *     of that kernel (kernels/expert_mma.cu; KL_CUDA_EXPERT_MMA);
 *   larger batches: in bf16 mode with bf16 experts (KL_CUDA_MOE_PREFILL)
 *     4, the default: the choices grouped on the device into slots padded
 *     to a few size classes, only the counts read back by the host while
 *     the shared expert runs (cuda_moe_device_group), the rows gathered
 *     token-major, one batched product per class and stage, the bf16
 *     outputs combined directly; 3: the same with the grouping on the host
 *     (cuda_moe_experts_batched16); 0 (and fp32 mode, and where cuBLAS
 *     refuses the batched calls): the choices come to the host, which groups
 *     them (stable, as cpu_moe.c does), then grouped products with fp32
 *     results, which cuBLAS refuses, else one product per used expert
 *     through the ordinary matmul path.
 * The prefill expert paths (host and device grouping, KL_CUDA_MOE_PREFILL
 * 3 and 4 and the older grouped products) are in cuda_moe_prefill.c.
 * Quantized experts (kernels.h's device form, one form for all routed
 * experts of a layer) take the _q twins of the decode kernels
 * (kernels/gemv_q.cu; in bf16 precision from KL_CUDA_EXPERT_MMA tokens
 * kernels/mma_q.cu) and, for larger batches, the per-expert loop through
 * the matmul path (panels of converted weight rows).
 * The shared experts are a plain SwiGLU MLP over all tokens; the combine
 * kernel sums each token's weighted expert outputs and the shared one.
 *
 * Decode (unless KL_CUDA_MOE_FUSE=0): routing and grouping are one launch
 * (in warps, kk_moe_route_group_warp, unless KL_CUDA_ROUTE_WARP=0; steps
 * of up to 4 tokens by rank, kk_moe_route_group_rank: KL_CUDA_ROUTE_RANK=N
 * moves the bound, 0 never),
 * the gate and up products write silu(gate) * up directly, and the combine
 * is held back (cuda_defer_combine) to run inside the residual add and norm
 * that follow: router, route+group, gate/up, down — four launches a layer.
 */
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define MOE_DEVICE_MAX_TOKENS 64

/*
 * Benchmarks only (kl_cuda_bench_moe_products): the events a prefill MoE op
 * records around its expert products when a benchmark asked for them —
 * pairs (start, end): routed gate/up, routed down, shared gate/up, shared
 * down.
 */
#define MOE_EV_N 8

void
cuda_moe_mark(cuda_state *cs, int i)
{
	if (cs->moe_ev && cs->mode == GM_EAGER && cudaEventRecord(cs->moe_ev[i], cs->stream) == cudaSuccess)
		cs->moe_ev_mask |= 1u << i;
}

/* ------------------------------------------------------------------ expert tables */

/*
 * Can prefill variants 3 and 4 take expert matrices of this form with cols
 * columns?  bf16 ones; quantized ones where kk_q_dequant_many_bf16 converts
 * them (and KL_CUDA_Q_BATCHED allows).
 */
static bool
batched_form(const cuda_state *cs, int fmt, int group, int cols)
{
	if (fmt == KK_WF_BF16)
		return true;
	return cs->moe_q_batched && kk_q_dequant_many_ok(fmt, group, cols);
}

/* Is W in form fmt (KK_WF_*), with group columns per scale when quantized? */
static bool
in_form(const kl_weight *W, int fmt, int group)
{
	return cuda_weight_fmt(W) == fmt && (!cuda_weight_quantized(W) || W->q.group == group);
}

/* the forms of a layer's expert matrices (the expert kernels take one form for all experts) */
static void
expert_forms(cuda_moe_tables *t, const kl_moe_layer *w, int E)
{
	const kl_mlp *e0 = &w->experts[0];

	t->fmt_gu = cuda_weight_fmt(&e0->gate);
	t->group_gu = cuda_weight_quantized(&e0->gate) ? e0->gate.q.group : e0->gate.cols;
	t->fmt_down = cuda_weight_fmt(&e0->down);
	t->group_down = cuda_weight_quantized(&e0->down) ? e0->down.q.group : e0->down.cols;
	t->uniform = true;
	for (int e = 0; e < E && t->uniform; e++)
		t->uniform = in_form(&w->experts[e].gate, t->fmt_gu, t->group_gu) &&
			in_form(&w->experts[e].up, t->fmt_gu, t->group_gu) &&
			in_form(&w->experts[e].down, t->fmt_down, t->group_down);
	t->shared_same = w->has_shared && in_form(&w->shared.gate, t->fmt_gu, t->group_gu) &&
		in_form(&w->shared.up, t->fmt_gu, t->group_gu) && in_form(&w->shared.down, t->fmt_down, t->group_down);
}

static const cuda_moe_tables *
moe_tables(kl_backend *be, const kl_config *cfg, const kl_moe_layer *w)
{
	cuda_state *cs = CS(be);
	int			E = cfg->n_experts;
	cuda_moe_tables *t;
	void	  **host;

	for (int i = 0; i < cs->n_moe; i++)
		if (cs->moe[i].w == w)
			return &cs->moe[i];
	if (cs->mode == GM_CAPTURE)
	{
		cuda_fail(be, KL_E_INTERNAL, "internal error: MoE tables built during graph capture");
		return NULL;
	}
	if (cs->n_moe == cs->cap_moe)
	{
		int			cap = cs->cap_moe ? cs->cap_moe * 2 : 16;
		cuda_moe_tables *nt = realloc(cs->moe, sizeof(cuda_moe_tables) * (size_t) cap);

		if (!nt)
		{
			cuda_fail(be, KL_E_RESOURCES, "out of memory");
			return NULL;
		}
		cs->moe = nt;
		cs->cap_moe = cap;
	}
	t = &cs->moe[cs->n_moe];
	/* [3][E+1]: gate, up, down of each expert; entry E is the shared expert */
	host = calloc(3 * ((size_t) E + 1), sizeof(void *));
	if (!host)
	{
		cuda_fail(be, KL_E_RESOURCES, "out of memory");
		return NULL;
	}
	for (int e = 0; e <= E; e++)
	{
		const kl_mlp *x = e < E ? &w->experts[e] : w->has_shared ? &w->shared : NULL;

		if (!x)
			continue;
		host[e] = x->gate.dev;
		host[(E + 1) + e] = x->up.dev;
		host[2 * (E + 1) + e] = x->down.dev;
	}
	t->w = w;
	t->dev = NULL;
	expert_forms(t, w, E);
	if (!cuda_ok(be, cudaMalloc((void **) &t->dev, sizeof(void *) * 3 * ((size_t) E + 1)), "cudaMalloc (expert table)") ||
		!cuda_upload_sync(be, t->dev, host, sizeof(void *) * 3 * ((size_t) E + 1)))
	{
		cudaFree(t->dev);
		free(host);
		return NULL;
	}
	free(host);
	cs->n_moe++;
	return t;
}

/*
 * The slots a decode step's expert work list needs: items of at most P rows;
 * an expert with c pairs makes ceil(c / P), at most (c + P - 1) / P; over the
 * A <= min(nk, E) experts that get pairs that sums to at most
 * (nk + A (P - 1)) / P, plus the shared expert's ceil(shared_rows / P).  The
 * expert kernels' grids have this many slots, and a slot without an item
 * costs blocks that only exit (at batch 1 the older bound, A + nk / P + 1,
 * left half of them idle).
 */
static int
expert_item_slots(int nk, int E, int shared_rows, int P)
{
	int			A = nk < E ? nk : E;

	return (nk + A * (P - 1)) / P + (shared_rows + P - 1) / P;
}

void
cuda_moe_free(kl_backend *be)
{
	cuda_state *cs = CS(be);

	for (int i = 0; i < cs->n_moe; i++)
		cudaFree(cs->moe[i].dev);
	free(cs->moe);
	if (cs->moe_ev)
		for (int i = 0; i < MOE_EV_N; i++)
			cudaEventDestroy(cs->moe_ev[i]);
	free(cs->moe_ev);
	cs->moe_ev = NULL;
	cudaFreeHost(cs->moe_pad_host);
	cs->moe_pad_host = NULL;
	cs->moe_pad_host_cap = 0;
	if (cs->moe_pad_done)
		cudaEventDestroy(cs->moe_pad_done);
	cs->moe_pad_done = NULL;
	cs->moe = NULL;
	cs->n_moe = cs->cap_moe = 0;
}

/* ------------------------------------------------------------------ the op */

/*
 * The decode expert products in the experts' form (tab; down: the down
 * matrices, else gate/up): bf16 / fp32 through kk_expert_gemv /
 * kk_expert_mma, quantized through their _q twins (kernels/gemv_q.cu,
 * kernels/mma_q.cu).  shared_n: the rows of the fused shared expert (table
 * entry E, the work list's last items), 0 none (kk_expert_gemv_shared).
 */
static void
expert_gemv_in(cuda_state *cs, const cuda_moe_tables *tab, bool down, float *y0, float *y1, int ldy,
			   const float *x, int ldx, const int *xrow, const void *const *W0, const void *const *W1, int rows,
			   int cols, const int *start, const int *active, int max_active, int max_count, int E, int shared_n)
{
	int			fmt = down ? tab->fmt_down : tab->fmt_gu,
				group = down ? tab->group_down : tab->group_gu;

	if (fmt >= KK_WF_FP8)
		kk_expert_gemv_q(cs->stream, y0, y1, ldy, x, ldx, xrow, W0, W1, fmt, group, rows, cols, start, active,
						 max_active, max_count);
	else
		kk_expert_gemv_shared(cs->stream, y0, y1, ldy, x, ldx, xrow, W0, W1, fmt == KK_WF_BF16, rows, cols, start,
							  active, max_active, max_count, E, shared_n);
}

static void
expert_mma_in(cuda_state *cs, const cuda_moe_tables *tab, bool down, float *y0, float *y1, int ldy, const float *x,
			  int ldx, const int *xrow, const void *const *W0, const void *const *W1, int rows, int cols,
			  const int *start, const int *active, int max_active, int P)
{
	int			fmt = down ? tab->fmt_down : tab->fmt_gu,
				group = down ? tab->group_down : tab->group_gu;

	if (fmt >= KK_WF_FP8)
		kk_expert_mma_q(cs->stream, y0, y1, ldy, x, ldx, xrow, W0, W1, fmt, group, rows, cols, start, active,
						max_active, P);
	else
		kk_expert_mma(cs->stream, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols, start, active, max_active, P);
}

/*
 * The shared experts of a prefill batch: a SwiGLU MLP of width Fs over all n
 * tokens of x, its output in *sy (NULL when the layer has none).  False:
 * be->failed set.
 */
static bool
moe_shared(kl_backend *be, const kl_moe_layer *w, const float *x, int n, int D, int Fs, float **sy)
{
	cuda_state *cs = CS(be);
	float	   *sg,
			   *su;

	*sy = NULL;
	if (!w->has_shared)
		return true;
	sg = cuda_buf(be, CB_MOE_SG, sizeof(float) * (size_t) n * Fs);
	su = cuda_buf(be, CB_MOE_SU, sizeof(float) * (size_t) n * Fs);
	*sy = cuda_buf(be, CB_MOE_SY, sizeof(float) * (size_t) n * D);
	if (!sg || !su || !*sy)
		return false;
	{
		kl_matmul_job gu[2] = {{sg, Fs, x, D, n, &w->shared.gate, 0}, {su, Fs, x, D, n, &w->shared.up, 0}};
		uint16_t   *sg16;

		/* x, the op's input (which it does not write), may have a bf16 twin from the norm before
		 * (KL_CUDA_BF16_TWIN); the SwiGLU writes sg's for the down product */
		cuda_moe_mark(cs, 4);
		cs->tw_scope = true;
		cuda_matmul_batch_raw(be, gu, 2);
		cs->tw_scope = false;
		cuda_moe_mark(cs, 5);
		if ((sg16 = cuda_twin_out(be, n, Fs)) && kk_swiglu_twin(cs->stream, sg, sg16, sg, su, n, Fs, Fs) == 0)
			cuda_twin_set(cs, sg, Fs, n, Fs, sg16, false);
		else if (!be->failed)
			kk_swiglu(cs->stream, sg, sg, su, n, Fs, Fs);
	}
	if (!cuda_launched(be, "swiglu"))
		return false;
	cuda_moe_mark(cs, 6);
	cs->tw_scope = true;
	cuda_matmul_raw(be, *sy, D, sg, Fs, n, &w->shared.down);
	cs->tw_scope = false;
	cuda_moe_mark(cs, 7);
	return !be->failed;
}

void
cuda_moe(kl_backend *be, const kl_config *cfg, const kl_moe_layer *w, float *y, const float *x, int n)
{
	cuda_state *cs = CS(be);
	int			E = cfg->n_experts,
				k = cfg->experts_per_token,
				D = cfg->hidden_size,
				F = cfg->moe_intermediate,
				G = cfg->n_expert_groups > 0 ? cfg->n_expert_groups : 1;
	int			Fs = F * cfg->n_shared_experts;
	size_t		nk = (size_t) n * k;
	const cuda_moe_tables *tab;
	float	   *logits,
			   *wts,
			   *g,
			   *u,
			   *ye,
			   *sy = NULL;
	const uint16_t *ye16 = NULL;	/* variant 3's expert outputs (bf16) */
	int		   *sel,
			   *start,
			   *xrow,
			   *inv,
			   *active;
	bool		wbf,
				wq,				/* the experts quantized (kernels.h's device form) */
				shared_done = false;	/* variant 4 ran the shared experts before the routed ones */

	if (cuda_step_skip(be, OP_MOE, (uintptr_t) y, (uintptr_t) x, (uintptr_t) w, (uintptr_t) n))
		return;
	if (n <= 0)
		return;
	if (!(tab = moe_tables(be, cfg, w)))
		return;
	wbf = tab->fmt_gu == KK_WF_BF16;
	wq = tab->fmt_gu >= KK_WF_FP8 || tab->fmt_down >= KK_WF_FP8;
	if (wq && !tab->uniform)
	{
		cuda_fail(be, KL_E_UNSUPPORTED, "the experts of an MoE layer are quantized in different forms (or group "
				  "sizes); the GPU needs one form for all routed experts of a layer");
		return;
	}
	logits = cuda_buf(be, CB_MOE_LOGITS, sizeof(float) * (size_t) n * E);
	sel = cuda_buf(be, CB_MOE_SEL, sizeof(int) * nk);
	wts = cuda_buf(be, CB_MOE_WTS, sizeof(float) * nk);
	start = cuda_buf(be, CB_MOE_START, sizeof(int) * ((size_t) E + 2));
	xrow = cuda_buf(be, CB_MOE_XROW, sizeof(int) * (nk + n));
	inv = cuda_buf(be, CB_MOE_INV, sizeof(int) * nk);
	active = cuda_buf(be, CB_MOE_ACTIVE, sizeof(int) * ((size_t) E + nk + (size_t) n + 4));
	/* rows: the routed pairs, then (decode, fused) the shared expert's */
	g = cuda_buf(be, CB_MOE_G, sizeof(float) * (nk + n) * F);
	u = cuda_buf(be, CB_MOE_U, sizeof(float) * (nk + n) * F);
	ye = cuda_buf(be, CB_MOE_Y, sizeof(float) * (nk + n) * D);
	if (!logits || !sel || !wts || !start || !xrow || !inv || !active || !g || !u || !ye)
		return;

	/* 1. route, in fp32 (logits included, in either precision mode) */
	cuda_matmul_fp32(be, logits, E, x, D, n, &w->router);
	if (be->failed)
		return;

	if (n <= MOE_DEVICE_MAX_TOKENS)
	{
		/*
		 * 2. group on the device; each used expert's weights stream once.
		 * A shared expert of the routed experts' width (S = 1) joins as
		 * expert E over all tokens: its products share the launches.
		 */
		bool		fuse = w->has_shared && Fs == F && (wq ? tab->shared_same :
														w->shared.gate.dtype == w->experts[0].gate.dtype &&
														w->shared.down.dtype == w->experts[0].down.dtype &&
														!cuda_weight_quantized(&w->shared.gate) &&
														!cuda_weight_quantized(&w->shared.up) &&
														!cuda_weight_quantized(&w->shared.down));
		int			rows = (int) nk + (fuse ? n : 0);
		/*
		 * Tensor cores (kernels/expert_mma.cu) in bf16 precision for steps of
		 * several tokens: an item's tokens are the n = 8 side of the mma, so
		 * items of 8; fp32 precision keeps the exact CUDA-core kernel, and so
		 * do steps too small for an item to have more than one token.
		 */
		bool		mma = cs->bf16 &&
			(wq ? cs->q_expert_mma_min > 0 && n >= cs->q_expert_mma_min &&
			 kk_mma_q_ok(tab->fmt_gu, tab->group_gu, D) && kk_mma_q_ok(tab->fmt_down, tab->group_down, F) :
			 cs->expert_mma_min > 0 && n >= cs->expert_mma_min && wbf && tab->uniform &&
			 tab->fmt_down == KK_WF_BF16 && kk_expert_mma_ok(D) && kk_expert_mma_ok(F));
		/* work items of at most P rows */
		int			P = mma ? KK_EXPERT_MMA_ROWS : kk_expert_pass_rows(n);
		int			max_active = expert_item_slots((int) nk, E, fuse ? n : 0, P);
		int			rc = -1;

		/*
		 * the rank kernel where it covers the shape (n <= 8, E <= 256, no
		 * expert groups) and is on for n, else the warp kernel (E <= 256),
		 * else the block one
		 */
		if (cs->fuse_moe && n <= cs->route_warp && n <= cs->route_rank_max)
			rc = kk_moe_route_group_rank(cs->stream, n, E, k, G, cfg->topk_groups, cfg->router_softmax,
										 cfg->moe_renormalize, cfg->bias_in_weights, cfg->routed_scaling, logits,
										 w->score_bias, sel, wts, fuse ? n : 0, P, start, xrow, inv, active);
		if (cs->fuse_moe && n <= cs->route_warp && rc < 0)
			rc = kk_moe_route_group_warp(cs->stream, n, E, k, G, cfg->topk_groups, cfg->router_softmax,
										 cfg->moe_renormalize, cfg->bias_in_weights, cfg->routed_scaling, logits,
										 w->score_bias, sel, wts, fuse ? n : 0, P, start, xrow, inv, active);
		if (cs->fuse_moe && rc < 0)
			rc = kk_moe_route_group(cs->stream, n, E, k, G, cfg->topk_groups, cfg->router_softmax,
									cfg->moe_renormalize, cfg->bias_in_weights, cfg->routed_scaling, logits,
									w->score_bias, sel, wts, fuse ? n : 0, P, start, xrow, inv, active);
		if (rc > 0)
		{
			cuda_ok(be, (cudaError_t) rc, "moe_route_group");
			return;
		}
		if (rc < 0)
		{
			kk_moe_route(cs->stream, n, E, k, G, cfg->topk_groups, cfg->router_softmax, cfg->moe_renormalize,
						 cfg->bias_in_weights, cfg->routed_scaling, logits, w->score_bias, sel, wts);
			if (!cuda_launched(be, "moe_route"))
				return;
			kk_moe_group(cs->stream, (int) nk, E, k, fuse ? n : 0, P, sel, start, xrow, inv, active);
		}
		if (!cuda_launched(be, "moe_route_group"))
			return;
		if (mma)
		{
			const void *const *gate = (const void *const *) tab->dev,
					   *const *up = (const void *const *) (tab->dev + (E + 1)),
					   *const *down = (const void *const *) (tab->dev + 2 * (E + 1));

			/* silu(gate) * up in one pass (KL_CUDA_MOE_FUSE=0: the two products, then swiglu) */
			if (cs->fuse_moe)
				expert_mma_in(cs, tab, false, g, NULL, F, x, D, xrow, gate, up, F, D, start, active, max_active, P);
			else
			{
				expert_mma_in(cs, tab, false, g, u, F, x, D, xrow, gate, up, F, D, start, active, max_active, P);
				kk_swiglu(cs->stream, g, g, u, rows, F, F);
			}
			if (!cuda_launched(be, "expert gate/up (tensor cores)"))
				return;
			expert_mma_in(cs, tab, true, ye, NULL, D, g, F, NULL, down, NULL, D, F, start, active, max_active, P);
			if (!cuda_launched(be, "expert down (tensor cores)"))
				return;
		}
		else if (cs->fuse_moe && n <= 4)
			/* gate and up of each row in one warp: h = silu(gate) * up into g (for few
			 * tokens: with more, the warp's registers for both products cost occupancy,
			 * 3.4 ms a step at batch 64) */
			expert_gemv_in(cs, tab, false, g, NULL, F, x, D, xrow, (const void *const *) tab->dev,
						(const void *const *) (tab->dev + (E + 1)), F, D, start, active, max_active, n, E,
						fuse ? n : 0);
		else
		{
			expert_gemv_in(cs, tab, false, g, u, F, x, D, xrow, (const void *const *) tab->dev,
						(const void *const *) (tab->dev + (E + 1)), F, D, start, active, max_active, n, E,
						fuse ? n : 0);
			kk_swiglu(cs->stream, g, g, u, rows, F, F);
		}
		if (!mma)
		{
			if (!cuda_launched(be, "expert gate/up"))
				return;
			expert_gemv_in(cs, tab, true, ye, NULL, D, g, F, NULL, (const void *const *) (tab->dev + 2 * (E + 1)), NULL,
						D, F, start, active, max_active, n, E, fuse ? n : 0);
			if (!cuda_launched(be, "expert down"))
				return;
		}
		if (fuse)
		{
			cuda_defer_combine(be, y, n, D, k, wts, inv, ye, ye + nk * D);
			/* routing, gate/up, down, then the combine: pm_wts and pm_inv are three launches back */
			cs->pm_route_early = true;
			return;
		}
	}
	else
	{
		/* 2. group on the host; one product per used expert */
		cs->moe_ev_mask = 0;
		kk_moe_route(cs->stream, n, E, k, G, cfg->topk_groups, cfg->router_softmax, cfg->moe_renormalize,
					 cfg->bias_in_weights, cfg->routed_scaling, logits, w->score_bias, sel, wts);
		if (!cuda_launched(be, "moe_route"))
			return;

		float	   *xe = cuda_buf(be, CB_MOE_X, sizeof(float) * nk * D);
		const int  *st;
		/* (bf16 experts, or quantized ones converted to bf16 for the products) */
		bool		batched = cs->moe_prefill >= 3 && cs->bf16 && tab->uniform && !cs->moe_batched_refused &&
			batched_form(cs, tab->fmt_gu, tab->group_gu, D) && batched_form(cs, tab->fmt_down, tab->group_down, F);
		/* precision fp8: FP8 per-channel experts in FP8 batches (cuda_fp8.c) */
		bool		f8x = batched && cuda_fp8_experts_take(cs, w, E, D, F);

		if (!xe)
			return;
		if (batched && cs->moe_prefill == 4)
		{
			/*
			 * Variant 4: group on the device and gather; queue the shared
			 * expert, which needs no grouping, before waiting for the counts
			 * the batched products need on the host
			 */
			if (cuda_moe_device_group(be, n, E, k, sel, inv, x, D, !f8x))
			{
				if (!moe_shared(be, w, x, n, D, Fs, &sy) || !cuda_moe_device_group_wait(be, n, E, k))
					return;
				shared_done = true;
				if ((ye16 = f8x ? cuda_fp8_experts(be, w, (const void *const *) tab->dev, E, D, F, x, sel, inv, n,
												   k, g, u, ye) :
					 cuda_moe_batched_products(be, w, D, F, n, k, g, u, ye)) != NULL)
				{
					cs->moe_prefill_ran = 4;
					goto combine;
				}
				/* refused: variant 0 below (cuda_moe_host_group without padding) */
				if (be->failed)
					return;
				batched = false;
			}
			else if (be->failed)
				return;
			/* (not covered: variant 3) */
		}
		if (!cuda_moe_host_group(be, n, E, k, sel, xrow, inv, batched))
			return;
		st = cs->h_start;
		if (batched)
		{
			if ((ye16 = f8x ? cuda_fp8_experts(be, w, (const void *const *) tab->dev, E, D, F, x, sel, inv, n, k, g,
											   u, ye) :
				 cuda_moe_experts_batched16(be, w, D, F, x, inv, n, k, g, u, ye)) != NULL)
			{
				cs->moe_prefill_ran = 3;
				goto shared;
			}
			/* refused: the layout of variant 0 (the choices are still on the device) */
			if (be->failed || !cuda_moe_host_group(be, n, E, k, sel, xrow, inv, false))
				return;
		}
		cs->moe_prefill_ran = 0;
		if (cs->bf16 && wbf && tab->fmt_down == KK_WF_BF16 && tab->uniform && !cs->no_grouped_gemm &&
			cuda_moe_experts_grouped(be, w, st, E, D, F, x, xrow, nk, g, u, ye))
			goto shared;
		if (be->failed)
			return;
		/* (again: a refused variant 3 or 4 may have grown CB_MOE_X since) */
		if (!(xe = cuda_buf(be, CB_MOE_X, sizeof(float) * nk * D)))
			return;
		kk_gather_rows(cs->stream, xe, x, D, xrow, (int) nk, D);
		if (!cuda_launched(be, "gather rows"))
			return;
		cuda_moe_mark(cs, 0);
		for (int e = 0; e < E && !be->failed; e++)
		{
			int			c = st[e + 1] - st[e];

			if (c == 0)
				continue;
			cuda_matmul_raw(be, g + (size_t) st[e] * F, F, xe + (size_t) st[e] * D, D, c, &w->experts[e].gate);
			cuda_matmul_raw(be, u + (size_t) st[e] * F, F, xe + (size_t) st[e] * D, D, c, &w->experts[e].up);
		}
		cuda_moe_mark(cs, 1);
		kk_swiglu(cs->stream, g, g, u, (int) nk, F, F);
		if (!cuda_launched(be, "swiglu"))
			return;
		cuda_moe_mark(cs, 2);
		for (int e = 0; e < E && !be->failed; e++)
		{
			int			c = st[e + 1] - st[e];

			if (c > 0)
				cuda_matmul_raw(be, ye + (size_t) st[e] * D, D, g + (size_t) st[e] * F, F, c, &w->experts[e].down);
		}
		cuda_moe_mark(cs, 3);
		if (be->failed)
			return;
	}

	/* 3. shared experts: a SwiGLU MLP of width F*S over all tokens (variant 4: done already) */
shared:
	if (!shared_done && !moe_shared(be, w, x, n, D, Fs, &sy))
		return;

	/* 4. y = sum of weighted expert outputs (+ shared) */
combine:
	if (ye16)
		cuda_defer_combine16(be, y, n, D, k, wts, inv, ye16, sy);
	else
		cuda_defer_combine(be, y, n, D, k, wts, inv, ye, sy);
	/* (pm_route_early stays false, as cuda_defer_combine set it: the early residual and routing reads of
	 * KL_CUDA_NORM_EARLY=2 are argued for the fused decode path above only) */
}

/* ------------------------------------------------------------------ benchmark hook */

/*
 * For bench/bench_cuda.c only (found with dlsym; the backend does not use
 * it): the time of a prefill MoE op's expert products, apart from its
 * routing, grouping, gathers, SwiGLU and combine.  mode 1: from now on every
 * MoE op that groups on the host (more than 64 tokens) records events on the
 * backend's stream right before and after its products (the grouped GEMMs,
 * or the per-expert loops; the shared expert's products); mode 0: waits for
 * the last such op and writes ms[0] the routed experts' products (gate/up
 * plus down), ms[1] the shared expert's; mode 2: stops recording.  Events add
 * no synchronisation of their own.  Returns 0, -1 (mode 0 without events of
 * a complete op) or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_bench_moe_products(kl_backend *be, int mode, float ms[2])
{
	cuda_state *cs = CS(be);
	cudaError_t e = cudaSuccess;

	if (mode == 1 && !cs->moe_ev)
	{
		cudaEvent_t *ev = calloc(MOE_EV_N, sizeof(cudaEvent_t));

		if (!ev)
			return (int) cudaErrorMemoryAllocation;
		for (int i = 0; i < MOE_EV_N && e == cudaSuccess; i++)
			e = cudaEventCreate(&ev[i]);
		if (e != cudaSuccess)
		{
			free(ev);
			return (int) e;
		}
		cs->moe_ev = ev;
		cs->moe_ev_mask = 0;
		return 0;
	}
	if (mode == 2)
	{
		if (cs->moe_ev)
			for (int i = 0; i < MOE_EV_N; i++)
				cudaEventDestroy(cs->moe_ev[i]);
		free(cs->moe_ev);
		cs->moe_ev = NULL;
		return 0;
	}
	if (mode != 0 || !cs->moe_ev || (cs->moe_ev_mask & 0xf) != 0xf)
		return -1;
	ms[0] = ms[1] = 0;
	for (int p = 0; p < MOE_EV_N / 2; p++)
	{
		float		t = 0;

		if ((cs->moe_ev_mask >> (2 * p) & 3) != 3)
			continue;
		if ((e = cudaEventSynchronize(cs->moe_ev[2 * p + 1])) != cudaSuccess ||
			(e = cudaEventElapsedTime(&t, cs->moe_ev[2 * p], cs->moe_ev[2 * p + 1])) != cudaSuccess)
			return (int) e;
		ms[p / 2] += t;
	}
	return 0;
}

/*
 * For bench/bench_cuda.c and test/engine/test_cuda.c (found with dlsym; the
 * backend does not use it): which prefill expert path ran.  info[0] the
 * KL_CUDA_MOE_PREFILL variant asked at creation, info[1] the one the last
 * prefill MoE op ran (-1 none yet; 0 also for batches the fast paths do not
 * take: fp32 precision, quantized experts), info[2] the cuBLAS status that
 * made the variant asked fall back (3 or 4 to 0; 0: it did not).
 * Returns info[1].
 */
__attribute__((visibility("default"))) int
kl_cuda_moe_prefill_path(kl_backend *be, int info[3])
{
	cuda_state *cs = CS(be);

	info[0] = cs->moe_prefill;
	info[1] = cs->moe_prefill_ran;
	info[2] = cs->moe_batched_refused ? (cs->moe_batched_status ? cs->moe_batched_status : -1) : 0;
	return info[1];
}

/* ------------------------------------------------------------------ test hook */

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): route and group n tokens' router logits (host memory) through
 * one of the fused decode launchers — warp 0: kk_moe_route_group, 1:
 * kk_moe_route_group_warp, 2: kk_moe_route_group_rank (as the backend has
 * it: at one token the ballot grouping unless KL_CUDA_ROUTE_RANK1=0), 3:
 * kk_moe_route_group_rank with the grouping by counts at every n
 * (kk_set_route_rank1(0)) — on the current device, and copy every output
 * back.  The output arrays' contents go to the device first, so that the
 * entries a kernel leaves alone compare too.  Sizes: logits [n E], bias [E];
 * sel, wts, inv [n k]; start [E + 2]; xrow [n k + n]; active [E + n k + n + 4].
 * Returns the launcher's result (-1: shape not covered), else 0 or a CUDA
 * error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_route_group(int warp, int n, int E, int k, int G, int Tg, int use_softmax, int renorm, int bias_in_w,
						 float scaling, int shared_rows, int P, const float *logits, const float *bias, int *sel,
						 float *wts, int *start, int *xrow, int *inv, int *active)
{
	size_t		nk = (size_t) n * k,
				sz[8] = {sizeof(float) * (size_t) n * E, sizeof(float) * (size_t) E, sizeof(int) * nk,
						 sizeof(float) * nk, sizeof(int) * ((size_t) E + 2), sizeof(int) * (nk + n), sizeof(int) * nk,
						 sizeof(int) * ((size_t) E + nk + n + 4)};
	const void *host_in[8] = {logits, bias, sel, wts, start, xrow, inv, active};
	void	   *host_out[8] = {NULL, NULL, sel, wts, start, xrow, inv, active};
	void	   *d[8] = {NULL};
	cudaStream_t s = NULL;
	cudaError_t e;
	int			rc = 0;

	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess)
		return (int) e;
	/* every copy on s: the launch is ordered after the uploads */
	for (int i = 0; i < 8 && rc == 0; i++)
		if ((e = cudaMalloc(&d[i], sz[i])) != cudaSuccess ||
			(e = cudaMemcpyAsync(d[i], host_in[i], sz[i], cudaMemcpyHostToDevice, s)) != cudaSuccess)
			rc = (int) e;
	if (rc == 0)
	{
		int			was = warp == 3 ? kk_set_route_rank1(0) : 0;

		rc = (warp >= 2 ? kk_moe_route_group_rank : warp ? kk_moe_route_group_warp : kk_moe_route_group)
			(s, n, E, k, G, Tg, use_softmax, renorm, bias_in_w, scaling, d[0], d[1], d[2], d[3], shared_rows, P, d[4],
			 d[5], d[6], d[7]);
		if (warp == 3)
			kk_set_route_rank1(was);
		if (rc == 0 && (e = cudaGetLastError()) != cudaSuccess)
			rc = (int) e;
	}
	for (int i = 2; i < 8 && rc == 0; i++)
		if ((e = cudaMemcpyAsync(host_out[i], d[i], sz[i], cudaMemcpyDeviceToHost, s)) != cudaSuccess)
			rc = (int) e;
	if ((e = cudaStreamSynchronize(s)) != cudaSuccess && rc == 0)
		rc = (int) e;
	for (int i = 0; i < 8; i++)
		cudaFree(d[i]);
	cudaStreamDestroy(s);
	return rc;
}

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): the expert products of one decode step of n tokens through the
 * tensor-core kernel (kk_expert_mma, items of KK_EXPERT_MMA_ROWS) and the
 * CUDA-core one (kk_expert_gemv, items of kk_expert_pass_rows(n)), on the
 * same data, in all three modes, on the current device.
 *
 * Experts: E routed ones and a shared one (expert E, over every token), each
 * with gate and up [F, D] and down [D, F] in bf16, random on the device
 * (seed; standard deviation 0.02).  Routing: logits [n E] (host), sigmoid,
 * top k, renormalized, no groups and no score bias; routed and grouped once
 * with items of KK_EXPERT_MMA_ROWS (the warp launcher where it covers the
 * shape, else the block one), and the same choices grouped again with the
 * CUDA-core kernel's item size (the order is stable, so the rows agree).
 * Activations: x [n, D] for gate and up, h [R, F] (R = n k + n rows, one per
 * grouped pair, the shared expert's last) for down, random and bf16 values
 * already (the tensor-core kernel's rounding leaves them alone), so that the
 * two kernels differ only in the order of their fp32 sums.
 *
 * Outputs, for each kernel, R (3 F + D) floats: one after another SwiGLU
 * silu(gate x) * (up x) [R, F]; gate x and up x from the two-matrix mode
 * [R, F] each; down h [R, D].  Rows no item wrote stay NaN.  start [E + 2]:
 * the grouping (expert e's rows start[e] .. start[e + 1]).  Returns 0, -1
 * when neither route launcher covers the shape, -2 when the two groupings'
 * rows differ, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_expert_products(int n, int E, int k, int D, int F, const float *logits, unsigned long long seed,
							 int *start, float *out_mma, float *out_gemv)
{
	int			nk = n * k,
				R = nk + n,
				Pm = KK_EXPERT_MMA_ROWS,
				Pg = kk_expert_pass_rows(n);
	size_t		wsz = (size_t) F * D,	/* elements of one matrix */
				osz = (size_t) R * (3 * (size_t) F + D),
				nact = (size_t) E + nk + n + 4;
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;
	uint16_t   *w16 = NULL,
			   *a16 = NULL;
	float	   *x = NULL,
			   *h = NULL,
			   *dlog = NULL,
			   *bias = NULL,
			   *wts = NULL,
			   *ym = NULL,
			   *yg = NULL;
	int		   *ints = NULL,
			   *hs = NULL;
	void	  **tab = NULL;
	void	   *host_tab[3 * 1025];
	int			rc = 0;

	if (E + 1 > 1025 || n <= 0 || k <= 0)
		return -1;
	hs = malloc(sizeof(int) * 2 * ((size_t) E + 2 + R));
	if (!hs)
		return (int) cudaErrorMemoryAllocation;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc((void **) &w16, sizeof(uint16_t) * 3 * wsz * ((size_t) E + 1))) != cudaSuccess ||
		(e = cudaMalloc((void **) &a16, sizeof(uint16_t) * ((size_t) n * D + (size_t) R * F))) != cudaSuccess ||
		(e = cudaMalloc((void **) &x, sizeof(float) * ((size_t) n * D + (size_t) R * F))) != cudaSuccess ||
		(e = cudaMalloc((void **) &dlog, sizeof(float) * ((size_t) n * E + E + nk))) != cudaSuccess ||
		(e = cudaMalloc((void **) &ym, sizeof(float) * 2 * osz)) != cudaSuccess ||
		(e = cudaMalloc((void **) &ints, sizeof(int) * 2 * (nk + ((size_t) E + 2) + R + nk + nact))) != cudaSuccess ||
		(e = cudaMalloc((void **) &tab, sizeof(void *) * 3 * ((size_t) E + 1))) != cudaSuccess)
		goto out;
	h = x + (size_t) n * D;
	bias = dlog + (size_t) n * E;
	wts = bias + E;
	yg = ym + osz;

	/* weights and bf16 activations on the device; the pointer tables gate, up, down */
	kk_fill_random(s, w16, 1, 3 * wsz * ((size_t) E + 1), seed, 0.02f);
	kk_fill_random(s, a16, 1, (size_t) n * D + (size_t) R * F, seed + 1, 1.0f);
	kk_bf16_to_f32(s, x, a16, (size_t) n * D + (size_t) R * F);
	for (int m = 0; m < 3; m++)
		for (int j = 0; j <= E; j++)
			host_tab[m * (E + 1) + j] = w16 + ((size_t) m * (E + 1) + j) * wsz;
	if ((e = cudaMemcpyAsync(tab, host_tab, sizeof(void *) * 3 * ((size_t) E + 1), cudaMemcpyHostToDevice, s)) !=
		cudaSuccess ||
		(e = cudaMemcpyAsync(dlog, logits, sizeof(float) * (size_t) n * E, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
		(e = cudaMemsetAsync(bias, 0, sizeof(float) * E, s)) != cudaSuccess ||
		(e = cudaMemsetAsync(ym, 0xff, sizeof(float) * 2 * osz, s)) != cudaSuccess)
		goto out;

	/* route and group once (items of Pm); the same choices grouped with items of Pg */
	{
		int		   *set[2][5];	/* sel, start, xrow, inv, active of each grouping */
		int		   *p = ints;

		for (int g = 0; g < 2; g++)
		{
			set[g][0] = p, p += nk;
			set[g][1] = p, p += E + 2;
			set[g][2] = p, p += R;
			set[g][3] = p, p += nk;
			set[g][4] = p, p += nact;
		}
		rc = kk_moe_route_group_warp(s, n, E, k, 1, 1, 0, 1, 0, 1.0f, dlog, bias, set[0][0], wts, n, Pm, set[0][1],
									 set[0][2], set[0][3], set[0][4]);
		if (rc < 0)
			rc = kk_moe_route_group(s, n, E, k, 1, 1, 0, 1, 0, 1.0f, dlog, bias, set[0][0], wts, n, Pm, set[0][1],
									set[0][2], set[0][3], set[0][4]);
		if (rc != 0)
			goto out;
		kk_moe_group(s, nk, E, k, n, Pg, set[0][0], set[1][1], set[1][2], set[1][3], set[1][4]);

		for (int g = 0; g < 2; g++)
		{
			const void *const *gate = (const void *const *) tab,
					   *const *up = (const void *const *) (tab + (E + 1)),
					   *const *down = (const void *const *) (tab + 2 * (E + 1));
			float	   *y = g ? yg : ym;
			int		   *st = set[g][1],
					   *xr = set[g][2],
					   *act = set[g][4];
			int			slots = expert_item_slots(nk, E, n, g ? Pg : Pm);

			if (g == 0)
			{
				kk_expert_mma(s, y, NULL, F, x, D, xr, gate, up, F, D, st, act, slots, Pm);
				kk_expert_mma(s, y + (size_t) R * F, y + 2 * (size_t) R * F, F, x, D, xr, gate, up, F, D, st, act,
							  slots, Pm);
				kk_expert_mma(s, y + 3 * (size_t) R * F, NULL, D, h, F, NULL, down, NULL, D, F, st, act, slots, Pm);
			}
			else
			{
				kk_expert_gemv(s, y, NULL, F, x, D, xr, gate, up, 1, F, D, st, act, slots, n);
				kk_expert_gemv(s, y + (size_t) R * F, y + 2 * (size_t) R * F, F, x, D, xr, gate, up, 1, F, D, st,
							   act, slots, n);
				kk_expert_gemv(s, y + 3 * (size_t) R * F, NULL, D, h, F, NULL, down, NULL, 1, D, F, st, act, slots,
							   n);
			}
			if ((e = cudaGetLastError()) != cudaSuccess)
				goto out;
		}
		/* both groupings' start and xrow, to check they agree */
		for (int g = 0; g < 2; g++)
			if ((e = cudaMemcpyAsync(hs + (size_t) g * (E + 2 + R), set[g][1], sizeof(int) * ((size_t) E + 2),
									 cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
				(e = cudaMemcpyAsync(hs + (size_t) g * (E + 2 + R) + E + 2, set[g][2], sizeof(int) * (size_t) R,
									 cudaMemcpyDeviceToHost, s)) != cudaSuccess)
				goto out;
	}
	if ((e = cudaMemcpyAsync(out_mma, ym, sizeof(float) * osz, cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
		(e = cudaMemcpyAsync(out_gemv, yg, sizeof(float) * osz, cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
		(e = cudaStreamSynchronize(s)) != cudaSuccess)
		goto out;
	memcpy(start, hs, sizeof(int) * ((size_t) E + 2));
	if (memcmp(hs, hs + E + 2 + R, sizeof(int) * ((size_t) E + 2 + R)) != 0)
		rc = -2;
out:
	if (s)
		cudaStreamSynchronize(s);
	cudaFree(w16);
	cudaFree(a16);
	cudaFree(x);
	cudaFree(dlog);
	cudaFree(ym);
	cudaFree(ints);
	cudaFree(tab);
	if (s)
		cudaStreamDestroy(s);
	free(hs);
	return rc != 0 ? rc : (int) e;
}

/*
 * kl_cuda_test_expert_paths' paths: the down kernel's early read
 * (KL_CUDA_EXPERT_PRELOAD), the tiled kernel's tiles a block at one row an
 * item and its shared-expert form (KL_CUDA_EXPERT_B1's G = D and S; tiles
 * 0: off), the rows of an item (KL_CUDA_EXPERT_NR; 0: as set) and the shared
 * expert's guessed table index (1: E, the right one; 0: expert 0, a wrong
 * one; -1: none).  Path 0 is today's two kernels.
 */
static const struct
{
	int			preload,
				tiles,
				shared,
				nr,
				guess;
}			test_expert_path[] = {
	{0, 0, 0, 0, -1},
	{1, 0, 0, 0, -1},
	{1, 1, 1, 0, 1},
	{1, 2, 2, 0, 1},
	{1, 4, 2, 0, 1},
	{0, 4, 2, 0, 1},
	{1, 4, 2, 1, 1},
	{1, 4, 2, 0, 0},
	{1, 4, 1, 0, 1},
};

/*
 * The new launches of kl_cuda_test_expert_paths on stream s: route and group
 * n tokens (the warp launcher where it covers the shape), then the SwiGLU
 * gate/up products into h [R, F] and the down products of h into y [R, D],
 * in the form of test_expert_path[path].  Returns 0, -1 (shape not covered)
 * or a CUDA error.
 */
static int
test_expert_path_launches(cudaStream_t s, int path, int n, int E, int k, int D, int F, const float *dlog,
						  const float *bias, int *sel, float *wts, int *start, int *xrow, int *inv, int *active,
						  void *const *tab, const float *x, float *h, float *y)
{
	int			nr_was = kk_expert_pass_rows(8),	/* (the setting itself: at most 8) */
				b1_was[3] = {kk_expert_b1(0), kk_expert_b1(1), kk_expert_b1(2)},
				was,
				rc;
	int			nk = n * k,
				P,
				slots,
				guess = test_expert_path[path].guess > 0 ? E : test_expert_path[path].guess;
	const void *const *gate = (const void *const *) tab,
			   *const *up = (const void *const *) (tab + (E + 1)),
			   *const *down = (const void *const *) (tab + 2 * (E + 1));

	if (test_expert_path[path].nr)
		kk_set_expert_nr(test_expert_path[path].nr);
	P = kk_expert_pass_rows(n);
	slots = expert_item_slots(nk, E, n, P);
	rc = kk_moe_route_group_warp(s, n, E, k, 1, 1, 0, 1, 0, 1.0f, dlog, bias, sel, wts, n, P, start, xrow, inv,
								 active);
	if (rc < 0)
		rc = kk_moe_route_group(s, n, E, k, 1, 1, 0, 1, 0, 1.0f, dlog, bias, sel, wts, n, P, start, xrow, inv,
								active);
	if (rc == 0)
	{
		was = kk_set_expert_preload(test_expert_path[path].preload);
		kk_set_expert_b1(test_expert_path[path].tiles, test_expert_path[path].tiles, test_expert_path[path].shared);
		kk_expert_gemv_shared(s, h, NULL, F, x, D, xrow, gate, up, 1, F, D, start, active, slots, n, guess,
							  guess >= 0 ? n : 0);
		kk_expert_gemv_shared(s, y, NULL, D, h, F, NULL, down, NULL, 1, D, F, start, active, slots, n, guess,
							  guess >= 0 ? n : 0);
		kk_set_expert_preload(was);
		kk_set_expert_b1(b1_was[0], b1_was[1], b1_was[2]);
		rc = (int) cudaGetLastError();
	}
	kk_set_expert_nr(nr_was);
	return rc;
}

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): one decode step's expert products (SwiGLU gate/up into h, then
 * down) through today's two kernels and through a new path on the same data,
 * on the current device.  path 1: the down kernel reads its work list before
 * waiting (KL_CUDA_EXPERT_PRELOAD); 2-8: gemv.cu's tiled kernel at one row
 * an item (KL_CUDA_EXPERT_B1), test_expert_path[path]'s form.
 *
 * Experts: E routed ones and a shared one (expert E, over every token), each
 * with gate and up [F, D] and down [D, F] in bf16, random on the device
 * (seed; standard deviation 0.02); x [n, D] random fp32.  Routing: logits
 * [n E] (host), sigmoid, top k, renormalized, no groups, items of
 * kk_expert_pass_rows(n) rows (as the backend's decode).
 *
 * The old path runs once; the new path runs once directly, then captured in
 * a graph (routing included, so the programmatic edges are those of a
 * decode step) that is replayed twice, the outputs set to NaN before each
 * run.  Outputs, R (F + D) floats each (R = n k + n): h [R, F] then y [R, D];
 * out_new is the last replay's.  Returns 0, -1 when the shape is not covered,
 * -3 when the direct run and the last replay differ in any bit, or a CUDA
 * error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_expert_paths(int path, int n, int E, int k, int D, int F, const float *logits, unsigned long long seed,
						  float *out_old, float *out_new)
{
	int			nk = n * k,
				R = nk + n;
	size_t		wsz = (size_t) F * D,
				osz = (size_t) R * ((size_t) F + D),
				nact = (size_t) E + nk + n + 4;
	cudaStream_t s = NULL;
	cudaGraph_t graph = NULL;
	cudaGraphExec_t exec = NULL;
	cudaError_t e = cudaSuccess;
	uint16_t   *w16 = NULL;
	float	   *fl = NULL,
			   *direct = NULL;
	int		   *ints = NULL;
	void	  **tab = NULL;
	void	   *host_tab[3 * 1025];
	int			rc = 0;

	if (E + 1 > 1025 || n <= 0 || k <= 0 || path < 1 ||
		path >= (int) (sizeof(test_expert_path) / sizeof(test_expert_path[0])))
		return -1;
	direct = malloc(sizeof(float) * osz);
	if (!direct)
		return (int) cudaErrorMemoryAllocation;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc((void **) &w16, sizeof(uint16_t) * 3 * wsz * ((size_t) E + 1))) != cudaSuccess ||
		(e = cudaMalloc((void **) &fl, sizeof(float) * ((size_t) n * D + (size_t) n * E + E + nk + osz))) !=
		cudaSuccess ||
		(e = cudaMalloc((void **) &ints, sizeof(int) * (nk + ((size_t) E + 2) + R + nk + nact))) != cudaSuccess ||
		(e = cudaMalloc((void **) &tab, sizeof(void *) * 3 * ((size_t) E + 1))) != cudaSuccess)
		goto out;
	{
		/* h, y and x first: 16-byte aligned (F and D are multiples of 8 where the new paths run) */
		float	   *h = fl,
				   *y = h + (size_t) R * F,
				   *x = h + osz,
				   *dlog = x + (size_t) n * D,
				   *bias = dlog + (size_t) n * E,
				   *wts = bias + E;
		int		   *sel = ints,
				   *start = sel + nk,
				   *xrow = start + E + 2,
				   *inv = xrow + R,
				   *active = inv + nk;

		kk_fill_random(s, w16, 1, 3 * wsz * ((size_t) E + 1), seed, 0.02f);
		kk_fill_random(s, x, 0, (size_t) n * D, seed + 1, 1.0f);
		for (int m = 0; m < 3; m++)
			for (int j = 0; j <= E; j++)
				host_tab[m * (E + 1) + j] = w16 + ((size_t) m * (E + 1) + j) * wsz;
		if ((e = cudaMemcpyAsync(tab, host_tab, sizeof(void *) * 3 * ((size_t) E + 1), cudaMemcpyHostToDevice, s)) !=
			cudaSuccess ||
			(e = cudaMemcpyAsync(dlog, logits, sizeof(float) * (size_t) n * E, cudaMemcpyHostToDevice, s)) !=
			cudaSuccess ||
			(e = cudaMemsetAsync(bias, 0, sizeof(float) * E, s)) != cudaSuccess)
			goto out;
#define PATH_RUN(p) test_expert_path_launches(s, (p), n, E, k, D, F, dlog, bias, sel, wts, start, xrow, inv, active, \
											  tab, x, h, y)
		/* the old path, then the new one directly */
		for (int run = 0; run < 2 && rc == 0; run++)
		{
			if ((e = cudaMemsetAsync(h, 0xff, sizeof(float) * osz, s)) != cudaSuccess)
				goto out;
			if ((rc = PATH_RUN(run ? path : 0)) != 0)
				goto out;
			if ((e = cudaMemcpyAsync(run ? direct : out_old, h, sizeof(float) * osz, cudaMemcpyDeviceToHost, s)) !=
				cudaSuccess)
				goto out;
		}
		/* the new path as a graph, replayed twice */
		if ((e = cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal)) != cudaSuccess)
			goto out;
		rc = PATH_RUN(path);
		e = cudaStreamEndCapture(s, &graph);
		if (rc != 0 || e != cudaSuccess || (e = cudaGraphInstantiate(&exec, graph, 0)) != cudaSuccess)
			goto out;
		for (int rep = 0; rep < 2; rep++)
			if ((e = cudaMemsetAsync(h, 0xff, sizeof(float) * osz, s)) != cudaSuccess ||
				(e = cudaGraphLaunch(exec, s)) != cudaSuccess)
				goto out;
#undef PATH_RUN
		if ((e = cudaMemcpyAsync(out_new, h, sizeof(float) * osz, cudaMemcpyDeviceToHost, s)) != cudaSuccess ||
			(e = cudaStreamSynchronize(s)) != cudaSuccess)
			goto out;
		if (memcmp(direct, out_new, sizeof(float) * osz) != 0)
			rc = -3;
	}
out:
	if (s)
		cudaStreamSynchronize(s);
	if (exec)
		cudaGraphExecDestroy(exec);
	if (graph)
		cudaGraphDestroy(graph);
	cudaFree(w16);
	cudaFree(fl);
	cudaFree(ints);
	cudaFree(tab);
	if (s)
		cudaStreamDestroy(s);
	free(direct);
	return rc != 0 ? rc : (int) e;
}
