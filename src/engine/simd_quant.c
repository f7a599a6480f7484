/*
 * simd_quant.c — GEMV kernels for quantized weights (quant.h): FP8 E4M3,
 * int8 and int4, each in portable C, AVX2 + FMA and AVX-512; simd.c puts
 * them in its per-CPU tables (kl_simd.gemv_q).
 *
 * Method: weight-only.  The kernels rebuild each weight in registers as
 * the fp32 number fl(q * scale) — exactly what a checkpoint of dequantized
 * f32 weights would hold — and multiply it with the fp32 activations, as
 * the f32 kernels do (exceptions below: per-channel int8 and int4 on
 * AVX-512 scale integer-weight sums).  So a quantized model computes the same function as
 * its dequantized f32 copy, to float rounding, and activations keep fp32
 * precision (no per-token activation quantization).
 *
 * Conversions in registers:
 *   int8   sign-extend bytes to 32 bits, convert, multiply by the scale
 *          (AVX-512 with one scale per row: the row's dot product of the
 *          integers is scaled once at the end instead: one multiply per
 *          row, not per weight, at the cost of bit-equality with fl(q * s));
 *   FP8    sign-extend, shift left 20 and keep the sign and the 7 low bits:
 *          the fp32 whose bits those are is the E4M3 value times 2^-120
 *          exactly (normal and subnormal codes alike), so one multiply by
 *          scale * 2^120 (exact: |scale| < 256, quant.h) gives fl(v * s);
 *   int4   AVX-512: 128 columns per load, nibbles brought to the low bits
 *          of the 32-bit lanes by shifts and mapped through n - 8 by
 *          vpermps; the sums scaled per group (see tile4_avx512).  AVX2:
 *          zero-extend the 16 bytes of a 32-column block, split the nibbles
 *          (even columns low, odd high), convert, fma(n, s, -8 s) =
 *          fl((n - 8) * s) (-8 s is exact).  The activations are permuted
 *          to match, once per product (kl_simd.q4_permute).
 *
 * Order of reading: int8 and FP8 on AVX-512 take rows of 1024 columns or
 * more one at a time, front to back, with eight accumulators per input
 * (row8_avx512); shorter rows, int4 on AVX-512 and every form on AVX2 are
 * read four rows side by side.
 *
 * Batch invariance: each (row, input) pair accumulates in its own vector
 * in the same order whatever the number of rows and inputs a call handles
 * together, and is reduced the same way, so a row's result does not depend
 * on the other rows of a batch (kl.h, KL_BATCH_INVARIANT_ROWS).
 */
#include "simd_quant.h"

#include <immintrin.h>
#include <stdbool.h>
#include <string.h>

#define FP8_UNBIAS 0x1p120f		/* 2^(127 - 7): E4M3 bits placed in an fp32 read 2^-120 too small */
#ifndef PF_ROWS
#define PF_ROWS 8				/* rows ahead to prefetch */
#endif
/*
 * int8 / FP8 on AVX-512: rows of at least this many columns are read one at
 * a time (row8_avx512), shorter ones four side by side (tile8_avx512).  A
 * long row streams faster alone; a short one pays more for its own
 * reduction and activation loads than it gains (quant-cpu-levers.md).
 * The choice depends on the matrix only, so batch invariance holds.
 */
#define ROW_MIN_COLS 1024

static inline const float *
row_scales(const kl_qmat *W, int r)
{
	return W->scales + (size_t) r * W->n_groups;
}

/* int4: 32-column blocks per scale group (a group is a multiple of 32
 * columns, or the whole row) */
static inline int
blocks_per_group(const kl_qmat *W)
{
	return W->group == W->cols ? (W->cols + 31) / 32 : W->group / 32;
}

/* ------------------------------------------------------------------ portable C */

static float
dot_fp8_int8_scalar(const kl_qmat *W, int r, const float *x)
{
	const uint8_t *w = W->data + (size_t) r * W->row_bytes;
	const float *sc = row_scales(W, r);
	float		s = 0;

	for (int c = 0; c < W->cols; c++)
	{
		float		sg = sc[c / W->group];
		float		wv = W->type == KL_Q_FP8 ? kl_e4m3_to_f32(w[c]) * sg : (float) (int8_t) w[c] * sg;

		s += wv * x[c];
	}
	return s;
}

