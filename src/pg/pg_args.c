/*
 * pg_args.c — argument handling shared by the SQL functions (pg_args.h).
 *
 * Everything is checked here, in the backend, before a request is sent, so
 * that a mistake gets an ERROR naming the argument and its valid range; the
 * worker checks again (it trusts no input) but should never need to.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "mb/pg_wchar.h"
#include "utils/memutils.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "lib/stringinfo.h"
#include "utils/lsyscache.h"

#include "pg_args.h"
#include "pg_errors.h"
#include "pg_guc.h"

#define ARG_GIVEN(i) (PG_NARGS() > (i) && !PG_ARGISNULL(i))

/*
 * The sampling settings in floating point, with their valid ranges.  A value
 * is checked as the caller passed it (double precision) and again as the
 * sampler will use it (single precision): 1e-300 is a valid top_p in double
 * but 0 in single, and 100.0001 an invalid temperature that rounds to a
 * valid 100.  Either way the error reports the value as passed.
 */
typedef struct KlSettingRange
{
	const char *name;
	const char *range;			/* as the message says it */
	double		lo,
				hi;
	bool		lo_open,
				hi_open;
} KlSettingRange;

static const KlSettingRange setting_ranges[] = {
	{"temperature", "between 0 and 100 (0 = greedy)", 0, 100, false, false},
	{"top_p", "in (0, 1] (1 = no limit)", 0, 1, true, false},
	{"min_p", "in [0, 1) (0 = no limit)", 0, 1, false, true},
	{"repetition_penalty", "in (0, 100] (1 = none)", 0, 100, true, false},
};

static bool
in_range(const KlSettingRange *r, double v)
{
	return (r->lo_open ? v > r->lo : v >= r->lo) && (r->hi_open ? v < r->hi : v <= r->hi);
}

float
kl_sampling_setting(const char *name, double v)
{
	const KlSettingRange *r = NULL;

	for (size_t i = 0; i < lengthof(setting_ranges); i++)
		if (strcmp(setting_ranges[i].name, name) == 0)
			r = &setting_ranges[i];
	if (r == NULL)
		elog(ERROR, "kimi_linear: unknown sampling setting \"%s\"", name);
	if (isnan(v) || isinf(v))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a finite number", name)));
	if (!in_range(r, v))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be %s, got %s", name, r->range, float8out_internal(v))));
	if (!in_range(r, (double) (float) v))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be %s, got %s", name, r->range, float8out_internal(v)),
				 errdetail("The sampler computes in single precision, where %s is %s.",
						   float8out_internal(v), float8out_internal((double) (float) v))));
	return (float) v;
}

static float
float_arg(FunctionCallInfo fcinfo, int i, const char *what)
{
	return kl_sampling_setting(what, PG_GETARG_FLOAT8(i));
}

