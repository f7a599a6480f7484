/*
 * test_quant.c — quantized weights (quant.h, quant_config.h, quant_load.h,
 * simd_quant.c).
 *
 *   - FP8 E4M3 conversion, exhaustively; the pack-quantized bit layout on a
 *     matrix packed by hand from the format's definition.
 *   - The GEMV kernels of every SIMD level (KL_SIMD variants) against a
 *     double-precision dot product of the dequantized weights, over shapes
 *     with partial blocks and groups; batch invariance (a row's result is
 *     bit-for-bit the same whatever the other rows and inputs of a call).
 *   - Checkpoints in each published format, made by `./kl quantize` from
 *     the golden tiny models (tiny_a f32 + MoE, tiny_c bf16 + a 90-token
 *     prompt that takes the sgemm path): their logits equal those of the
 *     dequantized f32 weights run through the f32 path (<= 1e-5 relative),
 *     one call and token by token.  The same for quantization at load, and
 *     whole models under each SIMD level (KL_SIMD, through ./kl logits).
 *   - States: the fingerprint covers the quantization at load, and the
 *     refusal says which quantization made the state.
 *   - Broken quantized checkpoints and configs are clear errors.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kl.h"
#include "model.h"
#include "quant.h"
#include "quant_load.h"
#include "simd.h"
#include "tap.h"

#define TOL 1e-5

static char tmpdir[256];

static double
rel_err(const float *a, const float *ref, size_t n)
{
	double		num = 0,
				den = 0;

	for (size_t i = 0; i < n; i++)
	{
		double		d = (double) a[i] - ref[i];

		num += d * d;
		den += (double) ref[i] * ref[i];
	}
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

static uint64_t rng_state = 88172645463325252ull;

static float
frand(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (float) (rng_state >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
}

static const char *
kl_cli(void)
{
	const char *s = getenv("KL_CLI");

	return s ? s : "./kl";
}

static int
run(const char *fmt,...) __attribute__((format(printf, 1, 2)));

static int
run(const char *fmt,...)
{
	char		cmd[4096];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	return system(cmd);
}

/* ------------------------------------------------------------------ FP8 E4M3 */

static void
test_e4m3(void)
{
	int			bad = 0;

	/* every finite code decodes to its value and encodes back to itself */
	for (int b = 0; b < 256; b++)
	{
		int			e = (b >> 3) & 15,
					m = b & 7;
		double		want;
		float		got = kl_e4m3_to_f32((uint8_t) b);

		if ((b & 0x7f) == 0x7f)
		{
			bad += !isnan(got);
			continue;
		}
		want = e == 0 ? m * pow(2, -9) : (1 + m / 8.0) * pow(2, e - 7);
		if (b & 0x80)
			want = -want;
		if ((double) got != want || (kl_f32_to_e4m3(got) != b && !(b == 0x80 && got == 0)))
		{
			if (bad++ < 5)
				tap_diag("code 0x%02x: %g (want %g), encodes to 0x%02x", b, got, want, kl_f32_to_e4m3(got));
		}
	}
	tap_ok(bad == 0, "E4M3: all 254 finite codes decode exactly and encode back");
	/* rounding: halfway cases go to the even mantissa; saturation; subnormals */
	tap_ok(kl_f32_to_e4m3(1.0625f) == 0x38 && kl_f32_to_e4m3(1.1875f) == 0x3a,
		   "E4M3: ties round to even (1.0625 -> 1.0, 1.1875 -> 1.25)");
	tap_ok(kl_f32_to_e4m3(1e6f) == 0x7e && kl_f32_to_e4m3(-470.0f) == 0xfe && kl_f32_to_e4m3(460.0f) == 0x7e,
		   "E4M3: beyond 448 saturates to +-448");
	tap_ok(kl_f32_to_e4m3(0x1p-10f) == 0x00 && kl_f32_to_e4m3(0x1.8p-9f) == 0x02 &&
		   kl_f32_to_e4m3(0x1.ep-7f) == 0x08 && kl_f32_to_e4m3(0x1p-9f) == 0x01,
		   "E4M3: subnormals round to nearest even multiples of 2^-9");
}

/* ------------------------------------------------------------------ pack-quantized bit layout */

/*
 * A 2 x 40 int4 matrix packed by hand from the compressed-tensors
 * definition (value + 8, eight per int32 word from the least significant
 * nibble, rows padded to whole words), per-channel scales: the loader must
 * read back exactly q * s.
 */
