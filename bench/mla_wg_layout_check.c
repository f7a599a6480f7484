/*
 * mla_wg_layout_check.c — a host-side check of mla_decode_wg.cu's shared-
 * memory operand layouts, without a GPU: for every element of every wgmma
 * operand of the kernel (S^T = K Qabs^T: 36 k-steps; O^T = V^T P^T: 8 value
 * blocks x 4 k-steps), the byte that the hardware reads through the kernel's
 * descriptor (a model of the PTX ISA's canonical layouts with 128-byte
 * swizzle, written here independently of the kernel) must be the byte where
 * the kernel's loaders put that logical element (both tile buffers; both
 * loaders: the block's 256 threads and a warpgroup's 128, which fill a tile
 * when each warpgroup streams a key range of its own; P^T at both
 * warpgroups' places).  The loaders' and the descriptors' address math is
 * the kernel's own (mla_decode_wg_layout.h).
 *
 *   cc -O1 -o /tmp/mla_wg_layout_check bench/mla_wg_layout_check.c -Ikernels && /tmp/mla_wg_layout_check
 *
 * Hardware model, 16-bit elements, element (mn, k) of an m64/n32 x k16
 * operand at descriptor start address s (bytes; the address before the swizzle):
 *   K-major:  s + 128 (mn % 8) + SBO (mn / 8) + 2 (k % 8) + 16 (k / 8)
 *   MN-major: s + 2 (mn % 64) + LBO (mn / 64) + 128 (k % 8) + SBO (k / 8)
 * then the 128-byte swizzle on the absolute shared address: bits 4-6 ^=
 * bits 7-9 (the pattern repeats every 1024 bytes; the kernel's buffers are
 * 1024-byte aligned, base offset 0).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mla_decode_wg_layout.h"

/* the kernel's shared buffers (offsets from a 1024-aligned base): two tiles, Qabs, P^T (a warpgroup's each) */
#define BASE 0x400u
#define TILE0 (BASE)
#define QOFF (BASE + 2 * MDW_TILE)
#define POFF (QOFF + MDW_QBYTES)
#define END (POFF + 2 * MDW_PBYTES)

static int	failures;

static void
fail(const char *what, int a, int b, int c, unsigned got, unsigned want)
{
	if (failures++ < 20)
		fprintf(stderr, "FAIL %s (%d, %d, %d): reads byte 0x%x, element is at 0x%x\n", what, a, b, c, got, want);
}

static unsigned
swizzle128(unsigned addr)
{
	return addr ^ (((addr >> 7) & 7) << 4);
}

/* decode a descriptor as the hardware does (start, LBO, SBO in bytes; swizzle mode) */
static void
desc_fields(uint64_t d, unsigned *start, unsigned *lbo, unsigned *sbo, int *mode)
{
	*start = (unsigned) (d & 0x3fff) << 4;
	*lbo = (unsigned) ((d >> 16) & 0x3fff) << 4;
	*sbo = (unsigned) ((d >> 32) & 0x3fff) << 4;
	*mode = (int) (d >> 62);
}

/* the shared byte the hardware reads for element (mn, k) of an operand */
static unsigned
hw_addr(uint64_t d, int mn_major, int mn, int k)
{
	unsigned	s,
				lbo,
				sbo,
				a;
	int			mode;

	desc_fields(d, &s, &lbo, &sbo, &mode);
	if (mode != 1 || (d >> 49 & 7) != 0)
		return 0xffffffffu;		/* not the 128-byte swizzle with base offset 0 */
	if (mn_major)
		a = s + 2 * (mn % 64) + lbo * (mn / 64) + 128 * (k % 8) + sbo * (k / 8);
	else
		a = s + 128 * (mn % 8) + sbo * (mn / 8) + 2 * (k % 8) + 16 * (k / 8);
	return swizzle128(a);
}

/* tile_at[key][col]: where the tile loader put each bf16 of a key tile (bytes from the tile's start) */
static unsigned tile_at[MDW_KT][MDW_WA];

/* the loader of lt threads (256 or 128): each copy's source and destination, every chunk of the tile once */
static void
build_tile_map(int lt)
{
	static unsigned char seen[MDW_TILE / 16];

	memset(seen, 0, sizeof(seen));
	for (int k = 0; k < MDW_KT; k++)
		for (int c = 0; c < MDW_WA; c++)
			tile_at[k][c] = 0xffffffffu;
	for (int tid = 0; tid < lt; tid++)
	{
		uint32_t	dst0 = mdw_tile_chunk(mdw_copy_key(lt, tid, 0), mdw_copy_chunk(tid, 0)),
					src0 = (uint32_t) (mdw_copy_key(lt, tid, 0) * MDW_WA * 2 + mdw_copy_chunk(tid, 0) * 16);

		for (int i = 0; i < MDW_COPIES(lt); i++)
		{
			int			key = mdw_copy_key(lt, tid, i),
						chunk = mdw_copy_chunk(tid, i);
			uint32_t	dst = mdw_copy_dst(lt, dst0, i),
						src = mdw_copy_src(lt, src0, i);

			if (key >= MDW_KT || chunk >= MDW_WA / 8)
			{
				fail("copy outside the tile", tid, i, key, chunk, 0);
				continue;
			}
			if (src != (uint32_t) (key * MDW_WA * 2 + chunk * 16))
				fail("copy source", tid, i, key, src, key * MDW_WA * 2 + chunk * 16);
			if (dst != mdw_tile_chunk(key, chunk))
				fail("copy destination (incremental vs direct)", tid, i, key, dst, mdw_tile_chunk(key, chunk));
			if (dst % 16 || dst >= MDW_TILE || seen[dst / 16]++)
				fail("copy destination overlaps or leaves the tile", tid, i, key, dst, 0);
			for (int e = 0; e < 8; e++)
				tile_at[key][8 * chunk + e] = dst + 2 * e;
		}
	}
	for (int k = 0; k < MDW_KT; k++)
		for (int c = 0; c < MDW_WA; c++)
			if (tile_at[k][c] == 0xffffffffu)
				fail("tile element never loaded", k, c, 0, 0, 0);
}

