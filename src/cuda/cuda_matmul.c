/*
 * cuda_matmul.c — y = x W^T for the linear layers.
 *
 * Few input rows (decode) are bound by reading the weights: our GEMV kernel
 * (kernels/gemv.cu) streams them once with fp32 activations, in either
 * precision mode.  Many rows go to cuBLAS:
 *   bf16 mode      activations rounded to bf16, cublasGemmEx bf16 x bf16 with
 *                  fp32 accumulation and fp32 output
 *                  (fp32 weights: SGEMM with TF32)
 *   fp32 mode      fp32 weights: SGEMM (pedantic math, so no TF32); bf16
 *                  weights: cuBLAS has no bf16 x fp32 product, so blocks of
 *                  weight rows are widened to fp32 (exact) and go through
 *                  SGEMM; up to 64 rows the GEMV kernel is cheaper than that
 * A batch of products of the same few rows (a layer's projections) is one
 * launch of the batched GEMV kernel.  In bf16 mode, from
 * KL_CUDA_GEMV_MMA (default 8) rows up to 8, those GEMVs run on the tensor
 * cores with bf16 activations (kernels/expert_mma.cu), as cuBLAS does above.
 *
 * Quantized weights (FP8, int8, int4 in kernels.h's device form): decode
 * products read them as they are (kernels/gemv_q.cu; in bf16 precision from
 * KL_CUDA_Q_MMA rows, default 2, up to 64 rows kernels/mma_q.cu's tensor-core
 * kernels); more rows convert panels of weight rows (kk_q_dequant: fp32 in
 * fp32 mode, bf16 in bf16 mode) for cuBLAS, as the widened-bf16 path does.
 * Precision fp8 (bf16 mode plus FP8 activations) runs the many-row products
 * of FP8 per-channel weights on cuBLASLt instead (cuda_fp8.c).
 *
 * bf16 results (KL_CUDA_KDA_IN16, cuda_state.r16): a product whose only
 * reader is the KDA op (kl_matmul_job.result16) and that runs as a bf16
 * GEMM in a prefill step writes its result in bf16 only; the op looks it
 * up, and everything else that could read y widens it back first.
 */
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.h"

#define GEMV_MAX_ROWS 8			/* GEMV up to this many rows ... */
#define GEMV_MAX_ROWS_WIDEN 64	/* ... or this many, where the alternative widens weights */
#define PANEL_FLOATS ((size_t) 16 << 20)	/* 64 MB of widened weight rows at a time */

/* Does a product of n (<= 8) rows with W take the tensor-core GEMV?  (bf16
 * precision, bf16 weights, from KL_CUDA_GEMV_MMA rows) */
static bool
gemv_on_tensor_cores(const cuda_state *cs, int n, const kl_weight *W)
{
	return cs->bf16 && !cuda_weight_quantized(W) && W->dtype == KL_DT_BF16 && n >= cs->gemv_mma_min &&
		kk_gemv_mma_ok(W->cols);
}

/* ... and a product of n (<= KK_GEMV_MMA_Q_ROWS) rows with a quantized W?
 * (bf16 precision, from KL_CUDA_Q_MMA rows, a shape mma_q.cu takes) */
static bool
q_on_tensor_cores(const cuda_state *cs, int n, const kl_weight *W)
{
	return cs->bf16 && cuda_weight_quantized(W) && n >= cs->q_mma_min && n <= KK_GEMV_MMA_Q_ROWS &&
		kk_mma_q_ok(cuda_weight_fmt(W), W->q.group, W->cols);
}

/* ------------------------------------------------------------------ bf16 twins */

/* Do decode steps of rows tokens want twins for their dense FP8 products?  (KL_CUDA_Q_TWIN: cuda_state.q_twin_rows) */
static bool
q_twin_rows(const cuda_state *cs, int rows)
{
	return cs->q_fp8_dense && rows >= cs->q_mma_min && rows <= cs->q_twin_rows;
}

uint16_t   *
cuda_twin_out(kl_backend *be, int rows, int cols)
{
	cuda_state *cs = CS(be);

	/* (few rows take the GEMV kernels, which read the fp32 rows; but the dense FP8 products of
	 * 2..8 rows read bf16 rows, KL_CUDA_Q_TWIN) */
	if (!cs->bf16 || !cs->bf16_twin || (rows <= GEMV_MAX_ROWS && !q_twin_rows(cs, rows)) || rows <= 0 ||
		cols <= 0 || be->failed)
		return NULL;
	if (cs->tw.valid && !cs->tw.in_xbuf)
		cs->tw.valid = false;	/* CB_TWIN is about to be written */
	return cuda_buf(be, CB_TWIN, (size_t) rows * cols * sizeof(uint16_t));
}

void
cuda_twin_set(cuda_state *cs, const float *src, int ld, int rows, int cols, const uint16_t *dst, bool in_xbuf)
{
	cs->tw.src = src;
	cs->tw.ld = ld;
	cs->tw.rows = rows;
	cs->tw.cols = cols;
	cs->tw.dst = dst;
	cs->tw.in_xbuf = in_xbuf;
	cs->tw.valid = dst != NULL;
}

void
cuda_to_bf16(kl_backend *be, uint16_t *dst, int ldd, const float *src, int lds, int rows, int cols)
{
	if (CS(be)->bf16_twin)
		kk_f32_to_bf16_v4(CS(be)->stream, dst, ldd, src, lds, rows, cols);
	else
		kk_f32_to_bf16(CS(be)->stream, dst, ldd, src, lds, rows, cols);
}

