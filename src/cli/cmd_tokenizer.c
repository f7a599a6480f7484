/*
 * cmd_tokenizer.c — ./kl tokenize, detokenize and bench-tokenizer.
 *
 *   kl tokenize --model DIR [--special]    UTF-8 text on stdin -> ids, comma-separated, on one line
 *   kl detokenize --model DIR              ids (commas and/or white space) on stdin -> the text's bytes
 *   kl bench-tokenizer --model DIR --corpus FILE [--runs N]
 *                                          encode every page of a corpus on one thread; a table
 */
#include <ctype.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli_util.h"
#include "commands.h"
#include "tokenizer.h"

/* tiktoken on the same corpus, one core of a large server (the project's reference figure) */
#define REFERENCE_MB_S 8.7

typedef struct tok_args
{
	const char *model;
	const char *corpus;
	bool		special;
	int			runs;
} tok_args;

static void
usage(const char *cmd)
{
	if (strcmp(cmd, "tokenize") == 0)
		fprintf(stderr, "usage: kl tokenize --model DIR [--special] < text\n"
				"  prints the token ids of the UTF-8 text on stdin, comma-separated, on one line;\n"
				"  --special: special-token texts such as <|im_end|> become their ids (else they are text)\n");
	else if (strcmp(cmd, "detokenize") == 0)
		fprintf(stderr, "usage: kl detokenize --model DIR < ids\n"
				"  writes the bytes of the token ids on stdin (separated by commas or white space)\n");
	else
		fprintf(stderr, "usage: kl bench-tokenizer --model DIR --corpus FILE [--runs N]\n"
				"  encodes the \"text\" of every element of the corpus (a JSON array of {\"page\", \"text\"})\n"
				"  on one thread, best of N runs (3), and prints a table\n");
}

/* Options; returns 0, or the exit status to return (2: usage). */
static int
parse_args(int argc, char **argv, tok_args *a)
{
	const char *cmd = argv[0];

	memset(a, 0, sizeof(*a));
	a->runs = 3;
	for (int i = 1; i < argc; i++)
	{
		const char *o = argv[i];

		if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0)
		{
			usage(cmd);
			return 2;
		}
		if ((strcmp(o, "--model") == 0 || strcmp(o, "--corpus") == 0 || strcmp(o, "--runs") == 0) && i + 1 >= argc)
		{
			fprintf(stderr, "kl %s: %s needs a value\n", cmd, o);
			return 2;
		}
		if (strcmp(o, "--model") == 0)
			a->model = argv[++i];
		else if (strcmp(o, "--special") == 0 && strcmp(cmd, "tokenize") == 0)
			a->special = true;
		else if (strcmp(o, "--corpus") == 0 && strcmp(cmd, "bench-tokenizer") == 0)
			a->corpus = argv[++i];
		else if (strcmp(o, "--runs") == 0 && strcmp(cmd, "bench-tokenizer") == 0)
		{
			char	   *end;
			long		r = strtol(argv[++i], &end, 10);

			if (*end || r < 1 || r > 100)
			{
				fprintf(stderr, "kl %s: --runs must be a number from 1 to 100\n", cmd);
				return 2;
			}
			a->runs = (int) r;
		}
		else
		{
			fprintf(stderr, "kl %s: unknown option %s\n", cmd, o);
			usage(cmd);
			return 2;
		}
	}
	if (!a->model)
	{
		fprintf(stderr, "kl %s: --model DIR is required (a directory with tiktoken.model and "
				"tokenizer_config.json)\n", cmd);
		return 2;
	}
	if (strcmp(cmd, "bench-tokenizer") == 0 && !a->corpus)
	{
		fprintf(stderr, "kl %s: --corpus FILE is required\n", cmd);
		return 2;
	}
	return 0;
}

static int
load(const char *cmd, const char *model, kl_tokenizer **tok)
{
	kl_err		err;

	if (kl_tokenizer_load(model, tok, &err) != KL_OK)
	{
		fprintf(stderr, "kl %s: %s\n", cmd, err.msg);
		return 1;
	}
	return 0;
}

