/*
 * pg_functions.c — the SQL functions (thin wrappers: validate the arguments,
 * tokenize, send a request, shape the reply).  Their SQL declarations, with
 * defaults and documentation, are in sql/kimi_linear--0.1.0.sql.
 *
 * Every argument is checked here, before anything is sent to a worker, and
 * every problem is an ERROR that says what was wrong and what to do.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "kl.h"
#include "pg_client.h"
#include "pg_shmem.h"

PG_FUNCTION_INFO_V1(kl_sql_generate);
PG_FUNCTION_INFO_V1(kl_sql_generate_stream);
PG_FUNCTION_INFO_V1(kl_sql_chat);
PG_FUNCTION_INFO_V1(kl_sql_summarize);
PG_FUNCTION_INFO_V1(kl_sql_summarize_agg_step);
PG_FUNCTION_INFO_V1(kl_sql_summarize_agg_final);
PG_FUNCTION_INFO_V1(kl_sql_tokenize);
PG_FUNCTION_INFO_V1(kl_sql_detokenize);
PG_FUNCTION_INFO_V1(kl_sql_generate_with_state);
PG_FUNCTION_INFO_V1(kl_sql_chat_turn);
PG_FUNCTION_INFO_V1(kl_sql_resolve_model);
PG_FUNCTION_INFO_V1(kl_sql_load_model);
PG_FUNCTION_INFO_V1(kl_sql_unload_model);
PG_FUNCTION_INFO_V1(kl_sql_models);
PG_FUNCTION_INFO_V1(kl_sql_activity);

/* ------------------------------------------------------------------ arguments */

/*
 * The generation settings every function shares, in this argument order
 * starting at `first`: max_tokens, temperature, top_p, top_k, seed, stop,
 * model, repetition_penalty, min_p, ignore_eos.  NULL means the default.
 */
typedef struct GenArgs
{
	int			max_tokens;
	kl_sampling sampling;
	bool		ignore_eos;
	char	   *model;
	int			n_stop;
	char		stop[KL_MAX_STOP_STRINGS][KL_MAX_STOP_LEN];
} GenArgs;

#define ARG_OR_NULL(i) (PG_NARGS() > (i) && !PG_ARGISNULL(i))

static void
read_gen_args(FunctionCallInfo fcinfo, int first, GenArgs *g)
{
	kl_err		err;

	memset(g, 0, sizeof(*g));
	kl_sampling_default(&g->sampling);
	g->max_tokens = 256;
	g->sampling.seed = pg_prng_uint64(&pg_global_prng_state);

	if (ARG_OR_NULL(first))
		g->max_tokens = PG_GETARG_INT32(first);
	if (g->max_tokens < 0 || g->max_tokens > kl_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be between 0 and %d, got %d", kl_max_new_tokens, g->max_tokens),
				 errhint("The upper limit is kimi_linear.max_new_tokens.")));
	if (ARG_OR_NULL(first + 1))
		g->sampling.temperature = (float) PG_GETARG_FLOAT8(first + 1);
	if (ARG_OR_NULL(first + 2))
		g->sampling.top_p = (float) PG_GETARG_FLOAT8(first + 2);
	if (ARG_OR_NULL(first + 3))
		g->sampling.top_k = PG_GETARG_INT32(first + 3);
	if (ARG_OR_NULL(first + 4))
		g->sampling.seed = (uint64) PG_GETARG_INT64(first + 4);
	if (ARG_OR_NULL(first + 5))
	{
		ArrayType  *a = PG_GETARG_ARRAYTYPE_P(first + 5);
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		deconstruct_array(a, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
		if (n > KL_MAX_STOP_STRINGS)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("at most %d stop strings are allowed, got %d", KL_MAX_STOP_STRINGS, n)));
		for (int i = 0; i < n; i++)
		{
			char	   *s;

			if (nulls[i])
				ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("stop strings must not be NULL")));
			s = TextDatumGetCString(elems[i]);
			if (strlen(s) == 0 || strlen(s) >= KL_MAX_STOP_LEN)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("stop strings must have 1 to %d bytes, got %zu", KL_MAX_STOP_LEN - 1, strlen(s))));
			strlcpy(g->stop[g->n_stop++], s, KL_MAX_STOP_LEN);
		}
	}
	if (ARG_OR_NULL(first + 6))
		g->model = text_to_cstring(PG_GETARG_TEXT_PP(first + 6));
	if (ARG_OR_NULL(first + 7))
		g->sampling.repetition_penalty = (float) PG_GETARG_FLOAT8(first + 7);
	if (ARG_OR_NULL(first + 8))
		g->sampling.min_p = (float) PG_GETARG_FLOAT8(first + 8);
	if (ARG_OR_NULL(first + 9))
		g->ignore_eos = PG_GETARG_BOOL(first + 9);
	if (kl_sampling_validate(&g->sampling, &err) != KL_OK)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s", err.msg)));
}

