/*
 * cli_util.h — option parsing shared by the ./kl subcommands.
 */
#ifndef KL_CLI_UTIL_H
#define KL_CLI_UTIL_H

#include <stdbool.h>
#include <stdint.h>

#include "kl.h"

typedef struct cli_common
{
	const char *model;			/* --model DIR */
	const char *device;			/* --device cpu|cuda|auto */
	int			threads;		/* --threads N (0 = all cores) */
	const char *moe_routing;	/* --moe-routing select|reference (NULL: the default, select) */
	const char *quantize;		/* --quantize fp8|int8|int4 (quantize the weights at load) */
} cli_common;

void		cli_common_init(cli_common *co);
/* If argv[*i] is a common option, consume it (and its value) and return true. */
bool		cli_common_arg(cli_common *co, int argc, char **argv, int *i);
/* The load options the common options set (device, MoE routing). */
kl_load_opts cli_load_opts(const cli_common *co);
/* Apply --threads and load --model. */
int			cli_load(const cli_common *co, kl_model **m, kl_err *err);
/* "1,2,3" (commas or whitespace) -> malloc'd ids; 0 on success */
int			cli_parse_ids(const char *s, int32_t **ids, int *n);

/* whole file -> malloc'd bytes, NUL-terminated (NULL on error; kl_file_read
 * unconfined); write bytes to a file (0 on success) */
uint8_t    *cli_read_file(const char *path, size_t *len);
/* all of standard input, malloc'd and NUL-terminated; NULL after printing why */
char	   *cli_read_stdin(size_t *len);
/* the CPU's model name from /proc/cpuinfo ("unknown CPU" without one), for
 * the machine line of benchmark tables */
void		cli_cpu_name(char *out, size_t cap);
int			cli_write_file(const char *path, const void *data, size_t len);

#endif
