/*
 * route_warp.cuh — the decode routing pieces of kernels/moe.cu that the fused
 * router (kernels/router.cu) runs too, so that both make the same choices
 * bit for bit from the same logits: a group's score, the kept groups, the
 * slots' weights, a token routed by one warp (route_token_warp) and the
 * pairs grouped by one warp (group_pairs_warp).  moe.cu's comment above
 * moe_route_group_warp_kernel describes the method.
 */
#ifndef KL_KERNELS_ROUTE_WARP_CUH
#define KL_KERNELS_ROUTE_WARP_CUH

#include "common.cuh"

/* A group's score: the sum of its two largest choices (the largest alone in a
 * group of one expert), as kl_moe_route scores groups. */
__device__ __forceinline__ float
group_score(const float *choice, int g, int per)
{
	float		b1 = -INFINITY,
				b2 = -INFINITY;

	for (int e = g * per; e < (g + 1) * per; e++)
	{
		if (choice[e] > b1)
		{
			b2 = b1;
			b1 = choice[e];
		}
		else if (choice[e] > b2)
			b2 = choice[e];
	}
	return per >= 2 ? b1 + b2 : b1;
}

/* keep[g] = 1 for the Tg groups of highest score, ties to the lower group
 * (keep[] starts at 0); one thread does it. */
__device__ __forceinline__ void
keep_top_groups(const float *gscore, int *keep, int G, int Tg)
{
	for (int r = 0; r < Tg; r++)
	{
		int			best = -1;

		for (int g = 0; g < G; g++)
			if (!keep[g] && (best < 0 || gscore[g] > gscore[best]))
				best = g;
		keep[best] = 1;
	}
}

/*
 * Lane r < k holds slot r's weight wr: wts_row[r] = wr (divided by the k
 * weights' sum, added in slot order, when renormalizing) times scaling.
 * Every lane of the warp calls it.
 */
__device__ __forceinline__ void
slot_weights_warp(float wr, int k, int renorm, float scaling, float *wts_row, int lane)
{
	float		sum = 0;

	for (int r = 0; r < k; r++)
		sum += __shfl_sync(0xffffffffu, wr, r);
	if (lane < k)
	{
		float		x = wr;

		if (renorm && k > 1)
			x /= (sum + 1e-20f);
		wts_row[lane] = x * scaling;
	}
}

#define ROUTE_NPL 8				/* experts per lane: E <= 32 * ROUTE_NPL */

/* float -> unsigned with the same order (-0 and +0 one key, as == sees them) */
__device__ __forceinline__ unsigned
order_key(float v)
{
	unsigned	u = v == 0.0f ? 0u : __float_as_uint(v);

	return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* the lane's best untaken expert: largest key, then lowest slot (= lowest
 * id); its slot, key and weight */
__device__ __forceinline__ void
lane_best(const unsigned *key, const float *wv, uint32_t avail, unsigned *bk, int *bs, float *bw)
{
	*bs = -1;
	*bk = 0;
	*bw = 0;
#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
		if (((avail >> i) & 1u) && (*bs < 0 || key[i] > *bk))
		{
			*bk = key[i];
			*bs = i;
			*bw = wv[i];
		}
}

/*
 * Route token t in one warp (moe_route_group_kernel's rule); write its
 * choices to sel and ssel, its weights to wts.  gs: this warp's scratch for
 * groups, E + 2G words.
 */
