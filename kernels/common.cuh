/*
 * common.cuh — small device helpers shared by the kernels: bf16 conversion
 * (bit-exact with kl_util.h's host functions), reductions, the activations
 * in the same float formulas as the CPU backend (cpu_ops.h).
 *
 * Built without --use_fast_math: expf, sqrtf and divisions are the accurate
 * ones, so the fp32 path stays within rounding of the CPU engine.
 */
#ifndef KL_KERNELS_COMMON_CUH
#define KL_KERNELS_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

/* bf16 is the high half of an IEEE binary32 */
__device__ __forceinline__ float
bf16_to_f32(uint16_t h)
{
	return __uint_as_float(((uint32_t) h) << 16);
}

/* round to nearest even, NaN stays NaN (kl_f32_to_bf16) */
__device__ __forceinline__ uint16_t
f32_to_bf16(float f)
{
	uint32_t	u = __float_as_uint(f);

	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t) ((u >> 16) | 0x40);
	u += 0x7fffu + ((u >> 16) & 1);
	return (uint16_t) (u >> 16);
}

/* two floats as a bf16 pair (lo in the low half), each as f32_to_bf16 rounds it */
__device__ __forceinline__ uint32_t
pack_bf16x2(float lo, float hi)
{
	return (uint32_t) f32_to_bf16(lo) | ((uint32_t) f32_to_bf16(hi) << 16);
}

/* 8 consecutive weights as floats, from one 16-byte (bf16) or two (f32) loads */
__device__ __forceinline__ void
unpack8_bf16(uint4 v, float *w)
{
	w[0] = __uint_as_float(v.x << 16);
	w[1] = __uint_as_float(v.x & 0xffff0000u);
	w[2] = __uint_as_float(v.y << 16);
	w[3] = __uint_as_float(v.y & 0xffff0000u);
	w[4] = __uint_as_float(v.z << 16);
	w[5] = __uint_as_float(v.z & 0xffff0000u);
	w[6] = __uint_as_float(v.w << 16);
	w[7] = __uint_as_float(v.w & 0xffff0000u);
}

__device__ __forceinline__ float
warp_sum(float v)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

__device__ __forceinline__ float
warp_max(float v)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}

/* Sum over the block; every thread gets the result.  `red` has room for 32
 * floats; blockDim.x is a multiple of 32. */
__device__ __forceinline__ float
block_sum(float v, float *red)
{
	int			lane = threadIdx.x & 31,
				warp = threadIdx.x >> 5,
				nw = blockDim.x >> 5;

	v = warp_sum(v);
	__syncthreads();
	if (lane == 0)
		red[warp] = v;
	__syncthreads();
	v = lane < nw ? red[lane] : 0.0f;
	return warp_sum(v);
}

__device__ __forceinline__ float
sigmoidf_(float x)
{
	return 1.0f / (1.0f + expf(-x));
}

__device__ __forceinline__ float
siluf_(float x)
{
	return x / (1.0f + expf(-x));
}

/* torch.nn.functional.softplus (beta 1, threshold 20) */
__device__ __forceinline__ float
softplusf_(float x)
{
	return x > 20.0f ? x : log1pf(expf(x));
}

/*
 * siluf_ and softplusf_ with the hardware exponential (ex2.approx) and, for
 * silu, division (rcp.approx): for operands that are rounded to bf16 next
 * (precision bf16's KDA prep, KK_KDA_EW_FAST).  __expf's error is 2 +
 * 1.17 |x| ulp (3e-6 relative at |x| = 20), __fdividef's 2 ulp, so silu is
 * within ~4e-6 relative of siluf_ (past |x| = 87 both give x or -0:
 * __fdividef returns 0 for a denominator above 2^126, where the exact
 * quotient is below 1e-36); softplus keeps log1pf, and log1p(e (1 + d))
 * moves by at most d relative, so it is within ~3e-6 of softplusf_.  bf16
 * rounding is 2^-9 = 2e-3.
 */
