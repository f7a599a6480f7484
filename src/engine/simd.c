/*
 * simd.c — see simd.h.  Three variants of each kernel: AVX-512, AVX2+FMA and
 * portable C.  The GEMV kernels are the decode hot path: they stream weight
 * rows once (bf16 widened to fp32 in registers) and keep four rows in flight
 * so that the FMA latency is hidden.
 */
#include "simd.h"

#include <immintrin.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "kl_util.h"
#include "simd_quant.h"

/* int4 input layouts (quant.h, simd_quant.h), as functions for the tables */
static int
q4_xlen_blocks(int cols)
{
	return kl_q4_xperm_len(cols);
}

static int
q4_xlen_spans(int cols)
{
	return kl_q4_span_len(cols);
}

/* ------------------------------------------------------------------ portable C */

static float
dot_scalar(const float *a, const float *b, int n)
{
	float		s = 0;

	for (int i = 0; i < n; i++)
		s += a[i] * b[i];
	return s;
}

static void
axpy_scalar(float *y, float a, const float *x, int n)
{
	for (int i = 0; i < n; i++)
		y[i] += a * x[i];
}

static void
scale_scalar(float *y, float a, int n)
{
	for (int i = 0; i < n; i++)
		y[i] *= a;
}

static void
gemv_bf16_scalar(float *y, int ldy, const uint16_t *W, int cols, const float *x, int ldx,
				 int nx, int r0, int r1)
{
	for (int r = r0; r < r1; r++)
	{
		const uint16_t *w = W + (size_t) r * cols;

		for (int j = 0; j < nx; j++)
		{
			const float *xj = x + (size_t) j * ldx;
			float		s = 0;

			for (int c = 0; c < cols; c++)
				s += kl_bf16_to_f32(w[c]) * xj[c];
			y[(size_t) j * ldy + r] = s;
		}
	}
}

static void
gemv_f32_scalar(float *y, int ldy, const float *W, int cols, const float *x, int ldx,
				int nx, int r0, int r1)
{
	for (int r = r0; r < r1; r++)
		for (int j = 0; j < nx; j++)
			y[(size_t) j * ldy + r] = dot_scalar(W + (size_t) r * cols, x + (size_t) j * ldx, cols);
}

static void
bf16_to_f32_scalar(float *out, const uint16_t *in, size_t n)
{
	for (size_t i = 0; i < n; i++)
		out[i] = kl_bf16_to_f32(in[i]);
}

static void
vexp_scalar(float *y, const float *x, int n)
{
	for (int i = 0; i < n; i++)
		y[i] = expf(x[i]);
}

static float
vmax_scalar(const float *x, int n)
{
	float		m = x[0];

	for (int i = 1; i < n; i++)
		m = x[i] > m ? x[i] : m;
	return m;
}

static float
exp_shift_sum_scalar(float *y, const float *x, float shift, int n)
{
	float		s = 0;

	for (int i = 0; i < n; i++)
		s += (y[i] = expf(x[i] - shift));
	return s;
}

static const kl_simd simd_scalar = {
	"scalar", dot_scalar, axpy_scalar, scale_scalar, gemv_bf16_scalar, gemv_f32_scalar,
	bf16_to_f32_scalar, vexp_scalar, vmax_scalar, exp_shift_sum_scalar, NULL, kl_gemv_q_scalar,
	q4_xlen_blocks, kl_q4_permute_x
};

/*
 * exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2]
 * (ln 2 split in two parts so that r is exact), exp(r) by a degree-6
 * polynomial (Taylor coefficients; error below 1 ulp on that interval).
 * Inputs below -87.3 give 0 (as expf's result would be subnormal or 0), above
 * 88.7 give +inf.  The vector variants follow the same steps.
 */
#define EXP_HI 88.7228317f
#define EXP_LO (-87.3365479f)
#define LOG2E 1.44269504f
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
#define P1 1.0f
#define P2 0.5f
#define P3 0.166666672f
#define P4 4.16666679e-2f
#define P5 8.33333377e-3f
#define P6 1.38888892e-3f
#define P7 1.98412701e-4f

