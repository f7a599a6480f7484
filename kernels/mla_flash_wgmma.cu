/*
 * mla_flash_wgmma.cu — MLA prefill attention (expanded form, precision bf16)
 * for Hopper on wgmma: the same contract and numbers as mla_flash.cu's
 * kk_mla_flash (the probabilities rounded to bf16 before P V, their sum from
 * the rounded values), for the 48B head shape (Dn 128, Dr 64, Dv 128) only,
 * in the sm_90a image only (KL_CUDA_MLA_FLASH=2 or 3; mla_flash.cu's
 * mma.sync kernel stays the path everywhere else).
 *
 * Block: NW warpgroups of 64 query rows of one head (NW = 2: 128 rows, or 3:
 * 192), every thread also a loader: key tiles of 64 keys go with cp.async
 * into a ring of STAGES buffers, tile j + STAGES - 2 loaded while tile j is
 * computed.  Per warpgroup and key tile:
 *   S = Q K^T     12 x wgmma m64n64k16, Q and K from shared memory
 *   online softmax on S's registers (base 2, scale folded), P rounded to bf16
 *   O += P V      4 x wgmma m64n128k16, P from registers, V from shared
 *                 memory "MN-major" (V's rows are keys, the product's k)
 * with the previous tile's P V in flight while this tile's softmax runs
 * (issue S_j, issue P_{j-1} V_{j-1}, wait for S_j, softmax, wait for P V,
 * rescale O): the tensor cores work while the exponentials are computed.
 *
 * Shared memory, all in 128-byte-swizzle atoms (8 rows of 128 bytes, 1024-
 * byte aligned; the 16-byte chunk c of row r lies at chunk c ^ (r & 7)):
 *   Q    3 slabs of 64 columns (nope 0-63, nope 64-127, rope), each
 *        [64 NW rows][128 bytes]
 *   tile 5 slabs [64 keys][128 bytes]: nope 0-63 | nope 64-127 | rope |
 *        values 0-63 | values 64-127
 * Matrix descriptors (PTX ISA, "matrix descriptor": start >> 4 in bits
 * 0-13, leading byte offset >> 4 in 16-29, stride byte offset >> 4 in
 * 32-45, swizzle mode 1 = 128 bytes in 62-63):
 *   Q, K (K-major: k along the 128-byte rows) start = slab + 32 kin (k-step
 *        kin of the slab's 4), stride offset 1024 (the next 8 rows), the
 *        leading offset unused with this swizzle;
 *   V (MN-major: n along the rows) start = slab 3 + 2048 kk (16 keys),
 *        leading offset 8192 (values 64-127: the next slab), stride offset
 *        1024 (the next 8 keys).
 * Accumulator and A-register fragments of warp w of a warpgroup: rows
 * 16 w + g and + 8 (g = lane / 4), d[4 n + 0, 1] row g, columns 8 n + 2 q,
 * + 1 (q = lane % 4), d[4 n + 2, 3] row g + 8: the mma.m16n8 layout, so the
 * softmax and the P repacking are mla_flash.cu's.
 */
#include <math.h>

#include "wgmma.cuh"

#define MW_KT 64				/* keys per tile */
#define MW_DN 128
#define MW_DR 64
#define MW_DV 128
#define MW_SLAB (64 * 128)		/* bytes of a 64-row x 64-column bf16 slab */
#define MW_TILE (5 * MW_SLAB)	/* one key tile: nope, nope, rope, values, values */

/* bytes of the shared memory of a (NW, STAGES) instance, with 1024 of slack to align */
template <int NW, int STAGES>
struct mw_shape
{
	static constexpr int QROWS = 64 * NW;
	static constexpr int QSLAB = QROWS * 128;
	static constexpr size_t smem = (size_t) 3 * QSLAB + (size_t) STAGES * MW_TILE + 1024;
};

/* the byte offset of 16-byte chunk c of row r inside 128-byte-swizzled rows */
__device__ __forceinline__ uint32_t
mw_swz(int r, int c)
{
	return (uint32_t) (r * 128 + ((c ^ (r & 7)) << 4));
}

/* the image this kernel runs from has wgmma (kk_device_has_wgmma's probe) */
__global__ void
kw_probe_kernel(int *has)
{
#ifdef KK_WGMMA
	*has = 1;
#else
	*has = 0;
#endif
}

