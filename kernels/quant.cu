/*
 * quant.cu — whole-matrix work on quantized weights in kernels.h's device
 * form (data rows, then fp32 scales at kk_q_scale_offset):
 *   kk_q_dequant      rows of a quantized matrix as fp32 (quant.h's
 *                     reference values fl(value(q) * scale), bit for bit) or
 *                     bf16 (those rounded to nearest even): the panels prefill
 *                     hands to cuBLAS, and MLA's kv_b copy
 *   kk_q_fill_random  random quantized weights made on the device
 *                     (benchmarks of models too large to make on the host)
 * Both are simple grid-stride kernels: a prefill panel's conversion is small
 * next to the GEMM that reads it, and random weights are made once.
 */
#include "common.cuh"

/* ------------------------------------------------------------------ decoding */

/*
 * value(q) * scale of element c of a row, as quant.h's kl_q_dequant_row
 * computes it: FP8's bits placed in an fp32 read as the value times 2^-120
 * exactly (subnormal codes too, as fp32 subnormals: the build keeps
 * denormals), and scale * 2^120 is exact since |scale| < 256; the one
 * product is then the single rounding of value * scale.
 */
__device__ __forceinline__ float
q_value(const uint8_t *row, int fmt, int c, float s)
{
	switch (fmt)
	{
		case KK_WF_FP8:
			{
				uint32_t	b = row[c];
				float		f = __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20));

				return __fmul_rn(f, s * 0x1p120f);
			}
		case KK_WF_INT8:
			return __fmul_rn((float) (int8_t) row[c], s);
		default:				/* KK_WF_INT4: column c is nibble c % 2 of byte c / 2 */
			{
				uint32_t	b = row[c >> 1];

				return __fmul_rn((float) ((int) ((c & 1) ? b >> 4 : b & 15u) - 8), s);
			}
	}
}

__global__ void
q_dequant_kernel(void *dst, int out_bf16, const uint8_t *W, const float *scales, size_t rb, int ng, int fmt,
				 int group, int cols, int r0, int nr)
{
	size_t		n = (size_t) nr * cols;

	/* dst may be a buffer the previous kernel still reads (the last panel's GEMM) */
	kk_dep_wait();
	kk_dep_launch();
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
	{
		size_t		r = (size_t) r0 + i / (size_t) cols;
		int			c = (int) (i % (size_t) cols);
		float		v = q_value(W + r * rb, fmt, c, scales[r * ng + c / group]);

		if (out_bf16)
			((uint16_t *) dst)[i] = f32_to_bf16(v);
		else
			((float *) dst)[i] = v;
	}
}

extern "C" void
kk_q_dequant(cudaStream_t s, void *dst, int out_bf16, const void *W, int fmt, int group, int rows, int cols,
			 int r0, int nr)
{
	size_t		blocks = ((size_t) nr * cols + 255) / 256;

	if (nr <= 0 || cols <= 0 || group <= 0 || (fmt != KK_WF_FP8 && fmt != KK_WF_INT8 && fmt != KK_WF_INT4))
		return;
	/* (kernels.h's layout helpers are host functions) */
	kk_launch(q_dequant_kernel, dim3(blocks < 16384 ? (unsigned) blocks : 16384u), dim3(256), 0, s, dst,
			  out_bf16, (const uint8_t *) W,
			  (const float *) ((const uint8_t *) W + kk_q_scale_offset(rows, fmt, cols)),
			  kk_q_row_bytes(fmt, cols), kk_q_groups(cols, group), fmt, group, cols, r0, nr);
}

/* ------------------------------------------------------------------ random weights */

/* splitmix64 of (seed, index): independent of the launch shape */
__device__ __forceinline__ uint64_t
q_mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* uniform in [0, 1) from the top 24 bits of the hash of (seed, i) */
__device__ __forceinline__ float
q_uniform(uint64_t seed, uint64_t i)
{
	return (float) (q_mix64(seed ^ (i * 0xd1b54a32d192ed03ull)) >> 40) * (1.0f / 16777216.0f);
}

