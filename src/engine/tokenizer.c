/*
 * tokenizer.c — tiktoken-style byte-level BPE (see tokenizer.h).
 *
 * Encoding a text:
 *   1. (allow_special) split it at special-token texts, which become their ids;
 *   2. split each remaining segment with the pre-tokenizer pattern (PCRE2, JIT);
 *   3. turn each piece into tokens by byte-pair merging: start from its bytes
 *      and repeatedly merge the adjacent pair whose concatenation has the
 *      lowest rank in tiktoken.model (leftmost on ties) until no adjacent
 *      pair is a token.
 * Short pieces merge in a small array (quadratic, but tiny); long ones use a
 * heap of candidate pairs over a linked list of parts, so a 300-character run
 * costs n log n, not n^2.
 *
 * The pattern is ARCHITECTURE.md's, translated to PCRE2: character-class
 * intersections [A&&[^\p{Han}]] become (?:(?!\p{Han})[A]), and \s / \S are
 * spelled out as Unicode's White_Space set (which the reference's regex
 * engine uses for \s, and which differs from PCRE2's \s at U+0085).
 */
#include "tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SPECIALS 4096
#define SMALL_PIECE 32			/* pieces up to this many bytes merge in an array */

/* Unicode White_Space (the reference's \s) */
#define WS "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
#define UPPERISH "(?:(?!\\p{Han})[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}])"
#define LOWERISH "(?:(?!\\p{Han})[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}])"
#define CONTRACTIONS "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"

static const char pretokenize_pattern[] =
	"[\\p{Han}]+"
	"|[^\\r\\n\\p{L}\\p{N}]?" UPPERISH "*" LOWERISH "+" CONTRACTIONS
	"|[^\\r\\n\\p{L}\\p{N}]?" UPPERISH "+" LOWERISH "*" CONTRACTIONS
	"|\\p{N}{1,3}"
	"| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*"
	"|[" WS "]*[\\r\\n]+"
	"|[" WS "]+(?![^" WS "])"
	"|[" WS "]+";

typedef struct special
{
	char	   *text;
	size_t		len;
	int32_t		id;
} special;

struct kl_tokenizer
{
	/* ordinary tokens: id -> bytes (pool[off[id] .. off[id+1])) */
	int			n_base;
	uint8_t    *pool;
	uint32_t   *off;
	/* bytes -> id, open addressing (id + 1; 0 = empty) */
	int32_t    *table;
	uint32_t	table_mask;
	int32_t		byte_rank[256];

	special    *specials;
	int			n_specials;
	int			n_vocab;
	int32_t		bos,
				eos,
				pad,
				eos_alt;		/* [EOS] */
	char	  **special_text;	/* id - n_base -> text (NULL if not special) */
	int			special_span;

	pcre2_code *re;
};

/* ------------------------------------------------------------------ small helpers */

int
kl_ids_push(kl_ids *v, int32_t id, kl_err *err)
{
	if (v->n == v->cap)
	{
		size_t		cap = v->cap ? v->cap * 2 : 64;
		int32_t    *p = realloc(v->ids, cap * sizeof(int32_t));

		if (!p)
			return kl_errf(err, "out of memory");
		v->ids = p;
		v->cap = cap;
	}
	v->ids[v->n++] = id;
	return KL_OK;
}

void
kl_ids_free(kl_ids *v)
{
	free(v->ids);
	v->ids = NULL;
	v->n = v->cap = 0;
}

static inline uint64_t
hash_bytes(const uint8_t *p, size_t n)
{
	uint64_t	h = 0x9e3779b97f4a7c15ull ^ n;

	while (n >= 8)
	{
		uint64_t	w;

		memcpy(&w, p, 8);
		h = (h ^ w) * 0xff51afd7ed558ccdull;
		h ^= h >> 32;
		p += 8;
		n -= 8;
	}
	{
		uint64_t	w = 0;

		memcpy(&w, p, n);
		h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
		h ^= h >> 29;
	}
	return h;
}

/* The rank (id) of bytes p[0..n), or -1. */
static inline int32_t
lookup(const kl_tokenizer *t, const uint8_t *p, size_t n)
{
	uint32_t	i;

	if (n == 1)
		return t->byte_rank[p[0]];
	for (i = (uint32_t) hash_bytes(p, n) & t->table_mask;; i = (i + 1) & t->table_mask)
	{
		int32_t		e = t->table[i];
		uint32_t	a,
					b;

		if (e == 0)
			return -1;
		a = t->off[e - 1];
		b = t->off[e];
		if (b - a == n && memcmp(t->pool + a, p, n) == 0)
			return e - 1;
	}
}

