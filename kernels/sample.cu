/*
 * sample.cu — choosing the next token on the device, one block of 1024
 * threads per row of logits: exactly the choice of kl_sample_draw
 * (src/engine/sample.c, whose header states the rule) for the same logits
 * and uniform draw, with the arithmetic of sample_core.h.  Only the chosen
 * ids leave the device.
 *
 *   1. repetition penalty (the host passes each id once), allowed-token mask
 *   2. temperature 0: argmax, the first on ties
 *   3. p = logit / T; the top-k set by radix selection of the k-th key in
 *      (value, lower id) order; e = exp(p - max) for the candidates
 *   4. softmax: thread t owns chunk t (ids t, t + 1024, ...) of the fixed
 *      summation order; prob = e / z
 *   5. cumulative probabilities are exact fixed-point sums, so no sort is
 *      needed: the top-p prefix, the min-p cut and the draw are found by radix
 *      descents over the ranking keys whose buckets carry counts and
 *      fixed-point sums (a warp's lanes in the same bucket add theirs first);
 *      first tried in shared memory on the candidates above a power-of-two
 *      bound (a peaked distribution); the draw without top-p / min-p is one
 *      scan of per-thread id ranges
 * Ties in value are broken by id, so every selection is one set whatever the
 * order in which threads meet the candidates.
 *
 * sample_wide_kernel (below; the default on Hopper, KL_CUDA_SAMPLE_WIDE=0
 * turns it off) runs the same stages on a cluster of blocks per row, each
 * block holding its share of the row in shared memory; sample_fast_kernel
 * (KL_CUDA_SAMPLE_WIDE=2) is its form with fewer passes and cluster barriers.
 */
#include "common.cuh"
#include "../src/engine/sample_core.h"

#define ST 1024					/* threads per block = KL_SAMPLE_CHUNKS */

static_assert(ST == KL_SAMPLE_CHUNKS, "one thread per summation chunk");

struct sample_smem
{
	double		part[ST];
	unsigned	hist[256];
	unsigned long long hsum[256];
	float		red_f[32];
	int			red_i[32];
	unsigned long long red_u[32];
	uint64_t	prefix,
				mask,
				rem,
				found;
	int			done,
				single;
	float		mx;
	double		z;
};

/* block-wide max of v (every thread gets it) */
__device__ __forceinline__ float
block_max_f(float v, float *red)
{
	int			lane = threadIdx.x & 31,
				w = threadIdx.x >> 5;

	v = warp_max(v);
	__syncthreads();
	if (lane == 0)
		red[w] = v;
	__syncthreads();
	v = lane < (int) (blockDim.x >> 5) ? red[lane] : -INFINITY;
	return warp_max(v);
}

/* block-wide sum of integers (int, unsigned long long): exact, every thread gets it */
template <typename T>
__device__ __forceinline__ T
block_sum_exact(T v, T *red)
{
	int			lane = threadIdx.x & 31,
				w = threadIdx.x >> 5;

#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	__syncthreads();
	if (lane == 0)
		red[w] = v;
	__syncthreads();
	v = lane < (int) (blockDim.x >> 5) ? red[lane] : 0;
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}

/*
 * Where a selection's counts and sums are combined.  The kernel of one block
 * per row (scope_block) has them once its threads have reduced; the wide
 * kernel (a cluster of blocks per row, below) adds the blocks' numbers through
 * distributed shared memory (scope_cluster).  Every combination is of
 * integers (counts, fixed-point weights) or a max, so it is exact in any order.
 *   sum_i / sum_u / max_pos  the value over the row, given the block's value
 *                            (every thread of the block passes the same)
 *   hist_acc                 where a pass accumulates its bucket counts / sums
 *   hist_merge               after a pass: the row's counts in sm->hist / hsum
 */
struct scope_block
{
	static constexpr bool warp_scan = false;	/* thread 0 picks a pass's bucket */
	__device__ int sum_i(int v)
	{
		return v;
	}
	__device__ uint64_t sum_u(uint64_t v)
	{
		return v;
	}
	__device__ float max_pos(float v)
	{
		return v;
	}
	__device__ void hist_acc(sample_smem *sm, unsigned **h, unsigned long long **hs)
	{
		*h = sm->hist;
		*hs = sm->hsum;
	}
	__device__ void hist_merge(sample_smem *sm)
	{
		__syncthreads();
	}
};

/*
 * The keys of the selections.  get(i, &key, &w) says whether id i takes part,
 * its ranking key and its fixed-point weight:
 *   key_scaled  scaled values over all ids (top-k)
 *   key_prob    positive probabilities with key >= lo, ranked (prob, lower id)
 */
struct key_scaled
{
	const float *p;
	__device__ bool get(int i, uint64_t *k, uint64_t *w) const
	{
		*k = kl_sample_key(p[i], i);
		*w = 0;
		return true;
	}
};

struct key_prob
{
	const float *p;
	uint64_t	lo;
	__device__ bool get(int i, uint64_t *k, uint64_t *w) const
	{
		float		v = p[i];

		if (!(v > 0.0f))
			return false;
		*k = kl_sample_key(v, i);
		*w = kl_sample_fix(v);
		return *k >= lo;
	}
	__device__ key_prob at(uint64_t l) const
	{
		key_prob	r = *this;

		r.lo = l;
		return r;
	}
};

/* the same candidates copied to shared memory (the fast path) */
struct key_list
{
	const uint64_t *k;
	const uint64_t *w;
	uint64_t	lo;
	__device__ bool get(int i, uint64_t *key, uint64_t *wt) const
	{
		*key = k[i];
		*wt = w[i];
		return *key >= lo;
	}
	__device__ key_list at(uint64_t l) const
	{
		key_list	r = *this;

		r.lo = l;
		return r;
	}
};

/* the probability a ranking key (kl_sample_key of a positive value) was made of */
__device__ __forceinline__ float
key_prob_of(uint64_t key)
{
	return __uint_as_float((uint32_t) (key >> 32) & 0x7fffffffu);
}

/*
 * The bucket choice of a descent pass (thread 0's walk in descend) by one
 * warp: walking from bucket 255 down, the first d >= 1 whose running total
 * (counts, or weights by_sum) with it reaches rem (>= rem, or > rem strict),
 * else 0; acc = the total above d.  Lane l holds buckets 255 - 8l .. 248 - 8l,
 * starts from the exact sum of the lanes before it, and the first lane to find
 * one decides: the same d and acc as the walk (integer sums).  Lane 0 writes
 * the pass's result as descend does.
 */
__device__ __noinline__ void
pick_bucket_warp(sample_smem *sm, bool by_sum, bool strict, uint64_t prefix, uint64_t mask, int shift)
{
	int			lane = threadIdx.x & 31,
				d = 0;
	uint64_t	rem = sm->rem,
				v[8],
				mine = 0,
				before,
				acc;
	unsigned	hit;

	for (int k = 0; k < 8; k++)
	{
		int			b = 255 - 8 * lane - k;

		v[k] = by_sum ? (uint64_t) sm->hsum[b] : (uint64_t) sm->hist[b];
		mine += v[k];
	}
	/* exclusive prefix over the lanes (inclusive scan minus mine) */
	before = mine;
#pragma unroll
	for (int o = 1; o < 32; o <<= 1)
	{
		uint64_t	y = __shfl_up_sync(0xffffffffu, before, o);

		if (lane >= o)
			before += y;
	}
	before -= mine;
	acc = before;
	for (int k = 0; k < 8; k++)
	{
		int			b = 255 - 8 * lane - k;

		if (b == 0 || (by_sum && strict ? acc + v[k] > rem : acc + v[k] >= rem))
		{
			d = b;
			break;
		}
		acc += v[k];
	}
	hit = __ballot_sync(0xffffffffu, d > 0 || lane == 31);
	{
		int			src = __ffs(hit) - 1;

		d = __shfl_sync(0xffffffffu, d, src);
		acc = __shfl_sync(0xffffffffu, acc, src);
	}
	if (lane == 0)
	{
		sm->rem = rem - acc;
		sm->prefix = prefix | ((uint64_t) d << shift);
		sm->mask = mask | ((uint64_t) 255 << shift);
		sm->done = by_sum ? sm->hist[d] == 1 : (uint64_t) sm->hist[d] == rem - acc;
		sm->single = by_sum && sm->hist[d] == 1;
	}
}

/*
 * MSB-first radix descent over the taking-part keys (all below 2^(top + 8)),
 * 8 bits a pass; each bucket of a pass counts its keys and, by_sum, adds
 * their weights (a warp's lanes of one bucket combine first: counts by
 * popcount, weights by three 21-bit reductions).
 *   by_sum false: the target-th largest key; returns a threshold t with
 *     exactly `target` keys >= t (the descent stops once a bucket is taken
 *     whole)
 *   by_sum true: the largest key X whose running weight (over keys >= X)
 *     reaches target (>= target, or > target when strict); returns X exactly
 * The caller guarantees such a key exists.
 */