static float
dot_int4_scalar(const kl_qmat *W, int r, const float *xp)
{
	const uint8_t *w = W->data + (size_t) r * W->row_bytes;
	const float *sc = row_scales(W, r);
	float		s = 0;

	for (size_t k = 0; k < W->row_bytes; k++)
	{
		int			c0 = (int) (k / 16) * 32,
					j = (int) (k % 16);
		float		sg = sc[c0 / W->group];

		s += (float) ((w[k] & 15) - 8) * sg * xp[c0 + j];
		s += (float) ((w[k] >> 4) - 8) * sg * xp[c0 + 16 + j];
	}
	return s;
}

void
kl_gemv_q_scalar(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int nx, int r0, int r1)
{
	for (int r = r0; r < r1; r++)
		for (int j = 0; j < nx; j++)
			y[(size_t) j * ldy + r] = W->type == KL_Q_INT4 ?
				dot_int4_scalar(W, r, x + (size_t) j * ldx) :
				dot_fp8_int8_scalar(W, r, x + (size_t) j * ldx);
}

/* ------------------------------------------------------------------ AVX2 + FMA */

#define AVX2 __attribute__((target("avx2,fma")))
#define INLINE inline __attribute__((always_inline))

AVX2 static inline float
hsum8(__m256 v)
{
	__m128		lo = _mm256_castps256_ps128(v);
	__m128		hi = _mm256_extractf128_ps(v, 1);

	lo = _mm_add_ps(lo, hi);
	lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
	lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
	return _mm_cvtss_f32(lo);
}

/* 8 bytes -> 8 fp32 weights (before the scale): int8 or FP8 * 2^-120 */
AVX2 static INLINE __m256
widen8_avx2(const uint8_t *p, bool fp8)
{
	__m256i		v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) p));

	if (fp8)
		return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 20),
													_mm256_set1_epi32((int) 0x87F00000u)));
	return _mm256_cvtepi32_ps(v);
}

/*
 * Two accumulators per (row, input), for the even and the odd 8-column
 * chunks of the row (int4: the low and the high nibbles): twice the
 * independent FMA chains, so a single input is not bound by FMA latency.
 */
#define CHUNK8(i, cc, acc) \
	acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(widen8_avx2(w[i] + (cc), fp8), vs[i]), xv, acc[i])

/* NR rows (1..4) of an int8 / FP8 matrix against one input */
AVX2 static INLINE void
tile8_avx2(float *y, const kl_qmat *W, const float *x, int r, int NR, bool fp8)
{
	int			cols = W->cols,
				G = W->group;
	const uint8_t *w[4];
	const float *sc[4];
	__m256		a0[4],
				a1[4];

	for (int i = 0; i < NR; i++)
	{
		w[i] = W->data + (size_t) (r + i) * W->row_bytes;
		sc[i] = row_scales(W, r + i);
		a0[i] = a1[i] = _mm256_setzero_ps();
	}
	for (int g = 0; g < W->n_groups; g++)
	{
		int			c0 = g * G,
					c1 = cols - c0 < G ? cols : c0 + G;
		__m256		vs[4];

		for (int i = 0; i < NR; i++)
			vs[i] = _mm256_set1_ps(fp8 ? sc[i][g] * FP8_UNBIAS : sc[i][g]);
		for (int c = c0; c < c1; c += 8)
		{
			bool		odd = (c >> 3) & 1;
			__m256		xv;

			if (c + 8 <= c1)
			{
				xv = _mm256_loadu_ps(x + c);
				for (int i = 0; i < NR; i++)
				{
					if (odd)
						CHUNK8(i, c, a1);
					else
						CHUNK8(i, c, a0);
				}
			}
			else
			{
				/* the row's last few columns: zero-padded copies */
				uint8_t		wb[4][8];
				float		xb[8] = {0};

				memcpy(xb, x + c, sizeof(float) * (size_t) (c1 - c));
				xv = _mm256_loadu_ps(xb);
				for (int i = 0; i < NR; i++)
				{
					__m256		wv;

					memset(wb[i], 0, 8);
					memcpy(wb[i], w[i] + c, (size_t) (c1 - c));
					wv = _mm256_mul_ps(widen8_avx2(wb[i], fp8), vs[i]);
					if (odd)
						a1[i] = _mm256_fmadd_ps(wv, xv, a1[i]);
					else
						a0[i] = _mm256_fmadd_ps(wv, xv, a0[i]);
				}
			}
		}
	}
	for (int i = 0; i < NR; i++)
		y[r + i] = hsum8(_mm256_add_ps(a0[i], a1[i]));
}

