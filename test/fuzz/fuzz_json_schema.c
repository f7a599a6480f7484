/*
 * libFuzzer harness: the JSON schema compiler and the constraint automaton.
 *
 * The input is a schema (JSON text), a NUL byte, then bytes to feed.  The
 * schema is compiled as a json_schema spec and as a tool's parameters
 * (odd first byte); when it compiles, the automaton runs over a small
 * vocabulary (the 256 bytes and some multi-byte tokens) and the fed bytes,
 * checking at every step the two promises the worker relies on:
 *   - some token is always allowed (no dead end), and
 *   - the mask says exactly which tokens the automaton takes.
 * Any violation aborts, which libFuzzer reports with the input.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json_constraint.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const extra[] = {
	"{\"", "\":", "\": \"", "\", \"", "\"}", "}", "[", "]", "true", "false", "null", "-1", "0.5e+10", " ",
	"\n  ", "\\u00e9", "\\\"", "\xc3\xa9", "\xe6\x95\xb0", "\xe6", "\x95\xb0", "ab", "\"a\"", "12345678901234567890",
};

#define N_EXTRA (sizeof(extra) / sizeof(extra[0]))
#define N_IDS (256 + N_EXTRA + 1)	/* the last id is the end token */

static kl_vocab *vocab;

static void
check(bool ok, const char *what)
{
	if (!ok)
	{
		fprintf(stderr, "fuzz_json_schema: %s\n", what);
		abort();
	}
}

static void
run(const char *spec, size_t spec_len, const uint8_t *text, size_t n)
{
	kl_grammar *g;
	kl_constraint *c,
			   *probe;
	kl_err		err;
	int32_t		end = N_IDS - 1;
	uint32_t	mask[(N_IDS + 31) / 32];
	char		taken[64];		/* the bytes the constraint took so far */
	size_t		n_taken = 0;

	if (kl_grammar_compile(spec, spec_len, &g, &err) != KL_OK)
	{
		check(err.msg[0] != 0, "a refused schema without a message");
		return;
	}
	check(kl_constraint_new(g, vocab, &end, 1, &c, &err) == KL_OK, "no constraint for a compiled grammar");
	for (size_t i = 0; i <= n && i < 48; i++)
	{
		int			n_allowed;

		check(kl_constraint_mask(c, mask, &n_allowed, &err) == KL_OK && n_allowed > 0, "a dead end");
		if (kl_constraint_done(c))
			break;
		/* the single-byte tokens: the mask says what feeding them does */
		for (int b = 0; b < 256; b++)
		{
			char		ch = (char) b;
			bool		takes;

			kl_constraint_new(g, vocab, &end, 1, &probe, &err);
			takes = kl_constraint_feed(probe, taken, n_taken) && kl_constraint_feed(probe, &ch, 1);
			kl_constraint_free(probe);
			check(takes == kl_mask_get(mask, b), "the mask disagrees with the automaton");
		}
		if (i == n)
			break;
		if (kl_mask_get(mask, text[i]))
		{
			check(kl_constraint_accept(c, text[i], &err) == KL_OK, "an allowed token was refused");
			taken[n_taken++] = (char) text[i];
		}
		else
			check(kl_constraint_accept(c, text[i], &err) != KL_OK, "a token outside the mask was taken");
	}
	kl_constraint_free(c);
	kl_grammar_free(g);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *nul = memchr(data, 0, size);
	size_t		schema_len = nul ? (size_t) (nul - data) : size;
	const uint8_t *text = nul ? nul + 1 : data + size;
	size_t		n = nul ? size - schema_len - 1 : 0;
	char	   *spec;

	if (!vocab)
	{
		const uint8_t *b[N_IDS];
		size_t		l[N_IDS];
		uint8_t		bytes[256];
		kl_err		err;

		for (int i = 0; i < 256; i++)
		{
			bytes[i] = (uint8_t) i;
			b[i] = &bytes[i];
			l[i] = 1;
		}
		for (size_t i = 0; i < N_EXTRA; i++)
		{
			b[256 + i] = (const uint8_t *) extra[i];
			l[256 + i] = strlen(extra[i]);
		}
		b[N_IDS - 1] = (const uint8_t *) "";
		l[N_IDS - 1] = 0;		/* the end token: no bytes */
		check(kl_vocab_from_bytes(b, l, N_IDS, &vocab, &err) == KL_OK, "vocabulary");
	}
	spec = malloc(schema_len + 128);
	if (size > 0 && (data[0] & 1))
		snprintf(spec, schema_len + 128, "{\"tools\": [{\"name\": \"f\", \"parameters\": %.*s}], \"tool_choice\": \"f\"}",
				 (int) schema_len, (const char *) data);
	else
		snprintf(spec, schema_len + 128, "{\"json_schema\": %.*s}", (int) schema_len, (const char *) data);
	if (!(size > 0 && (data[0] & 1)))
		run(spec, strlen(spec), text, n);
	else
	{
		/* a tool grammar needs the tool tokens: this vocabulary has none, which must be an error */
		kl_grammar *g;
		kl_constraint *c = NULL;
		kl_err		err;
		int32_t		end = N_IDS - 1;

		if (kl_grammar_compile(spec, strlen(spec), &g, &err) == KL_OK)
		{
			check(kl_constraint_new(g, vocab, &end, 1, &c, &err) != KL_OK && strstr(err.msg, "tool"),
				  "a tool grammar on a vocabulary without tool tokens");
			kl_grammar_free(g);
		}
	}
	free(spec);
	return 0;
}