template <typename KEY, typename SC>
__device__ uint64_t
descend(const KEY &kf, int V, int top, bool by_sum, uint64_t target, bool strict, sample_smem *sm, SC &sc)
{
	int			tid = threadIdx.x,
				lane = tid & 31;

	if (tid == 0)
	{
		sm->prefix = 0;
		sm->mask = 0;
		sm->rem = target;
		sm->done = 0;
		sm->single = 0;
		sm->found = 0;
	}
	__syncthreads();
	for (int shift = top; shift >= 0; shift -= 8)
	{
		uint64_t	prefix,
					mask;
		unsigned   *hist;
		unsigned long long *hsum;

		sc.hist_acc(sm, &hist, &hsum);
		for (int b = tid; b < 256; b += ST)
		{
			hist[b] = 0;
			hsum[b] = 0;
		}
		__syncthreads();
		prefix = sm->prefix;
		mask = sm->mask;
		for (int base = 0; base < V; base += ST)
		{
			int			i = base + tid,
						bucket = -1;
			uint64_t	key = 0,
						w = 0;
			unsigned	peers;

			if (i < V && kf.get(i, &key, &w) && (key & mask) == prefix)
				bucket = (int) ((key >> shift) & 255);
			else
				w = 0;
			if (!__any_sync(0xffffffffu, bucket >= 0))
				continue;		/* (later passes: most warps hold no key of the prefix) */
			peers = __match_any_sync(0xffffffffu, bucket);
			if (by_sum)
			{
				unsigned	s0 = __reduce_add_sync(peers, (unsigned) (w & 0x1fffff)),
							s1 = __reduce_add_sync(peers, (unsigned) ((w >> 21) & 0x1fffff)),
							s2 = __reduce_add_sync(peers, (unsigned) (w >> 42));

				w = (uint64_t) s0 + ((uint64_t) s1 << 21) + ((uint64_t) s2 << 42);
			}
			if (bucket >= 0 && lane == __ffs(peers) - 1)
			{
				atomicAdd(&hist[bucket], (unsigned) __popc(peers));
				if (by_sum)
					atomicAdd(&hsum[bucket], (unsigned long long) w);
			}
		}
		sc.hist_merge(sm);
		if constexpr (SC::warp_scan)
		{
			if (tid < 32)
				pick_bucket_warp(sm, by_sum, strict, prefix, mask, shift);
		}
		else if (tid == 0)
		{
			uint64_t	rem = sm->rem,
						acc = 0;
			int			d = 255;

			for (; d > 0; d--)
			{
				uint64_t	v = by_sum ? (uint64_t) sm->hsum[d] : (uint64_t) sm->hist[d];

				if (by_sum ? (strict ? acc + v > rem : acc + v >= rem) : acc + v >= rem)
					break;
				acc += v;
			}
			sm->rem = rem - acc;
			sm->prefix = prefix | ((uint64_t) d << shift);
			sm->mask = mask | ((uint64_t) 255 << shift);
			sm->done = by_sum ? sm->hist[d] == 1 : (uint64_t) sm->hist[d] == rem - acc;
			sm->single = by_sum && sm->hist[d] == 1;
		}
		__syncthreads();
		if (sm->done)
			break;
	}
	if (sm->single)
	{
		/* the one key of the chosen bucket (in one block of a cluster; 0 in the others) */
		uint64_t	prefix = sm->prefix,
					mask = sm->mask;

		for (int i = tid; i < V; i += ST)
		{
			uint64_t	key,
						w;

			if (kf.get(i, &key, &w) && (key & mask) == prefix)
				sm->found = key;
		}
		__syncthreads();
	}
	else if (tid == 0)
		sm->found = sm->prefix;
	__syncthreads();
	{
		uint64_t	r = sm->found;
		int			single = sm->single;

		__syncthreads();
		return single ? sc.sum_u(r) : r;
	}
}

/* count and fixed-point weight of the taking-part keys */
template <typename KEY, typename SC>
__device__ void
totals(const KEY &kf, int V, int *count, uint64_t *weight, sample_smem *sm, SC &sc)
{
	int			c = 0;
	uint64_t	w = 0;

	for (int i = threadIdx.x; i < V; i += ST)
	{
		uint64_t	key,
					wi;

		if (kf.get(i, &key, &wi))
		{
			c++;
			w += wi;
		}
	}
	*count = sc.sum_i(block_sum_exact<int>(c, sm->red_i));
	*weight = sc.sum_u(block_sum_exact<unsigned long long>(w, sm->red_u));
}

/*
 * Step 5a (draw_sorted's rule) over the candidates `all` (n elements to scan):
 * the head mass, the top-p prefix, the min-p cut, the draw.  n_pos counts every
 * positive candidate, n_cand every candidate.  With `bound` > 0 the elements
 * are only those of probability >= bound (the fast path): returns false, all
 * threads alike, when the rule needs anything below it.
 */
template <typename L, typename SC>
__device__ bool
ranked(const L &all, int n, int n_pos, int n_cand, int cnt, float bound, const kk_sample_row &p, sample_smem *sm,
	   SC &sc, int32_t *res)
{
	int			head = n_cand < KL_SAMPLE_HEAD ? n_cand : KL_SAMPLE_HEAD;
	uint64_t	target = kl_sample_fix_target(p.top_p);
	int			m = n_pos,
				keep,
				c;
	uint64_t	thr_m = 0,
				thr_keep,
				z,
				u,
				x,
				w;

	if (head < n_cand)
	{
		int			k1 = n_pos < head ? n_pos : head;
		uint64_t	t1,
					mass;

		if (k1 > cnt)
		{
			/*
			 * The head reaches below the bound, so its mass is unknown here; it
			 * cannot matter when the top-p prefix or the min-p cut ends inside
			 * the listed candidates (a prefix of the ranking, shorter than the
			 * head): m beyond the list makes the checks below give up otherwise.
			 */
			m = cnt + 1;
		}
		else
		{
			t1 = k1 < cnt ? descend(all, n, 56, false, (uint64_t) k1, false, sm, sc) : 0;
			totals(all.at(t1), n, &c, &mass, sm, sc);
			if (mass >= target)
			{
				m = k1;
				thr_m = t1;
			}
		}
	}
	keep = m;
	thr_keep = thr_m;
	if (p.top_p < 1.0f)
	{
		uint64_t	wm;

		/* (m beyond the list: the whole list, thr_m 0) */
		totals(all.at(thr_m), n, &c, &wm, sm, sc);
		if (wm >= target)
		{
			/* the shortest prefix whose mass reaches top_p ends at key x */
			x = descend(all.at(thr_m), n, 56, true, target, false, sm, sc);
			totals(all.at(x), n, &c, &w, sm, sc);
			keep = c;
			thr_keep = x;
		}
		else if (m > cnt)
			return false;		/* the prefix runs below the bound */
	}
	if (p.min_p > 0.0f)
	{
		/* rank 0 is the largest probability; those >= min_p times it are a prefix */
		float		top = 0.0f,
					fl;
		int			cc = 0;

		for (int i = threadIdx.x; i < n; i += ST)
		{
			uint64_t	key,
						wi;

			if (all.get(i, &key, &wi))
				top = fmaxf(top, key_prob_of(key));
		}
		top = sc.max_pos(block_max_f(top, sm->red_f));
		fl = KL_S_FMUL(p.min_p, top);
		if (fl < bound)
			return false;		/* the cut may lie below the bound */
		for (int i = threadIdx.x; i < n; i += ST)
		{
			uint64_t	key,
						wi;

			if (all.get(i, &key, &wi))
				cc += key_prob_of(key) >= fl;
		}
		cc = sc.sum_i(block_sum_exact<int>(cc, sm->red_i));
		if (cc < keep)
		{
			keep = cc;
			thr_keep = cc < cnt ? descend(all, n, 56, false, (uint64_t) cc, false, sm, sc) : 0;
		}
	}
	if (keep > cnt)
		return false;
	totals(all.at(thr_keep), n, &c, &z, sm, sc);
	u = kl_sample_fix_point(p.u0, z);
	x = descend(all.at(thr_keep), n, 56, true, u, true, sm, sc);
	*res = kl_sample_key_id(x);
	return true;
}

#define FAST_MAX 2048			/* candidates the fast path holds in shared memory */

/* 1. the repetition penalty (each id once), the allowed-token mask */
__device__ __forceinline__ void
sample_penalize_mask(float *l, int V, const kk_sample_row &p, const int32_t *recent, const uint32_t *allowed, int tid)
{
	if (p.penalty != 1.0f)
		for (int j = tid; j < p.n_recent; j += ST)
		{
			int32_t		id = recent[p.recent_off + j];

			if (id >= 0 && id < V)
				l[id] = kl_sample_penalize(l[id], p.penalty);
		}
	__syncthreads();
	if (allowed)
		for (int i = tid; i < V; i += ST)
			if (!kl_sample_allowed(allowed, i))
				l[i] = -INFINITY;
	__syncthreads();
}

/* 2. greedy: the first largest (a NaN at id 0 wins, as the plain scan) */
__device__ __forceinline__ void
sample_greedy(const float *l, int V, sample_smem *sm, int32_t *out, int tid)
{
	float		bv = -INFINITY;
	int			bi = -1;

	for (int i = tid; i < V; i += ST)
	{
		float		v = l[i];

		if (v == v && (bi < 0 || v > bv))
		{
			bv = v;
			bi = i;
		}
	}
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
	{
		float		ov = __shfl_xor_sync(0xffffffffu, bv, o);
		int			oi = __shfl_xor_sync(0xffffffffu, bi, o);

		if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi)))
		{
			bv = ov;
			bi = oi;
		}
	}
	if ((tid & 31) == 0)
	{
		sm->red_f[tid >> 5] = bv;
		sm->red_i[tid >> 5] = bi;
	}
	__syncthreads();
	if (tid == 0)
	{
		for (int w = 0; w < ST / 32; w++)
		{
			float		ov = sm->red_f[w];
			int			oi = sm->red_i[w];

			if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi)))
			{
				bv = ov;
				bi = oi;
			}
		}
		out[blockIdx.x] = (l[0] != l[0] || bi < 0) ? 0 : bi;
	}
}