__device__ __forceinline__ float
siluf_fast(float x)
{
	return __fdividef(x, 1.0f + __expf(-x));
}

__device__ __forceinline__ float
softplusf_fast(float x)
{
	return x > 20.0f ? x : log1pf(__expf(x));
}

/*
 * 2^x flushing a subnormal result to zero: one MUFU.EX2 (exp2f without
 * fast math also scales around it for subnormal results, 3 more
 * instructions an element).  For softmax numerators and decay factors: a
 * value under 2^-126 of the largest (1) changes no fp32 sum or product
 * that matters.
 */
__device__ __forceinline__ float
ex2_ftz(float x)
{
	float		y;

	asm("ex2.approx.ftz.f32 %0, %1;\n":"=f"(y):"f"(x));
	return y;
}

/*
 * Asynchronous 16-byte copies global -> shared (cp.async, sm_80+): a thread
 * issues all of its copies, then waits once, instead of waiting for every
 * load before it can store (which left most copy loops latency-bound).
 * Both addresses 16-byte aligned.
 */
__device__ __forceinline__ void
cp_async16(void *smem, const void *gmem)
{
	unsigned	s = (unsigned) __cvta_generic_to_shared(smem);

	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"::"r"(s), "l"(gmem));
}

/* wait for this thread's copies; a __syncthreads() must follow before others read */
__device__ __forceinline__ void
cp_async_wait_all(void)
{
	asm volatile("cp.async.wait_all;\n":::"memory");
}

/* close this thread's cp.async copies issued so far into one group */
__device__ __forceinline__ void
cp_async_commit(void)
{
	asm volatile("cp.async.commit_group;\n"::);
}

/* wait until at most N of this thread's committed groups are in flight */
template <int N>
__device__ __forceinline__ void
cp_async_wait_group(void)
{
	asm volatile("cp.async.wait_group %0;\n"::"n"(N):"memory");
}

/* four 8x8 bf16 matrices from shared memory into mma fragments (ldmatrix, sm_80+) */
__device__ __forceinline__ void
ldsm_x4(uint32_t *r, const void *p)
{
	unsigned	a = (unsigned) __cvta_generic_to_shared(p);

	asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
				 :"=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]):"r"(a));
}

/* the same, each matrix transposed */
__device__ __forceinline__ void
ldsm_x4_trans(uint32_t *r, const void *p)
{
	unsigned	a = (unsigned) __cvta_generic_to_shared(p);

	asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
				 :"=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]):"r"(a));
}

/*
 * mma fragments of bf16 (or fp16) matrices in shared memory by ldmatrix,
 * the registers the m16n8k16 layouts below take (16-byte aligned rows).
 * ldsm_frag_a: A, rows r0 .. r0 + 15, columns k0 .. k0 + 15 of a row-major
 * matrix of row stride ld (lanes 0-15 give the rows at k0, 16-31 at k0 + 8).
 * ldsm_frag_b_k32: B stored transposed (bt[n][k], row stride ld), columns
 * n0 .. n0 + 7: b[0], b[1] for k0 .. k0 + 15 and b[2], b[3] for the next 16
 * (matrix i: rows n0.., columns k0 + 8 i.., addresses from lanes 8 i..).
 * ldsm_frag_b_n16: the same for one k step and two column tiles: b[0],
 * b[1] columns n0 .. n0 + 7 and b[2], b[3] n0 + 8 .. n0 + 15.
 */
__device__ __forceinline__ void
ldsm_frag_a(uint32_t *a, const uint16_t *m, int ld, int r0, int k0, int lane)
{
	ldsm_x4(a, m + (r0 + (lane & 15)) * ld + k0 + ((lane >> 4) << 3));
}

__device__ __forceinline__ void
ldsm_frag_b_k32(uint32_t *b, const uint16_t *bt, int ld, int n0, int k0, int lane)
{
	ldsm_x4(b, bt + (n0 + (lane & 7)) * ld + k0 + ((lane >> 3) << 3));
}

