/*
 * cmd_quantize.c — ./kl quantize: write a checkpoint in one of the published
 * quantized formats the engine loads, and / or the f32 checkpoint of its
 * dequantized weights (the reference the quantized model must match).
 * The tests make their quantized checkpoints with it from the golden tiny
 * models; it is also a way to quantize a bf16 model once, on disk.
 *
 *   kl quantize --model SRC --format FMT --out DIR [--dequantized DIR]
 *   kl quantize --model SRC --at-load fp8|int8|int4 --dequantized DIR
 *
 * FMT (quant_config.h describes them):
 *   ct-fp8          compressed-tensors float-quantized, FP8 E4M3, per channel
 *   ct-fp8-block    compressed-tensors float-quantized, FP8, blocks of 128 x 128
 *   ct-int8         compressed-tensors int-quantized, int8, per channel
 *   ct-int4         compressed-tensors pack-quantized, int4, groups of 32
 *   ct-int8-packed  compressed-tensors pack-quantized, int8, groups of 64
 *   fp8-block       Hugging Face fine-grained FP8 (quant_method fp8), 128 x 128
 * Quantized: every Linear weight (projections, experts, lm_head) except, in
 * the compressed-tensors formats, what the written ignore list names
 * (lm_head and the KDA f_b projections, to exercise the list).  Scales are
 * written in the checkpoint's dtype (F32 or BF16), as quantizers do.  The
 * packing is done here from the format's definition, independently of the
 * engine's reader.
 *
 * --at-load: the dequantized f32 checkpoint of what `--quantize` makes of
 * the model at load (same policy and method, quant.h).
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli_util.h"
#include "commands.h"
#include "quant.h"
#include "quant_load.h"
#include "safetensors.h"

typedef struct out_tensor
{
	char	   *name;
	const char *dtype;
	int			ndim;
	int64_t		shape[KL_ST_MAX_DIMS];
	void	   *data;
	size_t		bytes;
} out_tensor;

typedef struct out_file
{
	out_tensor *t;
	int			n,
				cap;
} out_file;

static void
add_tensor_shape(out_file *f, const char *name, const char *dtype, int ndim, const int64_t *shape,
				 void *data, size_t bytes)
{
	if (f->n == f->cap)
	{
		f->cap = f->cap ? f->cap * 2 : 64;
		f->t = realloc(f->t, sizeof(out_tensor) * (size_t) f->cap);
		if (!f->t)
		{
			fprintf(stderr, "kl quantize: out of memory\n");
			exit(1);
		}
	}
	f->t[f->n].name = strdup(name);
	f->t[f->n].dtype = dtype;
	f->t[f->n].ndim = ndim;
	memcpy(f->t[f->n].shape, shape, sizeof(int64_t) * (size_t) ndim);
	f->t[f->n].data = data;
	f->t[f->n].bytes = bytes;
	f->n++;
}

static void
add_tensor(out_file *f, const char *name, const char *dtype, int ndim, int64_t d0, int64_t d1,
		   void *data, size_t bytes)
{
	int64_t		shape[2] = {d0, d1};

	add_tensor_shape(f, name, dtype, ndim, shape, data, bytes);
}

static int
write_safetensors(const char *path, out_file *f)
{
	json_t	   *h = json_object();
	size_t		off = 0;
	char	   *js;
	uint64_t	hlen;
	FILE	   *fp;
	int			rc = 0;

	for (int i = 0; i < f->n; i++)
	{
		json_t	   *shape = json_array();

		for (int d = 0; d < f->t[i].ndim; d++)
			json_array_append_new(shape, json_integer(f->t[i].shape[d]));
		json_object_set_new(h, f->t[i].name,
							json_pack("{s:s, s:o, s:[I,I]}", "dtype", f->t[i].dtype, "shape", shape,
									  "data_offsets", (json_int_t) off, (json_int_t) (off + f->t[i].bytes)));
		off += f->t[i].bytes;
	}
	js = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(h);
	hlen = strlen(js);
	fp = fopen(path, "wb");
	if (!fp || fwrite(&hlen, 8, 1, fp) != 1 || fwrite(js, 1, hlen, fp) != hlen)
		rc = 1;
	for (int i = 0; i < f->n && rc == 0; i++)
		if (f->t[i].bytes && fwrite(f->t[i].data, 1, f->t[i].bytes, fp) != f->t[i].bytes)
			rc = 1;
	if (fp && fclose(fp) != 0)
		rc = 1;
	free(js);
	if (rc)
		fprintf(stderr, "kl quantize: cannot write %s\n", path);
	return rc;
}

static void
free_file(out_file *f)
{
	for (int i = 0; i < f->n; i++)
	{
		free(f->t[i].name);
		free(f->t[i].data);
	}
	free(f->t);
	memset(f, 0, sizeof(*f));
}

/* ------------------------------------------------------------------ formats */

