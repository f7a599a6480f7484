/*
 * mma_q.cu — tensor-core products of quantized weights (FP8 E4M3 and int4)
 * for the bf16 precision mode's decode: the dense products of steps up to
 * KK_GEMV_MMA_Q_ROWS tokens (kk_gemv_mma_q, kk_gemv_multi_mma_q) and the
 * expert products (kk_expert_mma_q).  Contracts: kernels.h, "Quantized
 * weights on the device" and the mma_q.cu paragraph.
 *
 * Dense products take one of four kernels: the staging kernel (any form,
 * activations staged in shared memory per block), the direct kernel (FP8
 * with one scale a row, up to 8 rows, activations read and converted per
 * chunk; KL_CUDA_Q_DIRECT), the dense kernel (the same FP8 products at
 * any row count, the batch's activations converted once by a launch of
 * their own into caller-given room, or read from the producer's bf16 twin
 * where the caller presets one (KL_CUDA_Q_TWIN); KL_CUDA_Q_DENSE, the
 * backend's default)
 * and the slab kernel (the dense kernel's jobs with the weights copied
 * into shared memory, Hopper; KL_CUDA_Q_DENSE=3, opt-in): each section
 * below says why it is shaped so.
 *
 * Decode is memory-bound: the point of FP8 / int4 weights is to stream half
 * / a quarter of bf16's bytes, so the weights go from 16-byte (or 8 / 4
 * byte) loads straight into registers and are turned into bf16 mma.m16n8k16
 * A fragments there, a few integer instructions per pair of weights:
 *
 *   FP8   byte b -> bf16 bits ((b & 0x80) << 8) | ((b & 0x7f) << 4), the
 *         value times 2^-120 exactly (E4M3 subnormals become bf16
 *         subnormals).  Two bytes at a time: prmt sign-extends each byte to
 *         16 bits (0xff.. for negative bytes), << 4 moves the 7 low bits to
 *         the bf16 exponent/mantissa position and the sign copies to bit 15,
 *         & 0x87f0 per half clears the rest (bits the low half shifts into
 *         the high half land in its cleared low nibble).
 *   int4  nibble j (q + 8) -> bf16 0x4300 | j = 128 + j, then one bf16x2
 *         fma (v * 1 - 136) gives q exactly.  Pair p of a 32-bit word holds
 *         columns p and p + 4 (one shift and one lop3 for both).
 *
 * The activations are rounded to bf16 (as kk_expert_mma / kk_gemv_mma do)
 * and staged once per block in shared memory.  For FP8 they are staged
 * times 2^64 (exact: a power of two, |x| < 2^64 assumed) so that products
 * of the 2^-120-scaled weights stay far from fp32's subnormal range whatever
 * the activations' size (the tensor cores' fp32 accumulators are not
 * guaranteed to keep subnormals); 2^120 / 2^64 = 2^56 is folded into the
 * scale (|scale| < 256: no overflow).  For int4 the staged rows are permuted
 * within each 8 columns to (0 4 1 5 2 6 3 7), the order the nibble pairs
 * come out, so that one 8-byte shared-memory read is an mma B fragment.
 *
 * Fragment layout (PTX "Matrix Fragments for mma.m16n8k16", lane g = lane
 * / 4, t = lane % 4): lane (g, t) holds A elements of rows g and g + 8 at
 * mma-k {2t, 2t+1} (a0, a1) and {2t+8, 2t+9} (a2, a3), B elements of
 * column g at the same mma-k.  The order of k inside one mma does not
 * matter to a dot product, only that A and B agree, so lane t simply takes
 * the consecutive weights of its own load: a "chunk" of CK = 4 LW (FP8) or
 * 8 LW (int4) columns is the four lanes' LW-byte loads of one row, and each
 * 32-bit word of a lane is one (FP8) or two (int4) mma steps.  A chunk lies
 * inside one scale group (the launcher picks LW so that CK divides the
 * group), so each chunk's steps are summed in a fresh accumulator that is
 * then added times its group's scale (per chunk rather than per group: a k
 * range may then start or end between any two chunks - the S ranges of a
 * tile, segments - and one fma per chunk and output is little next to the
 * chunk's mma steps); with one scale a row (group >= cols) the scale is
 * applied once at the end.  Each weight fragment feeds ceil(n / 8)
 * mma n-blocks (NB), so the weights stream once for all rows.
 *
 * Blocks: dense products take 8 warps as T tiles of 16 rows x S = 8 / T
 * ranges of k (as gemv_slab_kernel: T the largest of 8, 4, 2, 1 that keeps
 * two blocks an SM), the S partial tiles added in k order.  Where the
 * staged rows of all of k would not fit (many rows x wide matrices), the
 * block stages and computes k in segments; the next segment's weights are
 * requested before its staging barrier.  Expert items take 8 warps, one
 * tile each over all of k, the item's (at most 8) tokens gathered through
 * xrow.  Each warp streams two register sets of 2 KB of weights (U chunks
 * each), alternating, the first two requested before the dependent-launch
 * wait where the weights are known (dense products).
 *
 * Accuracy: the weights' values are exact in bf16, the products exact in
 * fp32; against quant.h's reference (fl(q * scale) weights) the results
 * differ by fp32 rounding of the sums and of the scale multiplications.
 */
#include <string.h>

#include "common.cuh"

#define MQ_WARPS 8				/* warps of a dense-product block */
#define MQ_XWARPS 8				/* warps of an expert block: one 16-row tile each (128 rows: the
								 * staged tokens are read once per 128 rows, not 64) */
#define MQ_SMEM (96 * 1024)		/* staged rows a block: two blocks an SM */
#define MQ_FP8_SCALE 0x1p56f	/* 2^120 (the decode) / 2^64 (the staged activations) */
#define MQ_FP8_XSCALE 0x1p64f

/* ------------------------------------------------------------------ decoding */

__device__ __forceinline__ uint32_t
mq_prmt(uint32_t a, uint32_t sel)
{
	uint32_t	r;

	asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(r) : "r"(a), "r"(sel));
	return r;
}

/* FP8 bytes 0, 1 (lo) and 2, 3 (hi) of w as bf16 pairs, value x 2^-120 */
__device__ __forceinline__ uint32_t
mq_fp8_lo(uint32_t w)
{
	return (mq_prmt(w, 0x9180) << 4) & 0x87f087f0u;
}

__device__ __forceinline__ uint32_t
mq_fp8_hi(uint32_t w)
{
	return (mq_prmt(w, 0xB3A2) << 4) & 0x87f087f0u;
}

/* int4 columns p and p + 4 of w (nibbles hold q + 8) as the bf16 pair (q_p, q_p+4) */
__device__ __forceinline__ uint32_t
mq_int4_pair(uint32_t w, int p)
{
	uint32_t	v = ((w >> (4 * p)) & 0x000f000fu) | 0x43004300u,
				r;

	/* 128 + j - 136: exact in bf16 (0x3f80 = 1, 0xc308 = -136) */
	asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(v), "r"(0x3f803f80u), "r"(0xc308c308u));
	return r;
}

/* LW bytes of weights read once: 16 and 8 bypass L1; 4 (a quad reads half a
 * 32-byte sector) goes through L1 so that the next chunk's load finds the
 * other half there */
template <int LW>
__device__ __forceinline__ void
mq_ld(uint32_t (&w)[LW / 4], const uint8_t *p)
{
	if constexpr (LW == 16)
		asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
			: "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
	else if constexpr (LW == 8)
		asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
	else
		asm("ld.global.nc.u32 %0, [%1];\n" : "=r"(w[0]) : "l"(p));
}

/* ------------------------------------------------------------------ one warp's tile */

/*
 * The stream of one warp over one matrix: 16 rows (lane rows g and g + 8)
 * for chunks [c0, c1), two register sets of U chunks alternating.
 * rg / rg8: the lane's rows, + t LW bytes; sg / sg8: their scales.
 */
template <int FMT, int LW, int NB, bool GROUPED>
struct mq_stream
{
	static constexpr int WPB = FMT == KK_WF_INT4 ? 2 : 1;	/* weights a byte */
	static constexpr int NW = LW / 4;	/* 32-bit words a lane loads per row and chunk */
	static constexpr int CK = 4 * LW * WPB;	/* columns of a chunk */
	static constexpr int U = 32 / LW;	/* chunks a register set: 2 KB of weights a warp */

	const uint8_t *rg,
			   *rg8;
	const float *sg,
			   *sg8;
	int			cpg;			/* chunks per scale group (GROUPED) */
	uint32_t	wa[U][2][NW],
				wb[U][2][NW];
	float		sa[U][2],
				sb[U][2];

	__device__ __forceinline__ void
	load(uint32_t (&w)[U][2][NW], float (&s)[U][2], int c, int c1)
	{
#pragma unroll
		for (int u = 0; u < U; u++)
			if (c + u < c1)
			{
				mq_ld<LW>(w[u][0], rg + (size_t) (c + u) * 4 * LW);
				mq_ld<LW>(w[u][1], rg8 + (size_t) (c + u) * 4 * LW);
				if (GROUPED)
				{
					int			grp = (c + u) / cpg;

					s[u][0] = __ldg(sg + grp);
					s[u][1] = __ldg(sg8 + grp);
				}
			}
	}

	/* acc += chunk c's steps; xl: the lane's staged row g at chunk c, + t's columns; ld: staged row stride */
	__device__ __forceinline__ static void
	chunk(float (&acc)[NB][4], const uint32_t (&w)[2][NW], const uint16_t *xl, int ld)
	{
#pragma unroll
		for (int i = 0; i < NW; i++)
#pragma unroll
			for (int h = 0; h < WPB; h++)
			{
				uint32_t	a0,
							a1,
							a2,
							a3;

				if (FMT == KK_WF_INT4)
				{
					a0 = mq_int4_pair(w[0][i], 2 * h);
					a2 = mq_int4_pair(w[0][i], 2 * h + 1);
					a1 = mq_int4_pair(w[1][i], 2 * h);
					a3 = mq_int4_pair(w[1][i], 2 * h + 1);
				}
				else
				{
					a0 = mq_fp8_lo(w[0][i]);
					a2 = mq_fp8_hi(w[0][i]);
					a1 = mq_fp8_lo(w[1][i]);
					a3 = mq_fp8_hi(w[1][i]);
				}
#pragma unroll
				for (int nb = 0; nb < NB; nb++)
				{
					uint2		b = *(const uint2 *) (xl + (size_t) nb * 8 * ld + 4 * (i * WPB + h));

					mma_bf16_16816(acc[nb], a0, a1, a2, a3, b.x, b.y);
				}
			}
	}

	/* tot += the set's chunks c .. c + U (below c1); x0: the lane's staged row at chunk cx */
	__device__ __forceinline__ void
	compute(float (&tot)[NB][4], const uint32_t (&w)[U][2][NW], const float (&s)[U][2], const uint16_t *xl,
			int ld, int cx, int c, int c1)
	{
#pragma unroll
		for (int u = 0; u < U; u++)
			if (c + u < c1)
			{
				const uint16_t *xc = xl + (size_t) (c + u - cx) * CK;

				if (!GROUPED)
					chunk(tot, w[u], xc, ld);
				else
				{
					float		p[NB][4];

#pragma unroll
					for (int nb = 0; nb < NB; nb++)
						p[nb][0] = p[nb][1] = p[nb][2] = p[nb][3] = 0;
					chunk(p, w[u], xc, ld);
					/* one chunk lies in one group: add it scaled (rows g: i < 2, g + 8: i >= 2) */
#pragma unroll
					for (int nb = 0; nb < NB; nb++)
#pragma unroll
						for (int i = 0; i < 4; i++)
							tot[nb][i] = fmaf(p[nb][i], s[u][i >> 1], tot[nb][i]);
				}
			}
	}

	/* request the first two sets of [c0, c1) */
	__device__ __forceinline__ void
	prime(int c0, int c1)
	{
		load(wa, sa, c0, c1);
		load(wb, sb, c0 + U, c1);
	}

	/* tot += chunks [c0, c1), primed; xl: the lane's staged row at chunk cx */
	__device__ __forceinline__ void
	run(float (&tot)[NB][4], const uint16_t *xl, int ld, int cx, int c0, int c1)
	{
		for (int c = c0; c < c1; c += 2 * U)
		{
			compute(tot, wa, sa, xl, ld, cx, c, c1);
			if (c + 2 * U < c1)
				load(wa, sa, c + 2 * U, c1);
			if (c + U >= c1)
				break;
			compute(tot, wb, sb, xl, ld, cx, c + U, c1);
			if (c + 3 * U < c1)
				load(wb, sb, c + 3 * U, c1);
		}
	}
};


/* ------------------------------------------------------------------ staging */

