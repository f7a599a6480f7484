/*
 * mla_decode_wg.cu — MLA decode attention over the bf16 latent cache:
 * the decode attention on Hopper's wgmma (KL_CUDA_MLA_MMA=2, the default
 * where it runs: the sm_90a image, the 48B shape only: Ha 32, R 512, Dr 64).
 * Contract: kernels.h, "MLA decode attention variants" (partials in
 * kk_mla_attend_mma's layout; the caller merges them).
 *
 * Why this shape of kernel.  A decode token's attention reads its cache
 * rows (1152 bytes a key) once and does ~4.5 MFLOP per 64 keys on them:
 * at 4.2 TB/s an SM's share of DRAM brings a 64-key tile in ~2.3 us, and
 * wgmma does the tile's two products in ~0.7-0.9 us (smem-operand bound),
 * so the kernel only has to keep enough bytes in flight and keep its fixed
 * costs small.  mla_attend_mma (mma.sync, heads as m padded to 32, 8 warps)
 * spends its time in ldmatrix and issue (0.33 IPC, DRAM 10 %).  Here:
 *   S^T = K Qabs^T   m64n32k16 x 36: keys as m (the whole 64-key tile), the
 *                    32 heads as n (no padding), k = the 576 columns; both
 *                    operands K-major from shared memory
 *   O^T = V^T P^T    m64n32k16 x 8 x 4: value columns as m (8 blocks of 64),
 *                    heads as n, the tile's 64 keys as k; A is the same key
 *                    tile read MN-major ("transposed A", bf16 only), B = P^T
 * so the tile is stored once, in the layout both products read, with no
 * register fragments built by hand (no ldmatrix).
 *
 * Block (token t, key range p): 2 warpgroups, 256 threads, all of them
 * loaders.  Per 64-key tile:
 *   [wait tile j]  WG w: S^T over half of the 576 columns (nope 256 w ..
 *   256 w + 255 and rope 32 w .. 32 w + 31; partial sums to shared memory,
 *   added in the softmax)
 *   [bar]  softmax over keys = over S^T's rows, 8 threads a head: running
 *   max and sum in shared memory, P = 2^(s scale log2(e) - max ...) rounded
 *   to bf16 into P^T (one 16-byte store a thread), the sum of the rounded
 *   values, the head's correction factor
 *   [bar]  WG w: O^T rows 256 w .. 256 w + 255 (4 m-blocks, 64 fp32
 *   accumulators a thread): rescale by the correction, += V^T P^T
 *   [bar]  tile j's buffer is free: tile j + 2's copies go out into it.
 * Two tile buffers (72 KB each; with Qabs 36 KB, P^T 4 KB and the score
 * partials 17 KB: 202 KB, one block an SM): a tile's 72 KB are in flight
 * from the end of tile j - 2's products until tile j is needed — at least
 * one whole tile an SM at all times, ~9.5 MB over the GPU, more than DRAM's
 * bandwidth-latency product (~3-4 MB), so the loads, not the tensor cores,
 * set the pace.  The tile loads are cp.async of 16 bytes (a key's 128
 * contiguous bytes a slab per 8 threads; the key's row is contiguous in its
 * 1024-row page, and tiles never straddle a page).  Layout and descriptors:
 * mla_decode_wg_layout.h, checked element by element on the host by
 * bench/mla_wg_layout_check.c.
 *
 * Numbers (the contract): Qabs rounded to bf16 once per block (cvt.rn); P
 * rounded to bf16 before P V and the running sum made of the rounded
 * values; scores, max, sums and accumulators fp32.  The partial's max is
 * stored in kk_mla_merge's units (scale times the raw score).  exp is
 * ex2.approx on a base-2 argument (2 ulp; P is rounded to 8 bits next).
 *
 * Early key loads (kk_mla_decode_args' early, KL_CUDA_MLA_FOLD): the block
 * requests its first two tiles' rows of earlier steps before kk_dep_wait,
 * so that at batch 1 they arrive while the absorb kernel before it runs
 * (one 72 KB tile a block at 4k: the whole cache); the step's new rows
 * (written by that kernel) and Qabs are read after the wait.  The same
 * bytes land in the same places: the results do not change.
 *
 * Key ranges: mla_attend_mma's rule (src/cuda/cuda_mla.c, mma_split: one
 * block an SM, a block's fixed cost — Qabs from L2 and its conversion, the
 * first tile's latency, its 64 KB of partials written and merged — about
 * one tile's time); the sweep of keys a range on the H200 found its choices
 * the fastest for this kernel too (bench/notes-cuda.md, 2026-12-01).
 * KL_CUDA_MLA_WG_SPLIT sets the keys a block instead.
 *
 * What bounds a block (the same sweep, bench/notes-cuda.md "Issue 10, sixth
 * session: MLA decode attention at 32k"): each extra tile costs a block
 * ~2.6 us whether 4 or 128 blocks run, so the time is the block's own
 * chain — tile j + 2's copies wait for tile j's products, and within a
 * tile S^T, the softmax and O^T follow one another behind four barriers —
 * not DRAM (28 GB/s an SM where DRAM's share is 32).  Two forms against it:
 *   L2 prefetch (kk_mla_decode_args.wg_pf, KL_CUDA_MLA_WG_PF): one thread
 *     of a range requests tile j + NB + wg_pf into L2 (one bulk prefetch,
 *     72 KB) as tile j + NB's copies go out (and the first wg_pf tiles
 *     after the first NB at the start), so that copies read L2: more bytes
 *     in flight than the two tile buffers hold.  A hint: the same bits.
 *   DUAL (wg_dual, KL_CUDA_MLA_WG_DUAL; mla_decode_wg_kernel<true>): each
 *     warpgroup streams a range of its own through one tile buffer (both
 *     buffers, the P^T and the softmax state doubled: 211,200 bytes), so
 *     one warpgroup's softmax, barriers and copy waits overlap the other's
 *     products; a range's tile does the same operations in the same order
 *     as here (S^T's halves as two fragments added in the warpgroup, the
 *     softmax 4 threads a head making 8 threads' sums), so its partials
 *     are the one-range kernel's for the same ranges bit for bit.
 */
