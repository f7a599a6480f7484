/*
 * pg_tokenize.c — tokenize(text, model, special) and detokenize(int[], model):
 * run in the calling backend with its copy of the model's tokenizer
 * (pg_model.c); no request to a worker.
 */
#include "postgres.h"

#include "utils/builtins.h"

#include "pg_args.h"
#include "pg_errors.h"

PG_FUNCTION_INFO_V1(kl_sql_tokenize);
PG_FUNCTION_INFO_V1(kl_sql_detokenize);

Datum
kl_sql_tokenize(PG_FUNCTION_ARGS)
{
	char	   *txt = kl_text_arg(fcinfo, 0, "input", true);
	char	   *model = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	bool		special = PG_NARGS() > 2 && !PG_ARGISNULL(2) ? PG_GETARG_BOOL(2) : false;
	KlModelRef	ref;
	const kl_tokenizer *tok;
	kl_ids		ids = {0};
	kl_err		err;
	ArrayType  *volatile a;		/* set inside PG_TRY, read after it */

	kl_model_resolve(model, &ref);
	tok = kl_ref_tokenizer(&ref);
	if (kl_encode(tok, txt, strlen(txt), special, &ids, &err) != KL_OK)
	{
		kl_ids_free(&ids);
		kl_engine_error(&err, NULL, NULL);
	}
	PG_TRY();
	{
		a = kl_ids_to_array(ids.ids, (int) ids.n);
	}
	PG_FINALLY();
	{
		kl_ids_free(&ids);
	}
	PG_END_TRY();
	PG_RETURN_ARRAYTYPE_P(a);
}

Datum
kl_sql_detokenize(PG_FUNCTION_ARGS)
{
	char	   *model = PG_NARGS() > 1 && !PG_ARGISNULL(1) ? text_to_cstring(PG_GETARG_TEXT_PP(1)) : NULL;
	KlModelRef	ref;
	int32	   *ids;
	int			n;
	char	   *txt;
	size_t		len;
	kl_err		err;
	text	   *volatile out;	/* set inside PG_TRY, read after it */

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("ids must not be NULL")));
	ids = kl_array_to_ids(PG_GETARG_ARRAYTYPE_P(0), &n, "ids");
	kl_model_resolve(model, &ref);
	for (int i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= ref.vocab_size)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("token id %d at position %d is outside the vocabulary of model \"%s\" [0, %d)",
							ids[i], i + 1, ref.name, ref.vocab_size)));
	if (kl_decode_text(kl_ref_tokenizer(&ref), ids, (size_t) n, &txt, &len, &err) != KL_OK)
		kl_engine_error(&err, NULL, NULL);
	PG_TRY();
	{
		out = kl_utf8_to_text(txt, (int) len);
	}
	PG_FINALLY();
	{
		free(txt);
	}
	PG_END_TRY();
	PG_RETURN_TEXT_P(out);
}
