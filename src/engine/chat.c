/*
 * chat.c — the Kimi chat format with tools (see chat.h): reading messages
 * and tool declarations from JSON, rendering them as the Kimi Instruct
 * template does (text or token ids), and the output grammar of a reply.
 * Parsing replies is chat_reply.c.
 *
 * Rendering goes through a sink that receives plain text and special
 * tokens.  The text sink writes both out; the ids sink gathers text and
 * encodes it whenever a special token (or a message's recorded ids) comes,
 * so text between two special tokens is always encoded in one piece, as
 * the reference tokenizer does with the rendered text.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "json_constraint.h"
#include "json_text.h"

#define KIMI_DEFAULT_SYSTEM "You are Kimi, an AI assistant created by Moonshot AI."

/* ------------------------------------------------------------------ reading JSON */

static char *
dup_n(const char *s, size_t n, kl_err *err)
{
	char	   *d = kl_malloc(n + 1, err);

	if (d)
	{
		memcpy(d, s, n);
		d[n] = 0;
	}
	return d;
}

static json_t *
load_json(const char *text, size_t len, const char *what, kl_err *err)
{
	json_error_t jerr;
	json_t	   *v = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);

	if (!v)
		kl_errc(err, KL_E_INVALID,
				"%s is not valid JSON (line %d, column %d): %s", what, jerr.line, jerr.column, jerr.text);
	return v;
}

/* A message's content: a string, a list of text parts (joined), or null/absent. */
static int
read_content(json_t *c, kl_chat_msg *m, size_t i, kl_err *err)
{
	kl_buf		b = {0};

	if (!c || json_is_null(c))
		return KL_OK;
	if (json_is_string(c))
	{
		m->content = dup_n(json_string_value(c), json_string_length(c), err);
		m->content_len = json_string_length(c);
		return m->content ? KL_OK : KL_FAIL;
	}
	if (!json_is_array(c))
		return kl_errc(err, KL_E_INVALID,
					   "message %zu: \"content\" must be a string, a list of {\"type\": \"text\", \"text\": "
					   "...} parts, or null", i + 1);
	for (size_t k = 0; k < json_array_size(c); k++)
	{
		json_t	   *part = json_array_get(c, k);
		json_t	   *type = json_object_get(part, "type"),
				   *text = json_object_get(part, "text");

		if (!json_is_object(part))
		{
			kl_buf_free(&b);
			return kl_errc(err, KL_E_INVALID, "message %zu: content part %zu must be an object", i + 1, k + 1);
		}
		if (json_object_get(part, "image") || json_object_get(part, "image_url") ||
			(json_is_string(type) && strncmp(json_string_value(type), "image", 5) == 0))
		{
			kl_buf_free(&b);
			return kl_errc(err, KL_E_INVALID,
						   "message %zu: content part %zu is an image; these models read text only", i + 1,
						   k + 1);
		}
		if (!json_is_string(text) || (type && (!json_is_string(type) || strcmp(json_string_value(type), "text") != 0)))
		{
			kl_buf_free(&b);
			return kl_errc(err, KL_E_INVALID,
						   "message %zu: content part %zu must be {\"type\": \"text\", \"text\": \"...\"}",
						   i + 1, k + 1);
		}
		kl_buf_put(&b, json_string_value(text), json_string_length(text));
	}
	kl_buf_put(&b, "", 0);
	if (kl_buf_check(&b, err) != KL_OK)
	{
		kl_buf_free(&b);
		return KL_FAIL;
	}
	m->content = b.data;
	m->content_len = b.len;
	return KL_OK;
}

