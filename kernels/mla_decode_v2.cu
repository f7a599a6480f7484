/*
 * mla_decode_v2.cu — MLA decode attention over the bf16 latent cache:
 * the mma.sync decode attention, restructured (KL_CUDA_MLA_MMA=2).
 * Contract: kernels.h, "MLA decode attention variants".
 *
 * Only the 48B model's shape (Ha 32, R 512, Dr 64: rows of 576 bf16), so
 * every stride is a constant.  Block (token t, key range p) of 16 warps, one
 * block an SM (~173 KB of shared memory, <= 128 registers): 4 warps a
 * scheduler where mla_attend_mma_kernel had 2.  Key tiles of 32 rows in a
 * ring of 4 cp.async stages (3 tiles in flight while one is computed), three
 * block barriers a tile.
 *   scores   S = Qabs K^T (heads as m, keys as n), the 576 dimensions split
 *            in 4 chunks of 144 over the warps: warp w takes head m-tile
 *            w & 1, keys 16 ((w >> 1) & 1) .. + 15 and chunk w >> 2, with
 *            its Qabs A fragments in registers for the whole block (36
 *            registers, read from qabs once and rounded to bf16: no Qabs
 *            in shared memory, no conversion pass); the 4 chunks' partial
 *            scores go to shared memory (fp32) and are added in chunk order
 *   softmax  16 threads a head, 2 keys a thread, base 2 (scores times
 *            scale log2 e); running max and sum in registers, the same on
 *            the head's 16 lanes (xor butterflies are order-symmetric)
 *   P V      warp w owns value columns 32 w .. 32 w + 31 of all 32 heads
 *            (2 m-tiles x 4 n-tiles: 32 accumulator registers)
 * Partials as kk_mla_attend_mma writes them (running max in natural units,
 * m ln 2), unless the token has one range (then olat directly).  FUSE: the
 * last block of a token to finish (atomicAdd on counters[t]) merges its
 * partials into olat in mla_merge_kernel's arithmetic and resets the
 * counter; used where the ranges per token are few (the merge is one
 * block's reads).  Otherwise mla_decode_v2_merge_kernel follows (a wider
 * grid than mla_merge's).  Either way the launcher reports olat merged.
 * Numerics: Qabs rounded to bf16 once, P = 2^(s log2e - m) rounded to bf16
 * before P V, the running sum of the rounded values; all else fp32 (the
 * base-2 exponent is exp(s - m) up to fp32 rounding of the product).
 * Tuning knobs (host, read once a process): KL_CUDA_MLA_V2_KEYS
 * (keys per range, a multiple of 32; else the cost model below) and
 * KL_CUDA_MLA_V2_FUSE (merge in the kernel up to this many ranges a token;
 * default 8, 0 never).
 */
#include <stdlib.h>

#include "common.cuh"

#define V2_HA 32				/* heads */
#define V2_R 512				/* latent width, value columns */
#define V2_DR 64				/* rope part of the key */
#define V2_WA (V2_R + V2_DR)	/* bf16 numbers a cache row */
#define V2_TK 32				/* keys a tile */
#define V2_NST 4				/* tiles in the cp.async ring */
#define V2_PITCH (V2_WA + 8)	/* bf16 a shared key row: 1168 bytes, an odd multiple of 16 */
#define V2_KC 4					/* chunks of the score's 576 dimensions */
#define V2_KSTEPS (V2_WA / 16 / V2_KC)	/* 9 k-steps of 16 a chunk */
#define V2_SPITCH (V2_TK + 8)	/* floats a partial-score row */
#define V2_PPITCH (V2_TK + 8)	/* bf16 a P row (80 bytes: ldmatrix rows in 8 bank groups) */
#define V2_THREADS 512
#define V2_FUSE_MAX 16			/* most ranges a fused merge takes (its weights' shared array) */
#define V2_FUSE_DEFAULT 8
#define V2_MIN_TILES 4			/* a range has at least this many tiles (where the keys allow) */
#define V2_FIXED_TILES 4		/* a range's fixed cost in tiles: Qabs, first-tile latency, partials */

/* v2_load_tile's map: 16 threads a key row, 72 = 4 x 16 + 8 copies of 16 bytes a row */
static_assert(V2_THREADS == 16 * V2_TK && V2_WA == 8 * (4 * 16 + 8), "v2_load_tile's thread map");