void
kl_read_gen_args(FunctionCallInfo fcinfo, int first, bool has_model, int default_max_tokens, KlGenArgs *g)
{
	int			i_max = first,
				i_temp = first + 1,
				i_top_p = first + 2,
				i_top_k = first + 3,
				i_seed = first + 4,
				i_stop = first + 5,
				i_model = has_model ? first + 6 : -1,
				i_rep = first + (has_model ? 7 : 6),
				i_min_p = i_rep + 1,
				i_eos = i_rep + 2;
	kl_err		err;

	memset(g, 0, sizeof(*g));
	kl_sampling_default(&g->sampling);
	g->max_tokens = default_max_tokens;
	/* no seed: a fresh one per call (it only matters when temperature > 0) */
	g->sampling.seed = pg_prng_uint64(&pg_global_prng_state);

	if (ARG_GIVEN(i_max))
		g->max_tokens = PG_GETARG_INT32(i_max);
	if (g->max_tokens < 0 || g->max_tokens > kl_max_new_tokens)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_tokens must be between 0 and %d, got %d", kl_max_new_tokens, g->max_tokens),
				 errhint("The upper limit is the setting kimi_linear.max_new_tokens.")));
	if (ARG_GIVEN(i_temp))
		g->sampling.temperature = float_arg(fcinfo, i_temp, "temperature");
	if (ARG_GIVEN(i_top_p))
		g->sampling.top_p = float_arg(fcinfo, i_top_p, "top_p");
	if (ARG_GIVEN(i_top_k))
		g->sampling.top_k = PG_GETARG_INT32(i_top_k);
	if (ARG_GIVEN(i_seed))
		g->sampling.seed = (uint64) PG_GETARG_INT64(i_seed);
	if (ARG_GIVEN(i_stop))
	{
		ArrayType  *a = PG_GETARG_ARRAYTYPE_P(i_stop);
		Datum	   *elems;
		bool	   *nulls;
		int			n;

		if (ARR_NDIM(a) > 1)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("stop must be a one-dimensional array of strings")));
		deconstruct_array(a, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
		if (n > KL_MAX_STOP_STRINGS)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("at most %d stop strings are allowed, got %d", KL_MAX_STOP_STRINGS, n)));
		g->stop = palloc(sizeof(char *) * (n + 1));
		for (int i = 0; i < n; i++)
		{
			char	   *s;

			if (nulls[i])
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("stop strings must not be NULL")));
			s = text_to_cstring(DatumGetTextPP(elems[i]));
			s = kl_to_utf8(s, strlen(s));
			if (strlen(s) == 0 || strlen(s) > KL_MAX_STOP_LEN)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("stop strings must have 1 to %d bytes, got %zu", KL_MAX_STOP_LEN, strlen(s))));
			g->stop[g->n_stop++] = s;
		}
	}
	if (i_model >= 0 && ARG_GIVEN(i_model))
		g->model = text_to_cstring(PG_GETARG_TEXT_PP(i_model));
	if (ARG_GIVEN(i_rep))
		g->sampling.repetition_penalty = float_arg(fcinfo, i_rep, "repetition_penalty");
	if (ARG_GIVEN(i_min_p))
		g->sampling.min_p = float_arg(fcinfo, i_min_p, "min_p");
	if (ARG_GIVEN(i_eos))
		g->ignore_eos = PG_GETARG_BOOL(i_eos);
	kl_check_sampling(&g->sampling);
	if (kl_sampling_validate(&g->sampling, &err) != KL_OK)	/* the engine's own check, should it be stricter */
		kl_engine_error(&err, NULL, NULL);
}

void
kl_check_sampling(const kl_sampling *s)
{
	if (s->top_k < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("top_k must be 0 (no limit) or more, got %d", s->top_k)));
	/* the others were checked as they were read (kl_sampling_setting); again, as floats */
	(void) kl_sampling_setting("temperature", s->temperature);
	(void) kl_sampling_setting("top_p", s->top_p);
	(void) kl_sampling_setting("min_p", s->min_p);
	(void) kl_sampling_setting("repetition_penalty", s->repetition_penalty);
}

char *
kl_to_utf8(const char *s, int len)
{
	char	   *u = pg_server_to_any(s, len, PG_UTF8);

	if (u == s)
		u = pnstrdup(s, len);
	return u;
}

text *
kl_utf8_to_text(const char *s, int len)
{
	char	   *c;

	/* a byte-level token may decode to NUL, which no text value can hold */
	if (memchr(s, '\0', len) != NULL)
	{
		StringInfoData b;

		initStringInfo(&b);
		for (int i = 0; i < len; i++)
		{
			if (s[i] == '\0')
				appendStringInfoString(&b, "\xEF\xBF\xBD");	/* U+FFFD */
			else
				appendStringInfoChar(&b, s[i]);
		}
		s = b.data;
		len = b.len;
	}
	c = pg_any_to_server(s, len, PG_UTF8);

	return cstring_to_text_with_len(c, c == s ? len : (int) strlen(c));
}