/* ------------------------------------------------------------------ AVX2 + FMA */

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float
hsum256(__m256 v)
{
	__m128		lo = _mm256_castps256_ps128(v);
	__m128		hi = _mm256_extractf128_ps(v, 1);

	lo = _mm_add_ps(lo, hi);
	lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
	lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
	return _mm_cvtss_f32(lo);
}

AVX2 static inline __m256
bf16x8(const uint16_t *p)
{
	__m128i		h = _mm_loadu_si128((const __m128i *) p);

	return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static float
dot_avx2(const float *a, const float *b, int n)
{
	__m256		s0 = _mm256_setzero_ps(),
				s1 = _mm256_setzero_ps();
	int			i = 0;
	float		s;

	for (; i + 16 <= n; i += 16)
	{
		s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
		s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
	}
	for (; i + 8 <= n; i += 8)
		s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
	s = hsum256(_mm256_add_ps(s0, s1));
	for (; i < n; i++)
		s += a[i] * b[i];
	return s;
}

AVX2 static void
axpy_avx2(float *y, float a, const float *x, int n)
{
	__m256		va = _mm256_set1_ps(a);
	int			i = 0;

	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
	for (; i < n; i++)
		y[i] += a * x[i];
}

AVX2 static void
scale_avx2(float *y, float a, int n)
{
	__m256		va = _mm256_set1_ps(a);
	int			i = 0;

	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
	for (; i < n; i++)
		y[i] *= a;
}

AVX2 static void
gemv_bf16_avx2(float *y, int ldy, const uint16_t *W, int cols, const float *x, int ldx,
			   int nx, int r0, int r1)
{
	int			r = r0;

	for (; r + 4 <= r1; r += 4)
	{
		const uint16_t *w0 = W + (size_t) r * cols;
		const uint16_t *w1 = w0 + cols,
				   *w2 = w1 + cols,
				   *w3 = w2 + cols;

		for (int j = 0; j < nx; j++)
		{
			const float *xj = x + (size_t) j * ldx;
			__m256		a0 = _mm256_setzero_ps(),
						a1 = _mm256_setzero_ps(),
						a2 = _mm256_setzero_ps(),
						a3 = _mm256_setzero_ps();
			int			c = 0;
			float		s0,
						s1,
						s2,
						s3;

			for (; c + 8 <= cols; c += 8)
			{
				__m256		xv = _mm256_loadu_ps(xj + c);

				if (j == 0 && (c & 31) == 0)
				{
					_mm_prefetch((const char *) (w0 + 8 * cols + c), _MM_HINT_T0);
					_mm_prefetch((const char *) (w1 + 8 * cols + c), _MM_HINT_T0);
					_mm_prefetch((const char *) (w2 + 8 * cols + c), _MM_HINT_T0);
					_mm_prefetch((const char *) (w3 + 8 * cols + c), _MM_HINT_T0);
				}
				a0 = _mm256_fmadd_ps(bf16x8(w0 + c), xv, a0);
				a1 = _mm256_fmadd_ps(bf16x8(w1 + c), xv, a1);
				a2 = _mm256_fmadd_ps(bf16x8(w2 + c), xv, a2);
				a3 = _mm256_fmadd_ps(bf16x8(w3 + c), xv, a3);
			}
			s0 = hsum256(a0);
			s1 = hsum256(a1);
			s2 = hsum256(a2);
			s3 = hsum256(a3);
			for (; c < cols; c++)
			{
				s0 += kl_bf16_to_f32(w0[c]) * xj[c];
				s1 += kl_bf16_to_f32(w1[c]) * xj[c];
				s2 += kl_bf16_to_f32(w2[c]) * xj[c];
				s3 += kl_bf16_to_f32(w3[c]) * xj[c];
			}
			y[(size_t) j * ldy + r] = s0;
			y[(size_t) j * ldy + r + 1] = s1;
			y[(size_t) j * ldy + r + 2] = s2;
			y[(size_t) j * ldy + r + 3] = s3;
		}
	}
	for (; r < r1; r++)
	{
		const uint16_t *w = W + (size_t) r * cols;

		for (int j = 0; j < nx; j++)
		{
			const float *xj = x + (size_t) j * ldx;
			__m256		a0 = _mm256_setzero_ps();
			int			c = 0;
			float		s;

			for (; c + 8 <= cols; c += 8)
				a0 = _mm256_fmadd_ps(bf16x8(w + c), _mm256_loadu_ps(xj + c), a0);
			s = hsum256(a0);
			for (; c < cols; c++)
				s += kl_bf16_to_f32(w[c]) * xj[c];
			y[(size_t) j * ldy + r] = s;
		}
	}
}

AVX2 static void
gemv_f32_avx2(float *y, int ldy, const float *W, int cols, const float *x, int ldx,
			  int nx, int r0, int r1)
{
	for (int r = r0; r < r1; r++)
		for (int j = 0; j < nx; j++)
			y[(size_t) j * ldy + r] = dot_avx2(W + (size_t) r * cols, x + (size_t) j * ldx, cols);
}

AVX2 static void
bf16_to_f32_avx2(float *out, const uint16_t *in, size_t n)
{
	size_t		i = 0;

	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(out + i, bf16x8(in + i));
	for (; i < n; i++)
		out[i] = kl_bf16_to_f32(in[i]);
}

AVX2 static inline __m256
exp8(__m256 x)
{
	__m256		n,
				r,
				p;
	__m256i		e;
	__m256		tiny = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_LT_OQ);

	x = _mm256_min_ps(x, _mm256_set1_ps(EXP_HI));
	x = _mm256_max_ps(x, _mm256_set1_ps(EXP_LO));
	n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
	r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
	p = _mm256_set1_ps(P7);
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P6));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
	/* 2^n: n in [-126, 128]; split so that each factor is a normal number */
	e = _mm256_cvtps_epi32(n);
	{
		__m256i		e1 = _mm256_srai_epi32(e, 1);
		__m256i		e2 = _mm256_sub_epi32(e, e1);
		__m256		f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e1, _mm256_set1_epi32(127)), 23));
		__m256		f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e2, _mm256_set1_epi32(127)), 23));

		p = _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
	}
	return _mm256_andnot_ps(tiny, p);
}