static int
read_calls(json_t *calls, kl_chat_msg *m, size_t i, kl_err *err)
{
	size_t		n;

	if (!calls || json_is_null(calls))
		return KL_OK;
	if (!json_is_array(calls))
		return kl_errc(err, KL_E_INVALID, "message %zu: \"tool_calls\" must be an array", i + 1);
	if (strcmp(m->role, "assistant") != 0)
		return kl_errc(err, KL_E_INVALID, "message %zu: only assistant messages have \"tool_calls\"", i + 1);
	n = json_array_size(calls);
	if (n == 0)
		return KL_OK;
	m->calls = kl_calloc(n, sizeof(kl_chat_call), err);
	if (!m->calls)
		return KL_FAIL;
	for (size_t k = 0; k < n; k++)
	{
		json_t	   *call = json_array_get(calls, k);
		json_t	   *fn = json_object_get(call, "function");
		json_t	   *name,
				   *args;
		kl_chat_call *c = &m->calls[m->n_calls];

		if (!json_is_object(call))
			return kl_errc(err, KL_E_INVALID, "message %zu: tool call %zu must be an object", i + 1, k + 1);
		/* OpenAI's {"function": {"name", "arguments"}}, or {"name", "arguments"} */
		if (fn && !json_is_object(fn))
			return kl_errc(err, KL_E_INVALID,
						   "message %zu: tool call %zu: \"function\" must be an object", i + 1, k + 1);
		name = json_object_get(fn ? fn : call, "name");
		args = json_object_get(fn ? fn : call, "arguments");
		if (!json_is_string(name) || json_string_length(name) == 0)
			return kl_errc(err, KL_E_INVALID, "message %zu: tool call %zu has no function name", i + 1, k + 1);
		if (!args)
			return kl_errc(err, KL_E_INVALID, "message %zu: tool call %zu (%s) has no \"arguments\"", i + 1, k + 1,
						   json_string_value(name));
		if (!(c->name = dup_n(json_string_value(name), json_string_length(name), err)))
			return KL_FAIL;
		m->n_calls++;
		if (json_is_string(args))
		{
			/* the text as given (what the model wrote, when it comes from a reply) */
			c->arguments = dup_n(json_string_value(args), json_string_length(args), err);
			c->arguments_len = json_string_length(args);
		}
		else
		{
			kl_buf		b = {0};

			kl_json_dump_py(&b, args, false);
			if (kl_buf_check(&b, err) != KL_OK)
			{
				kl_buf_free(&b);
				return KL_FAIL;
			}
			c->arguments = b.data;
			c->arguments_len = b.len;
		}
		if (!c->arguments)
			return KL_FAIL;
	}
	return KL_OK;
}

static int
read_token_ids(json_t *ids, kl_chat_msg *m, size_t i, kl_err *err)
{
	size_t		n;

	if (!ids || json_is_null(ids))
		return KL_OK;
	if (!json_is_array(ids) || strcmp(m->role, "assistant") != 0)
		return kl_errc(err, KL_E_INVALID,
					   "message %zu: \"token_ids\" must be an array of token ids of an assistant message",
					   i + 1);
	n = json_array_size(ids);
	m->token_ids = kl_malloc(sizeof(int32_t) * (n + 1), err);
	if (!m->token_ids)
		return KL_FAIL;
	for (size_t k = 0; k < n; k++)
	{
		json_t	   *v = json_array_get(ids, k);

		if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
			return kl_errc(err, KL_E_INVALID, "message %zu: \"token_ids\" must hold non-negative integers", i + 1);
		m->token_ids[k] = (int32_t) json_integer_value(v);
	}
	m->n_token_ids = n;
	return KL_OK;
}

static int
read_message(json_t *j, kl_chat_msg *m, size_t i, kl_err *err)
{
	json_t	   *role = json_object_get(j, "role"),
			   *name = json_object_get(j, "name"),
			   *tcid = json_object_get(j, "tool_call_id");
	const char *r;

	if (!json_is_object(j))
		return kl_errc(err, KL_E_INVALID, "message %zu must be an object {\"role\": ..., \"content\": ...}", i + 1);
	if (!json_is_string(role))
		return kl_errc(err, KL_E_INVALID, "message %zu has no \"role\"", i + 1);
	r = json_string_value(role);
	if (strcmp(r, "system") != 0 && strcmp(r, "user") != 0 && strcmp(r, "assistant") != 0 &&
		strcmp(r, "tool") != 0)
		return kl_errc(err, KL_E_INVALID,
					   "message %zu has the role \"%.64s\": the roles are system, user, assistant and tool",
					   i + 1, r);
	if (!(m->role = dup_n(r, strlen(r), err)))
		return KL_FAIL;
	if (name && !json_is_null(name))
	{
		if (!json_is_string(name))
			return kl_errc(err, KL_E_INVALID, "message %zu: \"name\" must be a string", i + 1);
		if (!(m->name = dup_n(json_string_value(name), json_string_length(name), err)))
			return KL_FAIL;
	}
	if (tcid && !json_is_null(tcid))
	{
		if (!json_is_string(tcid))
			return kl_errc(err, KL_E_INVALID, "message %zu: \"tool_call_id\" must be a string", i + 1);
		if (!(m->tool_call_id = dup_n(json_string_value(tcid), json_string_length(tcid), err)))
			return KL_FAIL;
	}
	if (read_content(json_object_get(j, "content"), m, i, err) != KL_OK ||
		read_calls(json_object_get(j, "tool_calls"), m, i, err) != KL_OK ||
		read_token_ids(json_object_get(j, "token_ids"), m, i, err) != KL_OK)
		return KL_FAIL;
	if (!m->content && strcmp(r, "assistant") != 0)
		return kl_errc(err, KL_E_INVALID, "message %zu (%s) has no \"content\"", i + 1, r);
	return KL_OK;
}

