/*
 * sample.c — choosing the next token from logits.
 *
 * Order (as Hugging Face's generate applies them): repetition penalty, the
 * allowed-token mask, temperature, top-k, softmax, top-p (nucleus), min-p,
 * then a draw from the remaining candidates with one uniform number from a
 * xoshiro256** generator seeded by splitmix64, so a seed reproduces a run
 * exactly.  Temperature 0 is greedy (argmax, lowest id on ties) and ignores
 * the other settings except the repetition penalty and the mask.
 *
 * The arithmetic is defined exactly (sample_core.h: our own exp, one fixed
 * order for the softmax sum, cumulative probabilities in exact fixed point, a
 * total order on candidates), so the CUDA backend's sampler
 * (kernels/sample.cu), which computes the same quantities in parallel, picks
 * the same token for the same logits and draw.
 *
 * The rule, precisely (kl_sample_draw):
 *   1. each distinct id of `recent` once: logit / penalty if positive, else
 *      logit * penalty; disallowed ids (mask) -inf
 *   2. temperature 0: the first largest logit
 *   3. p = logit / temperature (NaN -> -inf); candidates: the top_k by
 *      (p, lower id), or all; e = exp(p - max p) for candidates, 0 otherwise;
 *      z = the chunked double sum of e (sample_core.h); prob = e / z (float)
 *   4. with top_p < 1 or min_p > 0: the candidates of positive probability
 *      ranked by (prob, lower id); of the first min(#candidates, 1024) the
 *      mass (fixed point); when that reaches top_p only those take part
 *      further, else all; keep the shortest prefix whose mass reaches top_p;
 *      then, while ranks 1.. have prob >= min_p * prob of rank 0; draw over
 *      the kept prefix in rank order
 *      otherwise: draw over all candidates in id order
 *   5. the draw: Z = the fixed-point sum of the kept probabilities,
 *      U = kl_sample_fix_point(u0, Z); the first candidate (in that order)
 *      whose running fixed-point sum exceeds U.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kl.h"
#include "sample_core.h"

void
kl_sampling_default(kl_sampling *s)
{
	s->temperature = 0.0f;
	s->top_k = 0;
	s->top_p = 1.0f;
	s->min_p = 0.0f;
	s->repetition_penalty = 1.0f;
	s->seed = 0;
}

int
kl_sampling_validate(const kl_sampling *s, kl_err *err)
{
	if (!(s->temperature >= 0.0f && s->temperature <= 100.0f))
		return kl_errc(err, KL_E_INVALID, "temperature must be between 0 and 100 (0 = greedy), got %g", s->temperature);
	if (s->top_k < 0)
		return kl_errc(err, KL_E_INVALID, "top_k must be 0 (off) or positive, got %d", s->top_k);
	if (!(s->top_p > 0.0f && s->top_p <= 1.0f))
		return kl_errc(err, KL_E_INVALID, "top_p must be in (0, 1] (1 = off), got %g", s->top_p);
	if (!(s->min_p >= 0.0f && s->min_p < 1.0f))
		return kl_errc(err, KL_E_INVALID, "min_p must be in [0, 1) (0 = off), got %g", s->min_p);
	if (!(s->repetition_penalty > 0.0f && s->repetition_penalty <= 100.0f))
		return kl_errc(err, KL_E_INVALID,
					   "repetition_penalty must be in (0, 100] (1 = off), got %g", s->repetition_penalty);
	return KL_OK;
}

static uint64_t
splitmix64(uint64_t *x)
{
	uint64_t	z = (*x += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

void
kl_rng_seed(kl_rng *rng, uint64_t seed)
{
	uint64_t	x = seed;

	for (int i = 0; i < 4; i++)
		rng->s[i] = splitmix64(&x);
}

static inline uint64_t
rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

uint64_t
kl_rng_next(kl_rng *rng)
{
	uint64_t   *s = rng->s;
	uint64_t	result = rotl(s[1] * 5, 7) * 9;
	uint64_t	t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

double
kl_sample_uniform(const kl_sampling *s, kl_rng *rng)
{
	/* uniform in [0, 1) with 53 random bits; greedy sampling draws nothing */
	if (s->temperature == 0.0f)
		return 0.0;
	return (double) (kl_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0);
}

/* ------------------------------------------------------------------ candidates */

typedef struct cand
{
	uint64_t	key;			/* kl_sample_key: rank order, larger first */
	float		p;
	int32_t		id;
} cand;

