/*
 * cuda_fp8.c — precision "fp8": the prefill products of FP8 weights with FP8
 * activations (W8A8, the scheme of the compressed-tensors "FP8-dynamic"
 * checkpoints) on cuBLASLt's FP8 tensor-core GEMMs.
 *
 * The mode is precision bf16 everywhere (cs->bf16 is set too) except for
 * products of FP8 weights with one scale a row (per-channel) and at least
 * cs->fp8_act_min rows (KL_CUDA_FP8_ACT_MIN, default 65: below, decode's
 * memory-bound kernels of mma_q.cu / gemv_q.cu keep bf16 or fp32
 * activations, as in precision bf16):
 *   dense products (cuda_matmul_fp8): the activation rows rounded to E4M3,
 *     one fp32 scale a row (kk_fp8_quant_rows: amax / 448), then one
 *     cublasLtMatmul E4M3 x E4M3 with fp32 accumulation and fp32 results,
 *     the weights' per-channel scales and the rows' scales applied by
 *     cuBLASLt as outer vectors (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F);
 *   the routed experts of variants 3 / 4 (cuda_fp8_experts): cuBLASLt
 *     refuses outer-vector scales in batched products, so the batched FP8
 *     products run unscaled (scalar scales of 1) with bf16 results, and the
 *     scales are applied outside: the gathered rows quantized per token
 *     (kk_fp8_quant_gather), the SwiGLU scaling g and u by the row's scale
 *     and its expert's gate / up scales and rounding h per row again
 *     (kk_fp8_swiglu_quant), the down results scaled by h's row scale and
 *     the expert's down scales (kk_fp8_rescale_rows) before the combine.
 * A shape cuBLASLt refuses (no algorithm) falls back to precision bf16's
 * path for that product (panels of bf16 weights; for experts, variant 0
 * for the op and the bf16 arena from then on).
 *
 * The quantized activations of one input are kept while they stay valid
 * (cuda_state.f8, with the bf16 twin's rules: cuda_acts_invalid), so the
 * products of one input (q, k, v; gate and up) round it once.
 */
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>

#include "cuda_internal.h"

#define FP8_PLANS 256

/* one cached matmul shape: D [m, n] (column-major view) = op(A) [m, k] op(B) [k, n] */
typedef struct fp8_plan
{
	int			m,
				n,
				k,
				ldd,
				count;			/* 0: one product with outer-vector scales; > 0: pointer-array batch */
	bool		ok;				/* false: cuBLASLt has no algorithm for it */
	cublasLtMatmulDesc_t desc;
	cublasLtMatrixLayout_t la,
				lb,
				ld;
	cublasLtMatmulAlgo_t algo;
} fp8_plan;

struct cuda_fp8
{
	cublasLtHandle_t lt;
	float	   *one;			/* device 1.0f: the batched products' scalar scales */
	fp8_plan	plan[FP8_PLANS];
	int			n_plans,
				next;			/* replaced next when full */
	/* counts for tests and benchmarks (kl_cuda_fp8_stats) */
	long		dense_calls,
				dense_refused,
				expert_ops,
				quantized_rows;
};

/* ------------------------------------------------------------------ setup */