/* the valid bf16 twin of x [n, cols] (ldx) for a product of forward.c's (tw_scope), else NULL */
static const uint16_t *
twin_of(const cuda_state *cs, const float *x, int ldx, int n, int cols)
{
	return cs->bf16_twin && cs->tw_scope && cs->tw.valid && cs->tw.src == x && cs->tw.ld == ldx &&
		cs->tw.cols == cols && n <= cs->tw.rows ? cs->tw.dst : NULL;
}

const uint16_t *
cuda_x_bf16(kl_backend *be, const float *x, int ldx, int n, int cols, int *ld16)
{
	cuda_state *cs = CS(be);
	uint16_t   *x16;
	const uint16_t *tw = twin_of(cs, x, ldx, n, cols);

	*ld16 = cols;
	if (tw)
		return tw;
	if (cs->tw.valid && cs->tw.in_xbuf)
		cs->tw.valid = false;	/* CB_X_BF16 is about to be written */
	if (!(x16 = cuda_buf(be, CB_X_BF16, (size_t) n * cols * sizeof(uint16_t))))
		return NULL;
	cuda_to_bf16(be, x16, cols, x, ldx, n, cols);
	if (!cuda_launched(be, "f32_to_bf16"))
		return NULL;
	if (cs->bf16_twin && cs->tw_scope)
		cuda_twin_set(cs, x, ldx, n, cols, x16, true);
	return x16;
}

/* Does y [n, rows] (ldy) overlap src [srows, scols] (lds)? */
static bool
rows_overlap(const float *y, int ldy, int n, int rows, const float *src, int lds, int srows, int scols)
{
	const float *ye = y + (size_t) (n - 1) * ldy + rows,
			   *se = src + (size_t) (srows - 1) * lds + scols;

	return y < se && src < ye;
}

/* ------------------------------------------------------------------ bf16 results */

static void twin_written(cuda_state *cs, const float *y, int ldy, int n, int rows);

/* record i widened into its y (kk_bf16_to_f32: exact) and dropped */
static void
r16_widen_at(kl_backend *be, int i)
{
	cuda_state *cs = CS(be);

	if (!be->failed)
	{
		kk_bf16_to_f32(cs->stream, (float *) cs->r16[i].y, cs->r16[i].dst,
					   (size_t) cs->r16[i].rows * cs->r16[i].cols);
		cuda_launched(be, "bf16_to_f32 (kept result)");
	}
	cs->r16[i] = cs->r16[--cs->n_r16];
}

void
cuda_r16_widen(kl_backend *be, const float *y)
{
	cuda_state *cs = CS(be);

	for (int i = 0; i < cs->n_r16; i++)
		if (cs->r16[i].y == y)
		{
			r16_widen_at(be, i);
			return;
		}
}

void
cuda_r16_overlap(kl_backend *be, const float *p, int ld, int rows, int cols)
{
	cuda_state *cs = CS(be);

	if (rows <= 0 || cols <= 0)
		return;
	for (int i = cs->n_r16 - 1; i >= 0; i--)
		if (rows_overlap(p, ld, rows, cols, cs->r16[i].y, cs->r16[i].cols, cs->r16[i].rows, cs->r16[i].cols))
			r16_widen_at(be, i);
}

void
cuda_r16_flush(kl_backend *be)
{
	while (CS(be)->n_r16 > 0)
		r16_widen_at(be, CS(be)->n_r16 - 1);
}

void
cuda_r16_forget(cuda_state *cs)
{
	cs->n_r16 = 0;
}

void
cuda_r16_drop(cuda_state *cs, const float *y)
{
	for (int i = 0; i < cs->n_r16; i++)
		if (cs->r16[i].y == y)
		{
			cs->r16[i] = cs->r16[--cs->n_r16];
			return;
		}
}

const uint16_t *
cuda_r16_find(const cuda_state *cs, const float *y, int rows, int cols)
{
	for (int i = 0; i < cs->n_r16; i++)
		if (cs->r16[i].y == y && cs->r16[i].rows == rows && cs->r16[i].cols == cols)
			return cs->r16[i].dst;
	return NULL;
}

/*
 * A bf16 buffer of n x cols for a new record of y, or NULL (not kept: no
 * free buffer, or the backend failed).  Records over y's rows go first
 * (widened: a partial overlap keeps the rest right), and the bf16 twin and
 * fp8 rows of y's rows, which the new record makes stale.
 */
static uint16_t *
r16_slot(kl_backend *be, const float *y, int n, int cols, int *buf)
{
	cuda_state *cs = CS(be);

	cuda_r16_overlap(be, y, cols, n, cols);
	twin_written(cs, y, cols, n, cols);
	if (cs->n_r16 >= CUDA_R16_MAX || be->failed)
		return NULL;
	for (int id = CB_KDA_R16; id < CB_KDA_R16 + CUDA_R16_MAX; id++)
	{
		bool		used = false;

		for (int i = 0; i < cs->n_r16; i++)
			used |= cs->r16[i].buf == id;
		if (!used)
		{
			*buf = id;
			return cuda_buf(be, id, (size_t) n * cols * sizeof(uint16_t));
		}
	}
	return NULL;
}

static void
r16_record(cuda_state *cs, const float *y, int n, int cols, const uint16_t *dst, int buf)
{
	cs->r16[cs->n_r16].y = y;
	cs->r16[cs->n_r16].rows = n;
	cs->r16[cs->n_r16].cols = cols;
	cs->r16[cs->n_r16].dst = dst;
	cs->r16[cs->n_r16].buf = buf;
	cs->n_r16++;
}