/*
 * Rows [0, nrows) of the staged activations for columns [k0, k0 + klen)
 * (klen % 8 == 0) into xs (row stride ld): row j < n is token j (its fp32
 * row at rowp(j)), rounded to bf16 (FP8: times 2^64 first; int4: each 8
 * columns permuted to 0 4 1 5 2 6 3 7); rows n .. nrows - 1 zero.
 */
template <int FMT, typename ROWP>
__device__ __forceinline__ void
mq_stage(uint16_t *xs, int ld, int nrows, int n, ROWP rowp, bool vec, int k0, int klen)
{
	int			q = klen >> 3,
				total = nrows * q;

#pragma unroll 4
	for (int i = threadIdx.x; i < total; i += blockDim.x)
	{
		int			j = i / q,
					k = (i - j * q) * 8;
		float		v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
		uint16_t	h[8];
		uint2		lo,
					hi;

		if (j < n)
		{
			const float *xr = rowp(j) + k0 + k;

			if (vec)
			{
				float4		a = __ldg((const float4 *) xr),
							b = __ldg((const float4 *) xr + 1);

				v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
				v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
			}
			else
			{
#pragma unroll
				for (int u = 0; u < 8; u++)
					v[u] = xr[u];
			}
		}
#pragma unroll
		for (int u = 0; u < 8; u++)
		{
			/* int4: position u holds column (u / 2) + 4 (u % 2) */
			int			src = FMT == KK_WF_INT4 ? (u >> 1) + 4 * (u & 1) : u;

			h[u] = f32_to_bf16(FMT == KK_WF_FP8 ? v[src] * MQ_FP8_XSCALE : v[src]);
		}
		lo.x = h[0] | ((uint32_t) h[1] << 16);
		lo.y = h[2] | ((uint32_t) h[3] << 16);
		hi.x = h[4] | ((uint32_t) h[5] << 16);
		hi.y = h[6] | ((uint32_t) h[7] << 16);
		*(uint2 *) (xs + (size_t) j * ld + k) = lo;
		*(uint2 *) (xs + (size_t) j * ld + k + 4) = hi;
	}
}

/* staged row stride for klen columns: 8 bytes mod 128, so that the four rows
 * of a half-warp's 8-byte B reads fall in different banks */
__host__ __device__ static inline int
mq_ld_for(int klen)
{
	return klen + ((4 - klen % 64) + 64) % 64;
}

/* ------------------------------------------------------------------ dense products */

/*
 * Block b: tiles (b - first_block[j]) T .. + T of job j, all b.n rows.
 * Warp w: tile w % T, k range w / T of S = 8 / T within each segment of seg
 * chunks.  Dynamic shared memory: NB * 8 rows x ld bf16 (ld = mq_ld_for(seg
 * CK)), reused for the S partial tiles at the end.  Every job of the launch
 * has format FMT, chunk LW and (GROUPED) more than one scale a row.
 */
template <int FMT, int LW, int NB, bool GROUPED>
__global__ void __launch_bounds__(MQ_WARPS * 32, NB >= 8 ? 1 : 2)	/* 8 n-blocks with groups spill at 128 registers */
gemv_mma_q_kernel(kk_gemv_batch b, int T, int seg)
{
	using St = mq_stream<FMT, LW, NB, GROUPED>;
	extern __shared__ uint4 mq_smem[];
	uint16_t   *xs = (uint16_t *) mq_smem;
	float	   *part = (float *) mq_smem;
	int			j = kk_batch_job(b);
	const kk_gemv_job *jb = &b.job[j];
	int			rows = jb->rows,
				cols = jb->cols,
				n = b.n,
				nchunk = cols / St::CK,
				S = MQ_WARPS / T,
				ld = mq_ld_for(seg * St::CK),
				ngroups = (cols + jb->group - 1) / jb->group;
	int			warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31,
				g = lane >> 2,
				t = lane & 3,
				tile = warp % T,
				s = warp / T;
	int			r0 = (((int) blockIdx.x - b.first_block[j]) * T + tile) * 16;
	bool		live = r0 < rows;
	int			ra = r0 + g < rows ? r0 + g : rows - 1,
				rb = r0 + g + 8 < rows ? r0 + g + 8 : rows - 1;
	size_t		rbytes = kk_q_row_bytes(FMT, cols);
	const uint8_t *W = (const uint8_t *) jb->W;
	const float *sc = (const float *) (W + kk_q_scale_offset(rows, FMT, cols));
	float		tot[NB][4];
	St			st;

	st.rg = W + (size_t) ra * rbytes + t * LW;
	st.rg8 = W + (size_t) rb * rbytes + t * LW;
	st.sg = sc + (size_t) ra * ngroups;
	st.sg8 = sc + (size_t) rb * ngroups;
	st.cpg = (GROUPED ? jb->group : cols) / St::CK;
#pragma unroll
	for (int nb = 0; nb < NB; nb++)
		tot[nb][0] = tot[nb][1] = tot[nb][2] = tot[nb][3] = 0;

	/* the weights and scales do not depend on earlier kernels: request them before waiting */
	for (int s0 = 0; s0 < nchunk; s0 += seg)
	{
		int			s1 = min(s0 + seg, nchunk),
					c0 = s0 + s * (s1 - s0) / S,
					c1 = s0 + (s + 1) * (s1 - s0) / S;

		if (live)
			st.prime(c0, c1);
		if (s0 == 0)
		{
			kk_dep_wait();
			kk_dep_launch();
		}
		else
			__syncthreads();	/* every warp is done with the previous segment's rows */
		mq_stage<FMT>(xs, ld, NB * 8, n, [&](int r) { return jb->x + (size_t) r * jb->ldx; }, jb->vec,
					  s0 * St::CK, (s1 - s0) * St::CK);
		__syncthreads();
		if (live)
			st.run(tot, xs + (size_t) g * ld + t * LW * St::WPB, ld, s0, c0, c1);
	}

	/* the S ranges of a tile added in k order (through the staging area) */
	if (S > 1)
	{
		__syncthreads();
#pragma unroll
		for (int nb = 0; nb < NB; nb++)
#pragma unroll
			for (int i = 0; i < 4; i++)
				part[((size_t) warp * NB * 4 + nb * 4 + i) * 32 + lane] = tot[nb][i];
		__syncthreads();
		if (s != 0)
			return;
#pragma unroll
		for (int nb = 0; nb < NB; nb++)
#pragma unroll
			for (int i = 0; i < 4; i++)
				for (int r = 1; r < S; r++)
					tot[nb][i] += part[((size_t) (r * T + tile) * NB * 4 + nb * 4 + i) * 32 + lane];
	}
	if (!live)
		return;
	{
		float		s_g = GROUPED ? 1.0f : __ldg(st.sg),
					s_g8 = GROUPED ? 1.0f : __ldg(st.sg8),
					k = FMT == KK_WF_FP8 ? MQ_FP8_SCALE : 1.0f;

#pragma unroll
		for (int nb = 0; nb < NB; nb++)
#pragma unroll
			for (int i = 0; i < 4; i++)
			{
				int			row = r0 + g + (i >= 2 ? 8 : 0),
							tok = nb * 8 + 2 * t + (i & 1);

				if (row < rows && tok < n)
					jb->y[(size_t) tok * jb->ldy + row] = tot[nb][i] * (i >= 2 ? s_g8 : s_g) * k;
			}
	}
}

/* ------------------------------------------------------------------ direct products, up to 8 rows */

/*
 * gemv_mma_q_direct_kernel (KL_CUDA_Q_DIRECT, default on): FP8 with one
 * scale a row, cols % 64 == 0, n <= 8 rows — the decode steps of 2 to 8
 * tokens.  gemv_mma_kernel's design (expert_mma.cu) with FP8 weights: a
 * block is one 16-row tile, its 8 warps split k (warp w takes the 64-column
 * chunks w, w + 8, ...), and lane (g, t) reads token g's fp32 activations
 * for its 16 columns of each chunk straight from global memory (L1-resident
 * rows) beside its 16 weight bytes of rows g and g + 8, one register set
 * ahead of the mma.  No staging and no barrier before the stream starts:
 * gemv_mma_q_kernel stages every row in shared memory first, which at 8
 * rows left it slower than the bf16 products it halves the bytes of
 * (bench/notes-cuda.md, issue 11 second session).  Word i of a lane's 16
 * bytes gives the mma step's a0 / a2 (row g) and a1 / a3 (row g + 8) by
 * mq_fp8_lo / mq_fp8_hi; the activations of the same 4 columns, times 2^64
 * and rounded to bf16 as mq_stage does, are b0 / b1.  Partial tiles are
 * added in warp order, then times the row's scale and 2^56.
 */
#define MD_WARPS 8

/* register sets of chunks: two chunks a set for one tile a warp, one for more (registers) */
template <int MT>
struct md_shape
{
	static constexpr int U = MT == 1 ? 2 : 1;
};

/*
 * The lane's rows g and g + 8 of each of the block's MT 16-row tiles from
 * row r0, at its 16 bytes t of a chunk (rows past the matrix read its last
 * row: loaded, never stored)
 */
template <int MT>
__device__ __forceinline__ void
md_tile_rows(const uint8_t *(&rg)[MT][2], const uint8_t *W, int r0, int rows, int cols, int g, int t)
{
#pragma unroll
	for (int m = 0; m < MT; m++)
	{
		int			ra = r0 + 16 * m + g,
					rb = ra + 8;

		rg[m][0] = W + (size_t) (ra < rows ? ra : rows - 1) * cols + 16 * t;
		rg[m][1] = W + (size_t) (rb < rows ? rb : rows - 1) * cols + 16 * t;
	}
}

/* the weight pieces of the warp's chunks i0 .. i0 + U (chunk c = warp + MD_WARPS i) for its MT tiles' rows g and g + 8 */
template <int MT, int U>
__device__ __forceinline__ void
md_load_w(uint32_t (&w)[U][MT][2][4], const uint8_t *const (&rg)[MT][2], int warp, int i0, int nchunk)
{
#pragma unroll
	for (int u = 0; u < U; u++)
	{
		int			c = warp + MD_WARPS * (i0 + u);

		if (c < nchunk)
#pragma unroll
			for (int m = 0; m < MT; m++)
			{
				mq_ld<16>(w[u][m][0], rg[m][0] + 64 * (size_t) c);
				mq_ld<16>(w[u][m][1], rg[m][1] + 64 * (size_t) c);
			}
	}
}

/* token g's 16 activations of the lane's columns of those chunks (zeros when has_x is false) */
template <int U>
__device__ __forceinline__ void
md_load_x(float4 (&x)[U][4], const float *xg, bool has_x, bool vec, int warp, int i0, int nchunk)
{
#pragma unroll
	for (int u = 0; u < U; u++)
	{
		int			c = warp + MD_WARPS * (i0 + u);
		const float *xp = xg + 64 * (size_t) c;

#pragma unroll
		for (int q = 0; q < 4; q++)
			x[u][q] = make_float4(0, 0, 0, 0);
		if (has_x && c < nchunk)
		{
#pragma unroll
			for (int q = 0; q < 4; q++)
				x[u][q] = vec ? __ldg((const float4 *) xp + q) :
					make_float4(xp[4 * q], xp[4 * q + 1], xp[4 * q + 2], xp[4 * q + 3]);
		}
	}
}

/* two activations times 2^64 as a bf16 pair (the low half first) */
__device__ __forceinline__ uint32_t
md_x_pair(float a, float b)
{
	return pack_bf16x2(a * MQ_FP8_XSCALE, b * MQ_FP8_XSCALE);
}

/* acc[m] += the chunks' steps: each activation pair converted once for the MT tiles */
template <int MT, int U>
__device__ __forceinline__ void
md_compute(float (&acc)[MT][4], const uint32_t (&w)[U][MT][2][4], const float4 (&x)[U][4], int warp, int i0,
		   int nchunk)
{
#pragma unroll
	for (int u = 0; u < U; u++)
	{
		if (warp + MD_WARPS * (i0 + u) >= nchunk)
			break;
#pragma unroll
		for (int i = 0; i < 4; i++)
		{
			const float4 &v = x[u][i];
			uint32_t	b0 = md_x_pair(v.x, v.y),
						b1 = md_x_pair(v.z, v.w);

#pragma unroll
			for (int m = 0; m < MT; m++)
				mma_bf16_16816(acc[m], mq_fp8_lo(w[u][m][0][i]), mq_fp8_lo(w[u][m][1][i]), mq_fp8_hi(w[u][m][0][i]),
							   mq_fp8_hi(w[u][m][1][i]), b0, b1);
		}
	}
}

