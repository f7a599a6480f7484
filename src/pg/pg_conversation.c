/*
 * pg_conversation.c — chat turns on a sequence state: say and say_json (a
 * stored conversation) and chat_with_state (a state held by the caller).
 *
 * say(conversation_id, message, ...) runs in the caller's transaction:
 *   1. lock the conversation row (SELECT ... FOR UPDATE): concurrent turns on
 *      one conversation queue up instead of losing one another;
 *   2. send its state to a worker: first the head alone, hoping the worker
 *      still holds the sequence from the previous turn (its cache checks the
 *      head byte for byte); on a miss, the stored pages and the head;
 *   3. insert the pages the turn completed, replace the head, record both
 *      messages.  A rollback undoes all of it; the worker's cache then simply
 *      no longer matches.
 * A turn is the user message in the chat format, after closing the previous
 * reply if it was cut off (max_tokens): exactly the tokens the whole history
 * rendered with the chat template would have.
 *
 * Agent conversations: a conversation may declare tools (new_conversation's
 * tools, rendered before everything in its first turn).  When a reply calls
 * tools, add_tool_results (SQL) stores their results as 'tool' messages of
 * the next turn; that turn then renders them, in the order of the calls,
 * before the user's message (which may then be left out), and tool_choice /
 * json_schema constrain its reply.  Each reply is stored with its tool calls
 * and its token ids, so that the whole history replays to the same tokens.
 *
 * The statements run over SPI name every object with its schema (the
 * extension's, looked up and quoted; pg_catalog for functions and
 * operators): whatever the caller's search_path, and whatever another role
 * put in a schema on it, only the extension's tables and PostgreSQL's own
 * functions are used.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"

#include "pg_args.h"
#include "pg_chat.h"
#include "pg_conversation.h"
#include "pg_errors.h"
#include "pg_guc.h"
#include "pg_writable.h"

PG_FUNCTION_INFO_V1(kl_sql_say);
PG_FUNCTION_INFO_V1(kl_sql_say_json);
PG_FUNCTION_INFO_V1(kl_sql_check_tools);
PG_FUNCTION_INFO_V1(kl_sql_chat_with_state);

/* the chat template's end-of-message token, and whether id ends a reply */
static int32
end_id(const kl_tokenizer *tok)
{
	int32		id = kl_tokenizer_special_id(tok, "<|im_end|>");

	if (id < 0)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("this model's tokenizer has no chat format (no <|im_end|> token)")));
	return id;
}

static bool
in_ids(int32 id, const int32 *ids, int n)
{
	for (int i = 0; i < n; i++)
		if (ids[i] == id)
			return true;
	return false;
}

/*
 * The ids of one turn: [<|im_end|> if the state's last reply was cut off]
 * + messages rendered + the assistant prompt.
 */
static int32 *
turn_ids(const kl_tokenizer *tok, int32 pending, const kl_chat_message *msgs, int n_msgs,
		 const int32 *stops, int n_stops, int *n_out)
{
	int			n;
	int32	   *body = kl_render_chat(tok, msgs, n_msgs, true, &n);
	bool		close = pending >= 0 && !in_ids(pending, stops, n_stops);
	int32	   *ids = palloc(sizeof(int32) * (n + 1));

	if (close)
		ids[0] = end_id(tok);
	memcpy(ids + (close ? 1 : 0), body, sizeof(int32) * n);
	*n_out = n + (close ? 1 : 0);
	return ids;
}

static void
check_head(const char *data, Size len, kl_state_info *info, const char *what, kl_errcode as)
{
	kl_err		err;

	if (kl_state_info_read((const uint8_t *) data, len, info, &err) != KL_OK)
	{
		err.code = as;
		kl_engine_error(&err, psprintf("invalid %s", what), NULL);
	}
	if (info->kind != KL_STATE_HEAD)
	{
		kl_errc(&err, as, "a rows part where a head was expected");
		kl_engine_error(&err, psprintf("invalid %s", what), NULL);
	}
}

int32 *
kl_chat_turn_ids(const kl_tokenizer *tok, int32 pending, const kl_chat_message *msgs, int n_msgs,
				 const int32 *stops, int n_stops, int *n_out)
{
	return turn_ids(tok, pending, msgs, n_msgs, stops, n_stops, n_out);
}