static int
cmp_cand_desc(const void *a, const void *b)
{
	const cand *x = a,
			   *y = b;

	return x->key > y->key ? -1 : x->key < y->key;
}

/* Move the k first (largest key) to the front, in no order: quickselect.
 * Keys are distinct, so the set is unique. */
static void
select_top(cand *c, int n, int k)
{
	int			lo = 0,
				hi = n - 1;

	while (lo < hi)
	{
		uint64_t	pivot = c[(lo + hi) / 2].key;
		int			i = lo,
					j = hi;

		while (i <= j)
		{
			while (c[i].key > pivot)
				i++;
			while (c[j].key < pivot)
				j--;
			if (i <= j)
			{
				cand		t = c[i];

				c[i] = c[j];
				c[j] = t;
				i++;
				j--;
			}
		}
		if (k - 1 <= j)
			hi = j;
		else if (k - 1 >= i)
			lo = i;
		else
			break;
	}
}

/* Greedy: the first largest logit (a NaN at id 0 wins, as a plain scan does). */
static int32_t
argmax_first(const float *logits, int vocab)
{
	int32_t		best = 0;

	for (int i = 1; i < vocab; i++)
		if (logits[i] > logits[best])
			best = i;
	return best;
}

/* Sum of x over the vocabulary in the fixed chunk order (sample_core.h):
 * chunk t holds ids t, t + KL_SAMPLE_CHUNKS, ...; then the chunks in order. */
static double
chunked_sum(const float *x, int vocab)
{
	double		z = 0;

	for (int t = 0; t < KL_SAMPLE_CHUNKS; t++)
	{
		double		pt = 0;

		for (int i = t; i < vocab; i += KL_SAMPLE_CHUNKS)
			pt = KL_S_DADD(pt, (double) x[i]);
		z = KL_S_DADD(z, pt);
	}
	return z;
}

/*
 * Top-p and min-p over the candidates with positive probability, ranked by
 * (probability, lower id): the first KL_SAMPLE_HEAD are sorted; their mass
 * decides whether the rest are needed (when it falls short of top_p, all
 * candidates take part).  n_cand counts every candidate, zero-probability
 * ones included (they never take part in a draw).
 */
static int32_t
draw_sorted(const kl_sampling *s, double u0, cand *pos, int n_pos, int n_cand)
{
	int			head = n_cand < KL_SAMPLE_HEAD ? n_cand : KL_SAMPLE_HEAD;
	int			sorted = n_pos < head ? n_pos : head;
	int			limit = n_cand,
				m,
				keep;
	uint64_t	target = kl_sample_fix_target(s->top_p),
				z = 0,
				u,
				acc = 0;

	if (sorted < n_pos)
		select_top(pos, n_pos, sorted);
	qsort(pos, (size_t) sorted, sizeof(cand), cmp_cand_desc);
	if (head < n_cand)
	{
		uint64_t	mass = 0;

		for (int i = 0; i < sorted; i++)
			mass += kl_sample_fix(pos[i].p);
		if (mass >= target)
			limit = head;
	}
	m = n_pos < limit ? n_pos : limit;
	if (m > sorted)
	{
		qsort(pos + sorted, (size_t) (n_pos - sorted), sizeof(cand), cmp_cand_desc);
		sorted = n_pos;
	}
	keep = m;
	if (s->top_p < 1.0f)
	{
		uint64_t	cum = 0;

		for (int i = 0; i < m; i++)
		{
			cum += kl_sample_fix(pos[i].p);
			if (cum >= target)
			{
				keep = i + 1;
				break;
			}
		}
	}
	if (s->min_p > 0.0f)
	{
		float		floor_p = KL_S_FMUL(s->min_p, pos[0].p);
		int			k = 1;

		while (k < keep && pos[k].p >= floor_p)
			k++;
		keep = k;
	}
	for (int i = 0; i < keep; i++)
		z += kl_sample_fix(pos[i].p);
	u = kl_sample_fix_point(u0, z);
	for (int i = 0; i < keep; i++)
	{
		acc += kl_sample_fix(pos[i].p);
		if (acc > u)
			return pos[i].id;
	}
	return pos[0].id;			/* every kept weight 0 (cannot happen: rank 0 has prob >= 1/vocab) */
}

