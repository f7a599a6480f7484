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
 *   larger batches: the choices come to the host, which groups them (stable,
 *     as cpu_moe.c does); in bf16 mode with bf16 experts the routed rows are
 *     gathered once as bf16 and go through two grouped cuBLAS products with
 *     bf16 results (gate and up; down) for all used experts at once, or one
 *     cublasGemmEx per used expert where cuBLAS refuses that
 *     (KL_CUDA_MOE_PREFILL; 0: the older code, grouped products with fp32
 *     results, which cuBLAS refuses, else one product per used expert
 *     through the ordinary matmul path, as fp32 mode does; 3: the experts'
 *     rows in slots padded to a few size classes, gathered token-major, one
 *     batched product per class and stage, the bf16 outputs combined
 *     directly — experts_batched16).
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

static void
moe_mark(cuda_state *cs, int i)
{
	if (cs->moe_ev && cs->mode == GM_EAGER && cudaEventRecord(cs->moe_ev[i], cs->stream) == cudaSuccess)
		cs->moe_ev_mask |= 1u << i;
}

/* ------------------------------------------------------------------ expert tables */

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
	cs->moe = NULL;
	cs->n_moe = cs->cap_moe = 0;
}

/* ------------------------------------------------------------------ host grouping (prefill) */

/*
 * Variant 3's slot of an expert with c > 0 rows: c rounded up to a multiple
 * of 128 where that pads less than 15 % (cuBLAS's wide tiles fit it), else to
 * a multiple of 64.  Pad rows cost products whose outputs nobody reads.
 */
static int
slot_rows(int c)
{
	int			s64 = (c + 63) / 64 * 64,
				s128 = (c + 127) / 128 * 128;

	return (s128 - c) * 100 < 15 * c ? s128 : s64;
}

static int
cmp_llong(const void *a, const void *b)
{
	long long	x = *(const long long *) a,
				y = *(const long long *) b;

	return (x > y) - (x < y);
}

/*
 * Variant 3's size classes from the counts in cs->h_start (prefix sums,
 * E + 1 entries): the used experts sorted by (slot size, id), runs of one
 * size a class, slots laid out class after class (cuda_state.moe_cls).
 */
static bool
moe_classes(kl_backend *be, int E)
{
	cuda_state *cs = CS(be);
	const int  *st = cs->h_start;
	int		   *base,
			   *order,
			   *size,
			   *first;
	long long  *key;
	int			A = 0;

	if (cs->moe_cls_cap < E)
	{
		free(cs->moe_cls);
		cs->moe_cls_cap = 0;
		/* base, order, size, first [E + 1], then the sort keys (two ints each, 8-byte aligned: one int more) */
		cs->moe_cls = malloc(sizeof(int) * (6 * (size_t) E + 2));
		if (!cs->moe_cls)
		{
			cuda_fail(be, KL_E_RESOURCES, "out of memory grouping experts");
			return false;
		}
		cs->moe_cls_cap = E;
	}
	base = cs->moe_cls;
	order = base + cs->moe_cls_cap;
	size = order + cs->moe_cls_cap;
	first = size + cs->moe_cls_cap;
	key = (long long *) (first + cs->moe_cls_cap + 1);
	if (((uintptr_t) key & 7) != 0)
		key = (long long *) ((char *) key + 4);
	for (int e = 0; e < E; e++)
	{
		int			c = st[e + 1] - st[e];

		base[e] = -1;
		if (c > 0)
			key[A++] = (long long) slot_rows(c) << 32 | e;
	}
	qsort(key, (size_t) A, sizeof(long long), cmp_llong);
	cs->moe_ncls = 0;
	cs->moe_npad = 0;
	for (int i = 0; i < A; i++)
	{
		int			S = (int) (key[i] >> 32),
					e = (int) (key[i] & 0xffffffff);

		if (i == 0 || S != size[cs->moe_ncls - 1])
		{
			size[cs->moe_ncls] = S;
			first[cs->moe_ncls++] = i;
		}
		order[i] = e;
		base[e] = cs->moe_npad;
		cs->moe_npad += S;
	}
	first[cs->moe_ncls] = A;
	return true;
}

/*
 * The prefill grouping on the host: downloads the expert choices d_sel (a
 * stream drain), counts them into cs->h_start, and uploads the stable
 * grouping: d_xrow (the token of each grouped row) and d_inv (the grouped
 * row of each (token, slot) pair).  pad (variant 3): the rows go to their
 * expert's slot of the padded layout instead (moe_classes; d_inv only, d_xrow
 * is left alone: kk_gather_tok_bf16 reads d_inv).
 */