__device__ __forceinline__ void
ldsm_frag_b_n16(uint32_t *b, const uint16_t *bt, int ld, int n0, int k0, int lane)
{
	ldsm_x4(b, bt + (n0 + ((lane >> 4) << 3) + (lane & 7)) * ld + k0 + (((lane >> 3) & 1) << 3));
}

/*
 * d += A B for one m16n8k16 step (mma.sync, sm_80+): A 16x16 bf16 row-major
 * in a0..a3, B 16x8 bf16 column-major in b0, b1, fp32 accumulators d[0..3],
 * all in the standard fragment layouts.
 */
__device__ __forceinline__ void
mma_bf16_16816(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1)
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
				 "{%0, %1, %2, %3};\n"
				 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
				 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* the same with A's four registers as an array (an ldmatrix x4 result) */
__device__ __forceinline__ void
mma_bf16_16816(float *d, const uint32_t *a, uint32_t b0, uint32_t b1)
{
	mma_bf16_16816(d, a[0], a[1], a[2], a[3], b0, b1);
}

/* d += a b for an m16n8k16 tile of fp16 operands (IEEE binary16: 2^-11
 * relative rounding against bf16's 2^-8, for operands known to lie in
 * [-1, 1]), fp32 accumulation; registers as mma_bf16_16816's */