AVX2 static void
vexp_avx2(float *y, const float *x, int n)
{
	int			i = 0;

	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(y + i, exp8(_mm256_loadu_ps(x + i)));
	if (i < n)
	{
		float		buf[8] = {0};

		memcpy(buf, x + i, sizeof(float) * (size_t) (n - i));
		_mm256_storeu_ps(buf, exp8(_mm256_loadu_ps(buf)));
		memcpy(y + i, buf, sizeof(float) * (size_t) (n - i));
	}
}

AVX2 static float
vmax_avx2(const float *x, int n)
{
	__m256		m = _mm256_set1_ps(x[0]);
	int			i = 0;
	float		buf[8],
				r;

	for (; i + 8 <= n; i += 8)
		m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
	_mm256_storeu_ps(buf, m);
	r = buf[0];
	for (int k = 1; k < 8; k++)
		r = buf[k] > r ? buf[k] : r;
	for (; i < n; i++)
		r = x[i] > r ? x[i] : r;
	return r;
}

AVX2 static float
exp_shift_sum_avx2(float *y, const float *x, float shift, int n)
{
	__m256		sh = _mm256_set1_ps(shift),
				acc = _mm256_setzero_ps();
	int			i = 0;
	float		s;

	for (; i + 8 <= n; i += 8)
	{
		__m256		e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));

		_mm256_storeu_ps(y + i, e);
		acc = _mm256_add_ps(acc, e);
	}
	s = hsum256(acc);
	for (; i < n; i++)
		s += (y[i] = expf(x[i] - shift));
	return s;
}