/* NR rows of an int4 matrix against one permuted input */
AVX2 static INLINE void
tile4_avx2(float *y, const kl_qmat *W, const float *xp, int r, int NR)
{
	int			nblk = (W->cols + 31) / 32;
	int			bpg = blocks_per_group(W);
	const uint8_t *w[4];
	const float *sc[4];
	__m256		a0[4],
				a1[4];
	const __m256i nib = _mm256_set1_epi32(15);

	for (int i = 0; i < NR; i++)
	{
		w[i] = W->data + (size_t) (r + i) * W->row_bytes;
		sc[i] = row_scales(W, r + i);
		a0[i] = a1[i] = _mm256_setzero_ps();
	}
	for (int b = 0, g = 0, gb = 0; b < nblk; b++)
	{
		int			c = b * 32;
		size_t		have = W->row_bytes - (size_t) b * 16;
		const float *xb = xp + c;

		if (gb == bpg)
		{
			g++;
			gb = 0;
		}
		gb++;
		for (int i = 0; i < NR; i++)
		{
			float		s = sc[i][g];
			__m256		vs = _mm256_set1_ps(s),
						vm = _mm256_set1_ps(-8.0f * s);
			uint8_t		buf[16];
			const uint8_t *p = w[i] + (size_t) b * 16;

			if (have < 16)
			{
				memset(buf, 0, sizeof(buf));
				memcpy(buf, p, have);
				p = buf;
			}
			for (int h = 0; h < 2; h++)
			{
				__m256i		v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *) (p + 8 * h)));
				__m256		wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, nib)), vs, vm);
				__m256		wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), vs, vm);

				a0[i] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xb + 8 * h), a0[i]);
				a1[i] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xb + 16 + 8 * h), a1[i]);
			}
		}
	}
	for (int i = 0; i < NR; i++)
		y[r + i] = hsum8(_mm256_add_ps(a0[i], a1[i]));
}

AVX2 void
kl_gemv_q_avx2(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int nx, int r0, int r1)
{
	bool		fp8 = W->type == KL_Q_FP8;

	for (int j = 0; j < nx; j++)
	{
		const float *xj = x + (size_t) j * ldx;
		float	   *yj = y + (size_t) j * ldy;
		int			r = r0;

		if (W->type == KL_Q_INT4)
		{
			for (; r + 4 <= r1; r += 4)
				tile4_avx2(yj, W, xj, r, 4);
			for (; r < r1; r++)
				tile4_avx2(yj, W, xj, r, 1);
		}
		else if (fp8)
		{
			for (; r + 4 <= r1; r += 4)
				tile8_avx2(yj, W, xj, r, 4, true);
			for (; r < r1; r++)
				tile8_avx2(yj, W, xj, r, 1, true);
		}
		else
		{
			for (; r + 4 <= r1; r += 4)
				tile8_avx2(yj, W, xj, r, 4, false);
			for (; r < r1; r++)
				tile8_avx2(yj, W, xj, r, 1, false);
		}
	}
}

/* ------------------------------------------------------------------ AVX-512 */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

/* 16 bytes (or the first n under mask) -> 16 fp32 weights before the scale */
AVX512 static INLINE __m512
widen16_avx512(const uint8_t *p, __mmask16 m, bool part, bool fp8)
{
	__m128i		b = part ? _mm_maskz_loadu_epi8(m, p) : _mm_loadu_si128((const __m128i *) p);
	__m512i		v = _mm512_cvtepi8_epi32(b);

	if (fp8)
		return _mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(v, 20),
													_mm512_set1_epi32((int) 0x87F00000u)));
	return _mm512_cvtepi32_ps(v);
}

/*
 * NR rows (1..4) of an int8 / FP8 matrix against NX inputs (1..2): each
 * chunk of 16 weights is loaded and scaled once for the inputs.  Two
 * accumulators per (row, input), for the chunks at even and odd multiples
 * of 16 columns (independent FMA chains: one input is not latency-bound).
 */
#define CHUNK16(cc, part, m, acc) \
	do { \
		_Pragma("GCC unroll 4") \
		for (int i = 0; i < NR; i++) \
			wv[i] = post ? widen16_avx512(w[i] + (cc), m, part, fp8) : \
				_mm512_mul_ps(widen16_avx512(w[i] + (cc), m, part, fp8), vs[i]); \
		_Pragma("GCC unroll 2") \
		for (int j = 0; j < NX; j++) \
		{ \
			const float *xj = x + (size_t) j * ldx + (cc); \
			__m512		xv = part ? _mm512_maskz_loadu_ps(m, xj) : _mm512_loadu_ps(xj); \
			_Pragma("GCC unroll 4") \
			for (int i = 0; i < NR; i++) \
				acc[j][i] = _mm512_fmadd_ps(wv[i], xv, acc[j][i]); \
		} \
	} while (0)

