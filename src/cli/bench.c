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

/* ------------------------------------------------------------------ the benchmark */

typedef struct bench_opts
{
	cli_common	co;
	const char *config;			/* --config FILE: random weights of that shape */
	const char *dtype;
	const char *label;
	int			prefill[MAX_POINTS],
				decode[MAX_POINTS];
	int			n_prefill,
				n_decode,
				steps;
	bool		profile;
	bool		roofline;		/* --no-roofline: skip measuring the ceilings (quick comparisons) */
} bench_opts;

/* what the measurements share */
typedef struct bench_run
{
	const bench_opts *o;
	kl_model   *m;
	kl_ctx	   *ctx;
	const kl_config *c;
	double		bw,				/* measured ceilings: GB/s, GFLOP/s */
				gflops;
	double		wb,				/* active weights of one token: bytes, FLOPs */
				wf;
	int32_t    *ids;			/* the token sequence every point reads a prefix of */
	float	   *logits;			/* [vocab] */
	kl_seq	   *kept[MAX_POINTS];	/* prefilled sequences a decode point may reuse */
	double		per_tok[MAX_POINTS],
				per_tok_nomla[MAX_POINTS];
} bench_run;

static int
parse_bench_args(int argc, char **argv, bench_opts *o)
{
	const cli_opt opts[] = {
		CLI_OPT("--config", CLI_OPT_STRING, &o->config),
		CLI_OPT("--dtype", CLI_OPT_STRING, &o->dtype),
		CLI_OPT("--label", CLI_OPT_STRING, &o->label),
		CLI_OPT_LIST("--prefill", o->prefill, &o->n_prefill, MAX_POINTS),
		CLI_OPT_LIST("--decode", o->decode, &o->n_decode, MAX_POINTS),
		CLI_OPT("--decode-steps", CLI_OPT_INT, &o->steps),
		CLI_OPT("--profile", CLI_OPT_SET, &o->profile),
		CLI_OPT("--no-roofline", CLI_OPT_CLEAR, &o->roofline),
	};
	static const int prefill[] = {512, 4096, 32768},
				decode[] = {0, 4096, 32768};

	memset(o, 0, sizeof(*o));
	o->dtype = "bf16";
	memcpy(o->prefill, prefill, sizeof(prefill));
	memcpy(o->decode, decode, sizeof(decode));
	o->n_prefill = 3;
	o->n_decode = 3;
	o->steps = 32;
	o->roofline = true;
	cli_common_init(&o->co);
	if (cli_parse_options("bench", argc, argv, &o->co, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	if (!o->co.model == !o->config)
	{
		fprintf(stderr, "kl bench: give --model DIR or --config FILE (random weights)\n");
		return 2;
	}
	return 0;
}

/* The model (loaded, or random of --config's shape), its context and the ids. */
static int
bench_setup(bench_run *r, double *t_load, kl_err *err)
{
	const bench_opts *o = r->o;
	int			max_t = 0;
	uint64_t	x = 7;

	*t_load = kl_now();
	if (o->co.model)
	{
		if (cli_load(&o->co, &r->m, err) != KL_OK)
			return KL_FAIL;
	}
	else
	{
		kl_load_opts opts = cli_load_opts(&o->co);

		if (kl_model_create_random(o->config, &opts, o->dtype, 42, &r->m, err) != KL_OK)
			return KL_FAIL;
	}
	*t_load = kl_now() - *t_load;
	r->c = kl_model_config(r->m);
	active_weights(r->m, &r->wb, &r->wf);
	if (kl_ctx_new(r->m, 512, &r->ctx, err) != KL_OK)
		return KL_FAIL;

	for (int i = 0; i < o->n_prefill; i++)
		max_t = o->prefill[i] > max_t ? o->prefill[i] : max_t;
	for (int i = 0; i < o->n_decode; i++)
		max_t = o->decode[i] > max_t ? o->decode[i] : max_t;
	r->ids = malloc(sizeof(int32_t) * (size_t) (max_t + 1));
	r->logits = malloc(sizeof(float) * (size_t) r->c->vocab_size);
	for (int i = 0; i <= max_t; i++)
	{
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		r->ids[i] = (int32_t) ((x >> 33) % (uint64_t) r->c->vocab_size);
	}
	return KL_OK;
}

/* The table's title, the machine, the model, the ceilings and the header row. */
static void
print_bench_header(const bench_run *r, const char *cpu, const char *date, double t_load)
{
	const bench_opts *o = r->o;
	const kl_config *c = r->c;

	printf("## %s\n\n", o->label ? o->label : (o->co.model ? o->co.model : o->config));
	printf("Machine: %s, %d threads (%s kernels), device %s (%s precision); %s.  \n", cpu, kl_pool_threads(),
		   kl_simd_get()->name, kl_model_device(r->m), kl_model_precision(r->m), date);
	printf("Model: %.1fM parameters (%.1f MB of weights%s, %s), %d layers (%d KDA, %d MLA)%s; "
		   "a decode step reads %.1f MB of weights.  \n",
		   kl_model_n_params(r->m) / 1e6, kl_model_resident_bytes(r->m) / 1e6, o->config ? ", random" : "",
		   kl_model_weight_format(r->m), c->n_layers, c->n_kda_layers, c->n_mla_layers,
		   c->n_experts ? ", MoE" : "", r->wb / 1e6);
	printf("Ceilings measured here: memcpy %.1f GB/s (read + write), sgemm %.1f GFLOP/s. Load %.2f s.  \n",
		   r->bw, r->gflops, t_load);
	printf("Roofline: prefill = FLOPs / sgemm rate; decode = bytes read (active weights, KDA state read and "
		   "written, MLA cache) / memcpy bandwidth, or FLOPs / sgemm rate where that is slower (marked compute).\n\n");
	printf("| phase | context | tokens/s | time to first token | ms/token | peak RSS | roofline tokens/s | of roofline |\n");
	printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
	fflush(stdout);
}

/* Prefill point i: one forward pass over T ids from an empty sequence, kept in r->kept[i]. */
static int
bench_prefill(bench_run *r, int i, kl_err *err)
{
	int			T = r->o->prefill[i];
	kl_seq	   *s;
	kl_batch_item it;
	double		t0,
				dt,
				prof[KL_PROF_N],
				flops;

	if (kl_seq_new(r->m, &s, err) != KL_OK)
		return KL_FAIL;
	it.seq = s;
	it.ids = r->ids;
	it.n = T;
	it.logits = r->logits;
	it.all_logits = false;
	kl_ctx_profile(r->ctx, true);
	t0 = kl_now();
	if (kl_forward(r->ctx, &it, 1, err) != KL_OK)
	{
		kl_seq_free(s);
		return KL_FAIL;
	}
	dt = kl_now() - t0;
	kl_ctx_profile_read(r->ctx, prof);
	kl_ctx_profile(r->ctx, false);
	flops = r->wf * T + mixer_flops(r->c, 0, T, 512);
	r->per_tok[i] = dt / T * 1e3;
	r->per_tok_nomla[i] = (dt - prof[KL_PROF_MLA]) / T * 1e3;
	printf("| prefill | %d | %.1f | %.3f s | %.3f | %ld MB | %.1f | %.0f%% |\n", T, T / dt, dt,
		   r->per_tok[i], peak_rss_mb(), r->gflops * 1e9 / (flops / T),
		   100.0 * (flops / dt) / (r->gflops * 1e9));
	fflush(stdout);
	r->kept[i] = s;
	return KL_OK;
}

/* A sequence of C tokens: a prefilled one of that length, else a new prefill. */
static int
decode_start(bench_run *r, int C, kl_seq **out, kl_err *err)
{
	kl_seq	   *s = NULL;

	for (int j = 0; j < r->o->n_prefill; j++)
		if (r->o->prefill[j] == C && r->kept[j])
		{
			s = r->kept[j];
			r->kept[j] = NULL;
		}
	if (!s)
	{
		kl_batch_item it = {NULL, r->ids, C, NULL, false};

		if (kl_seq_new(r->m, &s, err) != KL_OK)
			return KL_FAIL;
		*out = s;
		it.seq = s;
		if (C > 0 && kl_forward(r->ctx, &it, 1, err) != KL_OK)
			return KL_FAIL;
	}
	*out = s;
	return KL_OK;
}

/* The profile row of a decode point (--profile). */
static void
print_decode_profile(const bench_run *r)
{
	double		prof[KL_PROF_N];
	static const char *names[KL_PROF_N] = {"linear", "kda", "mla", "moe", "logits", "other"};

	kl_ctx_profile_read(r->ctx, prof);
	kl_ctx_profile(r->ctx, false);
	printf("|  | profile, ms/token: ");
	for (int p = 0; p < KL_PROF_N; p++)
		printf("%s %.3f ", names[p], prof[p] / r->o->steps * 1e3);
	printf("| | | | | | |\n");
}

/*
 * Decode point i: steps greedy tokens after a context of C, timed from the
 * second (the first warms caches up), against the slower of the bytes and
 * the arithmetic a step needs.
 */
static int
bench_decode(bench_run *r, int i, kl_err *err)
{
	const kl_config *c = r->c;
	int			C = r->o->decode[i],
				steps = r->o->steps;
	kl_seq	   *s = NULL;
	double		t0,
				dt;
	int32_t		tok = r->ids[C];
	double		bytes = r->wb + state_bytes(c, C + steps / 2.0);
	double		flops = r->wf + mixer_flops(c, C + steps / 2.0, 1, 1);
	/* the step is bound by whichever is slower: bytes or arithmetic */
	double		floor_s = bytes / (r->bw * 1e9) > flops / (r->gflops * 1e9) ?
		bytes / (r->bw * 1e9) : flops / (r->gflops * 1e9);

	if (decode_start(r, C, &s, err) != KL_OK)
	{
		kl_seq_free(s);
		return KL_FAIL;
	}
	t0 = kl_now();
	for (int w = 0; w <= steps; w++)
	{
		kl_batch_item it = {s, &tok, 1, r->logits, false};

		if (w == 1)
		{
			t0 = kl_now();		/* the first step warms caches up */
			kl_ctx_profile(r->ctx, r->o->profile);
		}
		if (kl_forward(r->ctx, &it, 1, err) != KL_OK)
		{
			kl_seq_free(s);
			return KL_FAIL;
		}
		tok = 0;
		for (int v = 1; v < c->vocab_size; v++)
			if (r->logits[v] > r->logits[tok])
				tok = v;
	}
	dt = kl_now() - t0;
	printf("| decode | %d | %.1f | | %.2f | %ld MB | %.1f%s | %.0f%% |\n", C, steps / dt, dt / steps * 1e3,
		   peak_rss_mb(), 1.0 / floor_s,
		   bytes / (r->bw * 1e9) >= flops / (r->gflops * 1e9) ? "" : " (compute)",
		   100.0 * floor_s / (dt / steps));
	if (r->o->profile)
		print_decode_profile(r);
	fflush(stdout);
	kl_seq_free(s);
	return KL_OK;
}

static void
print_prefill_summary(const bench_run *r)
{
	printf("\nPrefill time per token (ms): ");
	for (int i = 0; i < r->o->n_prefill; i++)
		printf("%s%d: %.3f total, %.3f without the MLA attention core", i ? "; " : "", r->o->prefill[i],
			   r->per_tok[i], r->per_tok_nomla[i]);
	printf(".\n\n");
}

static void
bench_run_free(bench_run *r)
{
	for (int i = 0; i < MAX_POINTS; i++)
		kl_seq_free(r->kept[i]);
	free(r->ids);
	free(r->logits);
	kl_ctx_free(r->ctx);
	kl_model_free(r->m);
}

int
cmd_bench(int argc, char **argv)
{
	bench_opts	o;
	bench_run	r;
	kl_err		err;
	double		t_load;
	char		cpu[256],
				date[64];
	time_t		now = time(NULL);
	int			rc;

	if ((rc = parse_bench_args(argc, argv, &o)) != 0)
		return rc;
	memset(&r, 0, sizeof(r));
	r.o = &o;
	cli_cpu_name(cpu, sizeof(cpu));
	strftime(date, sizeof(date), "%Y-%m-%d", gmtime(&now));
	if (o.roofline)
		measure_ceilings(o.co.threads, &r.bw, &r.gflops);
	kl_set_threads(o.co.threads);

	rc = 1;
	if (bench_setup(&r, &t_load, &err) != KL_OK)
		goto fail;
	print_bench_header(&r, cpu, date, t_load);
	for (int i = 0; i < o.n_prefill; i++)
		if (bench_prefill(&r, i, &err) != KL_OK)
			goto fail;
	for (int i = 0; i < o.n_decode; i++)
		if (bench_decode(&r, i, &err) != KL_OK)
			goto fail;
	print_prefill_summary(&r);
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "kl bench: %s\n", err.msg);
out:
	bench_run_free(&r);
	return rc;
}