static bool
host_group(kl_backend *be, int n, int E, int k, const int *d_sel, int *d_xrow, int *d_inv, bool pad)
{
	cuda_state *cs = CS(be);
	size_t		nk = (size_t) n * k;
	int		   *fill;

	if (cs->h_moe_cap < nk || !cs->h_start)
	{
		size_t		cap = nk * 2;

		free(cs->h_sel);
		free(cs->h_xrow);
		free(cs->h_inv);
		free(cs->h_start);
		cs->h_sel = malloc(sizeof(int) * cap);
		cs->h_xrow = malloc(sizeof(int) * cap);
		cs->h_inv = malloc(sizeof(int) * cap);
		cs->h_start = malloc(sizeof(int) * 2 * ((size_t) E + 1));
		cs->h_moe_cap = cap;
		if (!cs->h_sel || !cs->h_xrow || !cs->h_inv || !cs->h_start)
		{
			cs->h_moe_cap = 0;
			cuda_fail(be, KL_E_RESOURCES, "out of memory grouping experts");
			return false;
		}
	}
	if (!cuda_ok(be, cudaMemcpyAsync(cs->h_sel, d_sel, sizeof(int) * nk, cudaMemcpyDeviceToHost, cs->stream),
				 "expert choices download") ||
		!cuda_ok(be, cudaStreamSynchronize(cs->stream), "expert choices download"))
		return false;
	fill = cs->h_start + E + 1;
	memset(cs->h_start, 0, sizeof(int) * ((size_t) E + 1));
	for (size_t i = 0; i < nk; i++)
	{
		if (cs->h_sel[i] < 0 || cs->h_sel[i] >= E)
		{
			cuda_fail(be, KL_E_INTERNAL, "internal error: expert id %d out of range", cs->h_sel[i]);
			return false;
		}
		cs->h_start[cs->h_sel[i] + 1]++;
	}
	for (int e = 0; e < E; e++)
		cs->h_start[e + 1] += cs->h_start[e];
	if (pad && !moe_classes(be, E))
		return false;
	memcpy(fill, cs->h_start, sizeof(int) * (size_t) E);
	for (size_t i = 0; i < nk; i++)
	{
		int			e = cs->h_sel[i],
					p = fill[e]++;

		cs->h_xrow[p] = (int) (i / k);
		cs->h_inv[i] = pad ? cs->moe_cls[e] + (p - cs->h_start[e]) : p;
	}
	return (pad || cuda_ok(be, cudaMemcpyAsync(d_xrow, cs->h_xrow, sizeof(int) * nk, cudaMemcpyHostToDevice,
											   cs->stream), "expert grouping upload")) &&
		cuda_ok(be, cudaMemcpyAsync(d_inv, cs->h_inv, sizeof(int) * nk, cudaMemcpyHostToDevice, cs->stream),
				"expert grouping upload") &&
		cuda_ok(be, cudaStreamSynchronize(cs->stream), "expert grouping upload");
}

/* ------------------------------------------------------------------ grouped products (prefill, bf16) */

/*
 * One cublasGemmGroupedBatchedEx per stage instead of a product per used
 * expert: Y_g [cnt, rows] = X_g [cnt, cols] W_g^T for the listed groups
 * (bf16 operands, fp32 results).  Returns false with be->failed clear when
 * cuBLAS does not support it here (the caller then loops).
 */
typedef struct moe_group_list
{
	int			n;
	const void **W;
	const uint16_t **X;
	float	  **Y;
	int		   *cnt;
} moe_group_list;

static bool
grouped_gemm(kl_backend *be, const moe_group_list *g, int rows, int cols, int mark)
{
	cuda_state *cs = CS(be);
	int			n = g->n;
	cublasOperation_t *ta = malloc(sizeof(cublasOperation_t) * (size_t) n),
			   *tb = malloc(sizeof(cublasOperation_t) * (size_t) n);
	int		   *m = malloc(sizeof(int) * (size_t) n * 7);
	float	   *ab = malloc(sizeof(float) * 2 * (size_t) n);
	void	  **host = malloc(sizeof(void *) * 3 * (size_t) n);
	void	  **dev = cuda_buf(be, CB_MOE_PTRS, sizeof(void *) * 3 * (size_t) n);
	cublasStatus_t st = CUBLAS_STATUS_ALLOC_FAILED;
	bool		ok = false;

	if (!ta || !tb || !m || !ab || !host || !dev)
		goto out;
	for (int i = 0; i < n; i++)
	{
		ta[i] = CUBLAS_OP_T;
		tb[i] = CUBLAS_OP_N;
		m[i] = rows;			/* m */
		m[n + i] = g->cnt[i];	/* n */
		m[2 * n + i] = cols;	/* k */
		m[3 * n + i] = cols;	/* lda */
		m[4 * n + i] = cols;	/* ldb */
		m[5 * n + i] = rows;	/* ldc */
		m[6 * n + i] = 1;		/* group size */
		ab[i] = 1.0f;
		ab[n + i] = 0.0f;
		host[i] = (void *) g->W[i];
		host[n + i] = (void *) g->X[i];
		host[2 * n + i] = g->Y[i];
	}
	if (!cuda_upload_sync(be, dev, host, sizeof(void *) * 3 * (size_t) n))
		goto out;
	moe_mark(cs, mark);
	st = cublasGemmGroupedBatchedEx(cs->blas, ta, tb, m, m + n, m + 2 * n, ab, (const void *const *) dev,
									CUDA_R_16BF, m + 3 * n, (const void *const *) (dev + n), CUDA_R_16BF, m + 4 * n,
									ab + n, dev + 2 * n, CUDA_R_32F, m + 5 * n, n, m + 6 * n, CUBLAS_COMPUTE_32F);
	moe_mark(cs, mark + 1);
	if (st == CUBLAS_STATUS_NOT_SUPPORTED)
		cs->no_grouped_gemm = true;
	else
		ok = blas_ok(be, st, "GemmGroupedBatchedEx (experts)");
out:
	free(ta);
	free(tb);
	free(m);
	free(ab);
	free(host);
	return ok;
}

