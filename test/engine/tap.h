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

/* Where ../shared lives: $KL_SHARED, else ../shared relative to the repo. */
static inline const char *
tap_shared_dir(void)
{
	const char *s = getenv("KL_SHARED");

	return s ? s : "../shared";
}

#endif
