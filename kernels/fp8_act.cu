/*
 * fp8_act.cu — activations rounded to FP8 E4M3 for the W8A8 prefill
 * products of precision "fp8" (src/cuda/cuda_fp8.c runs those products on
 * cuBLASLt; docs/engine.md has the numbers' contract):
 *   kk_fp8_quant_rows     rows of fp32 activations to E4M3 bytes, one fp32
 *                         scale a row (dense products)
 *   kk_fp8_quant_gather   the same for a MoE layer's tokens, each row written
 *                         to its k padded expert rows with its scale and the
 *                         row's expert (the routed experts' batched products)
 *   kk_fp8_swiglu_quant   the experts' SwiGLU from the unscaled gate / up
 *                         products (bf16), scaled by the row's and the
 *                         expert's scales, rounded to E4M3 again per row
 *   kk_fp8_rescale_rows   the unscaled down products (bf16) times the row's
 *                         scale and the expert's per-channel scales, in place
 * The rounding, the same in every kernel (kl_fp8_act_scale's rule): a row's
 * scale s = amax / 448 (amax the largest |value|, NaN ignored; s = 1 where
 * that is not > 0), each value v becomes the E4M3 code of v / s (IEEE
 * division), round to nearest even, saturating at +-448, NaN to NaN — PTX
 * cvt.rn.satfinite.e4m3x2.f32 from sm_89, a software twin of quant.c's
 * kl_f32_to_e4m3 before (the mode runs only from sm_89: cuBLASLt's FP8
 * products need it).  Bit for bit what the host reference of test_cuda.c
 * computes.
 */
#include "common.cuh"

#define FP8_BLOCK 256

/* v / s to E4M3 before sm_89: round to nearest even, saturate at 448, NaN stays NaN */
__device__ __forceinline__ uint32_t
e4m3_soft(float f)
{
	uint32_t	sign = signbit(f) ? 0x80u : 0u;
	float		a = fabsf(f),
				r;
	int			ex;

	if (isnan(f))
		return 0x7fu;
	if (a < 0x1p-6f)
		return sign | (uint32_t) rintf(a * 512.0f);
	if (a > 464.0f)
		return sign | 0x7eu;	/* (frexpf of infinity is undefined) */
	(void) frexpf(a, &ex);
	ex -= 1;
	r = rintf(ldexpf(a, 3 - ex));
	if (r == 16.0f)
	{
		r = 8.0f;
		ex++;
	}
	if (ex > 8 || (ex == 8 && r > 14.0f))
		return sign | 0x7eu;
	return sign | (uint32_t) (((ex + 7) << 3) | ((int) r - 8));
}

/* two values as E4M3 codes: lo in bits 0..7, hi in 8..15 */
__device__ __forceinline__ uint32_t
e4m3x2(float lo, float hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
	uint16_t	d;

	/* (the first source goes to the upper byte) */
	asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(hi), "f"(lo));
	return d;
#else
	return e4m3_soft(lo) | (e4m3_soft(hi) << 8);
#endif
}

/* the row scale from the row's largest magnitude */
__device__ __forceinline__ float
act_scale(float amax)
{
	float		s = amax / 448.0f;

	return s > 0.0f ? s : 1.0f;
}

/* the largest of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it */
__device__ __forceinline__ float
block_max(float v, float *red)
{
	int			w = threadIdx.x / 32,
				nw = blockDim.x / 32;

	v = warp_max(v);
	__syncthreads();			/* (red may still be read from a previous call) */
	if ((threadIdx.x & 31) == 0)
		red[w] = v;
	__syncthreads();
	v = threadIdx.x < (unsigned) nw ? red[threadIdx.x] : 0.0f;
	if (w == 0)
		v = warp_max(v);
	if (threadIdx.x == 0)
		red[0] = v;
	__syncthreads();
	return red[0];
}

