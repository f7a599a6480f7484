/*
 * cpu_moe.c — the mixture-of-experts feed-forward on the CPU.
 *
 * Route every token (kl_moe_route), then run each chosen expert once over all
 * the tokens that chose it (gathered rows), so an expert's weights are read
 * once per step; scatter-add the weighted outputs; add the shared experts.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

static float *
grow(float **buf, size_t *cap, size_t n)
{
	if (*cap < n)
	{
		free(*buf);
		*cap = n + n / 4 + 16;
		if (posix_memalign((void **) buf, 64, *cap * sizeof(float)) != 0)
			abort();
	}
	return *buf;
}

static void
swiglu_rows(float *h, const float *g, const float *u, size_t count)
{
	for (size_t i = 0; i < count; i++)
		h[i] = kl_silu(g[i]) * u[i];
}

void
cpu_moe(kl_backend *be, const kl_config *cfg, const kl_moe_layer *w, float *y, const float *x, int n)
{
	/* grow-only buffers, used by the driving thread only */
	static float *logits,
			   *xe,
			   *ye,
			   *gbuf,
			   *ubuf,
			   *wts,
			   *scratch;
	static size_t c_scr,
				c_logits,
				c_xe,
				c_ye,
				c_g,
				c_u,
				c_w;
	static int *sel,
			   *count,
			   *start,
			   *order;
	static kl_matmul_job *jobs;
	static size_t c_sel,
				c_count;
	int			E = cfg->n_experts,
				k = cfg->experts_per_token,
				D = cfg->hidden_size,
				F = cfg->moe_intermediate;
	int			Fs = F * cfg->n_shared_experts;
	size_t		nk = (size_t) n * k;
	size_t		hrows;			/* rows of the intermediate buffers: routed pairs, then shared */
	int			nj;

	grow(&logits, &c_logits, (size_t) n * E);
	grow(&scratch, &c_scr, (size_t) 2 * E);
	grow(&wts, &c_w, nk);
	if (c_sel < nk)
	{
		free(sel);
		free(order);
		c_sel = nk;
		sel = malloc(sizeof(int) * c_sel);
		order = malloc(sizeof(int) * c_sel);
		if (!sel || !order)
			abort();
	}
	if (c_count < (size_t) E + 1)
	{
		free(count);
		free(start);
		free(jobs);
		c_count = (size_t) E + 1;
		count = malloc(sizeof(int) * c_count);
		start = malloc(sizeof(int) * c_count);
		jobs = malloc(sizeof(kl_matmul_job) * (2 * c_count + 2));
		if (!count || !start || !jobs)
			abort();
	}

	/* 1. route */
	cpu_matmul(be, logits, E, x, D, n, &w->router);
	for (int t = 0; t < n; t++)
		kl_moe_route(cfg, logits + (size_t) t * E, w->score_bias, sel + (size_t) t * k,
					 wts + (size_t) t * k, scratch);

	/* 2. group the (token, slot) pairs by expert and gather their rows */
	memset(count, 0, sizeof(int) * (size_t) (E + 1));
	for (size_t i = 0; i < nk; i++)
		count[sel[i]]++;
	start[0] = 0;
	for (int e = 0; e < E; e++)
		start[e + 1] = start[e] + count[e];
	{
		int		   *fill = malloc(sizeof(int) * (size_t) E);

		if (!fill)
			abort();
		memcpy(fill, start, sizeof(int) * (size_t) E);
		for (size_t i = 0; i < nk; i++)
			order[fill[sel[i]]++] = (int) i;
		free(fill);
	}
	hrows = nk * F + (w->has_shared ? (size_t) n * Fs : 0);
	grow(&xe, &c_xe, nk * D);
	grow(&ye, &c_ye, (nk + n) * D);
	grow(&gbuf, &c_g, hrows);
	grow(&ubuf, &c_u, hrows);
	for (size_t i = 0; i < nk; i++)
		memcpy(xe + i * D, x + (size_t) (order[i] / k) * D, sizeof(float) * D);

	/* 3. gate and up of every used expert (and the shared one) in one batch */
	nj = 0;
	for (int e = 0; e < E; e++)
	{
		kl_matmul_job g = {gbuf + (size_t) start[e] * F, F, xe + (size_t) start[e] * D, D, count[e], &w->experts[e].gate};
		kl_matmul_job u = {ubuf + (size_t) start[e] * F, F, xe + (size_t) start[e] * D, D, count[e], &w->experts[e].up};

		if (count[e] == 0)
			continue;
		jobs[nj++] = g;
		jobs[nj++] = u;
	}
	if (w->has_shared)
	{
		kl_matmul_job g = {gbuf + nk * F, Fs, x, D, n, &w->shared.gate};
		kl_matmul_job u = {ubuf + nk * F, Fs, x, D, n, &w->shared.up};

		jobs[nj++] = g;
		jobs[nj++] = u;
	}
	cpu_matmul_batch(be, jobs, nj);
	swiglu_rows(gbuf, gbuf, ubuf, hrows);

	/* 4. down projections in one batch: routed rows into ye, shared into ye + nk rows */
	nj = 0;
	for (int e = 0; e < E; e++)
	{
		kl_matmul_job d = {ye + (size_t) start[e] * D, D, gbuf + (size_t) start[e] * F, F, count[e], &w->experts[e].down};

		if (count[e] > 0)
			jobs[nj++] = d;
	}
	if (w->has_shared)
	{
		kl_matmul_job d = {ye + nk * D, D, gbuf + nk * F, Fs, n, &w->shared.down};

		jobs[nj++] = d;
	}
	cpu_matmul_batch(be, jobs, nj);

	/* 5. y = sum of weighted expert outputs (+ shared) */
	memset(y, 0, sizeof(float) * (size_t) n * D);
	for (size_t i = 0; i < nk; i++)
	{
		int			pair = order[i];

		kl_simd_get()->axpy(y + (size_t) (pair / k) * D, wts[pair], ye + i * D, D);
	}
	if (w->has_shared)
		for (size_t i = 0; i < (size_t) n * D; i++)
			y[i] += ye[nk * D + i];
}
