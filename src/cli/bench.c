/*
 * bench.c — ./kl bench: prefill and decode throughput of a model, each
 * against its roofline, as a markdown table.
 *
 * Ceilings are measured on the machine, not taken from a datasheet:
 *   memory bandwidth  a large parallel memcpy, bytes read + bytes written
 *   compute           OpenBLAS sgemm (2048^3) run the way the engine runs it
 *                     (row blocks over our thread pool)
 * Decode roofline: bytes one token must read (active weights, the KDA state
 * read and written, the MLA cache read) over the bandwidth.  Prefill
 * roofline: FLOPs of the forward pass over the sgemm rate.
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli_util.h"
#include "commands.h"
#include "model.h"
#include "simd.h"
#include "threadpool.h"

#define MAX_POINTS 8

/* ------------------------------------------------------------------ machine ceilings */

typedef struct copy_job
{
	char	   *dst;
	const char *src;
	size_t		n;
	int			parts;
} copy_job;

static void
copy_task(void *arg, int t, int thread)
{
	copy_job   *j = arg;
	size_t		per = j->n / (size_t) j->parts;

	(void) thread;
	memcpy(j->dst + per * (size_t) t, j->src + per * (size_t) t, per);
}

/* GB/s, counting bytes read and bytes written */
static double
measure_bandwidth(void)
{
	size_t		n = (size_t) 1 << 30;
	char	   *a = malloc(n),
			   *b = malloc(n);
	double		best = 0;
	copy_job	j;

	if (!a || !b)
	{
		free(a);
		free(b);
		return 0;
	}
	memset(a, 1, n);
	memset(b, 2, n);
	j.dst = b;
	j.src = a;
	j.n = n;
	j.parts = kl_pool_threads() * 4;
	for (int r = 0; r < 5; r++)
	{
		double		t0 = kl_now(),
					dt;

		kl_parallel_for(j.parts, copy_task, &j);
		dt = kl_now() - t0;
		if (2.0 * n / dt > best)
			best = 2.0 * n / dt;
	}
	free(a);
	free(b);
	return best / 1e9;
}

typedef struct gemm_job
{
	const float *A,
			   *B;
	float	   *C;
	int			n;
	int			block;
} gemm_job;

static void
gemm_task(void *arg, int t, int thread)
{
	gemm_job   *j = arg;

	(void) thread;
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->n, j->block, j->n, 1.0f, j->A, j->n,
				j->B + (size_t) t * j->block * j->n, j->n, 0.0f, j->C + (size_t) t * j->block, j->n);
}

/* GFLOP/s */
static double
measure_sgemm(void)
{
	int			n = 2048;
	float	   *A = malloc(sizeof(float) * (size_t) n * n);
	float	   *B = malloc(sizeof(float) * (size_t) n * n);
	float	   *C = malloc(sizeof(float) * (size_t) n * n);
	gemm_job	j = {A, B, C, n, 128};
	double		best = 0;

	for (size_t i = 0; i < (size_t) n * n; i++)
	{
		A[i] = (float) ((i * 7) % 13) * 0.1f;
		B[i] = (float) ((i * 5) % 11) * 0.1f;
	}
	for (int r = 0; r < 3; r++)
	{
		double		t0 = kl_now(),
					dt;

		kl_parallel_for(n / j.block, gemm_task, &j);
		dt = kl_now() - t0;
		if (2.0 * n * n * n / dt > best)
			best = 2.0 * n * n * n / dt;
	}
	free(A);
	free(B);
	free(C);
	return best / 1e9;
}

/* ------------------------------------------------------------------ model arithmetic */

static double
wbytes(const kl_weight *w)
{
	if (w->q.type != KL_Q_NONE)
		return (double) kl_q_bytes(&w->q);
	return (double) w->rows * w->cols * (double) kl_dtype_size(w->dtype);
}

static double
wparams(const kl_weight *w)
{
	return (double) w->rows * w->cols;
}

