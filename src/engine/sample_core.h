/*
 * sample_core.h — the sampler's arithmetic, shared by the CPU sampler
 * (sample.c) and the CUDA one (kernels/sample.cu), so that both choose the
 * same token for the same logits and the same uniform draw, bit for bit.
 *
 * What makes two implementations agree exactly:
 *   - every operation whose rounding matters is an IEEE basic operation
 *     (+, -, *, / in float or double, conversions), written through the
 *     KL_S_* macros below: on the GPU these are the _rn intrinsics, which the
 *     compiler never fuses into a multiply-add; on the CPU the engine is built
 *     without an FMA target (no -march), so plain C is never contracted either;
 *   - exp is our own (kl_sample_exp: range reduction and a polynomial in
 *     double), not the platform's expf, whose last bit differs between libm
 *     and CUDA;
 *   - the softmax normalizer, a double sum, has one fixed order: chunk t
 *     holds the ids i with i % KL_SAMPLE_CHUNKS == t, each chunk is summed in
 *     id order, then the chunk sums in chunk order (a GPU thread per chunk,
 *     its loads coalesced with its neighbours');
 *   - cumulative probabilities (top-p mass, the draw) are sums of integers:
 *     each probability as a 2^-63 fixed-point number (kl_sample_fix), so
 *     they are exact whatever the order and a GPU may add them in parallel;
 *   - orders are total: candidates are ranked by value, then by the lower
 *     id (kl_sample_key), so "the top k" is one set whatever the algorithm.
 *
 * The sampling rule itself is documented at kl_sample_draw (kl.h, sample.c).
 */
#ifndef KL_SAMPLE_CORE_H
#define KL_SAMPLE_CORE_H

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define KL_S_HD __host__ __device__ __forceinline__
#else
#define KL_S_HD static inline
#endif

#if defined(__CUDA_ARCH__)
#define KL_S_DADD(a, b) __dadd_rn((a), (b))
#define KL_S_DSUB(a, b) __dsub_rn((a), (b))
#define KL_S_DMUL(a, b) __dmul_rn((a), (b))
#define KL_S_DDIV(a, b) __ddiv_rn((a), (b))
#define KL_S_FMUL(a, b) __fmul_rn((a), (b))
#define KL_S_FDIV(a, b) __fdiv_rn((a), (b))
#define KL_S_FSUB(a, b) __fsub_rn((a), (b))
#define KL_S_D2F(a) __double2float_rn(a)
#else
#define KL_S_DADD(a, b) ((a) + (b))
#define KL_S_DSUB(a, b) ((a) - (b))
#define KL_S_DMUL(a, b) ((a) * (b))
#define KL_S_DDIV(a, b) ((a) / (b))
#define KL_S_FMUL(a, b) ((a) * (b))
#define KL_S_FDIV(a, b) ((a) / (b))
#define KL_S_FSUB(a, b) ((a) - (b))
#define KL_S_D2F(a) ((float) (a))
#endif

/* sums over the vocabulary: this many chunks of consecutive ids */
#define KL_SAMPLE_CHUNKS 1024
/* candidates sorted at once for top-p / min-p (the rest only when needed) */
#define KL_SAMPLE_HEAD 1024

/*
 * exp(x) for x <= 0 (the argument is always a logit minus the largest
 * logit): 2^k * 2^r with k the nearest integer to x log2(e) and
 * |r| <= 1/2, 2^r = e^(r ln 2) by its Taylor series to the 13th power
 * (error < 1e-17, far below float rounding).  exp(0) is exactly 1.
 * -inf and values below -104 give 0; NaN gives NaN.
 */