/*
 * 3. the scaled values into pr, their max into sm->mx; false when nothing is
 * possible (every value -inf), the first allowed token then written
 */
__device__ __forceinline__ bool
sample_scale(const float *l, float *pr, int V, const kk_sample_row &p, const uint32_t *allowed, sample_smem *sm,
			 int32_t *out, int tid)
{
	float		m = -INFINITY;

	for (int i = tid; i < V; i += ST)
	{
		float		v = kl_sample_scaled(l[i], p.temperature);

		pr[i] = v;
		m = v > m ? v : m;
	}
	m = block_max_f(m, sm->red_f);
	if (m == -INFINITY)
	{
		/* nothing is possible: the first allowed token */
		if (tid == 0)
		{
			int			b = 0;

			while (b < V - 1 && !kl_sample_allowed(allowed, b))
				b++;
			out[blockIdx.x] = b;
		}
		return false;
	}
	if (tid == 0)
		sm->mx = m;
	__syncthreads();
	return true;
}

/* 4. e = exp(p - max) for the candidates, z by chunks, prob = e / z */
__device__ __forceinline__ void
sample_softmax(float *pr, int V, bool topk, uint64_t kth, sample_smem *sm, int tid)
{
	double		acc = 0;
	float		mx = sm->mx;

	for (int i = tid; i < V; i += ST)
	{
		float		v = pr[i],
					e = 0.0f;

		if (!topk || kl_sample_key(v, i) >= kth)
			e = kl_sample_exp(KL_S_FSUB(v, mx));
		pr[i] = e;
		acc = KL_S_DADD(acc, (double) e);
	}
	sm->part[tid] = acc;
	__syncthreads();
	if (tid == 0)
	{
		double		z = 0;

		for (int t = 0; t < ST; t++)
			z = KL_S_DADD(z, sm->part[t]);
		sm->z = z;
	}
	__syncthreads();
	for (int i = tid; i < V; i += ST)
		if (pr[i] > 0.0f)
			pr[i] = KL_S_D2F(KL_S_DDIV((double) pr[i], sm->z));
	__syncthreads();
}

/*
 * 5a, the fast path's bound: positive probabilities counted by float
 * exponent; *fexp = the lowest exponent such that the candidates at it and
 * above are at most FAST_MAX (256: none), *fcnt = 0.  Returns the number of
 * positive probabilities.
 */
__device__ __forceinline__ int
fast_bound(const float *pr, int V, sample_smem *sm, int *fexp, int *fcnt, int tid)
{
	int			n_pos = 0,
				lane = tid & 31;

	for (int b = tid; b < 256; b += ST)
		sm->hist[b] = 0;
	__syncthreads();
	for (int base = 0; base < V; base += ST)
	{
		int			i = base + tid,
					bucket = -1;
		unsigned	peers;

		if (i < V && pr[i] > 0.0f)
			bucket = (int) (__float_as_uint(pr[i]) >> 23);
		if (!__any_sync(0xffffffffu, bucket >= 0))
			continue;
		peers = __match_any_sync(0xffffffffu, bucket);
		if (bucket >= 0 && lane == __ffs(peers) - 1)
			atomicAdd(&sm->hist[bucket], (unsigned) __popc(peers));
	}
	__syncthreads();
	if (tid == 0)
	{
		int			cum = 0,
					e = 256;

		for (int b = 255; b >= 0; b--)
		{
			if (cum + (int) sm->hist[b] > FAST_MAX)
				break;
			cum += sm->hist[b];
			if (sm->hist[b])
				e = b;
		}
		*fexp = e;
		*fcnt = 0;
		for (int b = 0; b < 256; b++)
			n_pos += sm->hist[b];
		sm->done = n_pos;
	}
	__syncthreads();
	return sm->done;
}

/*
 * 5a. ranked candidates of positive probability (draw_sorted).  Fast
 * path first: the candidates from the largest probability down to a
 * power-of-two bound, at most FAST_MAX of them, copied to shared memory
 * (for a peaked distribution the whole rule lives there); else every
 * descent scans the vocabulary.
 */
__device__ __forceinline__ void
sample_ranked_draw(float *pr, int V, bool topk, const kk_sample_row &p, sample_smem *sm, int32_t *out, int tid)
{
	__shared__ uint64_t fk[FAST_MAX],
				fw[FAST_MAX];
	__shared__ int	fcnt,
				fexp;
	int			n_cand = topk ? p.top_k : V;
	int			n_pos;
	int32_t		res = 0;
	bool		ok;
	scope_block sc;

	n_pos = fast_bound(pr, V, sm, &fexp, &fcnt, tid);
	ok = false;
	if (fexp < 256)
	{
		int			e = fexp;

		for (int i = tid; i < V; i += ST)
		{
			float		v = pr[i];

			if (v > 0.0f && (int) (__float_as_uint(v) >> 23) >= e)
			{
				int			at = atomicAdd(&fcnt, 1);

				if (at < FAST_MAX)
				{
					fk[at] = kl_sample_key(v, i);
					fw[at] = kl_sample_fix(v);
				}
			}
		}
		__syncthreads();
		{
			key_list	lst = {fk, fw, 0};
			int			cnt = fcnt < FAST_MAX ? fcnt : FAST_MAX;

			ok = ranked(lst, cnt, n_pos, n_cand, cnt, __uint_as_float((uint32_t) e << 23), p, sm, sc, &res);
		}
	}
	if (!ok)
	{
		key_prob	all = {pr, 0};

		ranked(all, V, n_pos, n_cand, n_pos, 0.0f, p, sm, sc, &res);
	}
	if (tid == 0)
		out[blockIdx.x] = res;
}

/*
 * 5b. the draw over the candidates in id order: thread t sums the weights
 * of ids [t cs, (t + 1) cs), a block scan gives each range its start, and
 * the thread whose range holds the point finds the id (all exact integers)
 */
__device__ __forceinline__ void
sample_draw_by_id(const float *pr, int V, const kk_sample_row &p, sample_smem *sm, int32_t *out, int tid)
{
	unsigned long long *scan = (unsigned long long *) sm->part;	/* (the chunk sums are done) */
	int			cs = (V + ST - 1) / ST,
				i0 = tid * cs,
				i1 = i0 + cs < V ? i0 + cs : V;
	uint64_t	mine = 0,
				before,
				z,
				u;

	for (int i = i0; i < i1; i++)
		mine += kl_sample_fix(pr[i]);
	scan[tid] = mine;
	__syncthreads();
	for (int o = 1; o < ST; o <<= 1)
	{
		unsigned long long v = tid >= o ? scan[tid - o] : 0;

		__syncthreads();
		scan[tid] += v;
		__syncthreads();
	}
	z = scan[ST - 1];
	before = scan[tid] - mine;
	u = kl_sample_fix_point(p.u0, z);
	if (before <= u && u < before + mine)
	{
		uint64_t	acc = before;

		for (int i = i0; i < i1; i++)
		{
			acc += kl_sample_fix(pr[i]);
			if (acc > u)
			{
				out[blockIdx.x] = i;
				break;
			}
		}
	}
}

/* One block per row: the stages above, in order. */
__global__ void __launch_bounds__(ST)
sample_kernel(float *logits, int V, const kk_sample_row *P, const int32_t *recent, const uint32_t *masks,
			  float *scratch, int32_t *out)
{
	__shared__ sample_smem sm;
	const kk_sample_row p = P[blockIdx.x];
	float	   *l = logits + (size_t) p.row * V;
	float	   *pr = scratch + (size_t) blockIdx.x * V;
	const uint32_t *allowed = p.mask_off >= 0 ? masks + p.mask_off : NULL;
	int			tid = threadIdx.x;
	bool		topk = p.top_k > 0 && p.top_k < V;
	uint64_t	kth = 0;

	sample_penalize_mask(l, V, p, recent, allowed, tid);
	if (p.temperature == 0.0f)
	{
		sample_greedy(l, V, &sm, out, tid);
		return;
	}
	if (!sample_scale(l, pr, V, p, allowed, &sm, out, tid))
		return;
	if (topk)
	{
		key_scaled	kf = {pr};
		scope_block sc;

		kth = descend(kf, V, 56, false, (uint64_t) p.top_k, false, &sm, sc);
	}
	sample_softmax(pr, V, topk, kth, &sm, tid);
	if (p.top_p < 1.0f || p.min_p > 0.0f)
		sample_ranked_draw(pr, V, topk, p, &sm, out, tid);
	else
		sample_draw_by_id(pr, V, p, &sm, out, tid);
}

/* ================================================================== the wide kernel */

/*
 * sample_wide_kernel (KL_CUDA_SAMPLE_WIDE, Hopper and later): the same rule
 * with a cluster of C blocks per row (C = 16 for up to 8 rows where the GPU
 * runs clusters that large, else 8), so every pass over the vocabulary is
 * spread over C SMs and reads shared memory instead of global memory.
 *
 * Block r of a cluster owns the summation chunks [r CH, (r + 1) CH), CH =
 * 1024 / C, that is the ids t + 1024 j for those t, held in its shared memory
 * at local index j CH + (t - r CH) (row of chunks j, column t - r CH).  So the
 * softmax sum keeps its order: thread t of block r folds its chunk r CH + t in
 * id order from shared memory, and every block folds the 1024 chunk sums in
 * chunk order (gathered through distributed shared memory) to the same z.
 * Every other combination across the cluster is of integers or a max
 * (scope_cluster), and the selections are descend / totals / ranked of the
 * one-block kernel over the cluster's union of elements, so the chosen token is
 * the one-block kernel's, which is kl_sample_draw's.  The plain draw (no top-p,
 * no min-p) is a weight descent over keys that rank ids in ascending order.
 * Control flow depends only on values every block has combined alike, so all
 * blocks of a cluster meet the same barriers.
 */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KL_SAMPLE_CLUSTERS 1
