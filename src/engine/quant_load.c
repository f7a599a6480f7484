/*
 * quant_load.c — see quant_load.h.  Layouts of the published formats:
 *
 *   compressed-tensors FP8 / int8 ("float-quantized", "naive-quantized",
 *     "int-quantized"): weight F8_E4M3 or I8 [rows, cols]; weight_scale
 *     [rows, 1] (channel), [1] (tensor), [rows, ceil(cols / g)] (group) or
 *     [ceil(rows / br), ceil(cols / bc)] (block); w = weight * scale.
 *   compressed-tensors "pack-quantized": weight_packed I32
 *     [rows, ceil(cols * bits / 32)], value + 2^(bits-1) in consecutive
 *     bit fields from the least significant (column 32/bits * k + i at bits
 *     bits * i of word k); weight_shape [2] = (rows, cols); weight_scale as
 *     above (no block).
 *   fp8 (Hugging Face fine-grained FP8): weight F8_E4M3 [rows, cols];
 *     weight_scale_inv F32 [ceil(rows / br), ceil(cols / bc)], the
 *     multiplier despite its name: w = weight * weight_scale_inv.
 */
#include "quant_load.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "threadpool.h"

static const char *
shape_text(const kl_st_tensor *t, char *buf, size_t len)
{
	size_t		o = 0;

	o += snprintf(buf + o, len - o, "[");
	for (int i = 0; i < t->ndim && o < len; i++)
		o += snprintf(buf + o, len - o, "%s%lld", i ? ", " : "", (long long) t->shape[i]);
	if (o < len)
		snprintf(buf + o, len - o, "]");
	return buf;
}

static bool
is_2d(const kl_st_tensor *t, int64_t a, int64_t b)
{
	return t->ndim == 2 && t->shape[0] == a && t->shape[1] == b;
}

/*
 * weight_scale(_inv) -> f32 [rows, n_groups] by the config's strategy;
 * sets q->group, q->n_groups, q->scales (in mem).
 */
static int
read_scales(const kl_qconfig *qc, const kl_st_tensor *t, kl_qmat *q, void **mem, kl_err *err)
{
	int			rows = q->rows,
				cols = q->cols;
	float	   *src,
			   *dst;
	char		sb[96];
	int64_t		br = 1,
				bc = cols;

	if (!t)
		return kl_errc(err, KL_E_INVALID, "its scale tensor is missing");
	if (t->dtype != KL_DT_F32 && t->dtype != KL_DT_BF16 && t->dtype != KL_DT_F16)
		return kl_errc(err, KL_E_INVALID, "tensor \"%s\" has dtype %s; scales must be F32, BF16 or F16", t->name,
					   kl_dtype_name(t->dtype));
	switch (qc->strategy)
	{
		case KL_QSTRAT_CHANNEL:
			q->group = cols;
			if (!(is_2d(t, rows, 1) || (t->ndim == 1 && t->shape[0] == rows)))
				return kl_errc(err, KL_E_INVALID,
							   "tensor \"%s\" has shape %s, but per-channel scales of a [%d, %d] matrix "
							   "have shape [%d, 1]", t->name, shape_text(t, sb, sizeof(sb)), rows, cols, rows);
			br = 1;
			break;
		case KL_QSTRAT_TENSOR:
			q->group = cols;
			if (t->numel != 1)
				return kl_errc(err, KL_E_INVALID, "tensor \"%s\" has shape %s, but a per-tensor scale is one number",
							   t->name, shape_text(t, sb, sizeof(sb)));
			br = rows;
			break;
		case KL_QSTRAT_GROUP:
			q->group = qc->group;
			if (!is_2d(t, rows, (cols + qc->group - 1) / qc->group))
				return kl_errc(err, KL_E_INVALID,
							   "tensor \"%s\" has shape %s, but scales of a [%d, %d] matrix in groups of "
							   "%d columns have shape [%d, %d]", t->name, shape_text(t, sb, sizeof(sb)), rows,
							   cols, qc->group, rows, (cols + qc->group - 1) / qc->group);
			br = 1;
			bc = qc->group;
			break;
		case KL_QSTRAT_BLOCK:
			q->group = qc->block_cols;
			br = qc->block_rows;
			bc = qc->block_cols;
			if (!is_2d(t, (rows + br - 1) / br, (cols + bc - 1) / bc))
				return kl_errc(err, KL_E_INVALID,
							   "tensor \"%s\" has shape %s, but scales of a [%d, %d] matrix in blocks of "
							   "%lld x %lld have shape [%lld, %lld]", t->name, shape_text(t, sb, sizeof(sb)),
							   rows, cols, (long long) br, (long long) bc, (long long) ((rows + br - 1) / br),
							   (long long) ((cols + bc - 1) / bc));
			break;
	}
	q->n_groups = (cols + q->group - 1) / q->group;
	src = kl_malloc(sizeof(float) * (size_t) t->numel, err);
	dst = kl_malloc(sizeof(float) * (size_t) rows * q->n_groups, err);
	if (!src || !dst || kl_st_to_f32(t, src, err) != KL_OK)
	{
		free(src);
		free(dst);
		return KL_FAIL;
	}
	/* expand: row r, group g takes the scale of block (r / br, g) (per tensor: the one) */
	for (int r = 0; r < rows; r++)
		for (int g = 0; g < q->n_groups; g++)
			dst[(size_t) r * q->n_groups + g] = t->numel == 1 ? src[0] :
				src[(size_t) (r / br) * (size_t) ((cols + bc - 1) / bc) + (size_t) g];
	free(src);
	*mem = dst;
	q->scales = dst;
	return KL_OK;
}

