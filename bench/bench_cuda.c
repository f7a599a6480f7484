/*
 * bench_cuda.c — throughput of the CUDA backend against its rooflines
 * (bench/bench-cuda.sh runs it on the GPU machine and assembles
 * bench/results/cuda.md).
 *
 *   bench_cuda ceilings
 *       device-to-device copy bandwidth (bytes read + written) and the bf16
 *       GEMM rate of an 8192^3 product through the backend's matmul (and
 *       PyTorch's, measured once: the prefill roofline takes the higher)
 *   bench_cuda moe T1,T2,... [CONFIG]
 *       the MoE feed-forward op of one prefill step alone at CONFIG's shape
 *       (default bench/configs/kimi-linear-48b-a3b.json), T tokens, random
 *       bf16 weights, precision bf16, in each prefill expert path
 *       (KL_CUDA_MOE_PREFILL 0, 0 with KL_CUDA_GROUPED_GEMM=0, 3, 4): the op's
 *       time, its expert products' rate against the bf16 GEMM ceiling and
 *       the path that ran (see moe_alone)
 *   bench_cuda model CONFIG [--prefill 4096,32768] [--decode-ctx 4096,32768]
 *                    [--batches 1,8,32,64] [--steps N] [--step-tokens N] [--profile 1]
 *                    [--sample logits|greedy|topp] [--quantize fp8|int8|int4]
 *                    [--precision bf16|fp8] [--ceiling-tflops X]
 *       a random bf16 model of CONFIG's shape made on the GPU
 *       (kl_model_create_random, precision bf16 or --precision's: fp8 needs
 *       --quantize fp8, and each prefill line is followed by a kind=fp8
 *       line of cuda_fp8.c's counts; --quantize: the matrices
 *       quantization at load takes made on the GPU in that form instead, the
 *       header line gives the resident weight bytes): prefill tokens/s for each
 *       length (a fresh sequence, one kl_forward), then for each decode
 *       context the time per output token at each batch size (the prefilled
 *       sequence cloned batch times; graphs warm); every step ends as
 *       generation does: --sample logits downloads each sequence's logits
 *       (the host samples), greedy / topp (temperature 0.8, top-p 0.9, the
 *       default) sample on the device and download only the ids; the kernels
 *       of a step's graph are counted; --profile 1 adds, per decode point,
 *       the time per part of the step (graphs off and every op waited for),
 *       and per prefill length the same for one more prefill (every op
 *       waited for).  Prefill lines give roofline_s = FLOPs / ceiling, the
 *       ceiling the higher of PyTorch's 789 TFLOP/s and --ceiling-tflops X
 *       (pass `ceilings`' bf16_gemm_TFLOPs), and pct_of_roofline.
 *       KL_BENCH_NCU_STEPS=N: N more decode steps inside cudaProfilerStart /
 *       Stop (bench-cuda.sh ncu-step profiles just those); KL_BENCH_NCU_PREFILL=1:
 *       the timed prefills inside them (bench-cuda.sh ncu-prefill); KL_BENCH_TAG=x
 *       labels the RESULT lines (variants of one table)
 *   bench_cuda sample V B1,B2,...
 *       the device sampler alone (backend op sample) on V logits per row for
 *       each batch size: greedy, temperature, top-k, top-p, min-p on peaked
 *       logits (a trained model's shape: a few likely tokens) and on flat ones
 *       (random weights: top-p keeps most of the vocabulary)
 *   bench_cuda drift MODEL_DIR STEPS PRECISION
 *       the drift a bf16 KDA state would cause: the model loaded twice on
 *       the GPU, once storing the per-token recurrence's state rounded to bf16
 *       (KL_CUDA_KDA_STATE_ROUND=bf16); a 64-token prompt, then STEPS tokens,
 *       each the fp32-state model's greedy choice fed to both; the logits'
 *       relative difference and the greedy agreement over the steps
 *   bench_cuda kda H K T1,T2,...
 *       the KDA mixer op alone (conv, norms, decay, chunkwise delta rule,
 *       gated norm) for one sequence of T tokens, H heads of K: precision
 *       fp32 (path=fp32) and bf16 (path=bf16_mma, the tensor-core form;
 *       bf16_mma_4warps / bf16_mma_wide64 / bf16_mma_wide8w with
 *       KL_CUDA_KDA_MMA=1 / 3 / 4).  In bf16 the inputs are recorded as
 *       the products' bf16 results before each run, as prefill's products
 *       keep them (KL_CUDA_KDA_IN16; kl_cuda_bench_kda_offer16, untimed):
 *       in16=N says how many of q, k, v, f, gate the op found so
 *   bench_cuda mla_decode C1,C2,... B1,B2,... [V1,V2,...]
 *       the MLA decode attention alone (attend + merge; 48B head shapes, bf16
 *       cache) for B tokens at context C through each KL_CUDA_MLA_MMA variant
 *       V (kl_cuda_test_mla_decode): us per launch and the cache bytes' rate
 *   bench_cuda mla T1,T2,...
 *       the MLA prefill attention alone (bf16 operands; 32 heads, q/k 192 =
 *       128 nope + 64 rope, v 128) for one sequence of T tokens from position
 *       0: the flash kernels (kernels/mla_flash_wgmma.cu with 3 and 2
 *       warpgroups where the device runs sm_90a, kernels/mla_flash.cu) and
 *       the cuBLAS path of KL_CUDA_MLA_FLASH=0 (scores, softmax kernel,
 *       output product over the bounded score buffer), through the hook
 *       kl_cuda_bench_mla; causal FLOPs 2 Ha T (T + 1) / 2 (192 + 128)
 *
 * Output: lines "RESULT key=value ..." that the script turns into tables.
 * Timing: the backend's sync around the timed region, host monotonic clock,
 * after warm-up; the median of several repetitions where they are cheap.
 * Roofline terms are computed here from the config (see the comments at
 * decode_bytes and prefill_flops).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE				/* dladdr */
#endif
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>

#include "backend.h"
#include "config.h"
#include "model.h"

static void
fail(const char *what, const kl_err *err)
{
	fprintf(stderr, "bench_cuda: %s: %s\n", what, err ? err->msg : "");
	exit(1);
}

static int
parse_list(const char *s, long *out, int max)
{
	int			n = 0;

	while (s && *s && n < max)
	{
		char	   *e;

		out[n++] = strtol(s, &e, 10);
		s = *e == ',' ? e + 1 : NULL;
	}
	return n;
}

static double
gpu_used_gb(void)
{
	size_t		f = 0,
				t = 0;

	cudaMemGetInfo(&f, &t);
	return (double) (t - f) / 1e9;
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return x < y ? -1 : x > y;
}

/* ------------------------------------------------------------------ ceilings */

/*
 * PyTorch's bf16 matmul of 8192^3 on the H200 (torch.matmul, measured
 * 2026-11-29, issue 13): the prefill roofline uses the higher of this and
 * the rate our backend's GEMM reaches.
 */
#define TORCH_BF16_GEMM_TFLOPS 789.0

/* a 1-layer bf16 model on the GPU whose lm_head is an 8192 x 8192 matrix */
static kl_model *
ceiling_model(void)
{
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;
	char		cfgpath[] = "/tmp/kl_bench_ceil_XXXXXX";
	int			fd = mkstemp(cfgpath);
	const char *cfg =
	"{\"model_type\": \"kimi_linear\", \"vocab_size\": 8192, \"hidden_size\": 8192, \"num_hidden_layers\": 1,"
	" \"intermediate_size\": 8192, \"rms_norm_eps\": 1e-5, \"linear_attn_config\": {\"kda_layers\": [1],"
	" \"full_attn_layers\": [], \"num_heads\": 1, \"head_dim\": 128, \"short_conv_kernel_size\": 4},"
	" \"num_attention_heads\": 1, \"kv_lora_rank\": 64, \"qk_nope_head_dim\": 64, \"qk_rope_head_dim\": 64,"
	" \"v_head_dim\": 64, \"num_experts\": null}";

	if (fd < 0 || write(fd, cfg, strlen(cfg)) != (ssize_t) strlen(cfg))
		fail("temporary config", NULL);
	close(fd);
	o.device = "cuda";
	o.precision = "bf16";
	if (kl_model_create_random(cfgpath, &o, "bf16", 1, &m, &err) != KL_OK)
		fail("model", &err);
	unlink(cfgpath);
	return m;
}

