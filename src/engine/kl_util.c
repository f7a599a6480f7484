/*
 * kl_util.c — errors, checked allocation, f16 conversion, CRC-32C, the clock
 * (see kl_util.h).
 */
#include "kl_util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <isa-l/crc.h>

int
kl_errc(kl_err *err, kl_errcode code, const char *fmt,...)
{
	if (err)
	{
		va_list		ap;

		err->code = code;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
		va_end(ap);
	}
	return KL_FAIL;
}

int
kl_err_prefix(kl_err *err, const char *fmt,...)
{
	if (err)
	{
		char		prefix[512];
		char		old[sizeof(err->msg)];
		va_list		ap;

		va_start(ap, fmt);
		vsnprintf(prefix, sizeof(prefix), fmt, ap);
		va_end(ap);
		memcpy(old, err->msg, sizeof(old));
		/* a message longer than the buffer is cut; its end says so */
		if (snprintf(err->msg, sizeof(err->msg), "%s: %s", prefix, old) >= (int) sizeof(err->msg))
			memcpy(err->msg + sizeof(err->msg) - 4, "...", 4);
	}
	return KL_FAIL;
}

kl_errcode
kl_errno_code(int errnum)
{
	switch (errnum)
	{
		case ENOMEM:
		case EMFILE:
		case ENFILE:
		case ENOSPC:
			return KL_E_RESOURCES;
		case EIO:
			return KL_E_INTERNAL;
		default:
			return KL_E_INVALID;
	}
}

const char *
kl_errcode_name(kl_errcode code)
{
	switch (code)
	{
		case KL_E_NONE:
			return "no error";
		case KL_E_INVALID:
			return "invalid input";
		case KL_E_CORRUPT:
			return "corrupt data";
		case KL_E_RESOURCES:
			return "out of resources";
		case KL_E_UNSUPPORTED:
			return "not supported";
		case KL_E_INTERNAL:
			return "internal error";
	}
	return "unknown error code";
}

void *
kl_malloc(size_t n, kl_err *err)
{
	void	   *p = malloc(n ? n : 1);

	if (!p)
		kl_errc(err, KL_E_RESOURCES, "out of memory allocating %zu bytes", n);
	return p;
}

void *
kl_calloc(size_t count, size_t size, kl_err *err)
{
	void	   *p = calloc(count ? count : 1, size ? size : 1);

	if (!p)
		kl_errc(err, KL_E_RESOURCES, "out of memory allocating %zu x %zu bytes", count, size);
	return p;
}

void *
kl_aligned_alloc(size_t n, kl_err *err)
{
	void	   *p = NULL;
	size_t		rounded = (n + 63) & ~(size_t) 63;

	if (rounded < n || posix_memalign(&p, 64, rounded ? rounded : 64) != 0)
	{
		kl_errc(err, KL_E_RESOURCES, "out of memory allocating %zu bytes", n);
		return NULL;
	}
	memset(p, 0, rounded ? rounded : 64);
	return p;
}

float
kl_f16_to_f32(uint16_t h)
{
	uint32_t	sign = (uint32_t) (h & 0x8000) << 16;
	uint32_t	exp = (h >> 10) & 0x1f;
	uint32_t	mant = h & 0x3ff;
	uint32_t	u;
	float		f;

	if (exp == 0)
	{
		/* zero or subnormal: value = mant * 2^-24 */
		f = (float) mant * (1.0f / 16777216.0f);
		return sign ? -f : f;
	}
	if (exp == 31)
		u = sign | 0x7f800000u | (mant << 13);
	else
		u = sign | ((exp + 112) << 23) | (mant << 13);
	memcpy(&f, &u, 4);
	return f;
}

double
kl_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

uint32_t
kl_crc32c(const void *p, size_t n)
{
	const unsigned char *b = p;
	uint32_t	crc = 0xFFFFFFFFu;

	while (n > 0)
	{
		int			len = n > (1u << 30) ? (1 << 30) : (int) n;

		crc = crc32_iscsi((unsigned char *) b, len, crc);
		b += len;
		n -= (size_t) len;
	}
	return crc ^ 0xFFFFFFFFu;
}