bool
kl_utf8_valid(const char *s, size_t len, size_t *bad_offset)
{
	const unsigned char *p = (const unsigned char *) s;
	size_t		i = 0;

	while (i < len)
	{
		unsigned	c = p[i];
		int			need;
		unsigned	cp;

		if (c < 0x80)
		{
			i++;
			continue;
		}
		if (c >= 0xC2 && c <= 0xDF)
			need = 1, cp = c & 0x1F;
		else if (c >= 0xE0 && c <= 0xEF)
			need = 2, cp = c & 0x0F;
		else if (c >= 0xF0 && c <= 0xF4)
			need = 3, cp = c & 0x07;
		else
			goto bad;
		for (int k = 1; k <= need; k++)
		{
			if (i + k >= len || (p[i + k] & 0xC0) != 0x80)
				goto bad;
			cp = (cp << 6) | (p[i + k] & 0x3F);
		}
		/* overlong forms, surrogates, beyond U+10FFFF */
		if ((need == 2 && cp < 0x800) || (need == 3 && cp < 0x10000) || cp > 0x10FFFF ||
			(cp >= 0xD800 && cp <= 0xDFFF))
			goto bad;
		i += need + 1;
	}
	return true;
bad:
	if (bad_offset)
		*bad_offset = i;
	return false;
}

/* ------------------------------------------------------------------ loading */

static int
b64val(int c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/* Decode base64 s[0..n) into out (room for n*3/4 bytes); -1 if malformed. */
static long
b64decode(const char *s, size_t n, uint8_t *out)
{
	long		o = 0;
	uint32_t	acc = 0;
	int			bits = 0;
	size_t		i;

	for (i = 0; i < n && s[i] != '='; i++)
	{
		int			v = b64val((unsigned char) s[i]);

		if (v < 0)
			return -1;
		acc = (acc << 6) | (uint32_t) v;
		bits += 6;
		if (bits >= 8)
		{
			bits -= 8;
			out[o++] = (uint8_t) (acc >> bits);
		}
	}
	for (; i < n; i++)
		if (s[i] != '=')
			return -1;
	return o;
}

static char *
read_file(const char *path, size_t *len, kl_err *err)
{
	FILE	   *f = fopen(path, "rb");
	char	   *b;
	long		n;

	if (!f)
	{
		kl_errf(err, "cannot open %s: %s", path, strerror(errno));
		return NULL;
	}
	if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0 || n > (256L << 20))
	{
		fclose(f);
		kl_errf(err, "cannot read %s (or larger than 256 MB)", path);
		return NULL;
	}
	b = kl_malloc((size_t) n + 1, err);
	if (b && fread(b, 1, (size_t) n, f) != (size_t) n)
	{
		free(b);
		b = NULL;
		kl_errf(err, "cannot read %s", path);
	}
	fclose(f);
	if (b)
	{
		b[n] = 0;
		*len = (size_t) n;
	}
	return b;
}

