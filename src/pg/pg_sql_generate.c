/*
 * pg_sql_generate.c — the generation functions: generate, generate_stream,
 * generate_tokens, generate_ids, chat, chat_json, extract, summarize (and its
 * aggregate), generate_with_state.  Thin wrappers: check the arguments,
 * tokenize in this backend, send one request, shape the reply.  Their SQL
 * declarations, with defaults and documentation, are in
 * sql/kimi_linear--0.1.0.sql.
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"

#include "pg_args.h"
#include "pg_chat.h"
#include "pg_errors.h"
#include "pg_guc.h"

PG_FUNCTION_INFO_V1(kl_sql_generate);
PG_FUNCTION_INFO_V1(kl_sql_generate_stream);
PG_FUNCTION_INFO_V1(kl_sql_generate_tokens);
PG_FUNCTION_INFO_V1(kl_sql_generate_ids);
PG_FUNCTION_INFO_V1(kl_sql_chat);
PG_FUNCTION_INFO_V1(kl_sql_chat_json);
PG_FUNCTION_INFO_V1(kl_sql_extract);
PG_FUNCTION_INFO_V1(kl_sql_summarize);
PG_FUNCTION_INFO_V1(kl_sql_summarize_agg_step);
PG_FUNCTION_INFO_V1(kl_sql_summarize_agg_final);
PG_FUNCTION_INFO_V1(kl_sql_generate_with_state);

#define DEFAULT_MAX_TOKENS 256
#define SUMMARY_MAX_TOKENS 200

/* A text prompt, fresh sequence: bos + encoded text (what ./kl generate --prompt does). */
static int32 *
prompt_ids(FunctionCallInfo fcinfo, int arg, const KlModelRef *ref, int *n)
{
	char	   *prompt = kl_text_arg(fcinfo, arg, "prompt", false);
	int32	   *ids = kl_encode_text(kl_ref_tokenizer(ref), prompt, true, n);

	kl_check_context(0, *n);
	return ids;
}

static text *
run_to_text(KlReqSpec *spec)
{
	KlRunResult res;

	kl_run(spec, NULL, NULL, 0, 0, &res);
	return kl_utf8_to_text(res.text, res.text_len);
}

/* A jsonb argument, NULL when absent. */
static Jsonb *
jsonb_arg(FunctionCallInfo fcinfo, int i)
{
	return PG_NARGS() > i && !PG_ARGISNULL(i) ? PG_GETARG_JSONB_P(i) : NULL;
}

/* Structured output ends when its value is complete: stop strings and ignore_eos would fight it. */
static void
check_constrained_args(const KlGenArgs *g)
{
	if (g->n_stop > 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("stop strings cannot be combined with json_schema or tools"),
				 errhint("Constrained output ends by itself when its JSON value (or tool call) is complete.")));
	if (g->ignore_eos)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("ignore_eos cannot be combined with json_schema or tools"),
				 errhint("Constrained output must be able to end.")));
}

/*
 * generate(prompt, max_tokens, temperature, top_p, top_k, seed, stop, model, repetition_penalty, min_p,
 * ignore_eos, json_schema)
 */
Datum
kl_sql_generate(PG_FUNCTION_ARGS)
{
	KlGenArgs	g;
	KlModelRef	ref;
	KlReqSpec	spec;
	int			n;
	int32	   *ids;
	Jsonb	   *schema = jsonb_arg(fcinfo, 11);

	kl_read_gen_args(fcinfo, 1, true, DEFAULT_MAX_TOKENS, &g);
	kl_model_resolve(g.model, &ref);
	ids = prompt_ids(fcinfo, 0, &ref, &n);
	kl_spec_init(&spec, &g, &ref);
	spec.prompt = ids;
	spec.n_prompt = n;
	if (schema)
	{
		KlRunResult res;

		check_constrained_args(&g);
		spec.grammar = kl_pg_grammar(kl_pg_chat(NULL, NULL), NULL, schema, 0);
		spec.grammar_len = strlen(spec.grammar);
		kl_run(&spec, NULL, NULL, 0, 0, &res);
		(void) kl_pg_json_value(&res, g.max_tokens);	/* complete, or an ERROR saying it was cut off */
		PG_RETURN_TEXT_P(kl_utf8_to_text(res.text, res.text_len));
	}
	PG_RETURN_TEXT_P(run_to_text(&spec));
}