AVX512 static INLINE void
tile8_avx512(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int r, int NR, int NX,
			 bool fp8, bool post, bool prefetch)
{
	int			cols = W->cols,
				G = W->group;
	const uint8_t *w[4];
	const float *sc[4];
	__m512		a0[2][4],
				a1[2][4];

	for (int i = 0; i < NR; i++)
	{
		w[i] = W->data + (size_t) (r + i) * W->row_bytes;
		sc[i] = row_scales(W, r + i);
		for (int j = 0; j < NX; j++)
			a0[j][i] = a1[j][i] = _mm512_setzero_ps();
	}
	for (int g = 0; g < W->n_groups; g++)
	{
		int			c0 = g * G,
					c1 = cols - c0 < G ? cols : c0 + G;
		__m512		vs[4],
					wv[4];
		int			c = c0;

		for (int i = 0; i < NR; i++)
			vs[i] = _mm512_set1_ps(fp8 ? sc[i][g] * FP8_UNBIAS : sc[i][g]);
		while (c < c1)
		{
			if (prefetch && (c & 63) == 0)
				for (int i = 0; i < NR; i++)
					_mm_prefetch((const char *) (w[i] + PF_ROWS * W->row_bytes + c), _MM_HINT_T0);
			if (((c >> 4) & 1) == 0 && c + 32 <= c1)
			{
				CHUNK16(c, false, (__mmask16) 0xffff, a0);
				CHUNK16(c + 16, false, (__mmask16) 0xffff, a1);
				c += 32;
			}
			else
			{
				bool		part = c + 16 > c1;
				__mmask16	m = part ? (__mmask16) ((1u << (c1 - c)) - 1) : (__mmask16) 0xffff;

				if ((c >> 4) & 1)
					CHUNK16(c, part, m, a1);
				else
					CHUNK16(c, part, m, a0);
				c += 16;
			}
		}
	}
	for (int j = 0; j < NX; j++)
		for (int i = 0; i < NR; i++)
			y[(size_t) j * ldy + r + i] = post ?
				_mm512_reduce_add_ps(_mm512_add_ps(a0[j][i], a1[j][i])) * sc[i][0] :
				_mm512_reduce_add_ps(_mm512_add_ps(a0[j][i], a1[j][i]));
}

/*
 * int4 on AVX-512 reads a row 64 bytes (128 columns, a "span") at a time:
 * 32-bit lane k of the load holds columns 8k .. 8k+7 of the span as its 8
 * nibbles (nibble i = column 8k + i), so shifting the lanes right by 4i
 * puts column 8k + i in the low 4 bits of every lane at once — no byte
 * unpacking — and vpermps (which reads only those bits) maps it through the
 * 16 values n - 8.  The activations are laid out to match
 * (kl_q4_permute_span): per span, xs[16 i + k] = x[8k + i].  The products
 * accumulate per lane; lane k belongs to the 32-column block k / 4, so the
 * group scales multiply the span's sums once, lane by lane.
 */
void
kl_q4_permute_span(float *dst, const float *x, int cols)
{
	int			n = kl_q4_span_len(cols);

	for (int sp = 0; sp < n; sp += 128)
		for (int i = 0; i < 8; i++)
			for (int k = 0; k < 16; k++)
			{
				int			c = sp + 8 * k + i;

				dst[sp + 16 * i + k] = c < cols ? x[c] : 0.0f;
			}
}

/*
 * The scale of every lane of a span of one row: base is the span's first
 * group, smask the groups the span holds (for groups of 32 or 64 columns).
 */
AVX512 static INLINE __m512
span_scales(const float *sc, int base, int lanes_per_group, __mmask16 smask)
{
	if (lanes_per_group == 0)	/* one scale per row */
		return _mm512_set1_ps(sc[0]);
	if (lanes_per_group >= 16)	/* the span lies in one group */
		return _mm512_set1_ps(sc[base]);
	/* groups of 32 or 64 columns: 4 or 2 scales, each repeated over its lanes */
	return _mm512_permutexvar_ps(lanes_per_group == 4 ?
								 _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0) :
								 _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
								 _mm512_maskz_loadu_ps(smask, sc + base));
}