int
cmd_tokenize(int argc, char **argv)
{
	tok_args	a;
	kl_tokenizer *tok;
	size_t		len;
	char	   *text;
	kl_ids		ids = {0};
	kl_err		err;
	int			rc = parse_args(argc, argv, &a);

	if (rc || (rc = load(argv[0], a.model, &tok)))
		return rc;
	text = cli_read_stdin(&len);
	if (!text)
	{
		fprintf(stderr, "kl tokenize: cannot read stdin\n");
		rc = 1;
	}
	else if (kl_encode(tok, text, len, a.special, &ids, &err) != KL_OK)
	{
		fprintf(stderr, "kl tokenize: stdin: %s\n", err.msg);
		rc = 1;
	}
	else
	{
		for (size_t i = 0; i < ids.n; i++)
			printf("%s%d", i ? "," : "", ids.ids[i]);
		printf("\n");
		if (fflush(stdout) != 0)
			rc = 1;
	}
	free(text);
	kl_ids_free(&ids);
	kl_tokenizer_free(tok);
	return rc;
}

/* "1,2, 3\n4" -> ids; a bad entry is reported with its position. */
static int
parse_ids(const char *s, kl_ids *ids)
{
	kl_err		err;
	size_t		count = 0;

	for (const char *p = s; *p;)
	{
		const char *start;
		long long	v = 0;

		while (*p == ',' || isspace((unsigned char) *p))
			p++;
		if (!*p)
			break;
		start = p;
		while (*p >= '0' && *p <= '9' && v <= INT32_MAX)
			v = v * 10 + (*p++ - '0');
		count++;
		if (p == start || v > INT32_MAX || (*p && *p != ',' && !isspace((unsigned char) *p)))
		{
			int			w = 0;

			while (start[w] && start[w] != ',' && !isspace((unsigned char) start[w]) && w < 20)
				w++;
			fprintf(stderr, "kl detokenize: stdin: entry %zu (byte %zu), \"%.*s\", is not a token id; give "
					"non-negative integers separated by commas or white space\n", count, (size_t) (start - s), w,
					start);
			return 2;
		}
		if (kl_ids_push(ids, (int32_t) v, &err) != KL_OK)
		{
			fprintf(stderr, "kl detokenize: %s\n", err.msg);
			return 1;
		}
	}
	return 0;
}

int
cmd_detokenize(int argc, char **argv)
{
	tok_args	a;
	kl_tokenizer *tok;
	size_t		len,
				tlen;
	char	   *in,
			   *text;
	kl_ids		ids = {0};
	kl_err		err;
	int			rc = parse_args(argc, argv, &a);

	if (rc || (rc = load(argv[0], a.model, &tok)))
		return rc;
	in = cli_read_stdin(&len);
	if (!in)
	{
		fprintf(stderr, "kl detokenize: cannot read stdin\n");
		rc = 1;
	}
	else if (strlen(in) != len)
	{
		fprintf(stderr, "kl detokenize: stdin has a NUL byte at %zu; give token ids as text\n", strlen(in));
		rc = 2;
	}
	else if ((rc = parse_ids(in, &ids)) != 0)
		;
	else if (kl_decode(tok, ids.ids, ids.n, &text, &tlen, &err) != KL_OK)
	{
		fprintf(stderr, "kl detokenize: %s\n", err.msg);
		rc = 1;
	}
	else
	{
		if (fwrite(text, 1, tlen, stdout) != tlen || fflush(stdout) != 0)
			rc = 1;
		free(text);
	}
	free(in);
	kl_ids_free(&ids);
	kl_tokenizer_free(tok);
	return rc;
}

/* ------------------------------------------------------------------ bench-tokenizer */

typedef struct bench_result
{
	size_t		bytes,
				tokens;
	double		best_s;
	uint64_t	ids_hash;		/* to check that both splitters give the same ids */
} bench_result;

