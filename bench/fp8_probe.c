/*
 * fp8_probe.c — what cuBLASLt's FP8 matmul gives on the 48B model's prefill
 * shapes, beside cuBLAS's bf16 products of the same shapes (issue 11: FP8
 * prefill needs FP8 tensor-core GEMMs, with activations quantized per token
 * to E4M3 and the weights' per-channel scales).  Built on the development
 * machine, run on the GPU machine (bench/notes-cuda.md has the results):
 *
 *   gcc -O2 -I/usr/local/cuda/include -o fp8_probe bench/fp8_probe.c \
 *       -L/usr/local/cuda/lib64 -lcublasLt -lcublas -lcudart
 *   ./fp8_probe
 *
 * Each row: a shape (D [m, n] = W [m, k] . X [n, k]^T in row-major terms:
 * m weight rows, n tokens; batched: count problems of that shape), a mode,
 * cuBLASLt's status (a refusal is a result too: which scale modes and batch
 * modes this cuBLASLt takes on this GPU), TFLOP/s over 20 timed calls after
 * 3 warm-ups, and the bytes of A, B and D moved per second (decode shapes,
 * 8 to 64 tokens, are memory-bound).  Modes:
 *   bf16            cublasGemmEx / cublasGemmBatchedEx, bf16 in and out (today's path)
 *   fp8-scalar      E4M3 x E4M3 -> bf16, one fp32 scale per matrix
 *   fp8-outer       the same with OUTER_VEC_32F scales: a vector over W's rows
 *                   (per-channel weight scales) and over X's rows (per-token)
 *   fp8-ptr         pointer-array batch (the batched expert products), scalar scales
 *   fp8-ptr-outer   pointer-array batch with outer-vector scales
 *   fp8-strided-outer  strided batch with outer-vector scales
 *   *-f32           the same with fp32 results (D and C in fp32)
 * Data are random bytes of small E4M3 values; only speed and status count.
 */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REPS 20

static cublasLtHandle_t lt;
static cublasHandle_t blas;
static void *work;
static const size_t work_bytes = 64u << 20;

static void *
dev_fill(size_t bytes, uint8_t lo, uint8_t span)
{
	uint8_t    *h = malloc(bytes);
	void	   *d = NULL;

	for (size_t i = 0; i < bytes; i++)
		h[i] = (uint8_t) (lo + (uint8_t) ((i * 2654435761u) >> 13) % span);
	if (cudaMalloc(&d, bytes) != cudaSuccess)
	{
		fprintf(stderr, "cudaMalloc %zu failed\n", bytes);
		exit(1);
	}
	cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice);
	free(h);
	return d;
}

/* one matmul descriptor for D = W X^T (column-major: D^T [m, n] = W^T... see header), FP8 or bf16 */
typedef struct
{
	int			m,
				n,
				k,
				count;			/* 1: one product; > 1: batched */
	int			fp8;
	int			outer;			/* outer-vector scales */
	int			ptr;			/* pointer-array batch (else strided) */
	int			f32;			/* fp32 results (else bf16) */
} probe;

static int
set_scales(cublasLtMatmulDesc_t d, const probe *p, const float *sa, const float *sb)
{
	if (p->outer)
	{
		int32_t		mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;

		if (cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)) ||
			cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)))
			return -1;
	}
	if (cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof(sa)) ||
		cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof(sb)))
		return -1;
	return 0;
}

static int
layout(cublasLtMatrixLayout_t *l, cudaDataType t, int rows, int cols, int ld, const probe *p)
{
	if (cublasLtMatrixLayoutCreate(l, t, rows, cols, ld))
		return -1;
	if (p->count > 1)
	{
		int32_t		c = p->count;
		int64_t		stride = (int64_t) rows * cols;
		uint32_t	mode = p->ptr ? CUBLASLT_BATCH_MODE_POINTER_ARRAY : CUBLASLT_BATCH_MODE_STRIDED;

		if (cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &c, sizeof(c)) ||
			cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof(mode)))
			return -1;
		if (!p->ptr && cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
													   sizeof(stride)))
			return -1;
	}
	return 0;
}

