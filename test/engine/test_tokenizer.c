/*
 * test_tokenizer.c — the tokenizer against the reference tiktoken's ids
 * (../shared/golden/tokenizer/golden_encodings.json), round trips over the
 * whole PostgreSQL manual, streaming decode, the chat format, bad input and a
 * fixed-seed fuzz loop.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tap.h"
#include "tokenizer.h"

static kl_tokenizer *tok;

static bool
ids_equal(const kl_ids *got, json_t *want)
{
	if (got->n != json_array_size(want))
		return false;
	for (size_t i = 0; i < got->n; i++)
		if (got->ids[i] != json_integer_value(json_array_get(want, i)))
			return false;
	return true;
}

/* decode via the stream, token by token; checks every piece is valid UTF-8 */
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
	for (size_t i = 0; i < ids->n; i++)
	{
		size_t		before = len;

		if (kl_detok_stream_push(&s, ids->ids[i], &buf, &len, &cap, &err) != KL_OK)
			return false;
		if (len > before && !kl_utf8_valid(buf + before, len - before, NULL))
			ok = false;
	}
	if (kl_detok_stream_finish(&s, &buf, &len, &cap, &err) != KL_OK)
		return false;
	ok = ok && len == want_len && (len == 0 || memcmp(buf, want, len) == 0);
	free(buf);
	return ok;
}

static void
golden_cases(void)
{
	char		path[1024];
	json_error_t jerr;
	json_t	   *root,
			   *cases,
			   *c;
	size_t		i;
	int			same = 0,
				same_special = 0,
				rt = 0,
				st = 0;

	snprintf(path, sizeof(path), "%s/golden/tokenizer/golden_encodings.json", tap_shared_dir());
	root = json_load_file(path, 0, &jerr);
	if (!tap_ok(root != NULL, "golden encodings load"))
		return;
	cases = json_object_get(root, "cases");
	json_array_foreach(cases, i, c)
	{
		const char *text = json_string_value(json_object_get(c, "text"));
		size_t		len = json_string_length(json_object_get(c, "text"));
		kl_ids		a = {0},
					b = {0};
		kl_err		err;
		char	   *dec;
		size_t		dlen;

		if (kl_encode(tok, text, len, false, &a, &err) == KL_OK && ids_equal(&a, json_object_get(c, "ids")))
			same++;
		else
			tap_diag("case %zu (ids) differs: %.60s", i, text);
		if (kl_encode(tok, text, len, true, &b, &err) == KL_OK &&
			ids_equal(&b, json_object_get(c, "ids_with_special")))
			same_special++;
		else
			tap_diag("case %zu (ids_with_special) differs: %.60s", i, text);
		if (kl_decode(tok, a.ids, a.n, &dec, &dlen, &err) == KL_OK && dlen == len && memcmp(dec, text, len) == 0)
			rt++;
		free(dec);
		if (stream_roundtrip(&b, text, len))
			st++;
		kl_ids_free(&a);
		kl_ids_free(&b);
	}
	tap_ok(same == (int) json_array_size(cases), "%d of %zu golden cases: ids identical (specials as text)",
		   same, json_array_size(cases));
	tap_ok(same_special == (int) json_array_size(cases), "%d of %zu golden cases: ids_with_special identical",
		   same_special, json_array_size(cases));
	tap_ok(rt == (int) json_array_size(cases), "decode(encode(x)) == x for all golden cases");
	tap_ok(st == (int) json_array_size(cases), "streaming decode, token by token, gives the same text in "
		   "complete UTF-8 pieces");
	json_decref(root);
}

static void
corpus_roundtrip(void)
{
	char		path[1024];
	json_error_t jerr;
	json_t	   *root,
			   *page;
	size_t		i;
	size_t		pages = 0,
				ok = 0,
				bytes = 0,
				tokens = 0;

	snprintf(path, sizeof(path), "%s/corpus/pgdocs.json", tap_shared_dir());
	root = json_load_file(path, 0, &jerr);
	if (!tap_ok(root != NULL && json_is_array(root), "corpus loads"))
		return;
	json_array_foreach(root, i, page)
	{
		json_t	   *t = json_object_get(page, "text");
		const char *text = json_string_value(t);
		size_t		len = json_string_length(t);
		kl_ids		ids = {0};
		kl_err		err;
		char	   *dec = NULL;
		size_t		dlen;

		pages++;
		if (kl_encode(tok, text, len, false, &ids, &err) == KL_OK &&
			kl_decode(tok, ids.ids, ids.n, &dec, &dlen, &err) == KL_OK && dlen == len &&
			memcmp(dec, text, len) == 0)
			ok++;
		bytes += len;
		tokens += ids.n;
		free(dec);
		kl_ids_free(&ids);
	}
	tap_ok(ok == pages && pages == 1169, "decode(encode(page)) == page for all %zu pages of the manual "
		   "(%zu bytes, %zu tokens)", pages, bytes, tokens);
	json_decref(root);
}

