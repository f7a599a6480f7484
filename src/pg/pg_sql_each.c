/*
 * pg_sql_each.c — the set-based forms: generate_each, chat_each,
 * summarize_each, extract_each, generate_with_state_each,
 * chat_with_state_each.  Many
 * inputs in (an array of keys and arrays of inputs, the same length), one row
 * per input out (key, result, [new_state,] tokens, error), in the order the
 * inputs finish, with up to kimi_linear.max_requests_per_call
 * requests in flight together so that the worker decodes them in one batch
 * (pg_batch_call.c does the work).  Each input gets exactly the request its
 * single-row function sends, so a row's result equals what generate, chat or
 * summarize returns for that input (the worker's results do not depend on
 * what else is in the batch), and an input's error (NULL or too long input,
 * a bad state, the worker's error) comes back on its row.
 *
 * Value-per-call: in the select list or through a cursor, rows come out as
 * inputs finish, and a query that stops early (closed cursor, LIMIT) cancels
 * the rest.  Their SQL declarations are in sql/kimi_linear--0.1.0.sql.
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "funcapi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"

#include "pg_args.h"
#include "pg_batch_call.h"
#include "pg_chat.h"
#include "pg_conversation.h"
#include "pg_errors.h"
#include "pg_guc.h"

PG_FUNCTION_INFO_V1(kl_sql_generate_each);
PG_FUNCTION_INFO_V1(kl_sql_chat_each);
PG_FUNCTION_INFO_V1(kl_sql_summarize_each);
PG_FUNCTION_INFO_V1(kl_sql_extract_each);
PG_FUNCTION_INFO_V1(kl_sql_generate_with_state_each);
PG_FUNCTION_INFO_V1(kl_sql_chat_with_state_each);

#define DEFAULT_MAX_TOKENS 256
#define SUMMARY_MAX_TOKENS 200
#define EXTRACT_MAX_TOKENS 512

typedef enum EachKind
{
	EACH_GENERATE,
	EACH_CHAT,
	EACH_SUMMARIZE,
	EACH_EXTRACT,				/* keys, bodies, schema, instructions, model, max_tokens */
	EACH_GENERATE_STATE,		/* keys, states, prompts */
	EACH_CHAT_STATE				/* keys, states, messages */
} EachKind;

#define HAS_STATE(kind) ((kind) == EACH_GENERATE_STATE || (kind) == EACH_CHAT_STATE)
#define IS_CHAT(kind) ((kind) == EACH_CHAT || (kind) == EACH_CHAT_STATE)

/* One set-based call: its inputs and what every input's request shares. */
typedef struct EachState
{
	EachKind	kind;
	const char *input_name;		/* "prompt", "messages", "doc": for error messages */
	int			n;
	Datum	   *keys;
	bool	   *key_nulls;
	Datum	   *inputs;
	bool	   *input_nulls;
	Datum	   *states;			/* the *_with_state forms */
	bool	   *state_nulls;
	KlGenArgs	g;
	bool		seed_given;		/* else a fresh seed per input, as per single call */
	KlModelRef	ref;
	const kl_tokenizer *tok;
	int32	   *stops;			/* chat stop ids (chat, summarize) */
	int			n_stops;
	Jsonb	   *schema;			/* extract */
	char	   *instructions;	/* extract (NULL: the default ones) */
	TupleDesc	td;
	KlBatchCall *batch;
} EachState;

/* ------------------------------------------------------------------ per input */

static char *
input_text(EachState *st, int i, bool allow_empty)
{
	text	   *t;

	if (st->input_nulls[i])
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", st->input_name)));
	t = DatumGetTextPP(st->inputs[i]);
	if (!allow_empty && VARSIZE_ANY_EXHDR(t) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", st->input_name)));
	return kl_to_utf8(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
}

static kl_chat_message *
input_messages(EachState *st, int i, int *n_msgs)
{
	if (st->input_nulls[i])
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("messages must not be NULL")));
	return kl_parse_messages(DatumGetJsonbP(st->inputs[i]), n_msgs);
}

/*
 * The state of input i (NULL: a fresh sequence), checked as
 * generate_with_state and chat_with_state check it: a complete head.
 * Returns the positions it holds (with its pending token).
 */