KL_S_HD float
kl_sample_exp(float x)
{
	double		t,
				k,
				r,
				y,
				p,
				scale;
	union
	{
		double		d;
		uint64_t	u;
	}			s;

	if (x != x)
		return x;
	if (x < -104.0f)
		return 0.0f;
	t = KL_S_DMUL((double) x, 1.4426950408889634074);	/* log2(e) */
	k = t >= 0 ? (double) (int) KL_S_DADD(t, 0.5) : -(double) (int) KL_S_DADD(-t, 0.5);
	r = KL_S_DSUB(t, k);		/* exact: t and k are within 1/2 */
	y = KL_S_DMUL(r, 0.69314718055994530942);	/* ln 2 */
	p = 1.0 / 6227020800.0;		/* 1/13! */
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 479001600.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 39916800.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 3628800.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 362880.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 40320.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 5040.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 720.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 120.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 24.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0 / 6.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 0.5);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0);
	p = KL_S_DADD(KL_S_DMUL(p, y), 1.0);
	/* 2^k, k in [-151, 0]: a normal double */
	s.u = (uint64_t) (1023 + (int) k) << 52;
	scale = s.d;
	return KL_S_D2F(KL_S_DMUL(p, scale));
}

/* a probability in [0, 1] as a 2^-63 fixed-point integer (rounded down;
 * exact for probabilities of 2^-40 and more): sums of them are exact */
KL_S_HD uint64_t
kl_sample_fix(float p)
{
#if defined(__CUDA_ARCH__)
	return __double2ull_rz(__dmul_rn((double) p, 9223372036854775808.0));
#else
	return (uint64_t) ((double) p * 9223372036854775808.0);
#endif
}

/* top_p as the fixed-point mass to reach: cum >= top_p <=> fixed cum >= this */
KL_S_HD uint64_t
kl_sample_fix_target(float top_p)
{
#if defined(__CUDA_ARCH__)
	return __double2ull_rz(ceil(__dmul_rn((double) top_p, 9223372036854775808.0)));
#else
	return (uint64_t) ceil((double) top_p * 9223372036854775808.0);
#endif
}

/* the draw as a fixed-point point in [0, z): floor(floor(u0 2^53) z / 2^53) */
KL_S_HD uint64_t
kl_sample_fix_point(double u0, uint64_t z)
{
	uint64_t	u53;

#if defined(__CUDA_ARCH__)
	u53 = __double2ull_rz(__dmul_rn(u0, 9007199254740992.0));
	return (__umul64hi(u53, z) << 11) | ((u53 * z) >> 53);
#else
	u53 = (uint64_t) (u0 * 9007199254740992.0);
	return (uint64_t) (((unsigned __int128) u53 * z) >> 53);
#endif
}

/* float -> unsigned key with the same order (-inf lowest) */
KL_S_HD uint32_t
kl_sample_ord(float f)
{
	union
	{
		float		f;
		uint32_t	u;
	}			b;

	b.f = f;
	return (b.u & 0x80000000u) ? ~b.u : (b.u | 0x80000000u);
}

/* the rank order of candidates as one 64-bit number: larger value first,
 * then the lower id (NaN values must be replaced before) */
KL_S_HD uint64_t
kl_sample_key(float v, int32_t id)
{
	return ((uint64_t) kl_sample_ord(v) << 32) | (uint64_t) (0xffffffffu - (uint32_t) id);
}

KL_S_HD int32_t
kl_sample_key_id(uint64_t key)
{
	return (int32_t) (0xffffffffu - (uint32_t) (key & 0xffffffffu));
}

/* the logit's value for ranking and softmax: logit / temperature, NaN -> -inf */
KL_S_HD float
kl_sample_scaled(float logit, float temperature)
{
	float		p = KL_S_FDIV(logit, temperature);

	return p != p ? -INFINITY : p;
}

/* the repetition penalty applied to one logit */
KL_S_HD float
kl_sample_penalize(float logit, float penalty)
{
	return logit > 0 ? KL_S_FDIV(logit, penalty) : KL_S_FMUL(logit, penalty);
}

/* token id allowed by the optional bitmask (bit id % 32 of word id / 32) */
KL_S_HD int
kl_sample_allowed(const uint32_t *allowed, int32_t id)
{
	return !allowed || ((allowed[id >> 5] >> (id & 31)) & 1u);
}

#endif