#endif

#define WIDE_SMEM_MAX (160 * 1024)	/* dynamic shared memory for the row's part */

/* a cluster block's shared state beside sample_smem */
struct wide_smem
{
	unsigned	lh[2][256];		/* this block's histogram of a pass (by round parity) */
	unsigned long long lhs[2][256];
	unsigned long long xch[2],	/* this block's value of an exchange */
				bc[2];			/* the combined value */
	double		csum[ST];		/* this block's chunk sums (CH of them) */
};

/* the id of local index li in block r (CH = 2^lch chunks per block) */
struct wide_map
{
	int			r,
				lch,
				V;
	__device__ int id(int li) const
	{
		return ((li >> lch) << 10) + (r << lch) + (li & ((1 << lch) - 1));
	}
	/* the bits of 0xffffffff - id that are 1 for every id < V (those above V - 1's highest bit) */
	__device__ uint64_t id_ones() const
	{
		return V > 1 ? (uint64_t) (0xffffffffu << (32 - __clz(V - 1))) : 0xffffffffu;
	}
};

/* scaled values of the block's ids (top-k) */
struct key_wscaled
{
	const float *p;
	wide_map	m;
	__device__ bool get(int li, uint64_t *k, uint64_t *w) const
	{
		int			id = m.id(li);

		if (id >= m.V)
			return false;
		*k = kl_sample_key(p[li], id);
		*w = 0;
		return true;
	}
};

/* positive probabilities with key >= lo, ranked (prob, lower id) */
struct key_wprob
{
	const float *p;
	wide_map	m;
	uint64_t	lo;
	__device__ bool get(int li, uint64_t *k, uint64_t *w) const
	{
		int			id = m.id(li);
		float		v;

		if (id >= m.V)
			return false;
		v = p[li];
		if (!(v > 0.0f))
			return false;
		*k = kl_sample_key(v, id);
		*w = kl_sample_fix(v);
		return *k >= lo;
	}
	__device__ key_wprob at(uint64_t l) const
	{
		key_wprob	r = *this;

		r.lo = l;
		return r;
	}
};

/* the plain draw's order: ids ascending as keys descending, weight fix(prob) > 0 */
struct key_wid
{
	const float *p;
	wide_map	m;
	__device__ bool get(int li, uint64_t *k, uint64_t *w) const
	{
		int			id = m.id(li);

		if (id >= m.V)
			return false;
		*w = kl_sample_fix(p[li]);
		*k = (uint64_t) (0xffffffffu - (uint32_t) id);
		return *w > 0;
	}
};

/* block-wide max of a 64-bit number (every thread gets it) */
__device__ __forceinline__ uint64_t
block_max_u64(uint64_t v, unsigned long long *red)
{
	int			lane = threadIdx.x & 31,
				w = threadIdx.x >> 5;

#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
	{
		uint64_t	y = __shfl_xor_sync(0xffffffffu, v, o);

		v = y > v ? y : v;
	}
	__syncthreads();
	if (lane == 0)
		red[w] = v;
	__syncthreads();
	v = lane < (int) (blockDim.x >> 5) ? red[lane] : 0;
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
	{
		uint64_t	y = __shfl_xor_sync(0xffffffffu, v, o);

		v = y > v ? y : v;
	}
	return v;
}

#ifdef KL_SAMPLE_CLUSTERS
#include <cooperative_groups.h>
namespace cg = cooperative_groups;

/*
 * Combining over the cluster.  Each exchange is one cluster barrier; its
 * buffers alternate by the parity of the exchange's number, so a buffer is
 * written again only after a later barrier, which every block reaches after
 * reading it: one barrier per exchange suffices.
 */
struct scope_cluster
{
	static constexpr bool warp_scan = true;	/* a warp picks a pass's bucket */
	wide_smem  *w;
	int			C;
	int			round;

	__device__ uint64_t combine(uint64_t v, bool take_max)
	{
		cg::cluster_group cl = cg::this_cluster();
		int			par = round & 1;

		round++;
		if (threadIdx.x == 0)
			w->xch[par] = v;
		cl.sync();
		if (threadIdx.x < 32)
		{
			unsigned long long x = (int) threadIdx.x < C ? *cl.map_shared_rank(&w->xch[par], threadIdx.x) : 0;

#pragma unroll
			for (int o = 16; o > 0; o >>= 1)
			{
				unsigned long long y = __shfl_xor_sync(0xffffffffu, x, o);

				x = take_max ? (y > x ? y : x) : x + y;
			}
			if (threadIdx.x == 0)
				w->bc[par] = x;
		}
		__syncthreads();
		return w->bc[par];
	}
	__device__ int sum_i(int v)
	{
		return (int) combine((uint64_t) (uint32_t) v, false);	/* counts: >= 0 */
	}
	__device__ uint64_t sum_u(uint64_t v)
	{
		return combine(v, false);
	}
	__device__ float max_pos(float v)
	{
		return __uint_as_float((uint32_t) combine(__float_as_uint(v), true));	/* v >= 0 */
	}
	__device__ uint64_t max_u(uint64_t v)
	{
		return combine(v, true);
	}
	__device__ void hist_acc(sample_smem *sm, unsigned **h, unsigned long long **hs)
	{
		*h = w->lh[round & 1];
		*hs = w->lhs[round & 1];
	}
	__device__ void hist_merge(sample_smem *sm)
	{
		cg::cluster_group cl = cg::this_cluster();
		int			par = round & 1;

		round++;
		cl.sync();
		for (int b = threadIdx.x; b < 256; b += ST)
		{
			unsigned	h = 0;
			unsigned long long hs = 0;

#pragma unroll 8
			for (int r = 0; r < C; r++)
			{
				h += cl.map_shared_rank(w->lh[par], r)[b];
				hs += cl.map_shared_rank(w->lhs[par], r)[b];
			}
			sm->hist[b] = h;
			sm->hsum[b] = hs;
		}
		__syncthreads();
	}
};

