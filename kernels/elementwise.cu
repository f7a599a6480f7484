/*
 * elementwise.cu — the element-wise ops of backend.h (embed, rmsnorm, add,
 * swiglu), dtype conversions, and weights filled with random values on the
 * device (the 48B benchmark model cannot afford host copies).
 */
#include "common.cuh"

/* ------------------------------------------------------------------ embed */

__global__ void
embed_kernel(float *x, const void *E, int bf16, int D, const int32_t *ids)
{
	int			r = blockIdx.x;
	size_t		base = (size_t) ids[r] * D;
	float	   *y = x + (size_t) r * D;

	for (int c = threadIdx.x; c < D; c += blockDim.x)
		y[c] = bf16 ? bf16_to_f32(((const uint16_t *) E)[base + c]) : ((const float *) E)[base + c];
}

extern "C" void
kk_embed(cudaStream_t s, float *x, const void *E, int bf16, int D, const int32_t *ids, int n)
{
	if (n > 0)
		embed_kernel<<<n, 256, 0, s>>>(x, E, bf16, D, ids);
}

/* ------------------------------------------------------------------ rmsnorm */

/* One block per row.  In place is safe: each element is read, then written,
 * by the same thread. */
__global__ void
rmsnorm_kernel(float *y, int ldy, const float *x, int ldx, const float *w, int d, float eps)
{
	__shared__ float red[32];
	const float *xr = x + (size_t) blockIdx.x * ldx;
	float	   *yr = y + (size_t) blockIdx.x * ldy;
	float		ss = 0;

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
	if (rows > 0)
		rmsnorm_kernel<<<rows, d >= 1024 ? 256 : 128, 0, s>>>(y, ldy, x, ldx, w, d, eps);
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
	if (rows > 0)
		add_rmsnorm_kernel<<<rows, d >= 1024 ? 256 : 128, 0, s>>>(y, x, a, w, d, eps);
}

/* ------------------------------------------------------------------ add, swiglu */

__global__ void
add_kernel(float *y, const float *x, size_t n)
{
	for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x)
		y[i] += x[i];
}

extern "C" void
kk_add(cudaStream_t s, float *y, const float *x, size_t n)
{
	unsigned	blocks = ceil_div(n, 256);

	if (n == 0)
		return;
	add_kernel<<<blocks < 4096 ? blocks : 4096, 256, 0, s>>>(y, x, n);
}

__global__ void
swiglu_kernel(float *h, const float *g, const float *u, int rows, int width, int ld)
{
	size_t		n = (size_t) rows * width;

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
	swiglu_kernel<<<blocks < 8192 ? blocks : 8192, 256, 0, s>>>(h, g, u, rows, width, ld);
}

/* ------------------------------------------------------------------ conversions */

__global__ void
f32_to_bf16_kernel(uint16_t *dst, int ldd, const float *src, int lds, int rows, int cols)
{
	size_t		n = (size_t) rows * cols;

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
	f32_to_bf16_kernel<<<blocks < 16384 ? blocks : 16384, 256, 0, s>>>(dst, ldd, src, lds, rows, cols);
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