static int
load_ranks(kl_tokenizer *t, const char *path, kl_err *err)
{
	size_t		len,
				nlines = 0;
	char	   *text = read_file(path, &len, err);
	char	   *p,
			   *end;
	int			line = 0;
	uint8_t    *tmp;
	uint32_t	size;

	if (!text)
		return KL_FAIL;
	for (size_t i = 0; i < len; i++)
		nlines += text[i] == '\n';
	nlines++;
	/* ranks are the token ids: they must be exactly 0 .. n-1 */
	t->off = kl_calloc(nlines + 2, sizeof(uint32_t), err);
	t->pool = kl_malloc(len + 1, err);
	tmp = kl_malloc(len + 1, err);
	{
		/* bytes per rank, gathered first (lines may come in any order) */
		long	   *blen = kl_calloc(nlines + 1, sizeof(long), err);
		uint8_t   **bstart = kl_calloc(nlines + 1, sizeof(uint8_t *), err);
		size_t		used = 0;
		int			n = 0;
		int			max_rank = -1;

		if (!t->off || !t->pool || !tmp || !blen || !bstart)
		{
			free(blen);
			free(bstart);
			goto fail;
		}
		for (p = text; p < text + len; p = end + 1)
		{
			char	   *sp;
			char	   *rend;
			long		rank;
			long		nb;

			end = memchr(p, '\n', (size_t) (text + len - p));
			if (!end)
				end = text + len;
			line++;
			if (end == p || (end - p == 1 && *p == '\r'))
				continue;
			sp = memchr(p, ' ', (size_t) (end - p));
			if (!sp)
			{
				kl_errf(err, "%s line %d: expected \"<base64> <rank>\"", path, line);
				goto fail_inner;
			}
			rank = strtol(sp + 1, &rend, 10);
			if (rend == sp + 1 || (rend != end && !(rend + 1 == end && *rend == '\r')) || rank < 0 ||
				rank >= (long) nlines)
			{
				kl_errf(err, "%s line %d: invalid rank", path, line);
				goto fail_inner;
			}
			nb = b64decode(p, (size_t) (sp - p), t->pool + used);
			if (nb <= 0)
			{
				kl_errf(err, "%s line %d: invalid base64 token", path, line);
				goto fail_inner;
			}
			if (blen[rank] != 0)
			{
				kl_errf(err, "%s line %d: rank %ld appears twice", path, line, rank);
				goto fail_inner;
			}
			bstart[rank] = t->pool + used;
			blen[rank] = nb;
			used += (size_t) nb;
			n++;
			max_rank = rank > max_rank ? (int) rank : max_rank;
		}
		if (n == 0 || max_rank != n - 1)
		{
			kl_errf(err, "%s: ranks must be 0..%d without gaps", path, n - 1);
			goto fail_inner;
		}
		/* lay the tokens out in rank order */
		size = 0;
		for (int r = 0; r < n; r++)
		{
			memcpy(tmp + size, bstart[r], (size_t) blen[r]);
			t->off[r] = size;
			size += (uint32_t) blen[r];
		}
		t->off[n] = size;
		memcpy(t->pool, tmp, size);
		t->n_base = n;
		free(blen);
		free(bstart);
		goto built;
fail_inner:
		free(blen);
		free(bstart);
		goto fail;
	}
built:
	free(tmp);
	free(text);
	tmp = NULL;
	text = NULL;
	{
		uint32_t	cap = 1;

		while (cap < (uint32_t) t->n_base * 2)
			cap <<= 1;
		t->table = kl_calloc(cap, sizeof(int32_t), err);
		if (!t->table)
			return KL_FAIL;
		t->table_mask = cap - 1;
		for (int b = 0; b < 256; b++)
			t->byte_rank[b] = -1;
		for (int r = 0; r < t->n_base; r++)
		{
			const uint8_t *bytes = t->pool + t->off[r];
			size_t		n = t->off[r + 1] - t->off[r];
			uint32_t	i;

			if (n == 1)
				t->byte_rank[bytes[0]] = r;
			if (lookup(t, bytes, n) >= 0 && n > 1)
				return kl_errf(err, "%s: token %d repeats the bytes of another token", path, r);
			for (i = (uint32_t) hash_bytes(bytes, n) & t->table_mask; t->table[i] != 0; i = (i + 1) & t->table_mask)
				;
			t->table[i] = r + 1;
		}
		for (int b = 0; b < 256; b++)
			if (t->byte_rank[b] < 0)
				return kl_errf(err, "%s: byte 0x%02x has no token, so not every text can be encoded", path, b);
	}
	return KL_OK;
fail:
	free(tmp);
	free(text);
	return KL_FAIL;
}

/* "bos_token": "[BOS]" or {"content": "[BOS]", ...} */
static const char *
token_text(json_t *v)
{
	if (json_is_string(v))
		return json_string_value(v);
	if (json_is_object(v) && json_is_string(json_object_get(v, "content")))
		return json_string_value(json_object_get(v, "content"));
	return NULL;
}