/* |values| of 4: the largest, NaN ignored (fmaxf) */
__device__ __forceinline__ float
amax4(float4 v, float m)
{
	return fmaxf(fmaxf(fmaxf(m, fabsf(v.x)), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
}

/* 4 values / s as 4 E4M3 codes in a word */
__device__ __forceinline__ uint32_t
quant4(float4 v, float s)
{
	return e4m3x2(v.x / s, v.y / s) | (e4m3x2(v.z / s, v.w / s) << 16);
}

/*
 * The scale of the row of cols values at xr (vec: 4 values a thread, xr
 * 16-byte aligned, cols % 4 == 0): its largest magnitude over the block.
 */
__device__ __forceinline__ float
row_scale(const float *xr, int cols, bool vec, float *red)
{
	float		m = 0.0f;

	if (vec)
		for (int c = threadIdx.x; c < cols / 4; c += blockDim.x)
			m = amax4(((const float4 *) xr)[c], m);
	else
		for (int c = threadIdx.x; c < cols; c += blockDim.x)
			m = fmaxf(m, fabsf(xr[c]));
	return act_scale(block_max(m, red));
}

/*
 * One row of cols values at xr to E4M3 at qr (vec as row_scale's, qr 4-byte
 * aligned); returns the scale.  The row is read twice (the second time from
 * L1 / L2).
 */
__device__ __forceinline__ float
quant_row(const float *xr, uint8_t *qr, int cols, bool vec, float *red)
{
	float		s = row_scale(xr, cols, vec, red);

	if (vec)
		for (int c = threadIdx.x; c < cols / 4; c += blockDim.x)
			((uint32_t *) qr)[c] = quant4(((const float4 *) xr)[c], s);
	else
		for (int c = threadIdx.x; c < cols; c += blockDim.x)
			qr[c] = (uint8_t) e4m3x2(xr[c] / s, 0.0f);
	return s;
}

/* a block a row */
__global__ void
fp8_quant_rows_kernel(uint8_t *q, int ldq, float *scale, const float *x, int ldx, int cols, bool vec)
{
	__shared__ float red[32];
	size_t		r = blockIdx.x;
	float		s;

	kk_dep_wait();
	kk_dep_launch();
	s = quant_row(x + r * ldx, q + r * ldq, cols, vec, red);
	if (threadIdx.x == 0)
		scale[r] = s;
}

static bool
vec_ok(const void *x, int ldx, const void *q, int ldq, int cols)
{
	return cols % 4 == 0 && ldx % 4 == 0 && ldq % 4 == 0 && ((uintptr_t) x & 15) == 0 && ((uintptr_t) q & 3) == 0;
}

extern "C" void
kk_fp8_quant_rows(cudaStream_t s, uint8_t *q, int ldq, float *scale, const float *x, int ldx, int rows, int cols)
{
	if (rows <= 0 || cols <= 0)
		return;
	kk_launch(fp8_quant_rows_kernel, dim3((unsigned) rows), dim3(FP8_BLOCK), 0, s, q, ldq, scale, x, ldx, cols,
			  vec_ok(x, ldx, q, ldq, cols));
}

/*
 * A block a token t: its row quantized once, the codes written to the
 * padded rows p = inv[t k + j] (j < k) of dst (row stride cols), with
 * dscale[p] its scale and dexp[p] = sel[t k + j] (the row's expert).
 */
__global__ void
fp8_quant_gather_kernel(uint8_t *dst, float *dscale, int *dexp, const float *x, int ldx, const int *inv,
						const int *sel, int k, int cols, bool vec)
{
	__shared__ float red[32];
	size_t		t = blockIdx.x;
	const float *xr = x + t * ldx;
	float		s;

	kk_dep_wait();
	kk_dep_launch();
	s = row_scale(xr, cols, vec, red);
	if (threadIdx.x < (unsigned) k)
	{
		int			p = inv[t * k + threadIdx.x];

		dscale[p] = s;
		dexp[p] = sel[t * k + threadIdx.x];
	}
	if (vec)
		for (int c = threadIdx.x; c < cols / 4; c += blockDim.x)
		{
			uint32_t	w = quant4(((const float4 *) xr)[c], s);

			for (int j = 0; j < k; j++)
				((uint32_t *) (dst + (size_t) inv[t * k + j] * cols))[c] = w;
		}
	else
		for (int c = threadIdx.x; c < cols; c += blockDim.x)
		{
			uint8_t		b = (uint8_t) e4m3x2(xr[c] / s, 0.0f);

			for (int j = 0; j < k; j++)
				dst[(size_t) inv[t * k + j] * cols + c] = b;
		}
}

extern "C" int
kk_fp8_quant_gather(cudaStream_t s, uint8_t *dst, float *dscale, int *dexp, const float *x, int ldx, const int *inv,
					const int *sel, int n, int k, int cols)
{
	if (k > FP8_BLOCK || k <= 0)
		return -1;
	if (n > 0 && cols > 0)
		kk_launch(fp8_quant_gather_kernel, dim3((unsigned) n), dim3(FP8_BLOCK), 0, s, dst, dscale, dexp, x, ldx, inv,
				  sel, k, cols, vec_ok(x, ldx, dst, cols, cols));
	return 0;
}

/* expert e's per-channel scales: the fp32 scales after its data rows (kernels.h's device form) */
__device__ __forceinline__ const float *
expert_scales(const void *const *W, int E, int e, size_t soff)
{
	if ((unsigned) e >= (unsigned) E)
		e = 0;					/* (a pad row's expert is whatever its memory held: results never read) */
	return (const float *) ((const char *) W[e] + soff);
}

/*
 * A block a padded row p: g = (g16 * xs[p]) * sg[f], u likewise, h =
 * silu(g) * u (siluf_, as the bf16 SwiGLU), h held in shared memory, then
 * rounded per row to E4M3 (hq, row stride F) with its scale hs[p].
 */
__global__ void
fp8_swiglu_quant_kernel(uint8_t *hq, float *hs, const uint16_t *g16, const uint16_t *u16, const float *xs,
						const int *rexp, const void *const *gate, const void *const *up, size_t soff, int E, int F)
{
	extern __shared__ float h[];
	__shared__ float red[32];
	size_t		p = blockIdx.x;
	float		m = 0.0f,
				s,
				sx;
	const float *sg,
			   *su;
	int			e;

	kk_dep_wait();
	kk_dep_launch();
	e = rexp[p];
	sx = xs[p];
	sg = expert_scales(gate, E, e, soff);
	su = expert_scales(up, E, e, soff);
	for (int f = threadIdx.x; f < F; f += blockDim.x)
	{
		float		g = bf16_to_f32(g16[p * F + f]) * sx * sg[f],
					u = bf16_to_f32(u16[p * F + f]) * sx * su[f],
					v = siluf_(g) * u;

		h[f] = v;
		m = fmaxf(m, fabsf(v));
	}
	s = act_scale(block_max(m, red));
	if (threadIdx.x == 0)
		hs[p] = s;
	for (int f = threadIdx.x; f < F; f += blockDim.x)
		hq[p * F + f] = (uint8_t) e4m3x2(h[f] / s, 0.0f);
}

extern "C" int
kk_fp8_swiglu_quant(cudaStream_t s, uint8_t *hq, float *hs, const uint16_t *g16, const uint16_t *u16,
					const float *xs, const int *rexp, const void *const *gate, const void *const *up, size_t soff,
					int E, int rows, int F)
{
	size_t		smem = sizeof(float) * (size_t) F;

	if (F <= 0 || smem > 48 * 1024)
		return -1;
	if (rows > 0)
		kk_launch(fp8_swiglu_quant_kernel, dim3((unsigned) rows), dim3(FP8_BLOCK), smem, s, hq, hs, g16, u16, xs,
				  rexp, gate, up, soff, E, F);
	return 0;
}

/* a block a padded row: y16 = bf16((y16 * hs[p]) * sd[d]) */
__global__ void
fp8_rescale_rows_kernel(uint16_t *y16, const float *hs, const int *rexp, const void *const *down, size_t soff, int E,
						int D)
{
	size_t		p = blockIdx.x;
	float		sh;
	const float *sd;

	kk_dep_wait();
	kk_dep_launch();
	sh = hs[p];
	sd = expert_scales(down, E, rexp[p], soff);
	for (int d = threadIdx.x; d < D; d += blockDim.x)
		y16[p * D + d] = f32_to_bf16(bf16_to_f32(y16[p * D + d]) * sh * sd[d]);
}

extern "C" void
kk_fp8_rescale_rows(cudaStream_t s, uint16_t *y16, const float *hs, const int *rexp, const void *const *down,
					size_t soff, int E, int rows, int D)
{
	if (rows > 0 && D > 0)
		kk_launch(fp8_rescale_rows_kernel, dim3((unsigned) rows), dim3(FP8_BLOCK), 0, s, y16, hs, rexp, down, soff, E,
				  D);
}