#include <math.h>

#include "wgmma.cuh"
#include "mla_decode_wg_layout.h"

#define MDW_SPITCH 33			/* floats a score row in shared memory (33: the softmax's reads spread over banks) */

/* shared memory: two key tiles, Qabs, P^T, two score partials, max/sum/correction, 1024 of slack to align;
 * dual (a range a warpgroup): P^T and max/sum/correction once a warpgroup (211,200 bytes; else 206,720) */
#define MDW_SMEM(dual) ((size_t) 2 * MDW_TILE + MDW_QBYTES + ((dual) ? 2 : 1) * MDW_PBYTES + \
						sizeof(float) * (2 * MDW_KT * MDW_SPITCH + ((dual) ? 2 : 1) * 3 * MDW_HEADS) + 1024)

#ifdef KK_WGMMA

__device__ __forceinline__ void
mdw_zero16(uint32_t s)
{
	asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n"::"r"(s), "r"(0):"memory");
}

__device__ __forceinline__ void
mdw_st16(uint32_t s, uint32_t x, uint32_t y, uint32_t z, uint32_t w)
{
	asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n"::"r"(s), "r"(x), "r"(y), "r"(z), "r"(w):"memory");
}

/*
 * d (64 x 32, fp32) (+)= A B over k = 16, A and B from shared memory;
 * TA: A MN-major (tnspA), else K-major; B K-major.  accumulate 0: d = A B.
 */
template <int TA>
__device__ __forceinline__ void
mdw_mma(float *d, uint64_t da, uint64_t db, int accumulate)
{
	asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
				 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
				 "{%0, %1, %2, %3, %4, %5, %6, %7,"
				 " %8, %9, %10, %11, %12, %13, %14, %15},"
				 " %16, %17, p, 1, 1, %19, 0;\n}\n"
				 :"+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
				  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
				  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
				  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
				 :"l"(da), "l"(db), "r"(accumulate), "n"(TA));
}

/* ---------------------------------------------------------------- pieces of the kernel */

/*
 * Keys lo .. hi - 1 of a tile of nk keys (1 .. 64) starting at src (global,
 * rows of MDW_WA bf16) into the tile buffer at shared address buf: this
 * thread's copies of MDW_COPIES(LT) (mla_decode_wg_layout.h: LT threads
 * load the tile) for those keys; zero: also zero keys nk and beyond (P is
 * zero there, but stale bits could be NaN, and 0 NaN is NaN).  A whole
 * tile: lo 0, hi nk, zero.
 */
template <int LT>
__device__ __forceinline__ void
mdw_load_keys(uint32_t buf, const uint8_t *src, uint32_t src0, uint32_t dst0, int key0, int lo, int hi, int nk,
			  bool zero)
{
#pragma unroll
	for (int i = 0; i < MDW_COPIES(LT); i++)
	{
		uint32_t	d = buf + mdw_copy_dst(LT, dst0, i);
		int			key = key0 + LT / 8 * (i / MDW_SLABS);

		if (key >= lo && key < hi)
			kw_cp16(d, src + mdw_copy_src(LT, src0, i));
		else if (zero && key >= nk)
			mdw_zero16(d);
	}
}