static int
load_config(kl_tokenizer *t, const char *path, kl_err *err)
{
	json_error_t jerr;
	json_t	   *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
	json_t	   *added;
	const char *key;
	json_t	   *val;
	int			rc = KL_FAIL;
	int			max_id = t->n_base - 1;

	if (!root)
		return kl_errf(err, "%s: not valid JSON (line %d: %s)", path, jerr.line, jerr.text);
	added = json_object_get(root, "added_tokens_decoder");
	if (added && !json_is_object(added))
	{
		kl_errf(err, "%s: added_tokens_decoder must be an object (id -> token)", path);
		goto out;
	}
	t->specials = kl_calloc(added ? json_object_size(added) + 1 : 1, sizeof(special), err);
	if (!t->specials)
		goto out;
	if (added)
		json_object_foreach(added, key, val)
		{
			char	   *endp;
			long		id = strtol(key, &endp, 10);
			const char *content = token_text(val);

			if (*key == 0 || *endp != 0 || id < t->n_base || id >= t->n_base + MAX_SPECIALS)
			{
				kl_errf(err, "%s: added token id \"%s\" must be a number from %d to %d (after the %d "
						"ordinary tokens)", path, key, t->n_base, t->n_base + MAX_SPECIALS - 1, t->n_base);
				goto out;
			}
			if (!content || !*content)
			{
				kl_errf(err, "%s: added token %ld has no \"content\"", path, id);
				goto out;
			}
			t->specials[t->n_specials].text = strdup(content);
			t->specials[t->n_specials].len = strlen(content);
			t->specials[t->n_specials].id = (int32_t) id;
			if (!t->specials[t->n_specials].text)
			{
				kl_errf(err, "out of memory");
				goto out;
			}
			t->n_specials++;
			max_id = id > max_id ? (int) id : max_id;
		}
	t->n_vocab = max_id + 1;
	t->special_span = t->n_vocab - t->n_base;
	t->special_text = kl_calloc((size_t) t->special_span + 1, sizeof(char *), err);
	if (!t->special_text)
		goto out;
	for (int i = 0; i < t->n_specials; i++)
	{
		if (t->special_text[t->specials[i].id - t->n_base])
		{
			kl_errf(err, "%s: added token %d appears twice", path, t->specials[i].id);
			goto out;
		}
		t->special_text[t->specials[i].id - t->n_base] = t->specials[i].text;
	}
	/* longest first, so that a special that prefixes another never wins */
	for (int i = 1; i < t->n_specials; i++)
		for (int j = i; j > 0 && t->specials[j].len > t->specials[j - 1].len; j--)
		{
			special		tmp = t->specials[j];

			t->specials[j] = t->specials[j - 1];
			t->specials[j - 1] = tmp;
		}
	t->bos = token_text(json_object_get(root, "bos_token")) ?
		kl_tokenizer_special_id(t, token_text(json_object_get(root, "bos_token"))) : -1;
	t->eos = token_text(json_object_get(root, "eos_token")) ?
		kl_tokenizer_special_id(t, token_text(json_object_get(root, "eos_token"))) : -1;
	t->pad = token_text(json_object_get(root, "pad_token")) ?
		kl_tokenizer_special_id(t, token_text(json_object_get(root, "pad_token"))) : -1;
	t->eos_alt = kl_tokenizer_special_id(t, "[EOS]");
	rc = KL_OK;
out:
	json_decref(root);
	return rc;
}

int
kl_tokenizer_load(const char *dir, kl_tokenizer **out, kl_err *err)
{
	kl_tokenizer *t;
	char		path[4096];
	int			ec;
	PCRE2_SIZE	eo;

	*out = NULL;
	t = kl_calloc(1, sizeof(kl_tokenizer), err);
	if (!t)
		return KL_FAIL;
	t->bos = t->eos = t->pad = t->eos_alt = -1;
	snprintf(path, sizeof(path), "%s/tiktoken.model", dir);
	if (load_ranks(t, path, err) != KL_OK)
		goto fail;
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	if (load_config(t, path, err) != KL_OK)
		goto fail;
	t->re = pcre2_compile((PCRE2_SPTR) pretokenize_pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
						  &ec, &eo, NULL);
	if (!t->re)
	{
		PCRE2_UCHAR msg[256];

		pcre2_get_error_message(ec, msg, sizeof(msg));
		kl_errf(err, "pre-tokenizer pattern does not compile at offset %zu: %s", (size_t) eo, msg);
		goto fail;
	}
	/* JIT when available; the interpreter gives the same matches, slower */
	(void) pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE);
	*out = t;
	return KL_OK;
fail:
	kl_err_prefix(err, "tokenizer");
	kl_tokenizer_free(t);
	return KL_FAIL;
}

void
kl_tokenizer_free(kl_tokenizer *t)
{
	if (!t)
		return;
	for (int i = 0; i < t->n_specials; i++)
		free(t->specials[i].text);
	free(t->specials);
	free(t->special_text);
	free(t->pool);
	free(t->off);
	free(t->table);
	if (t->re)
		pcre2_code_free(t->re);
	free(t);
}

int
kl_tokenizer_n_vocab(const kl_tokenizer *t)
{
	return t->n_vocab;
}

int32_t
kl_tokenizer_bos(const kl_tokenizer *t)
{
	return t->bos;
}

int32_t
kl_tokenizer_eos(const kl_tokenizer *t)
{
	return t->eos;
}

int32_t
kl_tokenizer_pad(const kl_tokenizer *t)
{
	return t->pad;
}

int32_t
kl_tokenizer_special_id(const kl_tokenizer *t, const char *text)
{
	for (int i = 0; i < t->n_specials; i++)
		if (strcmp(t->specials[i].text, text) == 0)
			return t->specials[i].id;
	return -1;
}