#ifdef KK_WGMMA

/* ---------------------------------------------------------------- descriptors (sm_90a) */

/* a 128-byte-swizzle matrix descriptor (shared address, leading and stride byte offsets) */
__device__ __forceinline__ uint64_t
mw_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo)
{
	return (uint64_t) ((saddr & 0x3ffff) >> 4) | ((uint64_t) (lbo >> 4) << 16) | ((uint64_t) (sbo >> 4) << 32) |
		(1ull << 62);
}

/*
 * The same descriptor from its low word (start address and leading offset,
 * moved by k-steps with 32-bit adds) and a constant high word (stride
 * offset 1024, 128-byte swizzle).
 */
#define MW_DESC_HI ((1024u >> 4) | (1u << 30))

__device__ __forceinline__ uint32_t
mw_desc_lo(uint32_t saddr, uint32_t lbo)
{
	return ((saddr & 0x3ffff) >> 4) | ((lbo >> 4) << 16);
}

__device__ __forceinline__ uint64_t
mw_desc_of(uint32_t lo)
{
	return ((uint64_t) MW_DESC_HI << 32) | lo;
}

/* the two bf16 halves of a packed pair (low: lo, high: hi) as floats: exact, one instruction each */
__device__ __forceinline__ float
mw_bf16_lo(uint32_t w)
{
	return __uint_as_float(w << 16);
}

__device__ __forceinline__ float
mw_bf16_hi(uint32_t w)
{
	return __uint_as_float(w & 0xffff0000u);
}

/* d (64 x 64, fp32) = A B over k = 16 (d written, not read: no zeroing before it) */
__device__ __forceinline__ void
mw_mma_ss_n64_first(float *d, uint64_t da, uint64_t db)
{
	asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
				 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
				 "{%0, %1, %2, %3, %4, %5, %6, %7,"
				 " %8, %9, %10, %11, %12, %13, %14, %15,"
				 " %16, %17, %18, %19, %20, %21, %22, %23,"
				 " %24, %25, %26, %27, %28, %29, %30, %31},"
				 " %32, %33, p, 1, 1, 0, 0;\n}\n"
				 :"=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]),
				  "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7]),
				  "=f"(d[8]), "=f"(d[9]), "=f"(d[10]), "=f"(d[11]),
				  "=f"(d[12]), "=f"(d[13]), "=f"(d[14]), "=f"(d[15]),
				  "=f"(d[16]), "=f"(d[17]), "=f"(d[18]), "=f"(d[19]),
				  "=f"(d[20]), "=f"(d[21]), "=f"(d[22]), "=f"(d[23]),
				  "=f"(d[24]), "=f"(d[25]), "=f"(d[26]), "=f"(d[27]),
				  "=f"(d[28]), "=f"(d[29]), "=f"(d[30]), "=f"(d[31])
				 :"l"(da), "l"(db));
}

/* d (64 x 64, fp32) += A B over k = 16: A and B from shared memory (descriptors) */
__device__ __forceinline__ void
mw_mma_ss_n64(float *d, uint64_t da, uint64_t db, int accumulate)
{
	asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
				 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
				 "{%0, %1, %2, %3, %4, %5, %6, %7,"
				 " %8, %9, %10, %11, %12, %13, %14, %15,"
				 " %16, %17, %18, %19, %20, %21, %22, %23,"
				 " %24, %25, %26, %27, %28, %29, %30, %31},"
				 " %32, %33, p, 1, 1, 0, 0;\n}\n"
				 :"+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
				  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
				  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
				  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
				  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
				  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
				  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
				  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
				 :"l"(da), "l"(db), "r"(accumulate));
}

