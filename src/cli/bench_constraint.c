/*
 * bench_constraint.c — ./kl bench-constraint: what the JSON constraint costs
 * per generated token (the mask of allowed ids the worker computes before
 * sampling), on the model's vocabulary and on a synthetic vocabulary of
 * another size (default 160,000 tokens, the size of Kimi's).  Prints a
 * Markdown table (bench/bench-constraint.sh commits it).
 *
 * Each run walks a generation through the grammar: at each step the mask is
 * computed (timed), then a token is drawn among the allowed ones (uniformly,
 * seeded) and accepted; when the value is complete it starts again.  Steps
 * are classed by what the automaton was in the middle of (inside a string,
 * structure, ...), once with the string fast path (what the worker does) and
 * once by the plain trie walk.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli_util.h"
#include "commands.h"
#include "json_constraint.h"
#include "kl.h"
#include "tokenizer.h"

static const char *bench_schema =
	"{\"json_schema\": {\"type\": \"object\", \"properties\": {"
	"\"name\": {\"type\": \"string\"},"
	"\"description\": {\"type\": \"string\", \"maxLength\": 200},"
	"\"rows\": {\"type\": \"integer\"},"
	"\"kind\": {\"enum\": [\"table\", \"view\", \"index\", \"sequence\"]},"
	"\"columns\": {\"type\": \"array\", \"items\": {\"type\": \"object\", \"properties\": {"
	"  \"name\": {\"type\": \"string\", \"maxLength\": 40}, \"type\": {\"type\": \"string\", \"maxLength\": 20},"
	"  \"nullable\": {\"type\": \"boolean\"}}, \"required\": [\"name\", \"type\"]}, \"maxItems\": 8},"
	"\"stats\": {}},"
	"\"required\": [\"name\", \"kind\", \"columns\"]}}";

static uint64_t rs = 0x9E3779B97F4A7C15ull;

static uint64_t
rnd(void)
{
	rs ^= rs << 13;
	rs ^= rs >> 7;
	rs ^= rs << 17;
	return rs;
}

/* Tokens like a large byte-level BPE vocabulary's: all 256 bytes, words (often with a leading space), CJK
 * (sometimes ending inside a character), punctuation runs, digits; distinct. */
static kl_vocab *
synthetic_vocab(int n, kl_err *err)
{
	uint8_t   **b = malloc(sizeof(uint8_t *) * (size_t) n);
	size_t	   *l = malloc(sizeof(size_t) * (size_t) n);
	size_t		cap = (size_t) n * 4;
	uint64_t   *seen = calloc(cap, sizeof(uint64_t));
	kl_vocab   *v = NULL;
	static const char punct[] = "{}[]\":, .\\-_/()'!?;=<>*+\n\t";
	int			made = 0;

	while (made < n)
	{
		uint8_t		t[64];
		size_t		len = 0;
		uint64_t	h = 1469598103934665603ull;
		size_t		slot;

		if (made < 256)
			t[len++] = (uint8_t) made;
		else
		{
			int			kind = (int) (rnd() % 20),
						k = 2 + (int) (rnd() % 10);

			if (kind < 11)
			{
				if (rnd() % 3)
					t[len++] = ' ';
				if (rnd() % 4 == 0)
					t[len++] = (uint8_t) ('A' + rnd() % 26);
				for (int q = 0; q < k; q++)
					t[len++] = (uint8_t) ('a' + rnd() % 26);
			}
			else if (kind < 16)
			{
				for (int q = 0; q < 1 + k % 4; q++)
				{
					unsigned	cp = 0x4E00 + (unsigned) (rnd() % 0x5200);

					t[len++] = (uint8_t) (0xE0 | (cp >> 12));
					t[len++] = (uint8_t) (0x80 | ((cp >> 6) & 0x3F));
					t[len++] = (uint8_t) (0x80 | (cp & 0x3F));
				}
				if (rnd() % 6 == 0)
					len -= 1 + rnd() % 2;	/* ends inside a character */
			}
			else if (kind < 19)
				for (int q = 0; q < 1 + k % 4; q++)
					t[len++] = (uint8_t) punct[rnd() % (sizeof(punct) - 1)];
			else
				for (int q = 0; q < 1 + k % 4; q++)
					t[len++] = (uint8_t) ('0' + rnd() % 10);
		}
		for (size_t i = 0; i < len; i++)
			h = (h ^ t[i]) * 1099511628211ull;
		h |= 1;
		for (slot = h % cap; seen[slot] && seen[slot] != h; slot = (slot + 1) % cap)
			;
		if (seen[slot] == h)
			continue;			/* that token exists */
		seen[slot] = h;
		b[made] = malloc(len);
		memcpy(b[made], t, len);
		l[made++] = len;
	}
	if (kl_vocab_from_bytes((const uint8_t *const *) b, l, n, &v, err) != KL_OK)
		v = NULL;
	for (int i = 0; i < n; i++)
		free(b[i]);
	free(b);
	free(l);
	free(seen);
	return v;
}