typedef enum fmt
{
	F_NONE,
	F_CT_FP8,
	F_CT_FP8_BLOCK,
	F_CT_INT8,
	F_CT_INT4,
	F_CT_INT8_PACKED,
	F_FP8_BLOCK
} fmt;

static const struct
{
	const char *name;
	fmt			f;
}			formats[] = {
	{"ct-fp8", F_CT_FP8}, {"ct-fp8-block", F_CT_FP8_BLOCK}, {"ct-int8", F_CT_INT8},
	{"ct-int4", F_CT_INT4}, {"ct-int8-packed", F_CT_INT8_PACKED}, {"fp8-block", F_FP8_BLOCK},
};

#define BLOCK 128

static bool
is_ct(fmt f)
{
	return f != F_FP8_BLOCK;
}

/* Whether the writer quantizes tensor `name` in format f (its ignore list). */
static bool
writer_quantizes(fmt f, const char *name)
{
	kl_wrole	r = kl_q_role(name);
	const char *fb = ".f_b_proj.weight";
	size_t		n = strlen(name),
				k = strlen(fb);

	if (r == KL_W_EMBED || r == KL_W_ROUTER)
		return false;
	if (is_ct(f) && (r == KL_W_LM_HEAD || (n > k && strcmp(name + n - k, fb) == 0)))
		return false;			/* the ignore list */
	return true;
}

static json_t *
quantization_config(fmt f)
{
	const char *format = f == F_CT_INT4 || f == F_CT_INT8_PACKED ? "pack-quantized" :
		f == F_CT_INT8 ? "int-quantized" : "float-quantized";
	json_t	   *w;

	if (f == F_FP8_BLOCK)
		return json_pack("{s:s, s:s, s:s, s:[i,i]}", "quant_method", "fp8", "fmt", "e4m3",
						 "activation_scheme", "dynamic", "weight_block_size", BLOCK, BLOCK);
	switch (f)
	{
		case F_CT_FP8:
			w = json_pack("{s:i, s:s, s:b, s:s, s:b}", "num_bits", 8, "type", "float", "symmetric", 1,
						  "strategy", "channel", "dynamic", 0);
			break;
		case F_CT_FP8_BLOCK:
			w = json_pack("{s:i, s:s, s:b, s:s, s:[i,i], s:b}", "num_bits", 8, "type", "float", "symmetric", 1,
						  "strategy", "block", "block_structure", BLOCK, BLOCK, "dynamic", 0);
			break;
		case F_CT_INT8:
			w = json_pack("{s:i, s:s, s:b, s:s, s:b}", "num_bits", 8, "type", "int", "symmetric", 1,
						  "strategy", "channel", "dynamic", 0);
			break;
		case F_CT_INT4:
			w = json_pack("{s:i, s:s, s:b, s:s, s:i, s:b, s:n}", "num_bits", 4, "type", "int", "symmetric", 1,
						  "strategy", "group", "group_size", 32, "dynamic", 0, "actorder");
			break;
		default:
			w = json_pack("{s:i, s:s, s:b, s:s, s:i, s:b}", "num_bits", 8, "type", "int", "symmetric", 1,
						  "strategy", "group", "group_size", 64, "dynamic", 0);
			break;
	}
	return json_pack("{s:s, s:s, s:s, s:{s:{s:[s], s:o, s:o, s:n}}, s:[s,s]}",
					 "quant_method", "compressed-tensors", "format", format, "quantization_status", "compressed",
					 "config_groups", "group_0", "targets", "Linear", "weights", w,
					 "input_activations", (f == F_CT_FP8 || f == F_CT_FP8_BLOCK) ?
					 json_pack("{s:i, s:s, s:b, s:s, s:b}", "num_bits", 8, "type", "float", "symmetric", 1,
							   "strategy", "token", "dynamic", 1) : json_null(),
					 "output_activations",
					 "ignore", "lm_head", "re:.*\\.f_b_proj$");
}