static void
test_packed_layout(void)
{
	int			rows = 2,
				cols = 40,
				words = 5;
	int32_t		q[2][40];
	uint32_t	packed[2][5] = {{0}};
	int64_t		shape[2] = {2, 40};
	float		scale[2] = {0.5f, -0.25f};
	kl_st_tensor tw = {0},
				tsh = {0},
				tsc = {0};
	kl_qconfig	qc;
	kl_qtensors qt = {0};
	kl_qmat		m;
	void	   *mem[2];
	kl_err		err;
	int			ok = 1;
	const char *cfg = "{\"quantization_config\": {\"quant_method\": \"compressed-tensors\", \"format\": "
		"\"pack-quantized\", \"config_groups\": {\"g\": {\"targets\": [\"Linear\"], \"weights\": {\"num_bits\": 4, "
		"\"type\": \"int\", \"symmetric\": true, \"strategy\": \"channel\"}}}}}";

	for (int r = 0; r < rows; r++)
		for (int c = 0; c < cols; c++)
		{
			q[r][c] = (r * 7 + c * 3) % 16 - 8;
			packed[r][c / 8] |= (uint32_t) (q[r][c] + 8) << (4 * (c % 8));
		}
	tw.name = "x.weight_packed";
	tw.dtype = KL_DT_I32;
	tw.ndim = 2;
	tw.shape[0] = rows;
	tw.shape[1] = words;
	tw.numel = rows * words;
	tw.data = packed;
	tsh.name = "x.weight_shape";
	tsh.dtype = KL_DT_I64;
	tsh.ndim = 1;
	tsh.shape[0] = 2;
	tsh.numel = 2;
	tsh.data = shape;
	tsc.name = "x.weight_scale";
	tsc.dtype = KL_DT_F32;
	tsc.ndim = 2;
	tsc.shape[0] = rows;
	tsc.shape[1] = 1;
	tsc.numel = 2;
	tsc.data = scale;
	qt.packed = &tw;
	qt.shape = &tsh;
	qt.scale = &tsc;
	if (!tap_ok(kl_qconfig_parse(cfg, strlen(cfg), "test", &qc, &err) == KL_OK, "pack-quantized config parses"))
	{
		tap_diag("%s", err.msg);
		return;
	}
	if (!tap_ok(kl_qload_matrix(&qc, &qt, rows, cols, &m, mem, &err) == KL_OK, "hand-packed int4 matrix loads"))
		tap_diag("%s", err.msg);
	else
	{
		float		row[40];

		for (int r = 0; r < rows; r++)
		{
			kl_q_dequant_row(&m, r, row);
			for (int c = 0; c < cols; c++)
				ok &= row[c] == (float) q[r][c] * scale[r];
		}
		tap_ok(ok, "hand-packed int4: every weight reads back as q * scale (column c = nibble c %% 8 of word c / 8)");
	}
	free(mem[0]);
	free(mem[1]);
	kl_qconfig_free(&qc);
}

/* ------------------------------------------------------------------ kernels */

typedef struct kcase
{
	kl_qtype	type;
	int			rows,
				cols,
				group;			/* 0: per channel */
} kcase;

/* A random quantized matrix (quantized from random f32). */
static void
make_qmat(const kcase *k, kl_qmat *q, void *mem[2])
{
	float	   *w = malloc(sizeof(float) * (size_t) k->rows * k->cols);
	kl_err		err;

	for (int i = 0; i < k->rows * k->cols; i++)
		w[i] = frand() * (i % 17 == 0 ? 3.0f : 1.0f);
	if (kl_qload_quantize(w, KL_DT_F32, k->rows, k->cols, k->type, k->group ? k->group : k->cols, q, mem,
						  &err) != KL_OK)
	{
		tap_diag("quantize: %s", err.msg);
		exit(1);
	}
	free(w);
}