/* ------------------------------------------------------------------ tool declarations */

static const char *const tool_keys[] = {"type", "function", NULL};
static const char *const function_keys[] = {"name", "description", "parameters", "strict", NULL};
static const char *const schema_keys[] = {
	"type", "description", "enum", "const", "properties", "items", "required", "additionalProperties",
	"minItems", "maxItems", "minLength", "maxLength", NULL
};

/* A copy of obj with the keys of `order` first (in that order), then the others as they were. */
static json_t *
reorder(json_t *obj, const char *const *order)
{
	json_t	   *out = kl_json_new_object();
	const char *key;
	json_t	   *val;

	if (!out)
		return NULL;
	for (const char *const *k = order; *k; k++)
		if ((val = json_object_get(obj, *k)))
			json_object_set(out, *k, val);
	json_object_foreach(obj, key, val)
		if (!json_object_get(out, key))
		json_object_set(out, key, val);
	return out;
}

/* The usual key order through a schema (its properties' names keep theirs). */
static json_t *
reorder_schema(json_t *s)
{
	json_t	   *out,
			   *props,
			   *items,
			   *add;

	if (!json_is_object(s))
		return json_incref(s);
	out = reorder(s, schema_keys);
	if (!out)
		return NULL;
	if (json_is_object(props = json_object_get(out, "properties")))
	{
		json_t	   *np = kl_json_new_object();
		const char *key;
		json_t	   *val;

		json_object_foreach(props, key, val)
			json_object_set_new(np, key, reorder_schema(val));
		json_object_set_new(out, "properties", np);
	}
	if (json_is_object(items = json_object_get(out, "items")))
		json_object_set_new(out, "items", reorder_schema(items));
	if (json_is_object(add = json_object_get(out, "additionalProperties")))
		json_object_set_new(out, "additionalProperties", reorder_schema(add));
	return out;
}

static bool
valid_tool_name(const char *s, size_t n)
{
	if (n == 0 || n > 64)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') ||
			  s[i] == '_' || s[i] == '-'))
			return false;
	return true;
}

#define TOOL_FORM "{\"type\": \"function\", \"function\": {\"name\": ..., \"description\": ..., \"parameters\": {...}}}"

