/*
 * elementwise.cu — the element-wise ops of backend.h (embed, rmsnorm, add,
 * swiglu), dtype conversions, and weights filled with random values on the
 * device (the 48B benchmark model cannot afford host copies).
 */
#include "common.cuh"

int			kk_pdl_on = 0;

extern "C" void
kk_set_pdl(int on)
{
	kk_pdl_on = on;
}

/* ------------------------------------------------------------------ embed */

__global__ void
embed_kernel(float *x, const void *E, int bf16, int D, const int32_t *ids)
{
	int			r = blockIdx.x;
	size_t		base;
	float	   *y = x + (size_t) r * D;

	kk_dep_wait();
	kk_dep_launch();
	base = (size_t) ids[r] * D;
	for (int c = threadIdx.x; c < D; c += blockDim.x)
		y[c] = bf16 ? bf16_to_f32(((const uint16_t *) E)[base + c]) : ((const float *) E)[base + c];
}

extern "C" void
kk_embed(cudaStream_t s, float *x, const void *E, int bf16, int D, const int32_t *ids, int n)
{
	if (n > 0)
		kk_launch(embed_kernel, dim3(n), dim3(256), 0, s, x, E, bf16, D, ids);
}

/* ------------------------------------------------------------------ rmsnorm */

/*
 * Row kernels of decode (a few rows of a few thousand numbers): one block per
 * row with a thread per 4 numbers, every load of the row issued before any
 * use, so that a row costs one memory round trip (a loop over the row with a
 * run-time trip count paid one per iteration: ~9 us per 2304-wide row).
 *   MODE 0  y = rmsnorm(x)                  (rows of stride ldx / ldy; y may be x)
 *   MODE 1  x += a; y = rmsnorm(x)          (contiguous rows of d)
 *   MODE 2  x += sum_r wts[r] ye[inv[r]] (+ ys); y = rmsnorm(x)   (the MoE combine)
 *   MODE 3  the same with bf16 expert outputs ye (KL_CUDA_MOE_PREFILL=3)
 * Needs d % 4 == 0, d <= 4 * ROW_V4 * 1024, 16-byte aligned rows.
 *
 * EARLY (KL_CUDA_NORM_EARLY; kk_row_norm_twin's `early`, kernels.h): what a
 * block requests before kk_dep_wait, so that it is on chip when the kernel
 * before completes instead of a dependent round trip on the path after it:
 *   0  nothing (the waiting form);
 *   1  the norm weight w, a model weight that no kernel writes (without it the
 *      block asks for w after its block-wide sum: one round trip at the end);
 *   2  modes 2 and 3 only: also the residual x and the routing weights and
 *      indices wts, inv (k <= ROW_EARLY_K a row), so that after the wait the
 *      combine has one round trip (the expert rows) where it had two (wts and
 *      inv, then the rows they index).  Why that is safe: this kernel starts
 *      only once every block of the kernel before it has called kk_dep_launch
 *      or exited, and every kk_launch kernel calls kk_dep_wait before either
 *      (common.cuh; mma_q.cu's mx_convert_kernel, which launches first, is
 *      always followed by its product, and prefetch_l2_kernel runs on a stream
 *      of its own), so the kernel two launches back and everything before it
 *      have completed and their writes have reached L2 (gemv.cu's PRE comment
 *      has the same argument).  At decode the routing kernel that wrote wts
 *      and inv is three launches back (routing, gate/up, down, this) and the
 *      norm that last wrote x five (norm, router, routing, gate/up, down);
 *      the caller guarantees it in general (kernels.h).  They are read with
 *      __ldcg: the SM's L1 may still hold another layer's lines of the same
 *      buffers.  ye and ys (the down product's output: the launch right
 *      before) are read after the wait; so are x in modes 0 and 1 (mode 0: the
 *      embedding or the kv_a product writes it right before; mode 1: its
 *      loads would go out with a's, which the kernel right before writes, so
 *      an early x saves no round trip).
 * The early forms take rows of d <= 4096 only (a float4 a thread, held in
 * registers: with ROW_V4 of them the combine's form spilled); the sums are
 * the same operations in the same order in every form, the sum of squares
 * written out (row_sumsq4) so that no fma contraction can reorder it: the
 * same bits (test_cuda's memcmp checks and its int4 twin check, H200
 * 2026-12-03; the default is 2).
 */
