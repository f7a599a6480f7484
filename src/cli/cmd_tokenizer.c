/*
 * cmd_tokenizer.c — ./kl tokenize, detokenize and bench-tokenizer.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli_util.h"
#include "commands.h"
#include "tokenizer.h"

static char *
read_stdin(size_t *len)
{
	size_t		cap = 1 << 16,
				n = 0,
				got;
	char	   *b = malloc(cap);

	while (b && (got = fread(b + n, 1, cap - n, stdin)) > 0)
	{
		n += got;
		if (n == cap)
		{
			char	   *nb = realloc(b, cap *= 2);

			if (!nb)
			{
				free(b);
				return NULL;
			}
			b = nb;
		}
	}
	*len = n;
	return b;
}

static int
load_tok(int argc, char **argv, const char *cmd, kl_tokenizer **tok, bool *special, const char **corpus)
{
	const char *model = NULL;
	kl_err		err;

	for (int i = 1; i < argc; i++)
	{
		if (strcmp(argv[i], "--model") == 0 && i + 1 < argc)
			model = argv[++i];
		else if (special && strcmp(argv[i], "--special") == 0)
			*special = true;
		else if (corpus && strcmp(argv[i], "--corpus") == 0 && i + 1 < argc)
			*corpus = argv[++i];
		else
		{
			fprintf(stderr, "kl %s: unknown or incomplete option %s\n", cmd, argv[i]);
			return 2;
		}
	}
	if (!model)
	{
		fprintf(stderr, "kl %s: --model DIR is required\n", cmd);
		return 2;
	}
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
	kl_tokenizer *tok;
	bool		special = false;
	size_t		len;
	char	   *text;
	kl_ids		ids = {0};
	kl_err		err;
	int			rc = load_tok(argc, argv, "tokenize", &tok, &special, NULL);

	if (rc)
		return rc;
	text = read_stdin(&len);
	if (!text || kl_encode(tok, text, len, special, &ids, &err) != KL_OK)
	{
		fprintf(stderr, "kl tokenize: %s\n", text ? err.msg : "cannot read stdin");
		rc = 1;
	}
	else
	{
		for (size_t i = 0; i < ids.n; i++)
			printf("%s%d", i ? "," : "", ids.ids[i]);
		printf("\n");
	}
	free(text);
	kl_ids_free(&ids);
	kl_tokenizer_free(tok);
	return rc;
}

int
cmd_detokenize(int argc, char **argv)
{
	kl_tokenizer *tok;
	size_t		len,
				tlen;
	char	   *in,
			   *text;
	int32_t    *ids;
	int			n;
	kl_err		err;
	int			rc = load_tok(argc, argv, "detokenize", &tok, NULL, NULL);

	if (rc)
		return rc;
	in = read_stdin(&len);
	if (!in)
		return 1;
	in[len] = 0;
	if (cli_parse_ids(in, &ids, &n) != 0)
	{
		fprintf(stderr, "kl detokenize: stdin must hold token ids separated by commas or spaces\n");
		rc = 2;
	}
	else if (kl_decode(tok, ids, (size_t) n, &text, &tlen, &err) != KL_OK)
	{
		fprintf(stderr, "kl detokenize: %s\n", err.msg);
		rc = 1;
		free(ids);
	}
	else
	{
		fwrite(text, 1, tlen, stdout);
		free(text);
		free(ids);
	}
	free(in);
	kl_tokenizer_free(tok);
	return rc;
}

/* Encode every page of the corpus on one thread; best of three runs. */
int
cmd_bench_tokenizer(int argc, char **argv)
{
	kl_tokenizer *tok;
	const char *corpus = NULL;
	json_error_t jerr;
	json_t	   *root;
	size_t		bytes = 0,
				tokens = 0;
	double		best = 1e30;
	char		cpu[256] = "unknown CPU",
				line[512],
				date[32];
	FILE	   *f;
	time_t		now = time(NULL);
	kl_ids		ids = {0};
	int			rc = load_tok(argc, argv, "bench-tokenizer", &tok, NULL, &corpus);

	if (rc)
		return rc;
	if (!corpus)
	{
		fprintf(stderr, "kl bench-tokenizer: --corpus FILE (a JSON array of {\"page\", \"text\"}) is required\n");
		return 2;
	}
	root = json_load_file(corpus, 0, &jerr);
	if (!root || !json_is_array(root))
	{
		fprintf(stderr, "kl bench-tokenizer: %s: not a JSON array (%s)\n", corpus, jerr.text);
		return 1;
	}
	for (int run = 0; run < 3; run++)
	{
		size_t		i;
		json_t	   *page;
		double		t0 = kl_now(),
					dt;
		kl_err		err;

		bytes = tokens = 0;
		json_array_foreach(root, i, page)
		{
			json_t	   *t = json_object_get(page, "text");

			ids.n = 0;
			if (kl_encode(tok, json_string_value(t), json_string_length(t), false, &ids, &err) != KL_OK)
			{
				fprintf(stderr, "kl bench-tokenizer: page %zu: %s\n", i, err.msg);
				return 1;
			}
			bytes += json_string_length(t);
			tokens += ids.n;
		}
		dt = kl_now() - t0;
		best = dt < best ? dt : best;
	}
	if ((f = fopen("/proc/cpuinfo", "r")) != NULL)
	{
		while (fgets(line, sizeof(line), f))
			if (strncmp(line, "model name", 10) == 0 && strchr(line, ':'))
			{
				snprintf(cpu, sizeof(cpu), "%s", strchr(line, ':') + 2);
				cpu[strcspn(cpu, "\n")] = 0;
				break;
			}
		fclose(f);
	}
	strftime(date, sizeof(date), "%Y-%m-%d", gmtime(&now));
	printf("| machine | date | pages | bytes | tokens | seconds (best of 3) | MB/s, one thread | reference tiktoken |\n");
	printf("|---|---|---:|---:|---:|---:|---:|---:|\n");
	printf("| %s, %ld cores | %s | %zu | %zu | %zu | %.3f | %.1f | 8.7 MB/s (one core of a large server) |\n",
		   cpu, sysconf(_SC_NPROCESSORS_ONLN), date, json_array_size(root), bytes, tokens, best,
		   bytes / best / 1e6);
	kl_ids_free(&ids);
	json_decref(root);
	kl_tokenizer_free(tok);
	return 0;
}
