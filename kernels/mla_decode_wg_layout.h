/*
 * mla_decode_wg_layout.h — the shared-memory layout of mla_decode_wg.cu
 * (the MLA decode attention on wgmma): where its loaders put every 16-byte
 * chunk of the key tile, of Qabs and of P^T, and the matrix descriptors its
 * wgmma instructions read them through.  Plain C as well as CUDA, so that
 * bench/mla_wg_layout_check.c checks these very functions against a model of
 * the hardware's operand layouts (PTX ISA, "Shared Memory Matrix Layout"),
 * without a GPU.
 *
 * Every operand is in 128-byte-swizzle atoms: 8 rows of 128 bytes, 1024-byte
 * aligned, the 16-byte chunk c of row r stored at chunk c ^ (r & 7).
 *   key tile  9 slabs of [64 keys][128 bytes] (columns 64 s .. 64 s + 63 of
 *             the cache row [c (512) | k_pe (64)]): 72 KB
 *   Qabs      9 slabs of [32 heads][128 bytes] (bf16): 36 KB
 *   P^T       one slab [32 heads][128 bytes] (64 keys, bf16): 4 KB (one a
 *             warpgroup where each warpgroup takes a key range of its own)
 * Products (m64n32k16, bf16 in, fp32 out):
 *   S^T = K Qabs^T   A = key tile, K-major (k-step k: slab k / 4, + 32 bytes
 *                    (k % 4)); B = Qabs, K-major, the same way
 *   O^T = V^T P^T    A = slab mb (value columns 64 mb ..) of the key tile
 *                    read MN-major (tnspA; k-step kk: keys 16 kk .., + 2048
 *                    bytes), B = P^T, K-major (k-step kk: + 32 bytes)
 * Descriptors: start >> 4 in bits 0-13, leading byte offset >> 4 in 16-29,
 * stride byte offset >> 4 in 32-45, swizzle mode 1 (128 bytes) in 62-63.
 * The stride offset is 1024 everywhere (the next 8 rows of an atom column);
 * the leading offset is unused by these shapes (K-major with this swizzle,
 * and MN-major with M = 64, one atom wide) and set as mla_flash_wgmma.cu
 * sets it, verified there on the GPU: 16 for K-major operands, 8192 (the
 * next slab) for the MN-major one.
 */
#ifndef KL_MLA_DECODE_WG_LAYOUT_H
#define KL_MLA_DECODE_WG_LAYOUT_H

#include <stdint.h>

#ifdef __CUDACC__
#define MDW_FN __host__ __device__ __forceinline__
#else
#define MDW_FN static inline
#endif

#define MDW_HEADS 32			/* Ha: the n of both products */
#define MDW_R 512				/* value columns (latent c) */
#define MDW_DR 64				/* rope columns */
#define MDW_WA (MDW_R + MDW_DR) /* bf16 numbers a cache row */
#define MDW_KT 64				/* keys a tile: the m of S^T, the k of O^T */
#define MDW_SLABS (MDW_WA / 64) /* 9 slabs of 64 columns */
#define MDW_KSLAB (MDW_KT * 128)	/* bytes of a key-tile slab */
#define MDW_QSLAB (MDW_HEADS * 128) /* bytes of a Qabs slab */
#define MDW_TILE (MDW_SLABS * MDW_KSLAB)	/* 73728 */
#define MDW_QBYTES (MDW_SLABS * MDW_QSLAB)	/* 36864 */
#define MDW_PBYTES (MDW_HEADS * 128)	/* 4096 */
#define MDW_THREADS 256			/* two warpgroups */
/* 16-byte copies a thread a tile when lt threads load it: 18 for the block's 256, 36 for a warpgroup's 128 */
#define MDW_COPIES(lt) (MDW_KT * MDW_SLABS * 8 / (lt))
#define MDW_SBO 1024u
#define MDW_LBO_K 16u			/* leading offsets: K-major operands */
#define MDW_LBO_MN 8192u		/* the MN-major one (O^T's A) */

/* byte offset of 16-byte chunk c (0 .. 7) of row r in 128-byte-swizzled rows */
MDW_FN uint32_t
mdw_swz(int r, int c)
{
	return (uint32_t) (r * 128 + ((c ^ (r & 7)) << 4));
}

/* byte offset in a key tile of key row `key`'s chunk `chunk` (0 .. 71, 8 bf16 each) */
MDW_FN uint32_t
mdw_tile_chunk(int key, int chunk)
{
	return (uint32_t) (chunk >> 3) * MDW_KSLAB + mdw_swz(key, chunk & 7);
}

/* byte offset in Qabs's slabs of head h's chunk `chunk` (0 .. 71) */
MDW_FN uint32_t
mdw_q_chunk(int h, int chunk)
{
	return (uint32_t) (chunk >> 3) * MDW_QSLAB + mdw_swz(h, chunk & 7);
}