/* the experts of a prefill batch in bf16: three grouped products */
static bool
experts_grouped(kl_backend *be, const kl_moe_layer *w, const int *st, int E, int D, int F, const float *x,
				const int *xrow, size_t nk, float *g, float *u, float *ye)
{
	cuda_state *cs = CS(be);
	uint16_t   *x16 = cuda_buf(be, CB_MOE_X, sizeof(uint16_t) * nk * D);
	uint16_t   *h16 = cuda_buf(be, CB_MOE_H16, sizeof(uint16_t) * nk * F);
	moe_group_list gl;
	bool		ok = false;
	int			na = 0;

	gl.W = malloc(sizeof(void *) * 2 * (size_t) E);
	gl.X = malloc(sizeof(void *) * 2 * (size_t) E);
	gl.Y = malloc(sizeof(void *) * 2 * (size_t) E);
	gl.cnt = malloc(sizeof(int) * 2 * (size_t) E);
	if (!x16 || !h16 || !gl.W || !gl.X || !gl.Y || !gl.cnt)
		goto out;
	kk_gather_rows_bf16(cs->stream, x16, x, D, xrow, (int) nk, D);
	if (!cuda_launched(be, "gather rows (bf16)"))
		goto out;
	for (int e = 0; e < E; e++)
		if (st[e + 1] > st[e])
		{
			gl.W[na] = w->experts[e].gate.dev;
			gl.X[na] = x16 + (size_t) st[e] * D;
			gl.Y[na] = g + (size_t) st[e] * F;
			gl.cnt[na++] = st[e + 1] - st[e];
			gl.W[na] = w->experts[e].up.dev;
			gl.X[na] = x16 + (size_t) st[e] * D;
			gl.Y[na] = u + (size_t) st[e] * F;
			gl.cnt[na++] = st[e + 1] - st[e];
		}
	gl.n = na;
	if (!grouped_gemm(be, &gl, F, D, 0))
		goto out;
	kk_swiglu_bf16(cs->stream, h16, g, u, nk * F);
	if (!cuda_launched(be, "swiglu (bf16)"))
		goto out;
	na = 0;
	for (int e = 0; e < E; e++)
		if (st[e + 1] > st[e])
		{
			gl.W[na] = w->experts[e].down.dev;
			gl.X[na] = h16 + (size_t) st[e] * F;
			gl.Y[na] = ye + (size_t) st[e] * D;
			gl.cnt[na++] = st[e + 1] - st[e];
		}
	gl.n = na;
	ok = grouped_gemm(be, &gl, D, F, 2);
out:
	free(gl.W);
	free(gl.X);
	free(gl.Y);
	free(gl.cnt);
	return ok;
}

/* ------------------------------------------------------------------ prefill experts from bf16 rows */

/*
 * KL_CUDA_MOE_PREFILL=1: one cublasGemmEx per used expert and matrix, bf16
 * operands straight from x16 (the routed rows gathered once as bf16) and
 * fp32 results: g, u [nk, F]; h16 = silu(g) * u rounded once to bf16 (the
 * rounding the older loop's down product applies to its fp32 h); ye [nk, D].
 * The same products and roundings as KL_CUDA_MOE_PREFILL=0 where that one
 * runs cuBLAS (experts of more than 8 rows; it takes the GEMV below that),
 * without its conversion per product.
 */
static bool
experts_loop16(kl_backend *be, const kl_moe_layer *w, const int *st, int E, int D, int F, const uint16_t *x16,
			   uint16_t *h16, size_t nk, float *g, float *u, float *ye)
{
	cuda_state *cs = CS(be);
	const float one = 1.0f,
				zero = 0.0f;

	moe_mark(cs, 0);
	for (int e = 0; e < E && !be->failed; e++)
	{
		int			c = st[e + 1] - st[e];
		const uint16_t *xe = x16 + (size_t) st[e] * D;

		if (c == 0)
			continue;
		/* column-major view: Y^T [F, c] = W [F, D] X^T [D, c] */
		if (blas_ok(be, cublasGemmEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, F, c, D, &one, w->experts[e].gate.dev,
									 CUDA_R_16BF, D, xe, CUDA_R_16BF, D, &zero, g + (size_t) st[e] * F, CUDA_R_32F,
									 F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "GemmEx (expert gate)"))
			blas_ok(be, cublasGemmEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, F, c, D, &one, w->experts[e].up.dev,
									 CUDA_R_16BF, D, xe, CUDA_R_16BF, D, &zero, u + (size_t) st[e] * F, CUDA_R_32F,
									 F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "GemmEx (expert up)");
	}
	moe_mark(cs, 1);
	if (be->failed)
		return false;
	kk_swiglu_bf16(cs->stream, h16, g, u, nk * F);
	if (!cuda_launched(be, "swiglu (bf16)"))
		return false;
	moe_mark(cs, 2);
	for (int e = 0; e < E && !be->failed; e++)
	{
		int			c = st[e + 1] - st[e];

		if (c > 0)
			blas_ok(be, cublasGemmEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, D, c, F, &one, w->experts[e].down.dev,
									 CUDA_R_16BF, F, h16 + (size_t) st[e] * F, CUDA_R_16BF, F, &zero,
									 ye + (size_t) st[e] * D, CUDA_R_32F, D, CUBLAS_COMPUTE_32F,
									 CUBLAS_GEMM_DEFAULT), "GemmEx (expert down)");
	}
	moe_mark(cs, 3);
	return !be->failed;
}