static const kl_simd simd_avx2 = {
	"avx2", dot_avx2, axpy_avx2, scale_avx2, gemv_bf16_avx2, gemv_f32_avx2, bf16_to_f32_avx2,
	vexp_avx2, vmax_avx2, exp_shift_sum_avx2, NULL, kl_gemv_q_avx2, q4_xlen_blocks, kl_q4_permute_x
};

/* ------------------------------------------------------------------ AVX-512 */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#ifndef PF_DIST
#define PF_DIST 8				/* rows ahead to prefetch in the GEMV kernels */
#endif

AVX512 static inline __m512
bf16x16(const uint16_t *p)
{
	__m256i		h = _mm256_loadu_si256((const __m256i *) p);

	return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AVX512 static inline __m512
bf16x16_mask(const uint16_t *p, __mmask16 m)
{
	__m256i		h = _mm256_maskz_loadu_epi16(m, p);

	return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AVX512 static float
dot_avx512(const float *a, const float *b, int n)
{
	__m512		s0 = _mm512_setzero_ps(),
				s1 = _mm512_setzero_ps();
	int			i = 0;

	for (; i + 32 <= n; i += 32)
	{
		s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
		s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
	}
	for (; i + 16 <= n; i += 16)
		s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
	if (i < n)
	{
		__mmask16	m = (__mmask16) ((1u << (n - i)) - 1);

		s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s1);
	}
	return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

AVX512 static void
axpy_avx512(float *y, float a, const float *x, int n)
{
	__m512		va = _mm512_set1_ps(a);
	int			i = 0;

	for (; i + 16 <= n; i += 16)
		_mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
	if (i < n)
	{
		__mmask16	m = (__mmask16) ((1u << (n - i)) - 1);

		_mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i),
														_mm512_maskz_loadu_ps(m, y + i)));
	}
}

AVX512 static void
scale_avx512(float *y, float a, int n)
{
	__m512		va = _mm512_set1_ps(a);
	int			i = 0;

	for (; i + 16 <= n; i += 16)
		_mm512_storeu_ps(y + i, _mm512_mul_ps(va, _mm512_loadu_ps(y + i)));
	if (i < n)
	{
		__mmask16	m = (__mmask16) ((1u << (n - i)) - 1);

		_mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(va, _mm512_maskz_loadu_ps(m, y + i)));
	}
}

/*
 * Four weight rows against four inputs at once: 16 accumulators; each weight
 * chunk is loaded and widened once for all four inputs.  Every (row, input)
 * accumulates lane by lane in the same order as the one-input path, and is
 * reduced the same way, so the result for a row does not depend on how many
 * inputs are processed together (batch invariance).
 */