/*
 * The bf16 GEMM rate of an 8192^3 product through the backend's matmul
 * (fp32 activations rounded to bf16 for cuBLAS, as prefill does): TFLOP/s,
 * the median of 6 timed runs after one warm-up.  x and y: 8192^2 floats.
 */
static double
gemm_tflops(kl_model *m, float *x, float *y)
{
	kl_backend *be = m->be;
	int			N = 8192;
	double		times[7];

	for (int r = 0; r < 7; r++)
	{
		double		t0;

		be->ops->sync(be);
		t0 = kl_now();
		be->ops->matmul(be, y, N, x, N, N, &m->lm_head);
		be->ops->sync(be);
		times[r] = kl_now() - t0;
	}
	qsort(times + 1, 6, sizeof(double), cmp_double);
	return 2.0 * N * (double) N * N / times[3] / 1e12;
}

/* random fp32 activations [n] uploaded to the device (xorshift; values in [-1, 1)) */
static float *
random_device_floats(kl_backend *be, size_t n)
{
	float	   *hx = malloc(sizeof(float) * n);
	float	   *x = be->ops->alloc(be, sizeof(float) * n);
	uint64_t	s = 88172645463325252ull;

	if (!hx || !x)
		fail("activations", NULL);
	for (size_t i = 0; i < n; i++)
	{
		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		hx[i] = (float) ((s >> 40) * (1.0 / 16777216.0) * 2 - 1);
	}
	be->ops->upload(be, x, hx, sizeof(float) * n);
	free(hx);
	return x;
}

/* the bf16 GEMM rate measured here and now (a model of its own, freed) */
static double
measure_gemm_tflops(void)
{
	kl_model   *m = ceiling_model();
	size_t		xs = (size_t) 8192 * 8192;
	float	   *x = random_device_floats(m->be, xs),
			   *y = m->be->ops->alloc(m->be, sizeof(float) * xs);
	double		r;

	if (!y)
		fail("alloc", NULL);
	r = gemm_tflops(m, x, y);
	if (m->be->failed)
		fail("matmul", &m->be->err);
	m->be->ops->release(m->be, x);
	m->be->ops->release(m->be, y);
	kl_model_free(m);
	return r;
}

static void
ceilings(void)
{
	kl_model   *m = ceiling_model();
	kl_backend *be = m->be;
	size_t		n = (size_t) 2 << 30;
	void	   *a,
			   *b;
	double		best = 0;

	a = be->ops->alloc(be, n);
	b = be->ops->alloc(be, n);
	if (!a || !b)
		fail("alloc", NULL);
	for (int r = 0; r < 6; r++)
	{
		double		t0,
					dt;

		be->ops->sync(be);
		t0 = kl_now();
		be->ops->copy(be, b, a, n);
		be->ops->sync(be);
		dt = kl_now() - t0;
		if (r > 0 && 2.0 * n / dt > best)
			best = 2.0 * n / dt;
	}
	printf("RESULT kind=ceiling what=copy_GBps value=%.1f\n", best / 1e9);
	be->ops->release(be, a);
	be->ops->release(be, b);

	{
		int			N = 8192;
		size_t		xs = (size_t) N * N;
		float	   *x = random_device_floats(be, xs),
				   *y = be->ops->alloc(be, sizeof(float) * xs);
		double		times[7];

		if (!y)
			fail("alloc", NULL);
		printf("RESULT kind=ceiling what=bf16_gemm_TFLOPs value=%.1f\n", gemm_tflops(m, x, y));
		printf("RESULT kind=ceiling what=torch_bf16_gemm_TFLOPs value=%.1f\n", TORCH_BF16_GEMM_TFLOPS);
		/* our GEMV: one row against the 134 MB matrix (more than L2 holds) */
		for (int r = 0; r < 7; r++)
		{
			double		t0;

			be->ops->sync(be);
			t0 = kl_now();
			for (int i = 0; i < 10; i++)
				be->ops->matmul(be, y, N, x, N, 1, &m->lm_head);
			be->ops->sync(be);
			times[r] = (kl_now() - t0) / 10;
		}
		qsort(times + 1, 6, sizeof(double), cmp_double);
		printf("RESULT kind=ceiling what=gemv_bf16_GBps value=%.1f\n", 2.0 * N * (double) N / times[3] / 1e9);
		if (be->failed)
			fail("matmul", &be->err);
		be->ops->release(be, x);
		be->ops->release(be, y);
	}
	kl_model_free(m);
}

/* ------------------------------------------------------------------ KDA alone */

static void *cuda_lib_symbol(kl_backend *be, const char *name);

/* kl_cuda_bench_kda_offer16 (cuda_kda.c): fp32 rows recorded as a product's bf16 result */
typedef int (*kda_offer16_fn) (kl_backend *be, const float *y, int n, int cols, int role);

static void
kda_alone_prec(int H, int K, const long *Ts, int nT, const char *prec)
{
	char		cfgpath[] = "/tmp/kl_bench_kda_XXXXXX";
	char		cfg[2048];
	int			fd = mkstemp(cfgpath);
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;
	kl_backend *be;
	long		Tmax = 0;

	for (int i = 0; i < nT; i++)
		Tmax = Ts[i] > Tmax ? Ts[i] : Tmax;
	snprintf(cfg, sizeof(cfg),
			 "{\"model_type\": \"kimi_linear\", \"vocab_size\": 64, \"hidden_size\": 64, \"num_hidden_layers\": 1,"
			 " \"intermediate_size\": 64, \"rms_norm_eps\": 1e-5, \"linear_attn_config\": {\"kda_layers\": [1],"
			 " \"full_attn_layers\": [], \"num_heads\": %d, \"head_dim\": %d, \"short_conv_kernel_size\": 4},"
			 " \"num_attention_heads\": 1, \"kv_lora_rank\": 64, \"qk_nope_head_dim\": 64, \"qk_rope_head_dim\": 64,"
			 " \"v_head_dim\": 64, \"num_experts\": null}", H, K);
	if (fd < 0 || write(fd, cfg, strlen(cfg)) != (ssize_t) strlen(cfg))
		fail("temporary config", NULL);
	close(fd);
	o.device = "cuda";
	o.precision = prec;
	if (kl_model_create_random(cfgpath, &o, "f32", 3, &m, &err) != KL_OK)
		fail("model", &err);
	unlink(cfgpath);
	be = m->be;

	{
		int			HK = H * K;
		const char *kmma = getenv("KL_CUDA_KDA_MMA");
		const char *path = strcmp(prec, "bf16") != 0 ? "fp32" : kmma && strcmp(kmma, "0") == 0 ? "bf16_fp32kernels" :
			kmma && strcmp(kmma, "1") == 0 ? "bf16_mma_4warps" : kmma && strcmp(kmma, "3") == 0 ? "bf16_mma_wide64" :
			kmma && strcmp(kmma, "4") == 0 ? "bf16_mma_wide8w" : "bf16_mma";
		/* inputs: random fp32 [Tmax, HK] made on the device by the random-weight op */
		kl_weight	in[6];
		float	   *fcopy,
				   *out;
		kl_seq	   *seq;
		const float scales[6] = {1.0f, 1.0f, 1.0f, 3.0f, 2.0f, 2.0f};	/* q, k, v, f, b, gate */
		kda_offer16_fn offer16 = (kda_offer16_fn) cuda_lib_symbol(be, "kl_cuda_bench_kda_offer16");
		int			kept = 0;

		for (int i = 0; i < 6; i++)
		{
			memset(&in[i], 0, sizeof(kl_weight));
			in[i].dtype = KL_DT_F32;
			in[i].rows = (int) Tmax;
			in[i].cols = i == 4 ? H : HK;
			if (be->ops->init_random_weight(be, &in[i], 1000 + i, scales[i], &err) != KL_OK)
				fail("inputs", &err);
		}
		fcopy = be->ops->alloc(be, sizeof(float) * (size_t) Tmax * HK);
		out = be->ops->alloc(be, sizeof(float) * (size_t) Tmax * HK);
		if (!fcopy || !out || kl_seq_new(m, &seq, &err) != KL_OK)
			fail("buffers", NULL);

		for (int ti = 0; ti < nT; ti++)
		{
			int			T = (int) Ts[ti];
			int			row0[2] = {0, T};
			int64_t		pos0[1] = {0};
			kl_seq	   *seqs[1] = {seq};
			kl_step		st = {T, 1, seqs, row0, pos0, false, 0};
			kl_kda_args a;
			double		times[5];
			int			reps = T >= 65536 ? 3 : 5;

			a.w = &m->layers[0].kda;
			a.kda_index = 0;
			a.q = in[0].dev;
			a.k = in[1].dev;
			a.v = in[2].dev;
			a.f = fcopy;		/* overwritten with the decay: restored before each run */
			a.b = in[4].dev;
			a.gate = in[5].dev;
			a.out = out;
			for (int r = 0; r < reps; r++)
			{
				double		t0;

				kl_seq_reset(seq);
				be->ops->copy(be, fcopy, in[3].dev, sizeof(float) * (size_t) T * HK);
				if (be->ops->begin_step(be, &st, &err) != KL_OK)
					fail("begin_step", &err);
				/* as prefill's products leave them: q, k, v, f (and gate) kept in bf16 where the
				 * backend keeps them (KL_CUDA_KDA_IN16; the conversion is not timed) */
				kept = 0;
				if (offer16)
				{
					const float *kin[5] = {a.q, a.k, a.v, a.f, a.gate};

					for (int i = 0; i < 5; i++)
						kept += offer16(be, kin[i], T, HK, i == 4 ? KL_R16_KDA_GATE : KL_R16_KDA_IN);
				}
				be->ops->sync(be);
				t0 = kl_now();
				be->ops->kda(be, &st, &a);
				be->ops->sync(be);
				times[r] = kl_now() - t0;
				be->ops->end_step(be, &st);
				if (be->failed)
					fail("kda", &be->err);
			}
			qsort(times, reps, sizeof(double), cmp_double);
			printf("RESULT kind=kda path=%s H=%d K=%d T=%d ms=%.3f tokens_per_s=%.0f gpu_GB=%.1f in16=%d\n", path, H,
				   K, T, times[reps / 2] * 1e3, T / times[reps / 2], gpu_used_gb(), kept);
			fflush(stdout);
		}
		kl_seq_free(seq);
		be->ops->release(be, fcopy);
		be->ops->release(be, out);
		for (int i = 0; i < 6; i++)
			be->ops->unload_weight(be, &in[i]);
	}
	kl_model_free(m);
}