/* d (64 x 128, fp32) += A B over k = 16: A (bf16 pairs) from registers, B from shared memory MN-major */
__device__ __forceinline__ void
mw_mma_rs_n128(float *d, const uint32_t *a, uint64_t db, int accumulate)
{
	asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
				 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
				 "{%0, %1, %2, %3, %4, %5, %6, %7,"
				 " %8, %9, %10, %11, %12, %13, %14, %15,"
				 " %16, %17, %18, %19, %20, %21, %22, %23,"
				 " %24, %25, %26, %27, %28, %29, %30, %31,"
				 " %32, %33, %34, %35, %36, %37, %38, %39,"
				 " %40, %41, %42, %43, %44, %45, %46, %47,"
				 " %48, %49, %50, %51, %52, %53, %54, %55,"
				 " %56, %57, %58, %59, %60, %61, %62, %63},"
				 " {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
				 :"+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]),
				  "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
				  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),
				  "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
				  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
				  "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
				  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
				  "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
				  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),
				  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
				  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
				  "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
				  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]),
				  "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
				  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),
				  "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
				 :"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}

#endif							/* KK_WGMMA */

/* ---------------------------------------------------------------- loads */

/*
 * Key tile j (keys MW_KT j ..) of head h into the tile at shared address
 * dst, swizzled; keys at m and beyond zeroed (P is zero there, but stale
 * bits could be NaN).  Per key 40 chunks of 16 bytes: 16 nope, 16 values
 * (contiguous in kv16), 8 rope (lat16).
 */
template <int NT>
__device__ __forceinline__ void
mw_load_tile(uint8_t *dst, const uint16_t *__restrict__ kv16, const uint16_t *__restrict__ lat16, int L, int Wa,
			 int R, int h, int j, int m)
{
	/* (a fixed trip count: the index math unrolls and can stay out of the tile loop) */
#pragma unroll
	for (int i = 0; i < (MW_KT * 40 + NT - 1) / NT; i++)
	{
		int			e = threadIdx.x + i * NT;

		if (MW_KT * 40 % NT != 0 && e >= MW_KT * 40)
			break;

		int			r = e / 40,
					c = e % 40,
					key = j * MW_KT + r,
					slab = c < 16 ? c >> 3 : c < 32 ? 3 + ((c - 16) >> 3) : 2;
		uint8_t    *d = dst + slab * MW_SLAB + mw_swz(r, c & 7);

		if (key >= m)
			*(uint4 *) d = make_uint4(0, 0, 0, 0);
		else if (c < 32)
			cp_async16(d, kv16 + (size_t) key * L + (size_t) h * (MW_DN + MW_DV) + 8 * c);
		else
			cp_async16(d, lat16 + (size_t) key * Wa + R + 8 * (c - 32));
	}
}

#ifdef KK_WGMMA

/*
 * A full key tile's copies (all 64 keys below m) with the index math done
 * once per thread: thread t copies 16-byte chunk t % 32 of the key's 512
 * bytes of nope | values for keys t / 32 + (NT / 32) i, and rope chunk
 * t % 8 for keys t / 8 + (NT / 8) i, so tile j's copies are tile 0's moved
 * by 64 j keys.  Rows NT / 32 apart (a multiple of 4) keep their swizzle
 * phase or flip bit 2 of it (x + 4 = x ^ 4 mod 8), a compile-time xor of
 * 64 bytes; rows NT / 8 apart (a multiple of 8) keep it.  (mw_load_tile
 * stays the path of the last, partial tile.)
 */
template <int NT>
struct mw_loader
{
	static constexpr int KS = NT / 32,	/* key rows between a thread's nope/value chunks */
				KI = (MW_KT + KS - 1) / KS,
				RS = NT / 8,	/* key rows between its rope chunks */
				RI = (MW_KT + RS - 1) / RS;
	const uint16_t *kv;			/* tile 0: its first nope/value chunk's source */
	const uint16_t *rope;		/* tile 0: its first rope chunk's source */
	uint32_t	kv_dst,			/* their byte offsets in a tile */
				rope_dst;
	int			kv_row,			/* their keys in the tile */
				rope_row;

