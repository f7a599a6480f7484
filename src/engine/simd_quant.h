/*
 * simd_quant.h — the quantized-weight GEMV kernels of simd_quant.c, one per
 * instruction set; simd.c puts them in its per-CPU tables as
 * kl_simd.gemv_q (see simd.h for the contract).
 */
#ifndef KL_SIMD_QUANT_H
#define KL_SIMD_QUANT_H

#include "quant.h"

void		kl_gemv_q_scalar(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int nx, int r0, int r1);
void		kl_gemv_q_avx2(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int nx, int r0, int r1);
void		kl_gemv_q_avx512(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int nx, int r0, int r1);

/*
 * The AVX-512 int4 kernel's input layout: per 128-column span,
 * dst[16 i + k] = x[8k + i]; kl_q4_span_len(cols) floats, padding zero.
 * (The other levels use quant.h's kl_q4_permute_x.)
 */
static inline int
kl_q4_span_len(int cols)
{
	return (cols + 127) / 128 * 128;
}
void		kl_q4_permute_span(float *dst, const float *x, int cols);

#endif
