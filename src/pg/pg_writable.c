/*
 * pg_writable.c — the up-front "can this transaction write?" check
 * (pg_writable.h), and its SQL form _require_writable(fn, why) for the
 * PL/pgSQL functions of the install script.
 *
 * Why check first: on a standby the first write fails deep inside the
 * function with PostgreSQL's message about the statement (for say, "cannot
 * execute SELECT FOR UPDATE in a read-only transaction"), which names neither
 * the function nor the way out.  A standby still runs everything that only
 * reads (generate, summarize, the *_each forms, generate_with_state,
 * chat_with_state, tokenize): README.md, "Scaling out".
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "fmgr.h"
#include "utils/builtins.h"

#include "pg_writable.h"

PG_FUNCTION_INFO_V1(kl_sql_require_writable);

void
kl_require_writable(const char *fn, const char *why, const char *standby_hint)
{
	if (RecoveryInProgress())
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("kimi_linear.%s() cannot run on a standby server", fn),
				 errdetail("%s, and a standby is read-only: it only replays the primary's changes.", why),
				 standby_hint ? errhint("Run %s() on the primary. %s", fn, standby_hint)
				 : errhint("Run %s() on the primary.", fn)));
	if (XactReadOnly)
		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("kimi_linear.%s() cannot run in a read-only transaction", fn),
				 errdetail("%s.", why),
				 errhint("Run it in a read-write transaction (check transaction_read_only and default_transaction_read_only).")));
}

/* _require_writable(fn text, why text): the check, for PL/pgSQL callers */
Datum
kl_sql_require_writable(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("fn and why must not be NULL")));
	kl_require_writable(text_to_cstring(PG_GETARG_TEXT_PP(0)), text_to_cstring(PG_GETARG_TEXT_PP(1)), NULL);
	PG_RETURN_VOID();
}
