/*
 * generate.c — the single-sequence generation loop (CLI, tests, simple
 * callers).  The PostgreSQL workers run their own loop that batches many
 * sequences per step, with the same semantics: feed the pending token and the
 * prompt, sample, feed each sampled token except the last, which becomes the
 * sequence's pending token.  With an output constraint, each step samples
 * among the tokens it allows and advances it.
 */
#include <stdlib.h>
#include <string.h>

#include "json_constraint.h"
#include "model.h"

int
kl_tokens_push(kl_tokens *t, int32_t id, kl_err *err)
{
	if (t->n == t->cap)
	{
		size_t		cap = t->cap ? t->cap * 2 : 64;
		int32_t    *p = realloc(t->ids, cap * sizeof(int32_t));

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		t->ids = p;
		t->cap = cap;
	}
	t->ids[t->n++] = id;
	return KL_OK;
}

void
kl_tokens_free(kl_tokens *t)
{
	free(t->ids);
	t->ids = NULL;
	t->n = t->cap = 0;
}

static bool
is_stop(const kl_gen_params *p, int32_t eos, int32_t id)
{
	if (!p->ignore_eos && eos >= 0 && id == eos)
		return true;
	for (int i = 0; i < p->n_stop_ids; i++)
		if (p->stop_ids[i] == id)
			return true;
	return false;
}

int
kl_generate(kl_ctx *ctx, kl_seq *seq, const int32_t *prompt, int n_prompt,
			const kl_gen_params *p, kl_tokens *out, kl_token_cb cb, void *cb_arg, kl_err *err)
{
	const kl_config *cfg = kl_model_config(seq->model);
	int			V = cfg->vocab_size;
	int32_t    *input = NULL;
	kl_tokens	recent = {0};
	uint32_t   *mask = NULL;
	kl_rng		rng;
	kl_sample_req req;
	const kl_sample_req *reqs[1] = {&req};
	kl_batch_item item;
	int32_t		token = -1;
	int			n_in = 0;
	int			rc = KL_FAIL;

	if (kl_sampling_validate(&p->sampling, err) != KL_OK)
		return KL_FAIL;
	if (p->max_tokens < 0)
		return kl_errc(err, KL_E_INVALID, "max_tokens must not be negative, got %d", p->max_tokens);
	if (n_prompt < 0 || (n_prompt > 0 && !prompt))
		return kl_errc(err, KL_E_INVALID, "invalid prompt");
	if (n_prompt == 0 && seq->pending < 0)
		return kl_errc(err, KL_E_INVALID, "empty prompt: there is nothing to continue from");

	if (p->constraint && kl_constraint_n_ids(p->constraint) != V)
		return kl_errc(err, KL_E_INVALID, "the output constraint was made for %d token ids, the model has %d",
					   kl_constraint_n_ids(p->constraint), V);
	input = kl_malloc(sizeof(int32_t) * ((size_t) n_prompt + 1), err);
	if (p->constraint)
		mask = kl_malloc(sizeof(uint32_t) * kl_mask_words(V), err);
	if (!input || (p->constraint && !mask))
		goto out;
	if (seq->pending >= 0)
		input[n_in++] = seq->pending;
	if (n_prompt > 0)
		memcpy(input + n_in, prompt, sizeof(int32_t) * (size_t) n_prompt);
	n_in += n_prompt;
	for (int i = 0; i < n_prompt; i++)
		if (kl_tokens_push(&recent, prompt[i], err) != KL_OK)
			goto out;
	kl_rng_seed(&rng, p->sampling.seed);

	/* the forward pass samples (on the device where it can: only ids come back) */
	memset(&req, 0, sizeof(req));
	req.sampling = &p->sampling;
	req.rng = &rng;
	memset(&item, 0, sizeof(item));
	item.seq = seq;
	item.ids = input;
	item.n = n_in;
	req.recent = recent.ids;
	req.n_recent = (int) recent.n;
	req.allowed = mask;			/* the constraint's mask for the token the step samples */
	if (p->constraint && p->max_tokens > 0 && kl_constraint_mask(p->constraint, mask, NULL, err) != KL_OK)
		goto out;
	if (kl_forward_sample(ctx, &item, 1, p->max_tokens > 0 ? reqs : NULL, &token, err) != KL_OK)
		goto out;
	seq->pending = -1;

	for (int i = 0; i < p->max_tokens; i++)
	{
		int32_t		tok = token;
		bool		stop;

		if (p->constraint && kl_constraint_accept(p->constraint, tok, err) != KL_OK)
			goto out;

		if (kl_tokens_push(out, tok, err) != KL_OK || kl_tokens_push(&recent, tok, err) != KL_OK)
			goto out;
		stop = is_stop(p, cfg->eos_id, tok) || i == p->max_tokens - 1;
		if (cb && cb(cb_arg, tok))
			stop = true;
		if (stop)
		{
			seq->pending = tok;
			break;
		}
		item.ids = &tok;
		item.n = 1;
		req.recent = recent.ids;
		req.n_recent = (int) recent.n;
		if (p->constraint && kl_constraint_mask(p->constraint, mask, NULL, err) != KL_OK)
			goto out;
		if (kl_forward_sample(ctx, &item, 1, reqs, &token, err) != KL_OK)
			goto out;
	}
	rc = KL_OK;
out:
	free(input);
	free(mask);
	kl_tokens_free(&recent);
	return rc;
}
