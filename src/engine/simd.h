/*
 * simd.h — the CPU's vector kernels, chosen once at run time by CPU features:
 * AVX-512 (F, BW, VL), AVX2 + FMA, or portable C.  The build uses no -march
 * flag; each variant is compiled with a target attribute.
 *
 * All arithmetic is fp32 (bf16 weights are widened exactly, never the
 * activations narrowed), so every variant matches the reference to float
 * rounding.
 */
#ifndef KL_SIMD_H
#define KL_SIMD_H

#include <stddef.h>
#include <stdint.h>

#include "quant.h"

typedef struct kl_simd
{
	const char *name;
	/* sum a[i] * b[i] */
	float		(*dot) (const float *a, const float *b, int n);
	/* y[i] += a * x[i] */
	void		(*axpy) (float *y, float a, const float *x, int n);
	/* y[i] *= a */
	void		(*scale) (float *y, float a, int n);
	/*
	 * GEMV over a block of weight rows: for each input j < nx and row r in
	 * [r0, r1): y[j*ldy + r] = dot(W[r, :], x[j*ldx, :]), W [rows, cols] row-major.
	 */
	void		(*gemv_bf16) (float *y, int ldy, const uint16_t *W, int cols,
							  const float *x, int ldx, int nx, int r0, int r1);
	void		(*gemv_f32) (float *y, int ldy, const float *W, int cols,
							 const float *x, int ldx, int nx, int r0, int r1);
	/* out[i] = (float) in[i] */
	void		(*bf16_to_f32) (float *out, const uint16_t *in, size_t n);
	/* y[i] = exp(x[i]) to within 2 ulp (y may be x); exp(-inf) = 0 */
	void		(*vexp) (float *y, const float *x, int n);
	/* max of x[0..n) (n >= 1) */
	float		(*vmax) (const float *x, int n);
	/* y[i] = exp(x[i] - shift), returns the sum of the y[i] (y may be x): a softmax's numerator */
	float		(*exp_shift_sum) (float *y, const float *x, float shift, int n);

	/*
	 * Attention scores with few query rows (decode), keys row-major as stored
	 * in the MLA cache, where a general GEMM spends its time packing the keys:
	 * S[r, j] = scale * dot(Q[r, :d], K[j, :d]) for r < nr, j < nk.
	 * NULL in variants without the kernel (callers use sgemm).
	 */
	void		(*few_scores) (float *S, int lds, const float *Q, int ldq, int nr,
							   const float *K, int ldk, int nk, int d, float scale);

	/*
	 * GEMV over rows [r0, r1) of a quantized matrix (quant.h), as gemv_bf16:
	 * y[j*ldy + r] = dot(W[r, :], x_j) with every weight fl(q * scale).  For
	 * KL_Q_INT4, each x_j is the input permuted by this level's q4_permute.
	 * Kernels in simd_quant.c.
	 */
	void		(*gemv_q) (float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int nx,
						   int r0, int r1);
	/* the int4 kernel's input layout: q4_xlen(cols) floats, written by q4_permute */
	int			(*q4_xlen) (int cols);
	void		(*q4_permute) (float *dst, const float *x, int cols);
} kl_simd;

/* The best variant for this CPU (KL_SIMD=avx512|avx2|scalar overrides). */
const kl_simd *kl_simd_get(void);
/* A named variant, or NULL if the CPU lacks it (tests compare variants). */
const kl_simd *kl_simd_variant(const char *name);

#endif