static char *
required_text(FunctionCallInfo fcinfo, int i, const char *what, bool allow_empty)
{
	char	   *s;

	if (PG_ARGISNULL(i))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("%s must not be NULL", what)));
	s = text_to_cstring(PG_GETARG_TEXT_PP(i));
	if (!allow_empty && s[0] == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	return s;
}

/* encode text as ids (palloc'd); with_bos: a fresh sequence starts with bos */
static int32 *
encode_prompt(const kl_tokenizer *tok, const char *text, bool with_bos, int *n_out)
{
	kl_ids		ids = {0};
	kl_err		err;
	int32	   *out;

	if (with_bos && kl_tokenizer_bos(tok) >= 0 && kl_ids_push(&ids, kl_tokenizer_bos(tok), &err) != KL_OK)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	if (kl_encode(tok, text, strlen(text), false, &ids, &err) != KL_OK)
	{
		kl_ids_free(&ids);
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s", err.msg)));
	}
	out = palloc(sizeof(int32) * Max(ids.n, 1));
	memcpy(out, ids.ids, sizeof(int32) * ids.n);
	*n_out = (int) ids.n;
	kl_ids_free(&ids);
	return out;
}

static void
check_prompt_length(int n_prompt, int max_tokens)
{
	if ((int64) n_prompt + max_tokens > kl_max_context)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the prompt has %d tokens; with max_tokens %d that exceeds kimi_linear.max_context (%d)",
						n_prompt, max_tokens, kl_max_context),
				 errhint("Shorten the input, lower max_tokens, or ask a superuser to raise kimi_linear.max_context.")));
}

static void
fill_request(KlRequest *r, const GenArgs *g, int entry, int n_prompt, int n_stop_ids)
{
	memset(r, 0, sizeof(*r));
	r->magic = KL_PROTOCOL_MAGIC;
	r->version = KL_PROTOCOL_VERSION;
	kl_model_entry_name(entry, r->model);
	r->temperature = g->sampling.temperature;
	r->top_k = g->sampling.top_k;
	r->top_p = g->sampling.top_p;
	r->min_p = g->sampling.min_p;
	r->repetition_penalty = g->sampling.repetition_penalty;
	r->seed = g->sampling.seed;
	r->max_tokens = g->max_tokens;
	r->ignore_eos = g->ignore_eos;
	r->n_stop_ids = n_stop_ids;
	r->n_stop_strings = g->n_stop;
	memcpy(r->stop_strings, g->stop, sizeof(r->stop_strings));
	r->n_prompt = n_prompt;
}

/* Run a request to the end and return its text (the client is released). */
static text *
run_to_text(KlRequest *r, const int32 *stop_ids, const int32 *prompt, int n_prompt)
{
	KlClient	c;
	text	   *out;

	kl_client_submit(&c, r, stop_ids, prompt, n_prompt, NULL, 0);
	kl_client_wait(&c);
	out = cstring_to_text_with_len(c.text.data, c.text.len);
	kl_client_release(&c);
	return out;
}