/* does the backend keep this role's results now (precision bf16, a prefill step)? */
static bool
r16_takes(const cuda_state *cs, int role)
{
	return role != 0 && (cs->kda_in16 & role) && cs->bf16 && cs->step_prefill;
}

bool
cuda_r16_product(kl_backend *be, const kl_matmul_job *jb)
{
	cuda_state *cs = CS(be);
	const kl_weight *W = jb->W;
	int			ld16,
				buf = 0;
	const uint16_t *x16;
	uint16_t   *y16;

	/* only where the product is a bf16 GEMM (few rows take the GEMV kernels, which write fp32) */
	if (!r16_takes(cs, jb->result16) || cuda_weight_quantized(W) || W->dtype != KL_DT_BF16 ||
		jb->n <= GEMV_MAX_ROWS || W->rows <= 0 || jb->ldy != W->rows || ((uintptr_t) jb->y) % 16 != 0 ||
		W->rows % 8 != 0 || be->failed)
		return false;
	/* (x read as bf16 before the record: a product from y's own rows widens them first) */
	cuda_r16_overlap(be, jb->x, jb->ldx, jb->n, W->cols);
	if (!(x16 = cuda_x_bf16(be, jb->x, jb->ldx, jb->n, W->cols, &ld16)))
		return true;			/* (failed) */
	if (!(y16 = r16_slot(be, jb->y, jb->n, W->rows, &buf)))
		return be->failed;
	if (cuda_gemm_bf16_out(be, y16, W->rows, x16, ld16, jb->n, W->dev, W->rows, W->cols))
		r16_record(cs, jb->y, jb->n, W->rows, y16, buf);
	return true;
}

bool
cuda_r16_offer(kl_backend *be, const float *y, int n, int cols, int role)
{
	cuda_state *cs = CS(be);
	uint16_t   *y16;
	int			buf = 0;

	if (!r16_takes(cs, role) || n <= GEMV_MAX_ROWS || cols <= 0 || cols % 8 != 0 || ((uintptr_t) y) % 16 != 0 ||
		be->failed || !(y16 = r16_slot(be, y, n, cols, &buf)))
		return false;
	cuda_to_bf16(be, y16, cols, y, cols, n, cols);
	if (!cuda_launched(be, "f32_to_bf16 (offered result)"))
		return false;
	r16_record(cs, y, n, cols, y16, buf);
	return true;
}

/* A product wrote y [n, rows] (ldy): the twin (and precision fp8's kept E4M3
 * rows) go if their fp32 rows were among them. */
static void
twin_written(cuda_state *cs, const float *y, int ldy, int n, int rows)
{
	if (cs->tw.valid && rows_overlap(y, ldy, n, rows, cs->tw.src, cs->tw.ld, cs->tw.rows, cs->tw.cols))
		cs->tw.valid = false;
	if (cs->f8.valid && rows_overlap(y, ldy, n, rows, cs->f8.src, cs->f8.ld, cs->f8.rows, cs->f8.cols))
		cs->f8.valid = false;
}

/*
 * Many rows with a quantized W: panels of weight rows converted by
 * kk_q_dequant, then cuBLAS on them: fp32 mode an fp32 panel (quant.h's
 * exact values) and SGEMM with pedantic math; bf16 mode a bf16 panel and
 * GemmEx bf16 x bf16 with the activations rounded to bf16, as for bf16
 * weights.  The panel is the widened-bf16 path's scratch (CB_PANEL).
 */
static void
matmul_q_panels(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	cuda_state *cs = CS(be);
	int			fmt = cuda_weight_fmt(W),
				rows = W->rows,
				cols = W->cols;
	size_t		esz = cs->bf16 ? sizeof(uint16_t) : sizeof(float);
	void	   *panel = cuda_buf(be, CB_PANEL, PANEL_FLOATS * sizeof(float));
	const uint16_t *x16 = NULL;
	int			per = (int) (PANEL_FLOATS * sizeof(float) / esz / (size_t) cols),
				ld16 = cols;
	const float one = 1.0f,
				zero = 0.0f;

	if (!panel)
		return;
	if (per < 1)
		per = 1;
	if (cs->bf16)
	{
		if (!(x16 = cuda_x_bf16(be, x, ldx, n, cols, &ld16)))
			return;
	}
	for (int r0 = 0; r0 < rows && !be->failed; r0 += per)
	{
		int			nr = rows - r0 < per ? rows - r0 : per;

		kk_q_dequant(cs->stream, panel, cs->bf16, W->dev, fmt, W->q.group, rows, cols, r0, nr);
		if (!cuda_launched(be, "q_dequant"))
			return;
		if (cs->bf16)
			blas_ok(be, cublasGemmEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, n, cols, &one,
									 panel, CUDA_R_16BF, cols, x16, CUDA_R_16BF, ld16, &zero,
									 y + r0, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
					"GemmEx (quantized weights as bf16)");
		else
			blas_ok(be, cublasSgemm(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, n, cols, &one, panel, cols,
									x, ldx, &zero, y + r0, ldy), "Sgemm (quantized weights as fp32)");
	}
}

/* job g of a GEMV batch: the product jb */
static void
gemv_job_of(kk_gemv_job *g, const kl_matmul_job *jb)
{
	g->y = jb->y;
	g->x = jb->x;
	g->W = jb->W->dev;
	g->ldy = jb->ldy;
	g->ldx = jb->ldx;
	g->rows = jb->W->rows;
	g->cols = jb->W->cols;
	g->bf16 = !cuda_weight_quantized(jb->W) && jb->W->dtype == KL_DT_BF16;
	g->fmt = cuda_weight_fmt(jb->W);
	g->group = cuda_weight_quantized(jb->W) ? jb->W->q.group : jb->W->cols;
}