/*
 * The KDA op (prep, chunkwise form, gated norm) of one prefill sequence per
 * length, in each precision: fp32 runs the fp32 kernels, bf16 what prefill
 * runs in precision bf16 (the tensor-core chunkwise form, unless
 * KL_CUDA_KDA_MMA=0).  One RESULT line per precision and length, tagged
 * path=.
 */
static void
kda_alone(int H, int K, const long *Ts, int nT)
{
	/* KL_BENCH_KDA_PREC=fp32 or bf16: that precision only (profiles of one path) */
	const char *only = getenv("KL_BENCH_KDA_PREC");

	if (!only || strcmp(only, "bf16") != 0)
		kda_alone_prec(H, K, Ts, nT, "fp32");
	if (!only || strcmp(only, "fp32") != 0)
		kda_alone_prec(H, K, Ts, nT, "bf16");
}

/* ------------------------------------------------------------------ the MLA prefill attention alone */

typedef int (*mla_bench_fn) (kl_backend *be, int T, int Ha, int Dn, int Dr, int Dv, int R, int flash, int reps,
							 double *ms);

/*
 * A one-layer bf16 MLA model of the 48B head shapes on the GPU, only for its
 * backend (stream, cuBLAS handle) and the CUDA library's handle (*lib), in
 * which `hook` is looked up: exits when it is missing.
 */
static kl_model *
mla_hook_model(const char *hook, void **lib, void **fn)
{
	const int	Ha = 32,
				Dn = 128,
				Dr = 64,
				Dv = 128,
				R = 512;
	char		cfgpath[] = "/tmp/kl_bench_mla_XXXXXX";
	char		cfg[2048];
	int			fd = mkstemp(cfgpath);
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;
	Dl_info		info;

	snprintf(cfg, sizeof(cfg),
			 "{\"model_type\": \"kimi_linear\", \"vocab_size\": 64, \"hidden_size\": 64, \"num_hidden_layers\": 1,"
			 " \"intermediate_size\": 64, \"rms_norm_eps\": 1e-5, \"linear_attn_config\": {\"kda_layers\": [],"
			 " \"full_attn_layers\": [1], \"num_heads\": 1, \"head_dim\": 64, \"short_conv_kernel_size\": 4},"
			 " \"num_attention_heads\": %d, \"kv_lora_rank\": %d, \"qk_nope_head_dim\": %d, \"qk_rope_head_dim\": %d,"
			 " \"v_head_dim\": %d, \"num_experts\": null}", Ha, R, Dn, Dr, Dv);
	if (fd < 0 || write(fd, cfg, strlen(cfg)) != (ssize_t) strlen(cfg))
		fail("temporary config", NULL);
	close(fd);
	o.device = "cuda";
	o.precision = "bf16";
	if (kl_model_create_random(cfgpath, &o, "bf16", 3, &m, &err) != KL_OK)
		fail("model", &err);
	unlink(cfgpath);
	*lib = NULL;
	*fn = NULL;
	if (dladdr((const void *) m->be->ops, &info) && info.dli_fname)
		*lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
	if (*lib)
		*fn = dlsym(*lib, hook);
	if (!*fn)
	{
		fprintf(stderr, "bench_cuda: the CUDA library has no %s\n", hook);
		exit(1);
	}
	return m;
}