/* Check the declarations; with conventional_order, *tools is replaced by a reordered copy. */
static int
read_tools(kl_chat *c, json_t **tools, bool conventional_order, kl_err *err)
{
	json_t	   *t = *tools;
	size_t		n = json_array_size(t);

	if (!json_is_array(t) || n == 0)
		return kl_errc(err, KL_E_INVALID, "tools must be a non-empty JSON array of function declarations " TOOL_FORM);
	if (n > 256)
		return kl_errc(err, KL_E_RESOURCES, "at most 256 tools may be declared, got %zu", n);
	c->tools = kl_calloc(n, sizeof(kl_chat_tool), err);
	if (!c->tools)
		return KL_FAIL;
	for (size_t i = 0; i < n; i++)
	{
		json_t	   *d = json_array_get(t, i);
		json_t	   *fn = json_object_get(d, "function"),
				   *type = json_object_get(d, "type"),
				   *name,
				   *desc,
				   *params,
				   *strict;
		const char *key;
		json_t	   *val;
		char		what[128];

		if (!json_is_object(d) || !json_is_string(type) || strcmp(json_string_value(type), "function") != 0 ||
			!json_is_object(fn))
			return kl_errc(err, KL_E_INVALID, "tool %zu must be a function declaration " TOOL_FORM, i + 1);
		json_object_foreach(d, key, val)
			if (!(key[0] && (strcmp(key, tool_keys[0]) == 0 || strcmp(key, tool_keys[1]) == 0)))
			return kl_errc(err, KL_E_INVALID, "tool %zu has the unknown field \"%s\" (a declaration has \"type\" and "
						   "\"function\")", i + 1, key);
		json_object_foreach(fn, key, val)
		{
			bool		known = false;

			for (const char *const *k = function_keys; *k; k++)
				known = known || strcmp(*k, key) == 0;
			if (!known)
				return kl_errc(err, KL_E_INVALID,
							   "tool %zu: the function has the unknown field \"%s\" (name, description, "
							   "parameters, strict)", i + 1, key);
		}
		name = json_object_get(fn, "name");
		desc = json_object_get(fn, "description");
		params = json_object_get(fn, "parameters");
		strict = json_object_get(fn, "strict");
		if (!json_is_string(name) || !valid_tool_name(json_string_value(name), json_string_length(name)))
			return kl_errc(err, KL_E_INVALID,
						   "tool %zu: the function's \"name\" must be 1 to 64 letters, digits, _ or -", i + 1);
		for (size_t k = 0; k < i; k++)
			if (strcmp(c->tools[k].name, json_string_value(name)) == 0)
				return kl_errc(err, KL_E_INVALID, "tool %zu: a function named \"%s\" is declared twice", i + 1,
							   json_string_value(name));
		if (desc && !json_is_string(desc))
			return kl_errc(err, KL_E_INVALID, "tool \"%s\": \"description\" must be a string", json_string_value(name));
		if (strict && !json_is_boolean(strict))
			return kl_errc(err, KL_E_INVALID, "tool \"%s\": \"strict\" must be true or false", json_string_value(name));
		if (!(c->tools[i].name = dup_n(json_string_value(name), json_string_length(name), err)))
			return KL_FAIL;
		c->n_tools++;
		if (params && !json_is_null(params))
		{
			json_t	   *ptype = json_object_get(params, "type");

			snprintf(what, sizeof(what), "tool \"%s\" parameters", json_string_value(name));
			if (!json_is_object(params) ||
				(ptype && !(json_is_string(ptype) && strcmp(json_string_value(ptype), "object") == 0)))
				return kl_errc(err, KL_E_INVALID, "%s must be a JSON schema of an object ({\"type\": \"object\", "
							   "\"properties\": {...}})", what);
			if (!(c->tools[i].parameters = json_dumps(params, JSON_COMPACT | JSON_ENCODE_ANY)))
				return kl_errc(err, KL_E_RESOURCES, "out of memory");
			if (kl_json_schema_check(c->tools[i].parameters, strlen(c->tools[i].parameters), what, err) != KL_OK)
				return KL_FAIL;
		}
	}
	if (conventional_order)
	{
		json_t	   *out = json_array();

		for (size_t i = 0; i < n; i++)
		{
			json_t	   *d = reorder(json_array_get(t, i), tool_keys);
			json_t	   *fn = d ? reorder(json_object_get(d, "function"), function_keys) : NULL;
			json_t	   *params = fn ? json_object_get(fn, "parameters") : NULL;

			if (!d || !fn)
				return kl_errc(err, KL_E_RESOURCES, "out of memory");
			if (params)
				json_object_set_new(fn, "parameters", reorder_schema(params));
			json_object_set_new(d, "function", fn);
			json_array_append_new(out, d);
		}
		json_decref(*tools);
		*tools = out;
	}
	{
		kl_buf		b = {0};

		kl_json_dump_py(&b, *tools, false);
		if (kl_buf_check(&b, err) != KL_OK)
		{
			kl_buf_free(&b);
			return KL_FAIL;
		}
		c->tools_text = b.data;
		c->tools_len = b.len;
	}
	return KL_OK;
}

int
kl_chat_parse(const char *messages_json, size_t messages_len, const char *tools_json, size_t tools_len,
			  bool conventional_order, kl_chat **out, kl_err *err)
{
	kl_chat    *c = kl_calloc(1, sizeof(kl_chat), err);
	json_t	   *msgs = NULL,
			   *tools = NULL;

	*out = NULL;
	if (!c)
		return KL_FAIL;
	if (messages_json)
	{
		if (!(msgs = load_json(messages_json, messages_len, "messages", err)))
			goto fail;
		if (!json_is_array(msgs))
		{
			kl_errc(err, KL_E_INVALID, "messages must be a JSON array of {\"role\": ..., \"content\": ...} objects");
			goto fail;
		}
		if (json_array_size(msgs) > 0 &&
			!(c->msgs = kl_calloc(json_array_size(msgs), sizeof(kl_chat_msg), err)))
			goto fail;
		for (size_t i = 0; i < json_array_size(msgs); i++)
		{
			c->n = i + 1;
			if (read_message(json_array_get(msgs, i), &c->msgs[i], i, err) != KL_OK)
				goto fail;
		}
	}
	if (tools_json)
	{
		if (!(tools = load_json(tools_json, tools_len, "tools", err)) ||
			read_tools(c, &tools, conventional_order, err) != KL_OK)
			goto fail;
		/* with declarations, the calls in the history must name declared tools */
		for (size_t i = 0; i < c->n; i++)
			for (int k = 0; k < c->msgs[i].n_calls; k++)
			{
				bool		known = false;

				for (int t = 0; t < c->n_tools && !known; t++)
					known = strcmp(c->tools[t].name, c->msgs[i].calls[k].name) == 0;
				if (!known)
				{
					kl_errc(err, KL_E_INVALID, "message %zu calls \"%.64s\", which is not a declared tool", i + 1,
							c->msgs[i].calls[k].name);
					goto fail;
				}
			}
	}
	json_decref(msgs);
	json_decref(tools);
	*out = c;
	return KL_OK;
fail:
	json_decref(msgs);
	json_decref(tools);
	kl_chat_free(c);
	return KL_FAIL;
}