/*
 * kk_gemv_multi_mma_q with the room its dense FP8 kernel asks for
 * (KL_CUDA_Q_DENSE: the batch's activations converted once, CB_Q_X16).
 * KL_CUDA_Q_TWIN: a job whose x has a valid bf16 twin (cuda_x_bf16's test:
 * the same rows, stride and columns, at least n rows, in tw_scope) reads
 * it instead (its x16 preset: no room, no conversion for it).  The twin
 * stays valid until a later op, which runs after the product in stream
 * order; the choice depends only on the step's ops, shapes and pointers,
 * so a captured graph's replays make the same one.
 * False when that room could not be had (the backend has failed).
 */
static bool
q_mma_launch(kl_backend *be, kk_gemv_batch *b)
{
	cuda_state *cs = CS(be);
	size_t		room;

	for (int j = 0; j < b->count; j++)
	{
		kk_gemv_job *jb = &b->job[j];

		if (cs->q_twin_rows > 0)
			jb->x16 = twin_of(cs, jb->x, jb->ldx, b->n, jb->cols);
	}
	room = kk_gemv_mma_q_room(b);

	if (room && !(b->xq = cuda_buf(be, CB_Q_X16, room)))
		return false;
	b->xq_bytes = room;
	kk_gemv_multi_mma_q(CS(be)->stream, b);
	return true;
}

/*
 * y = x W^T for a quantized W (kernels.h's device form): few rows stream the
 * quantized bytes once (gemv_q.cu in fp32 arithmetic; in bf16 precision from
 * KL_CUDA_Q_MMA rows the tensor-core kernels of mma_q.cu, up to 64 rows);
 * fp32 precision up to 64 rows keeps the exact GEMV (as for bf16 weights:
 * cheaper than converting the weights); more rows go through panels.
 */
static void
matmul_quantized(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	cuda_state *cs = CS(be);
	int			fmt = cuda_weight_fmt(W);

	if (q_on_tensor_cores(cs, n, W))
	{
		kl_matmul_job one = {y, ldy, x, ldx, n, W, 0};
		kk_gemv_batch b;

		memset(&b, 0, sizeof(b));
		b.n = n;
		b.count = 1;
		gemv_job_of(&b.job[0], &one);
		if (q_mma_launch(be, &b))
			cuda_launched(be, "gemv_mma_q");
		return;
	}
	if (n <= (cs->bf16 ? GEMV_MAX_ROWS : GEMV_MAX_ROWS_WIDEN))
	{
		kk_gemv_q(cs->stream, y, ldy, x, ldx, n, W->dev, fmt, W->q.group, W->rows, W->cols);
		cuda_launched(be, "gemv_q");
		return;
	}
	/* precision fp8: FP8 activations on cuBLASLt (cuda_fp8.c), unless it refuses the shape */
	if (cuda_fp8_dense_takes(cs, n, W) && cuda_matmul_fp8(be, y, ldy, x, ldx, n, W))
		return;
	matmul_q_panels(be, y, ldy, x, ldx, n, W);
}

static void matmul_raw(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W);

void
cuda_matmul_raw(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	/* kept bf16 results of x's rows (read) or y's (written over) go back into fp32 first */
	if (CS(be)->n_r16 > 0 && n > 0)
	{
		cuda_r16_overlap(be, x, ldx, n, W->cols);
		cuda_r16_overlap(be, y, ldy, n, W->rows);
	}
	matmul_raw(be, y, ldy, x, ldx, n, W);
	if (n > 0 && W->rows > 0)
		twin_written(CS(be), y, ldy, n, W->rows);
}

static void
matmul_raw(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	cuda_state *cs = CS(be);
	bool		wbf = W->dtype == KL_DT_BF16;
	int			rows = W->rows,
				cols = W->cols;
	const float one = 1.0f,
				zero = 0.0f;

	if (n <= 0 || rows <= 0 || be->failed)
		return;
	if (cuda_weight_quantized(W))
	{
		matmul_quantized(be, y, ldy, x, ldx, n, W);
		return;
	}
	if (n <= (wbf && !cs->bf16 ? GEMV_MAX_ROWS_WIDEN : GEMV_MAX_ROWS))
	{
		if (gemv_on_tensor_cores(cs, n, W))
		{
			kk_gemv_mma(cs->stream, y, ldy, x, ldx, n, W->dev, rows, cols);
			cuda_launched(be, "gemv_mma");
			return;
		}
		kk_gemv(cs->stream, y, ldy, x, ldx, n, W->dev, wbf, rows, cols);
		cuda_launched(be, "gemv");
		return;
	}
	if (wbf && cs->bf16)
	{
		int			ld16;
		const uint16_t *x16 = cuda_x_bf16(be, x, ldx, n, cols, &ld16);

		if (!x16)
			return;
		/* column-major view: Y^T [rows, n] = W [rows, cols] X^T [cols, n] */
		blas_ok(be, cublasGemmEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one,
								 W->dev, CUDA_R_16BF, cols, x16, CUDA_R_16BF, ld16, &zero,
								 y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "GemmEx (bf16)");
	}
	else if (!wbf)
		blas_ok(be, cublasSgemm(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one, W->dev, cols, x, ldx,
								&zero, y, ldy), "Sgemm");
	else
	{
		float	   *panel = cuda_buf(be, CB_PANEL, PANEL_FLOATS * sizeof(float));
		int			per = (int) (PANEL_FLOATS / (size_t) cols);

		if (!panel)
			return;
		if (per < 1)
			per = 1;
		for (int r0 = 0; r0 < rows && !be->failed; r0 += per)
		{
			int			nr = rows - r0 < per ? rows - r0 : per;

			kk_bf16_to_f32(cs->stream, panel, (const uint16_t *) W->dev + (size_t) r0 * cols, (size_t) nr * cols);
			if (cuda_launched(be, "bf16_to_f32"))
				blas_ok(be, cublasSgemm(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, n, cols, &one, panel, cols,
										x, ldx, &zero, y + r0, ldy), "Sgemm (widened bf16)");
		}
	}
}