static void
mla_alone(const long *Ts, int nT)
{
	const int	Ha = 32,
				Dn = 128,
				Dr = 64,
				Dv = 128,
				R = 512;
	void	   *lib;
	mla_bench_fn f;
	kl_model   *m = mla_hook_model("kl_cuda_bench_mla", &lib, (void **) &f);

	for (int ti = 0; ti < nT; ti++)
	{
		int			T = (int) Ts[ti];
		double		flops = 2.0 * Ha * ((double) T * (T + 1) / 2) * (Dn + Dr + Dv);
		int			reps = T >= 65536 ? 3 : T >= 16384 ? 5 : 11;

		for (int flash = 3; flash >= 0; flash--)
		{
			static const char *const path[] = {"cublas", "flash", "flash_wgmma2", "flash_wgmma3"};
			double		ms = 0;
			int			rc = f(m->be, T, Ha, Dn, Dr, Dv, R, flash, reps, &ms);

			if (rc != 0 || m->be->failed)
				printf("RESULT kind=mla path=%s Ha=%d T=%d error=\"%s (%d)\"\n", path[flash], Ha, T,
					   m->be->failed ? m->be->err.msg : rc == -1 ? "not covered on this device" : "hook failed", rc);
			else
				printf("RESULT kind=mla path=%s variant=%s Ha=%d Dqk=%d Dv=%d T=%d ms=%.3f tflops=%.1f\n",
					   path[flash], path[flash], Ha, Dn + Dr, Dv, T, ms, flops / (ms * 1e-3) / 1e12);
			fflush(stdout);
			if (m->be->failed)
				fail("mla", &m->be->err);
		}
	}
	dlclose(lib);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ the MLA decode attention alone */

typedef int (*mla_decode_fn) (int variant, int merge, int early, int n, int Ha, int R, int Dr, const int *ctx,
							  int page_cap, const float *qabs, const uint16_t *cache, float *olat, int reps,
							  double *us);

/*
 * bench_cuda mla_decode C1,C2,.. B1,B2,.. [V1,V2,..]: the decode attention
 * (attend + merge, the merge kernel chosen as the backend chooses it) of B
 * tokens, each its own sequence at context C with a
 * page table of C keys (rounded up to whole pages), 48B head
 * shapes, bf16 cache, through each variant V (KL_CUDA_MLA_MMA; default 0,1,2),
 * 20 launches in a CUDA graph; us per launch and the cache bytes' rate.
 * The wgmma variant requests its first tiles' older keys before its wait
 * as the backend does by default (KL_CUDA_MLA_FOLD=0 in the environment:
 * after it); its split, L2 prefetch and dual form follow
 * KL_CUDA_MLA_WG_SPLIT, _PF and _DUAL in the environment as the backend's
 * do (cuda_mla.c, cuda_mla_wg_read).
 */
static void
mla_decode_alone(const long *cs, int nc, const long *bs, int nb, const long *vs, int nv)
{
	const int	Ha = 32,
				Dr = 64,
				R = 512;
	void	   *lib;
	mla_decode_fn f;
	kl_model   *m = mla_hook_model("kl_cuda_test_mla_decode", &lib, (void **) &f);
	const char *fo = getenv("KL_CUDA_MLA_FOLD");
	int			early = !(fo && (strcmp(fo, "0") == 0 || strcmp(fo, "2") == 0));

	for (int ci = 0; ci < nc; ci++)
		for (int bi = 0; bi < nb; bi++)
			for (int vi = 0; vi < nv; vi++)
			{
				int			n = (int) bs[bi],
							C = (int) cs[ci],
							page_cap = (C + KL_MLA_PAGE - 1) / KL_MLA_PAGE;
				int		   *ctx = malloc(sizeof(int) * (size_t) n);
				double		us = 0,
							bytes = (double) n * C * (R + Dr) * 2;
				int			rc;

				for (int t = 0; t < n; t++)
					ctx[t] = C;
				rc = f((int) vs[vi], -1, early, n, Ha, R, Dr, ctx, page_cap, NULL, NULL, NULL, 20, &us);
				if (rc != 0)
					printf("RESULT kind=mla_decode variant=%ld ctx=%d batch=%d error=\"%s (%d)\"\n", vs[vi], C, n,
						   rc == -1 ? "not covered on this device" : "hook failed", rc);
				else
					printf("RESULT kind=mla_decode variant=%ld ctx=%d batch=%d us=%.2f cache_GB_s=%.0f\n", vs[vi], C, n,
						   us, bytes / (us * 1e-6) / 1e9);
				fflush(stdout);
				free(ctx);
			}
	dlclose(lib);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ the sampler alone */

static void
sample_alone(int V, const long *bs, int nb)
{
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;
	kl_backend *be;
	char		dir[] = "/tmp/kl/fixtures/golden/tiny_c";
	int			maxb = 1;
	float	   *host,
			   *dev;
	uint64_t	x = 7;
	static const char *names[5] = {"greedy", "temperature", "top_k40", "top_p0.9", "min_p0.05"};

	o.device = "cuda";
	o.precision = "bf16";
	if (kl_model_load(getenv("KL_BENCH_SAMPLE_MODEL") ? getenv("KL_BENCH_SAMPLE_MODEL") : dir, &o, &m, &err) != KL_OK)
		fail("model (for its backend)", &err);
	be = m->be;
	for (int i = 0; i < nb; i++)
		maxb = bs[i] > maxb ? (int) bs[i] : maxb;
	host = malloc(sizeof(float) * (size_t) V * maxb);
	dev = be->ops->alloc(be, sizeof(float) * (size_t) V * maxb);
	if (!host || !dev)
		fail("buffers", NULL);
	for (int shape = 0; shape < 2; shape++)
	{
		for (size_t i = 0; i < (size_t) V * maxb; i++)
		{
			double		g;

			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			g = ((x >> 11) * (1.0 / 9007199254740992.0) - 0.5) * 2.0;
			/* peaked: a spread like a trained model's logits; flat: a random model's */
			host[i] = (float) (shape == 0 ? 6.0 * g * g * g * 3.0 : 0.01 * g);
		}
		for (int si = 0; si < 5; si++)
		{
			kl_sampling sp;

			kl_sampling_default(&sp);
			if (si > 0)
				sp.temperature = 0.8f;
			if (si == 2)
				sp.top_k = 40;
			if (si == 3)
				sp.top_p = 0.9f;
			if (si == 4)
				sp.min_p = 0.05f;
			for (int bi = 0; bi < nb; bi++)
			{
				int			b = (int) bs[bi];
				kl_sample_row *rows = calloc((size_t) b, sizeof(kl_sample_row));
				int32_t    *ids = calloc((size_t) b, sizeof(int32_t));
				double		times[7];

				for (int r = 0; r < b; r++)
				{
					rows[r].row = r;
					rows[r].s = &sp;
					rows[r].u0 = 0.37 + 0.001 * r;
				}
				for (int rep = 0; rep < 7; rep++)
				{
					double		t0;

					be->ops->upload(be, dev, host, sizeof(float) * (size_t) V * b);
					be->ops->sync(be);
					t0 = kl_now();
					if (be->ops->sample(be, dev, V, rows, b, ids, &err) != KL_OK)
						fail("sample", &err);
					times[rep] = kl_now() - t0;
				}
				qsort(times + 1, 6, sizeof(double), cmp_double);
				printf("RESULT kind=sample logits=%s setting=%s V=%d batch=%d ms=%.3f\n", shape == 0 ? "peaked" : "flat",
					   names[si], V, b, times[3] * 1e3);
				fflush(stdout);
				free(rows);
				free(ids);
			}
		}
	}
	be->ops->release(be, dev);
	free(host);
	kl_model_free(m);
}

/* ------------------------------------------------------------------ bf16 KDA state drift */

static double
rel_diff(const float *a, const float *ref, int n)
{
	double		num = 0,
				den = 0;

	for (int i = 0; i < n; i++)
	{
		double		d = (double) a[i] - ref[i];

		num += d * d;
		den += (double) ref[i] * ref[i];
	}
	return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int
argmax_of(const float *x, int n)
{
	int			b = 0;

	for (int i = 1; i < n; i++)
		if (x[i] > x[b])
			b = i;
	return b;
}

static void
drift(const char *dir, int steps, const char *prec)
{
	kl_load_opts o = {0};
	kl_model   *m[2];
	kl_ctx	   *ctx[2];
	kl_seq	   *seq[2];
	kl_err		err;
	int			V;
	float	   *lg[2];
	int32_t		prompt[64];
	int			agree = 0;
	double		first = 0,
				last = 0,
				worst = 0;
	int			n_first = 0,
				n_last = 0;

	o.device = "cuda";
	o.precision = prec;
	for (int i = 0; i < 2; i++)
	{
		if (i == 1)
			setenv("KL_CUDA_KDA_STATE_ROUND", "bf16", 1);
		if (kl_model_load(dir, &o, &m[i], &err) != KL_OK || kl_ctx_new(m[i], 0, &ctx[i], &err) != KL_OK ||
			kl_seq_new(m[i], &seq[i], &err) != KL_OK)
			fail("model", &err);
		unsetenv("KL_CUDA_KDA_STATE_ROUND");
	}
	V = kl_model_config(m[0])->vocab_size;
	for (int i = 0; i < 64; i++)
		prompt[i] = (int32_t) ((i * 7919 + 13) % V);
	lg[0] = malloc(sizeof(float) * V);
	lg[1] = malloc(sizeof(float) * V);
	for (int i = 0; i < 2; i++)
	{
		kl_batch_item it = {seq[i], prompt, 64, lg[i], false};

		if (kl_forward(ctx[i], &it, 1, &err) != KL_OK)
			fail("prompt", &err);
	}
	for (int t = 0; t < steps; t++)
	{
		int32_t		tok = argmax_of(lg[0], V);
		double		e;

		agree += argmax_of(lg[1], V) == tok;
		for (int i = 0; i < 2; i++)
		{
			kl_batch_item it = {seq[i], &tok, 1, lg[i], false};

			if (kl_forward(ctx[i], &it, 1, &err) != KL_OK)
				fail("decode", &err);
		}
		e = rel_diff(lg[1], lg[0], V);
		worst = e > worst ? e : worst;
		if (t < 100)
		{
			first += e;
			n_first++;
		}
		if (t >= steps - 100)
		{
			last += e;
			n_last++;
		}
	}
	printf("RESULT kind=drift model=%s precision=%s steps=%d relerr_first100=%.3e relerr_last100=%.3e "
		   "relerr_max=%.3e greedy_agree=%d\n", strrchr(dir, '/') ? strrchr(dir, '/') + 1 : dir, prec, steps,
		   first / (n_first ? n_first : 1), last / (n_last ? n_last : 1), worst, agree);
	fflush(stdout);
	for (int i = 0; i < 2; i++)
	{
		kl_seq_free(seq[i]);
		kl_ctx_free(ctx[i]);
		kl_model_free(m[i]);
		free(lg[i]);
	}
}

/* ------------------------------------------------------------------ the MoE op alone */

/*
 * The hook of the CUDA library that times a prefill MoE op's expert
 * products (kl_cuda_bench_moe_products, cuda_moe.c), found in the library
 * that holds the backend's ops table; NULL when it lacks it.
 */
typedef int (*moe_products_fn) (kl_backend *be, int mode, float ms[2]);

static void *
cuda_lib_symbol(kl_backend *be, const char *name)
{
	Dl_info		info;
	void	   *lib = NULL;

	if (dladdr((const void *) be->ops, &info) && info.dli_fname)
		lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
	/* the handle stays open: the backend's library is loaded for the whole run anyway */
	return lib ? dlsym(lib, name) : NULL;
}

static moe_products_fn
moe_products_hook(kl_backend *be)
{
	return (moe_products_fn) cuda_lib_symbol(be, "kl_cuda_bench_moe_products");
}

/* kl_cuda_moe_prefill_path (cuda_moe.c): the KL_CUDA_MOE_PREFILL variant asked, the one the last op ran, the
 * cuBLAS status that made the batched one fall back */
typedef int (*moe_path_fn) (kl_backend *be, int info[3]);

/*
 * A 1-layer random bf16 model whose only layer has CONFIG's MoE feed-forward
 * (hidden size, experts, top k, shared experts, width, routing rule) and a
 * token mixer too small to matter, precision bf16, on the GPU.
 */
static kl_model *
moe_model(const kl_config *c)
{
	char		cfgpath[] = "/tmp/kl_bench_moe_XXXXXX";
	char		cfg[2048];
	int			fd = mkstemp(cfgpath);
	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;

	snprintf(cfg, sizeof(cfg),
			 "{\"model_type\": \"kimi_linear\", \"vocab_size\": 64, \"hidden_size\": %d, \"num_hidden_layers\": 1,"
			 " \"intermediate_size\": 64, \"rms_norm_eps\": 1e-5, \"linear_attn_config\": {\"kda_layers\": [1],"
			 " \"full_attn_layers\": [], \"num_heads\": 1, \"head_dim\": 64, \"short_conv_kernel_size\": 4},"
			 " \"num_attention_heads\": 1, \"kv_lora_rank\": 64, \"qk_nope_head_dim\": 64, \"qk_rope_head_dim\": 64,"
			 " \"v_head_dim\": 64, \"num_experts\": %d, \"num_experts_per_token\": %d, \"num_shared_experts\": %d,"
			 " \"moe_intermediate_size\": %d, \"first_k_dense_replace\": 0, \"moe_layer_freq\": 1,"
			 " \"moe_renormalize\": %s, \"routed_scaling_factor\": %g, \"num_expert_group\": %d, \"topk_group\": %d,"
			 " \"moe_router_activation_func\": \"%s\"}",
			 c->hidden_size, c->n_experts, c->experts_per_token, c->n_shared_experts, c->moe_intermediate,
			 c->moe_renormalize ? "true" : "false", c->routed_scaling, c->n_expert_groups, c->topk_groups,
			 c->router_softmax ? "softmax" : "sigmoid");
	if (fd < 0 || write(fd, cfg, strlen(cfg)) != (ssize_t) strlen(cfg))
		fail("temporary config", NULL);
	close(fd);
	o.device = "cuda";
	o.precision = "bf16";
	if (kl_model_create_random(cfgpath, &o, "bf16", 7, &m, &err) != KL_OK)
		fail("model", &err);
	unlink(cfgpath);
	if (!m->layers[0].is_moe)
		fail("the config's MoE layer (is num_experts set?)", NULL);
	return m;
}

/*
 * bench_cuda moe T1,T2,... [CONFIG]: the MoE feed-forward of one prefill
 * step alone (routing, grouping, expert products, shared expert, combine)
 * for T tokens of random fp32 activations, precision bf16, in each variant:
 * "prefill0" (KL_CUDA_MOE_PREFILL=0, the older code: grouped cuBLAS products
 * with fp32 results, a product per used expert where cuBLAS refuses them),
 * "prefill0_loop" (that with KL_CUDA_GROUPED_GEMM=0: the loop for sure),
 * "prefill3" (a batched product per size class of padded expert slots and
 * stage, bf16 outputs combined directly) and "prefill4" (the default: 3
 * with the grouping on the device, the counts read back while the shared
 * expert runs);
 * asked / ran: the KL_CUDA_MOE_PREFILL variant asked and the one that ran
 * (kl_cuda_moe_prefill_path; refused_status: the cuBLAS status
 * that made the variant asked fall back, 0 none).  ms: the whole
 * op (median); products_ms: the expert products alone (events around them,
 * kl_cuda_bench_moe_products), whose FLOPs are 2 * 3 * D * F * T * (k +
 * shared experts); their rate against the bf16 GEMM ceiling: the higher of
 * ours (an 8192^3 product through the backend, measured first in the same
 * run) and PyTorch's 789 TFLOP/s.  Random routers spread the tokens about
 * evenly over the experts (T k / E rows each; a trained router is less even).
 */
static void
moe_alone(const char *config, const long *Ts, int nT)
{
	/* the older code's two forms (KL_CUDA_GROUPED_GEMM), then KL_CUDA_MOE_PREFILL 3 and 4 */
	static const char *const variants[4] = {"prefill0", "prefill0_loop", "prefill3", "prefill4"};
	static const char *const env_gg[4] = {NULL, "0", NULL, NULL};
	static const char *const env_mp[4] = {"0", "0", "3", "4"};
	kl_config	c;
	kl_err		err;
	double		ours = measure_gemm_tflops(),
				ceiling = ours > TORCH_BF16_GEMM_TFLOPS ? ours : TORCH_BF16_GEMM_TFLOPS;
	long		Tmax = 0;

	printf("RESULT kind=ceiling what=bf16_gemm_TFLOPs value=%.1f\n", ours);
	printf("RESULT kind=ceiling what=torch_bf16_gemm_TFLOPs value=%.1f\n", TORCH_BF16_GEMM_TFLOPS);
	fflush(stdout);
	if (kl_config_load(config, &c, &err) != KL_OK)
		fail("config", &err);
	if (c.n_experts <= 0)
		fail("the config has no experts", NULL);
	for (int i = 0; i < nT; i++)
		Tmax = Ts[i] > Tmax ? Ts[i] : Tmax;
	for (int v = 0; v < 4; v++)
	{
		kl_model   *m;
		kl_backend *be;
		const kl_config *mc;
		moe_products_fn hook;
		moe_path_fn path;
		float	   *x,
				   *y;

		/* the switches are read when the backend is made */
		if (env_gg[v])
			setenv("KL_CUDA_GROUPED_GEMM", env_gg[v], 1);
		setenv("KL_CUDA_MOE_PREFILL", env_mp[v], 1);
		m = moe_model(&c);
		unsetenv("KL_CUDA_GROUPED_GEMM");
		unsetenv("KL_CUDA_MOE_PREFILL");
		be = m->be;
		mc = kl_model_config(m);
		hook = moe_products_hook(be);
		path = (moe_path_fn) cuda_lib_symbol(be, "kl_cuda_moe_prefill_path");
		if (!hook || hook(be, 1, NULL) != 0)
			fprintf(stderr, "bench_cuda: the CUDA library has no kl_cuda_bench_moe_products: no products_ms\n");
		x = random_device_floats(be, (size_t) Tmax * mc->hidden_size);
		y = be->ops->alloc(be, sizeof(float) * (size_t) Tmax * mc->hidden_size);
		if (!y)
			fail("alloc", NULL);
		for (int ti = 0; ti < nT; ti++)
		{
			int			T = (int) Ts[ti],
						reps = T >= 16384 ? 5 : 9;
			double		times[9],
						prod[9],
						shared[9],
						flops = 2.0 * 3 * mc->hidden_size * (double) mc->moe_intermediate * T *
				(mc->experts_per_token + mc->n_shared_experts);
			bool		have_prod = hook != NULL;

			/* warm-up: cuBLAS heuristics, working memory of this size */
			be->ops->moe(be, mc, &m->layers[0].moe, y, x, T);
			be->ops->sync(be);
			for (int r = 0; r < reps; r++)
			{
				double		t0;
				float		ms[2] = {0, 0};

				be->ops->sync(be);
				t0 = kl_now();
				be->ops->moe(be, mc, &m->layers[0].moe, y, x, T);
				be->ops->sync(be);
				times[r] = kl_now() - t0;
				if (have_prod && hook(be, 0, ms) != 0)
					have_prod = false;
				prod[r] = (ms[0] + ms[1]) / 1e3;
				shared[r] = ms[1] / 1e3;
			}
			if (be->failed)
				fail("moe", &be->err);
			qsort(times, reps, sizeof(double), cmp_double);
			qsort(prod, reps, sizeof(double), cmp_double);
			qsort(shared, reps, sizeof(double), cmp_double);
			printf("RESULT kind=moe variant=%s T=%d D=%d E=%d k=%d shared=%d F=%d ms=%.3f op_tflops=%.1f", variants[v],
				   T, mc->hidden_size, mc->n_experts, mc->experts_per_token, mc->n_shared_experts,
				   mc->moe_intermediate, times[reps / 2] * 1e3, flops / times[reps / 2] / 1e12);
			if (have_prod)
			{
				double		p = prod[reps / 2];

				printf(" products_ms=%.3f shared_ms=%.3f other_ms=%.3f products_tflops=%.1f gemm_tflops=%.1f "
					   "ceiling_tflops=%.1f pct_of_ceiling=%.1f", p * 1e3, shared[reps / 2] * 1e3,
					   (times[reps / 2] - p) * 1e3, flops / p / 1e12, ours, ceiling, 100.0 * flops / p / 1e12 / ceiling);
			}
			if (path)
			{
				int			info[3];

				path(be, info);
				printf(" asked=%d ran=%d refused_status=%d", info[0], info[1], info[2]);
			}
			printf(" gpu_GB=%.1f\n", gpu_used_gb());
			fflush(stdout);
		}
		if (hook)
			hook(be, 2, NULL);
		be->ops->release(be, x);
		be->ops->release(be, y);
		kl_model_free(m);
	}
}

/* ------------------------------------------------------------------ the model */

/*
 * Bytes one decode step must move, batch b, context ctx (bf16 weights):
 * every matrix that is not an expert, the experts that the batch's tokens
 * choose (expected number of distinct experts when each token picks k of E
 * uniformly: E (1 - (1 - k/E)^b)), the embedding rows, and per sequence the
 * KDA state read and written plus its MLA cache read.  qbpp: bytes per
 * weight of the matrices quantization at load takes (quant.h's kl_q_role:
 * the projections, experts and lm_head; 2 when not quantized); the router,
 * the KDA low-rank and beta matrices, MLA's kv_b and the embedding stay bf16.
 */
static double
decode_bytes(const kl_config *c, int b, long ctx, int cache_bytes, double qbpp)
{
	double		D = c->hidden_size,
				HK = (double) c->kda_heads * c->kda_head_dim,
				K = c->kda_head_dim,
				Dq = c->qk_nope_dim + c->qk_rope_dim,
				Wa = kl_mla_row(c);
	double		w = 0,			/* weights quantization at load takes */
				wp = 0,			/* weights it leaves as stored */
				st = 0;

	for (int i = 0; i < c->n_layers; i++)
	{
		if (c->layer_kind[i] == KL_LAYER_KDA)
		{
			w += 3 * HK * D + D * HK;
			wp += 2 * K * D + 2 * HK * K + c->kda_heads * D;
		}
		else
		{
			w += c->mla_heads * Dq * D + Wa * D + D * c->mla_heads * c->v_head_dim;
			wp += (double) c->mla_heads * (c->qk_nope_dim + c->v_head_dim) * c->kv_lora_rank;
		}
		if (kl_layer_is_moe(c, i))
		{
			double		used = c->n_experts * (1 - pow(1 - (double) c->experts_per_token / c->n_experts, b));

			wp += (double) c->n_experts * D;
			w += 3 * D * c->moe_intermediate * (used + c->n_shared_experts);
		}
		else
			w += 3 * D * c->intermediate_size;
	}
	w += (double) c->vocab_size * D;	/* lm_head */
	wp += b * D;				/* embedding rows */
	st = c->n_kda_layers * (2 * HK * K * 4 + 2 * 3 * HK * c->conv_kernel * 4) +
		c->n_mla_layers * (double) ctx * Wa * cache_bytes;
	return qbpp * w + 2 * wp + b * st;
}

/* FLOPs of prefilling T tokens from position 0 in steps of S: the matrix
 * products (2 per weight per token, experts: k + shared per token), the MLA
 * attention in its expanded form (scores and values over the causal half),
 * the re-expansion of the cached keys and values at every step, and the KDA
 * chunk arithmetic (about 10 K V per token and head). */
static double
prefill_flops(const kl_config *c, long T, long S)
{
	double		D = c->hidden_size,
				HK = (double) c->kda_heads * c->kda_head_dim,
				K = c->kda_head_dim,
				Dq = c->qk_nope_dim + c->qk_rope_dim,
				Wa = kl_mla_row(c);
	double		per_tok = 0,
				f;

	for (int i = 0; i < c->n_layers; i++)
	{
		if (c->layer_kind[i] == KL_LAYER_KDA)
			per_tok += 3 * HK * D + 2 * K * D + 2 * HK * K + c->kda_heads * D + D * HK + 10 * HK * K;
		else
			per_tok += c->mla_heads * Dq * D + Wa * D + D * c->mla_heads * c->v_head_dim;
		if (kl_layer_is_moe(c, i))
			per_tok += (double) c->n_experts * D + 3 * D * c->moe_intermediate * (c->experts_per_token + c->n_shared_experts);
		else
			per_tok += 3 * D * c->intermediate_size;
	}
	per_tok += (double) c->vocab_size * D / T;	/* logits of the last token only */
	f = 2 * per_tok * T;
	f += c->n_mla_layers * (double) T * (T + 1) / 2 * c->mla_heads * 2 * (Dq + c->v_head_dim);
	for (long p = 0; p < T; p += S)
	{
		long		m = p + (T - p < S ? T - p : S);

		f += c->n_mla_layers * 2.0 * m * c->kv_lora_rank * c->mla_heads * (c->qk_nope_dim + c->v_head_dim);
	}
	return f;
}

/* one decode step of the batch, ending as generation does (see the header) */
static int
decode_step(kl_ctx *ctx, kl_batch_item *items, int b, const char *sample, const kl_sample_req *const *reqs,
			int32_t *sampled, kl_err *err)
{
	if (strcmp(sample, "logits") == 0)
		return kl_forward(ctx, items, b, err);
	for (int s = 0; s < b; s++)
		items[s].logits = NULL;
	return kl_forward_sample(ctx, items, b, reqs, sampled, err);
}

typedef int (*fp8_stats_fn) (kl_backend *be, long out[5]);

/* precision fp8: what cuda_fp8.c ran so far (kl_cuda_fp8_stats), one RESULT line */
static void
print_fp8_stats(kl_backend *be, long T)
{
	fp8_stats_fn f = (fp8_stats_fn) cuda_lib_symbol(be, "kl_cuda_fp8_stats");
	long		st[5];

	if (f && f(be, st) == 0)
		printf("RESULT kind=fp8 T=%ld dense_fp8=%ld dense_refused=%ld expert_ops_fp8=%ld rows_quantized=%ld "
			   "experts_refused=%ld\n", T, st[0], st[1], st[2], st[3], st[4]);
}

static void
model_bench(const char *config, const long *pre, int npre, const long *ctxs, int nctx, const long *batches,
			int nb, int steps, int step_tokens, bool profile, const char *sample, const char *quantize,
			const char *precision, double ceiling_tflops)
{
	const char *tag = getenv("KL_BENCH_TAG") ? getenv("KL_BENCH_TAG") : "";
	int			ncu_steps = getenv("KL_BENCH_NCU_STEPS") ? atoi(getenv("KL_BENCH_NCU_STEPS")) : 0;
	bool		ncu_prefill = getenv("KL_BENCH_NCU_PREFILL") && atoi(getenv("KL_BENCH_NCU_PREFILL")) != 0;
	kl_sampling sp;
	kl_rng		rng;
	kl_sample_req req;
	const kl_sample_req **reqs = NULL;
	int32_t    *sampled = NULL;

	kl_load_opts o = {0};
	kl_model   *m;
	kl_err		err;
	kl_ctx	   *ctx;
	const kl_config *c;
	int			V;
	double		t0;
	long		maxlen = 0;
	int32_t    *ids;
	int			maxb = 1;

	/* bytes a weight of the quantized matrices: fp8 / int8 per channel (a
	 * 4-byte scale a row of at least 1024), int4 a scale per 32 */
	double		qbpp = !quantize ? 2.0 : strcmp(quantize, "int4") == 0 ? 0.5 + 4.0 / 32 : 1.0 + 4.0 / 1024;

	o.device = "cuda";
	o.precision = precision;
	o.quantize = quantize;
	kl_sampling_default(&sp);
	if (strcmp(sample, "topp") == 0)
	{
		sp.temperature = 0.8f;
		sp.top_p = 0.9f;
	}
	kl_rng_seed(&rng, 1);
	memset(&req, 0, sizeof(req));
	req.sampling = &sp;
	req.rng = &rng;
	t0 = kl_now();
	if (kl_model_create_random(config, &o, "bf16", 42, &m, &err) != KL_OK)
		fail("random model", &err);
	m->be->ops->sync(m->be);
	c = kl_model_config(m);
	V = c->vocab_size;
	printf("RESULT kind=model layers=%d params=%lld weight_GB=%.2f resident_GB=%.2f quantize=%s precision=%s "
		   "format=\"%s\" create_s=%.1f gpu_GB=%.1f\n", c->n_layers, (long long) kl_model_n_params(m),
		   kl_model_weight_bytes(m) / 1e9, kl_model_resident_bytes(m) / 1e9, quantize ? quantize : "none",
		   kl_model_precision(m), kl_model_weight_format(m), kl_now() - t0, gpu_used_gb());
	fflush(stdout);
	if (kl_ctx_new(m, step_tokens, &ctx, &err) != KL_OK)
		fail("context", &err);
	for (int i = 0; i < npre; i++)
		maxlen = pre[i] > maxlen ? pre[i] : maxlen;
	for (int i = 0; i < nctx; i++)
		maxlen = ctxs[i] > maxlen ? ctxs[i] : maxlen;
	for (int i = 0; i < nb; i++)
		maxb = batches[i] > maxb ? (int) batches[i] : maxb;
	reqs = calloc((size_t) maxb, sizeof(*reqs));
	sampled = calloc((size_t) maxb, sizeof(int32_t));
	for (int i = 0; i < maxb; i++)
		reqs[i] = &req;
	ids = malloc(sizeof(int32_t) * (size_t) (maxlen + 1024));
	for (long i = 0; i < maxlen + 1024; i++)
		ids[i] = (int32_t) ((i * 2654435761u) % (unsigned) V);

	/* prefill: a fresh sequence, the logits of its last token */
	for (int i = 0; i < npre; i++)
	{
		kl_seq	   *s;
		float	   *lg = malloc(sizeof(float) * V);
		kl_batch_item it;
		double		dt;

		if (kl_seq_new(m, &s, &err) != KL_OK)
			fail("sequence", &err);
		/* warm-up: kernel loading, cuBLAS heuristics, working memory */
		it = (kl_batch_item) {s, ids, (int) (pre[i] < step_tokens ? pre[i] : step_tokens), lg, false};
		if (kl_forward(ctx, &it, 1, &err) != KL_OK)
			fail("warm-up", &err);
		kl_seq_reset(s);
		it = (kl_batch_item) {s, ids, (int) pre[i], lg, false};
		m->be->ops->sync(m->be);
		if (ncu_prefill)
			cudaProfilerStart();
		t0 = kl_now();
		if (kl_forward(ctx, &it, 1, &err) != KL_OK)
		{
			printf("RESULT kind=prefill T=%ld error=\"%s\"\n", pre[i], err.msg);
			kl_seq_free(s);
			free(lg);
			continue;
		}
		dt = kl_now() - t0;
		if (ncu_prefill)
			cudaProfilerStop();
		{
			double		fl = prefill_flops(c, pre[i], step_tokens),
						roof = fl / (ceiling_tflops * 1e12);

			printf("RESULT kind=prefill tag=%s T=%ld s=%.3f tokens_per_s=%.0f tflops=%.1f flops=%.4g "
				   "ceiling_tflops=%.1f roofline_s=%.3f pct_of_roofline=%.1f gpu_GB=%.1f\n", tag[0] ? tag : "-",
				   pre[i], dt, pre[i] / dt, fl / dt / 1e12, fl, ceiling_tflops, roof, 100.0 * roof / dt,
				   gpu_used_gb());
		}
		if (strcmp(kl_model_precision(m), "fp8") == 0)
			print_fp8_stats(m->be, pre[i]);
		fflush(stdout);
		if (profile)
		{
			/* where one prefill's time goes: every op waited for (prefill steps run no graphs) */
			double		parts[KL_PROF_N];

			kl_seq_reset(s);
			kl_ctx_profile(ctx, true);
			m->be->ops->sync(m->be);
			t0 = kl_now();
			if (kl_forward(ctx, &it, 1, &err) != KL_OK)
				fail("profiled prefill", &err);
			m->be->ops->sync(m->be);
			dt = kl_now() - t0;
			kl_ctx_profile_read(ctx, parts);
			kl_ctx_profile(ctx, false);
			printf("RESULT kind=prefill_parts tag=%s T=%ld s_synced=%.3f linear=%.3f kda=%.3f mla=%.3f moe=%.3f "
				   "logits=%.3f other=%.3f\n", tag[0] ? tag : "-", pre[i], dt, parts[KL_PROF_LINEAR],
				   parts[KL_PROF_KDA], parts[KL_PROF_MLA], parts[KL_PROF_MOE], parts[KL_PROF_LOGITS],
				   parts[KL_PROF_OTHER]);
			fflush(stdout);
		}
		kl_seq_free(s);
		free(lg);
	}

	/* decode: one sequence prefilled to the context, cloned for the batch */
	for (int ci = 0; ci < nctx; ci++)
	{
		kl_seq	   *base;
		kl_batch_item it;

		if (kl_seq_new(m, &base, &err) != KL_OK)
			fail("sequence", &err);
		it = (kl_batch_item) {base, ids, (int) ctxs[ci], NULL, false};
		if (kl_forward(ctx, &it, 1, &err) != KL_OK)
			fail("context prefill", &err);
		for (int bi = 0; bi < nb; bi++)
		{
			int			b = (int) batches[bi];
			kl_seq	  **seqs = calloc((size_t) b, sizeof(kl_seq *));
			kl_batch_item *items = calloc((size_t) b, sizeof(kl_batch_item));
			float	   *lg = malloc(sizeof(float) * (size_t) V * b);
			int32_t    *tok = malloc(sizeof(int32_t) * (size_t) b);
			bool		ok = true;
			double		dt = 0;

			for (int s = 0; s < b && ok; s++)
				if (kl_seq_clone(base, &seqs[s], &err) != KL_OK)
				{
					printf("RESULT kind=decode ctx=%ld batch=%d error=\"%s\"\n", ctxs[ci], b, err.msg);
					ok = false;
				}
			for (int step = -3; step < steps && ok; step++)
			{
				if (step == 0)
				{
					m->be->ops->sync(m->be);
					t0 = kl_now();
				}
				for (int s = 0; s < b; s++)
				{
					tok[s] = ids[(ctxs[ci] + step + 3 + s) % maxlen];
					items[s] = (kl_batch_item) {seqs[s], &tok[s], 1, lg + (size_t) s * V, false};
				}
				if (decode_step(ctx, items, b, sample, reqs, sampled, &err) != KL_OK)
				{
					printf("RESULT kind=decode ctx=%ld batch=%d error=\"%s\"\n", ctxs[ci], b, err.msg);
					ok = false;
				}
			}
			if (ok)
			{
				double		bytes = decode_bytes(c, b, ctxs[ci], m->be->mla_cache_bf16 ? 2 : 4, qbpp);

				dt = (kl_now() - t0) / steps;
				printf("RESULT kind=decode tag=%s sample=%s ctx=%ld batch=%d ms_per_step=%.3f tokens_per_s=%.1f "
					   "bytes=%.4g kernels=%d gpu_GB=%.1f\n", tag[0] ? tag : "-", sample, ctxs[ci], b, dt * 1e3,
					   b / dt, bytes, m->be->step_kernels, gpu_used_gb());
			}
			if (ok && ncu_steps > 0)
			{
				/* a few more steps for Nsight Compute (--profile-from-start off) */
				m->be->ops->sync(m->be);
				cudaProfilerStart();
				for (int step = 0; step < ncu_steps && ok; step++)
				{
					for (int s = 0; s < b; s++)
					{
						tok[s] = ids[(ctxs[ci] + steps + step + 3 + s) % maxlen];
						items[s] = (kl_batch_item) {seqs[s], &tok[s], 1, lg + (size_t) s * V, false};
					}
					ok = decode_step(ctx, items, b, sample, reqs, sampled, &err) == KL_OK;
				}
				m->be->ops->sync(m->be);
				cudaProfilerStop();
				printf("RESULT kind=ncu_range tag=%s sample=%s ctx=%ld batch=%d steps=%d\n", tag[0] ? tag : "-", sample,
					   ctxs[ci], b, ncu_steps);
			}
			if (ok && profile)
			{
				/* where a step's time goes: graphs off, every op waited for */
				double		parts[KL_PROF_N];
				int			ps = 5;

				setenv("KL_CUDA_GRAPHS", "0", 1);
				kl_ctx_profile(ctx, true);
				t0 = kl_now();
				for (int step = 0; step < ps && ok; step++)
				{
					for (int s = 0; s < b; s++)
					{
						tok[s] = ids[(ctxs[ci] + steps + step + 3 + s) % maxlen];
						items[s] = (kl_batch_item) {seqs[s], &tok[s], 1, lg + (size_t) s * V, false};
					}
					ok = decode_step(ctx, items, b, sample, reqs, sampled, &err) == KL_OK;
				}
				dt = (kl_now() - t0) / ps;
				kl_ctx_profile_read(ctx, parts);
				kl_ctx_profile(ctx, false);
				unsetenv("KL_CUDA_GRAPHS");
				printf("RESULT kind=decode_parts tag=%s ctx=%ld batch=%d ms_per_step_nograph_synced=%.3f linear=%.3f "
					   "kda=%.3f mla=%.3f moe=%.3f logits=%.3f other=%.3f\n", tag[0] ? tag : "-", ctxs[ci], b, dt * 1e3,
					   parts[KL_PROF_LINEAR] * 1e3 / ps, parts[KL_PROF_KDA] * 1e3 / ps, parts[KL_PROF_MLA] * 1e3 / ps,
					   parts[KL_PROF_MOE] * 1e3 / ps, parts[KL_PROF_LOGITS] * 1e3 / ps, parts[KL_PROF_OTHER] * 1e3 / ps);
			}
			fflush(stdout);
			for (int s = 0; s < b; s++)
				if (seqs[s])
					kl_seq_free(seqs[s]);
			free(seqs);
			free(items);
			free(lg);
			free(tok);
		}
		kl_seq_free(base);
	}
	(void) maxb;
	free(reqs);
	free(sampled);
	kl_ctx_free(ctx);
	kl_model_free(m);
	free(ids);
}

int
main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "ceilings") == 0)
		ceilings();
	else if (argc >= 5 && strcmp(argv[1], "drift") == 0)
		drift(argv[2], atoi(argv[3]), argv[4]);
	else if (argc >= 4 && strcmp(argv[1], "sample") == 0)
	{
		long		b[16];
		int			n = parse_list(argv[3], b, 16);

		sample_alone(atoi(argv[2]), b, n);
	}
	else if (argc >= 3 && strcmp(argv[1], "moe") == 0)
	{
		long		T[16];
		int			n = parse_list(argv[2], T, 16);

		moe_alone(argc >= 4 ? argv[3] : "bench/configs/kimi-linear-48b-a3b.json", T, n);
	}
	else if (argc >= 5 && strcmp(argv[1], "kda") == 0)
	{
		long		T[16];
		int			n = parse_list(argv[4], T, 16);

		kda_alone(atoi(argv[2]), atoi(argv[3]), T, n);
	}
	else if (argc >= 3 && strcmp(argv[1], "mla") == 0)
	{
		long		T[16];
		int			n = parse_list(argv[2], T, 16);

		mla_alone(T, n);
	}
	else if (argc >= 4 && strcmp(argv[1], "mla_decode") == 0)
	{
		long		C[16],
					B[16],
					V[8];
		int			nc = parse_list(argv[2], C, 16),
					nb = parse_list(argv[3], B, 16),
					nv = parse_list(argc >= 5 ? argv[4] : "0,1,2", V, 8);

		mla_decode_alone(C, nc, B, nb, V, nv);
	}
	else if (argc >= 3 && strcmp(argv[1], "model") == 0)
	{
		long		pre[16],
					ctxs[16],
					bat[16];
		int			npre = parse_list("4096,32768,131072", pre, 16),
					nctx = parse_list("4096,32768", ctxs, 16),
					nb = parse_list("1,8,32,64", bat, 16),
					steps = 20,
					step_tokens = 8192;
		bool		profile = false;
		double		ceiling = TORCH_BF16_GEMM_TFLOPS;
		const char *sample = "topp",
				   *quantize = NULL,
				   *precision = "bf16";

		for (int i = 3; i + 1 < argc; i += 2)
		{
			if (strcmp(argv[i], "--prefill") == 0)
				npre = strcmp(argv[i + 1], "none") == 0 ? 0 : parse_list(argv[i + 1], pre, 16);
			else if (strcmp(argv[i], "--decode-ctx") == 0)
				nctx = strcmp(argv[i + 1], "none") == 0 ? 0 : parse_list(argv[i + 1], ctxs, 16);
			else if (strcmp(argv[i], "--batches") == 0)
				nb = parse_list(argv[i + 1], bat, 16);
			else if (strcmp(argv[i], "--steps") == 0)
				steps = atoi(argv[i + 1]);
			else if (strcmp(argv[i], "--step-tokens") == 0)
				step_tokens = atoi(argv[i + 1]);
			else if (strcmp(argv[i], "--profile") == 0)
				profile = atoi(argv[i + 1]) != 0;
			else if (strcmp(argv[i], "--sample") == 0)
				sample = argv[i + 1];
			else if (strcmp(argv[i], "--quantize") == 0)
				quantize = strcmp(argv[i + 1], "none") == 0 ? NULL : argv[i + 1];
			else if (strcmp(argv[i], "--precision") == 0)
				precision = argv[i + 1];
			else if (strcmp(argv[i], "--ceiling-tflops") == 0 && atof(argv[i + 1]) > ceiling)
				ceiling = atof(argv[i + 1]);	/* a measured rate above PyTorch's */
		}
		if (quantize && strcmp(quantize, "fp8") != 0 && strcmp(quantize, "int8") != 0 &&
			strcmp(quantize, "int4") != 0)
		{
			fprintf(stderr, "bench_cuda: --quantize fp8, int8, int4 or none\n");
			return 2;
		}
		if (strcmp(sample, "logits") != 0 && strcmp(sample, "greedy") != 0 && strcmp(sample, "topp") != 0)
		{
			fprintf(stderr, "bench_cuda: --sample logits, greedy or topp\n");
			return 2;
		}
		if (strcmp(precision, "bf16") != 0 && strcmp(precision, "fp8") != 0)
		{
			fprintf(stderr, "bench_cuda: --precision bf16 or fp8\n");
			return 2;
		}
		model_bench(argv[2], pre, npre, ctxs, nctx, bat, nb, steps, step_tokens, profile, sample, quantize, precision,
					ceiling);
	}
	else
	{
		fprintf(stderr, "usage: bench_cuda ceilings | sample V B1,B2,... | drift DIR STEPS fp32|bf16 | kda H K T1,T2,... | "
				"moe T1,T2,... [CONFIG] | mla T1,T2,... | mla_decode C1,.. B1,.. [V1,..] | model CONFIG [--prefill L,...] "
				"[--decode-ctx C,...] [--batches B,...] [--steps N] [--step-tokens N] [--profile 0|1] "
				"[--sample logits|greedy|topp] [--quantize fp8|int8|int4] [--precision bf16|fp8] [--ceiling-tflops X]\n");
		return 2;
	}
	return 0;
}