/* ------------------------------------------------------------------ generate */

/* generate(prompt, max_tokens, temperature, top_p, top_k, seed, stop, model, repetition_penalty, min_p, ignore_eos) */
Datum
kl_sql_generate(PG_FUNCTION_ARGS)
{
	char	   *prompt = required_text(fcinfo, 0, "prompt", false);
	GenArgs		g;
	int			entry;
	int32	   *ids;
	int			n;
	KlRequest	r;

	read_gen_args(fcinfo, 1, &g);
	entry = kl_model_resolve(g.model);
	ids = encode_prompt(kl_model_tokenizer_for(entry), prompt, true, &n);
	check_prompt_length(n, g.max_tokens);
	fill_request(&r, &g, entry, n, 0);
	PG_RETURN_TEXT_P(run_to_text(&r, NULL, ids, n));
}

typedef struct StreamState
{
	KlClient	c;
	bool		released;
} StreamState;

static void
stream_shutdown(Datum arg)
{
	StreamState *s = (StreamState *) DatumGetPointer(arg);

	if (!s->released)
	{
		kl_client_release(&s->c);
		s->released = true;
	}
}

/* generate_stream(...same arguments as generate...) RETURNS SETOF text: one row per piece of text */
Datum
kl_sql_generate_stream(PG_FUNCTION_ARGS)
{
	FuncCallContext *fc;
	StreamState *s;
	char	   *piece;

	if (SRF_IS_FIRSTCALL())
	{
		MemoryContext old;
		char	   *prompt;
		GenArgs		g;
		int			entry;
		int32	   *ids;
		int			n;
		KlRequest	r;

		fc = SRF_FIRSTCALL_INIT();
		old = MemoryContextSwitchTo(fc->multi_call_memory_ctx);
		prompt = required_text(fcinfo, 0, "prompt", false);
		read_gen_args(fcinfo, 1, &g);
		entry = kl_model_resolve(g.model);
		ids = encode_prompt(kl_model_tokenizer_for(entry), prompt, true, &n);
		check_prompt_length(n, g.max_tokens);
		fill_request(&r, &g, entry, n, 0);
		s = palloc0(sizeof(StreamState));
		kl_client_submit(&s->c, &r, NULL, ids, n, NULL, 0);
		/* a query that stops reading early (LIMIT) must free the request */
		RegisterExprContextCallback(((ReturnSetInfo *) fcinfo->resultinfo)->econtext, stream_shutdown,
									PointerGetDatum(s));
		fc->user_fctx = s;
		MemoryContextSwitchTo(old);
	}
	fc = SRF_PERCALL_SETUP();
	s = fc->user_fctx;
	for (;;)
	{
		MemoryContext old = MemoryContextSwitchTo(fc->multi_call_memory_ctx);

		piece = kl_client_next(&s->c);
		MemoryContextSwitchTo(old);
		if (!piece)
		{
			stream_shutdown(PointerGetDatum(s));
			SRF_RETURN_DONE(fc);
		}
		if (piece[0] != 0)
			SRF_RETURN_NEXT(fc, CStringGetTextDatum(piece));
	}
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

/* messages jsonb: [{"role": "system"|"user"|"assistant", "content": "..."}] -> ids */
static int32 *
render_messages(const kl_tokenizer *tok, Jsonb *jb, bool gen_prompt, int *n_out)
{
	kl_chat_message *msgs;
	int			n;
	kl_ids		ids = {0};
	kl_err		err;
	int32	   *out;

	if (!JB_ROOT_IS_ARRAY(jb) || JB_ROOT_IS_SCALAR(jb) || (n = JB_ROOT_COUNT(jb)) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("messages must be a non-empty JSON array of {\"role\": ..., \"content\": ...}")));
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
		msgs[i].role = pnstrdup(role->val.string.val, role->val.string.len);
		msgs[i].content = pnstrdup(content->val.string.val, content->val.string.len);
		msgs[i].content_len = content->val.string.len;
	}
	if (kl_chat_render(tok, msgs, n, gen_prompt, &ids, &err) != KL_OK)
	{
		kl_ids_free(&ids);
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s", err.msg)));
	}
	out = palloc(sizeof(int32) * Max(ids.n, 1));
	memcpy(out, ids.ids, sizeof(int32) * ids.n);
	*n_out = (int) ids.n;
	kl_ids_free(&ids);
	return out;
}