/*
 * A product in fp32 whatever the precision mode (the MoE router: the
 * reference routes in fp32, and bf16 activations would flip near-tied expert
 * choices): the GEMV kernel for few rows, else SGEMM with pedantic math on
 * fp32 (or widened bf16) weights.
 */
void
cuda_matmul_fp32(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	cuda_state *cs = CS(be);

	if (cs->bf16 && cuda_weight_quantized(W))
	{
		/* (the router is never quantized; should a quantized W come, the fp32 mode's path) */
		cs->bf16 = false;
		cublasSetMathMode(cs->blas, CUBLAS_PEDANTIC_MATH);
		cuda_matmul_raw(be, y, ldy, x, ldx, n, W);
		cublasSetMathMode(cs->blas, CUBLAS_TF32_TENSOR_OP_MATH);
		cs->bf16 = true;
		return;
	}
	if (!cs->bf16 || n <= GEMV_MAX_ROWS_WIDEN)
	{
		if (cs->bf16 && W->dtype == KL_DT_F32 && n > GEMV_MAX_ROWS)
		{
			/* fp32 weights in bf16 mode would take TF32: temporarily not */
			cublasSetMathMode(cs->blas, CUBLAS_PEDANTIC_MATH);
			cuda_matmul_raw(be, y, ldy, x, ldx, n, W);
			cublasSetMathMode(cs->blas, CUBLAS_TF32_TENSOR_OP_MATH);
			return;
		}
		if (cs->bf16 && W->dtype == KL_DT_BF16)
		{
			/* (not cuda_matmul_raw: from KL_CUDA_GEMV_MMA rows it would round x to bf16) */
			kk_gemv(cs->stream, y, ldy, x, ldx, n, W->dev, 1, W->rows, W->cols);
			cuda_launched(be, "gemv");
			return;
		}
		cuda_matmul_raw(be, y, ldy, x, ldx, n, W);
		return;
	}
	/* bf16 mode, many rows: run the fp32 mode's path for this product */
	cs->bf16 = false;
	cublasSetMathMode(cs->blas, CUBLAS_PEDANTIC_MATH);
	cuda_matmul_raw(be, y, ldy, x, ldx, n, W);
	cublasSetMathMode(cs->blas, CUBLAS_TF32_TENSOR_OP_MATH);
	cs->bf16 = true;
}

bool
cuda_gemm_bf16_out(kl_backend *be, uint16_t *y, int ldy, const uint16_t *x, int ldx, int n, const void *W,
				   int rows, int cols)
{
	cuda_state *cs = CS(be);
	const float one = 1.0f,
				zero = 0.0f;

	return blas_ok(be, cublasGemmEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one,
									W, CUDA_R_16BF, cols, x, CUDA_R_16BF, ldx, &zero,
									y, CUDA_R_16BF, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "GemmEx (bf16 out)");
}

void
cuda_matmul(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	if (cuda_step_skip(be, OP_MATMUL, (uintptr_t) y, (uintptr_t) x, (uintptr_t) W, (uintptr_t) n))
		return;
	if (W == CS(be)->pf_wait_for)
		cuda_prefetch_join(be);
	/* forward.c's products: their inputs are activations no op writes behind the step's back */
	CS(be)->tw_scope = true;
	cuda_matmul_raw(be, y, ldy, x, ldx, n, W);
	CS(be)->tw_scope = false;
}

/* Do these products all take the GEMV path with the same row count?  (any
 * quantized: *any_q set) */
static bool
gemv_batchable(cuda_state *cs, const kl_matmul_job *jobs, int count, bool *any_q)
{
	*any_q = false;
	for (int i = 0; i < count; i++)
	{
		bool		q = cuda_weight_quantized(jobs[i].W);

		if (jobs[i].n != jobs[0].n || jobs[i].n > GEMV_MAX_ROWS || jobs[i].n <= 0 ||
			(!q && jobs[i].W->dtype != KL_DT_BF16 && jobs[i].W->dtype != KL_DT_F32) || jobs[i].W->rows <= 0)
			return false;
		*any_q |= q;
	}
	(void) cs;
	return true;
}

/* Do these quantized products of the same n rows all take the tensor-core kernel? */
static bool
q_batch_mma(cuda_state *cs, const kl_matmul_job *jobs, int count)
{
	for (int i = 0; i < count; i++)
		if (jobs[i].n != jobs[0].n || !q_on_tensor_cores(cs, jobs[i].n, jobs[i].W) || jobs[i].W->rows <= 0)
			return false;
	return true;
}

/* ... and on the tensor cores (bf16 precision, bf16 weights, enough rows)? */
static bool
gemv_batch_mma(cuda_state *cs, const kl_matmul_job *jobs, int count)
{
	for (int i = 0; i < count; i++)
		if (!gemv_on_tensor_cores(cs, jobs[i].n, jobs[i].W))
			return false;
	return true;
}