void
kl_check_state_head(const char *data, Size len, kl_state_info *info, const char *what, kl_errcode as)
{
	check_head(data, len, info, what, as);
}

/* ------------------------------------------------------------------ say */

/*
 * The extension's schema as an SQL identifier (quoted where needed): the
 * schema of the SQL function being called, which the install script created
 * there with the tables.
 */
static const char *
ext_schema(FunctionCallInfo fcinfo)
{
	char	   *nsp = get_namespace_name(get_func_namespace(fcinfo->flinfo->fn_oid));

	if (nsp == NULL)
		elog(ERROR, "kimi_linear: the extension's schema does not exist");
	return quote_identifier(nsp);
}

/*
 * The tool calls of the conversation's last reply (ids in order, palloc'd)
 * when that reply is in turn `turns`, and the results stored for the next
 * turn; every call must have one before the conversation goes on.
 */
typedef struct PendingCalls
{
	int			n_calls;
	char	  **ids;
	char	  **results;		/* NULL: none yet */
	int			n_results;
	int			counter;		/* tool calls in the whole conversation */
} PendingCalls;

static void
read_pending_calls(const char *nsp, int64 cid, int turns, PendingCalls *p)
{
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		args[2] = {Int64GetDatum(cid), Int32GetDatum(turns)};
	bool		isnull;

	memset(p, 0, sizeof(*p));
	if (SPI_execute_with_args(psprintf("SELECT pg_catalog.count(*)::pg_catalog.int4 FROM %s.messages m,"
									   " pg_catalog.jsonb_array_elements(m.tool_calls) e"
									   " WHERE m.conversation_id OPERATOR(pg_catalog.=) $1"
									   " AND m.tool_calls IS NOT NULL", nsp),
							  1, types, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "kimi_linear: could not count the conversation's tool calls");
	p->counter = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	/* the last reply's calls, if it is this turn's */
	if (SPI_execute_with_args(psprintf("SELECT e.c OPERATOR(pg_catalog.->>) 'id' FROM"
									   " (SELECT m.tool_calls FROM %s.messages m"
									   "   WHERE m.conversation_id OPERATOR(pg_catalog.=) $1"
									   "   AND m.role OPERATOR(pg_catalog.=) 'assistant' ORDER BY m.id DESC LIMIT 1) l,"
									   " pg_catalog.jsonb_array_elements(l.tool_calls) WITH ORDINALITY e(c, k)"
									   " WHERE EXISTS (SELECT 1 FROM %s.messages m"
									   "   WHERE m.conversation_id OPERATOR(pg_catalog.=) $1"
									   "   AND m.role OPERATOR(pg_catalog.=) 'assistant' AND m.turn OPERATOR(pg_catalog.=) $2)"
									   " ORDER BY e.k", nsp, nsp),
							  2, types, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "kimi_linear: could not read the last reply's tool calls");
	p->n_calls = (int) SPI_processed;
	p->ids = palloc0(sizeof(char *) * (p->n_calls + 1));
	p->results = palloc0(sizeof(char *) * (p->n_calls + 1));
	for (int i = 0; i < p->n_calls; i++)
		p->ids[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
	args[1] = Int32GetDatum(turns + 1);
	if (SPI_execute_with_args(psprintf("SELECT m.tool_call_id, m.content FROM %s.messages m"
									   " WHERE m.conversation_id OPERATOR(pg_catalog.=) $1"
									   " AND m.role OPERATOR(pg_catalog.=) 'tool' AND m.turn OPERATOR(pg_catalog.=) $2"
									   " ORDER BY m.id", nsp),
							  2, types, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "kimi_linear: could not read the tool results");
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		char	   *id = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1);

		for (int i = 0; i < p->n_calls; i++)
			if (id && strcmp(id, p->ids[i]) == 0)
			{
				p->results[i] = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2);
				p->n_results++;
			}
	}
	for (int i = 0; i < p->n_calls; i++)
		if (!p->results[i])
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("conversation %lld: tool call \"%s\" of the last reply has no result yet", (long long) cid,
							p->ids[i]),
					 errhint("Add the results of all the calls with kimi_linear.add_tool_result(conversation_id, "
							 "tool_call_id, content) before the conversation goes on.")));
}