	__device__ __forceinline__ void
	init(const uint16_t *__restrict__ kv16, const uint16_t *__restrict__ lat16, int L, int Wa, int R, int h)
	{
		int			c = threadIdx.x & 31,
					rc = threadIdx.x & 7;

		static_assert(KS % 4 == 0 && RS % 8 == 0, "the swizzle phase argument needs these strides");
		kv_row = threadIdx.x >> 5;
		rope_row = threadIdx.x >> 3;
		/* chunks 0-15 nope (slabs 0, 1), 16-31 values (slabs 3, 4) */
		kv_dst = (uint32_t) ((c < 16 ? c >> 3 : (c >> 3) + 1) * MW_SLAB) + mw_swz(kv_row, c & 7);
		rope_dst = (uint32_t) (2 * MW_SLAB) + mw_swz(rope_row, rc);
		kv = kv16 + (size_t) kv_row * L + (size_t) h * (MW_DN + MW_DV) + 8 * c;
		rope = lat16 + (size_t) rope_row * Wa + R + 8 * rc;
		/* (opaque from here: kept in registers, not recomputed from threadIdx in the tile loop) */
		asm volatile("":"+l"(kv), "+l"(rope), "+r"(kv_dst), "+r"(rope_dst), "+r"(kv_row), "+r"(rope_row));
	}

	/* tile j, all of whose keys are below m, into the tile at shared address dst */
	__device__ __forceinline__ void
	load(uint32_t dst, int L, int Wa, int j) const
	{
		const uint16_t *k = kv + (size_t) j * MW_KT * L;
		const uint16_t *r = rope + (size_t) j * MW_KT * Wa;

#pragma unroll
		for (int i = 0; i < KI; i++)
			if (KS * (i + 1) <= MW_KT || kv_row + KS * i < MW_KT)
				kw_cp16(dst + ((kv_dst ^ ((KS * i) & 4 ? 64u : 0u)) + (uint32_t) (KS * i * 128)),
						k + (size_t) (KS * i) * L);
#pragma unroll
		for (int i = 0; i < RI; i++)
			if (RS * (i + 1) <= MW_KT || rope_row + RS * i < MW_KT)
				kw_cp16(dst + rope_dst + (uint32_t) (RS * i * 128), r + (size_t) (RS * i) * Wa);
	}
};

#endif							/* KK_WGMMA */

/* ---------------------------------------------------------------- the kernel */