/* NR rows (1..4) of an int4 matrix against NX span-permuted inputs (1..2) */
AVX512 static INLINE void
tile4_avx512(float *y, int ldy, const kl_qmat *W, const float *xs, int ldx, int r, int NR, int NX,
			 bool prefetch)
{
	int			nsp = (W->cols + 127) / 128;
	/* lanes per scale group: 0 = one scale per row; groups are multiples of 32 columns */
	int			lpg = W->group == W->cols ? 0 : W->group / 8;
	int			gps = lpg == 0 || lpg >= 16 ? 1 : 16 / lpg;	/* groups per span (32, 64: 4, 2) */
	const uint8_t *w[4];
	const float *sc[4];
	__m512		res[2][4];
	/* the 16 nibble values n - 8 */
	const __m512 levels = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);

	for (int i = 0; i < NR; i++)
	{
		w[i] = W->data + (size_t) (r + i) * W->row_bytes;
		sc[i] = row_scales(W, r + i);
		for (int j = 0; j < NX; j++)
			res[j][i] = _mm512_setzero_ps();
	}
	for (int sp = 0; sp < nsp; sp++)
	{
		size_t		have = W->row_bytes - (size_t) sp * 64;
		bool		part = have < 64;
		const float *x0 = xs + (size_t) sp * 128;
		/* the span's first group, and the groups it holds (once per span, not per row) */
		int			base = lpg == 0 ? 0 : lpg <= 16 ? sp * gps : sp * 128 / W->group;
		__mmask16	smask = (__mmask16) ((1u << (W->n_groups - base < gps ? W->n_groups - base : gps)) - 1);

#pragma GCC unroll 4
		for (int i = 0; i < NR; i++)
		{
			const uint8_t *p = w[i] + (size_t) sp * 64;
			__m512i		v = part ? _mm512_maskz_loadu_epi8((__mmask64) ((1ull << have) - 1), p) :
				_mm512_loadu_si512(p);
			__m512		sv = span_scales(sc[i], base, lpg, smask);
			__m512		a0[2],
						a1[2];

			if (prefetch)
			{
				_mm_prefetch((const char *) (p + PF_ROWS * W->row_bytes), _MM_HINT_T0);
				if ((sp & 3) == 0)
					_mm_prefetch((const char *) (sc[i] + PF_ROWS * W->n_groups + base), _MM_HINT_T0);
			}
			/* nibbles 0-3 into a0, 4-7 into a1: two independent chains per input */
			for (int k = 0; k < 8; k++)
			{
				__m512		wk = _mm512_permutexvar_ps(k ? _mm512_srli_epi32(v, 4 * k) : v, levels);

				for (int j = 0; j < NX; j++)
				{
					__m512		xv = _mm512_loadu_ps(x0 + (size_t) j * ldx + 16 * k);

					if (k == 0)
						a0[j] = _mm512_mul_ps(wk, xv);
					else if (k == 4)
						a1[j] = _mm512_mul_ps(wk, xv);
					else if (k < 4)
						a0[j] = _mm512_fmadd_ps(wk, xv, a0[j]);
					else
						a1[j] = _mm512_fmadd_ps(wk, xv, a1[j]);
				}
			}
			for (int j = 0; j < NX; j++)
				res[j][i] = _mm512_fmadd_ps(_mm512_add_ps(a0[j], a1[j]), sv, res[j][i]);
		}
	}
	for (int j = 0; j < NX; j++)
		for (int i = 0; i < NR; i++)
			y[(size_t) j * ldy + r + i] = _mm512_reduce_add_ps(res[j][i]);
}

/*
 * One row of an int8 / FP8 matrix against NX inputs (1..2), read front to
 * back: the memory system streams one row at a time faster than it serves
 * four rows read side by side (bench/results/quant-cpu-levers.md).  So that one
 * row is not bound by FMA latency, the 16-column chunk k accumulates into
 * acc[k % 8]: eight independent chains per input, summed in a fixed tree.
 */
#define ROW_CHUNK16(cc, part, m, k) \
	do { \
		__m512		wv_ = widen16_avx512(w + (cc), m, part, fp8); \
		if (!post) \
			wv_ = _mm512_mul_ps(wv_, grouped ? _mm512_set1_ps(sc[(cc) / G] * unbias) : vs); \
		_Pragma("GCC unroll 2") \
		for (int j = 0; j < NX; j++) \
		{ \
			const float *xj = x + (size_t) j * ldx + (cc); \
			__m512		xv = part ? _mm512_maskz_loadu_ps(m, xj) : _mm512_loadu_ps(xj); \
			acc[j][k] = _mm512_fmadd_ps(wv_, xv, acc[j][k]); \
		} \
	} while (0)

