/*
 * mla_wg_softmax_check.c — a host-side check, without a GPU, that
 * mla_decode_wg.cu's softmax in a warpgroup of its own (mdw_softmax<2>:
 * KL_CUDA_MLA_WG_DUAL, 128 threads, 4 lanes a head, 16 keys a thread, the
 * scores' two halves added before) makes the same bits as the block's
 * (mdw_softmax<1>: 256 threads, 8 lanes a head, the two warpgroups'
 * partial scores added in the softmax): P^T, the running max and sum and
 * the correction, over random tiles, partial last tiles and runs of tiles.
 * A transliteration of the kernel's function with its lanes as arrays (a
 * shuffle reads the lane gt ^ o); exp2f stands in for ex2.approx (the same
 * function in both forms).  A planted change (S = 2 summing its 16 keys in
 * one run instead of as two subs) makes ~half the tiles differ.
 *
 *   cc -O1 -ffp-contract=off -o /tmp/c bench/mla_wg_softmax_check.c -lm && /tmp/c
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define KT 64
#define HEADS 32
#define SP 33					/* MDW_SPITCH */

/* bf16 of f, round to nearest even (cvt.rn.bf16x2's, for finite f) */
static uint32_t
bf16_bits(float f)
{
	uint32_t	u;

	memcpy(&u, &f, 4);
	u += 0x7fff + ((u >> 16) & 1);
	return u >> 16;
}

static float
as_float(uint32_t u)
{
	float		f;

	memcpy(&f, &u, 4);
	return f;
}

typedef struct
{
	float		sm[HEADS],
				sl[HEADS],
				corr[HEADS];
	uint16_t	P[HEADS][KT];
} state;

/* mdw_softmax<S> over all its threads at once (S = 1: ss holds [2][KT][SP] partials; S = 2: [KT][SP] scores) */
static void
softmax(int S, const float *ss, state *st, int nk, float sl2)
{
	int			nthr = 256 / S,
				lanes = 8 / S;
	static float tmax[256],
				mold[256],
				sum[256][2],
				x[256][2][8],
				t[256];
	static uint32_t w[256][2][4];

	for (int gt = 0; gt < nthr; gt++)
	{
		int			h = gt / lanes,
					u = gt % lanes;

		tmax[gt] = -INFINITY;
		mold[gt] = st->sm[h];
		for (int v = 0; v < S; v++)
			for (int i = 0; i < 8; i++)
			{
				int			key = 8 * (S * u + v) + i;

				x[gt][v][i] = S == 1 ? ss[key * SP + h] + ss[(KT + key) * SP + h] : ss[key * SP + h];
				if (key >= nk)
					x[gt][v][i] = -INFINITY;
				tmax[gt] = fmaxf(tmax[gt], x[gt][v][i]);
			}
	}
	for (int o = 1; o < lanes; o <<= 1)
	{
		for (int gt = 0; gt < nthr; gt++)
			t[gt] = fmaxf(tmax[gt], tmax[gt ^ o]);
		memcpy(tmax, t, sizeof(t));
	}
	for (int gt = 0; gt < nthr; gt++)
	{
		int			h = gt / lanes,
					u = gt % lanes;
		float		b = fmaxf(mold[gt], tmax[gt]) * sl2;

		for (int v = 0; v < S; v++)
		{
			sum[gt][v] = 0.0f;
			for (int i = 0; i < 4; i++)
			{
				w[gt][v][i] = bf16_bits(exp2f(fmaf(x[gt][v][2 * i], sl2, -b))) |
					bf16_bits(exp2f(fmaf(x[gt][v][2 * i + 1], sl2, -b))) << 16;
				sum[gt][v] += as_float(w[gt][v][i] << 16) + as_float(w[gt][v][i] & 0xffff0000u);
				st->P[h][8 * (S * u + v) + 2 * i] = (uint16_t) (w[gt][v][i] & 0xffff);
				st->P[h][8 * (S * u + v) + 2 * i + 1] = (uint16_t) (w[gt][v][i] >> 16);
			}
		}
		if (S == 2)
			sum[gt][0] = sum[gt][0] + sum[gt][1];
	}
	for (int o = 1; o < lanes; o <<= 1)
	{
		for (int gt = 0; gt < nthr; gt++)
			t[gt] = sum[gt][0] + sum[gt ^ o][0];
		for (int gt = 0; gt < nthr; gt++)
			sum[gt][0] = t[gt];
	}
	for (int gt = 0; gt < nthr; gt += lanes)
	{
		int			h = gt / lanes;
		float		mnew = fmaxf(mold[gt], tmax[gt]),
					corr = mold[gt] == -INFINITY ? 0.0f : exp2f((mold[gt] - mnew) * sl2);

		st->sm[h] = mnew;
		st->sl[h] = fmaf(st->sl[h], corr, sum[gt][0]);
		st->corr[h] = corr;
	}
}

static double
unif(uint64_t *s)
{
	*s = *s * 6364136223846793005ull + 1442695040888963407ull;
	return (double) (*s >> 11) / 9007199254740992.0;
}

int
main(void)
{
	static float ss2[2 * KT * SP],
				ss1[KT * SP];
	uint64_t	rs = 42;
	int			bad = 0,
				tiles = 0;

	for (int trial = 0; trial < 200; trial++)
	{
		state		a,
					b;
		int			nt = 1 + trial % 5;
		/* (wide scores: P spans many binades, so the order of the fp32 sums shows) */
		double		spread = trial % 2 ? 3.0 : 300.0;

		for (int h = 0; h < HEADS; h++)
		{
			a.sm[h] = b.sm[h] = -INFINITY;
			a.sl[h] = b.sl[h] = 0.0f;
		}
		for (int j = 0; j < nt; j++, tiles++)
		{
			int			nk = j == nt - 1 && trial % 3 ? 1 + (int) (unif(&rs) * 64) : 64;

			for (int k = 0; k < KT; k++)
				for (int h = 0; h < HEADS; h++)
				{
					float		p0 = (float) ((unif(&rs) - 0.5) * spread),
								p1 = (float) ((unif(&rs) - 0.5) * spread);

					ss2[k * SP + h] = p0;
					ss2[(KT + k) * SP + h] = p1;
					ss1[k * SP + h] = p0 + p1;	/* (DUAL: d0[i] + d1[i]) */
				}
			softmax(1, ss2, &a, nk, 0.1275f);
			softmax(2, ss1, &b, nk, 0.1275f);
			if (memcmp(a.P, b.P, sizeof(a.P)) || memcmp(a.sm, b.sm, sizeof(a.sm)) ||
				memcmp(a.sl, b.sl, sizeof(a.sl)) || memcmp(a.corr, b.corr, sizeof(a.corr)))
				bad++;
		}
	}
	printf("mla_wg_softmax_check: %d tiles, %d differ between the block's softmax and a warpgroup's\n", tiles, bad);
	return bad != 0;
}