static int64
input_state(EachState *st, int i, KlBatchRequest *req, kl_state_info *info)
{
	bytea	   *state;
	const char **part;
	Size	   *len;
	const char *fn = st->kind == EACH_CHAT_STATE ? "chat_with_state" : "generate_with_state";

	memset(info, 0, sizeof(*info));
	info->pending = -1;
	if (st->state_nulls[i])
		return 0;
	state = DatumGetByteaPP(st->states[i]);
	part = palloc(sizeof(char *));
	len = palloc(sizeof(Size));
	*part = VARDATA_ANY(state);
	*len = VARSIZE_ANY_EXHDR(state);
	kl_check_state_head(*part, *len, info, "kimi_linear state", KL_E_INVALID);
	if (info->from_pos != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("this state is only a part of a conversation's state"),
				 errhint("%s takes complete states; stored conversations continue with kimi_linear.say.", fn)));
	req->parts = part;
	req->part_lens = len;
	req->n_parts = 1;
	return info->positions + (info->pending >= 0 ? 1 : 0);
}

/* input i -> the request its single-row function would send */
static void
prepare_input(void *arg, int i, KlBatchRequest *req)
{
	EachState  *st = (EachState *) arg;
	int32	   *ids;
	int			n;
	int64		history = 0;
	kl_state_info info;
	kl_chat_message *msgs;
	int			n_msgs;

	if (HAS_STATE(st->kind))
		history = input_state(st, i, req, &info);
	switch (st->kind)
	{
		case EACH_GENERATE:
			ids = kl_encode_text(st->tok, input_text(st, i, false), true, &n);
			break;
		case EACH_CHAT:
			msgs = input_messages(st, i, &n_msgs);
			ids = kl_render_chat(st->tok, msgs, n_msgs, true, &n);
			break;
		case EACH_EXTRACT:
			kl_spec_init(&req->spec, &st->g, &st->ref);
			kl_extract_request(st->tok, input_text(st, i, true), st->schema, st->instructions, &req->spec);
			return;				/* greedy: no seed */
		case EACH_GENERATE_STATE:
			/* with a state, the prompt may be empty: continue the generation */
			ids = kl_encode_text(st->tok, input_text(st, i, req->n_parts > 0), req->n_parts == 0, &n);
			break;
		case EACH_CHAT_STATE:
			msgs = input_messages(st, i, &n_msgs);
			ids = kl_chat_turn_ids(st->tok, info.pending, msgs, n_msgs, st->stops, st->n_stops, &n);
			break;
		case EACH_SUMMARIZE:
		default:
			ids = kl_summary_prompt(st->tok, input_text(st, i, false), &n);
			break;
	}
	kl_check_context(history, n);
	kl_spec_init(&req->spec, &st->g, &st->ref);
	req->spec.prompt = ids;
	req->spec.n_prompt = n;
	if (st->kind != EACH_GENERATE && st->kind != EACH_GENERATE_STATE)
	{
		req->spec.stop_ids = st->stops;
		req->spec.n_stop_ids = st->n_stops;
	}
	if (HAS_STATE(st->kind))
	{
		req->spec.flags |= KL_REQ_WANT_STATE;
		req->spec.reply_hint = req->n_parts ? req->part_lens[0] + req->part_lens[0] / 4 : 0;
	}
	if (!st->seed_given)
		req->spec.seed = pg_prng_uint64(&pg_global_prng_state);
}

/* ------------------------------------------------------------------ the call */

/* a one-dimensional array argument, deconstructed; ERROR if NULL */
static int
array_arg(FunctionCallInfo fcinfo, int i, const char *what, Datum **elems, bool **nulls)
{
	ArrayType  *a;
	Oid			type;
	int16		typlen;
	bool		byval;
	char		align;
	int			n;

	if (PG_ARGISNULL(i))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", what),
				 errhint("Pass one element per input, e.g. ARRAY(SELECT id FROM docs ORDER BY id), ARRAY(SELECT body FROM docs ORDER BY id).")));
	a = PG_GETARG_ARRAYTYPE_P(i);
	if (ARR_NDIM(a) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a one-dimensional array", what)));
	type = ARR_ELEMTYPE(a);
	get_typlenbyvalalign(type, &typlen, &byval, &align);
	deconstruct_array(a, type, typlen, byval, align, elems, nulls, &n);
	return n;
}

