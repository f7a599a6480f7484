/*
 * test_chat.c — the Kimi chat format with tools (src/engine/chat.c,
 * chat_reply.c) against the golden renders of the public Kimi Instruct
 * template (test/fixtures/golden/chat/kimi_chat.json): every render byte for
 * byte, then its token ids against the rendered text encoded by the
 * tokenizer; every tool-call parsing case, from text and from ids; key order
 * lost by jsonb; continuation turns (what a stored conversation renders)
 * against the whole history; recorded reply ids; the default system message
 * read from a model's template; a tokenizer without the tool tokens; bad
 * declarations and messages.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chat.h"
#include "json_constraint.h"
#include "tap.h"
#include "tokenizer.h"

static kl_tokenizer *tok;
static char model_dir[1024];

static char *
dump(const json_t *v)
{
	return v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
}

static bool
ids_equal(const kl_ids *a, const kl_ids *b)
{
	return a->n == b->n && (a->n == 0 || memcmp(a->ids, b->ids, a->n * sizeof(int32_t)) == 0);
}

static kl_chat *
parse_chat(json_t *messages, json_t *tools, bool conventional, kl_err *err)
{
	char	   *m = dump(messages),
			   *t = dump(tools);
	kl_chat    *c = NULL;

	kl_chat_parse(m, m ? strlen(m) : 0, t, t ? strlen(t) : 0, conventional, &c, err);
	free(m);
	free(t);
	return c;
}

/* jsonb's key order (shorter keys first, then bytewise), recursively */
static int
cmp_jsonb_key(const void *a, const void *b)
{
	const char *x = *(const char *const *) a,
			   *y = *(const char *const *) b;
	size_t		lx = strlen(x),
				ly = strlen(y);

	if (lx != ly)
		return lx < ly ? -1 : 1;
	return strcmp(x, y);
}

static json_t *
jsonb_order(json_t *v)
{
	if (json_is_object(v))
	{
		const char *keys[64];
		size_t		n = 0;
		const char *key;
		json_t	   *val;
		json_t	   *out = json_object();

		json_object_foreach(v, key, val)
			keys[n++] = key;
		qsort(keys, n, sizeof(char *), cmp_jsonb_key);
		for (size_t i = 0; i < n; i++)
			json_object_set_new(out, keys[i], jsonb_order(json_object_get(v, keys[i])));
		return out;
	}
	if (json_is_array(v))
	{
		json_t	   *out = json_array();

		for (size_t i = 0; i < json_array_size(v); i++)
			json_array_append_new(out, jsonb_order(json_array_get(v, i)));
		return out;
	}
	return json_incref(v);
}

/* ------------------------------------------------------------------ golden renders */

static void
golden_renders(json_t *golden)
{
	json_t	   *renders = json_object_get(golden, "renders");
	kl_chat_format kimi;
	int			text_ok = 0,
				ids_ok = 0,
				order_ok = 0,
				n = (int) json_array_size(renders);

	kl_chat_format_kimi(&kimi);
	for (int i = 0; i < n; i++)
	{
		json_t	   *r = json_array_get(renders, i);
		const char *name = json_string_value(json_object_get(r, "name"));
		const char *want = json_string_value(json_object_get(r, "rendered"));
		json_t	   *tools = json_object_get(r, "tools");
		kl_chat_render_opts o = {0};
		kl_err		err;
		kl_chat    *c = parse_chat(json_object_get(r, "messages"), tools, false, &err);
		char	   *text = NULL;
		size_t		len = 0;
		kl_ids		got = {0},
					enc = {0};

		o.format = &kimi;
		o.add_generation_prompt = json_is_true(json_object_get(r, "add_generation_prompt"));
		if (!c)
		{
			tap_ok(0, "render %s: parse: %s", name, err.msg);
			continue;
		}
		if (kl_chat_render_text(c, &o, NULL, &text, &len, &err) == KL_OK && len == strlen(want) &&
			memcmp(text, want, len) == 0)
			text_ok++;
		else
			tap_diag("render %s differs:\n got: %s\nwant: %s", name, text ? text : err.msg, want);
		free(text);
		/* the ids: the rendered text through the tokenizer, special tokens as ids */
		if (kl_chat_render_ids(tok, c, &o, &got, &err) == KL_OK &&
			kl_encode(tok, want, strlen(want), true, &enc, &err) == KL_OK && ids_equal(&got, &enc))
			ids_ok++;
		else
			tap_diag("render %s: ids differ (%zu vs %zu): %s", name, got.n, enc.n, err.msg);
		kl_chat_free(c);

		/* the same declarations after jsonb reordered their keys */
		if (tools)
		{
			json_t	   *shuffled = jsonb_order(tools);

			c = parse_chat(json_object_get(r, "messages"), shuffled, true, &err);
			json_decref(shuffled);
			if (c && kl_chat_render_text(c, &o, NULL, &text, &len, &err) == KL_OK && strcmp(text, want) == 0)
				order_ok++;
			else
				tap_diag("render %s with jsonb key order differs: %s", name, c ? text : err.msg);
			if (c)
				free(text);
			kl_chat_free(c);
		}
		else
			order_ok++;
		kl_ids_free(&got);
		kl_ids_free(&enc);
	}
	tap_ok(n == 11, "the golden file has the 11 renders");
	tap_ok(text_ok == n, "every golden render is reproduced byte for byte (%d of %d)", text_ok, n);
	tap_ok(ids_ok == n, "their ids equal the rendered text encoded with special tokens (%d of %d)", ids_ok, n);
	tap_ok(order_ok == n, "declarations whose keys jsonb reordered render in the usual order again (%d of %d)",
		   order_ok, n);
}

