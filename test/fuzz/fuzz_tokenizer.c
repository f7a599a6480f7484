/*
 * libFuzzer harness: the tokenizer on arbitrary bytes.
 *
 * The input is used three ways: as text to encode (with and without special
 * tokens, through the scanner and through PCRE2), which must either be
 * rejected as invalid UTF-8 or give the same ids both ways and decode back to
 * the same bytes; and as a list of token ids (two bytes each) for the
 * streaming decoder, whose output must always be valid UTF-8.
 *
 * The model directory is $KL_TOKENIZER_MODEL, else models/pgdocs-kimi-18m
 * (run from the repository root).  Any violation aborts, which libFuzzer
 * reports with the input.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kl_tokenizer *tok;

static void
check(bool ok, const char *what)
{
	if (!ok)
	{
		fprintf(stderr, "fuzz_tokenizer: %s\n", what);
		abort();
	}
}

static void
encode_both_ways(const char *text, size_t len, bool special)
{
	kl_ids		a = {0},
				b = {0};
	kl_err		err;
	int			ra = kl_encode(tok, text, len, special, &a, &err);
	int			rb = kl_encode_with(tok, text, len, special, KL_SPLIT_PCRE2, &b, &err);

	check(ra == rb, "scanner and PCRE2 disagree on whether the text encodes");
	check(ra == KL_OK || !kl_utf8_valid(text, len, NULL), "valid UTF-8 was rejected");
	if (ra == KL_OK)
	{
		char	   *dec = NULL;
		size_t		dlen;

		check(a.n == b.n && (a.n == 0 || memcmp(a.ids, b.ids, a.n * sizeof(int32_t)) == 0),
			  "scanner and PCRE2 give different ids");
		check(kl_decode(tok, a.ids, a.n, &dec, &dlen, &err) == KL_OK && dlen == len &&
			  (len == 0 || memcmp(dec, text, len) == 0), "decode(encode(x)) != x");
		free(dec);
	}
	kl_ids_free(&a);
	kl_ids_free(&b);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kl_err		err;
	kl_detok_stream s;
	char	   *buf = NULL;
	size_t		len = 0,
				cap = 0;

	if (!tok)
	{
		const char *dir = getenv("KL_TOKENIZER_MODEL");

		if (kl_tokenizer_load(dir ? dir : "models/pgdocs-kimi-18m", &tok, &err) != KL_OK)
		{
			fprintf(stderr, "fuzz_tokenizer: %s\n", err.msg);
			abort();
		}
	}
	encode_both_ways((const char *) data, size, false);
	encode_both_ways((const char *) data, size, true);

	/* the bytes as ids for the streaming decoder */
	kl_detok_stream_init(&s, tok);
	for (size_t i = 0; i + 1 < size; i += 2)
	{
		int32_t		id = (int32_t) ((data[i] | (data[i + 1] << 8)) % (kl_tokenizer_n_vocab(tok) + 8));
		size_t		before = len;

		if (kl_detok_stream_push(&s, id, &buf, &len, &cap, &err) == KL_OK)
			check(kl_utf8_valid(buf + before, len - before, NULL), "the stream gave invalid UTF-8");
		else
			check(id >= kl_tokenizer_n_vocab(tok), "a valid id was rejected by the stream");
	}
	if (kl_detok_stream_finish(&s, &buf, &len, &cap, &err) == KL_OK)
		check(kl_utf8_valid(buf, len, NULL), "the stream's text is invalid UTF-8");
	free(buf);
	return 0;
}