template <int NW, int STAGES>
__global__ void __launch_bounds__(NW * 128, 1)
mla_flash_wgmma_kernel(int nr, int pos0, int Ha, int R, int Wa, const uint16_t *__restrict__ q16,
					   const uint16_t *__restrict__ kv16, const uint16_t *__restrict__ lat16, float scale_log2,
					   float *__restrict__ out)
{
#ifdef KK_WGMMA
	typedef mw_shape<NW, STAGES> S;
	constexpr int NT = NW * 128,
				QROWS = S::QROWS,
				QSLAB = S::QSLAB,
				DQ = MW_DN + MW_DR,
				D = STAGES - 2;	/* tiles loaded ahead */
	extern __shared__ uint4 mw_smem_raw[];
	uint8_t    *base = (uint8_t *) (((uintptr_t) mw_smem_raw + 1023) & ~(uintptr_t) 1023);
	uint8_t    *sq = base,		/* [3 slabs][QROWS][128 bytes] */
			   *sk = base + 3 * QSLAB;	/* [STAGES][5 slabs][64][128 bytes] */
	uint32_t	sq_a = (uint32_t) __cvta_generic_to_shared(sq),
				sk_a = (uint32_t) __cvta_generic_to_shared(sk);
	int			h = blockIdx.x,
				nqt = gridDim.y,
				qt = nqt - 1 - blockIdx.y;	/* the longest query tiles first */
	int			tid = threadIdx.x,
				wg = __shfl_sync(0xffffffffu, tid >> 7, 0),	/* (uniform: descriptors in uniform registers) */
				wq = (tid >> 5) & 3,
				lane = tid & 31,
				g = lane >> 2,
				q = lane & 3;
	int			L = Ha * (MW_DN + MW_DV),
				m = pos0 + nr,
				i0 = qt * QROWS,
				last = (i0 + QROWS < nr ? i0 + QROWS : nr) - 1,
				ntiles = (pos0 + last) / MW_KT + 1,
				wg_first = pos0 + i0 + 64 * wg;	/* tiles reaching past this need the mask */
	int			p0 = wg_first + 16 * wq + g,	/* this thread's rows' positions */
				p1 = p0 + 8;
	float		o[64],
				s[32];
	uint32_t	p[16];			/* P of the previous tile: 4 k-steps x 4 A registers */
	float		mx0 = -INFINITY,
				mx1 = -INFINITY,
				l0 = 0.0f,
				l1 = 0.0f;
	uint32_t	kprev = 0;		/* shared address of the previous tile */
	mw_loader<NT> ld;
	/* Q's descriptor for this warpgroup and k-step 0 (k-step k: + (k / 4) QSLAB + 32 (k % 4) bytes, >> 4) */
	const uint32_t dq0 = mw_desc_lo(sq_a + wg * 64 * 128, 16);

	ld.init(kv16, lat16, L, Wa, R, h);
	asm volatile("":"+r"(sk_a));	/* (kept, not recomputed from the pointer each tile) */

	kk_dep_wait();
	kk_dep_launch();

	/* Q (rows past nr zero) with tile 0, then tiles 1 .. D - 1 */
	for (int e = tid; e < QROWS * 24; e += NT)
	{
		int			r = e / 24,
					c = e % 24;
		uint8_t    *d = sq + (c >> 3) * QSLAB + mw_swz(r, c & 7);

		if (i0 + r < nr)
			cp_async16(d, q16 + (size_t) (i0 + r) * Ha * DQ + (size_t) h * DQ + 8 * c);
		else
			*(uint4 *) d = make_uint4(0, 0, 0, 0);
	}
#pragma unroll
	for (int st = 0; st < D; st++)
	{
		if (st < ntiles)
			mw_load_tile<NT>(sk + st * MW_TILE, kv16, lat16, L, Wa, R, h, st, m);
		cp_async_commit();
	}
#pragma unroll
	for (int i = 0; i < 64; i++)
		o[i] = 0.0f;
#pragma unroll
	for (int i = 0; i < 16; i++)
		p[i] = 0;

	/* kt: shared address of tile j's buffer, kl: tile j + D's (the ring walked without a division) */
	uint32_t	kt = sk_a,
				kl = sk_a + D * MW_TILE;
	const uint32_t sk_end = sk_a + STAGES * MW_TILE;

	for (int j = 0; j < ntiles; j++)
	{

		/*
		 * Tile j has landed (this thread's copies; the barrier makes everyone's
		 * visible, and the proxy fence makes them visible to wgmma).  Every
		 * warpgroup is past iteration j - 1, so tile j - 2's buffer, which tile
		 * j + D reuses, has no reader left (its P V was waited for there).
		 */
		cp_async_wait_group<D - 1>();
		kw_fence_async_smem();
		__syncthreads();
		if (j + D < ntiles && (j + D + 1) * MW_KT <= m)
			ld.load(kl, L, Wa, j + D);
		else if (j + D < ntiles)
			mw_load_tile<NT>(sk + ((j + D) % STAGES) * MW_TILE, kv16, lat16, L, Wa, R, h, j + D, m);
		cp_async_commit();		/* (an empty group near the end keeps the count) */

		/*
		 * S_j = Q K_j^T, then P_{j-1} V_{j-1} behind it.  Descriptors: one
		 * built per tile, the k-steps' start addresses added as constants
		 * (>> 4; shared addresses are below 2^18, so no carry leaves the
		 * 14-bit field).
		 */
		const uint32_t dk0 = mw_desc_lo(kt, 16),
					dv0 = mw_desc_lo(kprev + 3 * MW_SLAB, MW_SLAB);

		kw_pin<64>(o);
		kw_pin_u<16>(p);
		kw_fence();
		mw_mma_ss_n64_first(s, mw_desc_of(dq0), mw_desc_of(dk0));
#pragma unroll
		for (int k = 1; k < DQ / 16; k++)
			mw_mma_ss_n64(s, mw_desc_of(dq0 + (uint32_t) (((k >> 2) * QSLAB + (k & 3) * 32) >> 4)),
						  mw_desc_of(dk0 + (uint32_t) (((k >> 2) * MW_SLAB + (k & 3) * 32) >> 4)), 1);
		kw_commit();
		if (j > 0)
		{
#pragma unroll
			for (int kk = 0; kk < MW_KT / 16; kk++)
				mw_mma_rs_n128(o, p + 4 * kk, mw_desc_of(dv0 + (uint32_t) (kk * 2048 >> 4)), 1);
			kw_commit();
			kw_wait<1>();
		}
		else
			kw_wait<0>();
		kw_pin<32>(s);

		/* mask keys past a row's position (only the tiles crossing the diagonal) */
		if ((j + 1) * MW_KT - 1 > wg_first)
		{
#pragma unroll
			for (int n = 0; n < MW_KT / 8; n++)
			{
				int			key = j * MW_KT + 8 * n + 2 * q;

				if (key > p0)
					s[4 * n] = -INFINITY;
				if (key + 1 > p0)
					s[4 * n + 1] = -INFINITY;
				if (key > p1)
					s[4 * n + 2] = -INFINITY;
				if (key + 1 > p1)
					s[4 * n + 3] = -INFINITY;
			}
		}

		/*
		 * Online softmax for rows g (s[4 n], s[4 n + 1]) and g + 8 (s[4 n + 2],
		 * s[4 n + 3]), base 2: p = 2^(s scale log2(e) - max scale log2(e)),
		 * rounded to bf16 into P's registers (what P V multiplies, and what
		 * the sum adds).
		 */
		{
			float		t0 = -INFINITY,
						t1 = -INFINITY,
						c0,
						c1,
						b0,
						b1,
						sum0 = 0.0f,
						sum1 = 0.0f;

#pragma unroll
			for (int n = 0; n < MW_KT / 8; n++)
			{
				t0 = fmaxf(t0, fmaxf(s[4 * n], s[4 * n + 1]));
				t1 = fmaxf(t1, fmaxf(s[4 * n + 2], s[4 * n + 3]));
			}
			softmax_rescale_quad(t0, t1, mx0, mx1, scale_log2, c0, c1, b0, b1);
			mx0 = t0;
			mx1 = t1;
#pragma unroll
			for (int i = 0; i < 32; i++)
				s[i] = ex2_ftz(fmaf(s[i], scale_log2, i & 2 ? -b1 : -b0));

			/* P_{j-1} V_{j-1} done: O and the P registers are free */
			kw_wait<0>();
			kw_pin<64>(o);
			kw_pin_u<16>(p);

			/*
			 * Rounded to bf16 straight into packed pairs, P as A fragments
			 * (k-step kk, keys 16 kk .., is n-tiles 2 kk, 2 kk + 1, so n-tile
			 * n's pairs are p[2 n], row g, and p[2 n + 1], row g + 8): written
			 * here, after the wait, so that no copy of them is needed.  The
			 * sum adds the pairs' halves, exact as floats, in the order of
			 * before (s[4 n] + s[4 n + 1], then into the row's sum).
			 */
#pragma unroll
			for (int n = 0; n < MW_KT / 8; n++)
			{
				p[2 * n] = cvt_bf16x2(s[4 * n], s[4 * n + 1]);
				p[2 * n + 1] = cvt_bf16x2(s[4 * n + 2], s[4 * n + 3]);
				sum0 += mw_bf16_lo(p[2 * n]) + mw_bf16_hi(p[2 * n]);
				sum1 += mw_bf16_lo(p[2 * n + 1]) + mw_bf16_hi(p[2 * n + 1]);
			}
			/* (the quad's partial sums are added once, at the end) */
			l0 = l0 * c0 + sum0;
			l1 = l1 * c1 + sum1;
			/* (a row whose max stayed has c = 1 exactly: skipped when the whole warp's did) */
			if (__any_sync(0xffffffffu, c0 != 1.0f || c1 != 1.0f))
			{
#pragma unroll
				for (int n = 0; n < MW_DV / 8; n++)
				{
					o[4 * n] *= c0;
					o[4 * n + 1] *= c0;
					o[4 * n + 2] *= c1;
					o[4 * n + 3] *= c1;
				}
			}
		}
		kprev = kt;
		kt = kt + MW_TILE == sk_end ? sk_a : kt + MW_TILE;
		kl = kl + MW_TILE == sk_end ? sk_a : kl + MW_TILE;
	}

	/* the last tile's P V */
	kw_pin<64>(o);
	kw_pin_u<16>(p);
	kw_fence();
#pragma unroll
	for (int kk = 0; kk < MW_KT / 16; kk++)
		mw_mma_rs_n128(o, p + 4 * kk, mw_desc(kprev + 3 * MW_SLAB + kk * 2048, MW_SLAB, 1024), 1);
	kw_commit();
	kw_wait<0>();
	kw_pin<64>(o);
	kw_pin_u<16>(p);
	cp_async_wait_group<0>();			/* (only empty groups can be left) */

	/* O / l for the rows of the step */
	{
		float		inv0,
					inv1;
		int			r0 = i0 + 64 * wg + 16 * wq + g,
					r1 = r0 + 8;

		l0 = quad_sum(l0);
		l1 = quad_sum(l1);
		inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
		inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
		for (int n = 0; n < MW_DV / 8; n++)
		{
			int			col = h * MW_DV + 8 * n + 2 * q;

			if (r0 < nr)
				*(float2 *) (out + (size_t) r0 * Ha * MW_DV + col) = make_float2(o[4 * n] * inv0, o[4 * n + 1] * inv0);
			if (r1 < nr)
				*(float2 *) (out + (size_t) r1 * Ha * MW_DV + col) = make_float2(o[4 * n + 2] * inv1, o[4 * n + 3] * inv1);
		}
	}
#endif
}