/*
 * The turn's messages as JSON (UTF-8): the system message in a first turn,
 * the results of the last reply's calls in their order, the user's message.
 */
static char *
turn_messages(bool first, const char *system, const PendingCalls *p, const char *message)
{
	StringInfoData b;
	bool		any = false;

	initStringInfo(&b);
	appendStringInfoChar(&b, '[');
	if (first && system && system[0])
	{
		appendStringInfoString(&b, "{\"role\": \"system\", \"content\": ");
		escape_json(&b, system);
		appendStringInfoChar(&b, '}');
		any = true;
	}
	for (int i = 0; i < p->n_calls; i++)
	{
		appendStringInfoString(&b, any ? ", " : "");
		appendStringInfoString(&b, "{\"role\": \"tool\", \"tool_call_id\": ");
		escape_json(&b, p->ids[i]);
		appendStringInfoString(&b, ", \"content\": ");
		escape_json(&b, p->results[i]);
		appendStringInfoChar(&b, '}');
		any = true;
	}
	if (message)
	{
		appendStringInfoString(&b, any ? ", " : "");
		appendStringInfoString(&b, "{\"role\": \"user\", \"content\": ");
		escape_json(&b, message);
		appendStringInfoChar(&b, '}');
	}
	appendStringInfoChar(&b, ']');
	return kl_to_utf8(b.data, b.len);
}

/*
 * One say() turn: the conversation's row as locked, then the prompt the turn
 * sends.  (The SPI statements name everything with nsp.)
 */
typedef struct Turn
{
	const char *nsp;			/* the extension's schema, quoted */
	int64		cid;
	/* the row */
	char	   *model,
			   *system,
			   *owner,
			   *tools;			/* NULL: none declared */
	int			page_size,
				turns;
	bytea	   *head;			/* the state's head; NULL: no turn yet */
	int64		n_pages;
	kl_state_info info;			/* of head (pending -1 without one) */
	/* the prompt */
	int32	   *stops;			/* the chat format's end tokens */
	int			n_stops;
	int32	   *prompt;
	int			n_prompt;
} Turn;

/*
 * Lock the conversation's row and read it, and count its pages.  The pages
 * are counted (and later read) by later statements: under READ COMMITTED, a
 * lock that waited for another turn returns that turn's row version, and
 * only a new statement's snapshot also sees the pages that turn added.
 */
static void
lock_conversation(Turn *t)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(t->cid)};
	bool		isnull;

	if (SPI_execute_with_args(psprintf("SELECT c.model, c.system, c.page_size, c.state, c.turns, c.owner, c.tools"
									   " FROM %s.conversations c WHERE c.id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
									   t->nsp),
							  1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "kimi_linear: could not read the conversation");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("conversation %lld does not exist", (long long) t->cid),
				 errhint("Start one with kimi_linear.new_conversation(); you see only your own conversations.")));
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	d = SPI_tuptable->tupdesc;
		Datum		v;

		t->model = SPI_getvalue(tup, d, 1);
		t->system = SPI_getvalue(tup, d, 2);
		t->page_size = DatumGetInt32(SPI_getbinval(tup, d, 3, &isnull));
		v = SPI_getbinval(tup, d, 4, &isnull);
		if (!isnull)
			t->head = DatumGetByteaPCopy(v);
		t->turns = DatumGetInt32(SPI_getbinval(tup, d, 5, &isnull));
		t->owner = SPI_getvalue(tup, d, 6);
		t->tools = SPI_getvalue(tup, d, 7);
	}
	if (SPI_execute_with_args(psprintf("SELECT pg_catalog.count(*) FROM %s.conversation_pages p"
									   " WHERE p.conversation_id OPERATOR(pg_catalog.=) $1", t->nsp),
							  1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "kimi_linear: could not count the conversation's pages");
	t->n_pages = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (t->page_size <= 0)
		ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("conversation %lld has an invalid page_size", (long long) t->cid)));
}