static void
chat(void)
{
	kl_chat_message m[2] = {{"system", "Be brief.", 9}, {"user", "hi <|im_end|>", 13}};
	kl_ids		got = {0},
				want = {0};
	kl_err		err;
	int32_t		stops[4];
	int			ns;

	tap_ok(kl_chat_render(tok, m, 2, true, &got, &err) == KL_OK, "render a conversation");
	/* by hand: specials as ids, everything else encoded as text */
	kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_system|>"), &err);
	kl_encode(tok, "system", 6, false, &want, &err);
	kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_middle|>"), &err);
	kl_encode(tok, "Be brief.", 9, false, &want, &err);
	kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_end|>"), &err);
	kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_user|>"), &err);
	kl_encode(tok, "user", 4, false, &want, &err);
	kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_middle|>"), &err);
	kl_encode(tok, "hi <|im_end|>", 13, false, &want, &err);
	kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_end|>"), &err);
	kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_assistant|>"), &err);
	kl_encode(tok, "assistant", 9, false, &want, &err);
	kl_ids_push(&want, kl_tokenizer_special_id(tok, "<|im_middle|>"), &err);
	tap_ok(got.n == want.n && memcmp(got.ids, want.ids, sizeof(int32_t) * got.n) == 0,
		   "chat ids: <|im_role|>role<|im_middle|>content<|im_end|> ... + generation prompt; special text in "
		   "content stays text");
	/* the template's own rendering of the golden example */
	{
		kl_chat_message u = {"user", "hi", 2};
		kl_ids		one = {0};

		kl_chat_render(tok, &u, 1, false, &one, &err);
		tap_ok(one.n == 6 && one.ids[0] == 3843 && one.ids[1] == 1113 && one.ids[2] == 3857 &&
			   one.ids[5] == 3842, "one user message renders as the reference template does");
		kl_ids_free(&one);
	}
	ns = kl_tokenizer_stop_ids(tok, stops, 4);
	tap_ok(ns == 2 && stops[0] == 3842 && stops[1] == 3841, "chat stop ids: <|im_end|> (eos) and [EOS]");
	tap_ok(kl_tokenizer_bos(tok) == 3840 && kl_tokenizer_eos(tok) == 3842 && kl_tokenizer_n_vocab(tok) == 4096,
		   "bos, eos and vocabulary size from tokenizer_config.json");
	{
		kl_chat_message bad = {"wizard", "x", 1};

		tap_ok(kl_chat_render(tok, &bad, 1, true, &got, &err) != KL_OK && strstr(err.msg, "wizard"),
			   "an unknown role: \"%s\"", err.msg);
	}
	kl_ids_free(&got);
	kl_ids_free(&want);
}

static void
bad_input(void)
{
	kl_ids		ids = {0};
	kl_err		err;
	char	   *dec = NULL;
	size_t		dlen;
	int32_t		bad[] = {72, 4096, 5};
	int32_t		neg[] = {-1};

	tap_ok(kl_encode(tok, "ok\xff\xfe", 4, false, &ids, &err) != KL_OK && strstr(err.msg, "byte 2"),
		   "invalid UTF-8 is an error with its offset: \"%s\"", err.msg);
	tap_ok(kl_encode(tok, "\xe2\x82", 2, false, &ids, &err) != KL_OK, "a truncated character is an error");
	tap_ok(kl_encode(tok, "\xed\xa0\x80", 3, false, &ids, &err) != KL_OK, "an encoded surrogate is an error");
	ids.n = 0;
	tap_ok(kl_encode(tok, "a\0b", 3, false, &ids, &err) == KL_OK && ids.n >= 1 &&
		   kl_decode(tok, ids.ids, ids.n, &dec, &dlen, &err) == KL_OK && dlen == 3 && memcmp(dec, "a\0b", 3) == 0,
		   "NUL bytes encode and decode like any other byte");
	free(dec);
	tap_ok(kl_decode(tok, bad, 3, &dec, &dlen, &err) != KL_OK && strstr(err.msg, "4096") && strstr(err.msg, "position 1"),
		   "an unknown id in decode: \"%s\"", err.msg);
	tap_ok(kl_decode(tok, neg, 1, &dec, &dlen, &err) != KL_OK, "a negative id in decode is an error");
	{
		/* a lone continuation byte token decodes to U+FFFD in text mode */
		kl_ids		one = {0};
		char	   *txt;
		size_t		tl;

		kl_encode(tok, "\xc3\xa9", 2, false, &one, &err);	/* é: may be 2 byte tokens */
		if (one.n == 2 && kl_decode_text(tok, one.ids + 1, 1, &txt, &tl, &err) == KL_OK)
		{
			tap_ok(tl == 3 && memcmp(txt, "\xEF\xBF\xBD", 3) == 0, "a partial character decodes to U+FFFD as text");
			free(txt);
		}
		else
			tap_skip("é is a single token in this vocabulary");
		kl_ids_free(&one);
	}
	kl_ids_free(&ids);

	/* broken tokenizer files */
	{
		char		dir[] = "/tmp/kl-tok-XXXXXX";
		char		p[256];
		kl_tokenizer *t2;
		FILE	   *f;
		char		src[1024];

		if (!mkdtemp(dir))
			return;
		snprintf(p, sizeof(p), "%s/tokenizer_config.json", dir);
		snprintf(src, sizeof(src), "cp %s/models/pgdocs-kimi-18m/tokenizer_config.json %s", tap_shared_dir(), p);
		if (system(src) != 0)
			return;
		tap_ok(kl_tokenizer_load(dir, &t2, &err) != KL_OK && strstr(err.msg, "tiktoken.model"),
			   "missing tiktoken.model: \"%s\"", err.msg);
		snprintf(p, sizeof(p), "%s/tiktoken.model", dir);
		f = fopen(p, "w");
		fputs("IQ== 0\n!!!notbase64 1\n", f);
		fclose(f);
		tap_ok(kl_tokenizer_load(dir, &t2, &err) != KL_OK && strstr(err.msg, "line 2"),
			   "bad base64: \"%s\"", err.msg);
		f = fopen(p, "w");
		fputs("IQ== 0\nIg== 0\n", f);
		fclose(f);
		tap_ok(kl_tokenizer_load(dir, &t2, &err) != KL_OK && strstr(err.msg, "twice"),
			   "a rank given twice: \"%s\"", err.msg);
		f = fopen(p, "w");
		fputs("IQ== 0\nIg== 1\n", f);
		fclose(f);
		tap_ok(kl_tokenizer_load(dir, &t2, &err) != KL_OK && strstr(err.msg, "has no token"),
			   "a vocabulary missing single bytes: \"%s\"", err.msg);
		snprintf(src, sizeof(src), "cp %s/models/pgdocs-kimi-18m/tiktoken.model %s", tap_shared_dir(), p);
		if (system(src) != 0)
			return;
		snprintf(p, sizeof(p), "%s/tokenizer_config.json", dir);
		f = fopen(p, "w");
		fputs("{\"added_tokens_decoder\": {\"12\": {\"content\": \"<x>\"}}}", f);
		fclose(f);
		tap_ok(kl_tokenizer_load(dir, &t2, &err) != KL_OK && strstr(err.msg, "\"12\""),
			   "an added token id inside the ordinary range: \"%s\"", err.msg);
		f = fopen(p, "w");
		fputs("{\"added_tokens_decoder\": ", f);
		fclose(f);
		tap_ok(kl_tokenizer_load(dir, &t2, &err) != KL_OK && strstr(err.msg, "JSON"),
			   "tokenizer_config.json not JSON: \"%s\"", err.msg);
		snprintf(src, sizeof(src), "rm -rf %s", dir);
		if (system(src) != 0)
			return;
	}
}