/* float from kl_sample_ord */
__device__ __forceinline__ float
ord_inv(uint32_t u)
{
	return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

/* 1. the block's logits into shared memory (absent ids -inf), penalty, mask */
__device__ __forceinline__ void
wide_load(float *wv, const float *l, int n, const wide_map &m, const kk_sample_row &p, const int32_t *recent,
		  const uint32_t *allowed, int tid)
{
	int			CH = 1 << m.lch;

	for (int li = tid; li < n; li += ST)
	{
		int			id = m.id(li);

		wv[li] = id < m.V ? l[id] : -INFINITY;
	}
	__syncthreads();
	if (p.penalty != 1.0f)
		for (int j = tid; j < p.n_recent; j += ST)
		{
			int32_t		id = recent[p.recent_off + j];

			if (id >= 0 && id < m.V && ((id & (ST - 1)) >> m.lch) == m.r)
			{
				int			li = ((id >> 10) << m.lch) + (id & (CH - 1));

				wv[li] = kl_sample_penalize(wv[li], p.penalty);
			}
		}
	__syncthreads();
	if (allowed)
		for (int li = tid; li < n; li += ST)
		{
			int			id = m.id(li);

			if (id < m.V && !kl_sample_allowed(allowed, id))
				wv[li] = -INFINITY;
		}
	__syncthreads();
}

/* 5a. e for the candidates (in wv), chunk sums in id order, z over the chunks in order: returns z */
__device__ __forceinline__ double
wide_exp_sum(float *wv, int n, int nj, const wide_map &m, bool topk, uint64_t kth, float mx, sample_smem *sm,
			 wide_smem *ws, int tid)
{
	cg::cluster_group cl = cg::this_cluster();
	int			CH = 1 << m.lch;
	double		z;

	for (int li = tid; li < n; li += ST)
	{
		int			id = m.id(li);
		float		v = wv[li],
					e = 0.0f;

		if (id < m.V && (!topk || kl_sample_key(v, id) >= kth))
			e = kl_sample_exp(KL_S_FSUB(v, mx));
		wv[li] = e;
	}
	__syncthreads();
	if (tid < CH)
	{
		/* chunk r CH + tid: its ids in id order (absent ones hold 0: adding 0 changes nothing) */
		double		a = 0;

		for (int j = 0; j < nj; j++)
			a = KL_S_DADD(a, (double) wv[j * CH + tid]);
		ws->csum[tid] = a;
	}
	cl.sync();
	sm->part[tid] = *cl.map_shared_rank(&ws->csum[tid & (CH - 1)], tid >> m.lch);
	__syncthreads();
	if (tid == 0)
	{
		z = 0;
		for (int t = 0; t < ST; t++)
			z = KL_S_DADD(z, sm->part[t]);
		sm->z = z;
	}
	__syncthreads();
	return sm->z;
}

/* 5. the softmax: e for the candidates, z, prob = e / z */
__device__ __forceinline__ void
wide_softmax(float *wv, int n, int nj, const wide_map &m, bool topk, uint64_t kth, float mx, sample_smem *sm,
			 wide_smem *ws, int tid)
{
	double		z = wide_exp_sum(wv, n, nj, m, topk, kth, mx, sm, ws, tid);

	for (int li = tid; li < n; li += ST)
		if (wv[li] > 0.0f)
			wv[li] = KL_S_D2F(KL_S_DDIV((double) wv[li], z));
	__syncthreads();
}

/* nothing is possible (every value -inf): the first allowed token */
__device__ __forceinline__ int
first_allowed(const uint32_t *allowed, int V)
{
	int			b = 0;

	while (b < V - 1 && !kl_sample_allowed(allowed, b))
		b++;
	return b;
}

/* 2. greedy over the cluster: the largest (value, lower id); -0 as +0 (equal values); NaN never, but at id 0 it wins */
__device__ __forceinline__ void
wide_greedy(const float *wv, int n, const wide_map &m, sample_smem *sm, scope_cluster &sc, bool lead, int32_t *out)
{
	uint64_t	best = 0;

	for (int li = threadIdx.x; li < n; li += ST)
	{
		int			id = m.id(li);
		float		v = wv[li];

		if (id < m.V && v == v)
		{
			uint64_t	k = kl_sample_key(v == 0.0f ? 0.0f : v, id);

			best = k > best ? k : best;
		}
	}
	best = sc.max_u(block_max_u64(best, sm->red_u));
	if (lead)
		*out = (wv[0] != wv[0] || best == 0) ? 0 : kl_sample_key_id(best);
}

/* one row on its cluster (block r of C): the one-block kernel's stages with cluster-wide combining */
__device__ __forceinline__ void
wide_row(float *wv, const float *logits, int V, const kk_sample_row &p, const int32_t *recent, const uint32_t *masks,
		 int32_t *out, int row, int r, int C, sample_smem *sm, wide_smem *ws)
{
	const float *l = logits + (size_t) p.row * V;
	const uint32_t *allowed = p.mask_off >= 0 ? masks + p.mask_off : NULL;
	int			tid = threadIdx.x,
				lch = __ffs(ST / C) - 1,
				nj = (V + ST - 1) / ST,
				n = nj << lch;
	wide_map	m = {r, lch, V};
	scope_cluster sc = {ws, C, 0};
	bool		topk = p.top_k > 0 && p.top_k < V,
				lead = r == 0 && tid == 0;
	uint64_t	kth = 0;
	float		mx = -INFINITY;

	wide_load(wv, l, n, m, p, recent, allowed, tid);
	if (p.temperature == 0.0f)
	{
		wide_greedy(wv, n, m, sm, sc, lead, out + row);
		return;
	}
	for (int li = tid; li < n; li += ST)
	{
		float		v = kl_sample_scaled(wv[li], p.temperature);

		wv[li] = v;
		mx = v > mx ? v : mx;
	}
	mx = block_max_f(mx, sm->red_f);
	mx = ord_inv((uint32_t) sc.max_u(kl_sample_ord(mx)));
	if (mx == -INFINITY)
	{
		if (lead)
			out[row] = first_allowed(allowed, V);
		return;
	}
	if (topk)
	{
		key_wscaled kf = {wv, m};

		kth = descend(kf, n, 56, false, (uint64_t) p.top_k, false, sm, sc);
	}
	wide_softmax(wv, n, nj, m, topk, kth, mx, sm, ws, tid);
	if (p.top_p < 1.0f || p.min_p > 0.0f)
	{
		key_wprob	all = {wv, m, 0};
		int			n_pos = 0;
		int32_t		res = 0;

		for (int li = tid; li < n; li += ST)
			n_pos += wv[li] > 0.0f;
		n_pos = sc.sum_i(block_sum_exact<int>(n_pos, sm->red_i));
		ranked(all, n, n_pos, topk ? p.top_k : V, n_pos, 0.0f, p, sm, sc, &res);
		if (lead)
			out[row] = res;
	}
	else
	{
		/* the draw over the candidates in id order */
		key_wid		kf = {wv, m};
		int			c;
		uint64_t	z,
					x;

		totals(kf, n, &c, &z, sm, sc);
		x = descend(kf, n, 24, true, kl_sample_fix_point(p.u0, z), true, sm, sc);
		if (lead)
			out[row] = kl_sample_key_id(x);
	}
}

/* ================================================================== the fast wide kernel */

/*
 * sample_fast_kernel (KL_CUDA_SAMPLE_WIDE=2): the wide kernel's layout and
 * stages, with fewer passes over the row and fewer cluster barriers, for the
 * same choices.  What it does differently, and why each keeps the choice:
 *   - several scalars are combined in one cluster exchange (fast_reduce): they
 *     are integers or maxima, exact in any grouping;
 *   - the softmax's division pass also counts the positive probabilities, adds
 *     their fixed-point weights and takes their largest and smallest, so no
 *     later pass is needed for them (the same integers the totals passes made);
 *   - a descent (descend_fast) also returns the count and the weight of the
 *     keys at and above its result: the sums of the buckets it passed over plus
 *     its last bucket's (integers: exact), so no totals pass follows it;
 *   - a descent looks only at bits its keys do not all share (those above the
 *     highest bit in which a lower and an upper bound of the keys differ, and
 *     the high bits of 0xffffffff - id, 1 for every id < V): a pass over them
 *     would find one bucket holding every key and choose it; the flat rows of
 *     a random model skip 2-3 passes a descent;
 *   - the top-p descent stops once the cut's probability is known: the keys
 *     left in its bucket weigh the same, so the count and weight it needs are
 *     one integer division away (pick_fast);
 *   - top-p never evaluates draw_sorted's head rule: it cannot change the kept
 *     prefix when top_p < 1 (fast_ranked says why); min-p evaluates it only when
 *     the min-p cut lies beyond the head;
 *   - the top-p cut is needed only as the kept weight Z, not as a key: no search
 *     pass; the draw's descent runs over all positive keys (the first key whose
 *     running weight exceeds U < Z lies in the kept prefix), so its first pass
 *     is the top-p descent's, kept in shared memory;
 *   - a thread adds up its consecutive keys of one bucket before any atomic
 *     (integers), so a pass whose keys crowd into few buckets makes few atomics;
 *     a pass's histograms are merged over the cluster by all the block's threads.
 * The greedy path is the wide kernel's (wide_greedy).
 */

/* a fast block's shared state beside sample_smem and wide_smem */
struct fast_smem
{
	unsigned long long red[4][32];	/* per-warp values of a reduction */
	unsigned long long xch[2][4],	/* this block's values of an exchange (by round parity) */
				bc[2][4];		/* the combined values */
	unsigned	mh[4][256];		/* a merge's partial counts / weights (4 groups of ranks) */
	unsigned long long mhs[4][256];
	unsigned	c_hist[256];	/* the first pass over all positive keys, kept for later descents */
	unsigned long long c_hsum[256];
	uint64_t	above_c,		/* count / weight of the keys above the chosen buckets */
				above_w,
				last_c,			/* count / weight of the last chosen bucket */
				last_w;
};

/* a warp's sum (or max) of a 64-bit number, every lane gets it */
__device__ __forceinline__ uint64_t
warp_u64(uint64_t v, bool take_max)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
	{
		uint64_t	y = __shfl_xor_sync(0xffffffffu, v, o);

		v = take_max ? (y > v ? y : v) : v + y;
	}
	return v;
}

/*
 * v[0 .. nv) over the cluster, in place: the sum, or the max where bit j of
 * maxes is set (values >= 0: 0 is the identity).  Every thread passes its
 * own values and gets the cluster's: one block barrier, one cluster barrier
 * (buffers by round parity, as scope_cluster::combine), one block barrier.
 */
__device__ void
fast_reduce(scope_cluster &sc, fast_smem *fs, uint64_t *v, int nv, unsigned maxes)
{
	cg::cluster_group cl = cg::this_cluster();
	int			lane = threadIdx.x & 31,
				w = threadIdx.x >> 5,
				par = sc.round & 1;

	sc.round++;
	for (int j = 0; j < nv; j++)
	{
		uint64_t	x = warp_u64(v[j], (maxes >> j) & 1);

		if (lane == 0)
			fs->red[j][w] = x;
	}
	__syncthreads();
	if (w == 0)
		for (int j = 0; j < nv; j++)
		{
			uint64_t	x = warp_u64(fs->red[j][lane], (maxes >> j) & 1);

			if (lane == 0)
				fs->xch[par][j] = x;
		}
	cl.sync();
	if (w == 0)
		for (int j = 0; j < nv; j++)
		{
			uint64_t	x = lane < sc.C ? *cl.map_shared_rank(&fs->xch[par][j], lane) : 0;

			x = warp_u64(x, (maxes >> j) & 1);
			if (lane == 0)
				fs->bc[par][j] = x;
		}
	__syncthreads();
	for (int j = 0; j < nv; j++)
		v[j] = fs->bc[par][j];
}

/*
 * The keys of the fast descents: key(li, &k) says whether local index li takes
 * part and its ranking key; weight(li) its fixed-point weight (asked only of
 * keys that take part in a pass, so passes over few keys convert few weights);
 * fixed_ones() the bits that are 1 in every key (ids are below V: the high
 * bits of 0xffffffff - id), which no pass needs to look at.
 *   fkey_prob    positive probabilities, ranked (prob, lower id)
 *   fkey_scaled  scaled values of all ids (top-k; no weights)
 *   fkey_id      ids of positive weight, ascending as keys descending (the plain draw)
 */