/* generate_tokens(...as generate...) -> int[]: the generated ids, as ./kl generate prints them */
Datum
kl_sql_generate_tokens(PG_FUNCTION_ARGS)
{
	KlGenArgs	g;
	KlModelRef	ref;
	KlReqSpec	spec;
	KlRunResult res;
	int			n;
	int32	   *ids;

	kl_read_gen_args(fcinfo, 1, true, DEFAULT_MAX_TOKENS, &g);
	kl_model_resolve(g.model, &ref);
	ids = prompt_ids(fcinfo, 0, &ref, &n);
	kl_spec_init(&spec, &g, &ref);
	spec.prompt = ids;
	spec.n_prompt = n;
	spec.flags &= ~KL_REQ_WANT_TEXT;
	kl_run(&spec, NULL, NULL, 0, 0, &res);
	PG_RETURN_ARRAYTYPE_P(kl_ids_to_array(res.ids, res.n_ids));
}

/* generate_ids(prompt int[], ...as generate...) -> int[]: token ids in and out, no tokenizer needed */
Datum
kl_sql_generate_ids(PG_FUNCTION_ARGS)
{
	KlGenArgs	g;
	KlModelRef	ref;
	KlReqSpec	spec;
	KlRunResult res;
	int			n;
	int32	   *ids;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("prompt must not be NULL")));
	ids = kl_array_to_ids(PG_GETARG_ARRAYTYPE_P(0), &n, "prompt");
	if (n == 0)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("prompt must not be empty")));
	kl_read_gen_args(fcinfo, 1, true, DEFAULT_MAX_TOKENS, &g);
	if (g.n_stop > 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("generate_ids takes no stop strings"),
				 errhint("Stop strings need text; use generate or generate_tokens.")));
	kl_model_resolve(g.model, &ref);
	for (int i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= ref.vocab_size)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("token id %d at position %d is outside the vocabulary of model \"%s\" [0, %d)",
							ids[i], i + 1, ref.name, ref.vocab_size)));
	kl_check_context(0, n);
	kl_spec_init(&spec, &g, &ref);
	spec.prompt = ids;
	spec.n_prompt = n;
	spec.flags &= ~KL_REQ_WANT_TEXT;
	kl_run(&spec, NULL, NULL, 0, 0, &res);
	PG_RETURN_ARRAYTYPE_P(kl_ids_to_array(res.ids, res.n_ids));
}

/* ------------------------------------------------------------------ streaming */

typedef struct StreamState
{
	KlCall	   *call;
	bool		ended;
	ExprContext *econtext;		/* stream_end is registered there (NULL: not) */
} StreamState;

static void
stream_end(Datum arg)
{
	StreamState *s = (StreamState *) DatumGetPointer(arg);

	/*
	 * s lives in the SRF's multi-call memory, which SRF_RETURN_DONE frees:
	 * the query's end must not call back into it afterwards.
	 */
	if (s->econtext)
	{
		UnregisterExprContextCallback(s->econtext, stream_end, arg);
		s->econtext = NULL;
	}
	if (!s->ended)
	{
		s->ended = true;
		kl_call_end(s->call);
	}
}

/*
 * generate_stream(...as generate...) RETURNS SETOF text: one row per piece of
 * text as the worker produces it.  Value-per-call, so that a cursor
 * (DECLARE ... FETCH) or a target-list call gets rows while generation goes on.
 */
