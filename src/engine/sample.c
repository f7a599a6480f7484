/*
 * sample.c — choosing the next token from logits.
 *
 * Order (as Hugging Face's generate applies them): repetition penalty,
 * temperature, top-k, softmax, top-p (nucleus), min-p, then a draw from the
 * remaining candidates with a xoshiro256** generator seeded by splitmix64, so
 * a seed reproduces a run exactly.  Temperature 0 is greedy (argmax, lowest id
 * on ties) and ignores the other settings except the repetition penalty.
 * An optional mask of allowed ids (constrained decoding, json_constraint.h)
 * restricts the candidates.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kl.h"

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
		return kl_errf(err, "temperature must be between 0 and 100 (0 = greedy), got %g", s->temperature);
	if (s->top_k < 0)
		return kl_errf(err, "top_k must be 0 (off) or positive, got %d", s->top_k);
	if (!(s->top_p > 0.0f && s->top_p <= 1.0f))
		return kl_errf(err, "top_p must be in (0, 1] (1 = off), got %g", s->top_p);
	if (!(s->min_p >= 0.0f && s->min_p < 1.0f))
		return kl_errf(err, "min_p must be in [0, 1) (0 = off), got %g", s->min_p);
	if (!(s->repetition_penalty > 0.0f && s->repetition_penalty <= 100.0f))
		return kl_errf(err, "repetition_penalty must be in (0, 100] (1 = off), got %g", s->repetition_penalty);
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

/* uniform in [0, 1) with 53 random bits */
static double
rng_uniform(kl_rng *rng)
{
	return (double) (kl_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0);
}

typedef struct cand
{
	float		p;
	int32_t		id;
} cand;

static int
cmp_cand_desc(const void *a, const void *b)
{
	const cand *x = a,
			   *y = b;

	if (x->p != y->p)
		return x->p > y->p ? -1 : 1;
	return x->id < y->id ? -1 : x->id > y->id;
}

/* Move the k largest (by p) to the front, in no order: quickselect. */
static void
select_top(cand *c, int n, int k)
{
	int			lo = 0,
				hi = n - 1;

	while (lo < hi)
	{
		float		pivot = c[(lo + hi) / 2].p;
		int			i = lo,
					j = hi;

		while (i <= j)
		{
			while (c[i].p > pivot)
				i++;
			while (c[j].p < pivot)
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

static inline bool
allowed_id(const uint32_t *allowed, int id)
{
	return !allowed || ((allowed[id >> 5] >> (id & 31)) & 1);
}

int32_t
kl_sample(const kl_sampling *s, kl_rng *rng, float *logits, int vocab,
		  const int32_t *recent, int n_recent)
{
	return kl_sample_masked(s, rng, logits, vocab, recent, n_recent, NULL);
}

/*
 * With a mask, the candidates are the allowed ids only, in id order, and
 * everything else is unchanged: the same penalty, the same top-k / top-p /
 * min-p over what remains, one draw from the generator per sampled token.
 * Without one the code path is exactly the unmasked sampler's.
 */
int32_t
kl_sample_masked(const kl_sampling *s, kl_rng *rng, float *logits, int vocab,
				 const int32_t *recent, int n_recent, const uint32_t *allowed)
{
	cand	   *c;
	int			n;
	float		mx;
	double		z = 0,
				acc,
				u;
	int32_t		best = 0;

	if (allowed)
	{
		/* the lowest allowed id starts the argmax (ties go to the lowest id) */
		while (best < vocab - 1 && !allowed_id(allowed, best))
			best++;
	}

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
			if (seen)
				continue;
			logits[id] = logits[id] > 0 ? logits[id] / s->repetition_penalty
				: logits[id] * s->repetition_penalty;
		}

	if (s->temperature == 0.0f)
	{
		for (int i = best + 1; i < vocab; i++)
			if (logits[i] > logits[best] && allowed_id(allowed, i))
				best = i;
		return best;
	}

	c = malloc(sizeof(cand) * (size_t) vocab);
	if (!c)
	{
		/* no memory for candidates: fall back to greedy rather than fail */
		for (int i = best + 1; i < vocab; i++)
			if (logits[i] > logits[best] && allowed_id(allowed, i))
				best = i;
		return best;
	}
	mx = -INFINITY;
	n = 0;
	for (int i = 0; i < vocab; i++)
	{
		if (!allowed_id(allowed, i))
			continue;
		c[n].p = logits[i] / s->temperature;
		c[n].id = i;
		mx = c[n].p > mx ? c[n].p : mx;
		n++;
	}
	if (n == 0)
	{
		free(c);
		return best;
	}
	if (s->top_k > 0 && s->top_k < n)
	{
		select_top(c, n, s->top_k);
		n = s->top_k;
	}
	for (int i = 0; i < n; i++)
	{
		c[i].p = expf(c[i].p - mx);
		z += c[i].p;
	}
	for (int i = 0; i < n; i++)
		c[i].p = (float) (c[i].p / z);

	if (s->top_p < 1.0f || s->min_p > 0.0f)
	{
		/* sort the likely head first; fall back to all if it is not enough */
		int			head = n > 1024 ? 1024 : n;
		double		mass = 0;

		if (head < n)
		{
			select_top(c, n, head);
			for (int i = 0; i < head; i++)
				mass += c[i].p;
			if (mass < s->top_p)
				head = n;
		}
		qsort(c, (size_t) head, sizeof(cand), cmp_cand_desc);
		n = head;
		if (s->top_p < 1.0f)
		{
			double		cum = 0;
			int			keep = n;

			for (int i = 0; i < n; i++)
			{
				cum += c[i].p;
				if (cum >= s->top_p)
				{
					keep = i + 1;
					break;
				}
			}
			n = keep;
		}
		if (s->min_p > 0.0f)
		{
			float		floor_p = s->min_p * c[0].p;
			int			keep = 1;

			while (keep < n && c[keep].p >= floor_p)
				keep++;
			n = keep;
		}
	}

	z = 0;
	for (int i = 0; i < n; i++)
		z += c[i].p;
	u = rng_uniform(rng) * z;
	acc = 0;
	best = c[n - 1].id;
	for (int i = 0; i < n; i++)
	{
		acc += c[i].p;
		if (u < acc)
		{
			best = c[i].id;
			break;
		}
	}
	free(c);
	return best;
}