/* The draw over all candidates in id order. */
static int32_t
draw_plain(double u0, const float *prob, int vocab)
{
	uint64_t	z = 0,
				u,
				acc = 0;

	for (int i = 0; i < vocab; i++)
		z += kl_sample_fix(prob[i]);
	u = kl_sample_fix_point(u0, z);
	for (int i = 0; i < vocab; i++)
	{
		acc += kl_sample_fix(prob[i]);
		if (acc > u)
			return i;
	}
	return 0;					/* every weight 0 (cannot happen) */
}

int32_t
kl_sample_draw(const kl_sampling *s, double u0, float *logits, int vocab,
			   const int32_t *recent, int n_recent, const uint32_t *allowed)
{
	float	   *prob;
	cand	   *c;
	float		mx = -INFINITY;
	int			n_cand = vocab,
				n_pos = 0;
	double		z;
	int32_t		best;

	if (s->repetition_penalty != 1.0f)
		for (int i = 0; i < n_recent; i++)
		{
			int32_t		id = recent[i];
			bool		seen = false;

			if (id < 0 || id >= vocab)
				continue;
			for (int j = 0; j < i; j++)
				if (recent[j] == id)
					seen = true;
			if (!seen)
				logits[id] = kl_sample_penalize(logits[id], s->repetition_penalty);
		}
	if (allowed)
		for (int i = 0; i < vocab; i++)
			if (!kl_sample_allowed(allowed, i))
				logits[i] = -INFINITY;

	if (s->temperature == 0.0f)
		return argmax_first(logits, vocab);

	prob = malloc(sizeof(float) * (size_t) vocab);
	c = malloc(sizeof(cand) * (size_t) vocab);
	if (!prob || !c)
	{
		/* no memory for candidates: fall back to greedy rather than fail */
		free(prob);
		free(c);
		return argmax_first(logits, vocab);
	}
	for (int i = 0; i < vocab; i++)
	{
		prob[i] = kl_sample_scaled(logits[i], s->temperature);
		mx = prob[i] > mx ? prob[i] : mx;
	}
	if (mx == -INFINITY)
	{
		/* nothing is possible: the first allowed token */
		best = 0;
		while (best < vocab - 1 && !kl_sample_allowed(allowed, best))
			best++;
		goto out;
	}

	/* top-k: the set of the k first by (value, lower id) */
	if (s->top_k > 0 && s->top_k < vocab)
	{
		for (int i = 0; i < vocab; i++)
		{
			c[i].key = kl_sample_key(prob[i], i);
			c[i].id = i;
		}
		select_top(c, vocab, s->top_k);
		n_cand = s->top_k;
		for (int i = 0; i < n_cand; i++)
			c[i].p = prob[c[i].id];
		memset(prob, 0, sizeof(float) * (size_t) vocab);
		for (int i = 0; i < n_cand; i++)
			prob[c[i].id] = kl_sample_exp(KL_S_FSUB(c[i].p, mx));
	}
	else
		for (int i = 0; i < vocab; i++)
			prob[i] = kl_sample_exp(KL_S_FSUB(prob[i], mx));

	/* softmax over the candidates (non-candidates hold 0) */
	z = chunked_sum(prob, vocab);
	for (int i = 0; i < vocab; i++)
		if (prob[i] > 0)
			prob[i] = KL_S_D2F(KL_S_DDIV((double) prob[i], z));

	if (s->top_p < 1.0f || s->min_p > 0.0f)
	{
		for (int i = 0; i < vocab; i++)
			if (prob[i] > 0)
			{
				c[n_pos].p = prob[i];
				c[n_pos].id = i;
				c[n_pos].key = kl_sample_key(prob[i], i);
				n_pos++;
			}
		best = n_pos > 0 ? draw_sorted(s, u0, c, n_pos, n_cand) : 0;
	}
	else
		best = draw_plain(u0, prob, vocab);
out:
	free(prob);
	free(c);
	return best;
}

int32_t
kl_sample_masked(const kl_sampling *s, kl_rng *rng, float *logits, int vocab,
				 const int32_t *recent, int n_recent, const uint32_t *allowed)
{
	double		u0 = kl_sample_uniform(s, rng);

	return kl_sample_draw(s, u0, logits, vocab, recent, n_recent, allowed);
}

int32_t
kl_sample(const kl_sampling *s, kl_rng *rng, float *logits, int vocab,
		  const int32_t *recent, int n_recent)
{
	return kl_sample_masked(s, rng, logits, vocab, recent, n_recent, NULL);
}