/* time one probe with cuBLASLt: status string and TFLOP/s */
static void
run_lt(const probe *p, const char *name)
{
	size_t		aw = (size_t) p->m * p->k * p->count,
				bx = (size_t) p->n * p->k * p->count,
				dd = (size_t) p->m * p->n * p->count;
	cudaDataType ta = p->fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
	size_t		es = p->fp8 ? 1 : 2,
				ds = p->f32 ? 4 : 2;
	void	   *A = dev_fill(aw * es, 0x20, 0x30),
			   *B = dev_fill(bx * es, 0x20, 0x30),
			   *D = dev_fill(dd * ds, 0, 1);
	float	   *sa = dev_fill(sizeof(float) * (size_t) (p->outer ? p->m * p->count : 1), 0, 1),
			   *sb = dev_fill(sizeof(float) * (size_t) (p->outer ? p->n * p->count : 1), 0, 1);
	void	  **ptrs = NULL;
	const void *a_arg = A,
			   *b_arg = B;
	void	   *d_arg = D;
	cublasLtMatmulDesc_t desc = NULL;
	cublasLtMatrixLayout_t la = NULL,
				lb = NULL,
				ld = NULL;
	cublasLtMatmulPreference_t pref = NULL;
	cublasLtMatmulHeuristicResult_t heur;
	int			found = 0;
	cublasOperation_t tT = CUBLAS_OP_T,
				tN = CUBLAS_OP_N;
	float		one = 1.0f,
				zero = 0.0f,
				ms = 0;
	const char *status = "ok";
	cudaEvent_t e0,
				e1;

	if (p->count > 1 && p->ptr)
	{
		void	  **h = malloc(sizeof(void *) * 3 * (size_t) p->count);

		for (int i = 0; i < p->count; i++)
		{
			h[i] = (char *) A + (size_t) i * p->m * p->k * es;
			h[p->count + i] = (char *) B + (size_t) i * p->n * p->k * es;
			h[2 * p->count + i] = (char *) D + (size_t) i * p->m * p->n * ds;
		}
		cudaMalloc((void **) &ptrs, sizeof(void *) * 3 * (size_t) p->count);
		cudaMemcpy(ptrs, h, sizeof(void *) * 3 * (size_t) p->count, cudaMemcpyHostToDevice);
		free(h);
		a_arg = ptrs;
		b_arg = ptrs + p->count;
		d_arg = ptrs + 2 * p->count;
	}
	/* column-major: D^T [m, n] = op(A) [m, k] op(B) [k, n], A = W stored [k, m] (transposed), B = X^T [k, n] */
	if (cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) ||
		cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &tT, sizeof(tT)) ||
		cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tN, sizeof(tN)))
		status = "desc";
	else if (p->fp8 && set_scales(desc, p, sa, sb))
		status = "scale-attr";
	else if (layout(&la, ta, p->k, p->m, p->k, p) || layout(&lb, ta, p->k, p->n, p->k, p) ||
			 layout(&ld, p->f32 ? CUDA_R_32F : CUDA_R_16BF, p->m, p->n, p->m, p))
		status = "layout";
	else if (cublasLtMatmulPreferenceCreate(&pref) ||
			 cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &work_bytes,
												  sizeof(work_bytes)))
		status = "pref";
	else if (cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 1, &heur, &found) || found == 0)
		status = "no-algo";
	else
	{
		cublasStatus_t st = CUBLAS_STATUS_SUCCESS;

		cudaEventCreate(&e0);
		cudaEventCreate(&e1);
		for (int i = 0; i < 3 + REPS && st == CUBLAS_STATUS_SUCCESS; i++)
		{
			if (i == 3)
				cudaEventRecord(e0, 0);
			st = cublasLtMatmul(lt, desc, &one, a_arg, la, b_arg, lb, &zero, d_arg, ld, d_arg, ld, &heur.algo, work,
								work_bytes, 0);
		}
		cudaEventRecord(e1, 0);
		cudaEventSynchronize(e1);
		cudaEventElapsedTime(&ms, e0, e1);
		if (st != CUBLAS_STATUS_SUCCESS)
			status = "matmul";
		else if (cudaGetLastError() != cudaSuccess)
			status = "cuda";
	}
	printf("RESULT kind=fp8probe mode=%s m=%d n=%d k=%d count=%d status=%s ms=%.4f tflops=%.1f gbps=%.0f\n", name,
		   p->m, p->n, p->k, p->count, status, strcmp(status, "ok") ? 0.0 : ms / REPS,
		   strcmp(status, "ok") ? 0.0 : 2.0 * p->m * p->n * (double) p->k * p->count / (ms / REPS * 1e-3) / 1e12,
		   strcmp(status, "ok") ? 0.0 : ((double) (aw + bx) * es + (double) dd * ds) / (ms / REPS * 1e-3) / 1e9);
	fflush(stdout);
	if (pref)
		cublasLtMatmulPreferenceDestroy(pref);
	if (la)
		cublasLtMatrixLayoutDestroy(la);
	if (lb)
		cublasLtMatrixLayoutDestroy(lb);
	if (ld)
		cublasLtMatrixLayoutDestroy(ld);
	if (desc)
		cublasLtMatmulDescDestroy(desc);
	cudaFree(A);
	cudaFree(B);
	cudaFree(D);
	cudaFree(sa);
	cudaFree(sb);
	cudaFree(ptrs);
	cudaGetLastError();
}

