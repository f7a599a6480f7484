/*
 * pg_sql_query.c — run_query(query text, max_rows int) -> jsonb: one
 * read-only query, its rows as a JSON array, for agent loops that execute
 * SQL a model wrote (README, "An agent loop").
 *
 * Why a C function: inside a PL/pgSQL function, SET LOCAL statement_timeout
 * does not limit the queries the function then runs (the server arms the
 * statement timer once per statement the client sends).  run_query arms
 * its own timer with the statement_timeout in force when it is called, so
 * that "SET LOCAL statement_timeout = '2s'; run_query(...)" bounds that
 * query (canceled with program_limit_exceeded, which a PL/pgSQL handler
 * WHEN OTHERS catches; a real cancel still stops everything).  It also
 * takes exactly one statement, runs it through SPI in
 * read-only mode as a subquery (so only SELECT, VALUES, TABLE or WITH ...
 * SELECT), and with the caller's privileges: the role, read-only
 * transaction and row limit are the caller's defence in depth, not a
 * sandbox of their own.
 */
#include "postgres.h"

#include <signal.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timeout.h"

PG_FUNCTION_INFO_V1(kl_sql_run_query);

static TimeoutId query_timeout = MAX_TIMEOUTS;
static volatile sig_atomic_t query_timed_out = false;

/* like the statement timer: cancel the running query (SIGINT to ourselves) */
static void
query_timeout_handler(void)
{
	query_timed_out = true;
	kill(MyProcPid, SIGINT);
}

Datum
kl_sql_run_query(PG_FUNCTION_ARGS)
{
	MemoryContext caller = CurrentMemoryContext;
	char	   *query;
	int			max_rows = PG_ARGISNULL(1) ? 100 : PG_GETARG_INT32(1);
	volatile int timeout_ms = StatementTimeout;	/* read after a longjmp */
	StringInfoData sql;
	SPIPlanPtr	plan;
	JsonbParseState *state = NULL;
	JsonbValue *array;

	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("query must not be NULL")));
	if (max_rows < 0 || max_rows > 100000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_rows must be between 0 and 100000, got %d", max_rows)));
	query = text_to_cstring(PG_GETARG_TEXT_PP(0));
	/* a statement as models write it: a final semicolon ends it, not a second one */
	{
		size_t		n = strlen(query);

		while (n > 0 && (query[n - 1] == ';' || query[n - 1] == ' ' || query[n - 1] == '\n' ||
						 query[n - 1] == '\t' || query[n - 1] == '\r'))
			query[--n] = 0;
	}

	/* a subquery: one SELECT-like statement; a second one cannot be prepared */
	initStringInfo(&sql);
	appendStringInfo(&sql, "SELECT pg_catalog.to_jsonb(q) FROM (%s\n) q", query);

	if (query_timeout == MAX_TIMEOUTS)
		query_timeout = RegisterTimeout(USER_TIMEOUT, query_timeout_handler);
	query_timed_out = false;
	SPI_connect();
	PG_TRY();
	{
		if (timeout_ms > 0)
			enable_timeout_after(query_timeout, timeout_ms);
		plan = SPI_prepare(sql.data, 0, NULL);
		if (!plan)
			ereport(ERROR,
					(errcode(ERRCODE_SYNTAX_ERROR),
					 errmsg("could not prepare the query: %s", SPI_result_code_string(SPI_result))));
		if (SPI_execute_plan(plan, NULL, NULL, true, max_rows) != SPI_OK_SELECT)
			ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("the query did not run as a SELECT")));
		if (timeout_ms > 0)
			disable_timeout(query_timeout, false);
	}
	PG_CATCH();
	{
		if (timeout_ms > 0)
			disable_timeout(query_timeout, false);
		if (query_timed_out)
		{
			/* our timer canceled it: say so (the server would call it a user's cancel) */
			QueryCancelPending = false;
			query_timed_out = false;
			FlushErrorState();
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("canceling the query: it ran longer than statement_timeout (%d ms)", timeout_ms)));
		}
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (query_timed_out)
	{
		/* the timer fired just as the query finished: its cancel must not hit the caller's statement */
		QueryCancelPending = false;
		query_timed_out = false;
	}

	MemoryContextSwitchTo(caller);
	pushJsonbValue(&state, WJB_BEGIN_ARRAY, NULL);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);
		Jsonb	   *row;
		JsonbValue	v;

		if (isnull)
			continue;
		row = DatumGetJsonbP(d);
		v.type = jbvBinary;
		v.val.binary.data = &row->root;
		v.val.binary.len = VARSIZE(row) - VARHDRSZ;
		pushJsonbValue(&state, WJB_ELEM, &v);
	}
	array = pushJsonbValue(&state, WJB_END_ARRAY, NULL);
	SPI_finish();
	PG_RETURN_JSONB_P(JsonbValueToJsonb(array));
}