/* chat(messages jsonb, ...generation settings...) */
Datum
kl_sql_chat(PG_FUNCTION_ARGS)
{
	GenArgs		g;
	int			entry;
	const kl_tokenizer *tok;
	int32	   *ids;
	int			n;
	int32		stops[4];
	int			n_stops;
	KlRequest	r;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("messages must not be NULL")));
	read_gen_args(fcinfo, 1, &g);
	entry = kl_model_resolve(g.model);
	tok = kl_model_tokenizer_for(entry);
	ids = render_messages(tok, PG_GETARG_JSONB_P(0), true, &n);
	check_prompt_length(n, g.max_tokens);
	n_stops = kl_tokenizer_stop_ids(tok, stops, 4);
	fill_request(&r, &g, entry, n, n_stops);
	PG_RETURN_TEXT_P(run_to_text(&r, stops, ids, n));
}

/* ------------------------------------------------------------------ summarize */

static text *
summarize_text(const char *doc, int max_tokens, const char *model, double temperature)
{
	GenArgs		g;
	int			entry;
	const kl_tokenizer *tok;
	kl_chat_message m[2];
	kl_ids		ids = {0};
	kl_err		err;
	int32		stops[4];
	int			n_stops;
	KlRequest	r;
	int32	   *prompt;
	int			n;
	kl_sampling sp;

	memset(&g, 0, sizeof(g));
	kl_sampling_default(&g.sampling);
	g.sampling.temperature = (float) temperature;
	g.max_tokens = max_tokens;
	if (max_tokens < 0 || max_tokens > kl_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be between 0 and %d, got %d", kl_max_new_tokens, max_tokens)));
	sp = g.sampling;
	if (kl_sampling_validate(&sp, &err) != KL_OK)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s", err.msg)));
	entry = kl_model_resolve(model);
	tok = kl_model_tokenizer_for(entry);
	m[0].role = "system";
	m[0].content = "Summarize the following document in a few sentences.";
	m[0].content_len = strlen(m[0].content);
	m[1].role = "user";
	m[1].content = doc;
	m[1].content_len = strlen(doc);
	if (kl_chat_render(tok, m, 2, true, &ids, &err) != KL_OK)
	{
		kl_ids_free(&ids);
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s", err.msg)));
	}
	n = (int) ids.n;
	prompt = palloc(sizeof(int32) * Max(n, 1));
	memcpy(prompt, ids.ids, sizeof(int32) * n);
	kl_ids_free(&ids);
	check_prompt_length(n, max_tokens);
	n_stops = kl_tokenizer_stop_ids(tok, stops, 4);
	fill_request(&r, &g, entry, n, n_stops);
	return run_to_text(&r, stops, prompt, n);
}

/* summarize(doc, max_tokens, model, temperature) */
Datum
kl_sql_summarize(PG_FUNCTION_ARGS)
{
	char	   *doc = required_text(fcinfo, 0, "doc", false);
	int			max_tokens = ARG_OR_NULL(1) ? PG_GETARG_INT32(1) : 200;
	char	   *model = ARG_OR_NULL(2) ? text_to_cstring(PG_GETARG_TEXT_PP(2)) : NULL;
	double		temperature = ARG_OR_NULL(3) ? PG_GETARG_FLOAT8(3) : 0;

	PG_RETURN_TEXT_P(summarize_text(doc, max_tokens, model, temperature));
}

/* summarize_agg(doc text [, max_tokens int]): the documents of a group, joined, summarized */
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
	SummarizeState   *st;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("summarize_agg called outside an aggregate")));
	if (PG_ARGISNULL(0))
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		st = palloc0(sizeof(SummarizeState));
		initStringInfo(&st->docs);
		st->max_tokens = 200;
		MemoryContextSwitchTo(old);
	}
	else
		st = (SummarizeState *) PG_GETARG_POINTER(0);
	if (PG_NARGS() > 2 && !PG_ARGISNULL(2))
		st->max_tokens = PG_GETARG_INT32(2);
	if (!PG_ARGISNULL(1))
	{
		text	   *t = PG_GETARG_TEXT_PP(1);

		if (st->n++ > 0)
			appendStringInfoString(&st->docs, "\n\n");
		appendBinaryStringInfo(&st->docs, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
	}
	PG_RETURN_POINTER(st);
}