void
kl_chat_free(kl_chat *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n; i++)
	{
		kl_chat_msg *m = &c->msgs[i];

		free(m->role);
		free(m->name);
		free(m->content);
		free(m->tool_call_id);
		free(m->token_ids);
		for (int k = 0; k < m->n_calls; k++)
		{
			free(m->calls[k].name);
			free(m->calls[k].arguments);
		}
		free(m->calls);
	}
	free(c->msgs);
	for (int i = 0; i < c->n_tools; i++)
	{
		free(c->tools[i].name);
		free(c->tools[i].parameters);
	}
	free(c->tools);
	free(c->tools_text);
	free(c);
}

int
kl_chat_count_calls(const kl_chat *c)
{
	int			n = 0;

	for (size_t i = 0; i < c->n; i++)
		n += c->msgs[i].n_calls;
	return n;
}

/* ------------------------------------------------------------------ formats */

void
kl_chat_format_kimi(kl_chat_format *f)
{
	memset(f, 0, sizeof(*f));
	f->has_default_system = true;
	strcpy(f->default_system, KIMI_DEFAULT_SYSTEM);
	f->default_system_newline = true;
}

void
kl_chat_format_of(const kl_tokenizer *tok, kl_chat_format *f)
{
	const char *t = tok ? kl_tokenizer_chat_template(tok) : NULL;
	static const char *const conds[] = {
		"messages[0]['role'] != 'system'", "messages[0][\"role\"] != \"system\"", "messages[0].role != 'system'",
		NULL
	};
	const char *at = NULL,
			   *open,
			   *text,
			   *end;

	memset(f, 0, sizeof(*f));
	if (!t)
		return;
	for (int i = 0; conds[i] && !at; i++)
		at = strstr(t, conds[i]);
	if (!at || !(open = strstr(at, "<|im_system|>system<|im_middle|>")))
		return;
	text = open + strlen("<|im_system|>system<|im_middle|>");
	if (!(end = strstr(text, "<|im_end|>")) || (size_t) (end - text) >= sizeof(f->default_system) ||
		memchr(text, '{', (size_t) (end - text)) != NULL)
		return;					/* not a plain text default: leave it out */
	memcpy(f->default_system, text, (size_t) (end - text));
	f->default_system[end - text] = 0;
	f->has_default_system = true;
	/* the line ends after <|im_end|> and the block tag follows on the next line: the newline stays */
	end += strlen("<|im_end|>");
	if (*end == '\n')
	{
		const char *p = end + 1;

		while (*p == ' ' || *p == '\t')
			p++;
		f->default_system_newline = strncmp(p, "{%", 2) == 0 && p[2] != '-';
	}
}

/* ------------------------------------------------------------------ rendering */

typedef struct sink
{
	const kl_tokenizer *tok;
	kl_ids	   *ids;			/* ids mode; else text mode */
	kl_buf		text;			/* text mode: the rendering; ids mode: text not yet encoded */
	kl_err	   *err;
	int			rc;
} sink;

static void
sink_text(sink *s, const char *p, size_t n)
{
	kl_buf_put(&s->text, p, n);
}

static void
sink_flush(sink *s)
{
	if (!s->ids || s->rc != KL_OK)
		return;
	if (kl_buf_check(&s->text, s->err) != KL_OK)
	{
		s->rc = KL_FAIL;
		return;
	}
	if (s->text.len > 0 && kl_encode(s->tok, s->text.data, s->text.len, false, s->ids, s->err) != KL_OK)
		s->rc = KL_FAIL;
	s->text.len = 0;
}