typedef struct stat_set
{
	const char *kind;
	double	   *t;
	int			n,
				cap;
} stat_set;

static void
stat_add(stat_set *s, double x)
{
	if (s->n == s->cap)
	{
		s->cap = s->cap ? s->cap * 2 : 1024;
		s->t = realloc(s->t, sizeof(double) * (size_t) s->cap);
	}
	s->t[s->n++] = x;
}

static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a,
				y = *(const double *) b;

	return (x > y) - (x < y);
}

static void
stat_row(const char *vocab, bool fast, stat_set *s)
{
	double		sum = 0;

	if (s->n == 0)
		return;
	qsort(s->t, (size_t) s->n, sizeof(double), cmp_double);
	for (int i = 0; i < s->n; i++)
		sum += s->t[i];
	printf("| %s | %s | %s | %d | %.1f | %.1f | %.1f |\n", vocab, fast ? "trie + string masks" : "trie walk only",
		   s->kind, s->n, 1e6 * sum / s->n, 1e6 * s->t[s->n / 2], 1e6 * s->t[(int) (s->n * 0.99)]);
}

/* Walk `steps` steps through the grammar on v, timing each mask. */
static int
run(const char *label, const kl_vocab *v, int32_t end_id, int steps, bool fast)
{
	static const char *const kinds[] = {"string", "string, mid-escape or character", "key", "structure", "number",
	"literal", "end", "text"};
	stat_set	all = {.kind = "all steps"},
				per[8];
	kl_grammar *g;
	kl_constraint *c = NULL;
	kl_err		err;
	uint32_t   *mask = malloc(kl_mask_words(v->n_ids) * 4);

	memset(per, 0, sizeof(per));
	for (int k = 0; k < 8; k++)
		per[k].kind = kinds[k];
	if (kl_grammar_compile(bench_schema, strlen(bench_schema), &g, &err) != KL_OK)
	{
		fprintf(stderr, "kl bench-constraint: %s\n", err.msg);
		return 1;
	}
	rs = 42;
	for (int s = 0; s < steps; s++)
	{
		int			n_allowed,
					pick;
		int32_t		id = -1;
		double		t0;
		const char *kind;

		if (!c && kl_constraint_new(g, v, &end_id, 1, &c, &err) != KL_OK)
			break;
		kl_constraint_use_fast_paths(c, fast);
		kind = kl_constraint_state_kind(c);
		t0 = kl_now();
		if (kl_constraint_mask(c, mask, &n_allowed, &err) != KL_OK)
			break;
		t0 = kl_now() - t0;
		stat_add(&all, t0);
		for (int k = 0; k < 8; k++)
			if (strcmp(kinds[k], kind) == 0)
				stat_add(&per[k], t0);
		/* a uniform draw among the allowed tokens, but end strings and values sooner than chance would */
		pick = (int) (rnd() % (uint64_t) n_allowed);
		for (int i = 0; i < v->n_ids; i++)
			if (kl_mask_get(mask, i) && pick-- == 0)
			{
				id = i;
				break;
			}
		if (rnd() % 8 == 0)
			for (int i = 0; i < v->n_ids; i++)
				if (kl_mask_get(mask, i) && v->sym[i] == KL_VSYM_BYTES && v->off[i + 1] - v->off[i] == 1 &&
					strchr("\"]},0123456789e", v->pool[v->off[i]]))
				{
					id = i;
					break;
				}
		if (kl_constraint_accept(c, id, &err) != KL_OK)
			break;
		if (kl_constraint_done(c))
		{
			kl_constraint_free(c);
			c = NULL;
		}
	}
	stat_row(label, fast, &all);
	for (int k = 0; k < 8; k++)
		stat_row(label, fast, &per[k]);
	kl_constraint_free(c);
	kl_grammar_free(g);
	free(mask);
	free(all.t);
	for (int k = 0; k < 8; k++)
		free(per[k].t);
	return 0;
}