AVX512 static inline void
gemv4x4_bf16_avx512(float *y, int ldy, const uint16_t *w0, int cols, const float *x, int ldx, int r,
					bool prefetch)
{
	int			tail = cols & 15;
	int			body = cols - tail;
	__mmask16	m = (__mmask16) ((1u << tail) - 1);
	const uint16_t *w1 = w0 + cols,
			   *w2 = w1 + cols,
			   *w3 = w2 + cols;
	const float *x0 = x,
			   *x1 = x + ldx,
			   *x2 = x + 2 * (size_t) ldx,
			   *x3 = x + 3 * (size_t) ldx;
	__m512		a[16];

	for (int i = 0; i < 16; i++)
		a[i] = _mm512_setzero_ps();
	for (int c = 0; c <= body; c += 16)
	{
		__m512		wv0,
					wv1,
					wv2,
					wv3,
					xv;
		bool		last = c == body;

		if (last && !tail)
			break;
		if (last)
		{
			wv0 = bf16x16_mask(w0 + c, m);
			wv1 = bf16x16_mask(w1 + c, m);
			wv2 = bf16x16_mask(w2 + c, m);
			wv3 = bf16x16_mask(w3 + c, m);
		}
		else
		{
			if (prefetch && (c & 31) == 0)
			{
				_mm_prefetch((const char *) (w0 + PF_DIST * cols + c), _MM_HINT_T0);
				_mm_prefetch((const char *) (w1 + PF_DIST * cols + c), _MM_HINT_T0);
				_mm_prefetch((const char *) (w2 + PF_DIST * cols + c), _MM_HINT_T0);
				_mm_prefetch((const char *) (w3 + PF_DIST * cols + c), _MM_HINT_T0);
			}
			wv0 = bf16x16(w0 + c);
			wv1 = bf16x16(w1 + c);
			wv2 = bf16x16(w2 + c);
			wv3 = bf16x16(w3 + c);
		}
#define INPUT(j, xp) \
		xv = last ? _mm512_maskz_loadu_ps(m, (xp) + c) : _mm512_loadu_ps((xp) + c); \
		a[4 * (j) + 0] = _mm512_fmadd_ps(wv0, xv, a[4 * (j) + 0]); \
		a[4 * (j) + 1] = _mm512_fmadd_ps(wv1, xv, a[4 * (j) + 1]); \
		a[4 * (j) + 2] = _mm512_fmadd_ps(wv2, xv, a[4 * (j) + 2]); \
		a[4 * (j) + 3] = _mm512_fmadd_ps(wv3, xv, a[4 * (j) + 3])
		INPUT(0, x0);
		INPUT(1, x1);
		INPUT(2, x2);
		INPUT(3, x3);
#undef INPUT
	}
	for (int j = 0; j < 4; j++)
		for (int i = 0; i < 4; i++)
			y[(size_t) j * ldy + r + i] = _mm512_reduce_add_ps(a[4 * j + i]);
}

AVX512 static void
gemv_bf16_avx512(float *y, int ldy, const uint16_t *W, int cols, const float *x, int ldx,
				 int nx, int r0, int r1)
{
	int			tail = cols & 15;
	int			body = cols - tail;
	__mmask16	m = (__mmask16) ((1u << tail) - 1);
	int			r = r0;

	for (; r + 4 <= r1; r += 4)
	{
		const uint16_t *w0 = W + (size_t) r * cols;
		const uint16_t *w1 = w0 + cols,
				   *w2 = w1 + cols,
				   *w3 = w2 + cols;
		int			j = 0;

		/* inputs four at a time, then one at a time */
		for (; j + 4 <= nx; j += 4)
			gemv4x4_bf16_avx512(y + (size_t) j * ldy, ldy, w0, cols, x + (size_t) j * ldx, ldx, r, j == 0);
		for (; j < nx; j++)
		{
			const float *xj = x + (size_t) j * ldx;
			__m512		a0 = _mm512_setzero_ps(),
						a1 = _mm512_setzero_ps(),
						a2 = _mm512_setzero_ps(),
						a3 = _mm512_setzero_ps();
			float	   *yj = y + (size_t) j * ldy + r;

			for (int c = 0; c < body; c += 16)
			{
				__m512		xv = _mm512_loadu_ps(xj + c);

				if (j == 0 && (c & 31) == 0)
				{
					/* the next rows, a block ahead: keeps more misses in flight */
					_mm_prefetch((const char *) (w0 + PF_DIST * cols + c), _MM_HINT_T0);
					_mm_prefetch((const char *) (w1 + PF_DIST * cols + c), _MM_HINT_T0);
					_mm_prefetch((const char *) (w2 + PF_DIST * cols + c), _MM_HINT_T0);
					_mm_prefetch((const char *) (w3 + PF_DIST * cols + c), _MM_HINT_T0);
				}
				a0 = _mm512_fmadd_ps(bf16x16(w0 + c), xv, a0);
				a1 = _mm512_fmadd_ps(bf16x16(w1 + c), xv, a1);
				a2 = _mm512_fmadd_ps(bf16x16(w2 + c), xv, a2);
				a3 = _mm512_fmadd_ps(bf16x16(w3 + c), xv, a3);
			}
			if (tail)
			{
				__m512		xv = _mm512_maskz_loadu_ps(m, xj + body);

				a0 = _mm512_fmadd_ps(bf16x16_mask(w0 + body, m), xv, a0);
				a1 = _mm512_fmadd_ps(bf16x16_mask(w1 + body, m), xv, a1);
				a2 = _mm512_fmadd_ps(bf16x16_mask(w2 + body, m), xv, a2);
				a3 = _mm512_fmadd_ps(bf16x16_mask(w3 + body, m), xv, a3);
			}
			yj[0] = _mm512_reduce_add_ps(a0);
			yj[1] = _mm512_reduce_add_ps(a1);
			yj[2] = _mm512_reduce_add_ps(a2);
			yj[3] = _mm512_reduce_add_ps(a3);
		}
	}
	for (; r < r1; r++)
	{
		const uint16_t *w = W + (size_t) r * cols;

		for (int j = 0; j < nx; j++)
		{
			const float *xj = x + (size_t) j * ldx;
			__m512		a0 = _mm512_setzero_ps();

			for (int c = 0; c < body; c += 16)
				a0 = _mm512_fmadd_ps(bf16x16(w + c), _mm512_loadu_ps(xj + c), a0);
			if (tail)
				a0 = _mm512_fmadd_ps(bf16x16_mask(w + body, m), _mm512_maskz_loadu_ps(m, xj + body), a0);
			y[(size_t) j * ldy + r] = _mm512_reduce_add_ps(a0);
		}
	}
}