/* 8-bit values packed four to a word (value + 128) -> int8 [rows, cols] */
static int
unpack_8bit(const kl_st_tensor *t, kl_qmat *q, void **mem, kl_err *err)
{
	int64_t		words = t->shape[1];
	uint8_t    *dst = kl_malloc((size_t) q->rows * q->cols, err);

	if (!dst)
		return KL_FAIL;
	for (int r = 0; r < q->rows; r++)
	{
		const uint8_t *src = (const uint8_t *) t->data + (size_t) r * words * 4;

		for (int c = 0; c < q->cols; c++)
			dst[(size_t) r * q->cols + c] = (uint8_t) (int8_t) ((int) src[c] - 128);	/* little-endian words */
	}
	*mem = dst;
	q->data = dst;
	q->row_bytes = (size_t) q->cols;
	return KL_OK;
}

static int
read_packed(const kl_qconfig *qc, const kl_qtensors *t, kl_qmat *q, void **mem, kl_err *err)
{
	int			per_word = 32 / qc->bits;
	int64_t		words = (q->cols + per_word - 1) / per_word;
	int64_t		shape[2];
	char		sb[96];

	if (!t->packed)
		return kl_errc(err, KL_E_INVALID, "weight_packed is missing");
	if (t->packed->dtype != KL_DT_I32)
		return kl_errc(err, KL_E_INVALID, "tensor \"%s\" has dtype %s; packed weights must be I32", t->packed->name,
					   kl_dtype_name(t->packed->dtype));
	if (!is_2d(t->packed, q->rows, words))
		return kl_errc(err, KL_E_INVALID,
					   "tensor \"%s\" has shape %s, but a [%d, %d] matrix of %d-bit values packs into "
					   "[%d, %lld] words", t->packed->name, shape_text(t->packed, sb, sizeof(sb)), q->rows,
					   q->cols, qc->bits, q->rows, (long long) words);
	if (!t->shape)
		return kl_errc(err, KL_E_INVALID, "weight_shape is missing");
	if ((t->shape->dtype != KL_DT_I64 && t->shape->dtype != KL_DT_I32) || t->shape->numel != 2)
		return kl_errc(err, KL_E_INVALID,
					   "tensor \"%s\" must be two I64 or I32 numbers (rows, columns)", t->shape->name);
	for (int i = 0; i < 2; i++)
		shape[i] = t->shape->dtype == KL_DT_I64 ? ((const int64_t *) t->shape->data)[i] :
			((const int32_t *) t->shape->data)[i];
	if (shape[0] != q->rows || shape[1] != q->cols)
		return kl_errc(err, KL_E_INVALID, "tensor \"%s\" says [%lld, %lld], but config.json implies [%d, %d]",
					   t->shape->name, (long long) shape[0], (long long) shape[1], q->rows, q->cols);
	if (qc->bits == 8)
	{
		q->type = KL_Q_INT8;
		return unpack_8bit(t->packed, q, mem, err);
	}
	q->type = KL_Q_INT4;
	q->data = t->packed->data;
	q->row_bytes = (size_t) words * 4;
	return KL_OK;
}