struct fkey_prob
{
	const float *p;
	wide_map	m;
	static constexpr bool weights = true;
	__device__ bool key(int li, uint64_t *k) const
	{
		int			id = m.id(li);
		float		v = p[li];

		if (id >= m.V || !(v > 0.0f))
			return false;
		*k = kl_sample_key(v, id);
		return true;
	}
	__device__ uint64_t weight(int li) const
	{
		return kl_sample_fix(p[li]);
	}
	__device__ uint64_t fixed_ones() const
	{
		return m.id_ones();
	}
};

struct fkey_scaled
{
	const float *p;
	wide_map	m;
	static constexpr bool weights = false;
	__device__ bool key(int li, uint64_t *k) const
	{
		int			id = m.id(li);

		if (id >= m.V)
			return false;
		*k = kl_sample_key(p[li], id);
		return true;
	}
	__device__ uint64_t weight(int li) const
	{
		return 0;
	}
	__device__ uint64_t fixed_ones() const
	{
		return m.id_ones();
	}
};

struct fkey_id
{
	const float *p;
	wide_map	m;
	static constexpr bool weights = true;
	__device__ bool key(int li, uint64_t *k) const
	{
		int			id = m.id(li);

		if (id >= m.V || kl_sample_fix(p[li]) == 0)
			return false;
		*k = (uint64_t) (0xffffffffu - (uint32_t) id);
		return true;
	}
	__device__ uint64_t weight(int li) const
	{
		return kl_sample_fix(p[li]);
	}
	__device__ uint64_t fixed_ones() const
	{
		return m.id_ones();
	}
};

/*
 * A warp adds its lanes' runs to the block's histogram: lane l's run of c
 * keys of weight w in bucket fb (-1: none).  Lanes of one bucket add theirs
 * first (the count by one reduction, the weight by three of 21 bits each: a
 * bucket's weight is below 2^64, as the whole row's), one atomic each after.
 */
template <bool WTS>
__device__ __forceinline__ void
fast_flush(int fb, unsigned c, uint64_t w, unsigned *h, unsigned long long *hs)
{
	unsigned	peers;

	if (!__any_sync(0xffffffffu, fb >= 0))
		return;
	peers = __match_any_sync(0xffffffffu, fb);
	c = __reduce_add_sync(peers, c);
	if (WTS)
	{
		unsigned	s0 = __reduce_add_sync(peers, (unsigned) (w & 0x1fffff)),
					s1 = __reduce_add_sync(peers, (unsigned) ((w >> 21) & 0x1fffff)),
					s2 = __reduce_add_sync(peers, (unsigned) (w >> 42));

		w = (uint64_t) s0 + ((uint64_t) s1 << 21) + ((uint64_t) s2 << 42);
	}
	if (fb >= 0 && (int) (threadIdx.x & 31) == __ffs(peers) - 1)
	{
		atomicAdd(&h[fb], c);
		if (WTS)
			atomicAdd(&hs[fb], (unsigned long long) w);
	}
}

/*
 * One descent pass over the block's part: the keys with (key & mask) ==
 * prefix counted (and weighed) by bucket (key >> shift) & 255 into h / hs.
 * A thread keeps a run of its keys of one bucket and adds it when a key of
 * another bucket comes (or at the end): every lane runs the same iterations,
 * so the warp-wide flush is reached by all lanes.
 */
template <typename KEY>
__device__ __noinline__ void
fast_pass(const KEY &kf, int n, uint64_t prefix, uint64_t mask, int shift, unsigned *h, unsigned long long *hs)
{
	int			tid = threadIdx.x,
				cb = -1;
	unsigned	cc = 0;
	uint64_t	cw = 0;

	for (int b = tid; b < 256; b += ST)
	{
		h[b] = 0;
		hs[b] = 0;
	}
	__syncthreads();
	for (int base = 0; base < n; base += ST)
	{
		int			li = base + tid,
					b = -1;
		uint64_t	key;
		bool		other;

		if (li < n && kf.key(li, &key) && (key & mask) == prefix)
			b = (int) ((key >> shift) & 255);
		other = b >= 0 && cb >= 0 && b != cb;
		if (__any_sync(0xffffffffu, other))
			fast_flush<KEY::weights>(other ? cb : -1, cc, cw, h, hs);
		if (b >= 0)
		{
			if (b != cb)
			{
				cb = b;
				cc = 0;
				cw = 0;
			}
			cc++;
			if (KEY::weights)
				cw += kf.weight(li);
		}
	}
	fast_flush<KEY::weights>(cb, cc, cw, h, hs);
}

/*
 * After a pass: the cluster's histogram in sm->hist / hsum.  Thread t adds
 * bucket t % 256 of the ranks t / 256, + 4, + 8, ... (integers), then 256
 * threads add the four groups.
 */
__device__ void
fast_merge(scope_cluster &sc, fast_smem *fs, sample_smem *sm)
{
	cg::cluster_group cl = cg::this_cluster();
	int			par = sc.round & 1,
				b = threadIdx.x & 255,
				q = threadIdx.x >> 8;
	unsigned	h = 0;
	unsigned long long hs = 0;

	sc.round++;
	cl.sync();
	for (int r = q; r < sc.C; r += ST / 256)
	{
		h += cl.map_shared_rank(sc.w->lh[par], r)[b];
		hs += cl.map_shared_rank(sc.w->lhs[par], r)[b];
	}
	fs->mh[q][b] = h;
	fs->mhs[q][b] = hs;
	__syncthreads();
	if (threadIdx.x < 256)
	{
		sm->hist[b] = fs->mh[0][b] + fs->mh[1][b] + fs->mh[2][b] + fs->mh[3][b];
		sm->hsum[b] = fs->mhs[0][b] + fs->mhs[1][b] + fs->mhs[2][b] + fs->mhs[3][b];
	}
	__syncthreads();
}

static_assert(ST / 256 == 4, "fast_merge: four groups of ranks");

/*
 * A pass's bucket choice by one warp, as pick_bucket_warp (the first d from
 * 255 down whose running total, counts or weights by_sum, reaches rem; else
 * 0), keeping both running totals: the count and the weight of the buckets
 * above d are added to fs->above_c / above_w, d's own to fs->last_c / last_w.
 */
__device__ __noinline__ void
pick_fast(sample_smem *sm, fast_smem *fs, bool by_sum, bool strict, bool tie_ok, uint64_t prefix, uint64_t mask,
		  int shift)
{
	int			lane = threadIdx.x & 31,
				d = 0;
	uint64_t	rem = sm->rem,
				vc[8],
				vw[8],
				mc = 0,
				mw = 0,
				bc,
				bw;
	unsigned	hit;

	for (int k = 0; k < 8; k++)
	{
		int			b = 255 - 8 * lane - k;

		vc[k] = sm->hist[b];
		vw[k] = sm->hsum[b];
		mc += vc[k];
		mw += vw[k];
	}
	bc = mc;
	bw = mw;
#pragma unroll
	for (int o = 1; o < 32; o <<= 1)
	{
		uint64_t	yc = __shfl_up_sync(0xffffffffu, bc, o),
					yw = __shfl_up_sync(0xffffffffu, bw, o);

		if (lane >= o)
		{
			bc += yc;
			bw += yw;
		}
	}
	bc -= mc;
	bw -= mw;
	for (int k = 0; k < 8; k++)
	{
		int			b = 255 - 8 * lane - k;
		uint64_t	acc = by_sum ? bw : bc,
					v = by_sum ? vw[k] : vc[k];

		if (b == 0 || (by_sum && strict ? acc + v > rem : acc + v >= rem))
		{
			d = b;
			break;
		}
		bc += vc[k];
		bw += vw[k];
	}
	hit = __ballot_sync(0xffffffffu, d > 0 || lane == 31);
	{
		int			src = __ffs(hit) - 1;

		d = __shfl_sync(0xffffffffu, d, src);
		bc = __shfl_sync(0xffffffffu, bc, src);
		bw = __shfl_sync(0xffffffffu, bw, src);
	}
	if (lane == 0)
	{
		uint64_t	acc = by_sum ? bw : bc;

		sm->rem = rem - acc;
		sm->prefix = prefix | ((uint64_t) d << shift);
		sm->mask = mask | ((uint64_t) 255 << shift);
		sm->done = by_sum ? sm->hist[d] == 1 : (uint64_t) sm->hist[d] == rem - acc;
		fs->above_c += bc;
		fs->above_w += bw;
		fs->last_c = by_sum ? 1 : sm->hist[d];
		fs->last_w = sm->hsum[d];
		if (tie_ok && !sm->done && (sm->mask >> 32) == 0xffffffffu)
		{
			/*
			 * every key of bucket d has the same probability (the upper half of
			 * the key is chosen), so the same weight wd > 0 (the bucket was chosen
			 * for its weight): in rank order the running weight inside it is
			 * j wd after j keys, and the first j reaching rem - acc ends the
			 * prefix (integers: exact)
			 */
			uint64_t	wd = sm->hsum[d] / sm->hist[d],
						r = rem - acc,
						j = strict ? r / wd + 1 : (r + wd - 1) / wd;

			fs->last_c = j;
			fs->last_w = j * wd;
			sm->done = 1;
		}
	}
}

/* a descent's next pass: the bits shift .. shift + 7 ending at the highest bit below `below` not in known; -1: none */
__device__ __forceinline__ int
next_shift(uint64_t known, int below)
{
	uint64_t	open = ~known & (below >= 64 ? ~0ull : (1ull << below) - 1);
	int			h;

	if (open == 0)
		return -1;
	h = 63 - __clzll((long long) open);
	return h > 7 ? h - 7 : 0;
}