AVX512 static void
gemv_f32_avx512(float *y, int ldy, const float *W, int cols, const float *x, int ldx,
				int nx, int r0, int r1)
{
	int			tail = cols & 15;
	int			body = cols - tail;
	__mmask16	m = (__mmask16) ((1u << tail) - 1);
	int			r = r0;

	for (; r + 4 <= r1; r += 4)
	{
		const float *w0 = W + (size_t) r * cols;
		const float *w1 = w0 + cols,
				   *w2 = w1 + cols,
				   *w3 = w2 + cols;

		for (int j = 0; j < nx; j++)
		{
			const float *xj = x + (size_t) j * ldx;
			__m512		a0 = _mm512_setzero_ps(),
						a1 = _mm512_setzero_ps(),
						a2 = _mm512_setzero_ps(),
						a3 = _mm512_setzero_ps();
			float	   *yj = y + (size_t) j * ldy + r;

			for (int c = 0; c < body; c += 16)
			{
				__m512		xv = _mm512_loadu_ps(xj + c);

				a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + c), xv, a0);
				a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + c), xv, a1);
				a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + c), xv, a2);
				a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + c), xv, a3);
			}
			if (tail)
			{
				__m512		xv = _mm512_maskz_loadu_ps(m, xj + body);

				a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w0 + body), xv, a0);
				a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w1 + body), xv, a1);
				a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w2 + body), xv, a2);
				a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w3 + body), xv, a3);
			}
			yj[0] = _mm512_reduce_add_ps(a0);
			yj[1] = _mm512_reduce_add_ps(a1);
			yj[2] = _mm512_reduce_add_ps(a2);
			yj[3] = _mm512_reduce_add_ps(a3);
		}
	}
	for (; r < r1; r++)
		for (int j = 0; j < nx; j++)
			y[(size_t) j * ldy + r] = dot_avx512(W + (size_t) r * cols, x + (size_t) j * ldx, cols);
}

AVX512 static void
bf16_to_f32_avx512(float *out, const uint16_t *in, size_t n)
{
	size_t		i = 0;

	for (; i + 16 <= n; i += 16)
		_mm512_storeu_ps(out + i, bf16x16(in + i));
	for (; i < n; i++)
		out[i] = kl_bf16_to_f32(in[i]);
}