int
kl_tokenizer_stop_ids(const kl_tokenizer *t, int32_t *out, int cap)
{
	int			n = 0;

	if (t->eos >= 0 && n < cap)
		out[n++] = t->eos;
	if (t->eos_alt >= 0 && t->eos_alt != t->eos && n < cap)
		out[n++] = t->eos_alt;
	return n;
}

/* ------------------------------------------------------------------ byte-pair merging */

/* Short pieces: parts as an array of start offsets, pair ranks beside them. */
static int
bpe_small(const kl_tokenizer *t, const uint8_t *p, int n, kl_ids *out, kl_err *err)
{
	int			start[SMALL_PIECE + 1];
	int32_t		rank[SMALL_PIECE];	/* rank of parts i and i+1 merged */
	int			parts = n;

	for (int i = 0; i <= n; i++)
		start[i] = i;
	for (int i = 0; i + 1 < parts; i++)
		rank[i] = lookup(t, p + start[i], (size_t) (start[i + 2] - start[i]));
	for (;;)
	{
		int			best = -1;

		for (int i = 0; i + 1 < parts; i++)
			if (rank[i] >= 0 && (best < 0 || rank[i] < rank[best]))
				best = i;
		if (best < 0)
			break;
		/* merge parts best and best+1 */
		memmove(start + best + 1, start + best + 2, sizeof(int) * (size_t) (parts - best - 1));
		memmove(rank + best + 1, rank + best + 2, sizeof(int32_t) * (size_t) (parts > best + 2 ? parts - best - 2 : 0));
		parts--;
		if (best + 1 < parts)
			rank[best] = lookup(t, p + start[best], (size_t) (start[best + 2] - start[best]));
		else
			rank[best] = -1;
		if (best > 0)
			rank[best - 1] = lookup(t, p + start[best - 1], (size_t) (start[best + 1] - start[best - 1]));
	}
	for (int i = 0; i < parts; i++)
		if (kl_ids_push(out, lookup(t, p + start[i], (size_t) (start[i + 1] - start[i])), err) != KL_OK)
			return KL_FAIL;
	return KL_OK;
}

/* Long pieces: a linked list of parts and a min-heap of (rank, position). */
typedef struct heap_item
{
	int32_t		rank;
	int			pos;			/* start of the left part */
	int			right_end;		/* end of the right part when pushed (stale if changed) */
} heap_item;

