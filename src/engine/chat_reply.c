/*
 * chat_reply.c — what a model's reply says, in the Kimi format: its text
 * content and its tool calls (see chat.h, kl_chat_parse_reply_*).
 *
 * The reply is first cut into segments — text, or one of the tool-call
 * special tokens — from its ids (exact: a tool token is its id, never text
 * that looks like it) or from its text (special tokens written out, as in
 * the golden parsing cases).  Then one pass reads:
 *
 *   content  <|tool_calls_section_begin|>
 *            ( <|tool_call_begin|> id <|tool_call_argument_begin|> arguments <|tool_call_end|> )*
 *            <|tool_calls_section_end|>  [end token]
 *
 * A call the reply stops inside (max_tokens) is reported as cut off; its
 * arguments are then never passed off as JSON.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "json_text.h"

typedef enum seg_kind
{
	SEG_TEXT,
	SEG_SECTION_BEGIN,
	SEG_SECTION_END,
	SEG_CALL_BEGIN,
	SEG_ARG_BEGIN,
	SEG_CALL_END,
	SEG_END						/* the end token: nothing after it counts */
} seg_kind;

typedef struct segment
{
	seg_kind	kind;
	char	   *text;			/* SEG_TEXT, malloc'd */
	size_t		len;
} segment;

typedef struct seg_list
{
	segment    *s;
	size_t		n,
				cap;
} seg_list;

static const struct
{
	const char *text;
	seg_kind	kind;
}			markers[] = {
	{KL_TOK_SECTION_BEGIN, SEG_SECTION_BEGIN},
	{KL_TOK_SECTION_END, SEG_SECTION_END},
	{KL_TOK_CALL_BEGIN, SEG_CALL_BEGIN},
	{KL_TOK_ARG_BEGIN, SEG_ARG_BEGIN},
	{KL_TOK_CALL_END, SEG_CALL_END},
	{"<|im_end|>", SEG_END},
	{"[EOS]", SEG_END},
};

#define N_MARKERS (sizeof(markers) / sizeof(markers[0]))

static int
seg_add(seg_list *l, seg_kind kind, const char *text, size_t len, kl_err *err)
{
	segment    *s;

	/* consecutive text joins */
	if (kind == SEG_TEXT && l->n > 0 && l->s[l->n - 1].kind == SEG_TEXT)
	{
		segment    *prev = &l->s[l->n - 1];
		char	   *p = realloc(prev->text, prev->len + len + 1);

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		memcpy(p + prev->len, text, len);
		prev->len += len;
		p[prev->len] = 0;
		prev->text = p;
		return KL_OK;
	}
	if (l->n == l->cap)
	{
		size_t		cap = l->cap ? l->cap * 2 : 16;
		segment    *p = realloc(l->s, sizeof(segment) * cap);

		if (!p)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		l->s = p;
		l->cap = cap;
	}
	s = &l->s[l->n];
	s->kind = kind;
	s->text = NULL;
	s->len = len;
	if (kind == SEG_TEXT)
	{
		if (!(s->text = malloc(len + 1)))
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
		memcpy(s->text, text, len);
		s->text[len] = 0;
	}
	l->n++;
	return KL_OK;
}

static void
seg_free(seg_list *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->s[i].text);
	free(l->s);
}

static int
segments_of_text(const char *t, size_t len, seg_list *l, kl_err *err)
{
	size_t		run = 0;

	for (size_t i = 0; i < len; i++)
	{
		if (t[i] != '<' && t[i] != '[')
			continue;
		for (size_t k = 0; k < N_MARKERS; k++)
		{
			size_t		ml = strlen(markers[k].text);

			if (ml <= len - i && memcmp(t + i, markers[k].text, ml) == 0)
			{
				if ((i > run && seg_add(l, SEG_TEXT, t + run, i - run, err) != KL_OK) ||
					seg_add(l, markers[k].kind, NULL, 0, err) != KL_OK)
					return KL_FAIL;
				i += ml - 1;
				run = i + 1;
				break;
			}
		}
	}
	if (len > run)
		return seg_add(l, SEG_TEXT, t + run, len - run, err);
	return KL_OK;
}