int
cuda_fp8_create(kl_backend *be)
{
	cuda_state *cs = CS(be);
	const float one = 1.0f;
	cuda_fp8   *f = calloc(1, sizeof(cuda_fp8));

	if (!f)
		return -1;
	if (cublasLtCreate(&f->lt) != CUBLAS_STATUS_SUCCESS)
	{
		free(f);
		return -1;
	}
	if (cudaMalloc((void **) &f->one, sizeof(float)) != cudaSuccess ||
		cudaMemcpy(f->one, &one, sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess)
	{
		cudaFree(f->one);
		cublasLtDestroy(f->lt);
		free(f);
		return -1;
	}
	cs->fp8 = f;
	return 0;
}

static void
plan_release(fp8_plan *p)
{
	if (p->la)
		cublasLtMatrixLayoutDestroy(p->la);
	if (p->lb)
		cublasLtMatrixLayoutDestroy(p->lb);
	if (p->ld)
		cublasLtMatrixLayoutDestroy(p->ld);
	if (p->desc)
		cublasLtMatmulDescDestroy(p->desc);
	memset(p, 0, sizeof(*p));
}

void
cuda_fp8_free(cuda_state *cs)
{
	cuda_fp8   *f = cs->fp8;

	if (!f)
		return;
	for (int i = 0; i < f->n_plans; i++)
		plan_release(&f->plan[i]);
	cudaFree(f->one);
	cublasLtDestroy(f->lt);
	free(f);
	cs->fp8 = NULL;
}

/* ------------------------------------------------------------------ plans */

static bool
layout(cublasLtMatrixLayout_t *l, cudaDataType t, int rows, int cols, int ld, int count)
{
	if (cublasLtMatrixLayoutCreate(l, t, (uint64_t) rows, (uint64_t) cols, ld) != CUBLAS_STATUS_SUCCESS)
		return false;
	if (count > 0)
	{
		int32_t		c = count;
		cublasLtBatchMode_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;

		if (cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &c, sizeof(c)) !=
			CUBLAS_STATUS_SUCCESS ||
			cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof(mode)) !=
			CUBLAS_STATUS_SUCCESS)
			return false;
	}
	return true;
}

/*
 * Build a plan: TN (A = the weights [k, m] column-major, transposed; B = the
 * activations [k, n]), E4M3 inputs, fp32 compute; count 0: fp32 results
 * with outer-vector scales, else a pointer-array batch of count with bf16
 * results and scalar scales.  False: cuBLASLt refused it (p->ok false).
 */
static bool
plan_build(cuda_state *cs, fp8_plan *p)
{
	cublasOperation_t tT = CUBLAS_OP_T,
				tN = CUBLAS_OP_N;
	cudaDataType dt = p->count ? CUDA_R_16BF : CUDA_R_32F;
	cublasLtMatmulPreference_t pref = NULL;
	cublasLtMatmulHeuristicResult_t heur;
	size_t		ws = CUDA_BLAS_WORKSPACE;
	int			found = 0;
	bool		ok;

	ok = cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
		cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &tT, sizeof(tT)) == CUBLAS_STATUS_SUCCESS &&
		cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tN, sizeof(tN)) == CUBLAS_STATUS_SUCCESS;
	if (ok && p->count == 0)
	{
		int32_t		mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;

		ok = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)) ==
			CUBLAS_STATUS_SUCCESS &&
			cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)) ==
			CUBLAS_STATUS_SUCCESS;
	}
	/*
	 * Scale pointers before the heuristic: with none set cuBLASLt finds no
	 * algorithm for outer-vector scales (every dense shape was refused on the
	 * H200, 2026-12-01, while the same descriptor with pointers set ran at
	 * 1212-1325 TFLOP/s, bench/fp8_probe.c fp8-outer-f32).  The dense plans'
	 * pointers are replaced at each product (cuda_matmul_fp8); the batches
	 * keep the unit scales.
	 */
	if (ok)
	{
		const float *one = cs->fp8->one;

		ok = cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &one, sizeof(one)) ==
			CUBLAS_STATUS_SUCCESS &&
			cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &one, sizeof(one)) ==
			CUBLAS_STATUS_SUCCESS;
	}
	ok = ok && layout(&p->la, CUDA_R_8F_E4M3, p->k, p->m, p->k, p->count) &&
		layout(&p->lb, CUDA_R_8F_E4M3, p->k, p->n, p->k, p->count) &&
		layout(&p->ld, dt, p->m, p->n, p->ldd, p->count) &&
		cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS &&
		cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)) ==
		CUBLAS_STATUS_SUCCESS &&
		cublasLtMatmulAlgoGetHeuristic(cs->fp8->lt, p->desc, p->la, p->lb, p->ld, p->ld, pref, 1, &heur, &found) ==
		CUBLAS_STATUS_SUCCESS && found > 0;
	if (pref)
		cublasLtMatmulPreferenceDestroy(pref);
	if (ok)
		p->algo = heur.algo;
	p->ok = ok;
	return ok;
}

