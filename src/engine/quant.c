/*
 * quant.c — see quant.h: the quantized forms, FP8 E4M3 conversion, exact
 * dequantization (the reference the SIMD kernels in simd.c match), and
 * quantization of f32 weights at load.
 */
#include "quant.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

const char *
kl_qtype_name(kl_qtype t)
{
	switch (t)
	{
		case KL_Q_FP8:
			return "fp8";
		case KL_Q_INT8:
			return "int8";
		case KL_Q_INT4:
			return "int4";
		default:
			return "none";
	}
}

size_t
kl_q_row_bytes(kl_qtype t, int cols)
{
	if (t == KL_Q_INT4)
		return (size_t) (cols + 7) / 8 * 4;
	return (size_t) cols;
}

size_t
kl_q_bytes(const kl_qmat *q)
{
	return q->row_bytes * (size_t) q->rows + sizeof(float) * (size_t) q->rows * q->n_groups;
}

int
kl_q_validate(const kl_qmat *q, const char *what, kl_err *err)
{
	int			block = q->type == KL_Q_INT4 ? 32 : 16;
	size_t		ns = (size_t) q->rows * q->n_groups;

	if (q->group <= 0 || (q->group != q->cols && q->group % block != 0))
		return kl_errc(err, KL_E_UNSUPPORTED,
					   "%s: group size %d is not supported for %s weights (it must be a multiple "
					   "of %d, or the row length %d)", what, q->group, kl_qtype_name(q->type), block, q->cols);
	if (q->n_groups != (q->cols + q->group - 1) / q->group)
		return kl_errc(err, KL_E_INVALID, "%s: %d scales per row where %d columns in groups of %d need %d", what,
					   q->n_groups, q->cols, q->group, (q->cols + q->group - 1) / q->group);
	for (size_t i = 0; i < ns; i++)
	{
		float		s = q->scales[i];

		if (!isfinite(s))
			return kl_errc(err, KL_E_INVALID, "%s: scale %zu (row %zu) is %g; scales must be finite numbers", what, i,
						   i / (size_t) q->n_groups, s);
		if (q->type == KL_Q_FP8 && fabsf(s) >= 256.0f)
			return kl_errc(err, KL_E_INVALID, "%s: scale %zu (row %zu) is %g; FP8 scales must be below 256 in "
						   "magnitude", what, i, i / (size_t) q->n_groups, s);
	}
	if (q->type == KL_Q_FP8)
		for (int r = 0; r < q->rows; r++)
		{
			const uint8_t *row = q->data + (size_t) r * q->row_bytes;

			for (int c = 0; c < q->cols; c++)
				if ((row[c] & 0x7f) == 0x7f)
					return kl_errc(err, KL_E_INVALID, "%s: weight [%d, %d] is an FP8 NaN (0x%02x)", what, r, c, row[c]);
		}
	return KL_OK;
}

/* ------------------------------------------------------------------ FP8 E4M3 */

/*
 * The E4M3 bits placed in an fp32 (sign at 31, exponent and mantissa at
 * 20..26) read as the value times 2^-120 exactly, subnormal codes included
 * (they become fp32 subnormals); one exact multiply by 2^120 restores it.
 */
float
kl_e4m3_to_f32(uint8_t b)
{
	uint32_t	u = ((uint32_t) (b & 0x80) << 24) | ((uint32_t) (b & 0x7f) << 20);
	float		f;

	if ((b & 0x7f) == 0x7f)
		return NAN;
	memcpy(&f, &u, 4);
	return f * 0x1p120f;
}

