/*
 * device_blas_shim.c — a plain-C cblas_sgemm (row-major) and
 * openblas_set_num_threads, linked instead of OpenBLAS into the test and
 * benchmark programs that run on the GPU machine (make cuda-device-bins).
 *
 * That machine has no OpenBLAS, and a statically linked one would not fit in
 * what travels there; the CPU engine only serves cross-checks of small models
 * on it, where a blocked triple loop is fast enough.  Never part of the
 * engine, the extension or the CUDA library.
 */
#include <cblas.h>

void
openblas_set_num_threads(int num_threads)
{
	(void) num_threads;
}

void
cblas_sgemm(OPENBLAS_CONST enum CBLAS_ORDER Order, OPENBLAS_CONST enum CBLAS_TRANSPOSE TransA,
			OPENBLAS_CONST enum CBLAS_TRANSPOSE TransB, OPENBLAS_CONST blasint M, OPENBLAS_CONST blasint N,
			OPENBLAS_CONST blasint K, OPENBLAS_CONST float alpha, OPENBLAS_CONST float *A,
			OPENBLAS_CONST blasint lda, OPENBLAS_CONST float *B, OPENBLAS_CONST blasint ldb,
			OPENBLAS_CONST float beta, float *C, OPENBLAS_CONST blasint ldc)
{
	/* column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T: swap */
	if (Order == CblasColMajor)
	{
		cblas_sgemm(CblasRowMajor, TransB, TransA, N, M, K, alpha, B, ldb, A, lda, beta, C, ldc);
		return;
	}
	for (blasint i = 0; i < M; i++)
	{
		float	   *c = C + (size_t) i * ldc;

		for (blasint j = 0; j < N; j++)
			c[j] = beta == 0.0f ? 0.0f : beta * c[j];
		for (blasint p = 0; p < K; p++)
		{
			float		a = alpha * (TransA == CblasNoTrans ? A[(size_t) i * lda + p] : A[(size_t) p * lda + i]);

			if (TransB == CblasNoTrans)
			{
				const float *b = B + (size_t) p * ldb;

				for (blasint j = 0; j < N; j++)
					c[j] += a * b[j];
			}
			else
				for (blasint j = 0; j < N; j++)
					c[j] += a * B[(size_t) j * ldb + p];
		}
	}
}