/* the plan of a shape, built on first use; NULL: refused (or out of memory) */
static fp8_plan *
plan_get(cuda_state *cs, int m, int n, int k, int ldd, int count)
{
	cuda_fp8   *f = cs->fp8;
	fp8_plan   *p;

	for (int i = 0; i < f->n_plans; i++)
	{
		p = &f->plan[i];
		if (p->m == m && p->n == n && p->k == k && p->ldd == ldd && p->count == count)
			return p->ok ? p : NULL;
	}
	if (f->n_plans < FP8_PLANS)
		p = &f->plan[f->n_plans++];
	else
	{
		p = &f->plan[f->next];
		f->next = (f->next + 1) % FP8_PLANS;
		plan_release(p);
	}
	memset(p, 0, sizeof(*p));
	p->m = m;
	p->n = n;
	p->k = k;
	p->ldd = ldd;
	p->count = count;
	return plan_build(cs, p) ? p : NULL;
}

/* ------------------------------------------------------------------ dense products */

bool
cuda_fp8_dense_takes(const cuda_state *cs, int n, const kl_weight *W)
{
	/* (bf16 false: cuda_matmul_fp32 runs a product in fp32) */
	return cs->fp8 && cs->bf16 && n >= cs->fp8_act_min && W->q.type == KL_Q_FP8 && W->q.group >= W->cols &&
		W->cols % 16 == 0 && W->rows > 0;
}

/*
 * The E4M3 rows of x [n, cols] (ldx) and their scales: the kept ones where
 * they are x's (in tw_scope), else quantized now into CB_X_FP8 (codes
 * [n, cols], then n scales at a 256-byte boundary).  NULL on failure.
 */
static const uint8_t *
x_fp8(kl_backend *be, const float *x, int ldx, int n, int cols, const float **scales)
{
	cuda_state *cs = CS(be);
	size_t		off = ((size_t) n * cols + 255) & ~(size_t) 255;
	uint8_t    *q;

	if (cs->tw_scope && cs->f8.valid && cs->f8.src == x && cs->f8.ld == ldx && cs->f8.cols == cols &&
		n <= cs->f8.rows)
	{
		*scales = cs->f8.scales;
		return cs->f8.q;
	}
	cs->f8.valid = false;
	if (!(q = cuda_buf(be, CB_X_FP8, off + sizeof(float) * (size_t) n)))
		return NULL;
	*scales = (const float *) (q + off);
	kk_fp8_quant_rows(cs->stream, q, cols, (float *) (q + off), x, ldx, n, cols);
	if (!cuda_launched(be, "fp8_quant_rows"))
		return NULL;
	cs->fp8->quantized_rows += n;
	if (cs->tw_scope)
	{
		cs->f8.src = x;
		cs->f8.ld = ldx;
		cs->f8.rows = n;
		cs->f8.cols = cols;
		cs->f8.q = q;
		cs->f8.scales = *scales;
		cs->f8.valid = true;
	}
	return q;
}

bool
cuda_matmul_fp8(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	cuda_state *cs = CS(be);
	int			rows = W->rows,
				cols = W->cols;
	fp8_plan   *p = plan_get(cs, rows, n, cols, ldy, 0);
	const float *xs,
			   *ws = (const float *) ((const char *) W->dev + kk_q_scale_offset(rows, KK_WF_FP8, cols));
	const uint8_t *xq;
	const float one = 1.0f,
				zero = 0.0f;

	if (!p)
	{
		cs->fp8->dense_refused++;
		return false;
	}
	if (!(xq = x_fp8(be, x, ldx, n, cols, &xs)))
		return true;			/* (be->failed set) */
	cs->fp8->dense_calls++;
	if (!blas_ok(be, cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof(ws)),
				 "cuBLASLt scale attribute") ||
		!blas_ok(be, cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs, sizeof(xs)),
				 "cuBLASLt scale attribute"))
		return true;
	/* column-major view: Y^T [rows, n] = W [rows, cols] (stored [cols, rows], transposed) X^T [cols, n] */
	blas_ok(be, cublasLtMatmul(cs->fp8->lt, p->desc, &one, W->dev, p->la, xq, p->lb, &zero, y, p->ld, y, p->ld,
							   &p->algo, cs->blas_ws, CUDA_BLAS_WORKSPACE, cs->stream), "cublasLtMatmul (FP8)");
	return true;
}

