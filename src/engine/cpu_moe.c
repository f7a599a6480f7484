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

static void
swiglu_rows(float *h, const float *g, const float *u, size_t count)
{
	for (size_t i = 0; i < count; i++)
		h[i] = kl_silu(g[i]) * u[i];
}

void
cpu_moe(kl_backend *be, const kl_config *cfg, const kl_moe_layer *w, float *y, const float *x, int n)
{
	int			E = cfg->n_experts,
				k = cfg->experts_per_token,
				D = cfg->hidden_size,
				F = cfg->moe_intermediate;
	int			Fs = F * cfg->n_shared_experts;
	size_t		nk = (size_t) n * k;
	size_t		hrows = nk * F + (w->has_shared ? (size_t) n * Fs : 0);	/* routed pairs, then shared */
	float	   *logits = cpu_buffer(be, BUF_MOE_LOGITS, sizeof(float) * (size_t) n * E);
	float	   *scratch = cpu_buffer(be, BUF_MOE_SCRATCH, sizeof(float) * 2 * (size_t) E);
	float	   *wts = cpu_buffer(be, BUF_MOE_WEIGHTS, sizeof(float) * nk);
	int		   *sel = cpu_buffer(be, BUF_MOE_SEL, sizeof(int) * nk);
	int		   *order = cpu_buffer(be, BUF_MOE_ORDER, sizeof(int) * nk);
	int		   *count = cpu_buffer(be, BUF_MOE_COUNT, sizeof(int) * 2 * ((size_t) E + 1));
	int		   *fill = cpu_buffer(be, BUF_MOE_FILL, sizeof(int) * (size_t) E);
	kl_matmul_job *jobs = cpu_buffer(be, BUF_MOE_JOBS, sizeof(kl_matmul_job) * (2 * (size_t) E + 2));
	float	   *xe = cpu_buffer(be, BUF_MOE_X, sizeof(float) * nk * D);
	float	   *ye = cpu_buffer(be, BUF_MOE_Y, sizeof(float) * (nk + n) * D);
	float	   *gbuf = cpu_buffer(be, BUF_MOE_G, sizeof(float) * hrows);
	float	   *ubuf = cpu_buffer(be, BUF_MOE_U, sizeof(float) * hrows);
	int		   *start;
	int			nj;

	if (!logits || !scratch || !wts || !sel || !order || !count || !fill || !jobs || !xe || !ye ||
		!gbuf || !ubuf)
		return;
	start = count + E + 1;

	/* 1. route */
	cpu_matmul(be, logits, E, x, D, n, &w->router);
	if (be->failed)
		return;
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
	memcpy(fill, start, sizeof(int) * (size_t) E);
	for (size_t i = 0; i < nk; i++)
		order[fill[sel[i]]++] = (int) i;
	for (size_t i = 0; i < nk; i++)
		memcpy(xe + i * D, x + (size_t) (order[i] / k) * D, sizeof(float) * D);

	/* 3. gate and up of every used expert (and the shared one) in one batch */
	nj = 0;
	for (int e = 0; e < E; e++)
	{
		kl_matmul_job g = {gbuf + (size_t) start[e] * F, F, xe + (size_t) start[e] * D, D, count[e], &w->experts[e].gate, 0};
		kl_matmul_job u = {ubuf + (size_t) start[e] * F, F, xe + (size_t) start[e] * D, D, count[e], &w->experts[e].up, 0};

		if (count[e] == 0)
			continue;
		jobs[nj++] = g;
		jobs[nj++] = u;
	}
	if (w->has_shared)
	{
		kl_matmul_job g = {gbuf + nk * F, Fs, x, D, n, &w->shared.gate, 0};
		kl_matmul_job u = {ubuf + nk * F, Fs, x, D, n, &w->shared.up, 0};

		jobs[nj++] = g;
		jobs[nj++] = u;
	}
	cpu_matmul_batch(be, jobs, nj);
	swiglu_rows(gbuf, gbuf, ubuf, hrows);

	/* 4. down projections in one batch: routed rows into ye, shared into ye + nk rows */
	nj = 0;
	for (int e = 0; e < E; e++)
	{
		kl_matmul_job d = {ye + (size_t) start[e] * D, D, gbuf + (size_t) start[e] * F, F, count[e], &w->experts[e].down, 0};

		if (count[e] > 0)
			jobs[nj++] = d;
	}
	if (w->has_shared)
	{
		kl_matmul_job d = {ye + nk * D, D, gbuf + nk * F, Fs, n, &w->shared.down, 0};

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
