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
 */
#include <math.h>

#include "wgmma.cuh"
#include "mla_decode_wg_layout.h"

#define MDW_SPITCH 33			/* floats a score row in shared memory (33: the softmax's reads spread over banks) */

/* shared memory: two key tiles, Qabs, P^T, two score partials, max/sum/correction, 1024 of slack to align */
#define MDW_SMEM ((size_t) 2 * MDW_TILE + MDW_QBYTES + MDW_PBYTES + \
				  sizeof(float) * (2 * MDW_KT * MDW_SPITCH + 3 * MDW_HEADS) + 1024)

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
 * thread's copies of MDW_COPIES (mla_decode_wg_layout.h) for those keys;
 * zero: also zero keys nk and beyond (P is zero there, but stale bits could
 * be NaN, and 0 NaN is NaN).  A whole tile: lo 0, hi nk, zero.
 */
__device__ __forceinline__ void
mdw_load_keys(uint32_t buf, const uint8_t *src, uint32_t src0, uint32_t dst0, int key0, int lo, int hi, int nk,
			  bool zero)
{
#pragma unroll
	for (int i = 0; i < MDW_COPIES; i++)
	{
		uint32_t	d = buf + mdw_copy_dst(dst0, i);
		int			key = key0 + 32 * (i / MDW_SLABS);

		if (key >= lo && key < hi)
			kw_cp16(d, src + mdw_copy_src(src0, i));
		else if (zero && key >= nk)
			mdw_zero16(d);
	}
}

/* the whole tile of nk keys (mdw_load_keys' lo 0, hi nk) */
__device__ __forceinline__ void
mdw_load_tile(uint32_t buf, const uint8_t *src, uint32_t src0, uint32_t dst0, int key0, int nk)
{
	mdw_load_keys(buf, src, src0, dst0, key0, 0, nk, nk, true);
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
 * Tiles 0 and 1 of the block's range (keys k0 .. k1 - 1 of sequence s, nt
 * tiles) into the two tile buffers at sk_a: their keys from .. to - 1
 * (absolute; to <= k1); zero: keys past the range's end zeroed; commit: one
 * cp.async group a tile, else none.  The page table is read through L2 (as
 * mdw_range).
 */