/* ------------------------------------------------------------------ routed experts */

bool
cuda_fp8_experts_take(const cuda_state *cs, const kl_moe_layer *w, int E, int D, int F)
{
	if (!cs->fp8 || cs->fp8_experts_refused || D % 16 != 0 || F % 16 != 0 || (size_t) F * 4 > 48 * 1024)
		return false;
	for (int e = 0; e < E; e++)
	{
		const kl_mlp *ex = &w->experts[e];

		if (ex->gate.q.type != KL_Q_FP8 || ex->up.q.type != KL_Q_FP8 || ex->down.q.type != KL_Q_FP8 ||
			ex->gate.q.group < D || ex->up.q.group < D || ex->down.q.group < F)
			return false;
	}
	return true;
}

/* problems i0 .. i0 + count - 1 of the pointer arrays at dev (stride cap): C [S, m] = X [S, kd] W^T */
static cublasStatus_t
batch_fp8(cuda_state *cs, void **dev, int cap, int i0, int count, int m, int S, int kd)
{
	fp8_plan   *p = plan_get(cs, m, S, kd, m, count);
	const float one = 1.0f,
				zero = 0.0f;

	if (!p)
		return CUBLAS_STATUS_NOT_SUPPORTED;
	return cublasLtMatmul(cs->fp8->lt, p->desc, &one, (const void *) (dev + i0), p->la,
						  (const void *) (dev + cap + i0), p->lb, &zero, (void *) (dev + 2 * cap + i0), p->ld,
						  (void *) (dev + 2 * cap + i0), p->ld, &p->algo, cs->blas_ws, CUDA_BLAS_WORKSPACE, cs->stream);
}

/*
 * Variants 3 / 4 with FP8 activations (cuda_internal.h).  The padded layout
 * (cs->moe_cls) as the bf16 products use it; buffers: the FP8 rows
 * (CB_MOE_X as bytes, then the rows' scales and experts), h's codes
 * (CB_MOE_H16 as bytes, then its scales), g, u and the outputs in bf16 as
 * variant 3 places them.
 */