/* variant 2's argument arrays for at least cap problems (grow-only) */
static bool
grp_arrays(kl_backend *be, int cap)
{
	cuda_state *cs = CS(be);

	if (cs->moe_grp_cap >= cap)
		return true;
	free(cs->moe_grp_dims);
	free(cs->moe_grp_ab);
	free(cs->moe_grp_ops);
	cudaFreeHost(cs->moe_grp_ptrs);
	cs->moe_grp_ptrs = NULL;
	cs->moe_grp_cap = 0;
	cs->moe_grp_dims = malloc(sizeof(int) * 7 * (size_t) cap);
	cs->moe_grp_ab = malloc(sizeof(float) * 2 * (size_t) cap);
	cs->moe_grp_ops = malloc(sizeof(cublasOperation_t) * 2 * (size_t) cap);
	if (!cs->moe_grp_dims || !cs->moe_grp_ab || !cs->moe_grp_ops ||
		!cuda_ok(be, cudaMallocHost((void **) &cs->moe_grp_ptrs, sizeof(void *) * 3 * (size_t) cap),
				 "cudaMallocHost (grouped GEMM pointers)"))
	{
		if (!be->failed)
			cuda_fail(be, KL_E_RESOURCES, "out of memory for the grouped expert products");
		return false;
	}
	for (int i = 0; i < cap; i++)
	{
		cs->moe_grp_ab[i] = 1.0f;
		cs->moe_grp_ab[cap + i] = 0.0f;
		cs->moe_grp_ops[i] = CUBLAS_OP_T;
		cs->moe_grp_ops[cap + i] = CUBLAS_OP_N;
		cs->moe_grp_dims[6 * cap + i] = 1;	/* one problem a group: the experts' row counts differ */
	}
	cs->moe_grp_cap = cap;
	return true;
}

/* problem i of variant 2: C [cnt, m] (bf16) = X [cnt, k] W^T, W [m, k] */
static void
grp_problem(cuda_state *cs, int i, const void *W, const uint16_t *X, uint16_t *C, int m, int k, int cnt)
{
	int			cap = cs->moe_grp_cap,
			   *d = cs->moe_grp_dims;

	d[i] = m;
	d[cap + i] = cnt;
	d[2 * cap + i] = k;
	d[3 * cap + i] = k;			/* lda */
	d[4 * cap + i] = k;			/* ldb */
	d[5 * cap + i] = m;			/* ldc */
	cs->moe_grp_ptrs[i] = (void *) W;
	cs->moe_grp_ptrs[cap + i] = (void *) X;
	cs->moe_grp_ptrs[2 * cap + i] = C;
}

/* problems i0 .. i0 + count - 1 of variant 2 in one grouped call (dev: the uploaded pointers) */
static cublasStatus_t
grp_call(cuda_state *cs, void **dev, int i0, int count)
{
	int			cap = cs->moe_grp_cap,
			   *d = cs->moe_grp_dims;

	return cublasGemmGroupedBatchedEx(cs->blas, cs->moe_grp_ops + i0, cs->moe_grp_ops + cap + i0, d + i0,
									  d + cap + i0, d + 2 * cap + i0, cs->moe_grp_ab + i0,
									  (const void *const *) (dev + i0), CUDA_R_16BF, d + 3 * cap + i0,
									  (const void *const *) (dev + cap + i0), CUDA_R_16BF, d + 4 * cap + i0,
									  cs->moe_grp_ab + cap + i0, dev + 2 * cap + i0, CUDA_R_16BF, d + 5 * cap + i0,
									  count, d + 6 * cap + i0, CUBLAS_COMPUTE_32F);
}

/*
 * KL_CUDA_MOE_PREFILL=2: two grouped products with bf16 operands and bf16
 * results (the combination cuBLAS's grouped GEMM takes; bf16 operands with
 * fp32 results it refuses): gate and up of every used expert in one call
 * (g16, u16 [nk, F]), h16 = silu(g) * u (kk_swiglu_bf16_bf16), down in a
 * second call (ye16 [nk, D]), widened into ye for the combine.  Against
 * variant 1 this rounds g, u and the expert outputs to bf16 as well.
 * Returns false with be->failed clear when cuBLAS refuses a call (status in
 * cs->moe_grouped_status): the caller runs variant 1 instead.
 *
 * The pointer arrays go up with one cudaMemcpyAsync from pinned memory:
 * the copy of the previous op is complete when this one rewrites them,
 * because host_group synchronised the stream in between.
 */