static void
test_kernels(void)
{
	static const kcase cases[] = {
		{KL_Q_INT8, 13, 384, 0}, {KL_Q_INT8, 9, 100, 0}, {KL_Q_INT8, 8, 200, 32}, {KL_Q_INT8, 5, 48, 16},
		{KL_Q_FP8, 13, 384, 0}, {KL_Q_FP8, 7, 300, 128}, {KL_Q_FP8, 6, 20, 0}, {KL_Q_FP8, 11, 144, 48},
		{KL_Q_INT4, 13, 384, 32}, {KL_Q_INT4, 9, 44, 0}, {KL_Q_INT4, 6, 200, 64}, {KL_Q_INT4, 5, 20, 32},
		{KL_Q_INT4, 7, 1024, 128}, {KL_Q_INT4, 4, 72, 32}, {KL_Q_INT4, 6, 130, 0}, {KL_Q_INT4, 5, 320, 64},
		{KL_Q_INT4, 9, 256, 256}, {KL_Q_INT4, 3, 8, 32},
		/* rows of 1024 columns or more: AVX-512 reads int8 / FP8 rows one at a time */
		{KL_Q_INT8, 5, 1040, 0}, {KL_Q_INT8, 3, 1100, 64}, {KL_Q_FP8, 6, 1300, 0}, {KL_Q_FP8, 3, 1152, 48},
	};
	static const char *levels[] = {"scalar", "avx2", "avx512"};

	for (size_t l = 0; l < sizeof(levels) / sizeof(levels[0]); l++)
	{
		const kl_simd *s = kl_simd_variant(levels[l]);
		double		worst = 0;
		bool		invariant = true;

		if (!s)
		{
			tap_skip("this CPU lacks the SIMD level");
			tap_skip("this CPU lacks the SIMD level");
			continue;
		}
		for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
		{
			const kcase *k = &cases[ci];
			kl_qmat		q;
			void	   *mem[2];
			int			nx = 7,
						xl = s->q4_xlen(k->cols),
						ldx = k->type == KL_Q_INT4 ? xl : k->cols;
			float	   *x = malloc(sizeof(float) * (size_t) nx * k->cols);
			float	   *xk = malloc(sizeof(float) * (size_t) nx * xl);
			float	   *y = calloc((size_t) nx * k->rows, sizeof(float));
			float	   *y1 = calloc((size_t) nx * k->rows, sizeof(float));
			float	   *ref = malloc(sizeof(float) * (size_t) nx * k->rows);
			float	   *row = malloc(sizeof(float) * (size_t) k->cols);

			make_qmat(k, &q, mem);
			for (int i = 0; i < nx * k->cols; i++)
				x[i] = frand();
			for (int j = 0; j < nx; j++)
			{
				if (k->type == KL_Q_INT4)
					s->q4_permute(xk + (size_t) j * xl, x + (size_t) j * k->cols, k->cols);
				else
					memcpy(xk + (size_t) j * ldx, x + (size_t) j * k->cols, sizeof(float) * k->cols);
			}
			/* reference: double dot products of the dequantized weights */
			for (int r = 0; r < k->rows; r++)
			{
				kl_q_dequant_row(&q, r, row);
				for (int j = 0; j < nx; j++)
				{
					double		d = 0;

					for (int c = 0; c < k->cols; c++)
						d += (double) row[c] * x[(size_t) j * k->cols + c];
					ref[(size_t) j * k->rows + r] = (float) d;
				}
			}
			s->gemv_q(y, k->rows, &q, xk, ldx, nx, 0, k->rows);
			{
				double		e = rel_err(y, ref, (size_t) nx * k->rows);

				worst = e > worst ? e : worst;
				if (e > TOL)
					tap_diag("%s %s %dx%d group %d: rel err %.3g", levels[l], kl_qtype_name(k->type), k->rows,
							 k->cols, k->group, e);
			}
			/* the same rows one input at a time, in uneven row ranges */
			for (int j = 0; j < nx; j++)
				for (int r0 = 0; r0 < k->rows;)
				{
					int			r1 = r0 + 1 + (r0 * 5 + j) % 6;

					r1 = r1 > k->rows ? k->rows : r1;
					s->gemv_q(y1 + (size_t) j * k->rows, k->rows, &q, xk + (size_t) j * ldx, ldx, 1, r0, r1);
					r0 = r1;
				}
			if (memcmp(y, y1, sizeof(float) * (size_t) nx * k->rows) != 0)
			{
				invariant = false;
				tap_diag("%s %s %dx%d: results depend on the batch", levels[l], kl_qtype_name(k->type), k->rows,
						 k->cols);
			}
			free(mem[0]);
			free(mem[1]);
			free(x);
			free(xk);
			free(y);
			free(y1);
			free(ref);
			free(row);
		}
		tap_ok(worst <= TOL, "%s GEMV on fp8 / int8 / int4 weights against double dot products of the "
			   "dequantized weights, %zu shapes (worst rel err %.2e)", levels[l],
			   sizeof(cases) / sizeof(cases[0]), worst);
		tap_ok(invariant, "%s quantized GEMV: each row bit-for-bit the same alone, in any row range and "
			   "among 7 inputs", levels[l]);
	}
}

/* ------------------------------------------------------------------ models */

typedef struct golden
{
	kl_safetensors st;
	int			T,
				V;
	const int32_t *ids;
} golden;

static int
open_golden(const char *name, golden *g)
{
	char		path[1200];
	kl_err		err;
	const kl_st_tensor *t;

	memset(g, 0, sizeof(*g));
	snprintf(path, sizeof(path), "%s/golden/%s/golden.safetensors", tap_fixture_dir(), name);
	if (kl_st_open_file(path, &g->st, &err) != KL_OK || !(t = kl_st_find(&g->st, "input_ids")))
		return KL_FAIL;
	g->T = (int) t->numel;
	g->ids = t->data;
	return KL_OK;
}

/* logits of all positions: one call (step 0) or `step` tokens at a time */
static float *
logits_of(kl_model *m, const golden *g, int step)
{
	kl_err		err;
	kl_ctx	   *ctx;
	kl_seq	   *seq;
	int			V = kl_model_config(m)->vocab_size;
	float	   *out = malloc(sizeof(float) * (size_t) g->T * V);

	if (kl_ctx_new(m, 0, &ctx, &err) != KL_OK || kl_seq_new(m, &seq, &err) != KL_OK)
	{
		tap_diag("%s", err.msg);
		exit(1);
	}
	for (int t0 = 0; t0 < g->T;)
	{
		int			n = step > 0 && step < g->T - t0 ? step : g->T - t0;
		kl_batch_item it = {seq, g->ids + t0, n, out + (size_t) t0 * V, true};

		if (kl_forward(ctx, &it, 1, &err) != KL_OK)
		{
			tap_diag("forward: %s", err.msg);
			exit(1);
		}
		t0 += n;
	}
	kl_seq_free(seq);
	kl_ctx_free(ctx);
	return out;
}