Datum
kl_sql_summarize_agg_final(PG_FUNCTION_ARGS)
{
	SummarizeState   *st = PG_ARGISNULL(0) ? NULL : (SummarizeState *) PG_GETARG_POINTER(0);

	if (!st || st->n == 0 || st->docs.len == 0)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(summarize_text(st->docs.data, st->max_tokens, NULL, 0));
}

/* ------------------------------------------------------------------ tokens */

/* tokenize(text, model, special) -> int[] */
Datum
kl_sql_tokenize(PG_FUNCTION_ARGS)
{
	char	   *txt = required_text(fcinfo, 0, "text", true);
	char	   *model = ARG_OR_NULL(1) ? text_to_cstring(PG_GETARG_TEXT_PP(1)) : NULL;
	bool		special = ARG_OR_NULL(2) ? PG_GETARG_BOOL(2) : false;
	int			entry = kl_model_resolve(model);
	const kl_tokenizer *tok = kl_model_tokenizer_for(entry);
	kl_ids		ids = {0};
	kl_err		err;
	Datum	   *d;

	if (kl_encode(tok, txt, strlen(txt), special, &ids, &err) != KL_OK)
	{
		kl_ids_free(&ids);
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s", err.msg)));
	}
	d = palloc(sizeof(Datum) * Max(ids.n, 1));
	for (size_t i = 0; i < ids.n; i++)
		d[i] = Int32GetDatum(ids.ids[i]);
	{
		ArrayType  *a = construct_array(d, (int) ids.n, INT4OID, 4, true, TYPALIGN_INT);

		kl_ids_free(&ids);
		PG_RETURN_ARRAYTYPE_P(a);
	}
}

static int32 *
int_array(ArrayType *a, int *n, const char *what)
{
	Datum	   *elems;
	bool	   *nulls;
	int32	   *out;

	if (ARR_NDIM(a) > 1)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s must be a one-dimensional array", what)));
	deconstruct_array(a, INT4OID, 4, true, TYPALIGN_INT, &elems, &nulls, n);
	out = palloc(sizeof(int32) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
	{
		if (nulls[i])
			ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("%s must not contain NULLs", what)));
		out[i] = DatumGetInt32(elems[i]);
	}
	return out;
}

/* detokenize(int[], model) -> text (invalid UTF-8 from split characters becomes U+FFFD) */
Datum
kl_sql_detokenize(PG_FUNCTION_ARGS)
{
	int			n;
	int32	   *ids;
	char	   *model = ARG_OR_NULL(1) ? text_to_cstring(PG_GETARG_TEXT_PP(1)) : NULL;
	int			entry;
	char	   *txt;
	size_t		len;
	kl_err		err;
	text	   *out;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("ids must not be NULL")));
	ids = int_array(PG_GETARG_ARRAYTYPE_P(0), &n, "ids");
	entry = kl_model_resolve(model);
	if (kl_decode_text(kl_model_tokenizer_for(entry), ids, (size_t) n, &txt, &len, &err) != KL_OK)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s", err.msg)));
	out = cstring_to_text_with_len(txt, (int) len);
	free(txt);
	PG_RETURN_TEXT_P(out);
}

/* ------------------------------------------------------------------ state */

