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
	co->precision = NULL;
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
	else if (strcmp(argv[*i], "--precision") == 0 && *i + 1 < argc)
		co->precision = argv[++*i];
	else
		return false;
	return true;
}

/* the option of the table named arg, or NULL */
static const cli_opt *
find_option(const cli_opt *opts, size_t n_opts, const char *arg)
{
	for (size_t k = 0; k < n_opts; k++)
		if (strcmp(arg, opts[k].name) == 0)
			return &opts[k];
	return NULL;
}

/* store the value v of option o */
static void
set_option(const cli_opt *o, const char *v)
{
	switch (o->kind)
	{
		case CLI_OPT_STRING:
			*(const char **) o->value = v;
			break;
		case CLI_OPT_INT:
			*(int *) o->value = atoi(v);
			break;
		case CLI_OPT_LONG:
			*(long *) o->value = strtol(v, NULL, 10);
			break;
		case CLI_OPT_FLOAT:
			*(float *) o->value = strtof(v, NULL);
			break;
		case CLI_OPT_U64:
			*(uint64_t *) o->value = strtoull(v, NULL, 10);
			break;
		case CLI_OPT_SET:
			*(bool *) o->value = true;
			break;
		case CLI_OPT_CLEAR:
			*(bool *) o->value = false;
			break;
		case CLI_OPT_INT_LIST:
			*o->count = cli_parse_int_list(v, (int *) o->value, o->max);
			break;
	}
}

int
cli_parse_options(const char *cmd, int argc, char **argv, cli_common *co, const cli_opt *opts, size_t n_opts)
{
	for (int i = 1; i < argc; i++)
	{
		const cli_opt *o;
		bool		takes_value;

		if (co && cli_common_arg(co, argc, argv, &i))
			continue;
		o = find_option(opts, n_opts, argv[i]);
		takes_value = o && o->kind != CLI_OPT_SET && o->kind != CLI_OPT_CLEAR;
		if (!o || (takes_value && i + 1 >= argc))
		{
			fprintf(stderr, "kl %s: unknown or incomplete option %s\n", cmd, argv[i]);
			return 2;
		}
		set_option(o, takes_value ? argv[++i] : NULL);
	}
	return 0;
}

int
cli_parse_int_list(const char *s, int *out, int max)
{
	int			n = 0;

	while (*s && n < max)
	{
		char	   *end;
		long		v = strtol(s, &end, 10);

		if (end == s)
			break;
		if (*end == 'k' || *end == 'K')
		{
			v *= 1024;
			end++;
		}
		out[n++] = (int) v;
		s = *end == ',' ? end + 1 : end;
	}
	return n;
}

kl_load_opts
cli_load_opts(const cli_common *co)
{
	kl_load_opts opts = {0};

	opts.device = co->device;
	opts.moe_routing = co->moe_routing;
	opts.quantize = co->quantize;
	opts.precision = co->precision;
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