static double
mlp_bytes(const kl_mlp *m)
{
	return wbytes(&m->gate) + wbytes(&m->up) + wbytes(&m->down);
}

static double
mlp_params(const kl_mlp *m)
{
	return wparams(&m->gate) + wparams(&m->up) + wparams(&m->down);
}

/* Weight bytes one decode step reads (the embedding: one row; MoE: the k
 * experts a token uses plus shared and router), and the matching
 * multiply-add count per token (2 FLOPs per weight used). */
static void
active_weights(const kl_model *m, double *bytes, double *flops)
{
	const kl_config *c = &m->cfg;
	double		b = 0,
				params = 0;

	for (int i = 0; i < c->n_layers; i++)
	{
		const kl_layer *L = &m->layers[i];
		const kl_weight *ws[16];
		int			n = 0;

		if (L->kind == KL_LAYER_KDA)
		{
			const kl_kda_layer *k = &L->kda;
			const kl_weight *kw[] = {&k->q_proj, &k->k_proj, &k->v_proj, &k->f_a, &k->f_b, &k->b_proj,
			&k->g_a, &k->g_b, &k->o_proj};

			for (size_t j = 0; j < sizeof(kw) / sizeof(kw[0]); j++)
				ws[n++] = kw[j];
		}
		else
		{
			const kl_mla_layer *a = &L->mla;

			if (c->q_lora_rank > 0)
			{
				ws[n++] = &a->q_a;
				ws[n++] = &a->q_b;
			}
			else
				ws[n++] = &a->q_proj;
			ws[n++] = &a->kv_a;
			ws[n++] = &a->kv_b;
			ws[n++] = &a->o_proj;
		}
		for (int j = 0; j < n; j++)
		{
			b += wbytes(ws[j]);
			params += (double) ws[j]->rows * ws[j]->cols;
		}
		if (!L->is_moe)
		{
			b += mlp_bytes(&L->mlp);
			params += mlp_params(&L->mlp);
		}
		else
		{
			double		e = mlp_bytes(&L->moe.experts[0]);

			b += wbytes(&L->moe.router) + e * c->experts_per_token;
			params += wparams(&L->moe.router) + mlp_params(&L->moe.experts[0]) * c->experts_per_token;
			if (L->moe.has_shared)
			{
				b += mlp_bytes(&L->moe.shared);
				params += mlp_params(&L->moe.shared);
			}
		}
	}
	b += wbytes(&m->lm_head) + (double) c->hidden_size * kl_dtype_size(m->embed.dtype);
	params += (double) m->lm_head.rows * m->lm_head.cols;
	*bytes = b;
	*flops = 2 * params;
}

/* bytes of sequence state a decode step reads (and writes, for KDA) at context ctx */
static double
state_bytes(const kl_config *c, double ctx)
{
	double		kda = (double) c->n_kda_layers * c->kda_heads * c->kda_head_dim * c->kda_head_dim * 4 * 2;
	double		mla = (double) c->n_mla_layers * kl_mla_row(c) * 4 * ctx;

	return kda + mla;
}

/*
 * FLOPs of the mixers' cores for n new tokens after `past` positions, counted
 * the way the CPU engine computes them: KDA in chunks of 64; MLA absorbed for
 * short inputs (per (token, head, key) a score over R + Dr and a value
 * accumulation over R), expanded for prompts of 64 tokens or more (keys and
 * values expanded once per step of `step` tokens, then Dn + Dr and Dv per pair).
 */
static double
mixer_flops(const kl_config *c, double past, double n, double step)
{
	double		K = c->kda_head_dim,
				C = 64;
	double		kda = c->n_kda_layers * c->kda_heads * n * 2 * (3 * K * K + C * K + C * K);
	double		R = c->kv_lora_rank,
				Dr = c->qk_rope_dim,
				Dn = c->qk_nope_dim,
				Dv = c->v_head_dim,
				Ha = c->mla_heads;
	double		mla = 0;

	if (n < 64)
	{
		double		pairs = n * past + n * (n + 1) / 2;

		mla = Ha * (n * 2 * R * (Dn + Dv) + pairs * 2 * (2 * R + Dr));
	}
	else
		for (double done = 0; done < n; done += step)
		{
			double		s = n - done < step ? n - done : step;
			double		keys = past + done + s;
			double		pairs = s * (past + done) + s * (s + 1) / 2;

			mla += Ha * (keys * 2 * R * (Dn + Dv) + pairs * 2 * (Dn + Dr + Dv));
		}
	return kda + c->n_mla_layers * mla;
}