static void
sink_special(sink *s, const char *name)
{
	int32_t		id;

	if (s->rc != KL_OK)
		return;
	if (!s->ids)
	{
		kl_buf_puts(&s->text, name);
		return;
	}
	sink_flush(s);
	id = kl_tokenizer_special_id(s->tok, name);
	if (id < 0)
	{
		s->rc = strncmp(name, "<|tool", 6) == 0
			? kl_errc(s->err, KL_E_INVALID,
					  "this model's tokenizer has no %s token, so it cannot render tools or tool calls "
					  "in the Kimi format (its tokenizer_config.json must declare the tool tokens)", name)
			: kl_errc(s->err, KL_E_INVALID,
					  "this model's tokenizer has no %s token, so it has no Kimi chat format", name);
		return;
	}
	if (kl_ids_push(s->ids, id, s->err) != KL_OK)
		s->rc = KL_FAIL;
}

static bool
is_stop_id(const kl_tokenizer *tok, int32_t id)
{
	int32_t		stops[8];
	int			n = kl_tokenizer_stop_ids(tok, stops, 8);

	for (int i = 0; i < n; i++)
		if (stops[i] == id)
			return true;
	return id == kl_tokenizer_special_id(tok, "<|im_end|>");
}

/* An assistant reply's recorded ids (then <|im_end|> if the reply was cut off). */
static void
sink_reply_ids(sink *s, const int32_t *ids, size_t n)
{
	bool		closed = n > 0 && is_stop_id(s->tok, ids[n - 1]);

	if (s->rc != KL_OK)
		return;
	for (size_t i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= kl_tokenizer_n_vocab(s->tok))
		{
			s->rc = kl_errc(s->err, KL_E_INVALID, "token id %d is not in the vocabulary", ids[i]);
			return;
		}
	if (s->ids)
	{
		sink_flush(s);
		for (size_t i = 0; i < n && s->rc == KL_OK; i++)
			if (kl_ids_push(s->ids, ids[i], s->err) != KL_OK)
				s->rc = KL_FAIL;
	}
	else
	{
		char	   *t;
		size_t		l;

		if (kl_decode_text(s->tok, ids, n, &t, &l, s->err) != KL_OK)
		{
			s->rc = KL_FAIL;
			return;
		}
		sink_text(s, t, l);
		free(t);
	}
	if (!closed)
		sink_special(s, "<|im_end|>");
}

static void
render_header(sink *s, const kl_chat_msg *m)
{
	const char *role = m->role;
	const char *shown = m->name && m->name[0] ? m->name : role;

	if (strcmp(role, "user") == 0)
		sink_special(s, "<|im_user|>");
	else if (strcmp(role, "assistant") == 0)
		sink_special(s, "<|im_assistant|>");
	else
		sink_special(s, "<|im_system|>");
	sink_text(s, shown, strlen(shown));
	sink_special(s, "<|im_middle|>");
}

/* the tool-call ids waiting for results, in order (the template's queue) */
typedef struct call_queue
{
	char	  **ids;
	int			head,
				n,
				cap;
} call_queue;

static int
queue_push(call_queue *q, const char *id, kl_err *err)
{
	if (q->n == q->cap)
	{
		int			cap = q->cap ? q->cap * 2 : 8;
		char	  **p = realloc(q->ids, sizeof(char *) * (size_t) cap);

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		q->ids = p;
		q->cap = cap;
	}
	if (!(q->ids[q->n] = strdup(id)))
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	q->n++;
	return KL_OK;
}

static void
queue_free(call_queue *q)
{
	for (int i = 0; i < q->n; i++)
		free(q->ids[i]);
	free(q->ids);
}

static void
render_calls(sink *s, const kl_chat_msg *m, int *counter, call_queue *q)
{
	sink_special(s, KL_TOK_SECTION_BEGIN);
	for (int k = 0; k < m->n_calls && s->rc == KL_OK; k++)
	{
		char		id[128];

		snprintf(id, sizeof(id), "functions.%.64s:%d", m->calls[k].name, (*counter)++);
		if (queue_push(q, id, s->err) != KL_OK)
		{
			s->rc = KL_FAIL;
			return;
		}
		sink_special(s, KL_TOK_CALL_BEGIN);
		sink_text(s, id, strlen(id));
		sink_special(s, KL_TOK_ARG_BEGIN);
		sink_text(s, m->calls[k].arguments, m->calls[k].arguments_len);
		sink_special(s, KL_TOK_CALL_END);
	}
	sink_special(s, KL_TOK_SECTION_END);
}

