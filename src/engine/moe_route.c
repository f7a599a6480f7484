/*
 * moe_route.c — choosing experts (docs/model.md, "Routing"), shared by every
 * backend so that the rule exists once.
 *
 *   s      = sigmoid(router logits)   (or softmax)
 *   choice = s + e_score_correction_bias
 *   groups of E/G experts score the sum of their top two choices; the best Tg
 *   groups stay, the other experts' choices become 0 (as the reference masks)
 *   top k experts by choice
 *   weights = s (the default rule, "select": the bias chooses, the scores
 *             weight, as vLLM, SGLang, llama.cpp and kimi_k3 compute it) or
 *             s + bias ("reference": the released kimi_linear code adds the
 *             bias in place; cfg->bias_in_weights), renormalized to sum 1
 *             when k > 1 and asked for, then times routed_scaling_factor.
 */
#include <math.h>

#include "backend.h"

void
kl_moe_route(const kl_config *cfg, const float *logits, const float *bias,
			 int *experts, float *weights, float *scratch)
{
	int			E = cfg->n_experts,
				k = cfg->experts_per_token,
				G = cfg->n_expert_groups,
				per = E / G;
	float	   *s = scratch;		/* [E] scores */
	float	   *choice = scratch + E;	/* [E] */
	float		sum = 0;

	if (cfg->router_softmax)
	{
		float		mx = -INFINITY,
					z = 0;

		for (int e = 0; e < E; e++)
			mx = logits[e] > mx ? logits[e] : mx;
		for (int e = 0; e < E; e++)
			z += (s[e] = expf(logits[e] - mx));
		for (int e = 0; e < E; e++)
			s[e] /= z;
	}
	else
		for (int e = 0; e < E; e++)
			s[e] = 1.0f / (1.0f + expf(-logits[e]));
	for (int e = 0; e < E; e++)
		choice[e] = s[e] + bias[e];

	if (G > 1 && cfg->topk_groups < G)
	{
		/* group score: sum of the two largest choices in the group */
		float		gscore[KL_MAX_EXPERT_GROUPS];	/* G <= this: config.c checks */
		bool		keep[KL_MAX_EXPERT_GROUPS];

		for (int g = 0; g < G; g++)
		{
			float		b1 = -INFINITY,
						b2 = -INFINITY;

			for (int e = g * per; e < (g + 1) * per; e++)
			{
				if (choice[e] > b1)
				{
					b2 = b1;
					b1 = choice[e];
				}
				else if (choice[e] > b2)
					b2 = choice[e];
			}
			gscore[g] = per >= 2 ? b1 + b2 : b1;
			keep[g] = false;
		}
		for (int t = 0; t < cfg->topk_groups; t++)
		{
			int			best = -1;

			for (int g = 0; g < G; g++)
				if (!keep[g] && (best < 0 || gscore[g] > gscore[best]))
					best = g;
			keep[best] = true;
		}
		for (int g = 0; g < G; g++)
			if (!keep[g])
				for (int e = g * per; e < (g + 1) * per; e++)
					choice[e] = 0.0f;
	}

	/* top k by choice (k is small: repeated selection) */
	for (int t = 0; t < k; t++)
	{
		int			best = -1;

		for (int e = 0; e < E; e++)
		{
			bool		taken = false;

			for (int u = 0; u < t; u++)
				if (experts[u] == e)
					taken = true;
			if (!taken && (best < 0 || choice[e] > choice[best]))
				best = e;
		}
		experts[t] = best;
		weights[t] = cfg->bias_in_weights ? s[best] + bias[best] : s[best];
		sum += weights[t];
	}
	if (cfg->moe_renormalize && k > 1)
		for (int t = 0; t < k; t++)
			weights[t] /= (sum + 1e-20f);
	for (int t = 0; t < k; t++)
		weights[t] *= cfg->routed_scaling;
}
