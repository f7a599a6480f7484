/*
 * cmd_perplexity.c — ./kl perplexity: token-level perplexity of a model over
 * a text corpus, the measure of what quantization costs.
 *
 *   kl perplexity --model DIR --corpus FILE [--max-tokens N] [--quantize FMT]
 *                 [--save-argmax FILE] [--agree-with FILE]
 *
 * The corpus is a JSON array of {"text": ...} objects (pages, as
 * test/fixtures/corpus/pgdocs.json) or any other file, taken as one text.
 * Each page is encoded as [BOS] + page + <|im_end|> (the eos token where
 * the tokenizer has no <|im_end|>), pages in corpus order, until N tokens
 * (default 50,000) have been taken — the last page cut there.  Each page is
 * its own sequence, from an empty state; every token after the BOS is
 * predicted from the ones before it.  Perplexity = exp(mean negative log
 * likelihood) over the predicted tokens.
 *
 * --save-argmax writes the model's most likely next token at every
 * predicted position (int32, little-endian); --agree-with compares with such
 * a file (another format's run) and prints the greedy agreement: the share
 * of positions where both models' argmax is the same token.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_util.h"
#include "commands.h"
#include "tokenizer.h"

#define CHUNK 512				/* tokens per forward call */

typedef struct ppl_run
{
	kl_ctx	   *ctx;
	kl_model   *m;
	float	   *logits;			/* [CHUNK, V] */
	int			V;
	double		nll;
	int64_t		predicted;
	int32_t    *argmax;			/* one per predicted position */
	int64_t		cap;
} ppl_run;

/* log-softmax of row[target] and the row's argmax */
static double
token_nll(const float *row, int V, int target, int32_t *best)
{
	float		mx = row[0];
	int			b = 0;
	double		sum = 0;

	for (int v = 1; v < V; v++)
		if (row[v] > mx)
		{
			mx = row[v];
			b = v;
		}
	for (int v = 0; v < V; v++)
		sum += exp((double) row[v] - mx);
	*best = b;
	return log(sum) - ((double) row[target] - mx);
}

/* Feed one page's ids through a fresh sequence, scoring every next token. */
static int
score_page(ppl_run *r, const int32_t *ids, int n, kl_err *err)
{
	kl_seq	   *seq;

	if (kl_seq_new(r->m, &seq, err) != KL_OK)
		return KL_FAIL;
	for (int t0 = 0; t0 < n - 1; t0 += CHUNK)
	{
		int			k = n - 1 - t0 < CHUNK ? n - 1 - t0 : CHUNK;	/* positions t0 .. t0+k-1 predict the next */
		kl_batch_item it = {seq, ids + t0, k, r->logits, true};

		if (kl_forward(r->ctx, &it, 1, err) != KL_OK)
		{
			kl_seq_free(seq);
			return KL_FAIL;
		}
		if (r->predicted + k > r->cap)
		{
			int64_t		cap = (r->cap + k) * 2;
			int32_t    *na = realloc(r->argmax, sizeof(int32_t) * (size_t) cap);

			if (!na)
			{
				kl_seq_free(seq);
				return kl_errc(err, KL_E_RESOURCES, "out of memory");
			}
			r->argmax = na;
			r->cap = cap;
		}
		for (int j = 0; j < k; j++)
			r->nll += token_nll(r->logits + (size_t) j * r->V, r->V, ids[t0 + j + 1],
								&r->argmax[r->predicted + j]);
		r->predicted += k;
	}
	kl_seq_free(seq);
	return KL_OK;
}

/* The corpus as pages of text (a JSON array of {"text"}, else the whole file). */
static json_t *
read_pages(const char *path, char **whole, size_t *whole_len)
{
	json_error_t jerr;
	json_t	   *root = json_load_file(path, 0, &jerr);

	*whole = NULL;
	if (root && json_is_array(root))
		return root;
	json_decref(root);
	*whole = (char *) cli_read_file(path, whole_len);
	return NULL;
}

static int
encode_page(const kl_tokenizer *tok, const char *text, size_t len, int32_t end_id, kl_ids *out, kl_err *err)
{
	out->n = 0;
	if (kl_ids_push(out, kl_tokenizer_bos(tok), err) != KL_OK ||
		kl_encode(tok, text, len, false, out, err) != KL_OK ||
		kl_ids_push(out, end_id, err) != KL_OK)
		return KL_FAIL;
	return KL_OK;
}