uint8_t
kl_f32_to_e4m3(float f)
{
	uint8_t		sign = signbit(f) ? 0x80 : 0;
	float		a = fabsf(f);
	int			ex;
	float		r;

	if (isnan(f))
		return 0x7f;
	if (a < 0x1p-6f)
	{
		/* subnormal range: multiples of 2^-9; rounding up to 8 gives the
		 * smallest normal, whose code is 8 too */
		r = rintf(ldexpf(a, 9));
		return sign | (uint8_t) r;
	}
	(void) frexpf(a, &ex);		/* a = fr * 2^ex, fr in [0.5, 1) */
	ex -= 1;					/* a = 1.m * 2^ex */
	r = rintf(ldexpf(a, 3 - ex));	/* in [8, 16] */
	if (r == 16.0f)
	{
		r = 8.0f;
		ex++;
	}
	if (ex > 8 || (ex == 8 && r > 14.0f))
		return sign | 0x7e;		/* saturate at 448 */
	return sign | (uint8_t) (((ex + 7) << 3) | ((int) r - 8));
}

/* ------------------------------------------------------------------ dequantization */

/*
 * Group by group with the scale hoisted, in loops the compiler vectorizes:
 * the sgemm path widens whole blocks of rows with this.
 */
void
kl_q_dequant_row(const kl_qmat *q, int r, float *out)
{
	const uint8_t *row = q->data + (size_t) r * q->row_bytes;
	const float *scales = q->scales + (size_t) r * q->n_groups;

	for (int g = 0; g < q->n_groups; g++)
	{
		int			c0 = g * q->group,
					c1 = q->cols - c0 < q->group ? q->cols : c0 + q->group;
		float		s = scales[g];

		switch (q->type)
		{
			case KL_Q_FP8:
				{
					/* the bits in an fp32 read 2^-120 too small (exactly); s < 256 (validated) */
					float		s120 = s * 0x1p120f;

					for (int c = c0; c < c1; c++)
					{
						uint32_t	u = ((uint32_t) (row[c] & 0x80) << 24) | ((uint32_t) (row[c] & 0x7f) << 20);
						float		f;

						memcpy(&f, &u, 4);
						out[c] = f * s120;
					}
				}
				break;
			case KL_Q_INT8:
				for (int c = c0; c < c1; c++)
					out[c] = (float) (int8_t) row[c] * s;
				break;
			case KL_Q_INT4:
				/* groups start at even columns (multiples of 32) */
				for (int c = c0; c + 1 < c1; c += 2)
				{
					out[c] = (float) ((row[c / 2] & 15) - 8) * s;
					out[c + 1] = (float) ((row[c / 2] >> 4) - 8) * s;
				}
				if ((c1 - c0) & 1)
					out[c1 - 1] = (float) ((row[(c1 - 1) / 2] & 15) - 8) * s;
				break;
			default:
				memset(out + c0, 0, sizeof(float) * (size_t) (c1 - c0));
		}
	}
}

void
kl_q4_permute_x(float *dst, const float *x, int cols)
{
	int			n = kl_q4_xperm_len(cols);

	for (int b = 0; b < n; b += 32)
		for (int j = 0; j < 16; j++)
		{
			int			ce = b + 2 * j,
						co = ce + 1;

			dst[b + j] = ce < cols ? x[ce] : 0.0f;
			dst[b + 16 + j] = co < cols ? x[co] : 0.0f;
		}
}

/* ------------------------------------------------------------------ quantization */

static float
absmax(const float *w, int n)
{
	float		m = 0;

	for (int i = 0; i < n; i++)
		m = fabsf(w[i]) > m ? fabsf(w[i]) : m;
	return m;
}

static inline int
clampi(int v, int lo, int hi)
{
	return v < lo ? lo : v > hi ? hi : v;
}

/* int4: the scale among absmax / (7 + k/8) with the least squared error */
static float
int4_scale(const float *w, int n, float amax)
{
	float		best_s = amax / 7.0f;
	double		best_e = -1;

	for (int k = 0; k <= 8; k++)
	{
		float		s = amax / (7.0f + (float) k / 8.0f);
		double		e = 0;

		for (int i = 0; i < n; i++)
		{
			int			qv = clampi((int) rintf(w[i] / s), -8, 7);
			double		d = (double) w[i] - (double) ((float) qv * s);

			e += d * d;
		}
		if (best_e < 0 || e < best_e)
		{
			best_e = e;
			best_s = s;
		}
	}
	return best_s;
}