AVX512 static INLINE void
row8_avx512(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int r, int NX,
			bool fp8, bool post, bool grouped)
{
	int			cols = W->cols,
				G = W->group,
				body = cols / 128 * 128;
	const uint8_t *w = W->data + (size_t) r * W->row_bytes;
	const float *sc = row_scales(W, r);
	float		unbias = fp8 ? FP8_UNBIAS : 1.0f;
	__m512		vs = _mm512_set1_ps(sc[0] * unbias);
	__m512		acc[2][8];

	for (int j = 0; j < NX; j++)
		for (int k = 0; k < 8; k++)
			acc[j][k] = _mm512_setzero_ps();
	for (int c = 0; c < body; c += 128)
	{
#pragma GCC unroll 8
		for (int k = 0; k < 8; k++)
			ROW_CHUNK16(c + 16 * k, false, (__mmask16) 0xffff, k);
	}
#pragma GCC unroll 8
	for (int k = 0; k < 8; k++)
	{
		int			cc = body + 16 * k;
		bool		part = cc + 16 > cols;

		if (cc >= cols)
			break;
		ROW_CHUNK16(cc, part, part ? (__mmask16) ((1u << (cols - cc)) - 1) : (__mmask16) 0xffff, k);
	}
	for (int j = 0; j < NX; j++)
	{
		__m512	   *a = acc[j];
		float		s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
														  _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7]))));

		y[(size_t) j * ldy + r] = post ? s * sc[0] : s;
	}
}

/* one row of an int8 / FP8 matrix (the constant arguments specialize the inlined kernel) */
AVX512 static INLINE void
row_avx512(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int r, int NX)
{
	if (W->type == KL_Q_FP8)
	{
		if (W->n_groups == 1)
			row8_avx512(y, ldy, W, x, ldx, r, NX, true, false, false);
		else
			row8_avx512(y, ldy, W, x, ldx, r, NX, true, false, true);
	}
	else if (W->n_groups == 1)
		row8_avx512(y, ldy, W, x, ldx, r, NX, false, true, false);
	else
		row8_avx512(y, ldy, W, x, ldx, r, NX, false, false, true);
}

/* one (NR, NX) tile of any form (the constant arguments specialize the inlined tiles) */
AVX512 static INLINE void
tile_avx512(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int r, int NR, int NX, bool pf)
{
	if (W->type == KL_Q_INT4)
		tile4_avx512(y, ldy, W, x, ldx, r, NR, NX, pf);
	else if (W->type == KL_Q_FP8)
		tile8_avx512(y, ldy, W, x, ldx, r, NR, NX, true, false, pf);
	else if (W->n_groups == 1)
		tile8_avx512(y, ldy, W, x, ldx, r, NR, NX, false, true, pf);
	else
		tile8_avx512(y, ldy, W, x, ldx, r, NR, NX, false, false, pf);
}

AVX512 void
kl_gemv_q_avx512(float *y, int ldy, const kl_qmat *W, const float *x, int ldx, int nx, int r0, int r1)
{
	int			r = r0;

	if (W->type != KL_Q_INT4 && W->cols >= ROW_MIN_COLS)
	{
		/* long int8 / FP8 rows: row by row, inputs two at a time, then one */
		for (; r < r1; r++)
		{
			int			j = 0;

			for (; j + 2 <= nx; j += 2)
				row_avx512(y + (size_t) j * ldy, ldy, W, x + (size_t) j * ldx, ldx, r, 2);
			for (; j < nx; j++)
				row_avx512(y + (size_t) j * ldy, ldy, W, x + (size_t) j * ldx, ldx, r, 1);
		}
		return;
	}
	for (; r + 4 <= r1; r += 4)
	{
		int			j = 0;

		/* inputs two at a time, then one */
		for (; j + 2 <= nx; j += 2)
			tile_avx512(y + (size_t) j * ldy, ldy, W, x + (size_t) j * ldx, ldx, r, 4, 2, j == 0);
		for (; j < nx; j++)
			tile_avx512(y + (size_t) j * ldy, ldy, W, x + (size_t) j * ldx, ldx, r, 4, 1, j == 0);
	}
	for (; r < r1; r++)
		for (int j = 0; j < nx; j++)
			tile_avx512(y + (size_t) j * ldy, ldy, W, x + (size_t) j * ldx, ldx, r, 1, 1, false);
}