/* ------------------------------------------------------------------ golden parsing */

static bool
reply_matches(const kl_chat_reply *r, json_t *want)
{
	json_t	   *calls = json_object_get(want, "tool_calls");

	if (!json_is_string(json_object_get(want, "content")) ||
		strcmp(r->content, json_string_value(json_object_get(want, "content"))) != 0 ||
		(size_t) r->n_calls != json_array_size(calls))
		return false;
	for (int i = 0; i < r->n_calls; i++)
	{
		json_t	   *w = json_array_get(calls, i);
		json_t	   *args = json_loadb(r->calls[i].arguments, r->calls[i].arguments_len, 0, NULL);
		bool		ok = !r->calls[i].error && strcmp(r->calls[i].id, json_string_value(json_object_get(w, "id"))) == 0 &&
			strcmp(r->calls[i].name, json_string_value(json_object_get(w, "name"))) == 0 &&
			args && json_equal(args, json_object_get(w, "arguments"));

		json_decref(args);
		if (!ok)
			return false;
	}
	return true;
}

static void
golden_parsing(json_t *golden)
{
	json_t	   *cases = json_object_get(golden, "tool_call_parsing");
	int			n = (int) json_array_size(cases);

	tap_ok(n == 5, "the golden file has the 5 parsing cases");
	for (int i = 0; i < n; i++)
	{
		json_t	   *c = json_array_get(cases, i);
		const char *text = json_string_value(json_object_get(c, "text"));
		bool		valid = !json_is_null(json_object_get(c, "tool_calls"));
		kl_chat_reply *from_text = NULL,
				   *from_ids = NULL;
		kl_ids		ids = {0};
		kl_err		err;
		bool		ok_text,
					ok_ids;

		kl_chat_parse_reply_text(text, strlen(text), NULL, &from_text, &err);
		kl_encode(tok, text, strlen(text), true, &ids, &err);
		kl_chat_parse_reply_ids(tok, ids.ids, ids.n, NULL, &from_ids, &err);
		if (valid)
		{
			ok_text = from_text && reply_matches(from_text, c);
			ok_ids = from_ids && reply_matches(from_ids, c);
			tap_ok(ok_text && ok_ids, "parsing case %d: content and calls as expected, from text and from ids", i + 1);
		}
		else
		{
			/* not a valid call: reported, never dropped, never as a call */
			const char *why = i == 3 ? "cut off" : "not valid JSON";

			ok_text = from_text && from_text->n_calls == 1 && from_text->calls[0].error &&
				strstr(from_text->calls[0].error, why) && strcmp(from_text->calls[0].name, "run_sql") == 0;
			ok_ids = from_ids && from_ids->n_calls == 1 && from_ids->calls[0].error &&
				strstr(from_ids->calls[0].error, why);
			tap_ok(ok_text && ok_ids, "parsing case %d: reported as an invalid call (\"%s\")", i + 1,
				   from_text && from_text->n_calls ? from_text->calls[0].error : "?");
			if (from_text)
			{
				char	   *j;
				size_t		jl;
				json_t	   *o;

				kl_chat_reply_json(from_text, &j, &jl, &err);
				o = json_loads(j, 0, NULL);
				tap_ok(o && json_array_size(json_object_get(o, "tool_calls")) == 0 &&
					   json_array_size(json_object_get(o, "invalid_tool_calls")) == 1 &&
					   json_is_string(json_object_get(json_array_get(json_object_get(o, "invalid_tool_calls"), 0),
													  "arguments")),
					   "parsing case %d as JSON: no tool_calls, one invalid_tool_calls entry with its raw text: %s",
					   i + 1, j);
				json_decref(o);
				free(j);
			}
		}
		kl_chat_reply_free(from_text);
		kl_chat_reply_free(from_ids);
		kl_ids_free(&ids);
	}
}