int
kl_qload_matrix(const kl_qconfig *qc, const kl_qtensors *t, int rows, int cols, kl_qmat *q,
				void *mem[2], kl_err *err)
{
	char		sb[96];

	memset(q, 0, sizeof(*q));
	mem[0] = mem[1] = NULL;
	q->rows = rows;
	q->cols = cols;
	if (qc->scheme == KL_QS_CT_PACKED)
	{
		if (read_packed(qc, t, q, &mem[1], err) != KL_OK)
			return KL_FAIL;
	}
	else
	{
		kl_dtype	want = qc->scheme == KL_QS_CT_INT8 ? KL_DT_I8 : KL_DT_F8_E4M3;

		if (qc->scheme == KL_QS_NONE || !t->weight)
			return kl_errc(err, KL_E_INVALID, "no quantized weight");
		if (t->weight->dtype != want)
			return kl_errc(err, KL_E_INVALID,
						   "tensor \"%s\" has dtype %s, but the checkpoint's quantization (%s) stores %s",
						   t->weight->name, kl_dtype_name(t->weight->dtype), qc->describe, kl_dtype_name(want));
		if (!is_2d(t->weight, rows, cols))
			return kl_errc(err, KL_E_INVALID, "tensor \"%s\" has shape %s, but config.json implies [%d, %d]",
						   t->weight->name, shape_text(t->weight, sb, sizeof(sb)), rows, cols);
		q->type = want == KL_DT_I8 ? KL_Q_INT8 : KL_Q_FP8;
		q->data = t->weight->data;
		q->row_bytes = (size_t) cols;
	}
	if (read_scales(qc, t->scale, q, &mem[0], err) != KL_OK)
		return KL_FAIL;
	return kl_q_validate(q, t->scale->name, err);
}

/* ------------------------------------------------------------------ quantization at load */

#define QUANT_ROWS 16			/* rows per task */

typedef struct quant_job
{
	const void *src;
	kl_dtype	dtype;
	kl_qmat    *q;
	float	   *bufs;			/* per thread: QUANT_ROWS rows of f32 */
} quant_job;

static void
quant_task(void *arg, int task, int thread)
{
	quant_job  *j = arg;
	int			cols = j->q->cols;
	int			r0 = task * QUANT_ROWS,
				r1 = r0 + QUANT_ROWS < j->q->rows ? r0 + QUANT_ROWS : j->q->rows;
	size_t		n = (size_t) (r1 - r0) * cols;
	const float *f;

	if (j->dtype == KL_DT_F32)
		f = (const float *) j->src + (size_t) r0 * cols;
	else
	{
		float	   *buf = j->bufs + (size_t) thread * QUANT_ROWS * cols;
		const uint16_t *h = (const uint16_t *) j->src + (size_t) r0 * cols;

		for (size_t i = 0; i < n; i++)
			buf[i] = j->dtype == KL_DT_BF16 ? kl_bf16_to_f32(h[i]) : kl_f16_to_f32(h[i]);
		f = buf;
	}
	kl_q_quantize_rows(j->q, f, r0, r1);
}

int
kl_qload_quantize(const void *src, kl_dtype dtype, int rows, int cols, kl_qtype type, int group,
				  kl_qmat *q, void *mem[2], kl_err *err)
{
	quant_job	j;
	int			threads = kl_pool_threads();
	uint8_t    *data;
	float	   *scales;

	memset(q, 0, sizeof(*q));
	mem[0] = mem[1] = NULL;
	if (dtype != KL_DT_F32 && dtype != KL_DT_BF16 && dtype != KL_DT_F16)
		return kl_errc(err, KL_E_INVALID,
					   "only F32, BF16 and F16 weights can be quantized, not %s", kl_dtype_name(dtype));
	q->type = type;
	q->rows = rows;
	q->cols = cols;
	q->group = group;
	q->n_groups = (cols + group - 1) / group;
	q->row_bytes = kl_q_row_bytes(type, cols);
	data = kl_aligned_alloc(q->row_bytes * (size_t) rows + 64, err);
	if (!data)
		return KL_FAIL;
	mem[1] = data;
	scales = kl_malloc(sizeof(float) * (size_t) rows * q->n_groups, err);
	if (!scales)
		return KL_FAIL;
	mem[0] = scales;
	q->data = data;
	q->scales = scales;
	j.src = src;
	j.dtype = dtype;
	j.q = q;
	j.bufs = NULL;
	if (dtype != KL_DT_F32)
	{
		j.bufs = kl_malloc(sizeof(float) * (size_t) threads * QUANT_ROWS * cols, err);
		if (!j.bufs)
			return KL_FAIL;
	}
	kl_parallel_for((rows + QUANT_ROWS - 1) / QUANT_ROWS, quant_task, &j);
	free(j.bufs);
	return KL_OK;
}

int
kl_qload_to_bf16(const kl_qmat *q, uint16_t *dst, kl_err *err)
{
	float	   *row = kl_malloc(sizeof(float) * (size_t) q->cols, err);

	if (!row)
		return KL_FAIL;
	for (int r = 0; r < q->rows; r++)
	{
		kl_q_dequant_row(q, r, row);
		for (int c = 0; c < q->cols; c++)
			dst[(size_t) r * q->cols + c] = kl_f32_to_bf16(row[c]);
	}
	free(row);
	return KL_OK;
}