/* keys, [states,] inputs: arrays of one length */
static void
read_arrays(FunctionCallInfo fcinfo, EachState *st)
{
	int			nk = array_arg(fcinfo, 0, "keys", &st->keys, &st->key_nulls);
	int			i_inputs = HAS_STATE(st->kind) ? 2 : 1;
	char	   *inputs_name = psprintf("%ss", st->input_name);

	if (IS_CHAT(st->kind))
		inputs_name = "messages";
	st->n = array_arg(fcinfo, i_inputs, inputs_name, &st->inputs, &st->input_nulls);
	if (nk != st->n)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("keys has %d elements and %s has %d", nk, inputs_name, st->n),
				 errhint("Pass one key per input, from the same query: ARRAY(SELECT id FROM t ORDER BY id), ARRAY(SELECT body FROM t ORDER BY id).")));
	if (HAS_STATE(st->kind))
	{
		int			ns = array_arg(fcinfo, 1, "states", &st->states, &st->state_nulls);

		if (ns != st->n)
			ereport(ERROR,
					(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
					 errmsg("states has %d elements and %s has %d", ns, inputs_name, st->n),
					 errhint("Pass one state (or NULL) per input.")));
	}
}

/* summarize's settings: max_tokens, model, temperature (as summarize checks them) */
static void
read_summary_args(FunctionCallInfo fcinfo, EachState *st)
{
	kl_err		err;
	double		temperature = PG_ARGISNULL(4) ? 0 : PG_GETARG_FLOAT8(4);

	memset(&st->g, 0, sizeof(st->g));
	kl_sampling_default(&st->g.sampling);
	st->g.max_tokens = PG_ARGISNULL(2) ? SUMMARY_MAX_TOKENS : PG_GETARG_INT32(2);
	st->g.model = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	if (isnan(temperature))
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("temperature must be a finite number")));
	st->g.sampling.temperature = (float) temperature;
	if (st->g.max_tokens < 0 || st->g.max_tokens > kl_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be between 0 and %d, got %d", kl_max_new_tokens, st->g.max_tokens)));
	kl_check_sampling(&st->g.sampling);
	if (kl_sampling_validate(&st->g.sampling, &err) != KL_OK)
		kl_engine_error(&err, NULL, NULL);
	/* summarize samples with the default seed */
	st->seed_given = true;
}

/* extract's settings: schema, instructions, model, max_tokens (as extract checks them) */
static void
read_extract_args(FunctionCallInfo fcinfo, EachState *st)
{
	if (PG_ARGISNULL(2))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("schema must not be NULL")));
	st->schema = PG_GETARG_JSONB_P_COPY(2);
	st->instructions = PG_ARGISNULL(3) ? NULL : kl_text_arg(fcinfo, 3, "instructions", false);
	memset(&st->g, 0, sizeof(st->g));
	kl_sampling_default(&st->g.sampling);
	st->g.model = PG_ARGISNULL(4) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(4));
	st->g.max_tokens = PG_ARGISNULL(5) ? EXTRACT_MAX_TOKENS : PG_GETARG_INT32(5);
	if (st->g.max_tokens < 1 || st->g.max_tokens > kl_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be between 1 and %d, got %d", kl_max_new_tokens, st->g.max_tokens)));
	st->seed_given = true;
}

/*
 * The shared body.  Arguments: keys, [states,] inputs, then the settings:
 * the generation settings then concurrency, on_error; for summarize
 * max_tokens, model, temperature, concurrency, on_error.
 */
