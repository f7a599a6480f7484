/*
 * cpu_ops.h — internal interface between the CPU backend's files:
 * backend_cpu.c (memory, matmul, element-wise ops), cpu_kda.c (the KDA mixer),
 * cpu_mla.c (the MLA mixer), cpu_moe.c (mixture of experts).
 */
#ifndef KL_CPU_OPS_H
#define KL_CPU_OPS_H

#include "backend.h"
#include <math.h>

#include "simd.h"

/* y[n, W.rows] (stride ldy) = x[n, W.cols] (stride ldx) W^T, using all threads */
void		cpu_matmul(kl_backend *be, float *y, int ldy, const float *x, int ldx, int n, const kl_weight *W);
/* several products in one parallel dispatch */
void		cpu_matmul_batch(kl_backend *be, const kl_matmul_job *jobs, int count);

/* Single-threaded fp32 GEMM for use inside a task: C[m,n] = alpha A op B + beta C,
 * row-major, with A [m,k] (or [k,m] if ta) and B [k,n] (or [n,k] if tb). */
void		cpu_sgemm(bool ta, bool tb, int m, int n, int k, float alpha, const float *A, int lda,
					  const float *B, int ldb, float beta, float *C, int ldc);

void		cpu_kda(kl_backend *be, const kl_step *step, const kl_kda_args *a);
void		cpu_mla(kl_backend *be, const kl_step *step, const kl_mla_args *a);
int			cpu_prepare_mla(kl_backend *be, kl_mla_layer *w, kl_err *err);
void		cpu_release_mla(kl_backend *be, kl_mla_layer *w);
void		cpu_moe(kl_backend *be, const kl_config *cfg, const kl_moe_layer *w, float *y, const float *x, int n);

/*
 * Working memory.  Kernels never allocate inside tasks: the driving thread
 * reserves what a parallel job will need first, so that running out of
 * memory is an error message (be->failed, be->err), not a crash.
 *   cpu_scratch_reserve  every thread's slot `slot` holds >= floats (driving thread)
 *   cpu_scratch          that slot, inside a task running on `thread`
 *   cpu_buffer           a grow-only buffer of the backend, by id (driving thread)
 */
enum cpu_scratch_slot
{
	SCRATCH_PANEL,				/* matmul: a block of weights widened to f32 */
	SCRATCH_A,
	SCRATCH_B,
	SCRATCH_C,
	SCRATCH_D,
	SCRATCH_SLOTS
};

enum cpu_buffer_id
{
	BUF_MLA_QABS,
	BUF_MLA_OLAT,
	BUF_MLA_ACC,
	BUF_MLA_M,
	BUF_MLA_L,
	BUF_MLA_TASKS,
	BUF_MLA_BLOCKS,
	BUF_MLA_KEXP,
	BUF_MLA_VEXP,
	BUF_MLA_EXPANDED,
	BUF_MOE_LOGITS,
	BUF_MOE_SCRATCH,
	BUF_MOE_WEIGHTS,
	BUF_MOE_SEL,
	BUF_MOE_ORDER,
	BUF_MOE_COUNT,
	BUF_MOE_FILL,
	BUF_MOE_JOBS,
	BUF_MOE_X,
	BUF_MOE_Y,
	BUF_MOE_G,
	BUF_MOE_U,
	BUF_Q4_X,					/* matmul: int4 GEMV inputs, permuted */
	BUF_COUNT
};

bool		cpu_scratch_reserve(kl_backend *be, int slot, size_t floats);
float	   *cpu_scratch(kl_backend *be, int slot, int thread);
void	   *cpu_buffer(kl_backend *be, int id, size_t bytes);

static inline float
kl_sigmoid(float x)
{
	return 1.0f / (1.0f + expf(-x));
}

static inline float
kl_silu(float x)
{
	return x / (1.0f + expf(-x));
}

#endif