/* ------------------------------------------------------------------ more parsing */

static void
reply_details(void)
{
	kl_err		err;
	kl_chat    *decl;
	kl_chat_reply *r = NULL;
	const char *tools = "[{\"type\": \"function\", \"function\": {\"name\": \"run_sql\", \"parameters\": "
		"{\"type\": \"object\", \"properties\": {\"query\": {\"type\": \"string\"}}}}}]";
	const char *unknown = "<|tool_calls_section_begin|><|tool_call_begin|>functions.drop_table:0"
		"<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>";
	const char *array_args = "<|tool_calls_section_begin|><|tool_call_begin|>functions.run_sql:0"
		"<|tool_call_argument_begin|>[1]<|tool_call_end|><|tool_calls_section_end|>";
	const char *bad_id = "<|tool_calls_section_begin|><|tool_call_begin|>run_sql"
		"<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>";
	char	   *j;
	size_t		jl;
	json_t	   *o;

	kl_chat_parse(NULL, 0, tools, strlen(tools), false, &decl, &err);
	kl_chat_parse_reply_text(unknown, strlen(unknown), decl, &r, &err);
	tap_ok(r && r->n_calls == 1 && r->calls[0].error && strstr(r->calls[0].error, "drop_table") &&
		   strstr(r->calls[0].error, "not a declared tool"), "a call of an undeclared tool is flagged: %s",
		   r && r->n_calls ? r->calls[0].error : "?");
	kl_chat_reply_free(r);
	kl_chat_parse_reply_text(array_args, strlen(array_args), decl, &r, &err);
	tap_ok(r && r->n_calls == 1 && r->calls[0].error && strstr(r->calls[0].error, "object"),
		   "arguments that are JSON but not an object are flagged");
	kl_chat_reply_free(r);
	kl_chat_parse_reply_text(bad_id, strlen(bad_id), decl, &r, &err);
	tap_ok(r && r->n_calls == 1 && r->calls[0].error && strstr(r->calls[0].error, "functions.NAME:INDEX"),
		   "a call id not of the form functions.NAME:INDEX is flagged");
	kl_chat_reply_free(r);

	/* the JSON of a valid reply: the OpenAI form with the exact text, and the parsed arguments */
	{
		const char *t = "Sure.<|tool_calls_section_begin|><|tool_call_begin|>functions.run_sql:3"
			"<|tool_call_argument_begin|>{\"query\":  \"SELECT 1\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>";

		kl_chat_parse_reply_text(t, strlen(t), decl, &r, &err);
		kl_chat_reply_json(r, &j, &jl, &err);
		o = json_loads(j, 0, NULL);
		tap_ok(o && strcmp(json_string_value(json_object_get(o, "content")), "Sure.") == 0 &&
			   json_object_get(o, "invalid_tool_calls") == NULL &&
			   strcmp(json_string_value(json_object_get(json_object_get(json_array_get(json_object_get(o, "tool_calls"), 0),
																		"function"), "arguments")),
					  "{\"query\":  \"SELECT 1\"}") == 0 &&
			   strcmp(json_string_value(json_object_get(json_object_get(json_array_get(json_object_get(o, "tool_calls"), 0),
																		"arguments"), "query")), "SELECT 1") == 0 &&
			   strcmp(json_string_value(json_object_get(json_array_get(json_object_get(o, "tool_calls"), 0), "id")),
					  "functions.run_sql:3") == 0,
			   "reply JSON: content, id, function.arguments as written, arguments parsed: %s", j);
		json_decref(o);
		free(j);
		kl_chat_reply_free(r);
	}
	/* a NUL the model wrote: U+FFFD in the JSON (no \u0000, which jsonb refuses) */
	{
		const char t[] = "a\0b<|tool_calls_section_begin|><|tool_call_begin|>functions.run_sql:0"
			"<|tool_call_argument_begin|>{\"q\": 1\0<|tool_call_end|><|tool_calls_section_end|>";

		kl_chat_parse_reply_text(t, sizeof(t) - 1, decl, &r, &err);
		kl_chat_reply_json(r, &j, &jl, &err);
		o = json_loads(j, 0, NULL);
		tap_ok(o && strcmp(json_string_value(json_object_get(o, "content")), "a\xEF\xBF\xBD" "b") == 0 &&
			   strstr(j, "\\u0000") == NULL &&
			   json_array_size(json_object_get(o, "invalid_tool_calls")) == 1,
			   "NUL bytes in a reply become U+FFFD in its JSON: %s", j);
		json_decref(o);
		free(j);
		kl_chat_reply_free(r);
	}
	/* a reply with an ordinary end and no calls */
	{
		int32_t		end = kl_tokenizer_special_id(tok, "<|im_end|>");
		kl_ids		ids = {0};

		kl_encode(tok, "Plain text.", 11, false, &ids, &err);
		kl_ids_push(&ids, end, &err);
		kl_chat_parse_reply_ids(tok, ids.ids, ids.n, decl, &r, &err);
		tap_ok(r && strcmp(r->content, "Plain text.") == 0 && r->n_calls == 0,
			   "a text reply: its content without the end token, no calls");
		kl_chat_reply_free(r);
		kl_ids_free(&ids);
	}
	kl_chat_free(decl);
}

