/*
 * expert_mma.cu — the mixture-of-experts products of a decode step on the
 * tensor cores (bf16 precision, bf16 expert weights, steps of several tokens).
 *
 * The CUDA-core expert kernel (gemv.cu) reads the fp32 activation rows of an
 * item again for every 16-byte piece of weights, and at batch 8-64 those
 * reads thrash L1 and hold the weight stream to about 2 TB/s.  Here each
 * work item (an expert and at most 8 of its tokens, the list made by
 * kk_moe_group / kk_moe_route_group) is a small GEMM D[rows, 8] = W X^T:
 *
 *   A = W (bf16 [rows, cols] row-major, m16 x k16 tiles)  streamed once from
 *       memory with 16-byte loads straight into the fragment registers;
 *   B = X^T: the item's tokens, rounded to bf16 once per block and kept in
 *       shared memory (token rows contiguous in k, padded to 8 tokens with
 *       zeros; n = 8 is one mma.sync.m16n8k16 column block);
 *   D: fp32 accumulators.
 *
 * A block takes XM_ROWS weight rows of one item: each warp 16 rows over the
 * whole of k, two register sets of weight pieces alternating so that the
 * loads of the next step are in flight while the tensor cores use this one.
 *
 * The k order inside one mma does not matter to a dot product, only that A
 * and B use the same one.  Lane (g = lane / 4, t = lane % 4) loads 8
 * consecutive k of a weight row, [k0 + 8t, k0 + 8t + 8), as a uint4 {x, y, z,
 * w} of bf16 pairs, and the same 8 k of token g from shared memory.  The PTX
 * fragment of m16n8k16 (PTX ISA "Matrix Fragments for mma.m16n8k16 with
 * floating point type") gives that lane A elements (row g and g + 8; mma-k
 * 2t, 2t+1 and 2t+8, 2t+9) and B elements (column g; mma-k the same four).
 * So one 32-wide k chunk is two mma steps: step 0 puts real k0+8t+{0,1} at
 * mma-k {2t, 2t+1} (.x) and k0+8t+{2,3} at {2t+8, 2t+9} (.y); step 1 the same
 * with .z and .w.  Over the four lanes of a group the 16 mma-k of each step
 * cover 16 distinct real k, and the two steps the whole chunk.
 *
 * Modes (as in gemv.cu): one matrix; two matrices (the second half of the
 * blocks takes W1 -> y1); SwiGLU (gate W0 and up W1 of the same rows, writing
 * silu(gate) * up to y0).  The products round the activations to bf16, as
 * cuBLAS's prefill path does in bf16 precision; the fp32 precision mode never
 * comes here.
 *
 * The plain products of a decode step of 2-8 tokens (projections, lm_head)
 * take the same fragment layout (gemv_mma_kernel): the step's tokens are the
 * n = 8 side, read straight from their fp32 rows, a block's eight warps split
 * the k range of one 16-row tile (a 2304-row matrix is only 144 tiles), the
 * jobs of a kk_gemv_batch share one launch, and since plain weights do not
 * depend on earlier kernels their first pieces are requested before the
 * programmatic-dependent-launch wait.  The CUDA-core GEMV reads
 * 8 fp32 activation rows per 16-byte weight piece there and streams at about
 * a third of the bandwidth (bench/notes-cuda.md).
 */
#include <string.h>

#include "common.cuh"

#define XM_WARPS 4				/* warps per block */
#define XM_ROWS (XM_WARPS * 16) /* weight rows per block: one m16 tile per warp */
#define XM_N 8					/* tokens per work item: the n of the mma */
#define XM_PAD 32				/* bf16 padding per token row in shared memory (bank spread) */
#define XM_SMEM_MAX (48 * 1024) /* the default dynamic shared memory limit */
/* resident blocks per SM the registers must allow: 5 for SwiGLU (96
 * registers, no spills); the one-matrix form holds more B pieces at once and
 * spills at 96, so 4 (104 registers) */
#define XM_MIN_BLOCKS(MODE) ((MODE) == XM_SWIGLU ? 5 : 4)

#define XM_ONE 0
#define XM_TWO 1
#define XM_SWIGLU 2