/* the whole tile of nk keys (mdw_load_keys' lo 0, hi nk) */
template <int LT>
__device__ __forceinline__ void
mdw_load_tile(uint32_t buf, const uint8_t *src, uint32_t src0, uint32_t dst0, int key0, int nk)
{
	mdw_load_keys<LT>(buf, src, src0, dst0, key0, 0, nk, nk, true);
}

/* the cache rows of keys kb .. min(kb + 64, k1) - 1 of sequence s (one tile: never across a page) requested
 * into L2 by one bulk prefetch (a hint: no result changes; KL_CUDA_MLA_WG_PF) */
__device__ __forceinline__ void
mdw_prefetch_tile(const kk_mla_decode_args &a, int s, int64_t kb, int64_t k1)
{
	const uint8_t *page = (const uint8_t *) a.pages[(size_t) s * a.page_cap + kb / KK_MLA_PAGE];
	unsigned	bytes = (unsigned) ((k1 - kb < MDW_KT ? k1 - kb : MDW_KT) * MDW_WA * 2);

	asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n"::"l"(page + (size_t) (kb % KK_MLA_PAGE) * MDW_WA * 2),
				 "r"(bytes):"memory");
}

/*
 * v, through an empty volatile asm: the compiler cannot compute what depends
 * on it before the volatile asm (a wgmma) ahead of this point.  DUAL's
 * 160 accumulators a thread leave no room for the 50-odd descriptors that
 * ptxas otherwise builds ahead of a run of wgmma (255 registers and spills;
 * 192 with the descriptors of each m-block and S^T half made in turn).
 */
__device__ __forceinline__ uint32_t
mdw_opaque(uint32_t v)
{
	asm volatile("":"+r"(v));
	return v;
}

/* a barrier of the threads that share a key range: the block's (one range), or warpgroup wg's (DUAL: barrier
 * 1 + wg, ids as immediates so that ptxas reserves 3 barriers, not all 16) */
template <bool DUAL>
__device__ __forceinline__ void
mdw_bar(int wg)
{
	if constexpr (DUAL)
	{
		if (wg == 0)
			asm volatile("bar.sync 1, %0;\n"::"n"(MDW_THREADS / 2):"memory");
		else
			asm volatile("bar.sync 2, %0;\n"::"n"(MDW_THREADS / 2):"memory");
	}
	else
		__syncthreads();
}

/* Qabs of token t already in bf16 ([32][576], kk_mla_decode_args' qabs16) into its slabs at shared address sq */
__device__ __forceinline__ void
mdw_load_q16(uint32_t sq, const uint16_t *__restrict__ qabs16, int t)
{
	constexpr int PER = MDW_HEADS * MDW_WA / 8 / MDW_THREADS;	/* 9 chunks of 8 a thread */
	const uint4 *q = (const uint4 *) (qabs16 + (size_t) t * MDW_HEADS * MDW_WA);
	uint4		v[PER];

#pragma unroll
	for (int u = 0; u < PER; u++)
		v[u] = __ldg(q + threadIdx.x + u * MDW_THREADS);
#pragma unroll
	for (int u = 0; u < PER; u++)
	{
		int			e = threadIdx.x + u * MDW_THREADS;

		mdw_st16(sq + mdw_q_chunk(e / (MDW_WA / 8), e % (MDW_WA / 8)), v[u].x, v[u].y, v[u].z, v[u].w);
	}
}

/*
 * Block (token t, range from key k0): the token's sequence *s, the first
 * key of the step's new rows of that sequence *fresh (its pos0: rows from
 * there on are appended by this step's kernel before the attention), the
 * range's end *k1 (past the token's position) and tiles *nt; false where
 * the block has nothing to do (the token not absorbed, or the range past
 * its position).  The step metadata is read through L2 (__ldcg): early
 * (kk_mla_decode_args), this runs before kk_dep_wait, when the SM's L1
 * may still hold the previous step's lines of these buffers.
 */
__device__ __forceinline__ bool
mdw_range(const kk_mla_decode_args &a, int t, int64_t k0, int *s, int64_t *fresh, int64_t *k1, int *nt)
{
	int			sq = __ldcg(a.row_seq + t);
	int64_t		f = __ldcg(a.pos0 + sq),
				pos = f + (t - __ldcg(a.row0 + sq));

	*s = sq;
	*fresh = f;
	if (!__ldcg(a.absorbed + sq) || k0 > pos)
		return false;
	*k1 = k0 + a.split_keys < pos + 1 ? k0 + a.split_keys : pos + 1;
	*nt = (int) ((*k1 - k0 + MDW_KT - 1) / MDW_KT);
	return true;
}