/* block b: MT 16-row tiles of the job (kk_tile_blocks(b, MT)) */
template <int MT>
__global__ void __launch_bounds__(MD_WARPS * 32, MT >= 4 ? 1 : 2)
gemv_mma_q_direct_kernel(kk_gemv_batch b)
{
	constexpr int U = md_shape<MT>::U;
	__shared__ float part[MD_WARPS][32][4 * MT];
	int			j = kk_batch_job(b);
	const kk_gemv_job *jb = &b.job[j];
	int			rows = jb->rows,
				cols = jb->cols,
				nchunk = cols >> 6;
	int			warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31,
				g = lane >> 2,
				t = lane & 3;
	int			r0 = ((int) blockIdx.x - b.first_block[j]) * 16 * MT;
	const uint8_t *W = (const uint8_t *) jb->W,
			   *rg[MT][2];
	const float *sc = (const float *) (W + kk_q_scale_offset(rows, KK_WF_FP8, cols));
	int			per_warp = (nchunk - warp + MD_WARPS - 1) / MD_WARPS;
	bool		has_x = g < b.n;
	float		acc[MT][4];
	uint32_t	wa[U][MT][2][4],
				wb[U][MT][2][4];
	float4		xa[U][4],
				xb[U][4];
	const float *xg;

	md_tile_rows<MT>(rg, W, r0, rows, cols, g, t);
#pragma unroll
	for (int m = 0; m < MT; m++)
		acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0;
	/* the weights do not depend on earlier kernels: request them before waiting */
	md_load_w<MT, U>(wa, rg, warp, 0, nchunk);
	kk_dep_wait();
	kk_dep_launch();
	xg = jb->x + (size_t) (has_x ? g : 0) * jb->ldx + 16 * t;
	md_load_x<U>(xa, xg, has_x, jb->vec, warp, 0, nchunk);
	for (int i = 0; i < per_warp; i += 2 * U)
	{
		if (i + U < per_warp)
		{
			md_load_w<MT, U>(wb, rg, warp, i + U, nchunk);
			md_load_x<U>(xb, xg, has_x, jb->vec, warp, i + U, nchunk);
		}
		md_compute<MT, U>(acc, wa, xa, warp, i, nchunk);
		if (i + U >= per_warp)
			break;
		if (i + 2 * U < per_warp)
		{
			md_load_w<MT, U>(wa, rg, warp, i + 2 * U, nchunk);
			md_load_x<U>(xa, xg, has_x, jb->vec, warp, i + 2 * U, nchunk);
		}
		md_compute<MT, U>(acc, wb, xb, warp, i + U, nchunk);
	}
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int i = 0; i < 4; i++)
			part[warp][lane][4 * m + i] = acc[m][i];
	__syncthreads();
	if (warp != 0)
		return;
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int i = 0; i < 4; i++)
		{
			int			row = r0 + 16 * m + g + (i >= 2 ? 8 : 0),
						tok = 2 * t + (i & 1);
			float		v = 0;

			for (int w = 0; w < MD_WARPS; w++)
				v += part[w][lane][4 * m + i];
			if (row < rows && tok < b.n)
				jb->y[(size_t) tok * jb->ldy + row] = v * __ldg(sc + row) * MQ_FP8_SCALE;
		}
}

static int	mq_sms(void);
static int	mq_nb(int n);

/*
 * Which kernels FP8 products with one scale a row take (kk_set_mma_q_direct,
 * kk_set_mma_q_dense; the test hook's kk_gemv_multi_mma_q_as gives its own):
 * direct: up to this many tiles a block in gemv_mma_q_direct_kernel for up
 * to 8 rows (0: never); dense: up to this many tiles a block in
 * gemv_mma_q_dense_kernel (0: never) for up to dense_rows rows.
 */
struct mq_paths
{
	int			direct,
				dense,
				dense_rows;
};
static mq_paths mq_set = {1, 0, KK_GEMV_MMA_Q_ROWS};

extern "C" void
kk_set_mma_q_direct(int on)
{
	mq_set.direct = on;
}

/* does the direct kernel take this job (FP8, one scale a row, cols % 64 == 0) at n rows? */
static bool
mq_direct_ok(const mq_paths &p, const kk_gemv_job *jb, int n)
{
	return p.direct > 0 && n <= 8 && jb->fmt == KK_WF_FP8 && jb->group >= jb->cols && jb->cols % 64 == 0;
}

/*
 * The direct kernel with the most tiles a block (up to direct: 1, 2 or 4)
 * that still gives every SM a block: more tiles share each converted
 * activation pair (fewer instructions a weight byte), fewer blocks keep
 * fewer loads in flight.
 */
static void
mq_launch_direct(cudaStream_t s, kk_gemv_batch *b, int direct)
{
	int			sms = mq_sms(),
				mt = direct >= 4 ? 4 : direct >= 2 ? 2 : 1,
				blocks;

	while (mt > 1 && kk_tile_blocks(b, mt) < sms)
		mt /= 2;
	blocks = kk_tile_blocks(b, mt);		/* (sets b->first_block for the kernel's copy) */
	if (mt == 4)
		kk_launch(gemv_mma_q_direct_kernel<4>, dim3(blocks), dim3(MD_WARPS * 32), 0, s, *b);
	else if (mt == 2)
		kk_launch(gemv_mma_q_direct_kernel<2>, dim3(blocks), dim3(MD_WARPS * 32), 0, s, *b);
	else
		kk_launch(gemv_mma_q_direct_kernel<1>, dim3(blocks), dim3(MD_WARPS * 32), 0, s, *b);
}

/* ------------------------------------------------------------------ dense products from converted rows */

/*
 * gemv_mma_q_dense_kernel (KL_CUDA_Q_DENSE=N, the backend's default 2; the
 * library's own default 0): FP8 with one scale a row, cols % 64 == 0, n rows up to
 * KL_CUDA_Q_DENSE_ROWS (default KK_GEMV_MMA_Q_ROWS), where the caller gives
 * room for the converted activations (kk_gemv_batch.xq, kk_gemv_mma_q_room).
 * The direct kernel's per-chunk chain is mostly activation work that every
 * 16-row tile repeats (16 fp32 loads' worth of bytes, 16 multiplies by 2^64
 * and 16 roundings to bf16 per lane and 64 columns, ~100 instructions next
 * to the 4 mma), and the staging kernel stages all n rows for every block.
 * Here each distinct activation matrix of the batch is read as bf16 rows
 * (x16: n rows of cols, row-major, f32_to_bf16 of x, unscaled): a producer's
 * bf16 twin where the caller preset one (KL_CUDA_Q_TWIN, kernels.h), else
 * written once by mx_convert_kernel into the room.  A lane's B fragments of
 * a chunk and n-block are then two 16-byte loads (token nb * 8 + g, clamped
 * to row n - 1: a clamped token's outputs are never stored; its 16 columns:
 * word 2i, 2i + 1 are step i's b0, b1), through L1, shared by the MT tiles
 * of the warp, each word times 2^64 in registers (mx_x64: md_x_pair's
 * numbers).  The rest is the direct kernel's:
 * a block is MT 16-row tiles, its 8 warps split k (warp w takes chunks w,
 * w + 8, ...), each warp holds two register sets of U chunks of weights
 * (both requested before the dependent-launch wait), the partial tiles are
 * added in warp order, then times the row's scale and 2^56.  So at n <= 8
 * the results are the direct kernel's bit for bit (same B values, same
 * order of every sum); at n > 8 each n-block is summed the same way.
 * The conversion costs one launch a product batch; it calls
 * kk_dep_launch at once so that the product kernel's blocks start and
 * request their weights while it runs.
 */
#define MX_WARPS 8

/* the distinct activation matrices of a dense batch and where their converted rows go */
struct mx_conv
{
	const float *x[KK_GEMV_JOBS];
	uint16_t   *d[KK_GEMV_JOBS];
	int			ldx[KK_GEMV_JOBS],
				cols[KK_GEMV_JOBS],
				vec[KK_GEMV_JOBS];
	int			count,			/* distinct matrices */
				n,				/* token rows */
				nrows;			/* rows written: n (no padding: the kernels clamp) */
};

/*
 * An activation pair (bf16x2, unscaled) times 2^64 (bf16 0x5f80), plus -0.0
 * so that +0 stays +0: exact for a power of two, so bf16(x) * 2^64 ==
 * bf16(x * 2^64) (md_x_pair) bit for bit for every x but fp32 subnormals
 * (|x| < 2^-126: f32_to_bf16 rounds them at the subnormal's precision, x *
 * 2^64 first would keep 8 bits) and NaN payloads; |x| < 2^64 assumed, as
 * for the staged rows.
 */
__device__ __forceinline__ uint32_t
mx_x64(uint32_t v)
{
	uint32_t	r;

	asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(v), "r"(0x5f805f80u), "r"(0x80008000u));
	return r;
}

__device__ __forceinline__ uint4
mx_x64(uint4 v)
{
	return make_uint4(mx_x64(v.x), mx_x64(v.y), mx_x64(v.z), mx_x64(v.w));
}

/* the 16 bytes at p (a lane's bf16 activations of one row) times 2^64 */
__device__ __forceinline__ uint4
mx_ld16(const uint16_t *p)
{
	return mx_x64(__ldg((const uint4 *) p));
}

/* token row r of x16 rows 0 .. n - 1: rows past n read row n - 1 (outputs never stored) */
__device__ __forceinline__ int
mx_tok(int r, int n)
{
	return r < n ? r : n - 1;
}

/* matrix blockIdx.y of c: 8 columns a thread, unscaled bf16 as f32_to_bf16 rounds them (a twin's numbers) */
__global__ void __launch_bounds__(256)
mx_convert_kernel(mx_conv c)
{
	int			e = blockIdx.y,
				q = c.cols[e] >> 3,
				total = c.nrows * q;
	const float *x = c.x[e];
	uint16_t   *d = c.d[e];

	kk_dep_launch();			/* the product kernel may start and request its weights now */
	kk_dep_wait();				/* x comes from the kernel before; d may be read by an earlier product */
	for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x)
	{
		int			j = i / q,
					k = (i - j * q) * 8;
		float		v[8];
		uint4		o;

		{
			const float *xr = x + (size_t) j * c.ldx[e] + k;

			if (c.vec[e])
			{
				float4		a = __ldg((const float4 *) xr),
							b = __ldg((const float4 *) xr + 1);

				v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
				v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
			}
			else
			{
#pragma unroll
				for (int u = 0; u < 8; u++)
					v[u] = xr[u];
			}
		}
		o.x = pack_bf16x2(v[0], v[1]);
		o.y = pack_bf16x2(v[2], v[3]);
		o.z = pack_bf16x2(v[4], v[5]);
		o.w = pack_bf16x2(v[6], v[7]);
		*(uint4 *) (d + (size_t) j * c.cols[e] + k) = o;
	}
}

/*
 * Register shape (at most 128 a thread, two blocks an SM): U chunks a set
 * (two sets: 2 U MT KB of weights a warp in flight), fewer where the
 * n-blocks' B fragments (8 NB registers a chunk) and accumulators (4 MT NB)
 * take the registers; 8 n-blocks only at MT 1 (the launcher's rule: MT 2
 * spills there).  NBR n-blocks a round of the final sums (shared memory:
 * at most 8 x 4 MT NBR floats a lane, 32 KB).
 */
template <int MT, int NB, int OCC = 2>
struct mx_shape
{
	static constexpr int U2 = MT == 1 ? (NB <= 2 ? 4 : NB == 4 ? 2 : 1) : (NB == 1 ? 2 : 1);
	/* OCC blocks an SM (kk_set_mma_q_dense_occ): 3 take half the chunks a set (85 registers a thread) */
	static constexpr int U = OCC > 2 && U2 > 1 ? U2 / 2 : U2;
	static constexpr int NBR = NB * MT <= 8 ? NB : 8 / MT;
};

/*
 * acc[m][nb] += the chunks' steps (chunk c = warp + MX_WARPS i); xg: the
 * lane's bf16 row g + 16 t columns (n rows: an n-block's rows past n read
 * row n - 1).  A chunk's A fragments are decoded once (16 registers a
 * tile), then each n-block's B fragments loaded and its 4 steps run: every
 * accumulator sees its steps in chunk and step order.
 */
template <int MT, int NB, int U>
__device__ __forceinline__ void
mx_compute(float (&acc)[MT][NB][4], const uint32_t (&w)[U][MT][2][4], const uint16_t *xg, int ld16, int warp,
		   int i0, int nchunk, int n)
{
#pragma unroll
	for (int u = 0; u < U; u++)
	{
		int			c = warp + MX_WARPS * (i0 + u);
		uint32_t	a[MT][4][4];

		if (c >= nchunk)
			break;
#pragma unroll
		for (int m = 0; m < MT; m++)
#pragma unroll
			for (int i = 0; i < 4; i++)
			{
				a[m][i][0] = mq_fp8_lo(w[u][m][0][i]);
				a[m][i][1] = mq_fp8_lo(w[u][m][1][i]);
				a[m][i][2] = mq_fp8_hi(w[u][m][0][i]);
				a[m][i][3] = mq_fp8_hi(w[u][m][1][i]);
			}
#pragma unroll
		for (int nb = 0; nb < NB; nb++)
		{
			int			g = (threadIdx.x & 31) >> 2;
			const uint16_t *p = xg + (size_t) (mx_tok(nb * 8 + g, n) - g) * ld16 + 64 * (size_t) c;
			uint4		lo = mx_ld16(p),
						hi = mx_ld16(p + 8);

#pragma unroll
			for (int i = 0; i < 4; i++)
			{
				const uint4 &v = i < 2 ? lo : hi;

#pragma unroll
				for (int m = 0; m < MT; m++)
					mma_bf16_16816(acc[m][nb], a[m][i], i & 1 ? v.z : v.x, i & 1 ? v.w : v.y);
			}
		}
	}
}