static kl_model *
load(const char *dir, const char *quantize, kl_err *err)
{
	kl_load_opts o = {0};
	kl_model   *m = NULL;

	o.quantize = quantize;
	if (kl_model_load(dir, &o, &m, err) != KL_OK)
		return NULL;
	return m;
}

/* A quantized model and its dequantized f32 copy give the same logits. */
static void
compare_models(const char *what, const char *qdir, const char *quantize, const char *deqdir, const golden *g)
{
	kl_err		err;
	kl_model   *q = load(qdir, quantize, &err),
			   *d;

	if (!tap_ok(q != NULL, "%s: loads", what))
	{
		tap_diag("%s", err.msg);
		return;
	}
	if (!(d = load(deqdir, NULL, &err)))
	{
		tap_ok(0, "%s: dequantized copy loads: %s", what, err.msg);
		kl_model_free(q);
		return;
	}
	{
		int			V = kl_model_config(q)->vocab_size;
		float	   *lq = logits_of(q, g, 0),
				   *ld = logits_of(d, g, 0),
				   *lq1 = logits_of(q, g, 1);
		double		e = rel_err(lq, ld, (size_t) g->T * V),
					e1 = rel_err(lq1, ld, (size_t) g->T * V);

		tap_ok(e <= TOL && e1 <= TOL, "%s (%s): logits of %d positions equal the dequantized f32 weights' "
			   "(one call %.2e, token by token %.2e)", what, kl_model_weight_format(q), g->T, e, e1);
		tap_ok(kl_model_resident_bytes(q) < kl_model_resident_bytes(d),
			   "%s: %.0f kB of weights held against %.0f kB in f32", what, kl_model_resident_bytes(q) / 1e3,
			   kl_model_resident_bytes(d) / 1e3);
		free(lq);
		free(ld);
		free(lq1);
	}
	kl_model_free(q);
	kl_model_free(d);
}

static void
test_published_formats(void)
{
	static const char *models[] = {"tiny_a", "tiny_c"};
	static const char *formats[] = {"ct-fp8", "ct-fp8-block", "ct-int8", "ct-int4", "ct-int8-packed", "fp8-block"};

	for (size_t mi = 0; mi < 2; mi++)
	{
		golden		g;

		if (open_golden(models[mi], &g) != KL_OK)
		{
			tap_ok(0, "%s golden data", models[mi]);
			continue;
		}
		for (size_t f = 0; f < sizeof(formats) / sizeof(formats[0]); f++)
		{
			char		what[128];
			char		qdir[512],
						ddir[512];

			snprintf(what, sizeof(what), "%s as %s", models[mi], formats[f]);
			snprintf(qdir, sizeof(qdir), "%s/%s-%s", tmpdir, models[mi], formats[f]);
			snprintf(ddir, sizeof(ddir), "%s/%s-%s-deq", tmpdir, models[mi], formats[f]);
			if (!tap_ok(run("%s quantize --model %s/golden/%s --format %s --out %s --dequantized %s",
							kl_cli(), tap_fixture_dir(), models[mi], formats[f], qdir, ddir) == 0,
						"%s: ./kl quantize writes it", what))
				continue;
			compare_models(what, qdir, NULL, ddir, &g);
		}
		for (int q = KL_Q_FP8; q <= KL_Q_INT4; q++)
		{
			char		what[128],
						src[512],
						ddir[512];

			snprintf(what, sizeof(what), "%s quantized at load to %s", models[mi], kl_qtype_name(q));
			snprintf(src, sizeof(src), "%s/golden/%s", tap_fixture_dir(), models[mi]);
			snprintf(ddir, sizeof(ddir), "%s/%s-at-%s", tmpdir, models[mi], kl_qtype_name(q));
			if (!tap_ok(run("%s quantize --model %s --at-load %s --dequantized %s", kl_cli(), src,
							kl_qtype_name(q), ddir) == 0, "%s: dequantized copy written", what))
				continue;
			compare_models(what, src, kl_qtype_name(q), ddir, &g);
		}
		kl_st_close(&g.st);
	}
}

/*
 * Whole models under every SIMD level (KL_SIMD is read once per process, so
 * through ./kl logits): each format of tiny_c against its dequantized copy.
 */
static float *
read_logits(const char *path, size_t *n)
{
	kl_safetensors st;
	kl_err		err;
	const kl_st_tensor *t;
	float	   *out = NULL;

	if (kl_st_open_file(path, &st, &err) == KL_OK && (t = kl_st_find(&st, "logits")) != NULL)
	{
		out = malloc(t->nbytes);
		memcpy(out, t->data, t->nbytes);
		*n = (size_t) t->numel;
	}
	kl_st_close(&st);
	return out;
}