static bool
experts_grouped16(kl_backend *be, const kl_moe_layer *w, const int *st, int E, int D, int F, const uint16_t *x16,
				  uint16_t *h16, size_t nk, float *g, float *u, float *ye)
{
	cuda_state *cs = CS(be);
	uint16_t   *g16 = (uint16_t *) g,	/* (g and u hold [nk + n, F] floats: room for bf16 [nk, F]) */
			   *u16 = (uint16_t *) u,
			   *ye16 = cuda_buf(be, CB_MOE_Y16, sizeof(uint16_t) * nk * D);
	void	  **dev;
	cublasStatus_t bst;
	int			A = 0,
				na = 0,
				cap;

	if (!ye16 || !grp_arrays(be, 3 * E))
		return false;
	cap = cs->moe_grp_cap;
	dev = cuda_buf(be, CB_MOE_PTRS, sizeof(void *) * 3 * (size_t) cap);
	if (!dev)
		return false;
	for (int e = 0; e < E; e++)
		A += st[e + 1] > st[e];
	/* gate and up problems 0 .. 2A - 1, down 2A .. 3A - 1 */
	for (int e = 0; e < E; e++)
	{
		int			c = st[e + 1] - st[e];

		if (c == 0)
			continue;
		grp_problem(cs, 2 * na, w->experts[e].gate.dev, x16 + (size_t) st[e] * D, g16 + (size_t) st[e] * F, F, D, c);
		grp_problem(cs, 2 * na + 1, w->experts[e].up.dev, x16 + (size_t) st[e] * D, u16 + (size_t) st[e] * F, F, D,
					c);
		grp_problem(cs, 2 * A + na, w->experts[e].down.dev, h16 + (size_t) st[e] * F, ye16 + (size_t) st[e] * D, D,
					F, c);
		na++;
	}
	if (!cuda_ok(be, cudaMemcpyAsync(dev, cs->moe_grp_ptrs, sizeof(void *) * 3 * (size_t) cap,
									 cudaMemcpyHostToDevice, cs->stream), "grouped GEMM pointers upload"))
		return false;
	moe_mark(cs, 0);
	bst = grp_call(cs, dev, 0, 2 * A);
	moe_mark(cs, 1);
	if (bst == CUBLAS_STATUS_SUCCESS)
	{
		kk_swiglu_bf16_bf16(cs->stream, h16, g16, u16, nk * F);
		if (!cuda_launched(be, "swiglu (bf16 from bf16)"))
			return false;
		moe_mark(cs, 2);
		bst = grp_call(cs, dev, 2 * A, A);
		moe_mark(cs, 3);
	}
	if (bst != CUBLAS_STATUS_SUCCESS)
	{
		/* refused (or failed) before anything of it ran on the device: variant 1 from the start */
		cs->moe_grouped_refused = true;
		cs->moe_grouped_status = (int) bst;
		cs->moe_ev_mask = 0;
		return false;
	}
	kk_bf16_to_f32(cs->stream, ye, ye16, nk * D);
	return cuda_launched(be, "expert outputs to fp32");
}

/*
 * The routed experts of a prefill batch from its rows gathered once as bf16
 * (bf16 precision, bf16 experts): KL_CUDA_MOE_PREFILL 2, else or where
 * cuBLAS refuses that, 1.  Sets cs->moe_prefill_ran.
 */
static bool
experts_prefill16(kl_backend *be, const kl_moe_layer *w, const int *st, int E, int D, int F, const float *x,
				  const int *xrow, size_t nk, float *g, float *u, float *ye)
{
	cuda_state *cs = CS(be);
	uint16_t   *x16 = cuda_buf(be, CB_MOE_X, sizeof(uint16_t) * nk * D),
			   *h16 = cuda_buf(be, CB_MOE_H16, sizeof(uint16_t) * nk * F);

	if (!x16 || !h16)
		return false;
	kk_gather_rows_bf16(cs->stream, x16, x, D, xrow, (int) nk, D);
	if (!cuda_launched(be, "gather rows (bf16)"))
		return false;
	if (cs->moe_prefill >= 2 && !cs->moe_grouped_refused)
	{
		if (experts_grouped16(be, w, st, E, D, F, x16, h16, nk, g, u, ye))
		{
			cs->moe_prefill_ran = 2;
			return true;
		}
		if (be->failed)
			return false;
	}
	cs->moe_prefill_ran = 1;
	return experts_loop16(be, w, st, E, D, F, x16, h16, nk, g, u, ye);
}

/* ------------------------------------------------------------------ batched products over size classes */

/* problem i of variant 3 in the pinned pointer arrays: A (weights), B (rows), C (results) */
static void
batch_problem(cuda_state *cs, int i, const void *W, const uint16_t *X, uint16_t *C)
{
	cs->moe_grp_ptrs[i] = (void *) W;
	cs->moe_grp_ptrs[cs->moe_grp_cap + i] = (void *) X;
	cs->moe_grp_ptrs[2 * cs->moe_grp_cap + i] = C;
}