#define ROW_V4 4
#define ROW_EARLY_K 8			/* the most routing weights a row that EARLY 2 holds (the 48B model's k) */

/*
 * x^2 + y^2 + z^2 + w^2 of four values in a fixed order (x first, then fmaf
 * of y, z, w).  Written as a + b * b the chain contracts into fma in an order
 * the compiler picks per instantiation: CUDA 13.0 made row_norm_kernel<3, 0>
 * fma(x, x, y * y) and <3, 1> fma(y, y, x * x) (PTX), so the early forms
 * changed the bits of the norm (test_cuda's int4 twin check, H200
 * 2026-12-03, bench/notes-cuda.md).
 */
__device__ __forceinline__ float
row_sumsq4(float4 v)
{
	return fmaf(v.w, v.w, fmaf(v.z, v.z, fmaf(v.y, v.y, __fmul_rn(v.x, v.x))));
}

/* acc += wr * (expert output row `row`, float4 c): the combine's step, ye fp32 (MODE 2) or bf16 (MODE 3) */
template <int MODE>
__device__ __forceinline__ void
row_expert_term(float4 &acc, float wr, const void *__restrict__ ye, int row, int d, int c)
{
	float4		e;

	if constexpr (MODE == 2)
		e = ((const float4 *) ((const float *) ye + (size_t) row * d))[c];
	else
	{
		/* four bf16 in 8 bytes: element 0 in the low half */
		uint2		h = ((const uint2 *) ((const uint16_t *) ye + (size_t) row * d))[c];

		e.x = __uint_as_float(h.x << 16);
		e.y = __uint_as_float(h.x & 0xffff0000u);
		e.z = __uint_as_float(h.y << 16);
		e.w = __uint_as_float(h.y & 0xffff0000u);
	}
	acc.x = fmaf(wr, e.x, acc.x);
	acc.y = fmaf(wr, e.y, acc.y);
	acc.z = fmaf(wr, e.z, acc.z);
	acc.w = fmaf(wr, e.w, acc.w);
}

template <int MODE, int EARLY>
__global__ void __launch_bounds__(1024)
row_norm_kernel(float *y, int ldy, float *x, int ldx, const float *a, const float *__restrict__ w, int d, float eps,
				int k, const float *__restrict__ wts, const int *__restrict__ inv, const void *__restrict__ ye,
				const float *__restrict__ ys, uint16_t *__restrict__ y16)
{
	__shared__ float red[32];
	size_t		t = blockIdx.x;
	int			nc = d >> 2;
	float4	   *xr = (float4 *) (x + t * ldx);
	/* the early forms take rows of at most 4096 (a float4 a thread: the held values fit the registers) */
	constexpr int NV = EARLY >= 1 ? 1 : ROW_V4;
	float4		v[NV],
				wv[NV];
	float		ew[ROW_EARLY_K];
	int			ei[ROW_EARLY_K];
	float		ss = 0,
				iv;

	if constexpr (EARLY >= 1)
#pragma unroll
		for (int j = 0; j < NV; j++)
		{
			int			c = threadIdx.x + j * blockDim.x;

			if (c < nc)
				wv[j] = ((const float4 *) w)[c];
		}
	if constexpr (EARLY >= 2)
	{
#pragma unroll
		for (int j = 0; j < NV; j++)
		{
			int			c = threadIdx.x + j * blockDim.x;

			if (c < nc)
				v[j] = __ldcg(xr + c);
		}
#pragma unroll
		for (int r = 0; r < ROW_EARLY_K; r++)
			if (r < k)
			{
				ew[r] = __ldcg(wts + t * k + r);
				ei[r] = __ldcg(inv + t * k + r);
			}
	}
	kk_dep_wait();
	kk_dep_launch();
#pragma unroll
	for (int j = 0; j < NV; j++)
	{
		int			c = threadIdx.x + j * blockDim.x;

		if (c < nc)
		{
			float4		val;

			if constexpr (EARLY >= 2)
				val = v[j];
			else
				val = xr[c];
			if (MODE == 1)
			{
				float4		b = ((const float4 *) (a + t * d))[c];

				val.x += b.x;
				val.y += b.y;
				val.z += b.z;
				val.w += b.w;
			}
			if constexpr (MODE >= 2)
			{
				float4		acc = make_float4(0, 0, 0, 0);

				if constexpr (EARLY >= 2)
				{
#pragma unroll
					for (int r = 0; r < ROW_EARLY_K; r++)
						if (r < k)
							row_expert_term<MODE>(acc, ew[r], ye, ei[r], d, c);
				}
				else
				{
#pragma unroll 8
					for (int r = 0; r < k; r++)
						row_expert_term<MODE>(acc, wts[t * k + r], ye, inv[t * k + r], d, c);
				}
				if (ys)
				{
					float4		s = ((const float4 *) (ys + t * d))[c];

					acc.x += s.x;
					acc.y += s.y;
					acc.z += s.z;
					acc.w += s.w;
				}
				val.x += acc.x;
				val.y += acc.y;
				val.z += acc.z;
				val.w += acc.w;
			}
			v[j] = val;
			ss = __fadd_rn(ss, row_sumsq4(val));
		}
	}
	ss = block_sum(ss, red);
	iv = 1.0f / sqrtf(ss / (float) d + eps);
#pragma unroll
	for (int j = 0; j < NV; j++)
	{
		int			c = threadIdx.x + j * blockDim.x;

		if (c < nc)
		{
			float4		o;

			if constexpr (EARLY < 1)
				wv[j] = ((const float4 *) w)[c];
			if (MODE >= 1)
				xr[c] = v[j];
			o.x = wv[j].x * (v[j].x * iv);
			o.y = wv[j].y * (v[j].y * iv);
			o.z = wv[j].z * (v[j].z * iv);
			o.w = wv[j].w * (v[j].w * iv);
			((float4 *) (y + t * ldy))[c] = o;
			if (y16)
				/* the bf16 twin: the same rounding as f32_to_bf16_kernel of y */
				((uint2 *) (y16 + t * d))[c] =
					make_uint2((uint32_t) f32_to_bf16(o.x) | ((uint32_t) f32_to_bf16(o.y) << 16),
							   (uint32_t) f32_to_bf16(o.z) | ((uint32_t) f32_to_bf16(o.w) << 16));
		}
	}
}