static void
render_tool_result(sink *s, const kl_chat_msg *m, size_t i, int counter, call_queue *q)
{
	char		fallback[128];
	const char *id;

	if (q->head < q->n)
		id = q->ids[q->head++];
	else
	{
		/* no call waiting: the template names one after the message */
		snprintf(fallback, sizeof(fallback), "functions.%.64s:%d", m->name ? m->name : "unknown", counter);
		id = fallback;
	}
	if (m->tool_call_id && q->head > 0 && id != fallback && strcmp(m->tool_call_id, id) != 0)
	{
		s->rc = kl_errc(s->err, KL_E_INVALID,
						"message %zu is the result of \"%.100s\", but the result of \"%.100s\" comes next "
						"(results must follow the order of the calls)", i + 1, m->tool_call_id, id);
		return;
	}
	sink_text(s, "## Return of ", 13);
	sink_text(s, id, strlen(id));
	sink_text(s, "\n", 1);
	if (m->content)
		sink_text(s, m->content, m->content_len);
}

static int
render(sink *s, const kl_chat *c, const kl_chat_render_opts *o)
{
	call_queue	q = {0};
	int			counter = o->continuation ? o->call_counter : 0;

	for (int i = 0; o->continuation && i < o->n_pending; i++)
		if (queue_push(&q, o->pending_calls[i], s->err) != KL_OK)
		{
			queue_free(&q);
			return KL_FAIL;
		}
	if (c->tools_text && !o->continuation)
	{
		sink_special(s, "<|im_system|>");
		sink_text(s, "tool_declare", 12);
		sink_special(s, "<|im_middle|>");
		sink_text(s, c->tools_text, c->tools_len);
		sink_special(s, "<|im_end|>");
	}
	for (size_t i = 0; i < c->n && s->rc == KL_OK; i++)
	{
		const kl_chat_msg *m = &c->msgs[i];

		if (i == 0 && !o->continuation && strcmp(m->role, "system") != 0 && o->format &&
			o->format->has_default_system)
		{
			sink_special(s, "<|im_system|>");
			sink_text(s, "system", 6);
			sink_special(s, "<|im_middle|>");
			sink_text(s, o->format->default_system, strlen(o->format->default_system));
			sink_special(s, "<|im_end|>");
			if (o->format->default_system_newline)
				sink_text(s, "\n", 1);
		}
		render_header(s, m);
		if (m->token_ids && s->tok)
		{
			/* the reply as generated: its ids are what the model read */
			int			n_calls = m->n_calls;

			for (int k = 0; k < n_calls && s->rc == KL_OK; k++)
			{
				char		id[128];

				snprintf(id, sizeof(id), "functions.%.64s:%d", m->calls[k].name, counter++);
				if (queue_push(&q, id, s->err) != KL_OK)
					s->rc = KL_FAIL;
			}
			sink_reply_ids(s, m->token_ids, m->n_token_ids);
			continue;
		}
		if (strcmp(m->role, "assistant") == 0 && m->n_calls > 0)
		{
			if (m->content)
				sink_text(s, m->content, m->content_len);
			render_calls(s, m, &counter, &q);
		}
		else if (strcmp(m->role, "tool") == 0)
			render_tool_result(s, m, i, counter, &q);
		else if (m->content)
			sink_text(s, m->content, m->content_len);
		sink_special(s, "<|im_end|>");
	}
	if (o->add_generation_prompt)
	{
		sink_special(s, "<|im_assistant|>");
		sink_text(s, "assistant", 9);
		sink_special(s, "<|im_middle|>");
	}
	sink_flush(s);
	queue_free(&q);
	if (s->rc == KL_OK && kl_buf_check(&s->text, s->err) != KL_OK)
		s->rc = KL_FAIL;
	return s->rc;
}

int
kl_chat_render_text(const kl_chat *c, const kl_chat_render_opts *o, const kl_tokenizer *tok, char **text,
					size_t *len, kl_err *err)
{
	sink		s = {0};

	s.tok = tok;
	s.err = err;
	*text = NULL;
	*len = 0;
	if (render(&s, c, o) != KL_OK)
	{
		kl_buf_free(&s.text);
		return KL_FAIL;
	}
	kl_buf_put(&s.text, "", 0);
	*text = s.text.data;
	*len = s.text.len;
	return KL_OK;
}

int
kl_chat_render_ids(const kl_tokenizer *tok, const kl_chat *c, const kl_chat_render_opts *o, kl_ids *out,
				   kl_err *err)
{
	sink		s = {0};
	size_t		before = out->n;

	s.tok = tok;
	s.ids = out;
	s.err = err;
	if (render(&s, c, o) != KL_OK)
	{
		out->n = before;
		kl_buf_free(&s.text);
		return KL_FAIL;
	}
	kl_buf_free(&s.text);
	return KL_OK;
}