/* The head's description, and whether the head and the pages agree (a corrupt row is an ERROR). */
static void
check_conversation_state(Turn *t)
{
	if (t->head)
		check_head(VARDATA_ANY(t->head), VARSIZE_ANY_EXHDR(t->head), &t->info, "conversation state", KL_E_CORRUPT);
	else
	{
		memset(&t->info, 0, sizeof(t->info));
		t->info.pending = -1;
		if (t->n_pages > 0)
			ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("conversation %lld has pages but no state", (long long) t->cid)));
	}
	if (t->head && t->info.from_pos != t->n_pages * t->page_size)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("conversation %lld is inconsistent: its state starts at position %lld but its %lld pages end at %lld",
						(long long) t->cid, (long long) t->info.from_pos, (long long) t->n_pages,
						(long long) (t->n_pages * t->page_size))));
}

/*
 * The turn's prompt: chat rendered in the chat format (a continuation after
 * the first turn), after closing a reply that was cut off (its last token,
 * pending, is not an end token).
 */
static void
turn_prompt(Turn *t, const kl_tokenizer *tok, kl_chat *chat, const PendingCalls *pending)
{
	kl_chat_format format;
	kl_chat_render_opts o = {0};
	int			n;
	int32	   *body;
	bool		close;

	kl_chat_format_of(tok, &format);
	o.format = &format;
	o.add_generation_prompt = true;
	o.continuation = t->head != NULL;
	o.call_counter = pending->counter;
	o.pending_calls = (const char *const *) pending->ids;
	o.n_pending = pending->n_calls;
	body = kl_pg_render(tok, chat, &o, &n);
	close = t->info.pending >= 0 && !in_ids(t->info.pending, t->stops, t->n_stops);
	t->prompt = palloc(sizeof(int32) * (n + 1));
	if (close)
		t->prompt[0] = end_id(tok);
	memcpy(t->prompt + (close ? 1 : 0), body, sizeof(int32) * n);
	t->n_prompt = n + (close ? 1 : 0);
}

/* The request of the turn: the settings, its output constraint, the prompt, paging and the cache key. */
static void
turn_spec(const Turn *t, const KlGenArgs *g, const KlModelRef *ref, const char *grammar, KlReqSpec *spec)
{
	kl_spec_init(spec, g, ref);
	spec->grammar = grammar;
	if (spec->grammar)
	{
		if (g->n_stop > 0 || g->ignore_eos)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("stop strings and ignore_eos cannot be combined with tools or json_schema"),
					 errhint("Constrained output ends by itself when its JSON value (or tool call) is complete.")));
		spec->grammar_len = strlen(spec->grammar);
	}
	spec->prompt = t->prompt;
	spec->n_prompt = t->n_prompt;
	spec->stop_ids = t->stops;
	spec->n_stop_ids = t->n_stops;
	spec->flags |= KL_REQ_WANT_STATE;
	spec->page_size = t->page_size;
	spec->pages_upto = t->head ? t->info.from_pos : 0;
	/* the new head: about the old one, plus a page or so */
	spec->reply_hint = (t->head ? 2 * VARSIZE_ANY_EXHDR(t->head) : 0) + (Size) t->n_prompt * 64;
	/* the workers serve every database: the key names the database too */
	spec->cache_key = kl_state_cache_mb > 0 ? (int64) (((uint64) MyDatabaseId << 40) ^ (uint64) t->cid) : 0;
	if (spec->cache_key == 0 && kl_state_cache_mb > 0)
		spec->cache_key = -1 - t->cid;
}

/* Run the turn with the whole state: the stored pages, in order, and the head. */
static void
run_with_pages(const Turn *t, const KlReqSpec *spec, KlRunResult *res)
{
	const char **parts = palloc(sizeof(char *) * (t->n_pages + 1));
	Size	   *lens = palloc(sizeof(Size) * (t->n_pages + 1));
	int			np = 0;
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(t->cid)};
	bool		isnull;

	if (t->n_pages > 0)
	{
		if (SPI_execute_with_args(psprintf("SELECT p.page_no, p.data FROM %s.conversation_pages p"
										   " WHERE p.conversation_id OPERATOR(pg_catalog.=) $1"
										   " ORDER BY p.page_no", t->nsp),
								  1, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "kimi_linear: could not read the conversation's pages");
		if ((int64) SPI_processed != t->n_pages)
			ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("conversation %lld lost pages", (long long) t->cid)));
		for (uint64 i = 0; i < SPI_processed; i++)
		{
			HeapTuple	tup = SPI_tuptable->vals[i];
			int32		no = DatumGetInt32(SPI_getbinval(tup, SPI_tuptable->tupdesc, 1, &isnull));
			bytea	   *b = DatumGetByteaPP(SPI_getbinval(tup, SPI_tuptable->tupdesc, 2, &isnull));

			if (no != (int32) i)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("conversation %lld is missing page %lld", (long long) t->cid, (long long) i)));
			parts[np] = VARDATA_ANY(b);
			lens[np++] = VARSIZE_ANY_EXHDR(b);
		}
	}
	if (t->head)
	{
		parts[np] = VARDATA_ANY(t->head);
		lens[np++] = VARSIZE_ANY_EXHDR(t->head);
	}
	kl_run(spec, parts, lens, np, 0, res);
}