/* acc = 0 (the dense kernel's [MT][NB] tiles, the tokens-as-M form's [NT][R]) */
template <int A, int B>
__device__ __forceinline__ void
mx_zero(float (&acc)[A][B][4])
{
#pragma unroll
	for (int a = 0; a < A; a++)
#pragma unroll
		for (int b = 0; b < B; b++)
			acc[a][b][0] = acc[a][b][1] = acc[a][b][2] = acc[a][b][3] = 0;
}

/*
 * One unit of the dense kernel: MT 16-row tiles of job j from row r0, all
 * b.n rows (NB n-blocks), into acc (zero on entry), its first two weight
 * sets already requested into wa and wb from the rows rg (md_tile_rows).
 */
template <int MT, int NB, int OCC = 2>
__device__ __forceinline__ void
mx_unit(const kk_gemv_batch &b, int j, int r0, const uint8_t *(&rg)[MT][2], float (&acc)[MT][NB][4],
		uint32_t (&wa)[mx_shape<MT, NB, OCC>::U][MT][2][4], uint32_t (&wb)[mx_shape<MT, NB, OCC>::U][MT][2][4],
		float (&part)[MX_WARPS][32][4 * MT * mx_shape<MT, NB>::NBR])
{
	constexpr int U = mx_shape<MT, NB, OCC>::U,
				NBR = mx_shape<MT, NB>::NBR;
	const kk_gemv_job *jb = &b.job[j];
	int			rows = jb->rows,
				cols = jb->cols,
				nchunk = cols >> 6;
	int			warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31,
				g = lane >> 2,
				t = lane & 3;
	const uint8_t *W = (const uint8_t *) jb->W;
	const float *sc = (const float *) (W + kk_q_scale_offset(rows, KK_WF_FP8, cols));
	int			per_warp = (nchunk - warp + MX_WARPS - 1) / MX_WARPS;
	const uint16_t *xg = jb->x16 + (size_t) g * cols + 16 * t;	/* (row g: mx_compute clamps it) */

	for (int i = 0; i < per_warp; i += 2 * U)
	{
		mx_compute<MT, NB, U>(acc, wa, xg, cols, warp, i, nchunk, b.n);
		if (i + U >= per_warp)
			break;
		if (i + 2 * U < per_warp)
			md_load_w<MT, U>(wa, rg, warp, i + 2 * U, nchunk);
		mx_compute<MT, NB, U>(acc, wb, xg, cols, warp, i + U, nchunk, b.n);
		if (i + 3 * U < per_warp)
			md_load_w<MT, U>(wb, rg, warp, i + 3 * U, nchunk);
	}

	/* the 8 warps' partial tiles added in warp order, NBR n-blocks a round; warp e sums tile e / NBR's n-block */
#pragma unroll
	for (int q0 = 0; q0 < NB; q0 += NBR)
	{
		if (q0 > 0)
			__syncthreads();	/* the previous round is read */
#pragma unroll
		for (int m = 0; m < MT; m++)
#pragma unroll
			for (int r = 0; r < NBR; r++)
#pragma unroll
				for (int i = 0; i < 4; i++)
					part[warp][lane][(m * NBR + r) * 4 + i] = acc[m][q0 + r][i];
		__syncthreads();
		if (warp < MT * NBR)
		{
			int			m = warp / NBR,
						nb = q0 + warp % NBR;

#pragma unroll
			for (int i = 0; i < 4; i++)
			{
				int			row = r0 + 16 * m + g + (i >= 2 ? 8 : 0),
							tok = nb * 8 + 2 * t + (i & 1);
				float		v = 0;

				for (int w = 0; w < MX_WARPS; w++)
					v += part[w][lane][warp * 4 + i];
				if (row < rows && tok < b.n)
					jb->y[(size_t) tok * jb->ldy + row] = v * __ldg(sc + row) * MQ_FP8_SCALE;
			}
		}
	}
}

/*
 * Rows r0 .. r0 + nr - 1 of job jb's FP8 matrix (row-major, cols bytes a
 * row: one contiguous run) asked for in L2 by one thread with a bulk
 * prefetch (b.l2_rows, kk_set_mma_q_l2): the block's whole weight stream is
 * in flight at once, and its warps' loads then find it in L2.  A hint
 * only; cols % 16 == 0 here (the dense kernels take cols % 64 == 0).  The
 * resident blocks' runs together (264 x ~74 KB on an H200) stay well
 * inside L2.  H200, 2026-12-02, FP8 48B step at 4k: batch 32 (the
 * tokens-as-M form) -0.06 ms; batch 8 (the dense kernel) +0.03 ms, hence
 * from 9 rows only (bit 1; the 2-8-row bit 4 was retired).
 */
__device__ __forceinline__ void
mq_l2_rows(const kk_gemv_batch &b, const kk_gemv_job *jb, int r0, int nr)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
	int			n = jb->rows - r0 < nr ? jb->rows - r0 : nr;

	if (b.l2_rows && threadIdx.x == 0 && n > 0)
		asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;"::"l"((const uint8_t *) jb->W + (size_t) r0 * jb->cols),
					 "r"((unsigned) ((size_t) n * jb->cols)):"memory");
#endif
}

/*
 * block b: MT 16-row tiles of the job (kk_tile_blocks(b, MT)), all b.n rows
 * (NB n-blocks); OCC blocks an SM (kk_set_mma_q_dense_occ: 2, or 3 with
 * half the chunks a register set; the same sums in the same order either
 * way, so the same bits)
 */
template <int MT, int NB, int OCC = 2>
__global__ void __launch_bounds__(MX_WARPS * 32, OCC)
gemv_mma_q_dense_kernel(kk_gemv_batch b)
{
	constexpr int U = mx_shape<MT, NB, OCC>::U,
				NBR = mx_shape<MT, NB>::NBR;
	__shared__ float part[MX_WARPS][32][4 * MT * NBR];
	int			j = kk_batch_job(b);
	const kk_gemv_job *jb = &b.job[j];
	int			warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31,
				r0 = ((int) blockIdx.x - b.first_block[j]) * 16 * MT;
	const uint8_t *rg[MT][2];
	float		acc[MT][NB][4];
	uint32_t	wa[U][MT][2][4],
				wb[U][MT][2][4];

	mq_l2_rows(b, jb, r0, 16 * MT);
	md_tile_rows<MT>(rg, (const uint8_t *) jb->W, r0, jb->rows, jb->cols, lane >> 2, lane & 3);
	mx_zero<MT, NB>(acc);
	/* the weights do not depend on earlier kernels: both sets requested before waiting */
	md_load_w<MT, U>(wa, rg, warp, 0, jb->cols >> 6);
	md_load_w<MT, U>(wb, rg, warp, U, jb->cols >> 6);
	kk_dep_wait();
	kk_dep_launch();
	mx_unit<MT, NB, OCC>(b, j, r0, rg, acc, wa, wb, part);
}

/* ------------------------------------------------------------------ dense products, tokens as the mma's M */

/*
 * gemv_mma_q_tok_kernel<NT, R>: the dense kernel's jobs from 9 tokens on
 * (kk_set_mma_q_tok, the backend's KL_CUDA_Q_TOK, default on), with the
 * mma operands swapped.  gemv_mma_q_dense_kernel puts 16 weight rows in the
 * mma's M and the tokens in N, so each 16-row tile re-reads the batch's
 * converted activations through L1: NB x the weight bytes, 4 KB for each
 * 1 KB of weights at 32 tokens, and Nsight had it L1-bound (L1/TEX 78 %,
 * DRAM 18 %: H200, 2026-12-01).  Here the tokens are M (NT tiles of 16 of
 * the bf16 rows, tokens past n reading row n - 1: their output rows are not
 * stored; each word times 2^64 as loaded, mx_x64) and
 * the weights B (8 rows an n-tile): a warp holds R n-tiles, so each
 * activation fragment feeds R products and the activation bytes through L1
 * are 2 NT / R x the weight bytes.
 *
 * k order inside one mma is free as long as A and B agree: lane (g, t) of a
 * 64-column chunk takes columns 16 t .. 16 t + 15 (one 16-byte weight load a
 * row, two 16-byte activation loads a token row), and step i of the chunk
 * uses the lane's columns 16 t + 4 i .. + 3: as mma-k {2t, 2t+1} the first
 * two, {2t+8, 2t+9} the other two (A: activation words 2i, 2i+1 of tokens g
 * and g + 8 of the tile; B: the FP8 bytes 0-1 and 2-3 of weight word i of
 * row g, decoded by mq_fp8_lo / hi).
 *
 * A block: 8 warps on the same 8 R rows, warp w taking chunks w, w + 8, ...
 * (the next chunk's weights requested before this one's products; the first
 * before the dependent-launch wait), the partial tiles summed in warp order
 * through shared memory, times the row's scale and 2^56.  So every output
 * is its chunks' mma steps summed in chunk order per warp, then the warps
 * in order: the same bits every run.
 * H200 (2026-12-01, a probe of this kernel: us a launch with the
 * conversion, against the dense kernel; bench/results/raw/
 * 2026-12-01-q11s4-call7-swap-probe.md): q/k/v 3 x 4096 x 2304 at 16 / 32 /
 * 64 tokens 13.9 / 20.3 / 32.5 against 18.0 / 26.9 / 58.1; o_proj 2304 x
 * 4096 at 32 / 64 11.9 / 16.3 against 12.6 / 25.2, at 16 slower (9.8
 * against 8.5: 36-144 blocks) - hence mt_tok_r's rule.  The decode step
 * (FP8, 4k, greedy): batch 16 / 32 / 64 8.42 / 12.47 / 18.99 -> 8.26 /
 * 12.05 / 17.67 ms.
 */
__device__ __forceinline__ uint32_t
mt_word(const uint4 (&v)[2], int j)
{
	const uint4 &h = v[j >> 2];

	return (j & 3) == 0 ? h.x : (j & 3) == 1 ? h.y : (j & 3) == 2 ? h.z : h.w;
}

