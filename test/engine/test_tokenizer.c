/*
 * test_tokenizer.c — the tokenizer against the reference tiktoken's ids
 * (golden/tokenizer/golden_encodings.json), the scanner against PCRE2 running
 * the pattern (whole manual, every code point, random text), round trips over
 * the whole PostgreSQL manual, streaming decode, the chat format against the
 * model's chat_template, concurrent use, bad input and broken tokenizer
 * files, and a fixed-seed fuzz loop.
 */
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tap.h"
#include "tokenizer.h"

static kl_tokenizer *tok;
static char model_dir[1024];

/* ------------------------------------------------------------------ helpers */

static bool
ids_equal_json(const kl_ids *got, json_t *want)
{
	if (got->n != json_array_size(want))
		return false;
	for (size_t i = 0; i < got->n; i++)
		if (got->ids[i] != json_integer_value(json_array_get(want, i)))
			return false;
	return true;
}

static bool
ids_equal(const kl_ids *a, const kl_ids *b)
{
	return a->n == b->n && (a->n == 0 || memcmp(a->ids, b->ids, a->n * sizeof(int32_t)) == 0);
}

static bool
roundtrip(const char *text, size_t len, const kl_ids *ids)
{
	char	   *dec = NULL;
	size_t		dlen;
	kl_err		err;
	bool		ok = kl_decode(tok, ids->ids, ids->n, &dec, &dlen, &err) == KL_OK && dlen == len &&
		(len == 0 || memcmp(dec, text, len) == 0);

	free(dec);
	return ok;
}

/* Both splitters give the same pieces of text. */
static bool
same_pieces(const char *text, size_t len)
{
	size_t	   *a = NULL,
			   *b = NULL,
				na = 0,
				nb = 0,
				ca = 0,
				cb = 0;
	kl_err		err;
	bool		ok = kl_split(tok, text, len, KL_SPLIT_SCANNER, &a, &na, &ca, &err) == KL_OK &&
		kl_split(tok, text, len, KL_SPLIT_PCRE2, &b, &nb, &cb, &err) == KL_OK &&
		na == nb && (na == 0 || memcmp(a, b, na * sizeof(size_t)) == 0);

	if (!ok && na == nb)
		for (size_t i = 0; i < na; i++)
			if (a[i] != b[i])
			{
				tap_diag("pieces differ: scanner ends a piece at %zu, PCRE2 at %zu (piece from \"%.20s\")", a[i],
						 b[i], text + (i ? a[i - 1] : 0));
				break;
			}
	free(a);
	free(b);
	return ok;
}

/* decode via the stream, token by token; every piece it gives must be valid UTF-8 */
static bool
stream_roundtrip(const kl_ids *ids, const char *want, size_t want_len)
{
	kl_detok_stream s;
	char	   *buf = NULL;
	size_t		len = 0,
				cap = 0;
	kl_err		err;
	bool		ok = true;

	kl_detok_stream_init(&s, tok);
	for (size_t i = 0; i < ids->n && ok; i++)
	{
		size_t		before = len;

		if (kl_detok_stream_push(&s, ids->ids[i], &buf, &len, &cap, &err) != KL_OK)
			ok = false;
		else if (len > before && !kl_utf8_valid(buf + before, len - before, NULL))
			ok = false;
	}
	if (ok && kl_detok_stream_finish(&s, &buf, &len, &cap, &err) != KL_OK)
		ok = false;
	ok = ok && len == want_len && (len == 0 || memcmp(buf, want, len) == 0);
	free(buf);
	return ok;
}

static char *
slurp(const char *path, size_t *len)
{
	FILE	   *f = fopen(path, "rb");
	char	   *b;
	long		n;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	b = malloc((size_t) n + 1);
	if (b && fread(b, 1, (size_t) n, f) != (size_t) n)
	{
		free(b);
		b = NULL;
	}
	fclose(f);
	if (b)
	{
		b[n] = 0;
		*len = (size_t) n;
	}
	return b;
}