__device__ __forceinline__ void
route_token_warp(int t, int E, int k, int G, int Tg, int use_softmax, int renorm, int bias_in_w, float scaling,
				 const float *__restrict__ logits, const float *bz, float *gs, int *sel, float *wts, int *ssel)
{
	int			lane = threadIdx.x & 31;
	float		lg[ROUTE_NPL],
				s[ROUTE_NPL],
				c[ROUTE_NPL],
				wv[ROUTE_NPL];
	unsigned	key[ROUTE_NPL];
	uint32_t	avail = 0;		/* bit i: expert lane + 32 i exists and is not taken */
	float		wr = 0;
	int			mine = 0;		/* lane r < k: the r-th choice */

#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
	{
		int			e = lane + 32 * i;

		/* -inf past E: adds nothing to the softmax (see below) */
		lg[i] = e < E ? logits[(size_t) t * E + e] : -INFINITY;
		if (e < E)
			avail |= 1u << i;
	}
	if (use_softmax)
	{
		float		mx = -INFINITY,
					z = 0;

		/*
		 * moe_route_group_kernel's loops compute expf(lg - mx) twice (its
		 * scores overwrite the logits), and the compiler fuses the first
		 * expf's last product into z += (an FMA).  Here the two would be one
		 * common subexpression with two uses, left unfused, and the sums
		 * would differ in the last bit: the second expf's argument goes
		 * through an empty asm so that each stays alone, as there.  No
		 * conditions in the sum either (a predicated add stayed unfused);
		 * past E, expf(-inf) = 0 adds nothing.
		 */
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			mx = fmaxf(mx, lg[i]);
		mx = warp_max(mx);
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			z += expf(lg[i] - mx);
		z = warp_sum(z);
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
		{
			float		x = lg[i];

			asm volatile("" : "+f"(x));
			s[i] = expf(x - mx) / z;
		}
	}
	else
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			s[i] = 1.0f / (1.0f + expf(-lg[i]));
#pragma unroll
	for (int i = 0; i < ROUTE_NPL; i++)
	{
		c[i] = s[i] + bz[i];
		wv[i] = bias_in_w ? s[i] + bz[i] : s[i];
	}

	if (G > 1 && Tg < G)
	{
		float	   *choice = gs,
				   *gscore = gs + E;
		int		   *keep = (int *) (gscore + G);
		int			pg = E / G;

#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			if ((avail >> i) & 1u)
				choice[lane + 32 * i] = c[i];
		__syncwarp();
		for (int g = lane; g < G; g += 32)
		{
			gscore[g] = group_score(choice, g, pg);
			keep[g] = 0;
		}
		__syncwarp();
		if (lane == 0)
			keep_top_groups(gscore, keep, G, Tg);
		__syncwarp();
#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			if (((avail >> i) & 1u) && !keep[(lane + 32 * i) / pg])
				c[i] = 0.0f;
		__syncwarp();			/* the scratch is the next token's */
	}

	/* top k: the warp's largest key, then its lowest expert id */
	{
		unsigned	bk;
		int			bs;
		float		bw;

#pragma unroll
		for (int i = 0; i < ROUTE_NPL; i++)
			key[i] = order_key(c[i]);
		lane_best(key, wv, avail, &bk, &bs, &bw);
		for (int r = 0; r < k; r++)
		{
			unsigned	top = __reduce_max_sync(0xffffffffu, bs >= 0 ? bk : 0u);
			unsigned	cand = bs >= 0 && bk == top ? (unsigned) (lane + 32 * bs) : 0xffffffffu;
			int			bi = (int) __reduce_min_sync(0xffffffffu, cand);
			float		v;

			if (bi < 0 || bi >= E)	/* no expert left: k > E, not launched */
				bi = 0;
			/* the winner's lane holds it as its best (the reductions are uniform) */
			v = __shfl_sync(0xffffffffu, bw, bi & 31);
			if (lane == r)
			{
				mine = bi;
				wr = v;
			}
			if (lane == (bi & 31))
			{
				avail &= ~(1u << (bi >> 5));
				lane_best(key, wv, avail, &bk, &bs, &bw);
			}
		}
	}
	/* weights: summed in slot order, as moe_route_group_kernel */
	slot_weights_warp(wr, k, renorm, scaling, wts + (size_t) t * k, lane);
	if (lane < k)
	{
		sel[(size_t) t * k + lane] = mine;
		ssel[t * k + lane] = mine;
	}
}

/*
 * Warp 0 groups the nk pairs of ssel as group_pairs does (same start,
 * xrow, inv, active).  cnt: E zeroed words; srank: nk words.
 */
__device__ __forceinline__ void
group_pairs_warp(int nk, int E, int k, int shared_rows, int P, const int *ssel, int *cnt, int *srank, int *start,
				 int *xrow, int *inv, int *active)
{
	int			lane = threadIdx.x & 31;
	unsigned	below = (1u << lane) - 1u;
	int			per = (E + 31) / 32,
				lo = lane * per,
				hi = lo + per < E ? lo + per : E;
	int			tc = 0,
				ti = 0,
				ic,
				ii,
				tot_c,
				tot_i;

	/* stable ranks, 32 pairs at a time; cnt[e]: pairs of e so far */
	for (int c0 = 0; c0 < nk; c0 += 32)
	{
		int			i = c0 + lane;
		int			e = i < nk ? ssel[i] : -1;
		unsigned	same = __match_any_sync(0xffffffffu, e);
		int			before = e >= 0 ? cnt[e] : 0;

		__syncwarp();
		if (e >= 0)
		{
			srank[i] = before + __popc(same & below);
			if ((same & below) == 0)	/* the first of its expert here */
				cnt[e] = before + __popc(same);
		}
		__syncwarp();
	}
	/* lane: experts [lo, hi); exclusive prefixes of counts and work items */
	for (int e = lo; e < hi; e++)
	{
		int			c = cnt[e];

		tc += c;
		ti += (c + P - 1) / P;
	}
	ic = tc;
	ii = ti;
#pragma unroll
	for (int o = 1; o < 32; o <<= 1)
	{
		int			a = __shfl_up_sync(0xffffffffu, ic, o),
					b = __shfl_up_sync(0xffffffffu, ii, o);

		if (lane >= o)
		{
			ic += a;
			ii += b;
		}
	}
	tot_c = __shfl_sync(0xffffffffu, ic, 31);
	tot_i = __shfl_sync(0xffffffffu, ii, 31);
	{
		int			run = ic - tc,
					item = ii - ti;

		for (int e = lo; e < hi; e++)
		{
			int			c = cnt[e],
						items = (c + P - 1) / P;

			start[e] = run;
			cnt[e] = run;		/* now the expert's first position */
			for (int j = 0; j < items; j++)
				active[1 + item + j] = e * 64 + j;
			run += c;
			item += items;
		}
	}
	if (lane == 0)
	{
		int			items = (shared_rows + P - 1) / P;

		start[E] = tot_c;
		active[0] = tot_i + items;
		/* the shared expert as expert E, over every token */
		if (shared_rows > 0)
			start[E + 1] = tot_c + shared_rows;
		for (int j = 0; j < items; j++)
			active[1 + tot_i + j] = E * 64 + j;
	}
	for (int t = lane; t < shared_rows; t += 32)
		xrow[nk + t] = t;
	__syncwarp();
	for (int i = lane; i < nk; i += 32)
	{
		int			p = cnt[ssel[i]] + srank[i];

		xrow[p] = i / k;
		inv[i] = p;
	}
}

#endif