static bool
row_ok(int d, int ld1, int ld2, const void *p1, const void *p2, const void *p3, const void *p4)
{
	return d % 4 == 0 && d <= 4 * ROW_V4 * 1024 && ld1 % 4 == 0 && ld2 % 4 == 0 &&
		(((uintptr_t) p1 | (uintptr_t) p2 | (uintptr_t) p3 | (uintptr_t) p4) & 15) == 0;
}

static unsigned
row_threads(int d)
{
	int			per = (d / 4 + ROW_V4 - 1) / ROW_V4;	/* threads if each takes ROW_V4 */
	int			th = d / 4 <= 1024 ? d / 4 : per;

	th = (th + 31) / 32 * 32;
	return th < 32 ? 32 : th > 1024 ? 1024 : th;
}

/* row_norm_kernel<MODE, early> over rows rows of d (early 2 only in modes 2 and 3: else 1) */
template <int MODE, typename... A>
static void
row_norm_launch(cudaStream_t s, int early, int rows, int d, A... args)
{
	dim3		grid(rows),
				block(row_threads(d));

	if constexpr (MODE >= 2)
		if (early >= 2)
		{
			kk_launch(row_norm_kernel<MODE, 2>, grid, block, 0, s, args...);
			return;
		}
	if (early >= 1)
		kk_launch(row_norm_kernel<MODE, 1>, grid, block, 0, s, args...);
	else
		kk_launch(row_norm_kernel<MODE, 0>, grid, block, 0, s, args...);
}

