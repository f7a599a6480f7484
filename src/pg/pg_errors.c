/*
 * pg_errors.c — error codes to SQLSTATEs (pg_errors.h): the table.
 *
 * Why these: the engine's "invalid input" is an invalid argument of the SQL
 * call (a prompt, a setting, a state, a checkpoint the caller named);
 * "resources" covers both memory and the engine's size limits, and stays the
 * class the caller can act on by asking for less (program_limit_exceeded,
 * as PostgreSQL reports a value over one of its own limits); corrupt data is
 * data_corrupted, as PostgreSQL reports a page that fails its checksum.
 */
#include "postgres.h"

#include "pg_errors.h"
#include "pg_protocol.h"

static const struct
{
	int			code;
	int			sqlstate;
}			sqlstates[] =
{
	{KL_E_INVALID, ERRCODE_INVALID_PARAMETER_VALUE},	/* 22023 */
	{KL_E_CORRUPT, ERRCODE_DATA_CORRUPTED}, /* XX001 */
	{KL_E_RESOURCES, ERRCODE_PROGRAM_LIMIT_EXCEEDED},	/* 54000 */
	{KL_E_UNSUPPORTED, ERRCODE_FEATURE_NOT_SUPPORTED},	/* 0A000 */
	{KL_E_INTERNAL, ERRCODE_INTERNAL_ERROR},	/* XX000 */
	{KL_ERR_MODEL, ERRCODE_UNDEFINED_OBJECT},	/* 42704: the model was unloaded */
	{KL_ERR_SHUTDOWN, ERRCODE_OPERATOR_INTERVENTION},	/* 57000: the worker is stopping */
	{KL_ERR_CACHE_MISS, ERRCODE_T_R_SERIALIZATION_FAILURE}, /* 40001: resend the whole state */
};

int
kl_sqlstate(int code)
{
	for (size_t i = 0; i < lengthof(sqlstates); i++)
		if (sqlstates[i].code == code)
			return sqlstates[i].sqlstate;
	return ERRCODE_INTERNAL_ERROR;	/* KL_E_NONE or unknown: a bug */
}

void
kl_engine_error(const kl_err *err, const char *context, const char *hint)
{
	ereport(ERROR,
			(errcode(kl_sqlstate(err->code)),
			 context ? errmsg("%s: %s", context, err->msg) : errmsg("%s", err->msg),
			 hint ? errhint("%s", hint) : 0));
}