/*
 * The ceilings are measured in a child process: the copy test touches 2 GB,
 * which would otherwise count in the peak memory reported for the model.
 * (Forked before this process starts any thread.)
 */
static void
measure_ceilings(int threads, double *bw, double *gflops)
{
	int			fds[2];
	pid_t		pid;
	double		r[2] = {0, 0};

	if (pipe(fds) != 0 || (pid = fork()) < 0)
	{
		kl_set_threads(threads);
		*bw = measure_bandwidth();
		*gflops = measure_sgemm();
		return;
	}
	if (pid == 0)
	{
		close(fds[0]);
		kl_set_threads(threads);
		r[0] = measure_bandwidth();
		r[1] = measure_sgemm();
		if (write(fds[1], r, sizeof(r)) != sizeof(r))
			_exit(1);
		_exit(0);
	}
	close(fds[1]);
	if (read(fds[0], r, sizeof(r)) != sizeof(r))
		r[0] = r[1] = 0;
	close(fds[0]);
	waitpid(pid, NULL, 0);
	*bw = r[0];
	*gflops = r[1];
}

static long
peak_rss_mb(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_maxrss / 1024;
}

static int
parse_list(const char *s, int *out, int max)
{
	int			n = 0;

	while (*s && n < max)
	{
		char	   *end;
		long		v = strtol(s, &end, 10);

		if (end == s)
			break;
		if (*end == 'k' || *end == 'K')
		{
			v *= 1024;
			end++;
		}
		out[n++] = (int) v;
		s = *end == ',' ? end + 1 : end;
	}
	return n;
}

/* ------------------------------------------------------------------ the benchmark */