/* shared memory: the ring, the chunks' partial scores, P, the corrections, merge weights */
#define V2_SMEM_RING (sizeof(uint16_t) * V2_NST * V2_TK * V2_PITCH)
#define V2_SMEM_S (sizeof(float) * V2_KC * V2_HA * V2_SPITCH)
#define V2_SMEM_P (sizeof(uint16_t) * V2_HA * V2_PPITCH)
#define V2_SMEM (V2_SMEM_RING + V2_SMEM_S + V2_SMEM_P + sizeof(float) * V2_HA * (2 + V2_FUSE_MAX))

/*
 * Tile `it` of the range (keys kb .. kb + nk - 1, one page: tiles start at
 * multiples of 32, which divides the page) into its ring slot: 32 rows of
 * 1152 contiguous bytes, 72 copies of 16 bytes a row; thread tid copies row
 * tid / 16, chunks tid % 16 + 16 u (u < 4, and u = 4 on the first 8 lanes
 * of the 16), so every address is the thread's base plus a constant.
 * Rows nk .. 31 are zeroed (P is zero there, and zero times stale bits
 * could be NaN).
 */
__device__ __forceinline__ void
v2_load_tile(uint16_t *ring, int it, const uint16_t *src, int nk)
{
	int			row = threadIdx.x >> 4,
				c = threadIdx.x & 15;
	uint16_t   *dst = ring + (it & (V2_NST - 1)) * V2_TK * V2_PITCH + row * V2_PITCH + 8 * c;

	src += row * V2_WA + 8 * c;
	if (row < nk)
	{
#pragma unroll
		for (int u = 0; u < 4; u++)
			cp_async16(dst + 128 * u, src + 128 * u);
		if (c < 8)
			cp_async16(dst + 512, src + 512);
	}
	else
	{
#pragma unroll
		for (int u = 0; u < 4; u++)
			*(uint4 *) (dst + 128 * u) = make_uint4(0, 0, 0, 0);
		if (c < 8)
			*(uint4 *) (dst + 512) = make_uint4(0, 0, 0, 0);
	}
}

/* keys kb .. of sequence s's cache (kb a multiple of V2_TK) */
__device__ __forceinline__ const uint16_t *
v2_keys(const kk_mla_decode_args &a, int s, int64_t kb)
{
	const uint16_t *page = (const uint16_t *) a.pages[(size_t) s * a.page_cap + kb / KK_MLA_PAGE];

	return page + (size_t) (kb % KK_MLA_PAGE) * V2_WA;
}

/* the tile after the prologue's: issue tile `it` where the range has it; one commit group either way */
__device__ __forceinline__ void
v2_issue(const kk_mla_decode_args &a, uint16_t *ring, int s, int64_t k0, int64_t k1, int it, int nt)
{
	if (it < nt)
	{
		int64_t		kb = k0 + (int64_t) it * V2_TK;

		v2_load_tile(ring, it, v2_keys(a, s, kb), k1 - kb < V2_TK ? (int) (k1 - kb) : V2_TK);
	}
	cp_async_commit();
}

/*
 * The last block of token t merges its np ranges (mla_merge_kernel's
 * arithmetic: weights exp(m_p - M), L = sum of w_p l_p, olat = sum of
 * w_p acc_p times 1 / L).  Partials are read through L2 (__ldcg): other
 * blocks wrote them, and this SM's L1 may hold an older launch's lines.
 */