Datum
kl_sql_generate_stream(PG_FUNCTION_ARGS)
{
	FuncCallContext *fc;
	StreamState *s;
	KlEvent		ev;

	if (SRF_IS_FIRSTCALL())
	{
		MemoryContext old;
		KlGenArgs	g;
		KlModelRef	ref;
		KlReqSpec	spec;
		int			n;
		int32	   *ids;
		ReturnSetInfo *rsi = (ReturnSetInfo *) fcinfo->resultinfo;

		fc = SRF_FIRSTCALL_INIT();
		old = MemoryContextSwitchTo(fc->multi_call_memory_ctx);
		kl_read_gen_args(fcinfo, 1, true, DEFAULT_MAX_TOKENS, &g);
		kl_model_resolve(g.model, &ref);
		ids = prompt_ids(fcinfo, 0, &ref, &n);
		kl_spec_init(&spec, &g, &ref);
		spec.prompt = ids;
		spec.n_prompt = n;
		spec.flags |= KL_REQ_STREAM;
		s = palloc0(sizeof(StreamState));
		s->call = kl_call_begin(&spec, 0, 0);
		kl_call_submit(s->call);
		/* a query that stops reading early (LIMIT, a closed cursor) ends the request */
		if (rsi && IsA(rsi, ReturnSetInfo))
		{
			RegisterExprContextCallback(rsi->econtext, stream_end, PointerGetDatum(s));
			s->econtext = rsi->econtext;
		}
		fc->user_fctx = s;
		MemoryContextSwitchTo(old);
	}
	fc = SRF_PERCALL_SETUP();
	s = fc->user_fctx;
	while (!s->ended && kl_call_next(s->call, &ev))
	{
		if (ev.type == KL_EV_TOKENS && ev.text_len > 0)
			SRF_RETURN_NEXT(fc, PointerGetDatum(kl_utf8_to_text(ev.text, ev.text_len)));
	}
	stream_end(PointerGetDatum(s));
	SRF_RETURN_DONE(fc);
}

/* ------------------------------------------------------------------ chat */

/* a string field of a JSON object (NULL if absent or not a string) */
static JsonbValue *
object_field(JsonbValue *obj, const char *key)
{
	JsonbValue	k;
	JsonbValue *v;

	if (obj->type != jbvBinary || !JsonContainerIsObject(obj->val.binary.data))
		return NULL;
	k.type = jbvString;
	k.val.string.val = (char *) key;
	k.val.string.len = (int) strlen(key);
	v = findJsonbValueFromContainer(obj->val.binary.data, JB_FOBJECT, &k);
	return v && v->type == jbvString ? v : NULL;
}

/* messages jsonb: [{"role": "system"|"user"|"assistant", "content": "..."}] */
kl_chat_message *
kl_parse_messages(Jsonb *jb, int *n_out)
{
	kl_chat_message *msgs;
	int			n;

	if (!JB_ROOT_IS_ARRAY(jb) || JB_ROOT_IS_SCALAR(jb) || (n = JB_ROOT_COUNT(jb)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("messages must be a non-empty JSON array of {\"role\": ..., \"content\": ...} objects")));
	msgs = palloc0(sizeof(kl_chat_message) * n);
	for (int i = 0; i < n; i++)
	{
		JsonbValue *m = getIthJsonbValueFromContainer(&jb->root, i);
		JsonbValue *role = m ? object_field(m, "role") : NULL;
		JsonbValue *content = m ? object_field(m, "content") : NULL;

		if (!role || !content)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("message %d must be an object with string fields \"role\" and \"content\"", i + 1)));
		msgs[i].role = kl_to_utf8(role->val.string.val, role->val.string.len);
		if (strcmp(msgs[i].role, "system") != 0 && strcmp(msgs[i].role, "user") != 0 &&
			strcmp(msgs[i].role, "assistant") != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("message %d has role \"%s\"", i + 1, msgs[i].role),
					 errhint("The roles are system, user and assistant.")));
		msgs[i].content = kl_to_utf8(content->val.string.val, content->val.string.len);
		msgs[i].content_len = strlen(msgs[i].content);
	}
	*n_out = n;
	return msgs;
}

/*
 * A chat turn with tools (11), tool_choice (12) and json_schema (13), in the
 * full Kimi format: the reply's text, or (as_json) the parsed reply.
 */
