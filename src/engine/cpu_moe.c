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

/* y[m, D] = down(silu(gate x) * up x) for m rows; scratch g, u of m*F */
static void
expert_mlp(kl_backend *be, const kl_mlp *mlp, float *y, const float *x, int m, int D, int F,
		   float *g, float *u)
{
	cpu_matmul(be, g, F, x, D, m, &mlp->gate);
	cpu_matmul(be, u, F, x, D, m, &mlp->up);
	swiglu_rows(g, g, u, (size_t) m * F);
	cpu_matmul(be, y, D, g, F, m, &mlp->down);
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
	static size_t c_sel,
				c_count;
	int			E = cfg->n_experts,
				k = cfg->experts_per_token,
				D = cfg->hidden_size,
				F = cfg->moe_intermediate;
	int			Fs = F * cfg->n_shared_experts;

	grow(&logits, &c_logits, (size_t) n * E);
	grow(&scratch, &c_scr, (size_t) 2 * E);
	grow(&wts, &c_w, (size_t) n * k);
	if (c_sel < (size_t) n * k)
	{
		free(sel);
		free(order);
		c_sel = (size_t) n * k;
		sel = malloc(sizeof(int) * c_sel);
		order = malloc(sizeof(int) * c_sel);
		if (!sel || !order)
			abort();
	}
	if (c_count < (size_t) E + 1)
	{
		free(count);
		free(start);
		c_count = (size_t) E + 1;
		count = malloc(sizeof(int) * c_count);
		start = malloc(sizeof(int) * c_count);
		if (!count || !start)
			abort();
	}

	/* route */
	cpu_matmul(be, logits, E, x, D, n, &w->router);
	for (int t = 0; t < n; t++)
		kl_moe_route(cfg, logits + (size_t) t * E, w->score_bias, sel + (size_t) t * k,
					 wts + (size_t) t * k, scratch);

	/* group the (token, slot) pairs by expert */
	memset(count, 0, sizeof(int) * (size_t) (E + 1));
	for (int i = 0; i < n * k; i++)
		count[sel[i]]++;
	start[0] = 0;
	for (int e = 0; e < E; e++)
		start[e + 1] = start[e] + count[e];
	{
		int		   *fill = malloc(sizeof(int) * (size_t) E);

		if (!fill)
			abort();
		memcpy(fill, start, sizeof(int) * (size_t) E);
		for (int i = 0; i < n * k; i++)
			order[fill[sel[i]]++] = i;
		free(fill);
	}

	memset(y, 0, sizeof(float) * (size_t) n * D);
	{
		int			maxm = 0;

		for (int e = 0; e < E; e++)
			maxm = count[e] > maxm ? count[e] : maxm;
		grow(&xe, &c_xe, (size_t) maxm * D);
		grow(&ye, &c_ye, (size_t) (maxm > n ? maxm : n) * D);
		grow(&gbuf, &c_g, (size_t) (maxm > n ? maxm : n) * (F > Fs ? F : Fs));
		grow(&ubuf, &c_u, (size_t) (maxm > n ? maxm : n) * (F > Fs ? F : Fs));
	}
	for (int e = 0; e < E; e++)
	{
		int			m = count[e];

		if (m == 0)
			continue;
		for (int i = 0; i < m; i++)
			memcpy(xe + (size_t) i * D, x + (size_t) (order[start[e] + i] / k) * D, sizeof(float) * D);
		expert_mlp(be, &w->experts[e], ye, xe, m, D, F, gbuf, ubuf);
		for (int i = 0; i < m; i++)
		{
			int			pair = order[start[e] + i];

			kl_simd_get()->axpy(y + (size_t) (pair / k) * D, wts[pair], ye + (size_t) i * D, D);
		}
	}
	if (w->has_shared)
	{
		expert_mlp(be, &w->shared, ye, x, n, D, Fs, gbuf, ubuf);
		for (size_t i = 0; i < (size_t) n * D; i++)
			y[i] += ye[i];
	}
}