__device__ __forceinline__ void
mdw_first_tiles(const kk_mla_decode_args &a, uint32_t sk_a, uint32_t src0, uint32_t dst0, int key0, int s,
				int64_t k0, int64_t k1, int nt, int64_t from, int64_t to, bool zero, bool commit)
{
#pragma unroll
	for (int j = 0; j < 2; j++)
	{
		if (j < nt)
		{
			int64_t		kb = k0 + (int64_t) j * MDW_KT;
			const uint8_t *page = (const uint8_t *) __ldcg((const unsigned long long *)
														   (a.pages + (size_t) s * a.page_cap + kb / KK_MLA_PAGE));

			mdw_load_keys(sk_a + j * MDW_TILE, page + (size_t) (kb % KK_MLA_PAGE) * MDW_WA * 2, src0, dst0, key0,
						  mdw_in_tile(from - kb), mdw_in_tile(to - kb), k1 - kb < MDW_KT ? (int) (k1 - kb) : MDW_KT,
						  zero);
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
 * The online softmax of one tile (nk valid keys), thread (head h = tid / 8,
 * keys 8 sub .. 8 sub + 7, sub = tid % 8): scores = the two warpgroups'
 * partials added; P^T's chunk (h, sub) written (bf16); the head's running
 * max (raw score units), sum and this tile's correction updated by sub 0.
 */
__device__ __forceinline__ void
mdw_softmax(const float *ss, uint32_t sp, float *sm, float *sl, float *scorr, int nk, float scale_log2)
{
	int			h = threadIdx.x >> 3,
				sub = threadIdx.x & 7;
	float		x[8],
				tmax = -INFINITY,
				mold = sm[h],
				mnew,
				b,
				sum = 0.0f;
	uint32_t	w[4];

#pragma unroll
	for (int i = 0; i < 8; i++)
	{
		int			key = 8 * sub + i;

		x[i] = ss[key * MDW_SPITCH + h] + ss[(MDW_KT + key) * MDW_SPITCH + h];
		if (key >= nk)
			x[i] = -INFINITY;
		tmax = fmaxf(tmax, x[i]);
	}
	tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
	tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
	tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 4));
	mnew = fmaxf(mold, tmax);	/* finite: every tile has a key */
	b = mnew * scale_log2;
#pragma unroll
	for (int i = 0; i < 4; i++)
	{
		w[i] = cvt_bf16x2(ex2_ftz(fmaf(x[2 * i], scale_log2, -b)), ex2_ftz(fmaf(x[2 * i + 1], scale_log2, -b)));
		sum += __uint_as_float(w[i] << 16) + __uint_as_float(w[i] & 0xffff0000u);
	}
	mdw_st16(sp + mdw_p_chunk(h, sub), w[0], w[1], w[2], w[3]);
	sum += __shfl_xor_sync(0xffffffffu, sum, 1);
	sum += __shfl_xor_sync(0xffffffffu, sum, 2);
	sum += __shfl_xor_sync(0xffffffffu, sum, 4);
	__syncwarp();				/* (every lane of the head has read sm[h]) */
	if (sub == 0)
	{
		float		corr = mold == -INFINITY ? 0.0f : ex2_ftz((mold - mnew) * scale_log2);

		sm[h] = mnew;
		sl[h] = sl[h] * corr + sum;
		scorr[h] = corr;
	}
}

#endif							/* KK_WGMMA */

/* ---------------------------------------------------------------- the kernel */

__global__ void __launch_bounds__(MDW_THREADS, 1)
mla_decode_wg_kernel(kk_mla_decode_args a, float scale_log2)
{
#ifdef KK_WGMMA
	extern __shared__ uint4 mdw_smem_raw[];
	uint8_t    *base = (uint8_t *) (((uintptr_t) mdw_smem_raw + 1023) & ~(uintptr_t) 1023);
	float	   *ss = (float *) (base + 2 * MDW_TILE + MDW_QBYTES + MDW_PBYTES),	/* [2][64][MDW_SPITCH] */
			   *sm = ss + 2 * MDW_KT * MDW_SPITCH,	/* [32] running max (raw scores) */
			   *sl = sm + MDW_HEADS,	/* [32] running sum */
			   *scorr = sl + MDW_HEADS;	/* [32] this tile's correction */
	uint32_t	sk_a = (uint32_t) __cvta_generic_to_shared(base),
				sq_a = sk_a + 2 * MDW_TILE,
				sp_a = sq_a + MDW_QBYTES;
	int			t = blockIdx.x,
				p = blockIdx.y;
	int			tid = threadIdx.x,
				wg = __shfl_sync(0xffffffffu, tid >> 7, 0),	/* (uniform) */
				wq = (tid >> 5) & 3,
				g = (tid & 31) >> 2,
				q = tid & 3;
	/* this thread's tile copies: first key and chunk, their source and destination offsets */
	int			key0 = mdw_copy_key(tid, 0);
	uint32_t	src0 = (uint32_t) (key0 * MDW_WA * 2 + mdw_copy_chunk(tid, 0) * 16),
				dst0 = mdw_tile_chunk(key0, mdw_copy_chunk(tid, 0));
	int			s = 0,
				nt = 0;
	int64_t		k0 = (int64_t) p * a.split_keys,
				k1 = 0,
				fresh = 0;
	bool		run = false,
				late = false;	/* early, and some of the step's new rows in tiles 0 and 1 */
	const uint8_t *const *pages = (const uint8_t *const *) a.pages;
	float		o[4 * 16];		/* O^T: m-blocks 4 wg .. 4 wg + 3, 16 accumulators each */

	/*
	 * early (KL_CUDA_MLA_FOLD): tiles 0 and 1's rows of earlier steps go out
	 * before the wait.  Why that is safe: the metadata and the page table
	 * were uploaded (a copy in the stream) before the step's first kernel,
	 * and the rows below the sequence's pos0 were appended by earlier steps,
	 * all complete before this step began; in this step only the append
	 * (the kernel before, folded into the absorb) writes the cache, and
	 * only rows from pos0 on (kernels.h's contract for early).  Those rows,
	 * and Qabs, are read after the wait.
	 */
	if (a.early && (run = mdw_range(a, t, k0, &s, &fresh, &k1, &nt)))
	{
		late = fresh < (k1 < k0 + 2 * MDW_KT ? k1 : k0 + 2 * MDW_KT);
		mdw_first_tiles(a, sk_a, src0, dst0, key0, s, k0, k1, nt, k0, fresh < k1 ? fresh : k1, true, true);
	}
	kk_dep_wait();
	kk_dep_launch();
	if (!a.early)
		run = mdw_range(a, t, k0, &s, &fresh, &k1, &nt);
	if (!run)
		return;

	/* tiles 0 and 1 go out first (early: the step's new rows of them, one group after the two); Qabs is
	 * converted while they fly */
	if (!a.early)
		mdw_first_tiles(a, sk_a, src0, dst0, key0, s, k0, k1, nt, k0, k1, true, true);
	else if (late)
	{
		mdw_first_tiles(a, sk_a, src0, dst0, key0, s, k0, k1, nt, fresh, k1, false, false);
		cp_async_commit();
	}
	if (a.qabs16)
		mdw_load_q16(sq_a, a.qabs16, t);
	else
		mdw_load_q(sq_a, a.qabs, t);
	if (tid < MDW_HEADS)
	{
		sm[tid] = -INFINITY;
		sl[tid] = 0.0f;
	}
#pragma unroll
	for (int i = 0; i < 64; i++)
		o[i] = 0.0f;

	for (int j = 0; j < nt; j++)
	{
		int64_t		kb = k0 + (int64_t) j * MDW_KT;
		int			nk = k1 - kb < MDW_KT ? (int) (k1 - kb) : MDW_KT;
		uint32_t	buf = sk_a + (j & 1) * MDW_TILE;

		/* tile j landed (this thread's copies; the barrier: everyone's; the fence: visible to wgmma; late:
		 * tile 0's new rows are in the third group) */
		if (late && j == 0)
			cp_async_wait_group<0>();
		else
			cp_async_wait_group<1>();
		kw_fence_async_smem();
		__syncthreads();

		/* S^T, this warpgroup's half of the k-steps, to shared memory */
		{
			float		d[16];
			/* (descriptor bases of this warpgroup's nope and rope k-steps; the rest are constants) */
			uint32_t	ka0 = (buf + mdw_s_a_wg(wg, 0)) >> 4,
						ka1 = (buf + mdw_s_a_wg(wg, 16)) >> 4,
						qa0 = (sq_a + mdw_s_b_wg(wg, 0)) >> 4,
						qa1 = (sq_a + mdw_s_b_wg(wg, 16)) >> 4;

			kw_fence();
#pragma unroll
			for (int k = 0; k < MDW_WA / 32; k++)
				mdw_mma<0>(d, mdw_desc_at(k < 16 ? ka0 : ka1, mdw_s_a_off(mdw_s_kstep(0, k)), MDW_LBO_K),
						   mdw_desc_at(k < 16 ? qa0 : qa1, mdw_s_b_off(mdw_s_kstep(0, k)), MDW_LBO_K), k > 0);
			kw_commit();
			kw_wait<0>();
			kw_pin<16>(d);
#pragma unroll
			for (int n = 0; n < 4; n++)
			{
				float	   *r0 = ss + (wg * MDW_KT + 16 * wq + g) * MDW_SPITCH + 8 * n + 2 * q;

				r0[0] = d[4 * n];
				r0[1] = d[4 * n + 1];
				r0[8 * MDW_SPITCH] = d[4 * n + 2];
				r0[8 * MDW_SPITCH + 1] = d[4 * n + 3];
			}
		}
		__syncthreads();

		mdw_softmax(ss, sp_a, sm, sl, scorr, nk, scale_log2);
		kw_fence_async_smem();	/* (P^T's stores, for wgmma) */
		__syncthreads();

		/* O^T = O^T corr + V^T P^T, this warpgroup's 4 blocks of 64 value columns */
		{
			uint32_t	ka = buf >> 4,
						pa = sp_a >> 4;

#pragma unroll
			for (int n = 0; n < 4; n++)
			{
				float		c0 = scorr[8 * n + 2 * q],
							c1 = scorr[8 * n + 2 * q + 1];

#pragma unroll
				for (int mb = 0; mb < 4; mb++)
				{
					o[16 * mb + 4 * n] *= c0;
					o[16 * mb + 4 * n + 1] *= c1;
					o[16 * mb + 4 * n + 2] *= c0;
					o[16 * mb + 4 * n + 3] *= c1;
				}
			}
			kw_fence();
#pragma unroll
			for (int mb = 0; mb < 4; mb++)
#pragma unroll
				for (int kk = 0; kk < MDW_KT / 16; kk++)
					mdw_mma<1>(o + 16 * mb, mdw_desc_at(ka, mdw_o_a_off(4 * wg + mb, kk), MDW_LBO_MN),
							   mdw_desc_at(pa, mdw_o_b_off(kk), MDW_LBO_K), 1);
			kw_commit();
			kw_wait<0>();
#pragma unroll
			for (int mb = 0; mb < 4; mb++)
				kw_pin<16>(o + 16 * mb);
		}

		/* both warpgroups are done with tile j's buffer: tile j + 2 into it */
		__syncthreads();
		if (j + 2 < nt)
		{
			int64_t		kn = kb + 2 * MDW_KT;
			const uint8_t *src = pages[(size_t) s * a.page_cap + kn / KK_MLA_PAGE] +
				(size_t) (kn % KK_MLA_PAGE) * MDW_WA * 2;

			mdw_load_tile(buf, src, src0, dst0, key0, k1 - kn < MDW_KT ? (int) (k1 - kn) : MDW_KT);
		}
		cp_async_commit();		/* (an empty group near the end keeps the count) */
	}
	cp_async_wait_group<0>();	/* (only empty groups can be left) */

	/* the partials: O^T's rows are value columns, its columns heads */
	{
		size_t		pbase = ((size_t) t * a.max_splits + p) * MDW_HEADS;

#pragma unroll
		for (int mb = 0; mb < 4; mb++)
#pragma unroll
			for (int n = 0; n < 4; n++)
#pragma unroll
				for (int e = 0; e < 4; e++)
				{
					int			col = 256 * wg + 64 * mb + 16 * wq + g + 8 * (e >> 1),
								h = 8 * n + 2 * q + (e & 1);

					a.part_acc[(pbase + h) * MDW_R + col] = o[16 * mb + 4 * n + e];
				}
		if (tid < MDW_HEADS)
		{
			/* (the max in kk_mla_merge's units: scale times the raw score) */
			a.part_ml[(pbase + tid) * 2] = sm[tid] * a.scale;
			a.part_ml[(pbase + tid) * 2 + 1] = sl[tid];
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
	cudaError_t e;

	if (!kk_mla_decode_wg_supported(a->Ha, a->R, a->Dr) || a->split_keys <= 0 || a->split_keys % MDW_KT ||
		a->max_splits < 1 || a->max_splits > 65535)
		return -1;
	if (a->n_tokens <= 0)
		return 0;
	if ((e = cudaFuncSetAttribute(mla_decode_wg_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
								  (int) MDW_SMEM)) != cudaSuccess)
		return (int) e;
	kk_launch(mla_decode_wg_kernel, dim3(a->n_tokens, a->max_splits), dim3(MDW_THREADS), MDW_SMEM, s, *a,
			  a->scale * 1.44269504088896340736f);	/* scale log2(e) */
	return 0;
}