/* per-row f32 scales of the quantized weight: strategy as the format says */
typedef struct qplan
{
	int			rows_per_scale,
				cols_per_scale;
	int			levels;			/* int: qmax (127, 7); FP8: 0 */
} qplan;

static qplan
plan_of(fmt f)
{
	switch (f)
	{
		case F_CT_FP8:
			return (qplan) {1, INT32_MAX, 0};
		case F_CT_FP8_BLOCK:
		case F_FP8_BLOCK:
			return (qplan) {BLOCK, BLOCK, 0};
		case F_CT_INT8:
			return (qplan) {1, INT32_MAX, 127};
		case F_CT_INT4:
			return (qplan) {1, 32, 7};
		default:
			return (qplan) {1, 64, 127};
	}
}

static float
round_scale(float s, bool bf16)
{
	return bf16 ? kl_bf16_to_f32(kl_f32_to_bf16(s)) : s;
}

/*
 * Quantize w [rows, cols] as format f: fills q (int value or E4M3 code per
 * weight), scales [srows, scols] (rounded to the checkpoint's dtype first,
 * so that dequantization uses the scale as stored) and deq (fl(q * s)).
 */
static void
quantize_matrix(fmt f, const float *w, int rows, int cols, bool bf16_scales, int32_t *q, float *scales,
				int srows, int scols, float *deq)
{
	qplan		p = plan_of(f);
	int			rps = p.rows_per_scale,
				cps = p.cols_per_scale == INT32_MAX ? cols : p.cols_per_scale;

	for (int sr = 0; sr < srows; sr++)
		for (int sc = 0; sc < scols; sc++)
		{
			int			r0 = sr * rps,
						r1 = r0 + rps < rows ? r0 + rps : rows;
			int			c0 = sc * cps,
						c1 = c0 + cps < cols ? c0 + cps : cols;
			float		amax = 0,
						s;

			for (int r = r0; r < r1; r++)
				for (int c = c0; c < c1; c++)
					amax = fabsf(w[(size_t) r * cols + c]) > amax ? fabsf(w[(size_t) r * cols + c]) : amax;
			s = round_scale(p.levels ? amax / (float) p.levels : amax / 448.0f, bf16_scales);
			scales[(size_t) sr * scols + sc] = s;
			for (int r = r0; r < r1; r++)
				for (int c = c0; c < c1; c++)
				{
					size_t		i = (size_t) r * cols + c;

					if (p.levels)
					{
						int			v = s > 0 ? (int) rintf(w[i] / s) : 0;

						v = v > p.levels ? p.levels : v < -p.levels - 1 ? -p.levels - 1 : v;
						q[i] = v;
						deq[i] = (float) v * s;
					}
					else
					{
						uint8_t		code = s > 0 ? kl_f32_to_e4m3(w[i] / s) : 0;

						q[i] = code;
						deq[i] = kl_e4m3_to_f32(code) * s;
					}
				}
		}
}

/* values q (offset by 2^(bits-1)) into little-endian words, from the least significant bits */
static uint32_t *
pack_words(const int32_t *q, int rows, int cols, int bits, int *words_out)
{
	int			per = 32 / bits,
				words = (cols + per - 1) / per;
	uint32_t   *out = calloc((size_t) rows * words, sizeof(uint32_t));

	for (int r = 0; r < rows; r++)
		for (int c = 0; c < cols; c++)
		{
			uint32_t	u = (uint32_t) (q[(size_t) r * cols + c] + (1 << (bits - 1))) & ((1u << bits) - 1);

			out[(size_t) r * words + c / per] |= u << (bits * (c % per));
		}
	*words_out = words;
	return out;
}

static void *
scales_data(const float *s, size_t n, bool bf16, size_t *bytes)
{
	if (bf16)
	{
		uint16_t   *h = malloc(n * 2);

		for (size_t i = 0; i < n; i++)
			h[i] = kl_f32_to_bf16(s[i]);
		*bytes = n * 2;
		return h;
	}
	*bytes = n * 4;
	{
		float	   *c = malloc(n * 4);

		memcpy(c, s, n * 4);
		return c;
	}
}