static Datum
chat_with_tools(FunctionCallInfo fcinfo, bool as_json)
{
	KlGenArgs	g;
	KlModelRef	ref;
	KlReqSpec	spec;
	KlRunResult res;
	const kl_tokenizer *tok;
	kl_chat    *c;
	kl_chat_format format;
	kl_chat_render_opts o = {0};
	Jsonb	   *tools = jsonb_arg(fcinfo, 11),
			   *schema = jsonb_arg(fcinfo, 13);
	char	   *choice = kl_pg_tool_choice(fcinfo, 12);
	int			n,
				n_stops;
	int32	   *ids,
			   *stops;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("messages must not be NULL")));
	kl_read_gen_args(fcinfo, 1, true, DEFAULT_MAX_TOKENS, &g);
	kl_model_resolve(g.model, &ref);
	tok = kl_ref_tokenizer(&ref);
	c = kl_pg_chat(PG_GETARG_JSONB_P(0), tools);
	if (c->n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("messages must be a non-empty JSON array of {\"role\": ..., \"content\": ...} objects")));
	kl_chat_format_of(tok, &format);
	o.format = &format;
	o.add_generation_prompt = true;
	ids = kl_pg_render(tok, c, &o, &n);
	kl_check_context(0, n);
	stops = kl_chat_stop_ids(tok, &n_stops);
	kl_spec_init(&spec, &g, &ref);
	spec.prompt = ids;
	spec.n_prompt = n;
	spec.stop_ids = stops;
	spec.n_stop_ids = n_stops;
	spec.grammar = kl_pg_grammar(c, choice, schema, kl_chat_count_calls(c));
	if (spec.grammar)
	{
		check_constrained_args(&g);
		spec.grammar_len = strlen(spec.grammar);
	}
	kl_run(&spec, NULL, NULL, 0, 0, &res);
	if (as_json)
		PG_RETURN_JSONB_P(kl_pg_reply(tok, &res, tools ? c : NULL, schema != NULL));
	if (schema && (res.done.reason == KL_STOP_MAX_TOKENS || res.done.reason == KL_STOP_CONTEXT) &&
		!strstr(res.text, KL_TOK_SECTION_BEGIN))
		(void) kl_pg_json_value(&res, g.max_tokens);	/* the ERROR saying it was cut off */
	PG_RETURN_TEXT_P(kl_utf8_to_text(res.text, res.text_len));
}

/* chat_json(messages jsonb, ...settings..., tools, tool_choice, json_schema) -> the reply as jsonb */
Datum
kl_sql_chat_json(PG_FUNCTION_ARGS)
{
	return chat_with_tools(fcinfo, true);
}

/*
 * extract(body text, schema jsonb, instructions text, model text, max_tokens int) -> jsonb:
 * the fields the schema describes, read out of a document (greedy, constrained to the schema).
 */
Datum
kl_sql_extract(PG_FUNCTION_ARGS)
{
	KlModelRef	ref;
	KlReqSpec	spec;
	KlRunResult res;
	KlGenArgs	g;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();		/* over a column: no document, no fields */
	if (PG_ARGISNULL(1))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("schema must not be NULL")));
	memset(&g, 0, sizeof(g));
	kl_sampling_default(&g.sampling);
	g.max_tokens = PG_ARGISNULL(4) ? 512 : PG_GETARG_INT32(4);
	if (g.max_tokens < 1 || g.max_tokens > kl_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be between 1 and %d, got %d", kl_max_new_tokens, g.max_tokens)));
	kl_model_resolve(PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3)), &ref);
	kl_spec_init(&spec, &g, &ref);
	kl_extract_request(kl_ref_tokenizer(&ref), kl_text_arg(fcinfo, 0, "body", true), PG_GETARG_JSONB_P(1),
					   PG_ARGISNULL(2) ? NULL : kl_text_arg(fcinfo, 2, "instructions", false), &spec);
	kl_run(&spec, NULL, NULL, 0, 0, &res);
	PG_RETURN_JSONB_P(kl_pg_json_value(&res, g.max_tokens));
}

/*
 * chat(messages jsonb, ...settings..., tools, tool_choice, json_schema): the
 * assistant's reply, stopping at the chat stop tokens.  Without tools,
 * tool_choice and json_schema, the plain format (and its messages' checks)
 * as before.
 */