extern "C" int
kk_row_norm_twin(cudaStream_t s, int mode, float *y, int ldy, uint16_t *y16, float *x, int ldx, const float *a,
				 const float *w, int rows, int d, float eps, int k, const float *wts, const int *inv, const void *ye,
				 const float *ys, int early)
{
	if (rows <= 0)
		return 0;
	if (!row_ok(d, ldx, ldy, y, x, w, a) || ((uintptr_t) y16 & 7) != 0 || mode < 0 || mode > 3 ||
		(mode == 2 && !row_ok(d, 4, 4, ye, ys, NULL, NULL)) ||
		(mode == 3 && (!row_ok(d, d, d, y, x, w, ys) || ((uintptr_t) ye & 15) != 0)))
		return -1;
	if (early >= 2 && k > ROW_EARLY_K)
		early = 1;				/* (the held routing weights: at most ROW_EARLY_K a row) */
	if (d / 4 > 1024)
		early = 0;				/* (the early forms hold a float4 a thread) */
#define ROW_ARGS y, ldy, x, ldx, a, w, d, eps, k, wts, inv, ye, ys, y16
	if (mode == 0)
		row_norm_launch<0>(s, early, rows, d, ROW_ARGS);
	else if (mode == 1)
		row_norm_launch<1>(s, early, rows, d, ROW_ARGS);
	else if (mode == 2)
		row_norm_launch<2>(s, early, rows, d, ROW_ARGS);
	else
		row_norm_launch<3>(s, early, rows, d, ROW_ARGS);
#undef ROW_ARGS
	return 0;
}

extern "C" int
kk_row_norm(cudaStream_t s, int mode, float *y, int ldy, float *x, int ldx, const float *a, const float *w, int rows,
			int d, float eps, int k, const float *wts, const int *inv, const float *ye, const float *ys)
{
	return kk_row_norm_twin(s, mode ? (mode == 1 ? 1 : 2) : 0, y, ldy, NULL, x, ldx, a, w, rows, d, eps, k, wts, inv,
							ye, ys, 0);
}

extern "C" int
kk_row_norm_combine16(cudaStream_t s, float *y, float *x, const float *w, int rows, int d, float eps, int k,
					  const float *wts, const int *inv, const uint16_t *ye16, const float *ys)
{
	/* (bf16 rows of d % 4 == 0 are 8-byte aligned when ye16 is) */
	return kk_row_norm_twin(s, 3, y, d, NULL, x, d, NULL, w, rows, d, eps, k, wts, inv, ye16, ys, 0);
}

/* One block per row.  In place is safe: each element is read, then written,
 * by the same thread. */
__global__ void
rmsnorm_kernel(float *y, int ldy, const float *x, int ldx, const float *w, int d, float eps)
{
	__shared__ float red[32];
	const float *xr = x + (size_t) blockIdx.x * ldx;
	float	   *yr = y + (size_t) blockIdx.x * ldy;
	float		ss = 0;

	kk_dep_wait();
	kk_dep_launch();
	for (int c = threadIdx.x; c < d; c += blockDim.x)
		ss += xr[c] * xr[c];
	ss = block_sum(ss, red);
	{
		float		inv = 1.0f / sqrtf(ss / (float) d + eps);

		for (int c = threadIdx.x; c < d; c += blockDim.x)
			yr[c] = w[c] * (xr[c] * inv);
	}
}

extern "C" void
kk_rmsnorm(cudaStream_t s, float *y, int ldy, const float *x, int ldx, const float *w, int rows, int d, float eps)
{
	if (kk_row_norm(s, 0, y, ldy, (float *) x, ldx, NULL, w, rows, d, eps, 0, NULL, NULL, NULL, NULL) == 0)
		return;
	if (rows > 0)
		kk_launch(rmsnorm_kernel, dim3(rows), dim3(d >= 1024 ? 256 : 128), 0, s, y, ldy, x, ldx, w, d, eps);
}

/* The residual add fused with the next norm: x += a; y = w * x / rms(x). */
__global__ void
add_rmsnorm_kernel(float *y, float *x, const float *a, const float *w, int d, float eps)
{
	__shared__ float red[32];
	float	   *xr = x + (size_t) blockIdx.x * d;
	const float *ar = a + (size_t) blockIdx.x * d;
	float	   *yr = y + (size_t) blockIdx.x * d;
	float		ss = 0;

	kk_dep_wait();
	kk_dep_launch();
	for (int c = threadIdx.x; c < d; c += blockDim.x)
	{
		float		v = xr[c] + ar[c];

		xr[c] = v;
		ss += v * v;
	}
	ss = block_sum(ss, red);
	{
		float		inv = 1.0f / sqrtf(ss / (float) d + eps);

		for (int c = threadIdx.x; c < d; c += blockDim.x)
			yr[c] = w[c] * (xr[c] * inv);
	}
}