AVX512 static inline __m512
exp16(__m512 x)
{
	__mmask16	tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_LO), _CMP_LT_OQ);
	__m512		n,
				r,
				p;
	__m512i		e,
				e1,
				e2;

	x = _mm512_min_ps(x, _mm512_set1_ps(EXP_HI));
	x = _mm512_max_ps(x, _mm512_set1_ps(EXP_LO));
	n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
	r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
	p = _mm512_set1_ps(P7);
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P6));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P5));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P4));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P3));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P2));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(P1));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
	e = _mm512_cvtps_epi32(n);
	e1 = _mm512_srai_epi32(e, 1);
	e2 = _mm512_sub_epi32(e, e1);
	p = _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e1, _mm512_set1_epi32(127)), 23)));
	p = _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e2, _mm512_set1_epi32(127)), 23)));
	return _mm512_maskz_mov_ps((__mmask16) ~tiny, p);
}

AVX512 static void
vexp_avx512(float *y, const float *x, int n)
{
	int			i = 0;

	for (; i + 16 <= n; i += 16)
		_mm512_storeu_ps(y + i, exp16(_mm512_loadu_ps(x + i)));
	if (i < n)
	{
		__mmask16	m = (__mmask16) ((1u << (n - i)) - 1);

		_mm512_mask_storeu_ps(y + i, m, exp16(_mm512_maskz_loadu_ps(m, x + i)));
	}
}

/* four horizontal sums at once: {sum a, sum b, sum c, sum d} */
AVX512 static inline __m128
hsum4(__m512 a, __m512 b, __m512 c, __m512 d)
{
	__m256		a2 = _mm256_add_ps(_mm512_castps512_ps256(a),
								   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
	__m256		b2 = _mm256_add_ps(_mm512_castps512_ps256(b),
								   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
	__m256		c2 = _mm256_add_ps(_mm512_castps512_ps256(c),
								   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
	__m256		d2 = _mm256_add_ps(_mm512_castps512_ps256(d),
								   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
	__m256		ab = _mm256_hadd_ps(a2, b2);
	__m256		cd = _mm256_hadd_ps(c2, d2);
	__m256		abcd = _mm256_hadd_ps(ab, cd);

	return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/*
 * Scores of up to 4 query rows against 4 keys at a time: 16 accumulators,
 * 8 loads per 16 FMAs, one tree reduction per 4 results.
 */
AVX512 static void
few_scores_avx512(float *S, int lds, const float *Q, int ldq, int nr,
				  const float *K, int ldk, int nk, int d, float scale)
{
	int			tail = d & 15;
	int			body = d - tail;
	__mmask16	m = (__mmask16) ((1u << tail) - 1);

	for (int r0 = 0; r0 < nr; r0 += 4)
	{
		int			rn = nr - r0 < 4 ? nr - r0 : 4;
		const float *q0 = Q + (size_t) r0 * ldq;
		const float *q1 = Q + (size_t) (r0 + (rn > 1 ? 1 : 0)) * ldq;
		const float *q2 = Q + (size_t) (r0 + (rn > 2 ? 2 : 0)) * ldq;
		const float *q3 = Q + (size_t) (r0 + (rn > 3 ? 3 : 0)) * ldq;
		int			j = 0;

		for (; j + 4 <= nk; j += 4)
		{
			const float *k0 = K + (size_t) j * ldk,
					   *k1 = k0 + ldk,
					   *k2 = k1 + ldk,
					   *k3 = k2 + ldk;
			__m512		a[16];
			__m128		res[4];

			for (int i = 0; i < 16; i++)
				a[i] = _mm512_setzero_ps();
			for (int c = 0; c <= body; c += 16)
			{
				__m512		kv0,
							kv1,
							kv2,
							kv3,
							qv;

				if (c == body)
				{
					if (!tail)
						break;
					kv0 = _mm512_maskz_loadu_ps(m, k0 + c);
					kv1 = _mm512_maskz_loadu_ps(m, k1 + c);
					kv2 = _mm512_maskz_loadu_ps(m, k2 + c);
					kv3 = _mm512_maskz_loadu_ps(m, k3 + c);
				}
				else
				{
					kv0 = _mm512_loadu_ps(k0 + c);
					kv1 = _mm512_loadu_ps(k1 + c);
					kv2 = _mm512_loadu_ps(k2 + c);
					kv3 = _mm512_loadu_ps(k3 + c);
				}
#define ROW(i, q) \
				qv = c == body ? _mm512_maskz_loadu_ps(m, (q) + c) : _mm512_loadu_ps((q) + c); \
				a[4 * i + 0] = _mm512_fmadd_ps(qv, kv0, a[4 * i + 0]); \
				a[4 * i + 1] = _mm512_fmadd_ps(qv, kv1, a[4 * i + 1]); \
				a[4 * i + 2] = _mm512_fmadd_ps(qv, kv2, a[4 * i + 2]); \
				a[4 * i + 3] = _mm512_fmadd_ps(qv, kv3, a[4 * i + 3])
				ROW(0, q0);
				ROW(1, q1);
				ROW(2, q2);
				ROW(3, q3);
#undef ROW
			}
			for (int i = 0; i < 4; i++)
				res[i] = _mm_mul_ps(hsum4(a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]), _mm_set1_ps(scale));
			for (int i = 0; i < rn; i++)
				_mm_storeu_ps(S + (size_t) (r0 + i) * lds + j, res[i]);
		}
		for (; j < nk; j++)
			for (int i = 0; i < rn; i++)
				S[(size_t) (r0 + i) * lds + j] = scale * dot_avx512(Q + (size_t) (r0 + i) * ldq,
																	 K + (size_t) j * ldk, d);
	}
}

AVX512 static float
vmax_avx512(const float *x, int n)
{
	__m512		m = _mm512_set1_ps(x[0]);
	int			i = 0;

	for (; i + 16 <= n; i += 16)
		m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
	if (i < n)
		m = _mm512_mask_max_ps(m, (__mmask16) ((1u << (n - i)) - 1), m, _mm512_maskz_loadu_ps((__mmask16) ((1u << (n - i)) - 1), x + i));
	return _mm512_reduce_max_ps(m);
}

AVX512 static float
exp_shift_sum_avx512(float *y, const float *x, float shift, int n)
{
	__m512		sh = _mm512_set1_ps(shift),
				acc = _mm512_setzero_ps();
	int			i = 0;

	for (; i + 16 <= n; i += 16)
	{
		__m512		e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), sh));

		_mm512_storeu_ps(y + i, e);
		acc = _mm512_add_ps(acc, e);
	}
	if (i < n)
	{
		__mmask16	m = (__mmask16) ((1u << (n - i)) - 1);
		__m512		e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), sh)));

		_mm512_mask_storeu_ps(y + i, m, e);
		acc = _mm512_add_ps(acc, e);
	}
	return _mm512_reduce_add_ps(acc);
}

