/*
 * tokenizer_split.c — the pre-tokenizer: cutting text into the pieces that
 * byte-pair merging then works on.
 *
 * The definition is the reference's pattern (docs/model.md), matched
 * repeatedly from the start of the text.  Two implementations:
 *
 *  - PCRE2 (JIT), running the pattern translated to PCRE2 syntax.  The
 *    translation has three traps:
 *      * PCRE2 has no class intersection.  [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]
 *        is written as the complement of the other general categories plus
 *        Han: [^\p{Ll}\p{N}\p{P}\p{S}\p{Z}\p{C}\p{sc:Han}] (general
 *        categories partition the code points, so this is the same set).
 *        The obvious (?:(?!\p{Han})[...]) is the same set too, but a group
 *        that PCRE2 must backtrack into costs JIT stack per repetition: a
 *        word of a few thousand letters failed with "JIT stack limit".  A
 *        plain class repeats in constant stack.
 *      * \p{Han} in PCRE2 10.40 and later is Script_Extensions, which adds
 *        288 characters such as 、。「」 (Common, used by Han).  The
 *        reference (Rust regex / Python regex) means Script: \p{sc:Han}.
 *      * PCRE2's \s (with UCP) is not Unicode White_Space, which the
 *        reference uses: it adds U+180E.  \s is spelled out as White_Space.
 *    Matching uses raised match limits (a 20 MB run of capital letters
 *    backtracks 20M steps, beyond PCRE2's default of 10M).
 *
 *  - A scanner written for this pattern, which kl_encode uses: linear on any
 *    input, and faster (the whole encoder goes from about 45 to 75 MB/s on
 *    the manual, bench/results/tokenizer.md).  Its character classes
 *    are not a second copy of Unicode: they are computed at load time by
 *    matching each class of the pattern, with PCRE2, over every code point, so
 *    both implementations share PCRE2's Unicode tables.  What it adds is the
 *    control flow of the eight alternatives with their backtracking, derived
 *    below; the tests compare the two on the whole manual and on random text.
 */
#include "tokenizer_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* \s of the reference: Unicode White_Space */
#define WS "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
#define HAN "\\p{sc:Han}"
/* [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]] and [\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]] */
#define UPPER "[^\\p{Ll}\\p{N}\\p{P}\\p{S}\\p{Z}\\p{C}" HAN "]"
#define LOWER "[^\\p{Lu}\\p{Lt}\\p{N}\\p{P}\\p{S}\\p{Z}\\p{C}" HAN "]"
#define CONTRACTIONS "(?i:'s|'t|'re|'ve|'m|'ll|'d)?"

static const char split_pattern[] =
	HAN "+"
	"|[^\\r\\n\\p{L}\\p{N}]?" UPPER "*" LOWER "+" CONTRACTIONS
	"|[^\\r\\n\\p{L}\\p{N}]?" UPPER "+" LOWER "*" CONTRACTIONS
	"|\\p{N}{1,3}"
	"| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*"
	"|[" WS "]*[\\r\\n]+"
	"|[" WS "]+(?![^" WS "])"
	"|[" WS "]+";

/* The classes the scanner needs, each exactly as the pattern spells it. */
static const struct
{
	uint8_t		bit;
	const char *pattern;
}			class_patterns[] =
{
	{KL_CC_HAN, HAN "+"},
	{KL_CC_UPPER, UPPER "+"},
	{KL_CC_LOWER, LOWER "+"},
	{KL_CC_LETTER, "\\p{L}+"},
	{KL_CC_NUMBER, "\\p{N}+"},
	{KL_CC_SPACE, "[" WS "]+"},
	{KL_CC_NEWLINE, "[\\r\\n]+"},
};

#define N_CODE_POINTS 0x110000
#define N_BLOCKS (N_CODE_POINTS >> 8)

static pcre2_code *
compile(const char *pattern, kl_err *err)
{
	int			ec;
	PCRE2_SIZE	eo;
	pcre2_code *re = pcre2_compile((PCRE2_SPTR) pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &ec, &eo,
								   NULL);

	if (!re)
	{
		PCRE2_UCHAR msg[256];

		pcre2_get_error_message(ec, msg, sizeof(msg));
		kl_errc(err, KL_E_UNSUPPORTED,
				"the pre-tokenizer pattern does not compile with this PCRE2 (%d.%d; 10.40 or later is "
				"needed for \\p{sc:...}) at offset %zu: %s", PCRE2_MAJOR, PCRE2_MINOR, (size_t) eo, msg);
		return NULL;
	}
	/* JIT where the platform has it; the interpreter gives the same matches */
	(void) pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
	return re;
}