/* clamp(v, 0, MDW_KT) */
__device__ __forceinline__ int
mdw_in_tile(int64_t v)
{
	return v < 0 ? 0 : v > MDW_KT ? MDW_KT : (int) v;
}

/*
 * The first NB tiles (2: the block's two buffers; 1: a warpgroup's one,
 * DUAL) of a range (keys k0 .. k1 - 1 of sequence s, nt tiles) by LT
 * loaders into the tile buffers from sk_a on: their keys from .. to - 1
 * (absolute; to <= k1); zero: keys past the range's end zeroed; commit: one
 * cp.async group a tile, else none.  The page table is read through L2 (as
 * mdw_range).
 */
template <int LT, int NB>
__device__ __forceinline__ void
mdw_first_tiles(const kk_mla_decode_args &a, uint32_t sk_a, uint32_t src0, uint32_t dst0, int key0, int s,
				int64_t k0, int64_t k1, int nt, int64_t from, int64_t to, bool zero, bool commit)
{
#pragma unroll
	for (int j = 0; j < NB; j++)
	{
		if (j < nt)
		{
			int64_t		kb = k0 + (int64_t) j * MDW_KT;
			const uint8_t *page = (const uint8_t *) __ldcg((const unsigned long long *)
														   (a.pages + (size_t) s * a.page_cap + kb / KK_MLA_PAGE));

			mdw_load_keys<LT>(sk_a + j * MDW_TILE, page + (size_t) (kb % KK_MLA_PAGE) * MDW_WA * 2, src0, dst0,
							  key0, mdw_in_tile(from - kb), mdw_in_tile(to - kb),
							  k1 - kb < MDW_KT ? (int) (k1 - kb) : MDW_KT, zero);
		}
		if (commit)
			cp_async_commit();
	}
}

/* Qabs of token t (fp32, [32][576]) to bf16 in its slabs at shared address sq */
__device__ __forceinline__ void
mdw_load_q(uint32_t sq, const float *__restrict__ qabs, int t)
{
	constexpr int PER = MDW_HEADS * MDW_WA / 8 / MDW_THREADS;	/* 9 chunks of 8 a thread */
	const float4 *q = (const float4 *) (qabs + (size_t) t * MDW_HEADS * MDW_WA);
	float4		v[2 * PER];

	static_assert(MDW_HEADS * MDW_WA / 8 % MDW_THREADS == 0, "chunks a thread");
#pragma unroll
	for (int u = 0; u < PER; u++)
	{
		int			e = threadIdx.x + u * MDW_THREADS;

		v[2 * u] = __ldg(q + 2 * e);
		v[2 * u + 1] = __ldg(q + 2 * e + 1);
	}
#pragma unroll
	for (int u = 0; u < PER; u++)
	{
		int			e = threadIdx.x + u * MDW_THREADS,
					h = e / (MDW_WA / 8),
					c = e % (MDW_WA / 8);

		mdw_st16(sq + mdw_q_chunk(h, c), cvt_bf16x2(v[2 * u].x, v[2 * u].y), cvt_bf16x2(v[2 * u].z, v[2 * u].w),
				 cvt_bf16x2(v[2 * u + 1].x, v[2 * u + 1].y), cvt_bf16x2(v[2 * u + 1].z, v[2 * u + 1].w));
	}
}

/*
 * The online softmax of one tile (nk valid keys) by the threads of one key
 * range: S = 1: the block's 256, thread gt = head h = gt / 8 and keys 8 sub
 * .. 8 sub + 7 (sub = gt % 8), scores = the two warpgroups' partials added
 * (ss: [2][64][MDW_SPITCH]); S = 2: a warpgroup's 128 (DUAL), thread gt =
 * head gt / 4 and subs 2 u, 2 u + 1 (u = gt % 4), scores whole (ss: [64]
 * [MDW_SPITCH]).  P^T's chunks (h, sub) written (bf16); the head's running
 * max (raw score units), sum and this tile's correction updated by its
 * first lane.  S = 2 makes the same numbers as S = 1: the max is exact in
 * any order, each sub's sum is made as there, and the head's sum adds the
 * two subs in the thread where S = 1's first butterfly step (lanes sub,
 * sub ^ 1) adds them, then S = 1's steps 2 and 4 as lanes 1 and 2 apart.
 */