const uint16_t *
cuda_fp8_experts(kl_backend *be, const kl_moe_layer *w, const void *const *tab_dev, int E, int D, int F,
				 const float *x, const int *sel, const int *inv, int n, int k, float *g, float *u, float *ye)
{
	cuda_state *cs = CS(be);
	size_t		Np = (size_t) cs->moe_npad,
				room = 2 * ((size_t) n * k + n),
				xo = (Np * D + 255) & ~(size_t) 255,
				ho = (Np * F + 255) & ~(size_t) 255;
	const int  *base = cs->moe_cls,
			   *order = base + cs->moe_cls_cap,
			   *size = order + cs->moe_cls_cap,
			   *first = size + cs->moe_cls_cap;
	int			ncls = cs->moe_ncls,
				A = first[ncls],
				cap;
	uint8_t    *xq = cuda_buf(be, CB_MOE_X, xo + 2 * sizeof(float) * Np),
			   *hq = cuda_buf(be, CB_MOE_H16, ho + sizeof(float) * Np);
	float	   *xs,
			   *hs;
	int		   *rexp;
	uint16_t   *g16,
			   *u16,
			   *ye16;
	void	  **dev;
	cublasStatus_t bst = CUBLAS_STATUS_SUCCESS;

	if (!xq || !hq || A == 0)
		return NULL;
	xs = (float *) (xq + xo);
	rexp = (int *) (xs + Np);
	hs = (float *) (hq + ho);
	if (!cuda_moe_out16(be, g, u, ye, room, Np, D, F, &g16, &u16, &ye16))
		return NULL;
	if (!cuda_moe_batch_arrays(be, 3 * cs->moe_cls_cap))
		return NULL;
	cap = cs->moe_grp_cap;
	if (!(dev = cuda_buf(be, CB_MOE_PTRS, sizeof(void *) * 4 * (size_t) cap)))
		return NULL;
	for (int j = 0; j < A; j++)
	{
		const kl_mlp *ex = &w->experts[order[j]];
		size_t		b = (size_t) base[order[j]];

		cuda_moe_batch_problem(cs, 2 * j, ex->gate.dev, xq + b * D, g16 + b * F, NULL);
		cuda_moe_batch_problem(cs, 2 * j + 1, ex->up.dev, xq + b * D, u16 + b * F, NULL);
		cuda_moe_batch_problem(cs, 2 * A + j, ex->down.dev, hq + b * F, ye16 + b * D, NULL);
	}
	if (!cuda_ok(be, cudaMemcpyAsync(dev, cs->moe_grp_ptrs, sizeof(void *) * 3 * (size_t) cap, cudaMemcpyHostToDevice,
									 cs->stream), "batched GEMM pointers upload"))
		return NULL;
	if (kk_fp8_quant_gather(cs->stream, xq, xs, rexp, x, D, inv, sel, n, k, D) != 0)
		return NULL;
	if (!cuda_launched(be, "fp8_quant_gather"))
		return NULL;
	cuda_moe_mark(cs, 0);
	for (int c = 0; c < ncls && bst == CUBLAS_STATUS_SUCCESS; c++)
		bst = batch_fp8(cs, dev, cap, 2 * first[c], 2 * (first[c + 1] - first[c]), F, size[c], D);
	cuda_moe_mark(cs, 1);
	if (bst == CUBLAS_STATUS_SUCCESS)
	{
		if (kk_fp8_swiglu_quant(cs->stream, hq, hs, g16, u16, xs, rexp, tab_dev, tab_dev + (E + 1),
								kk_q_scale_offset(F, KK_WF_FP8, D), E, (int) Np, F) != 0 ||
			!cuda_launched(be, "fp8_swiglu_quant"))
			return NULL;
		cuda_moe_mark(cs, 2);
		for (int c = 0; c < ncls && bst == CUBLAS_STATUS_SUCCESS; c++)
			bst = batch_fp8(cs, dev, cap, 2 * A + first[c], first[c + 1] - first[c], D, size[c], F);
		cuda_moe_mark(cs, 3);
	}
	if (bst != CUBLAS_STATUS_SUCCESS)
	{
		/* refused: the caller runs variant 0 for this op, and the bf16 arena from now on */
		cs->fp8_experts_refused = true;
		cs->moe_batched_status = (int) bst;
		cs->moe_ev_mask = 0;
		return NULL;
	}
	kk_fp8_rescale_rows(cs->stream, ye16, hs, rexp, tab_dev + 2 * (E + 1), kk_q_scale_offset(D, KK_WF_FP8, F), E,
						(int) Np, D);
	if (!cuda_launched(be, "fp8_rescale_rows"))
		return NULL;
	cs->fp8->expert_ops++;
	return ye16;
}

/* ------------------------------------------------------------------ hooks */

/*
 * For test_cuda.c and bench_cuda.c (dlsym; the backend does not use it):
 * the counts of precision fp8's work since creation: out[0] dense products
 * on cuBLASLt, out[1] dense products cuBLASLt refused (run through bf16
 * panels), out[2] MoE ops whose routed experts ran FP8 batches, out[3]
 * activation rows quantized for dense products, out[4] 1 where the experts
 * were refused.  Returns -1 for a backend not in precision fp8, else 0.
 */
__attribute__((visibility("default"))) int
kl_cuda_fp8_stats(kl_backend *be, long out[5])
{
	cuda_state *cs = CS(be);

	if (!cs->fp8)
		return -1;
	out[0] = cs->fp8->dense_calls;
	out[1] = cs->fp8->dense_refused;
	out[2] = cs->fp8->expert_ops;
	out[3] = cs->fp8->quantized_rows;
	out[4] = cs->fp8_experts_refused;
	return 0;
}

