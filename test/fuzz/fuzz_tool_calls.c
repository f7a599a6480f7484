/*
 * libFuzzer harness: the Kimi chat format both ways.
 *
 * The input is used as a model's reply (text with the tool tokens written
 * out, and the same text encoded to ids with the bundled tokenizer), whose
 * parse must succeed and give JSON that reads back, with every call either
 * valid (arguments a JSON object) or flagged; and as a conversation
 * (messages JSON, a NUL, tool declarations JSON), which must be refused with
 * a message or render to text and to ids.
 *
 * The tokenizer is $KL_TOKENIZER_MODEL, else models/pgdocs-kimi-18m (run
 * from the repository root).
 */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"

int			LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kl_tokenizer *tok;

static void
check(bool ok, const char *what)
{
	if (!ok)
	{
		fprintf(stderr, "fuzz_tool_calls: %s\n", what);
		abort();
	}
}

static void
check_reply(kl_chat_reply *r)
{
	char	   *json;
	size_t		len;
	kl_err		err;
	json_t	   *o;

	for (int i = 0; i < r->n_calls; i++)
	{
		json_t	   *args;

		if (r->calls[i].error)
			continue;
		args = json_loadb(r->calls[i].arguments, r->calls[i].arguments_len, 0, NULL);
		check(args && json_is_object(args), "a valid call whose arguments are not a JSON object");
		json_decref(args);
	}
	check(kl_chat_reply_json(r, &json, &len, &err) == KL_OK, "reply JSON");
	o = json_loadb(json, len, 0, NULL);
	check(o && json_is_array(json_object_get(o, "tool_calls")), "reply JSON does not read back");
	json_decref(o);
	free(json);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	kl_err		err;
	kl_chat_reply *r = NULL;
	kl_ids		ids = {0};

	if (!tok)
	{
		const char *dir = getenv("KL_TOKENIZER_MODEL");

		check(kl_tokenizer_load(dir ? dir : "models/pgdocs-kimi-18m", &tok, &err) == KL_OK, "tokenizer");
	}
	/* a reply */
	check(kl_chat_parse_reply_text((const char *) data, size, NULL, &r, &err) == KL_OK, "parse of text");
	check_reply(r);
	kl_chat_reply_free(r);
	if (kl_encode(tok, (const char *) data, size, true, &ids, &err) == KL_OK)
	{
		check(kl_chat_parse_reply_ids(tok, ids.ids, ids.n, NULL, &r, &err) == KL_OK, "parse of ids");
		check_reply(r);
		kl_chat_reply_free(r);
	}
	kl_ids_free(&ids);

	/* a conversation: messages, NUL, tools */
	{
		const uint8_t *nul = memchr(data, 0, size);
		size_t		ml = nul ? (size_t) (nul - data) : size;
		kl_chat    *c = NULL;

		if (kl_chat_parse((const char *) data, ml, nul ? (const char *) nul + 1 : NULL, nul ? size - ml - 1 : 0,
						  size % 2 == 0, &c, &err) == KL_OK)
		{
			kl_chat_format f;
			kl_chat_render_opts o = {0};
			char	   *text = NULL;
			size_t		len;
			char	   *spec = NULL;

			kl_chat_format_kimi(&f);
			o.format = &f;
			o.add_generation_prompt = true;
			if (kl_chat_render_text(c, &o, tok, &text, &len, &err) != KL_OK)
				check(err.msg[0] != 0, "a render error without a message");
			free(text);
			if (kl_chat_render_ids(tok, c, &o, &ids, &err) != KL_OK)
				check(err.msg[0] != 0, "a render error without a message");
			kl_ids_free(&ids);
			if (kl_chat_grammar_spec(c, NULL, NULL, 0, 0, &spec, &err) != KL_OK)
				check(err.msg[0] != 0, "a grammar error without a message");
			free(spec);
			kl_chat_free(c);
		}
		else
			check(err.msg[0] != 0 && c == NULL, "a refused conversation without a message");
	}
	return 0;
}