template <int S>
__device__ __forceinline__ void
mdw_softmax(const float *ss, uint32_t sp, float *sm, float *sl, float *scorr, int nk, float scale_log2, int gt)
{
	constexpr int LANES = 8 / S;	/* lanes a head */
	int			h = gt / LANES,
				u = gt % LANES;
	float		x[S][8],
				tmax = -INFINITY,
				mold = sm[h],
				mnew,
				b,
				sum[S];
	uint32_t	w[S][4];

#pragma unroll
	for (int v = 0; v < S; v++)
#pragma unroll
		for (int i = 0; i < 8; i++)
		{
			int			key = 8 * (S * u + v) + i;

			x[v][i] = S == 1 ? ss[key * MDW_SPITCH + h] + ss[(MDW_KT + key) * MDW_SPITCH + h] :
				ss[key * MDW_SPITCH + h];
			if (key >= nk)
				x[v][i] = -INFINITY;
			tmax = fmaxf(tmax, x[v][i]);
		}
#pragma unroll
	for (int o = 1; o < LANES; o <<= 1)
		tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
	mnew = fmaxf(mold, tmax);	/* finite: every tile has a key */
	b = mnew * scale_log2;
#pragma unroll
	for (int v = 0; v < S; v++)
	{
		sum[v] = 0.0f;
#pragma unroll
		for (int i = 0; i < 4; i++)
		{
			w[v][i] = cvt_bf16x2(ex2_ftz(fmaf(x[v][2 * i], scale_log2, -b)),
								 ex2_ftz(fmaf(x[v][2 * i + 1], scale_log2, -b)));
			sum[v] += __uint_as_float(w[v][i] << 16) + __uint_as_float(w[v][i] & 0xffff0000u);
		}
		mdw_st16(sp + mdw_p_chunk(h, S * u + v), w[v][0], w[v][1], w[v][2], w[v][3]);
	}
	if constexpr (S == 2)
		sum[0] = sum[0] + sum[1];
#pragma unroll
	for (int o = 1; o < LANES; o <<= 1)
		sum[0] += __shfl_xor_sync(0xffffffffu, sum[0], o);
	__syncwarp();				/* (every lane of the head has read sm[h]) */
	if (u == 0)
	{
		float		corr = mold == -INFINITY ? 0.0f : ex2_ftz((mold - mnew) * scale_log2);

		sm[h] = mnew;
		sl[h] = sl[h] * corr + sum[0];
		scorr[h] = corr;
	}
}

/*
 * S^T over half `half` of the 576 columns (k-steps mdw_s_kstep(half, 0 ..
 * 17): nope 256 half .., rope 32 half ..) of the key tile at shared address
 * buf, into this warpgroup's fragment d; issued only (the caller fences
 * before, commits and waits after).
 */
__device__ __forceinline__ void
mdw_s_half(float *d, uint32_t buf, uint32_t sq_a, int half)
{
	/* (descriptor bases of the half's nope and rope k-steps; the rest are constants) */
	uint32_t	ka0 = (buf + mdw_s_a_wg(half, 0)) >> 4,
				ka1 = (buf + mdw_s_a_wg(half, 16)) >> 4,
				qa0 = (sq_a + mdw_s_b_wg(half, 0)) >> 4,
				qa1 = (sq_a + mdw_s_b_wg(half, 16)) >> 4;

#pragma unroll
	for (int k = 0; k < MDW_WA / 32; k++)
		mdw_mma<0>(d, mdw_desc_at(k < 16 ? ka0 : ka1, mdw_s_a_off(mdw_s_kstep(0, k)), MDW_LBO_K),
				   mdw_desc_at(k < 16 ? qa0 : qa1, mdw_s_b_off(mdw_s_kstep(0, k)), MDW_LBO_K), k > 0);
}

/* this thread's S^T fragment d (keys 16 wq + g, + 8; heads 8 n + 2 q, + 1) into score rows ss ([64][MDW_SPITCH]) */
__device__ __forceinline__ void
mdw_store_scores(float *ss, const float *d, int wq, int g, int q)
{
#pragma unroll
	for (int n = 0; n < 4; n++)
	{
		float	   *r0 = ss + (16 * wq + g) * MDW_SPITCH + 8 * n + 2 * q;

		r0[0] = d[4 * n];
		r0[1] = d[4 * n + 1];
		r0[8 * MDW_SPITCH] = d[4 * n + 2];
		r0[8 * MDW_SPITCH + 1] = d[4 * n + 3];
	}
}

#endif							/* KK_WGMMA */

/* ---------------------------------------------------------------- the kernel */

/*
 * PF: the L2 prefetch (a.wg_pf > 0; without it the tile loop has none of
 * its code).  DUAL false: the block's two warpgroups work on one key
 * range, tile by tile (range blockIdx.y; the file's header).  DUAL true: each warpgroup
 * streams a range of its own (ranges 2 blockIdx.y and 2 blockIdx.y + 1)
 * with one tile buffer, its own P^T, scores and softmax state, and its own
 * barrier; Qabs is loaded once for both.  A range's tile does the same
 * operations in the same order either way (S^T's two halves as two
 * fragments added in the warpgroup, the softmax as mdw_softmax<2>), so
 * DUAL's partials for ranges of K keys are the one-range kernel's for
 * ranges of K keys, bit for bit.
 */