int
cmd_bench(int argc, char **argv)
{
	cli_common co;
	const char *config = NULL,
			   *dtype = "bf16",
			   *label = NULL;
	int			prefill[MAX_POINTS] = {512, 4096, 32768},
				decode[MAX_POINTS] = {0, 4096, 32768};
	int			n_prefill = 3,
				n_decode = 3,
				steps = 32;
	bool		profile = false;
	bool		roofline = true;	/* --no-roofline: skip measuring the ceilings (quick comparisons) */
	kl_err		err;
	kl_model   *m = NULL;
	kl_ctx	   *ctx = NULL;
	kl_seq	   *kept[MAX_POINTS] = {0};
	double		bw,
				gflops,
				wb,
				wf,
				t_load;
	const kl_config *c;
	char		cpu[256],
				date[64];
	time_t		now = time(NULL);
	int32_t    *ids;
	int			max_t = 0;
	float	   *logits;

	cli_common_init(&co);
	for (int i = 1; i < argc; i++)
	{
		if (cli_common_arg(&co, argc, argv, &i))
			continue;
		if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
			config = argv[++i];
		else if (strcmp(argv[i], "--dtype") == 0 && i + 1 < argc)
			dtype = argv[++i];
		else if (strcmp(argv[i], "--label") == 0 && i + 1 < argc)
			label = argv[++i];
		else if (strcmp(argv[i], "--prefill") == 0 && i + 1 < argc)
			n_prefill = parse_list(argv[++i], prefill, MAX_POINTS);
		else if (strcmp(argv[i], "--decode") == 0 && i + 1 < argc)
			n_decode = parse_list(argv[++i], decode, MAX_POINTS);
		else if (strcmp(argv[i], "--decode-steps") == 0 && i + 1 < argc)
			steps = atoi(argv[++i]);
		else if (strcmp(argv[i], "--profile") == 0)
			profile = true;
		else if (strcmp(argv[i], "--no-roofline") == 0)
			roofline = false;
		else
		{
			fprintf(stderr, "kl bench: unknown or incomplete option %s\n", argv[i]);
			return 2;
		}
	}
	if (!co.model == !config)
	{
		fprintf(stderr, "kl bench: give --model DIR or --config FILE (random weights)\n");
		return 2;
	}
	cli_cpu_name(cpu, sizeof(cpu));
	strftime(date, sizeof(date), "%Y-%m-%d", gmtime(&now));
	bw = gflops = 0;
	if (roofline)
		measure_ceilings(co.threads, &bw, &gflops);
	kl_set_threads(co.threads);

	t_load = kl_now();
	if (co.model)
	{
		if (cli_load(&co, &m, &err) != KL_OK)
			goto fail;
	}
	else
	{
		kl_load_opts opts = cli_load_opts(&co);

		if (kl_model_create_random(config, &opts, dtype, 42, &m, &err) != KL_OK)
			goto fail;
	}
	t_load = kl_now() - t_load;
	c = kl_model_config(m);
	active_weights(m, &wb, &wf);
	if (kl_ctx_new(m, 512, &ctx, &err) != KL_OK)
		goto fail;

	for (int i = 0; i < n_prefill; i++)
		max_t = prefill[i] > max_t ? prefill[i] : max_t;
	for (int i = 0; i < n_decode; i++)
		max_t = decode[i] > max_t ? decode[i] : max_t;
	ids = malloc(sizeof(int32_t) * (size_t) (max_t + 1));
	logits = malloc(sizeof(float) * (size_t) c->vocab_size);
	{
		uint64_t	x = 7;

		for (int i = 0; i <= max_t; i++)
		{
			x = x * 6364136223846793005ull + 1442695040888963407ull;
			ids[i] = (int32_t) ((x >> 33) % (uint64_t) c->vocab_size);
		}
	}

	printf("## %s\n\n", label ? label : (co.model ? co.model : config));
	printf("Machine: %s, %d threads (%s kernels), device %s; %s.  \n", cpu, kl_pool_threads(),
		   kl_simd_get()->name, kl_model_device(m), date);
	printf("Model: %.1fM parameters (%.1f MB of weights%s, %s), %d layers (%d KDA, %d MLA)%s; "
		   "a decode step reads %.1f MB of weights.  \n",
		   kl_model_n_params(m) / 1e6, kl_model_resident_bytes(m) / 1e6, config ? ", random" : "",
		   kl_model_weight_format(m), c->n_layers, c->n_kda_layers, c->n_mla_layers,
		   c->n_experts ? ", MoE" : "", wb / 1e6);
	printf("Ceilings measured here: memcpy %.1f GB/s (read + write), sgemm %.1f GFLOP/s. Load %.2f s.  \n",
		   bw, gflops, t_load);
	printf("Roofline: prefill = FLOPs / sgemm rate; decode = bytes read (active weights, KDA state read and "
		   "written, MLA cache) / memcpy bandwidth, or FLOPs / sgemm rate where that is slower (marked compute).\n\n");
	printf("| phase | context | tokens/s | time to first token | ms/token | peak RSS | roofline tokens/s | of roofline |\n");
	printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
	fflush(stdout);

	{
		double		per_tok[MAX_POINTS],
					per_tok_nomla[MAX_POINTS];

		for (int i = 0; i < n_prefill; i++)
		{
			int			T = prefill[i];
			kl_seq	   *s;
			kl_batch_item it;
			double		t0,
						dt,
						prof[KL_PROF_N],
						flops;

			if (kl_seq_new(m, &s, &err) != KL_OK)
				goto fail;
			it.seq = s;
			it.ids = ids;
			it.n = T;
			it.logits = logits;
			it.all_logits = false;
			kl_ctx_profile(ctx, true);
			t0 = kl_now();
			if (kl_forward(ctx, &it, 1, &err) != KL_OK)
				goto fail;
			dt = kl_now() - t0;
			kl_ctx_profile_read(ctx, prof);
			kl_ctx_profile(ctx, false);
			flops = wf * T + mixer_flops(c, 0, T, 512);
			per_tok[i] = dt / T * 1e3;
			per_tok_nomla[i] = (dt - prof[KL_PROF_MLA]) / T * 1e3;
			printf("| prefill | %d | %.1f | %.3f s | %.3f | %ld MB | %.1f | %.0f%% |\n", T, T / dt, dt,
				   per_tok[i], peak_rss_mb(), gflops * 1e9 / (flops / T), 100.0 * (flops / dt) / (gflops * 1e9));
			fflush(stdout);
			kept[i] = s;
		}
		for (int i = 0; i < n_decode; i++)
		{
			int			C = decode[i];
			kl_seq	   *s = NULL;
			double		t0,
						dt;
			int32_t		tok = ids[C];
			double		bytes = wb + state_bytes(c, C + steps / 2.0);
			double		flops = wf + mixer_flops(c, C + steps / 2.0, 1, 1);
			/* the step is bound by whichever is slower: bytes or arithmetic */
			double		floor_s = bytes / (bw * 1e9) > flops / (gflops * 1e9) ?
				bytes / (bw * 1e9) : flops / (gflops * 1e9);

			/* reuse a prefilled sequence of that length, else prefill one */
			for (int j = 0; j < n_prefill; j++)
				if (prefill[j] == C && kept[j])
				{
					s = kept[j];
					kept[j] = NULL;
				}
			if (!s)
			{
				kl_batch_item it = {NULL, ids, C, NULL, false};

				if (kl_seq_new(m, &s, &err) != KL_OK)
					goto fail;
				it.seq = s;
				if (C > 0 && kl_forward(ctx, &it, 1, &err) != KL_OK)
					goto fail;
			}
			t0 = kl_now();
			for (int w = 0; w <= steps; w++)
			{
				kl_batch_item it = {s, &tok, 1, logits, false};

				if (w == 1)
				{
					t0 = kl_now();	/* the first step warms caches up */
					kl_ctx_profile(ctx, profile);
				}
				if (kl_forward(ctx, &it, 1, &err) != KL_OK)
					goto fail;
				tok = 0;
				for (int v = 1; v < c->vocab_size; v++)
					if (logits[v] > logits[tok])
						tok = v;
			}
			dt = kl_now() - t0;
			printf("| decode | %d | %.1f | | %.2f | %ld MB | %.1f%s | %.0f%% |\n", C, steps / dt, dt / steps * 1e3,
				   peak_rss_mb(), 1.0 / floor_s,
				   bytes / (bw * 1e9) >= flops / (gflops * 1e9) ? "" : " (compute)",
				   100.0 * floor_s / (dt / steps));
			if (profile)
			{
				double		prof[KL_PROF_N];
				static const char *names[KL_PROF_N] = {"linear", "kda", "mla", "moe", "logits", "other"};

				kl_ctx_profile_read(ctx, prof);
				kl_ctx_profile(ctx, false);
				printf("|  | profile, ms/token: ");
				for (int p = 0; p < KL_PROF_N; p++)
					printf("%s %.3f ", names[p], prof[p] / steps * 1e3);
				printf("| | | | | | |\n");
			}
			fflush(stdout);
			kl_seq_free(s);
		}
		printf("\nPrefill time per token (ms): ");
		for (int i = 0; i < n_prefill; i++)
			printf("%s%d: %.3f total, %.3f without the MLA attention core", i ? "; " : "", prefill[i],
				   per_tok[i], per_tok_nomla[i]);
		printf(".\n\n");
	}
	for (int i = 0; i < n_prefill; i++)
		kl_seq_free(kept[i]);
	free(ids);
	free(logits);
	kl_ctx_free(ctx);
	kl_model_free(m);
	return 0;
fail:
	fprintf(stderr, "kl bench: %s\n", err.msg);
	kl_ctx_free(ctx);
	kl_model_free(m);
	return 1;
}
