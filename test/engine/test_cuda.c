/*
 * test_cuda.c — the CUDA backend (kimi_linear_cuda.so) against the reference
 * golden data and against the CPU engine.
 *
 * Where no GPU or no CUDA library is present (CI), every check is skipped:
 * "ok 1 # SKIP no GPU".  KL_REQUIRE_GPU=1 turns that into a failure (the
 * driver script on the GPU machine, bench/bench-cuda.sh, sets it).
 * KL_TEST_ONLY=check_mla_flash,check_kda runs only the checks whose call in
 * main() contains one of the strings (a quick device run of what a change
 * touches; unset: everything).
 *
 * Tolerances (relative error ||ours - ref|| / ||ref|| over a tensor):
 *   fp32 precision  1e-4 against the golden data and against the CPU engine
 *                   (logits, greedy ids, KDA states); greedy ids identical
 *   bf16 precision  3e-2 on logits, the first 8 greedy ids identical
 * Checked for each golden model (tiny_a: MoE, fp32 weights; tiny_c: bf16
 * weights, 90 tokens across a 64-token chunk): one-call prefill (chunkwise
 * KDA, expanded MLA), the per-token recurrence, token-by-token decode (CUDA
 * graphs after the second step), uneven pieces, greedy continuation, the KDA
 * states, and states moving GPU -> CPU and CPU -> GPU through the serializer.
 * In bf16 precision each golden model also decodes 12 sequences together
 * (steps of 12 tokens) against the CPU engine: logits within 3e-2, greedy
 * ids equal wherever the CPU's choice is clear of that tolerance.  (Such
 * steps take the tensor-core experts only with bf16 expert weights; tiny_a's
 * are fp32 and tiny_c has no experts, so neither does: check_expert_mma
 * covers that kernel directly.)
 * A model with the 48B model's head shapes (KDA K = 128, MLA R = 512,
 * Dr = 64, grouped MoE routing) with identical random bf16 weights on both
 * backends checks the kernels' large-shape paths against the CPU, including
 * a ragged batch that mixes prefill and decode.  Its random router makes
 * whole-model bf16 comparisons unable to tell a kernel bug from rounding
 * (bf16 activations flip expert choices), so there kernels are compared
 * with kernels: the expert products on tensor cores (kernels/expert_mma.cu)
 * against the CUDA-core expert kernel through the library's test hook
 * kl_cuda_test_expert_products (48B expert shapes, steps of 8 to 64 tokens,
 * the same bf16 activations: 1e-5), and the MLA decode attention on tensor
 * cores over the bf16 cache against the CUDA-core kernel, 1100 tokens
 * decoded one by one (1e-2 in each window of contexts; the first 64 also
 * against the CPU within 3e-2) and one step on the same cache.  The trained
 * pgdocs-kimi-18m's three greedy samples must come out token for token.
 * In bf16 precision the MLA cache holds bf16 rows: states move between the
 * GPU and the CPU through the fp32 state format (checked both ways).
 *
 * A decode step's KDA mixer in one kernel (kk_kda_decode, KL_CUDA_KDA_FUSED,
 * the default on Hopper) must give the three kernels' output, state and conv
 * tails bit for bit (check_kda_decode, through the hook
 * kl_cuda_test_kda_decode: the 48B and the golden models' KDA shapes, 1, 3
 * and 8 sequences, fp32 and bf16-rounded states), and the golden models must
 * decode to the same logits bit for bit either way, in fp32 and bf16
 * precision (check_kda_fused_model).  Its early form (KL_CUDA_KDA_DEC_EARLY,
 * the default: the state, tails and step metadata read before the PDL wait)
 * must match the waiting form the same ways (check_kda_decode with both, and
 * check_kda_dec_early_model: the golden models and a K = 128 random model,
 * 1, 2 and 4 sequences, both precisions).  The block-rows GEMVs' early
 * weight requests (KL_CUDA_ROWS_EARLY, the default) must not change a bit
 * either (check_rows_early_model: the K = 128 random model, 1, 2 and 4
 * sequences, both precisions; check_rows_early_48b: the 48B shapes, whose
 * 2304- and 4096-column rows are held whole), nor in the quantized
 * CUDA-core GEMVs it also covers (check_rows_early_gemv_q: gemv_q.cu's
 * products of 1, 2 and 9 rows on the 48B widths, FP8, int8, int4 and mixed
 * batches, through the hook kl_cuda_test_gemv_q; check_rows_early_q48: the
 * 48B shapes with FP8 and int4 weights, fp32 and bf16 precision), also at
 * one row (KL_CUDA_Q_EARLY1 0, 1 and 2: check_rows_early_gemv_q,
 * check_q_early1_q48).  The same holds for the wide block-rows GEMV with 3
 * and 4 rows a block at one row (KL_CUDA_ROWS_WIDE1: check_rows_wide1,
 * through the hook kl_cuda_test_rows_wide1, and check_rows_wide1_48b), the
 * row norms' early reads (KL_CUDA_NORM_EARLY: check_norm_early_model, the
 * K = 128 random model, and check_norm_early_48b) and the one-token rank
 * routing's ballot grouping (KL_CUDA_ROUTE_RANK1: check_route_rank1 through
 * the routing hook, check_route_rank1_48b); the 48B ones through
 * check_env_48b (each value's model made in turn, logits memcmp).  Nor
 * must the batch-1 expert products in the tiled kernel (KL_CUDA_EXPERT_B1,
 * the default; check_expert_paths' paths 2-8 through the hook
 * kl_cuda_test_expert_paths, check_expert_b1_model: the K = 128 random model,
 * 1 and 2 sequences, both precisions; check_expert_b1_48b: the 48B shapes,
 * every form).
 *
 * The KDA gated norm as a warp per (row, head) and prefill's prep as a
 * warp walking rows (KL_CUDA_KDA_ELEM_WARP masks 2 and 6) must give the
 * block kernels' (mask 0) outputs bit for bit, and with the fast silu and
 * softplus of precision bf16 (mask 14, the default) within TOL_KDA_FAST
 * (check_kda_elem_warp, through the hook kl_cuda_test_kda_elem: head sizes
 * 128, 64, 32, prefill and decode steps).
 *
 * Prefill's chunkwise KDA form on tensor cores (kk_kda_chunked_mma,
 * precision bf16, KL_CUDA_KDA_MMA) must stay within TOL_KDA_MMA of the fp32
 * kernels on outputs and state (check_kda_chunked_mma, through the hook
 * kl_cuda_test_kda_chunked); the golden models' bf16 prompts (40 and 90
 * tokens) run it too.  Its two-kernel parallel half (KL_CUDA_KDA_PREP_MMA=6)
 * and that half's bf16-input form must give the 63.5 KB kernel's (=3)
 * arrays, outputs and state bit for bit (check_kda_prep_split, through the
 * hook kl_cuda_test_kda_chunked_raw), in each of =6's forms
 * (KL_CUDA_KDA_KP6_WIDE 2, the default, 1 and 0), with the pairs inside its
 * sub-chunks on CUDA cores (KL_CUDA_KDA_KP6_INTRA=0, pinned there).  With
 * KL_CUDA_KDA_KP6_INTRA=1 (64 of a sub-chunk's 136 pairs from fp16 operands
 * on tensor cores) the prep's other arrays keep their bits and P, W, U stay
 * within bounds of an fp64 reference derived from the operands' rounding
 * (check_kda_kp6_intra).
 *
 * The KDA op's bf16 sides in precision bf16 (KL_CUDA_KDA_IN16: q, k, v, f
 * products keep bf16 results; KL_CUDA_KDA_OUT16: bf16 prepared q, k, v):
 * the rows prep of bf16 types must equal the fp32 prep on the same values
 * bit for bit (check_kda_prep16, hook kl_cuda_test_kda_prep16), and whole
 * random models' logits, measured against precision fp32, may be at most
 * 1.5 times as far off as the bf16 path without them (check_kda_in16_model;
 * IN16, the default, holds it; OUT16 is opt-in and only measured there).
 * The rows prep's forms (KL_CUDA_KDA_PREP_FORM 1-6, kda.cu's
 * kda_prep_ring_kernel) must give form 0's outputs bit for bit, but forms
 * 4-6's q and k or g within TOL_KDA_PF (check_kda_prep_form, hook
 * kl_cuda_test_kda_prep_form), and form 0's FAST math stays within
 * TOL_KDA_FAST of the exact functions there.
 *
 * The wgmma MLA decode attention's forms (cuda_mla.c, cuda_mla_wg_read):
 * each warpgroup streaming a key range of its own (KL_CUDA_MLA_WG_DUAL=1)
 * must give the one-range kernel's olat for the same ranges bit for bit,
 * and the tiles' L2 prefetch (KL_CUDA_MLA_WG_PF) and the keys a block
 * (KL_CUDA_MLA_WG_SPLIT) may change no bit for the same ranges
 * (check_mla_wg_forms, through the hook kl_cuda_test_mla_decode on
 * check_mla_decode's tokens; check_mla_wg_model, the 48B shapes' random
 * model: bit for bit where the ranges agree, within 1e-2 and the clear
 * greedy ids equal where DUAL halves them).
 *
 * The decode MLA products with 16-byte weight loads (KL_CUDA_MLA_SMALL)
 * must equal the older kernels within 1e-5 (check_mla_small, through the
 * hook kl_cuda_test_mla_small: 48B head shapes, 1 to 64 tokens, bf16 and
 * fp32 weights, mixed absorbed and expanded tokens).
 *
 * The MLA prefill attention in one kernel (kernels/mla_flash.cu,
 * KL_CUDA_MLA_FLASH, the bf16 default) against a double-precision reference
 * on the same bf16 inputs within 5e-3 (check_mla_flash, through the hook
 * kl_cuda_test_mla_flash: 48B and golden head shapes, 1 to 1000 queries,
 * from position 0 and later); the golden bf16 checks run it end to end.
 *
 * The fused decode routing in warps (kk_moe_route_group_warp, on unless
 * KL_CUDA_ROUTE_WARP=0) must give the block kernel's outputs bit for bit
 * (both launchers called on the same router logits: 48B shape with and
 * without groups, both weight rules, ties, 1 to 64 tokens); with NaN and
 * infinite logits its choices stay in range and every pair has one place.
 * Routing by rank (kk_moe_route_group_rank, on unless KL_CUDA_ROUTE_RANK=0)
 * must give the warp kernel's outputs bit for bit, NaN and infinite logits
 * included (check_route_rank: 48B shape, both weight rules, sigmoid and
 * softmax, ties, shared rows, 1 to 8 tokens).
 *
 * The device sampler must choose exactly what the CPU sampler
 * (kl_sample_draw) chooses for the same logits and draw: checked on
 * vocabularies of 384, 1000 and 163840 with peaked, flat, tied, huge and
 * NaN/-inf logits, greedy, temperature, top-k, top-p, min-p, repetition
 * penalty, allowed-token masks and their combinations; and through
 * kl_forward_sample on a batch of sequences with different settings.  Both
 * device samplers: the wide one (a cluster of blocks per row, the default),
 * one block per row (KL_CUDA_SAMPLE_WIDE=0) and the wide one's fast form
 * (KL_CUDA_SAMPLE_WIDE=2).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE				/* dladdr: finding the CUDA library's test hook */
#endif
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "kl_util.h"
#include "model.h"
#include "quant.h"
#include "tap.h"

#define TOL_FP32 1e-4
#define TOL_BF16 3e-2
/*
 * KK_KDA_EW_FAST (precision bf16's KDA rows prep with __expf / __fdividef in
 * silu and softplus) against the exact kernels, rel_err of each output:
 * silu within ~4e-6 relative a value (common.cuh siluf_fast), the L2
 * norms' sums of those within as much, so q and k ~8e-6, g ~3e-6; 2e-5
 * leaves a factor 2.5.  (The outputs are rounded to bf16 next: 2^-9.)
 */
#define TOL_KDA_FAST 2e-5

static double
rel_err(const float *a, const float *ref, size_t n)
{
	double		num = 0,
				den = 0;

	for (size_t i = 0; i < n; i++)
	{
		double		d = (double) a[i] - ref[i];

		if (isnan(a[i]))
			return INFINITY;
		num += d * d;
		den += (double) ref[i] * ref[i];
	}
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int
argmax(const float *x, int n)
{
	int			b = 0;

	for (int i = 1; i < n; i++)
		if (x[i] > x[b])
			b = i;
	return b;
}

static void
die(const char *what, const kl_err *err)
{
	tap_diag("%s: %s", what, err->msg);
	tap_ok(0, "%s", what);
	exit(tap_done());
}

/* load with a MoE routing rule (NULL: the default) */
static kl_model *
load_routed(const char *dir, const char *device, const char *precision, const char *routing)
{
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;

	o.device = device;
	o.precision = precision;
	o.moe_routing = routing;
	if (kl_model_load(dir, &o, &m, &err) != KL_OK)
		die("model load", &err);
	return m;
}

static kl_model *
load(const char *dir, const char *device, const char *precision)
{
	return load_routed(dir, device, precision, NULL);
}

/* feed ids[0..T) in pieces of `step` (0 = one call); all logits into out */
static void
feed(kl_ctx *ctx, kl_seq *seq, const int32_t *ids, int T, int step, int V, float *out)
{
	kl_err		err;

	for (int t0 = 0; t0 < T;)
	{
		int			n = step > 0 && step < T - t0 ? step : T - t0;
		kl_batch_item it = {seq, ids + t0, n, out ? out + (size_t) t0 * V : NULL, out != NULL};

		if (kl_forward(ctx, &it, 1, &err) != KL_OK)
			die("forward", &err);
		t0 += n;
	}
}

static float *
logits_of(kl_model *m, const int32_t *ids, int T, int step, bool recurrent, kl_seq **keep)
{
	kl_err		err;
	kl_ctx	   *ctx;
	kl_seq	   *seq;
	int			V = kl_model_config(m)->vocab_size;
	float	   *out = malloc(sizeof(float) * (size_t) T * V);

	if (kl_ctx_new(m, 0, &ctx, &err) != KL_OK || kl_seq_new(m, &seq, &err) != KL_OK)
		die("context", &err);
	kl_ctx_force_recurrent(ctx, recurrent);
	feed(ctx, seq, ids, T, step, V, out);
	kl_ctx_free(ctx);
	if (keep)
		*keep = seq;
	else
		kl_seq_free(seq);
	return out;
}

/* ------------------------------------------------------------------ golden models */

typedef struct golden
{
	char		dir[1024];
	kl_safetensors st;
	int			T,
				V,
				split;
	const int32_t *ids;
} golden;

static const kl_st_tensor *
gt(golden *g, const char *name)
{
	const kl_st_tensor *t = kl_st_find(&g->st, name);

	if (!t)
	{
		tap_diag("golden tensor %s missing", name);
		exit(1);
	}
	return t;
}

/*
 * One golden file: golden.safetensors is the reference code's output (MoE
 * routing "reference"); golden_route_select.safetensors the default rule's,
 * without KDA states.
 */
static void
check_golden(const char *model, const char *file, const char *prec)
{
	char		name[160];
	const char *routing;		/* the golden file's MoE routing rule (NULL: the default) */
	golden		g;
	kl_err		err;
	char		path[1200];
	kl_model   *m;
	const kl_config *c;
	float	   *l;
	kl_seq	   *seq;
	bool		fp32 = strcmp(prec, "fp32") == 0;
	double		tol = fp32 ? TOL_FP32 : TOL_BF16;
	const kl_st_tensor *ref;

	snprintf(name, sizeof(name), "%s%s", model, strcmp(file, "golden.safetensors") == 0 ? "" : " (routing select)");
	memset(&g, 0, sizeof(g));
	snprintf(g.dir, sizeof(g.dir), "%s/golden/%s", tap_fixture_dir(), model);
	snprintf(path, sizeof(path), "%s/%s", g.dir, file);
	if (kl_st_open_file(path, &g.st, &err) != KL_OK)
		die("golden data", &err);
	routing = strcmp(file, "golden.safetensors") == 0 ? "reference" : NULL;
	m = load_routed(g.dir, "cuda", prec, routing);
	if (strcmp(prec, "auto") == 0)
		tap_ok(strcmp(kl_model_precision(m), "bf16") == 0, "%s: precision auto (the default) on the GPU is bf16 (%s)",
			   name, kl_model_precision(m));
	c = kl_model_config(m);
	g.V = c->vocab_size;
	g.T = (int) gt(&g, "input_ids")->numel;
	g.ids = gt(&g, "input_ids")->data;
	ref = gt(&g, "logits");

	l = logits_of(m, g.ids, g.T, 0, false, &seq);
	{
		double		e = rel_err(l, ref->data, (size_t) g.T * g.V);

		tap_ok(e <= tol, "%s %s: logits of all %d positions, one call (rel err %.2e)", name, prec, g.T, e);
	}

	/* KDA states after the prompt, downloaded from the GPU (where the file has them) */
	if (kl_st_find(&g.st, "state.layers.0.recurrent") || kl_st_find(&g.st, "state.layers.1.recurrent"))
	{
		int			HK = c->kda_heads * c->kda_head_dim,
					W = c->conv_kernel;
		double		worst = 0;
		float	   *S = malloc(sizeof(float) * (size_t) HK * c->kda_head_dim);
		float	   *conv = malloc(sizeof(float) * 3 * (size_t) HK * W);

		for (int i = 0; i < c->n_layers; i++)
		{
			char		tn[128];
			int			k = m->layers[i].kind_index;
			static const char *cv[3] = {"conv_q", "conv_k", "conv_v"};

			if (c->layer_kind[i] != KL_LAYER_KDA)
				continue;
			m->be->ops->download(m->be, S, seq->kda_S[k], sizeof(float) * (size_t) HK * c->kda_head_dim);
			m->be->ops->download(m->be, conv, seq->kda_conv[k], sizeof(float) * 3 * (size_t) HK * W);
			snprintf(tn, sizeof(tn), "state.layers.%d.recurrent", i);
			{
				double		e = rel_err(S, gt(&g, tn)->data, (size_t) HK * c->kda_head_dim);

				worst = e > worst ? e : worst;
			}
			for (int j = 0; j < 3; j++)
			{
				double		e;

				snprintf(tn, sizeof(tn), "state.layers.%d.%s", i, cv[j]);
				e = rel_err(conv + (size_t) j * HK * W, gt(&g, tn)->data, (size_t) HK * W);
				worst = e > worst ? e : worst;
			}
		}
		tap_ok(worst <= tol, "%s %s: KDA states and conv tails after the prompt (worst rel err %.2e)", name, prec,
			   worst);
		free(S);
		free(conv);
	}

	/* greedy continuation, the reference's ids fed back */
	{
		const kl_st_tensor *gi = gt(&g, "greedy_ids");
		const kl_st_tensor *gl = gt(&g, "greedy_logits");
		int			N = (int) gi->numel;
		float	   *lg = malloc(sizeof(float) * (size_t) N * g.V);
		int			same = 0,
					prefix = -1;
		int32_t		tok = argmax(l + (size_t) (g.T - 1) * g.V, g.V);
		kl_ctx	   *ctx;

		if (kl_ctx_new(m, 0, &ctx, &err) != KL_OK)
			die("context", &err);
		for (int j = 0; j < N; j++)
		{
			kl_batch_item it = {seq, &tok, 1, lg + (size_t) j * g.V, false};

			if (tok == ((const int32_t *) gi->data)[j])
				same++;
			else if (prefix < 0)
				prefix = j;
			tok = ((const int32_t *) gi->data)[j];
			if (kl_forward(ctx, &it, 1, &err) != KL_OK)
				die("forward", &err);
			tok = argmax(lg + (size_t) j * g.V, g.V);
		}
		if (prefix < 0)
			prefix = N;
		if (fp32)
			tap_ok(same == N, "%s %s: %d greedy ids identical (%d)", name, prec, N, same);
		else
			tap_ok(prefix >= (N < 8 ? N : 8), "%s %s: first 8 greedy ids identical (%d of %d leading ids agree)",
				   name, prec, prefix, N);
		{
			double		e = rel_err(lg, gl->data, (size_t) N * g.V);

			tap_ok(e <= tol, "%s %s: greedy logits (rel err %.2e)", name, prec, e);
		}
		free(lg);
		kl_ctx_free(ctx);
	}
	kl_seq_free(seq);

	/* other ways to feed the prompt (fp32: all against the reference) */
	{
		struct
		{
			int			step;
			bool		recurrent;
			const char *what;
		}			ways[] = {
			{0, true, "per-token KDA recurrence"},
			{1, false, "token by token (decode kernels, CUDA graphs)"},
			{17, false, "pieces of 17"},
			{70, false, "pieces of 70 (expanded MLA with a cached prefix)"},
		};

		for (size_t i = 0; i < sizeof(ways) / sizeof(ways[0]); i++)
		{
			float	   *lw;
			double		e;

			if (!fp32 && i != 1)
				continue;
			lw = logits_of(m, g.ids, g.T, ways[i].step, ways[i].recurrent, NULL);
			e = rel_err(lw, ref->data, (size_t) g.T * g.V);
			tap_ok(e <= tol, "%s %s: %s (rel err %.2e)", name, prec, ways[i].what, e);
			free(lw);
		}
	}

	/* states between devices: GPU -> CPU and CPU -> GPU, continuing after `split`
	 * (bf16: the GPU's cache holds bf16 rows, converted at the boundary) */
	{
		kl_model   *cpu = load_routed(g.dir, "cpu", "fp32", routing);
		kl_model   *from[2] = {m, cpu},
				   *to[2] = {cpu, m};
		static const char *names[2] = {"GPU -> CPU", "CPU -> GPU"};
		int			split = g.T * 2 / 3;

		for (int d = 0; d < 2; d++)
		{
			kl_seq	   *a,
					   *b;
			kl_ctx	   *ca,
					   *cb;
			uint8_t    *blob;
			size_t		len;
			kl_blob		part;
			float	   *rest = malloc(sizeof(float) * (size_t) (g.T - split) * g.V);
			double		e;

			if (kl_ctx_new(from[d], 0, &ca, &err) != KL_OK || kl_ctx_new(to[d], 0, &cb, &err) != KL_OK ||
				kl_seq_new(from[d], &a, &err) != KL_OK || kl_seq_new(to[d], &b, &err) != KL_OK)
				die("context", &err);
			feed(ca, a, g.ids, split, 0, g.V, NULL);
			if (kl_state_save(a, 0, &blob, &len, &err) != KL_OK)
				die("state save", &err);
			part.data = blob;
			part.len = len;
			if (kl_state_load(b, &part, 1, &err) != KL_OK)
				die("state load", &err);
			feed(cb, b, g.ids + split, g.T - split, 0, g.V, rest);
			e = rel_err(rest, (const float *) ref->data + (size_t) split * g.V, (size_t) (g.T - split) * g.V);
			tap_ok(e <= tol, "%s %s: state saved after %d tokens %s, continued there (rel err %.2e)", name, prec,
				   split, names[d], e);
			free(blob);
			free(rest);
			kl_seq_free(a);
			kl_seq_free(b);
			kl_ctx_free(ca);
			kl_ctx_free(cb);
		}
		kl_model_free(cpu);
	}
	free(l);
	kl_model_free(m);
	kl_st_close(&g.st);
}

/* ------------------------------------------------------------------ large shapes, CPU vs GPU */

static const char *big_config =
"{\"model_type\": \"kimi_linear\", \"vocab_size\": 1000, \"hidden_size\": 256, \"num_hidden_layers\": 4,"
" \"intermediate_size\": 512, \"rms_norm_eps\": 1e-5, \"tie_word_embeddings\": false, \"hidden_act\": \"silu\","
" \"bos_token_id\": 1, \"eos_token_id\": 2, \"pad_token_id\": 0,"
" \"linear_attn_config\": {\"kda_layers\": [1, 3, 4], \"full_attn_layers\": [2], \"num_heads\": 2,"
"   \"head_dim\": 128, \"short_conv_kernel_size\": 4},"
" \"num_attention_heads\": 4, \"q_lora_rank\": null, \"kv_lora_rank\": 512, \"qk_nope_head_dim\": 128,"
" \"qk_rope_head_dim\": 64, \"v_head_dim\": 128, \"mla_use_nope\": true,"
" \"num_experts\": 16, \"num_experts_per_token\": 4, \"num_shared_experts\": 1, \"moe_intermediate_size\": 128,"
" \"first_k_dense_replace\": 1, \"moe_layer_freq\": 1, \"moe_router_activation_func\": \"sigmoid\","
" \"moe_renormalize\": true, \"routed_scaling_factor\": 2.446, \"num_expert_group\": 4, \"topk_group\": 2}";

/*
 * kernels.h's device form of a quantized matrix (the test does not include
 * kernels.h: it needs the CUDA headers): data rows, then the fp32 scales at
 * the next multiple of 256 bytes.  KK_WF_*: FP8 2, INT8 3, INT4 4.
 */
static size_t
q_scale_offset(int rows, size_t row_bytes)
{
	return ((size_t) rows * row_bytes + 255) & ~(size_t) 255;
}

static int
q_wf(kl_qtype t)
{
	return t == KL_Q_FP8 ? 2 : t == KL_Q_INT8 ? 3 : 4;
}

/* the CPU's quantized matrix (host data and scales) into the GPU's object of the same form */
static void
copy_qweight(kl_model *gpu, const kl_weight *src, kl_weight *dst)
{
	const kl_qmat *a = &src->q,
			   *b = &dst->q;

	if (a->type != b->type || a->rows != b->rows || a->cols != b->cols || a->group != b->group ||
		a->row_bytes != b->row_bytes || a->n_groups != b->n_groups)
	{
		tap_diag("weight %s: quantized forms differ between backends", src->name);
		exit(1);
	}
	gpu->be->ops->upload(gpu->be, dst->dev, a->data, (size_t) a->rows * a->row_bytes);
	gpu->be->ops->upload(gpu->be, (char *) dst->dev + q_scale_offset(a->rows, a->row_bytes), a->scales,
						 sizeof(float) * (size_t) a->rows * a->n_groups);
}

static void
copy_weight(kl_model *cpu, kl_model *gpu, const kl_weight *src, kl_weight *dst)
{
	size_t		bytes;

	if (!src->dev || !dst->dev)
		return;
	if (src->q.type != KL_Q_NONE || dst->q.type != KL_Q_NONE)
	{
		copy_qweight(gpu, src, dst);
		return;
	}
	if (src->dtype != dst->dtype || src->rows != dst->rows || src->cols != dst->cols)
	{
		tap_diag("weight %s: shapes or dtypes differ between backends", src->name);
		exit(1);
	}
	bytes = (size_t) src->rows * src->cols * (src->dtype == KL_DT_F32 ? 4 : 2);
	(void) cpu;
	gpu->be->ops->upload(gpu->be, dst->dev, src->dev, bytes);
}

static void
copy_mlp(kl_model *cpu, kl_model *gpu, const kl_mlp *a, kl_mlp *b)
{
	copy_weight(cpu, gpu, &a->gate, &b->gate);
	copy_weight(cpu, gpu, &a->up, &b->up);
	copy_weight(cpu, gpu, &a->down, &b->down);
}

/* random models draw their matrices from each backend's generator: make the
 * GPU's equal to the CPU's (vectors already are: they come from the loader) */
static void
copy_weights(kl_model *cpu, kl_model *gpu)
{
	kl_err		err;

	copy_weight(cpu, gpu, &cpu->embed, &gpu->embed);
	copy_weight(cpu, gpu, &cpu->lm_head, &gpu->lm_head);
	for (int i = 0; i < cpu->cfg.n_layers; i++)
	{
		kl_layer   *a = &cpu->layers[i],
				   *b = &gpu->layers[i];

		if (a->kind == KL_LAYER_KDA)
		{
			kl_weight  *wa[] = {&a->kda.q_proj, &a->kda.k_proj, &a->kda.v_proj, &a->kda.f_a, &a->kda.f_b,
			&a->kda.b_proj, &a->kda.g_a, &a->kda.g_b, &a->kda.o_proj};
			kl_weight  *wb[] = {&b->kda.q_proj, &b->kda.k_proj, &b->kda.v_proj, &b->kda.f_a, &b->kda.f_b,
			&b->kda.b_proj, &b->kda.g_a, &b->kda.g_b, &b->kda.o_proj};

			for (size_t j = 0; j < sizeof(wa) / sizeof(wa[0]); j++)
				copy_weight(cpu, gpu, wa[j], wb[j]);
		}
		else
		{
			kl_weight  *wa[] = {&a->mla.q_proj, &a->mla.q_a, &a->mla.q_b, &a->mla.kv_a, &a->mla.kv_b, &a->mla.o_proj};
			kl_weight  *wb[] = {&b->mla.q_proj, &b->mla.q_a, &b->mla.q_b, &b->mla.kv_a, &b->mla.kv_b, &b->mla.o_proj};

			for (size_t j = 0; j < sizeof(wa) / sizeof(wa[0]); j++)
				copy_weight(cpu, gpu, wa[j], wb[j]);
			/* the backend's private form of kv_b must follow */
			gpu->be->ops->release_mla(gpu->be, &b->mla);
			if (gpu->be->ops->prepare_mla(gpu->be, &b->mla, &err) != KL_OK)
				die("prepare_mla", &err);
		}
		if (a->is_moe)
		{
			copy_weight(cpu, gpu, &a->moe.router, &b->moe.router);
			for (int e = 0; e < cpu->cfg.n_experts; e++)
				copy_mlp(cpu, gpu, &a->moe.experts[e], &b->moe.experts[e]);
			if (a->moe.has_shared)
				copy_mlp(cpu, gpu, &a->moe.shared, &b->moe.shared);
		}
		else
			copy_mlp(cpu, gpu, &a->mlp, &b->mlp);
	}
}

/* ------------------------------------------------------------------ prefill experts */

static float *rand_floats(size_t n, double lo, double hi, uint64_t *rs);

/* kl_cuda_moe_prefill_path (cuda_moe.c): the variant asked, the one that ran, a refusal's status */
typedef int (*moe_path_fn) (kl_backend *be, int info[3]);

/*
 * The symbol name of the library that holds model m's backend (the CUDA
 * library's test hooks and statistics, exported but not used by the
 * backend): NULL when it is missing.  *lib: that library's handle (NULL when
 * not found), for the caller to dlclose.
 */
static void *
backend_symbol(const kl_model *m, const char *name, void **lib)
{
	Dl_info		info;

	*lib = NULL;
	if (dladdr((const void *) m->be->ops, &info) && info.dli_fname)
		*lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
	return *lib ? dlsym(*lib, name) : NULL;
}

static moe_path_fn
moe_path_hook(kl_model *m)
{
	void	   *lib;

	/* (the handle stays open: the library stays loaded while models use it) */
	return (moe_path_fn) backend_symbol(m, "kl_cuda_moe_prefill_path", &lib);
}

/* the MoE op alone of layer L on T host rows x (one prefill batch), its output to the host */
static float *
moe_op_alone(kl_model *m, int L, const float *x, int T)
{
	const kl_config *c = kl_model_config(m);
	size_t		sz = sizeof(float) * (size_t) T * c->hidden_size;
	kl_backend *be = m->be;
	float	   *dx = be->ops->alloc(be, sz),
			   *dy = be->ops->alloc(be, sz),
			   *y = malloc(sz);

	if (!dx || !dy || !y)
		die("memory for the MoE op alone", &be->err);
	be->ops->upload(be, dx, x, sz);
	be->ops->moe(be, c, &m->layers[L].moe, dy, dx, T);
	be->ops->download(be, y, dy, sz);	/* (the download launches the held-back combine first) */
	if (be->failed)
		die("the MoE op alone", &be->err);
	be->ops->release(be, dx);
	be->ops->release(be, dy);
	return y;
}

/*
 * The prefill expert paths of bf16 precision (KL_CUDA_MOE_PREFILL) on the
 * same weights and the same activations, the MoE op alone (routing is fp32
 * and the same kernels in every path, so the choices agree and only the
 * expert products differ): a model made with each KL_CUDA_MOE_PREFILL (4,
 * the default: 3 grouped on the device; 3: batched products over size
 * classes) against 0 (the older per-expert loop); g16 gives the shape and
 * weights.
 *   3 vs 0: variant 3 (batched products over size classes of padded
 *     slots, token-major gather, combine reading the bf16 outputs) also
 *     rounds gate x, up x and the expert outputs to bf16.  A C emulation of
 *     exactly those roundings (D 256, F 128 and the 48B's D 2304, F 1024;
 *     random bf16 weights, 4 weighted experts, routed part only, without
 *     the shared expert that both compute alike) gives a relative error of
 *     3.8e-3 to 4.0e-3: bounded by 1e-2.  Also with a skewed router (score
 *     bias 8 on experts 0..2: each takes every token, 997 rows, a slot of
 *     1024; expert 3 about a fifth; the others tens of rows, slots of 64 or
 *     128), so that classes of very different sizes run.
 *   4 vs 3: the same layout (the device's grouping equals the host's:
 *     check_moe_pad_group), the same gather, the same cuBLAS calls on the
 *     same shapes, the shared expert merely queued earlier: equal bit for
 *     bit, with both routers and at 100 tokens (working memory of its own).
 * Fails when a path other than the one asked ran (3 or 4 falling back to 0
 * where cuBLAS refuses the batched calls).  (Variants 1 and 2 were removed.)
 */
static void
check_moe_prefill(kl_model *cpu, kl_model *g16, const char *config, const kl_load_opts *ob)
{
	const kl_config *c = kl_model_config(g16);
	int			T = 997,
				L = -1;
	uint64_t	rs = 0x5eed13;
	kl_model   *mv[5] = {NULL, NULL, NULL, NULL, NULL};
	float	   *x,
			   *y[5] = {NULL, NULL, NULL, NULL, NULL};
	static const char *const asked[5] = {"0", NULL, NULL, "3", "4"};	/* (1, 2: removed) */
	moe_path_fn path = moe_path_hook(g16);

	for (int i = 0; i < c->n_layers && L < 0; i++)
		if (g16->layers[i].is_moe)
			L = i;
	if (!path || L < 0)
	{
		tap_ok(0, "the CUDA library exports kl_cuda_moe_prefill_path (and the model has an MoE layer)");
		return;
	}
	for (int v = 0; v < 5; v++)
	{
		kl_err		err = {0};
		char		p[] = "/tmp/kl_test_cuda_XXXXXX";
		int			fd;

		if (!asked[v])
			continue;
		fd = mkstemp(p);
		if (fd < 0 || write(fd, config, strlen(config)) != (ssize_t) strlen(config))
			die("temporary config", &err);
		close(fd);
		setenv("KL_CUDA_MOE_PREFILL", asked[v], 1);
		if (kl_model_create_random(p, ob, "bf16", 7, &mv[v], &err) != KL_OK)
			die("random model (bf16)", &err);
		unsetenv("KL_CUDA_MOE_PREFILL");
		unlink(p);
		copy_weights(cpu, mv[v]);
	}
	x = rand_floats((size_t) T * c->hidden_size, -1, 1, &rs);
	for (int v = 0; v < 5; v += v ? 1 : 3)
	{
		int			info[3] = {-9, -9, -9};

		y[v] = moe_op_alone(mv[v], L, x, T);
		path(mv[v]->be, info);
		tap_ok(info[0] == v && info[1] == v, "bf16 prefill experts, KL_CUDA_MOE_PREFILL=%d%s: ran variant %d "
			   "(asked %d; cuBLAS status of a batched refusal %d)", v, v == 4 ? " (the default)" : "", info[1],
			   info[0], info[2]);
	}
	{
		size_t		n = (size_t) T * c->hidden_size;

		tap_ok(rel_err(y[3], y[0], n) <= 1e-2, "bf16 prefill experts, %d tokens: batched products over size "
			   "classes (3) vs the older loop (0) (rel err %.2e; bf16 g, u, y: 4e-3 in a C emulation)", T,
			   rel_err(y[3], y[0], n));
		tap_ok(memcmp(y[4], y[3], sizeof(float) * n) == 0, "bf16 prefill experts, %d tokens: device grouping (4) "
			   "equals variant 3 bit for bit (the same rows in the same products; rel err %.2e)", T,
			   rel_err(y[4], y[3], n));
	}
	/* a skewed router on the same weights: variants 0 and 3 (score bias 8 on experts 0..2 of layer L) */
	{
		int			E = c->n_experts,
					info[3] = {-9, -9, -9};
		float	   *b = calloc((size_t) E, sizeof(float));
		size_t		n = (size_t) T * c->hidden_size;

		if (!b)
		{
			kl_err		err = {0};

			die("memory for the router bias", &err);
		}
		for (int e = 0; e < 3 && e < E; e++)
			b[e] = 8.0f;
		for (int v = 0; v < 5; v += v ? 1 : 3)
		{
			mv[v]->be->ops->upload(mv[v]->be, mv[v]->layers[L].moe.score_bias, b, sizeof(float) * (size_t) E);
			free(y[v]);
			y[v] = moe_op_alone(mv[v], L, x, T);
		}
		path(mv[3]->be, info);
		tap_ok(info[0] == 3 && info[1] == 3, "bf16 prefill experts, skewed router: ran variant %d (asked %d; "
			   "cuBLAS status of a batched refusal %d)", info[1], info[0], info[2]);
		tap_ok(rel_err(y[3], y[0], n) <= 1e-2, "bf16 prefill experts, %d tokens, skewed router (3 experts take "
			   "every token): batched products over size classes (3) vs the older loop (0) (rel err %.2e)", T,
			   rel_err(y[3], y[0], n));
		path(mv[4]->be, info);
		tap_ok(info[1] == 4 && memcmp(y[4], y[3], sizeof(float) * n) == 0, "bf16 prefill experts, %d tokens, "
			   "skewed router: device grouping (4) ran (%d) and equals variant 3 bit for bit (rel err %.2e)", T,
			   info[1], rel_err(y[4], y[3], n));
		/*
		 * 100 tokens (just over the 64 of the decode path), same router:
		 * 16 slots of 64 or more exceed the 2 (n k + n) bf16 rows the fp32
		 * buffers hold, so variant 3 takes working memory of its own
		 */
		for (int v = 0; v < 5; v += v ? 1 : 3)
		{
			free(y[v]);
			y[v] = moe_op_alone(mv[v], L, x, 100);
		}
		path(mv[3]->be, info);
		tap_ok(info[1] == 3 && rel_err(y[3], y[0], (size_t) 100 * c->hidden_size) <= 1e-2,
			   "bf16 prefill experts, 100 tokens, skewed router: variant 3 ran (%d) and matches the older loop "
			   "(rel err %.2e)", info[1], rel_err(y[3], y[0], (size_t) 100 * c->hidden_size));
		path(mv[4]->be, info);
		tap_ok(info[1] == 4 && memcmp(y[4], y[3], sizeof(float) * (size_t) 100 * c->hidden_size) == 0,
			   "bf16 prefill experts, 100 tokens, skewed router: device grouping (4) ran (%d) and equals variant 3 "
			   "bit for bit (working memory of its own; rel err %.2e)", info[1],
			   rel_err(y[4], y[3], (size_t) 100 * c->hidden_size));
		free(b);
	}
	for (int v = 0; v < 5; v++)
		free(y[v]);
	free(x);
	for (int v = 0; v < 5; v++)
		if (mv[v])
			kl_model_free(mv[v]);
}

/* a random model of config made on the GPU in precision prec (seed 7, bf16 weights), quantized as asked (NULL:
 * bf16), with the environment variable name (NULL: none) set to val while the backend is made */
static kl_model *
random_gpu_model_in(const char *config, const char *prec, const char *quantize, const char *name, const char *val)
{
	char		path[] = "/tmp/kl_test_cuda_XXXXXX";
	int			fd = mkstemp(path);
	kl_load_opts og = {0};
	kl_model   *m;
	kl_err		err = {0};

	if (fd < 0 || write(fd, config, strlen(config)) != (ssize_t) strlen(config))
		die("write a temporary config", &err);
	close(fd);
	og.device = "cuda";
	og.precision = prec;
	og.quantize = quantize;
	if (name)
		setenv(name, val, 1);	/* (read when the backend is made) */
	if (kl_model_create_random(path, &og, "bf16", 7, &m, &err) != KL_OK)
		die("random model", &err);
	if (name)
		unsetenv(name);
	unlink(path);
	return m;
}

/* random_gpu_model_in in precision bf16 */
static kl_model *
random_gpu_model(const char *config, const char *quantize, const char *name, const char *val)
{
	return random_gpu_model_in(config, "bf16", quantize, name, val);
}

/*
 * Quantized experts in the batched prefill paths (KL_CUDA_MOE_PREFILL 4 and
 * 3, the experts converted to bf16 by kk_q_dequant_many_bf16 stage by stage)
 * against the older per-expert loop on converted panels (KL_CUDA_Q_BATCHED=0:
 * variant 0), the MoE op alone, same random quantized weights (seed 7): the
 * products see the same bf16 weights (the panels' values, check_q_dequant)
 * and the same bf16 rows, so the difference is variant 3's bf16 rounding of
 * gate x, up x and the outputs, bounded by 1e-2 as in check_moe_prefill.
 * 997 tokens (every expert used) and 100 (working memory of its own); 4
 * equals 3 bit for bit.
 */
static void
check_moe_prefill_q(const char *config, const char *quantize)
{
	kl_model   *m0 = random_gpu_model(config, quantize, "KL_CUDA_Q_BATCHED", "0"),
			   *m3 = random_gpu_model(config, quantize, "KL_CUDA_MOE_PREFILL", "3"),
			   *m4 = random_gpu_model(config, quantize, NULL, NULL);
	const kl_config *c = kl_model_config(m4);
	moe_path_fn path = moe_path_hook(m4);
	uint64_t	rs = 0x5eed14;
	int			L = -1,
				Ts[2] = {997, 100};

	for (int i = 0; i < c->n_layers && L < 0; i++)
		if (m4->layers[i].is_moe)
			L = i;
	if (!path || L < 0)
		tap_ok(0, "the CUDA library exports kl_cuda_moe_prefill_path (and the model has an MoE layer)");
	else
		for (int ti = 0; ti < 2; ti++)
		{
			int			T = Ts[ti],
						i0[3] = {-9, -9, -9},
						i3[3] = {-9, -9, -9},
						i4[3] = {-9, -9, -9};
			size_t		n = (size_t) T * c->hidden_size;
			float	   *x = rand_floats(n, -1, 1, &rs),
					   *y0 = moe_op_alone(m0, L, x, T),
					   *y3 = moe_op_alone(m3, L, x, T),
					   *y4 = moe_op_alone(m4, L, x, T);

			path(m0->be, i0);
			path(m3->be, i3);
			path(m4->be, i4);
			tap_ok(i0[1] == 0 && i3[1] == 3 && i4[1] == 4 && rel_err(y3, y0, n) <= 1e-2,
				   "%s experts, bf16 prefill, %d tokens: batched products on experts converted to bf16 (3) vs "
				   "the per-expert loop on panels (0) (rel err %.2e; ran %d, %d, %d)", quantize, T,
				   rel_err(y3, y0, n), i0[1], i3[1], i4[1]);
			tap_ok(memcmp(y4, y3, sizeof(float) * n) == 0, "%s experts, bf16 prefill, %d tokens: device grouping "
				   "(4) equals variant 3 bit for bit (rel err %.2e)", quantize, T, rel_err(y4, y3, n));
			free(x);
			free(y0);
			free(y3);
			free(y4);
		}
	kl_model_free(m0);
	kl_model_free(m3);
	kl_model_free(m4);
}

/*
 * The MLA decode attention over the bf16 cache on tensor cores
 * (mla_attend_mma, the default in bf16 precision; KL_CUDA_MLA_MMA=0 keeps
 * mla_attend): 48B head shapes (R = 512, Dr = 64; 4 heads, padded to 16 in
 * the kernel) at contexts up to 1100 keys (two cache pages, 18 key ranges of
 * 64), decoded token by token through each kernel on the same weights and
 * compared in three windows of contexts (1..64, 65..1024, 1025..1100); the
 * first window against the CPU too, within the bf16 tolerance (later windows
 * are not held to the CPU: over hundreds of bf16 steps the random router's
 * expert choices flip, which says nothing about the attention).  Then, on the
 * same cache and states (saved from one GPU sequence, loaded into both), one
 * decode step through each kernel: they differ only in the bf16 rounding of
 * Qabs and P.
 */
static void
check_mla_mma(kl_model *cpu)
{
	kl_model   *mma,
			   *old;
	kl_load_opts ob = {0};
	kl_err		err;
	char		path[] = "/tmp/kl_test_cuda_XXXXXX";
	int			fd = mkstemp(path);
	int			V = cpu->cfg.vocab_size,
				T = 1100;
	int32_t    *ids = malloc(sizeof(int32_t) * (size_t) T);
	float	   *lc,
			   *lg,
			   *lo;
	static const struct
	{
		int			from,
					to;
	}			win[] = {{0, 64}, {64, 1024}, {1024, 1100}};
	static const int lens[] = {1, 63, 300, 1024, 1099};

	if (fd < 0 || write(fd, big_config, strlen(big_config)) != (ssize_t) strlen(big_config))
		die("temporary config", &err);
	close(fd);
	ob.device = "cuda";
	ob.precision = "bf16";
	if (kl_model_create_random(path, &ob, "bf16", 7, &mma, &err) != KL_OK)
		die("random model (bf16)", &err);
	setenv("KL_CUDA_MLA_MMA", "0", 1);
	if (kl_model_create_random(path, &ob, "bf16", 7, &old, &err) != KL_OK)
		die("random model (bf16, KL_CUDA_MLA_MMA=0)", &err);
	unsetenv("KL_CUDA_MLA_MMA");
	unlink(path);
	copy_weights(cpu, mma);
	copy_weights(cpu, old);
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);

	lc = logits_of(cpu, ids, win[0].to, 0, false, NULL);
	lg = logits_of(mma, ids, T, 1, false, NULL);
	lo = logits_of(old, ids, T, 1, false, NULL);
	{
		double		e = rel_err(lg, lc, (size_t) win[0].to * V);

		tap_ok(e <= TOL_BF16, "K=128/R=512 shapes, bf16 cache on tensor cores: decode at contexts 1..%d, GPU vs CPU "
			   "(rel err %.2e)", win[0].to, e);
	}
	/*
	 * Over the whole run the random-weight model amplifies the bf16 rounding
	 * of Qabs and P (1e-3 a step) as it amplifies any difference (its router
	 * is random): measured 1.2e-3, 1.2e-2 and 8.3e-2 in the three windows on
	 * the H200.  Only the first window is a check here; the kernel itself is
	 * checked step by step on one cache below, and over a long run on the
	 * trained pgdocs model (check_mla_mma_trained).
	 */
	for (size_t i = 0; i < sizeof(win) / sizeof(win[0]); i++)
	{
		double		e = rel_err(lg + (size_t) win[i].from * V, lo + (size_t) win[i].from * V,
								(size_t) (win[i].to - win[i].from) * V);

		if (i == 0)
			tap_ok(e <= 1e-2, "K=128/R=512 shapes, bf16 cache: %d tokens decoded one by one, tensor-core attention "
				   "vs the CUDA-core kernel at contexts %d..%d (rel err %.2e)", T, win[i].from + 1, win[i].to, e);
		else
			tap_diag("K=128/R=512 shapes (random weights), tensor-core vs CUDA-core attention, %d tokens one by one, "
					 "contexts %d..%d: logits rel err %.2e (information, no bound)", T, win[i].from + 1, win[i].to,
					 e);
	}

	/* the two kernels on one cache */
	{
		kl_ctx	   *cm,
				   *co;
		kl_seq	   *src;
		double		worst = 0;
		int			same = 0,
					done = 0;

		if (kl_ctx_new(mma, 0, &cm, &err) != KL_OK || kl_ctx_new(old, 0, &co, &err) != KL_OK ||
			kl_seq_new(mma, &src, &err) != KL_OK)
			die("context", &err);
		for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
		{
			kl_seq	   *a,
					   *b;
			uint8_t    *blob;
			size_t		len;
			kl_blob		part;
			float	   *la = malloc(sizeof(float) * V),
					   *lb = malloc(sizeof(float) * V);

			feed(cm, src, ids + done, lens[i] - done, 0, V, NULL);
			done = lens[i];
			if (kl_state_save(src, 0, &blob, &len, &err) != KL_OK)
				die("state save", &err);
			part.data = blob;
			part.len = len;
			if (kl_seq_new(mma, &a, &err) != KL_OK || kl_seq_new(old, &b, &err) != KL_OK ||
				kl_state_load(a, &part, 1, &err) != KL_OK || kl_state_load(b, &part, 1, &err) != KL_OK)
				die("state load", &err);
			feed(cm, a, ids + done, 1, 0, V, la);
			feed(co, b, ids + done, 1, 0, V, lb);
			{
				double		e = rel_err(la, lb, (size_t) V);

				tap_diag("context %d: tensor-core vs CUDA-core attention, logits rel err %.2e", done + 1, e);
				worst = e > worst ? e : worst;
			}
			same += argmax(la, V) == argmax(lb, V);
			free(blob);
			free(la);
			free(lb);
			kl_seq_free(a);
			kl_seq_free(b);
		}
		tap_ok(worst <= 1e-2 && same == (int) (sizeof(lens) / sizeof(lens[0])),
			   "K=128/R=512 shapes, bf16 cache: tensor-core attention equals the CUDA-core kernel on the same cache "
			   "(contexts 2..1100, worst logits rel err %.2e, greedy ids %d of %d equal)", worst, same,
			   (int) (sizeof(lens) / sizeof(lens[0])));
		kl_seq_free(src);
		kl_ctx_free(cm);
		kl_ctx_free(co);
	}
	free(lc);
	free(lg);
	free(lo);
	free(ids);
	kl_model_free(mma);
	kl_model_free(old);
}

/* a context and nseq sequences of model m, sequence s fed ids + s: lens[s] tokens (lens NULL: 3 each) */
static kl_seq **
seqs_open(kl_model *m, kl_ctx **ctx, const int32_t *ids, int nseq, const int *lens)
{
	kl_err		err;
	kl_seq	  **seq = calloc((size_t) nseq, sizeof(kl_seq *));
	int			V = kl_model_config(m)->vocab_size;

	if (kl_ctx_new(m, 0, ctx, &err) != KL_OK)
		die("context", &err);
	for (int s = 0; s < nseq; s++)
	{
		if (kl_seq_new(m, &seq[s], &err) != KL_OK)
			die("sequence", &err);
		feed(*ctx, seq[s], ids + s, lens ? lens[s] : 3, 0, V, NULL);
	}
	return seq;
}

/* frees what seqs_open made */
static void
seqs_close(kl_ctx *ctx, kl_seq **seq, int nseq)
{
	for (int s = 0; s < nseq; s++)
		kl_seq_free(seq[s]);
	kl_ctx_free(ctx);
	free(seq);
}

/*
 * nseq sequences, each fed 3 tokens of its own (one call each), then
 * `rounds` decode steps: the first `full` of all of them together, the rest
 * of the first (nseq + 1) / 2 (a batch-size change): the logits of every
 * step, [rounds][nseq][V], the slots of the sequences a step left out zero.
 * Steps of 8 or more sequences take the tensor-core expert kernel in bf16
 * precision (unless KL_CUDA_EXPERT_MMA=0 at load).
 */
static float *
decode_steps(kl_model *m, const int32_t *ids, int nseq, int rounds, int full)
{
	kl_err		err;
	kl_ctx	   *ctx;
	kl_seq	  **seq = seqs_open(m, &ctx, ids, nseq, NULL);
	kl_batch_item *b = calloc((size_t) nseq, sizeof(kl_batch_item));
	int			V = kl_model_config(m)->vocab_size;
	float	   *out = calloc((size_t) rounds * nseq * V, sizeof(float));

	for (int r = 0; r < rounds; r++)
	{
		int			nb = r < full ? nseq : (nseq + 1) / 2;

		for (int s = 0; s < nb; s++)
			b[s] = (kl_batch_item) {seq[s], ids + 20 + s + r, 1, out + ((size_t) r * nseq + s) * V, false};
		if (kl_forward(ctx, b, nb, &err) != KL_OK)
			die("batched forward", &err);
	}
	seqs_close(ctx, seq, nseq);
	free(b);
	return out;
}

/* decode_steps with every step of all nseq sequences */
static float *
decode_together(kl_model *m, const int32_t *ids, int nseq, int rounds)
{
	return decode_steps(m, ids, nseq, rounds, rounds);
}

/*
 * Rows (of V logits) whose greedy id differs from the reference's although
 * the reference's choice is clear: its logits of the two ids are more than
 * 2 tol rms(row) apart, an error the logits' tolerance tol does not allow
 * (a closer pair is a tie within the tolerance and may go either way).
 * *exact: the rows whose ids are equal.
 */
static int
greedy_clear_differs(const float *a, const float *ref, int rows, int V, double tol, int *exact)
{
	int			bad = 0;

	*exact = 0;
	for (int r = 0; r < rows; r++)
	{
		const float *x = a + (size_t) r * V,
				   *y = ref + (size_t) r * V;
		int			ia = argmax(x, V),
					ir = argmax(y, V);
		double		ss = 0;

		if (ia == ir)
		{
			(*exact)++;
			continue;
		}
		for (int i = 0; i < V; i++)
			ss += (double) y[i] * y[i];
		if ((double) y[ir] - y[ia] > 2 * tol * sqrt(ss / V))
			bad++;
	}
	return bad;
}

/*
 * A golden model in bf16 precision, nseq sequences decoding together (one
 * batch of nseq tokens a step: with 8, the plain products take the
 * tensor-core GEMV; with 12 cuBLAS, and with bf16 expert weights the
 * tensor-core experts), against the CPU engine in fp32 on the
 * same prompts: logits within the bf16 tolerance, and the greedy ids equal
 * wherever the CPU's choice is clear.  These tiny models' logits are flat
 * (on the CPU a quarter of these 48 rows have their top two within 0.06 of
 * the row's rms, the closest 0.001), so a flip of such a near tie is allowed
 * (greedy_clear_differs) and only counted.  Prompts and fed tokens come from
 * the golden prompt (trained text).
 */
static void
check_golden_batch(const char *model, int nseq)
{
	char		dir[1024],
				path[1200];
	kl_safetensors st;
	kl_err		err;
	const kl_st_tensor *t;
	kl_model   *gpu,
			   *cpu;
	int			rounds = 4,
				rows = nseq * rounds,
				same,
				bad,
				V;
	float	   *lg,
			   *lc;
	double		e;

	snprintf(dir, sizeof(dir), "%s/golden/%s", tap_fixture_dir(), model);
	snprintf(path, sizeof(path), "%s/golden.safetensors", dir);
	if (kl_st_open_file(path, &st, &err) != KL_OK)
		die("golden data", &err);
	if (!(t = kl_st_find(&st, "input_ids")) || (int) t->numel < 20 + nseq + rounds)
	{
		tap_ok(0, "%s: a golden prompt of at least %d tokens", model, 20 + nseq + rounds);
		kl_st_close(&st);
		return;
	}
	gpu = load(dir, "cuda", "bf16");
	cpu = load(dir, "cpu", "fp32");
	V = kl_model_config(cpu)->vocab_size;
	lg = decode_together(gpu, t->data, nseq, rounds);
	lc = decode_together(cpu, t->data, nseq, rounds);
	e = rel_err(lg, lc, (size_t) rows * V);
	bad = greedy_clear_differs(lg, lc, rows, V, TOL_BF16, &same);
	tap_ok(e <= TOL_BF16 && bad == 0, "%s bf16: %d sequences decoding together (%d steps of %d tokens), GPU vs CPU "
		   "(rel err %.2e; greedy ids %d of %d equal, %d differ where the CPU's choice is clear)", model, nseq,
		   rounds, nseq, e, same, rows, bad);
	free(lg);
	free(lc);
	kl_model_free(gpu);
	kl_model_free(cpu);
	kl_st_close(&st);
}

/* ------------------------------------------------------------------ 48B shapes, bf16: where prefill loses accuracy */

/* per-row relative errors of a [rows, cols] result: rows above tol, the median and the worst */
static void
row_errors(const float *a, const float *ref, int rows, int cols, double tol, int *over, double *median, double *worst)
{
	double	   *e = malloc(sizeof(double) * (size_t) rows);

	*over = 0;
	*worst = 0;
	for (int r = 0; r < rows; r++)
	{
		e[r] = rel_err(a + (size_t) r * cols, ref + (size_t) r * cols, (size_t) cols);
		*over += e[r] > tol;
		*worst = e[r] > *worst ? e[r] : *worst;
	}
	for (int i = 1; i < rows; i++)		/* insertion sort: 150 rows */
		for (int j = i; j > 0 && e[j] < e[j - 1]; j--)
		{
			double		t = e[j];

			e[j] = e[j - 1];
			e[j - 1] = t;
		}
	*median = rows ? e[rows / 2] : 0;
	free(e);
}

/* every MoE layer's e_score_correction_bias on both models: bias for experts [0, k), 0 for the others */
static void
set_router_bias(kl_model *cpu, kl_model *gpu, float bias)
{
	int			E = cpu->cfg.n_experts,
				k = cpu->cfg.experts_per_token;
	float	   *b = calloc((size_t) E, sizeof(float));

	for (int e = 0; e < k; e++)
		b[e] = bias;
	for (int i = 0; i < cpu->cfg.n_layers; i++)
		if (cpu->layers[i].is_moe)
		{
			cpu->be->ops->upload(cpu->be, cpu->layers[i].moe.score_bias, b, sizeof(float) * (size_t) E);
			gpu->be->ops->upload(gpu->be, gpu->layers[i].moe.score_bias, b, sizeof(float) * (size_t) E);
		}
	free(b);
}

/* lm_head := [I; 0] on both models (bf16 ones and zeros): the "logits" are then the final norm's output */
static void
set_lm_head_identity(kl_model *cpu, kl_model *gpu)
{
	int			V = cpu->cfg.vocab_size,
				D = cpu->cfg.hidden_size;
	uint16_t   *w = calloc((size_t) V * D, sizeof(uint16_t));

	for (int i = 0; i < D && i < V; i++)
		w[(size_t) i * D + i] = 0x3F80;		/* bf16 1.0 */
	cpu->be->ops->upload(cpu->be, cpu->lm_head.dev, w, sizeof(uint16_t) * (size_t) V * D);
	gpu->be->ops->upload(gpu->be, gpu->lm_head.dev, w, sizeof(uint16_t) * (size_t) V * D);
	free(w);
}

/*
 * Relative error of the GPU's one-call prefill against the CPU's over the
 * first `depth` layers (the engine runs cfg.n_layers of them; the sequences'
 * states do not depend on it), with the per-row figures.
 */
static double
prefill_err_at_depth(kl_model *cpu, kl_model *gpu, const int32_t *ids, int T, int depth, int *over, double *median,
					 double *worst)
{
	int			L = cpu->cfg.n_layers,
				V = cpu->cfg.vocab_size;
	float	   *lc,
			   *lg;
	double		e;

	cpu->cfg.n_layers = gpu->cfg.n_layers = depth;
	lc = logits_of(cpu, ids, T, 0, false, NULL);
	lg = logits_of(gpu, ids, T, 0, false, NULL);
	cpu->cfg.n_layers = gpu->cfg.n_layers = L;
	e = rel_err(lg, lc, (size_t) T * V);
	row_errors(lg, lc, T, V, TOL_BF16, over, median, worst);
	free(lc);
	free(lg);
	return e;
}

/*
 * The 48B-shape bf16 prefill allows 1.2e-1 against the CPU's fp32
 * (check_big_shapes, bounded by 0.25).  The claim (bench/notes-cuda.md): in
 * bf16 precision the products round their activations to bf16 (relative
 * 2^-9), which moves the router's fp32 inputs; this model's random
 * 16-expert router has top-4 margins near that size for some tokens, so
 * their expert sets flip, and a flipped token's output is a different
 * function, not a rounded one.  Shown here on the same weights (seed 7):
 *
 * (a) a decisive router: a score bias of 8 on experts 0..3 of every MoE
 *     layer (sigmoid scores lie in (0, 1), so no rounding can move another
 *     expert past them; group 0 holds them, so the group choice is decided
 *     too) — the bf16 prefill must then hold the bf16 criterion, 3e-2, and
 *     the greedy ids where the CPU's choice is clear.  A residual error near
 *     1e-2 is the rounding of the products themselves (KDA, MLA, experts).
 * (b) information lines: with the random router and with the decisive
 *     one, the error of the normalized hidden state after each layer (the
 *     engine runs the first `depth` layers; lm_head made an identity so the
 *     "logits" are the final norm's output), and the number of tokens whose
 *     logits row is off by more than 3e-2.  Routing flips show as a jump at
 *     the first MoE layer (layer 2; layer 1 is KDA + dense MLP) in a
 *     minority of tokens, absent under the decisive router.
 */
static void
check_big_bf16_routing(void)
{
	char		path[] = "/tmp/kl_test_cuda_XXXXXX";
	int			fd = mkstemp(path);
	kl_load_opts oc = {0},
				og = {0};
	kl_model   *cpu,
			   *gpu;
	kl_err		err;
	int			V,
				T = 150,
				L,
				over,
				same,
				bad;
	int32_t    *ids;
	float	   *lc,
			   *lg;
	double		e,
				median,
				worst;

	if (fd < 0 || write(fd, big_config, strlen(big_config)) != (ssize_t) strlen(big_config))
	{
		tap_ok(0, "write a temporary config");
		return;
	}
	close(fd);
	oc.device = "cpu";
	og.device = "cuda";
	og.precision = "auto";		/* bf16 on the GPU: the setting users get */
	if (kl_model_create_random(path, &oc, "bf16", 7, &cpu, &err) != KL_OK ||
		kl_model_create_random(path, &og, "bf16", 7, &gpu, &err) != KL_OK)
		die("random model", &err);
	unlink(path);
	copy_weights(cpu, gpu);
	tap_ok(strcmp(kl_model_precision(gpu), "bf16") == 0, "K=128/R=512 shapes: precision auto on the GPU is bf16");
	V = cpu->cfg.vocab_size;
	L = cpu->cfg.n_layers;
	ids = malloc(sizeof(int32_t) * (size_t) T);
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);

	/* the random router, as check_big_shapes has it */
	e = prefill_err_at_depth(cpu, gpu, ids, T, L, &over, &median, &worst);
	tap_diag("K=128/R=512 shapes, bf16 prefill of %d tokens, random router: logits rel err %.2e; per token: "
			 "median %.2e, worst %.2e, %d of %d tokens above 3e-2", T, e, median, worst, over, T);

	/* (a) the decisive router */
	set_router_bias(cpu, gpu, 8.0f);
	lc = logits_of(cpu, ids, T, 0, false, NULL);
	lg = logits_of(gpu, ids, T, 0, false, NULL);
	e = rel_err(lg, lc, (size_t) T * V);
	row_errors(lg, lc, T, V, TOL_BF16, &over, &median, &worst);
	bad = greedy_clear_differs(lg, lc, T, V, TOL_BF16, &same);
	tap_ok(e <= TOL_BF16 && bad == 0, "K=128/R=512 shapes, bf16 prefill of %d tokens with a decisive router (bias 8 "
		   "on 4 experts): GPU vs CPU fp32 within 3e-2 (rel err %.2e; per token median %.2e, worst %.2e, %d above "
		   "3e-2; greedy ids %d of %d equal, %d differ where the CPU's choice is clear)", T, e, median, worst, over,
		   same, T, bad);
	free(lc);
	free(lg);

	/* (b) layer by layer, the normalized hidden states */
	set_lm_head_identity(cpu, gpu);
	for (int r = 0; r < 2; r++)
	{
		char		line[512];
		size_t		n = 0;

		set_router_bias(cpu, gpu, r == 0 ? 8.0f : 0.0f);
		n += snprintf(line + n, sizeof(line) - n, "K=128/R=512 shapes, bf16 prefill, %s router: normalized hidden "
					  "state after layer", r == 0 ? "decisive" : "random");
		for (int d = 1; d <= L && n < sizeof(line); d++)
		{
			e = prefill_err_at_depth(cpu, gpu, ids, T, d, &over, &median, &worst);
			n += snprintf(line + n, sizeof(line) - n, " %d (%s%s): %.2e, %d tokens above 3e-2, worst %.2e;", d,
						  cpu->layers[d - 1].kind == KL_LAYER_KDA ? "KDA" : "MLA",
						  cpu->layers[d - 1].is_moe ? " + MoE" : " + MLP", e, over, worst);
		}
		tap_diag("%s", line);
	}
	free(ids);
	kl_model_free(gpu);
	kl_model_free(cpu);
}

static void
check_big_shapes(void)
{
	char		path[] = "/tmp/kl_test_cuda_XXXXXX";
	int			fd = mkstemp(path);
	kl_load_opts oc = {0},
				og = {0};
	kl_model   *cpu,
			   *gpu;
	kl_err		err;
	int			V,
				T = 150;
	int32_t    *ids;
	float	   *lc,
			   *lg;

	if (fd < 0 || write(fd, big_config, strlen(big_config)) != (ssize_t) strlen(big_config))
	{
		tap_ok(0, "write a temporary config");
		return;
	}
	close(fd);
	oc.device = "cpu";
	og.device = "cuda";
	og.precision = "fp32";
	if (kl_model_create_random(path, &oc, "bf16", 7, &cpu, &err) != KL_OK ||
		kl_model_create_random(path, &og, "bf16", 7, &gpu, &err) != KL_OK)
		die("random model", &err);
	unlink(path);
	copy_weights(cpu, gpu);
	V = cpu->cfg.vocab_size;
	ids = malloc(sizeof(int32_t) * (size_t) T);
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);

	/* prefill of 150 tokens: three KDA chunks, expanded MLA; then 20 decode steps */
	lc = logits_of(cpu, ids, T, 0, false, NULL);
	lg = logits_of(gpu, ids, T, 0, false, NULL);
	{
		double		e = rel_err(lg, lc, (size_t) T * V);

		tap_ok(e <= TOL_FP32, "K=128/R=512 shapes: one-call prefill of %d tokens, GPU vs CPU (rel err %.2e)", T, e);
	}
	free(lg);
	lg = logits_of(gpu, ids, T, 1, false, NULL);
	{
		double		e = rel_err(lg, lc, (size_t) T * V);

		tap_ok(e <= TOL_FP32, "K=128/R=512 shapes: token by token (graphs), GPU vs CPU (rel err %.2e)", e);
	}
	free(lg);
	lg = logits_of(gpu, ids, T, 40, false, NULL);
	{
		double		e = rel_err(lg, lc, (size_t) T * V);

		tap_ok(e <= TOL_FP32, "K=128/R=512 shapes: pieces of 40, GPU vs CPU (rel err %.2e)", e);
	}
	free(lg);

	/* a ragged batch: A prefills 100 tokens, B decodes one after 30, C feeds 5 after 10;
	 * repeated decode steps of all three together (graphs with 3 sequences) */
	{
		kl_ctx	   *cg,
				   *cc;
		kl_seq	   *sg[3],
				   *sc[3];
		int			pre[3] = {0, 30, 10},
					feedn[3] = {100, 1, 5};
		double		worst = 0;

		if (kl_ctx_new(gpu, 0, &cg, &err) != KL_OK || kl_ctx_new(cpu, 0, &cc, &err) != KL_OK)
			die("context", &err);
		for (int s = 0; s < 3; s++)
		{
			if (kl_seq_new(gpu, &sg[s], &err) != KL_OK || kl_seq_new(cpu, &sc[s], &err) != KL_OK)
				die("sequence", &err);
			if (pre[s])
			{
				feed(cg, sg[s], ids, pre[s], 0, V, NULL);
				feed(cc, sc[s], ids, pre[s], 0, V, NULL);
			}
		}
		for (int round = 0; round < 6; round++)
		{
			kl_batch_item bg[3],
						bc[3];
			float	   *og_ = malloc(sizeof(float) * 3 * V),
					   *oc_ = malloc(sizeof(float) * 3 * V);

			for (int s = 0; s < 3; s++)
			{
				int			n = round == 0 ? feedn[s] : 1;
				const int32_t *p = ids + pre[s] + (round == 0 ? 0 : feedn[s] + round - 1);

				bg[s] = (kl_batch_item) {sg[s], p, n, og_ + (size_t) s * V, false};
				bc[s] = (kl_batch_item) {sc[s], p, n, oc_ + (size_t) s * V, false};
			}
			if (kl_forward(cg, bg, 3, &err) != KL_OK || kl_forward(cc, bc, 3, &err) != KL_OK)
				die("batched forward", &err);
			{
				double		e = rel_err(og_, oc_, 3 * (size_t) V);

				worst = e > worst ? e : worst;
			}
			free(og_);
			free(oc_);
		}
		tap_ok(worst <= TOL_FP32, "K=128/R=512 shapes: ragged batch (prefill + decode together, then 5 batched "
			   "decode steps), GPU vs CPU (worst rel err %.2e)", worst);
		/* 12 sequences decoding together: experts with more tokens than one pass
		 * takes (the shared expert has all 12) split over several work items */
		{
			kl_seq	   *g12[12],
					   *c12[12];
			double		w12 = 0;

			for (int s = 0; s < 12; s++)
			{
				if (kl_seq_new(gpu, &g12[s], &err) != KL_OK || kl_seq_new(cpu, &c12[s], &err) != KL_OK)
					die("sequence", &err);
				feed(cg, g12[s], ids + s, 3, 0, V, NULL);
				feed(cc, c12[s], ids + s, 3, 0, V, NULL);
			}
			for (int round = 0; round < 4; round++)
			{
				kl_batch_item bg[12],
							bc[12];
				float	   *og_ = malloc(sizeof(float) * 12 * V),
						   *oc_ = malloc(sizeof(float) * 12 * V);

				for (int s = 0; s < 12; s++)
				{
					const int32_t *p = ids + 20 + s + round;

					bg[s] = (kl_batch_item) {g12[s], p, 1, og_ + (size_t) s * V, false};
					bc[s] = (kl_batch_item) {c12[s], p, 1, oc_ + (size_t) s * V, false};
				}
				if (kl_forward(cg, bg, 12, &err) != KL_OK || kl_forward(cc, bc, 12, &err) != KL_OK)
					die("batched forward", &err);
				{
					double		e = rel_err(og_, oc_, 12 * (size_t) V);

					w12 = e > w12 ? e : w12;
				}
				free(og_);
				free(oc_);
			}
			tap_ok(w12 <= TOL_FP32, "K=128/R=512 shapes: 12 sequences decoding together (experts split over work "
				   "items), GPU vs CPU (worst rel err %.2e)", w12);
			for (int s = 0; s < 12; s++)
			{
				kl_seq_free(g12[s]);
				kl_seq_free(c12[s]);
			}
		}
		for (int s = 0; s < 3; s++)
		{
			kl_seq_free(sg[s]);
			kl_seq_free(sc[s]);
		}
		kl_ctx_free(cg);
		kl_ctx_free(cc);
	}
	/* bf16 precision on the same weights: bf16 products, grouped expert GEMMs */
	{
		kl_model   *g16;
		kl_load_opts ob = {0};
		char		path2[] = "/tmp/kl_test_cuda_XXXXXX";
		int			fd2 = mkstemp(path2);

		ob.device = "cuda";
		ob.precision = "bf16";
		if (fd2 < 0 || write(fd2, big_config, strlen(big_config)) != (ssize_t) strlen(big_config))
			die("temporary config", &err);
		close(fd2);
		if (kl_model_create_random(path2, &ob, "bf16", 7, &g16, &err) != KL_OK)
			die("random model (bf16)", &err);
		unlink(path2);
		copy_weights(cpu, g16);
		lg = logits_of(g16, ids, T, 0, false, NULL);
		{
			double		e = rel_err(lg, lc, (size_t) T * V);

			/*
			 * Not held to 3e-2: with bf16 activations in every product of a
			 * random 16-expert model, near-tied expert choices flip for some
			 * tokens (routing itself is fp32); the golden checks above carry
			 * the bf16 criterion.  Only a gross error fails here.
			 */
			tap_ok(e <= 0.25, "K=128/R=512 shapes, bf16: one-call prefill (grouped expert GEMMs), GPU vs CPU "
				   "(rel err %.2e; bounded by 0.25, see the comment)", e);
		}
		/* the prefill expert paths (KL_CUDA_MOE_PREFILL) against each other, the MoE op alone */
		check_moe_prefill(cpu, g16, big_config, &ob);
		check_moe_prefill_q(big_config, "fp8");
		check_moe_prefill_q(big_config, "int4");
		free(lg);
		lg = logits_of(g16, ids, T, 1, false, NULL);
		{
			double		e = rel_err(lg, lc, (size_t) T * V);

			tap_ok(e <= TOL_BF16, "K=128/R=512 shapes, bf16: token by token, GPU vs CPU (rel err %.2e)", e);
		}
		free(lg);
		/*
		 * 40 sequences decoding together in bf16: the experts on the tensor
		 * cores against the CUDA-core expert kernel (KL_CUDA_EXPERT_MMA=0).
		 * Information only: the two differ by rounding the expert activations
		 * to bf16, and this model's random router turns such rounding into
		 * flipped expert choices, so no bound here tells a kernel bug from
		 * rounding.  check_expert_mma compares the two kernels on the same
		 * bf16 activations (a bound of 1e-5); the golden models carry the
		 * bf16 criterion.
		 */
		{
			kl_model   *g16old;
			char		path4[] = "/tmp/kl_test_cuda_XXXXXX";
			int			fd4 = mkstemp(path4),
						ns = 40,
						rounds = 3;
			float	   *lm,
					   *lo;

			if (fd4 < 0 || write(fd4, big_config, strlen(big_config)) != (ssize_t) strlen(big_config))
				die("temporary config", &err);
			close(fd4);
			setenv("KL_CUDA_EXPERT_MMA", "0", 1);
			if (kl_model_create_random(path4, &ob, "bf16", 7, &g16old, &err) != KL_OK)
				die("random model (bf16)", &err);
			unsetenv("KL_CUDA_EXPERT_MMA");
			unlink(path4);
			copy_weights(cpu, g16old);
			lm = decode_together(g16, ids, ns, rounds);
			lo = decode_together(g16old, ids, ns, rounds);
			tap_diag("K=128/R=512 shapes, bf16: %d sequences decoding together, tensor-core expert kernel vs the "
					 "CUDA-core one: logits rel err %.2e (information, no bound)", ns,
					 rel_err(lm, lo, (size_t) rounds * ns * V));
			free(lm);
			free(lo);
			kl_model_free(g16old);
		}
		kl_model_free(g16);
	}
	check_mla_mma(cpu);
	free(lc);
	free(ids);
	kl_model_free(cpu);
	kl_model_free(gpu);
}

/* ------------------------------------------------------------------ the sampler */

static uint64_t
mix_rand(uint64_t *x)
{
	uint64_t	z = (*x += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static double
unif(uint64_t *x)
{
	return (double) (mix_rand(x) >> 11) * (1.0 / 9007199254740992.0);
}

#define SROWS 12

/* row r of a family of logits: the shapes that stress a sampler */
static void
make_logits(float *l, int V, int r, uint64_t *rs)
{
	for (int i = 0; i < V; i++)
	{
		double		g = (unif(rs) + unif(rs) + unif(rs) - 1.5) * 2.0,	/* roughly normal */
					h = (unif(rs) - 0.5) * 2.0; /* uniform in [-1, 1) */

		switch (r)
		{
			case 0:
				l[i] = (float) (3.0 * g);
				break;
			case 1:				/* flat: top-p needs most of the vocabulary */
				l[i] = (float) (0.01 * g);
				break;
			case 2:				/* ties everywhere */
				l[i] = (float) (0.5 * (int) (4.0 * g));
				break;
			case 3:
				l[i] = (float) g;
				break;
			case 4:				/* impossible tokens */
				l[i] = i % 3 == 0 ? -INFINITY : (float) (2.0 * g);
				break;
			case 5:				/* all equal */
				l[i] = 1.5f;
				break;
			case 6:
				l[i] = (float) (30.0 * g);
				break;
			case 8:				/* bench_cuda sample's "peaked" */
				l[i] = (float) (18.0 * h * h * h);
				break;
			case 9:				/* bench_cuda sample's "flat" (a random model's logits) */
				l[i] = (float) (0.01 * h);
				break;
			case 10:			/* signed zeros: -0 and +0 are equal values */
				l[i] = (i & 1) ? 0.0f : -0.0f;
				break;
			case 11:			/* 1024 equal tops whose rounded probabilities add up to 1 (the head rule) */
				l[i] = i < 1024 ? 0.0f : -30.0f;
				break;
			default:
				l[i] = (float) (g - 5.0);
				break;
		}
	}
	if (r == 3)
		l[(int) (unif(rs) * V)] = 20.0f;	/* one dominant token */
	if (r == 7 && V > 10)
		l[7] = NAN;
}

/* variant: 1 the wide kernel (the default), 0 one block per row
 * (KL_CUDA_SAMPLE_WIDE=0), 2 the wide kernel's fast form (=2) */
static void
check_sampler(int variant)
{
	char		dir[1024];
	kl_model   *m;
	kl_backend *be;
	static const int Vs[3] = {384, 1000, 163840};
	static const char *kinds[3] = {"one block per row", "wide", "fast wide"};
	const char *kind = kinds[variant];
	kl_sampling set[17];
	int			n_set = 0;
	int32_t		recent[12] = {3, 5, 3, 7, 100, -4, 999999, 11, 5, 250, 2, 42};

	snprintf(dir, sizeof(dir), "%s/golden/tiny_c", tap_fixture_dir());
	if (variant != 1)
		setenv("KL_CUDA_SAMPLE_WIDE", variant == 0 ? "0" : "2", 1);	/* read when the backend is made */
	m = load(dir, "cuda", "fp32");
	if (variant != 1)
		unsetenv("KL_CUDA_SAMPLE_WIDE");
	be = m->be;
	if (!be->ops->sample)
	{
		tap_ok(0, "the CUDA backend samples on the device");
		kl_model_free(m);
		return;
	}
	for (int i = 0; i < 17; i++)
		kl_sampling_default(&set[i]);
	n_set = 0;
	n_set++;					/* greedy */
	set[n_set++].temperature = 1.0f;
	set[n_set].temperature = 0.7f, set[n_set++].top_k = 1;
	set[n_set].temperature = 0.7f, set[n_set++].top_k = 50;
	set[n_set].temperature = 1.3f, set[n_set++].top_k = 5000;
	set[n_set].temperature = 0.8f, set[n_set++].top_p = 0.9f;
	set[n_set].temperature = 1.0f, set[n_set++].top_p = 0.5f;
	set[n_set].temperature = 1.0f, set[n_set++].top_p = 0.999f;
	set[n_set].temperature = 1.0f, set[n_set++].min_p = 0.05f;
	set[n_set].temperature = 0.9f, set[n_set].top_p = 0.95f, set[n_set++].min_p = 0.2f;
	set[n_set].temperature = 0.7f, set[n_set].top_k = 40, set[n_set].top_p = 0.9f, set[n_set++].min_p = 0.01f;
	set[n_set].temperature = 1.0f, set[n_set++].repetition_penalty = 1.3f;
	set[n_set].temperature = 0.5f, set[n_set].top_k = 10, set[n_set++].repetition_penalty = 0.8f;
	set[n_set++].repetition_penalty = 1.5f;	/* greedy with a penalty */
	set[n_set].temperature = 0.8f, set[n_set].top_k = 2000, set[n_set++].top_p = 0.3f;
	set[n_set].temperature = 1.0f, set[n_set++].top_p = 0.01f;
	set[n_set].temperature = 1.0f, set[n_set++].min_p = 1e-20f;	/* min-p beyond the head: the head rule decides */

	for (int vi = 0; vi < 3; vi++)
	{
		int			V = Vs[vi];
		size_t		words = ((size_t) V + 31) / 32;
		float	   *base = malloc(sizeof(float) * (size_t) SROWS * V),
				   *tmp = malloc(sizeof(float) * (size_t) V);
		uint32_t   *masks = calloc(3 * words, sizeof(uint32_t));
		float	   *dev = be->ops->alloc(be, sizeof(float) * (size_t) SROWS * V);
		uint64_t	rs = 12345 + V;
		int			calls = 0,
					wrong = 0,
					diag = 0;
		kl_err		err;

		for (int r = 0; r < SROWS; r++)
			make_logits(base + (size_t) r * V, V, r, &rs);
		/* masks: about half allowed; 20 allowed; only impossible ones (row 4's -inf) and one */
		for (int i = 0; i < V; i++)
		{
			if (unif(&rs) < 0.5)
				masks[i >> 5] |= 1u << (i & 31);
			if (i % (V / 20) == 1)
				masks[words + (i >> 5)] |= 1u << (i & 31);
			if (i % 3 == 0)
				masks[2 * words + (i >> 5)] |= 1u << (i & 31);
		}
		for (int si = 0; si < n_set; si++)
			for (int mk = -1; mk < 3; mk++)
			{
				kl_sample_row rows[SROWS];
				int32_t		ids[SROWS];

				for (int r = 0; r < SROWS; r++)
				{
					rows[r].row = r;
					rows[r].s = &set[si];
					rows[r].u0 = set[si].temperature == 0.0f ? 0.0 : r == 0 ? 0.0 :
						r == 1 || r == 11 ? 0.99999999999 : unif(&rs);
					rows[r].recent = recent;
					rows[r].n_recent = 12;
					rows[r].allowed = mk < 0 ? NULL : masks + (size_t) mk * words;
				}
				be->ops->upload(be, dev, base, sizeof(float) * (size_t) SROWS * V);
				if (be->ops->sample(be, dev, V, rows, SROWS, ids, &err) != KL_OK)
				{
					tap_diag("sample: %s", err.msg);
					wrong += SROWS;
					continue;
				}
				for (int r = 0; r < SROWS; r++)
				{
					int32_t		want;

					memcpy(tmp, base + (size_t) r * V, sizeof(float) * (size_t) V);
					want = kl_sample_draw(&set[si], rows[r].u0, tmp, V, recent, 12, rows[r].allowed);
					calls++;
					if (want != ids[r])
					{
						wrong++;
						if (diag++ < 8)
							tap_diag("V %d setting %d mask %d row %d: GPU %d, CPU %d", V, si, mk, r, ids[r], want);
					}
				}
			}
		tap_ok(wrong == 0, "GPU sampler = CPU sampler, vocabulary %d (%s): %d of %d choices differ", V, kind, wrong,
			   calls);
		be->ops->release(be, dev);
		free(base);
		free(tmp);
		free(masks);
	}

	/* inside the forward pass: three sequences, three settings, tokens fed back */
	{
		kl_ctx	   *ctx;
		kl_seq	   *seq[3];
		int			V = kl_model_config(m)->vocab_size;
		float	   *lg = malloc(sizeof(float) * 3 * (size_t) V);
		kl_sampling ss[3];
		kl_rng		rng[3],
					mirror[3];
		kl_sample_req req[3];
		const kl_sample_req *reqs[3] = {&req[0], &req[1], &req[2]};
		int32_t		tok[3] = {1, 2, 3},
					out[3];
		int			wrong = 0,
					n = 0;
		kl_err		err;

		if (kl_ctx_new(m, 0, &ctx, &err) != KL_OK)
			die("context", &err);
		for (int s = 0; s < 3; s++)
		{
			if (kl_seq_new(m, &seq[s], &err) != KL_OK)
				die("sequence", &err);
			kl_sampling_default(&ss[s]);
			kl_rng_seed(&rng[s], 100 + s);
			mirror[s] = rng[s];
			memset(&req[s], 0, sizeof(req[s]));
			req[s].sampling = &ss[s];
			req[s].rng = &rng[s];
			req[s].recent = tok;
			req[s].n_recent = 3;
		}
		ss[1].temperature = 0.9f;
		ss[1].top_p = 0.8f;
		ss[2].temperature = 1.2f;
		ss[2].top_k = 20;
		ss[2].repetition_penalty = 1.2f;
		for (int step = 0; step < 12; step++)
		{
			kl_batch_item it[3];

			for (int s = 0; s < 3; s++)
				it[s] = (kl_batch_item) {seq[s], &tok[s], 1, lg + (size_t) s * V, false};
			if (kl_forward_sample(ctx, it, 3, reqs, out, &err) != KL_OK)
				die("forward with sampling", &err);
			for (int s = 0; s < 3; s++)
			{
				double		u0 = kl_sample_uniform(&ss[s], &mirror[s]);
				int32_t		want = kl_sample_draw(&ss[s], u0, lg + (size_t) s * V, V, tok, 3, NULL);

				wrong += want != out[s];
				n++;
			}
			for (int s = 0; s < 3; s++)
				tok[s] = out[s];
		}
		tap_ok(wrong == 0, "kl_forward_sample on the GPU (%s sampler): %d of %d tokens differ from the CPU sampler's "
			   "on the same logits", kind, wrong, n);
		for (int s = 0; s < 3; s++)
			kl_seq_free(seq[s]);
		kl_ctx_free(ctx);
		free(lg);
	}
	kl_model_free(m);
}

/* ------------------------------------------------------------------ routing in warps */

/*
 * A test hook of the CUDA library (exported, not used by the backend): load
 * tiny_c on the GPU, find the library that holds the backend's ops table and
 * the symbol in it.  *fn NULL (and a failed check) when it is missing; else
 * the caller frees the model and closes *lib.
 */
static kl_model *
load_test_hook(const char *name, void **lib, void **fn)
{
	char		dir[1024];
	kl_model   *m;

	snprintf(dir, sizeof(dir), "%s/golden/tiny_c", tap_fixture_dir());
	m = load(dir, "cuda", "fp32");
	*fn = backend_symbol(m, name, lib);
	if (!*fn)
	{
		tap_ok(0, "the CUDA library exports %s", name);
		if (*lib)
			dlclose(*lib);
		*lib = NULL;
		kl_model_free(m);
		return NULL;
	}
	return m;
}

/* kl_cuda_test_mla_decode (cuda_mla.c): the decode attention variants on host arrays */
typedef int (*mla_decode_test_fn) (int variant, int merge, int early, int n, int Ha, int R, int Dr, const int *ctx,
								   int page_cap, const float *qabs, const uint16_t *cache, float *olat, int reps,
								   double *us);

/* olat of token t (its keys 0 .. ctx - 1) in double: Qabs rounded to bf16, P exact */
static void
mla_decode_reference(int Ha, int R, int Dr, int ctx, const float *qabs, const uint16_t *cache, float *olat)
{
	int			Wa = R + Dr;
	double	   *p = malloc(sizeof(double) * (size_t) ctx),
			   *acc = malloc(sizeof(double) * (size_t) R);

	for (int h = 0; h < Ha; h++)
	{
		const float *q = qabs + (size_t) h * Wa;
		double		mx = -INFINITY,
					z = 0;

		for (int k = 0; k < ctx; k++)
		{
			double		dot = 0;

			for (int c = 0; c < Wa; c++)
				dot += (double) kl_bf16_to_f32(kl_f32_to_bf16(q[c])) * kl_bf16_to_f32(cache[(size_t) k * Wa + c]);
			p[k] = dot / sqrt(192.0);
			mx = p[k] > mx ? p[k] : mx;
		}
		for (int c = 0; c < R; c++)
			acc[c] = 0;
		for (int k = 0; k < ctx; k++)
		{
			double		e = exp(p[k] - mx);

			z += e;
			for (int c = 0; c < R; c++)
				acc[c] += e * kl_bf16_to_f32(cache[(size_t) k * Wa + c]);
		}
		for (int c = 0; c < R; c++)
			olat[(size_t) h * R + c] = (float) (acc[c] / z);
	}
	free(p);
	free(acc);
}

/*
 * The MLA decode attention over the bf16 cache, kernel by kernel
 * (KL_CUDA_MLA_MMA = 1 mla_attend_mma, 2 and 3 the variants of kernels.h,
 * "MLA decode attention variants"; a variant the device or build does not
 * take is reported and skipped): the 48B head shape (32 heads, R 512, Dr 64)
 * and a 4-head one, tokens at contexts 1 .. 5000 over five cache pages each
 * (ranges of one tile, of several, a partial last tile, page boundaries),
 * against a double reference on the same bf16 Qabs and keys.  The kernels
 * round P to bf16 before P V (the contract), which the reference does not:
 * a relative error of about 2^-9 a term, averaging out over the keys
 * (mla_attend_mma measured first on the H200: see the diagnostics).  Each
 * variant with either merge (mla_merge, mla_merge_wide), and again after
 * three graph replays of the stage (partials and merge), with the same bound.
 * The wgmma variant (2) also as KL_CUDA_MLA_FOLD runs it (the first tiles'
 * keys below the token's position requested before its wait, the newest
 * row after; Qabs given in bf16): olat bit for bit as without (the same
 * bytes in shared memory; the contexts put the newest row in a range's
 * first tile, its second (65, 1025), its third or fourth (2049, 5000) and
 * alone (1)).
 */
/* check_mla_decode's tokens: their contexts (each token its own sequence, MLA_DEC_PAGES pages of cache each) */
static const int mla_dec_ctx[] = {1, 64, 65, 1000, 1024, 1025, 2049, 5000};

#define MLA_DEC_N ((int) (sizeof(mla_dec_ctx) / sizeof(mla_dec_ctx[0])))
#define MLA_DEC_PAGES 5

/*
 * The hook kl_cuda_test_mla_decode (*f; its model and library: the result
 * and *lib, for kl_model_free and dlclose; NULL where the hook is not there)
 * and those tokens' random inputs (seed 6021): *cache [MLA_DEC_N]
 * [MLA_DEC_PAGES pages][Wa] bf16, *qabs [MLA_DEC_N][32][Wa].
 */
static kl_model *
mla_decode_open(void **lib, mla_decode_test_fn *f, int Wa, uint16_t **cache, float **qabs)
{
	size_t		nc = (size_t) MLA_DEC_N * MLA_DEC_PAGES * KL_MLA_PAGE * Wa,
				nq = (size_t) MLA_DEC_N * 32 * Wa;
	uint64_t	rs = 6021;
	kl_model   *m = load_test_hook("kl_cuda_test_mla_decode", lib, (void **) f);

	if (!*f)
		return NULL;
	*cache = malloc(sizeof(uint16_t) * nc);
	*qabs = malloc(sizeof(float) * nq);
	for (size_t i = 0; i < nc; i++)
		(*cache)[i] = kl_f32_to_bf16((float) ((unif(&rs) + unif(&rs) + unif(&rs) - 1.5) * 2.0));
	for (size_t i = 0; i < nq; i++)
		(*qabs)[i] = (float) ((unif(&rs) + unif(&rs) + unif(&rs) - 1.5) * 2.0);
	return m;
}

static void
check_mla_decode(void)
{
	const int  *ctx = mla_dec_ctx;
	static const int heads[] = {32, 4};
	int			n = MLA_DEC_N,
				R = 512,
				Dr = 64,
				Wa = R + Dr,
				page_cap = MLA_DEC_PAGES;
	size_t		rows = (size_t) page_cap * KL_MLA_PAGE;
	uint16_t   *cache;
	float	   *qabs,
			   *ref,
			   *got,
			   *late;
	void	   *lib = NULL;
	mla_decode_test_fn f = NULL;
	kl_model   *m = mla_decode_open(&lib, &f, Wa, &cache, &qabs);

	if (!f)
		return;
	ref = malloc(sizeof(float) * (size_t) n * 32 * R);
	got = malloc(sizeof(float) * (size_t) n * 32 * R);
	late = malloc(sizeof(float) * (size_t) n * 32 * R);
	for (size_t hi = 0; hi < sizeof(heads) / sizeof(heads[0]); hi++)
	{
		int			Ha = heads[hi];

		for (int t = 0; t < n; t++)
			mla_decode_reference(Ha, R, Dr, ctx[t], qabs + (size_t) t * Ha * Wa, cache + (size_t) t * rows * Wa,
								 ref + (size_t) t * Ha * R);
		for (int variant = 1; variant <= 2; variant++)
			for (int run = 0; run < 4; run++)
			{
				int			merge = run / 2,	/* mla_merge, then mla_merge_wide */
							reps = run % 2 ? 3 : 0;
				double		us = 0,
							e;
				int			rc;

				for (size_t i = 0; i < (size_t) n * Ha * R; i++)
					got[i] = NAN;
				rc = f(variant, merge, 0, n, Ha, R, Dr, ctx, page_cap, qabs, cache, got, reps, &us);
				if (rc == -1)
				{
					tap_diag("MLA decode attention variant %d: not taken for %d heads on this device (skipped)",
							 variant, Ha);
					break;
				}
				e = rc == 0 ? rel_err(got, ref, (size_t) n * Ha * R) : INFINITY;
				tap_ok(rc == 0 && e <= 4e-3, "MLA decode attention variant %d + %s, %d heads, R %d, Dr %d, contexts 1 "
					   ".. %d%s: olat vs a double reference (rel err %.2e, rc %d)", variant,
					   merge ? "mla_merge_wide" : "mla_merge", Ha, R, Dr, ctx[n - 1],
					   reps ? ", after 3 graph replays" : "", e, rc);
				if (variant != 2)
					continue;
				for (size_t i = 0; i < (size_t) n * Ha * R; i++)
					late[i] = NAN;
				rc = f(variant, merge, 1, n, Ha, R, Dr, ctx, page_cap, qabs, cache, late, reps, &us);
				tap_ok(rc == 0 && memcmp(late, got, sizeof(float) * (size_t) n * Ha * R) == 0,
					   "MLA decode attention variant 2 + %s, %d heads, contexts 1 .. %d%s: the early key loads "
					   "(KL_CUDA_MLA_FOLD) give olat bit for bit (rel err %.2e, rc %d)",
					   merge ? "mla_merge_wide" : "mla_merge", Ha, ctx[n - 1], reps ? ", after 3 graph replays" : "",
					   rc == 0 ? rel_err(late, got, (size_t) n * Ha * R) : INFINITY, rc);
			}
	}
	free(cache);
	free(qabs);
	free(ref);
	free(got);
	free(late);
	dlclose(lib);
	kl_model_free(m);
}

/* name=val in the environment, or name unset where val is NULL */
static void
env_put(const char *name, const char *val)
{
	if (val)
		setenv(name, val, 1);
	else
		unsetenv(name);
}

/*
 * check_mla_decode's tokens, 32 heads, through the wgmma variant with the
 * switches KL_CUDA_MLA_WG_SPLIT, _PF and _DUAL set to split, pf and dual
 * (NULL: unset, the default) while the hook runs (it reads them at each
 * call): olat (NaN first), the hook's return code.
 */
static int
mla_wg_run(mla_decode_test_fn f, const char *split, const char *pf, const char *dual, int merge, int early, int reps,
		   const float *qabs, const uint16_t *cache, float *olat)
{
	double		us = 0;
	int			rc;

	env_put("KL_CUDA_MLA_WG_SPLIT", split);
	env_put("KL_CUDA_MLA_WG_PF", pf);
	env_put("KL_CUDA_MLA_WG_DUAL", dual);
	for (size_t i = 0; i < (size_t) MLA_DEC_N * 32 * 512; i++)
		olat[i] = NAN;
	rc = f(2, merge, early, MLA_DEC_N, 32, 512, 64, mla_dec_ctx, MLA_DEC_PAGES, qabs, cache, olat, reps, &us);
	env_put("KL_CUDA_MLA_WG_SPLIT", NULL);
	env_put("KL_CUDA_MLA_WG_PF", NULL);
	env_put("KL_CUDA_MLA_WG_DUAL", NULL);
	return rc;
}

/*
 * The wgmma decode attention's forms (cuda_mla.c, cuda_mla_wg_read) on
 * check_mla_decode's tokens (contexts 1 .. 5000, five pages each), 32 heads,
 * early loads and the backend's merge unless stated:
 *  - KL_CUDA_MLA_WG_DUAL=1 with blocks of 2 R keys (KL_CUDA_MLA_WG_SPLIT)
 *    gives the one-range kernel's olat with ranges of R keys bit for bit
 *    (each warpgroup's range does the one-range kernel's operations in the
 *    same order), R = 64, 128, 192 (27 ranges: the last block's second
 *    warpgroup has no keys, and the blocks of the short contexts have one
 *    working warpgroup) and 320, each within check_mla_decode's bound of
 *    the double reference; at R = 192 also with mla_merge, mla_merge_wide,
 *    the early loads off and after 3 graph replays;
 *  - DUAL at the rule's split (blocks of 320 keys, 5 tiles: ranges of 192)
 *    equals the one-range kernel at 192 bit for bit (decode_split's
 *    halving rounds up to whole tiles);
 *  - KL_CUDA_MLA_WG_PF=1, 2 and 5 give the default's (0: none) olat bit for bit,
 *    one range a block and DUAL, blocks of 640 keys (10 tiles: prefetches
 *    from the start and in the tile loop) and of the rule's 320.
 */
static void
check_mla_wg_forms(void)
{
	static const int keys[] = {64, 128, 192, 320};
	static const struct
	{
		int			merge,
					early,
					reps;
		const char *what;
	}			runs[] = {{-1, 1, 0, ""}, {0, 1, 0, ", mla_merge"}, {1, 1, 0, ", mla_merge_wide"},
	{-1, 0, 0, ", early loads off"}, {-1, 1, 3, ", after 3 graph replays"}};
	int			Wa = 576;
	size_t		no = (size_t) MLA_DEC_N * 32 * 512;
	uint16_t   *cache;
	float	   *qabs,
			   *ref,
			   *one,
			   *two;
	void	   *lib = NULL;
	mla_decode_test_fn f = NULL;
	kl_model   *m = mla_decode_open(&lib, &f, Wa, &cache, &qabs);
	char		a[16],
				b[16];
	int			ra,
				rb;

	if (!f)
		return;
	ref = malloc(sizeof(float) * no);
	one = malloc(sizeof(float) * no);
	two = malloc(sizeof(float) * no);
	for (int t = 0; t < MLA_DEC_N; t++)
		mla_decode_reference(32, 512, 64, mla_dec_ctx[t], qabs + (size_t) t * 32 * Wa,
							 cache + (size_t) t * MLA_DEC_PAGES * KL_MLA_PAGE * Wa, ref + (size_t) t * 32 * 512);
	if ((ra = mla_wg_run(f, NULL, NULL, NULL, -1, 1, 0, qabs, cache, one)) == -1)
	{
		tap_diag("MLA decode attention variant 2: not taken on this device (wgmma forms skipped)");
		goto done;
	}
	for (size_t ki = 0; ki < sizeof(keys) / sizeof(keys[0]); ki++)
		for (size_t ri = 0; ri < sizeof(runs) / sizeof(runs[0]); ri++)
		{
			if (ri > 0 && keys[ki] != 192)
				continue;
			snprintf(a, sizeof(a), "%d", keys[ki]);
			snprintf(b, sizeof(b), "%d", 2 * keys[ki]);
			ra = mla_wg_run(f, a, NULL, "0", runs[ri].merge, runs[ri].early, runs[ri].reps, qabs, cache, one);
			rb = mla_wg_run(f, b, NULL, "1", runs[ri].merge, runs[ri].early, runs[ri].reps, qabs, cache, two);
			tap_ok(ra == 0 && rb == 0 && memcmp(one, two, sizeof(float) * no) == 0 && rel_err(two, ref, no) <= 4e-3,
				   "MLA decode attention variant 2, 32 heads, contexts 1 .. 5000%s: KL_CUDA_MLA_WG_DUAL=1 with "
				   "blocks of %d keys equals one range a block of %d bit for bit (rel err %.2e; vs a double "
				   "reference %.2e; rc %d, %d)", runs[ri].what, 2 * keys[ki], keys[ki],
				   ra == 0 && rb == 0 ? rel_err(two, one, no) : INFINITY, rb == 0 ? rel_err(two, ref, no) : INFINITY,
				   ra, rb);
		}
	ra = mla_wg_run(f, "192", NULL, "0", -1, 1, 0, qabs, cache, one);
	rb = mla_wg_run(f, NULL, NULL, "1", -1, 1, 0, qabs, cache, two);
	tap_ok(ra == 0 && rb == 0 && memcmp(one, two, sizeof(float) * no) == 0 && rel_err(two, ref, no) <= 4e-3,
		   "MLA decode attention variant 2, 32 heads, contexts 1 .. 5000: KL_CUDA_MLA_WG_DUAL=1 at the rule's split "
		   "(blocks of 320 keys) equals one range a block of 192 keys bit for bit (rel err %.2e; vs a double "
		   "reference %.2e; rc %d, %d)", ra == 0 && rb == 0 ? rel_err(two, one, no) : INFINITY,
		   rb == 0 ? rel_err(two, ref, no) : INFINITY, ra, rb);
	for (int di = 0; di < 2; di++)
		for (int si = 0; si < 2; si++)
		{
			const char *dual = di ? "1" : "0",
					   *split = si ? "640" : NULL;

			ra = mla_wg_run(f, split, NULL, dual, -1, 1, 0, qabs, cache, one);
			for (int pi = 0; pi < 3; pi++)
			{
				const char *pf = (const char *[]) {"1", "2", "5"}[pi];

				rb = mla_wg_run(f, split, pf, dual, -1, 1, 0, qabs, cache, two);
				tap_ok(ra == 0 && rb == 0 && memcmp(one, two, sizeof(float) * no) == 0,
					   "MLA decode attention variant 2, 32 heads, contexts 1 .. 5000, %s, blocks of %s keys: "
					   "KL_CUDA_MLA_WG_PF=%s equals the default (0) bit for bit (rel err %.2e; rc %d, %d)",
					   di ? "a range a warpgroup (DUAL)" : "one range a block", si ? "640" : "the rule's 320", pf,
					   ra == 0 && rb == 0 ? rel_err(two, one, no) : INFINITY, ra, rb);
			}
		}
done:
	free(cache);
	free(qabs);
	free(ref);
	free(one);
	free(two);
	dlclose(lib);
	kl_model_free(m);
}

/* kl_cuda_test_route_group (cuda_moe.c): a fused decode routing launcher on host arrays */
typedef int (*route_test_fn) (int warp, int n, int E, int k, int G, int Tg, int use_softmax, int renorm,
							  int bias_in_w, float scaling, int shared_rows, int P, const float *logits,
							  const float *bias, int *sel, float *wts, int *start, int *xrow, int *inv, int *active);

/* every output of one launch, in arrays of the sizes the hook documents */
typedef struct route_out
{
	int		   *sel,
			   *start,
			   *xrow,
			   *inv,
			   *active;
	float	   *wts;
	size_t		n_sel,
				n_start,
				n_xrow,
				n_active;
} route_out;

static void
route_out_init(route_out *o, int n, int E, int k)
{
	o->n_sel = (size_t) n * k;
	o->n_start = (size_t) E + 2;
	o->n_xrow = (size_t) n * k + n;
	o->n_active = (size_t) E + (size_t) n * k + n + 4;
	o->sel = malloc(sizeof(int) * o->n_sel);
	o->inv = malloc(sizeof(int) * o->n_sel);
	o->wts = malloc(sizeof(float) * o->n_sel);
	o->start = malloc(sizeof(int) * o->n_start);
	o->xrow = malloc(sizeof(int) * o->n_xrow);
	o->active = malloc(sizeof(int) * o->n_active);
	/* the same bytes before both launches: entries a kernel skips compare too */
	memset(o->sel, 0x5a, sizeof(int) * o->n_sel);
	memset(o->inv, 0x5a, sizeof(int) * o->n_sel);
	memset(o->wts, 0x5a, sizeof(float) * o->n_sel);
	memset(o->start, 0x5a, sizeof(int) * o->n_start);
	memset(o->xrow, 0x5a, sizeof(int) * o->n_xrow);
	memset(o->active, 0x5a, sizeof(int) * o->n_active);
}

static void
route_out_free(route_out *o)
{
	free(o->sel);
	free(o->inv);
	free(o->wts);
	free(o->start);
	free(o->xrow);
	free(o->active);
}

/* the first output array in which a and b differ (bit for bit), or NULL */
static const char *
route_out_diff(const route_out *a, const route_out *b)
{
	if (memcmp(a->sel, b->sel, sizeof(int) * a->n_sel) != 0)
		return "sel";
	if (memcmp(a->wts, b->wts, sizeof(float) * a->n_sel) != 0)
		return "wts";
	if (memcmp(a->start, b->start, sizeof(int) * a->n_start) != 0)
		return "start";
	if (memcmp(a->xrow, b->xrow, sizeof(int) * a->n_xrow) != 0)
		return "xrow";
	if (memcmp(a->inv, b->inv, sizeof(int) * a->n_sel) != 0)
		return "inv";
	if (memcmp(a->active, b->active, sizeof(int) * a->n_active) != 0)
		return "active";
	return NULL;
}

/*
 * One routing case through the hook's paths pa and pb (0 block, 1 warp, 2
 * rank kernel) on the same inputs; their return codes in *ra, *rb.  Returns
 * the first output in which they differ, or NULL (also when one did not run).
 */
static const char *
route_pair(route_test_fn f, int pa, int pb, int n, int E, int k, int G, int Tg, int softmax, int renorm, int rule,
		   int shared_rows, int P, const float *lg, const float *bias, int *ra, int *rb)
{
	route_out	a,
				b;
	const char *d = NULL;

	route_out_init(&a, n, E, k);
	route_out_init(&b, n, E, k);
	*ra = f(pa, n, E, k, G, Tg, softmax, renorm, rule, 2.446f, shared_rows, P, lg, bias, a.sel, a.wts, a.start,
			a.xrow, a.inv, a.active);
	*rb = f(pb, n, E, k, G, Tg, softmax, renorm, rule, 2.446f, shared_rows, P, lg, bias, b.sel, b.wts, b.start,
			b.xrow, b.inv, b.active);
	if (*ra == 0 && *rb == 0)
		d = route_out_diff(&a, &b);
	route_out_free(&a);
	route_out_free(&b);
	return d;
}

/* router logits and bias: 0 roughly normal, 1 few levels (ties in the
 * choices and group scores), 2 all equal, 3 wide spread */
static void
make_router(float *lg, float *bias, int n, int E, int kind, uint64_t *rs)
{
	for (int e = 0; e < E; e++)
		bias[e] = kind == 1 ? 0.25f * (float) (int) (4.0 * unif(rs)) : kind == 2 ? 0.0f : (float) (0.1 * (unif(rs) - 0.5));
	for (int i = 0; i < n * E; i++)
	{
		double		g = (unif(rs) + unif(rs) + unif(rs) - 1.5) * 2.0;

		lg[i] = kind == 0 ? (float) (2.0 * g) : kind == 1 ? (float) (int) (3.0 * g) : kind == 2 ? 0.5f :
			(float) (12.0 * g);
	}
}

/*
 * kk_moe_route_group_warp against kk_moe_route_group: identical sel, wts,
 * start, xrow, inv and active for router logits at the 48B shape (E 256,
 * k 8; with and without groups), the big-shapes model's (E 16, k 4, 4
 * groups keep 2) and an E of 64 (lanes with unused slots); both weight
 * rules; sigmoid and softmax; with and without the shared expert's rows;
 * n = 1, 3, 8, 17 and 64 tokens.
 */
static void
check_route_warp(void)
{
	static const struct
	{
		int			E,
					k,
					G,
					Tg;
		const char *what;
	}			shapes[] = {
		{256, 8, 1, 1, "48B shape (E 256, k 8)"},
		{256, 8, 8, 4, "E 256, k 8, 8 groups keep 4"},
		{16, 4, 4, 2, "E 16, k 4, 4 groups keep 2"},
		{64, 6, 1, 1, "E 64, k 6"},
	};
	static const int ns[] = {1, 3, 8, 17, 64};
	kl_model   *m;
	void	   *lib = NULL;
	route_test_fn f = NULL;
	uint64_t	rs = 4242;

	m = load_test_hook("kl_cuda_test_route_group", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		for (int rule = 0; rule < 2; rule++)
		{
			int			E = shapes[si].E,
						k = shapes[si].k,
						cases = 0,
						wrong = 0,
						failed = 0;

			for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++)
				for (int kind = 0; kind < 4; kind++)
					for (int variant = 0; variant < 4; variant++)
					{
						int			n = ns[ni],
									softmax = variant == 3,
									renorm = variant != 2,
									shared_rows = variant & 1 ? n : 0,
									P = n <= 1 ? 1 : n <= 2 ? 2 : 4;
						float	   *lg = malloc(sizeof(float) * (size_t) n * E),
								   *bias = malloc(sizeof(float) * (size_t) E);
						int			ra,
									rb;
						const char *d;

						make_router(lg, bias, n, E, kind, &rs);
						d = route_pair(f, 0, 1, n, E, k, shapes[si].G, shapes[si].Tg, softmax, renorm, rule,
									   shared_rows, P, lg, bias, &ra, &rb);
						cases++;
						if (ra != 0 || rb != 0)
						{
							if (failed++ < 4)
								tap_diag("%s n %d kind %d variant %d: block kernel %d, warp kernel %d",
										 shapes[si].what, n, kind, variant, ra, rb);
						}
						else if (d != NULL && wrong++ < 8)
							tap_diag("%s, %s rule, n %d, logits kind %d, variant %d: %s differs", shapes[si].what,
									 rule ? "reference" : "select", n, kind, variant, d);
						free(lg);
						free(bias);
					}
			tap_ok(wrong == 0 && failed == 0,
				   "routing in warps = the block kernel, bit for bit (sel, wts, start, xrow, inv, active), %s, %s "
				   "rule: %d of %d cases differ, %d not run", shapes[si].what, rule ? "reference" : "select", wrong,
				   cases, failed);
		}
	/* NaN and infinite logits have no order: the choice is free, but it stays in bounds and consistent */
	{
		int			n = 8,
					E = 256,
					k = 8,
					nk = n * k,
					ok = 1,
					rc;
		float	   *lg = malloc(sizeof(float) * (size_t) n * E),
					bias[256];
		int			seen[64] = {0};
		route_out	o;

		make_router(lg, bias, n, E, 0, &rs);
		for (int i = 0; i < n * E; i++)
			if (i < E || i % 7 == 0)	/* token 0 all NaN, the others every seventh */
				lg[i] = NAN;
			else if (i % 11 == 0)
				lg[i] = i % 2 ? INFINITY : -INFINITY;
		route_out_init(&o, n, E, k);
		rc = f(1, n, E, k, 1, 1, 0, 1, 0, 2.446f, n, 4, lg, bias, o.sel, o.wts, o.start, o.xrow, o.inv, o.active);
		for (int i = 0; i < nk && rc == 0; i++)
		{
			ok &= o.sel[i] >= 0 && o.sel[i] < E && o.inv[i] >= 0 && o.inv[i] < nk;
			if (o.inv[i] >= 0 && o.inv[i] < nk)
				seen[o.inv[i]]++;
		}
		for (int i = 0; i < nk; i++)
			ok &= seen[i] == 1;
		ok &= o.start[E] == nk && o.start[E + 1] == nk + n;
		tap_ok(rc == 0 && ok, "routing in warps, NaN and infinite router logits: experts in range, every pair in one "
			   "place (%d)", rc);
		route_out_free(&o);
		free(lg);
	}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * The rank routing's cases through the hook's paths pa and pb (route_pair),
 * one line a shape and weight rule (label: what is compared): the 48B shape
 * (E 256, k 8), E 64 k 6 (lanes past E), E 20 k 5 (k > the warps: no
 * candidate filter) and 8 groups that all stay (Tg = G: covered); sigmoid
 * and softmax; with and without the shared expert's rows; the ns[] token
 * counts; router logits normal, few levels (ties), all equal, wide, and
 * with NaN and infinities.
 */
static void
route_rank_cases(route_test_fn f, int pa, int pb, const int *ns, int nn, uint64_t *rs, const char *label)
{
	static const struct
	{
		int			E,
					k,
					G,
					Tg;
		const char *what;
	}			shapes[] = {
		{256, 8, 1, 1, "48B shape (E 256, k 8)"},
		{64, 6, 1, 1, "E 64, k 6"},
		{20, 5, 1, 1, "E 20, k 5"},
		{256, 8, 8, 8, "E 256, k 8, 8 groups keep 8"},
	};

	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		for (int rule = 0; rule < 2; rule++)
		{
			int			E = shapes[si].E,
						k = shapes[si].k,
						cases = 0,
						wrong = 0,
						failed = 0;

			for (int ni = 0; ni < nn; ni++)
				for (int kind = 0; kind < 5; kind++)
					for (int variant = 0; variant < 5; variant++)
					{
						int			n = ns[ni],
									softmax = variant >= 3,
									renorm = variant != 2,
									shared_rows = variant & 1 ? n : 0,
									P = n <= 1 ? 1 : n <= 2 ? 2 : 4;
						float	   *lg = malloc(sizeof(float) * (size_t) n * E),
								   *bias = malloc(sizeof(float) * (size_t) E);
						int			ra,
									rb;
						const char *d;

						make_router(lg, bias, n, E, kind < 4 ? kind : 0, rs);
						if (kind == 4)	/* NaN, +-inf, +-0 and ties among the normal ones */
							for (int i = 0; i < n * E; i++)
							{
								int			r = (int) (16.0 * unif(rs));

								lg[i] = r == 0 ? NAN : r == 1 ? -NAN : r == 2 ? INFINITY : r == 3 ? -INFINITY :
									r == 4 ? 0.0f : r == 5 ? -0.0f : r == 6 ? 1.0f : lg[i];
							}
						d = route_pair(f, pa, pb, n, E, k, shapes[si].G, shapes[si].Tg, softmax, renorm, rule,
									   shared_rows, P, lg, bias, &ra, &rb);
						cases++;
						if (ra != 0 || rb != 0)
						{
							if (failed++ < 4)
								tap_diag("%s n %d kind %d variant %d: path %d returned %d, path %d %d",
										 shapes[si].what, n, kind, variant, pa, ra, pb, rb);
						}
						else if (d != NULL && wrong++ < 8)
							tap_diag("%s, %s rule, n %d, logits kind %d, variant %d: %s differs", shapes[si].what,
									 rule ? "reference" : "select", n, kind, variant, d);
						free(lg);
						free(bias);
					}
			tap_ok(wrong == 0 && failed == 0,
				   "%s, bit for bit (sel, wts, start, xrow, inv, active), %s, %s rule: %d of %d cases differ, %d not "
				   "run", label, shapes[si].what, rule ? "reference" : "select", wrong, cases, failed);
		}
}

/*
 * kk_moe_route_group_rank (a thread per expert, choices by rank; on unless
 * KL_CUDA_ROUTE_RANK=0; at one token with the ballot grouping,
 * KL_CUDA_ROUTE_RANK1) against kk_moe_route_group_warp: identical sel, wts,
 * start, xrow, inv and active in route_rank_cases' cases, n = 1 to 8.
 * Shapes it does not cover (groups that drop, n > 8) must answer -1.
 */
static void
check_route_rank(void)
{
	static const int ns[] = {1, 2, 3, 4, 5, 8};
	kl_model   *m;
	void	   *lib = NULL;
	route_test_fn f = NULL;
	uint64_t	rs = 777;

	m = load_test_hook("kl_cuda_test_route_group", &lib, (void **) &f);
	if (!f)
		return;
	route_rank_cases(f, 1, 2, ns, 6, &rs, "routing by rank = the warp kernel");
	/* outside its shapes the launcher declines (the caller takes the warp kernel) */
	{
		int			n = 9,
					E = 256,
					k = 8,
					r9,
					rg;
		float	   *lg = malloc(sizeof(float) * (size_t) n * E),
					bias[256];
		route_out	o;

		make_router(lg, bias, n, E, 0, &rs);
		route_out_init(&o, n, E, k);
		r9 = f(2, n, E, k, 1, 1, 0, 1, 0, 2.446f, n, 4, lg, bias, o.sel, o.wts, o.start, o.xrow, o.inv, o.active);
		rg = f(2, 1, E, k, 8, 4, 0, 1, 0, 2.446f, 1, 1, lg, bias, o.sel, o.wts, o.start, o.xrow, o.inv, o.active);
		tap_ok(r9 == -1 && rg == -1, "routing by rank declines 9 tokens (%d) and groups that drop (%d)", r9, rg);
		route_out_free(&o);
		free(lg);
	}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * The rank routing at one token with its grouping read from the warps'
 * ballots of the choices (KL_CUDA_ROUTE_RANK1, the default: hook path 2)
 * against the grouping by counts and a block scan it has at other n (path
 * 3): identical outputs in route_rank_cases' cases at n = 1.
 */
static void
check_route_rank1(void)
{
	static const int ns[] = {1};
	kl_model   *m;
	void	   *lib = NULL;
	route_test_fn f = NULL;
	uint64_t	rs = 2026120301;

	m = load_test_hook("kl_cuda_test_route_group", &lib, (void **) &f);
	if (!f)
		return;
	route_rank_cases(f, 3, 2, ns, 1, &rs, "routing by rank at one token, grouping from ballots (KL_CUDA_ROUTE_RANK1) "
					 "= by counts");
	dlclose(lib);
	kl_model_free(m);
}

/* kl_cuda_test_moe_pad_group (cuda_moe_prefill.c): KL_CUDA_MOE_PREFILL=4's device grouping on host choices */
typedef int (*pad_group_fn) (int n, int E, int k, const int *sel, int *inv, int *summary);

/* variant 3's slot of an expert with c > 0 rows (cuda_moe_prefill.c's rule, written again as the reference) */
static int
ref_slot_rows(int c)
{
	int			s64 = (c + 63) / 64 * 64,
				s128 = (c + 127) / 128 * 128;

	return (s128 - c) * 100 < 15 * c ? s128 : s64;
}

/*
 * The padded grouping of variant 3 from the choices, plainly: experts
 * ordered by (slot size, id), slots laid out in that order, each pair at
 * its expert's first row plus the pairs of that expert before it.  inv
 * [n k], base [E] (-1 unused); returns the padded rows.
 */
static int
ref_pad_group(const int *sel, int n, int E, int k, int *inv, int *base)
{
	int		   *cnt = calloc((size_t) E, sizeof(int)),
			   *seen = calloc((size_t) E, sizeof(int)),
				npad = 0;

	if (!cnt || !seen)
	{
		kl_err		err = {0};

		die("memory for the grouping reference", &err);
	}
	for (int i = 0; i < n * k; i++)
		if (sel[i] >= 0 && sel[i] < E)
			cnt[sel[i]]++;
	for (int e = 0; e < E; e++)
	{
		int			s = cnt[e] ? ref_slot_rows(cnt[e]) : 0;

		base[e] = -1;
		if (s == 0)
			continue;
		base[e] = 0;
		for (int j = 0; j < E; j++)
		{
			int			sj = cnt[j] ? ref_slot_rows(cnt[j]) : 0;

			if (sj > 0 && (sj < s || (sj == s && j < e)))
				base[e] += sj;
		}
		npad += s;
	}
	for (int i = 0; i < n * k; i++)
		inv[i] = sel[i] >= 0 && sel[i] < E ? base[sel[i]] + seen[sel[i]]++ : 0;
	free(cnt);
	free(seen);
	return npad;
}

/*
 * The device grouping of KL_CUDA_MOE_PREFILL=4 (kk_moe_pad_group: counts,
 * size-class layout and inverse map in three launches over chunks of 128
 * tokens) against ref_pad_group, exactly: inv, the counts, each expert's
 * first padded row and the padded total.  Shapes: E 16 k 4 (the tiny
 * models), 64 k 6, 256 k 8 (48B), 1024 k 8; n from 65 (just over the decode
 * bound) through chunk edges (127, 128, 129, 383) to 997, 4096 and 8192;
 * choices uniform, skewed (experts 0..2 in every token: slots of many
 * rows), crowded (2k experts take everything) and one expert id out of
 * range (its pair must get row 0, the summary must count n k - 1 pairs:
 * the host then fails the op).
 */
static void
check_moe_pad_group(void)
{
	static const int shapes[][2] = {{16, 4}, {64, 6}, {256, 8}, {1024, 8}};
	static const int ns[] = {65, 100, 127, 128, 129, 383, 997, 4096, 8192};
	kl_model   *m;
	void	   *lib = NULL;
	pad_group_fn f = NULL;
	uint64_t	rs = 1313;

	m = load_test_hook("kl_cuda_test_moe_pad_group", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		for (int kind = 0; kind < 4; kind++)
		{
			int			E = shapes[si][0],
						k = shapes[si][1],
						cases = 0,
						wrong = 0,
						failed = 0;
			static const char *const kinds[] = {"uniform", "skewed", "crowded", "one id out of range"};

			for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++)
			{
				int			n = ns[ni],
							nk = n * k,
							npad,
							rc;
				int		   *sel = malloc(sizeof(int) * (size_t) nk),
						   *inv = malloc(sizeof(int) * (size_t) nk),
						   *rinv = malloc(sizeof(int) * (size_t) nk),
						   *base = malloc(sizeof(int) * (size_t) E),
						   *sum = malloc(sizeof(int) * (2 * (size_t) E + 3));
				bool		ok;

				if (!sel || !inv || !rinv || !base || !sum)
				{
					kl_err		err = {0};

					die("memory for the grouping check", &err);
				}
				/* k distinct experts a token, as top-k routing gives */
				for (int t = 0; t < n; t++)
					for (int r = 0; r < k; r++)
					{
						int			e,
									dup;

						do
						{
							if (kind == 1 && r < 3)
								e = r;
							else if (kind == 2)
								e = (int) (mix_rand(&rs) % (uint64_t) (2 * k));
							else
								e = (int) (mix_rand(&rs) % (uint64_t) E);
							dup = 0;
							for (int q = 0; q < r; q++)
								dup |= sel[t * k + q] == e;
						} while (dup);
						sel[t * k + r] = e;
					}
				/* one id out of range: that pair gets row 0, the others group as if it were not there */
				if (kind == 3)
					sel[mix_rand(&rs) % (uint64_t) nk] = E;
				npad = ref_pad_group(sel, n, E, k, rinv, base);
				rc = f(n, E, k, sel, inv, sum);
				cases++;
				if (rc != 0)
				{
					failed++;
					tap_diag("moe pad group E %d k %d n %d %s: hook returned %d", E, k, n, kinds[kind], rc);
				}
				else
				{
					ok = memcmp(inv, rinv, sizeof(int) * (size_t) nk) == 0 &&
						memcmp(sum + E, base, sizeof(int) * (size_t) E) == 0 && sum[2 * E] == npad &&
						sum[2 * E + 1] == nk - (kind == 3) && sum[2 * E + 2] == 0;
					for (int e = 0; e < E && ok; e++)
					{
						int			c = 0;

						for (int i = 0; i < nk; i++)
							c += sel[i] == e;
						ok = sum[e] == c;
					}
					if (!ok)
					{
						wrong++;
						if (wrong <= 3)
							tap_diag("moe pad group E %d k %d n %d %s: differs (padded rows %d, reference %d)", E,
									 k, n, kinds[kind], sum[2 * E], npad);
					}
				}
				free(sel);
				free(inv);
				free(rinv);
				free(base);
				free(sum);
			}
			tap_ok(wrong == 0 && failed == 0, "KL_CUDA_MOE_PREFILL=4 device grouping, E %d k %d, %s choices: inverse "
				   "map, counts and padded layout equal the reference in %d of %d step sizes (65 .. 8192 tokens)",
				   E, k, kinds[kind], cases - wrong - failed, cases);
		}
	dlclose(lib);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ expert products on tensor cores */

/* kl_cuda_test_expert_products (cuda_moe.c): one step's expert products through both kernels */
typedef int (*expert_test_fn) (int n, int E, int k, int D, int F, const float *logits, unsigned long long seed,
							   int *start, float *out_mma, float *out_gemv);

/* like rel_err, but a NaN on either side (a row no work item wrote) is infinite */
static double
rel_err_nan(const float *a, const float *ref, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (isnan(ref[i]))
			return INFINITY;
	return rel_err(a, ref, n);
}

/*
 * kk_expert_mma (tensor cores) against kk_expert_gemv (CUDA cores) on the
 * same random bf16 weights and the same activations, already bf16 values,
 * so that only the order of the fp32 sums differs: all three modes (SwiGLU
 * gate/up, the two matrices, down) within 1e-5 relative for every output.
 * Shapes: the 48B model's experts (D 2304, F 1024, 256 experts top 8 and a
 * shared one) at steps of 8, 12, 40 and 64 tokens; tiny_a's (D 128, F 64, 8
 * top 2: the down product is all k tail); and D 352, F 224, 16 top 4 (an
 * odd number of k steps, k tails in every mode, blocks with idle warps).
 * The router logits favour a few experts so that some get more tokens than
 * an item of 8 holds (split over items) and one about 8 (a full item).
 */
static void
check_expert_mma(void)
{
	static const struct
	{
		int			E,
					k,
					D,
					F,
					n;
		const char *what;
	}			cases[] = {
		{256, 8, 2304, 1024, 8, "48B shape (D 2304, F 1024, E 256 + shared, top 8)"},
		{256, 8, 2304, 1024, 12, "48B shape (D 2304, F 1024, E 256 + shared, top 8)"},
		{256, 8, 2304, 1024, 40, "48B shape (D 2304, F 1024, E 256 + shared, top 8)"},
		{256, 8, 2304, 1024, 64, "48B shape (D 2304, F 1024, E 256 + shared, top 8)"},
		{8, 2, 128, 64, 12, "tiny_a's shape (D 128, F 64, E 8 + shared, top 2)"},
		{16, 4, 352, 224, 12, "D 352, F 224, E 16 + shared, top 4"},
		{16, 4, 352, 224, 40, "D 352, F 224, E 16 + shared, top 4"},
	};
	static const char *outs[4] = {"SwiGLU", "gate (two matrices)", "up (two matrices)", "down"};
	kl_model   *m;
	void	   *lib = NULL;
	expert_test_fn f = NULL;
	uint64_t	rs = 777;

	m = load_test_hook("kl_cuda_test_expert_products", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
	{
		int			E = cases[ci].E,
					k = cases[ci].k,
					D = cases[ci].D,
					F = cases[ci].F,
					n = cases[ci].n,
					R = n * k + n,
					most = 0,
					rc;
		size_t		off[5] = {0, (size_t) R * F, 2 * (size_t) R * F, 3 * (size_t) R * F, (size_t) R * (3 * F + D)};
		float	   *lg = malloc(sizeof(float) * (size_t) n * E),
				   *ym = malloc(sizeof(float) * off[4]),
				   *yg = malloc(sizeof(float) * off[4]);
		int		   *start = malloc(sizeof(int) * ((size_t) E + 2));
		double		worst = 0;

		/* experts 1 and E/2 for three tokens of four (split over items), expert 3 for the first 8 */
		for (int t = 0; t < n; t++)
			for (int e = 0; e < E; e++)
				lg[(size_t) t * E + e] = (float) ((unif(&rs) + unif(&rs) + unif(&rs) - 1.5) * 2.0) +
					(((e == 1 || e == E / 2) && t % 4 != 3) || (e == 3 && t < 8 && k > 2) ? 4.0f : 0.0f);
		rc = f(n, E, k, D, F, lg, 1000 + ci, start, ym, yg);
		if (rc == 0)
		{
			for (int e = 0; e < E; e++)
				most = start[e + 1] - start[e] > most ? start[e + 1] - start[e] : most;
			for (int o = 0; o < 4; o++)
			{
				double		e = rel_err_nan(ym + off[o], yg + off[o], off[o + 1] - off[o]);

				tap_diag("%s, %d tokens, %s: tensor cores vs CUDA cores, rel err %.2e", cases[ci].what, n, outs[o], e);
				worst = e > worst || isnan(e) ? e : worst;
			}
		}
		tap_ok(rc == 0 && worst <= 1e-5, "expert products on the tensor cores = the CUDA-core kernel on the same "
			   "bf16 activations, %s, %d tokens: worst rel err %.2e over SwiGLU, two matrices and down (largest "
			   "routed expert %d tokens, %d items of 8; hook returned %d)", cases[ci].what, n, worst, most,
			   (most + 7) / 8, rc);
		free(lg);
		free(ym);
		free(yg);
		free(start);
	}
	dlclose(lib);
	kl_model_free(m);
}

/* kl_cuda_test_gemv_slab (cuda_matmul.c): one batch of plain tensor-core products through both kernels */
typedef int (*gemv_slab_test_fn) (int n, int count, const int *rows, const int *cols, int xpad,
								  unsigned long long seed, float *out_old, float *out_new);

/*
 * The tensor-core GEMV in slabs (gemv_slab_kernel, KL_CUDA_GEMV_MMA_SLAB)
 * against the 16-row-tile kernel (gemv_mma_kernel) on the same random bf16
 * weights and fp32 activations, 1..8 rows each.  Both round the activations
 * with the same f32_to_bf16, so every product is the same exact fp32 value
 * and only the order of the fp32 sums differs (per mma, over a warp's
 * chunks, over the warps' k ranges): the bound is the one of the expert
 * products' check above, 1e-5 relative (a few ulp over sums of 1024-4096
 * terms; that check measured 2.1e-6 at k 2304).  Rows past n must stay
 * untouched (NaN) in both.  Shapes: the 48B model's KDA projection batch
 * (3 x 4096 x 2304), o_proj (2304 x 4096), the router (256 x 2304),
 * lm_head (163840 x 2304), 19999 x 1024, and a batch of odd shapes (rows not
 * a multiple of 16, 11 and 3 chunks of k, unaligned activation rows) - on
 * the H200's 132 SMs every slab size the launcher picks (1, 2, 4 and 8
 * tiles a block) is among them.
 */
static void
check_gemv_slab(void)
{
	static const struct
	{
		int			count,
					xpad,
					rows[3],
					cols[3];
		const char *what;
	}			cases[] = {
		{3, 4, {4096, 4096, 4096}, {2304, 2304, 2304}, "48B KDA projections 3 x 4096 x 2304"},
		{1, 4, {2304}, {4096}, "48B o_proj 2304 x 4096"},
		{1, 4, {256}, {2304}, "48B router 256 x 2304"},
		{1, 4, {163840}, {2304}, "48B lm_head 163840 x 2304"},
		{1, 4, {19999}, {1024}, "19999 x 1024 (4 tiles a block on 132 SMs, a slab past the end)"},
		{3, 1, {50, 100, 7}, {352, 96, 2304}, "odd shapes 50 x 352, 100 x 96, 7 x 2304, unaligned rows"},
	};
	kl_model   *m;
	void	   *lib = NULL;
	gemv_slab_test_fn f = NULL;

	m = load_test_hook("kl_cuda_test_gemv_slab", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
	{
		size_t		tot = 0;
		float	   *yo,
				   *yn;
		double		worst = 0;
		int			rc = 0,
					stray = 0;

		for (int j = 0; j < cases[ci].count; j++)
			tot += (size_t) 8 * cases[ci].rows[j];
		yo = malloc(sizeof(float) * tot);
		yn = malloc(sizeof(float) * tot);
		for (int n = 1; n <= 8 && rc == 0; n++)
		{
			rc = f(n, cases[ci].count, cases[ci].rows, cases[ci].cols, cases[ci].xpad, 4242 + 10 * ci + n, yo, yn);
			if (rc != 0)
				break;
			for (size_t off = 0, j = 0; j < (size_t) cases[ci].count; off += (size_t) 8 * cases[ci].rows[j], j++)
			{
				size_t		live = (size_t) n * cases[ci].rows[j];
				double		e = rel_err_nan(yn + off, yo + off, live);

				worst = e > worst || isnan(e) ? e : worst;
				for (size_t i = live; i < (size_t) 8 * cases[ci].rows[j]; i++)
					stray += !isnan(yo[off + i]) || !isnan(yn[off + i]);
			}
			tap_diag("%s, %d rows: slab vs tile kernel, worst rel err so far %.2e", cases[ci].what, n, worst);
		}
		tap_ok(rc == 0 && worst <= 1e-5 && stray == 0, "tensor-core GEMV in slabs = the 16-row-tile kernel on the "
			   "same inputs, %s, 1..8 rows: worst rel err %.2e, %d outputs written past n (hook returned %d)",
			   cases[ci].what, worst, stray, rc);
		free(yo);
		free(yn);
	}
	dlclose(lib);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ quantized GEMV (kernels/gemv_q.cu) */

/* kernels.h's KK_WF_* (that header needs the CUDA include path): fp32, bf16, then quant.h's forms */
#define TQ_F32 0
#define TQ_BF16 1
#define TQ_FMT(t) ((int) (t) + 1)		/* KL_Q_FP8 .. KL_Q_INT4 -> KK_WF_FP8 .. KK_WF_INT4 */

typedef int (*gemv_q_test_fn) (int multi, int n, int count, const int *fmt, const int *group, const int *rows,
							   const int *cols, const void *const *data, const float *const *scales, const float *x,
							   int xpad, float *y);
typedef int (*expert_gemv_q_test_fn) (int mode, int fmt, int group, int rows, int cols, int E,
									  const void *const *data0, const float *const *scales0,
									  const void *const *data1, const float *const *scales1, int nx, const float *x,
									  int xpad, const int *xrow, const int *start, int max_count, int preload,
									  float *y0, float *y1);

static uint64_t tq_state;

static double
tq_uniform(void)
{
	tq_state = tq_state * 6364136223846793005ULL + 1442695040888963407ULL;
	return (double) (tq_state >> 11) / 9007199254740992.0;
}

/* roughly normal, standard deviation sd */
static float
tq_normal(float sd)
{
	return (float) ((tq_uniform() + tq_uniform() + tq_uniform() - 1.5) * 2.0 * sd);
}

/*
 * A test matrix: type t quantized from random f32 by kl_q_quantize_rows
 * (group columns a scale), or (handmade) FP8 bytes drawn from the codes that
 * exercise the decoding (zeros, subnormals 0x01-0x07 / 0x81-0x87, the
 * largest 0x7e / 0xfe, random others but NaN) with random scales; or bf16 /
 * fp32 values (t KL_Q_NONE, fmt TQ_BF16 / TQ_F32).  dense: [rows, cols] the
 * weights as quant.h computes them (kl_q_dequant_row), the reference's.
 */
typedef struct tq_mat
{
	int			fmt,
				group,
				rows,
				cols;
	void	   *data;
	float	   *scales;
	float	   *dense;
} tq_mat;

static void
tq_make(tq_mat *m, int fmt, int group, int rows, int cols, bool handmade)
{
	m->fmt = fmt;
	m->rows = rows;
	m->cols = cols;
	m->group = group;
	m->scales = NULL;
	m->dense = malloc(sizeof(float) * (size_t) rows * cols);
	if (fmt == TQ_F32 || fmt == TQ_BF16)
	{
		m->data = malloc((size_t) rows * cols * (fmt == TQ_F32 ? 4 : 2));
		for (size_t i = 0; i < (size_t) rows * cols; i++)
		{
			float		v = tq_normal(0.05f);

			if (fmt == TQ_BF16)
			{
				((uint16_t *) m->data)[i] = kl_f32_to_bf16(v);
				v = kl_bf16_to_f32(((uint16_t *) m->data)[i]);
			}
			else
				((float *) m->data)[i] = v;
			m->dense[i] = v;
		}
		return;
	}
	{
		kl_qmat		q;
		static const uint8_t codes[] = {0x00, 0x80, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x81, 0x82, 0x83,
		0x84, 0x85, 0x86, 0x87, 0x7e, 0xfe, 0x08, 0x88, 0x0f, 0x8f};

		memset(&q, 0, sizeof(q));
		q.type = (kl_qtype) (fmt - 1);
		q.rows = rows;
		q.cols = cols;
		q.group = group;
		q.n_groups = (cols + group - 1) / group;
		q.row_bytes = kl_q_row_bytes(q.type, cols);
		m->data = malloc(q.row_bytes * rows);
		m->scales = malloc(sizeof(float) * (size_t) rows * q.n_groups);
		q.data = m->data;
		q.scales = m->scales;
		if (handmade)
		{
			uint8_t    *d = m->data;

			for (size_t i = 0; i < q.row_bytes * rows; i++)
			{
				double		u = tq_uniform();

				d[i] = u < 0.5 ? codes[(int) (tq_uniform() * sizeof(codes))] : (uint8_t) (tq_uniform() * 256);
				if ((d[i] & 0x7f) == 0x7f)
					d[i] = 0x7e;
			}
			for (size_t i = 0; i < (size_t) rows * q.n_groups; i++)
				m->scales[i] = (float) (tq_uniform() * 4.0 - 2.0) * (i % 5 == 0 ? 60.0f : 1e-3f);
		}
		else
		{
			float	   *src = malloc(sizeof(float) * (size_t) rows * cols);

			for (size_t i = 0; i < (size_t) rows * cols; i++)
				src[i] = tq_normal(0.05f) * (i % 97 == 0 ? 20.0f : 1.0f);
			kl_q_quantize_rows(&q, src, 0, rows);
			free(src);
		}
		for (int r = 0; r < rows; r++)
			kl_q_dequant_row(&q, r, m->dense + (size_t) r * cols);
	}
}

static void
tq_free(tq_mat *m)
{
	free(m->data);
	free(m->scales);
	free(m->dense);
}

/* y[r, row] = sum_c dense[row, c] x[r, c] in double, rounded to float at the end */
static void
tq_reference(const tq_mat *m, int n, const float *x, float *y)
{
	for (int r = 0; r < n; r++)
		for (int o = 0; o < m->rows; o++)
		{
			const float *w = m->dense + (size_t) o * m->cols;
			const float *xr = x + (size_t) r * m->cols;
			double		acc = 0;

			for (int c = 0; c < m->cols; c++)
				acc += (double) w[c] * xr[c];
			y[(size_t) r * m->rows + o] = (float) acc;
		}
}

static const char *
tq_name(int fmt)
{
	return fmt == TQ_F32 ? "fp32" : fmt == TQ_BF16 ? "bf16" : kl_qtype_name((kl_qtype) (fmt - 1));
}

/* a case of the gemv_q checks: count jobs (matrix j: fmt[j], group[j] (0: cols), rows[j] x cols[j]) in one batch,
 * inputs of up to maxn rows with row stride cols + xpad on the device */
typedef struct tq_case
{
	int			count,
				xpad,
				fmt[4],
				group[4],
				rows[4],
				cols[4],
				maxn;
	bool		handmade;
	const char *what;
} tq_case;

/* a case's arrays as the hook takes them: matrices, formats, groups (cols for 0), data and scales, the inputs x
 * of maxn rows for every job one after another; ytot: the floats of maxn rows of every job's outputs */
typedef struct tq_jobs
{
	tq_mat		mat[4];
	int			fmt[4],
				grp[4];
	const void *data[4];
	const float *sc[4];
	float	   *x;
	size_t		ytot;
} tq_jobs;

/* case c's jobs: matrices by tq_make and random inputs, from tq_state; tq_case_close frees them */
static void
tq_case_open(const tq_case *c, tq_jobs *J)
{
	size_t		xtot = 0;

	J->ytot = 0;
	for (int j = 0; j < c->count; j++)
	{
		J->fmt[j] = c->fmt[j];
		J->grp[j] = c->group[j] ? c->group[j] : c->cols[j];
		tq_make(&J->mat[j], J->fmt[j], J->grp[j], c->rows[j], c->cols[j], c->handmade);
		J->data[j] = J->mat[j].data;
		J->sc[j] = J->mat[j].scales;
		xtot += (size_t) c->maxn * c->cols[j];
		J->ytot += (size_t) c->maxn * c->rows[j];
	}
	J->x = malloc(sizeof(float) * xtot);
	for (size_t i = 0; i < xtot; i++)
		J->x[i] = tq_normal(1.0f);
}

static void
tq_case_close(const tq_case *c, tq_jobs *J)
{
	for (int j = 0; j < c->count; j++)
		tq_free(&J->mat[j]);
	free(J->x);
}

/*
 * kk_gemv_q and kk_gemv_multi_q (gemv_q.cu) against a double-precision
 * product of quant.h's weights (kl_q_dequant_row: fl(q * scale)) on random
 * quantized matrices, rel err <= 1e-5 (the kernels sum each piece unscaled,
 * then scale it: fp32 rounding apart).  Formats FP8 / int8 / int4, one scale
 * a row and groups of 32 / 128 (16 for FP8 and int8 too), hand-made FP8
 * bytes with subnormals; 1..8 rows, and 9 and 17 for kk_gemv_q's passes; the
 * 48B shapes (q/k/v 4096 x 2304, o 2304 x 4096, experts' 1024 x 2304 and
 * 2304 x 1024, lm_head 163840 x 2304 in FP8) and odd ones (cols 96, 64,
 * 200: not whole int4 pieces, rows of no particular multiple, unaligned
 * activation rows: the scalar path); a batch mixing FP8, int4, bf16 and
 * fp32 jobs.
 */
static void
check_gemv_q(void)
{
	static const tq_case cases[] = {
		{3, 0, {2, 2, 2}, {0, 0, 0}, {4096, 4096, 4096}, {2304, 2304, 2304}, 17, false, "48B q/k/v"},
		{1, 0, {2}, {128}, {2304}, {4096}, 8, false, "48B o_proj, groups of 128"},
		{2, 0, {2, 2}, {32, 16}, {1024, 2304}, {2304, 1024}, 8, false, "48B expert gate and down, groups 32 / 16"},
		{1, 0, {2}, {0}, {163840}, {2304}, 4, false, "48B lm_head"},
		{2, 0, {2, 2}, {0, 16}, {333, 77}, {2304, 1024}, 9, true, "hand-made FP8 bytes with subnormals"},
		{3, 0, {4, 4, 4}, {0, 32, 128}, {4096, 1024, 2304}, {2304, 2304, 1024}, 17, false, "int4 48B shapes"},
		{3, 0, {3, 3, 3}, {0, 16, 128}, {4096, 1024, 2304}, {2304, 2304, 1024}, 9, false, "int8 48B shapes"},
		{3, 0, {2, 3, 4}, {0, 32, 0}, {37, 50, 19}, {96, 64, 200}, 9, false, "odd shapes fp8 96, int8 64, int4 200"},
		{3, 3, {2, 3, 4}, {0, 0, 32}, {41, 7, 130}, {2304, 96, 64}, 8, false, "unaligned activation rows"},
		{3, 0, {4, 2, 2}, {0, 0, 16}, {5, 300, 61}, {200, 200, 208}, 8, false, "cols 200 / 208 fp8, int4 200"},
		{4, 0, {2, 4, 1, 0}, {0, 32, 0, 0}, {2304, 1024, 512, 300}, {2304, 2304, 2304, 2304}, 8, false,
		"FP8, int4, bf16 and fp32 jobs together"},
	};
	kl_model   *m;
	void	   *lib = NULL;
	gemv_q_test_fn f = NULL;

	m = load_test_hook("kl_cuda_test_gemv_q", &lib, (void **) &f);
	if (!f)
		return;
	tq_state = 2026113001;
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
	{
		int			count = cases[ci].count;
		tq_jobs		J;
		float	   *y,
				   *ref;

		tq_case_open(&cases[ci], &J);
		y = malloc(sizeof(float) * J.ytot);
		ref = malloc(sizeof(float) * J.ytot);
		for (int multi = 0; multi < 2; multi++)
		{
			double		worst = 0;
			int			rc = 0;

			for (int n = 1; n <= cases[ci].maxn && rc == 0; n++)
			{
				size_t		xo = 0,
							yo = 0;

				/* the large cases at a few row counts (the reference is a CPU product) */
				if (cases[ci].rows[0] * (size_t) cases[ci].cols[0] > 20000000 && n != 1 && n != cases[ci].maxn)
					continue;
				if ((multi && n > 8) || (!multi && n > 1 && n < 8 && n % 3 != 1 && cases[ci].maxn > 8))
					continue;
				rc = f(multi, n, count, J.fmt, J.grp, cases[ci].rows, cases[ci].cols, J.data, J.sc, J.x, cases[ci].xpad,
					   y);
				for (int j = 0; j < count && rc == 0; j++)
				{
					double		e;

					tq_reference(&J.mat[j], n, J.x + xo, ref + yo);
					e = rel_err_nan(y + yo, ref + yo, (size_t) n * cases[ci].rows[j]);
					if (e > 1e-5 || isnan(e))
						tap_diag("%s: job %d (%s, group %d, %d x %d), %d rows: rel err %.2e", cases[ci].what, j,
								 tq_name(J.fmt[j]), J.grp[j], cases[ci].rows[j], cases[ci].cols[j], n, e);
					worst = e > worst || isnan(e) ? e : worst;
					xo += (size_t) n * cases[ci].cols[j];
					yo += (size_t) n * cases[ci].rows[j];
				}
			}
			tap_ok(rc == 0 && worst <= 1e-5, "%s: %s of quantized weights = the double product of quant.h's "
				   "weights, 1..%d rows: worst rel err %.2e (hook returned %d)", cases[ci].what,
				   multi ? "kk_gemv_multi_q" : "kk_gemv_q", multi && cases[ci].maxn > 8 ? 8 : cases[ci].maxn, worst,
				   rc);
		}
		tq_case_close(&cases[ci], &J);
		free(y);
		free(ref);
	}
	dlclose(lib);
	kl_model_free(m);
}

typedef int (*rows_early_test_fn) (int on);

/*
 * gemv_q_kernel's early form (KL_CUDA_ROWS_EARLY, the default: products of
 * 2 rows request up to 3 pieces a thread of each row before the PDL wait;
 * 1 row as KL_CUDA_Q_EARLY1 says: with =1 in launches of one wave of
 * the early kernel, which all of these are, and with =2 in every one,
 * kl_cuda_test_q_early1(2)) against the first piece only
 * (kl_cuda_test_rows_early(0)): the outputs bit for bit, kk_gemv_q and
 * kk_gemv_multi_q, 1 and 2 rows (and 9 for kk_gemv_q: a pass of 8, then one
 * row).  The 48B widths in every form
 * the early pieces take: 2304 columns (FP8 144 pieces: whole rows, the third
 * piece only in some threads; int4 72), 4096 (FP8 256 in the wide shape:
 * whole rows; int4 128), 9216 (FP8 576, int4 288: two pieces held, then the
 * streamed rest); rows that leave the last block short; groups of a row and
 * of 16 (one piece a group), 32, 128; hand-made FP8 bytes; a batch of FP8,
 * int4, bf16 and fp32 jobs; unaligned activation rows (the scalar path).
 */
static void
check_rows_early_gemv_q(void)
{
	static const tq_case cases[] = {
		{3, 0, {2, 2, 2}, {0, 0, 0}, {301, 300, 299}, {2304, 2304, 2304}, 9, false, "FP8 q/k/v width 2304"},
		{1, 0, {2}, {128}, {301}, {4096}, 9, false, "FP8 o_proj width 4096, groups of 128"},
		{1, 0, {2}, {0}, {77}, {9216}, 9, false, "FP8 dense down width 9216"},
		{2, 0, {2, 2}, {16, 0}, {130, 33}, {2304, 2304}, 9, true, "hand-made FP8 bytes, groups of 16 and a row"},
		{3, 0, {4, 4, 4}, {32, 0, 128}, {301, 130, 77}, {2304, 4096, 9216}, 9, false, "int4 widths 2304, 4096, 9216"},
		{2, 0, {3, 3}, {16, 0}, {130, 301}, {2304, 4096}, 9, false, "int8 widths 2304, 4096"},
		{4, 0, {2, 4, 1, 0}, {0, 32, 0, 0}, {301, 130, 77, 33}, {2304, 2304, 2304, 2304}, 9, false,
		"FP8, int4, bf16 and fp32 jobs together"},
		{2, 3, {2, 4}, {0, 32}, {130, 77}, {2304, 4096}, 9, false, "unaligned activation rows (scalar path)"},
	};
	static const int ns[] = {1, 2, 9};
	kl_model   *m;
	void	   *lib = NULL;
	gemv_q_test_fn f = NULL;
	rows_early_test_fn set_early,
				set_early1;
	int			was,
				was1;

	m = load_test_hook("kl_cuda_test_gemv_q", &lib, (void **) &f);
	if (!f)
		return;
	set_early = (rows_early_test_fn) dlsym(lib, "kl_cuda_test_rows_early");
	set_early1 = (rows_early_test_fn) dlsym(lib, "kl_cuda_test_q_early1");
	if (!tap_ok(set_early != NULL && set_early1 != NULL,
				"the CUDA library exports kl_cuda_test_rows_early and kl_cuda_test_q_early1"))
	{
		dlclose(lib);
		kl_model_free(m);
		return;
	}
	was = set_early(1);
	was1 = set_early1(1);
	tq_state = 2026120201;
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
	{
		int			count = cases[ci].count;
		tq_jobs		J;
		float	   *y[3];

		tq_case_open(&cases[ci], &J);
		for (int e = 0; e < 3; e++)
			y[e] = malloc(sizeof(float) * J.ytot);
		for (int multi = 0; multi < 2; multi++)
			for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++)
			{
				/* forms: the first piece only; early (at 1 row KL_CUDA_Q_EARLY1=1); at 1 row its =2 */
				int			n = ns[ni],
							forms = n == 1 ? 3 : 2,
							rc[3];
				size_t		ny = 0;

				if (multi && n > 8)
					continue;
				for (int j = 0; j < count; j++)
					ny += (size_t) n * cases[ci].rows[j];
				for (int e = 0; e < forms; e++)
				{
					set_early(e > 0);
					set_early1(e == 2 ? 2 : 1);
					rc[e] = f(multi, n, count, J.fmt, J.grp, cases[ci].rows, cases[ci].cols, J.data, J.sc, J.x,
							  cases[ci].xpad, y[e]);
				}
				for (int e = 1; e < forms; e++)
					tap_ok(rc[0] == 0 && rc[e] == 0 && memcmp(y[0], y[e], sizeof(float) * ny) == 0,
						   "%s, %s, %d row%s: early weight requests (KL_CUDA_ROWS_EARLY%s) = the first piece only "
						   "bit for bit (rel err %.2e; hook returned %d, %d)", cases[ci].what,
						   multi ? "kk_gemv_multi_q" : "kk_gemv_q", n, n == 1 ? "" : "s",
						   e == 2 ? ", KL_CUDA_Q_EARLY1=2" : "", rel_err(y[e], y[0], ny), rc[0], rc[e]);
			}
		tq_case_close(&cases[ci], &J);
		for (int e = 0; e < 3; e++)
			free(y[e]);
	}
	set_early(was);
	set_early1(was1);
	dlclose(lib);
	kl_model_free(m);
}

/* kl_cuda_test_rows_wide1 (gemv.cu): one input row through the wide block-rows GEMV with rb rows a block */
typedef int (*rows_wide1_fn) (int rows, int cols, int rb, unsigned long long seed, float *y);

/*
 * The wide block-rows GEMV (bf16, 128 threads) at one input row in the early
 * form with 3 and 4 weight rows a block (KL_CUDA_ROWS_WIDE1) against 2 (the
 * shape of before): the outputs bit for bit and every row written, rows of
 * 4096 columns (o_proj: four pieces a thread, the whole row held), 5120 and
 * 9216 (held pieces, then the streamed rest); 2304 rows (the 48B o_proj),
 * 301 (a short last block at 2, 3 and 4), 2 and 1 (fewer rows than a block).
 */
static void
check_rows_wide1(void)
{
	static const int shapes[][2] = {{2304, 4096}, {301, 4096}, {2, 4096}, {77, 5120}, {301, 9216}, {1, 9216}};
	kl_model   *m;
	void	   *lib = NULL;
	rows_wide1_fn f = NULL;

	m = load_test_hook("kl_cuda_test_rows_wide1", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
	{
		int			rows = shapes[si][0],
					cols = shapes[si][1],
					rc[3],
					nan = 0;
		float	   *y[3];

		for (int v = 0; v < 3; v++)
		{
			y[v] = malloc(sizeof(float) * (size_t) rows);
			rc[v] = f(rows, cols, 2 + v, 2026120302ull + si, y[v]);
		}
		for (int r = 0; r < rows; r++)
			nan += isnan(y[0][r]) != 0;
		for (int v = 1; v < 3; v++)
			tap_ok(rc[0] == 0 && rc[v] == 0 && nan == 0 && memcmp(y[v], y[0], sizeof(float) * rows) == 0,
				   "wide block-rows GEMV, %d x %d bf16, one row: %d rows a block (KL_CUDA_ROWS_WIDE1) = 2 bit for bit "
				   "(rel err %.2e, %d rows unwritten; hook returned %d, %d)", rows, cols, 2 + v,
				   rel_err(y[v], y[0], rows), nan, rc[0], rc[v]);
		for (int v = 0; v < 3; v++)
			free(y[v]);
	}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * kk_expert_gemv_q's three modes (one matrix, two, SwiGLU) against the
 * double products of quant.h's weights (SwiGLU: silu(gate) * up of the
 * double products rounded to float, in float), rel err <= 1e-5: FP8, int8
 * and int4 experts of the 48B shapes (gate/up 1024 x 2304, down 2304 x
 * 1024) and odd ones (cols 200 and 96: the scalar path for int4), groups
 * of a row and of 32 / 128; experts with 0, 1, P and P + 1 pairs (P the
 * item size of the step's token count: 1, 2, 4, 8 rows a pass) and the last
 * expert with many (several items); pairs reading x rows by xrow and
 * without it; the down product's early read of the work list (preload) on
 * and off.
 */
static void
check_expert_gemv_q(void)
{
	static const struct
	{
		int			fmt,
					group,			/* 0: cols */
					rows,
					cols;
		const char *what;
	}			cases[] = {
		{2, 0, 1024, 2304, "FP8 48B gate/up shape"},
		{2, 128, 2304, 1024, "FP8 48B down shape, groups of 128"},
		{4, 32, 1024, 2304, "int4 48B gate/up shape, groups of 32"},
		{4, 0, 2304, 1024, "int4 48B down shape"},
		{3, 16, 70, 96, "int8 70 x 96, groups of 16"},
		{4, 0, 33, 200, "int4 33 x 200 (scalar path)"},
		{2, 32, 45, 64, "FP8 45 x 64, groups of 32"},
	};
	static const int max_counts[] = {1, 2, 3, 12};	/* the step's token count */
	kl_model   *m;
	void	   *lib = NULL;
	expert_gemv_q_test_fn f = NULL;
	const int	E = 5;

	m = load_test_hook("kl_cuda_test_expert_gemv_q", &lib, (void **) &f);
	if (!f)
		return;
	tq_state = 2026113002;
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
	{
		int			rows = cases[ci].rows,
					cols = cases[ci].cols,
					fmt = cases[ci].fmt,
					grp = cases[ci].group ? cases[ci].group : cols;
		tq_mat		w0[5],
					w1[5];
		const void *d0[5],
				   *d1[5];
		const float *s0[5],
				   *s1[5];
		double		worst = 0;
		int			rc = 0;

		for (int e = 0; e < E; e++)
		{
			tq_make(&w0[e], fmt, grp, rows, cols, false);
			tq_make(&w1[e], fmt, grp, rows, cols, false);
			d0[e] = w0[e].data;
			d1[e] = w1[e].data;
			s0[e] = w0[e].scales;
			s1[e] = w1[e].scales;
		}
		for (size_t mi = 0; mi < sizeof(max_counts) / sizeof(max_counts[0]) && rc == 0; mi++)
		{
			/* P: kk_expert_pass_rows(mc) at the default KL_CUDA_EXPERT_NR (4) */
			int			mc = max_counts[mi],
						P = mc <= 1 ? 1 : mc <= 2 ? 2 : 4;
			/* pairs an expert: 0, 1, P, P + 1 (at most the token count, as routing gives) and all mc tokens
			 * (12: three items) */
			int			cnt[5] = {0, 1, P < mc ? P : mc, P + 1 < mc ? P + 1 : mc, mc};
			int			start[6],
						pairs,
						nx = mc + 2;
			int		   *xrow;
			float	   *x,
					   *y0,
					   *y1,
					   *ref0,
					   *ref1;

			start[0] = 0;
			for (int e = 0; e < E; e++)
				start[e + 1] = start[e] + cnt[e];
			pairs = start[E];
			xrow = malloc(sizeof(int) * pairs);
			x = malloc(sizeof(float) * (size_t) (nx > pairs ? nx : pairs) * cols);
			y0 = malloc(sizeof(float) * (size_t) pairs * rows);
			y1 = malloc(sizeof(float) * (size_t) pairs * rows);
			ref0 = malloc(sizeof(float) * rows);
			ref1 = malloc(sizeof(float) * rows);
			for (int i = 0; i < pairs; i++)
				xrow[i] = (int) (tq_uniform() * nx);
			for (size_t i = 0; i < (size_t) (nx > pairs ? nx : pairs) * cols; i++)
				x[i] = tq_normal(1.0f);
			for (int mode = 0; mode < 3 && rc == 0; mode++)
				for (int xi = 0; xi < 2 && rc == 0; xi++)
				{
					double		num = 0,
								den = 0;

					rc = f(mode, fmt, grp, rows, cols, E, d0, s0, mode ? d1 : NULL, mode ? s1 : NULL,
						   xi ? nx : pairs, x, 0, xi ? xrow : NULL, start, mc, mode == 0 && mi == 0 ? xi : 1,
						   y0, y1);
					for (int e = 0; e < E && rc == 0; e++)
						for (int i = start[e]; i < start[e + 1]; i++)
						{
							const float *xr = x + (size_t) (xi ? xrow[i] : i) * cols;

							tq_reference(&w0[e], 1, xr, ref0);
							if (mode)
								tq_reference(&w1[e], 1, xr, ref1);
							for (int o = 0; o < rows; o++)
							{
								double		want = mode == 2 ? (double) (ref0[o] / (1.0f + expf(-ref0[o]))) * ref1[o]
									: ref0[o],
											got = y0[(size_t) i * rows + o];

								num += (got - want) * (got - want);
								den += want * want;
								if (isnan(y0[(size_t) i * rows + o]))
									num = INFINITY;
								if (mode == 1)
								{
									got = y1[(size_t) i * rows + o];
									num += (got - ref1[o]) * (got - ref1[o]) + (isnan(got) ? INFINITY : 0);
									den += (double) ref1[o] * ref1[o];
								}
							}
						}
					{
						double		e = den > 0 ? sqrt(num / den) : sqrt(num);

						if (e > 1e-5 || isnan(e))
							tap_diag("%s, step of %d tokens, mode %d, xrow %d: rel err %.2e", cases[ci].what, mc,
									 mode, xi, e);
						worst = e > worst || isnan(e) ? e : worst;
					}
				}
			free(xrow);
			free(x);
			free(y0);
			free(y1);
			free(ref0);
			free(ref1);
		}
		tap_ok(rc == 0 && worst <= 1e-5, "kk_expert_gemv_q, %s: one matrix, two and SwiGLU, experts of 0, 1, P, "
			   "P + 1 and many pairs, xrow and none, = the double products of quant.h's weights: worst rel err "
			   "%.2e (hook returned %d)", cases[ci].what, worst, rc);
		for (int e = 0; e < E; e++)
		{
			tq_free(&w0[e]);
			tq_free(&w1[e]);
		}
	}
	dlclose(lib);
	kl_model_free(m);
}

/* kl_cuda_test_expert_paths (cuda_moe.c): a decode step's gate/up and down through today's kernels and a new path */
typedef int (*expert_paths_fn) (int path, int n, int E, int k, int D, int F, const float *logits,
								unsigned long long seed, float *out_old, float *out_new);

/*
 * The batch-1-to-4 expert paths of issue 10 against today's two kernels
 * (SwiGLU gate/up, then down; KL_CUDA_EXPERT_PRELOAD=0) on the same random
 * bf16 weights and inputs: the arithmetic is the same, so h and the expert
 * outputs must agree bit for bit, and every row must be written (no NaN
 * left).  The hook runs the new path directly and as a replayed graph
 * (programmatic launch edges as in a decode step) and checks the two agree.
 * Path 1: the down kernel reads its work list and first weights before the
 * gate/up kernel completes (KL_CUDA_EXPERT_PRELOAD).  Paths 2-8: gemv.cu's
 * tiled kernel at one row an item (KL_CUDA_EXPERT_B1; cuda_moe.c's
 * test_expert_path has each form): 1, 2 and 4 tiles a block (the shared
 * expert's later tiles prefetched into L2 from 2), 4 with the down kernel
 * waiting first, 4 with items of one row at 3 and 4 tokens (several
 * shared-expert slots), 4 with the shared expert's slots guessed wrong (the
 * weights requested again after the wait), 4 without the L2 prefetch.  Shapes: the 48B model's experts
 * (D 2304, F 1024, 256 top 8 + shared: 3 and 2 pieces a thread and row) at
 * 1, 3 and 4 tokens, and D 352, F 224, 16 top 4 (1 piece; tiles and blocks
 * past the matrices' last rows) at 3 and 1.
 */
static void
check_expert_paths(void)
{
	static const struct
	{
		int			E,
					k,
					D,
					F,
					n;
	}			cases[] = {
		{256, 8, 2304, 1024, 1},
		{256, 8, 2304, 1024, 3},
		{256, 8, 2304, 1024, 4},
		{16, 4, 352, 224, 3},
		{16, 4, 352, 224, 1},
	};
	static const char *paths[] = {
		NULL, "down kernel's early work-list read (KL_CUDA_EXPERT_PRELOAD)",
		"tiled kernel, 1 tile a block (KL_CUDA_EXPERT_B1=1)", "tiled kernel, 2 tiles a block (KL_CUDA_EXPERT_B1=2)",
		"tiled kernel, 4 tiles a block (KL_CUDA_EXPERT_B1=4)",
		"tiled kernel, 4 tiles, down waiting first (KL_CUDA_EXPERT_PRELOAD=0)",
		"tiled kernel, 4 tiles, items of one row (KL_CUDA_EXPERT_NR=1)",
		"tiled kernel, 4 tiles, shared expert guessed wrong",
		"tiled kernel, 4 tiles, shared expert's first tile only (KL_CUDA_EXPERT_B1=4,4,1)"
	};
	kl_model   *m;
	void	   *lib = NULL;
	expert_paths_fn f = NULL;
	uint64_t	rs = 4242;

	m = load_test_hook("kl_cuda_test_expert_paths", &lib, (void **) &f);
	if (!f)
		return;
	for (int path = 1; path < (int) (sizeof(paths) / sizeof(paths[0])); path++)
		for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
		{
			int			E = cases[ci].E,
						k = cases[ci].k,
						D = cases[ci].D,
						F = cases[ci].F,
						n = cases[ci].n,
						R = n * k + n,
						rc,
						nan = 0;
			size_t		osz = (size_t) R * ((size_t) F + D);
			float	   *lg = malloc(sizeof(float) * (size_t) n * E),
					   *yo = malloc(sizeof(float) * osz),
					   *yn = malloc(sizeof(float) * osz);
			bool		same;

			/* expert 1 for every token (an item of n rows), the rest random */
			for (int t = 0; t < n; t++)
				for (int e = 0; e < E; e++)
					lg[(size_t) t * E + e] = (float) ((unif(&rs) + unif(&rs) - 1.0) * 2.0) + (e == 1 ? 4.0f : 0.0f);
			rc = f(path, n, E, k, D, F, lg, 2000 + ci, yo, yn);
			same = rc == 0 && memcmp(yo, yn, sizeof(float) * osz) == 0;
			for (size_t i = 0; rc == 0 && i < osz; i++)
				nan += isnan(yo[i]) || isnan(yn[i]);
			tap_ok(same && nan == 0, "expert products, %s: h and the expert outputs bit-identical to today's two "
				   "kernels, direct and replayed in a graph (E %d top %d + shared, D %d, F %d, %d tokens; %d NaN; "
				   "hook returned %d)", paths[path], E, k, D, F, n, nan, rc);
			free(lg);
			free(yo);
			free(yn);
		}
	dlclose(lib);
	kl_model_free(m);
}

/* kl_cuda_test_mla_small (cuda_mla.c): the MLA absorb and output products through both kernel pairs */
typedef int (*mla_small_test_fn) (int n, int Ha, int Dn, int Dr, int Dv, int R, int bf16, const float *q,
								  const void *kv_b, const float *olat, const int *absorbed, float *qabs_old,
								  float *qabs_new, float *out_old, float *out_new);

/*
 * The decode MLA products with 16-byte weight loads (mla_absorb_q_stream,
 * mla_out_stream; KL_CUDA_MLA_SMALL) against the older kernels on the same
 * random data, so that only the order of the fp32 sums differs: qabs of the
 * absorbed tokens and out within 1e-5 relative; out rows of tokens not in
 * the absorbed form stay untouched by both (a sentinel compares equal).
 * Shapes: the 48B model's (32 heads, Dn 128, Dr 64, Dv 128, R 512) with 1,
 * 2, 3, 8, 13 and 64 tokens (every token tile of the kernels and ragged
 * last tiles) and tiny_a's (4 heads, Dn 32, Dr 16, Dv 32, R 64); weights in
 * bf16 and in fp32 (the fp32 precision path); all tokens absorbed, and
 * every third one not (the expanded form of a mixed batch).
 */
static void
check_mla_small(void)
{
	static const struct
	{
		int			Ha,
					Dn,
					Dr,
					Dv,
					R,
					n;
		const char *what;
	}			cases[] = {
		{32, 128, 64, 128, 512, 1, "48B shape"},
		{32, 128, 64, 128, 512, 2, "48B shape"},
		{32, 128, 64, 128, 512, 3, "48B shape"},
		{32, 128, 64, 128, 512, 8, "48B shape"},
		{32, 128, 64, 128, 512, 13, "48B shape"},
		{32, 128, 64, 128, 512, 64, "48B shape"},
		{4, 32, 16, 32, 64, 1, "tiny_a's shape"},
		{4, 32, 16, 32, 64, 8, "tiny_a's shape"},
		{4, 32, 16, 32, 64, 13, "tiny_a's shape"},
	};
	kl_model   *m;
	void	   *lib = NULL;
	mla_small_test_fn f = NULL;
	uint64_t	rs = 5150;

	m = load_test_hook("kl_cuda_test_mla_small", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
		for (int bf16 = 1; bf16 >= 0; bf16--)
			for (int mixed = 0; mixed < (cases[ci].n >= 3 ? 2 : 1); mixed++)
			{
				int			Ha = cases[ci].Ha,
							Dn = cases[ci].Dn,
							Dr = cases[ci].Dr,
							Dv = cases[ci].Dv,
							R = cases[ci].R,
							n = cases[ci].n,
							Wa = R + Dr,
							rc,
							na = 0;
				size_t		nw = (size_t) Ha * (Dn + Dv) * R,
							nqa = (size_t) n * Ha * Wa,
							no = (size_t) n * Ha * Dv;
				float	   *q = malloc(sizeof(float) * (size_t) n * Ha * (Dn + Dr)),
						   *w32 = malloc(sizeof(float) * nw),
						   *olat = malloc(sizeof(float) * (size_t) n * Ha * R),
						   *qa_old = malloc(sizeof(float) * nqa),
						   *qa_new = malloc(sizeof(float) * nqa),
						   *qa_o = malloc(sizeof(float) * nqa),
						   *qa_n = malloc(sizeof(float) * nqa),
						   *o_old = malloc(sizeof(float) * no),
						   *o_new = malloc(sizeof(float) * no);
				uint16_t   *w16 = malloc(sizeof(uint16_t) * nw);
				int		   *absorbed = malloc(sizeof(int) * (size_t) n);
				double		eq,
							eo;

				for (size_t i = 0; i < (size_t) n * Ha * (Dn + Dr); i++)
					q[i] = (float) ((unif(&rs) - 0.5) * 2.0);
				for (size_t i = 0; i < nw; i++)
				{
					/* bf16 values in both modes: the two weight formats hold the same numbers */
					w16[i] = kl_f32_to_bf16((float) ((unif(&rs) + unif(&rs) + unif(&rs) - 1.5) * 0.1));
					w32[i] = kl_bf16_to_f32(w16[i]);
				}
				for (size_t i = 0; i < (size_t) n * Ha * R; i++)
					olat[i] = (float) ((unif(&rs) - 0.5) * 2.0);
				for (int t = 0; t < n; t++)
					absorbed[t] = !(mixed && t % 3 == 1);
				for (size_t i = 0; i < nqa; i++)
					qa_old[i] = qa_new[i] = 12345.0f;
				for (size_t i = 0; i < no; i++)
					o_old[i] = o_new[i] = 12345.0f;
				rc = f(n, Ha, Dn, Dr, Dv, R, bf16, q, bf16 ? (const void *) w16 : (const void *) w32, olat,
					   absorbed, qa_old, qa_new, o_old, o_new);
				/* qabs: the absorbed tokens' rows (the older kernel also fills others of its tiles) */
				for (int t = 0; t < n; t++)
					if (absorbed[t])
					{
						memcpy(qa_o + (size_t) na * Ha * Wa, qa_old + (size_t) t * Ha * Wa,
							   sizeof(float) * Ha * Wa);
						memcpy(qa_n + (size_t) na * Ha * Wa, qa_new + (size_t) t * Ha * Wa,
							   sizeof(float) * Ha * Wa);
						na++;
					}
				eq = rel_err(qa_n, qa_o, (size_t) na * Ha * Wa);
				eo = rel_err(o_new, o_old, no);
				tap_ok(rc == 0 && eq <= 1e-5 && eo <= 1e-5,
					   "MLA decode products with 16-byte weight loads = the older kernels, %s, %d tokens (%d "
					   "absorbed), %s weights: qabs rel err %.2e, out rel err %.2e (hook returned %d)",
					   cases[ci].what, n, na, bf16 ? "bf16" : "fp32", eq, eo, rc);
				free(q);
				free(w32);
				free(olat);
				free(qa_old);
				free(qa_new);
				free(qa_o);
				free(qa_n);
				free(o_old);
				free(o_new);
				free(w16);
				free(absorbed);
			}
	dlclose(lib);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ flash prefill attention */

/* kl_cuda_test_mla_flash (cuda_mla.c): kk_mla_flash on host bf16 inputs */
typedef int (*mla_flash_test_fn) (int kind, int nr, int64_t pos0, int Ha, int Dn, int Dr, int Dv, int R, const uint16_t *q16,
								  const uint16_t *kv16, const uint16_t *lat16, float *out);

/*
 * The MLA prefill attention in one kernel (kernels/mla_flash.cu,
 * KL_CUDA_MLA_FLASH) against a double-precision reference computed here
 * from the same bf16 inputs: causal softmax of scale (q_nope k_nope + q_pe
 * k_pe), query i at position pos0 + i.  Steps (nr, pos0): single query,
 * ragged tiles (17, 100, 200, 300, 1000 are not multiples of the 128- or
 * 192-query or 64-key tiles), offsets that put the diagonal inside a key
 * tile (37, 1000, 2989: 47 key tiles, the key ring wrapping many times);
 * 48B head shapes (32 heads, Dn 128, Dr 64, Dv 128, R 512) and the golden
 * models' (Dn 32, Dr 16, Dv 32).  The kernel rounds P to bf16 (everything
 * else fp32): a lane-level CPU emulation of the kernel measured a relative
 * error of at most 1.5e-3 over the output and 2.7e-3 in the worst
 * (row, head), so 5e-3 and 1e-2 (rows the kernel fails to write stay NaN).
 * Every kernel variant of KL_CUDA_MLA_FLASH on the same inputs, same
 * tolerance: 1 (mma.sync), 2 and 3 (wgmma, 2 or 3 warpgroups: the same
 * arithmetic in another order; skipped where the device has no sm_90a
 * image or the shape is not the 48B one).
 */
static void
check_mla_flash(void)
{
	static const struct
	{
		int			Ha,
					Dn,
					Dr,
					Dv,
					R,
					nr,
					pos0;
		const char *what;
	}			cases[] = {
		{32, 128, 64, 128, 512, 1, 0, "48B shape"},
		{32, 128, 64, 128, 512, 17, 0, "48B shape"},
		{32, 128, 64, 128, 512, 64, 0, "48B shape"},
		{32, 128, 64, 128, 512, 100, 37, "48B shape"},
		{32, 128, 64, 128, 512, 300, 1000, "48B shape"},
		{32, 128, 64, 128, 512, 1000, 0, "48B shape"},
		{32, 128, 64, 128, 512, 200, 2989, "48B shape"},
		{4, 32, 16, 32, 64, 100, 37, "tiny_a's shape"},
		{2, 32, 16, 32, 32, 300, 5, "tiny_c's shape"},
	};
	kl_model   *m;
	void	   *lib = NULL;
	mla_flash_test_fn f = NULL;
	uint64_t	rs = 7301;

	m = load_test_hook("kl_cuda_test_mla_flash", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
	{
		int			Ha = cases[ci].Ha,
					Dn = cases[ci].Dn,
					Dr = cases[ci].Dr,
					Dv = cases[ci].Dv,
					R = cases[ci].R,
					nr = cases[ci].nr,
					pos0 = cases[ci].pos0,
					Dq = Dn + Dr,
					Wa = R + Dr,
					L = Ha * (Dn + Dv),
					mk = pos0 + nr,
					rc;
		size_t		nq = (size_t) nr * Ha * Dq,
					nkv = (size_t) mk * L,
					nlat = (size_t) mk * Wa,
					no = (size_t) nr * Ha * Dv;
		uint16_t   *q16 = malloc(sizeof(uint16_t) * nq),
				   *kv16 = malloc(sizeof(uint16_t) * nkv),
				   *lat16 = malloc(sizeof(uint16_t) * nlat);
		float	   *out = malloc(sizeof(float) * no),
				   *ref = malloc(sizeof(float) * no);
		double	   *sc = malloc(sizeof(double) * (size_t) mk),
					worst = 0,
					err;

		/* roughly normal, unit variance: scores of standard deviation about 1 */
		for (size_t i = 0; i < nq; i++)
			q16[i] = kl_f32_to_bf16((float) ((unif(&rs) + unif(&rs) + unif(&rs) - 1.5) * 2.0));
		for (size_t i = 0; i < nkv; i++)
			kv16[i] = kl_f32_to_bf16((float) ((unif(&rs) + unif(&rs) + unif(&rs) - 1.5) * 2.0));
		for (size_t i = 0; i < nlat; i++)
			lat16[i] = kl_f32_to_bf16((float) ((unif(&rs) + unif(&rs) + unif(&rs) - 1.5) * 2.0));
		for (int i = 0; i < nr; i++)
			for (int h = 0; h < Ha; h++)
			{
				const uint16_t *qi = q16 + (size_t) i * Ha * Dq + (size_t) h * Dq;
				double		mx = -INFINITY,
							z = 0;
				int			nk = pos0 + i + 1;

				for (int k = 0; k < nk; k++)
				{
					const uint16_t *kn = kv16 + (size_t) k * L + (size_t) h * (Dn + Dv),
							   *kr = lat16 + (size_t) k * Wa + R;
					double		d = 0;

					for (int c = 0; c < Dn; c++)
						d += (double) kl_bf16_to_f32(qi[c]) * kl_bf16_to_f32(kn[c]);
					for (int c = 0; c < Dr; c++)
						d += (double) kl_bf16_to_f32(qi[Dn + c]) * kl_bf16_to_f32(kr[c]);
					sc[k] = d / sqrt((double) Dq);
					mx = sc[k] > mx ? sc[k] : mx;
				}
				for (int k = 0; k < nk; k++)
				{
					sc[k] = exp(sc[k] - mx);
					z += sc[k];
				}
				for (int c = 0; c < Dv; c++)
				{
					double		o = 0;

					for (int k = 0; k < nk; k++)
						o += sc[k] * kl_bf16_to_f32(kv16[(size_t) k * L + (size_t) h * (Dn + Dv) + Dn + c]);
					ref[(size_t) i * Ha * Dv + (size_t) h * Dv + c] = (float) (o / z);
				}
			}
		for (int kind = 1; kind <= 3; kind++)
		{
			rc = f(kind, nr, pos0, Ha, Dn, Dr, Dv, R, q16, kv16, lat16, out);
			if (kind >= 2 && rc == -1)
			{
				tap_skip("MLA flash prefill attention on wgmma: no sm_90a image on this device, or not the 48B "
						 "head shape");
				continue;
			}
			worst = 0;
			for (int i = 0; i < nr; i++)
				for (int h = 0; h < Ha; h++)
				{
					size_t		at = (size_t) i * Ha * Dv + (size_t) h * Dv;

					err = rel_err(out + at, ref + at, (size_t) Dv);
					worst = err > worst ? err : worst;
				}
			err = rel_err(out, ref, no);
			tap_ok(rc == 0 && err <= 5e-3 && worst <= 1e-2,
				   "MLA flash prefill attention (kind %d) = double reference, %s, %d queries from position %d: "
				   "rel err %.2e, worst (row, head) %.2e (hook returned %d)", kind, cases[ci].what, nr, pos0, err,
				   worst, rc);
		}
		free(q16);
		free(kv16);
		free(lat16);
		free(out);
		free(ref);
		free(sc);
	}
	dlclose(lib);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ fused KDA decode */

/* kl_cuda_test_kda_decode (cuda_kda.c): one decode step, three kernels and the fused one */
typedef int (*kda_decode_test_fn) (int early, int ns, int H, int K, int W, int round16, float eps, const float *q,
								   const float *k, const float *v, const float *f, const float *b,
								   const float *gate, const float *conv_q, const float *conv_k,
								   const float *conv_v, const float *A_log, const float *dt_bias,
								   const float *o_norm, const float *S, const float *tails, float *out_old,
								   float *out_new, float *S_old, float *S_new, float *tails_old,
								   float *tails_new);

/* n values uniform in [lo, hi) */
static float *
rand_floats(size_t n, double lo, double hi, uint64_t *rs)
{
	float	   *x = malloc(sizeof(float) * n);

	for (size_t i = 0; i < n; i++)
		x[i] = (float) (lo + (hi - lo) * unif(rs));
	return x;
}

/*
 * The decode step's KDA mixer in one kernel (kk_kda_decode,
 * KL_CUDA_KDA_FUSED) against the three kernels (prep, recurrence, gated
 * norm) on the same inputs: output, state and conv tails bit for bit, at
 * the 48B shape and the golden models', 1 / 3 / 8 sequences, with the state
 * stored in fp32 and rounded to bf16 (KL_CUDA_KDA_STATE_ROUND), in both
 * forms of the kernel (KL_CUDA_KDA_DEC_EARLY 0 and 1; at conv width 3 the
 * early form falls back to the other).  The KDA
 * kernels take fp32 inputs in both precisions; check_kda_fused_model runs
 * whole models both ways in each.
 */
static void
check_kda_decode(void)
{
	static const struct
	{
		int			H,
					K,
					W;
		const char *what;
	}			shapes[] = {
		{32, 128, 4, "48B shape (32 heads x 128, conv 4)"},
		{4, 32, 4, "golden models' shape (4 heads x 32, conv 4)"},
		{6, 64, 3, "6 heads x 64, conv 3"},
	};
	static const int batches[] = {1, 3, 8};
	kl_model   *m;
	void	   *lib = NULL;
	kda_decode_test_fn fn = NULL;
	uint64_t	rs = 1010;

	m = load_test_hook("kl_cuda_test_kda_decode", &lib, (void **) &fn);
	if (!fn)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		for (size_t bi = 0; bi < sizeof(batches) / sizeof(batches[0]); bi++)
			for (int round16 = 0; round16 < 2; round16++)
				for (int early = 0; early < 2; early++)
				{
					int			H = shapes[si].H,
								K = shapes[si].K,
								W = shapes[si].W,
								ns = batches[bi],
								rc;
					size_t		HK = (size_t) H * K,
								nx = (size_t) ns * HK,
								nS = (size_t) ns * H * K * K,
								nT = (size_t) ns * 3 * HK * W;
					float	   *q = rand_floats(nx, -2, 2, &rs),
							   *k = rand_floats(nx, -2, 2, &rs),
							   *v = rand_floats(nx, -2, 2, &rs),
							   *f = rand_floats(nx, -4, 4, &rs),
							   *b = rand_floats((size_t) ns * H, -3, 3, &rs),
							   *gate = rand_floats(nx, -3, 3, &rs),
							   *cq = rand_floats(HK * W, -0.6, 0.6, &rs),
							   *ck = rand_floats(HK * W, -0.6, 0.6, &rs),
							   *cv = rand_floats(HK * W, -0.6, 0.6, &rs),
							   *A_log = rand_floats((size_t) H, -1, 1.5, &rs),
							   *dt = rand_floats(HK, -1, 1, &rs),
							   *onorm = rand_floats((size_t) K, 0.5, 1.5, &rs),
							   *S = rand_floats(nS, -1, 1, &rs),
							   *tails = rand_floats(nT, -2, 2, &rs),
							   *out_o = malloc(sizeof(float) * nx),
							   *out_n = malloc(sizeof(float) * nx),
							   *S_o = malloc(sizeof(float) * nS),
							   *S_n = malloc(sizeof(float) * nS),
							   *t_o = malloc(sizeof(float) * nT),
							   *t_n = malloc(sizeof(float) * nT);
					char		what[200];

					/* a few decays past softplus's threshold (f + dt_bias > 20) */
					for (size_t i = 0; i < nx; i += 97)
						f[i] = 25.0f;
					snprintf(what, sizeof(what), "%s, %d sequence%s, state %s, %s form", shapes[si].what, ns,
							 ns == 1 ? "" : "s", round16 ? "rounded to bf16" : "fp32", early ? "early" : "waiting");
					rc = fn(early, ns, H, K, W, round16, 1e-5f, q, k, v, f, b, gate, cq, ck, cv, A_log, dt, onorm, S,
							tails, out_o, out_n, S_o, S_n, t_o, t_n);
					if (rc == -1)
					{
						char		why[300];

						snprintf(why, sizeof(why), "KDA decode in one kernel: this GPU has no clusters (%s)", what);
						tap_skip(why);
					}
					else
						tap_ok(rc == 0 && memcmp(out_o, out_n, sizeof(float) * nx) == 0 &&
							   memcmp(S_o, S_n, sizeof(float) * nS) == 0 &&
							   memcmp(t_o, t_n, sizeof(float) * nT) == 0,
							   "KDA decode in one kernel = the three kernels bit for bit, %s (output rel err %.2e, state "
							   "%.2e, conv tails %.2e; hook returned %d)", what, rel_err(out_n, out_o, nx),
							   rel_err(S_n, S_o, nS), rel_err(t_n, t_o, nT), rc);
					free(q);
					free(k);
					free(v);
					free(f);
					free(b);
					free(gate);
					free(cq);
					free(ck);
					free(cv);
					free(A_log);
					free(dt);
					free(onorm);
					free(S);
					free(tails);
					free(out_o);
					free(out_n);
					free(S_o);
					free(S_n);
					free(t_o);
					free(t_n);
				}
	dlclose(lib);
	kl_model_free(m);
}

/* kl_cuda_test_kda_elem (cuda_kda.c): prep, tails and gated norm of one step */
typedef int (*kda_elem_test_fn) (int warp, int ns, const int *row0, int H, int K, int W, float eps,
								 const float *q, const float *k, const float *v, const float *f, const float *b,
								 const float *gate, const float *o, const float *conv_q, const float *conv_k,
								 const float *conv_v, const float *A_log, const float *dt_bias,
								 const float *o_norm, const float *tails, float *qo, float *ko, float *vo,
								 float *g, float *beta, float *out, float *tails_out);

/*
 * The KDA prep (conv + silu, L2 norms, decay, beta) and gated norm in the
 * forms KL_CUDA_KDA_ELEM_WARP selects against the block kernels (mask 0) on
 * the same inputs: mask 2 (the gated norm's warp kernel, the block prep)
 * and mask 6 (the default: 2 + 4, prefill's prep as a warp walking 16 rows,
 * kda_prep_rows_kernel; a decode step runs the block prep), every output
 * bit for bit (the warp kernels add a head's squares in
 * block_sum's order; kda.cu says why that is the same order), at the 48B
 * shape and head sizes 32 and 64 (4 and 2 heads a warp; head counts that
 * leave a warp's last heads empty), conv widths 4 and 3, steps of one long
 * sequence (rows not a multiple of the 8-row blocks nor of the 16-row
 * walks), several short ones (conv taps reaching into the tails at every
 * row), sequences that start inside a walk and at its first row and a walk
 * that starts at a sequence's second row, and a decode step (the prep
 * shifts the tails itself).  check_kda_decode compares the default with
 * the fused decode kernel bit for bit as well.
 */
static void
check_kda_elem_warp(void)
{
	static const struct
	{
		int			H,
					K,
					W;
	}			shapes[] = {{32, 128, 4}, {4, 32, 4}, {3, 64, 3}, {5, 32, 4}};
	static const struct
	{
		int			ns;
		int			len[4];
		const char *what;
	}			steps[] = {
		{1, {1001}, "one sequence of 1001 rows"},
		{4, {1, 2, 37, 5}, "4 sequences of 1, 2, 37, 5 rows"},
		{4, {15, 17, 2, 30}, "4 sequences of 15, 17, 2, 30 rows"},
		{3, {1, 1, 1}, "decode, 3 sequences"},
	};
	/* KL_CUDA_KDA_ELEM_WARP masks: the block kernels first, the others against
	 * them (14: the rows prep with siluf_fast / softplusf_fast, the hook asks
	 * for fast, within TOL_KDA_FAST; decode steps keep the exact block kernel) */
	static const int modes[] = {0, 2, 6, 14};
	enum
	{
		NMODES = sizeof(modes) / sizeof(modes[0])
	};
	kl_model   *m;
	void	   *lib = NULL;
	kda_elem_test_fn fn = NULL;
	uint64_t	rs = 1717;

	m = load_test_hook("kl_cuda_test_kda_elem", &lib, (void **) &fn);
	if (!fn)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		for (size_t ti = 0; ti < sizeof(steps) / sizeof(steps[0]); ti++)
		{
			int			H = shapes[si].H,
						K = shapes[si].K,
						W = shapes[si].W,
						ns = steps[ti].ns,
						row0[5] = {0},
						n,
						rc[NMODES];
			size_t		HK,
						nx,
						nT;
			float	   *in[15],
					   *res[NMODES][7];
			size_t		nres[7];

			for (int i = 0; i < ns; i++)
				row0[i + 1] = row0[i] + steps[ti].len[i];
			n = row0[ns];
			HK = (size_t) H * K;
			nx = (size_t) n * HK;
			nT = (size_t) ns * 3 * HK * W;
			in[0] = rand_floats(nx, -2, 2, &rs);	/* q */
			in[1] = rand_floats(nx, -2, 2, &rs);	/* k */
			in[2] = rand_floats(nx, -2, 2, &rs);	/* v */
			in[3] = rand_floats(nx, -4, 4, &rs);	/* f */
			in[4] = rand_floats((size_t) n * H, -3, 3, &rs);	/* b */
			in[5] = rand_floats(nx, -3, 3, &rs);	/* gate */
			in[6] = rand_floats(nx, -1, 1, &rs);	/* o */
			in[7] = rand_floats(HK * W, -0.6, 0.6, &rs);
			in[8] = rand_floats(HK * W, -0.6, 0.6, &rs);
			in[9] = rand_floats(HK * W, -0.6, 0.6, &rs);
			in[10] = rand_floats((size_t) H, -1, 1.5, &rs);	/* A_log */
			in[11] = rand_floats(HK, -1, 1, &rs);	/* dt_bias */
			in[12] = rand_floats((size_t) K, 0.5, 1.5, &rs);	/* o_norm */
			in[13] = rand_floats(nT, -2, 2, &rs);	/* tails */
			in[14] = NULL;
			for (size_t i = 0; i < nx; i += 97)
				in[3][i] = 25.0f;	/* past softplus's threshold */
			nres[0] = nres[1] = nres[2] = nres[3] = nres[5] = nx;
			nres[4] = (size_t) n * H;
			nres[6] = nT;
			for (int w = 0; w < NMODES; w++)
			{
				for (int i = 0; i < 7; i++)
					res[w][i] = malloc(sizeof(float) * nres[i]);
				rc[w] = fn(modes[w], ns, row0, H, K, W, 1e-5f, in[0], in[1], in[2], in[3], in[4], in[5], in[6],
						   in[7], in[8], in[9], in[10], in[11], in[12], in[13], res[w][0], res[w][1], res[w][2],
						   res[w][3], res[w][4], res[w][5], res[w][6]);
			}
			for (int w = 1; w < NMODES; w++)
			{
				int			same = 1;
				double		worst = 0;

				for (int i = 0; i < 7 && rc[0] == 0 && rc[w] == 0; i++)
				{
					double		e = rel_err(res[w][i], res[0][i], nres[i]);

					same = same && memcmp(res[w][i], res[0][i], sizeof(float) * nres[i]) == 0;
					worst = e > worst ? e : worst;
				}
				if (modes[w] & 8)
					tap_ok(rc[0] == 0 && rc[w] == 0 && worst <= TOL_KDA_FAST,
						   "KDA prep and gated norm, KL_CUDA_KDA_ELEM_WARP=%d (fast silu / softplus) within %.0e of "
						   "the block kernels (0), %d heads x %d, conv %d, %s (worst rel err %.2e; hooks returned "
						   "%d, %d)", modes[w], TOL_KDA_FAST, H, K, W, steps[ti].what, worst, rc[0], rc[w]);
				else
					tap_ok(rc[0] == 0 && rc[w] == 0 && same,
						   "KDA prep and gated norm, KL_CUDA_KDA_ELEM_WARP=%d = the block kernels (0) bit for bit, "
						   "%d heads x %d, conv %d, %s (worst rel err %.2e; hooks returned %d, %d)", modes[w], H, K,
						   W, steps[ti].what, worst, rc[0], rc[w]);
			}
			for (int i = 0; i < 14; i++)
				free(in[i]);
			for (int w = 0; w < NMODES; w++)
				for (int i = 0; i < 7; i++)
					free(res[w][i]);
		}
	dlclose(lib);
	kl_model_free(m);
}

typedef int (*kda_chunked_test_fn) (int n, int H, int K, const float *q, const float *k, const float *v,
									 const float *g, const float *beta, const float *S, float *o_old, float *o_new,
									 float *S_old, float *S_new);

/*
 * Tolerance of the tensor-core chunkwise KDA form (precision bf16) against
 * the fp32 kernels, relative (rel_err) on the outputs and the state out.
 * A CPU emulation of its algorithm (W, U0, Qg, Kt, P and the operands S and
 * U rounded to bf16, fp32 accumulation, fp32 decays) against the fp64
 * per-token recurrence measured 2.3e-3 .. 2.6e-3 on both, at K = 32 / 64 /
 * 128 and T = 17 .. 8192, with and without a state carried in: bf16's 2^-9
 * per operand, not growing with T (the state is fp32 between chunks).
 * 1e-2 leaves a factor of 4.
 */
#define TOL_KDA_MMA 1e-2

/*
 * Random q, k, g, beta [T rows, H heads, K] made into what kk_kda_prep
 * leaves: q, k L2-normalized per head (q times K^-1/2), g = -exp(A_log)
 * softplus(f + dt_bias) <= 0, a few past softplus's threshold; beta =
 * sigmoid(b).
 */
static void
kda_prepared_like(int T, int H, int K, float *q, float *k, float *g, float *beta)
{
	size_t		nx = (size_t) T * H * K;

	for (size_t r = 0; r < (size_t) T * H; r++)
	{
		double		sq = 0,
					sk = 0;

		for (int c = 0; c < K; c++)
		{
			sq += (double) q[r * K + c] * q[r * K + c];
			sk += (double) k[r * K + c] * k[r * K + c];
		}
		for (int c = 0; c < K; c++)
		{
			q[r * K + c] = (float) (q[r * K + c] / sqrt(sq + 1e-6) / sqrt((double) K));
			k[r * K + c] = (float) (k[r * K + c] / sqrt(sk + 1e-6));
		}
		beta[r] = (float) (1.0 / (1.0 + exp(-beta[r])));
	}
	for (size_t i = 0; i < nx; i++)
	{
		double		f = i % 97 == 0 ? 25.0 : g[i];
		double		A = exp(-1.0 + 2.5 * (double) ((i / K) % H) / H);

		g[i] = (float) (-A * (f > 20 ? f : log1p(exp(f))));
	}
}

/*
 * The raw inputs of the chunk-prep checks (kl_cuda_test_kda_chunked_raw):
 * q, k, v, g, beta random, then shaped as the prep leaves them
 * (kda_prepared_like); S random (carry) or zero.
 */
typedef struct
{
	float	   *q,
			   *k,
			   *v,
			   *g,
			   *beta,
			   *S;
} kda_raw_inputs;

static kda_raw_inputs
kda_raw_inputs_new(int T, int H, int K, bool carry, uint64_t *rs)
{
	size_t		nx = (size_t) T * H * K,
				nS = (size_t) H * K * K;
	kda_raw_inputs in;

	in.q = rand_floats(nx, -1, 1, rs);
	in.k = rand_floats(nx, -1, 1, rs);
	in.v = rand_floats(nx, -0.3, 2, rs);	/* silu's range, roughly */
	in.g = rand_floats(nx, -4, 4, rs);
	in.beta = rand_floats((size_t) T * H, -3, 3, rs);
	in.S = carry ? rand_floats(nS, -0.5, 0.5, rs) : calloc(nS, sizeof(float));
	kda_prepared_like(T, H, K, in.q, in.k, in.g, in.beta);
	return in;
}

static void
kda_raw_inputs_free(kda_raw_inputs *in)
{
	free(in->q);
	free(in->k);
	free(in->v);
	free(in->g);
	free(in->beta);
	free(in->S);
}

typedef int (*kda_prep16_test_fn) (int ns, const int *row0, int H, int K, int W, int in16, int out16,
								   const float *q, const float *k, const float *v, const float *f, const float *b,
								   const float *conv_q, const float *conv_k, const float *conv_v,
								   const float *A_log, const float *dt_bias, const float *tails, float *qo_ref,
								   float *ko_ref, float *vo_ref, float *g_ref, float *beta_ref, float *tails_ref,
								   float *qo, float *ko, float *vo, float *g, float *beta, float *tails_out);

/*
 * kk_kda_prep_rows16 (KL_CUDA_KDA_IN16 / _OUT16: the rows prep reading bf16
 * raw q, k, v, f and / or writing bf16 prepared q, k, v) against kk_kda_prep
 * + kk_kda_tails in fp32 on the same values (inputs that are bf16 values,
 * so the widening is exact), through the hook kl_cuda_test_kda_prep16: the
 * decay g, beta and the new conv tails bit for bit; q, k, v bit for bit
 * (fp32 out) or the fp32 outputs rounded to bf16 bit for bit (bf16 out):
 * the kernel's element math does not depend on the types (its PTX's
 * floating-point instructions are the same, in the same order, for all four
 * type pairs).  Shapes: 48B (32 x 128, conv 4), golden (4 x 32), 3 x 64 conv 3;
 * one long sequence and steps mixing short and long ones (tails read at
 * sequence starts and at warp starts).
 */
static void
check_kda_prep16(void)
{
	static const struct
	{
		int			H,
					K,
					W;
	}			shapes[] = {{32, 128, 4}, {4, 32, 4}, {3, 64, 3}};
	static const struct
	{
		int			ns;
		int			len[4];
		const char *what;
	}			steps[] = {
		{1, {1001}, "one sequence of 1001 rows"},
		{4, {1, 2, 37, 5}, "4 sequences of 1, 2, 37, 5 rows"},
		{4, {15, 17, 2, 30}, "4 sequences of 15, 17, 2, 30 rows"},
	};
	kl_model   *m;
	void	   *lib = NULL;
	kda_prep16_test_fn fn = NULL;
	uint64_t	rs = 4242;

	m = load_test_hook("kl_cuda_test_kda_prep16", &lib, (void **) &fn);
	if (!fn)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		for (size_t ti = 0; ti < sizeof(steps) / sizeof(steps[0]); ti++)
			for (int mode = 1; mode < 4; mode++)
			{
				int			H = shapes[si].H,
							K = shapes[si].K,
							W = shapes[si].W,
							ns = steps[ti].ns,
							in16 = mode & 1,
							out16 = (mode >> 1) & 1,
							row0[5] = {0},
							n,
							rc;
				size_t		HK,
							nx,
							nT,
							nres[6];
				float	   *in[12],
						   *ref[6],
						   *got[6];
				bool		same[6];

				for (int i = 0; i < ns; i++)
					row0[i + 1] = row0[i] + steps[ti].len[i];
				n = row0[ns];
				HK = (size_t) H * K;
				nx = (size_t) n * HK;
				nT = (size_t) ns * 3 * HK * W;
				in[0] = rand_floats(nx, -2, 2, &rs);	/* q */
				in[1] = rand_floats(nx, -2, 2, &rs);	/* k */
				in[2] = rand_floats(nx, -2, 2, &rs);	/* v */
				in[3] = rand_floats(nx, -4, 4, &rs);	/* f */
				in[4] = rand_floats((size_t) n * H, -3, 3, &rs);	/* b */
				in[5] = rand_floats(HK * W, -0.6, 0.6, &rs);
				in[6] = rand_floats(HK * W, -0.6, 0.6, &rs);
				in[7] = rand_floats(HK * W, -0.6, 0.6, &rs);
				in[8] = rand_floats((size_t) H, -1, 1.5, &rs);	/* A_log */
				in[9] = rand_floats(HK, -1, 1, &rs);	/* dt_bias */
				in[10] = rand_floats(nT, -2, 2, &rs);	/* tails */
				in[11] = NULL;
				for (size_t i = 0; i < nx; i += 97)
					in[3][i] = 25.0f;	/* past softplus's threshold */
				/* bf16 values, so that both sides read the same numbers */
				for (int a = 0; a < 4; a++)
					for (size_t i = 0; i < nx; i++)
						in[a][i] = kl_bf16_to_f32(kl_f32_to_bf16(in[a][i]));
				nres[0] = nres[1] = nres[2] = nres[3] = nx;
				nres[4] = (size_t) n * H;
				nres[5] = nT;
				for (int i = 0; i < 6; i++)
				{
					ref[i] = malloc(sizeof(float) * nres[i]);
					got[i] = malloc(sizeof(float) * nres[i]);
				}
				rc = fn(ns, row0, H, K, W, in16, out16, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7],
						in[8], in[9], in[10], ref[0], ref[1], ref[2], ref[3], ref[4], ref[5], got[0], got[1],
						got[2], got[3], got[4], got[5]);
				for (int i = 0; i < 6; i++)
				{
					if (rc == 0 && out16 && i < 3)
						for (size_t j = 0; j < nres[i]; j++)
							ref[i][j] = kl_bf16_to_f32(kl_f32_to_bf16(ref[i][j]));
					same[i] = rc == 0 && memcmp(ref[i], got[i], sizeof(float) * nres[i]) == 0;
				}
				tap_ok(same[0] && same[1] && same[2] && same[3] && same[4] && same[5],
					   "KDA rows prep with %s in and %s q, k, v out (kk_kda_prep_rows16) = kk_kda_prep + "
					   "kk_kda_tails in fp32%s bit for bit, %d heads x %d, conv %d, %s (q %d k %d v %d g %d "
					   "beta %d tails %d; hook returned %d)", in16 ? "bf16" : "fp32", out16 ? "bf16" : "fp32",
					   out16 ? " (q, k, v rounded to bf16)" : "", H, K, W, steps[ti].what, same[0], same[1],
					   same[2], same[3], same[4], same[5], rc);
				for (int i = 0; i < 6; i++)
				{
					free(ref[i]);
					free(got[i]);
				}
				for (int i = 0; i < 11; i++)
					free(in[i]);
			}
	dlclose(lib);
	kl_model_free(m);
}

typedef int (*kda_prep_form_test_fn) (int form, int fast, int ns, const int *row0, int H, int K, int W,
									   const float *q, const float *k, const float *v, const float *f,
									   const float *b, const float *conv_q, const float *conv_k,
									   const float *conv_v, const float *A_log, const float *dt_bias,
									   const float *tails, float *qo, float *ko, float *vo, float *g,
									   float *beta);

/* forms of KL_CUDA_KDA_PREP_FORM (kda.cu's KDA_PF_* table), and which of
 * their outputs are not form 0's bits */
#define KDA_PREP_FORMS 7
#define KDA_PF_QK 1				/* q and k by rsqrt.approx (forms 4, 6) */
#define KDA_PF_G 2				/* g by the series softplus (forms 5, 6) */
static const int kda_prep_form_approx[KDA_PREP_FORMS] = {0, 0, 0, 0, KDA_PF_QK, KDA_PF_G, KDA_PF_QK | KDA_PF_G};
/*
 * Those forms' q and k, or g, against form 0's, rel_err: CPU emulations put
 * every element within 5.0e-7 relative of form 0's (q, k: rsqrt.approx's
 * error at its 2-ulp bound, kda.cu's kda_l2_factor) and 2.6e-7 (g: the
 * series softplus against softplusf_fast, kda_softplus_series); 1e-6
 * leaves a factor 2.
 */
#define TOL_KDA_PF 1e-6

/*
 * The rows prep's forms (KL_CUDA_KDA_PREP_FORM 1 .. 4: kda.cu's
 * kda_prep_ring_kernel, rows in flight, ex2.approx.ftz in silu, rsqrt
 * norms) against form 0 (the kernel as it was), precision bf16's FAST math,
 * bf16 raw inputs and fp32 outputs, through the hook
 * kl_cuda_test_kda_prep_form: q, k, v, g and beta bit for bit (forms 1-3
 * do the same operations on every element; kda.cu argues the one that is
 * not literally the same instruction); forms 4-6 (the L2 norms' factors by
 * rsqrt.approx, softplus by a series, both): the outputs they change
 * within TOL_KDA_PF of form 0 and TOL_KDA_FAST of the exact functions, the
 * others bit for bit.  Also form 0 itself against the exact functions (fast = 0) within TOL_KDA_FAST, so the
 * FAST bound stays checked on this path.  Shapes: 48B (32 x 128), golden
 * (4 x 32), 3 x 64 and 5 x 32 (a warp's last heads past H), conv 4; one
 * long sequence (a last walk of 41 rows: ring slots past the end), steps
 * mixing short and long sequences (tails read at sequence starts and at
 * warp starts), single-row sequences, and f past softplus's threshold
 * and far below it (exp(f) subnormal).
 */
static void
check_kda_prep_form(void)
{
	static const struct
	{
		int			H,
					K;
	}			shapes[] = {{32, 128}, {4, 32}, {3, 64}, {5, 32}};
	static const struct
	{
		int			ns;
		int			len[4];
		const char *what;
	}			steps[] = {
		{1, {1001}, "one sequence of 1001 rows"},
		{4, {1, 2, 37, 5}, "4 sequences of 1, 2, 37, 5 rows"},
		{4, {15, 17, 2, 30}, "4 sequences of 15, 17, 2, 30 rows"},
		{3, {1, 1, 1}, "3 sequences of 1 row"},
	};
	const int	W = 4;
	kl_model   *m;
	void	   *lib = NULL;
	kda_prep_form_test_fn fn = NULL;
	uint64_t	rs = 5151;

	m = load_test_hook("kl_cuda_test_kda_prep_form", &lib, (void **) &fn);
	if (!fn)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		for (size_t ti = 0; ti < sizeof(steps) / sizeof(steps[0]); ti++)
		{
			int			H = shapes[si].H,
						K = shapes[si].K,
						ns = steps[ti].ns,
						row0[5] = {0},
						n,
						rc0,
						rcx;
			size_t		HK,
						nx,
						nres[5];
			float	   *in[11],
					   *ref[5],
					   *got[5],
					   *exact[5];
			double		worst = 0;

			for (int i = 0; i < ns; i++)
				row0[i + 1] = row0[i] + steps[ti].len[i];
			n = row0[ns];
			HK = (size_t) H * K;
			nx = (size_t) n * HK;
			in[0] = rand_floats(nx, -2, 2, &rs);	/* q */
			in[1] = rand_floats(nx, -2, 2, &rs);	/* k */
			in[2] = rand_floats(nx, -2, 2, &rs);	/* v */
			in[3] = rand_floats(nx, -4, 4, &rs);	/* f */
			in[4] = rand_floats((size_t) n * H, -3, 3, &rs);	/* b */
			in[5] = rand_floats(HK * W, -0.6, 0.6, &rs);
			in[6] = rand_floats(HK * W, -0.6, 0.6, &rs);
			in[7] = rand_floats(HK * W, -0.6, 0.6, &rs);
			in[8] = rand_floats((size_t) H, -1, 1.5, &rs);	/* A_log */
			in[9] = rand_floats(HK, -1, 1, &rs);	/* dt_bias */
			in[10] = rand_floats((size_t) ns * 3 * HK * W, -2, 2, &rs);	/* tails */
			for (size_t i = 0; i < nx; i += 97)
				in[3][i] = 25.0f;	/* past softplus's threshold */
			for (size_t i = 50; i < nx; i += 101)
				in[3][i] = -100.0f;	/* exp(f + dt_bias) subnormal or 0 */
			for (int a = 0; a < 4; a++)
				for (size_t i = 0; i < nx; i++)
					in[a][i] = kl_bf16_to_f32(kl_f32_to_bf16(in[a][i]));
			nres[0] = nres[1] = nres[2] = nres[3] = nx;
			nres[4] = (size_t) n * H;
			for (int i = 0; i < 5; i++)
			{
				ref[i] = malloc(sizeof(float) * nres[i]);
				got[i] = malloc(sizeof(float) * nres[i]);
				exact[i] = malloc(sizeof(float) * nres[i]);
			}
#define KDA_PREP_FORM_CALL(form, fast, out) \
	fn(form, fast, ns, row0, H, K, W, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8], in[9], \
	   in[10], out[0], out[1], out[2], out[3], out[4])
			rc0 = KDA_PREP_FORM_CALL(0, 1, ref);
			rcx = KDA_PREP_FORM_CALL(0, 0, exact);
			for (int i = 0; i < 5 && rc0 == 0 && rcx == 0; i++)
			{
				double		e = rel_err(ref[i], exact[i], nres[i]);

				worst = e > worst ? e : worst;
			}
			tap_ok(rc0 == 0 && rcx == 0 && worst <= TOL_KDA_FAST,
				   "KDA rows prep, bf16 in, KL_CUDA_KDA_PREP_FORM=0 fast within %.0e of the exact functions, %d heads "
				   "x %d, %s (worst rel err %.2e; hooks returned %d, %d)", TOL_KDA_FAST, H, K, steps[ti].what, worst,
				   rc0, rcx);
			for (int form = 1; form < KDA_PREP_FORMS; form++)
			{
				int			rc = KDA_PREP_FORM_CALL(form, 1, got);
				int			approx = kda_prep_form_approx[form];
				bool		same = rc == 0 && rc0 == 0;
				double		e0 = 0,
							ex = 0;

				for (int i = 0; i < 5; i++)
				{
					/* q, k (0, 1) by rsqrt.approx; g (3) by the series softplus */
					bool		near = (i < 2 && (approx & KDA_PF_QK)) || (i == 3 && (approx & KDA_PF_G));

					if (!near)
						same = same && memcmp(ref[i], got[i], sizeof(float) * nres[i]) == 0;
					else if (rc == 0 && rc0 == 0 && rcx == 0)
					{
						double		a = rel_err(got[i], ref[i], nres[i]),
									b = rel_err(got[i], exact[i], nres[i]);

						e0 = a > e0 ? a : e0;
						ex = b > ex ? b : ex;
					}
				}
				if (!approx)
					tap_ok(same, "KDA rows prep, bf16 in, KL_CUDA_KDA_PREP_FORM=%d = form 0 bit for bit (q, k, v, "
						   "g, beta), %d heads x %d, %s (hooks returned %d, %d)", form, H, K, steps[ti].what, rc0, rc);
				else
					tap_ok(same && rcx == 0 && e0 <= TOL_KDA_PF && ex <= TOL_KDA_FAST,
						   "KDA rows prep, bf16 in, KL_CUDA_KDA_PREP_FORM=%d: %s within %.0e of form 0 and %.0e of "
						   "the exact functions, the rest = form 0 bit for bit, %d heads x %d, %s (rel err %.2e "
						   "against form 0, %.2e against exact; hooks returned %d, %d, %d)", form,
						   approx == KDA_PF_QK ? "q and k" : approx == KDA_PF_G ? "g" : "q, k and g", TOL_KDA_PF,
						   TOL_KDA_FAST, H, K, steps[ti].what, e0, ex, rc0, rcx, rc);
			}
#undef KDA_PREP_FORM_CALL
			for (int i = 0; i < 5; i++)
			{
				free(ref[i]);
				free(got[i]);
				free(exact[i]);
			}
			for (int i = 0; i < 11; i++)
				free(in[i]);
		}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * The chunkwise KDA form on tensor cores (kk_kda_chunked_mma, what prefill
 * runs in precision bf16) against the fp32 kernels (kk_kda_chunked) on the
 * same prepared inputs: outputs and the state after, at the 48B shape (32
 * heads x 128) for lengths that end mid-chunk, one chunk, several and 8192,
 * with a zero state and one carried in, and at the golden models' head size
 * 32 and at 64; each with the parallel half on tensor cores in blocks of 256
 * threads (kda_chunk_prep_mma_kernel, KL_CUDA_KDA_PREP_MMA=2; K = 32 and
 * 64 run the 128-thread form), of 256 in 63.5 KB (kda_chunk_prep_mma3_kernel,
 * =3, the default; K = 32 and 64 the 128-thread form), as two kernels
 * (kp6_sub_kernel + kp6_solve_kernel, =6; K = 32 and 64 as 1), of
 * 128 (=1) and as the fp32 prep kernel (=0); the hook
 * kl_cuda_test_kda_prep_mma switches it.  The sequential part runs as the
 * wide kernel (KL_CUDA_KDA_MMA=2, the default) with each prep, and with the
 * default prep also as the 4-warp kernel (=1), the wide one with 64 columns
 * a block (=3) and with 8 warps (=4), the 4-warp kernel's numbers bit for
 * bit; the hook kl_cuda_test_kda_mma_form switches it.
 */
static void
check_kda_chunked_mma(void)
{
	static const struct
	{
		int			H,
					K,
					T,
					carry;
	}			cases[] = {
		{32, 128, 17, 0}, {32, 128, 64, 0}, {32, 128, 100, 1}, {32, 128, 1000, 0}, {32, 128, 1000, 1},
		{32, 128, 8192, 1}, {4, 32, 90, 1}, {8, 64, 300, 1},
	};
	kl_model   *m;
	void	   *lib = NULL;
	kda_chunked_test_fn fn = NULL;
	void		(*prep_mma) (int) = NULL;
	void		(*mma_form) (int) = NULL;
	uint64_t	rs = 1313;

	m = load_test_hook("kl_cuda_test_kda_chunked", &lib, (void **) &fn);
	if (!fn)
		return;
	*(void **) &prep_mma = dlsym(lib, "kl_cuda_test_kda_prep_mma");
	tap_ok(prep_mma != NULL, "the CUDA library exports kl_cuda_test_kda_prep_mma");
	*(void **) &mma_form = dlsym(lib, "kl_cuda_test_kda_mma_form");
	tap_ok(mma_form != NULL, "the CUDA library exports kl_cuda_test_kda_mma_form");
	for (size_t ci7 = 0; ci7 < 8 * sizeof(cases) / sizeof(cases[0]); ci7++)
	{
		size_t		ci = ci7 / 8;
		/* per case: prep on tensor cores (63.5 KB, 256, 128 threads), fp32,
		 * each with the wide sequential kernel; then the default prep with
		 * the 4-warp kernel, the wide one of 64 columns and of 8 warps; then
		 * the two-kernel prep (6) with the wide one */
		static const int pms[8] = {3, 2, 1, 0, 3, 3, 3, 6},
					forms[8] = {2, 2, 2, 2, 1, 3, 4, 2};
		int			pm = pms[ci7 % 8],
					form = forms[ci7 % 8];
		int			H = cases[ci].H,
					K = cases[ci].K,
					T = cases[ci].T,
					rc;
		size_t		nx = (size_t) T * H * K,
					nS = (size_t) H * K * K;
		kda_raw_inputs in = kda_raw_inputs_new(T, H, K, cases[ci].carry, &rs);
		float	   *o_o = malloc(sizeof(float) * nx),
				   *o_n = malloc(sizeof(float) * nx),
				   *S_o = malloc(sizeof(float) * nS),
				   *S_n = malloc(sizeof(float) * nS);

		if (prep_mma)
			prep_mma(pm);
		if (mma_form)
			mma_form(form);
		rc = fn(T, H, K, in.q, in.k, in.v, in.g, in.beta, in.S, o_o, o_n, S_o, S_n);
		{
			double		eo = rc == 0 ? rel_err(o_n, o_o, nx) : INFINITY,
						es = rc == 0 ? rel_err(S_n, S_o, nS) : INFINITY;

			tap_ok(rc == 0 && eo <= TOL_KDA_MMA && es <= TOL_KDA_MMA,
				   "KDA chunkwise form on tensor cores (bf16, prep %s, sequential part %s) vs the fp32 kernels, "
				   "%d heads x %d, %d rows, state %s: outputs rel err %.2e, state after %.2e (hook returned %d)",
				   pm == 3 ? "on tensor cores, 256 threads in 63.5 KB" : pm == 6 ? "on tensor cores, two kernels" :
				   pm == 2 ? "on tensor cores, 256 threads" :
				   pm == 1 ? "on tensor cores, 128 threads" : "fp32",
				   form == 1 ? "4 warps" : form == 3 ? "wide, 64 columns" : form == 4 ? "wide, 8 warps" :
				   "wide, 32 columns", H, K, T,
				   cases[ci].carry ? "carried in" : "zero", eo, es, rc);
		}
		/* the wide kernels sum the same products in the same order as the
		 * 4-warp one: the same numbers bit for bit */
		if (form == 1 && rc == 0 && mma_form)
		{
			float	   *o_w = malloc(sizeof(float) * nx),
					   *S_w = malloc(sizeof(float) * nS);
			int			rc2;

			mma_form(2);
			rc2 = fn(T, H, K, in.q, in.k, in.v, in.g, in.beta, in.S, o_o, o_w, S_o, S_w);
			tap_ok(rc2 == 0 && memcmp(o_w, o_n, sizeof(float) * nx) == 0 &&
				   memcmp(S_w, S_n, sizeof(float) * nS) == 0,
				   "KDA chunkwise form on tensor cores: the wide sequential kernel gives the 4-warp kernel's "
				   "outputs and state bit for bit, %d heads x %d, %d rows (hook returned %d)", H, K, T, rc2);
			free(o_w);
			free(S_w);
		}
		kda_raw_inputs_free(&in);
		free(o_o);
		free(o_n);
		free(S_o);
		free(S_n);
	}
	if (prep_mma)
		prep_mma(6);			/* the defaults again for the checks that follow */
	if (mma_form)
		mma_form(2);
	dlclose(lib);
	kl_model_free(m);
}

typedef int (*kda_chunked_raw_fn) (int n, int H, int K, int in16, const float *q, const float *k, const float *v,
									 const float *g, const float *beta, const float *S, float *o, float *S_out,
									 void *scr);

/* x rounded to the nearest bf16 value (even on ties), as a float */
static float
round_bf16(float x)
{
	uint32_t	u;

	memcpy(&u, &x, sizeof(u));
	u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
	memcpy(&x, &u, sizeof(x));
	return x;
}

/* q, k and v of the chunk-prep checks' inputs rounded to bf16 values in place:
 * what kl_cuda_test_kda_chunked_raw hands the bf16-input forms */
static void
kda_raw_to_bf16(const kda_raw_inputs *in, size_t nx)
{
	for (size_t i = 0; i < nx; i++)
	{
		in->q[i] = round_bf16(in->q[i]);
		in->k[i] = round_bf16(in->k[i]);
		in->v[i] = round_bf16(in->v[i]);
	}
}

/*
 * The two-kernel chunk prep (KL_CUDA_KDA_PREP_MMA=6: kp6_sub_kernel per
 * 16-row sub-chunk, kp6_solve_kernel per chunk) sums every value in the
 * 63.5 KB kernel's order (=3), so its outputs must be =3's bit for bit:
 * the prep's arrays (W16, U16, Q16, Kt16, P16, gl, the scratch that the
 * hook kl_cuda_test_kda_chunked_raw copies back), the outputs and the state
 * after, at 32 heads x 128 for lengths that end mid-chunk, a few chunks and
 * 8192, and at 4 heads.  Its bf16-input form (kk_kda_chunked_mma16, for q,
 * k, v written in bf16 by the rows prep) must give, on q, k, v rounded to
 * bf16, what =6 and =3 give on the same values in fp32, bit for bit.  Both
 * input forms run in the three KL_CUDA_KDA_KP6_WIDE forms: 2 (default: q, k
 * staged 16 bytes a thread, the solve's padded arrays and 16-byte W / U0
 * stores, Kb^T handed from the sub-chunk kernel to the solve), 1 (without
 * the hand-off) and 0 (the forms before), each against =3.
 */
static void
check_kda_prep_split(void)
{
	static const struct
	{
		int			H,
					T,
					carry;
	}			cases[] = {
		{32, 17, 0}, {32, 100, 1}, {32, 1000, 1}, {32, 8192, 1}, {4, 300, 1},
	};
	const int	K = 128;
	kl_model   *m;
	void	   *lib = NULL;
	kda_chunked_raw_fn fn = NULL;
	void		(*prep_mma) (int) = NULL;
	void		(*kp6_wide) (int) = NULL;
	int			(*intra) (int) = NULL;
	int			intra_was = 0;
	size_t		(*scr_bytes) (int, int, int) = NULL;
	uint64_t	rs = 1717;

	m = load_test_hook("kl_cuda_test_kda_chunked_raw", &lib, (void **) &fn);
	if (!fn)
		return;
	*(void **) &prep_mma = dlsym(lib, "kl_cuda_test_kda_prep_mma");
	*(void **) &kp6_wide = dlsym(lib, "kl_cuda_test_kda_kp6_wide");
	*(void **) &scr_bytes = dlsym(lib, "kl_cuda_test_kda_chunk_mma_scratch");
	*(void **) &intra = dlsym(lib, "kl_cuda_test_kda_kp6_intra");
	if (intra)					/* bit for bit holds for the CUDA-core pairs only (the environment's back after) */
		intra_was = intra(0);
	tap_ok(prep_mma != NULL && kp6_wide != NULL && scr_bytes != NULL,
		   "the CUDA library exports kl_cuda_test_kda_prep_mma, kl_cuda_test_kda_kp6_wide and "
		   "kl_cuda_test_kda_chunk_mma_scratch");
	for (size_t ci = 0; prep_mma && kp6_wide && scr_bytes && ci < sizeof(cases) / sizeof(cases[0]); ci++)
	{
		int			H = cases[ci].H,
					T = cases[ci].T;
		size_t		nx = (size_t) T * H * K,
					nS = (size_t) H * K * K,
					nscr = scr_bytes(T, H, K);
		kda_raw_inputs in = kda_raw_inputs_new(T, H, K, cases[ci].carry, &rs);
		/* on fp32 inputs [0] =3, [1] =6, [2] =6's wide forms without the
		 * Kb^T hand-off, [3] =6 before its wide forms; then on bf16 values
		 * [4] =3, [5] =6, [6] the bf16-input form, [7] and [8] that form
		 * with KL_CUDA_KDA_KP6_WIDE 1 and 0 */
		enum
		{
			NR = 9, BF = 4
		};
		float	   *o[NR],
				   *Sa[NR];
		char	   *scr[NR];
		int			rc[NR];
		static const int pm[NR] = {3, 6, 6, 6, 3, 6, 6, 6, 6},
					in16[NR] = {0, 0, 0, 0, 0, 0, 1, 1, 1},
					wide[NR] = {2, 2, 1, 0, 2, 2, 2, 1, 0};

		for (int r = 0; r < NR; r++)
		{
			o[r] = malloc(sizeof(float) * nx);
			Sa[r] = malloc(sizeof(float) * nS);
			scr[r] = malloc(nscr);
			if (r == BF)
				kda_raw_to_bf16(&in, nx);
			prep_mma(pm[r]);
			kp6_wide(wide[r]);
			rc[r] = fn(T, H, K, in16[r], in.q, in.k, in.v, in.g, in.beta, in.S, o[r], Sa[r], scr[r]);
		}
		kp6_wide(2);
		for (int r = 1; r < NR; r++)
		{
			int			ref = r < BF ? 0 : BF;
			bool		same;

			if (r == BF)
				continue;
			same = rc[ref] == 0 && rc[r] == 0 && memcmp(scr[r], scr[ref], nscr) == 0 &&
				memcmp(o[r], o[ref], sizeof(float) * nx) == 0 && memcmp(Sa[r], Sa[ref], sizeof(float) * nS) == 0;
			tap_ok(same, "KDA chunk prep in two kernels (=6%s, KL_CUDA_KDA_KP6_WIDE=%d) gives the 63.5 KB kernel's "
				   "(=3) prep arrays, outputs and state bit for bit%s, %d heads x %d, %d rows, state %s (hooks "
				   "returned %d, %d)", in16[r] ? ", q, k, v read as bf16" : "", wide[r],
				   r < BF ? "" : " on bf16-valued q, k, v", H, K, T, cases[ci].carry ? "carried in" : "zero",
				   rc[ref], rc[r]);
		}
		for (int r = 0; r < NR; r++)
		{
			free(o[r]);
			free(Sa[r]);
			free(scr[r]);
		}
		kda_raw_inputs_free(&in);
	}
	if (prep_mma)
		prep_mma(6);			/* the default again */
	if (intra)
		intra(intra_was);
	dlclose(lib);
	kl_model_free(m);
}

/*
 * KL_CUDA_KDA_KP6_INTRA=1 (kp6_sub_kernel's cross-half pairs on tensor
 * cores) against =0 on the same inputs, through kl_cuda_test_kda_chunked_raw:
 * Q16, Kt16, gl and P16 outside the cross blocks (rows 8 .. 15 x columns
 * 0 .. 7 of each 16-row sub-chunk's diagonal block) bit for bit; P16's cross
 * entries, W16 and U16 against an fp64 reference (from the same fp32 inputs;
 * G the exact sums of g from the chunk start).  The cross entry P_ij =
 * sum_c t_c, t_c = q_ic k_jc exp(G_ic - G_jc), becomes sum_c fp16(q_ic
 * e_ic) fp16(k_jc f_jc) with e, f <= 1: each operand rounded to 2^-11
 * relative (or 2^-25 absolute below fp16's normal range), so a term is off
 * by <= (2 2^-11 + 2^-22) |t_c| + 2 2^-25 (|q|, |k| <= 1); the fp32 sum of
 * 128 exact products adds <= 128 2^-24 sum |t_c| < 2^-16 sum |t_c|; G_i - G_r
 * and G_r - G_j come from the fp32 fold (<= 15 adds between the rows, each
 * rounded to 2^-24 |G|) and ex2's argument: <= 2^-20 |G_ic| relative a term;
 * then bf16 (2^-8 relative).  So |P - P_ref| <= 2^-8 |P_ref| + (1 + 2^-8)
 * (sum_c |t_c| (2^-10 + 2^-15 + 2^-20 |G_ic|) + 2^-17), checked per entry
 * (a CPU emulation of this arithmetic on 2.5M entries, gates down to -50 a
 * row, stays within 0.43 of the bound before bf16).  W16 and U16 are
 * (I + A)^-1 [Kb | Vb] with 64 of each sub-chunk's 136 A entries so
 * perturbed (~1e-5 rms), far below the bf16 rounding of Li, Kb^T and the
 * outputs that makes form 0's own error: form 1's max and rms errors
 * against fp64 may be at most 1.5 times form 0's.  o and the state after
 * (which read P, W, U) must stay within TOL_KDA_MMA of form 0's.  Gates:
 * kda_prepared_like's, with channels at g = -50 a row (c % 16 == 3), at
 * g = 0 (c % 16 == 7), and rows at -50 in every fourth channel, so that
 * factors underflow and others stay 1: no NaN or overflow.  Both input
 * types; lengths within one chunk, one full chunk, a partial last chunk.
 */
typedef struct
{
	double		max_err,
				max_ref,
				sq_err,
				sq_ref;
} kp6i_err;

static void
kp6i_err_add(kp6i_err *e, double x, double ref)
{
	double		d = fabs(x - ref);

	if (d > e->max_err || isnan(x))
		e->max_err = isnan(x) ? INFINITY : d;
	if (fabs(ref) > e->max_ref)
		e->max_ref = fabs(ref);
	e->sq_err += d * d;
	e->sq_ref += ref * ref;
}

/* the gates of check_kda_kp6_intra's comment, after kda_prepared_like's */
static void
kp6i_extreme_gates(int T, int H, int K, float *g)
{
	for (int t = 0; t < T; t++)
		for (int h = 0; h < H; h++)
			for (int c = 0; c < K; c++)
			{
				float	   *x = g + ((size_t) t * H + h) * K + c;

				if (c % 16 == 3 || (t % 37 == 5 && c % 4 == 1))
					*x = -50.0f;
				else if (c % 16 == 7)
					*x = 0.0f;
			}
}

/* tile (chunk ch, head h), rows 0 .. cn - 1: G (fp64 fold of g) [64][K] */
static void
kp6i_fold(int ch, int h, int cn, int H, int K, const float *g, double *G)
{
	for (int c = 0; c < K; c++)
	{
		double		s = 0;

		for (int i = 0; i < 64; i++)
		{
			if (i < cn)
				s += g[((size_t) (64 * ch + i) * H + h) * K + c];
			G[i * K + c] = s;
		}
	}
}

/* whether P16's entry (i, j) of a tile is in a cross block */
static bool
kp6i_cross(int i, int j)
{
	return i / 16 == j / 16 && i % 16 >= 8 && j % 16 < 8;
}

/*
 * One tile's reference: P's cross entries checked against the bound of
 * check_kda_kp6_intra's comment (*bad counts misses; ep[f] errors of P16
 * form f), W and U = (I + A)^-1 [Kb | Vb] in fp64 into ew, eu for both forms
 * (x[f]: form f's scratch).  q, k, v as the kernel read them.
 */
static void
kp6i_tile(int ch, int h, int T, int H, int K, const float *q, const float *k, const float *v, const float *g,
		  const float *beta, char *const x[2], size_t tiles, kp6i_err ep[2], kp6i_err ew[2], kp6i_err eu[2],
		  int *bad)
{
	enum
	{
		C = 64
	};
	int			cn = T - 64 * ch < C ? T - 64 * ch : C;
	size_t		tile = (size_t) ch * H + h,
				row0 = (size_t) 64 * ch;
	double	   *G = malloc(sizeof(double) * C * K),
			   *A = calloc((size_t) C * C, sizeof(double)),
			   *X = calloc((size_t) C * 2 * K, sizeof(double));

#define KP6I_AT(a, i, c) ((a)[((row0 + (i)) * H + h) * K + (c)])
	kp6i_fold(ch, h, cn, H, K, g, G);
	for (int i = 0; i < cn; i++)
		for (int j = 0; j <= i; j++)
		{
			double		p = 0, a = 0, sp = 0, b = beta[(row0 + i) * H + h];

			for (int c = 0; c < K; c++)
			{
				double		e = exp(G[i * K + c] - G[j * K + c]),
							tp = (double) KP6I_AT(q, i, c) * KP6I_AT(k, j, c) * e;

				p += tp;
				a += (double) KP6I_AT(k, i, c) * KP6I_AT(k, j, c) * e;
				sp += fabs(tp) * (0x1p-10 + 0x1p-15 + 0x1p-20 * fabs(G[i * K + c]));
			}
			if (j < i)
				A[i * C + j] = b * a;
			if (kp6i_cross(i, j))
				for (int f = 0; f < 2; f++)
				{
					const uint16_t *P = (const uint16_t *) (x[f] + sizeof(uint16_t) * 4 * tiles * C * K) +
						tile * C * C;
					double		pv = kl_bf16_to_f32(P[i * C + j]);

					kp6i_err_add(&ep[f], pv, p);
					if (f == 1 && !(fabs(pv - p) <= 0x1p-8 * fabs(p) + (1 + 0x1p-8) * (sp + 0x1p-17)))
						(*bad)++;
				}
		}
	/* (I + A) X = [Kb | Vb], rows past n zero (beta = 0 there) */
	for (int i = 0; i < cn; i++)
	{
		double		b = beta[(row0 + i) * H + h];

		for (int c = 0; c < 2 * K; c++)
		{
			double		s = c < K ? b * KP6I_AT(k, i, c) * exp(G[i * K + c]) : b * KP6I_AT(v, i, c - K);

			for (int m = 0; m < i; m++)
				s -= A[i * C + m] * X[m * 2 * K + c];
			X[i * 2 * K + c] = s;
		}
	}
#undef KP6I_AT
	for (int f = 0; f < 2; f++)
	{
		const uint16_t *W = (const uint16_t *) x[f] + tile * C * K,
				   *U = (const uint16_t *) x[f] + (tiles + tile) * C * K;

		for (int i = 0; i < C; i++)
			for (int c = 0; c < K; c++)
			{
				kp6i_err_add(&ew[f], kl_bf16_to_f32(W[i * K + c]), X[i * 2 * K + c]);
				kp6i_err_add(&eu[f], kl_bf16_to_f32(U[i * K + c]), X[i * 2 * K + K + c]);
			}
	}
	free(G);
	free(A);
	free(X);
}

/* form 1's errors (e[1]) at most 1.5 times form 0's, max and rms */
static bool
kp6i_err_ok(const kp6i_err e[2])
{
	return e[1].max_err <= 1.5 * e[0].max_err && e[1].sq_err <= 1.5 * 1.5 * e[0].sq_err;
}

/* Q16, Kt16, gl and P16 outside the cross blocks of scratches a, b: the same bits */
static bool
kp6i_same_outside(const char *a, const char *b, size_t tiles, int K)
{
	enum
	{
		C = 64
	};
	size_t		p16 = sizeof(uint16_t) * 4 * tiles * C * K,
				nscr = p16 + sizeof(uint16_t) * tiles * C * C + sizeof(float) * tiles * K;
	const uint16_t *pa = (const uint16_t *) (a + p16),
			   *pb = (const uint16_t *) (b + p16);

	if (memcmp(a + p16 / 2, b + p16 / 2, p16 / 2) != 0 ||	/* Q16, Kt16 */
		memcmp(a + nscr - sizeof(float) * tiles * K, b + nscr - sizeof(float) * tiles * K,
			   sizeof(float) * tiles * K) != 0)
		return false;
	for (size_t tl = 0; tl < tiles; tl++)
		for (int i = 0; i < C; i++)
			for (int j = 0; j < C; j++)
				if (!kp6i_cross(i, j) && pa[(tl * C + i) * C + j] != pb[(tl * C + i) * C + j])
					return false;
	return true;
}

static void
check_kda_kp6_intra(void)
{
	static const struct
	{
		int			H,
					T;
	}			cases[] = {
		{32, 17}, {32, 64}, {32, 100}, {8, 1000}, {4, 4096},
	};
	const int	K = 128;
	kl_model   *m;
	void	   *lib = NULL;
	kda_chunked_raw_fn fn = NULL;
	int			(*intra) (int) = NULL;
	void		(*prep_mma) (int) = NULL;
	size_t		(*scr_bytes) (int, int, int) = NULL;
	uint64_t	rs = 1313;
	int			was = 0;

	m = load_test_hook("kl_cuda_test_kda_chunked_raw", &lib, (void **) &fn);
	if (!fn)
		return;
	*(void **) &intra = dlsym(lib, "kl_cuda_test_kda_kp6_intra");
	*(void **) &prep_mma = dlsym(lib, "kl_cuda_test_kda_prep_mma");
	*(void **) &scr_bytes = dlsym(lib, "kl_cuda_test_kda_chunk_mma_scratch");
	tap_ok(intra != NULL && prep_mma != NULL && scr_bytes != NULL,
		   "the CUDA library exports kl_cuda_test_kda_kp6_intra, kl_cuda_test_kda_prep_mma and "
		   "kl_cuda_test_kda_chunk_mma_scratch");
	if (intra)
		was = intra(0);
	for (size_t ci = 0; intra && prep_mma && scr_bytes && ci < sizeof(cases) / sizeof(cases[0]); ci++)
		for (int in16 = 0; in16 < 2; in16++)
		{
			int			H = cases[ci].H,
						T = cases[ci].T,
						nc = (T + 63) / 64,
						bad = 0;
			size_t		nx = (size_t) T * H * K,
						nS = (size_t) H * K * K,
						nscr = scr_bytes(T, H, K),
						tiles = (size_t) nc * H;
			kda_raw_inputs in = kda_raw_inputs_new(T, H, K, true, &rs);
			float	   *o[2],
					   *Sa[2];
			char	   *scr[2];
			int			rc[2];
			kp6i_err	ep[2] = {{0}}, ew[2] = {{0}}, eu[2] = {{0}};
			bool		same;

			kp6i_extreme_gates(T, H, K, in.g);
			if (in16)
				kda_raw_to_bf16(&in, nx);
			prep_mma(6);
			for (int f = 0; f < 2; f++)
			{
				o[f] = malloc(sizeof(float) * nx);
				Sa[f] = malloc(sizeof(float) * nS);
				scr[f] = malloc(nscr);
				intra(f);
				rc[f] = fn(T, H, K, in16, in.q, in.k, in.v, in.g, in.beta, in.S, o[f], Sa[f], scr[f]);
			}
			intra(0);
			same = rc[0] == 0 && rc[1] == 0 && kp6i_same_outside(scr[0], scr[1], tiles, K);
			tap_ok(same, "KL_CUDA_KDA_KP6_INTRA=1 keeps Q16, Kt16, gl and P16 outside the cross-half blocks bit for "
				   "bit%s, %d heads x %d, %d rows (hooks returned %d, %d)", in16 ? " (bf16 inputs)" : "", H, K, T,
				   rc[0], rc[1]);
			if (rc[0] == 0 && rc[1] == 0)
			{
				for (int ch = 0; ch < nc; ch++)
					for (int h = 0; h < H; h++)
						kp6i_tile(ch, h, T, H, K, in.q, in.k, in.v, in.g, in.beta, scr, tiles, ep, ew, eu, &bad);
				tap_ok(bad == 0 && isfinite(ep[1].max_err),
					   "KL_CUDA_KDA_KP6_INTRA=1: P16's cross-half entries within the fp16 operands' bound of fp64%s, "
					   "%d heads, %d rows (%d outside; max err %.3e, form 0 %.3e, max |P| %.3e)",
					   in16 ? " (bf16 inputs)" : "", H, T, bad, ep[1].max_err, ep[0].max_err, ep[0].max_ref);
				tap_ok(kp6i_err_ok(ew) && kp6i_err_ok(eu),
					   "KL_CUDA_KDA_KP6_INTRA=1: W16, U16 at most 1.5x form 0's error against fp64%s, %d heads, "
					   "%d rows (W max %.3e vs %.3e, rms %.3e vs %.3e; U max %.3e vs %.3e, rms %.3e vs %.3e; "
					   "max |W| %.3e, |U| %.3e)", in16 ? " (bf16 inputs)" : "", H, T, ew[1].max_err,
					   ew[0].max_err, sqrt(ew[1].sq_err / ew[1].sq_ref), sqrt(ew[0].sq_err / ew[0].sq_ref),
					   eu[1].max_err, eu[0].max_err, sqrt(eu[1].sq_err / eu[1].sq_ref),
					   sqrt(eu[0].sq_err / eu[0].sq_ref), ew[0].max_ref, eu[0].max_ref);
				tap_ok(rel_err(o[1], o[0], nx) <= TOL_KDA_MMA && rel_err(Sa[1], Sa[0], nS) <= TOL_KDA_MMA,
					   "KL_CUDA_KDA_KP6_INTRA=1: output and state within %.0e of form 0's%s, %d heads, %d rows "
					   "(%.2e, %.2e)", TOL_KDA_MMA, in16 ? " (bf16 inputs)" : "", H, T, rel_err(o[1], o[0], nx),
					   rel_err(Sa[1], Sa[0], nS));
			}
			for (int f = 0; f < 2; f++)
			{
				free(o[f]);
				free(Sa[f]);
				free(scr[f]);
			}
			kda_raw_inputs_free(&in);
		}
	if (intra)
		intra(was);
	dlclose(lib);
	kl_model_free(m);
}

/*
 * model (a golden model's directory name, or NULL: big_config's random
 * model, seed 7: K = 128, the 48B head shape) on the GPU in precision prec,
 * made with env=val (env NULL: the environment as it is)
 */
static kl_model *
kda_test_model(const char *model, const char *prec, const char *env, const char *val)
{
	kl_model   *m;

	if (env)
		setenv(env, val, 1);	/* read when the backend is made */
	if (model)
	{
		char		dir[1024];

		snprintf(dir, sizeof(dir), "%s/golden/%s", tap_fixture_dir(), model);
		m = load(dir, "cuda", prec);
	}
	else
		m = random_gpu_model_in(big_config, prec, NULL, NULL, NULL);
	if (env)
		unsetenv(env);
	return m;
}

/*
 * n token ids below V for kda_test_model's model: the golden prompt (*st
 * open while they are used; NULL, a failed check, when it is shorter), or
 * for the random model a fixed pattern
 */
static const int32_t *
kda_test_ids(const char *model, int n, int V, kl_safetensors *st)
{
	static int32_t pattern[64];
	const kl_st_tensor *t;
	char		path[1200];
	kl_err		err;

	if (!model)
	{
		for (int i = 0; i < n && i < 64; i++)
			pattern[i] = (int32_t) ((i * 7919 + 13) % V);
		return n <= 64 ? pattern : NULL;
	}
	snprintf(path, sizeof(path), "%s/golden/%s/golden.safetensors", tap_fixture_dir(), model);
	if (kl_st_open_file(path, st, &err) != KL_OK)
		die("golden data", &err);
	if (!(t = kl_st_find(st, "input_ids")) || (int) t->numel < n)
	{
		tap_ok(0, "%s: a golden prompt of at least %d tokens", model, n);
		kl_st_close(st);
		return NULL;
	}
	return t->data;
}

/*
 * model (kda_test_model's) in precision prec made as the environment is and
 * with env=val, nseq sequences decoding together (decode_together: every
 * step one token per sequence): the logits of every step bit for bit, so
 * the states and conv tails that feed them are too.  what: the two forms.
 * (KL_CUDA_KDA_FUSED=0: the fused KDA decode kernel against the three
 * kernels; KL_CUDA_KDA_DEC_EARLY=0: its early form against the waiting one.)
 */
static void
check_kda_env_model(const char *model, const char *prec, int nseq, const char *env, const char *val,
					const char *what)
{
	int			rounds = 4;
	kl_safetensors st;
	const int32_t *ids;
	kl_model   *a = kda_test_model(model, prec, NULL, NULL),
			   *b = kda_test_model(model, prec, env, val);
	int			V = kl_model_config(a)->vocab_size;
	size_t		nl = (size_t) rounds * nseq * V;

	if ((ids = kda_test_ids(model, 20 + nseq + rounds, V, &st)) != NULL)
	{
		float	   *la = decode_together(a, ids, nseq, rounds),
				   *lb = decode_together(b, ids, nseq, rounds);

		tap_ok(memcmp(la, lb, sizeof(float) * nl) == 0, "%s %s: %d sequence%s decoding together (%d steps), %s bit "
			   "for bit (logits rel err %.2e)", model ? model : "K=128 random model", prec, nseq,
			   nseq == 1 ? "" : "s", rounds, what, rel_err(la, lb, nl));
		free(la);
		free(lb);
		if (model)
			kl_st_close(&st);
	}
	kl_model_free(a);
	kl_model_free(b);
}

/* the fused KDA decode kernel (the default) against the three kernels
 * (KL_CUDA_KDA_FUSED=0), a golden model */
static void
check_kda_fused_model(const char *model, const char *prec, int nseq)
{
	check_kda_env_model(model, prec, nseq, "KL_CUDA_KDA_FUSED", "0", "fused KDA decode kernel = the three kernels");
}

/* that kernel's early form (the default) against the one that waits before
 * it reads (KL_CUDA_KDA_DEC_EARLY=0), a golden model or the K = 128 one */
static void
check_kda_dec_early_model(const char *model, const char *prec, int nseq)
{
	check_kda_env_model(model, prec, nseq, "KL_CUDA_KDA_DEC_EARLY", "0",
						"KDA decode kernel's early form = the waiting form (KL_CUDA_KDA_DEC_EARLY=0)");
}

/* the block-rows GEMVs requesting every weight piece before the PDL wait (KL_CUDA_ROWS_EARLY, the default)
 * against only the first (=0): the K = 128 random model (bf16 weights, so its products of up to 4 rows take
 * that kernel) */
static void
check_rows_early_model(const char *prec, int nseq)
{
	check_kda_env_model(NULL, prec, nseq, "KL_CUDA_ROWS_EARLY", "0",
						"block-rows GEMVs' early weight requests = the first piece only (KL_CUDA_ROWS_EARLY=0)");
}

static void
check_norm_early_model(const char *prec, int nseq)
{
	check_kda_env_model(NULL, prec, nseq, "KL_CUDA_NORM_EARLY", "0",
						"row norms' waiting form (KL_CUDA_NORM_EARLY=0) = the early reads (=2, the default)");
}

/*
 * The tensor-core MLA decode (bf16 cache) on a trained model over a long
 * context: pgdocs-kimi-18m (6 heads padded to 16, R = 128, Dr = 32) in bf16,
 * 1100 tokens decoded one by one through the tensor-core kernel and through
 * the CUDA-core one (KL_CUDA_MLA_MMA=0): logits within the bf16 bar in every
 * window; greedy agreement reported.
 */
static void
check_mla_mma_trained(void)
{
	char		dir[1024];
	kl_model   *a,
			   *b;
	int			V,
				T = 1100,
				same = 0;
	int32_t    *ids = malloc(sizeof(int32_t) * (size_t) T);
	float	   *la,
			   *lb;
	static const struct
	{
		int			from,
					to;
	}			win[] = {{0, 64}, {64, 1024}, {1024, 1100}};

	snprintf(dir, sizeof(dir), "%s/pgdocs-kimi-18m", tap_models_dir());
	if (access(dir, R_OK) != 0)
		snprintf(dir, sizeof(dir), "models/pgdocs-kimi-18m");
	a = load(dir, "cuda", "bf16");
	setenv("KL_CUDA_MLA_MMA", "0", 1);
	b = load(dir, "cuda", "bf16");
	unsetenv("KL_CUDA_MLA_MMA");
	V = kl_model_config(a)->vocab_size;
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	la = logits_of(a, ids, T, 1, false, NULL);
	lb = logits_of(b, ids, T, 1, false, NULL);
	for (int r = 0; r < T; r++)
		same += argmax(la + (size_t) r * V, V) == argmax(lb + (size_t) r * V, V);
	for (size_t i = 0; i < sizeof(win) / sizeof(win[0]); i++)
	{
		double		e = rel_err(la + (size_t) win[i].from * V, lb + (size_t) win[i].from * V,
								(size_t) (win[i].to - win[i].from) * V);

		tap_ok(e <= TOL_BF16, "pgdocs-kimi-18m bf16: %d tokens decoded one by one, tensor-core vs CUDA-core MLA "
			   "attention at contexts %d..%d (rel err %.2e; greedy ids %d of %d equal over the run)", T,
			   win[i].from + 1, win[i].to, e, same, T);
	}
	free(ids);
	free(la);
	free(lb);
	kl_model_free(a);
	kl_model_free(b);
}

static const char *q48_config;	/* (below) */

/* about normal, mean 0 and standard deviation 1 (three uniforms) */
static float
twin_rand(kl_rng *rng)
{
	float		t = 0;

	for (int i = 0; i < 3; i++)
		t += (float) (kl_rng_next(rng) >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
	return t;
}

/* kl_cuda_test_bf16_twin (cuda_matmul.c): a bf16 twin producer against the older kernels */
typedef int (*bf16_twin_test_fn) (int which, int rows, int cols, int ld, const float *x, const float *w,
								  uint16_t *h16_old, uint16_t *h16_new, float *f_old, float *f_new);

/*
 * KL_CUDA_BF16_TWIN's kernels against the older ones on the same inputs, bit
 * for bit: the four-column conversion (kk_f32_to_bf16_v4) including NaN,
 * infinities, -0, subnormals, exact ties and values that round up to
 * infinity, on aligned shapes and on shapes it hands back to the older
 * kernel; the SwiGLU and the row norm that also write the bf16 rounding of
 * their output (the fp32 output and the bf16 one must both equal the older
 * kernel's and the older conversion of it).  Shapes: the 48B model's hidden
 * rows (2304), its shared expert's (1024), small and padded ones; shapes the
 * twin kernels do not cover (width % 4 != 0) must be refused (-2), so that
 * the backend keeps the older path there.
 */
static void
check_bf16_twin_kernels(void)
{
	static const struct
	{
		int			which,
					rows,
					cols,
					ld;
		bool		covered;
	}			cases[] = {
		{0, 4096, 2304, 2304, true}, {0, 37, 100, 104, true}, {0, 37, 99, 101, true}, {0, 3, 128, 128, true},
		{0, 1000, 6144, 6144, true},
		{1, 150, 128, 128, true}, {1, 4096, 1024, 1024, true}, {1, 7, 100, 104, true}, {1, 9, 99, 99, false},
		{2, 150, 2304, 2304, true}, {2, 33, 256, 260, true}, {2, 4096, 2304, 2304, true}, {2, 5, 98, 98, false},
	};
	static const char *what[] = {"f32_to_bf16 four columns a thread", "SwiGLU with its bf16 twin",
	"row norm with its bf16 twin"};
	kl_model   *m;
	void	   *lib = NULL;
	bf16_twin_test_fn f = NULL;
	kl_rng		rng;

	m = load_test_hook("kl_cuda_test_bf16_twin", &lib, (void **) &f);
	if (!f)
		return;
	kl_rng_seed(&rng, 31);
	for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++)
	{
		int			rows = cases[ci].rows,
					cols = cases[ci].cols,
					ld = cases[ci].ld,
					which = cases[ci].which;
		size_t		nx = (size_t) rows * ld,
					ny = (size_t) rows * cols;
		float	   *x = malloc(sizeof(float) * nx),
				   *w = malloc(sizeof(float) * nx),
				   *fo = malloc(sizeof(float) * ny),
				   *fn = malloc(sizeof(float) * ny);
		uint16_t   *ho = malloc(sizeof(uint16_t) * ny),
				   *hn = malloc(sizeof(uint16_t) * ny);
		int			rc;

		for (size_t i = 0; i < nx; i++)
		{
			x[i] = twin_rand(&rng) * (which == 2 ? 3.0f : 2.0f);
			w[i] = twin_rand(&rng);
		}
		if (which == 0)
		{
			/* special values at the start of rows and inside them */
			static const uint32_t sp[] = {0x7fc00000u, 0xffc00001u, 0x7f800000u, 0xff800000u, 0x80000000u,
				0x00000001u, 0x807fffffu, 0x3f808000u, 0x3f818000u, 0xbf808000u, 0x7f7fffffu, 0x7f7f8000u,
			0x00008000u, 0x3f80ffffu};

			for (size_t i = 0; i < sizeof(sp) / sizeof(sp[0]); i++)
			{
				size_t		r = (i * 7) % rows,
							c = (i * 13) % cols;

				memcpy(&x[r * ld + c], &sp[i], sizeof(float));
				memcpy(&x[(size_t) (rows - 1) * ld + (cols - 1 - i % cols)], &sp[i], sizeof(float));
			}
		}
		rc = f(which, rows, cols, ld, x, w, ho, hn, which ? fo : NULL, which ? fn : NULL);
		if (!cases[ci].covered)
			tap_ok(rc == -2, "%s, %d x %d (ld %d): not covered, the older path runs (rc %d)", what[which], rows, cols,
				   ld, rc);
		else
			tap_ok(rc == 0 && memcmp(ho, hn, sizeof(uint16_t) * ny) == 0 &&
				   (which == 0 || memcmp(fo, fn, sizeof(float) * ny) == 0),
				   "%s, %d x %d (ld %d): bit-identical to the older kernel%s (rc %d)", what[which], rows, cols, ld,
				   which ? " and its conversion" : "", rc);
		free(x);
		free(w);
		free(fo);
		free(fn);
		free(ho);
		free(hn);
	}
	dlclose(lib);
	kl_model_free(m);
}

/* a random model of the given config made on the GPU in bf16 precision (seed 7), KL_CUDA_BF16_TWIN on or off */
static kl_model *
twin_model(const char *config, const char *quantize, bool twin)
{
	return random_gpu_model(config, quantize, twin ? NULL : "KL_CUDA_BF16_TWIN", "0");
}

/*
 * KL_CUDA_BF16_TWIN must not change a single number: the same bf16 values
 * reach the same products, the conversions only move into the producers
 * (norms, SwiGLU) or are shared between the products of one input.  Random
 * bf16 models made on the GPU with the same seed, switch on and off, prefill
 * of one call, in pieces (every product of many rows), and token by token
 * (graphs): logits bit-identical.  K=128/R=512 shapes (dense MLP, KDA, MLA,
 * MoE with a shared expert; bf16 and int4 weights, the latter through the
 * dequantized panels; KDA's gated norm as the warp kernel, the default, and,
 * with KL_CUDA_KDA_ELEM_WARP=0, the block one) and two layers of the 48B shapes
 * (hidden 2304, 256 experts of 1024, dense MLP of 9216).
 */
static void
check_bf16_twin_model(const char *config, const char *name, const char *quantize, int T, int piece, bool elem_block)
{
	kl_model   *a,
			   *b;
	int			V;
	int32_t    *ids = malloc(sizeof(int32_t) * (size_t) T);
	int			steps[3] = {0, piece, 1};

	/* KL_CUDA_KDA_ELEM_WARP=0: the block gated norm writes o_proj's twin instead of the warp one */
	if (elem_block)
		setenv("KL_CUDA_KDA_ELEM_WARP", "0", 1);
	a = twin_model(config, quantize, true);
	b = twin_model(config, quantize, false);
	unsetenv("KL_CUDA_KDA_ELEM_WARP");
	V = kl_model_config(a)->vocab_size;
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	for (int si = 0; si < 3; si++)
	{
		float	   *la,
				   *lb;

		if (steps[si] == 1 && T > 200)
			continue;			/* (token by token: the small shapes only) */
		la = logits_of(a, ids, T, steps[si], false, NULL);
		lb = logits_of(b, ids, T, steps[si], false, NULL);
		tap_ok(memcmp(la, lb, sizeof(float) * (size_t) T * V) == 0,
			   "%s%s%s%s, bf16, %d tokens %s: logits with and without the bf16 twins (KL_CUDA_BF16_TWIN) "
			   "bit-identical (rel err %.2e)", name, quantize ? ", " : "", quantize ? quantize : "",
			   elem_block ? ", KDA block elementwise kernels" : "", T,
			   steps[si] == 0 ? "in one call" : steps[si] == 1 ? "token by token" : "in pieces", rel_err(la, lb,
																										 (size_t) T * V));
		free(la);
		free(lb);
	}
	free(ids);
	kl_model_free(a);
	kl_model_free(b);
}

/* a random bf16 model of the given config made on the GPU (seed 7) with KL_CUDA_KDA_PREP_MMA=pm
 * (and the fp32 inputs and prepared q, k, v: =4 reads only those, so the two sides differ in the
 * prep alone; check_kda_in16_model checks the bf16 ones) */
static kl_model *
prep_mma_model(const char *config, const char *pm)
{
	kl_model   *m;

	setenv("KL_CUDA_KDA_PREP_MMA", pm, 1);	/* read when the backend is made */
	setenv("KL_CUDA_KDA_IN16", "0", 1);
	setenv("KL_CUDA_KDA_OUT16", "0", 1);
	m = twin_model(config, NULL, true);
	unsetenv("KL_CUDA_KDA_PREP_MMA");
	unsetenv("KL_CUDA_KDA_IN16");
	unsetenv("KL_CUDA_KDA_OUT16");
	return m;
}

/*
 * KL_CUDA_KDA_PREP_MMA=4 (the elementwise KDA prep fused into the chunk
 * prep, cuda_kda_fused) against =3 (kk_kda_prep, then the 63.5 KB chunk
 * prep on its fp32 outputs): random bf16 models made on the GPU with the same
 * seed, logits within TOL_KDA_MMA (the fused kernel computes every q, k, v,
 * g, beta with the elementwise kernel's functions in its order, so the
 * logits are expected bit-identical, reported as a diagnostic; a different
 * contraction by the compiler would move them by an fp32 rounding).  Prefill
 * in one call (conv tails zero), in pieces of `piece` rows (tails and state
 * carried, pieces ending mid-chunk), and one step of three sequences of
 * different lengths, each with a prefix fed before (several sequences in one
 * step: per-sequence tails and states), then a step mixing a short sequence
 * (<= 16 rows: the per-token path, =4 falls back to kda_prep) with long ones.
 */
static void
check_kda_prep_fused_model(const char *config, const char *name, int T, int piece)
{
	kl_model   *a = prep_mma_model(config, "4"),
			   *b = prep_mma_model(config, "3");
	int			V = kl_model_config(a)->vocab_size;
	int32_t    *ids = malloc(sizeof(int32_t) * (size_t) T);

	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	for (int si = 0; si < 2; si++)
	{
		float	   *la = logits_of(a, ids, T, si ? piece : 0, false, NULL),
				   *lb = logits_of(b, ids, T, si ? piece : 0, false, NULL);
		double		e = rel_err(la, lb, (size_t) T * V);

		tap_ok(e <= TOL_KDA_MMA, "%s, bf16, %d tokens %s: logits with the KDA prep fused into the chunk prep "
			   "(KL_CUDA_KDA_PREP_MMA=4) vs =3, rel err %.2e", name, T, si ? "in pieces" : "in one call", e);
		tap_diag("%s, %d tokens %s: KL_CUDA_KDA_PREP_MMA=4 vs =3 logits %s", name, T, si ? "in pieces" : "in one call",
				 memcmp(la, lb, sizeof(float) * (size_t) T * V) == 0 ? "bit-identical" : "differ");
		free(la);
		free(lb);
	}
	{
		/* three sequences: prefixes, then one step with all three (lengths
		 * 37, 150 and the rest), then a step with a short one among them */
		int			pre[3] = {0, 23, 70},
					len[3] = {37, 150, T / 3},
					len2[3] = {5, 41, 100};
		kl_seq	   *sa[3],
				   *sb[3];
		kl_ctx	   *ca,
				   *cb;
		kl_err		err;
		double		worst = 0;
		bool		same = true;

		if (kl_ctx_new(a, 0, &ca, &err) != KL_OK || kl_ctx_new(b, 0, &cb, &err) != KL_OK)
			die("context", &err);
		for (int s = 0; s < 3; s++)
		{
			if (kl_seq_new(a, &sa[s], &err) != KL_OK || kl_seq_new(b, &sb[s], &err) != KL_OK)
				die("sequence", &err);
			if (pre[s])
			{
				feed(ca, sa[s], ids, pre[s], 0, V, NULL);
				feed(cb, sb[s], ids, pre[s], 0, V, NULL);
			}
		}
		for (int round = 0; round < 2; round++)
		{
			kl_batch_item ba[3],
						bb[3];
			int			off = 0;
			float	   *oa = malloc(sizeof(float) * (size_t) T * V),
					   *ob = malloc(sizeof(float) * (size_t) T * V);

			for (int s = 0; s < 3; s++)
			{
				int			n = round ? len2[s] : len[s];
				const int32_t *p = ids + pre[s] + (round ? len[s] : 0);

				if (p + n > ids + T)
					p = ids;
				ba[s] = (kl_batch_item) {sa[s], p, n, oa + (size_t) off * V, true};
				bb[s] = (kl_batch_item) {sb[s], p, n, ob + (size_t) off * V, true};
				off += n;
			}
			if (kl_forward(ca, ba, 3, &err) != KL_OK || kl_forward(cb, bb, 3, &err) != KL_OK)
				die("batched forward", &err);
			{
				double		e = rel_err(oa, ob, (size_t) off * V);

				worst = e > worst ? e : worst;
				same = same && memcmp(oa, ob, sizeof(float) * (size_t) off * V) == 0;
			}
			free(oa);
			free(ob);
		}
		tap_ok(worst <= TOL_KDA_MMA, "%s, bf16: three sequences in one step (37, 150, %d rows after prefixes of 0, "
			   "23, 70; then 5, 41, 100 rows), KL_CUDA_KDA_PREP_MMA=4 vs =3, worst rel err %.2e", name, T / 3, worst);
		tap_diag("%s: three sequences a step, KL_CUDA_KDA_PREP_MMA=4 vs =3 logits %s", name,
				 same ? "bit-identical" : "differ");
		for (int s = 0; s < 3; s++)
		{
			kl_seq_free(sa[s]);
			kl_seq_free(sb[s]);
		}
		kl_ctx_free(ca);
		kl_ctx_free(cb);
	}
	free(ids);
	kl_model_free(a);
	kl_model_free(b);
}

/*
 * KL_CUDA_KDA_IN16 (the KDA op's q, k, v, f products keep bf16 results the
 * op reads) and KL_CUDA_KDA_OUT16 (the rows prep writes the prepared q, k,
 * v in bf16 for kk_kda_chunked_mma16) add bf16 roundings, so they are not
 * compared with the bf16 path of before at a fixed bar (random models
 * amplify one more rounding to the size of their whole bf16-vs-fp32
 * difference: notes-cuda.md, issue 13 fourth session).  Instead both bf16
 * paths are measured against precision fp32 on the same random model (made
 * on the GPU, seed 7, bf16 weights: precision fp32 widens them exactly):
 * the new path's logits error must be at most IN16_FACTOR times the old
 * one's.  Prefill in one call (every sequence long: both switches), in
 * pieces of `piece` rows (tails and state carried), and in pieces of 13
 * (GEMM products but a sequence of <= 16 rows: the per-token recurrence on
 * the rows prep of bf16 inputs; OUT16 does not apply).  IN16 (the default)
 * is held to the bar; OUT16 (opt-in: above the bar on the K = 128 model,
 * 2026-12-01) with and without IN16, and IN16=3 (the gate kept in bf16
 * too, widened before the norm), are measured and printed only.
 */
#define IN16_FACTOR 1.5

/* a random model of config made on the GPU (seed 7, bf16 weights) in precision prec, with up to two
 * environment variables (name NULL: none) set while the backend is made */
static kl_model *
in16_model(const char *config, const char *prec, const char *n1, const char *v1, const char *n2, const char *v2)
{
	char		path[] = "/tmp/kl_test_cuda_XXXXXX";
	int			fd = mkstemp(path);
	kl_load_opts og = {0};
	kl_model   *m;
	kl_err		err = {0};

	if (fd < 0 || write(fd, config, strlen(config)) != (ssize_t) strlen(config))
		die("write a temporary config", &err);
	close(fd);
	og.device = "cuda";
	og.precision = prec;
	if (n1)
		setenv(n1, v1, 1);		/* (read when the backend is made) */
	if (n2)
		setenv(n2, v2, 1);
	if (kl_model_create_random(path, &og, "bf16", 7, &m, &err) != KL_OK)
		die("random model", &err);
	if (n1)
		unsetenv(n1);
	if (n2)
		unsetenv(n2);
	unlink(path);
	return m;
}

static void
check_kda_in16_model(const char *config, const char *name, int T, int piece)
{
	static const struct
	{
		const char *in16,
				   *out16,
				   *what;
		bool		held;		/* the bar holds (a default), else measured only */
	}			var[] = {
		{"1", "0", "IN16 (the default)", true},
		{"1", "1", "IN16 + OUT16 (opt-in)", false},
		{"0", "1", "OUT16 alone (opt-in)", false},
		{"3", "0", "IN16=3 (gate too; opt-in)", false},
	};
	kl_model   *ref = in16_model(config, "fp32", NULL, NULL, NULL, NULL),
			   *old = in16_model(config, "bf16", "KL_CUDA_KDA_IN16", "0", "KL_CUDA_KDA_OUT16", "0");
	int			V = kl_model_config(ref)->vocab_size;
	int			steps[3] = {0, piece, 13};
	int32_t    *ids = malloc(sizeof(int32_t) * (size_t) T);
	float	   *lref[3],
			   *lold[3];

	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	for (int si = 0; si < 3; si++)
	{
		lref[si] = logits_of(ref, ids, T, steps[si], false, NULL);
		lold[si] = logits_of(old, ids, T, steps[si], false, NULL);
	}
	kl_model_free(ref);
	kl_model_free(old);
	for (size_t vi = 0; vi < sizeof(var) / sizeof(var[0]); vi++)
	{
		kl_model   *m = in16_model(config, "bf16", "KL_CUDA_KDA_IN16", var[vi].in16, "KL_CUDA_KDA_OUT16",
								   var[vi].out16);

		for (int si = 0; si < 3; si++)
		{
			float	   *l = logits_of(m, ids, T, steps[si], false, NULL);
			double		e_old = rel_err(lold[si], lref[si], (size_t) T * V),
						e_new = rel_err(l, lref[si], (size_t) T * V);
			char		how[64];

			if (steps[si] == 0)
				snprintf(how, sizeof(how), "in one call");
			else
				snprintf(how, sizeof(how), "in pieces of %d", steps[si]);
			/* the opt-in forms are measured, not held to the bar (OUT16 went
			 * above it on the K = 128 model: cuda_backend.c has the numbers) */
			if (var[vi].held)
				tap_ok(e_new <= IN16_FACTOR * e_old, "%s, %d tokens %s: KDA %s, logits vs precision fp32 rel err "
					   "%.3e, the bf16 path before (IN16=0 OUT16=0) %.3e: ratio %.3f (at most %.1f)", name, T, how,
					   var[vi].what, e_new, e_old, e_old > 0 ? e_new / e_old : 0.0, IN16_FACTOR);
			else
				tap_diag("%s, %d tokens %s: KDA %s, logits vs precision fp32 rel err %.3e, the bf16 path before "
						 "%.3e: ratio %.3f (measured only; the bar for defaults is %.1f)", name, T, how,
						 var[vi].what, e_new, e_old, e_old > 0 ? e_new / e_old : 0.0, IN16_FACTOR);
			tap_diag("%s, %s, %s: vs the bf16 path before, rel err %.3e (%s)", name, how, var[vi].what,
					 rel_err(l, lold[si], (size_t) T * V),
					 memcmp(l, lold[si], sizeof(float) * (size_t) T * V) == 0 ? "bit-identical" : "differ");
			free(l);
		}
		kl_model_free(m);
	}
	for (int si = 0; si < 3; si++)
	{
		free(lref[si]);
		free(lold[si]);
	}
	free(ids);
}

/*
 * The prefetch hint (cu_prefetch: o_proj and the router fetched into L2 during
 * the mixer's small kernels) must not change a single number: decode with
 * and without it, graphs on, and compare the logits bit for bit.  The hints
 * act from KL_CUDA_PREFETCH tokens a step (default 8); this decodes one
 * token a step, so the model with hints sets it to 1.
 */
static void
check_prefetch_neutral(const char *precision)
{
	char		dir[1024];
	kl_model   *a,
			   *b;
	int			V,
				T = 48;
	int32_t    *ids = malloc(sizeof(int32_t) * (size_t) T);
	float	   *la,
			   *lb;

	snprintf(dir, sizeof(dir), "%s/pgdocs-kimi-18m", tap_models_dir());
	if (access(dir, R_OK) != 0)
		snprintf(dir, sizeof(dir), "models/pgdocs-kimi-18m");
	setenv("KL_CUDA_PREFETCH", "1", 1);	/* read when the backend is made */
	a = load(dir, "cuda", precision);
	setenv("KL_CUDA_PREFETCH", "0", 1);
	b = load(dir, "cuda", precision);
	unsetenv("KL_CUDA_PREFETCH");
	V = kl_model_config(a)->vocab_size;
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	la = logits_of(a, ids, T, 1, false, NULL);
	lb = logits_of(b, ids, T, 1, false, NULL);
	tap_ok(memcmp(la, lb, sizeof(float) * (size_t) T * V) == 0,
		   "pgdocs-kimi-18m %s: %d tokens decoded one by one, with and without the L2 prefetch hint: logits "
		   "bit-identical", precision, T);
	free(ids);
	free(la);
	free(lb);
	kl_model_free(a);
	kl_model_free(b);
}

/*
 * CUDA graphs are keyed by the rows a decode step computes logits of: steps
 * of one token alternating between "logits wanted" and "none" (a prompt's
 * tokens fed one at a time, then a sampled one) each replay their own graph.
 * Before the key, the second kind replayed the first's graph and the step
 * failed ("a decode step differs from its recorded CUDA graph").  The logits
 * must equal those of a run without graphs.
 */
static void
check_graph_logit_rows(void)
{
	char		dir[1024];
	kl_model   *m;
	kl_ctx	   *ctx;
	kl_seq	   *seq;
	kl_err		err;
	int			V,
				T = 12,
				fails = 0;
	int32_t		ids[12];
	float	   *with = NULL,
			   *without = NULL;

	snprintf(dir, sizeof(dir), "%s/golden/tiny_c", tap_fixture_dir());
	m = load(dir, "cuda", "fp32");
	V = kl_model_config(m)->vocab_size;
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	for (int pass = 0; pass < 2; pass++)
	{
		float	   *out = calloc((size_t) T * V, sizeof(float));

		if (pass == 1)
			setenv("KL_CUDA_GRAPHS", "0", 1);	/* read at every step */
		if (kl_ctx_new(m, 0, &ctx, &err) != KL_OK || kl_seq_new(m, &seq, &err) != KL_OK)
			die("context", &err);
		for (int t = 0; t < T; t++)
		{
			/* logits at every third token only */
			kl_batch_item it = {seq, ids + t, 1, t % 3 == 2 ? out + (size_t) t * V : NULL, false};

			if (kl_forward(ctx, &it, 1, &err) != KL_OK)
			{
				tap_diag("token %d (%s logits): %s", t, t % 3 == 2 ? "with" : "without", err.msg);
				fails++;
			}
		}
		kl_seq_free(seq);
		kl_ctx_free(ctx);
		if (pass == 0)
			with = out;
		else
			without = out;
	}
	unsetenv("KL_CUDA_GRAPHS");
	tap_ok(fails == 0 && memcmp(with, without, sizeof(float) * (size_t) T * V) == 0,
		   "tiny_c fp32: one-token steps with and without logits alternating, graphs on: every step runs (%d "
		   "failed) and the logits equal a run without graphs", fails);
	free(with);
	free(without);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ the trained model */

static void
check_pgdocs(const char *prec)
{
	char		dir[1024],
				path[1200];
	kl_err		err;
	kl_model   *m;
	kl_ctx	   *ctx;
	FILE	   *f;
	char	   *json;
	long		n;
	const char *p;
	int			sample = 0;
	bool		fp32 = strcmp(prec, "fp32") == 0;

	snprintf(dir, sizeof(dir), "%s/pgdocs-kimi-18m", tap_models_dir());
	if (access(dir, R_OK) != 0)
		snprintf(dir, sizeof(dir), "models/pgdocs-kimi-18m");
	m = load(dir, "cuda", prec);
	if (kl_ctx_new(m, 0, &ctx, &err) != KL_OK)
		die("context", &err);
	snprintf(path, sizeof(path), "%s/training.json", dir);
	f = fopen(path, "rb");
	if (!f)
	{
		tap_ok(0, "open %s", path);
		return;
	}
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	json = calloc(1, (size_t) n + 1);
	if (fread(json, 1, (size_t) n, f) != (size_t) n)
		exit(1);
	fclose(f);
	for (p = json; (p = strstr(p, "\"prompt_ids\"")) != NULL; sample++)
	{
		int32_t		prompt[256],
					want[256];
		int			np = 0,
					nw = 0,
					agree = 0;
		const char *q = strchr(p, '[');
		kl_tokens	out = {0};
		kl_seq	   *seq;
		kl_gen_params gp;

		for (q++; *q != ']'; q++)
			if (*q >= '0' && *q <= '9')
			{
				prompt[np++] = (int32_t) strtol(q, (char **) &q, 10);
				q--;
			}
		q = strchr(strstr(q, "\"greedy_ids\""), '[');
		for (q++; *q != ']'; q++)
			if (*q >= '0' && *q <= '9')
			{
				want[nw++] = (int32_t) strtol(q, (char **) &q, 10);
				q--;
			}
		memset(&gp, 0, sizeof(gp));
		kl_sampling_default(&gp.sampling);
		gp.max_tokens = nw;
		gp.ignore_eos = true;
		if (kl_seq_new(m, &seq, &err) != KL_OK)
			die("sequence", &err);
		if (kl_generate(ctx, seq, prompt, np, &gp, &out, NULL, NULL, &err) != KL_OK)
			tap_diag("%s", err.msg);
		while (agree < (int) out.n && agree < nw && out.ids[agree] == want[agree])
			agree++;
		if (fp32)
			tap_ok(out.n == (size_t) nw && agree == nw,
				   "pgdocs-kimi-18m %s sample %d: %d greedy tokens identical to the reference", prec, sample + 1, nw);
		else
			tap_ok(agree >= 8, "pgdocs-kimi-18m %s sample %d: first 8 greedy tokens identical (%d of %d agree)",
				   prec, sample + 1, agree, nw);
		kl_tokens_free(&out);
		kl_seq_free(seq);
		p = q;
	}
	tap_ok(sample == 3, "found the 3 reference samples");
	free(json);
	kl_ctx_free(ctx);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ quantized weights on the GPU */

/*
 * The GPU keeps quantized weights (FP8, int8, int4) resident as they are
 * (kernels.h's device form) and computes with them: the conversion kernels
 * (kernels/quant.cu) against quant.h's reference, then whole models against
 * the CPU's quantized model.
 */

typedef int (*q_dequant_fn) (int fmt, int group, int rows, int cols, const void *data, const float *scales, int r0,
							 int nr, int out_bf16, void *out);
typedef int (*q_fill_fn) (int fmt, int group, int rows, int cols, unsigned long long seed, float scale, void *out);

static uint64_t q_rng = 0x9e3779b97f4a7c15ull;

static float
q_uniform(void)
{
	q_rng ^= q_rng << 13;
	q_rng ^= q_rng >> 7;
	q_rng ^= q_rng << 17;
	return (float) (q_rng >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
}

/*
 * A quantized matrix from random f32 (quant.h's quantization; rows of
 * different magnitudes, a zero row).  FP8 also gets hand-made bytes at the
 * start of every row: zeros, the subnormals 0x01-0x07 and 0x81-0x87, the
 * least normals 0x08 / 0x88 and the largest finite 0x7e / 0xfe.  The caller
 * frees q->data and q->scales.
 */
static void
make_qmat(kl_qmat *q, kl_qtype t, int rows, int cols, int group)
{
	static const uint8_t special[] = {0x00, 0x80, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x81, 0x82, 0x83,
	0x84, 0x85, 0x86, 0x87, 0x08, 0x88, 0x7e, 0xfe};
	float	   *src = malloc(sizeof(float) * (size_t) rows * cols);

	for (int r = 0; r < rows; r++)
		for (int c = 0; c < cols; c++)
			src[(size_t) r * cols + c] = r == 2 ? 0.0f : q_uniform() * (float) (1 + r % 5) * 0.03f;
	memset(q, 0, sizeof(*q));
	q->type = t;
	q->rows = rows;
	q->cols = cols;
	q->group = group;
	q->n_groups = (cols + group - 1) / group;
	q->row_bytes = kl_q_row_bytes(t, cols);
	q->data = calloc((size_t) rows * q->row_bytes + 1, 1);
	q->scales = calloc((size_t) rows * q->n_groups + 1, sizeof(float));
	kl_q_quantize_rows(q, src, 0, rows);
	if (t == KL_Q_FP8)
		for (int r = 0; r < rows; r++)
			for (int c = 0; c < cols && c < (int) sizeof(special); c++)
				((uint8_t *) q->data)[(size_t) r * q->row_bytes + c] = special[(c + r) % sizeof(special)];
	free(src);
}

/*
 * kk_q_dequant against kl_q_dequant_row, bit for bit: fp32 output equal to
 * the reference's floats, bf16 output equal to their round-to-nearest-even;
 * whole matrices and a range of rows, at the 48B shapes' widths (2304, 1024)
 * and odd ones (cols 96, 64, 200, 97; rows not a multiple of anything),
 * per-channel and group scales.
 */
static void
check_q_dequant(void)
{
	void	   *lib,
			   *fn;
	kl_model   *m = load_test_hook("kl_cuda_test_q_dequant", &lib, &fn);
	static const struct
	{
		int			rows,
					cols,
					group;		/* 0: cols */
	}			shapes[] = {{37, 2304, 0}, {19, 1024, 32}, {5, 2304, 128}, {64, 96, 32}, {33, 64, 0}, {7, 200, 0},
	{9, 97, 0}, {3, 200, 160}};

	if (!m)
		return;
	for (int t = KL_Q_FP8; t <= KL_Q_INT4; t++)
		for (int bf = 0; bf < 2; bf++)
		{
			long		bad = 0,
						total = 0;
			int			rc = 0;

			for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]) && rc == 0; si++)
			{
				int			rows = shapes[si].rows,
							cols = shapes[si].cols,
							group = shapes[si].group ? shapes[si].group : cols;
				kl_qmat		q;
				float	   *ref,
						   *out;

				if (t == KL_Q_INT4 && group != cols && group % 32 != 0)
					continue;
				make_qmat(&q, (kl_qtype) t, rows, cols, group);
				ref = malloc(sizeof(float) * (size_t) rows * cols);
				out = malloc(sizeof(float) * (size_t) rows * cols);
				for (int r = 0; r < rows; r++)
					kl_q_dequant_row(&q, r, ref + (size_t) r * cols);
				for (int part = 0; part < 2 && rc == 0; part++)
				{
					int			r0 = part ? 1 : 0,
								nr = part ? rows - 2 : rows;

					if (nr <= 0)
						continue;
					rc = ((q_dequant_fn) fn) (q_wf(q.type), group, rows, cols, q.data, q.scales, r0, nr, bf, out);
					for (size_t i = 0; rc == 0 && i < (size_t) nr * cols; i++)
					{
						float		want = ref[(size_t) r0 * cols + i];

						if (bf)
							bad += ((const uint16_t *) out)[i] != kl_f32_to_bf16(want);
						else
							bad += memcmp(&out[i], &want, sizeof(float)) != 0;
					}
					total += (long) nr * cols;
				}
				free(ref);
				free(out);
				free((void *) q.data);
				free((void *) q.scales);
			}
			tap_ok(rc == 0 && bad == 0, "kk_q_dequant %s to %s: quant.h's values bit for bit (%ld of %ld differ, "
				   "CUDA %d)", kl_qtype_name((kl_qtype) t), bf ? "bf16" : "fp32", bad, total, rc);
		}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * kk_q_fill_random: valid matrices (kl_q_validate: no FP8 NaN, scales in
 * range; int4 padding nibbles 8), deterministic in the seed, values of
 * mean about 0 and standard deviation about `scale` (within 10 %).
 */
static void
check_q_fill(void)
{
	void	   *lib,
			   *fn;
	kl_model   *m = load_test_hook("kl_cuda_test_q_fill", &lib, &fn);
	int			rows = 300;

	if (!m)
		return;
	for (int t = KL_Q_FP8; t <= KL_Q_INT4; t++)
		for (int ci = 0; ci < 2; ci++)
		{
			int			cols = ci ? 2304 : 100,
						group = kl_q_default_group((kl_qtype) t, cols);
			size_t		rb = kl_q_row_bytes((kl_qtype) t, cols),
						off = q_scale_offset(rows, rb),
						bytes = off + sizeof(float) * (size_t) rows * ((cols + group - 1) / group);
			uint8_t    *a = malloc(bytes),
					   *b = malloc(bytes),
					   *c = malloc(bytes);
			float	   *row = malloc(sizeof(float) * cols);
			float		scale = 0.02f;
			int			rc;
			kl_qmat		q = {0};
			kl_err		err = {0};
			double		sum = 0,
						sq = 0,
						sd,
						mean;
			bool		valid,
						pad = true;

			rc = ((q_fill_fn) fn) (q_wf((kl_qtype) t), group, rows, cols, 5, scale, a);
			if (rc == 0)
				rc = ((q_fill_fn) fn) (q_wf((kl_qtype) t), group, rows, cols, 5, scale, b);
			if (rc == 0)
				rc = ((q_fill_fn) fn) (q_wf((kl_qtype) t), group, rows, cols, 6, scale, c);
			q.type = (kl_qtype) t;
			q.rows = rows;
			q.cols = cols;
			q.group = group;
			q.n_groups = (cols + group - 1) / group;
			q.row_bytes = rb;
			q.data = a;
			q.scales = (const float *) (a + off);
			valid = rc == 0 && kl_q_validate(&q, "random", &err) == KL_OK;
			for (int r = 0; valid && r < rows; r++)
			{
				kl_q_dequant_row(&q, r, row);
				for (int j = 0; j < cols; j++)
				{
					sum += row[j];
					sq += (double) row[j] * row[j];
				}
				if (t == KL_Q_INT4 && cols % 8 != 0)
					for (int j = cols; j < (int) rb * 2; j++)
						pad &= ((a[(size_t) r * rb + j / 2] >> (4 * (j & 1))) & 15) == 8;
			}
			mean = sum / ((double) rows * cols);
			sd = sqrt(sq / ((double) rows * cols) - mean * mean);
			tap_ok(valid && pad && memcmp(a, b, bytes) == 0 && memcmp(a, c, bytes) != 0 &&
				   fabs(sd / scale - 1) <= 0.1 && fabs(mean) <= 0.05 * scale,
				   "kk_q_fill_random %s %d x %d (group %d): valid%s, deterministic in the seed, mean %.2e, standard "
				   "deviation %.4f for %.4f (CUDA %d)", kl_qtype_name((kl_qtype) t), rows, cols, group,
				   pad ? "" : " (int4 padding not 8)", mean, sd, scale, rc);
			if (!valid && rc == 0)
				tap_diag("%s", err.msg);
			free(a);
			free(b);
			free(c);
			free(row);
		}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * The bound of a quantized model's logits on the GPU against the CPU's:
 * fp32 precision TOL_FP32; bf16 precision TOL_BF16, except for models with
 * routed experts.  There, as in check_big_shapes' bf16 prefill: with bf16
 * activations in every product of a random router's model (tiny_a's and
 * the K=128 shapes' are random), near-tied expert choices flip for some
 * tokens (routing itself is fp32), and a flipped token's logits, and the
 * state after it, differ by far more than rounding.  (The unquantized
 * tiny_a checks in bf16 precision keep its fp32 weights, whose products use
 * TF32, 8 times finer than bf16: they stay near 1e-3.)  So only a gross
 * error fails there (0.25); the kernels' own checks (check_gemv_q,
 * check_gemv_mma_q, check_expert_mma_q, ...) hold them to 1e-5 of a
 * reference on the same bf16 activations, and tiny_c (no experts) is held
 * to TOL_BF16 with its greedy ids.
 */
static double
q_tol(const kl_model *m, bool fp32)
{
	if (fp32)
		return TOL_FP32;
	return kl_model_config(m)->n_experts > 0 ? 0.25 : TOL_BF16;
}

/*
 * GPU logits (the whole prompt's in one call; token by token) against the
 * CPU's (one call) on the same model: rel err within tol, and the greedy ids
 * equal wherever the CPU's choice is clear.  `what` names the case.
 */
static void
compare_prompt(const char *what, kl_model *cpu, kl_model *gpu, const int32_t *ids, int T, double tol)
{
	bool		flips = tol > TOL_BF16;	/* q_tol's bound for routed experts in bf16: ids may differ */

	int			V = kl_model_config(cpu)->vocab_size;
	float	   *lc = logits_of(cpu, ids, T, 0, false, NULL);

	for (int step = 0; step < 2; step++)
	{
		float	   *lg = logits_of(gpu, ids, T, step, false, NULL);
		double		e = rel_err(lg, lc, (size_t) T * V);
		int			same,
					bad = greedy_clear_differs(lg, lc, T, V, tol, &same);

		tap_ok(e <= tol && (flips || bad == 0), "%s: %s, GPU vs CPU (rel err %.2e%s; greedy ids %d of %d equal, %d "
			   "differ where the CPU's choice is clear)", what, step ? "token by token" : "the prompt in one call", e,
			   flips ? ", bounded by 0.25: see q_tol" : "", same, T, bad);
		free(lg);
	}
	free(lc);
}

/*
 * A golden model quantized at load (fp8, int8, int4) on the GPU, which keeps
 * the weights in that form (kl_model_weight_format says so: no "dequantized
 * to bf16"), against the CPU's quantized model in fp32: fp32 precision
 * within TOL_FP32, bf16 within TOL_BF16 with the greedy ids equal where the
 * CPU's choice is clear; the prompt in one call (more than 64 rows: panels
 * converted by kk_q_dequant for cuBLAS), token by token (the quantized
 * GEMVs), and batches of 3 and 12 sequences decoding together (bf16: the
 * tensor-core kernels of mma_q.cu from 2 rows, the expert ones from 4).
 */
static void
check_quantized(const char *model, const char *quantize, const char *prec)
{
	char		dir[1024],
				gpath[1200],
				what[160];
	kl_load_opts o = {0};
	kl_model   *cpu,
			   *gpu;
	kl_err		err;
	kl_safetensors st;
	const kl_st_tensor *ids;
	bool		fp32 = strcmp(prec, "fp32") == 0;
	double		tol;
	const char *fmt;

	snprintf(dir, sizeof(dir), "%s/golden/%s", tap_fixture_dir(), model);
	snprintf(gpath, sizeof(gpath), "%s/golden.safetensors", dir);
	if (kl_st_open_file(gpath, &st, &err) != KL_OK || !(ids = kl_st_find(&st, "input_ids")))
		die("golden data", &err);
	o.quantize = quantize;
	o.device = "cpu";
	o.precision = "fp32";
	if (kl_model_load(dir, &o, &cpu, &err) != KL_OK)
		die("quantized model on the CPU", &err);
	o.device = "cuda";
	o.precision = prec;
	if (kl_model_load(dir, &o, &gpu, &err) != KL_OK)
		die("quantized model on the GPU", &err);
	tol = q_tol(gpu, fp32);
	fmt = kl_model_weight_format(gpu);
	tap_ok(strncmp(fmt, quantize, strlen(quantize)) == 0 && strstr(fmt, "dequantized") == NULL &&
		   kl_model_resident_bytes(gpu) == kl_model_resident_bytes(cpu),
		   "%s quantized at load to %s on the GPU %s: kept quantized (\"%s\", %.2f MB resident, the CPU's %.2f)",
		   model, quantize, prec, fmt, kl_model_resident_bytes(gpu) / 1e6, kl_model_resident_bytes(cpu) / 1e6);
	snprintf(what, sizeof(what), "%s %s on the GPU %s", model, quantize, prec);
	compare_prompt(what, cpu, gpu, ids->data, (int) ids->numel, tol);
	for (int bi = 0; bi < 2; bi++)
	{
		int			nseq = bi ? 12 : 3,
					rounds = 4,
					rows = nseq * rounds,
					V = kl_model_config(cpu)->vocab_size,
					same,
					bad;
		float	   *lg,
				   *lc;
		double		e;

		if ((int) ids->numel < 20 + nseq + rounds)
		{
			tap_ok(0, "%s: a golden prompt of at least %d tokens", model, 20 + nseq + rounds);
			continue;
		}
		lg = decode_together(gpu, ids->data, nseq, rounds);
		lc = decode_together(cpu, ids->data, nseq, rounds);
		e = rel_err(lg, lc, (size_t) rows * V);
		bad = greedy_clear_differs(lg, lc, rows, V, tol, &same);
		tap_ok(e <= tol && (tol > TOL_BF16 || bad == 0), "%s: %d sequences decoding together (%d steps), GPU vs "
			   "CPU (rel err %.2e%s; greedy ids %d of %d equal, %d differ where the CPU's choice is clear)", what,
			   nseq, rounds, e, tol > TOL_BF16 ? ", bounded by 0.25: see q_tol" : "", same, rows, bad);
		free(lg);
		free(lc);
	}
	kl_model_free(cpu);
	kl_model_free(gpu);
	kl_st_close(&st);
}

/* the CLI for `kl quantize`: $KL_CLI, else kl next to this program (the GPU machine's bin/), else ./kl */
static void
kl_cli_path(char *out, size_t len)
{
	char		self[1024];
	ssize_t		n;

	if (getenv("KL_CLI"))
	{
		snprintf(out, len, "%s", getenv("KL_CLI"));
		return;
	}
	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n > 0)
	{
		char	   *slash;

		self[n] = '\0';
		if ((slash = strrchr(self, '/')))
		{
			*slash = '\0';
			snprintf(out, len, "%s/kl", self);
			if (access(out, X_OK) == 0)
				return;
		}
	}
	snprintf(out, len, "./kl");
}

/*
 * Checkpoints stored quantized in the published formats (made by `kl
 * quantize` from the golden models, as test_quant.c does; kv_b among the
 * quantized matrices: cuda_prepare_mla converts it with kk_q_dequant) on
 * the GPU against the same checkpoint on the CPU.
 */
static void
check_quantized_published(void)
{
	static const char *models[] = {"tiny_a", "tiny_c"};
	static const char *formats[] = {"ct-fp8", "ct-fp8-block", "ct-int8", "ct-int4", "ct-int8-packed", "fp8-block"};
	char		tmp[] = "/tmp/kl_test_cuda_q_XXXXXX",
				cli[1200],
				cmd[4096];

	if (!mkdtemp(tmp))
	{
		tap_ok(0, "a temporary directory for quantized checkpoints");
		return;
	}
	kl_cli_path(cli, sizeof(cli));
	for (size_t mi = 0; mi < 2; mi++)
	{
		char		gpath[1200];
		kl_safetensors st;
		kl_err		err;
		const kl_st_tensor *ids;

		snprintf(gpath, sizeof(gpath), "%s/golden/%s/golden.safetensors", tap_fixture_dir(), models[mi]);
		if (kl_st_open_file(gpath, &st, &err) != KL_OK || !(ids = kl_st_find(&st, "input_ids")))
			die("golden data", &err);
		for (size_t f = 0; f < sizeof(formats) / sizeof(formats[0]); f++)
		{
			char		qdir[1200],
						what[160];

			snprintf(qdir, sizeof(qdir), "%s/%s-%s", tmp, models[mi], formats[f]);
			snprintf(cmd, sizeof(cmd), "'%s' quantize --model '%s/golden/%s' --format %s --out '%s' > /dev/null",
					 cli, tap_fixture_dir(), models[mi], formats[f], qdir);
			if (!tap_ok(system(cmd) == 0, "%s as %s: kl quantize (%s) writes it", models[mi], formats[f], cli))
				continue;
			for (int pi = 0; pi < 2; pi++)
			{
				kl_model   *cpu = load(qdir, "cpu", "fp32"),
						   *gpu = load(qdir, "cuda", pi ? "bf16" : "fp32");

				snprintf(what, sizeof(what), "%s as %s (%s) on the GPU %s", models[mi], formats[f],
						 kl_model_weight_format(gpu), pi ? "bf16" : "fp32");
				compare_prompt(what, cpu, gpu, ids->data, (int) ids->numel, q_tol(gpu, pi == 0));
				kl_model_free(cpu);
				kl_model_free(gpu);
			}
		}
		kl_st_close(&st);
	}
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp);
	if (system(cmd) != 0)
		tap_diag("could not remove %s", tmp);
}

/*
 * The K=128/R=512 shapes (big_config) quantized: the CPU's random model
 * quantized at load, its quantized matrices copied into the GPU's (made on
 * the GPU in the same form by kk_q_fill_random), then 150 tokens in one call
 * (panels) and token by token (GEMVs, graphs) against the CPU.
 */
static void
check_big_quantized(const char *quantize, const char *prec)
{
	char		path[] = "/tmp/kl_test_cuda_XXXXXX",
				what[160];
	int			fd = mkstemp(path);
	kl_load_opts oc = {0},
				og = {0};
	kl_model   *cpu,
			   *gpu;
	kl_err		err;
	int			V,
				T = 150;
	int32_t    *ids;

	if (fd < 0 || write(fd, big_config, strlen(big_config)) != (ssize_t) strlen(big_config))
	{
		tap_ok(0, "write a temporary config");
		return;
	}
	close(fd);
	oc.device = "cpu";
	oc.quantize = quantize;
	og.device = "cuda";
	og.precision = prec;
	og.quantize = quantize;
	if (kl_model_create_random(path, &oc, "bf16", 7, &cpu, &err) != KL_OK ||
		kl_model_create_random(path, &og, "bf16", 7, &gpu, &err) != KL_OK)
		die("random quantized model", &err);
	unlink(path);
	tap_ok(strstr(kl_model_weight_format(gpu), "dequantized") == NULL &&
		   kl_model_resident_bytes(gpu) == kl_model_resident_bytes(cpu),
		   "K=128/R=512 shapes, random %s weights made on the GPU (\"%s\", %.2f MB resident)", quantize,
		   kl_model_weight_format(gpu), kl_model_resident_bytes(gpu) / 1e6);
	copy_weights(cpu, gpu);
	V = cpu->cfg.vocab_size;
	ids = malloc(sizeof(int32_t) * (size_t) T);
	for (int i = 0; i < T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	snprintf(what, sizeof(what), "K=128/R=512 shapes, %s weights, %s", quantize, prec);
	compare_prompt(what, cpu, gpu, ids, T, q_tol(gpu, strcmp(prec, "fp32") == 0));
	free(ids);
	kl_model_free(cpu);
	kl_model_free(gpu);
}

/* the 48B model's layer shapes, two layers (a dense KDA layer, an MoE MLA layer) */
static const char *q48_config =
"{\"model_type\": \"kimi_linear\", \"vocab_size\": 163840, \"hidden_size\": 2304, \"num_hidden_layers\": 2,"
" \"intermediate_size\": 9216, \"rms_norm_eps\": 1e-5, \"tie_word_embeddings\": false, \"hidden_act\": \"silu\","
" \"bos_token_id\": 1, \"eos_token_id\": 2, \"pad_token_id\": 0,"
" \"linear_attn_config\": {\"kda_layers\": [1], \"full_attn_layers\": [2], \"num_heads\": 32,"
"   \"head_dim\": 128, \"short_conv_kernel_size\": 4},"
" \"num_attention_heads\": 32, \"q_lora_rank\": null, \"kv_lora_rank\": 512, \"qk_nope_head_dim\": 128,"
" \"qk_rope_head_dim\": 64, \"v_head_dim\": 128, \"mla_use_nope\": true,"
" \"num_experts\": 256, \"num_experts_per_token\": 8, \"num_shared_experts\": 1, \"moe_intermediate_size\": 1024,"
" \"first_k_dense_replace\": 1, \"moe_layer_freq\": 1, \"moe_router_activation_func\": \"sigmoid\","
" \"moe_renormalize\": true, \"routed_scaling_factor\": 2.446, \"num_expert_group\": 1, \"topk_group\": 1}";

/*
 * A random model of the 48B shapes with quantized weights made on the GPU
 * (bf16 precision, as the benchmark runs it) loads and decodes: a prompt of
 * 70 tokens, then one step each of 1 and 8 sequences; the logits finite and
 * not all equal (there is no CPU reference: the weights exist only on the
 * GPU).
 */
static void
check_48b_quantized(const char *quantize)
{
	char		path[] = "/tmp/kl_test_cuda_XXXXXX";
	int			fd = mkstemp(path);
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;
	kl_ctx	   *ctx;
	kl_seq	   *seq[8];
	kl_batch_item b[8];
	int			V,
				T = 70,
				bad = 0;
	int32_t    *ids;
	float	   *lg;

	if (fd < 0 || write(fd, q48_config, strlen(q48_config)) != (ssize_t) strlen(q48_config))
	{
		tap_ok(0, "write a temporary config");
		return;
	}
	close(fd);
	o.device = "cuda";
	o.precision = "bf16";
	o.quantize = quantize;
	if (kl_model_create_random(path, &o, "bf16", 11, &m, &err) != KL_OK)
	{
		unlink(path);
		tap_ok(0, "48B shapes, random %s weights on the GPU: %s", quantize, err.msg);
		return;
	}
	unlink(path);
	V = m->cfg.vocab_size;
	ids = malloc(sizeof(int32_t) * (size_t) (T + 8));
	lg = malloc(sizeof(float) * (size_t) 8 * V);
	for (int i = 0; i < T + 8; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	if (kl_ctx_new(m, 0, &ctx, &err) != KL_OK)
		die("context", &err);
	for (int s = 0; s < 8; s++)
	{
		if (kl_seq_new(m, &seq[s], &err) != KL_OK)
			die("sequence", &err);
		feed(ctx, seq[s], ids + s, s == 0 ? T : 3, 0, V, NULL);
	}
	for (int nb = 1; nb <= 8; nb += 7)
	{
		for (int s = 0; s < nb; s++)
			b[s] = (kl_batch_item) {seq[s], ids + T + s, 1, lg + (size_t) s * V, false};
		if (kl_forward(ctx, b, nb, &err) != KL_OK)
			die("quantized forward", &err);
		for (int s = 0; s < nb; s++)
		{
			float		lo = INFINITY,
						hi = -INFINITY;

			for (int i = 0; i < V; i++)
			{
				float		x = lg[(size_t) s * V + i];

				if (!isfinite(x))
					lo = NAN;
				lo = x < lo ? x : lo;
				hi = x > hi ? x : hi;
			}
			bad += !(hi > lo);
		}
	}
	tap_ok(bad == 0, "48B shapes, random %s weights made on the GPU (\"%s\", %.2f GB resident): a 70-token prompt, "
		   "then decode steps of 1 and 8 sequences give finite logits (%d rows bad)", quantize,
		   kl_model_weight_format(m), kl_model_resident_bytes(m) / 1e9, bad);
	for (int s = 0; s < 8; s++)
		kl_seq_free(seq[s]);
	kl_ctx_free(ctx);
	free(ids);
	free(lg);
}

/* ------------------------------------------------------------------ quantized weights on the tensor cores */

/* kernels.h's KK_WF_FP8 / KK_WF_INT4 (this file does not include the CUDA headers) */
#define MQ_FP8 2
#define MQ_INT4 4

/*
 * A quantized matrix as the device holds it (kernels.h: data, then the fp32
 * scales at the next 256-byte boundary), made on the host; q views the same
 * bytes for quant.h's reference.
 */
typedef struct mq_mat
{
	kl_qmat		q;
	uint8_t    *obj;
	size_t		bytes;
} mq_mat;

static void
mq_alloc(mq_mat *m, int fmt, int group, int rows, int cols)
{
	kl_qtype	t = fmt == MQ_FP8 ? KL_Q_FP8 : KL_Q_INT4;
	size_t		rb = kl_q_row_bytes(t, cols),
				soff = ((size_t) rows * rb + 255) & ~(size_t) 255;
	int			ng = (cols + group - 1) / group;

	m->bytes = soff + sizeof(float) * (size_t) rows * ng;
	m->obj = calloc(1, m->bytes);
	if (!m->obj)
		abort();
	m->q.type = t;
	m->q.rows = rows;
	m->q.cols = cols;
	m->q.data = m->obj;
	m->q.row_bytes = rb;
	m->q.scales = (const float *) (m->obj + soff);
	m->q.group = group;
	m->q.n_groups = ng;
}

/* random f32 weights (standard deviation 0.02, a few rows scaled up or down) quantized by kl_q_quantize_rows */
static void
mq_random(mq_mat *m, int fmt, int group, int rows, int cols, uint64_t seed)
{
	float	   *src = malloc(sizeof(float) * cols * 64);

	mq_alloc(m, fmt, group, rows, cols);
	for (int r0 = 0; r0 < rows; r0 += 64)
	{
		int			r1 = r0 + 64 < rows ? r0 + 64 : rows;

		for (int r = r0; r < r1; r++)
		{
			double		sd = r % 7 == 3 ? 2.0 : r % 7 == 5 ? 1e-3 : 0.02;

			for (int c = 0; c < cols; c++)
				src[(size_t) (r - r0) * cols + c] = (float) ((unif(&seed) * 2 - 1) * sd * 1.7320508);
		}
		kl_q_quantize_rows(&m->q, src, r0, r1);
	}
	free(src);
}

/* hand-made FP8 bytes: mode 0 any non-NaN code (zeros, subnormals, 0x7e/0xfe among them), 1 only subnormals */
static void
mq_fp8_bytes(mq_mat *m, int group, int rows, int cols, int mode, uint64_t seed)
{
	uint8_t    *d;
	float	   *sc;

	mq_alloc(m, MQ_FP8, group, rows, cols);
	d = (uint8_t *) m->q.data;
	sc = (float *) m->q.scales;
	for (size_t i = 0; i < (size_t) rows * cols; i++)
	{
		uint8_t		b = (uint8_t) (mix_rand(&seed) >> 24);

		if (mode == 1)
			b = (uint8_t) ((b & 0x80) | (1 + b % 7));
		else if ((b & 0x7f) == 0x7f)
			b ^= 0x01;			/* NaN -> the largest, 0x7e / 0xfe */
		d[i] = b;
	}
	for (size_t i = 0; i < (size_t) rows * m->q.n_groups; i++)
		sc[i] = (float) ((unif(&seed) * 2 - 1) * (mode == 1 ? 200.0 : 0.01));
}

/* [rows, cols] dequantized by kl_q_dequant_row (the reference weights) */
static float *
mq_dequant(const mq_mat *m)
{
	float	   *w = malloc(sizeof(float) * (size_t) m->q.rows * m->q.cols);

	for (int r = 0; r < m->q.rows; r++)
		kl_q_dequant_row(&m->q, r, w + (size_t) r * m->q.cols);
	return w;
}

/* x rounded to bf16, as the tensor-core kernels round the activations */
static void
mq_round_bf16(float *dst, const float *x, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = kl_bf16_to_f32(kl_f32_to_bf16(x[i]));
}

/* y[n, rows] = xb[n, cols] W^T in double (xb already bf16 values) */
static void
mq_reference(double *y, const float *xb, const float *w, int n, int rows, int cols)
{
	for (int r = 0; r < rows; r++)
		for (int i = 0; i < n; i++)
		{
			double		s = 0;

			for (int c = 0; c < cols; c++)
				s += (double) xb[(size_t) i * cols + c] * w[(size_t) r * cols + c];
			y[(size_t) i * rows + r] = s;
		}
}

/* ||a - ref|| / ||ref|| with ref in double; a NaN is infinite */
static double
mq_rel(const float *a, const double *ref, size_t n)
{
	double		num = 0,
				den = 0;

	for (size_t i = 0; i < n; i++)
	{
		double		d = (double) a[i] - ref[i];

		if (isnan(a[i]))
			return INFINITY;
		num += d * d;
		den += ref[i] * ref[i];
	}
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* kl_cuda_test_gemv_mma_q (src/cuda/cuda_mma_q_test.c) */
typedef int (*gemv_mma_q_fn) (int n, int count, const int *rows, const int *cols, const int *fmt, const int *group,
							  const void *const *W, const float *const *x, int xpad, float *const *y);

/*
 * One batch of count jobs through the hook at each n of ns, against the
 * double reference of the bf16-rounded activations and kl_q_dequant_row's
 * weights: the worst relative error over the jobs and rows counts.
 */
static double
mq_gemv_case(gemv_mma_q_fn f, int count, mq_mat *const *mats, const int *fmt, const int *ns, int nn, int xpad,
			 uint64_t seed, int *rc)
{
	int			rows[8],
				cols[8],
				group[8];
	const void *W[8];
	float	   *wd[8];
	double		worst = 0;

	for (int j = 0; j < count; j++)
	{
		rows[j] = mats[j]->q.rows;
		cols[j] = mats[j]->q.cols;
		group[j] = mats[j]->q.group;
		W[j] = mats[j]->obj;
		wd[j] = mq_dequant(mats[j]);
	}
	for (int ni = 0; ni < nn && *rc == 0; ni++)
	{
		int			n = ns[ni];
		const float *x[8];
		float	   *y[8];

		for (int j = 0; j < count; j++)
		{
			float	   *xx = malloc(sizeof(float) * n * cols[j]);

			for (size_t i = 0; i < (size_t) n * cols[j]; i++)
				xx[i] = (float) ((unif(&seed) * 2 - 1) * (i % 13 == 0 ? 30.0 : 1.0));
			x[j] = xx;
			y[j] = malloc(sizeof(float) * n * rows[j]);
		}
		*rc = f(n, count, rows, cols, fmt, group, W, x, xpad, y);
		for (int j = 0; j < count; j++)
		{
			if (*rc == 0)
			{
				float	   *xb = malloc(sizeof(float) * n * cols[j]);
				double	   *ref = malloc(sizeof(double) * n * rows[j]);
				double		e;

				mq_round_bf16(xb, x[j], (size_t) n * cols[j]);
				mq_reference(ref, xb, wd[j], n, rows[j], cols[j]);
				e = mq_rel(y[j], ref, (size_t) n * rows[j]);
				worst = e > worst || isnan(e) ? e : worst;
				free(xb);
				free(ref);
			}
			free((void *) x[j]);
			free(y[j]);
		}
	}
	for (int j = 0; j < count; j++)
		free(wd[j]);
	return worst;
}

/*
 * kk_gemv_mma_q / kk_gemv_multi_mma_q (kernels/mma_q.cu) on random matrices
 * quantized by kl_q_quantize_rows (FP8 one scale a row and groups of 128;
 * int4 groups of 32 and 128), n = 1, 3, 8, 9, 32, 64 rows (every mma
 * n-block count and partial blocks), against the double reference of the
 * bf16-rounded activations and kl_q_dequant_row's weights: rel err <= 1e-5.
 * Shapes: the 48B model's KDA projection batch (3 x 4096 x 2304), o_proj
 * (2304 x 4096), an expert's gate (1024 x 2304) and down (2304 x 1024),
 * lm_head (163840 x 2304, FP8, 9 rows: the double reference is slow), and
 * odd ones (rows not a multiple of 16, cols 96, 64, 192: the narrower loads
 * and a k range split finer than a chunk, unaligned activation rows).  Then
 * hand-made FP8 bytes: every non-NaN code (zeros, subnormals, 0x7e/0xfe)
 * and only subnormals (0x01-0x07, 0x81-0x87): the kernel feeds those to the
 * tensor cores as bf16 subnormals, so that check fails (rel err about 1)
 * if the hardware flushes subnormal inputs.
 */
static void
check_gemv_mma_q(void)
{
	static const int ns_all[] = {1, 3, 8, 9, 32, 64},
				ns_big[] = {1, 9, 64};
	static const struct
	{
		int			fmt,
					group;
		const char *what;
	}			forms[] = {
		{MQ_FP8, 0, "fp8 one scale a row"},
		{MQ_FP8, 128, "fp8 group 128"},
		{MQ_INT4, 32, "int4 group 32"},
		{MQ_INT4, 128, "int4 group 128"},
	};
	static const struct
	{
		int			count,
					xpad,
					rows[3],
					cols[3],
					big;
		const char *what;
	}			shapes[] = {
		{3, 4, {4096, 4096, 4096}, {2304, 2304, 2304}, 1, "48B KDA projections 3 x 4096 x 2304"},
		{1, 4, {2304}, {4096}, 1, "48B o_proj 2304 x 4096"},
		{2, 0, {1024, 2304}, {2304, 1024}, 1, "48B expert gate 1024 x 2304 + down 2304 x 1024"},
		{3, 1, {200, 7, 50}, {96, 192, 64}, 0, "odd 200 x 96, 7 x 192, 50 x 64, unaligned rows"},
		{2, 0, {1000, 129}, {128, 2304}, 0, "1000 x 128, 129 x 2304"},
	};
	kl_model   *m;
	void	   *lib = NULL;
	gemv_mma_q_fn f = NULL;

	m = load_test_hook("kl_cuda_test_gemv_mma_q", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t fi = 0; fi < sizeof(forms) / sizeof(forms[0]); fi++)
		for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		{
			mq_mat		mats[3],
					   *mp[3];
			int			fmt[3],
						rc = 0;
			double		e;

			for (int j = 0; j < shapes[si].count; j++)
			{
				int			cols = shapes[si].cols[j],
							group = forms[fi].group ? forms[fi].group : cols;

				/* a group wider than the matrix is one scale a row */
				mq_random(&mats[j], forms[fi].fmt, group > cols ? cols : group, shapes[si].rows[j], cols,
						  1000 + 37 * fi + 5 * si + j);
				mp[j] = &mats[j];
				fmt[j] = forms[fi].fmt;
			}
			e = mq_gemv_case(f, shapes[si].count, mp, fmt, shapes[si].big ? ns_big : ns_all,
							 shapes[si].big ? 3 : 6, shapes[si].xpad, 77 + fi + si, &rc);
			tap_ok(rc == 0 && e <= 1e-5, "tensor-core GEMV of quantized weights, %s, %s, n = %s: rel err %.2e "
				   "against the double reference (hook returned %d)", forms[fi].what, shapes[si].what,
				   shapes[si].big ? "1, 9, 64" : "1, 3, 8, 9, 32, 64", e, rc);
			for (int j = 0; j < shapes[si].count; j++)
				free(mats[j].obj);
		}
	{
		mq_mat		lm,
				   *mp = &lm;
		int			fmt = MQ_FP8,
					rc = 0,
					n9 = 9;
		double		e;

		mq_random(&lm, MQ_FP8, 2304, 163840, 2304, 4242);
		e = mq_gemv_case(f, 1, &mp, &fmt, &n9, 1, 0, 99, &rc);
		tap_ok(rc == 0 && e <= 1e-5, "tensor-core GEMV of quantized weights, fp8 one scale a row, 48B lm_head "
			   "163840 x 2304, 9 rows: rel err %.2e (hook returned %d)", e, rc);
		free(lm.obj);
	}
	for (int mode = 0; mode < 2; mode++)
		for (int gi = 0; gi < 2; gi++)
		{
			mq_mat		hm,
					   *mp = &hm;
			int			fmt = MQ_FP8,
						rc = 0;
			static const int ns[] = {8, 64};
			double		e;

			mq_fp8_bytes(&hm, gi ? 128 : 2304, 300, 2304, mode, 555 + mode * 2 + gi);
			e = mq_gemv_case(f, 1, &mp, &fmt, ns, 2, 0, 31 + mode, &rc);
			tap_ok(rc == 0 && e <= 1e-5, "tensor-core GEMV of hand-made FP8 bytes (%s), %s, 300 x 2304, n = 8 and "
				   "64: rel err %.2e (hook returned %d)%s", mode ? "only subnormals 0x01-0x07, 0x81-0x87" :
				   "every non-NaN code: zeros, subnormals, 0x7e/0xfe", gi ? "group 128" : "one scale a row", e, rc,
				   mode && e > 0.5 ? " - the tensor cores flush bf16 subnormal inputs" : "");
			free(hm.obj);
		}
	dlclose(lib);
	kl_model_free(m);
}

/* kl_cuda_test_gemv_mma_q_path (src/cuda/cuda_mma_q_test.c): path 0 staging, 1 direct, 2 / 3 dense MT 1 / 2,
 * 4 the slab kernel (KL_CUDA_Q_DENSE=3; the dense kernel where the device has no bulk copies), 5 the dense
 * kernel in its tokens-as-M form (KL_CUDA_Q_TOK: from 9 rows where the batch has rows for every SM); 6, 7, 8
 * retired (the balanced grid, KL_CUDA_Q_GRID: the hook returns -1); 9, 10, 11: 3, 5, 4 with the
 * even-numbered jobs reading preset bf16 twins of exactly n rows (KL_CUDA_Q_TWIN) */
typedef int (*gemv_mma_q_path_fn) (int path, int n, int count, const int *rows, const int *cols, const int *fmt,
								   const int *group, const void *const *W, const float *const *x, int xpad,
								   float *const *y);

/* what one batch of the dense kernel's check found over its row counts */
typedef struct mq_dense_result
{
	double		dense,			/* worst rel err of the dense kernel (MT 1 and 2) against the reference */
				slab,			/* ... of the slab kernel (path 4) */
				tok,			/* ... of the dense kernel in its tokens-as-M form (path 5) */
				staged;			/* ... of the staging kernel (path 0), for comparison */
	int			mt_differ,		/* row counts where MT 1 and MT 2 differ in any bit */
				twin_differ,	/* products where a path reading preset twins (9, 10, 11) differs from 3, 5, 4 */
				direct_differ,	/* row counts n <= 8 where the dense kernel differs from the direct one */
				rc;				/* the hook's first nonzero return */
} mq_dense_result;

/*
 * One batch of FP8 (one scale a row) jobs through the paths (0-5 and 9-11;
 * 6-8 retired) at each n of ns: job j's activations are job share[j]'s (the
 * same host array, so the hook uploads them once and the dense kernel
 * converts them once).
 */
static void
mq_dense_case(gemv_mma_q_path_fn f, int count, mq_mat *const *mats, const int *share, const int *ns, int nn,
			  int xpad, uint64_t seed, mq_dense_result *res)
{
	int			rows[8],
				cols[8],
				group[8],
				fmt[8];
	const void *W[8];
	float	   *wd[8];

	memset(res, 0, sizeof(*res));
	for (int j = 0; j < count; j++)
	{
		rows[j] = mats[j]->q.rows;
		cols[j] = mats[j]->q.cols;
		group[j] = mats[j]->q.group;
		fmt[j] = MQ_FP8;
		W[j] = mats[j]->obj;
		wd[j] = mq_dequant(mats[j]);
	}
	for (int ni = 0; ni < nn && res->rc == 0; ni++)
	{
		int			n = ns[ni];
		const float *x[8];
		float	   *y[12][8];

		for (int j = 0; j < count; j++)
		{
			float	   *xx = share[j] == j ? malloc(sizeof(float) * n * cols[j]) : NULL;

			for (size_t i = 0; xx && i < (size_t) n * cols[j]; i++)
				xx[i] = (float) ((unif(&seed) * 2 - 1) * (i % 13 == 0 ? 30.0 : 1.0));
			x[j] = xx ? xx : x[share[j]];
			for (int p = 0; p < 12; p++)
				y[p][j] = malloc(sizeof(float) * n * rows[j]);
		}
		for (int p = 0; p < 12 && res->rc == 0; p++)
			if (p < 6 || p > 8)	/* (6-8: the retired grid paths) */
				res->rc = f(p, n, count, rows, cols, fmt, group, W, x, xpad, y[p]);
		for (int j = 0; j < count; j++)
		{
			size_t		ny = (size_t) n * rows[j];

			if (res->rc == 0)
			{
				float	   *xb = malloc(sizeof(float) * n * cols[j]);
				double	   *ref = malloc(sizeof(double) * ny),
							e[5];

				mq_round_bf16(xb, x[j], (size_t) n * cols[j]);
				mq_reference(ref, xb, wd[j], n, rows[j], cols[j]);
				e[0] = mq_rel(y[2][j], ref, ny);
				e[1] = mq_rel(y[3][j], ref, ny);
				e[2] = mq_rel(y[0][j], ref, ny);
				e[3] = mq_rel(y[4][j], ref, ny);
				e[4] = mq_rel(y[5][j], ref, ny);
				res->slab = e[3] > res->slab || isnan(e[3]) ? e[3] : res->slab;
				res->tok = e[4] > res->tok || isnan(e[4]) ? e[4] : res->tok;
				for (int k = 0; k < 2; k++)
					res->dense = e[k] > res->dense || isnan(e[k]) ? e[k] : res->dense;
				res->staged = e[2] > res->staged || isnan(e[2]) ? e[2] : res->staged;
				res->mt_differ += memcmp(y[2][j], y[3][j], sizeof(float) * ny) != 0;
				res->direct_differ += n <= 8 && memcmp(y[2][j], y[1][j], sizeof(float) * ny) != 0;
				/* twins hold f32_to_bf16 of x, the conversion's numbers: the same bits */
				res->twin_differ += (memcmp(y[9][j], y[3][j], sizeof(float) * ny) != 0) +
					(memcmp(y[10][j], y[5][j], sizeof(float) * ny) != 0) +
					(memcmp(y[11][j], y[4][j], sizeof(float) * ny) != 0);
				free(xb);
				free(ref);
			}
		}
		for (int j = 0; j < count; j++)
		{
			if (share[j] == j)
				free((void *) x[j]);
			for (int p = 0; p < 12; p++)
				free(y[p][j]);
		}
	}
	for (int j = 0; j < count; j++)
		free(wd[j]);
}

static void
mq_dense_report(const mq_dense_result *r, const char *what, const char *ns)
{
	tap_ok(r->rc == 0 && r->dense <= 1e-5 && r->slab <= 1e-5 && r->tok <= 1e-5 && r->mt_differ == 0 &&
		   r->direct_differ == 0 && r->twin_differ == 0,
		   "dense FP8 kernel (KL_CUDA_Q_DENSE), %s, n = %s: rel err %.2e against the double reference (tokens-as-M "
		   "form %.2e, slab kernel, =3: %.2e; staging kernel %.2e); MT 1 vs 2 differ in %d products, n <= 8 vs "
		   "the direct kernel in %d, preset bf16 twins (KL_CUDA_Q_TWIN) vs converted in %d (all must be 0: the "
		   "same sums); hook returned %d",
		   what, ns, r->dense, r->tok, r->slab, r->staged, r->mt_differ, r->direct_differ, r->twin_differ, r->rc);
}

/*
 * The rest of a decode step's dense FP8 batches (48B shapes) at the n where
 * the slab kernel (KL_CUDA_Q_DENSE=3) changes shape (1, 8 / 9, 32 / 33, 64:
 * its n-blocks), and a batch with odd row counts over 10 chunks of k (its
 * k-slices then differ in width within a cluster).
 */
static void
check_mq_dense_step(gemv_mma_q_path_fn f)
{
	static const int ns_step[] = {1, 2, 8, 9, 16, 32, 33, 64},
				ns_mlp[] = {1, 9, 64};
	static const struct
	{
		const char *what;
		int			count,
					rows[3],
					cols[3],
					share[3];
	}			step[] = {
		{"48B MLA q 6144 x 2304 with kv_a 576 x 2304 sharing x", 2, {6144, 576}, {2304, 2304}, {0, 0}},
		{"48B MLA kv_b 8192 x 512", 1, {8192}, {512}, {0}},
		{"48B shared expert gate + up 2 x 1024 x 2304 sharing x", 2, {1024, 1024}, {2304, 2304}, {0, 0}},
		{"48B shared expert down 2304 x 1024", 1, {2304}, {1024}, {0}},
		{"odd rows 1001 and 77 x 640 sharing x", 2, {1001, 77}, {640, 640}, {0, 0}},
		/* (its down product, 9216 columns, is wider than kk_mma_q_ok takes: gemv_q.cu runs it) */
		{"48B layer-0 MLP gate + up 2 x 9216 x 2304 sharing x", 2, {9216, 9216}, {2304, 2304}, {0, 0}},
	};
	mq_mat		mats[3],
			   *mp[3];
	mq_dense_result r;

	for (int c = 0; c < (int) (sizeof(step) / sizeof(step[0])); c++)
	{
		bool		mlp = step[c].rows[0] == 9216;

		for (int j = 0; j < step[c].count; j++)
		{
			mq_random(&mats[j], MQ_FP8, step[c].cols[j], step[c].rows[j], step[c].cols[j], 2500 + 10 * c + j);
			mp[j] = &mats[j];
		}
		mq_dense_case(f, step[c].count, mp, step[c].share, mlp ? ns_mlp : ns_step, mlp ? 3 : 8, 0, 600 + c, &r);
		mq_dense_report(&r, step[c].what, mlp ? "1, 9, 64" : "1, 2, 8, 9, 16, 32, 33, 64");
		for (int j = 0; j < step[c].count; j++)
			free(mats[j].obj);
	}
}

/*
 * kernels/mma_q.cu's dense FP8 kernel (converted activations, KL_CUDA_Q_DENSE)
 * through kl_cuda_test_gemv_mma_q_path, against the double reference of the
 * bf16-rounded activations and kl_q_dequant_row's weights (rel err <= 1e-5,
 * as check_gemv_mma_q), at MT 1 and 2 tiles a block (equal bit for bit) and
 * at n <= 8 against the direct kernel (equal bit for bit: same B values,
 * same order of every sum).  Every n = 1..64 on a batch of five jobs (two
 * sharing their activations, as q/k/v do; rows not multiples of 16; cols
 * 1024, 2304, 4096, 5120), unaligned activation rows at some n, the 48B
 * shapes (KDA projections sharing one x, o_proj, lm_head), and hand-made
 * FP8 bytes (every code; only subnormals).
 */
static void
check_gemv_mma_q_dense(void)
{
	/* (5120 the widest: kk_mma_q_ok refuses 7168, whose 8 expert tokens would not fit the shared memory) */
	static const int all_cols[5] = {1024, 1024, 2304, 4096, 5120},
				all_rows[5] = {40, 23, 37, 20, 9},
				all_share[5] = {0, 0, 2, 3, 4},
				ns_some[] = {1, 5, 8, 13, 33, 64},
				ns_48b[] = {1, 2, 8, 9, 16, 17, 32, 33, 64},
				ns_o[] = {1, 2, 8, 9, 16, 32, 33, 64},
				ns_lm[] = {2},
				ns_hand[] = {8, 64},
				share3[3] = {0, 0, 0};
	int			ns_all[64];
	kl_model   *m;
	void	   *lib = NULL;
	gemv_mma_q_path_fn f = NULL;
	mq_mat		mats[5],
			   *mp[5];
	mq_dense_result r;

	m = load_test_hook("kl_cuda_test_gemv_mma_q_path", &lib, (void **) &f);
	if (!f)
		return;
	for (int i = 0; i < 64; i++)
		ns_all[i] = i + 1;
	for (int j = 0; j < 5; j++)
	{
		mq_random(&mats[j], MQ_FP8, all_cols[j], all_rows[j], all_cols[j], 2000 + j);
		mp[j] = &mats[j];
	}
	mq_dense_case(f, 5, mp, all_share, ns_all, 64, 0, 501, &r);
	mq_dense_report(&r, "5 jobs (40 + 23 x 1024 sharing x, 37 x 2304, 20 x 4096, 9 x 5120)", "1 .. 64");
	mq_dense_case(f, 5, mp, all_share, ns_some, 6, 1, 502, &r);
	mq_dense_report(&r, "the same 5 jobs, unaligned activation rows", "1, 5, 8, 13, 33, 64");
	for (int j = 0; j < 5; j++)
		free(mats[j].obj);

	for (int j = 0; j < 3; j++)
	{
		mq_random(&mats[j], MQ_FP8, 2304, 4096, 2304, 2100 + j);
		mp[j] = &mats[j];
	}
	mq_dense_case(f, 3, mp, share3, ns_48b, 9, 4, 503, &r);
	mq_dense_report(&r, "48B KDA projections 3 x 4096 x 2304 sharing x", "1, 2, 8, 9, 16, 17, 32, 33, 64");
	for (int j = 0; j < 3; j++)
		free(mats[j].obj);
	mq_random(&mats[0], MQ_FP8, 4096, 2304, 4096, 2200);
	mq_dense_case(f, 1, mp, share3, ns_o, 8, 0, 504, &r);
	mq_dense_report(&r, "48B o_proj 2304 x 4096", "1, 2, 8, 9, 16, 32, 33, 64");
	free(mats[0].obj);
	check_mq_dense_step(f);
	mq_random(&mats[0], MQ_FP8, 2304, 163840, 2304, 2300);
	mq_dense_case(f, 1, mp, share3, ns_lm, 1, 0, 505, &r);
	mq_dense_report(&r, "48B lm_head 163840 x 2304", "2");
	free(mats[0].obj);
	for (int mode = 0; mode < 2; mode++)
	{
		mq_fp8_bytes(&mats[0], 2304, 300, 2304, mode, 2400 + mode);
		mq_dense_case(f, 1, mp, share3, ns_hand, 2, 0, 506 + mode, &r);
		mq_dense_report(&r, mode ? "hand-made FP8 bytes, only subnormals, 300 x 2304" :
						"hand-made FP8 bytes, every non-NaN code, 300 x 2304", "8, 64");
		free(mats[0].obj);
	}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * Two random FP8 models of the 48B shapes (2 layers, seed 7), one at a time
 * (the kernel choice is process-wide, set when a backend is made), with
 * the environment variable var set to dense[v] (NULL: the backend's default): lg[v][b] = the
 * logits of nseqs[b] sequences decoding together for rounds steps
 * (decode_together; the caller frees them).  Returns the vocabulary size.
 */
static int
decode_fp8_pair(const char *var, const char *const dense[2], const int nseqs[3], int rounds, float *lg[2][3])
{
	int32_t    *ids = malloc(sizeof(int32_t) * 100);
	int			V = 0;

	for (int v = 0; v < 2; v++)
	{
		kl_model   *m = random_gpu_model(q48_config, "fp8", dense[v] ? var : NULL, dense[v]);

		V = kl_model_config(m)->vocab_size;
		for (int i = 0; i < 100; i++)
			ids[i] = (int32_t) ((i * 7919 + 13) % V);
		for (int bi = 0; bi < 3; bi++)
			lg[v][bi] = decode_together(m, ids, nseqs[bi], rounds);
		kl_model_free(m);
	}
	free(ids);
	return V;
}

/*
 * The whole model with the dense FP8 kernel on (KL_CUDA_Q_DENSE=2) and off
 * (the default: direct kernel up to 8 rows, staging above), same random
 * FP8 weights of the 48B shapes (2 layers, seed 7; one model at a time: the
 * kernel choice is process-wide, set when a backend is made): 8 sequences
 * decoding together give the same logits bit for bit (every dense product
 * the direct kernel's sums), 32 and 64 sequences within q_tol's bound for
 * routed experts in bf16 (the sums' order differs from the staging
 * kernel's, and a random router's near-tied choices may flip); then tiny_a
 * (its columns multiples of 64) quantized to FP8 at load on the GPU in
 * bf16 with the switch on, against the CPU (check_quantized: prompt, token
 * by token, 3 and 12 sequences together).
 */
static void
check_dense_model(void)
{
	static const int nseqs[3] = {8, 32, 64};
	const int	rounds = 2;
	static const char *const dense[2] = {"0", "2"};	/* 0: the direct and staging kernels */
	float	   *lg[2][3];
	int			V = decode_fp8_pair("KL_CUDA_Q_DENSE", dense, nseqs, rounds, lg);

	for (int bi = 0; bi < 3; bi++)
	{
		int			nseq = nseqs[bi],
					same;
		size_t		cnt = (size_t) rounds * nseq * V;
		double		e = rel_err(lg[1][bi], lg[0][bi], cnt);

		greedy_clear_differs(lg[1][bi], lg[0][bi], rounds * nseq, V, 0.25, &same);
		if (nseq <= 8)
			tap_ok(memcmp(lg[1][bi], lg[0][bi], sizeof(float) * cnt) == 0, "48B shapes (2 layers), FP8, %d "
				   "sequences decoding together (%d steps): KL_CUDA_Q_DENSE=2 equals the direct kernel bit for bit "
				   "(rel err %.2e)", nseq, rounds, e);
		else
			tap_ok(e <= 0.25, "48B shapes (2 layers), FP8, %d sequences decoding together (%d steps): "
				   "KL_CUDA_Q_DENSE=2 vs the staging kernel, rel err %.2e (bounded by 0.25: see q_tol; greedy ids "
				   "%d of %d equal)", nseq, rounds, e, same, rounds * nseq);
		free(lg[0][bi]);
		free(lg[1][bi]);
	}
	setenv("KL_CUDA_Q_DENSE", "2", 1);	/* read when the backend is made */
	check_quantized("tiny_a", "fp8", "bf16");
	unsetenv("KL_CUDA_Q_DENSE");
}

/*
 * The whole model with the slab kernel (KL_CUDA_Q_DENSE=3) against the dense
 * kernel (=2), same random FP8 weights of the 48B shapes (2 layers, seed 7):
 * 8, 32 and 64 sequences decoding together within q_tol's bound (the k
 * split, so the sums' order, differs; a random router's near-tied choices
 * may flip); then tiny_a quantized to FP8 at load in bf16 with =3 and
 * KL_CUDA_Q_MMA=1 (every decode product, batch 1 too, on the tensor cores)
 * against the CPU (check_quantized).
 */
static void
check_dense_model_slab(void)
{
	static const int nseqs[3] = {8, 32, 64};
	const int	rounds = 2;
	static const char *const dense[2] = {"2", "3"};
	float	   *lg[2][3];
	int			V = decode_fp8_pair("KL_CUDA_Q_DENSE", dense, nseqs, rounds, lg);

	for (int bi = 0; bi < 3; bi++)
	{
		int			nseq = nseqs[bi],
					same;
		size_t		cnt = (size_t) rounds * nseq * V;
		double		e = rel_err(lg[1][bi], lg[0][bi], cnt);

		greedy_clear_differs(lg[1][bi], lg[0][bi], rounds * nseq, V, 0.25, &same);
		tap_ok(e <= 0.25, "48B shapes (2 layers), FP8, %d sequences decoding together (%d steps): "
			   "KL_CUDA_Q_DENSE=3 (slab kernel) vs =2, rel err %.2e (bounded by 0.25: see q_tol; greedy ids "
			   "%d of %d equal)", nseq, rounds, e, same, rounds * nseq);
		free(lg[0][bi]);
		free(lg[1][bi]);
	}
	setenv("KL_CUDA_Q_DENSE", "3", 1);	/* read when the backend is made */
	setenv("KL_CUDA_Q_MMA", "1", 1);
	check_quantized("tiny_a", "fp8", "bf16");
	unsetenv("KL_CUDA_Q_MMA");
	unsetenv("KL_CUDA_Q_DENSE");
}

/*
 * KL_CUDA_Q_TWIN: the dense FP8 decode products reading their producers'
 * bf16 twins (the row norms, the fused KDA decode kernel's o, the KDA gated
 * norm, SwiGLU; =1, the default) against converting their input in a
 * launch of their own (=0), the whole model, same random FP8 weights of the
 * 48B shapes (2 layers, seed 7; one model at a time: the switch is read when
 * the backend is made): 1, 2, 8, 9 and 32 sequences decoding together,
 * with a batch-size change after 2 steps (decode_steps), give the same
 * logits bit for bit (a twin holds f32_to_bf16 of the fp32 rows the
 * conversion reads, and the producers' fp32 outputs do not change); then
 * tiny_a quantized to FP8 at load with KL_CUDA_Q_MMA=1 (every decode
 * product on the tensor cores) against the CPU (check_quantized).
 */
static void
check_q_twin_model(void)
{
	static const int nseqs[5] = {1, 2, 8, 9, 32};
	static const char *const tw[2] = {"0", "1"};
	int32_t    *ids = malloc(sizeof(int32_t) * 100);
	float	   *lg[2][5];
	int			V = 0;

	for (int v = 0; v < 2; v++)
	{
		kl_model   *m = random_gpu_model(q48_config, "fp8", "KL_CUDA_Q_TWIN", tw[v]);

		V = kl_model_config(m)->vocab_size;
		for (int i = 0; i < 100; i++)
			ids[i] = (int32_t) ((i * 7919 + 13) % V);
		for (int bi = 0; bi < 5; bi++)
			lg[v][bi] = decode_steps(m, ids, nseqs[bi], 4, 2);
		kl_model_free(m);
	}
	for (int bi = 0; bi < 5; bi++)
	{
		size_t		cnt = (size_t) 4 * nseqs[bi] * V;

		tap_ok(memcmp(lg[1][bi], lg[0][bi], sizeof(float) * cnt) == 0, "48B shapes (2 layers), FP8, %d sequences "
			   "decoding together (2 steps, then 2 of %d): KL_CUDA_Q_TWIN=1 (twins) equals =0 (conversions) bit for "
			   "bit (rel err %.2e)", nseqs[bi], (nseqs[bi] + 1) / 2, rel_err(lg[1][bi], lg[0][bi], cnt));
		free(lg[0][bi]);
		free(lg[1][bi]);
	}
	free(ids);
	setenv("KL_CUDA_Q_MMA", "1", 1);	/* read when the backend is made */
	check_quantized("tiny_a", "fp8", "bf16");
	unsetenv("KL_CUDA_Q_MMA");
}

/*
 * The 48B shapes (q48_config: a dense KDA layer, an MoE MLA layer; 2
 * layers, seed 7) in precision prec with quantize'd weights (NULL: bf16),
 * made once for each of the nv values vals[v] of the environment variable
 * env (one model at a time: the switch is read when the backend is made),
 * nseqs[b] sequences (nb <= 3 counts) decoding together for `rounds` steps:
 * the logits with every value bit for bit those with vals[0].  what: the
 * forms' subject, for the lines.
 */
static void
check_env_48b(const char *prec, const char *quantize, const char *env, const char *const *vals, int nv,
			  const int *nseqs, int nb, int rounds, const char *what)
{
	int32_t		ids[40];
	float	   *lg[3][3];
	int			V = 0;

	for (int v = 0; v < nv && v < 3; v++)
	{
		kl_model   *m = random_gpu_model_in(q48_config, prec, quantize, env, vals[v]);

		V = kl_model_config(m)->vocab_size;
		for (int i = 0; i < 40; i++)
			ids[i] = (int32_t) ((i * 7919 + 13) % V);
		for (int bi = 0; bi < nb && bi < 3; bi++)
			lg[v][bi] = decode_together(m, ids, nseqs[bi], rounds);
		kl_model_free(m);
	}
	for (int bi = 0; bi < nb && bi < 3; bi++)
	{
		size_t		nl = (size_t) rounds * nseqs[bi] * V;

		for (int v = 1; v < nv && v < 3; v++)
			tap_ok(memcmp(lg[v][bi], lg[0][bi], sizeof(float) * nl) == 0, "48B shapes (2 layers), %s weights, %s, "
				   "%d sequence%s decoding together (%d steps): %s, %s=%s = %s=%s bit for bit (logits rel err %.2e)",
				   quantize ? quantize : "bf16", prec, nseqs[bi], nseqs[bi] == 1 ? "" : "s", rounds, what, env,
				   vals[v], env, vals[0], rel_err(lg[v][bi], lg[0][bi], nl));
		for (int v = 0; v < nv && v < 3; v++)
			free(lg[v][bi]);
	}
}

static const char *const env_off_on[2] = {"0", "1"};

/* the block-rows GEMVs' early requests on the 48B shapes (bf16): rows of 2304 and 4096 columns, so the early
 * requests hold whole rows (3 and 4 pieces a thread); 1, 2 and 4 sequences decoding together */
static void
check_rows_early_48b(void)
{
	check_env_48b("bf16", NULL, "KL_CUDA_ROWS_EARLY", env_off_on, 2, (const int[]) {1, 2, 4}, 3, 4,
				  "block-rows GEMVs' whole rows requested early against the first piece only");
}

/*
 * KL_CUDA_EXPERT_B1: the expert products at batch 1 in gemv.cu's tiled
 * kernel against expert_rows_kernel (=0), the whole model: the K = 128
 * random model (bf16 weights, F 128 and D 256: one piece a thread and row,
 * the down tiles past the last row), 1 and 2 sequences (at 2 the switch
 * changes nothing), the default form (4 tiles a block) against =0, logits
 * bit for bit.
 */
static void
check_expert_b1_model(const char *prec, int nseq)
{
	check_kda_env_model(NULL, prec, nseq, "KL_CUDA_EXPERT_B1", "0",
						"batch-1 expert products in the tiled kernel = expert_rows_kernel (KL_CUDA_EXPERT_B1=0)");
}

/*
 * The same on the 48B shapes (check_env_48b): gate/up rows of 2304
 * columns (3 pieces a thread and row), down rows of 1024 (2), 256 experts
 * top 8 + the fused shared one; every form (1, 2, 4 tiles a block, gate/up
 * 4 with down 1, and 2 with down 4 without the shared expert's guess)
 * against =0, 1 and 2 sequences decoding together, logits bit for bit.
 */
static void
check_expert_b1_48b(void)
{
	static const char *const forms[3][3] = {{"0", "1", "2"}, {"0", "4", "4,1"}, {"0", "2,4,0", NULL}};

	for (int f = 0; f < 3; f++)
		check_env_48b("bf16", NULL, "KL_CUDA_EXPERT_B1", forms[f], forms[f][2] ? 3 : 2, (const int[]) {1, 2}, 2, 4,
					  "batch-1 expert products in the tiled kernel against expert_rows_kernel (=0)");
}

/*
 * The same with quantized weights: the FP8 / int4 products of 2 rows (of 1
 * as KL_CUDA_Q_EARLY1 says) run gemv_q.cu's kernel, whose early form
 * requests whole rows of 2304 and 4096 columns (and two pieces a thread of
 * the dense layer's 9216) before the PDL wait.  Precision fp32 takes it at
 * every small batch (1 and 2 sequences); bf16 at batch 1 only (from 2 rows
 * the tensor-core GEMVs: KL_CUDA_Q_MMA_MIN).
 */
static void
check_rows_early_q48(const char *quantize, const char *prec)
{
	check_env_48b(prec, quantize, "KL_CUDA_ROWS_EARLY", env_off_on, 2, (const int[]) {1, 2},
				  strcmp(prec, "fp32") == 0 ? 2 : 1, 3, "gemv_q's whole rows requested early against the first "
				  "piece only");
}

/*
 * KL_CUDA_Q_EARLY1: gemv_q's early form at one input row in the launches of
 * one wave (=1: o_proj and the dense down product, 128-thread
 * blocks) and in every launch (=2: lm_head, q/k/v, MLA's q + kv_a too)
 * against none (=0, the default), FP8 weights of the 48B shapes, one sequence.
 */
static void
check_q_early1_q48(const char *prec)
{
	static const char *const vals[3] = {"0", "1", "2"};

	check_env_48b(prec, "fp8", "KL_CUDA_Q_EARLY1", vals, 3, (const int[]) {1}, 1, 4,
				  "gemv_q's one-row early form against the plain kernel");
}

/*
 * KL_CUDA_NORM_EARLY: the row norms reading their weight (and after a
 * device-routed MoE op the residual, the routing weights and indices)
 * before their PDL wait (=1: the weight; =2: also the residual and routing
 * after the fused decode MoE op; the default) against the waiting form (=0); 1, 2 and 4
 * sequences.  check_norm_early_model: the same on the K = 128 random model
 * (k = 4, group-limited routing: the warp routing kernel), both precisions.
 */
static void
check_norm_early_48b(void)
{
	static const char *const vals[3] = {"0", "1", "2"};

	check_env_48b("bf16", NULL, "KL_CUDA_NORM_EARLY", vals, 3, (const int[]) {1, 2, 4}, 3, 4,
				  "row norms' early reads against the waiting form");
}

/* KL_CUDA_ROUTE_RANK1: one-token steps' routing grouped from ballots against by counts (=0), bf16, one sequence */
static void
check_route_rank1_48b(void)
{
	check_env_48b("bf16", NULL, "KL_CUDA_ROUTE_RANK1", env_off_on, 2, (const int[]) {1}, 1, 4,
				  "one-token routing's grouping from ballots against by counts");
}

/*
 * KL_CUDA_ROWS_WIDE1: o_proj (2304 x 4096) and the dense down product (2304
 * x 9216) at one sequence with 3 (the default) and 4 weight rows a block
 * against 2, bf16.
 */
static void
check_rows_wide1_48b(void)
{
	static const char *const vals[3] = {"2", "3", "4"};

	check_env_48b("bf16", NULL, "KL_CUDA_ROWS_WIDE1", vals, 3, (const int[]) {1}, 1, 4,
				  "wide block-rows GEMV at one row, rows a block");
}

/*
 * KL_CUDA_MLA_FOLD: the MLA decode layer with the append folded into the
 * absorb kernel, the wgmma attention's first key tiles requested before its
 * wait and its Qabs made in bf16 by that absorb kernel (=1, the default),
 * with the fold alone (=2) and with none of them (=0, the separate append
 * launch), the whole model, the same random bf16
 * weights of the 48B shapes (2 layers, one MLA; seed 7; one model at a time:
 * the switch is read when the backend is made).  Sequences with prompts of
 * their own lengths (8500: ranges of two tiles; 1100 past a page; 5: a
 * prompt in the absorbed form, the fold with five new rows a sequence), then
 * six rounds together: single tokens (decode steps, graphs), 3 tokens for
 * the first sequence (several new rows in a decode step), 70 for the last
 * (a mixed step: the fold not taken, the early loads still on), single
 * tokens again.  Every round's logits equal =0's bit for bit (the same
 * cache bytes, the same Qabs and tiles in shared memory).
 */
static float *
fold_rounds(kl_model *m, const int32_t *ids, int nseq, const int *lens)
{
	static const int rounds = 6;
	kl_err		err;
	kl_ctx	   *ctx;
	kl_seq	  **seq = seqs_open(m, &ctx, ids, nseq, lens);
	kl_batch_item *b = calloc((size_t) nseq, sizeof(kl_batch_item));
	int			V = kl_model_config(m)->vocab_size;
	float	   *out = calloc((size_t) rounds * nseq * V, sizeof(float));

	for (int r = 0; r < rounds; r++)
	{
		for (int s = 0; s < nseq; s++)
		{
			int			n = r == 1 && s == 0 ? 3 : r == 2 && s == nseq - 1 ? 70 : 1;

			b[s] = (kl_batch_item) {seq[s], ids + 100 * r + s, n, out + ((size_t) r * nseq + s) * V, false};
		}
		if (kl_forward(ctx, b, nseq, &err) != KL_OK)
			die("batched forward", &err);
	}
	seqs_close(ctx, seq, nseq);
	free(b);
	return out;
}

/* fold_rounds' three cases: 1, 2 and 4 sequences with prompts of these lengths, token ids from FOLD_T made */
static const int fold_nseqs[3] = {1, 2, 4},
			fold_lens[3][4] = {{8500}, {1100, 5}, {300, 70, 5, 1100}};

#define FOLD_T 9000

/* the three cases' logits on model m (freed here) into lg[0 .. 2], with ids (FOLD_T) made for its vocabulary;
 * returns the vocabulary's size */
static int
fold_cases(kl_model *m, int32_t *ids, float **lg)
{
	int			V = kl_model_config(m)->vocab_size;

	for (int i = 0; i < FOLD_T; i++)
		ids[i] = (int32_t) ((i * 7919 + 13) % V);
	for (int bi = 0; bi < 3; bi++)
		lg[bi] = fold_rounds(m, ids, fold_nseqs[bi], fold_lens[bi]);
	kl_model_free(m);
	return V;
}

static void
check_mla_fold_model(void)
{
	const int  *nseqs = fold_nseqs;
	static const char *const fold[3] = {"0", "1", "2"};
	int32_t    *ids = malloc(sizeof(int32_t) * (size_t) FOLD_T);
	float	   *lg[3][3];
	int			V = 0;

	for (int v = 0; v < 3; v++)
		V = fold_cases(random_gpu_model(q48_config, NULL, "KL_CUDA_MLA_FOLD", fold[v]), ids, lg[v]);
	for (int bi = 0; bi < 3; bi++)
	{
		size_t		cnt = (size_t) 6 * nseqs[bi] * V;

		for (int v = 1; v < 3; v++)
			tap_ok(memcmp(lg[v][bi], lg[0][bi], sizeof(float) * cnt) == 0, "48B shapes (2 layers), bf16, %d "
				   "sequences (prompts %d ..), 6 rounds (decode, 3 tokens, 70 tokens, decode): KL_CUDA_MLA_FOLD=%s "
				   "equals =0 bit for bit (rel err %.2e)", nseqs[bi], fold_lens[bi][0], fold[v],
				   rel_err(lg[v][bi], lg[0][bi], cnt));
		for (int v = 0; v < 3; v++)
			free(lg[v][bi]);
	}
	free(ids);
}

/*
 * The wgmma decode attention's forms through the whole model (48B shapes,
 * 2 layers, one MLA; fold_rounds' sequences and rounds: decode steps, a
 * 3-token step, a mixed step; one model at a time, the switches being read
 * when the backend is made): KL_CUDA_MLA_WG_PF=2 equals the default (0)
 * bit for bit; KL_CUDA_MLA_WG_DUAL=1 with blocks of 384 keys equals one
 * range a block of 192 keys (KL_CUDA_MLA_WG_PF=0 there) bit for bit; DUAL
 * at the rule's split (ranges of half the rule's keys: the merge's order
 * changes) against the default within 1e-2, with the greedy ids equal
 * wherever the default's choice is clear of that (greedy_clear_differs).
 */
static void
check_mla_wg_model(void)
{
	const int  *nseqs = fold_nseqs;
	/* the models' switches: KL_CUDA_MLA_WG_SPLIT, _PF, _DUAL (NULL: unset) */
	static const char *const sw[5][3] = {{NULL, NULL, NULL}, {NULL, "2", NULL}, {NULL, NULL, "1"},
	{"384", NULL, "1"}, {"192", "0", "0"}};
	int32_t    *ids = malloc(sizeof(int32_t) * (size_t) FOLD_T);
	float	   *lg[5][3];
	int			V = 0;

	for (int v = 0; v < 5; v++)
	{
		kl_model   *m;

		env_put("KL_CUDA_MLA_WG_SPLIT", sw[v][0]);
		env_put("KL_CUDA_MLA_WG_PF", sw[v][1]);
		env_put("KL_CUDA_MLA_WG_DUAL", sw[v][2]);
		m = random_gpu_model(q48_config, NULL, NULL, NULL);
		env_put("KL_CUDA_MLA_WG_SPLIT", NULL);
		env_put("KL_CUDA_MLA_WG_PF", NULL);
		env_put("KL_CUDA_MLA_WG_DUAL", NULL);
		V = fold_cases(m, ids, lg[v]);
	}
	for (int bi = 0; bi < 3; bi++)
	{
		int			rows = 6 * nseqs[bi],
					same = 0,
					bad = greedy_clear_differs(lg[2][bi], lg[0][bi], rows, V, 1e-2, &same);
		size_t		cnt = (size_t) rows * V;
		double		e = rel_err(lg[2][bi], lg[0][bi], cnt);

		tap_ok(memcmp(lg[1][bi], lg[0][bi], sizeof(float) * cnt) == 0, "48B shapes (2 layers), bf16, %d sequences "
			   "(prompts %d ..), 6 rounds: KL_CUDA_MLA_WG_PF=2 equals the default (0) bit for bit (rel err %.2e)",
			   nseqs[bi], fold_lens[bi][0], rel_err(lg[1][bi], lg[0][bi], cnt));
		tap_ok(memcmp(lg[3][bi], lg[4][bi], sizeof(float) * cnt) == 0, "48B shapes (2 layers), bf16, %d sequences "
			   "(prompts %d ..), 6 rounds: KL_CUDA_MLA_WG_DUAL=1 with blocks of 384 keys equals one range a block "
			   "of 192 bit for bit (rel err %.2e)", nseqs[bi], fold_lens[bi][0], rel_err(lg[3][bi], lg[4][bi], cnt));
		tap_ok(e <= 1e-2 && bad == 0, "48B shapes (2 layers), bf16, %d sequences (prompts %d ..), 6 rounds: "
			   "KL_CUDA_MLA_WG_DUAL=1 at the rule's split against the default (rel err %.2e; greedy ids %d of %d "
			   "equal, %d differ where the default's choice is clear)", nseqs[bi], fold_lens[bi][0], e, same, rows,
			   bad);
		for (int v = 0; v < 5; v++)
			free(lg[v][bi]);
	}
	free(ids);
}

/*
 * KL_CUDA_Q_TWIN with a stale twin, the backend's ops alone (outside a
 * step) on the KDA layer of the FP8 48B-shape model (q_proj [4096, 2304],
 * o_proj [2304, 4096]) at n = 2, 8 and 32 rows: y = rmsnorm(x) (which writes
 * y's twin), z1 = y q_proj^T (reads it), then o_proj writes over y (the
 * twin goes stale: twin_written) and z2 = y q_proj^T again must convert the
 * new y.  z1 and z2 with the switch on equal the switch off's bit for bit
 * (a stale twin would give z2 = z1, which the =0 run shows differs).
 */
static void
check_q_twin_stale(void)
{
	static const int ns[3] = {2, 8, 32};
	static const char *const tw[2] = {"0", "1"};
	float	   *z[2][3][2];
	int			HK = 0;

	for (int v = 0; v < 2; v++)
	{
		kl_model   *m = random_gpu_model(q48_config, "fp8", "KL_CUDA_Q_TWIN", tw[v]);
		const kl_config *c = kl_model_config(m);
		kl_backend *be = m->be;
		const kl_layer *L = &m->layers[0];
		int			D = c->hidden_size;

		for (int l = 0; l < c->n_layers && L->kind != KL_LAYER_KDA; l++)
			L = &m->layers[l];
		HK = L->kda.q_proj.rows;
		if (L->kind != KL_LAYER_KDA || L->kda.o_proj.rows != D || L->kda.q_proj.cols != D)
			die("check_q_twin_stale: no KDA layer of the expected shapes", &be->err);
		for (int i = 0; i < 3; i++)
		{
			int			n = ns[i];
			uint64_t	seed = 4242 + (uint64_t) n;
			size_t		sx = sizeof(float) * (size_t) n * D,
						sq = sizeof(float) * (size_t) n * HK;
			float	   *hx = malloc(sx),
					   *hq = malloc(sq),
					   *dx = be->ops->alloc(be, sx),
					   *dy = be->ops->alloc(be, sx),
					   *dq = be->ops->alloc(be, sq),
					   *dz = be->ops->alloc(be, sq);

			if (!hx || !hq || !dx || !dy || !dq || !dz)
				die("memory for check_q_twin_stale", &be->err);
			for (size_t k = 0; k < (size_t) n * D; k++)
				hx[k] = (float) (unif(&seed) * 2 - 1);
			for (size_t k = 0; k < (size_t) n * HK; k++)
				hq[k] = (float) (unif(&seed) * 2 - 1);
			be->ops->upload(be, dx, hx, sx);
			be->ops->upload(be, dq, hq, sq);
			z[v][i][0] = malloc(sq);
			z[v][i][1] = malloc(sq);
			be->ops->rmsnorm(be, dy, D, dx, D, L->input_norm, n, D, c->rms_norm_eps);
			be->ops->matmul(be, dz, HK, dy, D, n, &L->kda.q_proj);
			be->ops->download(be, z[v][i][0], dz, sq);
			be->ops->matmul(be, dy, D, dq, HK, n, &L->kda.o_proj);	/* y written over: its twin is stale */
			be->ops->matmul(be, dz, HK, dy, D, n, &L->kda.q_proj);
			be->ops->download(be, z[v][i][1], dz, sq);
			if (be->failed)
				die("check_q_twin_stale", &be->err);
			be->ops->release(be, dx);
			be->ops->release(be, dy);
			be->ops->release(be, dq);
			be->ops->release(be, dz);
			free(hx);
			free(hq);
		}
		kl_model_free(m);
	}
	for (int i = 0; i < 3; i++)
	{
		size_t		sq = sizeof(float) * (size_t) ns[i] * HK;

		tap_ok(memcmp(z[1][i][0], z[0][i][0], sq) == 0 && memcmp(z[1][i][1], z[0][i][1], sq) == 0 &&
			   memcmp(z[0][i][0], z[0][i][1], sq) != 0,
			   "KL_CUDA_Q_TWIN, %d rows: a product reading the norm's twin, then (its input written over by another "
			   "product) the same product again: both equal the switch off's bit for bit (the stale twin not read)",
			   ns[i]);
		for (int k = 0; k < 2; k++)
		{
			free(z[0][i][k]);
			free(z[1][i][k]);
		}
	}
}

/*
 * var = on[0] and = on[1] give the same logits bit for bit: the whole model,
 * same random FP8 weights of the 48B shapes (2 layers, seed 7), nseqs[b]
 * sequences decoding together for 2 steps (decode_fp8_pair); what names the
 * variant in the messages.
 */
static void
check_fp8_same_bits(const char *var, const char *const on[2], const int nseqs[3], const char *what)
{
	const int	rounds = 2;
	float	   *lg[2][3];
	int			V = decode_fp8_pair(var, on, nseqs, rounds, lg);

	for (int bi = 0; bi < 3; bi++)
	{
		size_t		cnt = (size_t) rounds * nseqs[bi] * V;

		tap_ok(memcmp(lg[1][bi], lg[0][bi], sizeof(float) * cnt) == 0, "48B shapes (2 layers), FP8, %d sequences "
			   "decoding together (%d steps): %s=%s (%s) equals =%s bit for bit (rel err %.2e)", nseqs[bi], rounds,
			   var, on[1], what, on[0], rel_err(lg[1][bi], lg[0][bi], cnt));
		free(lg[0][bi]);
		free(lg[1][bi]);
	}
}

/*
 * KL_CUDA_Q_DENSE_OCC (the dense FP8 kernel at 2-8 tokens: 3 blocks an SM,
 * the default, or 2 with twice the chunks a register set): the same sums
 * in the same order, so the same logits bit for bit (check_fp8_same_bits);
 * then tiny_a quantized to FP8 at load with =2 against the CPU
 * (check_quantized).
 */
static void
check_dense_model_occ(void)
{
	static const char *const occ[2] = {"2", "3"};
	static const int few[3] = {2, 5, 8};

	check_fp8_same_bits("KL_CUDA_Q_DENSE_OCC", occ, few, "dense kernel, 3 blocks an SM");
	setenv("KL_CUDA_Q_DENSE_OCC", "2", 1);	/* read when the backend is made */
	check_quantized("tiny_a", "fp8", "bf16");
	unsetenv("KL_CUDA_Q_DENSE_OCC");
}

/*
 * The whole model with the L2 prefetch of KL_CUDA_Q_L2 (bit 1, the default:
 * each dense FP8 block's weight rows from 9 rows) against off, same random
 * FP8 weights of the 48B shapes (2 layers, seed 7): 8, 32 and 64 sequences
 * decoding together give the same logits bit for bit (a prefetch is a
 * hint: no result may change; 8 rows take no prefetch, a control); then
 * tiny_a quantized to FP8 at load against the CPU with it on.
 */
static void
check_dense_model_l2(void)
{
	static const int nseqs[3] = {8, 32, 64};
	static const char *const l2[2] = {"0", "1"};

	check_fp8_same_bits("KL_CUDA_Q_L2", l2, nseqs, "L2 prefetch of the dense and tokens-as-M blocks' weight rows");
	setenv("KL_CUDA_Q_L2", "1", 1);	/* read when the backend is made (the default, set all the same) */
	setenv("KL_CUDA_Q_MMA", "1", 1);
	check_quantized("tiny_a", "fp8", "bf16");
	unsetenv("KL_CUDA_Q_MMA");
	unsetenv("KL_CUDA_Q_L2");
}

/*
 * KL_CUDA_PREFETCH_Q=1 (quantized weights take the decode step's L2 prefetch
 * hints, which act at 8-16 tokens; the default skips them) against the
 * default, same random FP8 weights of the 48B shapes (2 layers, seed 7): 8,
 * 12 and 16 sequences decoding together give the same logits bit for bit (a
 * prefetch is a hint: no result may change).
 */
static void
check_prefetch_quantized(void)
{
	static const int nseqs[3] = {8, 12, 16};
	static const char *const pq[2] = {"0", "1"};

	check_fp8_same_bits("KL_CUDA_PREFETCH_Q", pq, nseqs, "L2 prefetch hints for quantized weights");
}

/* kl_cuda_test_expert_mma_q (src/cuda/cuda_mma_q_test.c) */
typedef int (*expert_mma_q_fn) (int n, int E, int k, int D, int F, int fmt, int group, int group_down,
								const int *sel, const void *const *gate, const void *const *up,
								const void *const *down, const float *x, const float *h, float *out, int *start,
								int *xrow);

/*
 * kk_expert_mma_q (kernels/mma_q.cu) in its three modes (SwiGLU gate/up,
 * the two matrices, down) on a decode step's grouping (kk_moe_group, items
 * of 8, the shared expert over every token), random quantized experts
 * (kl_q_quantize_rows), against the double reference of the bf16-rounded
 * activations and kl_q_dequant_row's weights: rel err <= 1e-5 for each
 * output (SwiGLU: silu(gate) * up of the reference products).  Routing
 * choices are drawn on the host, skewed so that expert 0 takes about half
 * the tokens (several items at 32 tokens).  Shapes: the 48B model's expert
 * matrices (D 2304, F 1024; 8 experts top 4 to keep the host reference
 * short) at 8 and 32 tokens; tiny_a's (D 128, F 64, 8 top 2) and D 96,
 * F 192 (4 top 2) at 8 tokens.  Forms: FP8 one scale a row and groups of
 * 128, int4 groups of 32 and 128.
 */
static void
check_expert_mma_q(void)
{
	static const struct
	{
		int			n,
					E,
					k,
					D,
					F;
		const char *what;
	}			shapes[] = {
		{8, 8, 4, 2304, 1024, "48B experts D 2304 F 1024, 8 top 4, 8 tokens"},
		{32, 8, 4, 2304, 1024, "48B experts D 2304 F 1024, 8 top 4, 32 tokens"},
		{8, 8, 2, 128, 64, "tiny_a experts D 128 F 64, 8 top 2, 8 tokens"},
		{8, 4, 2, 96, 192, "D 96 F 192, 4 top 2, 8 tokens"},
	};
	static const struct
	{
		int			fmt,
					group;
		const char *what;
	}			forms[] = {
		{MQ_FP8, 0, "fp8 one scale a row"},
		{MQ_FP8, 128, "fp8 group 128"},
		{MQ_INT4, 32, "int4 group 32"},
		{MQ_INT4, 128, "int4 group 128"},
	};
	kl_model   *m;
	void	   *lib = NULL;
	expert_mma_q_fn f = NULL;

	m = load_test_hook("kl_cuda_test_expert_mma_q", &lib, (void **) &f);
	if (!f)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
		for (size_t fi = 0; fi < sizeof(forms) / sizeof(forms[0]); fi++)
		{
			int			n = shapes[si].n,
						E = shapes[si].E,
						k = shapes[si].k,
						D = shapes[si].D,
						F = shapes[si].F,
						nk = n * k,
						R = nk + n,
						fmt = forms[fi].fmt;
			int			gg = forms[fi].group && forms[fi].group < D ? forms[fi].group : D,
						gd = forms[fi].group && forms[fi].group < F ? forms[fi].group : F;
			uint64_t	seed = 900 + 10 * si + fi;
			mq_mat	   *mats = calloc(3 * ((size_t) E + 1), sizeof(mq_mat));
			const void **tab = malloc(sizeof(void *) * 3 * ((size_t) E + 1));
			int		   *sel = malloc(sizeof(int) * nk),
					   *start = malloc(sizeof(int) * (E + 2)),
					   *xrow = malloc(sizeof(int) * R);
			float	   *x = malloc(sizeof(float) * n * D),
					   *h = malloc(sizeof(float) * R * F),
					   *xb = malloc(sizeof(float) * n * D),
					   *hb = malloc(sizeof(float) * R * F),
					   *out = malloc(sizeof(float) * R * (3 * (size_t) F + D)),
					   *wrow = malloc(sizeof(float) * (D > F ? D : F));
			double	   *ref = malloc(sizeof(double) * R * (3 * (size_t) F + D)),
						worst[4] = {0, 0, 0, 0};
			int			rc;

			for (int e = 0; e <= E; e++)
			{
				mq_random(&mats[e], fmt, gg, F, D, seed * 1000 + 3 * e);
				mq_random(&mats[E + 1 + e], fmt, gg, F, D, seed * 1000 + 3 * e + 1);
				mq_random(&mats[2 * (E + 1) + e], fmt, gd, D, F, seed * 1000 + 3 * e + 2);
				tab[e] = mats[e].obj;
				tab[E + 1 + e] = mats[E + 1 + e].obj;
				tab[2 * (E + 1) + e] = mats[2 * (E + 1) + e].obj;
			}
			/* k distinct experts a token, expert 0 first for about half of them */
			for (int i = 0; i < n; i++)
				for (int j = 0; j < k; j++)
				{
					int			c,
								dup;

					do
					{
						c = j == 0 && unif(&seed) < 0.5 ? 0 : (int) (unif(&seed) * E);
						dup = 0;
						for (int q = 0; q < j; q++)
							dup |= sel[i * k + q] == c;
					} while (dup);
					sel[i * k + j] = c;
				}
			for (size_t i = 0; i < (size_t) n * D; i++)
				x[i] = (float) (unif(&seed) * 2 - 1);
			for (size_t i = 0; i < (size_t) R * F; i++)
				h[i] = (float) ((unif(&seed) * 2 - 1) * 0.1);
			mq_round_bf16(xb, x, (size_t) n * D);
			mq_round_bf16(hb, h, (size_t) R * F);
			rc = f(n, E, k, D, F, fmt, gg, gd, sel, tab, tab + (E + 1), tab + 2 * (E + 1), x, h, out, start, xrow);
			if (rc == 0)
			{
				double	   *rg = ref + (size_t) R * F,
						   *ru = ref + 2 * (size_t) R * F,
						   *rd = ref + 3 * (size_t) R * F;

				for (int e = 0; e <= E; e++)
				{
					for (int r = 0; r < F; r++)
						for (int mi = 0; mi < 2; mi++)
						{
							kl_q_dequant_row(&mats[mi * (E + 1) + e].q, r, wrow);
							for (int i = start[e]; i < start[e + 1]; i++)
							{
								double		s = 0;

								for (int c = 0; c < D; c++)
									s += (double) xb[(size_t) xrow[i] * D + c] * wrow[c];
								(mi ? ru : rg)[(size_t) i * F + r] = s;
							}
						}
					for (int r = 0; r < D; r++)
					{
						kl_q_dequant_row(&mats[2 * (E + 1) + e].q, r, wrow);
						for (int i = start[e]; i < start[e + 1]; i++)
						{
							double		s = 0;

							for (int c = 0; c < F; c++)
								s += (double) hb[(size_t) i * F + c] * wrow[c];
							rd[(size_t) i * D + r] = s;
						}
					}
				}
				for (size_t i = 0; i < (size_t) R * F; i++)
					ref[i] = rg[i] / (1 + exp(-rg[i])) * ru[i];
				for (int o = 0; o < 4; o++)
				{
					size_t		off = (size_t) o * R * F,
								len = o < 3 ? (size_t) R * F : (size_t) R * D;

					worst[o] = mq_rel(out + off, ref + off, len);
				}
			}
			tap_ok(rc == 0 && start[E + 1] == R && worst[0] <= 1e-5 && worst[1] <= 1e-5 && worst[2] <= 1e-5 &&
				   worst[3] <= 1e-5, "tensor-core expert products of quantized weights, %s, %s: rel err SwiGLU "
				   "%.2e, gate %.2e, up %.2e, down %.2e against the double reference (hook returned %d)",
				   forms[fi].what, shapes[si].what, worst[0], worst[1], worst[2], worst[3], rc);
			for (int i = 0; i < 3 * (E + 1); i++)
				free(mats[i].obj);
			free(mats);
			free(tab);
			free(sel);
			free(start);
			free(xrow);
			free(x);
			free(h);
			free(xb);
			free(hb);
			free(out);
			free(wrow);
			free(ref);
		}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * KL_TEST_ONLY=a,b,...: run only the checks whose call (as written in main, e.g.
 * "check_mla_flash()" or "check_golden(\"tiny_a\"") contains one of the
 * comma-separated strings; unset or empty: all.  For a quick device run of the
 * checks a change touches; the full run is the default.
 */
static bool
test_wanted(const char *call)
{
	const char *only = getenv("KL_TEST_ONLY");
	char		buf[256];
	char	   *save = NULL;

	if (only == NULL || only[0] == '\0')
		return true;
	snprintf(buf, sizeof(buf), "%s", only);
	for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save))
		if (t[0] != '\0' && strstr(call, t) != NULL)
			return true;
	return false;
}

#define RUN(call) do { if (test_wanted(#call)) call; } while (0)

/* ------------------------------------------------------------------ precision fp8 (W8A8) */

/*
 * The host reference of an activation row's rounding (kernels/fp8_act.cu):
 * scale = amax / 448 (1 where not > 0, NaN ignored), codes quant.c's
 * kl_f32_to_e4m3 of v / scale (nearest even, saturating at 448).
 */
static float
fp8_ref_row(const float *x, int cols, uint8_t *q)
{
	float		m = 0.0f,
				s;

	for (int c = 0; c < cols; c++)
		m = fmaxf(m, fabsf(x[c]));
	s = m / 448.0f;
	if (!(s > 0.0f))
		s = 1.0f;
	for (int c = 0; c < cols; c++)
		q[c] = kl_f32_to_e4m3(x[c] / s);
	return s;
}

typedef int (*fp8_quant_fn) (int rows, int cols, int ldx, const float *x, uint8_t *q, float *scales);
typedef int (*fp8_matmul_fn) (kl_backend *be, int n, int rows, int cols, const float *x, const uint8_t *wq,
							  const float *ws, float *y);
typedef int (*fp8_stats_fn) (kl_backend *be, long out[5]);

/* kk_fp8_quant_rows against fp8_ref_row, bit for bit: random rows, a zero row, ties, saturation, subnormals */
static void
check_fp8_quant(void)
{
	static const int shapes[][3] = {{7, 2304, 2304}, {5, 100, 103}, {3, 64, 68}, {2, 3, 5}};
	void	   *lib;
	fp8_quant_fn f;
	kl_model   *m = load_test_hook("kl_cuda_test_fp8_quant", &lib, (void **) &f);
	uint64_t	rs = 0xf8f8f8;

	if (!m)
		return;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
	{
		int			rows = shapes[si][0],
					cols = shapes[si][1],
					ldx = shapes[si][2],
					rc,
					bad = 0,
					bad_s = 0;
		float	   *x = rand_floats((size_t) rows * ldx, -3.0, 3.0, &rs),
				   *sc = malloc(sizeof(float) * rows);
		uint8_t    *q = malloc((size_t) rows * cols),
				   *ref = malloc((size_t) cols);

		/* row 0 all zero; row 1: values on E4M3 ties after scaling, one beyond 448 x scale rounding */
		memset(x, 0, sizeof(float) * cols);
		if (rows > 2)
			for (int c = 0; c < cols; c++)
				x[ldx + c] = c == 0 ? 448.0f : (float) ((c % 29) - 14) * 1.0625f + (c % 3 == 0 ? 1e-6f : 0.0f);
		/* the last row: tiny magnitudes next to one large (subnormal codes) */
		for (int c = 0; c < cols; c++)
			x[(size_t) (rows - 1) * ldx + c] = c == 0 ? 1000.0f : x[(size_t) (rows - 1) * ldx + c] * 1e-3f;
		rc = f(rows, cols, ldx, x, q, sc);
		for (int r = 0; r < rows && rc == 0; r++)
		{
			float		s = fp8_ref_row(x + (size_t) r * ldx, cols, ref);

			bad_s += memcmp(&s, &sc[r], sizeof(float)) != 0;
			for (int c = 0; c < cols; c++)
				bad += ref[c] != q[(size_t) r * cols + c];
		}
		tap_ok(rc == 0 && bad == 0 && bad_s == 0, "fp8 activations: %d rows of %d (stride %d) rounded to E4M3 per row "
			   "as the host reference, bit for bit (%d codes, %d scales differ; rc %d)", rows, cols, ldx, bad, bad_s, rc);
		free(x);
		free(sc);
		free(q);
		free(ref);
	}
	dlclose(lib);
	kl_model_free(m);
}

/*
 * The dense W8A8 product (cuBLASLt, outer-vector scales) against a double
 * reference on the same E4M3 operands (the activations quantized by the
 * host reference): not fp32 rounding alone, as Hopper's FP8 tensor cores add the products of
 * a k block in an accumulator narrower than fp32 (about 14 mantissa bits)
 * before cuBLASLt carries the sum into fp32; the H200 measured 1.5e-4 ..
 * 2.3e-4 relative on these shapes (2026-12-01).  The bound is twice the
 * largest, 250x below the E4M3 rounding of the activations (2^-4) the mode
 * accepts.
 */
#define TOL_FP8_ACCUM 5e-4

static void
check_fp8_matmul(void)
{
	static const int shapes[][3] = {{65, 256, 512}, {200, 1024, 2304}, {333, 96, 64}};
	char		dir[1024];
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;
	void	   *lib = NULL;
	fp8_matmul_fn f = NULL;
	uint64_t	rs = 0x5eed8;

	snprintf(dir, sizeof(dir), "%s/golden/tiny_c", tap_fixture_dir());
	o.device = "cuda";
	o.precision = "fp8";
	o.quantize = "fp8";
	if (kl_model_load(dir, &o, &m, &err) != KL_OK)
	{
		tap_ok(0, "tiny_c quantized to fp8 loads in precision fp8: %s", err.msg);
		return;
	}
	*(void **) &f = backend_symbol(m, "kl_cuda_test_fp8_matmul", &lib);
	if (!tap_ok(f != NULL, "the CUDA library exports kl_cuda_test_fp8_matmul"))
		goto out;
	for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
	{
		int			n = shapes[si][0],
					rows = shapes[si][1],
					cols = shapes[si][2],
					rc;
		float	   *x = rand_floats((size_t) n * cols, -2.0, 2.0, &rs),
				   *ws = rand_floats((size_t) rows, 0.001, 0.003, &rs),
				   *y = malloc(sizeof(float) * (size_t) n * rows),
				   *ref = malloc(sizeof(float) * (size_t) n * rows),
				   *xs = malloc(sizeof(float) * n);
		uint8_t    *wq = malloc((size_t) rows * cols),
				   *xq = malloc((size_t) n * cols);

		for (size_t i = 0; i < (size_t) rows * cols; i++)
		{
			uint8_t		b = (uint8_t) (mix_rand(&rs) & 0xff);

			wq[i] = (b & 0x7f) == 0x7f ? 0x00 : b;	/* no NaN codes */
		}
		for (int t = 0; t < n; t++)
			xs[t] = fp8_ref_row(x + (size_t) t * cols, cols, xq + (size_t) t * cols);
		for (int t = 0; t < n; t++)
			for (int r = 0; r < rows; r++)
			{
				double		acc = 0;

				for (int c = 0; c < cols; c++)
					acc += (double) kl_e4m3_to_f32(xq[(size_t) t * cols + c]) *
						kl_e4m3_to_f32(wq[(size_t) r * cols + c]);
				ref[(size_t) t * rows + r] = (float) (acc * xs[t] * ws[r]);
			}
		rc = f(m->be, n, rows, cols, x, wq, ws, y);
		if (rc == 1)
		{
			char		why[160];

			snprintf(why, sizeof(why), "fp8 W8A8 product %d x %d x %d: cuBLASLt refused the shape (bf16 panels run)",
					 n, rows, cols);
			tap_skip(why);
		}
		else
		{
			double		e = rc == 0 ? rel_err(y, ref, (size_t) n * rows) : INFINITY;

			tap_ok(rc == 0 && e <= TOL_FP8_ACCUM, "fp8 W8A8 product of %d rows, W %d x %d (cuBLASLt, outer-vector scales) "
				   "against a double reference on the quantized operands: rel err %.2e (rc %d)", n, rows, cols, e, rc);
		}
		free(x);
		free(ws);
		free(y);
		free(ref);
		free(xs);
		free(wq);
		free(xq);
	}
out:
	if (lib)
		dlclose(lib);
	kl_model_free(m);
}

/*
 * n ids from the prompt_ids arrays of a model's training.json, in order and
 * repeated to n (the bundled model's own prompts: text it was trained on);
 * false when the file is missing or holds none.
 */
static bool
training_prompt_ids(const char *dir, int32_t *ids, int n)
{
	char		path[1200];
	FILE	   *f;
	char	   *json;
	long		len;
	int			got = 0;

	snprintf(path, sizeof(path), "%s/training.json", dir);
	if (!(f = fopen(path, "rb")))
		return false;
	fseek(f, 0, SEEK_END);
	len = ftell(f);
	fseek(f, 0, SEEK_SET);
	json = calloc(1, (size_t) len + 1);
	if (fread(json, 1, (size_t) len, f) != (size_t) len)
		len = 0;
	fclose(f);
	for (const char *p = json; len > 0 && got < n && (p = strstr(p, "\"prompt_ids\"")) != NULL; p++)
	{
		const char *q = strchr(p, '[');

		for (q++; q && *q != ']' && got < n; q++)
			if (*q >= '0' && *q <= '9')
			{
				ids[got++] = (int32_t) strtol(q, (char **) &q, 10);
				q--;
			}
	}
	free(json);
	/* the prompts are short (20 ids): repeated, as the golden models' ids are */
	for (int i = got; got > 0 && i < n; i++)
		ids[i] = ids[i % got];
	return got > 0;
}

/*
 * A model quantized at load to FP8, in precision fp8 against the same in
 * precision bf16 (weight-only FP8) on the GPU, a prompt of 160 tokens in one
 * call (golden models: their golden ids repeated; the bundled model: its
 * training prompts): the W8A8 paths run (their counts say which), and the
 * logits stay within tol of bf16's.  The bounds are about twice what the
 * H200 measured (2026-12-01): a guard against regressions, not a proof of
 * the kernels (check_fp8_quant and check_fp8_matmul are).  W8A8 rounds each
 * activation row of a product to E4M3 (3 mantissa bits): random models
 * amplify that (tiny_c 7.6e-2, tiny_a 2.9e-1 with near-tied expert choices
 * flipping), the trained bundled model less (2.4e-2, no clear greedy choice
 * changed; its perplexity over the held-out corpus +0.17 % against
 * weight-only FP8: bench/results/cuda.md).  clear: its greedy ids must equal
 * bf16's wherever bf16's choice is clear of tol (trained models only).
 */
static void
check_fp8_model(const char *model, double tol, bool clear)
{
	char		dir[1024],
				gpath[1200];
	kl_load_opts o = {0};
	kl_model   *g16,
			   *g8;
	kl_err		err;
	kl_safetensors st = {0};
	const kl_st_tensor *ids;
	int32_t		prompt[160];
	int			T = 160,
				V,
				same,
				bad;
	float	   *l16,
			   *l8;
	double		e;
	long		stats[5] = {0};
	void	   *lib = NULL;
	fp8_stats_fn f = NULL;
	bool		golden = strncmp(model, "tiny_", 5) == 0;

	if (golden)
	{
		snprintf(dir, sizeof(dir), "%s/golden/%s", tap_fixture_dir(), model);
		snprintf(gpath, sizeof(gpath), "%s/golden.safetensors", dir);
		if (kl_st_open_file(gpath, &st, &err) != KL_OK || !(ids = kl_st_find(&st, "input_ids")))
			die("golden data", &err);
		for (int i = 0; i < T; i++)
			prompt[i] = ((const int32_t *) ids->data)[i % ids->numel];
	}
	else
	{
		snprintf(dir, sizeof(dir), "%s/%s", tap_models_dir(), model);
		if (access(dir, R_OK) != 0)
			snprintf(dir, sizeof(dir), "models/%s", model);
		if (!tap_ok(training_prompt_ids(dir, prompt, T), "%s: prompt ids from its training.json", model))
			return;
	}
	o.device = "cuda";
	o.quantize = "fp8";
	o.precision = "bf16";
	if (kl_model_load(dir, &o, &g16, &err) != KL_OK)
		die("fp8 model in precision bf16", &err);
	o.precision = "fp8";
	if (kl_model_load(dir, &o, &g8, &err) != KL_OK)
		die("fp8 model in precision fp8", &err);
	V = kl_model_config(g8)->vocab_size;
	l16 = logits_of(g16, prompt, T, 0, false, NULL);
	l8 = logits_of(g8, prompt, T, 0, false, NULL);
	e = rel_err(l8, l16, (size_t) T * V);
	bad = greedy_clear_differs(l8, l16, T, V, tol, &same);
	*(void **) &f = backend_symbol(g8, "kl_cuda_fp8_stats", &lib);
	if (f)
		f(g8->be, stats);
	tap_ok(strcmp(kl_model_precision(g8), "fp8") == 0 && stats[0] > 0 && e <= tol && (!clear || bad == 0),
		   "%s fp8 weights, precision fp8 (W8A8) against precision bf16 on the GPU, %d tokens in one call: rel err "
		   "%.2e (bound %.2g), greedy ids %d of %d equal, %d differ where bf16's choice is clear; %ld dense W8A8 "
		   "products (%ld refused), %ld MoE ops with FP8 expert batches (experts refused: %ld)", model, T, e, tol,
		   same, T, bad, stats[0], stats[1], stats[2], stats[4]);
	if (lib)
		dlclose(lib);
	free(l16);
	free(l8);
	kl_model_free(g16);
	kl_model_free(g8);
	if (golden)
		kl_st_close(&st);
	/* without FP8 weights the mode is refused at load */
	o.quantize = NULL;
	g8 = NULL;
	tap_ok(kl_model_load(dir, &o, &g8, &err) == KL_FAIL && strstr(err.msg, "precision fp8 needs FP8 weights"),
		   "%s without FP8 weights in precision fp8 is refused (%s)", model, err.msg);
	if (g8)
		kl_model_free(g8);
}

int
main(void)
{
	char		dir[1024];
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;
	const char *req = getenv("KL_REQUIRE_GPU");

	/* is there a GPU and the library? */
	snprintf(dir, sizeof(dir), "%s/golden/tiny_c", tap_fixture_dir());
	o.device = "cuda";
	if (kl_model_load(dir, &o, &m, &err) != KL_OK)
	{
		if (req && strcmp(req, "1") == 0)
		{
			tap_ok(0, "the CUDA backend loads: %s", err.msg);
			return tap_done();
		}
		tap_diag("%s", err.msg);
		tap_skip("no GPU");
		return tap_done();
	}
	kl_model_free(m);

	RUN(check_sampler(1));
	RUN(check_sampler(0));
	RUN(check_sampler(2));
	RUN(check_route_warp());
	RUN(check_route_rank());
	RUN(check_route_rank1());
	RUN(check_moe_pad_group());
	RUN(check_expert_mma());
	RUN(check_gemv_slab());
	RUN(check_gemv_q());
	RUN(check_rows_early_gemv_q());
	RUN(check_rows_wide1());
	RUN(check_expert_gemv_q());
	RUN(check_expert_paths());
	RUN(check_mla_small());
	RUN(check_mla_decode());
	RUN(check_mla_wg_forms());
	RUN(check_mla_flash());
	RUN(check_kda_decode());
	RUN(check_kda_elem_warp());
	RUN(check_kda_prep16());
	RUN(check_kda_prep_form());
	RUN(check_kda_chunked_mma());
	RUN(check_kda_prep_split());
	RUN(check_kda_kp6_intra());
	for (int mi = 0; mi < 2; mi++)
		for (int pi = 0; pi < 2; pi++)
			for (int bi = 0; bi < 3; bi++)
				RUN(check_kda_fused_model(mi ? "tiny_c" : "tiny_a", pi ? "bf16" : "fp32", (int[]) {1, 3, 8}[bi]));
	for (int mi = 0; mi < 3; mi++)
		for (int pi = 0; pi < 2; pi++)
			for (int bi = 0; bi < 3; bi++)
				RUN(check_kda_dec_early_model((const char *[]) {"tiny_a", "tiny_c", NULL}[mi], pi ? "bf16" : "fp32",
											  (int[]) {1, 2, 4}[bi]));
	for (int pi = 0; pi < 2; pi++)
		for (int bi = 0; bi < 3; bi++)
			RUN(check_rows_early_model(pi ? "bf16" : "fp32", (int[]) {1, 2, 4}[bi]));
	RUN(check_rows_early_48b());
	for (int pi = 0; pi < 2; pi++)
		for (int bi = 0; bi < 2; bi++)
			RUN(check_expert_b1_model(pi ? "bf16" : "fp32", bi + 1));
	RUN(check_expert_b1_48b());
	for (int qi = 0; qi < 2; qi++)
		for (int pi = 0; pi < 2; pi++)
			RUN(check_rows_early_q48(qi ? "int4" : "fp8", pi ? "bf16" : "fp32"));
	for (int pi = 0; pi < 2; pi++)
		RUN(check_q_early1_q48(pi ? "bf16" : "fp32"));
	for (int pi = 0; pi < 2; pi++)
		for (int bi = 0; bi < 3; bi++)
			RUN(check_norm_early_model(pi ? "bf16" : "fp32", (int[]) {1, 2, 4}[bi]));
	RUN(check_norm_early_48b());
	RUN(check_route_rank1_48b());
	RUN(check_rows_wide1_48b());
	RUN(check_golden("tiny_a", "golden.safetensors", "fp32"));
	RUN(check_golden("tiny_a", "golden_route_select.safetensors", "fp32"));
	RUN(check_golden("tiny_c", "golden.safetensors", "fp32"));
	/* bf16 as users get it: precision auto, the default on the GPU (3e-2, 8 greedy ids identical) */
	RUN(check_golden("tiny_a", "golden.safetensors", "auto"));
	RUN(check_golden("tiny_a", "golden_route_select.safetensors", "auto"));
	RUN(check_golden("tiny_c", "golden.safetensors", "auto"));
	/* 12: plain products through cuBLAS; 8: through the tensor-core GEMV (gemv_mma_kernel) */
	RUN(check_golden_batch("tiny_a", 12));
	RUN(check_golden_batch("tiny_c", 12));
	RUN(check_golden_batch("tiny_a", 8));
	RUN(check_golden_batch("tiny_c", 8));
	RUN(check_big_shapes());
	RUN(check_big_bf16_routing());
	RUN(check_pgdocs("fp32"));
	RUN(check_pgdocs("bf16"));
	RUN(check_mla_mma_trained());
	RUN(check_graph_logit_rows());
	RUN(check_prefetch_neutral("fp32"));
	RUN(check_prefetch_neutral("bf16"));
	RUN(check_bf16_twin_kernels());
	RUN(check_bf16_twin_model(big_config, "K=128/R=512 shapes", NULL, 150, 40, false));
	RUN(check_bf16_twin_model(big_config, "K=128/R=512 shapes", NULL, 150, 40, true));
	RUN(check_bf16_twin_model(big_config, "K=128/R=512 shapes", "int4", 150, 40, false));
	RUN(check_bf16_twin_model(q48_config, "48B shapes (2 layers)", NULL, 700, 300, false));
	RUN(check_kda_prep_fused_model(big_config, "K=128/R=512 shapes", 333, 100));
	RUN(check_kda_prep_fused_model(q48_config, "48B shapes (2 layers)", 700, 300));
	RUN(check_kda_in16_model(big_config, "K=128/R=512 shapes", 333, 100));
	RUN(check_kda_in16_model(q48_config, "48B shapes (2 layers)", 700, 300));
	RUN(check_q_dequant());
	RUN(check_q_fill());
	for (int mi = 0; mi < 2; mi++)
		for (int qi = 0; qi < 3; qi++)
			for (int pi = 0; pi < 2; pi++)
				RUN(check_quantized(mi ? "tiny_c" : "tiny_a", (const char *[]) {"fp8", "int8", "int4"}[qi],
									pi ? "bf16" : "fp32"));
	RUN(check_quantized_published());
	RUN(check_big_quantized("fp8", "fp32"));
	RUN(check_big_quantized("int8", "fp32"));
	RUN(check_big_quantized("int4", "fp32"));
	RUN(check_big_quantized("fp8", "bf16"));
	RUN(check_big_quantized("int4", "bf16"));
	RUN(check_48b_quantized("fp8"));
	RUN(check_48b_quantized("int4"));
	RUN(check_gemv_mma_q());
	RUN(check_gemv_mma_q_dense());
	RUN(check_dense_model());
	RUN(check_dense_model_slab());
	RUN(check_q_twin_model());
	RUN(check_mla_fold_model());
	RUN(check_mla_wg_model());
	RUN(check_q_twin_stale());
	RUN(check_dense_model_occ());
	RUN(check_dense_model_l2());
	RUN(check_prefetch_quantized());
	RUN(check_expert_mma_q());
	RUN(check_fp8_quant());
	RUN(check_fp8_matmul());
	RUN(check_fp8_model("tiny_c", 0.15, false));
	RUN(check_fp8_model("tiny_a", 0.6, false));
	RUN(check_fp8_model("pgdocs-kimi-18m", 0.05, true));
	return tap_done();
}