static bytea *
checked_state(FunctionCallInfo fcinfo, int i)
{
	bytea	   *b = PG_GETARG_BYTEA_PP(i);
	kl_state_info info;
	kl_err		err;

	/* a first check here gives the error before anything is sent */
	if (kl_state_info_read((const uint8_t *) VARDATA_ANY(b), VARSIZE_ANY_EXHDR(b), &info, &err) != KL_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid kimi_linear state: %s", err.msg),
				 errhint("Pass a state returned by generate_with_state, unchanged.")));
	if (info.kind != KL_STATE_HEAD || info.from_pos != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("this state is only a part of a conversation's state"),
				 errhint("generate_with_state takes complete states; conversations are continued with kimi_linear.say.")));
	return b;
}

/* generate_with_state(state bytea, prompt text, ...settings...) -> (text, state) */
Datum
kl_sql_generate_with_state(PG_FUNCTION_ARGS)
{
	bytea	   *state = PG_ARGISNULL(0) ? NULL : checked_state(fcinfo, 0);
	char	   *prompt = required_text(fcinfo, 1, "prompt", state != NULL);
	GenArgs		g;
	int			entry;
	int32	   *ids;
	int			n;
	KlRequest	r;
	KlClient	c;
	TupleDesc	td;
	Datum		values[2];
	bool		nulls[2] = {false, false};

	if (get_call_result_type(fcinfo, NULL, &td) != TYPEFUNC_COMPOSITE)
		ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("generate_with_state must return a record")));
	read_gen_args(fcinfo, 2, &g);
	entry = kl_model_resolve(g.model);
	/* a fresh sequence starts with bos; a continued one goes on where it stopped */
	ids = encode_prompt(kl_model_tokenizer_for(entry), prompt, state == NULL, &n);
	check_prompt_length(n, g.max_tokens);
	fill_request(&r, &g, entry, n, 0);
	r.flags = KL_REQ_WANT_STATE;
	r.n_state_parts = state ? 1 : 0;
	r.page_size = 0;
	kl_client_submit(&c, &r, NULL, ids, n, state ? &state : NULL, state ? 1 : 0);
	kl_client_wait(&c);
	values[0] = PointerGetDatum(cstring_to_text_with_len(c.text.data, c.text.len));
	if (c.n_parts != 1)
		ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("the worker returned no state")));
	values[1] = PointerGetDatum(c.parts[0].blob);
	kl_client_release(&c);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(td), values, nulls)));
}

/*
 * _chat_turn(model, page_size, pages bytea[], head bytea, system text, message text, max_tokens,
 *            temperature, top_p, top_k, seed, stop, repetition_penalty)
 *   -> (reply text, reply_ids int[], head bytea, new_pages bytea[], pages_from bigint, positions bigint)
 * One turn of a stored conversation (used by say): only the new turn is run.
 */