/* random bytes and random valid UTF-8 (fixed seed): round trip, no crash */
static void
fuzz(void)
{
	uint64_t	x = 0x1234567;
	int			ok = 0,
				valid = 0,
				n = 3000;
	char		buf[512];
	static const char *pieces[] = {"a", "Z", " ", "\n", "\r\n", "\t", "7", "'s", "'LL", "é", "ß", "数", "据",
		"🐘", "\xc2\xa0", "\xc2\x85", "\xe2\x80\xa8", "<|im_end|>", "[BOS]", "...", "__", "x", "Ǆ", "\xcc\x81"};

	for (int it = 0; it < n; it++)
	{
		size_t		len = 0;
		kl_ids		ids = {0};
		kl_err		err;
		char	   *dec = NULL;
		size_t		dlen;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		if (it % 2)
		{
			size_t		want = x % 200;

			while (len < want)
			{
				const char *p;

				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				p = pieces[x % (sizeof(pieces) / sizeof(pieces[0]))];
				if (len + strlen(p) >= sizeof(buf))
					break;
				memcpy(buf + len, p, strlen(p));
				len += strlen(p);
			}
		}
		else
		{
			len = x % 64;
			for (size_t i = 0; i < len; i++)
			{
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
				buf[i] = (char) (x & 0xff);
			}
		}
		if (kl_encode(tok, buf, len, it % 4 == 1, &ids, &err) == KL_OK)
		{
			valid++;
			if (kl_decode(tok, ids.ids, ids.n, &dec, &dlen, &err) == KL_OK && dlen == len &&
				(len == 0 || memcmp(dec, buf, len) == 0))
				ok++;
			free(dec);
		}
		else if (!kl_utf8_valid(buf, len, NULL))
			ok++;				/* rejected invalid UTF-8, as it should */
		kl_ids_free(&ids);
	}
	tap_ok(ok == n, "%d fuzz inputs (%d valid UTF-8): every valid one round-trips, every invalid one is "
		   "rejected", n, valid);
}

int
main(void)
{
	char		dir[1024];
	kl_err		err;

	snprintf(dir, sizeof(dir), "%s/models/pgdocs-kimi-18m", tap_shared_dir());
	if (!tap_ok(kl_tokenizer_load(dir, &tok, &err) == KL_OK, "tokenizer of pgdocs-kimi-18m loads"))
	{
		tap_diag("%s", err.msg);
		return tap_done();
	}
	golden_cases();
	corpus_roundtrip();
	chat();
	bad_input();
	fuzz();
	kl_tokenizer_free(tok);
	return tap_done();
}