static int
segments_of_ids(const kl_tokenizer *tok, const int32_t *ids, size_t n, seg_list *l, kl_err *err)
{
	int32_t		marker_id[N_MARKERS];
	int32_t		stops[8];
	int			n_stops = kl_tokenizer_stop_ids(tok, stops, 8);
	size_t		run = 0;

	for (size_t k = 0; k < N_MARKERS; k++)
		marker_id[k] = kl_tokenizer_special_id(tok, markers[k].text);
	for (size_t i = 0; i <= n; i++)
	{
		int			kind = -1;

		if (i < n)
		{
			for (size_t k = 0; k < N_MARKERS && kind < 0; k++)
				if (marker_id[k] >= 0 && ids[i] == marker_id[k])
					kind = markers[k].kind;
			for (int k = 0; k < n_stops && kind < 0; k++)
				if (ids[i] == stops[k])
					kind = SEG_END;
			if (kind < 0)
				continue;
		}
		if (i > run)
		{
			char	   *t;
			size_t		tl;

			/* other special tokens stay as their text */
			if (kl_decode_text(tok, ids + run, i - run, &t, &tl, err) != KL_OK)
				return KL_FAIL;
			if (seg_add(l, SEG_TEXT, t, tl, err) != KL_OK)
			{
				free(t);
				return KL_FAIL;
			}
			free(t);
		}
		if (kind >= 0 && seg_add(l, (seg_kind) kind, NULL, 0, err) != KL_OK)
			return KL_FAIL;
		run = i + 1;
	}
	return KL_OK;
}

/* ------------------------------------------------------------------ reading the segments */

static char *
xstrdup(const char *s, size_t n)
{
	char	   *d = malloc(n + 1);

	if (d)
	{
		memcpy(d, s, n);
		d[n] = 0;
	}
	return d;
}

static char *
errdup(const char *fmt, const char *a)
{
	char		buf[512];

	snprintf(buf, sizeof(buf), fmt, a);
	return strdup(buf);
}

static bool
only_space(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (s[i] != ' ' && s[i] != '\n' && s[i] != '\t' && s[i] != '\r')
			return false;
	return true;
}

/* functions.NAME:K -> NAME (malloc'd), or NULL if the id is not of that form */
static char *
name_of_id(const char *id)
{
	const char *p = id,
			   *colon,
			   *d;

	while (*p == ' ' || *p == '\n')
		p++;
	if (strncmp(p, "functions.", 10) == 0)
		p += 10;
	colon = strrchr(p, ':');
	if (!colon || colon == p)
		return NULL;
	for (d = colon + 1; *d >= '0' && *d <= '9'; d++)
		;
	if (d == colon + 1 || !only_space(d, strlen(d)))
		return NULL;
	return xstrdup(p, (size_t) (colon - p));
}

static void
check_call(kl_reply_call *c, const kl_chat *tools)
{
	json_error_t jerr;
	json_t	   *args;

	if (c->error)
		return;
	if (!c->name)
	{
		c->error = errdup("the call id \"%.100s\" is not of the form functions.NAME:INDEX", c->id);
		return;
	}
	if (tools)
	{
		bool		known = false;

		for (int i = 0; i < tools->n_tools && !known; i++)
			known = strcmp(tools->tools[i].name, c->name) == 0;
		if (!known)
		{
			c->error = errdup("the model called \"%.100s\", which is not a declared tool", c->name);
			return;
		}
	}
	args = json_loadb(c->arguments, c->arguments_len, JSON_REJECT_DUPLICATES, &jerr);
	if (!args)
	{
		c->error = errdup("the arguments are not valid JSON: %.200s", jerr.text);
		return;
	}
	if (!json_is_object(args))
		c->error = strdup("the arguments are not a JSON object");
	json_decref(args);
}