/* ------------------------------------------------------------------ conversations in turns */

/* What say() renders turn by turn equals the whole history rendered at once. */
static void
continuation(json_t *golden)
{
	json_t	   *r = json_array_get(json_object_get(golden, "renders"), 5);	/* tool_call_and_result */
	json_t	   *msgs = json_object_get(r, "messages");
	json_t	   *tools = json_object_get(r, "tools");
	kl_chat_format kimi;
	kl_chat_render_opts o = {0};
	kl_ids		whole = {0},
				turns = {0};
	kl_err		err;
	kl_chat    *c;
	int			rc = KL_OK;
	/* turn 1: messages 0-1; the reply: message 2; turn 2: message 3 (the result); reply 4; turn 3: message 5 */
	static const int cut[][2] = {{0, 2}, {3, 4}, {5, 6}};
	int			counter = 0;
	char	   *pending = NULL;

	kl_chat_format_kimi(&kimi);
	o.format = &kimi;
	o.add_generation_prompt = true;
	c = parse_chat(msgs, tools, false, &err);
	kl_chat_render_ids(tok, c, &o, &whole, &err);
	kl_chat_free(c);
	for (int t = 0; t < 3 && rc == KL_OK; t++)
	{
		json_t	   *part = json_array();
		kl_chat    *pc;
		const char *const pend[1] = {pending};

		for (int i = cut[t][0]; i < cut[t][1]; i++)
			json_array_append(part, json_array_get(msgs, i));
		pc = parse_chat(part, tools, false, &err);
		json_decref(part);
		o.continuation = t > 0;
		o.call_counter = counter;
		o.pending_calls = pending ? pend : NULL;
		o.n_pending = pending ? 1 : 0;
		rc = pc ? kl_chat_render_ids(tok, pc, &o, &turns, &err) : KL_FAIL;
		kl_chat_free(pc);
		/* the reply the model "generated": the assistant message's body, as the template renders it */
		if (t < 2)
		{
			json_t	   *one = json_array();
			kl_chat    *rc1;
			kl_ids		reply = {0};
			kl_chat_render_opts ro = {0};
			size_t		skip;

			json_array_append(one, json_array_get(msgs, t == 0 ? 2 : 4));
			rc1 = parse_chat(one, NULL, false, &err);
			json_decref(one);
			ro.continuation = true;
			ro.call_counter = counter;
			kl_chat_render_ids(tok, rc1, &ro, &reply, &err);
			/* drop the header <|im_assistant|>assistant<|im_middle|> the generation prompt already gave */
			for (skip = 0; skip < reply.n && reply.ids[skip] != kl_tokenizer_special_id(tok, "<|im_middle|>"); skip++)
				;
			for (size_t k = skip + 1; k < reply.n; k++)
				kl_ids_push(&turns, reply.ids[k], &err);
			counter += rc1->msgs[0].n_calls;
			free(pending);
			pending = rc1->msgs[0].n_calls ? strdup("functions.run_sql:0") : NULL;
			kl_chat_free(rc1);
			kl_ids_free(&reply);
		}
	}
	free(pending);
	tap_ok(rc == KL_OK && ids_equal(&whole, &turns),
		   "a conversation rendered turn by turn (continuations) equals the whole history (%zu ids)", whole.n);
	kl_ids_free(&whole);
	kl_ids_free(&turns);
}