/*
 * Run the turn: first with the head alone, enough if the worker still holds
 * this conversation (its cache), else with the whole state.
 */
static void
run_turn(const Turn *t, const KlReqSpec *spec, KlRunResult *res)
{
	res->cache_miss = true;
	if (t->head && t->n_pages > 0 && spec->cache_key != 0)
	{
		const char *p = VARDATA_ANY(t->head);
		Size		l = VARSIZE_ANY_EXHDR(t->head);

		kl_run(spec, &p, &l, 1, KL_RUN_CACHE_MISS_OK, res);
	}
	if (res->cache_miss)
		run_with_pages(t, spec, res);
}

/* Store the state the turn returned: the pages it completed, and its new head in the row. */
static void
store_state(const Turn *t, const KlRunResult *res)
{
	Oid			argtypes[4] = {INT8OID, INT4OID, BYTEAOID, NAMEOID};
	Datum		args[4];
	bytea	   *new_head = NULL;

	for (int i = 0; i < res->n_parts; i++)
	{
		KlStatePart *p = &res->parts[i];

		if (p->kind == KL_STATE_HEAD)
		{
			new_head = p->blob;
			continue;
		}
		if (p->from_pos % t->page_size != 0)
			elog(ERROR, "kimi_linear: the worker returned a page at position %lld", (long long) p->from_pos);
		args[0] = Int64GetDatum(t->cid);
		args[1] = Int32GetDatum((int32) (p->from_pos / t->page_size));
		args[2] = PointerGetDatum(p->blob);
		args[3] = DirectFunctionCall1(namein, CStringGetDatum(t->owner));
		if (SPI_execute_with_args(psprintf("INSERT INTO %s.conversation_pages (conversation_id, page_no, data, owner)"
										   " VALUES ($1, $2, $3, $4)", t->nsp),
								  4, argtypes, args, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "kimi_linear: could not store a conversation page");
	}
	if (!new_head)
		ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("the inference worker returned no state")));
	argtypes[1] = BYTEAOID;
	argtypes[2] = INT8OID;
	args[0] = Int64GetDatum(t->cid);
	args[1] = PointerGetDatum(new_head);
	args[2] = Int64GetDatum(res->done.positions);
	if (SPI_execute_with_args(psprintf("UPDATE %s.conversations c SET state = $2, positions = $3,"
									   " turns = c.turns OPERATOR(pg_catalog.+) 1, updated_at = pg_catalog.now()"
									   " WHERE c.id OPERATOR(pg_catalog.=) $1", t->nsp),
							  3, argtypes, args, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "kimi_linear: could not store the conversation state");
}

/*
 * Record the turn's messages: the user's (message; NULL: a turn that only
 * hands back tool results) and the reply, with its tool calls and token ids.
 */