Datum
kl_sql_chat_turn(PG_FUNCTION_ARGS)
{
	char	   *model;
	int			page_size;
	bytea	  **parts = NULL;
	int			n_parts = 0;
	bool		fresh = PG_ARGISNULL(3);
	char	   *message = required_text(fcinfo, 5, "message", false);
	GenArgs		g;
	int			entry;
	const kl_tokenizer *tok;
	kl_chat_message m[2];
	int			nm = 0;
	kl_ids		ids = {0};
	kl_err		err;
	int32		stops[4];
	int			n_stops;
	KlRequest	r;
	KlClient	c;
	TupleDesc	td;
	Datum		values[6];
	bool		nulls[6] = {false, false, false, false, false, false};
	int32	   *prompt;
	int			n;

	if (get_call_result_type(fcinfo, NULL, &td) != TYPEFUNC_COMPOSITE)
		ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("_chat_turn must return a record")));
	model = required_text(fcinfo, 0, "model", false);
	page_size = PG_ARGISNULL(1) ? 0 : PG_GETARG_INT32(1);
	if (page_size < 0)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("page_size must not be negative")));
	if (!fresh)
	{
		Datum	   *elems = NULL;
		bool	   *pnulls = NULL;
		int			np = 0;

		if (!PG_ARGISNULL(2))
			deconstruct_array(PG_GETARG_ARRAYTYPE_P(2), BYTEAOID, -1, false, TYPALIGN_INT, &elems, &pnulls, &np);
		parts = palloc(sizeof(bytea *) * (np + 1));
		for (int i = 0; i < np; i++)
		{
			if (pnulls[i])
				ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("a conversation page is NULL")));
			parts[n_parts++] = DatumGetByteaPP(elems[i]);
		}
		parts[n_parts++] = PG_GETARG_BYTEA_PP(3);
	}
	/* settings: max_tokens .. stop at 6..11, then repetition_penalty at 12 */
	{
		GenArgs		tmp;

		read_gen_args(fcinfo, 6, &tmp);
		g = tmp;
	}
	g.model = model;
	entry = kl_model_resolve(model);
	tok = kl_model_tokenizer_for(entry);
	if (fresh && !PG_ARGISNULL(4))
	{
		m[nm].role = "system";
		m[nm].content = text_to_cstring(PG_GETARG_TEXT_PP(4));
		m[nm].content_len = strlen(m[nm].content);
		nm++;
	}
	m[nm].role = "user";
	m[nm].content = message;
	m[nm].content_len = strlen(message);
	nm++;
	if (kl_chat_render(tok, m, nm, true, &ids, &err) != KL_OK)
	{
		kl_ids_free(&ids);
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s", err.msg)));
	}
	n = (int) ids.n;
	prompt = palloc(sizeof(int32) * Max(n, 1));
	memcpy(prompt, ids.ids, sizeof(int32) * n);
	kl_ids_free(&ids);
	check_prompt_length(n, g.max_tokens);
	n_stops = kl_tokenizer_stop_ids(tok, stops, 4);
	fill_request(&r, &g, entry, n, n_stops);
	r.flags = KL_REQ_WANT_STATE | KL_REQ_CHAT_TURN;
	r.n_state_parts = n_parts;
	r.page_size = page_size;
	kl_client_submit(&c, &r, stops, prompt, n, parts, n_parts);
	kl_client_wait(&c);

	values[0] = PointerGetDatum(cstring_to_text_with_len(c.text.data, c.text.len));
	{
		Datum	   *d = palloc(sizeof(Datum) * Max(c.n_ids, 1));

		for (int i = 0; i < c.n_ids; i++)
			d[i] = Int32GetDatum(c.ids[i]);
		values[1] = PointerGetDatum(construct_array(d, c.n_ids, INT4OID, 4, true, TYPALIGN_INT));
	}
	{
		Datum	   *pages = palloc(sizeof(Datum) * Max(c.n_parts, 1));
		int			np = 0;
		int64		pages_from = -1;

		nulls[2] = true;
		for (int i = 0; i < c.n_parts; i++)
		{
			if (c.parts[i].kind == KL_STATE_HEAD)
			{
				values[2] = PointerGetDatum(c.parts[i].blob);
				nulls[2] = false;
			}
			else
			{
				if (pages_from < 0)
					pages_from = c.parts[i].from_pos;
				pages[np++] = PointerGetDatum(c.parts[i].blob);
			}
		}
		if (nulls[2])
			ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("the worker returned no state")));
		values[3] = PointerGetDatum(construct_array(pages, np, BYTEAOID, -1, false, TYPALIGN_INT));
		values[4] = Int64GetDatum(pages_from < 0 ? 0 : pages_from);
	}
	values[5] = Int64GetDatum(c.done.positions);
	kl_client_release(&c);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(td), values, nulls)));
}

/* ------------------------------------------------------------------ models */

/* _resolve_model(name) -> the name of the model that would be used (loading the default) */
Datum
kl_sql_resolve_model(PG_FUNCTION_ARGS)
{
	char	   *name = ARG_OR_NULL(0) ? text_to_cstring(PG_GETARG_TEXT_PP(0)) : NULL;
	int			e = kl_model_resolve(name);
	char		out[KL_MODEL_NAME_LEN];

	kl_model_entry_name(e, out);
	PG_RETURN_TEXT_P(cstring_to_text(out));
}