/* round to the nearest E4M3 code (ties to even), |f| <= 448 (quant.c's kl_f32_to_e4m3) */
__device__ __forceinline__ uint8_t
f32_to_e4m3(float f)
{
	uint32_t	sign = f < 0.0f ? 0x80u : 0u;
	float		a = fabsf(f),
				r;
	int			ex;

	if (a < 0x1p-6f)
		return (uint8_t) (sign | (uint32_t) rintf(a * 512.0f));	/* multiples of 2^-9; 8 is the least normal */
	(void) frexpf(a, &ex);
	ex -= 1;					/* a = 1.m * 2^ex */
	r = rintf(ldexpf(a, 3 - ex));	/* in [8, 16] */
	if (r == 16.0f)
	{
		r = 8.0f;
		ex++;
	}
	if (ex > 8 || (ex == 8 && r > 14.0f))
		return (uint8_t) (sign | 0x7eu);
	return (uint8_t) (sign | (uint32_t) (((ex + 7) << 3) | ((int) r - 8)));
}

/*
 * Weight bytes: uniform codes over the form's range (FP8: a uniform number in
 * [-448, 448) rounded to E4M3; int8: [-127, 127]; int4: [-7, 7], symmetric as the others: mean 0).  int4
 * padding nibbles hold 8 (q = 0) as quant.c writes them.
 */
__global__ void
q_fill_data_kernel(uint8_t *W, int fmt, size_t rb, int rows, int cols, uint64_t seed)
{
	size_t		n = (size_t) rows * rb;

	kk_dep_wait();
	kk_dep_launch();
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
	{
		int			j = (int) (i % rb);
		uint8_t		b;

		if (fmt == KK_WF_FP8)
			b = f32_to_e4m3(q_uniform(seed, i) * 896.0f - 448.0f);
		else if (fmt == KK_WF_INT8)
			b = (uint8_t) (int8_t) ((int) (q_uniform(seed, i) * 255.0f) - 127);
		else
		{
			uint32_t	lo = 2 * j < cols ? 1u + (uint32_t) (q_uniform(seed, 2 * i) * 15.0f) : 8u,
						hi = 2 * j + 1 < cols ? 1u + (uint32_t) (q_uniform(seed, 2 * i + 1) * 15.0f) : 8u;

			b = (uint8_t) (lo | (hi << 4));
		}
		W[i] = b;
	}
}

/* scales: base * (0.75 .. 1.25), varying by group so that a kernel reading the wrong scale shows */
__global__ void
q_fill_scales_kernel(float *S, size_t n, uint64_t seed, float base)
{
	kk_dep_wait();
	kk_dep_launch();
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
		S[i] = base * (0.75f + 0.5f * q_uniform(seed, i));
}

extern "C" void
kk_q_fill_random(cudaStream_t s, void *W, int fmt, int group, int rows, int cols, uint64_t seed, float scale)
{
	size_t		nd = (size_t) rows * kk_q_row_bytes(fmt, cols),
				ns,
				bd,
				bs;
	float		base;

	if (rows <= 0 || cols <= 0 || group <= 0 || (fmt != KK_WF_FP8 && fmt != KK_WF_INT8 && fmt != KK_WF_INT4))
		return;
	ns = (size_t) rows * kk_q_groups(cols, group);
	bd = (nd + 255) / 256;
	bs = (ns + 255) / 256;

	/*
	 * Standard deviations of the codes' values: FP8 rounds a uniform number
	 * on [-448, 448] (448 / sqrt(3)), int8 a uniform integer on [-127, 127]
	 * (sqrt(127 * 128 / 3)), int4 on [-8, 7] (sqrt((16^2 - 1) / 12)); the
	 * scales' jitter (0.75 .. 1.25) adds 1 %.
	 */
	base = fmt == KK_WF_FP8 ? scale / 258.65f : fmt == KK_WF_INT8 ? scale / 73.59f : scale / 4.6098f;
	kk_launch(q_fill_data_kernel, dim3(bd < 65536 ? (unsigned) bd : 65536u), dim3(256), 0, s, (uint8_t *) W, fmt,
			  kk_q_row_bytes(fmt, cols), rows, cols, seed);
	kk_launch(q_fill_scales_kernel, dim3(bs < 65536 ? (unsigned) bs : 65536u), dim3(256), 0, s,
			  (float *) ((uint8_t *) W + kk_q_scale_offset(rows, fmt, cols)), ns, seed ^ 0x5ca1ab1e5ca1ab1eull,
			  base);
}
