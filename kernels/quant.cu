/*
 * quant.cu — whole-matrix work on quantized weights in kernels.h's device
 * form (data rows, then fp32 scales at kk_q_scale_offset):
 *   kk_q_dequant      rows of a quantized matrix as fp32 (quant.h's
 *                     reference values fl(value(q) * scale), bit for bit) or
 *                     bf16 (those rounded to nearest even): the panels prefill
 *                     hands to cuBLAS, and MLA's kv_b copy
 *   kk_q_dequant_many_bf16  many matrices of one form at once, as bf16: the
 *                     quantized experts of a prefill layer for the batched
 *                     bf16 products (cuda_moe_prefill.c)
 *   kk_q_fill_random  random quantized weights made on the device
 *                     (benchmarks of models too large to make on the host)
 * Grid-stride kernels: a conversion is small next to the GEMMs that read it
 * (16 columns a piece where the shape allows), and random weights are made
 * once.
 */
#include "common.cuh"

/* ------------------------------------------------------------------ decoding */

/*
 * value(q) * scale for the code of one element (FP8: its byte; int8: its
 * byte; int4: its nibble, q + 8), as quant.h's kl_q_dequant_row computes it:
 * FP8's bits placed in an fp32 read as the value times 2^-120 exactly
 * (subnormal codes too, as fp32 subnormals: the build keeps denormals), and
 * scale * 2^120 is exact since |scale| < 256; the one product is then the
 * single rounding of value * scale.
 */
__device__ __forceinline__ float
q_code_value(uint32_t b, int fmt, float s)
{
	switch (fmt)
	{
		case KK_WF_FP8:
			return __fmul_rn(__uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)), s * 0x1p120f);
		case KK_WF_INT8:
			return __fmul_rn((float) (int8_t) b, s);
		default:				/* KK_WF_INT4 */
			return __fmul_rn((float) ((int) b - 8), s);
	}
}

/* the code of element c of a row (int4: column c is nibble c % 2 of byte c / 2) */
__device__ __forceinline__ uint32_t
q_code(const uint8_t *row, int fmt, int c)
{
	if (fmt != KK_WF_INT4)
		return row[c];
	return (c & 1) ? row[c >> 1] >> 4 : row[c >> 1] & 15u;
}

/* the general path: any shape, an element a thread */
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
		float		v = q_code_value(q_code(W + r * rb, fmt, c), fmt, scales[r * ng + c / group]);

		if (out_bf16)
			((uint16_t *) dst)[i] = f32_to_bf16(v);
		else
			((float *) dst)[i] = v;
	}
}

/*
 * The vector path (cols and group multiples of 16, 16-byte aligned rows): a
 * thread decodes 16 consecutive columns at a time (16 bytes of FP8 / int8,
 * 8 bytes of int4), one scale for them, and stores them as two 16-byte bf16
 * or four fp32 stores; two such pieces are requested before either is used
 * (the conversion streams at the copy rate only with enough bytes in
 * flight).  Matrix blockIdx.y: W / dst, or Ws[y] / dsts[y] where those
 * device arrays are given (many matrices of one form and shape in one
 * launch: the quantized experts of a prefill layer).  Same values as the
 * general path, bit for bit.
 */
#define Q_VEC 16				/* columns a piece */

struct q_piece
{
	uint32_t	w[4];			/* FP8 / int8: 16 bytes; int4: w[0], w[1] */
};

__device__ __forceinline__ q_piece
q_load_piece(const uint8_t *row, int fmt, int c)
{
	q_piece		p;

	if (fmt == KK_WF_INT4)
	{
		uint2		v = *(const uint2 *) (row + c / 2);

		p.w[0] = v.x;
		p.w[1] = v.y;
		p.w[2] = p.w[3] = 0;
	}
	else
	{
		uint4		v = *(const uint4 *) (row + c);

		p.w[0] = v.x;
		p.w[1] = v.y;
		p.w[2] = v.z;
		p.w[3] = v.w;
	}
	return p;
}

/* the piece's 16 values times s, stored at dst + o (bf16 or fp32) */
__device__ __forceinline__ void
q_store_piece(void *dst, int out_bf16, size_t o, const q_piece &p, int fmt, float s)
{
	float		v[Q_VEC];

	for (int i = 0; i < Q_VEC; i++)
	{
		uint32_t	code = fmt == KK_WF_INT4 ? (p.w[i >> 3] >> (4 * (i & 7))) & 15u :
			(p.w[i >> 2] >> (8 * (i & 3))) & 0xffu;

		v[i] = q_code_value(code, fmt, s);
	}
	if (out_bf16)
	{
		uint4	   *d = (uint4 *) ((uint16_t *) dst + o);

		for (int h = 0; h < 2; h++)
		{
			const float *f = v + 8 * h;

			d[h] = make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
							  pack_bf16x2(f[6], f[7]));
		}
	}
	else
	{
		float4	   *d = (float4 *) ((float *) dst + o);

		for (int q = 0; q < 4; q++)
			d[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
	}
}