Datum
kl_sql_load_model(PG_FUNCTION_ARGS)
{
	char	   *name = required_text(fcinfo, 0, "name", false);
	char	   *path = required_text(fcinfo, 1, "path", false);

	kl_model_register(name, path, true);
	PG_RETURN_VOID();
}

Datum
kl_sql_unload_model(PG_FUNCTION_ARGS)
{
	char	   *name = required_text(fcinfo, 0, "name", false);

	kl_model_unregister(name);
	PG_RETURN_VOID();
}

/* _models() -> (name, path, parameters, bytes, device, status, loaded_at, error) */
Datum
kl_sql_models(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	kl_require_shared();
	InitMaterializedSRF(fcinfo, 0);
	for (int e = 0; e < KL_MAX_MODELS; e++)
	{
		KlModelEntry me;
		Datum		v[8];
		bool		nulls[8] = {0};
		static const char *states[] = {"free", "loading", "ready", "failed", "unloading"};

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		me = kl_shared->models[e];
		LWLockRelease(kl_shared->lock);
		if (me.state == KL_MODEL_FREE)
			continue;
		v[0] = CStringGetTextDatum(me.name);
		v[1] = CStringGetTextDatum(me.path);
		v[2] = Int64GetDatum(me.n_params);
		v[3] = Int64GetDatum(me.bytes);
		v[4] = CStringGetTextDatum(me.device_name[0] ? me.device_name : kl_device_name(me.device));
		v[5] = CStringGetTextDatum(states[me.state]);
		if (me.loaded_at)
			v[6] = TimestampTzGetDatum(me.loaded_at);
		else
			nulls[6] = true;
		if (me.error[0])
			v[7] = CStringGetTextDatum(me.error);
		else
			nulls[7] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
	return (Datum) 0;
}

/* _activity() -> (worker, request_id, backend_pid, model, phase, prompt_done, prompt_total,
 *                 generated, tokens_per_second, submitted_at) */
Datum
kl_sql_activity(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	static const char *phases[] = {"queued", "prefill", "decode", "done"};

	kl_require_shared();
	InitMaterializedSRF(fcinfo, 0);
	for (int s = 0; s < kl_shared->n_slots; s++)
	{
		KlSlot	   *slot = &kl_shared->slots[s];
		Datum		v[10];
		bool		nulls[10] = {0};
		KlSlotState st;
		int			worker;
		uint64		id;
		pid_t		pid;
		char		model[KL_MODEL_NAME_LEN];
		KlPhase		phase;
		int64		pd,
					pt,
					gen;
		double		tps;
		TimestampTz sub;

		LWLockAcquire(kl_shared->lock, LW_SHARED);
		st = slot->state;
		worker = slot->worker;
		id = slot->request_id;
		pid = slot->backend_pid;
		strlcpy(model, slot->model, sizeof(model));
		LWLockRelease(kl_shared->lock);
		if (st == KL_SLOT_FREE)
			continue;
		SpinLockAcquire(&slot->mutex);
		phase = slot->phase;
		pd = slot->prompt_done;
		pt = slot->prompt_total;
		gen = slot->generated;
		tps = slot->tokens_per_second;
		sub = slot->submitted_at;
		SpinLockRelease(&slot->mutex);
		v[0] = Int32GetDatum(worker);
		v[1] = Int64GetDatum((int64) id);
		v[2] = Int32GetDatum(pid);
		v[3] = CStringGetTextDatum(model);
		v[4] = CStringGetTextDatum(phases[phase]);
		v[5] = Int64GetDatum(pd);
		v[6] = Int64GetDatum(pt);
		v[7] = Int64GetDatum(gen);
		v[8] = Float8GetDatum(tps);
		v[9] = TimestampTzGetDatum(sub);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
	return (Datum) 0;
}
