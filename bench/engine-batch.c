/*
 * bench/engine-batch.c — the reference for bench-sql.sh's throughput table:
 * the engine alone (no PostgreSQL) decoding n sequences together, one
 * kl_forward per step with one token per sequence, greedy, as the inference
 * worker does.  Usage: engine-batch MODEL_DIR SEQUENCES TOKENS
 */
#include <stdio.h>
#include <stdlib.h>

#include "kl.h"

int
main(int argc, char **argv)
{
	kl_err		err;
	kl_model   *m;
	kl_ctx	   *ctx;
	kl_load_opts o = {0};
	int			ns,
				steps,
				V;
	kl_seq	   *seq[64];
	int32_t		last[64];
	float	   *logits;
	kl_sampling sp;
	kl_rng		rng;
	double		t0;

	if (argc != 4 || (ns = atoi(argv[2])) < 1 || ns > 64 || (steps = atoi(argv[3])) < 1)
	{
		fprintf(stderr, "usage: engine-batch MODEL_DIR SEQUENCES(1-64) TOKENS\n");
		return 2;
	}
	if (kl_model_load(argv[1], &o, &m, &err) != KL_OK || kl_ctx_new(m, 512, &ctx, &err) != KL_OK)
	{
		fprintf(stderr, "engine-batch: %s\n", err.msg);
		return 1;
	}
	V = kl_model_config(m)->vocab_size;
	logits = malloc(sizeof(float) * (size_t) V * ns);
	kl_sampling_default(&sp);
	kl_rng_seed(&rng, 0);
	for (int s = 0; s < ns; s++)
	{
		kl_batch_item it;
		int32_t		prompt[3] = {3840, 296 + s, 258};

		if (kl_seq_new(m, &seq[s], &err) != KL_OK)
			return 1;
		it = (kl_batch_item) {seq[s], prompt, 3, logits, false};
		if (kl_forward(ctx, &it, 1, &err) != KL_OK)
			return 1;
		last[s] = kl_sample(&sp, &rng, logits, V, NULL, 0);
	}
	t0 = kl_now();
	for (int t = 0; t < steps; t++)
	{
		kl_batch_item it[64];

		for (int s = 0; s < ns; s++)
			it[s] = (kl_batch_item) {seq[s], &last[s], 1, logits + (size_t) s * V, false};
		if (kl_forward(ctx, it, ns, &err) != KL_OK)
		{
			fprintf(stderr, "engine-batch: %s\n", err.msg);
			return 1;
		}
		for (int s = 0; s < ns; s++)
			last[s] = kl_sample(&sp, &rng, logits + (size_t) s * V, V, NULL, 0);
	}
	printf("%.0f\n", ns * steps / (kl_now() - t0));
	return 0;
}
