/*
 * cmd_chat.c — ./kl render: a conversation in the Kimi chat format (with
 * tools), as text or token ids; ./kl parse-reply: what a reply says (its
 * content and tool calls) as JSON.  Handy for tests and for looking at what
 * the model is given.
 *
 *   ./kl render --chat-json FILE [--model DIR] [--ids] [--format kimi|model] [--no-generation-prompt]
 *   ./kl parse-reply [--model DIR] [--tools FILE] < reply-text
 *
 * FILE holds a list of messages, or {"messages": [...], "tools": [...],
 * "add_generation_prompt": bool} (the form of the golden renders).
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "cli_util.h"
#include "commands.h"
#include "kl.h"
#include "tokenizer.h"

/* messages and tools (JSON texts, malloc'd) from a file of either form */
static int
read_chat_file(const char *path, char **messages, char **tools, bool *gen_prompt)
{
	json_error_t jerr;
	json_t	   *j = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
	json_t	   *m,
			   *t;

	*messages = *tools = NULL;
	if (!j)
	{
		fprintf(stderr, "kl: %s: line %d: %s\n", path, jerr.line, jerr.text);
		return 1;
	}
	m = json_is_array(j) ? j : json_object_get(j, "messages");
	t = json_is_object(j) ? json_object_get(j, "tools") : NULL;
	if (json_is_object(j) && json_is_boolean(json_object_get(j, "add_generation_prompt")))
		*gen_prompt = json_is_true(json_object_get(j, "add_generation_prompt"));
	*messages = m ? json_dumps(m, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
	*tools = t && !json_is_null(t) ? json_dumps(t, JSON_COMPACT) : NULL;
	json_decref(j);
	return 0;
}

int
cmd_render(int argc, char **argv)
{
	cli_common co;
	const char *file = NULL,
			   *format = NULL;
	bool		ids_out = false,
				gen_prompt = true;
	kl_tokenizer *tok = NULL;
	kl_chat    *c = NULL;
	kl_chat_format f;
	kl_chat_render_opts o = {0};
	char	   *messages = NULL,
			   *tools = NULL;
	kl_err		err;
	int			rc = 1;
	const cli_opt opts[] = {
		CLI_OPT("--chat-json", CLI_OPT_STRING, &file),
		CLI_OPT("--format", CLI_OPT_STRING, &format),
		CLI_OPT("--ids", CLI_OPT_SET, &ids_out),
		CLI_OPT("--no-generation-prompt", CLI_OPT_CLEAR, &gen_prompt),
	};

	cli_common_init(&co);
	if (cli_parse_options("render", argc, argv, &co, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	if (!file || (ids_out && !co.model) || (format && strcmp(format, "kimi") != 0 && strcmp(format, "model") != 0))
	{
		fprintf(stderr, "kl render: --chat-json FILE is required (--ids needs --model; --format kimi|model)\n");
		return 2;
	}
	if (read_chat_file(file, &messages, &tools, &gen_prompt) != 0)
		return 1;
	if (co.model && kl_tokenizer_load(co.model, &tok, &err) != KL_OK)
		goto fail;
	if (kl_chat_parse(messages, messages ? strlen(messages) : 0, tools, tools ? strlen(tools) : 0, false, &c,
					  &err) != KL_OK)
		goto fail;
	/* the model's own template decides the default system message, unless asked for Kimi's */
	if ((format && strcmp(format, "kimi") == 0) || !tok)
		kl_chat_format_kimi(&f);
	else
		kl_chat_format_of(tok, &f);
	o.format = &f;
	o.add_generation_prompt = gen_prompt;
	if (ids_out)
	{
		kl_ids		ids = {0};

		if (kl_chat_render_ids(tok, c, &o, &ids, &err) != KL_OK)
			goto fail;
		for (size_t i = 0; i < ids.n; i++)
			printf("%s%d", i ? "," : "", ids.ids[i]);
		printf("\n");
		kl_ids_free(&ids);
	}
	else
	{
		char	   *text;
		size_t		len;

		if (kl_chat_render_text(c, &o, tok, &text, &len, &err) != KL_OK)
			goto fail;
		fwrite(text, 1, len, stdout);
		free(text);
	}
	rc = 0;
	goto out;
fail:
	fprintf(stderr, "kl render: %s\n", err.msg);
out:
	free(messages);
	free(tools);
	kl_chat_free(c);
	kl_tokenizer_free(tok);
	return rc;
}

int
cmd_parse_reply(int argc, char **argv)
{
	const char *tools_file = NULL;
	kl_chat    *decl = NULL;
	kl_chat_reply *r = NULL;
	char	   *text = NULL,
			   *json = NULL;
	size_t		len = 0,
				jl;
	kl_err		err;
	int			rc = 1;
	const cli_opt opts[] = {
		CLI_OPT("--tools", CLI_OPT_STRING, &tools_file),
	};

	if (cli_parse_options("parse-reply", argc, argv, NULL, opts, CLI_N_OPTS(opts)) != 0)
		return 2;
	if (tools_file)
	{
		size_t		tl;
		uint8_t    *t = cli_read_file(tools_file, &tl);

		if (!t || kl_chat_parse(NULL, 0, (const char *) t, tl, false, &decl, &err) != KL_OK)
		{
			fprintf(stderr, "kl parse-reply: %s: %s\n", tools_file, t ? err.msg : "cannot read it");
			free(t);
			return 1;
		}
		free(t);
	}
	if (!(text = cli_read_stdin(&len)))
	{
		kl_chat_free(decl);
		return 1;
	}
	if (kl_chat_parse_reply_text(text, len, decl, &r, &err) != KL_OK ||
		kl_chat_reply_json(r, &json, &jl, &err) != KL_OK)
		fprintf(stderr, "kl parse-reply: %s\n", err.msg);
	else
	{
		printf("%s\n", json);
		rc = 0;
	}
	free(json);
	free(text);
	kl_chat_reply_free(r);
	kl_chat_free(decl);
	return rc;
}