static const kl_simd simd_avx512 = {
	"avx512", dot_avx512, axpy_avx512, scale_avx512, gemv_bf16_avx512, gemv_f32_avx512,
	bf16_to_f32_avx512, vexp_avx512, vmax_avx512, exp_shift_sum_avx512, few_scores_avx512,
	kl_gemv_q_avx512, q4_xlen_spans, kl_q4_permute_span
};

/* ------------------------------------------------------------------ dispatch */

static bool
has_avx512(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
		__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}

static bool
has_avx2(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

const kl_simd *
kl_simd_variant(const char *name)
{
	if (strcmp(name, "avx512") == 0)
		return has_avx512() ? &simd_avx512 : NULL;
	if (strcmp(name, "avx2") == 0)
		return has_avx2() ? &simd_avx2 : NULL;
	if (strcmp(name, "scalar") == 0)
		return &simd_scalar;
	return NULL;
}

const kl_simd *
kl_simd_get(void)
{
	static const kl_simd *chosen;

	if (!chosen)
	{
		const char *want = getenv("KL_SIMD");
		const kl_simd *s = want ? kl_simd_variant(want) : NULL;

		if (!s)
			s = has_avx512() ? &simd_avx512 : has_avx2() ? &simd_avx2 : &simd_scalar;
		chosen = s;
	}
	return chosen;
}