__global__ void
q_dequant16_kernel(void *dst, int out_bf16, const uint8_t *W, void *const *dsts, const void *const *Ws, int rows,
				   int fmt, int group, int cols, int r0, int nr)
{
	const unsigned cpn = (unsigned) (cols / Q_VEC);
	const size_t rb = kk_q_row_bytes(fmt, cols);
	const int	ng = kk_q_groups(cols, group);
	const unsigned units = (unsigned) nr * cpn,
				stride = gridDim.x * blockDim.x;

	kk_dep_wait();
	kk_dep_launch();
	if (Ws)
	{
		W = (const uint8_t *) Ws[blockIdx.y];
		dst = dsts[blockIdx.y];
	}
	const float *scales = (const float *) (W + kk_q_scale_offset(rows, fmt, cols));

	for (unsigned u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += 2 * stride)
	{
		unsigned	u1 = u + stride,
					rr0 = u / cpn,
					rr1 = u1 / cpn;
		int			c0 = (int) (u - rr0 * cpn) * Q_VEC,
					c1 = (int) (u1 - rr1 * cpn) * Q_VEC;
		size_t		r0g = (size_t) r0 + rr0,
					r1g = (size_t) r0 + rr1;
		q_piece		p0 = q_load_piece(W + r0g * rb, fmt, c0),
					p1;

		if (u1 < units)
			p1 = q_load_piece(W + r1g * rb, fmt, c1);
		q_store_piece(dst, out_bf16, (size_t) rr0 * cols + c0, p0, fmt, scales[r0g * ng + c0 / group]);
		if (u1 < units)
			q_store_piece(dst, out_bf16, (size_t) rr1 * cols + c1, p1, fmt, scales[r1g * ng + c1 / group]);
	}
}

static bool
q_form_ok(int fmt, int group, int cols)
{
	return cols > 0 && group > 0 && (fmt == KK_WF_FP8 || fmt == KK_WF_INT8 || fmt == KK_WF_INT4);
}

/* does the vector path take this shape (dst and the matrix 16-byte aligned)? */
static bool
q_vec_ok(int group, int cols, const void *dst, const void *W)
{
	return cols % Q_VEC == 0 && group % Q_VEC == 0 && ((uintptr_t) dst & 15) == 0 && ((uintptr_t) W & 15) == 0;
}

/* blocks of 256 threads for units work items, a few waves at most */
static unsigned
q_blocks(size_t units)
{
	size_t		b = (units + 255) / 256;

	return b < 4096 ? (unsigned) (b ? b : 1) : 4096u;
}

extern "C" void
kk_q_dequant(cudaStream_t s, void *dst, int out_bf16, const void *W, int fmt, int group, int rows, int cols,
			 int r0, int nr)
{
	size_t		blocks = ((size_t) nr * cols + 255) / 256;

	if (nr <= 0 || !q_form_ok(fmt, group, cols))
		return;
	if (q_vec_ok(group, cols, dst, W) && (size_t) nr * (cols / Q_VEC) < (1u << 30))
	{
		kk_launch(q_dequant16_kernel, dim3(q_blocks((size_t) nr * (cols / Q_VEC) / 2 + 1)), dim3(256), 0, s, dst,
				  out_bf16,
				  (const uint8_t *) W, (void *const *) NULL, (const void *const *) NULL, rows, fmt, group, cols,
				  r0, nr);
		return;
	}
	kk_launch(q_dequant_kernel, dim3(blocks < 16384 ? (unsigned) blocks : 16384u), dim3(256), 0, s, dst,
			  out_bf16, (const uint8_t *) W,
			  (const float *) ((const uint8_t *) W + kk_q_scale_offset(rows, fmt, cols)),
			  kk_q_row_bytes(fmt, cols), kk_q_groups(cols, group), fmt, group, cols, r0, nr);
}

extern "C" int
kk_q_dequant_many_ok(int fmt, int group, int cols)
{
	return q_form_ok(fmt, group, cols) && cols % Q_VEC == 0 && group % Q_VEC == 0;
}

extern "C" int
kk_q_dequant_many_bf16(cudaStream_t s, void *const *dsts, const void *const *Ws, int count, int fmt, int group,
					   int rows, int cols)
{
	if (count <= 0 || rows <= 0)
		return 0;
	if (!kk_q_dequant_many_ok(fmt, group, cols) || count > 65535 || (size_t) rows * (cols / Q_VEC) >= (1u << 30))
		return -1;
	kk_launch(q_dequant16_kernel, dim3(q_blocks((size_t) rows * (cols / Q_VEC) / 4 + 1), (unsigned) count),
			  dim3(256), 0, s, (void *) NULL, 1, (const uint8_t *) NULL, dsts, Ws, rows, fmt, group, cols, 0, rows);
	return 0;
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