static int
bench_run(const kl_tokenizer *tok, json_t *pages, kl_splitter splitter, int runs, bench_result *r)
{
	kl_ids		ids = {0};
	kl_err		err;

	r->best_s = 1e30;
	for (int run = 0; run < runs; run++)
	{
		size_t		i;
		json_t	   *page;
		double		t0 = kl_now(),
					dt;

		r->bytes = r->tokens = 0;
		r->ids_hash = 1469598103934665603ull;
		json_array_foreach(pages, i, page)
		{
			json_t	   *t = json_object_get(page, "text");

			ids.n = 0;
			if (kl_encode_with(tok, json_string_value(t), json_string_length(t), false, splitter, &ids,
							   &err) != KL_OK)
			{
				fprintf(stderr, "kl bench-tokenizer: page %zu: %s\n", i, err.msg);
				kl_ids_free(&ids);
				return 1;
			}
			r->bytes += json_string_length(t);
			r->tokens += ids.n;
			if (run == 0)
				for (size_t k = 0; k < ids.n; k++)
					r->ids_hash = (r->ids_hash ^ (uint32_t) ids.ids[k]) * 1099511628211ull;
		}
		dt = kl_now() - t0;
		r->best_s = dt < r->best_s ? dt : r->best_s;
	}
	kl_ids_free(&ids);
	return 0;
}

int
cmd_bench_tokenizer(int argc, char **argv)
{
	tok_args	a;
	kl_tokenizer *tok;
	json_error_t jerr;
	json_t	   *pages;
	bench_result scan,
				pcre;
	char		cpu[256],
				date[32];
	time_t		now = time(NULL);
	size_t		i;
	json_t	   *page;
	int			rc = parse_args(argc, argv, &a);

	if (rc)
		return rc;
	pages = json_load_file(a.corpus, 0, &jerr);
	if (!pages || !json_is_array(pages))
	{
		if (pages)
			fprintf(stderr, "kl bench-tokenizer: %s: expected a JSON array of {\"page\", \"text\"}\n", a.corpus);
		else
			fprintf(stderr, "kl bench-tokenizer: %s line %d: %s\n", a.corpus, jerr.line, jerr.text);
		json_decref(pages);
		return 1;
	}
	json_array_foreach(pages, i, page)
		if (!json_is_string(json_object_get(page, "text")))
		{
			fprintf(stderr, "kl bench-tokenizer: %s: element %zu has no \"text\" string\n", a.corpus, i);
			json_decref(pages);
			return 1;
		}
	if ((rc = load(argv[0], a.model, &tok)) != 0)
	{
		json_decref(pages);
		return rc;
	}
	if (bench_run(tok, pages, KL_SPLIT_SCANNER, a.runs, &scan) != 0 ||
		bench_run(tok, pages, KL_SPLIT_PCRE2, a.runs, &pcre) != 0)
	{
		kl_tokenizer_free(tok);
		json_decref(pages);
		return 1;
	}
	cli_cpu_name(cpu, sizeof(cpu));
	strftime(date, sizeof(date), "%Y-%m-%d", gmtime(&now));
	printf("| machine | date | pre-tokenizer | pages | bytes | tokens | seconds (best of %d) | MB/s, one thread | "
		   "reference tiktoken |\n", a.runs);
	printf("|---|---|---|---:|---:|---:|---:|---:|---:|\n");
	printf("| %s, %ld cores | %s | scanner (kl_encode) | %zu | %zu | %zu | %.3f | %.1f | %.1f MB/s |\n",
		   cpu, sysconf(_SC_NPROCESSORS_ONLN), date, json_array_size(pages), scan.bytes, scan.tokens, scan.best_s,
		   scan.bytes / scan.best_s / 1e6, REFERENCE_MB_S);
	printf("| %s, %ld cores | %s | PCRE2 JIT | %zu | %zu | %zu | %.3f | %.1f | %.1f MB/s |\n",
		   cpu, sysconf(_SC_NPROCESSORS_ONLN), date, json_array_size(pages), pcre.bytes, pcre.tokens, pcre.best_s,
		   pcre.bytes / pcre.best_s / 1e6, REFERENCE_MB_S);
	printf("\nBoth pre-tokenizers gave %s ids. Reference: tiktoken, %.1f MB/s on one core of a large server.\n",
		   scan.ids_hash == pcre.ids_hash && scan.tokens == pcre.tokens ? "identical" : "DIFFERENT", REFERENCE_MB_S);
	rc = (scan.ids_hash == pcre.ids_hash && scan.tokens == pcre.tokens) ? 0 : 1;
	kl_tokenizer_free(tok);
	json_decref(pages);
	return rc;
}