char *
kl_text_arg(FunctionCallInfo fcinfo, int i, const char *what, bool allow_empty)
{
	text	   *t;

	if (PG_ARGISNULL(i))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", what)));
	t = PG_GETARG_TEXT_PP(i);
	if (!allow_empty && VARSIZE_ANY_EXHDR(t) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", what)));
	return kl_to_utf8(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
}

/* copy engine ids (malloc'd) into palloc'd memory, freeing them; ERROR afterwards if failed */
static int32 *
take_ids(kl_ids *ids, int rc, kl_err *err, int *n_out)
{
	int32	   *out;

	if (rc != KL_OK)
	{
		kl_err		copy = *err;

		kl_ids_free(ids);
		kl_engine_error(&copy, NULL, NULL);
	}
	if (ids->n > (size_t) MaxAllocSize / sizeof(int32) - 1)
	{
		kl_ids_free(ids);
		ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("the input is too long")));
	}
	out = palloc(sizeof(int32) * (ids->n + 1));
	if (ids->n)
		memcpy(out, ids->ids, sizeof(int32) * ids->n);
	*n_out = (int) ids->n;
	kl_ids_free(ids);
	return out;
}

int32 *
kl_encode_text(const kl_tokenizer *tok, const char *utf8, bool with_bos, int *n_out)
{
	kl_ids		ids = {0};
	kl_err		err;
	int			rc = KL_OK;

	if (with_bos && kl_tokenizer_bos(tok) >= 0)
		rc = kl_ids_push(&ids, kl_tokenizer_bos(tok), &err);
	if (rc == KL_OK)
		rc = kl_encode(tok, utf8, strlen(utf8), false, &ids, &err);
	return take_ids(&ids, rc, &err, n_out);
}

int32 *
kl_render_chat(const kl_tokenizer *tok, const kl_chat_message *msgs, int n, bool gen_prompt, int *n_out)
{
	kl_ids		ids = {0};
	kl_err		err;
	int			rc = kl_chat_render(tok, msgs, (size_t) n, gen_prompt, &ids, &err);

	return take_ids(&ids, rc, &err, n_out);
}

int32 *
kl_chat_stop_ids(const kl_tokenizer *tok, int *n_out)
{
	int32	   *out = palloc(sizeof(int32) * 8);

	*n_out = kl_tokenizer_stop_ids(tok, out, 8);
	return out;
}

void
kl_check_context(int64 history, int64 n_prompt)
{
	if (history + n_prompt > kl_max_context)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("the input does not fit in the context: %lld positions of history + %lld new tokens > kimi_linear.max_context (%d)",
						(long long) history, (long long) n_prompt, kl_max_context),
				 errhint("Shorten the input or start a new conversation; a superuser can raise kimi_linear.max_context.")));
}

void
kl_spec_init(KlReqSpec *spec, const KlGenArgs *g, const KlModelRef *ref)
{
	memset(spec, 0, sizeof(*spec));
	spec->model = ref->name;
	spec->model_generation = ref->generation;
	spec->flags = KL_REQ_WANT_TEXT | KL_REQ_SKIP_STOP_TEXT;
	spec->temperature = g->sampling.temperature;
	spec->top_p = g->sampling.top_p;
	spec->min_p = g->sampling.min_p;
	spec->repetition_penalty = g->sampling.repetition_penalty;
	spec->top_k = g->sampling.top_k;
	spec->seed = g->sampling.seed;
	spec->ignore_eos = g->ignore_eos;
	spec->max_tokens = g->max_tokens;
	spec->max_context = kl_max_context;
	spec->stop_strings = g->stop;
	spec->n_stop_strings = g->n_stop;
}

ArrayType *
kl_ids_to_array(const int32 *ids, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * (n + 1));

	for (int i = 0; i < n; i++)
		d[i] = Int32GetDatum(ids[i]);
	return construct_array(d, n, INT4OID, 4, true, TYPALIGN_INT);
}

int32 *
kl_array_to_ids(ArrayType *a, int *n, const char *what)
{
	Datum	   *elems;
	bool	   *nulls;
	int32	   *out;

	if (ARR_NDIM(a) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a one-dimensional array", what)));
	deconstruct_array(a, INT4OID, 4, true, TYPALIGN_INT, &elems, &nulls, n);
	out = palloc(sizeof(int32) * (*n + 1));
	for (int i = 0; i < *n; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not contain NULLs", what)));
		out[i] = DatumGetInt32(elems[i]);
	}
	return out;
}