/* Add the tensors of one quantized matrix `name` ("X.weight") to the output. */
static void
emit_quantized(out_file *o, fmt f, const char *name, const float *w, int rows, int cols, bool bf16,
			   float *deq)
{
	qplan		p = plan_of(f);
	int			cps = p.cols_per_scale == INT32_MAX ? cols : p.cols_per_scale;
	int			srows = (rows + p.rows_per_scale - 1) / p.rows_per_scale,
				scols = (cols + cps - 1) / cps;
	int32_t    *q = malloc(sizeof(int32_t) * (size_t) rows * cols);
	float	   *scales = malloc(sizeof(float) * (size_t) srows * scols);
	char		module[256],
				tn[300];
	size_t		sbytes;
	void	   *sdata;

	snprintf(module, sizeof(module), "%.*s", (int) strlen(name) - 7, name);
	quantize_matrix(f, w, rows, cols, bf16 && f != F_FP8_BLOCK, q, scales, srows, scols, deq);
	if (f == F_CT_INT4 || f == F_CT_INT8_PACKED)
	{
		int			words;
		uint32_t   *packed = pack_words(q, rows, cols, f == F_CT_INT4 ? 4 : 8, &words);
		int64_t    *shape = malloc(16);

		shape[0] = rows;
		shape[1] = cols;
		snprintf(tn, sizeof(tn), "%s.weight_packed", module);
		add_tensor(o, tn, "I32", 2, rows, words, packed, sizeof(uint32_t) * (size_t) rows * words);
		snprintf(tn, sizeof(tn), "%s.weight_shape", module);
		add_tensor(o, tn, "I64", 1, 2, 0, shape, 16);
	}
	else
	{
		uint8_t    *b = malloc((size_t) rows * cols);

		for (size_t i = 0; i < (size_t) rows * cols; i++)
			b[i] = (uint8_t) q[i];
		add_tensor(o, name, f == F_CT_INT8 ? "I8" : "F8_E4M3", 2, rows, cols, b, (size_t) rows * cols);
	}
	/* the fp8 block format keeps f32 scales (DeepSeek / Kimi K2 publish them so) */
	sdata = scales_data(scales, (size_t) srows * scols, bf16 && f != F_FP8_BLOCK, &sbytes);
	snprintf(tn, sizeof(tn), "%s.%s", module, f == F_FP8_BLOCK ? "weight_scale_inv" : "weight_scale");
	add_tensor(o, tn, bf16 && f != F_FP8_BLOCK ? "BF16" : "F32", 2, srows, scols, sdata, sbytes);
	free(q);
	free(scales);
}

/* ------------------------------------------------------------------ the command */

static int
copy_config(const char *src_dir, const char *dst_dir, json_t *qc)
{
	char		path[4200];
	json_error_t jerr;
	json_t	   *c;
	int			rc;

	snprintf(path, sizeof(path), "%s/config.json", src_dir);
	c = json_load_file(path, 0, &jerr);
	if (!c)
	{
		fprintf(stderr, "kl quantize: %s: %s\n", path, jerr.text);
		json_decref(qc);
		return 1;
	}
	json_object_del(c, "quantization_config");
	if (qc)
		json_object_set_new(c, "quantization_config", qc);
	else
		json_object_set_new(c, "dtype", json_string("float32"));
	mkdir(dst_dir, 0755);
	snprintf(path, sizeof(path), "%s/config.json", dst_dir);
	rc = json_dump_file(c, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER) == 0 ? 0 : 1;
	json_decref(c);
	if (rc)
		fprintf(stderr, "kl quantize: cannot write %s\n", path);
	return rc;
}