static int
compare_argmax(const char *path, const int32_t *mine, int64_t n)
{
	size_t		len;
	uint8_t    *theirs = cli_read_file(path, &len);
	int64_t		same = 0;

	if (!theirs)
	{
		fprintf(stderr, "kl perplexity: cannot read %s\n", path);
		return 1;
	}
	if (len != sizeof(int32_t) * (size_t) n)
	{
		fprintf(stderr, "kl perplexity: %s holds %zu positions, this run %lld: not the same text\n", path,
				len / sizeof(int32_t), (long long) n);
		free(theirs);
		return 1;
	}
	for (int64_t i = 0; i < n; i++)
	{
		int32_t		t;

		memcpy(&t, theirs + 4 * i, 4);
		same += t == mine[i];
	}
	printf("greedy agreement: %.2f%% (%lld of %lld positions)\n", 100.0 * (double) same / (double) n,
		   (long long) same, (long long) n);
	free(theirs);
	return 0;
}

int
cmd_perplexity(int argc, char **argv)
{
	cli_common co;
	const char *corpus = NULL,
			   *save = NULL,
			   *agree = NULL;
	long		max_tokens = 50000;
	kl_err		err;
	ppl_run		r = {0};
	json_t	   *pages = NULL;
	char	   *whole = NULL;
	size_t		whole_len = 0;
	kl_ids		ids = {0};
	const kl_tokenizer *tok;
	int32_t		end_id;
	long		taken = 0;
	int			n_pages = 0;
	int			rc = 1;
	double		t0;
	const cli_opt opts[] = {
		CLI_OPT("--corpus", CLI_OPT_STRING, &corpus),
		CLI_OPT("--max-tokens", CLI_OPT_LONG, &max_tokens),
		CLI_OPT("--save-argmax", CLI_OPT_STRING, &save),
		CLI_OPT("--agree-with", CLI_OPT_STRING, &agree),
	};

	cli_common_init(&co);
	if (cli_parse_options("perplexity", argc, argv, &co, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	if (!co.model || !corpus || max_tokens < 2)
	{
		fprintf(stderr, "kl perplexity: --model and --corpus are required (--max-tokens at least 2)\n");
		return 2;
	}
	pages = read_pages(corpus, &whole, &whole_len);
	if (!pages && !whole)
	{
		fprintf(stderr, "kl perplexity: cannot read %s\n", corpus);
		return 1;
	}
	if (cli_load(&co, &r.m, &err) != KL_OK || kl_ctx_new(r.m, CHUNK, &r.ctx, &err) != KL_OK)
		goto fail;
	tok = kl_model_tokenizer(r.m);
	if (!tok || kl_tokenizer_bos(tok) < 0)
	{
		fprintf(stderr, "kl perplexity: %s has no tokenizer with a bos token\n", co.model);
		goto out;
	}
	end_id = kl_tokenizer_special_id(tok, "<|im_end|>");
	if (end_id < 0)
		end_id = kl_tokenizer_eos(tok);
	r.V = kl_model_config(r.m)->vocab_size;
	r.logits = malloc(sizeof(float) * (size_t) CHUNK * r.V);
	if (!r.logits)
	{
		fprintf(stderr, "kl perplexity: out of memory\n");
		goto out;
	}
	t0 = kl_now();
	for (size_t p = 0; taken < max_tokens && p < (pages ? json_array_size(pages) : 1); p++)
	{
		const char *text = whole;
		size_t		len = whole_len;
		int			n;

		if (pages)
		{
			json_t	   *t = json_object_get(json_array_get(pages, p), "text");

			if (!json_is_string(t))
			{
				fprintf(stderr, "kl perplexity: %s: element %zu has no \"text\" string\n", corpus, p);
				goto out;
			}
			text = json_string_value(t);
			len = json_string_length(t);
		}
		if (encode_page(tok, text, len, end_id, &ids, &err) != KL_OK)
			goto fail;
		n = (int) (ids.n < (size_t) (max_tokens - taken) ? ids.n : (size_t) (max_tokens - taken));
		if (n >= 2 && score_page(&r, ids.ids, n, &err) != KL_OK)
			goto fail;
		taken += n;
		n_pages++;
	}
	printf("model: %s (%s)\n", co.model, kl_model_weight_format(r.m));
	printf("pages: %d, tokens: %ld, predicted: %lld, %.1f s\n", n_pages, taken, (long long) r.predicted,
		   kl_now() - t0);
	printf("mean nll: %.6f nats/token\n", r.nll / (double) r.predicted);
	printf("perplexity: %.4f\n", exp(r.nll / (double) r.predicted));
	if (save && cli_write_file(save, r.argmax, sizeof(int32_t) * (size_t) r.predicted) != 0)
	{
		fprintf(stderr, "kl perplexity: cannot write %s\n", save);
		goto out;
	}
	if (agree && compare_argmax(agree, r.argmax, r.predicted) != 0)
		goto out;
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "kl perplexity: %s\n", err.msg);
out:
	kl_ids_free(&ids);
	free(r.logits);
	free(r.argmax);
	kl_ctx_free(r.ctx);
	kl_model_free(r.m);
	json_decref(pages);
	free(whole);
	return rc;
}
