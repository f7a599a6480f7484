/*
 * bench/engine-summarize.c — the reference for bench-batch-sql.sh: the engine
 * alone (no PostgreSQL) summarizing the same documents the way the inference
 * worker runs summarize_each, with up to CONCURRENCY sequences in flight:
 *   - each document becomes summarize()'s prompt (the same chat turn as
 *     kl_summary_prompt in src/pg/pg_sql_generate.c), prefilled on its own
 *     in chunks of KL_PREFILL_CHUNK tokens (environment, default 512: the
 *     worker's kimi_linear.prefill_chunk, which the caller passes on);
 *   - every step decodes all sequences in flight in one kl_forward_sample
 *     (groups of up to 64, the worker's decode group), greedy, the token drawn
 *     where the model runs (on the GPU only the ids come back), as the worker
 *     does;
 *   - a sequence stops at the model's end token, a chat stop token or
 *     MAX_TOKENS (the stopping token counts as generated, as in the worker),
 *     and the next document takes its place at once.
 * Prompts are rendered before the clock starts.  Prints one line:
 *   rows generated_tokens prompt_tokens seconds cpu_seconds n1,n2,...  (tokens per document)
 * (cpu_seconds: user + system time of the process over the timed part)
 * Usage: engine-summarize MODEL_DIR DOCS_JSON CONCURRENCY MAX_TOKENS [DEVICE [PRECISION]]
 * (PRECISION: fp32 or bf16, kl_load_opts.precision as kimi_linear.precision
 * sets it; default the engine's)
 * DOCS_JSON: a JSON array of strings (the documents, UTF-8).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <jansson.h>

#include "kl.h"
#include "tokenizer.h"

#define GROUP KL_BATCH_INVARIANT_ROWS

typedef struct Doc
{
	kl_ids		prompt;
	int			generated;
} Doc;

typedef struct Active
{
	int			doc;			/* -1: free */
	kl_seq	   *seq;
	int32_t		last;			/* the token to feed next */
} Active;

static int32_t stops[8];
static int	n_stops;
static int32_t eos;

/* the prompt summarize() sends for doc: src/pg/pg_sql_generate.c, kl_summary_prompt */
static int
render(const kl_tokenizer *tok, const char *doc, kl_ids *out, kl_err *err)
{
	const char *instruction = "Summarize the following document in a few sentences.\n\n";
	size_t		n = strlen(instruction) + strlen(doc);
	char	   *user = malloc(n + 1);
	kl_chat_message m[2];
	int			rc;

	strcpy(user, instruction);
	strcat(user, doc);
	m[0].role = "system";
	m[0].content = "You write short, accurate summaries of documents.";
	m[0].content_len = strlen(m[0].content);
	m[1].role = "user";
	m[1].content = user;
	m[1].content_len = n;
	rc = kl_chat_render(tok, m, 2, true, out, err);
	free(user);
	return rc;
}

/* a sampled token: true when the sequence stops */
static bool
accept(Doc *d, int32_t tok, int max_tokens)
{
	d->generated++;
	if (tok == eos)
		return true;
	for (int i = 0; i < n_stops; i++)
		if (tok == stops[i])
			return true;
	return d->generated >= max_tokens;
}

static double
cpu_seconds(void)
{
	struct rusage u;

	getrusage(RUSAGE_SELF, &u);
	return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec + u.ru_stime.tv_usec / 1e6;
}

static void
fail(const char *what, const kl_err *err)
{
	fprintf(stderr, "engine-summarize: %s: %s\n", what, err ? err->msg : "");
	exit(1);
}

