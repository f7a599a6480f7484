/*
 * tap.h — a minimal Test Anything Protocol emitter for the engine's C unit
 * tests.  Each test program prints "1..N" at the end (done_testing style) and
 * one "ok N - name" / "not ok N - name" line per check; `prove` reads them.
 */
#ifndef KL_TAP_H
#define KL_TAP_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static int	tap_n = 0;
static int	tap_failed = 0;

static inline int tap_ok(int cond, const char *fmt,...) __attribute__((format(printf, 2, 3)));
static inline void tap_diag(const char *fmt,...) __attribute__((format(printf, 1, 2)));

static inline int
tap_ok(int cond, const char *fmt,...)
{
	va_list		ap;

	tap_n++;
	if (!cond)
		tap_failed++;
	printf("%sok %d - ", cond ? "" : "not ", tap_n);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	return cond;
}

static inline void
tap_diag(const char *fmt,...)
{
	va_list		ap;

	printf("# ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

static inline void
tap_skip(const char *why)
{
	tap_n++;
	printf("ok %d # SKIP %s\n", tap_n, why);
}

/* Print the plan and return the process exit status. */
static inline int
tap_done(void)
{
	printf("1..%d\n", tap_n);
	return tap_failed ? 1 : 0;
}

/*
 * The test data (test/fixtures: golden checkpoints and outputs, tokenizer
 * encodings, chat renders, the manual corpus decompressed by `make`), relative
 * to the repository root where the tests run; $KL_FIXTURES overrides it (the
 * GPU machine's copy).
 */
static inline const char *
tap_fixture_dir(void)
{
	const char *s = getenv("KL_FIXTURES");

	return s ? s : "test/fixtures";
}

/* The bundled trained model: $KL_MODELS/pgdocs-kimi-18m, default models/. */
static inline const char *
tap_models_dir(void)
{
	const char *s = getenv("KL_MODELS");

	return s ? s : "models";
}

/* The command-line tool the CLI checks run: $KL_CLI, default ./kl (the repository root's). */
static inline const char *
tap_cli(void)
{
	const char *s = getenv("KL_CLI");

	return s ? s : "./kl";
}

/*
 * Run a shell command with its stdout and stderr in dir/out and dir/err; its
 * exit status (system()'s) returned, its stderr in *err (a static buffer,
 * overwritten by the next call).
 */
static inline int
tap_run(const char *dir, const char *cmd, const char **err)
{
	static char buf[4096];
	char		full[4096],
				path[512];
	FILE	   *f;
	size_t		n = 0;
	int			rc;

	snprintf(full, sizeof(full), "%s >%s/out 2>%s/err", cmd, dir, dir);
	rc = system(full);
	snprintf(path, sizeof(path), "%s/err", dir);
	if ((f = fopen(path, "r")) != NULL)
	{
		n = fread(buf, 1, sizeof(buf) - 1, f);
		fclose(f);
	}
	buf[n] = '\0';
	*err = buf;
	return rc;
}

#endif
