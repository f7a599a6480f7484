/*
 * quant.cu — whole-matrix work on quantized weights in kernels.h's device
 * form (data rows, then fp32 scales at kk_q_scale_offset):
 *   kk_q_dequant      rows of a quantized matrix as fp32 (quant.h's
 *                     reference values fl(value(q) * scale), bit for bit) or
 *                     bf16 (those rounded to nearest even): the panels prefill
 *                     hands to cuBLAS, and MLA's kv_b copy
 *   kk_q_dequant_many whole matrices of one shape and form, the same values,
 *                     in one launch (grid.y = the matrix): a prefill's used
 *                     experts of one stage for the grouped expert GEMM
 *   kk_q_fill_random  random quantized weights made on the device
 *                     (benchmarks of models too large to make on the host)
 * All are simple grid-stride kernels: a prefill panel's conversion is small
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

/*
 * Eight consecutive weights c .. c + 7 of a row (c a multiple of 8, all in
 * one scale group: s) from one 8-byte (fp8, int8) or 4-byte (int4: one
 * word) load, each exactly as q_value computes it.
 */
__device__ __forceinline__ void
q_values8(const uint8_t *row, int fmt, int c, float s, float *v)
{
	if (fmt == KK_WF_INT4)
	{
		uint32_t	w = *(const uint32_t *) (row + (c >> 1));

		for (int j = 0; j < 8; j++)
			v[j] = __fmul_rn((float) ((int) ((w >> (4 * j)) & 15u) - 8), s);
		return;
	}
	{
		uint2		p = *(const uint2 *) (row + c);
		float		s120 = s * 0x1p120f;

		for (int j = 0; j < 8; j++)
		{
			uint32_t	b = ((j < 4 ? p.x : p.y) >> (8 * (j & 3))) & 0xffu;

			if (fmt == KK_WF_FP8)
				v[j] = __fmul_rn(__uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)), s120);
			else
				v[j] = __fmul_rn((float) (int8_t) (uint8_t) b, s);
		}
	}
}

/*
 * Matrix blockIdx.y (+ m0) of the table W into dst + m * stride.  vec: eight
 * weights a thread (cols and group multiples of 8, stride a multiple of 8,
 * dst 16-byte aligned; each matrix's alignment is checked here, uniformly
 * for the block), else one.
 */
__global__ void
q_dequant_many_kernel(void *dst, size_t stride, int out_bf16, const void *const *W, int m0, int fmt, int group,
					  int rows, int cols, size_t rb, size_t soff, int ng, int vec)
{
	int			m = m0 + (int) blockIdx.y;
	const uint8_t *base;
	const float *scales;
	size_t		n;

	/* dst may be the arena the previous round's GEMM still reads; the table may be fresh */
	kk_dep_wait();
	kk_dep_launch();
	base = (const uint8_t *) W[m];
	scales = (const float *) (base + soff);
	vec = vec && ((uintptr_t) base & (fmt == KK_WF_INT4 ? 3 : 7)) == 0;
	if (vec)
	{
		int			cv = cols >> 3;

		n = (size_t) rows * cv;
		for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
		{
			size_t		r = i / (size_t) cv;
			int			c = (int) (i % (size_t) cv) << 3;
			size_t		o = (size_t) m * stride + r * cols + c;
			float		v[8];

			q_values8(base + r * rb, fmt, c, scales[r * ng + c / group], v);
			if (out_bf16)
			{
				uint4		q;

				q.x = f32_to_bf16(v[0]) | ((uint32_t) f32_to_bf16(v[1]) << 16);
				q.y = f32_to_bf16(v[2]) | ((uint32_t) f32_to_bf16(v[3]) << 16);
				q.z = f32_to_bf16(v[4]) | ((uint32_t) f32_to_bf16(v[5]) << 16);
				q.w = f32_to_bf16(v[6]) | ((uint32_t) f32_to_bf16(v[7]) << 16);
				*(uint4 *) ((uint16_t *) dst + o) = q;
			}
			else
			{
				((float4 *) ((float *) dst + o))[0] = make_float4(v[0], v[1], v[2], v[3]);
				((float4 *) ((float *) dst + o))[1] = make_float4(v[4], v[5], v[6], v[7]);
			}
		}
		return;
	}
	n = (size_t) rows * cols;
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
	{
		size_t		r = i / (size_t) cols;
		int			c = (int) (i % (size_t) cols);
		float		v = q_value(base + r * rb, fmt, c, scales[r * ng + c / group]);
		size_t		o = (size_t) m * stride + i;

		if (out_bf16)
			((uint16_t *) dst)[o] = f32_to_bf16(v);
		else
			((float *) dst)[o] = v;
	}
}

extern "C" void
kk_q_dequant_many(cudaStream_t s, void *dst, size_t dst_stride, const void *const *W, int count, int fmt, int group,
				  int rows, int cols, int out_bf16)
{
	int			vec;
	size_t		items,
				bx;

	if (count <= 0 || rows <= 0 || cols <= 0 || group <= 0 ||
		(fmt != KK_WF_FP8 && fmt != KK_WF_INT8 && fmt != KK_WF_INT4))
		return;
	/* fp32 output: 8 floats are two 16-byte stores, so the same alignment rule in elements */
	vec = cols % 8 == 0 && group % 8 == 0 && dst_stride % 8 == 0 &&
		((uintptr_t) dst & 31) == 0;
	items = (size_t) rows * (vec ? cols / 8 : cols);
	bx = (items + 255) / 256;
	/* enough blocks a matrix to fill the GPU when there are few, a grid-stride loop beyond */
	if (bx > 2048)
		bx = 2048;
	for (int m0 = 0; m0 < count; m0 += 65535)
	{
		int			cnt = count - m0 < 65535 ? count - m0 : 65535;

		kk_launch(q_dequant_many_kernel, dim3((unsigned) bx, (unsigned) cnt), dim3(256), 0, s, dst, dst_stride,
				  out_bf16, W, m0, fmt, group, rows, cols, kk_q_row_bytes(fmt, cols),
				  kk_q_scale_offset(rows, fmt, cols), kk_q_groups(cols, group), vec);
	}
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