static void
store_messages(const Turn *t, text *message, text *reply, Jsonb *reply_json, const KlRunResult *res)
{
	Oid			argtypes[7] = {INT8OID, INT4OID, TEXTOID, TEXTOID, INT4ARRAYOID, NAMEOID, JSONBOID};
	Datum		args[7];

	args[0] = Int64GetDatum(t->cid);
	args[1] = Int32GetDatum(t->turns + 1);
	args[5] = DirectFunctionCall1(namein, CStringGetDatum(t->owner));
	for (int m = message ? 0 : 1; m < 2; m++)
	{
		char		nulls[8] = "      n";
		text	   *content = reply;

		args[2] = CStringGetTextDatum(m == 0 ? "user" : "assistant");
		if (m == 1 && reply_json && kl_reply_has_calls(reply_json))
		{
			/* a reply with tool calls: its text outside them, and the calls */
			content = kl_reply_content(reply_json);
			args[6] = PointerGetDatum(kl_reply_tool_calls(reply_json));
			nulls[6] = args[6] ? ' ' : 'n';
		}
		args[3] = m == 0 ? PointerGetDatum(message) : PointerGetDatum(content);
		if (m == 0)
			nulls[4] = 'n';
		else
			args[4] = PointerGetDatum(kl_ids_to_array(res->ids, res->n_ids));
		if (SPI_execute_with_args(psprintf("INSERT INTO %s.messages (conversation_id, turn, role, content, token_ids, owner,"
										   " tool_calls) VALUES ($1, $2, $3, $4, $5, $6, $7)", t->nsp),
								  7, argtypes, args, nulls, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "kimi_linear: could not store the messages");
	}
}

/*
 * say / say_json (conversation_id, message, max_tokens, temperature, top_p, top_k, seed, stop,
 *                 repetition_penalty, min_p, ignore_eos, tool_choice, json_schema)
 */
static Datum
conversation_turn(FunctionCallInfo fcinfo, bool as_json)
{
	MemoryContext caller = CurrentMemoryContext;
	char	   *message = NULL;
	KlGenArgs	g;
	Turn		t;
	KlModelRef	ref;
	const kl_tokenizer *tok;
	KlReqSpec	spec;
	KlRunResult res;
	text	   *reply;
	Jsonb	   *reply_json = NULL;
	char	   *tool_choice = kl_pg_tool_choice(fcinfo, 11);
	Jsonb	   *schema = PG_NARGS() > 12 && !PG_ARGISNULL(12) ? PG_GETARG_JSONB_P(12) : NULL;
	PendingCalls pending;
	kl_chat    *chat;

	kl_require_writable("say",
						"say() stores the turn: it locks the conversation's row, writes its new state and pages and records both messages",
						"On a standby, chat_with_state(state, messages) computes the same turn from the conversation's replicated state, without storing it.");
	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("conversation_id must not be NULL")));
	memset(&t, 0, sizeof(t));
	t.cid = PG_GETARG_INT64(0);
	if (!PG_ARGISNULL(1))
		message = kl_text_arg(fcinfo, 1, "message", false);
	kl_read_gen_args(fcinfo, 2, false, 256, &g);

	SPI_connect();
	t.nsp = ext_schema(fcinfo);
	lock_conversation(&t);
	kl_model_resolve(t.model, &ref);
	tok = kl_ref_tokenizer(&ref);
	t.stops = kl_chat_stop_ids(tok, &t.n_stops);
	check_conversation_state(&t);

	/* the turn: [system, in the first] + the results of the last reply's calls + the user's message */
	read_pending_calls(t.nsp, t.cid, t.turns, &pending);
	if (!message && pending.n_calls == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("message must not be NULL"),
				 t.tools ? errhint("Only a turn that hands back tool results may leave the message out.") : 0));
	chat = kl_pg_chat_text(turn_messages(t.head == NULL, t.system, &pending, message),
						   t.tools ? kl_to_utf8(t.tools, strlen(t.tools)) : NULL);
	turn_prompt(&t, tok, chat, &pending);
	kl_check_context(t.info.positions + (t.info.pending >= 0 ? 1 : 0), t.n_prompt);
	turn_spec(&t, &g, &ref, kl_pg_grammar(chat, tool_choice, schema, pending.counter), &spec);
	run_turn(&t, &spec, &res);

	/* store: the new pages, the new head, the two messages */
	store_state(&t, &res);
	{
		/* the reply, made in the caller's memory (SPI's goes away at SPI_finish) */
		MemoryContext spi = MemoryContextSwitchTo(caller);

		reply = kl_utf8_to_text(res.text, res.text_len);
		if (as_json || chat->n_tools > 0)
			reply_json = kl_pg_reply(tok, &res, chat->n_tools > 0 ? chat : NULL, schema != NULL);
		MemoryContextSwitchTo(spi);
	}
	if (spec.grammar && !as_json && schema &&
		(res.done.reason == KL_STOP_MAX_TOKENS || res.done.reason == KL_STOP_CONTEXT) &&
		!strstr(res.text, KL_TOK_SECTION_BEGIN))
		(void) kl_pg_json_value(&res, g.max_tokens);	/* the ERROR saying it was cut off */
	store_messages(&t, message ? PG_GETARG_TEXT_PP(1) : NULL, reply, reply_json, &res);
	SPI_finish();
	if (as_json)
		PG_RETURN_JSONB_P(reply_json);
	PG_RETURN_TEXT_P(reply);
}