static Datum
each_srf(FunctionCallInfo fcinfo, EachKind kind)
{
	FuncCallContext *fc;
	EachState  *st;
	KlBatchResult *r;

	if (SRF_IS_FIRSTCALL())
	{
		MemoryContext old;
		KlBatchOptions o;
		int			i_conc;

		fc = SRF_FIRSTCALL_INIT();
		old = MemoryContextSwitchTo(fc->multi_call_memory_ctx);
		st = palloc0(sizeof(EachState));
		st->kind = kind;
		st->input_name = IS_CHAT(kind) ? "messages" : kind == EACH_SUMMARIZE ? "doc" :
			kind == EACH_EXTRACT ? "body" : "prompt";
		if (get_call_result_type(fcinfo, NULL, &st->td) != TYPEFUNC_COMPOSITE)
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("a set-based kimi_linear function must return a record")));
		st->td = BlessTupleDesc(st->td);
		if (kind == EACH_SUMMARIZE)
		{
			read_summary_args(fcinfo, st);
			i_conc = 5;
		}
		else if (kind == EACH_EXTRACT)
		{
			read_extract_args(fcinfo, st);
			i_conc = 6;
		}
		else
		{
			int			first = HAS_STATE(kind) ? 3 : 2;	/* the generation settings */

			kl_read_gen_args(fcinfo, first, true, DEFAULT_MAX_TOKENS, &st->g);
			st->seed_given = PG_NARGS() > first + 4 && !PG_ARGISNULL(first + 4);
			i_conc = first + 10;
		}
		memset(&o, 0, sizeof(o));
		o.concurrency = kl_concurrency_arg(fcinfo, i_conc);
		o.abort_on_error = kl_on_error_abort_arg(fcinfo, i_conc + 1);
		read_arrays(fcinfo, st);
		/* the model and its tokenizer are the call's: their errors end the statement */
		kl_model_resolve(st->g.model, &st->ref);
		st->tok = kl_ref_tokenizer(&st->ref);
		if (kind != EACH_GENERATE && kind != EACH_GENERATE_STATE && kind != EACH_EXTRACT)
			st->stops = kl_chat_stop_ids(st->tok, &st->n_stops);
		if (kind == EACH_EXTRACT)		/* a bad schema is the call's error, not every row's */
			(void) kl_pg_grammar(kl_pg_chat(NULL, NULL), NULL, st->schema, 0);
		o.n_inputs = st->n;
		o.prepare = prepare_input;
		o.arg = st;
		st->batch = kl_batch_call_begin(&o);
		kl_batch_call_end_with_query(st->batch, fcinfo);
		fc->user_fctx = st;
		MemoryContextSwitchTo(old);
	}
	fc = SRF_PERCALL_SETUP();
	st = fc->user_fctx;
	r = kl_batch_call_next(st->batch);
	if (r == NULL)
	{
		kl_batch_call_end(st->batch);
		SRF_RETURN_DONE(fc);
	}
	{
		/* (key, result, [new_state,] tokens, error) */
		Datum		v[5];
		bool		nulls[5] = {false, false, false, false, false};
		int			c_state = HAS_STATE(st->kind) ? 2 : -1;
		int			c_tokens = HAS_STATE(st->kind) ? 3 : 2;
		int			c_error = c_tokens + 1;
		const char *error = r->error ? r->error->message : NULL;
		Jsonb	   *fields = NULL;

		if (!error && st->kind == EACH_EXTRACT)
			fields = kl_pg_json_value_or_why(&r->run, st->g.max_tokens, &error);
		if (!error && c_state >= 0 && (r->run.n_parts != 1 || r->run.parts[0].kind != KL_STATE_HEAD))
			error = "the inference worker returned no state";
		v[0] = st->keys[r->index];
		nulls[0] = st->key_nulls[r->index];
		if (error)
		{
			nulls[1] = nulls[c_tokens] = true;
			if (c_state >= 0)
				nulls[c_state] = true;
			v[c_error] = CStringGetTextDatum(error);
		}
		else
		{
			v[1] = fields ? JsonbPGetDatum(fields) : PointerGetDatum(kl_utf8_to_text(r->run.text, r->run.text_len));
			if (c_state >= 0)
				v[c_state] = PointerGetDatum(r->run.parts[0].blob);
			v[c_tokens] = Int32GetDatum(r->run.done.generated);
			nulls[c_error] = true;
		}
		SRF_RETURN_NEXT(fc, HeapTupleGetDatum(heap_form_tuple(st->td, v, nulls)));
	}
}

/* generate_each(keys, prompts text[], ...generate's settings..., concurrency, on_error) */
Datum
kl_sql_generate_each(PG_FUNCTION_ARGS)
{
	return each_srf(fcinfo, EACH_GENERATE);
}

/* chat_each(keys, messages jsonb[], ...chat's settings..., concurrency, on_error) */
Datum
kl_sql_chat_each(PG_FUNCTION_ARGS)
{
	return each_srf(fcinfo, EACH_CHAT);
}

/* summarize_each(keys, docs text[], max_tokens, model, temperature, concurrency, on_error) */
Datum
kl_sql_summarize_each(PG_FUNCTION_ARGS)
{
	return each_srf(fcinfo, EACH_SUMMARIZE);
}

/* extract_each(keys, bodies text[], schema, instructions, model, max_tokens, concurrency, on_error) */
Datum
kl_sql_extract_each(PG_FUNCTION_ARGS)
{
	return each_srf(fcinfo, EACH_EXTRACT);
}

/* generate_with_state_each(keys, states bytea[], prompts text[], ...generate's settings..., concurrency, on_error) */
Datum
kl_sql_generate_with_state_each(PG_FUNCTION_ARGS)
{
	return each_srf(fcinfo, EACH_GENERATE_STATE);
}

/* chat_with_state_each(keys, states bytea[], messages jsonb[], ...chat's settings..., concurrency, on_error) */
Datum
kl_sql_chat_with_state_each(PG_FUNCTION_ARGS)
{
	return each_srf(fcinfo, EACH_CHAT_STATE);
}