static void
test_levels_end_to_end(void)
{
	static const char *levels[] = {"scalar", "avx2", "avx512"};
	static const char *cases[][3] = {	/* what, model dir (under tmpdir), --quantize */
		{"ct-int4", "tiny_c-ct-int4", ""}, {"ct-fp8-block", "tiny_c-ct-fp8-block", ""},
		{"ct-int8", "tiny_c-ct-int8", ""}, {"int4 at load", "", "int4"},
	};
	char		ids[400];
	int			o = 0;

	/* 40 tokens: the GEMV path, where the SIMD levels differ */
	for (int i = 0; i < 40; i++)
		o += snprintf(ids + o, sizeof(ids) - o, "%s%d", i ? "," : "", (i * 37 + 5) % 384);

	for (size_t l = 0; l < 3; l++)
	{
		double		worst = 0;
		bool		ran = true;

		if (!kl_simd_variant(levels[l]))
		{
			tap_skip("this CPU lacks the SIMD level");
			continue;
		}
		for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++)
		{
			char		qdir[600],
						ddir[600],
						fq[700],
						fd[700];
			size_t		nq = 0,
						nd = 0;
			float	   *lq,
					   *ld;

			if (cases[c][1][0])
				snprintf(qdir, sizeof(qdir), "%s/%s", tmpdir, cases[c][1]);
			else
				snprintf(qdir, sizeof(qdir), "%s/golden/tiny_c", tap_fixture_dir());
			snprintf(ddir, sizeof(ddir), "%s/%s-deq", tmpdir, cases[c][1][0] ? cases[c][1] : "tiny_c-at-int4");
			snprintf(fq, sizeof(fq), "%s/lq.safetensors", tmpdir);
			snprintf(fd, sizeof(fd), "%s/ld.safetensors", tmpdir);
			if (cases[c][2][0])
				snprintf(ddir, sizeof(ddir), "%s/tiny_c-at-%s", tmpdir, cases[c][2]);
			if (run("KL_SIMD=%s %s logits --model %s %s%s --ids %s --out %s && %s logits --model %s --ids %s --out %s",
					levels[l], kl_cli(), qdir, cases[c][2][0] ? "--quantize " : "", cases[c][2], ids, fq,
					kl_cli(), ddir, ids, fd) != 0)
			{
				ran = false;
				continue;
			}
			lq = read_logits(fq, &nq);
			ld = read_logits(fd, &nd);
			if (!lq || !ld || nq != nd)
				ran = false;
			else
			{
				double		e = rel_err(lq, ld, nq);

				worst = e > worst ? e : worst;
			}
			free(lq);
			free(ld);
		}
		tap_ok(ran && worst <= TOL, "KL_SIMD=%s: tiny_c as ct-int4, ct-fp8-block, ct-int8 and int4 at load, "
			   "logits against the dequantized weights (worst rel err %.2e)", levels[l], worst);
	}
}

/* ------------------------------------------------------------------ states */

static void
test_state_fingerprint(void)
{
	char		dir[1024];
	kl_err		err;
	kl_model   *m8,
			   *m4,
			   *m0;
	kl_ctx	   *ctx;
	kl_seq	   *s,
			   *t;
	int32_t		ids[] = {1, 2, 3, 4, 5};
	uint8_t    *blob;
	size_t		len;
	kl_blob		part;

	snprintf(dir, sizeof(dir), "%s/golden/tiny_a", tap_fixture_dir());
	m8 = load(dir, "int8", &err);
	m4 = load(dir, "int4", &err);
	m0 = load(dir, NULL, &err);
	if (!m8 || !m4 || !m0)
	{
		tap_ok(0, "tiny_a loads three ways");
		return;
	}
	tap_ok(memcmp(kl_model_fingerprint(m8), kl_model_fingerprint(m4), 16) != 0 &&
		   memcmp(kl_model_fingerprint(m8), kl_model_fingerprint(m0), 16) != 0,
		   "the fingerprint covers the quantization at load");
	kl_ctx_new(m8, 0, &ctx, &err);
	kl_seq_new(m8, &s, &err);
	{
		kl_batch_item it = {s, ids, 5, NULL, false};

		kl_forward(ctx, &it, 1, &err);
	}
	kl_state_save(s, 0, &blob, &len, &err);
	part.data = blob;
	part.len = len;
	kl_seq_new(m4, &t, &err);
	tap_ok(kl_state_load(t, &part, 1, &err) == KL_FAIL &&
		   strstr(err.msg, "quantized at load to int8") && strstr(err.msg, "loaded quantized at load to int4"),
		   "an int8 state is refused by the int4 model, saying why (%s)", err.msg);
	kl_seq_free(t);
	kl_seq_new(m0, &t, &err);
	tap_ok(kl_state_load(t, &part, 1, &err) == KL_FAIL && strstr(err.msg, "loaded without quantization"),
		   "and by the unquantized model (%s)", err.msg);
	kl_seq_free(t);
	kl_seq_new(m8, &t, &err);
	tap_ok(kl_state_load(t, &part, 1, &err) == KL_OK, "and resumes on the int8 model");
	kl_seq_free(t);
	free(blob);
	kl_seq_free(s);
	kl_ctx_free(ctx);
	kl_model_free(m8);
	kl_model_free(m4);
	kl_model_free(m0);
}

