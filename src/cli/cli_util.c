/*
 * cli_util.c — option parsing and file helpers shared by the ./kl subcommands.
 */
#include "cli_util.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
	FILE	   *f = fopen(path, "rb");
	uint8_t    *b = NULL;
	long		n;

	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
		(b = malloc((size_t) n + 1)) != NULL && fread(b, 1, (size_t) n, f) == (size_t) n)
		*len = (size_t) n;
	else
	{
		free(b);
		b = NULL;
	}
	fclose(f);
	return b;
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