__device__ __forceinline__ void
mma_f16_16816(float *d, const uint32_t *a, uint32_t b0, uint32_t b1)
{
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
				 "{%0, %1, %2, %3};\n"
				 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
				 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* x as IEEE fp16 bits, rounded to nearest even (values below fp16's range
 * become subnormals or 0) */
__device__ __forceinline__ uint16_t
cvt_f16(float x)
{
	uint16_t	r;

	asm("cvt.rn.f16.f32 %0, %1;\n":"=h"(r):"f"(x));
	return r;
}

/* a float over the 4 lanes of an mma fragment row's quad (lanes 4g .. 4g + 3): max, sum */
__device__ __forceinline__ float
quad_max(float v)
{
	v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
	return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

__device__ __forceinline__ float
quad_sum(float v)
{
	v += __shfl_xor_sync(0xffffffffu, v, 1);
	return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

/*
 * The rescale of one online-softmax step (flash attention on mma fragments,
 * base-2 domain) for a thread's two rows of an m16n8 C fragment (g and
 * g + 8): t0, t1 come in as the thread's maxima of the tile's scores and
 * leave as the rows' new running maxima (over the quad and the running
 * maxima mx0, mx1, which the caller then replaces).  c0, c1 scale what was
 * accumulated so far; b0, b1 are the new bases, p = 2^(s scale_log2 - b).
 * A row with no key yet keeps -inf (c = 0, b = 0: nothing to correct, no
 * inf - inf).  (The running maxima are passed by value so that the
 * caller's loop-carried registers stay as they were: the PTX of
 * mla_flash.cu and mla_flash_wgmma.cu is the same as with the step inline.)
 */
__device__ __forceinline__ void
softmax_rescale_quad(float &t0, float &t1, float mx0, float mx1, float scale_log2,
					 float &c0, float &c1, float &b0, float &b1)
{
	t0 = quad_max(t0);
	t1 = quad_max(t1);
	t0 = fmaxf(t0, mx0);
	t1 = fmaxf(t1, mx1);
	c0 = mx0 == -INFINITY ? 0.0f : exp2f((mx0 - t0) * scale_log2);
	c1 = mx1 == -INFINITY ? 0.0f : exp2f((mx1 - t1) * scale_log2);
	b0 = t0 == -INFINITY ? 0.0f : t0 * scale_log2;
	b1 = t1 == -INFINITY ? 0.0f : t1 * scale_log2;
}

/* two floats as a bf16 pair (lo in the low half), rounded to nearest even
 * (one cvt; the same numbers as f32_to_bf16 for everything but NaN, which
 * moe.cu's pack_bf16x2 keeps as f32_to_bf16 does) */
__device__ __forceinline__ uint32_t
cvt_bf16x2(float lo, float hi)
{
	uint32_t	r;

	asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n":"=r"(r):"f"(hi), "f"(lo));
	return r;
}

/* n floats (a multiple of 4) from global to shared, the block's threads striding */
__device__ __forceinline__ void
copy_f4_async(float *dst, const float *src, int n)
{
	for (int e = threadIdx.x * 4; e < n; e += blockDim.x * 4)
		cp_async16(dst + e, src + e);
}

/*
 * Work item `slot` of an expert launch's list (kk_moe_group: active[1 + slot]
 * = expert * 64 + chunk, a chunk being P pairs): returns the expert, with
 * its item's first pair and pair count (at most P).
 */
__device__ __forceinline__ int
kk_expert_item(const int *active, const int *start, int slot, int P, int *first, int *count)
{
	int			item = active[1 + slot],
				f = start[item >> 6] + (item & 63) * P,
				c = start[(item >> 6) + 1] - f;

	*first = f;
	*count = c < P ? c : P;
	return item >> 6;
}

/*
 * kk_expert_item with the work list read through L2 only (__ldcg): for a
 * kernel that reads it before kk_dep_wait, when the SM's L1 may still hold
 * an earlier layer's lines of the same buffers (expert_rows_kernel's PRE).
 */
__device__ __forceinline__ int
kk_expert_item_l2(const int *active, const int *start, int slot, int P, int *first, int *count)
{
	int			item = __ldcg(active + 1 + slot),
				f = __ldcg(start + (item >> 6)) + (item & 63) * P,
				c = __ldcg(start + (item >> 6) + 1) - f;

	*first = f;
	*count = c < P ? c : P;
	return item >> 6;
}

/* the job of a kk_gemv_batch that this block works on: the one whose range of
 * blocks (from b.first_block[j], set by the launcher) holds blockIdx.x */
__device__ __forceinline__ int
kk_batch_job(const kk_gemv_batch &b)
{
	int			j = 0;

	while (j + 1 < b.count && (int) blockIdx.x >= b.first_block[j + 1])
		j++;
	return j;
}

static inline unsigned
ceil_div(size_t a, size_t b)
{
	return (unsigned) ((a + b - 1) / b);
}

/*
 * sums[w * NR + r] = the block's total of acc[w][r] (shared memory; every
 * thread sees it on return).  Warp sums, then the warps' partials added in
 * warp order: the same result on every run.  (The block-rows GEMVs of
 * gemv.cu and gemv_q.cu.)
 */
template <int NR, int RB, int BT>
__device__ __forceinline__ void
rows_block_sum(float (&acc)[RB][NR], float *sums)
{
	__shared__ float part[RB * NR][BT / 32];
	int			lane = threadIdx.x & 31,
				warp = threadIdx.x >> 5;

#pragma unroll
	for (int w = 0; w < RB; w++)
#pragma unroll
		for (int r = 0; r < NR; r++)
		{
			float		v = warp_sum(acc[w][r]);

			if (lane == 0)
				part[w * NR + r][warp] = v;
		}
	__syncthreads();
	for (int i = threadIdx.x; i < RB * NR; i += BT)
	{
		float		v = 0;

#pragma unroll
		for (int k = 0; k < BT / 32; k++)
			v += part[i][k];
		sums[i] = v;
	}
	__syncthreads();
}

/*
 * y[i0 + r, row0 + w] (r < NR, w < the block's rows out, row0 + w < rows)
 * from an expert block's sums (rows_block_sum of RT weight rows): the sum
 * itself, or with SWIGLU (RT = 2 out: the gate rows, then the same rows of
 * up) silu(gate) * up.  (gemv.cu's and gemv_q.cu's expert kernels.)
 */
template <int NR, bool SWIGLU, int RT, int BT>
__device__ __forceinline__ void
expert_rows_store(float *y, int ldy, const float *sums, int row0, int rows, int i0)
{
	constexpr int out = SWIGLU ? RT / 2 : RT;

	for (int i = threadIdx.x; i < out * NR; i += BT)
	{
		int			w = i / NR,
					r = i % NR;

		if (row0 + w < rows)
		{
			float		v = sums[i];

			if (SWIGLU)
				v = siluf_(v) * sums[(out + w) * NR + r];
			y[(size_t) (i0 + r) * ldy + row0 + w] = v;
		}
	}
}

/* first_block of every job of a tensor-core GEMV batch whose blocks take T
 * 16-row tiles each; returns the grid's blocks (expert_mma.cu, mma_q.cu) */
static inline int
kk_tile_blocks(kk_gemv_batch *b, int T)
{
	int			blocks = 0;

	for (int j = 0; j < b->count; j++)
	{
		b->first_block[j] = blocks;
		blocks += ceil_div(ceil_div(b->job[j].rows, 16), T);
	}
	b->first_block[b->count] = blocks;
	return blocks;
}

/* a batch of one product, y[n, rows] = x W^T in form fmt (KK_WF_*; group:
 * columns per scale of a quantized W), for the one-matrix launchers */
static inline void
kk_one_job(kk_gemv_batch *b, float *y, int ldy, const float *x, int ldx, int n, const void *W, int fmt, int group,
		   int rows, int cols)
{
	memset(b, 0, sizeof(*b));
	b->n = n;
	b->count = 1;
	b->job[0].y = y;
	b->job[0].x = x;
	b->job[0].W = W;
	b->job[0].ldy = ldy;
	b->job[0].ldx = ldx;
	b->job[0].rows = rows;
	b->job[0].cols = cols;
	b->job[0].fmt = fmt;
	b->job[0].bf16 = fmt == KK_WF_BF16;
	b->job[0].group = group;
}

/*
 * Programmatic dependent launch (Hopper): a kernel launched with kk_launch
 * may be started while the kernel before it in the stream is still
 * finishing, so that its launch, block setup and weight prefetches overlap
 * that kernel's tail (a decode step is hundreds of short dependent kernels).
 * The rule that keeps this correct: every kernel launched through kk_launch
 * calls kk_dep_wait() before it touches memory that an earlier kernel
 * writes or reads (only constant data, the weights, may be read before), and
 * it waits before it exits.  kk_dep_wait() returns once the previous grid
 * has completed and its memory is visible; since that grid waited for its
 * own predecessor, the whole stream before it is complete too.
 * kk_dep_launch() lets the next kernel start launching now.  Both are no-ops
 * on older GPUs and for kernels launched without the attribute.
 */
__device__ __forceinline__ void
kk_dep_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.wait;\n":::"memory");
#endif
}

__device__ __forceinline__ void
kk_dep_launch(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	asm volatile("griddepcontrol.launch_dependents;\n":::"memory");
#endif
}

/* prefetch the 128-byte lines of [p, p + bytes) into L2, the warp's lanes (or lane 0 .. threads - 1) striding */
__device__ __forceinline__ void
kk_prefetch_l2(const void *p, size_t bytes, int lane, int threads = 32)
{
	for (size_t o = (size_t) lane * 128; o < bytes; o += (size_t) threads * 128)
		asm volatile("prefetch.global.L2 [%0];\n"::"l"((const char *) p + o));
}

/* set by kk_set_pdl (elementwise.cu): launch with the PDL attribute */
extern int	kk_pdl_on;

/* kern<<<grid, block, smem, s>>>(args...), with programmatic dependent launch when on */
template <typename... P, typename... A>
static inline void
kk_launch(void (*kern) (P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A... args)
{
	cudaLaunchConfig_t cfg;
	cudaLaunchAttribute at[1];

	cfg.gridDim = grid;
	cfg.blockDim = block;
	cfg.dynamicSmemBytes = smem;
	cfg.stream = s;
	at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
	at[0].val.programmaticStreamSerializationAllowed = 1;
	cfg.attrs = at;
	cfg.numAttrs = kk_pdl_on ? 1 : 0;
	cudaLaunchKernelEx(&cfg, kern, ((P) args)...);
}

#endif