Datum
kl_sql_chat(PG_FUNCTION_ARGS)
{
	KlGenArgs	g;
	KlModelRef	ref;
	KlReqSpec	spec;
	const kl_tokenizer *tok;
	kl_chat_message *msgs;
	int			n_msgs,
				n,
				n_stops;
	int32	   *ids,
			   *stops;

	if (jsonb_arg(fcinfo, 11) || jsonb_arg(fcinfo, 13) || kl_pg_tool_choice(fcinfo, 12))
		return chat_with_tools(fcinfo, false);
	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("messages must not be NULL")));
	kl_read_gen_args(fcinfo, 1, true, DEFAULT_MAX_TOKENS, &g);
	kl_model_resolve(g.model, &ref);
	tok = kl_ref_tokenizer(&ref);
	msgs = kl_parse_messages(PG_GETARG_JSONB_P(0), &n_msgs);
	ids = kl_render_chat(tok, msgs, n_msgs, true, &n);
	kl_check_context(0, n);
	stops = kl_chat_stop_ids(tok, &n_stops);
	kl_spec_init(&spec, &g, &ref);
	spec.prompt = ids;
	spec.n_prompt = n;
	spec.stop_ids = stops;
	spec.n_stop_ids = n_stops;
	PG_RETURN_TEXT_P(run_to_text(&spec));
}

/* ------------------------------------------------------------------ summarize */

/*
 * The document goes in whole (long prompts are prefilled in chunks by the
 * worker, and the KDA layers' state does not grow with it), as a chat turn
 * asking for a summary: the format instruction-tuned Kimi models expect.
 */
int32 *
kl_summary_prompt(const kl_tokenizer *tok, const char *doc_utf8, int *n_out)
{
	kl_chat_message m[2];
	StringInfoData b;

	m[0].role = "system";
	m[0].content = "You write short, accurate summaries of documents.";
	m[0].content_len = strlen(m[0].content);
	m[1].role = "user";
	initStringInfo(&b);
	appendStringInfoString(&b, "Summarize the following document in a few sentences.\n\n");
	appendStringInfoString(&b, doc_utf8);
	m[1].content = b.data;
	m[1].content_len = b.len;
	return kl_render_chat(tok, m, 2, true, n_out);
}

static text *
summarize_text(const char *doc_utf8, int max_tokens, const char *model, double temperature)
{
	KlGenArgs	g;
	KlModelRef	ref;
	KlReqSpec	spec;
	const kl_tokenizer *tok;
	kl_err		err;
	int			n,
				n_stops;
	int32	   *ids,
			   *stops;

	memset(&g, 0, sizeof(g));
	kl_sampling_default(&g.sampling);
	g.sampling.temperature = kl_sampling_setting("temperature", temperature);
	g.max_tokens = max_tokens;
	if (max_tokens < 0 || max_tokens > kl_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be between 0 and %d, got %d", kl_max_new_tokens, max_tokens)));
	kl_check_sampling(&g.sampling);
	if (kl_sampling_validate(&g.sampling, &err) != KL_OK)
		kl_engine_error(&err, NULL, NULL);
	kl_model_resolve(model, &ref);
	tok = kl_ref_tokenizer(&ref);
	ids = kl_summary_prompt(tok, doc_utf8, &n);
	kl_check_context(0, n);
	stops = kl_chat_stop_ids(tok, &n_stops);
	kl_spec_init(&spec, &g, &ref);
	spec.prompt = ids;
	spec.n_prompt = n;
	spec.stop_ids = stops;
	spec.n_stop_ids = n_stops;
	return run_to_text(&spec);
}

/* summarize(doc, max_tokens, model, temperature) */
Datum
kl_sql_summarize(PG_FUNCTION_ARGS)
{
	char	   *doc = kl_text_arg(fcinfo, 0, "doc", false);
	int			max_tokens = PG_ARGISNULL(1) ? SUMMARY_MAX_TOKENS : PG_GETARG_INT32(1);
	char	   *model = PG_ARGISNULL(2) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(2));
	double		temperature = PG_ARGISNULL(3) ? 0 : PG_GETARG_FLOAT8(3);

	if (isnan(temperature))
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("temperature must be a finite number")));
	PG_RETURN_TEXT_P(summarize_text(doc, max_tokens, model, temperature));
}

/* summarize_agg(doc text [, max_tokens int]): the documents of a group, joined by blank lines */
typedef struct SummarizeState
{
	StringInfoData docs;
	int			max_tokens;
	int			n;
} SummarizeState;