static inline bool
heap_less(const heap_item *a, const heap_item *b)
{
	return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void
heap_push(heap_item *h, int *n, heap_item x)
{
	int			i = (*n)++;

	while (i > 0 && heap_less(&x, &h[(i - 1) / 2]))
	{
		h[i] = h[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	h[i] = x;
}

static heap_item
heap_pop(heap_item *h, int *n)
{
	heap_item	top = h[0],
				x = h[--(*n)];
	int			i = 0;

	for (;;)
	{
		int			c = 2 * i + 1;

		if (c >= *n)
			break;
		if (c + 1 < *n && heap_less(&h[c + 1], &h[c]))
			c++;
		if (!heap_less(&h[c], &x))
			break;
		h[i] = h[c];
		i = c;
	}
	if (*n > 0)
		h[i] = x;
	return top;
}

static int
bpe_large(const kl_tokenizer *t, const uint8_t *p, int n, kl_ids *out, kl_err *err)
{
	/* next[i]: start of the part after the one starting at i (n at the end);
	 * prev[i]: start of the part before; alive[i]: a part starts at i */
	int		   *next = malloc(sizeof(int) * (size_t) (n + 1));
	int		   *prev = malloc(sizeof(int) * (size_t) (n + 1));
	char	   *alive = malloc((size_t) n + 1);
	heap_item  *h = malloc(sizeof(heap_item) * (size_t) (2 * n + 2));
	int			hn = 0;
	int			rc = KL_FAIL;

	if (!next || !prev || !alive || !h)
	{
		kl_errf(err, "out of memory");
		goto out;
	}
	for (int i = 0; i < n; i++)
	{
		next[i] = i + 1;
		prev[i] = i - 1;
		alive[i] = 1;
	}
	for (int i = 0; i + 1 < n; i++)
	{
		int32_t		r = lookup(t, p + i, 2);

		if (r >= 0)
			heap_push(h, &hn, (heap_item) {r, i, i + 2});
	}
	while (hn > 0)
	{
		heap_item	it = heap_pop(h, &hn);
		int			a = it.pos,
					b,
					e;

		/* stale: the left part is gone, or its right neighbour changed */
		if (!alive[a] || next[a] >= n || next[next[a]] != it.right_end)
			continue;
		b = next[a];
		e = next[b];
		alive[b] = 0;
		next[a] = e;
		if (e < n)
			prev[e] = a;
		/* new candidates with the neighbours */
		if (prev[a] >= 0)
		{
			int32_t		r = lookup(t, p + prev[a], (size_t) (e - prev[a]));

			if (r >= 0)
				heap_push(h, &hn, (heap_item) {r, prev[a], e});
		}
		if (e < n)
		{
			int32_t		r = lookup(t, p + a, (size_t) (next[e] - a));

			if (r >= 0)
				heap_push(h, &hn, (heap_item) {r, a, next[e]});
		}
	}
	for (int i = 0; i < n; i = next[i])
		if (kl_ids_push(out, lookup(t, p + i, (size_t) (next[i] - i)), err) != KL_OK)
			goto out;
	rc = KL_OK;
out:
	free(next);
	free(prev);
	free(alive);
	free(h);
	return rc;
}

static int
encode_piece(const kl_tokenizer *t, const uint8_t *p, int n, kl_ids *out, kl_err *err)
{
	int32_t		whole = lookup(t, p, (size_t) n);

	if (whole >= 0)
		return kl_ids_push(out, whole, err);
	return n <= SMALL_PIECE ? bpe_small(t, p, n, out, err) : bpe_large(t, p, n, out, err);
}

/* ------------------------------------------------------------------ encoding */

/* Split one segment (no specials) with the pattern and merge each piece. */
static int
encode_ordinary(const kl_tokenizer *t, const char *s, size_t len, pcre2_match_data *md, kl_ids *out,
				kl_err *err)
{
	PCRE2_SIZE	pos = 0;

	while (pos < len)
	{
		int			rc = pcre2_match(t->re, (PCRE2_SPTR) s, len, pos, PCRE2_NO_UTF_CHECK, md, NULL);
		PCRE2_SIZE *ov;

		if (rc == PCRE2_ERROR_NOMATCH)
		{
			/* the pattern covers every character; bytes left would be encoded as they are */
			return encode_piece(t, (const uint8_t *) s + pos, (int) (len - pos), out, err);
		}
		if (rc < 0)
		{
			PCRE2_UCHAR msg[256];

			pcre2_get_error_message(rc, msg, sizeof(msg));
			return kl_errf(err, "pre-tokenizer failed at byte %zu: %s", (size_t) pos, msg);
		}
		ov = pcre2_get_ovector_pointer(md);
		if (ov[0] > pos && encode_piece(t, (const uint8_t *) s + pos, (int) (ov[0] - pos), out, err) != KL_OK)
			return KL_FAIL;
		if (ov[1] == ov[0])
		{
			/* cannot happen with this pattern (no empty matches); do not loop */
			pos = ov[0] + 1;
			continue;
		}
		if (encode_piece(t, (const uint8_t *) s + ov[0], (int) (ov[1] - ov[0]), out, err) != KL_OK)
			return KL_FAIL;
		pos = ov[1];
	}
	return KL_OK;
}

/* The earliest special token at or after `from`: its index, or -1. */
static int
find_special(const kl_tokenizer *t, const char *s, size_t len, size_t from, size_t *at)
{
	for (size_t i = from; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		/* specials start with '<' or '[' in Kimi vocabularies; check any first byte */
		for (int k = 0; k < t->n_specials; k++)
		{
			const special *sp = &t->specials[k];

			if ((unsigned char) sp->text[0] == c && sp->len <= len - i && memcmp(s + i, sp->text, sp->len) == 0)
			{
				*at = i;
				return k;
			}
		}
	}
	return -1;
}

int
kl_encode(const kl_tokenizer *t, const char *text, size_t len, bool allow_special, kl_ids *out, kl_err *err)
{
	pcre2_match_data *md;
	size_t		bad;
	size_t		pos = 0;
	int			rc = KL_OK;
	bool		first_bytes[256] = {false};

	if (len == 0)
		return KL_OK;
	if (!text)
		return kl_errf(err, "no text to encode");
	if (!kl_utf8_valid(text, len, &bad))
		return kl_errf(err, "text is not valid UTF-8 (byte %zu of %zu): encode UTF-8 text", bad, len);
	md = pcre2_match_data_create_from_pattern(t->re, NULL);
	if (!md)
		return kl_errf(err, "out of memory");
	if (allow_special)
		for (int k = 0; k < t->n_specials; k++)
			first_bytes[(unsigned char) t->specials[k].text[0]] = true;
	while (pos < len && rc == KL_OK)
	{
		size_t		at = len;
		int			k = -1;

		if (allow_special)
		{
			/* jump to the next byte that can start a special */
			size_t		i = pos;

			while (i < len && !first_bytes[(unsigned char) text[i]])
				i++;
			if (i < len)
				k = find_special(t, text, len, i, &at);
			if (k < 0)
				at = len;
		}
		if (at > pos)
			rc = encode_ordinary(t, text + pos, at - pos, md, out, err);
		if (rc == KL_OK && k >= 0)
		{
			rc = kl_ids_push(out, t->specials[k].id, err);
			at += t->specials[k].len;
		}
		pos = at;
	}
	pcre2_match_data_free(md);
	return rc;
}

/* ------------------------------------------------------------------ decoding */

static int
id_bytes(const kl_tokenizer *t, int32_t id, size_t pos, const uint8_t **b, size_t *n, kl_err *err)
{
	if (id >= 0 && id < t->n_base)
	{
		*b = t->pool + t->off[id];
		*n = t->off[id + 1] - t->off[id];
		return KL_OK;
	}
	if (id >= t->n_base && id < t->n_vocab && t->special_text[id - t->n_base])
	{
		*b = (const uint8_t *) t->special_text[id - t->n_base];
		*n = strlen(t->special_text[id - t->n_base]);
		return KL_OK;
	}
	return kl_errf(err, "token id %d at position %zu is not in the vocabulary (0..%d)", id, pos, t->n_vocab - 1);
}

static int
buf_append(char **buf, size_t *len, size_t *cap, const void *p, size_t n, kl_err *err)
{
	if (*len + n + 1 > *cap)
	{
		size_t		c = *cap ? *cap : 64;
		char	   *nb;

		while (c < *len + n + 1)
			c *= 2;
		nb = realloc(*buf, c);
		if (!nb)
			return kl_errf(err, "out of memory");
		*buf = nb;
		*cap = c;
	}
	memcpy(*buf + *len, p, n);
	*len += n;
	(*buf)[*len] = 0;
	return KL_OK;
}

int
kl_decode(const kl_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len, kl_err *err)
{
	char	   *buf = NULL;
	size_t		l = 0,
				cap = 0;

	if (buf_append(&buf, &l, &cap, "", 0, err) != KL_OK)
		return KL_FAIL;
	for (size_t i = 0; i < n; i++)
	{
		const uint8_t *b = NULL;
		size_t		nb = 0;

		if (id_bytes(t, ids[i], i, &b, &nb, err) != KL_OK || buf_append(&buf, &l, &cap, b, nb, err) != KL_OK)
		{
			free(buf);
			return KL_FAIL;
		}
	}
	*text = buf;
	*len = l;
	return KL_OK;
}

void
kl_detok_stream_init(kl_detok_stream *s, const kl_tokenizer *tok)
{
	s->tok = tok;
	s->n_pending = 0;
}

/* Length of the UTF-8 sequence a lead byte starts (0: not a lead byte). */
static int
utf8_len(unsigned char c)
{
	return c < 0x80 ? 1 : (c >= 0xC2 && c <= 0xDF) ? 2 : (c >= 0xE0 && c <= 0xEF) ? 3 : (c >= 0xF0 && c <= 0xF4) ? 4 : 0;
}

static const char replacement[] = "\xEF\xBF\xBD";	/* U+FFFD */

/*
 * Move complete characters from (pending ++ bytes) to the output; keep an
 * incomplete tail in pending unless flushing.
 */
static int
stream_bytes(kl_detok_stream *s, const uint8_t *b, size_t n, bool flush, char **buf, size_t *len,
			 size_t *cap, kl_err *err)
{
	size_t		i = 0;
	unsigned char work[16];
	size_t		total;

	/* first complete the pending character with the new bytes */
	while (s->n_pending > 0)
	{
		int			need = utf8_len(s->pending[0]);

		while (s->n_pending < need && i < n)
			s->pending[s->n_pending++] = b[i++];
		if (s->n_pending < need && !flush)
			return KL_OK;
		memcpy(work, s->pending, (size_t) s->n_pending);
		total = (size_t) s->n_pending;
		s->n_pending = 0;
		if (kl_utf8_valid((const char *) work, total, NULL))
		{
			if (buf_append(buf, len, cap, work, total, err) != KL_OK)
				return KL_FAIL;
		}
		else
		{
			/* an invalid start: one replacement, rescan what follows it */
			if (buf_append(buf, len, cap, replacement, 3, err) != KL_OK)
				return KL_FAIL;
			if (total > 1)
				return stream_bytes(s, work + 1, total - 1, flush, buf, len, cap, err) == KL_OK ?
					stream_bytes(s, b + i, n - i, flush, buf, len, cap, err) : KL_FAIL;
		}
	}
	while (i < n)
	{
		int			need = utf8_len(b[i]);

		if (need == 0)
		{
			if (buf_append(buf, len, cap, replacement, 3, err) != KL_OK)
				return KL_FAIL;
			i++;
			continue;
		}
		if (i + (size_t) need > n)
		{
			/* incomplete at the end of this token: wait for more */
			while (i < n)
				s->pending[s->n_pending++] = b[i++];
			if (flush)
				return stream_bytes(s, NULL, 0, true, buf, len, cap, err);
			return KL_OK;
		}
		if (kl_utf8_valid((const char *) b + i, (size_t) need, NULL))
		{
			if (buf_append(buf, len, cap, b + i, (size_t) need, err) != KL_OK)
				return KL_FAIL;
			i += (size_t) need;
		}
		else
		{
			if (buf_append(buf, len, cap, replacement, 3, err) != KL_OK)
				return KL_FAIL;
			i++;
		}
	}
	return KL_OK;
}

int
kl_detok_stream_push(kl_detok_stream *s, int32_t id, char **buf, size_t *len, size_t *cap, kl_err *err)
{
	const uint8_t *b = NULL;
	size_t		n = 0;

	if (id_bytes(s->tok, id, 0, &b, &n, err) != KL_OK)
		return KL_FAIL;
	return stream_bytes(s, b, n, false, buf, len, cap, err);
}

int
kl_detok_stream_finish(kl_detok_stream *s, char **buf, size_t *len, size_t *cap, kl_err *err)
{
	if (*buf == NULL && buf_append(buf, len, cap, "", 0, err) != KL_OK)
		return KL_FAIL;
	return stream_bytes(s, NULL, 0, true, buf, len, cap, err);
}

int
kl_decode_text(const kl_tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len, kl_err *err)
{
	kl_detok_stream s;
	char	   *buf = NULL;
	size_t		l = 0,
				cap = 0;

	kl_detok_stream_init(&s, t);
	if (buf_append(&buf, &l, &cap, "", 0, err) != KL_OK)
		return KL_FAIL;
	for (size_t i = 0; i < n; i++)
		if (kl_detok_stream_push(&s, ids[i], &buf, &l, &cap, err) != KL_OK)
		{
			free(buf);
			return kl_err_prefix(err, "decoding token %zu", i);
		}
	if (kl_detok_stream_finish(&s, &buf, &l, &cap, err) != KL_OK)
	{
		free(buf);
		return KL_FAIL;
	}
	*text = buf;
	*len = l;
	return KL_OK;
}

/* ------------------------------------------------------------------ chat */

int
kl_chat_render(const kl_tokenizer *t, const kl_chat_message *msgs, size_t n, bool add_generation_prompt,
			   kl_ids *out, kl_err *err)
{
	int32_t		middle = kl_tokenizer_special_id(t, "<|im_middle|>");
	int32_t		end = kl_tokenizer_special_id(t, "<|im_end|>");

	if (middle < 0 || end < 0)
		return kl_errf(err, "this tokenizer has no <|im_middle|> / <|im_end|> tokens: it has no chat format");
	for (size_t i = 0; i <= n; i++)
	{
		const char *role;
		char		open[64];
		int32_t		open_id;

		if (i == n)
		{
			if (!add_generation_prompt)
				break;
			role = "assistant";
		}
		else
		{
			role = msgs[i].role;
			if (!role || (strcmp(role, "system") != 0 && strcmp(role, "user") != 0 && strcmp(role, "assistant") != 0))
				return kl_errf(err, "message %zu has role \"%s\": roles are system, user and assistant", i + 1,
							   role ? role : "(none)");
		}
		snprintf(open, sizeof(open), "<|im_%s|>", role);
		open_id = kl_tokenizer_special_id(t, open);
		if (open_id < 0)
			return kl_errf(err, "this tokenizer has no %s token", open);
		if (kl_ids_push(out, open_id, err) != KL_OK ||
			kl_encode(t, role, strlen(role), false, out, err) != KL_OK ||
			kl_ids_push(out, middle, err) != KL_OK)
			return KL_FAIL;
		if (i == n)
			break;
		if (msgs[i].content_len > 0 && kl_encode(t, msgs[i].content, msgs[i].content_len, false, out, err) != KL_OK)
			return kl_err_prefix(err, "message %zu", i + 1);
		if (kl_ids_push(out, end, err) != KL_OK)
			return KL_FAIL;
	}
	return KL_OK;
}