/*
 * bf16 precision: a batch where some products (quantized weights) take the
 * tensor-core kernel and others (the small bf16 matrices beside them, e.g.
 * KDA's f_a, g_a, b_proj next to q, k, v) do not runs as two batches, so
 * that the quantized ones keep kk_gemv_multi_mma_q.  False (nothing done)
 * where the batch does not split so.
 */
static bool
split_q_mma(kl_backend *be, const kl_matmul_job *jobs, int count)
{
	cuda_state *cs = CS(be);
	kl_matmul_job *part;
	int			na = 0,
				nb = 0;

	if (!cs->bf16)
		return false;
	for (int i = 0; i < count; i++)
		na += q_batch_mma(cs, jobs + i, 1) && jobs[i].n == jobs[0].n;
	if (na == 0 || na == count || !(part = malloc(sizeof(kl_matmul_job) * (size_t) count)))
		return false;
	/* the tensor-core ones first, then the others, each in their order */
	for (int pass = 0; pass < 2; pass++)
		for (int i = 0; i < count; i++)
			if ((q_batch_mma(cs, jobs + i, 1) && jobs[i].n == jobs[0].n) == (pass == 0))
				part[nb++] = jobs[i];
	cuda_matmul_batch_raw(be, part, na);
	cuda_matmul_batch_raw(be, part + na, count - na);
	free(part);
	return true;
}

/* decode: the products of one stage in a single launch */
void
cuda_matmul_batch_raw(kl_backend *be, const kl_matmul_job *jobs, int count)
{
	cuda_state *cs = CS(be);
	bool		any_q = false,
				q_mma = false;

	if (be->failed)
		return;
	/* quantized, every job on the tensor cores: up to KK_GEMV_MMA_Q_ROWS rows */
	if (count > 1 && (q_mma = q_batch_mma(cs, jobs, count)))
		any_q = true;
	else if (count > 1 && split_q_mma(be, jobs, count))
		return;
	if (count > 1 && (q_mma || gemv_batchable(cs, jobs, count, &any_q)))
	{
		for (int i = 0; i < count && cs->n_r16 > 0; i++)
		{
			cuda_r16_overlap(be, jobs[i].x, jobs[i].ldx, jobs[i].n, jobs[i].W->cols);
			cuda_r16_overlap(be, jobs[i].y, jobs[i].ldy, jobs[i].n, jobs[i].W->rows);
		}
		for (int i0 = 0; i0 < count; i0 += KK_GEMV_JOBS)
		{
			kk_gemv_batch b;

			memset(&b, 0, sizeof(b));
			b.n = jobs[0].n;
			b.count = count - i0 < KK_GEMV_JOBS ? count - i0 : KK_GEMV_JOBS;
			for (int j = 0; j < b.count; j++)
				gemv_job_of(&b.job[j], &jobs[i0 + j]);
			if (q_mma)
			{
				if (!q_mma_launch(be, &b))
					return;
			}
			else if (any_q)
				kk_gemv_multi_q(cs->stream, &b);
			else if (gemv_batch_mma(cs, jobs + i0, b.count))
				kk_gemv_multi_mma(cs->stream, &b);
			else
				kk_gemv_multi(cs->stream, &b);
			if (!cuda_launched(be, "gemv_batch"))
				return;
		}
		for (int i = 0; i < count; i++)
			twin_written(cs, jobs[i].y, jobs[i].ldy, jobs[i].n, jobs[i].W->rows);
		return;
	}
	for (int i = 0; i < count; i++)
		if (!(jobs[i].result16 && cuda_r16_product(be, &jobs[i])))
			cuda_matmul_raw(be, jobs[i].y, jobs[i].ldy, jobs[i].x, jobs[i].ldx, jobs[i].n, jobs[i].W);
}

void
cuda_matmul_batch(kl_backend *be, const kl_matmul_job *jobs, int count)
{
	bool		skip = false;

	for (int i = 0; i < count; i++)
		skip |= cuda_step_skip(be, OP_MATMUL, (uintptr_t) jobs[i].y, (uintptr_t) jobs[i].x, (uintptr_t) jobs[i].W,
							   (uintptr_t) jobs[i].n);
	if (!skip)
	{
		CS(be)->tw_scope = true;
		cuda_matmul_batch_raw(be, jobs, count);
		CS(be)->tw_scope = false;
	}
}