/* _check_tools(tools jsonb): ERROR naming what is wrong with a conversation's tool declarations */
Datum
kl_sql_check_tools(PG_FUNCTION_ARGS)
{
	if (!PG_ARGISNULL(0))
		(void) kl_pg_chat(NULL, PG_GETARG_JSONB_P(0));
	PG_RETURN_VOID();
}

/* say(...) -> text: the reply as the model wrote it */
Datum
kl_sql_say(PG_FUNCTION_ARGS)
{
	return conversation_turn(fcinfo, false);
}

/* say_json(...) -> jsonb: the reply with its tool calls */
Datum
kl_sql_say_json(PG_FUNCTION_ARGS)
{
	return conversation_turn(fcinfo, true);
}

/* ------------------------------------------------------------------ chat_with_state */

/*
 * chat_with_state(state bytea, messages jsonb, ...settings...) -> (reply text, new_state bytea):
 * the turn say() runs, on a complete state the caller keeps (NULL: a new
 * conversation, whose messages may start with a system message).
 */
Datum
kl_sql_chat_with_state(PG_FUNCTION_ARGS)
{
	bytea	   *state = PG_ARGISNULL(0) ? NULL : PG_GETARG_BYTEA_PP(0);
	KlGenArgs	g;
	KlModelRef	ref;
	const kl_tokenizer *tok;
	kl_state_info info;
	kl_chat_message *msgs;
	int			n_msgs,
				n_prompt,
				n_stops;
	int32	   *prompt,
			   *stops;
	KlReqSpec	spec;
	KlRunResult res;
	TupleDesc	td;
	Datum		values[2];
	bool		nulls[2] = {false, false};
	const char *part = NULL;
	Size		part_len = 0;

	if (get_call_result_type(fcinfo, NULL, &td) != TYPEFUNC_COMPOSITE)
		ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("chat_with_state must return a record")));
	if (PG_ARGISNULL(1))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("messages must not be NULL")));
	memset(&info, 0, sizeof(info));
	info.pending = -1;
	if (state)
	{
		part = VARDATA_ANY(state);
		part_len = VARSIZE_ANY_EXHDR(state);
		check_head(part, part_len, &info, "kimi_linear state", KL_E_INVALID);
		if (info.from_pos != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("this state is only a part of a conversation's state"),
					 errhint("chat_with_state takes complete states; stored conversations continue with kimi_linear.say.")));
	}
	kl_read_gen_args(fcinfo, 2, true, 256, &g);
	kl_model_resolve(g.model, &ref);
	tok = kl_ref_tokenizer(&ref);
	stops = kl_chat_stop_ids(tok, &n_stops);
	msgs = kl_parse_messages(PG_GETARG_JSONB_P(1), &n_msgs);
	prompt = turn_ids(tok, info.pending, msgs, n_msgs, stops, n_stops, &n_prompt);
	kl_check_context(info.positions + (info.pending >= 0 ? 1 : 0), n_prompt);
	kl_spec_init(&spec, &g, &ref);
	spec.prompt = prompt;
	spec.n_prompt = n_prompt;
	spec.stop_ids = stops;
	spec.n_stop_ids = n_stops;
	spec.flags |= KL_REQ_WANT_STATE;
	spec.reply_hint = part_len + part_len / 4;
	kl_run(&spec, state ? &part : NULL, state ? &part_len : NULL, state ? 1 : 0, 0, &res);
	if (res.n_parts != 1 || res.parts[0].kind != KL_STATE_HEAD)
		ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("the inference worker returned no state")));
	values[0] = PointerGetDatum(kl_utf8_to_text(res.text, res.text_len));
	values[1] = PointerGetDatum(res.parts[0].blob);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(td), values, nulls)));
}