int
main(int argc, char **argv)
{
	kl_err		err;
	kl_model   *m;
	kl_ctx	   *ctx;
	kl_load_opts o = {0};
	json_t	   *docs_json;
	json_error_t jerr;
	int			n_docs,
				conc,
				max_tokens,
				next = 0,
				done = 0;
	long		prompt_tokens = 0,
				generated = 0;
	Doc		   *docs;
	Active	   *act;
	kl_sampling sp;
	kl_sample_req sreq;
	const kl_sample_req *reqs[GROUP];
	int32_t		toks[GROUP];
	kl_rng		rng;
	double		t0,
				t1,
				c0,
				c1;
	const char *chunk_env = getenv("KL_PREFILL_CHUNK");
	int			chunk = chunk_env ? atoi(chunk_env) : 512;

	if (argc < 5 || (conc = atoi(argv[3])) < 1 || (max_tokens = atoi(argv[4])) < 1 || chunk < 1)
	{
		fprintf(stderr, "usage: [KL_PREFILL_CHUNK=N] engine-summarize MODEL_DIR DOCS_JSON CONCURRENCY MAX_TOKENS [DEVICE "
				"[PRECISION]]\n");
		return 2;
	}
	o.device = argc > 5 ? argv[5] : "cpu";
	o.precision = argc > 6 ? argv[6] : NULL;
	if (kl_model_load(argv[1], &o, &m, &err) != KL_OK)
		fail("loading the model", &err);
	if (kl_ctx_new(m, chunk > GROUP ? chunk : GROUP, &ctx, &err) != KL_OK)
		fail("kl_ctx_new", &err);
	if (!kl_model_tokenizer(m))
		fail("the model has no tokenizer", NULL);
	eos = kl_model_config(m)->eos_id;
	n_stops = kl_tokenizer_stop_ids(kl_model_tokenizer(m), stops, 8);
	docs_json = json_load_file(argv[2], 0, &jerr);
	if (!docs_json || !json_is_array(docs_json))
	{
		fprintf(stderr, "engine-summarize: %s: expected a JSON array of strings (%s)\n", argv[2], jerr.text);
		return 1;
	}
	n_docs = (int) json_array_size(docs_json);
	docs = calloc(n_docs, sizeof(Doc));
	for (int i = 0; i < n_docs; i++)
	{
		const char *s = json_string_value(json_array_get(docs_json, i));

		if (!s || render(kl_model_tokenizer(m), s, &docs[i].prompt, &err) != KL_OK)
			fail("rendering a prompt", s ? &err : NULL);
		prompt_tokens += (long) docs[i].prompt.n;
	}
	act = calloc(conc, sizeof(Active));
	for (int a = 0; a < conc; a++)
		act[a].doc = -1;
	kl_sampling_default(&sp);
	kl_rng_seed(&rng, 0);
	memset(&sreq, 0, sizeof(sreq));
	sreq.sampling = &sp;
	sreq.rng = &rng;
	for (int i = 0; i < GROUP; i++)
		reqs[i] = &sreq;

	c0 = cpu_seconds();
	t0 = kl_now();
	while (done < n_docs)
	{
		kl_batch_item items[GROUP];
		int			who[GROUP];
		int			n = 0;

		/* free places take the next documents: prefill, first token */
		for (int a = 0; a < conc && next < n_docs; a++)
		{
			Doc		   *d;
			int32_t		tok;

			if (act[a].doc >= 0)
				continue;
			d = &docs[next];
			act[a].doc = next++;
			if (kl_seq_new(m, &act[a].seq, &err) != KL_OK)
				fail("kl_seq_new", &err);
			for (size_t fed = 0; fed < d->prompt.n; fed += (size_t) chunk)
			{
				size_t		take = d->prompt.n - fed < (size_t) chunk ? d->prompt.n - fed : (size_t) chunk;
				bool		last = fed + take == d->prompt.n;
				kl_batch_item it = {act[a].seq, d->prompt.ids + fed, (int) take, NULL, false};

				if (kl_forward_sample(ctx, &it, 1, last ? reqs : NULL, last ? &tok : NULL, &err) != KL_OK)
					fail("prefill", &err);
			}
			if (accept(d, tok, max_tokens))
			{
				kl_seq_free(act[a].seq);
				act[a].doc = -1;
				done++;
				a--;			/* this place is free again */
				continue;
			}
			act[a].last = tok;
		}

		/* one decode step for every sequence in flight, GROUP rows per kl_forward */
		for (int a = 0; a <= conc; a++)
		{
			if (a < conc && act[a].doc >= 0)
			{
				items[n] = (kl_batch_item) {act[a].seq, &act[a].last, 1, NULL, false};
				who[n++] = a;
			}
			if (n == GROUP || (a == conc && n > 0))
			{
				if (kl_forward_sample(ctx, items, n, reqs, toks, &err) != KL_OK)
					fail("decode", &err);
				for (int i = 0; i < n; i++)
				{
					Active	   *x = &act[who[i]];
					int32_t		tok = toks[i];

					if (accept(&docs[x->doc], tok, max_tokens))
					{
						kl_seq_free(x->seq);
						x->doc = -1;
						done++;
					}
					else
						x->last = tok;
				}
				n = 0;
			}
		}
	}
	t1 = kl_now();
	c1 = cpu_seconds();
	for (int i = 0; i < n_docs; i++)
		generated += docs[i].generated;
	printf("%d %ld %ld %.3f %.3f ", n_docs, generated, prompt_tokens, t1 - t0, c1 - c0);
	for (int i = 0; i < n_docs; i++)
		printf("%s%d", i ? "," : "", docs[i].generated);
	printf("\n");
	return 0;
}
