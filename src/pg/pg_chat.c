/*
 * pg_chat.c — tools, tool calls and structured output for the SQL functions
 * (see pg_chat.h): the bridge between jsonb arguments and the engine's chat
 * format and output constraints, and the reply as jsonb.
 */
#include "postgres.h"

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "json_constraint.h"

#include "pg_args.h"
#include "pg_chat.h"
#include "pg_errors.h"

/* ------------------------------------------------------------------ engine objects in memory contexts */

static void
free_chat_cb(void *arg)
{
	kl_chat_free((kl_chat *) arg);
}

/* kl_chat_free(c) when the current memory context goes (normally, or at an ERROR) */
static void
chat_in_context(kl_chat *c)
{
	MemoryContextCallback *cb = palloc(sizeof(MemoryContextCallback));

	cb->func = free_chat_cb;
	cb->arg = c;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, cb);
}

/* ------------------------------------------------------------------ arguments */

char *
kl_jsonb_utf8(Jsonb *jb)
{
	char	   *s = JsonbToCString(NULL, &jb->root, VARSIZE(jb));

	return kl_to_utf8(s, strlen(s));
}

kl_chat *
kl_pg_chat_text(const char *messages, const char *tools)
{
	kl_chat    *c;
	kl_err		err;

	if (kl_chat_parse(messages, messages ? strlen(messages) : 0, tools, tools ? strlen(tools) : 0, true, &c,
					  &err) != KL_OK)
		kl_engine_error(&err, NULL,
						"Messages are [{\"role\": \"system\"|\"user\"|\"assistant\"|\"tool\", \"content\": ...}]; "
						"tools are OpenAI function declarations [{\"type\": \"function\", \"function\": "
						"{\"name\": ..., \"description\": ..., \"parameters\": {JSON schema}}}].");
	chat_in_context(c);
	return c;
}

kl_chat *
kl_pg_chat(Jsonb *messages, Jsonb *tools)
{
	return kl_pg_chat_text(messages ? kl_jsonb_utf8(messages) : NULL, tools ? kl_jsonb_utf8(tools) : NULL);
}

char *
kl_pg_grammar(const kl_chat *c, const char *tool_choice, Jsonb *schema, int first_index)
{
	char	   *spec = NULL,
			   *out;
	char	   *schema_text = schema ? kl_jsonb_utf8(schema) : NULL;
	kl_err		err;

	if (kl_chat_grammar_spec(c, tool_choice, schema_text, schema_text ? strlen(schema_text) : 0, first_index, &spec,
							 &err) != KL_OK)
		kl_engine_error(&err, NULL, "JSON schemas may use " KL_JSON_SCHEMA_SUPPORTED ".");
	if (!spec)
		return NULL;
	out = pstrdup(spec);
	free(spec);
	return out;
}

char *
kl_pg_tool_choice(FunctionCallInfo fcinfo, int i)
{
	char	   *c;

	if (PG_NARGS() <= i || PG_ARGISNULL(i))
		return NULL;
	c = text_to_cstring(PG_GETARG_TEXT_PP(i));
	if (c[0] == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tool_choice must be 'auto', 'none', 'required' or the name of a declared tool")));
	return c;
}

int32 *
kl_pg_render(const kl_tokenizer *tok, const kl_chat *c, const kl_chat_render_opts *o, int *n_out)
{
	kl_ids		ids = {0};
	kl_err		err;
	int32	   *out;

	if (kl_chat_render_ids(tok, c, o, &ids, &err) != KL_OK)
	{
		kl_ids_free(&ids);
		kl_engine_error(&err, NULL, NULL);
	}
	if (ids.n > (size_t) MaxAllocSize / sizeof(int32) - 1)
	{
		kl_ids_free(&ids);
		ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("the conversation is too long")));
	}
	out = palloc(sizeof(int32) * (ids.n + 1));
	if (ids.n)
		memcpy(out, ids.ids, sizeof(int32) * ids.n);
	*n_out = (int) ids.n;
	kl_ids_free(&ids);
	return out;
}

/* ------------------------------------------------------------------ replies */

static bool
cut_off(const KlRunResult *res)
{
	return res->done.reason == KL_STOP_MAX_TOKENS || res->done.reason == KL_STOP_CONTEXT;
}

/* JSON text (UTF-8, malloc'd: freed here) -> jsonb, in the server's encoding. */
static Jsonb *
text_to_jsonb(char *text)
{
	char	   *server = pg_any_to_server(text, strlen(text), PG_UTF8);

	if (server == text)
		server = pstrdup(text);
	free(text);
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(server)));
}

/*
 * A reply the model wrote that cannot be read is our failure, not the
 * caller's input (whatever the engine thought of the ids it was given),
 * unless memory ran out.
 */
static void
reply_error(kl_err *err) pg_attribute_noreturn();