/* problems i0 .. i0 + count - 1 of variant 3, all C [S, m] = X [S, kd] W^T, W [m, kd], in one batched call */
static cublasStatus_t
batch_call(cuda_state *cs, void **dev, int i0, int count, int m, int S, int kd)
{
	const float one = 1.0f,
				zero = 0.0f;
	int			cap = cs->moe_grp_cap;

	/* column-major view: C^T [m, S] = W [m, kd] (stored [kd, m] column-major, transposed) X^T [kd, S] */
	return cublasGemmBatchedEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, m, S, kd, &one, (const void *const *) (dev + i0),
							   CUDA_R_16BF, kd, (const void *const *) (dev + cap + i0), CUDA_R_16BF, kd, &zero,
							   dev + 2 * cap + i0, CUDA_R_16BF, m, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

/*
 * KL_CUDA_MOE_PREFILL=3: the routed experts of a prefill batch as batched
 * products over size classes (host_group with pad, moe_classes).  Each used
 * expert's rows sit in a slot of its class's size S (padded layout of
 * cs->moe_npad rows; d_inv names each pair's row): the rows are gathered
 * token-major as bf16 (kk_gather_tok_bf16: x read once), then per class one
 * cublasGemmBatchedEx for gate and up of all its experts (2 m problems of
 * [S, F], bf16 results), kk_swiglu_bf16_bf16 over the whole layout, and per
 * class one for down ([S, D], bf16 results).  Uniform m, n, k within a call
 * lets cuBLAS take its ordinary (Hopper) batched kernels, unlike the grouped
 * call of variant 2.  Pad rows hold whatever the buffer held: a product's
 * output row depends only on its own input row, and the combine reads only
 * the pairs' rows, so their results are never read.  The same bf16 roundings
 * as variant 2 (g, u, h, expert outputs); the combine then reads the bf16
 * outputs itself (cuda_defer_combine16).
 *
 * Returns the expert outputs [npad, D] (bf16), or NULL: be->failed set, or
 * clear when cuBLAS refused a call before the products completed
 * (moe_batched_refused, status in moe_batched_status; the caller then
 * groups again without padding and runs variant 2).  Buffers: g, u, ye (the
 * caller's fp32 ones, room for 2 (nk + n) bf16 rows each) when the padded
 * layout fits them, else working memory of their own.
 */
static const uint16_t *
experts_batched16(kl_backend *be, const kl_moe_layer *w, int D, int F, const float *x, const int *inv, int n, int k,
				  float *g, float *u, float *ye)
{
	cuda_state *cs = CS(be);
	size_t		Np = (size_t) cs->moe_npad,
				room = 2 * ((size_t) n * k + n);
	const int  *base = cs->moe_cls,
			   *order = base + cs->moe_cls_cap,
			   *size = order + cs->moe_cls_cap,
			   *first = size + cs->moe_cls_cap;
	int			ncls = cs->moe_ncls,
				A = first[ncls],
				cap;
	uint16_t   *x16 = cuda_buf(be, CB_MOE_X, sizeof(uint16_t) * Np * D),
			   *h16 = cuda_buf(be, CB_MOE_H16, sizeof(uint16_t) * Np * F),
			   *g16,
			   *u16,
			   *ye16;
	void	  **dev;
	cublasStatus_t bst = CUBLAS_STATUS_SUCCESS;

	if (!x16 || !h16 || !grp_arrays(be, 3 * cs->moe_cls_cap))
		return NULL;
	if (Np <= room)
	{
		g16 = (uint16_t *) g;
		u16 = (uint16_t *) u;
		ye16 = (uint16_t *) ye;
	}
	else
	{
		g16 = cuda_buf(be, CB_MOE_GU16, sizeof(uint16_t) * 2 * Np * F);
		u16 = g16 ? g16 + Np * F : NULL;
		ye16 = cuda_buf(be, CB_MOE_Y16, sizeof(uint16_t) * Np * D);
		if (!g16 || !ye16)
			return NULL;
	}
	cap = cs->moe_grp_cap;
	dev = cuda_buf(be, CB_MOE_PTRS, sizeof(void *) * 3 * (size_t) cap);
	if (!dev)
		return NULL;
	kk_gather_tok_bf16(cs->stream, x16, x, D, inv, n, k, D);
	if (!cuda_launched(be, "gather rows token-major (bf16)"))
		return NULL;
	/* class after class: gate and up problems 2j, 2j + 1; down 2A + j (j: the expert's place in order) */
	for (int j = 0; j < A; j++)
	{
		int			e = order[j];
		size_t		b = (size_t) base[e];

		batch_problem(cs, 2 * j, w->experts[e].gate.dev, x16 + b * D, g16 + b * F);
		batch_problem(cs, 2 * j + 1, w->experts[e].up.dev, x16 + b * D, u16 + b * F);
		batch_problem(cs, 2 * A + j, w->experts[e].down.dev, h16 + b * F, ye16 + b * D);
	}
	/* (the previous op's copy of these arrays is complete: host_group drained the stream since) */
	if (!cuda_ok(be, cudaMemcpyAsync(dev, cs->moe_grp_ptrs, sizeof(void *) * 3 * (size_t) cap,
									 cudaMemcpyHostToDevice, cs->stream), "batched GEMM pointers upload"))
		return NULL;
	moe_mark(cs, 0);
	for (int c = 0; c < ncls && bst == CUBLAS_STATUS_SUCCESS; c++)
		bst = batch_call(cs, dev, 2 * first[c], 2 * (first[c + 1] - first[c]), F, size[c], D);
	moe_mark(cs, 1);
	if (bst == CUBLAS_STATUS_SUCCESS)
	{
		kk_swiglu_bf16_bf16(cs->stream, h16, g16, u16, Np * F);
		if (!cuda_launched(be, "swiglu (bf16 from bf16)"))
			return NULL;
		moe_mark(cs, 2);
		for (int c = 0; c < ncls && bst == CUBLAS_STATUS_SUCCESS; c++)
			bst = batch_call(cs, dev, 2 * A + first[c], first[c + 1] - first[c], D, size[c], F);
		moe_mark(cs, 3);
	}
	if (bst != CUBLAS_STATUS_SUCCESS)
	{
		cs->moe_batched_refused = true;
		cs->moe_batched_status = (int) bst;
		cs->moe_ev_mask = 0;
		return NULL;
	}
	return ye16;
}

/* ------------------------------------------------------------------ the op */

/*
 * The decode expert products in the experts' form (tab; down: the down
 * matrices, else gate/up): bf16 / fp32 through kk_expert_gemv /
 * kk_expert_mma, quantized through their _q twins (kernels/gemv_q.cu,
 * kernels/mma_q.cu).
 */
static void
expert_gemv_in(cuda_state *cs, const cuda_moe_tables *tab, bool down, float *y0, float *y1, int ldy,
			   const float *x, int ldx, const int *xrow, const void *const *W0, const void *const *W1, int rows,
			   int cols, const int *start, const int *active, int max_active, int max_count)
{
	int			fmt = down ? tab->fmt_down : tab->fmt_gu,
				group = down ? tab->group_down : tab->group_gu;

	if (fmt >= KK_WF_FP8)
		kk_expert_gemv_q(cs->stream, y0, y1, ldy, x, ldx, xrow, W0, W1, fmt, group, rows, cols, start, active,
						 max_active, max_count);
	else
		kk_expert_gemv(cs->stream, y0, y1, ldy, x, ldx, xrow, W0, W1, fmt == KK_WF_BF16, rows, cols, start, active,
					   max_active, max_count);
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
				wq;				/* the experts quantized (kernels.h's device form) */

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
						(const void *const *) (tab->dev + (E + 1)), F, D, start, active, max_active, n);
		else
		{
			expert_gemv_in(cs, tab, false, g, u, F, x, D, xrow, (const void *const *) tab->dev,
						(const void *const *) (tab->dev + (E + 1)), F, D, start, active, max_active, n);
			kk_swiglu(cs->stream, g, g, u, rows, F, F);
		}
		if (!mma)
		{
			if (!cuda_launched(be, "expert gate/up"))
				return;
			expert_gemv_in(cs, tab, true, ye, NULL, D, g, F, NULL, (const void *const *) (tab->dev + 2 * (E + 1)), NULL,
						D, F, start, active, max_active, n);
			if (!cuda_launched(be, "expert down"))
				return;
		}
		if (fuse)
		{
			cuda_defer_combine(be, y, n, D, k, wts, inv, ye, ye + nk * D);
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
		/* (bf16 experts only: quantized ones go through cuda_matmul_raw's panels) */
		bool		fast = cs->moe_prefill > 0 && cs->bf16 && wbf && tab->fmt_down == KK_WF_BF16 && tab->uniform;
		bool		batched = fast && cs->moe_prefill == 3 && !cs->moe_batched_refused;

		if (!xe || !host_group(be, n, E, k, sel, xrow, inv, batched))
			return;
		st = cs->h_start;
		if (batched)
		{
			if ((ye16 = experts_batched16(be, w, D, F, x, inv, n, k, g, u, ye)) != NULL)
			{
				cs->moe_prefill_ran = 3;
				goto shared;
			}
			/* refused: the layout of variant 2 (the choices are still on the device) */
			if (be->failed || !host_group(be, n, E, k, sel, xrow, inv, false))
				return;
		}
		if (fast)
		{
			if (!experts_prefill16(be, w, st, E, D, F, x, xrow, nk, g, u, ye))
				return;
			goto shared;
		}
		cs->moe_prefill_ran = 0;
		if (cs->bf16 && wbf && tab->fmt_down == KK_WF_BF16 && tab->uniform && !cs->no_grouped_gemm &&
			experts_grouped(be, w, st, E, D, F, x, xrow, nk, g, u, ye))
			goto shared;
		if (be->failed)
			return;
		kk_gather_rows(cs->stream, xe, x, D, xrow, (int) nk, D);
		if (!cuda_launched(be, "gather rows"))
			return;
		moe_mark(cs, 0);
		for (int e = 0; e < E && !be->failed; e++)
		{
			int			c = st[e + 1] - st[e];

			if (c == 0)
				continue;
			cuda_matmul_raw(be, g + (size_t) st[e] * F, F, xe + (size_t) st[e] * D, D, c, &w->experts[e].gate);
			cuda_matmul_raw(be, u + (size_t) st[e] * F, F, xe + (size_t) st[e] * D, D, c, &w->experts[e].up);
		}
		moe_mark(cs, 1);
		kk_swiglu(cs->stream, g, g, u, (int) nk, F, F);
		if (!cuda_launched(be, "swiglu"))
			return;
		moe_mark(cs, 2);
		for (int e = 0; e < E && !be->failed; e++)
		{
			int			c = st[e + 1] - st[e];

			if (c > 0)
				cuda_matmul_raw(be, ye + (size_t) st[e] * D, D, g + (size_t) st[e] * F, F, c, &w->experts[e].down);
		}
		moe_mark(cs, 3);
		if (be->failed)
			return;
	}

	/* 3. shared experts: a SwiGLU MLP of width F*S over all tokens */
shared:
	if (w->has_shared)
	{
		float	   *sg = cuda_buf(be, CB_MOE_SG, sizeof(float) * (size_t) n * Fs);
		float	   *su = cuda_buf(be, CB_MOE_SU, sizeof(float) * (size_t) n * Fs);

		sy = cuda_buf(be, CB_MOE_SY, sizeof(float) * (size_t) n * D);
		if (!sg || !su || !sy)
			return;
		kl_matmul_job gu[2] = {{sg, Fs, x, D, n, &w->shared.gate}, {su, Fs, x, D, n, &w->shared.up}};

		moe_mark(cs, 4);
		cuda_matmul_batch_raw(be, gu, 2);
		moe_mark(cs, 5);
		kk_swiglu(cs->stream, sg, sg, su, n, Fs, Fs);
		if (!cuda_launched(be, "swiglu"))
			return;
		moe_mark(cs, 6);
		cuda_matmul_raw(be, sy, D, sg, Fs, n, &w->shared.down);
		moe_mark(cs, 7);
		if (be->failed)
			return;
	}

	/* 4. y = sum of weighted expert outputs (+ shared) */
	if (ye16)
		cuda_defer_combine16(be, y, n, D, k, wts, inv, ye16, sy);
	else
		cuda_defer_combine(be, y, n, D, k, wts, inv, ye, sy);
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
 * made the variant asked fall back (3 to 2, 2 to 1; 0: it did not).
 * Returns info[1].
 */
__attribute__((visibility("default"))) int
kl_cuda_moe_prefill_path(kl_backend *be, int info[3])
{
	cuda_state *cs = CS(be);

	info[0] = cs->moe_prefill;
	info[1] = cs->moe_prefill_ran;
	if (cs->moe_prefill == 3)
		info[2] = cs->moe_batched_refused ? (cs->moe_batched_status ? cs->moe_batched_status : -1) : 0;
	else
		info[2] = cs->moe_grouped_refused ? (cs->moe_grouped_status ? cs->moe_grouped_status : -1) : 0;
	return info[1];
}

/* ------------------------------------------------------------------ test hook */

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): route and group n tokens' router logits (host memory) through
 * one of the fused decode launchers — warp 0: kk_moe_route_group, 1:
 * kk_moe_route_group_warp, 2: kk_moe_route_group_rank — on the current
 * device, and copy every output back.  The output arrays' contents go to the device first, so that the
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
		rc = (warp == 2 ? kk_moe_route_group_rank : warp ? kk_moe_route_group_warp : kk_moe_route_group)
			(s, n, E, k, G, Tg, use_softmax, renorm, bias_in_w, scaling, d[0], d[1], d[2], d[3], shared_rows, P, d[4],
			 d[5], d[6], d[7]);
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
 * The new launches of kl_cuda_test_expert_paths on stream s: route and group
 * n tokens (the warp launcher where it covers the shape), then the SwiGLU
 * gate/up products into h [R, F] and the down products of h into y [R, D]:
 * path 0 today's two kernels (KL_CUDA_EXPERT_PRELOAD=0), path 1 the same with
 * the down kernel's early read of its work list.  Returns 0, -1 (shape not
 * covered) or a CUDA error.
 */