int
main(void)
{
	long		checked = 0;

	if (BASE % 1024 || QOFF % 1024 || POFF % 1024 || MDW_PBYTES % 1024 || END - BASE > 227 * 1024)
		fail("buffer alignment or size", BASE, QOFF, POFF, END, 0);
	/* (the warpgroup's loader first: the block's, whose map the operands are checked against, must agree) */
	build_tile_map(MDW_THREADS / 2);
	build_tile_map(MDW_THREADS);

	/* S^T = K Qabs^T: A(m = key, k) = tile[key][16 ks + k], B(n = head, k) = Qabs[head][16 ks + k] */
	for (int b = 0; b < 2; b++)
	for (int ks = 0; ks < MDW_WA / 16; ks++)
	{
		unsigned	tb = TILE0 + b * MDW_TILE;
		uint64_t	da = mdw_desc_at(tb >> 4, mdw_s_a_off(ks), MDW_LBO_K),
					db = mdw_desc_at(QOFF >> 4, mdw_s_b_off(ks), MDW_LBO_K);

		for (int k = 0; k < 16; k++)
		{
			int			col = 16 * ks + k;

			for (int m = 0; m < 64; m++, checked++)
				if (hw_addr(da, 0, m, k) != tb + tile_at[m][col])
					fail("S^T A (key tile)", ks, m, k, hw_addr(da, 0, m, k), tb + tile_at[m][col]);
			for (int n = 0; n < MDW_HEADS; n++, checked++)
			{
				unsigned	want = QOFF + mdw_q_chunk(n, col / 8) + 2 * (col % 8);

				if (hw_addr(db, 0, n, k) != want)
					fail("S^T B (Qabs)", ks, n, k, hw_addr(db, 0, n, k), want);
			}
		}
	}

	/* the warpgroups' k-steps of S^T: each of 0 .. 35 once, at warpgroup 0's offsets plus a constant */
	{
		int			seen[MDW_WA / 16] = {0};

		for (int wg = 0; wg < 2; wg++)
			for (int k = 0; k < MDW_WA / 32; k++)
			{
				int			ks = mdw_s_kstep(wg, k),
							k0 = mdw_s_kstep(0, k);

				if (ks < 0 || ks >= MDW_WA / 16 || seen[ks]++)
					fail("S^T k-step split", wg, k, ks, 0, 0);
				else if (mdw_s_a_off(ks) != mdw_s_a_wg(wg, k) + mdw_s_a_off(k0) ||
						 mdw_s_b_off(ks) != mdw_s_b_wg(wg, k) + mdw_s_b_off(k0))
					fail("S^T k-step offsets", wg, k, ks, mdw_s_a_wg(wg, k) + mdw_s_a_off(k0), mdw_s_a_off(ks));
			}
	}

	/* O^T = V^T P^T: A(m = value column 64 mb + m, k) = tile[16 kk + k][64 mb + m], B(n = head, k) = P[head][16 kk + k]
	 * (tile buffer b with warpgroup b's P^T, or both warpgroups' halves of the m-blocks with the first P^T) */
	for (int b = 0; b < 2; b++)
	for (int pb = 0; pb < 2; pb++)
	for (int mb = 0; mb < MDW_R / 64; mb++)
		for (int kk = 0; kk < MDW_KT / 16; kk++)
		{
			unsigned	tb = TILE0 + b * MDW_TILE,
						pt = POFF + pb * MDW_PBYTES;
			uint64_t	da = mdw_desc_at(tb >> 4, mdw_o_a_off(mb, kk), MDW_LBO_MN),
						db = mdw_desc_at(pt >> 4, mdw_o_b_off(kk), MDW_LBO_K);

			for (int k = 0; k < 16; k++)
			{
				int			key = 16 * kk + k;

				for (int m = 0; m < 64; m++, checked++)
					if (hw_addr(da, 1, m, k) != tb + tile_at[key][64 * mb + m])
						fail("O^T A (values, MN-major)", mb, kk, 64 * k + m, hw_addr(da, 1, m, k),
							 tb + tile_at[key][64 * mb + m]);
				for (int n = 0; n < MDW_HEADS; n++, checked++)
				{
					unsigned	want = pt + mdw_p_chunk(n, key / 8) + 2 * (key % 8);

					if (hw_addr(db, 0, n, k) != want)
						fail("O^T B (P^T)", kk, n, k, hw_addr(db, 0, n, k), want);
				}
			}
		}
	printf("mla_wg_layout_check: %ld operand elements checked, %d mismatches\n", checked, failures);
	return failures ? 1 : 0;
}