/*
 * Test hook (test_cuda.c calls it through dlsym; not used by the backend):
 * one batch of count (<= KK_GEMV_JOBS) plain products of n (<= 8) rows on
 * the tensor cores, through gemv_mma_kernel (out_old) and gemv_slab_kernel
 * (out_new) on the same inputs.  Job j: W [rows[j], cols[j]] bf16, random
 * on the device (seed; standard deviation 0.02); x [n, cols[j]] fp32
 * random (seed + 1; not bf16 values, so the kernels' rounding is
 * exercised) with row stride cols[j] + xpad (xpad % 4 != 0: the unaligned
 * path); y [8, rows[j]] with ldy rows[j], set to NaN before each launch so
 * that rows no kernel wrote show.  Outputs: the jobs' y one after another
 * (sum of 8 rows[j] floats).  Returns 0, -1 for bad arguments, or a CUDA
 * error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_gemv_slab(int n, int count, const int *rows, const int *cols, int xpad, unsigned long long seed,
					   float *out_old, float *out_new)
{
	size_t		wsz = 0,
				xsz = 0,
				ysz = 0;
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;
	uint16_t   *W = NULL;
	float	   *x = NULL,
			   *y = NULL;
	kk_gemv_batch b;

	if (n <= 0 || n > 8 || count <= 0 || count > KK_GEMV_JOBS || xpad < 0)
		return -1;
	for (int j = 0; j < count; j++)
	{
		if (rows[j] <= 0 || !kk_gemv_mma_ok(cols[j]))
			return -1;
		wsz += (size_t) rows[j] * cols[j];
		xsz += (size_t) n * (cols[j] + xpad);
		ysz += (size_t) 8 * rows[j];
	}
	memset(&b, 0, sizeof(b));
	b.n = n;
	b.count = count;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc((void **) &W, sizeof(uint16_t) * wsz)) != cudaSuccess ||
		(e = cudaMalloc((void **) &x, sizeof(float) * (xsz + ysz))) != cudaSuccess)
		goto out;
	y = x + xsz;
	kk_fill_random(s, W, 1, wsz, seed, 0.02f);
	kk_fill_random(s, x, 0, xsz, seed + 1, 1.0f);
	{
		size_t		wo = 0,
					xo = 0,
					yo = 0;

		for (int j = 0; j < count; j++)
		{
			b.job[j].W = W + wo;
			b.job[j].x = x + xo;
			b.job[j].y = y + yo;
			b.job[j].ldx = cols[j] + xpad;
			b.job[j].ldy = rows[j];
			b.job[j].rows = rows[j];
			b.job[j].cols = cols[j];
			b.job[j].bf16 = 1;
			wo += (size_t) rows[j] * cols[j];
			xo += (size_t) n * (cols[j] + xpad);
			yo += (size_t) 8 * rows[j];
		}
	}
	for (int slab = 0; slab < 2; slab++)
	{
		kk_gemv_batch bs = b;	/* the launcher fills in first_block and vec */

		if ((e = cudaMemsetAsync(y, 0xff, sizeof(float) * ysz, s)) != cudaSuccess)
			goto out;
		kk_gemv_multi_mma_as(s, &bs, slab);
		if ((e = cudaGetLastError()) != cudaSuccess ||
			(e = cudaMemcpyAsync(slab ? out_new : out_old, y, sizeof(float) * ysz, cudaMemcpyDeviceToHost, s)) !=
			cudaSuccess ||
			(e = cudaStreamSynchronize(s)) != cudaSuccess)
			goto out;
	}
out:
	if (s)
		cudaStreamSynchronize(s);
	cudaFree(W);
	cudaFree(x);
	if (s)
		cudaStreamDestroy(s);
	return (int) e;
}

/*
 * Test hooks for kernels/quant.cu (test_cuda.c calls them through dlsym; not
 * used by the backend), on the current device with a stream of their own.
 * kl_cuda_test_q_dequant: the quantized matrix given as host data rows
 * (rows x kk_q_row_bytes(fmt, cols) bytes) and scales [rows, ceil(cols /
 * group)] is laid out on the device as the backend loads it; rows [r0, r0 +
 * nr) come back through kk_q_dequant as fp32 (out_bf16 0) or bf16 (1) into
 * out (nr x cols elements).
 * kl_cuda_test_q_fill: kk_q_fill_random(fmt, group, rows, cols, seed, scale)
 * into a device object; its kk_q_bytes(rows, fmt, cols, group) bytes come
 * back into out.
 * Both return 0, -1 for bad arguments, or a CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_q_dequant(int fmt, int group, int rows, int cols, const void *data, const float *scales, int r0, int nr,
					   int out_bf16, void *out)
{
	size_t		bytes,
				rb;
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;
	char	   *W = NULL;
	void	   *dst = NULL;
	size_t		osz;

	if (fmt < KK_WF_FP8 || fmt > KK_WF_INT4 || group <= 0 || rows <= 0 || cols <= 0 || r0 < 0 || nr <= 0 ||
		r0 + nr > rows)
		return -1;
	rb = kk_q_row_bytes(fmt, cols);
	bytes = kk_q_bytes(rows, fmt, cols, group);
	osz = (size_t) nr * cols * (out_bf16 ? 2 : 4);
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc((void **) &W, bytes)) != cudaSuccess ||
		(e = cudaMalloc(&dst, osz)) != cudaSuccess ||
		(e = cudaMemsetAsync(dst, 0xff, osz, s)) != cudaSuccess ||
		(e = cudaMemcpyAsync(W, data, (size_t) rows * rb, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
		(e = cudaMemcpyAsync(W + kk_q_scale_offset(rows, fmt, cols), scales,
							 sizeof(float) * (size_t) rows * kk_q_groups(cols, group), cudaMemcpyHostToDevice, s)) !=
		cudaSuccess)
		goto out;
	kk_q_dequant(s, dst, out_bf16, W, fmt, group, rows, cols, r0, nr);
	if ((e = cudaGetLastError()) != cudaSuccess ||
		(e = cudaMemcpyAsync(out, dst, osz, cudaMemcpyDeviceToHost, s)) != cudaSuccess)
		goto out;
	e = cudaStreamSynchronize(s);
out:
	if (s)
		cudaStreamSynchronize(s);
	cudaFree(W);
	cudaFree(dst);
	if (s)
		cudaStreamDestroy(s);
	return (int) e;
}

__attribute__((visibility("default"))) int
kl_cuda_test_q_fill(int fmt, int group, int rows, int cols, unsigned long long seed, float scale, void *out)
{
	size_t		bytes;
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;
	void	   *W = NULL;

	if (fmt < KK_WF_FP8 || fmt > KK_WF_INT4 || group <= 0 || rows <= 0 || cols <= 0)
		return -1;
	bytes = kk_q_bytes(rows, fmt, cols, group);
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc(&W, bytes)) != cudaSuccess ||
		(e = cudaMemsetAsync(W, 0, bytes, s)) != cudaSuccess)
		goto out;
	kk_q_fill_random(s, W, fmt, group, rows, cols, seed, scale);
	if ((e = cudaGetLastError()) != cudaSuccess ||
		(e = cudaMemcpyAsync(out, W, bytes, cudaMemcpyDeviceToHost, s)) != cudaSuccess)
		goto out;
	e = cudaStreamSynchronize(s);
out:
	if (s)
		cudaStreamSynchronize(s);
	cudaFree(W);
	if (s)
		cudaStreamDestroy(s);
	return (int) e;
}

/*
 * Test hook (test_cuda.c calls it through dlsym; not used by the backend):
 * a bf16 twin producer of KL_CUDA_BF16_TWIN against the older kernels on
 * the same host inputs, on the current device with a stream of its own.
 * which 0: kk_f32_to_bf16_v4 vs kk_f32_to_bf16 of x [rows, cols] (row
 * stride ld); 1: kk_swiglu_twin vs kk_swiglu + kk_f32_to_bf16 with g = x, u
 * = w (both [rows, cols], stride ld); 2: kk_row_norm_twin mode 0 (in the
 * form that reads the norm weight before its PDL wait, KL_CUDA_NORM_EARLY's)
 * vs kk_rmsnorm + kk_f32_to_bf16 of x (stride ld) with weights w [cols].
 * Outputs [rows, cols], contiguous: h16_old / h16_new the bf16 rows, f_old
 * / f_new the fp32 ones (which 1, 2; may be NULL for 0).  Returns 0, -1 for
 * bad arguments, -2 when the new launcher does not cover the shape, or a
 * CUDA error code.
 */