extern "C" void
kk_add_rmsnorm(cudaStream_t s, float *y, float *x, const float *a, const float *w, int rows, int d, float eps)
{
	if (kk_row_norm(s, 1, y, d, x, d, a, w, rows, d, eps, 0, NULL, NULL, NULL, NULL) == 0)
		return;
	if (rows > 0)
		kk_launch(add_rmsnorm_kernel, dim3(rows), dim3(d >= 1024 ? 256 : 128), 0, s, y, x, a, w, d, eps);
}

/* ------------------------------------------------------------------ add, swiglu */

__global__ void
add_kernel(float *y, const float *x, size_t n)
{
	kk_dep_wait();
	kk_dep_launch();
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
		y[i] += x[i];
}

extern "C" void
kk_add(cudaStream_t s, float *y, const float *x, size_t n)
{
	unsigned	blocks = ceil_div(n, 256);

	if (n == 0)
		return;
	kk_launch(add_kernel, dim3(blocks < 4096 ? blocks : 4096), dim3(256), 0, s, y, x, n);
}

__global__ void
swiglu_kernel(float *h, const float *g, const float *u, int rows, int width, int ld)
{
	size_t		n = (size_t) rows * width;

	kk_dep_wait();
	kk_dep_launch();
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
	{
		size_t		r = i / width,
					c = i % width;

		h[i] = siluf_(g[r * ld + c]) * u[r * ld + c];
	}
}

extern "C" void
kk_swiglu(cudaStream_t s, float *h, const float *g, const float *u, int rows, int width, int ld)
{
	unsigned	blocks = ceil_div((size_t) rows * width, 256);

	if (rows <= 0 || width <= 0)
		return;
	kk_launch(swiglu_kernel, dim3(blocks < 8192 ? blocks : 8192), dim3(256), 0, s, h, g, u, rows, width, ld);
}

/*
 * kk_swiglu that also writes h16, the bf16 twin of h (contiguous rows of
 * width, f32_to_bf16 of the very fp32 values stored in h), four columns a
 * thread.  Needs width % 4 == 0, ld % 4 == 0, g, u, h 16-byte and h16
 * 8-byte aligned, rows * width / 4 < 2^32: returns -1 (nothing launched)
 * otherwise, 0 when launched.
 */
__global__ void
swiglu_twin_kernel(float *h, uint16_t *h16, const float *g, const float *u, unsigned n4, unsigned w4, int ld)
{
	kk_dep_wait();
	kk_dep_launch();
	for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += gridDim.x * blockDim.x)
	{
		unsigned	r = i / w4,
					c = i - r * w4;
		float4		gv = ((const float4 *) (g + (size_t) r * ld))[c],
					uv = ((const float4 *) (u + (size_t) r * ld))[c],
					o;

		o.x = siluf_(gv.x) * uv.x;
		o.y = siluf_(gv.y) * uv.y;
		o.z = siluf_(gv.z) * uv.z;
		o.w = siluf_(gv.w) * uv.w;
		((float4 *) h)[i] = o;
		((uint2 *) h16)[i] = make_uint2((uint32_t) f32_to_bf16(o.x) | ((uint32_t) f32_to_bf16(o.y) << 16),
										(uint32_t) f32_to_bf16(o.z) | ((uint32_t) f32_to_bf16(o.w) << 16));
	}
}

extern "C" int
kk_swiglu_twin(cudaStream_t s, float *h, uint16_t *h16, const float *g, const float *u, int rows, int width, int ld)
{
	size_t		n4 = (size_t) rows * width / 4;
	size_t		blocks = ceil_div(n4, 256);

	if (rows <= 0 || width <= 0)
		return 0;
	if (width % 4 != 0 || ld % 4 != 0 || n4 >= ((size_t) 1 << 32) ||
		(((uintptr_t) h | (uintptr_t) g | (uintptr_t) u) & 15) != 0 || ((uintptr_t) h16 & 7) != 0)
		return -1;
	kk_launch(swiglu_twin_kernel, dim3(blocks < 8192 ? blocks : 8192), dim3(256), 0, s, h, h16, g, u, (unsigned) n4,
			  (unsigned) (width / 4), ld);
	return 0;
}

/* ------------------------------------------------------------------ conversions */