/* how a descent uses the kept first pass (all descents over one key set and bounds) */
enum fast_cache
{
	FC_NONE,					/* neither */
	FC_SAVE,					/* make it and keep it */
	FC_USE						/* take the kept one instead of a pass */
};

/*
 * MSB-first radix descent over the taking-part keys, all within [lo, hi],
 * 8 bits a pass, each pass's 8 bits ending at the highest bit not yet known:
 * known are the bits above the highest in which lo and hi differ (every
 * key's), the key set's fixed_ones() and the digits chosen.  A pass's bits
 * may include known ones (the last pass covers bits 0-7): buckets that
 * disagree with them are empty and never chosen.
 *   by_sum false: returns t with exactly `target` keys >= t
 *   by_sum true: the largest key X whose running weight (over keys >= X)
 *     reaches target (>= target, or > target when strict): its id is written
 *     to *id_out by the one thread that holds it (the draw's result: no
 *     exchange needed); with id_out NULL X itself is not looked up and the
 *     descent stops once X's probability is known (pick_fast's ties); returns 0
 * *cnt_ge / *w_ge: the count and the weight of the keys >= the result.
 * The caller guarantees such a key exists.
 */
template <typename KEY>
__device__ uint64_t
descend_fast(const KEY &kf, int n, uint64_t lo, uint64_t hi, bool by_sum, uint64_t target, bool strict,
			 int32_t *id_out, fast_cache cache, sample_smem *sm, fast_smem *fs, scope_cluster &sc, uint64_t *cnt_ge,
			 uint64_t *w_ge)
{
	int			tid = threadIdx.x,
				h = lo == hi ? 0 : 63 - __clzll((long long) (lo ^ hi)),
				shift;
	uint64_t	known = (h >= 63 ? 0 : ~((2ull << h) - 1)) | kf.fixed_ones(),
				res = 0;

	shift = next_shift(known, 64);
	if (tid == 0)
	{
		sm->prefix = (lo & known) | kf.fixed_ones();
		sm->mask = known;
		sm->rem = target;
		sm->done = 0;
		fs->above_c = 0;
		fs->above_w = 0;
	}
	__syncthreads();
	for (bool first = true;; first = false)
	{
		uint64_t	prefix = sm->prefix,
					mask = sm->mask;

		if (first && cache == FC_USE)
		{
			for (int b = tid; b < 256; b += ST)
			{
				sm->hist[b] = fs->c_hist[b];
				sm->hsum[b] = fs->c_hsum[b];
			}
			__syncthreads();
		}
		else
		{
			int			par = sc.round & 1;

			fast_pass(kf, n, prefix, mask, shift, sc.w->lh[par], sc.w->lhs[par]);
			fast_merge(sc, fs, sm);
			if (first && cache == FC_SAVE)
				for (int b = tid; b < 256; b += ST)
				{
					fs->c_hist[b] = sm->hist[b];
					fs->c_hsum[b] = sm->hsum[b];
				}
		}
		if (tid < 32)
			pick_fast(sm, fs, by_sum, strict, by_sum && !id_out, prefix, mask, shift);
		__syncthreads();
		/* (with every bit known the chosen bucket holds one key: done) */
		shift = next_shift(sm->mask, shift);
		if (sm->done || shift < 0)
			break;
	}
	*cnt_ge = fs->above_c + fs->last_c;
	*w_ge = fs->above_w + fs->last_w;
	if (!by_sum)
		res = sm->prefix;
	else if (id_out)
	{
		/* the one key of the chosen bucket: its thread writes the id */
		uint64_t	prefix = sm->prefix,
					mask = sm->mask;

		for (int li = tid; li < n; li += ST)
		{
			uint64_t	key;

			if (kf.key(li, &key) && (key & mask) == prefix)
				*id_out = kl_sample_key_id(key);
		}
	}
	__syncthreads();			/* (sm and fs are read above; the next descent writes them) */
	return res;
}

/* the number of positive probabilities >= fl over the cluster */
__device__ __forceinline__ int
fast_count_ge(const float *wv, int n, float fl, fast_smem *fs, scope_cluster &sc)
{
	uint64_t	c = 0;

	for (int li = threadIdx.x; li < n; li += ST)
		c += wv[li] > 0.0f && wv[li] >= fl;
	fast_reduce(sc, fs, &c, 1, 0u);
	return (int) c;
}

/*
 * Step 5a (draw_sorted's rule) over the positive probabilities of the row:
 * n_pos of them, weight W, keys within [lo, hi].  The kept prefix is tracked
 * as its count `keep` and its weight z (no key is needed: see the draw).
 *
 * Why the head rule (draw_sorted: when the first 1024 of the ranking reach
 * top_p, only they take part) is skipped for top_p < 1: if the head's mass
 * reaches top_p, the shortest prefix reaching it ends inside the head, so
 * limiting to the head changes nothing; if not, nothing is limited.  Either
 * way keep = the shortest prefix reaching top_p, or all n_pos when the whole
 * weight W falls short (then the head's mass, <= W, falls short too).  With
 * top_p = 1 (min-p alone) the rule decides the kept count m (the head or
 * all), and min-p keeps min(m, cc) (cc: those >= min_p * the largest, a
 * prefix of the ranking, at least 1); only when cc > the head does m matter.
 *
 * The draw: the first key of the ranking whose running weight exceeds U < z
 * lies in the kept prefix (whose running weight reaches z), so its descent
 * runs over all positive keys, the same set and bounds as the others here.
 */
__device__ __noinline__ void
fast_ranked(const float *wv, int n, const wide_map &m, int n_pos, uint64_t W, uint64_t lo, uint64_t hi, float pmax,
			int n_cand, const kk_sample_row &p, sample_smem *sm, fast_smem *fs, scope_cluster &sc, int32_t *out)
{
	fkey_prob	all = {wv, m};
	int			head = n_cand < KL_SAMPLE_HEAD ? n_cand : KL_SAMPLE_HEAD,
				k1 = n_pos < head ? n_pos : head;
	uint64_t	target = kl_sample_fix_target(p.top_p),
				keep = (uint64_t) n_pos,
				z = W,
				c,
				w;
	bool		kept = false;	/* the first pass over `all` is in fs */

	if (p.top_p < 1.0f && W >= target)
	{
		descend_fast(all, n, lo, hi, true, target, false, NULL, FC_SAVE, sm, fs, sc, &keep, &z);
		kept = true;
	}
	if (p.min_p > 0.0f)
	{
		float		fl = KL_S_FMUL(p.min_p, pmax);
		uint64_t	cc = (uint64_t) fast_count_ge(wv, n, fl, fs, sc);

		if (p.top_p >= 1.0f && cc > (uint64_t) k1 && head < n_cand)
		{
			/* the head rule: the first k1 (= head < n_pos here) alone when their mass reaches top_p */
			descend_fast(all, n, lo, hi, false, (uint64_t) k1, false, NULL, kept ? FC_USE : FC_SAVE, sm, fs, sc, &c,
						 &w);
			kept = true;
			if (w >= target)
			{
				keep = (uint64_t) k1;
				z = w;
			}
		}
		if (cc < keep)
		{
			descend_fast(all, n, lo, hi, false, cc, false, NULL, kept ? FC_USE : FC_SAVE, sm, fs, sc, &c, &z);
			kept = true;
			keep = cc;
		}
	}
	descend_fast(all, n, lo, hi, true, kl_sample_fix_point(p.u0, z), true, out, kept ? FC_USE : FC_NONE, sm, fs, sc,
				 &c, &w);
}

/*
 * 5. the softmax's division (prob = e / z, as wide_softmax) and, over the
 * cluster in one exchange, for the ranked rule (ranked): the count of
 * positive probabilities, their weight, the largest and the smallest (as
 * ord keys); for the plain draw: their weight and the bounds of their id keys
 */
__device__ __forceinline__ void
fast_divide(float *wv, int n, const wide_map &m, double z, bool ranked, fast_smem *fs, scope_cluster &sc,
			uint64_t *v)
{
	uint64_t	cnt = 0,
				wt = 0,
				hi = 0,
				nlo = 0;

	for (int li = threadIdx.x; li < n; li += ST)
		if (wv[li] > 0.0f)
		{
			float		q = KL_S_D2F(KL_S_DDIV((double) wv[li], z));
			uint64_t	fx = kl_sample_fix(q),
						k;

			wv[li] = q;
			if (ranked ? !(q > 0.0f) : fx == 0)
				continue;
			k = ranked ? kl_sample_ord(q) : 0xffffffffu - (uint32_t) m.id(li);
			cnt++;
			wt += fx;
			hi = k > hi ? k : hi;
			nlo = (0xffffffffu - k) > nlo ? 0xffffffffu - k : nlo;
		}
	v[0] = cnt;
	v[1] = wt;
	v[2] = hi;
	v[3] = nlo;
	fast_reduce(sc, fs, v, 4, 4u | 8u);
}