int
main(void)
{
	/* dense: KDA q/k/v-ish (4096 x 2304), o_proj (2304 x 4096), dense MLP gate+up (18432 x 2304), 8192 tokens */
	static const int dense[][3] = {{4096, 8192, 2304}, {2304, 8192, 4096}, {18432, 8192, 2304}};
	/* experts of one 8192-token step: 256 used, slots of 256 rows; gate+up problems (1024 x 2304), down (2304 x 1024) */
	static const int experts[][4] = {{1024, 256, 2304, 512}, {2304, 256, 1024, 256}};

	if (cublasLtCreate(&lt) || cublasCreate(&blas) || cudaMalloc(&work, work_bytes) != cudaSuccess)
	{
		fprintf(stderr, "fp8_probe: no cuBLASLt / GPU\n");
		return 1;
	}
	for (size_t i = 0; i < sizeof(dense) / sizeof(dense[0]); i++)
	{
		probe		p = {dense[i][0], dense[i][1], dense[i][2], 1, 0, 0, 0};

		run_lt(&p, "bf16");
		p.fp8 = 1;
		run_lt(&p, "fp8-scalar");
		p.outer = 1;
		run_lt(&p, "fp8-outer");
		/* fp32 results (what the engine's fp32 activation buffers want) */
		p.f32 = 1;
		run_lt(&p, "fp8-outer-f32");
		p.outer = 0;
		run_lt(&p, "fp8-scalar-f32");
		p.fp8 = 0;
		run_lt(&p, "bf16-f32");
	}
	/* decode: the same dense shapes at 8, 32 and 64 tokens (memory-bound: the gbps column against ~4200) */
	for (size_t i = 0; i < sizeof(dense) / sizeof(dense[0]); i++)
		for (int n = 8; n <= 64; n *= n == 8 ? 4 : 2)
		{
			probe		p = {dense[i][0], n, dense[i][2], 1, 0, 0, 0};

			run_lt(&p, "bf16");
			p.fp8 = 1;
			p.outer = 1;
			run_lt(&p, "fp8-outer");
		}
	for (size_t i = 0; i < sizeof(experts) / sizeof(experts[0]); i++)
	{
		probe		p = {experts[i][0], experts[i][1], experts[i][2], experts[i][3], 0, 0, 1};

		run_lt(&p, "bf16-ptr");
		p.fp8 = 1;
		run_lt(&p, "fp8-ptr");
		p.outer = 1;
		run_lt(&p, "fp8-ptr-outer");
		p.ptr = 0;
		run_lt(&p, "fp8-strided-outer");
		p.outer = 0;
		run_lt(&p, "fp8-strided");
		p.fp8 = 0;
		run_lt(&p, "bf16-strided");
	}
	return 0;
}