__device__ __forceinline__ uint32_t
mt_comp(const uint4 &v, int i)
{
	return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

/*
 * The lane's weight rows of the n-tiles of job jb from row r0 (wr, at its
 * 16 bytes t of a chunk; rows past the matrix read its last row, their
 * outputs not stored) and its warp's first chunk of them from chunk c0 on
 * requested (wc; none where that is not below c1)
 */
template <int R>
__device__ __forceinline__ void
mt_first(const uint8_t *(&wr)[R], uint4 (&wc)[R], const kk_gemv_job *jb, int r0, int c0, int c1)
{
	int			rows = jb->rows,
				cols = jb->cols,
				warp = threadIdx.x >> 5,
				g = (threadIdx.x & 31) >> 2,
				t = threadIdx.x & 3;

#pragma unroll
	for (int r = 0; r < R; r++)
	{
		int			row = r0 + 8 * r + g < rows ? r0 + 8 * r + g : rows - 1;

		wr[r] = (const uint8_t *) jb->W + (size_t) row * cols + 16 * t;
	}
	if (c0 + warp < c1)
#pragma unroll
		for (int r = 0; r < R; r++)
			wc[r] = __ldg((const uint4 *) (wr[r] + 64 * (c0 + warp)));
}

/*
 * acc += chunk c of the unit: the lane's activation words of the NT token
 * tiles (from x16, n rows, cols columns) and its weight pieces wc of the R
 * n-tiles, four mma steps a tile pair in step order (mt_unit's body)
 */
template <int NT, int R>
__device__ __forceinline__ void
mt_chunk(float (&acc)[NT][R][4], const uint4 (&wc)[R], const uint16_t *x16, int n, int cols, int c)
{
	int			g = (threadIdx.x & 31) >> 2,
				t = threadIdx.x & 3;
	uint4		a[NT][2][2];

#pragma unroll
	for (int m = 0; m < NT; m++)
#pragma unroll
		for (int h = 0; h < 2; h++)
		{
			const uint16_t *p = x16 + (size_t) mx_tok(16 * m + g + 8 * h, n) * cols + 64 * c + 16 * t;

			a[m][h][0] = mx_ld16(p);
			a[m][h][1] = mx_ld16(p + 8);
		}
#pragma unroll
	for (int i = 0; i < 4; i++)
#pragma unroll
		for (int r = 0; r < R; r++)
		{
			uint32_t	w = mt_comp(wc[r], i),
						b0 = mq_fp8_lo(w),
						b1 = mq_fp8_hi(w);

#pragma unroll
			for (int m = 0; m < NT; m++)
				mma_bf16_16816(acc[m][r], mt_word(a[m][0], 2 * i), mt_word(a[m][1], 2 * i),
							   mt_word(a[m][0], 2 * i + 1), mt_word(a[m][1], 2 * i + 1), b0, b1);
		}
}

/*
 * The unit's partial tiles (acc, one a warp) summed in warp order through
 * mt_part ([8 warps][NT R 4][32 lanes]), times the row's scale and 2^56,
 * stored.  D fragment: acc[m][r][i] is token 16 m + g (+ 8 for i >= 2),
 * row r0 + 8 r + 2 t + (i & 1).
 */
template <int NT, int R>
__device__ __forceinline__ void
mt_sums(const kk_gemv_batch &b, int j, int r0, const float (&acc)[NT][R][4], float *mt_part)
{
	const kk_gemv_job *jb = &b.job[j];
	int			rows = jb->rows,
				warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31;
	const float *sc = (const float *) ((const uint8_t *) jb->W + kk_q_scale_offset(rows, KK_WF_FP8, jb->cols));

#pragma unroll
	for (int m = 0; m < NT; m++)
#pragma unroll
		for (int r = 0; r < R; r++)
#pragma unroll
			for (int i = 0; i < 4; i++)
				mt_part[((size_t) warp * NT * R * 4 + (m * R + r) * 4 + i) * 32 + lane] = acc[m][r][i];
	__syncthreads();
	for (int e = threadIdx.x; e < NT * R * 4 * 32; e += MX_WARPS * 32)
	{
		int			l = e & 31,
					q = e >> 5,
					i = q & 3,
					r = (q >> 2) % R,
					m = (q >> 2) / R,
					tok = 16 * m + (l >> 2) + (i >= 2 ? 8 : 0),
					row = r0 + 8 * r + 2 * (l & 3) + (i & 1);
		float		v = 0;

		for (int w = 0; w < MX_WARPS; w++)
			v += mt_part[((size_t) w * NT * R * 4 + q) * 32 + l];
		if (tok < b.n && row < rows)
			jb->y[(size_t) tok * jb->ldy + row] = v * __ldg(sc + row) * MQ_FP8_SCALE;
	}
}

/*
 * One unit of the tokens-as-M kernel: R n-tiles (8 R rows) of job j from
 * row r0 into acc (zero on entry), the warp's first chunk requested
 * (mt_first into wr, wc), all of k, the outputs stored.
 */
template <int NT, int R>
__device__ __forceinline__ void
mt_unit(const kk_gemv_batch &b, int j, int r0, const uint8_t *(&wr)[R], uint4 (&wc)[R], float (&acc)[NT][R][4],
		float *mt_part)
{
	const kk_gemv_job *jb = &b.job[j];
	int			cols = jb->cols,
				nchunk = cols >> 6,
				warp = threadIdx.x >> 5;
	uint4		wn[R];

	for (int c = warp; c < nchunk; c += MX_WARPS)
	{
		if (c + MX_WARPS < nchunk)
#pragma unroll
			for (int r = 0; r < R; r++)
				wn[r] = __ldg((const uint4 *) (wr[r] + 64 * (c + MX_WARPS)));
		mt_chunk<NT, R>(acc, wc, jb->x16, b.n, cols, c);
#pragma unroll
		for (int r = 0; r < R; r++)
			wc[r] = wn[r];
	}
	mt_sums<NT, R>(b, j, r0, acc, mt_part);
}

/* block b: R n-tiles (8 R rows) of its job (first_block: mt_launch_r) */
template <int NT, int R>
__global__ void __launch_bounds__(MX_WARPS * 32, NT * R <= 8 ? 2 : 1)
gemv_mma_q_tok_kernel(kk_gemv_batch b)
{
	extern __shared__ float mt_part[];	/* [8 warps][NT R 4][32 lanes] */
	int			j = kk_batch_job(b),
				r0 = ((int) blockIdx.x - b.first_block[j]) * 8 * R;
	const uint8_t *wr[R];
	float		acc[NT][R][4];
	uint4		wc[R];

	mq_l2_rows(b, &b.job[j], r0, 8 * R);
	mx_zero<NT, R>(acc);
	mt_first<R>(wr, wc, &b.job[j], r0, 0, b.job[j].cols >> 6);
	kk_dep_wait();
	kk_dep_launch();
	mt_unit<NT, R>(b, j, r0, wr, wc, acc, mt_part);
}

static int	mt_on = 0;			/* kk_set_mma_q_tok */
static int	mq_l2 = 0;			/* kk_set_mma_q_l2 */

extern "C" int
kk_set_mma_q_l2(int on)
{
	int			was = mq_l2;

	mq_l2 = on & 1;
	return was;
}

extern "C" int
kk_set_mma_q_tok(int on)
{
	int			was = mt_on;

	mt_on = on != 0;
	return was;
}

/*
 * R (n-tiles a warp) for b at NT token tiles: the largest of 4, 2, 1 (8 at
 * NT 1) that still gives every SM a block; 0 (the dense kernel instead)
 * where NT is 1 and that takes fewer than 8 (o_proj at 16 tokens was
 * slower this way).
 */
static int
mt_tok_r(const kk_gemv_batch *b, int NT)
{
	int			sms = mq_sms(),
				rows = 0;

	for (int j = 0; j < b->count; j++)
		rows += b->job[j].rows;
	if (NT == 1)
		return ceil_div(rows, 64) >= sms ? 8 : 0;
	for (int R = 4; R > 1; R /= 2)
		if (ceil_div(rows, 8 * R) >= sms)
			return R;
	return 1;
}

template <int NT, int R>
static void
mt_launch_r(cudaStream_t s, kk_gemv_batch *b)
{
	size_t		smem = (size_t) MX_WARPS * NT * R * 4 * 32 * sizeof(float);
	int			blocks = 0;

	for (int j = 0; j < b->count; j++)
	{
		b->first_block[j] = blocks;
		blocks += ceil_div(b->job[j].rows, 8 * R);
	}
	b->first_block[b->count] = blocks;
	if (smem > 48 * 1024)
		cudaFuncSetAttribute(gemv_mma_q_tok_kernel<NT, R>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem);
	kk_launch(gemv_mma_q_tok_kernel<NT, R>, dim3(blocks), dim3(MX_WARPS * 32), smem, s, *b);
}

/* the tokens-as-M kernel for the converted batch b (n >= 9); false where it does not take b */
static bool
mt_launch(cudaStream_t s, kk_gemv_batch *b)
{
	int			nb = mq_nb(b->n),
				NT = nb / 2,
				R;

	if (!mt_on || nb < 2 || (R = mt_tok_r(b, NT)) == 0)
		return false;
	if (NT == 1)
		mt_launch_r<1, 8>(s, b);
	else if (NT == 2)
		R == 4 ? mt_launch_r<2, 4>(s, b) : R == 2 ? mt_launch_r<2, 2>(s, b) : mt_launch_r<2, 1>(s, b);
	else
		R == 4 ? mt_launch_r<4, 4>(s, b) : R == 2 ? mt_launch_r<4, 2>(s, b) : mt_launch_r<4, 1>(s, b);
	return true;
}

/* ------------------------------------------------------------------ dense products from shared-memory slabs */

/*
 * gemv_mma_q_slab_kernel (KL_CUDA_Q_DENSE=3, opt-in; Hopper only, else
 * variant 2 runs): the dense kernel's jobs (FP8, one scale a row, cols % 64
 * == 0, activations converted once by mx_convert_kernel) with the weights
 * copied asynchronously into shared memory instead of register loads.
 * Why it was built: the dense kernel keeps ~2-4 KB of weights a warp in
 * flight (its register sets), its 16-32-row tiles re-read the activations
 * (B) NB times the weight bytes, and its small launches are mostly ramp and
 * tail.  Measured (H200, 2026-12-01, bench/notes-cuda.md "Issue 11, fourth
 * GPU session"): faster than variant 2 only for o_proj at n <= 8 (6.8 vs
 * 7.9 us) and at n = 64; slower for q/k/v at n <= 32 (16.3 vs 13.7 us at
 * n = 1), and the decode step slower at batch 8 (5.74 vs 5.57 ms) and 32:
 * kept as the base of the next attempt, not the default.  Bulk (TMA) copies
 * of each row's piece were slower still (22.7 us at q/k/v n = 1): many
 * small copies a block.
 *
 * A block owns a slab: MS_ROWS (64) rows of one job over a k-slice of its
 * chunks (64 columns each).  The CS blocks of a thread-block cluster take
 * the CS k-slices of the same 64 rows (block rank r: chunks [r nch / CS,
 * (r + 1) nch / CS)); the launcher picks CS in 1, 2, 4, 8 so that the
 * launch has at least two blocks an SM and a slab stays under MS_SLAB_MAX.
 * Thread 0 arms up to MS_STAGES mbarriers (one a stage: a run of at least
 * MS_STAGE_MIN of the slice's chunks), then every thread requests its
 * 16-byte pieces of each stage (cp.async) and arrives on the stage's
 * mbarrier once they have landed, all before kk_dep_wait(): the weights do
 * not depend on earlier kernels, so the fetch overlaps the tail of the
 * kernel before (and the conversion launch).  The warps then compute stage
 * by stage as stages land.
 *
 * Warps: WM x WK = 8 (WM = 1 for NB <= 2: a warp 4 tiles of 16 rows; WM = 2
 * for NB 4 and 8: 2 tiles), warp (wm, wk) takes the slice's chunks wk,
 * wk + WK, ... for its MT tiles and all NB n-blocks: each B fragment (read
 * through L1 from the converted rows, next chunk's requested before this
 * chunk's mma) feeds MT tiles, so B costs NB / MT x the weight bytes in L1
 * traffic instead of the dense kernel's NB.  A fragments: one 16-byte shared
 * read a lane, row and chunk (row stride = 64 bytes mod 128: the 8 lanes of
 * a quarter-warp read two rows in disjoint banks).
 *
 * Sums (deterministic, no atomics): each warp's partial tile goes to shared
 * memory (reusing the slab), the WK partials of every output are added in wk
 * order, then after a cluster barrier block rank r adds the CS blocks'
 * sums of its share of the outputs through distributed shared memory in rank
 * order, times the row's scale and 2^56.  Every accumulator sees its mma
 * steps in chunk order, so the results are the same bits every run (not
 * the dense kernel's: its k split differs).
 */
#define MS_WARPS 8
#define MS_ROWS 64				/* rows a slab (4 tiles of 16) */
#define MS_STAGES 8				/* mbarriers a block: the slab's arrival in up to 8 runs of chunks */
#define MS_STAGE_MIN 4			/* chunks a stage at least */
#define MS_SLAB_MAX (100 * 1024)	/* slab bytes a block at most: two blocks an SM */
#define MS_TOKS(NB) ((NB) * 8)
#define MS_PLD (MS_ROWS + 4)	/* partial sums' token stride (floats): lanes t = 0..3 in banks 8t + g */

template <int NB>
struct ms_shape
{
	static constexpr int WM = NB <= 2 ? 1 : 2,	/* warps along the rows */
				WK = MS_WARPS / WM,	/* ... along k */
				MT = MS_ROWS / 16 / WM;	/* 16-row tiles a warp */
};

/* shared row stride of a slice of nch chunks: 64 mod 128 bytes (see above) */
__host__ __device__ static inline int
ms_ld(int nch)
{
	return nch * 64 + (nch % 2 == 0 ? 64 : 0);
}

/* dynamic shared memory a block: the slab (nch chunks at most), or the partial sums if larger, + mbarriers */
template <int NB>
__host__ __device__ static inline size_t
ms_smem(int nch)
{
	size_t		slab = (size_t) MS_ROWS * ms_ld(nch),
				part = (size_t) ms_shape<NB>::WK * MS_TOKS(NB) * MS_PLD * sizeof(float);

	return (slab > part ? slab : part) + MS_STAGES * sizeof(uint64_t);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MS_ASYNC 1

__device__ __forceinline__ uint32_t
ms_saddr(const void *p)
{
	return (uint32_t) __cvta_generic_to_shared(p);
}

__device__ __forceinline__ void
ms_bar_init(uint32_t bar, uint32_t count)
{
	asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n"::"r"(bar), "r"(count):"memory");
}

__device__ __forceinline__ void
ms_bar_wait(uint32_t bar)
{
	asm volatile("{\n\t.reg .pred P;\n"
				 "MS_WAIT:\n\t"
				 "mbarrier.try_wait.parity.shared::cta.b64 P, [%0], 0;\n\t"
				 "@!P bra MS_WAIT;\n}\n"::"r"(bar):"memory");
}

/* 16 bytes global -> shared by this thread (cp.async, L2 only) */
__device__ __forceinline__ void
ms_cp16(uint32_t dst, const void *src)
{
	asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"::"r"(dst), "l"(src):"memory");
}

/* bar gets this thread's arrival once its cp.async copies so far have landed (counted in the init count) */
__device__ __forceinline__ void
ms_cp_arrive(uint32_t bar)
{
	asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n"::"r"(bar):"memory");
}

__device__ __forceinline__ uint32_t
ms_cluster_rank(void)
{
	uint32_t	r;

	asm("mov.u32 %0, %%cluster_ctarank;\n":"=r"(r));
	return r;
}

/* every thread of the cluster's blocks: shared writes before it are visible to the cluster after it */
__device__ __forceinline__ void
ms_cluster_sync(void)
{
	asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n":::"memory");
}

/* the float at this block's shared address a in block rank r of the cluster */
__device__ __forceinline__ float
ms_ld_peer(uint32_t a, uint32_t r)
{
	uint32_t	p;
	float		v;

	asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n":"=r"(p):"r"(a), "r"(r));
	asm volatile("ld.shared::cluster.f32 %0, [%1];\n":"=f"(v):"r"(p):"memory");
	return v;
}
#endif

/* the first chunk of stage s of a slice of nch chunks in ns stages */
__device__ __forceinline__ int
ms_stage_start(int s, int nch, int ns)
{
	return s * nch / ns;
}

/* B fragments of chunk c (global chunk index) for the NB n-blocks: token nb * 8 + g (clamped to n - 1), the
 * lane's 16 columns, times 2^64 */
template <int NB>
__device__ __forceinline__ void
ms_load_b(uint4 (&bf)[NB][2], const uint16_t *xg, int ld16, int c, int n)
{
#pragma unroll
	for (int nb = 0; nb < NB; nb++)
	{
		int			g = (threadIdx.x & 31) >> 2;
		const uint16_t *p = xg + (size_t) (mx_tok(nb * 8 + g, n) - g) * ld16 + 64 * (size_t) c;

		bf[nb][0] = mx_ld16(p);
		bf[nb][1] = mx_ld16(p + 8);
	}
}

/* acc += one chunk's steps: A from the slab (the lane's rows of the MT tiles at its 16 bytes), B given */
template <int NB, int MT>
__device__ __forceinline__ void
ms_chunk(float (&acc)[MT][NB][4], const uint8_t *arow, int ld, const uint4 (&bf)[NB][2])
{
	uint4		a[MT][2];

#pragma unroll
	for (int m = 0; m < MT; m++)
	{
		a[m][0] = *(const uint4 *) (arow + (size_t) 16 * m * ld);
		a[m][1] = *(const uint4 *) (arow + (size_t) (16 * m + 8) * ld);
	}
#pragma unroll
	for (int i = 0; i < 4; i++)
#pragma unroll
		for (int m = 0; m < MT; m++)
		{
			uint32_t	w0 = i == 0 ? a[m][0].x : i == 1 ? a[m][0].y : i == 2 ? a[m][0].z : a[m][0].w,
						w1 = i == 0 ? a[m][1].x : i == 1 ? a[m][1].y : i == 2 ? a[m][1].z : a[m][1].w,
						a0 = mq_fp8_lo(w0),
						a1 = mq_fp8_lo(w1),
						a2 = mq_fp8_hi(w0),
						a3 = mq_fp8_hi(w1);

#pragma unroll
			for (int nb = 0; nb < NB; nb++)
			{
				const uint4 &v = bf[nb][i >> 1];

				mma_bf16_16816(acc[m][nb], a0, a1, a2, a3, i & 1 ? v.z : v.x, i & 1 ? v.w : v.y);
			}
		}
}

/*
 * Block b: cluster blockIdx.x / CS is slab (blockIdx.x - first_block[j]) /
 * CS of job j (rows 64 of them), its rank r the k-slice.  Launched with
 * cluster dimension CS = b.cluster (kk_gemv_batch's first_block counts CS
 * blocks a slab).  Dynamic shared memory: ms_smem<NB>(the widest slice).
 */
template <int NB>
__global__ void __launch_bounds__(MS_WARPS * 32, NB >= 8 ? 1 : 2)
gemv_mma_q_slab_kernel(kk_gemv_batch b, int CS)
{
#ifdef MS_ASYNC
	constexpr int WK = ms_shape<NB>::WK,
				MT = ms_shape<NB>::MT;
	extern __shared__ uint4 ms_smem_raw[];
	int			j = kk_batch_job(b);
	const kk_gemv_job *jb = &b.job[j];
	int			rows = jb->rows,
				cols = jb->cols,
				nchunk = cols >> 6,
				rank = (int) ms_cluster_rank(),
				r0 = ((int) blockIdx.x - b.first_block[j]) / CS * MS_ROWS,
				c0 = rank * nchunk / CS,
				nch = (rank + 1) * nchunk / CS - c0,
				ns = nch / MS_STAGE_MIN < 1 ? 1 : nch / MS_STAGE_MIN < MS_STAGES ? nch / MS_STAGE_MIN : MS_STAGES,
				ld = ms_ld(nch),
				vrows = rows - r0 < MS_ROWS ? rows - r0 : MS_ROWS,
				ldmax = ms_ld((nchunk + CS - 1) / CS);
	int			warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31,
				g = lane >> 2,
				t = lane & 3,
				wm = warp / WK,
				wk = warp % WK;
	uint8_t    *slab = (uint8_t *) ms_smem_raw;
	float	   *part = (float *) ms_smem_raw;
	size_t		body = (size_t) MS_ROWS * ldmax,
				pbytes = (size_t) WK * MS_TOKS(NB) * MS_PLD * sizeof(float);
	uint64_t   *bars = (uint64_t *) (slab + (body > pbytes ? body : pbytes));
	const uint8_t *W = (const uint8_t *) jb->W;
	const float *sc = (const float *) (W + kk_q_scale_offset(rows, KK_WF_FP8, cols));
	float		acc[MT][NB][4];

	/* the slab requested before the dependent-launch wait (the weights are constant) */
	if (threadIdx.x == 0)
	{
		for (int s = 0; s < ns; s++)
			ms_bar_init(ms_saddr(bars + s), MS_WARPS * 32);
		asm volatile("fence.mbarrier_init.release.cluster;\n":::"memory");
	}
	__syncthreads();
	for (int s = 0; s < ns; s++)
	{
		/* every thread 16-byte pieces of the stage's rows, then one arrival once its own have landed */
		int			a = ms_stage_start(s, nch, ns),
					pr = 4 * (ms_stage_start(s + 1, nch, ns) - a);

		for (int i = threadIdx.x; i < vrows * pr; i += MS_WARPS * 32)
		{
			int			r = i / pr,
						p = i - r * pr;

			ms_cp16(ms_saddr(slab + (size_t) r * ld + 64 * a + 16 * p),
					W + (size_t) (r0 + r) * cols + 64 * (c0 + a) + 16 * p);
		}
		ms_cp_arrive(ms_saddr(bars + s));
	}
#pragma unroll
	for (int m = 0; m < MT; m++)
#pragma unroll
		for (int nb = 0; nb < NB; nb++)
			acc[m][nb][0] = acc[m][nb][1] = acc[m][nb][2] = acc[m][nb][3] = 0;
	kk_dep_wait();
	kk_dep_launch();
	{
		const uint16_t *xg = jb->x16 + (size_t) g * cols + 16 * t;
		const uint8_t *arow = slab + (size_t) (wm * MT * 16 + g) * ld + 16 * t;
		int			waited = 0;
		uint4		bf[NB][2];

		if (wk < nch)
			ms_load_b<NB>(bf, xg, cols, c0 + wk, b.n);
		for (int c = wk; c < nch; c += WK)
		{
			uint4		bn[NB][2];

			while (waited < ns && c >= ms_stage_start(waited, nch, ns))
				ms_bar_wait(ms_saddr(bars + waited++));
			if (c + WK < nch)
				ms_load_b<NB>(bn, xg, cols, c0 + c + WK, b.n);
			ms_chunk<NB, MT>(acc, arow + 64 * c, ld, bf);
#pragma unroll
			for (int nb = 0; nb < NB; nb++)
				bf[nb][0] = bn[nb][0], bf[nb][1] = bn[nb][1];
		}
		/* a warp with no chunk must still see the copies land before the slab is reused */
		while (waited < ns)
			ms_bar_wait(ms_saddr(bars + waited++));
	}
	__syncthreads();			/* the slab is read: its room takes the partial sums */

	/* warp (wm, wk)'s tiles into part[wk][tok][row] */
	{
		float	   *pw = part + (size_t) wk * MS_TOKS(NB) * MS_PLD;

#pragma unroll
		for (int m = 0; m < MT; m++)
#pragma unroll
			for (int nb = 0; nb < NB; nb++)
#pragma unroll
				for (int i = 0; i < 4; i++)
				{
					int			row = (wm * MT + m) * 16 + g + (i >= 2 ? 8 : 0),
								tok = nb * 8 + 2 * t + (i & 1);

					pw[tok * MS_PLD + row] = acc[m][nb][i];
				}
	}
	__syncthreads();
	/* the WK partials added in wk order into part[0] (each output one thread's) */
	for (int e = threadIdx.x; e < MS_TOKS(NB) * MS_ROWS; e += blockDim.x)
	{
		int			tok = e / MS_ROWS,
					row = e % MS_ROWS;
		float		v = part[tok * MS_PLD + row];

		for (int k = 1; k < WK; k++)
			v += part[((size_t) k * MS_TOKS(NB) + tok) * MS_PLD + row];
		part[tok * MS_PLD + row] = v;
	}
	ms_cluster_sync();			/* every block's part[0] complete and visible to the cluster */
	{
		int			n = b.n,
					outs = n * MS_ROWS,
					e0 = rank * outs / CS,
					e1 = (rank + 1) * outs / CS;

		for (int e = e0 + (int) threadIdx.x; e < e1; e += blockDim.x)
		{
			int			tok = e / MS_ROWS,
						row = e % MS_ROWS;
			uint32_t	a = ms_saddr(part + tok * MS_PLD + row);
			float		v = 0;

			if (row >= vrows)
				continue;
			for (int q = 0; q < CS; q++)
				v += ms_ld_peer(a, (uint32_t) q);
			jb->y[(size_t) tok * jb->ldy + r0 + row] = v * __ldg(sc + r0 + row) * MQ_FP8_SCALE;
		}
	}
	ms_cluster_sync();			/* no block leaves while a peer reads its shared memory */
#endif
}

/* does the current device run the slab kernel (compute capability 9 or later)? */
static bool
ms_device_ok(void)
{
	static int	major = -1;
	int			dev = 0;

	if (major < 0 && (cudaGetDevice(&dev) != cudaSuccess ||
					  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess))
		major = 0;
	return major >= 9;
}

/* the slab kernel launched with cluster dimension CS (and PDL when on) */
template <int NB>
static void
ms_launch_nb(cudaStream_t s, kk_gemv_batch *b, int blocks, int CS, size_t smem)
{
	cudaLaunchConfig_t cfg;
	cudaLaunchAttribute at[2];

	if (smem > 48 * 1024)
		cudaFuncSetAttribute(gemv_mma_q_slab_kernel<NB>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem);
	memset(&cfg, 0, sizeof(cfg));
	cfg.gridDim = dim3(blocks);
	cfg.blockDim = dim3(MS_WARPS * 32);
	cfg.dynamicSmemBytes = smem;
	cfg.stream = s;
	at[0].id = cudaLaunchAttributeClusterDimension;
	at[0].val.clusterDim.x = CS;
	at[0].val.clusterDim.y = 1;
	at[0].val.clusterDim.z = 1;
	at[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
	at[1].val.programmaticStreamSerializationAllowed = 1;
	cfg.attrs = at;
	cfg.numAttrs = kk_pdl_on ? 2 : 1;
	if (cudaLaunchKernelEx(&cfg, gemv_mma_q_slab_kernel<NB>, *b, CS) != cudaSuccess && cfg.numAttrs == 2)
	{
		/* should a runtime refuse clusters with programmatic serialization: the cluster alone */
		(void) cudaGetLastError();
		cfg.numAttrs = 1;
		cudaLaunchKernelEx(&cfg, gemv_mma_q_slab_kernel<NB>, *b, CS);
	}
}

/*
 * The slab kernel for the converted batch b: CS (blocks a cluster, k-slices
 * a slab) the smallest of 1, 2, 4, 8 that gives the launch two blocks an SM
 * and a slab of at most MS_SLAB_MAX bytes, at most the narrowest job's
 * chunks.  False (nothing launched) where the device or the shapes do not
 * allow it: then the caller runs the dense kernel.
 */
static bool
ms_launch(cudaStream_t s, kk_gemv_batch *b)
{
	int			sms = mq_sms(),
				slabs = 0,
				minch = 1 << 30,
				maxch = 0,
				CS = 1,
				blocks = 0;
	size_t		smem;

	if (!ms_device_ok())
		return false;
	for (int j = 0; j < b->count; j++)
	{
		int			ch = b->job[j].cols >> 6;

		slabs += ceil_div(b->job[j].rows, MS_ROWS);
		minch = ch < minch ? ch : minch;
		maxch = ch > maxch ? ch : maxch;
	}
	while (CS < 8 && 2 * CS <= minch &&
		   (slabs * CS < 2 * sms ||
			(size_t) MS_ROWS * ms_ld((maxch + CS - 1) / CS) > MS_SLAB_MAX))
		CS *= 2;
	if ((size_t) MS_ROWS * ms_ld((maxch + CS - 1) / CS) > MS_SLAB_MAX)
		return false;
	for (int j = 0; j < b->count; j++)
	{
		b->first_block[j] = blocks;
		blocks += ceil_div(b->job[j].rows, MS_ROWS) * CS;
	}
	b->first_block[b->count] = blocks;
	switch (mq_nb(b->n))
	{
		case 1:
			smem = ms_smem<1>((maxch + CS - 1) / CS);
			ms_launch_nb<1>(s, b, blocks, CS, smem);
			break;
		case 2:
			smem = ms_smem<2>((maxch + CS - 1) / CS);
			ms_launch_nb<2>(s, b, blocks, CS, smem);
			break;
		case 4:
			smem = ms_smem<4>((maxch + CS - 1) / CS);
			ms_launch_nb<4>(s, b, blocks, CS, smem);
			break;
		default:
			smem = ms_smem<8>((maxch + CS - 1) / CS);
			ms_launch_nb<8>(s, b, blocks, CS, smem);
			break;
	}
	return true;
}

extern "C" void
kk_set_mma_q_dense(int mt, int max_rows)
{
	mq_set.dense = mt > 0 ? mt : 0;
	mq_set.dense_rows = max_rows > 0 && max_rows < KK_GEMV_MMA_Q_ROWS ? max_rows : KK_GEMV_MMA_Q_ROWS;
}

/* does the dense kernel take this job (FP8, one scale a row, cols % 64 == 0) at n rows (given room)? */
static bool
mx_ok(const mq_paths &p, const kk_gemv_job *jb, int n)
{
	return p.dense > 0 && n <= p.dense_rows && jb->fmt == KK_WF_FP8 && jb->group >= jb->cols && jb->cols % 64 == 0;
}

/*
 * The conversion plan of the batch's jobs that the dense kernel takes (all
 * of b's jobs when take is NULL, else those marked) and whose x16 the
 * caller did not preset (a bf16 twin: kept as it is): c's distinct
 * activation matrices (same x, ldx and cols) with their offsets in room
 * (NULL: offsets from 0), each job's x16 set when room is given.  Returns
 * the bytes of room the plan needs (0: no conversion launch).
 */
static size_t
mx_plan(kk_gemv_batch *b, const bool *take, uint16_t *room, mx_conv *c)
{
	int			nrows = b->n;
	size_t		off = 0;

	memset(c, 0, sizeof(*c));
	c->n = b->n;
	c->nrows = nrows;
	for (int j = 0; j < b->count; j++)
	{
		kk_gemv_job *jb = &b->job[j];
		int			e = 0;

		if ((take && !take[j]) || jb->x16)
			continue;
		while (e < c->count && !(c->x[e] == jb->x && c->ldx[e] == jb->ldx && c->cols[e] == jb->cols))
			e++;
		if (e == c->count)
		{
			c->x[e] = jb->x;
			c->ldx[e] = jb->ldx;
			c->cols[e] = jb->cols;
			c->vec[e] = jb->ldx % 4 == 0 && ((uintptr_t) jb->x & 15) == 0;
			c->d[e] = room ? room + off / sizeof(uint16_t) : NULL;
			off += (size_t) nrows * jb->cols * sizeof(uint16_t);
			c->count++;
		}
		jb->x16 = c->d[e];
	}
	return off;
}

/* the room the jobs of b that the dense kernel takes under p want (those without a preset x16) */
static size_t
mx_room(const mq_paths &p, const kk_gemv_batch *b)
{
	kk_gemv_batch t = *b;
	bool		take[KK_GEMV_JOBS] = {false};
	mx_conv		c;
	int			any = 0;

	if (b->count <= 0 || b->count > KK_GEMV_JOBS || b->n <= 0 || b->n > KK_GEMV_MMA_Q_ROWS)
		return 0;
	for (int j = 0; j < b->count; j++)
		any += take[j] = mx_ok(p, &b->job[j], b->n);
	return any ? mx_plan(&t, take, NULL, &c) : 0;
}

extern "C" size_t
kk_gemv_mma_q_room(const kk_gemv_batch *b)
{
	return mx_room(mq_set, b);
}

/*
 * Blocks an SM of the dense kernel at one n-block (2-8 tokens;
 * kk_set_mma_q_dense_occ): 2, or 3 (half the chunks a register set, 68-70
 * registers) for launches of more blocks than 2 an SM hold, so that q/k/v's
 * 384 two-tile blocks are one wave that streams rather than 1.45 waves of
 * all-at-once requests.  Launches that fit in one wave of 2 an SM keep 2
 * (twice the bytes in flight a warp).  H200, 2026-12-02, alone (gemv_sweep
 * dense_fp8, 8 tokens): q/k/v (384 blocks) 12.9 -> 9.9 us with 3, but o_proj
 * (144) 5.8 -> 6.8 and MLA q + kv_a (210) 6.7 -> 7.9.  At 2 n-blocks 3
 * would spill.
 */
static int	mx_occ = 2;

extern "C" int
kk_set_mma_q_dense_occ(int occ)
{
	int			was = mx_occ;

	mx_occ = occ == 3 ? 3 : 2;
	return was;
}

template <int NB>
static void
mx_launch_nb(cudaStream_t s, kk_gemv_batch *b, int mt, int blocks)
{
	if (NB == 1 && mx_occ == 3 && blocks > 2 * mq_sms())
	{
		if (mt == 2)
			kk_launch(gemv_mma_q_dense_kernel<2, 1, 3>, dim3(blocks), dim3(MX_WARPS * 32), 0, s, *b);
		else
			kk_launch(gemv_mma_q_dense_kernel<1, 1, 3>, dim3(blocks), dim3(MX_WARPS * 32), 0, s, *b);
	}
	else if (NB < 8 && mt == 2)
		kk_launch(gemv_mma_q_dense_kernel<2, NB < 8 ? NB : 1>, dim3(blocks), dim3(MX_WARPS * 32), 0, s, *b);
	else
		kk_launch(gemv_mma_q_dense_kernel<1, NB>, dim3(blocks), dim3(MX_WARPS * 32), 0, s, *b);
}

/* the conversion launch of plan c (mx_plan with room): one block row a distinct matrix; none when c has none */
static void
mx_convert_launch(cudaStream_t s, const mx_conv &c)
{
	int			most = 0;

	for (int e = 0; e < c.count; e++)
		most = c.cols[e] * c.nrows / 8 > most ? c.cols[e] * c.nrows / 8 : most;
	if (c.count > 0)
		kk_launch(mx_convert_kernel, dim3(ceil_div(most, 256), c.count), dim3(256), 0, s, c);
}

/*
 * The conversion (of the jobs without a preset twin; none: no launch), then (dense 3) the slab kernel where it runs, else the
 * dense kernel with the most tiles a block (up to dense: 1 or 2; 2 only up to 2 n-blocks: 16 rows) that still gives every
 * SM a block.  H200, 2026-12-01, FP8 step ms with 1 / 2 tiles: batch 8
 * 6.188 / 6.139, 16 9.41 / 9.42, 32 14.22 / 14.58, 64 22.33 / 22.33.
 * False (nothing launched) when the room is missing or too small.
 */
static bool
mx_launch(cudaStream_t s, kk_gemv_batch *b, int dense, uint16_t *room, size_t room_bytes)
{
	mx_conv		c;
	int			sms = mq_sms(),
				mt = dense >= 2 && mq_nb(b->n) <= 2 ? 2 : 1,
				blocks;
	size_t		need = mx_plan(b, NULL, NULL, &c);

	b->l2_rows = mq_l2 && b->n > 8;	/* (the tokens-as-M form from 9 rows, or the dense kernel where it does not run) */
	/* (jobs whose x16 came preset, twins, need no room; the conversion runs only for the rest) */
	if (need > 0 && (!room || need > room_bytes))
		return false;
	mx_plan(b, NULL, room, &c);
	mx_convert_launch(s, c);
	if (dense >= 3 && ms_launch(s, b))
		return true;
	if (mt_launch(s, b))
		return true;
	while (mt > 1 && kk_tile_blocks(b, mt) < sms)
		mt /= 2;
	blocks = kk_tile_blocks(b, mt);		/* (sets b->first_block for the kernel's copy) */
	switch (mq_nb(b->n))
	{
		case 1:
			mx_launch_nb<1>(s, b, mt, blocks);
			break;
		case 2:
			mx_launch_nb<2>(s, b, mt, blocks);
			break;
		case 4:
			mx_launch_nb<4>(s, b, mt, blocks);
			break;
		default:
			mx_launch_nb<8>(s, b, mt, blocks);
			break;
	}
	return true;
}

/* ------------------------------------------------------------------ host side */

/* bytes a 16-byte-or-smaller lane load covers, given the format, group and
 * columns: the widest LW whose chunk (4 LW bytes of a row) divides cols and
 * the group; 0 when none (then kk_mma_q_ok is false) */
static int
mq_lw(int fmt, int group, int cols)
{
	int			wpb = fmt == KK_WF_INT4 ? 2 : 1,
				lmin = fmt == KK_WF_INT4 ? 4 : 8;

	if ((fmt != KK_WF_FP8 && fmt != KK_WF_INT4) || cols <= 0 || group <= 0)
		return 0;
	for (int lw = 16; lw >= lmin; lw /= 2)
	{
		int			ck = 4 * lw * wpb;

		if (cols % ck == 0 && (group >= cols || group % ck == 0))
			return lw;
	}
	return 0;
}

extern "C" int
kk_mma_q_ok(int fmt, int group, int cols)
{
	/* 8 expert tokens of cols columns must fit in the expert kernel's shared memory */
	return mq_lw(fmt, group, cols) != 0 && (size_t) 8 * mq_ld_for(cols) * sizeof(uint16_t) <= MQ_SMEM;
}

static int
mq_nb(int n)
{
	return n <= 8 ? 1 : n <= 16 ? 2 : n <= 32 ? 4 : 8;
}

static int
mq_sms(void)
{
	int			dev = 0,
				sms = 132;

	if (cudaGetDevice(&dev) != cudaSuccess ||
		cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
		sms = 132;
	return sms;
}

/*
 * Blocks an SM the dense launcher aims at when it picks T (tiles a block):
 * the largest T that still gives mq_sm_blocks blocks an SM.  Fewer, taller
 * blocks stage the activations fewer times (a block of T tiles reads n
 * cols fp32 of activations for 16 T cols weight bytes: at T = 1 and n = 8
 * twice the FP8 weights, from L2), more blocks keep more loads in flight.
 * Not measured yet: bench/gemv_sweep.cu times both 1 and 2.
 */
static int	mq_sm_blocks = 2;

template <int FMT, int LW, int NB, bool GROUPED>
static void
mq_launch_dense(cudaStream_t s, kk_gemv_batch *b)
{
	constexpr int CK = 4 * LW * (FMT == KK_WF_INT4 ? 2 : 1);
	int			maxchunks = 0,
				seg,
				T = MQ_WARPS,
				blocks,
				sms = mq_sms();
	size_t		smem;

	for (int j = 0; j < b->count; j++)
		maxchunks = b->job[j].cols / CK > maxchunks ? b->job[j].cols / CK : maxchunks;
	/* the largest segment (in chunks) whose staged rows fit, at most all of k */
	seg = maxchunks;
	while (seg > 1 && (size_t) NB * 8 * mq_ld_for(seg * CK) * sizeof(uint16_t) > MQ_SMEM)
		seg = (seg + 1) / 2;
	smem = (size_t) NB * 8 * mq_ld_for(seg * CK) * sizeof(uint16_t);
	if (smem < (size_t) MQ_WARPS * NB * 4 * 32 * sizeof(float))
		smem = (size_t) MQ_WARPS * NB * 4 * 32 * sizeof(float);	/* the partial tiles */
	blocks = kk_tile_blocks(b, T);
	while (T > 1 && blocks < mq_sm_blocks * sms)
		blocks = kk_tile_blocks(b, T /= 2);
	if (smem > 48 * 1024)
		cudaFuncSetAttribute(gemv_mma_q_kernel<FMT, LW, NB, GROUPED>, cudaFuncAttributeMaxDynamicSharedMemorySize,
							 (int) smem);
	kk_launch(gemv_mma_q_kernel<FMT, LW, NB, GROUPED>, dim3(blocks), dim3(MQ_WARPS * 32), smem, s, *b, T, seg);
}

template <int FMT, int LW, bool GROUPED>
static void
mq_dense_nb(cudaStream_t s, kk_gemv_batch *b)
{
	switch (mq_nb(b->n))
	{
		case 1:
			mq_launch_dense<FMT, LW, 1, GROUPED>(s, b);
			break;
		case 2:
			mq_launch_dense<FMT, LW, 2, GROUPED>(s, b);
			break;
		case 4:
			mq_launch_dense<FMT, LW, 4, GROUPED>(s, b);
			break;
		default:
			mq_launch_dense<FMT, LW, 8, GROUPED>(s, b);
			break;
	}
}

template <bool GROUPED>
static void
mq_dense_variant(cudaStream_t s, kk_gemv_batch *b, int fmt, int lw)
{
	if (fmt == KK_WF_FP8)
	{
		if (lw == 16)
			mq_dense_nb<KK_WF_FP8, 16, GROUPED>(s, b);
		else
			mq_dense_nb<KK_WF_FP8, 8, GROUPED>(s, b);
	}
	else if (lw == 16)
		mq_dense_nb<KK_WF_INT4, 16, GROUPED>(s, b);
	else if (lw == 8)
		mq_dense_nb<KK_WF_INT4, 8, GROUPED>(s, b);
	else
		mq_dense_nb<KK_WF_INT4, 4, GROUPED>(s, b);
}

/* the kernel variant a job takes: fmt, LW and whether it has more than one scale a row */
static int
mq_variant(const kk_gemv_job *jb)
{
	return jb->fmt * 64 + mq_lw(jb->fmt, jb->group, jb->cols) * 2 + (jb->group < jb->cols);
}

/* kk_gemv_multi_mma_q with the kernel choices p */
static void
mq_multi(cudaStream_t s, kk_gemv_batch *b, const mq_paths &p)
{
	bool		done[KK_GEMV_JOBS] = {false};

	if (b->count <= 0 || b->count > KK_GEMV_JOBS || b->n <= 0 || b->n > KK_GEMV_MMA_Q_ROWS)
		return;
	for (int j = 0; j < b->count; j++)
		b->job[j].vec = b->job[j].ldx % 4 == 0 && ((uintptr_t) b->job[j].x & 15) == 0;
	/* one launch for each kernel variant among the jobs (usually one: a batch shares its form) */
	for (int j = 0; j < b->count; j++)
	{
		kk_gemv_batch sub;
		int			v = mq_variant(&b->job[j]);

		if (done[j])
			continue;
		if (!kk_mma_q_ok(b->job[j].fmt, b->job[j].group, b->job[j].cols))
			continue;			/* not ours (the caller asks kk_mma_q_ok first): nothing launched */
		memset(&sub, 0, sizeof(sub));
		sub.n = b->n;
		for (int i = j; i < b->count; i++)
			if (!done[i] && mq_variant(&b->job[i]) == v)
			{
				sub.job[sub.count++] = b->job[i];
				done[i] = true;
			}
		if (mx_ok(p, &b->job[j], b->n) && mx_launch(s, &sub, p.dense, b->xq, b->xq_bytes))
			continue;
		if (mq_direct_ok(p, &b->job[j], b->n))
			mq_launch_direct(s, &sub, p.direct);
		else if (b->job[j].group < b->job[j].cols)
			mq_dense_variant<true>(s, &sub, b->job[j].fmt, mq_lw(b->job[j].fmt, b->job[j].group, b->job[j].cols));
		else
			mq_dense_variant<false>(s, &sub, b->job[j].fmt, mq_lw(b->job[j].fmt, b->job[j].group, b->job[j].cols));
	}
}

extern "C" void
kk_gemv_multi_mma_q(cudaStream_t s, kk_gemv_batch *b)
{
	mq_multi(s, b, mq_set);
}

extern "C" size_t
kk_gemv_mma_q_room_as(const kk_gemv_batch *b, int dense)
{
	return mx_room(mq_paths {0, dense, KK_GEMV_MMA_Q_ROWS}, b);
}

extern "C" void
kk_gemv_multi_mma_q_as(cudaStream_t s, kk_gemv_batch *b, int direct, int dense)
{
	mq_multi(s, b, mq_paths {direct, dense, KK_GEMV_MMA_Q_ROWS});
}

extern "C" void
kk_gemv_mma_q(cudaStream_t s, float *y, int ldy, const float *x, int ldx, int n, const void *W, int fmt, int group,
			  int rows, int cols)
{
	kk_gemv_batch b;

	kk_one_job(&b, y, ldy, x, ldx, n, W, fmt, group, rows, cols);
	kk_gemv_multi_mma_q(s, &b);
}

/* ------------------------------------------------------------------ expert products */

/*
 * Item blockIdx.y of the work list, 128 rows blockIdx.x of its matrix (one
 * matrix: in the two-matrix mode the second half of the blocks takes W1 ->
 * y1; SWIGLU: gate W0 and up W1 of the same rows, silu(gate) * up -> y0).
 * Dynamic shared memory: 8 token rows of mq_ld_for(cols) bf16.
 */
template <int FMT, int LW, bool GROUPED, bool SWIGLU>
__global__ void __launch_bounds__(MQ_XWARPS * 32)
expert_mma_q_kernel(float *y0, float *y1, int ldy, const float *__restrict__ x, int ldx, const int *__restrict__ xrow,
					const void *const *W0, const void *const *W1, int group, int rows, int cols,
					const int *__restrict__ start, const int *__restrict__ active, int P, bool vec)
{
	using St = mq_stream<FMT, LW, 1, GROUPED>;
	constexpr int NM = SWIGLU ? 2 : 1;
	extern __shared__ uint4 mq_smem[];
	uint16_t   *xs = (uint16_t *) mq_smem;
	int			ld = mq_ld_for(cols),
				per = (rows + MQ_XWARPS * 16 - 1) / (MQ_XWARPS * 16),
				m1 = !SWIGLU && W1 && (int) blockIdx.x >= per;
	int			warp = threadIdx.x >> 5,
				lane = threadIdx.x & 31,
				g = lane >> 2,
				t = lane & 3;
	int			r0 = ((int) blockIdx.x - m1 * per) * MQ_XWARPS * 16 + warp * 16;
	int			nchunk = cols / St::CK,
				ngroups = (cols + group - 1) / group,
				e,
				first,
				count;
	size_t		rbytes = kk_q_row_bytes(FMT, cols),
				soff = kk_q_scale_offset(rows, FMT, cols);
	float		tot[NM][1][4];
	St			st[NM];

	/* which experts run depends on the routing kernel before: wait first */
	kk_dep_wait();
	kk_dep_launch();
	if ((int) blockIdx.y >= active[0])
		return;					/* the whole block: no barrier is skipped */
	e = kk_expert_item(active, start, blockIdx.y, P, &first, &count);
	{
		int			ra = r0 + g < rows ? r0 + g : rows - 1,
					rb = r0 + g + 8 < rows ? r0 + g + 8 : rows - 1;

#pragma unroll
		for (int m = 0; m < NM; m++)
		{
			const uint8_t *W = (const uint8_t *) (SWIGLU ? (m ? W1[e] : W0[e]) : (m1 ? W1[e] : W0[e]));
			const float *sc = (const float *) (W + soff);

			st[m].rg = W + (size_t) ra * rbytes + t * LW;
			st[m].rg8 = W + (size_t) rb * rbytes + t * LW;
			st[m].sg = sc + (size_t) ra * ngroups;
			st[m].sg8 = sc + (size_t) rb * ngroups;
			st[m].cpg = (GROUPED ? group : cols) / St::CK;
			tot[m][0][0] = tot[m][0][1] = tot[m][0][2] = tot[m][0][3] = 0;
			if (r0 < rows)
				st[m].prime(0, nchunk);	/* travels while the tokens are staged */
		}
	}
	mq_stage<FMT>(xs, ld, 8, count,
				  [&](int r) { return x + (size_t) (xrow ? xrow[first + r] : first + r) * ldx; }, vec, 0, cols);
	__syncthreads();
	if (r0 >= rows)
		return;					/* no barrier follows */
#pragma unroll
	for (int m = 0; m < NM; m++)
		st[m].run(tot[m], xs + (size_t) g * ld + t * LW * St::WPB, ld, 0, 0, nchunk);

	/* D fragment: tot[.][0][i] is row g (i < 2) or g + 8, token 2t + (i & 1) */
	{
		float	   *y = m1 ? y1 : y0;
		float		k = FMT == KK_WF_FP8 ? MQ_FP8_SCALE : 1.0f;

#pragma unroll
		for (int i = 0; i < 4; i++)
		{
			int			row = r0 + g + (i >= 2 ? 8 : 0),
						tok = 2 * t + (i & 1);
			float		v[NM];

#pragma unroll
			for (int m = 0; m < NM; m++)
				v[m] = tot[m][0][i] * (GROUPED ? 1.0f : __ldg(i >= 2 ? st[m].sg8 : st[m].sg)) * k;
			if (SWIGLU)
				v[0] = siluf_(v[0]) * v[NM - 1];
			if (row < rows && tok < count)
				y[(size_t) (first + tok) * ldy + row] = v[0];
		}
	}
}

template <int FMT, int LW, bool GROUPED>
static void
mq_launch_expert(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
				 const void *const *W0, const void *const *W1, int group, int rows, int cols, const int *start,
				 const int *active, int max_active, int P)
{
	bool		vec = ldx % 4 == 0 && ((uintptr_t) x & 15) == 0,
				swiglu = W1 && !y1;
	dim3		grid(ceil_div(rows, MQ_XWARPS * 16) * (W1 && y1 ? 2 : 1), max_active);
	size_t		smem = (size_t) 8 * mq_ld_for(cols) * sizeof(uint16_t);

	if (swiglu)
	{
		if (smem > 48 * 1024)
			cudaFuncSetAttribute(expert_mma_q_kernel<FMT, LW, GROUPED, true>,
								 cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem);
		kk_launch(expert_mma_q_kernel<FMT, LW, GROUPED, true>, grid, dim3(MQ_XWARPS * 32), smem, s, y0, y1, ldy, x,
				  ldx, xrow, W0, W1, group, rows, cols, start, active, P, vec);
	}
	else
	{
		if (smem > 48 * 1024)
			cudaFuncSetAttribute(expert_mma_q_kernel<FMT, LW, GROUPED, false>,
								 cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem);
		kk_launch(expert_mma_q_kernel<FMT, LW, GROUPED, false>, grid, dim3(MQ_XWARPS * 32), smem, s, y0, y1, ldy,
				  x, ldx, xrow, W0, W1, group, rows, cols, start, active, P, vec);
	}
}

template <bool GROUPED>
static void
mq_expert_variant(int fmt, int lw, cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx,
				  const int *xrow, const void *const *W0, const void *const *W1, int group, int rows, int cols,
				  const int *start, const int *active, int max_active, int P)
{
#define MQ_X(F, L) mq_launch_expert<F, L, GROUPED>(s, y0, y1, ldy, x, ldx, xrow, W0, W1, group, rows, cols, start, \
												  active, max_active, P)
	if (fmt == KK_WF_FP8)
	{
		if (lw == 16)
			MQ_X(KK_WF_FP8, 16);
		else
			MQ_X(KK_WF_FP8, 8);
	}
	else if (lw == 16)
		MQ_X(KK_WF_INT4, 16);
	else if (lw == 8)
		MQ_X(KK_WF_INT4, 8);
	else
		MQ_X(KK_WF_INT4, 4);
#undef MQ_X
}

extern "C" void
kk_expert_mma_q(cudaStream_t s, float *y0, float *y1, int ldy, const float *x, int ldx, const int *xrow,
				const void *const *W0, const void *const *W1, int fmt, int group, int rows, int cols,
				const int *start, const int *active, int max_active, int P)
{
	int			lw = mq_lw(fmt, group, cols);

	if (max_active <= 0 || rows <= 0 || lw == 0 || P > KK_EXPERT_MMA_ROWS)
		return;
	if (group < cols)
		mq_expert_variant<true>(fmt, lw, s, y0, y1, ldy, x, ldx, xrow, W0, W1, group, rows, cols, start, active,
								max_active, P);
	else
		mq_expert_variant<false>(fmt, lw, s, y0, y1, ldy, x, ldx, xrow, W0, W1, group, rows, cols, start, active,
								 max_active, P);
}