static int
add_call(kl_chat_reply *r, const char *id, size_t id_len, kl_err *err)
{
	kl_reply_call *p = realloc(r->calls, sizeof(kl_reply_call) * (size_t) (r->n_calls + 1));
	kl_reply_call *c;

	if (!p)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	r->calls = p;
	c = &r->calls[r->n_calls++];
	memset(c, 0, sizeof(*c));
	c->id = xstrdup(id, id_len);
	c->arguments = xstrdup("", 0);
	if (!c->id || !c->arguments)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	c->name = name_of_id(c->id);
	return KL_OK;
}

static int
append_text(char **s, size_t *len, const char *t, size_t n, kl_err *err)
{
	char	   *p = realloc(*s, *len + n + 1);

	if (!p)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	memcpy(p + *len, t, n);
	*len += n;
	p[*len] = 0;
	*s = p;
	return KL_OK;
}

typedef enum
{
	ST_CONTENT,
	ST_SECTION,
	ST_ID,
	ST_ARGS,
	ST_AFTER
} read_state;

static int
read_reply(const seg_list *l, const kl_chat *tools, kl_chat_reply *r, kl_err *err)
{
	read_state	st = ST_CONTENT;
	kl_reply_call *cur = NULL;

	if (!(r->content = xstrdup("", 0)))
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	for (size_t i = 0; i < l->n; i++)
	{
		const segment *s = &l->s[i];

		if (s->kind == SEG_END)
			break;
		switch (st)
		{
			case ST_CONTENT:
			case ST_AFTER:
				if (s->kind == SEG_TEXT)
				{
					if (append_text(&r->content, &r->content_len, s->text, s->len, err) != KL_OK)
						return KL_FAIL;
				}
				else if (s->kind == SEG_SECTION_BEGIN && st == ST_CONTENT)
					st = ST_SECTION;
				else
				{
					/* a tool token out of place: a call that cannot be read */
					if (add_call(r, "", 0, err) != KL_OK)
						return KL_FAIL;
					r->calls[r->n_calls - 1].error =
						strdup("a tool-call token outside a tool-call section (or a second section)");
				}
				break;
			case ST_SECTION:
				if (s->kind == SEG_CALL_BEGIN)
				{
					if (add_call(r, "", 0, err) != KL_OK)
						return KL_FAIL;
					cur = &r->calls[r->n_calls - 1];
					st = ST_ID;
				}
				else if (s->kind == SEG_SECTION_END)
					st = ST_AFTER;
				else if (s->kind != SEG_TEXT || !only_space(s->text, s->len))
				{
					if (add_call(r, "", 0, err) != KL_OK)
						return KL_FAIL;
					r->calls[r->n_calls - 1].error = strdup("unexpected text or token between tool calls");
				}
				break;
			case ST_ID:
				if (s->kind == SEG_TEXT)
				{
					free(cur->id);
					free(cur->name);
					cur->id = xstrdup(s->text, s->len);
					cur->name = cur->id ? name_of_id(cur->id) : NULL;
					if (!cur->id)
						return kl_errc(err, KL_E_RESOURCES, "out of memory");
				}
				else if (s->kind == SEG_ARG_BEGIN)
					st = ST_ARGS;
				else
				{
					cur->error = strdup("the call has no <|tool_call_argument_begin|> before its end");
					st = s->kind == SEG_SECTION_END ? ST_AFTER : ST_SECTION;
				}
				break;
			case ST_ARGS:
				if (s->kind == SEG_TEXT)
				{
					if (append_text(&cur->arguments, &cur->arguments_len, s->text, s->len, err) != KL_OK)
						return KL_FAIL;
				}
				else if (s->kind == SEG_CALL_END)
				{
					check_call(cur, tools);
					st = ST_SECTION;
				}
				else
				{
					cur->error = strdup("the call's arguments end without <|tool_call_end|>");
					st = s->kind == SEG_SECTION_END ? ST_AFTER : ST_SECTION;
				}
				break;
		}
		/* calls may have moved (realloc): cur is re-pointed at the last one */
		if (r->n_calls > 0 && (st == ST_ID || st == ST_ARGS))
			cur = &r->calls[r->n_calls - 1];
	}
	if ((st == ST_ID || st == ST_ARGS) && cur && !cur->error)
		cur->error = strdup("the reply ends inside this call (cut off, e.g. by max_tokens): it is incomplete");
	for (int i = 0; i < r->n_calls; i++)
		if (!r->calls[i].error && !r->calls[i].name)
			check_call(&r->calls[i], tools);
	for (int i = 0; i < r->n_calls; i++)
		if (!r->calls[i].id || !r->calls[i].arguments)
			return kl_errc(err, KL_E_RESOURCES, "out of memory");
	return KL_OK;
}