static void
quantize_group(kl_qmat *q, uint8_t *row, const float *w, int c0, int n, float *scale)
{
	float		amax = absmax(w, n);
	float		s;

	switch (q->type)
	{
		case KL_Q_FP8:
			s = amax / 448.0f;
			*scale = s;
			for (int i = 0; i < n; i++)
				row[c0 + i] = s > 0 ? kl_f32_to_e4m3(w[i] / s) : 0;
			break;
		case KL_Q_INT8:
			s = amax / 127.0f;
			*scale = s;
			for (int i = 0; i < n; i++)
				row[c0 + i] = (uint8_t) (int8_t) (s > 0 ? clampi((int) rintf(w[i] / s), -127, 127) : 0);
			break;
		case KL_Q_INT4:
			s = amax > 0 ? int4_scale(w, n, amax) : 0;
			*scale = s;
			for (int i = 0; i < n; i++)
			{
				int			c = c0 + i;
				int			qv = s > 0 ? clampi((int) rintf(w[i] / s), -8, 7) : 0;
				uint8_t    *byte = &row[c / 2];

				if ((c & 1) == 0)
					*byte = (uint8_t) ((*byte & 0xf0) | (qv + 8));
				else
					*byte = (uint8_t) ((*byte & 0x0f) | ((qv + 8) << 4));
			}
			break;
		default:
			break;
	}
}

void
kl_q_quantize_rows(kl_qmat *q, const float *src, int r0, int r1)
{
	for (int r = r0; r < r1; r++)
	{
		uint8_t    *row = (uint8_t *) q->data + (size_t) r * q->row_bytes;
		float	   *scales = (float *) q->scales + (size_t) r * q->n_groups;
		const float *w = src + (size_t) (r - r0) * q->cols;

		/* padding nibbles of an int4 row hold 8 (q = 0) */
		if (q->type == KL_Q_INT4)
			memset(row, 0x88, q->row_bytes);
		for (int g = 0; g < q->n_groups; g++)
		{
			int			c0 = g * q->group;
			int			n = q->cols - c0 < q->group ? q->cols - c0 : q->group;

			quantize_group(q, row, w + c0, c0, n, &scales[g]);
		}
	}
}

int
kl_qtype_parse(const char *s, kl_qtype *out, kl_err *err)
{
	if (!s || !*s || strcmp(s, "none") == 0)
		*out = KL_Q_NONE;
	else if (strcmp(s, "fp8") == 0)
		*out = KL_Q_FP8;
	else if (strcmp(s, "int8") == 0)
		*out = KL_Q_INT8;
	else if (strcmp(s, "int4") == 0)
		*out = KL_Q_INT4;
	else
		return kl_errc(err, KL_E_INVALID, "unknown quantization \"%s\" (use fp8, int8 or int4)", s);
	return KL_OK;
}

int
kl_q_default_group(kl_qtype t, int cols)
{
	(void) cols;
	return t == KL_Q_INT4 ? 32 : cols;
}

kl_wrole
kl_q_role(const char *name)
{
	static const char *small[] = {".f_a_proj.", ".f_b_proj.", ".g_a_proj.", ".g_b_proj.", ".b_proj.",
	".kv_b_proj."};

	if (strcmp(name, "model.embed_tokens.weight") == 0)
		return KL_W_EMBED;
	if (strcmp(name, "lm_head.weight") == 0)
		return KL_W_LM_HEAD;
	if (strstr(name, ".block_sparse_moe.gate.weight"))
		return KL_W_ROUTER;
	for (size_t i = 0; i < sizeof(small) / sizeof(small[0]); i++)
		if (strstr(name, small[i]))
			return KL_W_SMALL;
	return KL_W_PROJ;
}

kl_qtype
kl_q_at_load(const char *name, kl_qtype q)
{
	kl_wrole	r = kl_q_role(name);

	return (r == KL_W_PROJ || r == KL_W_LM_HEAD) ? q : KL_Q_NONE;
}