__device__ __forceinline__ void
v2_merge(const kk_mla_decode_args &a, int t, int np, float *sw, float *sinv)
{
	size_t		base = (size_t) t * a.max_splits * V2_HA;
	int			h = threadIdx.x >> 4,
				j = threadIdx.x & 15;
	float		M = -INFINITY,
				L = 0;

	for (int p = j; p < np; p += 16)
		M = fmaxf(M, __ldcg(a.part_ml + (base + (size_t) p * V2_HA + h) * 2));
#pragma unroll
	for (int o = 8; o > 0; o >>= 1)
		M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
	for (int p = j; p < np; p += 16)
	{
		float		mp = __ldcg(a.part_ml + (base + (size_t) p * V2_HA + h) * 2),
					wp = mp != -INFINITY ? expf(mp - M) : 0.0f;

		sw[p * V2_HA + h] = wp;
		L += wp * __ldcg(a.part_ml + (base + (size_t) p * V2_HA + h) * 2 + 1);
	}
#pragma unroll
	for (int o = 8; o > 0; o >>= 1)
		L += __shfl_xor_sync(0xffffffffu, L, o);
	if (j == 0)
		sinv[h] = 1.0f / L;
	__syncthreads();

	/* 32 heads x 128 float4 columns; 8 a thread, all 8 loads of a range in flight */
	{
		float4		acc[8];

#pragma unroll
		for (int u = 0; u < 8; u++)
			acc[u] = make_float4(0, 0, 0, 0);
		for (int p = 0; p < np; p++)
		{
#pragma unroll
			for (int u = 0; u < 8; u++)
			{
				int			e = threadIdx.x + u * V2_THREADS,
							hh = e >> 7;
				float		wp = sw[p * V2_HA + hh];
				float4		v = __ldcg((const float4 *) (a.part_acc + (base + (size_t) p * V2_HA + hh) * V2_R) +
									   (e & 127));

				acc[u].x += wp * v.x;
				acc[u].y += wp * v.y;
				acc[u].z += wp * v.z;
				acc[u].w += wp * v.w;
			}
		}
#pragma unroll
		for (int u = 0; u < 8; u++)
		{
			int			e = threadIdx.x + u * V2_THREADS,
						hh = e >> 7;
			float		il = sinv[hh];

			((float4 *) (a.olat + ((size_t) t * V2_HA + hh) * V2_R))[e & 127] =
				make_float4(acc[u].x * il, acc[u].y * il, acc[u].z * il, acc[u].w * il);
		}
	}
}