static void
reply_error(kl_err *err)
{
	if (err->code != KL_E_RESOURCES)
		err->code = KL_E_INTERNAL;
	kl_engine_error(err, "could not read the reply", NULL);
}

Jsonb *
kl_pg_reply(const kl_tokenizer *tok, const KlRunResult *res, const kl_chat *decl, bool with_schema)
{
	kl_chat_reply *r = NULL;
	kl_err		err;
	char	   *text = NULL;
	size_t		len;
	int			n_valid = 0;
	const char *finish;

	if (kl_chat_parse_reply_ids(tok, res->ids, (size_t) res->n_ids, decl, &r, &err) != KL_OK)
		reply_error(&err);
	for (int i = 0; i < r->n_calls; i++)
		n_valid += r->calls[i].error == NULL;
	finish = cut_off(res) ? "length" : n_valid > 0 ? "tool_calls" : "stop";
	if (kl_chat_reply_json_ex(r, finish, with_schema, cut_off(res), &text, &len, &err) != KL_OK)
	{
		kl_chat_reply_free(r);
		reply_error(&err);
	}
	kl_chat_reply_free(r);
	return text_to_jsonb(text);
}

Jsonb *
kl_pg_json_value(const KlRunResult *res, int max_tokens)
{
	if (cut_off(res))
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the JSON value was cut off by max_tokens (%d) before it was complete", max_tokens),
				 errhint("Raise max_tokens, or bound the schema (maxLength, maxItems, enum).")));
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
											  CStringGetDatum(text_to_cstring(kl_utf8_to_text(res->text,
																							  res->text_len)))));
}

Jsonb *
kl_pg_json_value_or_why(const KlRunResult *res, int max_tokens, const char **why)
{
	if (cut_off(res))
	{
		*why = psprintf("the JSON value was cut off by max_tokens (%d) before it was complete", max_tokens);
		return NULL;
	}
	/* the only valid JSON that jsonb refuses: a \u0000 escape in a string */
	if (memmem(res->text, (size_t) res->text_len, "\\u0000", 6) != NULL)
	{
		*why = "the JSON value has a \\u0000 escape, which jsonb cannot store";
		return NULL;
	}
	*why = NULL;
	return kl_pg_json_value(res, max_tokens);
}

void
kl_extract_request(const kl_tokenizer *tok, const char *body, Jsonb *schema, const char *instructions,
				   KlReqSpec *spec)
{
	StringInfoData u,
				m;
	kl_chat    *c;
	kl_chat_format format;
	kl_chat_render_opts o = {0};
	int			n,
				n_stops;

	initStringInfo(&u);
	appendStringInfoString(&u, instructions ? instructions :
						   "Extract the fields this JSON schema describes from the document below. "
						   "Answer with the JSON value only.");
	appendStringInfoString(&u, "\n\nJSON schema: ");
	appendStringInfoString(&u, kl_jsonb_utf8(schema));
	appendStringInfoString(&u, "\n\nDocument:\n");
	appendStringInfoString(&u, body);
	initStringInfo(&m);
	appendStringInfoString(&m, "[{\"role\": \"user\", \"content\": ");
	escape_json(&m, u.data);
	appendStringInfoString(&m, "}]");
	c = kl_pg_chat_text(m.data, NULL);
	kl_chat_format_of(tok, &format);
	o.format = &format;
	o.add_generation_prompt = true;
	spec->prompt = kl_pg_render(tok, c, &o, &n);
	spec->n_prompt = n;
	kl_check_context(0, n);
	spec->stop_ids = kl_chat_stop_ids(tok, &n_stops);
	spec->n_stop_ids = n_stops;
	spec->grammar = kl_pg_grammar(c, NULL, schema, 0);
	spec->grammar_len = strlen(spec->grammar);
}

/* ------------------------------------------------------------------ reading a reply */

static JsonbValue *
reply_field(Jsonb *r, const char *key)
{
	JsonbValue	k;

	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = (int) strlen(key);
	return findJsonbValueFromContainer(&r->root, JB_FOBJECT, &k);
}

bool
kl_reply_has_calls(Jsonb *reply)
{
	JsonbValue *c = reply_field(reply, "tool_calls");

	return (c && c->type == jbvBinary && JsonContainerSize(c->val.binary.data) > 0) ||
		reply_field(reply, "invalid_tool_calls") != NULL;
}

text *
kl_reply_content(Jsonb *reply)
{
	JsonbValue *c = reply_field(reply, "content");

	if (!c || c->type != jbvString)
		return cstring_to_text("");
	return cstring_to_text_with_len(c->val.string.val, c->val.string.len);
}

Jsonb *
kl_reply_tool_calls(Jsonb *reply)
{
	JsonbValue *c = reply_field(reply, "tool_calls");

	if (!c || c->type != jbvBinary || JsonContainerSize(c->val.binary.data) == 0)
		return NULL;
	return JsonbValueToJsonb(c);
}