/*
 * Test hook (test_cuda.c, dlsym): kk_fp8_quant_rows on host rows x [rows,
 * cols] (row stride ldx >= cols), on the current device with a stream of its
 * own; the codes q [rows, cols] and scales [rows] come back.  Returns 0, -1
 * for bad arguments, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_fp8_quant(int rows, int cols, int ldx, const float *x, uint8_t *q, float *scales)
{
	size_t		sz[3] = {sizeof(float) * (size_t) rows * ldx, (size_t) rows * cols, sizeof(float) * (size_t) rows};
	const void *in[3] = {x, NULL, NULL};
	void	   *d[3] = {NULL, NULL, NULL};
	void	   *out[2] = {q, scales};
	int			dev_of[2] = {1, 2};
	cudaStream_t s = NULL;
	int			rc;

	if (rows <= 0 || cols <= 0 || ldx < cols)
		return -1;
	rc = hook_open_fill(&s, d, sz, in, 3, 0xff);
	if (rc == 0)
	{
		kk_fp8_quant_rows(s, d[1], cols, d[2], d[0], ldx, rows, cols);
		rc = (int) cudaGetLastError();
	}
	return hook_close(s, d, sz, 3, dev_of, out, 2, rc);
}

/*
 * Test hook (test_cuda.c, dlsym): one dense W8A8 product through the
 * backend be (precision fp8): W [rows, cols] given as host E4M3 codes wq and
 * per-row scales ws, laid out in kernels.h's device form; x [n, cols] fp32
 * host rows; y [n, rows] comes back.  Returns 0, 1 when cuBLASLt refused
 * the shape (y untouched), -1 for bad arguments (or a backend not in
 * precision fp8), -2 when the backend failed (its error), or a CUDA error.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_fp8_matmul(kl_backend *be, int n, int rows, int cols, const float *x, const uint8_t *wq,
						const float *ws, float *y)
{
	cuda_state *cs = CS(be);
	kl_weight	W;
	size_t		wb = kk_q_bytes(rows, KK_WF_FP8, cols, cols);
	char	   *dw = NULL;
	float	   *dx = NULL,
			   *dy = NULL;
	cudaError_t e;
	int			rc = 0;

	if (!cs->fp8 || n <= 0 || rows <= 0 || cols <= 0 || cols % 16 != 0)
		return -1;
	memset(&W, 0, sizeof(W));
	W.rows = rows;
	W.cols = cols;
	W.q.type = KL_Q_FP8;
	W.q.group = cols;
	if ((e = cudaMalloc((void **) &dw, wb)) != cudaSuccess ||
		(e = cudaMalloc((void **) &dx, sizeof(float) * (size_t) n * cols)) != cudaSuccess ||
		(e = cudaMalloc((void **) &dy, sizeof(float) * (size_t) n * rows)) != cudaSuccess ||
		(e = cudaMemcpy(dw, wq, (size_t) rows * cols, cudaMemcpyHostToDevice)) != cudaSuccess ||
		(e = cudaMemcpy(dw + kk_q_scale_offset(rows, KK_WF_FP8, cols), ws, sizeof(float) * (size_t) rows,
						cudaMemcpyHostToDevice)) != cudaSuccess ||
		(e = cudaMemcpy(dx, x, sizeof(float) * (size_t) n * cols, cudaMemcpyHostToDevice)) != cudaSuccess)
		goto out;
	W.dev = dw;
	cs->f8.valid = false;
	if (!cuda_matmul_fp8(be, dy, rows, dx, cols, n, &W))
		rc = 1;
	else if (be->failed)
		rc = -2;
	else if ((e = cudaStreamSynchronize(cs->stream)) == cudaSuccess)
		e = cudaMemcpy(y, dy, sizeof(float) * (size_t) n * rows, cudaMemcpyDeviceToHost);
out:
	cudaStreamSynchronize(cs->stream);
	cs->f8.valid = false;
	cudaFree(dw);
	cudaFree(dx);
	cudaFree(dy);
	return e != cudaSuccess ? (int) e : rc;
}