__global__ void
f32_to_bf16_kernel(uint16_t *dst, int ldd, const float *src, int lds, int rows, int cols)
{
	size_t		n = (size_t) rows * cols;

	kk_dep_wait();
	kk_dep_launch();
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
	{
		size_t		r = i / cols,
					c = i % cols;

		dst[r * ldd + c] = f32_to_bf16(src[r * lds + c]);
	}
}

extern "C" void
kk_f32_to_bf16(cudaStream_t s, uint16_t *dst, int ldd, const float *src, int lds, int rows, int cols)
{
	unsigned	blocks = ceil_div((size_t) rows * cols, 256);

	if (rows <= 0 || cols <= 0)
		return;
	kk_launch(f32_to_bf16_kernel, dim3(blocks < 16384 ? blocks : 16384), dim3(256), 0, s, dst, ldd, src, lds, rows, cols);
}

/*
 * kk_f32_to_bf16 four columns a thread with 32-bit index arithmetic (the
 * older kernel divides a 64-bit index per element and runs at about half
 * the memory rate); the same numbers.  Falls back to that kernel where the
 * shape or alignment does not allow 16-byte loads and 8-byte stores.
 */
__global__ void
f32_to_bf16_v4_kernel(uint16_t *dst, int ldd, const float *src, int lds, unsigned n4, unsigned c4)
{
	kk_dep_wait();
	kk_dep_launch();
	for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += gridDim.x * blockDim.x)
	{
		unsigned	r = i / c4,
					c = i - r * c4;
		float4		v = ((const float4 *) (src + (size_t) r * lds))[c];

		((uint2 *) (dst + (size_t) r * ldd))[c] =
			make_uint2((uint32_t) f32_to_bf16(v.x) | ((uint32_t) f32_to_bf16(v.y) << 16),
					   (uint32_t) f32_to_bf16(v.z) | ((uint32_t) f32_to_bf16(v.w) << 16));
	}
}

extern "C" void
kk_f32_to_bf16_v4(cudaStream_t s, uint16_t *dst, int ldd, const float *src, int lds, int rows, int cols)
{
	size_t		n4 = (size_t) rows * cols / 4;
	size_t		blocks = ceil_div(n4, 256);

	if (rows <= 0 || cols <= 0)
		return;
	if (cols % 4 != 0 || lds % 4 != 0 || ldd % 4 != 0 || n4 >= ((size_t) 1 << 32) || ((uintptr_t) src & 15) != 0 ||
		((uintptr_t) dst & 7) != 0)
	{
		kk_f32_to_bf16(s, dst, ldd, src, lds, rows, cols);
		return;
	}
	kk_launch(f32_to_bf16_v4_kernel, dim3(blocks < 16384 ? blocks : 16384), dim3(256), 0, s, dst, ldd, src, lds,
			  (unsigned) n4, (unsigned) (cols / 4));
}

__global__ void
bf16_to_f32_kernel(float *dst, const uint16_t *src, size_t n)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
		dst[i] = bf16_to_f32(src[i]);
}

extern "C" void
kk_bf16_to_f32(cudaStream_t s, float *dst, const uint16_t *src, size_t n)
{
	unsigned	blocks = ceil_div(n, 256);

	if (n == 0)
		return;
	bf16_to_f32_kernel<<<blocks < 16384 ? blocks : 16384, 256, 0, s>>>(dst, src, n);
}

/* ------------------------------------------------------------------ random weights */

/* splitmix64 of (seed, index): every element independent of the launch shape */
__device__ __forceinline__ uint64_t
mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

__global__ void
fill_random_kernel(void *dst, int bf16, size_t n, uint64_t seed, float a)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
	{
		/* uniform in [-a, a) from the top 24 bits */
		float		u = (float) (mix64(seed ^ (i * 0xd1b54a32d192ed03ull)) >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;

		if (bf16)
			((uint16_t *) dst)[i] = f32_to_bf16(u * a);
		else
			((float *) dst)[i] = u * a;
	}
}

extern "C" void
kk_fill_random(cudaStream_t s, void *dst, int bf16, size_t n, uint64_t seed, float scale)
{
	unsigned	blocks = ceil_div(n, 256);

	if (n == 0)
		return;
	/* uniform in [-a, a] has standard deviation a / sqrt(3) */
	fill_random_kernel<<<blocks < 65536 ? blocks : 65536, 256, 0, s>>>(dst, bf16, n, seed, scale * 1.7320508f);
}