template <bool DUAL, bool PF>
__global__ void __launch_bounds__(MDW_THREADS, 1)
mla_decode_wg_kernel(kk_mla_decode_args a, float scale_log2)
{
#ifdef KK_WGMMA
	constexpr int LT = DUAL ? MDW_THREADS / 2 : MDW_THREADS,	/* threads a range: its loaders */
				NB = DUAL ? 1 : 2,	/* tile buffers a range: tile j + NB is loaded after tile j's products */
				MB = DUAL ? 8 : 4;	/* O^T m-blocks (64 value columns) a warpgroup */
	extern __shared__ uint4 mdw_smem_raw[];
	uint8_t    *base = (uint8_t *) (((uintptr_t) mdw_smem_raw + 1023) & ~(uintptr_t) 1023);
	int			tid = threadIdx.x,
				wg = __shfl_sync(0xffffffffu, tid >> 7, 0),	/* (uniform) */
				wq = (tid >> 5) & 3,
				g = (tid & 31) >> 2,
				q = tid & 3,
				gr = DUAL ? wg : 0,	/* this thread's range of the block */
				gt = tid - gr * LT; /* its index among the range's threads */
	/* score rows: [2][64][MDW_SPITCH] (the one range's two warpgroup partials; DUAL: a warpgroup's [64] each),
	 * then per range [32] running max (raw scores), [32] running sum, [32] this tile's correction */
	float	   *ss0 = (float *) (base + 2 * MDW_TILE + MDW_QBYTES + (DUAL ? 2 : 1) * MDW_PBYTES),
			   *ss = ss0 + (DUAL ? gr * MDW_KT * MDW_SPITCH : 0),
			   *sm = ss0 + 2 * MDW_KT * MDW_SPITCH + gr * 3 * MDW_HEADS,
			   *sl = sm + MDW_HEADS,
			   *scorr = sl + MDW_HEADS;
	uint32_t	sk_a = (uint32_t) __cvta_generic_to_shared(base),
				sq_a = sk_a + 2 * MDW_TILE,
				sp_a = sq_a + MDW_QBYTES + gr * MDW_PBYTES,
				sb_a = sk_a + (DUAL ? gr * MDW_TILE : 0);	/* the range's first tile buffer */
	int			t = blockIdx.x,
				p = DUAL ? 2 * blockIdx.y + gr : blockIdx.y;
	/* this thread's tile copies: first key and chunk, their source and destination offsets */
	int			key0 = mdw_copy_key(LT, gt, 0);
	uint32_t	src0 = (uint32_t) (key0 * MDW_WA * 2 + mdw_copy_chunk(gt, 0) * 16),
				dst0 = mdw_tile_chunk(key0, mdw_copy_chunk(gt, 0));
	int			s = 0,
				nt = 0;
	int64_t		k0 = (int64_t) p * a.split_keys,
				k1 = 0,
				fresh = 0;
	bool		run = false,
				late = false;	/* early, and some of the step's new rows in the first NB tiles */
	const uint8_t *const *pages = (const uint8_t *const *) a.pages;
	float		o[MB * 16];		/* O^T: m-blocks mb0 .. mb0 + MB - 1, 16 accumulators each */
	int			mb0 = DUAL ? 0 : 4 * wg;

	/*
	 * early (KL_CUDA_MLA_FOLD): the first NB tiles' rows of earlier steps
	 * go out before the wait.  Why that is safe: the metadata and the page
	 * table were uploaded (a copy in the stream) before the step's first
	 * kernel, and the rows below the sequence's pos0 were appended by
	 * earlier steps, all complete before this step began; in this step
	 * only the append (the kernel before, folded into the absorb) writes
	 * the cache, and only rows from pos0 on (kernels.h's contract for
	 * early).  Those rows, and Qabs, are read after the wait.
	 */
	if (a.early && (run = mdw_range(a, t, k0, &s, &fresh, &k1, &nt)))
	{
		late = fresh < (k1 < k0 + NB * MDW_KT ? k1 : k0 + NB * MDW_KT);
		mdw_first_tiles<LT, NB>(a, sb_a, src0, dst0, key0, s, k0, k1, nt, k0, fresh < k1 ? fresh : k1, true, true);
	}
	kk_dep_wait();
	kk_dep_launch();
	if (!a.early)
		run = mdw_range(a, t, k0, &s, &fresh, &k1, &nt);
	/* (DUAL: a warpgroup whose range is past the token's position has no tiles but joins the block's barriers;
	 * the second range of a block starts later than the first, so a block leaves whole or not at all) */
	if (DUAL ? !__syncthreads_or(run) : !run)
		return;

	/* the first NB tiles go out first (early: the step's new rows of them, one group after the others); Qabs
	 * is converted while they fly */
	if (!a.early)
		mdw_first_tiles<LT, NB>(a, sb_a, src0, dst0, key0, s, k0, k1, nt, k0, k1, true, true);
	else if (late)
	{
		mdw_first_tiles<LT, NB>(a, sb_a, src0, dst0, key0, s, k0, k1, nt, fresh, k1, false, false);
		cp_async_commit();
	}
	/* (KL_CUDA_MLA_WG_PF: the next wg_pf tiles into L2, so that their copies read L2 rather than DRAM) */
	if (PF && gt == 0)
		for (int j = NB; j < NB + a.wg_pf && j < nt; j++)
			mdw_prefetch_tile(a, s, k0 + (int64_t) j * MDW_KT, k1);
	if (a.qabs16)
		mdw_load_q16(sq_a, a.qabs16, t);
	else
		mdw_load_q(sq_a, a.qabs, t);
	if (gt < MDW_HEADS)
	{
		sm[gt] = -INFINITY;
		sl[gt] = 0.0f;
	}
#pragma unroll
	for (int i = 0; i < MB * 16; i++)
		o[i] = 0.0f;
	if constexpr (DUAL)
	{
		/* (Qabs, stored by both warpgroups' threads, before either reads it; after this the warpgroups meet no
		 * more: each range's barriers are its warpgroup's) */
		kw_fence_async_smem();
		__syncthreads();
	}

	for (int j = 0; j < nt; j++)
	{
		int64_t		kb = k0 + (int64_t) j * MDW_KT;
		int			nk = k1 - kb < MDW_KT ? (int) (k1 - kb) : MDW_KT;
		uint32_t	buf = sb_a + (DUAL ? 0 : (j & 1) * MDW_TILE);

		/* tile j landed (this thread's copies; the barrier: everyone's; the fence: visible to wgmma; late:
		 * tile 0's new rows are in the group after the first NB; DUAL: tile j is the only one in flight) */
		if (DUAL || (late && j == 0))
			cp_async_wait_group<0>();
		else
			cp_async_wait_group<1>();
		kw_fence_async_smem();
		mdw_bar<DUAL>(gr);

		/* S^T to shared memory: this warpgroup's half of the k-steps (DUAL: both halves, added here as the
		 * softmax adds the two warpgroups' halves) */
		if constexpr (DUAL)
		{
			float		d0[16],
						d1[16];

			kw_fence();
			mdw_s_half(d0, buf, sq_a, 0);
			mdw_s_half(d1, mdw_opaque(buf), mdw_opaque(sq_a), 1);
			kw_commit();
			kw_wait<0>();
			kw_pin<16>(d0);
			kw_pin<16>(d1);
#pragma unroll
			for (int i = 0; i < 16; i++)
				d0[i] = d0[i] + d1[i];
			mdw_store_scores(ss, d0, wq, g, q);
		}
		else
		{
			float		d[16];

			kw_fence();
			mdw_s_half(d, buf, sq_a, wg);
			kw_commit();
			kw_wait<0>();
			kw_pin<16>(d);
			mdw_store_scores(ss + wg * MDW_KT * MDW_SPITCH, d, wq, g, q);
		}
		mdw_bar<DUAL>(gr);

		mdw_softmax<DUAL ? 2 : 1>(ss, sp_a, sm, sl, scorr, nk, scale_log2, gt);
		kw_fence_async_smem();	/* (P^T's stores, for wgmma) */
		mdw_bar<DUAL>(gr);

		/* O^T = O^T corr + V^T P^T, this warpgroup's MB blocks of 64 value columns */
		{
			uint32_t	ka = buf >> 4,
						pa = sp_a >> 4;

#pragma unroll
			for (int n = 0; n < 4; n++)
			{
				float		c0 = scorr[8 * n + 2 * q],
							c1 = scorr[8 * n + 2 * q + 1];

#pragma unroll
				for (int mb = 0; mb < MB; mb++)
				{
					o[16 * mb + 4 * n] *= c0;
					o[16 * mb + 4 * n + 1] *= c1;
					o[16 * mb + 4 * n + 2] *= c0;
					o[16 * mb + 4 * n + 3] *= c1;
				}
			}
			kw_fence();
#pragma unroll
			for (int mb = 0; mb < MB; mb++)
			{
				uint32_t	kam = DUAL ? mdw_opaque(ka) : ka;

#pragma unroll
				for (int kk = 0; kk < MDW_KT / 16; kk++)
					mdw_mma<1>(o + 16 * mb, mdw_desc_at(kam, mdw_o_a_off(mb0 + mb, kk), MDW_LBO_MN),
							   mdw_desc_at(pa, mdw_o_b_off(kk), MDW_LBO_K), 1);
			}
			kw_commit();
			kw_wait<0>();
#pragma unroll
			for (int mb = 0; mb < MB; mb++)
				kw_pin<16>(o + 16 * mb);
		}

		/* the range's threads are done with tile j's buffer: tile j + NB into it (and tile j + NB + wg_pf into
		 * L2) */
		mdw_bar<DUAL>(gr);
		if (j + NB < nt)
		{
			int64_t		kn = kb + NB * MDW_KT;
			const uint8_t *src = pages[(size_t) s * a.page_cap + kn / KK_MLA_PAGE] +
				(size_t) (kn % KK_MLA_PAGE) * MDW_WA * 2;

			if (PF && gt == 0 && j + NB + a.wg_pf < nt)
				mdw_prefetch_tile(a, s, kn + (int64_t) a.wg_pf * MDW_KT, k1);
			mdw_load_tile<LT>(buf, src, src0, dst0, key0, k1 - kn < MDW_KT ? (int) (k1 - kn) : MDW_KT);
		}
		cp_async_commit();		/* (an empty group near the end keeps the count) */
	}
	cp_async_wait_group<0>();	/* (only empty groups can be left) */
	if (!run)
		return;					/* (DUAL: a warpgroup without tiles) */

	/* the partials: O^T's rows are value columns, its columns heads */
	{
		size_t		pbase = ((size_t) t * a.max_splits + p) * MDW_HEADS;

#pragma unroll
		for (int mb = 0; mb < MB; mb++)
#pragma unroll
			for (int n = 0; n < 4; n++)
#pragma unroll
				for (int e = 0; e < 4; e++)
				{
					int			col = 64 * (mb0 + mb) + 16 * wq + g + 8 * (e >> 1),
								h = 8 * n + 2 * q + (e & 1);

					a.part_acc[(pbase + h) * MDW_R + col] = o[16 * mb + 4 * n + e];
				}
		if (gt < MDW_HEADS)
		{
			/* (the max in kk_mla_merge's units: scale times the raw score) */
			a.part_ml[(pbase + gt) * 2] = sm[gt] * a.scale;
			a.part_ml[(pbase + gt) * 2 + 1] = sl[gt];
		}
	}
#endif
}