/* the fast kernel's row on its cluster (block r of C): wide_row's rule, fast_* stages */
__device__ __forceinline__ void
fast_row(float *wv, const float *logits, int V, const kk_sample_row &p, const int32_t *recent, const uint32_t *masks,
		 int32_t *out, int row, int r, int C, sample_smem *sm, wide_smem *ws, fast_smem *fs)
{
	const float *l = logits + (size_t) p.row * V;
	const uint32_t *allowed = p.mask_off >= 0 ? masks + p.mask_off : NULL;
	int			tid = threadIdx.x,
				lch = __ffs(ST / C) - 1,
				nj = (V + ST - 1) / ST,
				n = nj << lch;
	wide_map	m = {r, lch, V};
	scope_cluster sc = {ws, C, 0};
	bool		topk = p.top_k > 0 && p.top_k < V,
				ranked = p.top_p < 1.0f || p.min_p > 0.0f,
				lead = r == 0 && tid == 0;
	uint64_t	kth = 0,
				v[4] = {0, 0, 0, 0},
				c,
				w;
	float		mx;

	wide_load(wv, l, n, m, p, recent, allowed, tid);
	if (p.temperature == 0.0f)
	{
		wide_greedy(wv, n, m, sm, sc, lead, out + row);
		return;
	}
	/* the scaled values; their largest (and, for top-k, smallest) as ord keys in one exchange */
	for (int li = tid; li < n; li += ST)
	{
		float		s = kl_sample_scaled(wv[li], p.temperature);
		uint64_t	o = kl_sample_ord(s);

		wv[li] = s;
		if (m.id(li) < V)
		{
			v[0] = o > v[0] ? o : v[0];
			v[1] = (0xffffffffu - o) > v[1] ? 0xffffffffu - o : v[1];
		}
	}
	fast_reduce(sc, fs, v, 2, 3u);
	mx = ord_inv((uint32_t) v[0]);
	if (mx == -INFINITY)
	{
		if (lead)
			out[row] = first_allowed(allowed, V);
		return;
	}
	if (topk)
	{
		fkey_scaled kf = {wv, m};

		kth = descend_fast(kf, n, (uint64_t) (0xffffffffu - v[1]) << 32, (v[0] << 32) | 0xffffffffu, false,
						   (uint64_t) p.top_k, false, NULL, FC_NONE, sm, fs, sc, &c, &w);
	}
	fast_divide(wv, n, m, wide_exp_sum(wv, n, nj, m, topk, kth, mx, sm, ws, tid), ranked, fs, sc, v);
	/* the draw's descent writes the chosen id (from the block that holds it) */
	if (ranked)
		fast_ranked(wv, n, m, (int) v[0], v[1], (0xffffffffu - v[3]) << 32, (v[2] << 32) | 0xffffffffu,
					ord_inv((uint32_t) v[2]), topk ? p.top_k : V, p, sm, fs, sc, out + row);
	else
	{
		/* the draw over the candidates in id order (keys 0xffffffff - id) */
		fkey_id		kf = {wv, m};

		descend_fast(kf, n, 0xffffffffu - v[3], v[2], true, kl_sample_fix_point(p.u0, v[1]), true, out + row,
					 FC_NONE, sm, fs, sc, &c, &w);
	}
}
#endif

/* One cluster per row (launched with the cluster dimension by kk_sample_wide). */
__global__ void __launch_bounds__(ST)
sample_wide_kernel(const float *logits, int V, const kk_sample_row *P, const int32_t *recent, const uint32_t *masks,
				   int32_t *out)
{
#ifdef KL_SAMPLE_CLUSTERS
	extern __shared__ float wv[];
	__shared__ sample_smem sm;
	__shared__ wide_smem ws;
	cg::cluster_group cl = cg::this_cluster();
	int			C = (int) cl.num_blocks(),
				row = blockIdx.x / C;
	const kk_sample_row p = P[row];

	wide_row(wv, logits, V, p, recent, masks, out, row, (int) cl.block_rank(), C, &sm, &ws);
	cl.sync();					/* no block leaves while another may still read its shared memory */
#endif
}

/* One cluster per row (launched by kk_sample_fast): the fast stages, the same choices. */
__global__ void __launch_bounds__(ST)
sample_fast_kernel(const float *logits, int V, const kk_sample_row *P, const int32_t *recent, const uint32_t *masks,
				   int32_t *out)
{
#ifdef KL_SAMPLE_CLUSTERS
	extern __shared__ float wv[];
	__shared__ sample_smem sm;
	__shared__ wide_smem ws;
	__shared__ fast_smem fs;
	cg::cluster_group cl = cg::this_cluster();
	int			C = (int) cl.num_blocks(),
				row = blockIdx.x / C;
	const kk_sample_row p = P[row];

	fast_row(wv, logits, V, p, recent, masks, out, row, (int) cl.block_rank(), C, &sm, &ws, &fs);
	cl.sync();					/* no block leaves while another may still read its shared memory */
#endif
}

/*
 * the cluster size to use: 16 where one fits, else 8; -1 below Hopper, and
 * where the kernel the GPU runs was built from the compute_80 PTX (a GPU of
 * a later major version than the library's cubins JIT-compiles that PTX,
 * in which the kernel's body is empty: clusters need sm_90)
 */
typedef void (*wide_kernel_fn)(const float *, int, const kk_sample_row *, const int32_t *, const uint32_t *,
							   int32_t *);

static int
wide_cluster_size(wide_kernel_fn kernel)
{
	int			dev = 0,
				major = 0,
				nc = 0;
	cudaLaunchConfig_t cfg = {};
	cudaLaunchAttribute at[1];
	cudaFuncAttributes fa;

	if (cudaGetDevice(&dev) != cudaSuccess ||
		cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9 ||
		cudaFuncGetAttributes(&fa, kernel) != cudaSuccess || fa.ptxVersion < 90 ||
		cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, WIDE_SMEM_MAX) !=
		cudaSuccess)
	{
		cudaGetLastError();
		return -1;
	}
	cfg.gridDim = dim3(16);
	cfg.blockDim = dim3(ST);
	cfg.dynamicSmemBytes = WIDE_SMEM_MAX / 2;
	at[0].id = cudaLaunchAttributeClusterDimension;
	at[0].val.clusterDim.x = 16;
	at[0].val.clusterDim.y = 1;
	at[0].val.clusterDim.z = 1;
	cfg.attrs = at;
	cfg.numAttrs = 1;
	if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess &&
		cudaOccupancyMaxActiveClusters(&nc, kernel, &cfg) == cudaSuccess && nc >= 1)
		return 16;
	cudaGetLastError();
	return 8;
}

/* the dynamic shared memory of a block holding its part of a row of V */
static size_t
wide_smem_bytes(int V, int cluster)
{
	return (size_t) ((V + ST - 1) / ST) * (ST / cluster) * sizeof(float);
}

/* kk_sample_wide / kk_sample_fast: `kernel` on clusters; *largest its cluster size (0: not known yet, -1: cannot run) */
static int
launch_wide(wide_kernel_fn kernel, int *largest_p, cudaStream_t s, const float *logits, int V, int n,
			const kk_sample_row *rows, const int32_t *recent, const uint32_t *masks, int32_t *out)
{
	int		   &largest = *largest_p;
	int			cluster;
	cudaLaunchConfig_t cfg = {};
	cudaLaunchAttribute at[1];
	size_t		smem;

	if (n <= 0)
		return 0;
	if (largest == 0)
		largest = wide_cluster_size(kernel);
	if (largest < 0)
		return -1;
	/*
	 * 16 blocks a row while the rows' clusters run at once (8 x 16 <= the SMs
	 * of an H100 / H200); more rows take turns, and 8-block clusters pay fewer
	 * barriers per row for the same work
	 */
	cluster = n <= 8 ? largest : 8;
	if (wide_smem_bytes(V, cluster) > WIDE_SMEM_MAX)
		cluster = largest;
	smem = wide_smem_bytes(V, cluster);
	if (smem > WIDE_SMEM_MAX)
		return -1;
	cfg.gridDim = dim3((unsigned) n * cluster);
	cfg.blockDim = dim3(ST);
	cfg.dynamicSmemBytes = smem;
	cfg.stream = s;
	at[0].id = cudaLaunchAttributeClusterDimension;
	at[0].val.clusterDim.x = cluster;
	at[0].val.clusterDim.y = 1;
	at[0].val.clusterDim.z = 1;
	cfg.attrs = at;
	cfg.numAttrs = 1;
	if (cudaLaunchKernelEx(&cfg, kernel, logits, V, rows, recent, masks, out) != cudaSuccess)
	{
		/* not launched (a configuration this GPU refuses): the one-block kernel from now on */
		cudaGetLastError();
		largest = -1;
		return -1;
	}
	return 0;
}

extern "C" int
kk_sample_wide(cudaStream_t s, const float *logits, int V, int n, const kk_sample_row *rows, const int32_t *recent,
			   const uint32_t *masks, int32_t *out)
{
	static int	largest = 0;

	return launch_wide(sample_wide_kernel, &largest, s, logits, V, n, rows, recent, masks, out);
}

extern "C" int
kk_sample_fast(cudaStream_t s, const float *logits, int V, int n, const kk_sample_row *rows, const int32_t *recent,
			   const uint32_t *masks, int32_t *out)
{
	static int	largest = 0;

	return launch_wide(sample_fast_kernel, &largest, s, logits, V, n, rows, recent, masks, out);
}

extern "C" int
kk_sample(cudaStream_t s, float *logits, int V, int n, const kk_sample_row *rows, const int32_t *recent,
		  const uint32_t *masks, float *scratch, int32_t *out)
{
	if (n <= 0)
		return 0;
	sample_kernel<<<n, ST, 0, s>>>(logits, V, rows, recent, masks, scratch, out);
	return 0;
}