/* byte offset in P^T of head h's keys 8 c .. 8 c + 7 */
MDW_FN uint32_t
mdw_p_chunk(int h, int c)
{
	return mdw_swz(h, c);
}

/*
 * The tile loader of lt threads (256: the block; 128: a warpgroup): copy i
 * (0 .. MDW_COPIES(lt) - 1) of thread tid (0 .. lt - 1) is key (tid / 8) +
 * (lt / 8) (i / 9), chunk 8 (i % 9) + tid % 8 — a warp reads 4 keys' 128
 * contiguous bytes of one slab.  Keys lt / 8 apart (32 or 16: a multiple of
 * 8) share the swizzle phase, so copy i lands at the thread's first chunk's
 * offset plus a constant.
 */
MDW_FN int
mdw_copy_key(int lt, int tid, int i)
{
	return (tid >> 3) + (lt / 8) * (i / MDW_SLABS);
}

MDW_FN int
mdw_copy_chunk(int tid, int i)
{
	return 8 * (i % MDW_SLABS) + (tid & 7);
}

MDW_FN uint32_t
mdw_copy_dst(int lt, uint32_t dst0, int i)
{
	return dst0 + (uint32_t) (i % MDW_SLABS) * MDW_KSLAB + (uint32_t) (i / MDW_SLABS) * (uint32_t) (lt / 8 * 128);
}

/* its source, in bytes from the tile's first row */
MDW_FN uint32_t
mdw_copy_src(int lt, uint32_t src0, int i)
{
	return src0 + (uint32_t) (i % MDW_SLABS) * 128 + (uint32_t) (i / MDW_SLABS) * (uint32_t) (lt / 8 * MDW_WA * 2);
}

/* descriptor start offsets (bytes from the operand's base) of each wgmma */
MDW_FN uint32_t
mdw_s_a_off(int k)				/* S^T, k-step k (0 .. 35): key tile */
{
	return (uint32_t) (k >> 2) * MDW_KSLAB + (uint32_t) (k & 3) * 32;
}

MDW_FN uint32_t
mdw_s_b_off(int k)				/* S^T, k-step k: Qabs */
{
	return (uint32_t) (k >> 2) * MDW_QSLAB + (uint32_t) (k & 3) * 32;
}

/*
 * Warpgroup wg's k-step k (0 .. 17) of S^T: slabs 4 wg .. 4 wg + 3 (nope
 * columns 256 wg ..), then half of the rope slab (k-steps 32 + 2 wg, + 1) —
 * so that its offsets are warpgroup 0's plus mdw_s_a_wg / mdw_s_b_wg.
 */
MDW_FN int
mdw_s_kstep(int wg, int k)
{
	return k < 16 ? 16 * wg + k : 32 + 2 * wg + (k - 16);
}

MDW_FN uint32_t
mdw_s_a_wg(int wg, int k)
{
	return k < 16 ? (uint32_t) wg * 4 * MDW_KSLAB : (uint32_t) wg * 64;
}

MDW_FN uint32_t
mdw_s_b_wg(int wg, int k)
{
	return k < 16 ? (uint32_t) wg * 4 * MDW_QSLAB : (uint32_t) wg * 64;
}

MDW_FN uint32_t
mdw_o_a_off(int mb, int kk)		/* O^T, value columns 64 mb .., keys 16 kk ..: key tile */
{
	return (uint32_t) mb * MDW_KSLAB + (uint32_t) kk * 2048;
}

MDW_FN uint32_t
mdw_o_b_off(int kk)				/* O^T, keys 16 kk ..: P^T */
{
	return (uint32_t) kk * 32;
}

/* a 128-byte-swizzle descriptor of shared address saddr (below 2^18, a multiple of 16), leading offset lbo */
MDW_FN uint64_t
mdw_desc(uint32_t saddr, uint32_t lbo)
{
	return (uint64_t) (saddr >> 4) | ((uint64_t) (lbo >> 4) << 16) | ((uint64_t) (MDW_SBO >> 4) << 32) |
		(1ull << 62);
}

/*
 * The same for base + off, from base >> 4 made once per tile (what the
 * kernel uses: the k-steps' offsets are constants added to it; equal to
 * mdw_desc(base + off, lbo) for 16-byte-aligned base and off)
 */
MDW_FN uint64_t
mdw_desc_at(uint32_t base16, uint32_t off, uint32_t lbo)
{
	return (uint64_t) (base16 + (off >> 4)) | ((uint64_t) (lbo >> 4) << 16) | ((uint64_t) (MDW_SBO >> 4) << 32) |
		(1ull << 62);
}

#endif
