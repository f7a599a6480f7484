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

#endif