static size_t
put_utf8(uint32_t cp, uint8_t *out)
{
	if (cp < 0x80)
	{
		out[0] = (uint8_t) cp;
		return 1;
	}
	if (cp < 0x800)
	{
		out[0] = (uint8_t) (0xC0 | (cp >> 6));
		out[1] = (uint8_t) (0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000)
	{
		out[0] = (uint8_t) (0xE0 | (cp >> 12));
		out[1] = (uint8_t) (0x80 | ((cp >> 6) & 0x3F));
		out[2] = (uint8_t) (0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (uint8_t) (0xF0 | (cp >> 18));
	out[1] = (uint8_t) (0x80 | ((cp >> 12) & 0x3F));
	out[2] = (uint8_t) (0x80 | ((cp >> 6) & 0x3F));
	out[3] = (uint8_t) (0x80 | (cp & 0x3F));
	return 4;
}

/* The code point at s (valid UTF-8) and its length. */
static inline uint32_t
get_utf8(const uint8_t *s, size_t *n)
{
	uint8_t		c = s[0];

	if (c < 0x80)
	{
		*n = 1;
		return c;
	}
	if (c < 0xE0)
	{
		*n = 2;
		return ((uint32_t) (c & 0x1F) << 6) | (s[1] & 0x3F);
	}
	if (c < 0xF0)
	{
		*n = 3;
		return ((uint32_t) (c & 0x0F) << 12) | ((uint32_t) (s[1] & 0x3F) << 6) | (s[2] & 0x3F);
	}
	*n = 4;
	return ((uint32_t) (c & 0x07) << 18) | ((uint32_t) (s[1] & 0x3F) << 12) | ((uint32_t) (s[2] & 0x3F) << 6) |
		(s[3] & 0x3F);
}

static inline uint64_t
hash_block(const uint8_t *b)
{
	uint64_t	h = 0x84222325cbf29ce4ull;

	for (int i = 0; i < 256; i += 8)
	{
		uint64_t	w;

		memcpy(&w, b + i, 8);
		h = (h ^ w) * 0x100000001b3ull;
		h ^= h >> 29;
	}
	return h;
}

/* Set bit in flat[] for every code point in the matches of pattern over text. */
static int
mark_matches(const kl_tokenizer *t, const char *pattern, const uint8_t *text, size_t len, uint8_t *flat,
			 uint8_t bit, pcre2_match_data *md, kl_err *err)
{
	pcre2_code *re = compile(pattern, err);
	PCRE2_SIZE	pos = 0;

	if (!re)
		return KL_FAIL;
	while (pos < len)
	{
		int			m = pcre2_match(re, text, len, pos, PCRE2_NO_UTF_CHECK, md, t->match_ctx);
		PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);

		if (m == PCRE2_ERROR_NOMATCH)
			break;
		if (m < 0 || ov[1] <= ov[0])
		{
			PCRE2_UCHAR msg[256];

			pcre2_get_error_message(m, msg, sizeof(msg));
			pcre2_code_free(re);
			return kl_errc(err, KL_E_INTERNAL,
						   "classifying characters with PCRE2 failed: %s", m < 0 ? (char *) msg : "empty match");
		}
		for (size_t i = ov[0]; i < ov[1];)
		{
			size_t		n;
			uint32_t	cp = get_utf8(text + i, &n);

			flat[cp] |= bit;
			i += n;
		}
		pos = ov[1];
	}
	pcre2_code_free(re);
	return KL_OK;
}

/* UTF-8 of every code point of the blocks marked in want (surrogates left out). */
static size_t
blocks_text(const uint8_t *want, uint8_t *out)
{
	size_t		len = 0;

	for (uint32_t b = 0; b < N_BLOCKS; b++)
		if (want[b])
			for (uint32_t cp = b << 8; cp < ((b + 1) << 8); cp++)
				if (cp < 0xD800 || cp > 0xDFFF)
					len += put_utf8(cp, out + len);
	return len;
}

/*
 * Classify every code point by matching each class pattern, with PCRE2, over
 * a text of code points, and store the result as deduplicated blocks of 256
 * code points.  To save time, one pattern (the union of the classes) first
 * finds the blocks where any class has a member; the others then run over
 * those blocks only (about a quarter of the code space: the rest is
 * unassigned or private use).
 */
static int
build_class_table(kl_tokenizer *t, kl_err *err)
{
	uint8_t    *text = NULL,
			   *flat = NULL,
			   *want = NULL;
	size_t		len;
	pcre2_match_data *md = NULL;
	uint16_t	slots[8192];	/* block hash -> unique block index + 1 */
	int			n_unique = 0;
	int			rc = KL_FAIL;

	text = kl_malloc((size_t) N_CODE_POINTS * 4, err);
	flat = kl_calloc(N_CODE_POINTS, 1, err);
	want = kl_malloc(N_BLOCKS, err);
	if (!text || !flat || !want)
		goto out;
	md = pcre2_match_data_create(1, NULL);
	if (!md)
	{
		kl_errc(err, KL_E_RESOURCES, "out of memory");
		goto out;
	}
	memset(want, 1, N_BLOCKS);
	len = blocks_text(want, text);
	if (mark_matches(t, "[\\p{L}\\p{N}\\p{M}" HAN WS "]+", text, len, flat, 0x80, md, err) != KL_OK)
		goto out;
	for (uint32_t b = 0; b < N_BLOCKS; b++)
	{
		want[b] = 0;
		for (int i = 0; i < 256; i++)
			want[b] |= flat[(b << 8) | i];
	}
	memset(flat, 0, N_CODE_POINTS);
	len = blocks_text(want, text);
	for (size_t k = 0; k < sizeof(class_patterns) / sizeof(class_patterns[0]); k++)
		if (mark_matches(t, class_patterns[k].pattern, text, len, flat, class_patterns[k].bit, md, err) != KL_OK)
			goto out;

	memcpy(t->ascii_class, flat, 128);
	t->class_block = kl_malloc(N_BLOCKS * sizeof(uint16_t), err);
	t->class_bits = kl_malloc((size_t) N_BLOCKS * 256, err);	/* shrunk below */
	if (!t->class_block || !t->class_bits)
		goto out;
	memset(slots, 0, sizeof(slots));
	for (int b = 0; b < N_BLOCKS; b++)
	{
		const uint8_t *blk = flat + (size_t) b * 256;
		uint32_t	i;

		for (i = (uint32_t) hash_block(blk) & 8191;; i = (i + 1) & 8191)
		{
			if (slots[i] == 0)
			{
				memcpy(t->class_bits + (size_t) n_unique * 256, blk, 256);
				slots[i] = (uint16_t) ++n_unique;
				t->class_block[b] = (uint16_t) (n_unique - 1);
				break;
			}
			if (memcmp(t->class_bits + (size_t) (slots[i] - 1) * 256, blk, 256) == 0)
			{
				t->class_block[b] = (uint16_t) (slots[i] - 1);
				break;
			}
		}
	}
	{
		uint8_t    *shrunk = realloc(t->class_bits, (size_t) n_unique * 256);

		if (shrunk)
			t->class_bits = shrunk;
	}
	rc = KL_OK;
out:
	pcre2_match_data_free(md);
	free(text);
	free(flat);
	free(want);
	return rc;
}

int
kl_tok_split_init(kl_tokenizer *t, kl_err *err)
{
	t->match_ctx = pcre2_match_context_create(NULL);
	if (!t->match_ctx)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	/*
	 * The pattern backtracks at most a few steps per character, so the
	 * defaults (10M steps, 20 MB of heap for the interpreter) only bite on
	 * texts of many megabytes; lift them rather than fail such texts.
	 */
	pcre2_set_match_limit(t->match_ctx, UINT32_MAX);
	pcre2_set_depth_limit(t->match_ctx, UINT32_MAX);
	pcre2_set_heap_limit(t->match_ctx, UINT32_MAX);
	t->re = compile(split_pattern, err);
	if (!t->re)
		return KL_FAIL;
	return build_class_table(t, err);
}

void
kl_tok_split_free(kl_tokenizer *t)
{
	if (t->re)
		pcre2_code_free(t->re);
	if (t->match_ctx)
		pcre2_match_context_free(t->match_ctx);
	free(t->class_block);
	free(t->class_bits);
}

/* ------------------------------------------------------------------ PCRE2 */

int
kl_tok_pcre2_piece(const kl_tokenizer *t, const uint8_t *s, size_t len, size_t pos, pcre2_match_data *md,
				   size_t *end, kl_err *err)
{
	int			rc = pcre2_match(t->re, s, len, pos, PCRE2_NO_UTF_CHECK, md, t->match_ctx);
	PCRE2_SIZE *ov;

	if (rc == PCRE2_ERROR_NOMATCH)
	{
		/* cannot happen (every character starts a match); keep the bytes rather than drop them */
		*end = len;
		return KL_OK;
	}
	if (rc < 0)
	{
		PCRE2_UCHAR msg[256];

		pcre2_get_error_message(rc, msg, sizeof(msg));
		return kl_errc(err, rc == PCRE2_ERROR_NOMEMORY ? KL_E_RESOURCES : KL_E_INTERNAL,
					   "the pre-tokenizer (PCRE2) failed at byte %zu: %s", pos, msg);
	}
	ov = pcre2_get_ovector_pointer(md);
	/* likewise a match starting later, or an empty one: never lose bytes, never loop */
	if (ov[0] > pos)
		*end = ov[0];
	else if (ov[1] > pos)
		*end = ov[1];
	else
	{
		size_t		n;

		(void) get_utf8(s + pos, &n);
		*end = pos + n;
	}
	return KL_OK;
}

/* ------------------------------------------------------------------ the scanner */

/* Class bits of the character at s[i] (valid UTF-8); *next: the index after it. */
static inline unsigned
class_at(const kl_tokenizer *t, const uint8_t *s, size_t i, size_t *next)
{
	size_t		n;
	uint32_t	cp;

	if (s[i] < 0x80)
	{
		*next = i + 1;
		return t->ascii_class[s[i]];
	}
	cp = get_utf8(s + i, &n);
	*next = i + n;
	return t->class_bits[((size_t) t->class_block[cp >> 8] << 8) | (cp & 0xFF)];
}

/* The end of the longest run of characters with any of the bits in mask, from i. */
static inline size_t
run_of(const kl_tokenizer *t, const uint8_t *s, size_t len, size_t i, unsigned mask)
{
	while (i < len)
	{
		size_t		next;

		if (!(class_at(t, s, i, &next) & mask))
			break;
		i = next;
	}
	return i;
}

/* Characters that match neither \s, \p{L} nor \p{N}: [^\s\p{L}\p{N}]. */
static inline bool
is_symbol(unsigned c)
{
	return !(c & (KL_CC_SPACE | KL_CC_LETTER | KL_CC_NUMBER));
}

/* (?i:'s|'t|'re|'ve|'m|'ll|'d)? at e: the end after it. */
static inline size_t
contraction(const uint8_t *s, size_t len, size_t e)
{
	if (e + 1 >= len || s[e] != '\'')
		return e;
	/* case-insensitively, only ASCII letters and U+017F (long s, which folds to s) qualify */
	switch (s[e + 1] | 0x20)
	{
		case 's':
		case 't':
		case 'm':
		case 'd':
			return e + 2;
		case 'r':
		case 'v':
			return (e + 2 < len && (s[e + 2] | 0x20) == 'e') ? e + 3 : e;
		case 'l':
			return (e + 2 < len && (s[e + 2] | 0x20) == 'l') ? e + 3 : e;
		default:
			break;
	}
	if (s[e + 1] == 0xC5 && e + 2 < len && s[e + 2] == 0xBF)
		return e + 3;
	return e;
}

/*
 * UPPER* LOWER+ from i (both greedy, as the regex backtracks): the end, or 0
 * for no match.  UPPER* first takes the longest run; LOWER+ then needs a
 * LOWER character right after, so UPPER* gives back characters until one
 * is.  If the character after the run is LOWER, LOWER+ takes its run.
 * Otherwise the run gives back to its last LOWER character (UPPER and LOWER
 * share Lm, Lo and M), and LOWER+ is that one character: the characters
 * after it in the run are not LOWER, nor is the one after the run.
 */
static size_t
upper_star_lower_plus(const kl_tokenizer *t, const uint8_t *s, size_t len, size_t i)
{
	size_t		last_lower_end = 0;

	while (i < len)
	{
		size_t		next;
		unsigned	c = class_at(t, s, i, &next);

		if (!(c & KL_CC_UPPER))
		{
			if (c & KL_CC_LOWER)
				return run_of(t, s, len, next, KL_CC_LOWER);
			break;
		}
		if (c & KL_CC_LOWER)
			last_lower_end = next;
		i = next;
	}
	return last_lower_end;
}

/* UPPER+ LOWER*: the end, or 0.  Nothing to give back: LOWER* may be empty. */
static size_t
upper_plus_lower_star(const kl_tokenizer *t, const uint8_t *s, size_t len, size_t i)
{
	size_t		e = run_of(t, s, len, i, KL_CC_UPPER);

	return e == i ? 0 : run_of(t, s, len, e, KL_CC_LOWER);
}

size_t
kl_tok_scan_piece(const kl_tokenizer *t, const uint8_t *s, size_t len, size_t pos)
{
	size_t		after_first,
				e;
	unsigned	first = class_at(t, s, pos, &after_first);
	bool		can_prefix;

	/* 1. [\p{Han}]+ */
	if (first & KL_CC_HAN)
		return run_of(t, s, len, after_first, KL_CC_HAN);

	/*
	 * 2. [^\r\n\p{L}\p{N}]? UPPER* LOWER+ contraction?
	 * 3. [^\r\n\p{L}\p{N}]? UPPER+ LOWER* contraction?
	 * Each tries with the optional prefix character first, then without.
	 */
	can_prefix = !(first & (KL_CC_NEWLINE | KL_CC_LETTER | KL_CC_NUMBER)) && after_first < len;
	if (can_prefix && (e = upper_star_lower_plus(t, s, len, after_first)) != 0)
		return contraction(s, len, e);
	if ((first & (KL_CC_UPPER | KL_CC_LOWER)) && (e = upper_star_lower_plus(t, s, len, pos)) != 0)
		return contraction(s, len, e);
	if (can_prefix && (e = upper_plus_lower_star(t, s, len, after_first)) != 0)
		return contraction(s, len, e);
	if ((first & KL_CC_UPPER) && (e = upper_plus_lower_star(t, s, len, pos)) != 0)
		return contraction(s, len, e);

	/* 4. \p{N}{1,3} */
	if (first & KL_CC_NUMBER)
	{
		e = after_first;
		for (int k = 0; k < 2 && e < len; k++)
		{
			size_t		next;

			if (!(class_at(t, s, e, &next) & KL_CC_NUMBER))
				break;
			e = next;
		}
		return e;
	}

	/* 5. " ?[^\s\p{L}\p{N}]+[\r\n]*" */
	{
		size_t		start = SIZE_MAX;

		if (s[pos] == ' ' && after_first < len)
		{
			size_t		next;

			if (is_symbol(class_at(t, s, after_first, &next)))
				start = after_first;
		}
		if (start == SIZE_MAX && is_symbol(first))
			start = pos;
		if (start != SIZE_MAX)
		{
			e = start;
			while (e < len)
			{
				size_t		next;

				if (!is_symbol(class_at(t, s, e, &next)))
					break;
				e = next;
			}
			while (e < len && (s[e] == '\r' || s[e] == '\n'))
				e++;
			return e;
		}
	}

	/*
	 * 6. \s*[\r\n]+   7. \s+(?!\S)   8. \s+
	 * With the run of white space from pos: if it holds a line break, 6
	 * matches up to the last one (\s* gives back to it; [\r\n]+ cannot go
	 * further, the next character being no line break).  Otherwise 7 takes
	 * the whole run at the end of the text, else all but its last character
	 * (followed by a space, so not by \S) when that leaves one; else 8.
	 */
	if (first & KL_CC_SPACE)
	{
		size_t		i = pos,
					last_break_end = 0,
					last_start = pos;

		while (i < len)
		{
			size_t		next;
			unsigned	c = class_at(t, s, i, &next);

			if (!(c & KL_CC_SPACE))
				break;
			if (c & KL_CC_NEWLINE)
				last_break_end = next;
			last_start = i;
			i = next;
		}
		if (last_break_end)
			return last_break_end;
		if (i == len)
			return len;
		if (last_start > pos)
			return last_start;
		return i;
	}

	/* every character is a letter, number, space or symbol: not reached */
	return after_first;
}