/* ------------------------------------------------------------------ batch invariance */

/* A sequence decoded among others gets bit-for-bit its logits alone (int4 model). */
static void
test_batch_invariance(const char *quantize)
{
	char		dir[1024];
	kl_err		err;
	kl_model   *m;
	kl_ctx	   *ctx;
	kl_seq	   *alone,
			   *seqs[6];
	int			V;
	float	   *la,
			   *lb;
	bool		same = true;
	int32_t		p0[] = {3840, 1445, 2270, 522};

	snprintf(dir, sizeof(dir), "%s/pgdocs-kimi-18m", tap_models_dir());
	if (!(m = load(dir, quantize, &err)) || kl_ctx_new(m, 0, &ctx, &err) != KL_OK)
	{
		tap_ok(0, "batch invariance (%s): %s", quantize, err.msg);
		return;
	}
	V = kl_model_config(m)->vocab_size;
	la = malloc(sizeof(float) * V);
	lb = malloc(sizeof(float) * V * 6);
	kl_seq_new(m, &alone, &err);
	{
		kl_batch_item it = {alone, p0, 4, la, false};

		kl_forward(ctx, &it, 1, &err);
	}
	for (int i = 0; i < 6; i++)
	{
		int32_t		p[12];
		int			n = i == 0 ? 4 : 3 + i;
		kl_batch_item bi = {NULL, p, n, lb + (size_t) i * V, false};

		kl_seq_new(m, &seqs[i], &err);
		bi.seq = seqs[i];
		for (int k = 0; k < n; k++)
			p[k] = i == 0 ? p0[k] : 3840 + (k > 0) * (100 + 37 * i + k);
		kl_forward(ctx, &bi, 1, &err);
	}
	for (int st = 0; st < 12 && same; st++)
	{
		kl_batch_item items[6],
					one;
		int32_t		toks[6],
					ta = 0;

		same = memcmp(la, lb, sizeof(float) * V) == 0;
		for (int v = 1; v < V; v++)
			ta = la[v] > la[ta] ? v : ta;
		for (int i = 0; i < 6; i++)
		{
			const float *l = lb + (size_t) i * V;

			toks[i] = 0;
			for (int v = 1; v < V; v++)
				toks[i] = l[v] > l[toks[i]] ? v : toks[i];
			items[i] = (kl_batch_item) {seqs[i], &toks[i], 1, lb + (size_t) i * V, false};
		}
		one = (kl_batch_item) {alone, &ta, 1, la, false};
		kl_forward(ctx, &one, 1, &err);
		kl_forward(ctx, items, 6, &err);
	}
	tap_ok(same, "batch invariance, %s: a sequence decoded among 6 has bit-for-bit its logits alone", quantize);
	for (int i = 0; i < 6; i++)
		kl_seq_free(seqs[i]);
	kl_seq_free(alone);
	free(la);
	free(lb);
	kl_ctx_free(ctx);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ broken checkpoints */

static uint8_t *
slurp(const char *path, size_t *len)
{
	FILE	   *f = fopen(path, "rb");
	uint8_t    *b;
	long		n;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	b = malloc((size_t) n + 1);
	if (fread(b, 1, (size_t) n, f) != (size_t) n)
		exit(1);
	fclose(f);
	b[n] = 0;
	*len = (size_t) n;
	return b;
}

static void
spit(const char *path, const void *b, size_t len)
{
	FILE	   *f = fopen(path, "wb");

	if (!f || fwrite(b, 1, len, f) != len || fclose(f) != 0)
	{
		tap_diag("cannot write %s", path);
		exit(1);
	}
}

/* A checkpoint's safetensors split into header and data, to edit. */
typedef struct ckpt
{
	json_t	   *header;
	json_t	   *config;
	uint8_t    *data;
	size_t		data_len;
} ckpt;

static void
ckpt_read(const char *dir, ckpt *c)
{
	char		path[700];
	size_t		len;
	uint8_t    *b;
	uint64_t	hlen;

	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	b = slurp(path, &len);
	memcpy(&hlen, b, 8);
	c->header = json_loadb((const char *) b + 8, hlen, 0, NULL);
	c->data_len = len - 8 - hlen;
	c->data = malloc(c->data_len);
	memcpy(c->data, b + 8 + hlen, c->data_len);
	free(b);
	snprintf(path, sizeof(path), "%s/config.json", dir);
	c->config = json_load_file(path, 0, NULL);
}

static void
ckpt_free(ckpt *c)
{
	json_decref(c->header);
	json_decref(c->config);
	free(c->data);
}

/* write c as a model directory named `name`; returns the directory */
static const char *
ckpt_write(const ckpt *c, const char *name)
{
	static char dir[600];
	char		path[700];
	char	   *js = json_dumps(c->header, JSON_COMPACT);
	uint64_t	hlen = strlen(js);
	uint8_t    *b = malloc(8 + hlen + c->data_len);

	snprintf(dir, sizeof(dir), "%s/bad-%s", tmpdir, name);
	mkdir(dir, 0700);
	memcpy(b, &hlen, 8);
	memcpy(b + 8, js, hlen);
	memcpy(b + 8 + hlen, c->data, c->data_len);
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	spit(path, b, 8 + hlen + c->data_len);
	free(js);
	free(b);
	snprintf(path, sizeof(path), "%s/config.json", dir);
	json_dump_file(c->config, path, 0);
	return dir;
}

static void
expect_error(const char *dir, const char *quantize, const char *needle, const char *what)
{
	kl_err		err = {0};
	kl_model   *m = load(dir, quantize, &err);

	if (!tap_ok(m == NULL && strstr(err.msg, needle) != NULL, "%s: clear error", what))
		tap_diag("got \"%s\" (wanted \"%s\")", m ? "(loaded)" : err.msg, needle);
	kl_model_free(m);
}

/* data offset of a tensor in the data section */
static size_t
data_offset(const ckpt *c, const char *tensor)
{
	return (size_t) json_integer_value(json_array_get(json_object_get(json_object_get(c->header, tensor),
																	  "data_offsets"), 0));
}

static json_t *
weights_args(ckpt *c)
{
	return json_object_get(json_object_get(json_object_get(json_object_get(c->config, "quantization_config"),
														   "config_groups"), "group_0"), "weights");
}

static void
test_broken(void)
{
	char		d4[512],
				d8[512],
				src[512];
	ckpt		c;
	const char *scale = "model.layers.0.self_attn.q_proj.weight_scale";

	snprintf(src, sizeof(src), "%s/golden/tiny_a", tap_fixture_dir());
	snprintf(d4, sizeof(d4), "%s/tiny_a-ct-int4", tmpdir);
	snprintf(d8, sizeof(d8), "%s/tiny_a-ct-fp8", tmpdir);

	/* scales */
	ckpt_read(d4, &c);
	{
		float		nan = NAN;

		memcpy(c.data + data_offset(&c, scale), &nan, 4);
		expect_error(ckpt_write(&c, "nan-scale"), NULL, "must be finite", "a NaN scale");
	}
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_array_set_new(json_object_get(json_object_get(c.header, scale), "shape"), 1, json_integer(2));
	json_array_set_new(json_object_get(json_object_get(c.header, scale), "shape"), 0, json_integer(256));
	expect_error(ckpt_write(&c, "scale-shape"), NULL, "in groups of 32 columns have shape", "scales of the wrong shape");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(json_object_get(c.header, scale), "dtype", json_string("I32"));
	expect_error(ckpt_write(&c, "scale-dtype"), NULL, "scales must be F32, BF16 or F16", "scales of an integer dtype");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_del(c.header, scale);
	expect_error(ckpt_write(&c, "scale-missing"), NULL, "weight_scale\" is missing", "a missing scale tensor");
	ckpt_free(&c);

	/* packed weights */
	ckpt_read(d4, &c);
	{
		json_t	   *t = json_object_get(c.header, "model.layers.0.self_attn.q_proj.weight_shape");
		int64_t		wrong = 64;

		memcpy(c.data + json_integer_value(json_array_get(json_object_get(t, "data_offsets"), 0)) + 8, &wrong, 8);
		expect_error(ckpt_write(&c, "weight-shape"), NULL, "says [128, 64], but config.json implies [128, 128]",
					 "a weight_shape that contradicts the config");
	}
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(json_object_get(c.header, "model.layers.0.self_attn.q_proj.weight_packed"), "dtype",
						json_string("F32"));
	expect_error(ckpt_write(&c, "packed-dtype"), NULL, "packed weights must be I32", "packed weights of dtype F32");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(weights_args(&c), "num_bits", json_integer(3));
	expect_error(ckpt_write(&c, "bits3"), NULL, "3-bit int weights are not supported", "num_bits 3");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(weights_args(&c), "num_bits", json_integer(8));
	expect_error(ckpt_write(&c, "bits-mismatch"), NULL, "packs into", "num_bits 8 in the config, 4-bit data");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(weights_args(&c), "symmetric", json_false());
	expect_error(ckpt_write(&c, "asym"), NULL, "asymmetric", "asymmetric weights");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(weights_args(&c), "group_size", json_integer(16));
	expect_error(ckpt_write(&c, "group16"), NULL, "weight_scale\" has shape [128, 4], but scales of a [128, 128] "
				 "matrix in groups of 16", "a group size the scales contradict");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(weights_args(&c), "actorder", json_string("group"));
	expect_error(ckpt_write(&c, "actorder"), NULL, "actorder \"group\"", "activation-order groups");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(json_object_get(json_object_get(json_object_get(c.config, "quantization_config"),
														"config_groups"), "group_0"),
						"input_activations", json_pack("{s:i, s:s, s:b}", "num_bits", 8, "type", "int", "dynamic", 0));
	expect_error(ckpt_write(&c, "static-act"), NULL, "static input activation quantization", "static activation scales");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(json_object_get(c.config, "quantization_config"), "quant_method", json_string("awq"));
	expect_error(ckpt_write(&c, "awq"), NULL, "quant_method \"awq\" is not supported", "an AWQ config");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_set_new(json_object_get(c.config, "quantization_config"), "format", json_string("marlin-24"));
	expect_error(ckpt_write(&c, "marlin"), NULL, "format \"marlin-24\" is not supported", "an unknown format");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_array_set_new(json_object_get(json_object_get(c.config, "quantization_config"), "ignore"), 1,
					   json_string("re:(unclosed"));
	expect_error(ckpt_write(&c, "regex"), NULL, "not a supported regular expression", "a broken ignore pattern");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_array_remove(json_object_get(json_object_get(c.config, "quantization_config"), "ignore"), 0);
	expect_error(ckpt_write(&c, "ignore"), NULL, "quantizes module lm_head, but its weight is stored as F32",
				 "a config that quantizes lm_head, stored unquantized");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	json_object_del(c.config, "quantization_config");
	expect_error(ckpt_write(&c, "no-config"), NULL, "no quantization_config", "quantized tensors without a config");
	ckpt_free(&c);
	ckpt_read(d4, &c);
	{
		float		one = 1.0f;

		json_object_set_new(c.header, "model.layers.0.self_attn.q_proj.input_scale",
							json_pack("{s:s, s:[i], s:[I,I]}", "dtype", "F32", "shape", 1, "data_offsets",
									  (json_int_t) c.data_len, (json_int_t) c.data_len + 4));
		c.data = realloc(c.data, c.data_len + 4);
		memcpy(c.data + c.data_len, &one, 4);
		c.data_len += 4;
		expect_error(ckpt_write(&c, "input-scale"), NULL, "static activation scales are not supported",
					 "an input_scale tensor");
	}
	ckpt_free(&c);
	ckpt_read(d4, &c);
	{
		json_t	   *g = json_object_get(json_object_get(c.config, "quantization_config"), "config_groups");
		json_t	   *g1 = json_deep_copy(json_object_get(g, "group_0"));

		json_object_set_new(json_object_get(g1, "weights"), "group_size", json_integer(64));
		json_object_set_new(g, "group_1", g1);
		expect_error(ckpt_write(&c, "mixed"), NULL, "mixed precision", "two config groups with different schemes");
	}
	ckpt_free(&c);
	expect_error(d4, "int8", "already quantized", "quantization at load of a quantized checkpoint");
	expect_error(src, "int3", "unknown quantization \"int3\"", "an unknown quantization at load");

	/* FP8 */
	ckpt_read(d8, &c);
	c.data[data_offset(&c, "model.layers.1.self_attn.k_proj.weight") + 5] = 0x7f;
	expect_error(ckpt_write(&c, "fp8-nan"), NULL, "is an FP8 NaN", "an FP8 NaN weight");
	ckpt_free(&c);
	ckpt_read(d8, &c);
	{
		float		big = 300.0f;

		memcpy(c.data + data_offset(&c, scale), &big, 4);
		expect_error(ckpt_write(&c, "fp8-scale"), NULL, "FP8 scales must be below 256", "an FP8 scale out of range");
	}
	ckpt_free(&c);
	ckpt_read(d8, &c);
	json_object_set_new(json_object_get(c.header, "model.layers.1.self_attn.k_proj.weight"), "dtype",
						json_string("I8"));
	expect_error(ckpt_write(&c, "fp8-dtype"), NULL, "has dtype I8, but the checkpoint's quantization",
				 "int8 data where the config says FP8");
	ckpt_free(&c);
	ckpt_read(d8, &c);
	json_object_set_new(json_object_get(c.config, "quantization_config"), "format", json_string("int-quantized"));
	expect_error(ckpt_write(&c, "fp8-format"), NULL, "inconsistent", "format int-quantized with float weights");
	ckpt_free(&c);
}

/* ------------------------------------------------------------------ */

static void
rm_rf(const char *dir)
{
	char		cmd[600];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		tap_diag("could not remove %s", dir);
}

int
main(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/kl-quant-XXXXXX");
	if (!mkdtemp(tmpdir))
	{
		perror("mkdtemp");
		return 1;
	}
	test_e4m3();
	test_packed_layout();
	test_kernels();
	test_published_formats();
	test_levels_end_to_end();
	test_state_fingerprint();
	test_batch_invariance("int4");
	test_batch_invariance("fp8");
	test_batch_invariance("int8");
	test_broken();
	rm_rf(tmpdir);
	return tap_done();
}