__attribute__((visibility("default"))) int
kl_cuda_test_bf16_twin(int which, int rows, int cols, int ld, const float *x, const float *w, uint16_t *h16_old,
					   uint16_t *h16_new, float *f_old, float *f_new)
{
	size_t		nx = (size_t) rows * ld,
				ny = (size_t) rows * cols;
	cudaStream_t s = NULL;
	cudaError_t e = cudaSuccess;
	float	   *dx = NULL,
			   *dw = NULL,
			   *dy = NULL;
	uint16_t   *d16 = NULL;
	int			rc = 0;

	if (which < 0 || which > 2 || rows <= 0 || cols <= 0 || ld < cols || (which > 0 && (!f_old || !f_new)))
		return -1;
	if ((e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)) != cudaSuccess ||
		(e = cudaMalloc((void **) &dx, sizeof(float) * nx)) != cudaSuccess ||
		(e = cudaMalloc((void **) &dw, sizeof(float) * (which == 1 ? nx : (size_t) cols))) != cudaSuccess ||
		(e = cudaMalloc((void **) &dy, sizeof(float) * ny)) != cudaSuccess ||
		(e = cudaMalloc((void **) &d16, sizeof(uint16_t) * ny)) != cudaSuccess ||
		(e = cudaMemcpyAsync(dx, x, sizeof(float) * nx, cudaMemcpyHostToDevice, s)) != cudaSuccess ||
		(which > 0 && (e = cudaMemcpyAsync(dw, w, sizeof(float) * (which == 1 ? nx : (size_t) cols),
										   cudaMemcpyHostToDevice, s)) != cudaSuccess))
		goto out;
	for (int v = 0; v < 2 && rc == 0; v++)
	{
		/* NaN where nothing was written */
		if ((e = cudaMemsetAsync(dy, 0xff, sizeof(float) * ny, s)) != cudaSuccess ||
			(e = cudaMemsetAsync(d16, 0xff, sizeof(uint16_t) * ny, s)) != cudaSuccess)
			goto out;
		if (which == 0)
		{
			if (v == 0)
				kk_f32_to_bf16(s, d16, cols, dx, ld, rows, cols);
			else
				kk_f32_to_bf16_v4(s, d16, cols, dx, ld, rows, cols);
		}
		else if (which == 1)
		{
			if (v == 0)
			{
				kk_swiglu(s, dy, dx, dw, rows, cols, ld);
				kk_f32_to_bf16(s, d16, cols, dy, cols, rows, cols);
			}
			else if (kk_swiglu_twin(s, dy, d16, dx, dw, rows, cols, ld) != 0)
				rc = -2;
		}
		else
		{
			if (v == 0)
			{
				kk_rmsnorm(s, dy, cols, dx, ld, dw, rows, cols, 1e-5f);
				kk_f32_to_bf16(s, d16, cols, dy, cols, rows, cols);
			}
			else if (kk_row_norm_twin(s, 0, dy, cols, d16, dx, ld, NULL, dw, rows, cols, 1e-5f, 0, NULL, NULL, NULL,
									  NULL, 1) != 0)
				rc = -2;
		}
		if (rc != 0)
			break;
		if ((e = cudaGetLastError()) != cudaSuccess ||
			(e = cudaMemcpyAsync(v ? h16_new : h16_old, d16, sizeof(uint16_t) * ny, cudaMemcpyDeviceToHost, s)) !=
			cudaSuccess ||
			(which > 0 && (e = cudaMemcpyAsync(v ? f_new : f_old, dy, sizeof(float) * ny, cudaMemcpyDeviceToHost, s)) !=
			 cudaSuccess) ||
			(e = cudaStreamSynchronize(s)) != cudaSuccess)
			goto out;
	}
out:
	if (s)
		cudaStreamSynchronize(s);
	cudaFree(dx);
	cudaFree(dw);
	cudaFree(dy);
	cudaFree(d16);
	if (s)
		cudaStreamDestroy(s);
	return e != cudaSuccess ? (int) e : rc;
}