static_assert(XM_N == KK_EXPERT_MMA_ROWS, "one mma column block per work item");

/* 16 bytes of weights that are read once: not kept in L1 */
__device__ __forceinline__ uint4
ld_weights16(const uint16_t *p)
{
	uint4		v;

	asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
		: "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
	return v;
}

/*
 * The weight pieces of U chunks (32 k each) of NM matrices for one lane:
 * w[m][u][0] row g, w[m][u][1] row g + 8, both at k + 32 u + 8 t.
 */
template <int NM, int U>
struct xm_frag
{
	uint4		w[NM][U][2];
};

template <int NM, int U>
__device__ __forceinline__ void
xm_load(xm_frag<NM, U> &f, const uint16_t *const *rowg, const uint16_t *const *rowg8, int k)
{
#pragma unroll
	for (int m = 0; m < NM; m++)
#pragma unroll
		for (int u = 0; u < U; u++)
		{
			f.w[m][u][0] = ld_weights16(rowg[m] + k + 32 * u);
			f.w[m][u][1] = ld_weights16(rowg8[m] + k + 32 * u);
		}
}

/* acc[m] += the U chunks at k; xg: token g's bf16 row in shared memory, + 8 t */
template <int NM, int U>
__device__ __forceinline__ void
xm_compute(float (*acc)[4], const xm_frag<NM, U> &f, const uint16_t *xg, int k)
{
#pragma unroll
	for (int u = 0; u < U; u++)
	{
		uint4		b = *(const uint4 *) (xg + k + 32 * u);

#pragma unroll
		for (int m = 0; m < NM; m++)
		{
			const uint4 &lo = f.w[m][u][0],
					   &hi = f.w[m][u][1];

			mma_bf16_16816(acc[m], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
			mma_bf16_16816(acc[m], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
		}
	}
}

/*
 * Item blockIdx.y of the work list, rows blockIdx.x of its matrix (in the
 * two-matrix mode the second half of the blocks takes the second matrix).
 * Dynamic shared memory: XM_N token rows of cols + XM_PAD bf16.
 */
template <int MODE>
__global__ void __launch_bounds__(XM_WARPS * 32, XM_MIN_BLOCKS(MODE))
expert_mma_kernel(float *y0, float *y1, int ldy, const float *__restrict__ x, int ldx, const int *__restrict__ xrow,
				  const void *const *W0, const void *const *W1, int rows, int cols, const int *__restrict__ start,
				  const int *__restrict__ active, int P, bool vec)
{
	constexpr int NM = MODE == XM_SWIGLU ? 2 : 1;	/* matrices a warp streams */
	constexpr int U = 4 / NM;	/* 32-wide k chunks per step: 8 pieces per lane per set */
	constexpr int STEP = 32 * U;
	extern __shared__ uint4 xm_smem[];
	uint16_t   *xs = (uint16_t *) xm_smem;
	int			ld = cols + XM_PAD;
	int			per = (rows + XM_ROWS - 1) / XM_ROWS;
	int			m1 = MODE == XM_TWO && (int) blockIdx.x >= per;
	int			warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31,
				g = lane >> 2,
				t = lane & 3;
	int			r0 = ((int) blockIdx.x - m1 * per) * XM_ROWS + warp * 16;
	int			e,
				first,
				count,
				kfull;
	const uint16_t *rowg[NM],
			   *rowg8[NM];
	float		acc[NM][4];
	xm_frag<NM, U> fa,
				fb;

	/* which experts run depends on the routing kernel before: wait first */
	kk_dep_wait();
	kk_dep_launch();
	if ((int) blockIdx.y >= active[0])
		return;					/* the whole block: no barrier is skipped */
	e = kk_expert_item(active, start, blockIdx.y, P, &first, &count);

	/* this lane's two weight rows (clamped inside the matrix; stores are guarded) */
	{
		int			ra = r0 + g < rows ? r0 + g : rows - 1,
					rb = r0 + g + 8 < rows ? r0 + g + 8 : rows - 1;

#pragma unroll
		for (int m = 0; m < NM; m++)
		{
			const uint16_t *W = (const uint16_t *) (MODE == XM_SWIGLU ? (m ? W1[e] : W0[e]) : (m1 ? W1[e] : W0[e]));

			rowg[m] = W + (size_t) ra * cols + 8 * t;
			rowg8[m] = W + (size_t) rb * cols + 8 * t;
			acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0;
		}
	}

	/* the first weight pieces travel while the tokens are staged */
	kfull = cols - cols % STEP;
	if (r0 < rows && kfull > 0)
		xm_load<NM, U>(fa, rowg, rowg8, 0);

	/* the item's tokens as bf16 (zeros past count), 4 values a thread at a time;
	 * unrolled so that several of the (L2-resident) activation loads overlap */
	{
		int			q = cols >> 2;

#pragma unroll 2
		for (int i = threadIdx.x; i < XM_N * q; i += XM_WARPS * 32)
		{
			int			j = i / q,
						k = (i - j * q) * 4;
			float4		v = make_float4(0, 0, 0, 0);
			uint2		packed;

			if (j < count)
			{
				const float *xr = x + (size_t) (xrow ? xrow[first + j] : first + j) * ldx + k;

				if (vec)
					v = __ldg((const float4 *) xr);
				else
					v = make_float4(xr[0], xr[1], xr[2], xr[3]);
			}
			packed.x = (uint32_t) f32_to_bf16(v.x) | ((uint32_t) f32_to_bf16(v.y) << 16);
			packed.y = (uint32_t) f32_to_bf16(v.z) | ((uint32_t) f32_to_bf16(v.w) << 16);
			*(uint2 *) (xs + (size_t) j * ld + k) = packed;
		}
	}
	__syncthreads();
	if (r0 >= rows)
		return;					/* no barrier follows */

	/* k in steps of STEP, two register sets alternating; then 32-wide chunks */
	{
		const uint16_t *xg = xs + (size_t) g * ld + 8 * t;

		for (int k = 0; k < kfull; k += 2 * STEP)
		{
			if (k + STEP < kfull)
				xm_load<NM, U>(fb, rowg, rowg8, k + STEP);
			xm_compute<NM, U>(acc, fa, xg, k);
			if (k + STEP >= kfull)
				break;
			if (k + 2 * STEP < kfull)
				xm_load<NM, U>(fa, rowg, rowg8, k + 2 * STEP);
			xm_compute<NM, U>(acc, fb, xg, k + STEP);
		}
		for (int k = kfull; k < cols; k += 32)
		{
			xm_frag<NM, 1> f1;

			xm_load<NM, 1>(f1, rowg, rowg8, k);
			xm_compute<NM, 1>(acc, f1, xg, k);
		}
	}

	/* D fragment: acc[.][i] is row g (i < 2) or g + 8, token 2t + (i & 1) */
	{
		float	   *y = m1 ? y1 : y0;

#pragma unroll
		for (int i = 0; i < 4; i++)
		{
			int			row = r0 + g + (i >= 2 ? 8 : 0),
						tok = 2 * t + (i & 1);
			float		v = acc[0][i];

			if (MODE == XM_SWIGLU)
				v = siluf_(v) * acc[NM - 1][i];
			if (row < rows && tok < count)
				y[(size_t) (first + tok) * ldy + row] = v;
		}
	}
}

static size_t
xm_smem_bytes(int cols)
{
	return (size_t) XM_N * (cols + XM_PAD) * sizeof(uint16_t);
}

extern "C" int
kk_expert_mma_ok(int cols)
{
	return cols > 0 && cols % 32 == 0 && xm_smem_bytes(cols) <= XM_SMEM_MAX;
}

extern "C" void
kk_expert_mma(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
			  const void *const *W0, const void *const *W1, int rows, int cols, const int *start, const int *active,
			  int max_active, int P)
{
	bool		vec = ldx % 4 == 0 && ((uintptr_t) x & 15) == 0;
	int			mode = !W1 ? XM_ONE : y1 ? XM_TWO : XM_SWIGLU;
	dim3		grid(ceil_div(rows, XM_ROWS) * (mode == XM_TWO ? 2 : 1), max_active);
	dim3		block(XM_WARPS * 32);
	size_t		smem = xm_smem_bytes(cols);

	if (max_active <= 0 || rows <= 0)
		return;
	if (mode == XM_ONE)
		kk_launch(expert_mma_kernel<XM_ONE>, grid, block, smem, s, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols,
				  start, active, P, vec);
	else if (mode == XM_TWO)
		kk_launch(expert_mma_kernel<XM_TWO>, grid, block, smem, s, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols,
				  start, active, P, vec);
	else
		kk_launch(expert_mma_kernel<XM_SWIGLU>, grid, block, smem, s, y0, y1, ldy, x, ldx, xrow, W0, W1, rows, cols,
				  start, active, P, vec);
}

/* ------------------------------------------------------------------ plain products */

#define GM_WARPS 8				/* warps of a block: one m16 tile of rows, the k range split 8 ways */
#define GM_U 2					/* 32-wide k chunks a warp has in flight per register set */

/* the weight pieces of the warp's chunks i0 .. i0 + GM_U (chunk c = warp + GM_WARPS i) for rows g and g + 8 */
__device__ __forceinline__ void
gm_load_w(uint4 (&w)[GM_U][2], const uint16_t *rg, const uint16_t *rg8, int warp, int i0, int nchunk)
{
#pragma unroll
	for (int u = 0; u < GM_U; u++)
	{
		int			c = warp + GM_WARPS * (i0 + u);

		if (c < nchunk)
		{
			w[u][0] = ld_weights16(rg + 32 * c);
			w[u][1] = ld_weights16(rg8 + 32 * c);
		}
	}
}

/* token g's activations for the same chunks (zeros for g >= n: has_x false), fp32 */
__device__ __forceinline__ void
gm_load_x(float4 (&x)[GM_U][2], const float *xg, bool has_x, bool vec, int warp, int i0, int nchunk)
{
#pragma unroll
	for (int u = 0; u < GM_U; u++)
	{
		int			c = warp + GM_WARPS * (i0 + u);
		const float *xp = xg + 32 * c;

		x[u][0] = x[u][1] = make_float4(0, 0, 0, 0);
		if (has_x && c < nchunk)
		{
			if (vec)
			{
				x[u][0] = __ldg((const float4 *) xp);
				x[u][1] = __ldg((const float4 *) xp + 1);
			}
			else
			{
				x[u][0] = make_float4(xp[0], xp[1], xp[2], xp[3]);
				x[u][1] = make_float4(xp[4], xp[5], xp[6], xp[7]);
			}
		}
	}
}

/* acc += those chunks: the activations rounded to bf16, two mma steps a chunk */
__device__ __forceinline__ void
gm_compute(float *acc, const uint4 (&w)[GM_U][2], const float4 (&x)[GM_U][2], int warp, int i0, int nchunk)
{
#pragma unroll
	for (int u = 0; u < GM_U; u++)
	{
		int			c = warp + GM_WARPS * (i0 + u);
		const float4 &a = x[u][0],
				   &b = x[u][1];
		uint32_t	b0,
					b1,
					b2,
					b3;

		if (c >= nchunk)
			break;
		b0 = (uint32_t) f32_to_bf16(a.x) | ((uint32_t) f32_to_bf16(a.y) << 16);
		b1 = (uint32_t) f32_to_bf16(a.z) | ((uint32_t) f32_to_bf16(a.w) << 16);
		b2 = (uint32_t) f32_to_bf16(b.x) | ((uint32_t) f32_to_bf16(b.y) << 16);
		b3 = (uint32_t) f32_to_bf16(b.z) | ((uint32_t) f32_to_bf16(b.w) << 16);
		mma_bf16_16816(acc, w[u][0].x, w[u][1].x, w[u][0].y, w[u][1].y, b0, b1);
		mma_bf16_16816(acc, w[u][0].z, w[u][1].z, w[u][0].w, w[u][1].w, b2, b3);
	}
}

/*
 * Block b: 16 weight rows (one m16 tile) of the job whose range of blocks
 * holds it (b.first_block, set by the launcher), for the b.n (<= 8)
 * activation rows of that job.  The eight warps split the k range (warp w
 * takes the 32-wide chunks w, w + 8, ...), so that even a 2304-row matrix
 * keeps over a thousand warps streaming; their partial tiles are added in
 * warp order.  Lane (g, t) reads its token g's activations straight from
 * the (L1-resident) fp32 rows, as many bytes as it reads weights, together
 * with the weights of the same chunks, one register set ahead of the mma.
 */
__global__ void __launch_bounds__(GM_WARPS * 32, 2)
gemv_mma_kernel(kk_gemv_batch b)
{
	__shared__ float part[GM_WARPS][32][4];
	int			j = kk_batch_job(b);

	{
		const kk_gemv_job *jb = &b.job[j];
		int			rows = jb->rows,
					cols = jb->cols,
					n = b.n,
					nchunk = cols >> 5;
		int			warp = threadIdx.x >> 5,
					lane = threadIdx.x & 31,
					g = lane >> 2,
					t = lane & 3;
		int			r0 = ((int) blockIdx.x - b.first_block[j]) * 16;
		int			ra = r0 + g < rows ? r0 + g : rows - 1,
					rb = r0 + g + 8 < rows ? r0 + g + 8 : rows - 1;
		const uint16_t *rg = (const uint16_t *) jb->W + (size_t) ra * cols + 8 * t,
				   *rg8 = (const uint16_t *) jb->W + (size_t) rb * cols + 8 * t;
		int			per_warp = (nchunk - warp + GM_WARPS - 1) / GM_WARPS;
		bool		has_x = g < n;
		float		acc[4] = {0, 0, 0, 0};
		uint4		wa[GM_U][2],
					wb[GM_U][2];
		float4		xa[GM_U][2],
					xb[GM_U][2];
		const float *xg;

		/* the weights do not depend on earlier kernels: request them before waiting */
		gm_load_w(wa, rg, rg8, warp, 0, nchunk);
		kk_dep_wait();
		kk_dep_launch();
		xg = jb->x + (size_t) (has_x ? g : 0) * jb->ldx + 8 * t;
		gm_load_x(xa, xg, has_x, jb->vec, warp, 0, nchunk);
		for (int i = 0; i < per_warp; i += 2 * GM_U)
		{
			if (i + GM_U < per_warp)
			{
				gm_load_w(wb, rg, rg8, warp, i + GM_U, nchunk);
				gm_load_x(xb, xg, has_x, jb->vec, warp, i + GM_U, nchunk);
			}
			gm_compute(acc, wa, xa, warp, i, nchunk);
			if (i + GM_U >= per_warp)
				break;
			if (i + 2 * GM_U < per_warp)
			{
				gm_load_w(wa, rg, rg8, warp, i + 2 * GM_U, nchunk);
				gm_load_x(xa, xg, has_x, jb->vec, warp, i + 2 * GM_U, nchunk);
			}
			gm_compute(acc, wb, xb, warp, i + GM_U, nchunk);
		}
#pragma unroll
		for (int i = 0; i < 4; i++)
			part[warp][lane][i] = acc[i];
		__syncthreads();
		if (warp == 0)
		{
#pragma unroll
			for (int i = 0; i < 4; i++)
			{
				int			row = r0 + g + (i >= 2 ? 8 : 0),
							tok = 2 * t + (i & 1);
				float		v = 0;

				for (int w = 0; w < GM_WARPS; w++)
					v += part[w][lane][i];
				if (row < rows && tok < n)
					jb->y[(size_t) tok * jb->ldy + row] = v;
			}
		}
	}
}

extern "C" int
kk_gemv_mma_ok(int cols)
{
	return cols > 0 && cols % 32 == 0;
}

/* ------------------------------------------------------- plain products, slabs */

/*
 * gemv_slab_kernel (KL_CUDA_GEMV_MMA_SLAB, default on): the same products as
 * gemv_mma_kernel, shaped as expert_mma_kernel streams.  Why gemv_mma_kernel
 * stays far below the expert kernel's bandwidth with the same mma shapes:
 * each of its warps has only 2 KB of weights per register set in flight
 * (two 32-wide chunks), every weight piece comes with 32 bytes of fp32
 * activations loaded through L1 in the same loop (the latency of both in
 * every step), a warp's chunks are 8 apart in k (64-byte runs of a row), and
 * a block lives for only 16 rows x 1/8 of k (a few sets) before its
 * barrier and reduction.  Here:
 *   - a block of 8 warps takes T consecutive 16-row tiles (a slab of 16 T
 *     rows), its warps split as T tiles x S = 8 / T contiguous k ranges;
 *     the launcher picks T (8, 4, 2, 1) per launch, the largest that still
 *     gives two blocks per SM, so a 2304-row matrix keeps 144 blocks while
 *     lm_head's take 128 rows each;
 *   - the n <= 8 activation rows are rounded to bf16 once per block into
 *     shared memory (zeros past n), as expert_mma_kernel does, so that the
 *     loop reads one 16-byte B piece a chunk from shared memory;
 *   - a warp streams GS_U = 4 consecutive chunks per register set (4 KB
 *     of weights, 256-byte runs of each row), two sets alternating, and both
 *     first sets are requested before the programmatic-dependent-launch
 *     wait: up to 8 KB a warp, 128 KB an SM in flight;
 *   - the S partial tiles of a tile are added in k order through shared
 *     memory (S = 1: written straight from the fragment).
 * Same bf16 rounding of the activations (f32_to_bf16) and the same fragment
 * layout as gemv_mma_kernel, so the two differ only in the order of the fp32
 * sums.
 */
#define GS_WARPS 8				/* warps of a block: T tiles x S k ranges */
#define GS_U 4					/* 32-wide chunks a warp has in a register set */
#define GS_PAD 32				/* bf16 padding of a staged row: rows 64 bytes apart mod 128 (no bank conflicts) */
#define GS_LOADS 8				/* float4 activation loads a thread has in flight while staging */
#define GS_SMEM_MAX (160 * 1024)	/* staged rows up to ~10000 columns; wider: gemv_mma_kernel */

/* the weight pieces of chunks c .. c + GS_U (those below c1) for rows g and g + 8 */
__device__ __forceinline__ void
gs_load(uint4 (&w)[GS_U][2], const uint16_t *rg, const uint16_t *rg8, int c, int c1)
{
#pragma unroll
	for (int u = 0; u < GS_U; u++)
		if (c + u < c1)
		{
			w[u][0] = ld_weights16(rg + 32 * (c + u));
			w[u][1] = ld_weights16(rg8 + 32 * (c + u));
		}
}

/* acc += those chunks; xg: token g's staged bf16 row, + 8 t */
__device__ __forceinline__ void
gs_compute(float *acc, const uint4 (&w)[GS_U][2], const uint16_t *xg, int c, int c1)
{
#pragma unroll
	for (int u = 0; u < GS_U; u++)
		if (c + u < c1)
		{
			uint4		b = *(const uint4 *) (xg + 32 * (c + u));

			mma_bf16_16816(acc, w[u][0].x, w[u][1].x, w[u][0].y, w[u][1].y, b.x, b.y);
			mma_bf16_16816(acc, w[u][0].z, w[u][1].z, w[u][0].w, w[u][1].w, b.z, b.w);
		}
}

/*
 * The job's n activation rows as bf16 into xs (row j at j * ld, rows n..7
 * zero): GS_LOADS float4 loads per thread issued before any is used, so a
 * 2304-column matrix costs three L2 round trips, not eighteen.
 */
__device__ __forceinline__ void
gs_stage(uint16_t *xs, int ld, const kk_gemv_job *jb, int n, int cols)
{
	int			q = cols >> 2,
				total = XM_N * q;

	for (int base = threadIdx.x; base < total; base += GS_LOADS * GS_WARPS * 32)
	{
		float4		v[GS_LOADS];

#pragma unroll
		for (int u = 0; u < GS_LOADS; u++)
		{
			int			i = base + u * GS_WARPS * 32,
						j = i / q,
						k = (i - j * q) * 4;

			v[u] = make_float4(0, 0, 0, 0);
			if (i < total && j < n)
			{
				const float *xr = jb->x + (size_t) j * jb->ldx + k;

				if (jb->vec)
					v[u] = __ldg((const float4 *) xr);
				else
					v[u] = make_float4(xr[0], xr[1], xr[2], xr[3]);
			}
		}
#pragma unroll
		for (int u = 0; u < GS_LOADS; u++)
		{
			int			i = base + u * GS_WARPS * 32,
						j = i / q,
						k = (i - j * q) * 4;
			uint2		packed;

			if (i >= total)
				break;
			packed.x = (uint32_t) f32_to_bf16(v[u].x) | ((uint32_t) f32_to_bf16(v[u].y) << 16);
			packed.y = (uint32_t) f32_to_bf16(v[u].z) | ((uint32_t) f32_to_bf16(v[u].w) << 16);
			*(uint2 *) (xs + (size_t) j * ld + k) = packed;
		}
	}
}

/*
 * Block b: tiles (b - b.first_block[j]) T .. + T of job j (16 rows each),
 * all b.n activation rows.  Warp w: tile w % T, k range w / T of S = 8 / T
 * (chunks [s nchunk / S, (s + 1) nchunk / S)).  Dynamic shared memory: the
 * staged rows, XM_N x (widest job's cols + GS_PAD) bf16.
 */
__global__ void __launch_bounds__(GS_WARPS * 32, 2)
gemv_slab_kernel(kk_gemv_batch b, int T)
{
	extern __shared__ uint4 gs_smem[];
	__shared__ float part[GS_WARPS][32][4];
	uint16_t   *xs = (uint16_t *) gs_smem;
	int			j = kk_batch_job(b);

	{
		const kk_gemv_job *jb = &b.job[j];
		int			rows = jb->rows,
					cols = jb->cols,
					n = b.n,
					nchunk = cols >> 5,
					ld = cols + GS_PAD,
					S = GS_WARPS / T;
		int			warp = threadIdx.x >> 5,
					lane = threadIdx.x & 31,
					g = lane >> 2,
					t = lane & 3,
					tile = warp % T,
					s = warp / T;
		int			r0 = (((int) blockIdx.x - b.first_block[j]) * T + tile) * 16;
		bool		live = r0 < rows;	/* a slab's last tiles may lie past the matrix */
		int			ra = r0 + g < rows ? r0 + g : rows - 1,
					rb = r0 + g + 8 < rows ? r0 + g + 8 : rows - 1;
		int			c0 = s * nchunk / S,
					c1 = (s + 1) * nchunk / S;
		const uint16_t *rg = (const uint16_t *) jb->W + (size_t) ra * cols + 8 * t,
				   *rg8 = (const uint16_t *) jb->W + (size_t) rb * cols + 8 * t;
		float		acc[4] = {0, 0, 0, 0};
		uint4		wa[GS_U][2],
					wb[GS_U][2];

		/* the weights do not depend on earlier kernels: both sets travel before the wait */
		if (live)
		{
			gs_load(wa, rg, rg8, c0, c1);
			gs_load(wb, rg, rg8, c0 + GS_U, c1);
		}
		kk_dep_wait();
		kk_dep_launch();
		gs_stage(xs, ld, jb, n, cols);
		__syncthreads();

		if (live)
		{
			const uint16_t *xg = xs + (size_t) g * ld + 8 * t;

			for (int c = c0; c < c1; c += 2 * GS_U)
			{
				gs_compute(acc, wa, xg, c, c1);
				if (c + 2 * GS_U < c1)
					gs_load(wa, rg, rg8, c + 2 * GS_U, c1);
				if (c + GS_U >= c1)
					break;
				gs_compute(acc, wb, xg, c + GS_U, c1);
				if (c + 3 * GS_U < c1)
					gs_load(wb, rg, rg8, c + 3 * GS_U, c1);
			}
		}

		/* D fragment: acc[i] is row g (i < 2) or g + 8, token 2t + (i & 1); the S ranges added in k order */
		if (S > 1)
		{
#pragma unroll
			for (int i = 0; i < 4; i++)
				part[warp][lane][i] = acc[i];
			__syncthreads();	/* S is the same for the whole block */
			if (s != 0)
				return;
#pragma unroll
			for (int i = 0; i < 4; i++)
			{
				acc[i] = part[tile][lane][i];
				for (int r = 1; r < S; r++)
					acc[i] += part[r * T + tile][lane][i];
			}
		}
		if (!live)
			return;
#pragma unroll
		for (int i = 0; i < 4; i++)
		{
			int			row = r0 + g + (i >= 2 ? 8 : 0),
						tok = 2 * t + (i & 1);

			if (row < rows && tok < n)
				jb->y[(size_t) tok * jb->ldy + row] = acc[i];
		}
	}
}

/* set by kk_set_gemv_mma_slab: plain tensor-core products in gemv_slab_kernel (else gemv_mma_kernel) */
static int	kk_gemv_slab = 1;

extern "C" void
kk_set_gemv_mma_slab(int on)
{
	kk_gemv_slab = on;
}

/*
 * The slab launch: T the largest of 8, 4, 2, 1 that still gives two blocks
 * an SM (fewer, bigger slabs stage the activations fewer times; below that
 * SMs would sit idle).  Returns false, launching nothing, when the staged
 * rows of the widest job do not fit in shared memory.
 */
#define GS_MIN_TILES 4			/* 16-row tiles a block at least (see gemv_slab_launch) */

static bool
gemv_slab_launch(cudaStream_t s, kk_gemv_batch *b)
{
	int			maxcols = 0,
				dev = 0,
				sms = 132,
				T = GS_WARPS,
				blocks;
	size_t		smem;

	for (int j = 0; j < b->count; j++)
		maxcols = b->job[j].cols > maxcols ? b->job[j].cols : maxcols;
	smem = (size_t) XM_N * (maxcols + GS_PAD) * sizeof(uint16_t);
	if (smem > GS_SMEM_MAX)
		return false;
	if (cudaGetDevice(&dev) != cudaSuccess ||
		cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
		sms = 132;
	blocks = kk_tile_blocks(b, T);
	while (T > 1 && blocks < 2 * sms)
		blocks = kk_tile_blocks(b, T /= 2);
	/*
	 * Only tall products: slabs of 4+ tiles won on the H200 (lm_head 68 -> 91 %
	 * of a plain read, 8 expert downs 60 -> 73 %), while with 1-2 tiles a block
	 * (o_proj, router, a projection batch) they lost or tied the 16-row-tile
	 * kernel (50 -> 42 %, 37 -> 32 %, 65 -> 66 %; bench/notes-cuda.md).
	 */
	if (T < GS_MIN_TILES)
		return false;
	if (smem > XM_SMEM_MAX &&
		cudaFuncSetAttribute(gemv_slab_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem) !=
		cudaSuccess)
		return false;
	kk_launch(gemv_slab_kernel, dim3(blocks), dim3(GS_WARPS * 32), smem, s, *b, T);
	return true;
}

/* kk_gemv_multi_mma with the kernel chosen: slab (gemv_slab_kernel where it fits) or not */
extern "C" void
kk_gemv_multi_mma_as(cudaStream_t s, kk_gemv_batch *b, int slab)
{
	if (b->count <= 0 || b->n <= 0 || b->n > XM_N)
		return;
	for (int j = 0; j < b->count; j++)
		b->job[j].vec = b->job[j].ldx % 4 == 0 && ((uintptr_t) b->job[j].x & 15) == 0;
	if (slab && gemv_slab_launch(s, b))
		return;
	kk_launch(gemv_mma_kernel, dim3(kk_tile_blocks(b, 1)), dim3(GM_WARPS * 32), 0, s, *b);
}

extern "C" void
kk_gemv_multi_mma(cudaStream_t s, kk_gemv_batch *b)
{
	kk_gemv_multi_mma_as(s, b, kk_gemv_slab);
}

extern "C" void
kk_gemv_mma(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int n, const void *W, int rows, int cols)
{
	kk_gemv_batch b;

	kk_one_job(&b, y, ldy, x, ldx, n, W, KK_WF_BF16, 0, rows, cols);
	kk_gemv_multi_mma(s, &b);
}