static int
parse(seg_list *l, int rc, const kl_chat *tools, kl_chat_reply **out, kl_err *err)
{
	kl_chat_reply *r;

	*out = NULL;
	if (rc != KL_OK)
	{
		seg_free(l);
		return KL_FAIL;
	}
	r = kl_calloc(1, sizeof(kl_chat_reply), err);
	if (!r)
	{
		seg_free(l);
		return KL_FAIL;
	}
	rc = read_reply(l, tools, r, err);
	seg_free(l);
	if (rc != KL_OK)
	{
		kl_chat_reply_free(r);
		return KL_FAIL;
	}
	/* the content as valid UTF-8 (a reply may stop inside a character) */
	{
		size_t		bad;

		if (!kl_utf8_valid(r->content, r->content_len, &bad))
		{
			kl_buf		b = {0};

			for (size_t i = 0; i < r->content_len; i++)
			{
				if (kl_utf8_valid(r->content + i, r->content_len - i, &bad))
				{
					kl_buf_put(&b, r->content + i, r->content_len - i);
					break;
				}
				kl_buf_put(&b, r->content + i, bad);
				kl_buf_puts(&b, "\xEF\xBF\xBD");
				i += bad;
			}
			kl_buf_put(&b, "", 0);
			if (kl_buf_check(&b, err) != KL_OK)
			{
				kl_buf_free(&b);
				kl_chat_reply_free(r);
				return KL_FAIL;
			}
			free(r->content);
			r->content = b.data;
			r->content_len = b.len;
		}
	}
	*out = r;
	return KL_OK;
}

int
kl_chat_parse_reply_ids(const kl_tokenizer *tok, const int32_t *ids, size_t n, const kl_chat *tools,
						kl_chat_reply **out, kl_err *err)
{
	seg_list	l = {0};

	return parse(&l, segments_of_ids(tok, ids, n, &l, err), tools, out, err);
}

int
kl_chat_parse_reply_text(const char *text, size_t len, const kl_chat *tools, kl_chat_reply **out, kl_err *err)
{
	seg_list	l = {0};

	return parse(&l, segments_of_text(text, len, &l, err), tools, out, err);
}

void
kl_chat_reply_free(kl_chat_reply *r)
{
	if (!r)
		return;
	for (int i = 0; i < r->n_calls; i++)
	{
		free(r->calls[i].id);
		free(r->calls[i].name);
		free(r->calls[i].arguments);
		free(r->calls[i].error);
	}
	free(r->calls);
	free(r->content);
	free(r);
}

/*
 * A string value of any bytes (arguments cut inside a character, a NUL the
 * model wrote): invalid sequences and NUL become U+FFFD, as in text results,
 * since JSON consumers (PostgreSQL's jsonb among them) refuse \u0000.
 */
