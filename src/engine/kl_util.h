/*
 * kl_util.h — small things every engine file needs: the error type, checked
 * allocation, bf16/f16 conversion.
 *
 * The engine is plain C11 with no PostgreSQL headers.  It never aborts on bad
 * input: every function that can fail returns KL_OK or KL_FAIL and writes
 * into a kl_err a code (what kind of failure it is, set where the error is
 * raised) and a message that says what was wrong and, where it helps, what to
 * do.  Callers (the CLI, the PostgreSQL glue) turn that into their own error
 * reporting: they decide from the code, never from the message's words (the
 * extension maps codes to SQLSTATEs in one table, src/pg/pg_errors.c).
 */
#ifndef KL_UTIL_H
#define KL_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KL_OK 0
#define KL_FAIL (-1)

/*
 * What kind of failure an error is.  The raiser chooses; whoever adds context
 * (kl_err_prefix) or passes an error on keeps it.
 */
typedef enum kl_errcode
{
	KL_E_NONE = 0,				/* no error has been written */
	KL_E_INVALID,				/* invalid input: a bad argument, a state blob or a checkpoint that is
								 * not what it must be (wrong format, fields out of range, another
								 * model's state, a missing file) */
	KL_E_CORRUPT,				/* corrupt data: a checksum that does not match, data that ends before
								 * its own header says (truncated) */
	KL_E_RESOURCES,				/* out of memory (host or device), or past one of the engine's size
								 * limits (context, schema, vocabulary, file sizes) */
	KL_E_UNSUPPORTED,			/* well-formed, but a feature or format the engine does not support */
	KL_E_INTERNAL,				/* a library or system call failed unexpectedly, or a bug */
} kl_errcode;

#define KL_E_COUNT (KL_E_INTERNAL + 1)

typedef struct kl_err
{
	kl_errcode	code;
	char		msg[1024];
} kl_err;

/* Set the code and the message (printf style).  Always returns KL_FAIL so
 * that `return kl_errc(err, KL_E_INVALID, ...)` reads naturally. */
int			kl_errc(kl_err *err, kl_errcode code, const char *fmt,...) __attribute__((format(printf, 3, 4)));

/* Prefix an existing message: "context: old message"; the code stays.
 * Returns KL_FAIL. */
int			kl_err_prefix(kl_err *err, const char *fmt,...) __attribute__((format(printf, 2, 3)));

/* The code of an error from a failing system call's errno: out of memory or
 * file descriptors is KL_E_RESOURCES, an I/O error KL_E_INTERNAL, anything
 * else (no such file, permission denied, ...) KL_E_INVALID. */
kl_errcode	kl_errno_code(int errnum);

/* A short name of a code ("invalid input", "corrupt data", ...). */
const char *kl_errcode_name(kl_errcode code);

/* Whether err holds an error: a code and a message (the fuzzers check every
 * failure for one). */
static inline int
kl_err_is_set(const kl_err *err)
{
	return err->code > KL_E_NONE && err->code < KL_E_COUNT && err->msg[0] != '\0';
}

/* malloc/calloc that report failure through err (and return NULL). */
void	   *kl_malloc(size_t n, kl_err *err);
void	   *kl_calloc(size_t count, size_t size, kl_err *err);
/* 64-byte aligned allocation, zeroed; free with free(). */
void	   *kl_aligned_alloc(size_t n, kl_err *err);

/* Overflow-checked size arithmetic: returns 0 on overflow. */
static inline int
kl_mul_ok(size_t a, size_t b, size_t *out)
{
	return !__builtin_mul_overflow(a, b, out);
}

/* bf16 is the high half of an IEEE binary32: conversion to f32 is exact. */
static inline float
kl_bf16_to_f32(uint16_t h)
{
	uint32_t	u = (uint32_t) h << 16;
	float		f;

	memcpy(&f, &u, 4);
	return f;
}

/* Round-to-nearest-even f32 -> bf16 (NaN stays NaN). */
static inline uint16_t
kl_f32_to_bf16(float f)
{
	uint32_t	u;

	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t) ((u >> 16) | 0x40);
	u += 0x7fffu + ((u >> 16) & 1);
	return (uint16_t) (u >> 16);
}

float		kl_f16_to_f32(uint16_t h);

/* CRC-32C (Castagnoli), as in iSCSI and PostgreSQL's WAL: computed by
 * ISA-L (Debian's libisal), which uses the CPU's crc32 instruction. */
uint32_t	kl_crc32c(const void *p, size_t n);

/* Monotonic clock in seconds. */
double		kl_now(void);

#endif