/* The plain chat API of tokenizer.h, on the same renderer. */
int
kl_chat_render(const kl_tokenizer *tok, const kl_chat_message *msgs, size_t n, bool add_generation_prompt,
			   kl_ids *out, kl_err *err)
{
	kl_chat		c = {0};
	kl_chat_format f;
	kl_chat_render_opts o = {0};
	int			rc;

	c.msgs = calloc(n + 1, sizeof(kl_chat_msg));
	if (!c.msgs)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	c.n = n;
	for (size_t i = 0; i < n; i++)
	{
		const char *role = msgs[i].role;
		size_t		bad;

		if (!role || (strcmp(role, "system") != 0 && strcmp(role, "user") != 0 && strcmp(role, "assistant") != 0))
		{
			free(c.msgs);
			return kl_errc(err, KL_E_INVALID,
						   "message %zu has the role \"%.64s\": the roles are system, user and assistant",
						   i + 1, role ? role : "(none)");
		}
		if (msgs[i].content_len > 0 && !msgs[i].content)
		{
			free(c.msgs);
			return kl_errc(err, KL_E_INVALID,
						   "message %zu has no content (NULL with length %zu)", i + 1, msgs[i].content_len);
		}
		if (!kl_utf8_valid(msgs[i].content, msgs[i].content_len, &bad))
		{
			free(c.msgs);
			return kl_errc(err, KL_E_INVALID,
						   "message %zu (%s): the text is not valid UTF-8 at byte %zu (of %zu): give UTF-8 "
						   "text", i + 1, role, bad, msgs[i].content_len);
		}
		c.msgs[i].role = (char *) role;
		c.msgs[i].content = (char *) (msgs[i].content ? msgs[i].content : "");
		c.msgs[i].content_len = msgs[i].content_len;
	}
	kl_chat_format_of(tok, &f);
	o.format = &f;
	o.add_generation_prompt = add_generation_prompt;
	rc = kl_chat_render_ids(tok, &c, &o, out, err);
	free(c.msgs);
	return rc;
}

/* ------------------------------------------------------------------ output grammar */

int
kl_chat_grammar_spec(const kl_chat *c, const char *tool_choice, const char *schema_json, size_t schema_len,
					 int first_index, char **spec, kl_err *err)
{
	json_t	   *s,
			   *schema = NULL;
	kl_grammar *g;

	*spec = NULL;
	if (tool_choice && c->n_tools == 0 && strcmp(tool_choice, "none") != 0 && strcmp(tool_choice, "auto") != 0)
		return kl_errc(err, KL_E_INVALID, "tool_choice is \"%s\" but no tools are declared", tool_choice);
	if (tool_choice && strcmp(tool_choice, "auto") != 0 && strcmp(tool_choice, "none") != 0 &&
		strcmp(tool_choice, "required") != 0)
	{
		bool		found = false;

		for (int i = 0; i < c->n_tools; i++)
			found = found || strcmp(c->tools[i].name, tool_choice) == 0;
		if (!found)
			return kl_errc(err, KL_E_INVALID, "tool_choice names \"%s\", which is not a declared tool", tool_choice);
	}
	if (c->n_tools == 0 && !schema_json)
		return KL_OK;			/* free text */
	if (schema_json && !(schema = load_json(schema_json, schema_len, "json_schema", err)))
		return KL_FAIL;
	s = kl_json_new_object();
	if (!s)
	{
		json_decref(schema);
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	}
	if (schema)
		json_object_set_new(s, "json_schema", schema);
	if (c->n_tools > 0)
	{
		json_t	   *tools = json_array();

		for (int i = 0; i < c->n_tools; i++)
		{
			json_t	   *t = kl_json_new_object();

			json_object_set_new(t, "name", json_string(c->tools[i].name));
			if (c->tools[i].parameters)
				json_object_set_new(t, "parameters", json_loads(c->tools[i].parameters, 0, NULL));
			json_array_append_new(tools, t);
		}
		json_object_set_new(s, "tools", tools);
		json_object_set_new(s, "tool_choice", json_string(tool_choice ? tool_choice : "auto"));
		json_object_set_new(s, "first_index", json_integer(first_index));
	}
	*spec = json_dumps(s, JSON_COMPACT);
	json_decref(s);
	if (!*spec)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	/* compile it once here, so that a bad schema is reported before any work */
	if (kl_grammar_compile(*spec, strlen(*spec), &g, err) != KL_OK)
	{
		free(*spec);
		*spec = NULL;
		return KL_FAIL;
	}
	kl_grammar_free(g);
	return KL_OK;
}