/* An assistant message with token_ids renders those ids (closed with <|im_end|> when cut off). */
static void
recorded_ids(void)
{
	kl_err		err;
	kl_ids		ids = {0},
				want = {0};
	kl_chat    *c;
	kl_chat_render_opts o = {0};
	int32_t		end = kl_tokenizer_special_id(tok, "<|im_end|>");
	char		json[512];
	int32_t		body[3];

	kl_encode(tok, "Hi", 2, false, &want, &err);
	body[0] = want.ids[0];
	body[1] = want.n > 1 ? want.ids[1] : want.ids[0];
	want.n = 0;
	snprintf(json, sizeof(json),
			 "[{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"ignored\", "
			 "\"token_ids\": [%d, %d]}, {\"role\": \"user\", \"content\": \"y\"}]", body[0], body[1]);
	kl_chat_parse(json, strlen(json), NULL, 0, false, &c, &err);
	kl_chat_render_ids(tok, c, &o, &ids, &err);
	kl_chat_free(c);
	{
		const char *t = "<|im_user|>user<|im_middle|>x<|im_end|><|im_assistant|>assistant<|im_middle|>";

		kl_encode(tok, t, strlen(t), true, &want, &err);
		kl_ids_push(&want, body[0], &err);
		kl_ids_push(&want, body[1], &err);
		kl_ids_push(&want, end, &err);	/* the reply was cut off: closed */
		t = "<|im_user|>user<|im_middle|>y<|im_end|>";
		kl_encode(tok, t, strlen(t), true, &want, &err);
	}
	tap_ok(ids_equal(&ids, &want), "an assistant message's token_ids are rendered as they are, closed if cut off");
	kl_ids_free(&ids);
	kl_ids_free(&want);
}

/* ------------------------------------------------------------------ tokenizers */

static char *
slurp(const char *path, size_t *len)
{
	FILE	   *f = fopen(path, "rb");
	char	   *buf;
	long		n;

	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = malloc((size_t) n + 1);
	if (fread(buf, 1, (size_t) n, f) != (size_t) n)
	{
		free(buf);
		fclose(f);
		return NULL;
	}
	buf[n] = 0;
	fclose(f);
	*len = (size_t) n;
	return buf;
}

/* A copy of the bundled tokenizer with its config changed by edit(). */
static kl_tokenizer *
tokenizer_variant(const char *dir, void (*edit) (json_t *cfg))
{
	char		path[1200];
	size_t		len;
	char	   *model = NULL;
	json_t	   *cfg;
	FILE	   *f;
	kl_tokenizer *t = NULL;
	kl_err		err;

	snprintf(path, sizeof(path), "%s/tiktoken.model", model_dir);
	model = slurp(path, &len);
	snprintf(path, sizeof(path), "%s/tiktoken.model", dir);
	f = fopen(path, "wb");
	fwrite(model, 1, len, f);
	fclose(f);
	free(model);
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", model_dir);
	cfg = json_load_file(path, 0, NULL);
	edit(cfg);
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	json_dump_file(cfg, path, JSON_INDENT(1));
	json_decref(cfg);
	if (kl_tokenizer_load(dir, &t, &err) != KL_OK)
		tap_diag("variant tokenizer: %s", err.msg);
	return t;
}

static void
drop_tool_tokens(json_t *cfg)
{
	json_t	   *added = json_object_get(cfg, "added_tokens_decoder");

	for (int id = 3851; id <= 3855; id++)
	{
		char		key[16],
					name[64];

		snprintf(key, sizeof(key), "%d", id);
		snprintf(name, sizeof(name), "<|reserved_token_%d|>", id);
		json_object_set_new(json_object_get(added, key), "content", json_string(name));
	}
}