template <bool FUSE>
__global__ void __launch_bounds__(V2_THREADS, 1)
mla_decode_v2_kernel(const kk_mla_decode_args a)
{
	extern __shared__ uint4 smem_v2[];
	uint16_t   *ring = (uint16_t *) smem_v2;	/* [NST][TK][PITCH] key tiles */
	float	   *ss = (float *) (ring + V2_NST * V2_TK * V2_PITCH);	/* [KC][HA][SPITCH] partial scores */
	uint16_t   *sp = (uint16_t *) (ss + V2_KC * V2_HA * V2_SPITCH);	/* [HA][PPITCH] P, bf16 */
	float	   *scorr = (float *) (sp + V2_HA * V2_PPITCH);	/* [HA] this tile's correction; then 1 / l */
	float	   *sw = scorr + V2_HA; /* [FUSE_MAX][HA] merge weights, then a flag */
	int			t = blockIdx.x,
				p = blockIdx.y;
	int			tid = threadIdx.x,
				lane = tid & 31,
				w = tid >> 5,
				g = lane >> 2,
				q = lane & 3;
	/* score role: head m-tile, keys of the tile, chunk of the dimensions */
	int			mh = w & 1,
				kh = (w >> 1) & 1,
				kc = w >> 2;
	/* softmax role: head, key pair */
	int			sh = tid >> 4,
				sj = tid & 15;
	/* ldmatrix row addresses: A (and .trans B) row (lane & 7) + 8 ((lane >> 3) & 1), column 8 (lane >> 4);
	 * non-transposed B of two n-tiles: key (lane & 7) + 8 (lane >> 4), column 8 ((lane >> 3) & 1) */
	int			lrow = (lane & 7) + ((lane >> 3) & 1) * 8,
				lcol = (lane >> 4) * 8,
				brow = (lane & 7) + (lane >> 4) * 8,
				bcol = ((lane >> 3) & 1) * 8;
	const float sl2 = a.scale * 1.4426950408889634f;
	int			s,
				nt,
				np;
	int64_t		pos,
				k0 = (int64_t) p * a.split_keys,
				k1;
	uint32_t	qa[V2_KSTEPS][4];	/* Qabs A fragments of this warp's m-tile and chunk */
	float		o[2][4][4];		/* [head m-tile][n-tile of the warp's 32 columns][C regs] */
	float		m_run = -INFINITY,	/* head sh's running max (base 2) and sum */
				l_run = 0.0f;

	kk_dep_wait();
	kk_dep_launch();
	s = a.row_seq[t];
	pos = a.pos0[s] + (t - a.row0[s]);
	if (!a.absorbed[s] || k0 > pos)
		return;
	k1 = k0 + a.split_keys < pos + 1 ? k0 + a.split_keys : pos + 1;
	nt = (int) ((k1 - k0 + V2_TK - 1) / V2_TK);
	np = (int) (pos / a.split_keys) + 1;

	/* the ring's first tiles go out before Qabs is read (they overlap) */
#pragma unroll
	for (int i = 0; i < V2_NST - 1; i++)
		v2_issue(a, ring, s, k0, k1, i, nt);
	{
		const float *qrow0 = a.qabs + ((size_t) t * V2_HA + 16 * mh + g) * V2_WA + 144 * kc + 2 * q,
				   *qrow1 = qrow0 + 8 * V2_WA;

#pragma unroll
		for (int k = 0; k < V2_KSTEPS; k++)
		{
			float2		v0 = __ldg((const float2 *) (qrow0 + 16 * k)),
						v1 = __ldg((const float2 *) (qrow1 + 16 * k)),
						v2 = __ldg((const float2 *) (qrow0 + 16 * k + 8)),
						v3 = __ldg((const float2 *) (qrow1 + 16 * k + 8));

			qa[k][0] = cvt_bf16x2(v0.x, v0.y);
			qa[k][1] = cvt_bf16x2(v1.x, v1.y);
			qa[k][2] = cvt_bf16x2(v2.x, v2.y);
			qa[k][3] = cvt_bf16x2(v3.x, v3.y);
		}
	}
#pragma unroll
	for (int m = 0; m < 2; m++)
#pragma unroll
		for (int n = 0; n < 4; n++)
			o[m][n][0] = o[m][n][1] = o[m][n][2] = o[m][n][3] = 0.0f;

	for (int it = 0; it < nt; it++)
	{
		const uint16_t *kt = ring + (it & (V2_NST - 1)) * V2_TK * V2_PITCH;
		int			nk = k1 - (k0 + (int64_t) it * V2_TK) < V2_TK ? (int) (k1 - (k0 + (int64_t) it * V2_TK)) : V2_TK;

		cp_async_wait_group<V2_NST - 2>();	/* this thread's copies of tile it have landed */
		__syncthreads();		/* ... everyone's; tile it - 1's slot, scores, P consumed */
		v2_issue(a, ring, s, k0, k1, it + V2_NST - 1, nt);

		/* partial scores of chunk kc: heads 16 mh + (g, g + 8), keys 16 kh + 8 n + (2q, 2q + 1) */
		{
			float		c[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
			const uint16_t *kp = kt + (16 * kh + brow) * V2_PITCH + 144 * kc + bcol;
			float	   *sc = ss + (kc * V2_HA + 16 * mh + g) * V2_SPITCH + 16 * kh + 2 * q;

#pragma unroll
			for (int k = 0; k < V2_KSTEPS; k++)
			{
				uint32_t	b[4];

				ldsm_x4(b, kp + 16 * k);
				mma_bf16_16816(c[0], qa[k], b[0], b[1]);
				mma_bf16_16816(c[1], qa[k], b[2], b[3]);
			}
#pragma unroll
			for (int n = 0; n < 2; n++)
			{
				*(float2 *) (sc + 8 * n) = make_float2(c[n][0], c[n][1]);
				*(float2 *) (sc + 8 * V2_SPITCH + 8 * n) = make_float2(c[n][2], c[n][3]);
			}
		}
		__syncthreads();

		/* online softmax: head sh, keys 2 sj, 2 sj + 1 (chunks added in order) */
		{
			const float *sc = ss + sh * V2_SPITCH + 2 * sj;
			float2		x = *(const float2 *) sc;
			float		s0,
						s1,
						mx,
						corr,
						sum;
			uint32_t	pk;

#pragma unroll
			for (int c = 1; c < V2_KC; c++)
			{
				float2		y = *(const float2 *) (sc + c * V2_HA * V2_SPITCH);

				x.x += y.x;
				x.y += y.y;
			}
			s0 = 2 * sj < nk ? x.x * sl2 : -INFINITY;
			s1 = 2 * sj + 1 < nk ? x.y * sl2 : -INFINITY;
			mx = fmaxf(s0, s1);
#pragma unroll
			for (int off = 8; off > 0; off >>= 1)
				mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
			mx = fmaxf(mx, m_run);	/* finite: key 0 of a tile is always in range */
			corr = m_run == -INFINITY ? 0.0f : exp2f(m_run - mx);
			pk = cvt_bf16x2(exp2f(s0 - mx), exp2f(s1 - mx));
			sum = __uint_as_float(pk << 16) + __uint_as_float(pk & 0xffff0000u);
#pragma unroll
			for (int off = 8; off > 0; off >>= 1)
				sum += __shfl_xor_sync(0xffffffffu, sum, off);
			l_run = l_run * corr + sum;
			m_run = mx;
			*(uint32_t *) (sp + sh * V2_PPITCH + 2 * sj) = pk;
			if (sj == 0)
				scorr[sh] = corr;
		}
		__syncthreads();

		/* O = O corr + P V: columns 32 w + 8 n + (2q, 2q + 1); the rescale is
		 * skipped where no head's max moved (every corr exactly 1: the same bits) */
		{
			float		cr[2][2] = {{scorr[g], scorr[g + 8]}, {scorr[16 + g], scorr[24 + g]}};

			if (!__all_sync(0xffffffffu, cr[0][0] == 1.0f && cr[0][1] == 1.0f && cr[1][0] == 1.0f &&
							cr[1][1] == 1.0f))
			{
#pragma unroll
				for (int m = 0; m < 2; m++)
#pragma unroll
					for (int n = 0; n < 4; n++)
					{
						o[m][n][0] *= cr[m][0];
						o[m][n][1] *= cr[m][0];
						o[m][n][2] *= cr[m][1];
						o[m][n][3] *= cr[m][1];
					}
			}
		}
#pragma unroll
		for (int k = 0; k < V2_TK; k += 16)
		{
			uint32_t	pa[2][4];

#pragma unroll
			for (int m = 0; m < 2; m++)
				ldsm_x4(pa[m], sp + (16 * m + lrow) * V2_PPITCH + k + lcol);
#pragma unroll
			for (int i = 0; i < 2; i++)
			{
				uint32_t	b[4];

				/* V rows k .. k + 15, columns 32 w + 16 i .. + 15, transposed */
				ldsm_x4_trans(b, kt + (k + lrow) * V2_PITCH + 32 * w + 16 * i + lcol);
#pragma unroll
				for (int m = 0; m < 2; m++)
				{
					mma_bf16_16816(o[m][2 * i], pa[m], b[0], b[1]);
					mma_bf16_16816(o[m][2 * i + 1], pa[m], b[2], b[3]);
				}
			}
		}
	}
	cp_async_wait_group<0>();	/* (only empty groups can be left) */

	if (np == 1)
	{
		/* the token's only range: olat = O / l, no partials */
		__syncthreads();		/* (the last tile's corrections read) */
		if (sj == 0)
			scorr[sh] = 1.0f / l_run;
		__syncthreads();
#pragma unroll
		for (int m = 0; m < 2; m++)
		{
			int			h0 = 16 * m + g;
			float		i0 = scorr[h0],
						i1 = scorr[h0 + 8];

#pragma unroll
			for (int n = 0; n < 4; n++)
			{
				float	   *dst = a.olat + ((size_t) t * V2_HA + h0) * V2_R + 32 * w + 8 * n + 2 * q;

				*(float2 *) dst = make_float2(o[m][n][0] * i0, o[m][n][1] * i0);
				*(float2 *) (dst + 8 * V2_R) = make_float2(o[m][n][2] * i1, o[m][n][3] * i1);
			}
		}
		return;
	}

	/* this range's partials (kk_mla_attend_mma's layout; the max in natural units) */
	{
		size_t		base = ((size_t) t * a.max_splits + p) * V2_HA;

#pragma unroll
		for (int m = 0; m < 2; m++)
#pragma unroll
			for (int n = 0; n < 4; n++)
			{
				float	   *dst = a.part_acc + (base + 16 * m + g) * V2_R + 32 * w + 8 * n + 2 * q;

				*(float2 *) dst = make_float2(o[m][n][0], o[m][n][1]);
				*(float2 *) (dst + 8 * V2_R) = make_float2(o[m][n][2], o[m][n][3]);
			}
		if (sj == 0)
			*(float2 *) (a.part_ml + (base + sh) * 2) = make_float2(m_run * 0.6931471805599453f, l_run);
	}
	if (FUSE)
	{
		int		   *last = (int *) (sw + V2_FUSE_MAX * V2_HA);

		__threadfence();		/* the partials before the count */
		__syncthreads();
		if (tid == 0)
			*last = atomicAdd(a.counters + t, 1u) == (unsigned) np - 1;
		__syncthreads();
		if (!*last)
			return;
		__threadfence();		/* the other blocks' partials after their counts */
		v2_merge(a, t, np, sw, scorr);
		if (tid == 0)
			a.counters[t] = 0;	/* ready for the next launch (graph replays) */
	}
}

/*
 * The merge of every token's ranges where the attention did not fuse it
 * (mla_merge_kernel's arithmetic), spread wider than mla_merge's (token,
 * head) blocks: block (token, head, quarter of the columns), 8 warps taking
 * the ranges p = warp, warp + 8, ... (a lane a float4 of the quarter), their
 * sums added in warp order.  At 32k keys batch 1 that is 128 blocks of 64 KB
 * of partials each where mla_merge had 32 of 256 KB.
 */
#define V2M_GROUPS 8			/* warps a merge block */
#define V2M_SLICES (V2_R / 128) /* column quarters: 32 lanes x 4 floats */

__global__ void __launch_bounds__(32 * V2M_GROUPS)
mla_decode_v2_merge_kernel(const kk_mla_decode_args a)
{
	extern __shared__ float mw[];	/* [max_splits] each range's weight exp(m_p - M) */
	__shared__ float red[V2M_GROUPS];
	__shared__ float4 part[V2M_GROUPS][32];
	int			t = blockIdx.x,
				h = blockIdx.y,
				slice = blockIdx.z;
	int			tid = threadIdx.x,
				lane = tid & 31,
				grp = tid >> 5;
	size_t		base = (size_t) t * a.max_splits * V2_HA;
	float		M = -INFINITY,
				L = 0;
	int			s,
				np;
	int64_t		pos;
	float4		acc = make_float4(0, 0, 0, 0);
	const float4 *src;

	kk_dep_wait();
	kk_dep_launch();
	s = a.row_seq[t];
	pos = a.pos0[s] + (t - a.row0[s]);
	np = (int) (pos / a.split_keys) + 1;
	if (!a.absorbed[s] || np == 1)
		return;					/* (one range: the attention wrote olat) */
	for (int p = tid; p < np; p += blockDim.x)
	{
		float		mp = __ldcg(a.part_ml + (base + (size_t) p * V2_HA + h) * 2);

		mw[p] = mp;
		M = fmaxf(M, mp);
	}
	M = warp_max(M);
	if (lane == 0)
		red[grp] = M;
	__syncthreads();
	M = red[0];
	for (int i = 1; i < V2M_GROUPS; i++)
		M = fmaxf(M, red[i]);
	__syncthreads();
	for (int p = tid; p < np; p += blockDim.x)
	{
		float		mp = mw[p],
					wp = mp != -INFINITY ? expf(mp - M) : 0.0f;

		mw[p] = wp;
		L += wp * __ldcg(a.part_ml + (base + (size_t) p * V2_HA + h) * 2 + 1);
	}
	L = warp_sum(L);
	if (lane == 0)
		red[grp] = L;
	__syncthreads();
	L = 0;
	for (int i = 0; i < V2M_GROUPS; i++)
		L += red[i];

	src = (const float4 *) (a.part_acc + (base + h) * V2_R) + slice * 32 + lane;
#pragma unroll 4
	for (int p = grp; p < np; p += V2M_GROUPS)
	{
		float		wp = mw[p];
		float4		v = __ldcg(src + (size_t) p * (V2_HA * V2_R / 4));

		acc.x += wp * v.x;
		acc.y += wp * v.y;
		acc.z += wp * v.z;
		acc.w += wp * v.w;
	}
	part[grp][lane] = acc;
	__syncthreads();
	if (grp == 0)
	{
		float		il = 1.0f / L;

		for (int i = 1; i < V2M_GROUPS; i++)
		{
			float4		v = part[i][lane];

			acc.x += v.x;
			acc.y += v.y;
			acc.z += v.z;
			acc.w += v.w;
		}
		((float4 *) (a.olat + ((size_t) t * V2_HA + h) * V2_R))[slice * 32 + lane] =
			make_float4(acc.x * il, acc.y * il, acc.z * il, acc.w * il);
	}
}

/* keys-per-range and fuse-limit overrides (tuning runs), read once a
 * process; -1 where unset or malformed */
static long
v2_env(const char *name)
{
	const char *v = getenv(name);
	char	   *end;
	long		x;

	if (!v || !*v)
		return -1;
	x = strtol(v, &end, 10);
	return *end || x < 0 ? -1 : x;
}

static long
v2_env_keys(void)
{
	static long keys = -2;

	if (keys == -2)
		keys = v2_env("KL_CUDA_MLA_V2_KEYS");
	return keys;
}

static long
v2_env_fuse(void)
{
	static long fuse = -2;

	if (fuse == -2)
		fuse = v2_env("KL_CUDA_MLA_V2_FUSE");
	return fuse;
}

extern "C" int
kk_mla_decode_v2_supported(int Ha, int R, int Dr)
{
	int			dev = 0,
				optin = 0;

	if (Ha != V2_HA || R != V2_R || Dr != V2_DR)
		return 0;
	if (cudaGetDevice(&dev) != cudaSuccess ||
		cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
		return 0;
	return (size_t) optin >= V2_SMEM;
}

/*
 * Keys per range: one block an SM, so with n tokens and r ranges a token the
 * launch takes ceil(n r / sm_count) waves of ceil(tiles / r) + F tiles each
 * (F: a range's fixed cost, Qabs from L2, the ring's first latency, the
 * partials written and merged); the r of least cost, the fewer ranges on
 * ties, at least V2_MIN_TILES tiles a range.  4k keys: batch 1 -> 32
 * ranges of 128 keys, batch 32 -> 4 of 1024, batch 64 -> 2 of 2048; 32k,
 * batch 1 -> 128 of 256, batch 8 -> 16 of 2048.
 */
extern "C" int64_t
kk_mla_decode_v2_split(int64_t max_keys, int n_tokens, int sm_count)
{
	int64_t		tiles = (max_keys + V2_TK - 1) / V2_TK,
				best = tiles,
				best_cost = -1;
	long		keys = v2_env_keys();

	if (keys > 0 && keys % V2_TK == 0)
		return keys;
	if (sm_count < 1)
		sm_count = 1;
	for (int64_t r = 1; r <= tiles && r <= 8 * (int64_t) sm_count; r++)
	{
		int64_t		per = (tiles + r - 1) / r,
					waves = ((int64_t) n_tokens * r + sm_count - 1) / sm_count,
					cost = waves * (per + V2_FIXED_TILES);

		if (per < V2_MIN_TILES && r > 1)
			break;
		if (best_cost < 0 || cost < best_cost)
		{
			best_cost = cost;
			best = per;
		}
	}
	return best * V2_TK;
}

extern "C" int
kk_mla_decode_v2(cudaStream_t s, const kk_mla_decode_args *a, int *merged)
{
	long		fmax = v2_env_fuse();
	int			fuse;
	void		(*kern) (const kk_mla_decode_args);
	cudaError_t e;

	*merged = 0;
	if (a->Ha != V2_HA || a->R != V2_R || a->Dr != V2_DR || a->split_keys < V2_TK || a->split_keys % V2_TK)
		return -1;
	if (a->n_tokens <= 0)
		return 0;
	if (fmax < 0)
		fmax = V2_FUSE_DEFAULT;
	fuse = a->counters && a->max_splits <= (fmax < V2_FUSE_MAX ? fmax : V2_FUSE_MAX);
	kern = fuse ? mla_decode_v2_kernel<true> : mla_decode_v2_kernel<false>;
	if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) V2_SMEM)) != cudaSuccess)
		return (int) e;
	kk_launch(kern, dim3(a->n_tokens, a->max_splits), dim3(V2_THREADS), V2_SMEM, s, *a);
	if (!fuse)
	{
		if ((e = cudaGetLastError()) != cudaSuccess)
			return (int) e;
		kk_launch(mla_decode_v2_merge_kernel, dim3(a->n_tokens, V2_HA, V2M_SLICES), dim3(32 * V2M_GROUPS),
				  sizeof(float) * (size_t) a->max_splits, s, *a);
	}
	*merged = 1;
	return 0;
}