/* ---------------------------------------------------------------- launcher */

typedef void (*mw_kernel_fn) (int, int, int, int, int, const uint16_t *, const uint16_t *, const uint16_t *, float,
							  float *);

/* the instance for a warpgroup count, with its shared memory; NULL where not built */
static mw_kernel_fn
mw_pick(int groups, size_t *smem)
{
	if (groups == 2)
	{
		*smem = mw_shape<2, 4>::smem;
		return mla_flash_wgmma_kernel<2, 4>;
	}
	if (groups == 3)
	{
		*smem = mw_shape<3, 3>::smem;
		return mla_flash_wgmma_kernel<3, 3>;
	}
	return NULL;
}

/* wgmma.cuh */
int
kk_device_has_wgmma(void)
{
	static int	known[64];		/* 0 unknown, 1 no, 2 yes */
	int			dev = 0,
				major = 0,
				minor = 0,
				has = 0,
			   *d_has = NULL;

	if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
		return 0;
	if (known[dev])
		return known[dev] == 2;
	if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
		cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
		return 0;
	if (major == 9 && minor == 0 && cudaMalloc((void **) &d_has, sizeof(int)) == cudaSuccess)
	{
		kw_probe_kernel<<<1, 1>>>(d_has);
		if (cudaMemcpy(&has, d_has, sizeof(int), cudaMemcpyDeviceToHost) != cudaSuccess)
			has = 0;
		cudaFree(d_has);
	}
	cudaGetLastError();			/* (a failed probe leaves no sticky error behind) */
	known[dev] = has ? 2 : 1;
	return has;
}

