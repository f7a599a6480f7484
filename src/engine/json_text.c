/*
 * json_text.c — JSON text as Python's json.dumps writes it (see json_text.h).
 *
 * Why not Jansson's json_dumps: its separators, escapes (it writes \u001f
 * in uppercase and escapes "/" on request) and float format ("%.17g") are
 * not Python's, and the Kimi chat template renders tool declarations with
 * Python's json.dumps; the rendered text must match it byte for byte.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_text.h"

void
kl_buf_put(kl_buf *b, const void *p, size_t n)
{
	if (b->failed)
		return;
	if (b->len + n + 1 > b->cap)
	{
		size_t		cap = b->cap ? b->cap : 256;
		char	   *d;

		while (cap < b->len + n + 1)
			cap *= 2;
		d = realloc(b->data, cap);
		if (!d)
		{
			b->failed = true;
			return;
		}
		b->data = d;
		b->cap = cap;
	}
	if (n)
		memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = 0;
}

void
kl_buf_puts(kl_buf *b, const char *s)
{
	kl_buf_put(b, s, strlen(s));
}

void
kl_buf_putc(kl_buf *b, char c)
{
	kl_buf_put(b, &c, 1);
}

void
kl_buf_free(kl_buf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

int
kl_buf_check(const kl_buf *b, kl_err *err)
{
	return b->failed ? kl_errc(err, KL_E_RESOURCES, "out of memory for JSON text") : KL_OK;
}

void
kl_json_put_string(kl_buf *b, const char *s, size_t n)
{
	size_t		run = 0;

	kl_buf_putc(b, '"');
	for (size_t i = 0; i < n; i++)
	{
		unsigned char c = (unsigned char) s[i];
		const char *esc = NULL;
		char		u[8];

		switch (c)
		{
			case '"':
				esc = "\\\"";
				break;
			case '\\':
				esc = "\\\\";
				break;
			case '\n':
				esc = "\\n";
				break;
			case '\r':
				esc = "\\r";
				break;
			case '\t':
				esc = "\\t";
				break;
			case '\b':
				esc = "\\b";
				break;
			case '\f':
				esc = "\\f";
				break;
			default:
				if (c < 0x20)
				{
					snprintf(u, sizeof(u), "\\u%04x", c);
					esc = u;
				}
		}
		if (!esc)
			continue;
		/* flush the plain run before this byte */
		kl_buf_put(b, s + run, i - run);
		kl_buf_puts(b, esc);
		run = i + 1;
	}
	kl_buf_put(b, s + run, n - run);
	kl_buf_putc(b, '"');
}

void
kl_json_put_real(kl_buf *b, double x)
{
	char		e[40],
				digits[24],
				out[64];
	int			p,
				exp10,
				nd = 0;
	char	   *q;

	if (isnan(x))
	{
		kl_buf_puts(b, "NaN");
		return;
	}
	if (isinf(x))
	{
		kl_buf_puts(b, x > 0 ? "Infinity" : "-Infinity");
		return;
	}
	if (x == 0)
	{
		kl_buf_puts(b, signbit(x) ? "-0.0" : "0.0");
		return;
	}
	/* the shortest %e form that reads back exactly, as repr() finds it */
	for (p = 1; p <= 17; p++)
	{
		snprintf(e, sizeof(e), "%.*e", p - 1, x);
		if (strtod(e, NULL) == x)
			break;
	}
	/* e is [-]d[.ddd]e[+-]XX: collect the digits and the exponent */
	q = e;
	if (*q == '-')
		q++;
	for (; *q && *q != 'e'; q++)
		if (*q >= '0' && *q <= '9')
			digits[nd++] = *q;
	while (nd > 1 && digits[nd - 1] == '0')
		nd--;
	digits[nd] = 0;
	exp10 = atoi(q + 1);

	q = out;
	if (x < 0)
		*q++ = '-';
	if (exp10 >= -4 && exp10 < 16)
	{
		if (exp10 >= 0)
		{
			for (int i = 0; i <= exp10; i++)
				*q++ = i < nd ? digits[i] : '0';
			*q++ = '.';
			if (nd > exp10 + 1)
				for (int i = exp10 + 1; i < nd; i++)
					*q++ = digits[i];
			else
				*q++ = '0';
		}
		else
		{
			*q++ = '0';
			*q++ = '.';
			for (int i = 0; i < -exp10 - 1; i++)
				*q++ = '0';
			for (int i = 0; i < nd; i++)
				*q++ = digits[i];
		}
		*q = 0;
	}
	else
	{
		*q++ = digits[0];
		if (nd > 1)
		{
			*q++ = '.';
			for (int i = 1; i < nd; i++)
				*q++ = digits[i];
		}
		snprintf(q, sizeof(out) - (size_t) (q - out), "e%c%02d", exp10 < 0 ? '-' : '+', abs(exp10));
	}
	kl_buf_puts(b, out);
}

json_t *
kl_json_new_object(void)
{
	return json_pack("{}");
}

void
kl_json_dump_py(kl_buf *b, const json_t *v, bool compact)
{
	const char *comma = compact ? "," : ", ",
			   *colon = compact ? ":" : ": ";

	switch (json_typeof(v))
	{
		case JSON_OBJECT:
			{
				const char *key;
				json_t	   *val;
				bool		first = true;

				kl_buf_putc(b, '{');
				json_object_foreach((json_t *) v, key, val)
				{
					if (!first)
						kl_buf_puts(b, comma);
					first = false;
					kl_json_put_string(b, key, strlen(key));
					kl_buf_puts(b, colon);
					kl_json_dump_py(b, val, compact);
				}
				kl_buf_putc(b, '}');
				break;
			}
		case JSON_ARRAY:
			kl_buf_putc(b, '[');
			for (size_t i = 0; i < json_array_size(v); i++)
			{
				if (i)
					kl_buf_puts(b, comma);
				kl_json_dump_py(b, json_array_get(v, i), compact);
			}
			kl_buf_putc(b, ']');
			break;
		case JSON_STRING:
			kl_json_put_string(b, json_string_value(v), json_string_length(v));
			break;
		case JSON_INTEGER:
			{
				char		n[32];

				snprintf(n, sizeof(n), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
				kl_buf_puts(b, n);
				break;
			}
		case JSON_REAL:
			kl_json_put_real(b, json_real_value(v));
			break;
		case JSON_TRUE:
			kl_buf_puts(b, "true");
			break;
		case JSON_FALSE:
			kl_buf_puts(b, "false");
			break;
		case JSON_NULL:
			kl_buf_puts(b, "null");
			break;
	}
}