Datum
kl_sql_summarize_agg_step(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	SummarizeState *st;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("summarize_agg called outside an aggregate")));
	if (PG_ARGISNULL(0))
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		st = palloc0(sizeof(SummarizeState));
		initStringInfo(&st->docs);
		st->max_tokens = SUMMARY_MAX_TOKENS;
		MemoryContextSwitchTo(old);
	}
	else
		st = (SummarizeState *) PG_GETARG_POINTER(0);
	if (PG_NARGS() > 2 && !PG_ARGISNULL(2))
		st->max_tokens = PG_GETARG_INT32(2);
	if (!PG_ARGISNULL(1))
	{
		text	   *t = PG_GETARG_TEXT_PP(1);
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		if (st->n++ > 0)
			appendStringInfoString(&st->docs, "\n\n");
		appendBinaryStringInfo(&st->docs, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
		MemoryContextSwitchTo(old);
	}
	PG_RETURN_POINTER(st);
}

Datum
kl_sql_summarize_agg_final(PG_FUNCTION_ARGS)
{
	SummarizeState *st = PG_ARGISNULL(0) ? NULL : (SummarizeState *) PG_GETARG_POINTER(0);

	if (!st || st->n == 0 || st->docs.len == 0)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(summarize_text(kl_to_utf8(st->docs.data, st->docs.len), st->max_tokens, NULL, 0));
}

/* ------------------------------------------------------------------ states */

/*
 * generate_with_state(state bytea, prompt text, ...settings...) -> (reply text, new_state bytea).
 * state NULL: a fresh sequence (the prompt gets the bos token, as generate);
 * otherwise a complete head from an earlier call, continued where it stopped
 * (its pending token first, then the prompt, which may then be empty).
 */
Datum
kl_sql_generate_with_state(PG_FUNCTION_ARGS)
{
	bytea	   *state = PG_ARGISNULL(0) ? NULL : PG_GETARG_BYTEA_PP(0);
	KlGenArgs	g;
	KlModelRef	ref;
	KlReqSpec	spec;
	KlRunResult res;
	TupleDesc	td;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	char	   *prompt;
	int32	   *ids;
	int			n;
	int64		history = 0;
	const char *part = NULL;
	Size		part_len = 0;

	if (get_call_result_type(fcinfo, NULL, &td) != TYPEFUNC_COMPOSITE)
		ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("generate_with_state must return a record")));
	if (state)
	{
		kl_state_info info;
		kl_err		err;

		/* checked here too, for an early and precise error */
		part = VARDATA_ANY(state);
		part_len = VARSIZE_ANY_EXHDR(state);
		if (kl_state_info_read((const uint8_t *) part, part_len, &info, &err) != KL_OK)
		{
			err.code = KL_E_INVALID;	/* an argument: the caller's input, corrupt or not */
			kl_engine_error(&err, "invalid kimi_linear state",
							"Pass a state returned by generate_with_state, unchanged, or NULL to start afresh.");
		}
		if (info.kind != KL_STATE_HEAD || info.from_pos != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("this state is only a part of a conversation's state"),
					 errhint("generate_with_state takes complete states; stored conversations continue with kimi_linear.say.")));
		history = info.positions + (info.pending >= 0 ? 1 : 0);
	}
	prompt = kl_text_arg(fcinfo, 1, "prompt", state != NULL);
	kl_read_gen_args(fcinfo, 2, true, DEFAULT_MAX_TOKENS, &g);
	kl_model_resolve(g.model, &ref);
	ids = kl_encode_text(kl_ref_tokenizer(&ref), prompt, state == NULL, &n);
	kl_check_context(history, n);
	kl_spec_init(&spec, &g, &ref);
	spec.prompt = ids;
	spec.n_prompt = n;
	spec.flags |= KL_REQ_WANT_STATE;
	spec.reply_hint = part_len + part_len / 4;
	kl_run(&spec, state ? &part : NULL, state ? &part_len : NULL, state ? 1 : 0, 0, &res);
	if (res.n_parts != 1 || res.parts[0].kind != KL_STATE_HEAD)
		ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("the inference worker returned no state")));
	values[0] = PointerGetDatum(kl_utf8_to_text(res.text, res.text_len));
	values[1] = PointerGetDatum(res.parts[0].blob);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(td), values, nulls)));
}