static json_t *
text_value(const char *s, size_t n)
{
	static const char replacement[] = "\xEF\xBF\xBD";	/* U+FFFD */
	kl_buf		b = {0};
	json_t	   *v;
	size_t		i = 0;

	while (i < n)
	{
		size_t		end = i,
					bad;

		if (s[i] == 0)
		{
			kl_buf_puts(&b, replacement);
			i++;
			continue;
		}
		while (end < n && s[end] != 0)
			end++;
		if (kl_utf8_valid(s + i, end - i, &bad))
		{
			kl_buf_put(&b, s + i, end - i);
			i = end;
			continue;
		}
		kl_buf_put(&b, s + i, bad);
		kl_buf_puts(&b, replacement);
		i += bad + 1;
	}
	kl_buf_put(&b, "", 0);
	v = b.failed ? NULL : json_stringn(b.data, b.len);
	kl_buf_free(&b);
	return v;
}

int
kl_chat_reply_json(const kl_chat_reply *r, char **json, size_t *len, kl_err *err)
{
	return kl_chat_reply_json_ex(r, NULL, false, false, json, len, err);
}

int
kl_chat_reply_json_ex(const kl_chat_reply *r, const char *finish_reason, bool parse_content, bool cut_off,
					  char **json, size_t *len, kl_err *err)
{
	json_t	   *o = kl_json_new_object(),
			   *calls = json_array(),
			   *invalid = json_array();

	*json = NULL;
	*len = 0;
	if (!o || !calls || !invalid)
		goto oom;
	json_object_set_new(o, "content", text_value(r->content, r->content_len));
	for (int i = 0; i < r->n_calls; i++)
	{
		const kl_reply_call *c = &r->calls[i];
		json_t	   *e = kl_json_new_object();

		if (!e)
			goto oom;
		if (!c->error)
		{
			json_t	   *fn = kl_json_new_object();
			json_t	   *args = json_loadb(c->arguments, c->arguments_len, 0, NULL);

			json_object_set_new(e, "id", text_value(c->id, strlen(c->id)));
			json_object_set_new(e, "type", json_string("function"));
			json_object_set_new(fn, "name", text_value(c->name, strlen(c->name)));
			json_object_set_new(fn, "arguments", json_stringn(c->arguments, c->arguments_len));
			json_object_set_new(e, "function", fn);
			json_object_set_new(e, "name", text_value(c->name, strlen(c->name)));
			json_object_set_new(e, "arguments", args);
			json_array_append_new(calls, e);
		}
		else
		{
			json_object_set_new(e, "id", text_value(c->id, strlen(c->id)));
			json_object_set_new(e, "name", c->name ? text_value(c->name, strlen(c->name)) : json_null());
			json_object_set_new(e, "arguments", text_value(c->arguments, c->arguments_len));
			json_object_set_new(e, "error", json_string(c->error));
			json_array_append_new(invalid, e);
		}
	}
	json_object_set_new(o, "tool_calls", calls);
	if (json_array_size(invalid) > 0)
		json_object_set_new(o, "invalid_tool_calls", invalid);
	else
		json_decref(invalid);
	if (finish_reason)
		json_object_set_new(o, "finish_reason", json_string(finish_reason));
	if (parse_content && r->n_calls == 0)
	{
		json_t	   *parsed = cut_off ? NULL : json_loadb(r->content, r->content_len, JSON_DECODE_ANY, NULL);

		json_object_set_new(o, "parsed", parsed ? parsed : json_null());
		if (!parsed)
			json_object_set_new(o, "error",
								json_string(cut_off
											? "the reply was cut off (max_tokens) before its JSON value was complete"
											: "the reply is not JSON"));
	}
	*json = json_dumps(o, JSON_COMPACT);
	json_decref(o);
	if (!*json)
		return kl_errc(err, KL_E_RESOURCES, "out of memory");
	*len = strlen(*json);
	return KL_OK;
oom:
	json_decref(o);
	json_decref(calls);
	json_decref(invalid);
	return kl_errc(err, KL_E_RESOURCES, "out of memory");
}
