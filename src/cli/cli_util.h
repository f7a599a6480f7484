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
	const char *precision;		/* --precision auto|fp32|bf16 (NULL: auto, bf16 on the GPU, fp32 on the CPU) */
} cli_common;

void		cli_common_init(cli_common *co);
/* If argv[*i] is a common option, consume it (and its value) and return true. */
bool		cli_common_arg(cli_common *co, int argc, char **argv, int *i);
/* The load options the common options set (device, MoE routing, quantization, precision). */
kl_load_opts cli_load_opts(const cli_common *co);
/*
 * A command's option table: each "--name" and where its value goes.  Numbers
 * convert as the commands always did (atoi, strtol, strtof, strtoull: text
 * that is not a number reads as 0, or as its leading digits).
 */
typedef enum cli_opt_kind
{
	CLI_OPT_STRING,				/* const char **: the argument itself */
	CLI_OPT_INT,				/* int * */
	CLI_OPT_LONG,				/* long * */
	CLI_OPT_FLOAT,				/* float * */
	CLI_OPT_U64,				/* uint64_t * */
	CLI_OPT_SET,				/* bool *, set true; takes no value */
	CLI_OPT_CLEAR,				/* bool *, set false; takes no value */
	CLI_OPT_INT_LIST,			/* int[max], *count set: "512,4k,32768" (k = 1024) */
} cli_opt_kind;

typedef struct cli_opt
{
	const char *name;			/* "--max-tokens" */
	cli_opt_kind kind;
	void	   *value;
	int		   *count;			/* CLI_OPT_INT_LIST only */
	int			max;			/* CLI_OPT_INT_LIST only */
} cli_opt;

/* table rows: CLI_OPT("--seed", CLI_OPT_U64, &seed), CLI_OPT_LIST("--prefill", points, &n, 8) */
#define CLI_OPT(n, k, v) {.name = (n), .kind = (k), .value = (v)}
#define CLI_OPT_LIST(n, v, cnt, mx) {.name = (n), .kind = CLI_OPT_INT_LIST, .value = (v), .count = (cnt), .max = (mx)}
#define CLI_N_OPTS(table) (sizeof(table) / sizeof((table)[0]))

/*
 * Parse argv[1..argc-1]: the common options first (when co is not NULL),
 * then the command's table.  An unknown option, or one without its value,
 * prints "kl CMD: unknown or incomplete option X" and returns 2; else 0.
 */
int			cli_parse_options(const char *cmd, int argc, char **argv, cli_common *co, const cli_opt *opts,
							  size_t n_opts);
/* "512,4k,32768" -> out[] (at most max values; k = 1024); the count read */
int			cli_parse_int_list(const char *s, int *out, int max);

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