static void
kimi_template(json_t *cfg)
{
	char		path[1200];
	size_t		len;
	char	   *t;

	snprintf(path, sizeof(path), "%s/golden/chat/kimi-k2-instruct.chat_template.jinja", tap_fixture_dir());
	t = slurp(path, &len);
	json_object_set_new(cfg, "chat_template", json_string(t));
	free(t);
}

static void
tokenizers(json_t *golden)
{
	char		dir[] = "/tmp/kl-chat-XXXXXX";
	kl_tokenizer *no_tools,
			   *k2;
	kl_chat_format f;
	kl_err		err;
	json_t	   *r = json_array_get(json_object_get(golden, "renders"), 5);	/* with tool calls */
	kl_chat    *c = parse_chat(json_object_get(r, "messages"), json_object_get(r, "tools"), false, &err);
	kl_chat_render_opts o = {0};
	kl_ids		ids = {0};
	char		path[1200];

	kl_chat_format_of(tok, &f);
	tap_ok(!f.has_default_system, "the bundled model's template inserts no default system message");
	tap_ok(kl_tokenizer_special_id(tok, KL_TOK_CALL_BEGIN) == 3853 &&
		   kl_tokenizer_special_id(tok, KL_TOK_SECTION_BEGIN) == 3851 &&
		   kl_tokenizer_special_id(tok, KL_TOK_CALL_END) == 3855,
		   "the bundled tokenizer has the tool tokens in Kimi's slots (3851-3855)");
	if (!mkdtemp(dir))
		return;
	no_tools = tokenizer_variant(dir, drop_tool_tokens);
	o.add_generation_prompt = true;
	tap_ok(no_tools && kl_chat_render_ids(no_tools, c, &o, &ids, &err) != KL_OK &&
		   strstr(err.msg, "<|tool_calls_section_begin|>") && strstr(err.msg, "tool"),
		   "a tokenizer without the tool tokens: rendering tool calls is an error naming the token: %s", err.msg);
	if (no_tools)
	{
		kl_vocab   *v;
		kl_grammar *g;
		kl_constraint *con = NULL;
		const char *spec = "{\"tools\": [{\"name\": \"run_sql\"}], \"tool_choice\": \"auto\"}";
		int32_t		end = 3842;

		kl_vocab_from_tokenizer(no_tools, 4096, &v, &err);
		kl_grammar_compile(spec, strlen(spec), &g, &err);
		tap_ok(kl_constraint_new(g, v, &end, 1, &con, &err) != KL_OK && strstr(err.msg, "tool") &&
			   strstr(err.msg, "<|tool_calls_section_begin|>"),
			   "... and constraining a reply to tool calls too: %s", err.msg);
		kl_constraint_free(con);
		kl_grammar_free(g);
		kl_vocab_free(v);
	}
	kl_tokenizer_free(no_tools);
	k2 = tokenizer_variant(dir, kimi_template);
	kl_chat_format_of(k2, &f);
	tap_ok(k2 && f.has_default_system && strcmp(f.default_system, "You are Kimi, an AI assistant created by Moonshot AI.") == 0 &&
		   f.default_system_newline, "the Kimi template's default system message (and its newline) is read from it");
	kl_tokenizer_free(k2);
	snprintf(path, sizeof(path), "%s/tiktoken.model", dir);
	unlink(path);
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	unlink(path);
	rmdir(dir);
	kl_chat_free(c);
	kl_ids_free(&ids);
}

/* ------------------------------------------------------------------ bad input */