/* ---------------------------------------------------------------- host side */

extern "C" int
kk_mla_decode_wg_supported(int Ha, int R, int Dr)
{
	return Ha == MDW_HEADS && R == MDW_R && Dr == MDW_DR && kk_device_has_wgmma();
}

extern "C" int
kk_mla_decode_wg(cudaStream_t s, const kk_mla_decode_args *a)
{
	/* (the instantiation picked here, not a branch in the tile loop; wg_dual: two ranges a block, so half the
	 * blocks a token; the prefetch only where a range has tiles past the first NB, 2 or 1: at one tile a range,
	 * 4k batch 1, the kernel without it) */
	static void (*const kerns[2][2]) (kk_mla_decode_args, float) = {
		{mla_decode_wg_kernel<false, false>, mla_decode_wg_kernel<false, true>},
		{mla_decode_wg_kernel<true, false>, mla_decode_wg_kernel<true, true>}
	};
	int			pf = a->wg_pf > 0 && a->split_keys > (a->wg_dual ? 1 : 2) * MDW_KT;
	void		(*kern) (kk_mla_decode_args, float) = kerns[a->wg_dual != 0][pf];
	size_t		smem = MDW_SMEM(a->wg_dual);
	int			blocks = a->wg_dual ? (a->max_splits + 1) / 2 : a->max_splits;
	cudaError_t e;

	if (!kk_mla_decode_wg_supported(a->Ha, a->R, a->Dr) || a->split_keys <= 0 || a->split_keys % MDW_KT ||
		a->max_splits < 1 || a->max_splits > 65535 || a->wg_pf < 0)
		return -1;
	if (a->n_tokens <= 0)
		return 0;
	if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem)) != cudaSuccess)
		return (int) e;
	kk_launch(kern, dim3(a->n_tokens, blocks), dim3(MDW_THREADS), smem, s, *a,
			  a->scale * 1.44269504088896340736f);	/* scale log2(e) */
	return 0;
}