extern "C" int
kk_mla_flash_wgmma_supported(int groups, int Ha, int Dn, int Dr, int Dv, int R)
{
	size_t		smem;

	return Ha >= 1 && Ha <= 65535 && R >= 0 && R % 8 == 0 && Dn == MW_DN && Dr == MW_DR && Dv == MW_DV &&
		mw_pick(groups, &smem) != NULL && kk_device_has_wgmma();
}

extern "C" int
kk_mla_flash_wgmma(cudaStream_t s, int groups, int nr, int64_t pos0, int Ha, int Dn, int Dr, int Dv, int R,
				   const uint16_t *q16, const uint16_t *kv16, const uint16_t *lat16, float scale, float *out)
{
	size_t		smem = 0;
	mw_kernel_fn kern = mw_pick(groups, &smem);
	int			nqt = (nr + 64 * groups - 1) / (64 * groups);
	cudaError_t e;

	if (!kern || !kk_mla_flash_wgmma_supported(groups, Ha, Dn, Dr, Dv, R) || pos0 < 0 ||
		pos0 + nr > INT32_MAX / 2 || nqt > 65535 ||
		((uintptr_t) q16 | (uintptr_t) kv16 | (uintptr_t) lat16 | (uintptr_t) out) % 16)
		return -1;
	if (nr <= 0)
		return 0;
	if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem)) != cudaSuccess)
		return (int) e;
	kk_launch(kern, dim3(Ha, nqt), dim3(groups * 128), smem, s, nr, (int) pos0, Ha, R, R + Dr, q16, kv16, lat16,
			  scale * 1.44269504088896340736f, out);	/* scale log2(e) */
	return 0;
}
