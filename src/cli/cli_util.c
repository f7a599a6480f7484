/*
 * cli_util.c — option parsing and file helpers shared by the ./kl subcommands.
 */
#include "cli_util.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kl_file.h"

void
cli_common_init(cli_common *co)
{
	co->model = NULL;
	co->device = "cpu";
	co->threads = 0;
	co->moe_routing = NULL;
	co->quantize = NULL;
}

bool
cli_common_arg(cli_common *co, int argc, char **argv, int *i)
{
	if (strcmp(argv[*i], "--model") == 0 && *i + 1 < argc)
		co->model = argv[++*i];
	else if (strcmp(argv[*i], "--device") == 0 && *i + 1 < argc)
		co->device = argv[++*i];
	else if (strcmp(argv[*i], "--threads") == 0 && *i + 1 < argc)
		co->threads = atoi(argv[++*i]);
	else if (strcmp(argv[*i], "--moe-routing") == 0 && *i + 1 < argc)
		co->moe_routing = argv[++*i];
	else if (strcmp(argv[*i], "--quantize") == 0 && *i + 1 < argc)
		co->quantize = argv[++*i];
	else
		return false;
	return true;
}

kl_load_opts
cli_load_opts(const cli_common *co)
{
	kl_load_opts opts = {0};

	opts.device = co->device;
	opts.moe_routing = co->moe_routing;
	opts.quantize = co->quantize;
	return opts;
}

int
cli_load(const cli_common *co, kl_model **m, kl_err *err)
{
	kl_load_opts opts = cli_load_opts(co);

	kl_set_threads(co->threads);
	return kl_model_load(co->model, &opts, m, err);
}

int
cli_parse_ids(const char *s, int32_t **ids, int *n)
{
	size_t		cap = 64;
	int32_t    *v = malloc(cap * sizeof(int32_t));
	int			k = 0;

	if (!v)
		return -1;
	while (*s)
	{
		char	   *end;
		long		x;

		while (*s == ',' || isspace((unsigned char) *s))
			s++;
		if (!*s)
			break;
		errno = 0;
		x = strtol(s, &end, 10);
		if (end == s || errno != 0 || x < 0 || x > INT32_MAX)
		{
			free(v);
			return -1;
		}
		if ((size_t) k == cap)
		{
			int32_t    *nv = realloc(v, (cap *= 2) * sizeof(int32_t));

			if (!nv)
			{
				free(v);
				return -1;
			}
			v = nv;
		}
		v[k++] = (int32_t) x;
		s = end;
	}
	*ids = v;
	*n = k;
	return 0;
}

uint8_t *
cli_read_file(const char *path, size_t *len)
{
	char	   *b;
	kl_err		err;

	/* the engine's reader, unconfined (the command line reads what its user names) */
	if (kl_file_read(NULL, path, SIZE_MAX - 1, "this command", &b, len, &err) != KL_OK)
		return NULL;
	return (uint8_t *) b;
}

char *
cli_read_stdin(size_t *len)
{
	char	   *b;
	kl_err		err;

	if (kl_file_read_stream(STDIN_FILENO, "standard input", SIZE_MAX - 1, "this command", &b, len, &err) != KL_OK)
	{
		fprintf(stderr, "kl: %s\n", err.msg);
		return NULL;
	}
	return b;
}

void
cli_cpu_name(char *out, size_t cap)
{
	FILE	   *f = fopen("/proc/cpuinfo", "r");
	char		line[512];

	snprintf(out, cap, "unknown CPU");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, "model name", 10) == 0 && strchr(line, ':'))
		{
			char	   *v = strchr(line, ':') + 1;

			while (*v == ' ' || *v == '\t')
				v++;
			v[strcspn(v, "\n")] = 0;
			snprintf(out, cap, "%s", v);
			break;
		}
	fclose(f);
}

int
cli_write_file(const char *path, const void *data, size_t len)
{
	FILE	   *f = fopen(path, "wb");

	if (!f)
		return -1;
	if (fwrite(data, 1, len, f) != len)
	{
		fclose(f);
		return -1;
	}
	return fclose(f) == 0 ? 0 : -1;
}