static void
spit(const char *dir, const char *name, const char *data, size_t len)
{
	char		path[1200];
	FILE	   *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "wb");
	if (f)
	{
		fwrite(data, 1, len, f);
		fclose(f);
	}
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t
next_random(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static size_t
put_utf8(uint32_t cp, char *out)
{
	if (cp < 0x80)
		return (size_t) (out[0] = (char) cp, 1);
	if (cp < 0x800)
	{
		out[0] = (char) (0xC0 | (cp >> 6));
		out[1] = (char) (0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000)
	{
		out[0] = (char) (0xE0 | (cp >> 12));
		out[1] = (char) (0x80 | ((cp >> 6) & 0x3F));
		out[2] = (char) (0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (char) (0xF0 | (cp >> 18));
	out[1] = (char) (0x80 | ((cp >> 12) & 0x3F));
	out[2] = (char) (0x80 | ((cp >> 6) & 0x3F));
	out[3] = (char) (0x80 | (cp & 0x3F));
	return 4;
}

/* ------------------------------------------------------------------ golden encodings */

static void
golden_cases(void)
{
	char		path[1200];
	json_error_t jerr;
	json_t	   *root,
			   *cases,
			   *c;
	size_t		i,
				n;
	int			same = 0,
				same_special = 0,
				same_pcre2 = 0,
				rt = 0,
				st = 0;

	snprintf(path, sizeof(path), "%s/golden/tokenizer/golden_encodings.json", tap_fixture_dir());
	root = json_load_file(path, 0, &jerr);
	if (!tap_ok(root != NULL, "golden encodings load (%s)", root ? path : jerr.text))
		return;
	cases = json_object_get(root, "cases");
	n = json_array_size(cases);
	tap_ok(json_integer_value(json_object_get(root, "n_base")) == kl_tokenizer_n_base(tok),
		   "the golden vocabulary has as many ordinary tokens as tiktoken.model (%d)", kl_tokenizer_n_base(tok));
	json_array_foreach(cases, i, c)
	{
		const char *text = json_string_value(json_object_get(c, "text"));
		size_t		len = json_string_length(json_object_get(c, "text"));
		kl_ids		a = {0},
					b = {0},
					pa = {0},
					pb = {0};
		kl_err		err;

		if (kl_encode(tok, text, len, false, &a, &err) == KL_OK && ids_equal_json(&a, json_object_get(c, "ids")))
			same++;
		else
			tap_diag("case %zu (ids) differs: %.60s", i, text);
		if (kl_encode(tok, text, len, true, &b, &err) == KL_OK &&
			ids_equal_json(&b, json_object_get(c, "ids_with_special")))
			same_special++;
		else
			tap_diag("case %zu (ids_with_special) differs: %.60s", i, text);
		if (kl_encode_with(tok, text, len, false, KL_SPLIT_PCRE2, &pa, &err) == KL_OK &&
			kl_encode_with(tok, text, len, true, KL_SPLIT_PCRE2, &pb, &err) == KL_OK &&
			ids_equal(&pa, &a) && ids_equal(&pb, &b))
			same_pcre2++;
		if (roundtrip(text, len, &a) && roundtrip(text, len, &b))
			rt++;
		if (stream_roundtrip(&a, text, len) && stream_roundtrip(&b, text, len))
			st++;
		kl_ids_free(&a);
		kl_ids_free(&b);
		kl_ids_free(&pa);
		kl_ids_free(&pb);
	}
	tap_ok(n >= 29 && same == (int) n, "%d of %zu golden cases: ids identical (specials as text)", same, n);
	tap_ok(same_special == (int) n, "%d of %zu golden cases: ids_with_special identical", same_special, n);
	tap_ok(same_pcre2 == (int) n, "%d of %zu golden cases: the PCRE2 splitter gives the same ids", same_pcre2, n);
	tap_ok(rt == (int) n, "decode(encode(x)) == x for all golden cases, with and without specials");
	tap_ok(st == (int) n, "streaming decode of every golden case, token by token, gives the same bytes in "
		   "complete UTF-8 pieces");
	json_decref(root);
}

/* ------------------------------------------------------------------ the manual */

static json_t *corpus;

static void
corpus_roundtrip(void)
{
	char		path[1200];
	json_error_t jerr;
	json_t	   *page;
	size_t		i,
				pages = 0,
				ok = 0,
				same_split = 0,
				same_ids = 0,
				bytes = 0,
				tokens = 0;

	snprintf(path, sizeof(path), "%s/corpus/pgdocs.json", tap_fixture_dir());
	corpus = json_load_file(path, 0, &jerr);
	if (!tap_ok(corpus != NULL && json_is_array(corpus), "corpus loads (%s)", corpus ? path : jerr.text))
		return;
	json_array_foreach(corpus, i, page)
	{
		json_t	   *t = json_object_get(page, "text");
		const char *text = json_string_value(t);
		size_t		len = json_string_length(t);
		kl_ids		ids = {0},
					ids_pcre2 = {0};
		kl_err		err;

		pages++;
		if (kl_encode(tok, text, len, false, &ids, &err) == KL_OK && roundtrip(text, len, &ids))
			ok++;
		if (same_pieces(text, len))
			same_split++;
		if (i % 4 == 0)
		{
			/* ids through PCRE2 too, on a quarter of the pages (the pieces are compared on all) */
			if (kl_encode_with(tok, text, len, false, KL_SPLIT_PCRE2, &ids_pcre2, &err) == KL_OK &&
				ids_equal(&ids, &ids_pcre2))
				same_ids++;
		}
		else
			same_ids++;
		bytes += len;
		tokens += ids.n;
		kl_ids_free(&ids);
		kl_ids_free(&ids_pcre2);
	}
	tap_ok(ok == pages && pages == 1169, "decode(encode(page)) == page for all %zu pages of the manual "
		   "(%zu bytes, %zu tokens)", pages, bytes, tokens);
	tap_ok(same_split == pages, "scanner and PCRE2 cut all %zu pages into the same pieces", pages);
	tap_ok(same_ids == pages, "scanner and PCRE2 give the same ids on the pages compared");
}

/*
 * Every code point (surrogates aside) in a few contexts, scanner against
 * PCRE2: checks the scanner's class table and decoding everywhere.
 */
static void
every_code_point(void)
{
	enum
	{
		CHUNK = 4096
	};
	char	   *buf = malloc(CHUNK * 40);
	bool		ok = true;
	uint32_t	bad_at = 0;

	for (uint32_t start = 0; start < 0x110000 && ok; start += CHUNK)
	{
		size_t		len = 0;

		for (uint32_t cp = start; cp < start + CHUNK; cp++)
		{
			if (cp >= 0xD800 && cp <= 0xDFFF)
				continue;
			/* c, then after a letter, doubled before an apostrophe, after a space and a digit, before a newline */
			len += put_utf8(cp, buf + len);
			buf[len++] = 'x';
			len += put_utf8(cp, buf + len);
			len += put_utf8(cp, buf + len);
			buf[len++] = '\'';
			buf[len++] = 's';
			buf[len++] = ' ';
			len += put_utf8(cp, buf + len);
			buf[len++] = '7';
			len += put_utf8(cp, buf + len);
			buf[len++] = '\n';
		}
		if (!same_pieces(buf, len))
		{
			ok = false;
			bad_at = start;
		}
	}
	tap_ok(ok, "scanner and PCRE2 agree on every code point in context%s", ok ? "" : " (see above)");
	if (!ok)
		tap_diag("first disagreement in the block from U+%04X", bad_at);
	free(buf);
}

/* ------------------------------------------------------------------ specific pre-tokenizer behaviour */

static int32_t
token_of(const char *text)
{
	kl_ids		ids = {0};
	kl_err		err;
	int32_t		id = -1;

	if (kl_encode(tok, text, strlen(text), false, &ids, &err) == KL_OK && ids.n == 1)
		id = ids.ids[0];
	kl_ids_free(&ids);
	return id;
}

/* pieces of text, as "|"-separated string, from the scanner (checked against PCRE2) */
static bool
pieces_are(const char *text, const char *want)
{
	size_t	   *ends = NULL,
				n = 0,
				cap = 0,
				at = 0,
				prev = 0;
	kl_err		err;
	char		got[512];

	if (kl_split(tok, text, strlen(text), KL_SPLIT_SCANNER, &ends, &n, &cap, &err) != KL_OK)
		return false;
	for (size_t i = 0; i < n && at + (ends[i] - prev) + 2 < sizeof(got); i++)
	{
		if (i)
			got[at++] = '|';
		memcpy(got + at, text + prev, ends[i] - prev);
		at += ends[i] - prev;
		prev = ends[i];
	}
	got[at] = 0;
	free(ends);
	if (strcmp(got, want) != 0)
		tap_diag("pieces of \"%s\": got \"%s\", want \"%s\"", text, got, want);
	return strcmp(got, want) == 0 && same_pieces(text, strlen(text));
}

static void
pretokenizer_cases(void)
{
	/* expectations from the reference pattern (Python regex with the original && classes) */
	tap_ok(pieces_are("你好。世界、ok", "你好|。|世界|、ok"),
		   "\\p{Han} is the Han script: 。 and 、 (Common, Han by Script_Extensions) are not Han");
	tap_ok(pieces_are("a\xc2\x85\xc2\x85x", "a|\xc2\x85|\xc2\x85x"),
		   "U+0085 is white space (\\s is Unicode White_Space), as U+00A0 and U+2028 are");
	tap_ok(pieces_are("a\xe1\xa0\x8e\xe1\xa0\x8ex", "a|\xe1\xa0\x8e\xe1\xa0\x8e|x"),
		   "U+180E is not white space (PCRE2's own \\s would say it is)");
	tap_ok(pieces_are("don't I'LL it\xc5\xbf they're", "don't| I'LL| it\xc5\xbf| they're"),
		   "contractions are case-insensitive; 'ſ (long s) counts as 's");
	tap_ok(pieces_are("a'\xc5\xbf", "a'\xc5\xbf"), "'ſ after a word");
	tap_ok(pieces_are("12345 6", "123|45| |6"), "numbers in runs of at most three");
	tap_ok(pieces_are("x  \n\n  y   ", "x|  \n\n| | y|   "), "white space: line breaks, before a word, at the end");
	tap_ok(pieces_are("CamelCase HTTPServer", "Camel|Case| HTTPServer"), "capitalised words and upper-case runs");
	tap_ok(pieces_are(" !?\r\n\r\nx", " !?\r\n\r\n|x"), "punctuation takes the line breaks after it");
	tap_ok(pieces_are("\xcc\x81\xcc\x81" "a", "\xcc\x81\xcc\x81" "a"),
		   "combining marks count as letters (and as the optional prefix)");
}

/* Long runs: linear time, no PCRE2 stack or match limits (these used to fail). */
static void
long_pieces(void)
{
	static const char *units[] = {"a", "A", "\xc3\xa9", " ", "\n", "1", "\xe4\xb8\xad", "aA", "\xea\xb0\x80\x41", "!"};
	bool		ok = true;
	size_t		total = 200000;

	for (size_t u = 0; u < sizeof(units) / sizeof(units[0]); u++)
	{
		size_t		ul = strlen(units[u]);
		size_t		len = 0;
		char	   *buf = malloc(total + 8);
		kl_ids		a = {0},
					b = {0};
		kl_err		err;

		while (len + ul <= total)
		{
			memcpy(buf + len, units[u], ul);
			len += ul;
		}
		buf[len++] = 'x';
		if (kl_encode(tok, buf, len, false, &a, &err) != KL_OK ||
			kl_encode_with(tok, buf, len, false, KL_SPLIT_PCRE2, &b, &err) != KL_OK ||
			!ids_equal(&a, &b) || !roundtrip(buf, len, &a))
		{
			tap_diag("a run of 200 kB of \"%s\": %s", units[u], err.msg);
			ok = false;
		}
		kl_ids_free(&a);
		kl_ids_free(&b);
		free(buf);
	}
	tap_ok(ok, "runs of 200 kB (letters, capitals, é, spaces, newlines, digits, 中, mixed): both splitters, "
		   "same ids, round trip");
}

/* ------------------------------------------------------------------ streaming */

static void
streaming(void)
{
	kl_detok_stream s;
	char	   *buf = NULL;
	size_t		len = 0,
				cap = 0;
	kl_err		err;
	int32_t		e4,
				b8,
				ad;
	bool		ok;
	int32_t		ff;

	/* every byte has a token of its own: feed 中 (E4 B8 AD) one byte at a time */
	{
		char	   *t;
		size_t		tl;
		int32_t		found[3] = {-1, -1, -1};
		const uint8_t want[3] = {0xE4, 0xB8, 0xAD};

		for (int32_t id = 0; id < kl_tokenizer_n_base(tok); id++)
		{
			if (kl_decode(tok, &id, 1, &t, &tl, &err) == KL_OK && tl == 1)
				for (int k = 0; k < 3; k++)
					if ((uint8_t) t[0] == want[k])
						found[k] = id;
			free(t);
		}
		e4 = found[0];
		b8 = found[1];
		ad = found[2];
	}
	kl_detok_stream_init(&s, tok);
	ok = kl_detok_stream_push(&s, e4, &buf, &len, &cap, &err) == KL_OK && len == 0;
	ok = ok && kl_detok_stream_push(&s, b8, &buf, &len, &cap, &err) == KL_OK && len == 0;
	ok = ok && kl_detok_stream_push(&s, ad, &buf, &len, &cap, &err) == KL_OK && len == 3 &&
		memcmp(buf, "\xe4\xb8\xad", 3) == 0;
	tap_ok(ok, "a character split over three tokens is held back until complete");

	/* an incomplete character at the end becomes U+FFFD on finish */
	len = 0;
	ok = kl_detok_stream_push(&s, e4, &buf, &len, &cap, &err) == KL_OK && len == 0 &&
		kl_detok_stream_finish(&s, &buf, &len, &cap, &err) == KL_OK && len == 3 &&
		memcmp(buf, "\xEF\xBF\xBD", 3) == 0;
	tap_ok(ok, "finish flushes an unfinished character as U+FFFD");

	/* a lead byte followed by a non-continuation: U+FFFD, then the byte itself */
	len = 0;
	kl_detok_stream_init(&s, tok);
	ok = kl_detok_stream_push(&s, e4, &buf, &len, &cap, &err) == KL_OK &&
		kl_detok_stream_push(&s, token_of("A"), &buf, &len, &cap, &err) == KL_OK &&
		kl_detok_stream_finish(&s, &buf, &len, &cap, &err) == KL_OK &&
		len == 4 && memcmp(buf, "\xEF\xBF\xBD" "A", 4) == 0;
	tap_ok(ok, "an interrupted character becomes U+FFFD and what follows is kept");

	/* a byte that can never be in UTF-8 */
	{
		char	   *t;
		size_t		tl;

		ff = -1;
		for (int32_t id = 0; id < kl_tokenizer_n_base(tok) && ff < 0; id++)
		{
			if (kl_decode(tok, &id, 1, &t, &tl, &err) == KL_OK && tl == 1 && (uint8_t) t[0] == 0xFF)
				ff = id;
			free(t);
		}
	}
	len = 0;
	kl_detok_stream_init(&s, tok);
	ok = kl_detok_stream_push(&s, ff, &buf, &len, &cap, &err) == KL_OK && len == 3 &&
		memcmp(buf, "\xEF\xBF\xBD", 3) == 0 && buf[len] == 0;
	tap_ok(ok, "byte 0xFF decodes to U+FFFD at once (and the buffer stays NUL-terminated)");
	ok = kl_detok_stream_push(&s, kl_tokenizer_n_vocab(tok), &buf, &len, &cap, &err) != KL_OK &&
		strstr(err.msg, "position 1") != NULL;
	tap_ok(ok, "an unknown id in the stream is an error naming its position: \"%s\"", err.msg);
	free(buf);

	{
		int32_t		ids[] = {e4, b8};
		char	   *t;
		size_t		tl;

		ok = kl_decode_text(tok, ids, 2, &t, &tl, &err) == KL_OK && tl == 3 && memcmp(t, "\xEF\xBF\xBD", 3) == 0;
		free(t);
		tap_ok(ok, "kl_decode_text: a truncated character becomes one U+FFFD");
	}
}

/* ------------------------------------------------------------------ chat */

static void
chat(void)
{
	/* expected ids: the model's chat_template rendered by jinja2, then tokenized by the reference */
	static const int32_t want_ids[] = {
		3850, 3696, 3857, 56, 426, 366, 258, 2684, 1078, 965, 395, 672, 326, 346, 471, 260, 488, 13, 3842, 3843, 1113,
		3857, 54, 71, 263, 816, 2270, 544, 30, 3842, 3844, 584, 395, 672, 3857, 40, 83, 298, 490, 64, 446, 82, 1930,
		1511, 66, 354, 1106, 388, 2975, 1863, 13, 3842, 3843, 1113, 3857, 32, 3139, 2397, 30, 220, 162, 243, 108, 162,
		235, 106, 161, 118, 241, 220, 172, 253, 238, 246, 3842, 3844, 584, 395, 672, 3857};
	kl_chat_message m[4] = {
		{"system", "You are a helpful assistant for PostgreSQL.", 0},
		{"user", "What does VACUUM do?", 0},
		{"assistant", "It reclaims storage occupied by dead tuples.", 0},
		{"user", "And ANALYZE? \xe6\x95\xb0\xe6\x8d\xae\xe5\xba\x93 \xf0\x9f\x90\x98", 0}};
	kl_ids		got = {0},
				want = {0},
				via_text = {0};
	kl_err		err;
	int32_t		stops[4];
	int			ns;
	char		rendered[1024];
	size_t		rl = 0;

	for (int i = 0; i < 4; i++)
		m[i].content_len = strlen(m[i].content);
	tap_ok(kl_chat_render(tok, m, 4, true, &got, &err) == KL_OK, "render a conversation");
	tap_ok(got.n == sizeof(want_ids) / sizeof(want_ids[0]) &&
		   memcmp(got.ids, want_ids, sizeof(want_ids)) == 0,
		   "it equals the model's chat_template rendered (jinja2) and tokenized by the reference (%zu ids)", got.n);

	/* the same, rendered here as text the template's way and encoded with specials */
	for (int i = 0; i < 4; i++)
		rl += (size_t) snprintf(rendered + rl, sizeof(rendered) - rl, "<|im_%s|>%s<|im_middle|>%s<|im_end|>",
								m[i].role, m[i].role, m[i].content);
	rl += (size_t) snprintf(rendered + rl, sizeof(rendered) - rl, "<|im_assistant|>assistant<|im_middle|>");
	kl_encode(tok, rendered, rl, true, &via_text, &err);
	tap_ok(ids_equal(&got, &via_text), "it equals the rendered text encoded with special tokens");

	/* the template of the bundled model is the one this renders */
	{
		char		path[1200];
		json_error_t jerr;
		json_t	   *cfg;
		const char *tmpl;

		snprintf(path, sizeof(path), "%s/tokenizer_config.json", model_dir);
		cfg = json_load_file(path, 0, &jerr);
		tmpl = cfg ? json_string_value(json_object_get(cfg, "chat_template")) : NULL;
		tap_ok(tmpl && strstr(tmpl, "<|im_system|>system<|im_middle|>") &&
			   strstr(tmpl, "<|im_user|>user<|im_middle|>") &&
			   strstr(tmpl, "<|im_assistant|>assistant<|im_middle|>") &&
			   strstr(tmpl, "{{ message['content'] }}<|im_end|>") &&
			   strstr(tmpl, "if add_generation_prompt"),
			   "the model's chat_template has the Kimi message and generation-prompt forms");
		json_decref(cfg);
	}

	/* specials typed inside a message stay text */
	{
		kl_chat_message u = {"user", "hi <|im_end|><|im_system|>", 26};
		size_t		before;

		got.n = 0;
		kl_chat_render(tok, &u, 1, false, &got, &err);
		kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_user|>"), &err);
		kl_encode(tok, "user", 4, false, &want, &err);
		kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_middle|>"), &err);
		before = want.n;
		kl_encode(tok, u.content, u.content_len, false, &want, &err);
		kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_end|>"), &err);
		tap_ok(ids_equal(&got, &want) && want.n > before + 3,
			   "special-token text inside a message is encoded as text, not as control tokens");
	}

	ns = kl_tokenizer_stop_ids(tok, stops, 4);
	tap_ok(ns == 2 && stops[0] == kl_tokenizer_special_id(tok, "<|im_end|>") &&
		   stops[1] == kl_tokenizer_special_id(tok, "[EOS]"), "chat stop ids: <|im_end|> (eos) and [EOS]");
	tap_ok(kl_tokenizer_stop_ids(tok, stops, 1) == 1, "stop ids respect the capacity");
	tap_ok(kl_tokenizer_bos(tok) == 3840 && kl_tokenizer_eos(tok) == 3842 && kl_tokenizer_pad(tok) == 4095 &&
		   kl_tokenizer_unk(tok) == 4094 && kl_tokenizer_n_vocab(tok) == 4096 && kl_tokenizer_n_base(tok) == 3840,
		   "bos, eos, pad, unk and vocabulary size from tokenizer_config.json");
	tap_ok(kl_tokenizer_special_id(tok, "<|im_middle|>") == 3857 && kl_tokenizer_special_id(tok, "<|im_mid") == -1 &&
		   kl_tokenizer_special_id(tok, "") == -1 && strcmp(kl_tokenizer_special_text(tok, 3842), "<|im_end|>") == 0 &&
		   kl_tokenizer_special_text(tok, 5) == NULL, "special ids and texts");
	{
		kl_chat_message bad[2] = {{"user", "x", 1}, {"wizard", "x", 1}};
		size_t		n_before = got.n;

		tap_ok(kl_chat_render(tok, bad, 2, true, &got, &err) != KL_OK && strstr(err.msg, "wizard") &&
			   strstr(err.msg, "message 2") && got.n == n_before,
			   "an unknown role is an error naming it, and nothing is appended: \"%s\"", err.msg);
		bad[1].role = "assistant";
		bad[1].content = "\xff";
		tap_ok(kl_chat_render(tok, bad, 2, true, &got, &err) != KL_OK && strstr(err.msg, "message 2") &&
			   strstr(err.msg, "UTF-8") && got.n == n_before, "invalid UTF-8 in a message: \"%s\"", err.msg);
	}
	kl_ids_free(&got);
	kl_ids_free(&want);
	kl_ids_free(&via_text);
}

/* ------------------------------------------------------------------ threads */

typedef struct thread_job
{
	int			first;
	int			step;
	kl_ids	   *want;
	int			mismatches;
} thread_job;

static void *
encode_pages(void *arg)
{
	thread_job *job = arg;

	for (int rep = 0; rep < 2; rep++)
		for (size_t i = (size_t) job->first; i < json_array_size(corpus); i += (size_t) job->step)
		{
			json_t	   *t = json_object_get(json_array_get(corpus, i), "text");
			kl_ids		ids = {0};
			kl_err		err;

			if (kl_encode_with(tok, json_string_value(t), json_string_length(t), rep == 1,
							   (i % 2) ? KL_SPLIT_PCRE2 : KL_SPLIT_SCANNER, &ids, &err) != KL_OK ||
				(rep == 0 && !ids_equal(&ids, &job->want[i])))
				job->mismatches++;
			kl_ids_free(&ids);
		}
	return NULL;
}

static void
threads(void)
{
	enum
	{
		N_THREADS = 4
	};
	pthread_t	th[N_THREADS];
	thread_job	jobs[N_THREADS];
	size_t		n_pages = corpus ? json_array_size(corpus) : 0;
	kl_ids	   *want = calloc(n_pages + 1, sizeof(kl_ids));
	int			bad = 0;
	kl_err		err;

	if (!corpus)
	{
		tap_skip("no corpus");
		free(want);
		return;
	}
	/* a third of the pages, encoded once here, then by four threads at once */
	for (size_t i = 0; i < n_pages; i += 3)
	{
		json_t	   *t = json_object_get(json_array_get(corpus, i), "text");

		kl_encode(tok, json_string_value(t), json_string_length(t), false, &want[i], &err);
	}
	for (int k = 0; k < N_THREADS; k++)
	{
		jobs[k] = (thread_job) {0, 3, want, 0};
		pthread_create(&th[k], NULL, encode_pages, &jobs[k]);
	}
	for (int k = 0; k < N_THREADS; k++)
	{
		pthread_join(th[k], NULL);
		bad += jobs[k].mismatches;
	}
	tap_ok(bad == 0, "4 threads sharing one tokenizer get the same ids as one thread (%d mismatches)", bad);
	for (size_t i = 0; i < n_pages; i++)
		kl_ids_free(&want[i]);
	free(want);
}

/* ------------------------------------------------------------------ bad input */

static void
bad_input(void)
{
	kl_ids		ids = {0};
	kl_err		err;
	char	   *dec = NULL;
	size_t		dlen;
	int32_t		bad[] = {72, 4096, 5};
	int32_t		neg[] = {-1};

	kl_ids_push(&ids, 7, &err);
	tap_ok(kl_encode(tok, "ok\xff\xfe", 4, false, &ids, &err) != KL_OK && strstr(err.msg, "byte 2") && ids.n == 1,
		   "invalid UTF-8 is an error with its offset, nothing appended: \"%s\"", err.msg);
	tap_ok(kl_encode(tok, "abc\xe2\x82", 5, false, &ids, &err) != KL_OK && strstr(err.msg, "byte 3"),
		   "a truncated character is an error");
	tap_ok(kl_encode(tok, "\xed\xa0\x80", 3, false, &ids, &err) != KL_OK, "an encoded surrogate is an error");
	tap_ok(kl_encode(tok, "\xc0\x80", 2, false, &ids, &err) != KL_OK, "an overlong NUL is an error");
	tap_ok(kl_encode(tok, "\xf4\x90\x80\x80", 4, false, &ids, &err) != KL_OK, "a code point above U+10FFFF is an error");
	tap_ok(kl_encode(tok, NULL, 0, false, &ids, &err) == KL_OK && ids.n == 1, "empty text gives no ids");
	ids.n = 0;
	tap_ok(kl_encode(tok, "a\0b\0", 4, false, &ids, &err) == KL_OK && ids.n >= 1 && roundtrip("a\0b\0", 4, &ids),
		   "NUL bytes encode and decode like any other byte");
	tap_ok(kl_decode(tok, bad, 3, &dec, &dlen, &err) != KL_OK && strstr(err.msg, "4096") &&
		   strstr(err.msg, "position 1"), "an unknown id in decode: \"%s\"", err.msg);
	tap_ok(kl_decode(tok, neg, 1, &dec, &dlen, &err) != KL_OK && strstr(err.msg, "-1"),
		   "a negative id in decode is an error");
	tap_ok(kl_decode(tok, NULL, 0, &dec, &dlen, &err) == KL_OK && dlen == 0 && dec && dec[0] == 0,
		   "decoding no ids gives an empty string");
	free(dec);
	{
		bool		all = true;

		for (int32_t id = 0; id < kl_tokenizer_n_vocab(tok) && all; id++)
		{
			all = kl_decode(tok, &id, 1, &dec, &dlen, &err) == KL_OK && dlen > 0;
			free(dec);
		}
		tap_ok(all, "every id below n_vocab decodes");
	}
	kl_ids_free(&ids);
}

/* A copy of the model's tokenizer files with one of them replaced. */
static bool
load_with(const char *dir, const char *file, const char *content, kl_err *err)
{
	kl_tokenizer *t = NULL;
	char		path[1200];
	size_t		len;
	char	   *orig;
	int			rc;

	snprintf(path, sizeof(path), "%s/tiktoken.model", model_dir);
	orig = slurp(path, &len);
	spit(dir, "tiktoken.model", orig, orig ? len : 0);
	free(orig);
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", model_dir);
	orig = slurp(path, &len);
	spit(dir, "tokenizer_config.json", orig, orig ? len : 0);
	free(orig);
	if (file)
	{
		snprintf(path, sizeof(path), "%s/%s", dir, file);
		if (content)
			spit(dir, file, content, strlen(content));
		else
			unlink(path);
	}
	rc = kl_tokenizer_load(dir, &t, err);
	kl_tokenizer_free(t);
	return rc == KL_OK;
}

static void
broken_files(void)
{
	char		dir[] = "/tmp/kl-tok-XXXXXX";
	kl_err		err;
	char		path[1200];
	size_t		len;
	char	   *vocab;
	static const struct
	{
		const char *file;
		const char *content;
		const char *must_say;
		const char *what;
	}			cases[] =
	{
		{"tiktoken.model", NULL, "tiktoken.model", "missing tiktoken.model"},
		{"tokenizer_config.json", NULL, "tokenizer_config.json", "missing tokenizer_config.json"},
		{"tiktoken.model", "", "no tokens", "empty tiktoken.model"},
		{"tiktoken.model", "IQ== 0\n!!!! 1\n", "line 2", "bad base64"},
		{"tiktoken.model", "IQ== 0\nIQ 1\n", "multiple of 4", "base64 without its padding"},
		{"tiktoken.model", "IQ== 0\nI=Q= 1\n", "line 2", "padding in the middle"},
		{"tiktoken.model", "IQ== 0\nIg== 0\n", "already given on line 1", "a rank given twice"},
		{"tiktoken.model", "IQ== 0\nIg== 7\n", "out of range", "a rank beyond the number of tokens"},
		{"tiktoken.model", "IQ== 0\nIg== 2\nIw== 3\n", "rank 1 is missing", "a gap in the ranks"},
		{"tiktoken.model", "IQ== 0\nIg== -1\n", "line 2", "a negative rank"},
		{"tiktoken.model", "IQ== 0\nIg==\n", "line 2", "a line without a rank"},
		{"tiktoken.model", "IQ== 0\nIQ== 1\n", "same bytes", "two ranks with the same bytes"},
		{"tiktoken.model", "IQ== 0\nIg== 1\n", "byte 0x00", "a vocabulary missing single bytes"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": ", "line 1", "truncated JSON"},
		{"tokenizer_config.json", "{\n\"a\": 1,\n\"a\": 2}", "line 3", "a duplicate key"},
		{"tokenizer_config.json", "[1, 2]", "object", "JSON that is not an object"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": [1]}", "added_tokens_decoder", "added_tokens_decoder not an object"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": {\"12\": {\"content\": \"<x>\"}}}", "from 3840", "an added id among the ordinary tokens"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": {\"x1\": {\"content\": \"<x>\"}}}", "must be a number", "an added id that is not a number"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": {\"3840\": {\"special\": true}}}", "content", "an added token without content"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": {\"3840\": {\"content\": \"<a>\"}, \"3841\": {\"content\": \"<a>\"}}}", "same text", "two added tokens with one text"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": {\"3840\": {\"content\": \"<a>\", \"special\": 1}}}", "special", "a non-boolean special flag"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": {\"3840\": {\"content\": \"<a>\"}}, \"eos_token\": \"<b>\"}", "eos_token", "an eos_token that is not an added token"},
		{"tokenizer_config.json", "{\"added_tokens_decoder\": {\"3840\": {\"content\": \"<a>\"}}, \"bos_token\": 5}", "bos_token", "a bos_token that is not text"},
	};

	if (!mkdtemp(dir))
	{
		tap_skip("cannot make a temporary directory");
		return;
	}
	tap_ok(load_with(dir, NULL, NULL, &err), "an intact copy loads");
	for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++)
	{
		bool		failed = !load_with(dir, cases[k].file, cases[k].content, &err);

		tap_ok(failed && strstr(err.msg, cases[k].must_say) && strstr(err.msg, cases[k].file),
			   "%s: \"%s\"", cases[k].what, failed ? err.msg : "(loaded)");
	}

	/* a file cut short at random points, and random bytes in it: errors, never crashes */
	snprintf(path, sizeof(path), "%s/tiktoken.model", model_dir);
	vocab = slurp(path, &len);
	if (vocab)
	{
		int			loaded = 0,
					failed_with_name = 0,
					n = 60;

		for (int i = 0; i < n; i++)
		{
			char	   *copy = malloc(len + 1);
			size_t		cut = (size_t) (next_random() % len);

			memcpy(copy, vocab, len);
			copy[len] = 0;
			if (i % 2)
				copy[cut] = (char) (next_random() & 0xff);
			else
				copy[cut] = 0;	/* strlen cuts it here */
			if (load_with(dir, "tiktoken.model", copy, &err))
				loaded++;
			else if (strstr(err.msg, "tiktoken.model"))
				failed_with_name++;
			free(copy);
		}
		tap_ok(loaded + failed_with_name == n, "%d damaged copies of tiktoken.model: %d loaded, %d failed with an "
			   "error naming the file", n, loaded, failed_with_name);
		free(vocab);
	}

	/* ids the config leaves out become <|reserved_token_ID|> */
	{
		kl_tokenizer *t = NULL;
		const char *cfg = "{\"added_tokens_decoder\": {\"3840\": {\"content\": \"<a>\", \"special\": true}, "
			"\"3843\": {\"content\": \"<d>\", \"special\": false}}, \"eos_token\": {\"content\": \"<d>\"}}";
		kl_ids		ids = {0};

		load_with(dir, "tokenizer_config.json", cfg, &err);
		tap_ok(kl_tokenizer_load(dir, &t, &err) == KL_OK && kl_tokenizer_n_vocab(t) == 3844 &&
			   kl_tokenizer_special_id(t, "<|reserved_token_3841|>") == 3841 && kl_tokenizer_eos(t) == 3843 &&
			   kl_tokenizer_bos(t) == -1 && kl_tokenizer_special_id(t, "<d>") == 3843 &&
			   kl_encode(t, "x<|reserved_token_3842|><d>", 27, true, &ids, &err) == KL_OK && ids.n == 3 &&
			   ids.ids[1] == 3842 && ids.ids[2] == 3843,
			   "ids missing from added_tokens_decoder decode as <|reserved_token_ID|>; an AddedToken-style eos_token");
		kl_ids_free(&ids);
		kl_tokenizer_free(t);
	}
	{
		char		cmd[1200];

		snprintf(cmd, sizeof(cmd), "%s/tiktoken.model", dir);
		unlink(cmd);
		snprintf(cmd, sizeof(cmd), "%s/tokenizer_config.json", dir);
		unlink(cmd);
		rmdir(dir);
	}
}

/* ------------------------------------------------------------------ fuzz */

/* random bytes and random valid UTF-8 (fixed seed): round trip, both splitters agree, no crash */
static void
fuzz(void)
{
	int			ok = 0,
				valid = 0,
				n = 4000;
	char		buf[1024];
	static const char *pieces[] = {"a", "Z", " ", "  ", "\n", "\r\n", "\r", "\t", "\x0b", "7", "123", "'s", "'LL",
		"'Re", "'", "\xc5\xbf", "\xc3\xa9", "\xc3\x9f", "\xe6\x95\xb0", "\xe6\x8d\xae", "\xe3\x80\x82", "\xe3\x80\x81",
		"\xf0\x9f\x90\x98", "\xc2\xa0", "\xc2\x85", "\xe2\x80\xa8", "\xe1\xa0\x8e", "\xe3\x80\x80", "<|im_end|>",
		"<|im_", "[BOS]", "[EOS]", "...", "__", "x", "\xc7\x85", "\xcc\x81", "\xca\xb0", "\xea\xb0\x80", "\xd9\xa3",
		"\xc2\xbd", "\x00", "$", "-", "(", "\xef\xbc\xa1", "\xe0\xb8\x81\xe0\xb8\xb3", "\xf3\xa0\x84\x80"};

	for (int it = 0; it < n; it++)
	{
		size_t		len = 0;
		kl_ids		ids = {0},
					ids2 = {0};
		kl_err		err;
		bool		special = (it % 4) == 1;

		if (it % 3 == 0)
		{
			/* random bytes: mostly invalid */
			len = next_random() % 64;
			for (size_t i = 0; i < len; i++)
				buf[i] = (char) (next_random() & 0xff);
		}
		else if (it % 3 == 1)
		{
			/* random code points */
			size_t		want = next_random() % 60;

			for (size_t k = 0; k < want; k++)
			{
				uint32_t	cp;

				do
					cp = (uint32_t) (next_random() % ((next_random() & 1) ? 0x800 : 0x110000));
				while (cp >= 0xD800 && cp <= 0xDFFF);
				len += put_utf8(cp, buf + len);
			}
		}
		else
		{
			/* tricky pieces */
			size_t		want = next_random() % 300;

			while (len < want)
			{
				const char *p = pieces[next_random() % (sizeof(pieces) / sizeof(pieces[0]))];
				size_t		pl = p[0] ? strlen(p) : 1;

				if (len + pl >= sizeof(buf))
					break;
				memcpy(buf + len, p, pl);
				len += pl;
			}
		}
		if (kl_encode(tok, buf, len, special, &ids, &err) == KL_OK)
		{
			valid++;
			if (roundtrip(buf, len, &ids) &&
				kl_encode_with(tok, buf, len, special, KL_SPLIT_PCRE2, &ids2, &err) == KL_OK &&
				ids_equal(&ids, &ids2) && stream_roundtrip(&ids, buf, len))
				ok++;
			else
				tap_diag("fuzz input %d (%zu bytes) fails", it, len);
		}
		else if (!kl_utf8_valid(buf, len, NULL) && strstr(err.msg, "UTF-8"))
			ok++;				/* rejected invalid UTF-8, as it should */
		else
			tap_diag("fuzz input %d: unexpected error %s", it, err.msg);
		kl_ids_free(&ids);
		kl_ids_free(&ids2);
	}
	tap_ok(ok == n, "%d fuzz inputs (%d valid UTF-8): every valid one round-trips (also streaming) with the same "
		   "ids from both splitters, every invalid one is rejected", n, valid);
}

int
main(void)
{
	kl_err		err;
	double		t0;

	snprintf(model_dir, sizeof(model_dir), "%s/pgdocs-kimi-18m", tap_models_dir());
	t0 = kl_now();
	if (!tap_ok(kl_tokenizer_load(model_dir, &tok, &err) == KL_OK, "tokenizer of pgdocs-kimi-18m loads"))
	{
		tap_diag("%s", err.msg);
		return tap_done();
	}
	tap_diag("loaded in %.1f ms", (kl_now() - t0) * 1e3);
	golden_cases();
	pretokenizer_cases();
	corpus_roundtrip();
	every_code_point();
	long_pieces();
	streaming();
	chat();
	threads();
	bad_input();
	broken_files();
	fuzz();
	json_decref(corpus);
	kl_tokenizer_free(tok);
	return tap_done();
}