static void
bad_input(void)
{
	static const struct
	{
		const char *messages;
		const char *tools;
		const char *want;
		const char *what;
	}			cases[] = {
		{NULL, "{}", "non-empty JSON array", "tools not an array"},
		{NULL, "[]", "non-empty JSON array", "no tools"},
		{NULL, "[{\"type\": \"retrieval\"}]", "function declaration", "a declaration that is not a function"},
		{NULL, "[{\"type\": \"function\", \"function\": {\"name\": \"a b\"}}]", "letters, digits", "a name with a space"},
		{NULL, "[{\"type\": \"function\", \"function\": {\"name\": \"t\"}}, {\"type\": \"function\", \"function\": {\"name\": \"t\"}}]",
		"declared twice", "the same name twice"},
		{NULL, "[{\"type\": \"function\", \"function\": {\"name\": \"t\", \"params\": {}}}]", "unknown field \"params\"",
		"a misspelt field"},
		{NULL, "[{\"type\": \"function\", \"function\": {\"name\": \"t\", \"parameters\": {\"type\": \"string\"}}}]",
		"object", "parameters that are not an object schema"},
		{NULL, "[{\"type\": \"function\", \"function\": {\"name\": \"t\", \"parameters\": {\"type\": \"object\", "
			"\"properties\": {\"d\": {\"type\": \"string\", \"format\": \"date\"}}}}}]", "\"format\" is not supported",
		"an unsupported schema keyword in the parameters"},
		{NULL, "[{\"type\": \"function\", \"function\": {\"name\": \"t\", \"description\": 3}}]", "description",
		"a description that is not text"},
		{"[{\"role\": \"wizard\", \"content\": \"x\"}]", NULL, "wizard", "an unknown role"},
		{"[{\"role\": \"user\", \"content\": 3}]", NULL, "content", "content that is a number"},
		{"[{\"role\": \"user\"}]", NULL, "no \"content\"", "a user message without content"},
		{"[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]", NULL, "image",
		"an image"},
		{"[{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"function\": {\"arguments\": \"{}\"}}]}]", NULL,
		"no function name", "a call without a name"},
		{"[{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"function\": {\"name\": \"f\"}}]}]", NULL,
		"no \"arguments\"", "a call without arguments"},
		{"[{\"role\": \"user\", \"content\": \"x\", \"tool_calls\": []}]", NULL, "only assistant", "calls on a user message"},
		{"[{\"role\": \"assistant\", \"content\": \"x\", \"token_ids\": [-1]}]", NULL, "token_ids", "a negative token id"},
		{"{\"role\": \"user\"}", NULL, "JSON array", "messages not an array"},
		{"[{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"function\": {\"name\": \"drop_all\", \"arguments\": \"{}\"}}]}]",
			"[{\"type\": \"function\", \"function\": {\"name\": \"run_sql\"}}]", "\"drop_all\", which is not a declared tool",
		"a call in the history of a tool that is not declared"},
		{"[{\"role\": \"user\", \"content\": \"x\"", NULL, "not valid JSON", "truncated JSON"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
	{
		kl_chat    *c = NULL;
		kl_err		err;
		int			rc = kl_chat_parse(cases[i].messages, cases[i].messages ? strlen(cases[i].messages) : 0,
									   cases[i].tools, cases[i].tools ? strlen(cases[i].tools) : 0, false, &c, &err);

		tap_ok(rc != KL_OK && !c && strstr(err.msg, cases[i].want), "%s: %s", cases[i].what, rc != KL_OK ? err.msg : "accepted");
		kl_chat_free(c);
	}

	/* tool results in another order than the calls */
	{
		const char *m = "[{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": ["
			"{\"id\": \"functions.a:0\", \"function\": {\"name\": \"a\", \"arguments\": \"{}\"}},"
			"{\"id\": \"functions.b:1\", \"function\": {\"name\": \"b\", \"arguments\": \"{}\"}}]},"
			"{\"role\": \"tool\", \"tool_call_id\": \"functions.b:1\", \"content\": \"2\"}]";
		kl_chat    *c;
		kl_err		err;
		char	   *text = NULL;
		size_t		len;
		kl_chat_render_opts o = {0};

		kl_chat_parse(m, strlen(m), NULL, 0, false, &c, &err);
		tap_ok(kl_chat_render_text(c, &o, NULL, &text, &len, &err) != KL_OK && strstr(err.msg, "functions.a:0") &&
			   strstr(err.msg, "order"), "a tool result out of the calls' order is an error: %s", err.msg);
		kl_chat_free(c);
		free(text);
	}
	/* tool_choice */
	{
		const char *t = "[{\"type\": \"function\", \"function\": {\"name\": \"run_sql\"}}]";
		kl_chat    *c,
				   *none;
		kl_err		err;
		char	   *spec = NULL;

		kl_chat_parse(NULL, 0, t, strlen(t), false, &c, &err);
		kl_chat_parse(NULL, 0, NULL, 0, false, &none, &err);
		tap_ok(kl_chat_grammar_spec(c, "drop_table", NULL, 0, 0, &spec, &err) != KL_OK &&
			   strstr(err.msg, "drop_table") && strstr(err.msg, "not a declared tool"),
			   "tool_choice naming an undeclared tool: %s", err.msg);
		tap_ok(kl_chat_grammar_spec(none, "run_sql", NULL, 0, 0, &spec, &err) != KL_OK &&
			   strstr(err.msg, "no tools"), "tool_choice without tools: %s", err.msg);
		tap_ok(kl_chat_grammar_spec(none, NULL, NULL, 0, 0, &spec, &err) == KL_OK && spec == NULL,
			   "no tools and no schema: free text, no constraint");
		{
			const char *bad = "{\"type\": \"object\", \"pattern\": \"x\"}";
			int			rc = kl_chat_grammar_spec(c, "run_sql", bad, strlen(bad), 0, &spec, &err);

			tap_ok(rc != KL_OK && strstr(err.msg, "pattern"), "a json_schema with an unsupported keyword: %s", err.msg);
			rc = kl_chat_grammar_spec(c, "run_sql", NULL, 0, 2, &spec, &err);
			tap_ok(rc == KL_OK && spec && strstr(spec, "\"first_index\":2"), "a named tool choice gives a spec: %s",
				   spec ? spec : err.msg);
		}
		free(spec);
		kl_chat_free(c);
		kl_chat_free(none);
	}
}

/* ------------------------------------------------------------------ ./kl generate --chat-json */

/*
 * The CLI's chat input: the file's messages are the prompt (the command once
 * said "empty prompt" for any file), and a file that is missing or holds no
 * messages is an error that says so, not a generation from an empty chat.
 */
static void
cli_chat_json(void)
{
	const char *cli = tap_cli();
	char		dir[] = "/tmp/kl_test_chat_XXXXXX";
	char		cmd[2048];
	const char *err;
	FILE	   *f;
	int			rc;

	if (!tap_ok(mkdtemp(dir) != NULL, "a temporary directory for the CLI checks"))
		return;
	snprintf(cmd, sizeof(cmd), "%s/chat.json", dir);
	if ((f = fopen(cmd, "w")) != NULL)
	{
		fputs("[{\"role\": \"user\", \"content\": \"What does VACUUM do?\"}]", f);
		fclose(f);
	}
	snprintf(cmd, sizeof(cmd), "%s generate --model %s --chat-json %s/chat.json --max-tokens 6", cli, model_dir, dir);
	rc = tap_run(dir, cmd, &err);
	tap_ok(rc == 0 && strstr(err, " 6 generated") != NULL, "kl generate --chat-json FILE generates from the file's messages");
	snprintf(cmd, sizeof(cmd), "%s generate --model %s --chat-json %s/missing.json --max-tokens 6", cli, model_dir, dir);
	rc = tap_run(dir, cmd, &err);
	tap_ok(rc != 0 && strstr(err, "cannot read") != NULL, "a missing chat file is an error that says so");
	snprintf(cmd, sizeof(cmd), "%s/object.json", dir);
	if ((f = fopen(cmd, "w")) != NULL)
	{
		fputs("{\"a\": 1}", f);
		fclose(f);
	}
	snprintf(cmd, sizeof(cmd), "%s generate --model %s --chat-json %s/object.json --max-tokens 6", cli, model_dir, dir);
	rc = tap_run(dir, cmd, &err);
	tap_ok(rc != 0 && strstr(err, "expected a list of messages") != NULL, "a chat file without messages is an error that says so");
	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		tap_diag("could not remove %s", dir);
}

int
main(void)
{
	char		path[1200];
	json_t	   *golden;
	json_error_t jerr;
	kl_err		err;

	snprintf(model_dir, sizeof(model_dir), "%s/pgdocs-kimi-18m", tap_models_dir());
	if (!tap_ok(kl_tokenizer_load(model_dir, &tok, &err) == KL_OK, "tokenizer of pgdocs-kimi-18m loads"))
	{
		tap_diag("%s", err.msg);
		return tap_done();
	}
	snprintf(path, sizeof(path), "%s/golden/chat/kimi_chat.json", tap_fixture_dir());
	golden = json_load_file(path, 0, &jerr);
	if (!tap_ok(golden != NULL, "golden chat renders load (%s)", path))
		return tap_done();
	golden_renders(golden);
	golden_parsing(golden);
	reply_details();
	continuation(golden);
	recorded_ids();
	tokenizers(golden);
	bad_input();
	cli_chat_json();
	json_decref(golden);
	kl_tokenizer_free(tok);
	return tap_done();
}