int
cmd_quantize(int argc, char **argv)
{
	const char *model = NULL,
			   *out = NULL,
			   *deq_dir = NULL,
			   *fmt_s = NULL,
			   *at_load = NULL;
	fmt			f = F_NONE;
	kl_qtype	at = KL_Q_NONE;
	kl_safetensors st;
	kl_err		err;
	out_file	oq = {0},
				od = {0};
	char		path[4200];
	int			rc = 1;
	const cli_opt opts[] = {
		CLI_OPT("--model", CLI_OPT_STRING, &model),
		CLI_OPT("--out", CLI_OPT_STRING, &out),
		CLI_OPT("--dequantized", CLI_OPT_STRING, &deq_dir),
		CLI_OPT("--format", CLI_OPT_STRING, &fmt_s),
		CLI_OPT("--at-load", CLI_OPT_STRING, &at_load),
	};

	if (cli_parse_options("quantize", argc, argv, NULL, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	for (size_t i = 0; fmt_s && i < sizeof(formats) / sizeof(formats[0]); i++)
		if (strcmp(fmt_s, formats[i].name) == 0)
			f = formats[i].f;
	if (at_load && kl_qtype_parse(at_load, &at, &err) != KL_OK)
	{
		fprintf(stderr, "kl quantize: %s\n", err.msg);
		return 2;
	}
	if (!model || (f == F_NONE) == (at == KL_Q_NONE) || (f != F_NONE && !out) || (at != KL_Q_NONE && !deq_dir))
	{
		fprintf(stderr, "usage: kl quantize --model SRC --format FMT --out DIR [--dequantized DIR]\n"
				"       kl quantize --model SRC --at-load fp8|int8|int4 --dequantized DIR\n"
				"  FMT: ct-fp8, ct-fp8-block, ct-int8, ct-int4, ct-int8-packed, fp8-block\n");
		return 2;
	}
	if (kl_st_open_dir(model, NULL, &st, &err) != KL_OK)
	{
		fprintf(stderr, "kl quantize: %s\n", err.msg);
		return 1;
	}
	for (int i = 0; i < st.n_tensors; i++)
	{
		const kl_st_tensor *t = &st.tensors[i];
		float	   *w = malloc(sizeof(float) * (size_t) (t->numel ? t->numel : 1));
		bool		bf16 = t->dtype == KL_DT_BF16;
		bool		matrix = t->ndim == 2 && strcmp(t->name + strlen(t->name) - 7, ".weight") == 0 &&
			!strstr(t->name, "norm") && !strstr(t->name, "conv1d");

		if (!w || kl_st_to_f32(t, w, &err) != KL_OK)
		{
			fprintf(stderr, "kl quantize: %s\n", w ? err.msg : "out of memory");
			free(w);
			goto done;
		}
		if (matrix && f != F_NONE && writer_quantizes(f, t->name))
		{
			float	   *deq = malloc(sizeof(float) * (size_t) t->numel);

			emit_quantized(&oq, f, t->name, w, (int) t->shape[0], (int) t->shape[1], bf16, deq);
			add_tensor(&od, t->name, "F32", 2, t->shape[0], t->shape[1], deq, sizeof(float) * (size_t) t->numel);
			free(w);
			continue;
		}
		if (matrix && at != KL_Q_NONE && kl_q_at_load(t->name, at) != KL_Q_NONE)
		{
			/* what the engine holds after quantizing at load, dequantized */
			kl_qtype	qt = kl_q_at_load(t->name, at);
			kl_qmat		q;
			void	   *mem[2];
			float	   *deq = malloc(sizeof(float) * (size_t) t->numel);

			if (kl_qload_quantize(t->data, t->dtype, (int) t->shape[0], (int) t->shape[1], qt,
								  kl_q_default_group(qt, (int) t->shape[1]), &q, mem, &err) != KL_OK)
			{
				fprintf(stderr, "kl quantize: %s\n", err.msg);
				goto done;
			}
			for (int r = 0; r < q.rows; r++)
				kl_q_dequant_row(&q, r, deq + (size_t) r * q.cols);
			free(mem[0]);
			free(mem[1]);
			add_tensor_shape(&od, t->name, "F32", t->ndim, t->shape, deq, sizeof(float) * (size_t) t->numel);
			free(w);
			continue;
		}
		/* kept as stored (and as f32 in the dequantized copy) */
		{
			size_t		nb = t->nbytes;
			void	   *copy = malloc(nb ? nb : 1);

			memcpy(copy, t->data, nb);
			add_tensor_shape(&oq, t->name, kl_dtype_name(t->dtype), t->ndim, t->shape, copy, nb);
		}
		add_tensor_shape(&od, t->name, "F32", t->ndim, t->shape, w, sizeof(float) * (size_t) t->numel);
	}
	if (f != F_NONE)
	{
		if (copy_config(model, out, quantization_config(f)) != 0)
			goto done;
		snprintf(path, sizeof(path), "%s/model.safetensors", out);
		if (write_safetensors(path, &oq) != 0)
			goto done;
	}
	if (deq_dir)
	{
		if (copy_config(model, deq_dir, NULL) != 0)
			goto done;
		snprintf(path, sizeof(path), "%s/model.safetensors", deq_dir);
		if (write_safetensors(path, &od) != 0)
			goto done;
	}
	rc = 0;
done:
	free_file(&oq);
	free_file(&od);
	kl_st_close(&st);
	return rc;
}