static int
test_expert_path_launches(cudaStream_t s, int path, int n, int E, int k, int D, int F, const float *dlog,
						  const float *bias, int *sel, float *wts, int *start, int *xrow, int *inv, int *active,
						  void *const *tab, const float *x, float *h, float *y)
{
	int			nk = n * k,
				P = kk_expert_pass_rows(n),
				slots = expert_item_slots(nk, E, n, P),
				was,
				rc;
	const void *const *gate = (const void *const *) tab,
			   *const *up = (const void *const *) (tab + (E + 1)),
			   *const *down = (const void *const *) (tab + 2 * (E + 1));

	rc = kk_moe_route_group_warp(s, n, E, k, 1, 1, 0, 1, 0, 1.0f, dlog, bias, sel, wts, n, P, start, xrow, inv,
								 active);
	if (rc < 0)
		rc = kk_moe_route_group(s, n, E, k, 1, 1, 0, 1, 0, 1.0f, dlog, bias, sel, wts, n, P, start, xrow, inv,
								active);
	if (rc != 0)
		return rc;
	was = kk_set_expert_preload(path == 1);
	kk_expert_gemv(s, h, NULL, F, x, D, xrow, gate, up, 1, F, D, start, active, slots, n);
	kk_expert_gemv(s, y, NULL, D, h, F, NULL, down, NULL, 1, D, F, start, active, slots, n);
	kk_set_expert_preload(was);
	return (int) cudaGetLastError();
}

/*
 * For test/engine/test_cuda.c only (found with dlsym; the backend does not
 * use it): one decode step's expert products (SwiGLU gate/up into h, then
 * down) through today's two kernels and through a new path on the same data,
 * on the current device.  path 1: the down kernel reads its work list before
 * waiting (KL_CUDA_EXPERT_PRELOAD).
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

	if (E + 1 > 1025 || n <= 0 || k <= 0 || path != 1)
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
