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
 */
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
	return cs->bf16 && W->dtype == KL_DT_BF16 && n >= cs->gemv_mma_min && kk_gemv_mma_ok(W->cols);
}

void
cuda_matmul_raw(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W)
{
	cuda_state *cs = CS(be);
	bool		wbf = W->dtype == KL_DT_BF16;
	int			rows = W->rows,
				cols = W->cols;
	const float one = 1.0f,
				zero = 0.0f;

	if (n <= 0 || rows <= 0 || be->failed)
		return;
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
		uint16_t   *x16 = cuda_buf(be, CB_X_BF16, (size_t) n * cols * sizeof(uint16_t));

		if (!x16)
			return;
		kk_f32_to_bf16(cs->stream, x16, cols, x, ldx, n, cols);
		if (!cuda_launched(be, "f32_to_bf16"))
			return;
		/* column-major view: Y^T [rows, n] = W [rows, cols] X^T [cols, n] */
		blas_ok(be, cublasGemmEx(cs->blas, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, cols, &one,
								 W->dev, CUDA_R_16BF, cols, x16, CUDA_R_16BF, cols, &zero,
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
	cuda_matmul_raw(be, y, ldy, x, ldx, n, W);
}

/* Do these products all take the GEMV path with the same row count? */
static bool
gemv_batchable(cuda_state *cs, const kl_matmul_job *jobs, int count)
{
	for (int i = 0; i < count; i++)
		if (jobs[i].n != jobs[0].n || jobs[i].n > GEMV_MAX_ROWS || jobs[i].n <= 0 ||
			(jobs[i].W->dtype != KL_DT_BF16 && jobs[i].W->dtype != KL_DT_F32) || jobs[i].W->rows <= 0)
			return false;
	(void) cs;
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

/* decode: the products of one stage in a single launch */
void
cuda_matmul_batch_raw(kl_backend *be, const kl_matmul_job *jobs, int count)
{
	cuda_state *cs = CS(be);

	if (be->failed)
		return;
	if (count > 1 && gemv_batchable(cs, jobs, count))
	{
		for (int i0 = 0; i0 < count; i0 += KK_GEMV_JOBS)
		{
			kk_gemv_batch b;

			memset(&b, 0, sizeof(b));
			b.n = jobs[0].n;
			b.count = count - i0 < KK_GEMV_JOBS ? count - i0 : KK_GEMV_JOBS;
			for (int j = 0; j < b.count; j++)
			{
				const kl_matmul_job *jb = &jobs[i0 + j];

				b.job[j].y = jb->y;
				b.job[j].x = jb->x;
				b.job[j].W = jb->W->dev;
				b.job[j].ldy = jb->ldy;
				b.job[j].ldx = jb->ldx;
				b.job[j].rows = jb->W->rows;
				b.job[j].cols = jb->W->cols;
				b.job[j].bf16 = jb->W->dtype == KL_DT_BF16;
			}
			if (gemv_batch_mma(cs, jobs + i0, b.count))
				kk_gemv_multi_mma(cs->stream, &b);
			else
				kk_gemv_multi(cs->stream, &b);
			if (!cuda_launched(be, "gemv_batch"))
				return;
		}
		return;
	}
	for (int i = 0; i < count; i++)
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
		cuda_matmul_batch_raw(be, jobs, count);
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
