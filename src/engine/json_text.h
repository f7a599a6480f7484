/*
 * json_text.h — writing JSON text the way the chat template and the JSON
 * constraint need it: a growable byte buffer, string escaping, and the
 * serialization of Python's json.dumps(ensure_ascii=False) (what Hugging Face
 * chat templates call `tojson`): ", " and ": " separators, keys in the order
 * given, non-ASCII characters as themselves, floats as Python's repr.
 *
 * Values come from Jansson (json_t); objects keep their insertion order.
 */
#ifndef KL_JSON_TEXT_H
#define KL_JSON_TEXT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "kl_util.h"

/* A growable buffer; start from {0}, free with kl_buf_free.  data stays NUL-terminated. */
typedef struct kl_buf
{
	char	   *data;
	size_t		len,
				cap;
	bool		failed;			/* an allocation failed: the contents are incomplete */
} kl_buf;

void		kl_buf_put(kl_buf *b, const void *p, size_t n);
void		kl_buf_puts(kl_buf *b, const char *s);
void		kl_buf_putc(kl_buf *b, char c);
void		kl_buf_free(kl_buf *b);
/* KL_FAIL with "out of memory" in err if any append failed. */
int			kl_buf_check(const kl_buf *b, kl_err *err);

/*
 * A JSON string literal for s[0..n): quotes, \" \\ \n \r \t \b \f, other
 * bytes below 0x20 as \u00xx (lowercase hex, as Python), everything else
 * as is.  This is both json.dumps's spelling and the one shortest form.
 */
void		kl_json_put_string(kl_buf *b, const char *s, size_t n);

/*
 * A number as Python writes it: integers in decimal, floats as repr()
 * (shortest digits that read back to the same double; fixed notation with
 * ".0" for 1e-4 <= |x| < 1e16, else d.ddde+XX).
 */
void		kl_json_put_real(kl_buf *b, double x);

/*
 * A new empty JSON object.  Use this, never Jansson's json_object(): the
 * postgres executable exports a function of that name (the SQL function
 * json_object), and inside a server process the dynamic linker binds the
 * extension's reference to it.
 */
json_t	   *kl_json_new_object(void);

/* json.dumps(v, ensure_ascii=False) (compact: separators "," and ":" instead). */
void		kl_json_dump_py(kl_buf *b, const json_t *v, bool compact);

#endif