int
cmd_bench_constraint(int argc, char **argv)
{
	cli_common co;
	int			synthetic = 160000,
				steps = 3000;
	kl_tokenizer *tok = NULL;
	kl_vocab   *v = NULL,
			   *big = NULL;
	kl_err		err;
	double		t0,
				t_small,
				t_big;
	const cli_opt opts[] = {
		CLI_OPT("--synthetic", CLI_OPT_INT, &synthetic),
		CLI_OPT("--steps", CLI_OPT_INT, &steps),
	};

	cli_common_init(&co);
	if (cli_parse_options("bench-constraint", argc, argv, &co, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	if (!co.model || synthetic < 256 || steps < 1)
	{
		fprintf(stderr, "kl bench-constraint: --model DIR is required (--synthetic N >= 256, --steps N >= 1)\n");
		return 2;
	}
	if (kl_tokenizer_load(co.model, &tok, &err) != KL_OK)
	{
		fprintf(stderr, "kl bench-constraint: %s\n", err.msg);
		return 1;
	}
	t0 = kl_now();
	if (kl_vocab_from_tokenizer(tok, kl_tokenizer_n_vocab(tok), &v, &err) != KL_OK)
	{
		fprintf(stderr, "kl bench-constraint: %s\n", err.msg);
		return 1;
	}
	t_small = kl_now() - t0;
	t0 = kl_now();
	big = synthetic_vocab(synthetic, &err);
	t_big = kl_now() - t0;
	if (!big)
	{
		fprintf(stderr, "kl bench-constraint: %s\n", err.msg);
		return 1;
	}
	{
		int			safe_small = 0,
					safe_big = 0;

		for (int i = 0; i < v->n_ids; i++)
			safe_small += v->safe_chars[i] >= 0;
		for (int i = 0; i < big->n_ids; i++)
			safe_big += big->safe_chars[i] >= 0;
		printf("Vocabularies: the model's, %d ids (%d ordinary tokens, %d of them string-safe; trie of %d nodes, "
			   "indexed in %.1f ms); synthetic, %d ids (%d string-safe; trie of %d nodes; made and indexed in "
			   "%.0f ms).\n\n", v->n_ids, kl_tokenizer_n_base(tok), safe_small, v->all.n_nodes, 1e3 * t_small,
			   big->n_ids, safe_big, big->all.n_nodes, 1e3 * t_big);
	}
	printf("| vocabulary | mask computed by | state | steps | mean µs | median µs | p99 µs |\n");
	printf("|---|---|---|---:|---:|---:|---:|\n");
	{
		char		label[64];

		snprintf(label, sizeof(label), "model (%d)", v->n_ids);
		run(label, v, kl_tokenizer_eos(tok), steps, true);
		run(label, v, kl_tokenizer_eos(tok), steps, false);
		snprintf(label, sizeof(label), "synthetic (%d)", big->n_ids);
		run(label, big, 0, steps, true);
		run(label, big, 0, steps, false);
	}
	kl_vocab_free(v);
	kl_vocab_free(big);
	kl_tokenizer_free(tok);
	return 0;
}
