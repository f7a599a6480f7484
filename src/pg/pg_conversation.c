/*
 * pg_conversation.c — chat turns on a sequence state: say (a stored
 * conversation) and chat_with_state (a state held by the caller).
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
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "pg_args.h"
#include "pg_conversation.h"
#include "pg_guc.h"
#include "pg_writable.h"

PG_FUNCTION_INFO_V1(kl_sql_say);
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
check_head(const char *data, Size len, kl_state_info *info, const char *what)
{
	kl_err		err;

	if (kl_state_info_read((const uint8_t *) data, len, info, &err) != KL_OK)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("invalid %s: %s", what, err.msg)));
	if (info->kind != KL_STATE_HEAD)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("invalid %s: a rows part where a head was expected", what)));
}

int32 *
kl_chat_turn_ids(const kl_tokenizer *tok, int32 pending, const kl_chat_message *msgs, int n_msgs,
				 const int32 *stops, int n_stops, int *n_out)
{
	return turn_ids(tok, pending, msgs, n_msgs, stops, n_stops, n_out);
}

void
kl_check_state_head(const char *data, Size len, kl_state_info *info, const char *what)
{
	check_head(data, len, info, what);
}

/* ------------------------------------------------------------------ say */

/* say(conversation_id, message, max_tokens, temperature, top_p, top_k, seed, stop,
 *     repetition_penalty, min_p, ignore_eos) -> text */
Datum
kl_sql_say(PG_FUNCTION_ARGS)
{
	MemoryContext caller = CurrentMemoryContext;
	int64		cid;
	char	   *message;
	KlGenArgs	g;
	KlModelRef	ref;
	const kl_tokenizer *tok;
	char	   *model,
			   *system = NULL,
			   *owner;
	int			page_size,
				turns;
	bytea	   *head = NULL;
	kl_state_info info;
	kl_chat_message msgs[2];
	int			n_msgs = 0,
				n_prompt,
				n_stops;
	int32	   *prompt,
			   *stops;
	KlReqSpec	spec;
	KlRunResult res;
	text	   *reply;
	Oid			argtypes[6];
	Datum		args[6];
	bool		isnull;
	int64		n_pages = 0;

	kl_require_writable("say",
						"say() stores the turn: it locks the conversation's row, writes its new state and pages and records both messages",
						"On a standby, chat_with_state(state, messages) computes the same turn from the conversation's replicated state, without storing it.");
	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("conversation_id must not be NULL")));
	cid = PG_GETARG_INT64(0);
	message = kl_text_arg(fcinfo, 1, "message", false);
	kl_read_gen_args(fcinfo, 2, false, 256, &g);

	SPI_connect();
	argtypes[0] = INT8OID;
	args[0] = Int64GetDatum(cid);
	/*
	 * Lock the row first.  The pages are counted and read by later
	 * statements: under READ COMMITTED, a lock that waited for another turn
	 * returns that turn's row version, and only a new statement's snapshot
	 * also sees the pages that turn added.
	 */
	if (SPI_execute_with_args("SELECT model, system, page_size, state, turns, owner"
							  " FROM kimi_linear.conversations c WHERE id = $1 FOR UPDATE",
							  1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "kimi_linear: could not read the conversation");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("conversation %lld does not exist", (long long) cid),
				 errhint("Start one with kimi_linear.new_conversation(); you see only your own conversations.")));
	{
		HeapTuple	t = SPI_tuptable->vals[0];
		TupleDesc	d = SPI_tuptable->tupdesc;
		Datum		v;

		model = SPI_getvalue(t, d, 1);
		system = SPI_getvalue(t, d, 2);
		page_size = DatumGetInt32(SPI_getbinval(t, d, 3, &isnull));
		v = SPI_getbinval(t, d, 4, &isnull);
		if (!isnull)
			head = DatumGetByteaPCopy(v);
		turns = DatumGetInt32(SPI_getbinval(t, d, 5, &isnull));
		owner = SPI_getvalue(t, d, 6);
	}
	if (SPI_execute_with_args("SELECT count(*) FROM kimi_linear.conversation_pages WHERE conversation_id = $1",
							  1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "kimi_linear: could not count the conversation's pages");
	n_pages = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (page_size <= 0)
		ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("conversation %lld has an invalid page_size", (long long) cid)));

	kl_model_resolve(model, &ref);
	tok = kl_ref_tokenizer(&ref);
	stops = kl_chat_stop_ids(tok, &n_stops);
	if (head)
		check_head(VARDATA_ANY(head), VARSIZE_ANY_EXHDR(head), &info, "conversation state");
	else
	{
		memset(&info, 0, sizeof(info));
		info.pending = -1;
		if (n_pages > 0)
			ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("conversation %lld has pages but no state", (long long) cid)));
		if (system && system[0])
		{
			msgs[n_msgs].role = "system";
			msgs[n_msgs].content = kl_to_utf8(system, strlen(system));
			msgs[n_msgs].content_len = strlen(msgs[n_msgs].content);
			n_msgs++;
		}
	}
	if (head && info.from_pos != n_pages * page_size)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("conversation %lld is inconsistent: its state starts at position %lld but its %lld pages end at %lld",
						(long long) cid, (long long) info.from_pos, (long long) n_pages,
						(long long) (n_pages * page_size))));
	msgs[n_msgs].role = "user";
	msgs[n_msgs].content = message;
	msgs[n_msgs].content_len = strlen(message);
	n_msgs++;
	prompt = turn_ids(tok, info.pending, msgs, n_msgs, stops, n_stops, &n_prompt);
	kl_check_context(info.positions + (info.pending >= 0 ? 1 : 0), n_prompt);

	kl_spec_init(&spec, &g, &ref);
	spec.prompt = prompt;
	spec.n_prompt = n_prompt;
	spec.stop_ids = stops;
	spec.n_stop_ids = n_stops;
	spec.flags |= KL_REQ_WANT_STATE;
	spec.page_size = page_size;
	spec.pages_upto = head ? info.from_pos : 0;
	/* the new head: about the old one, plus a page or so */
	spec.reply_hint = (head ? 2 * VARSIZE_ANY_EXHDR(head) : 0) + (Size) n_prompt * 64;
	/* the workers serve every database: the key names the database too */
	spec.cache_key = kl_state_cache_mb > 0 ? (int64) (((uint64) MyDatabaseId << 40) ^ (uint64) cid) : 0;
	if (spec.cache_key == 0 && kl_state_cache_mb > 0)
		spec.cache_key = -1 - cid;

	res.cache_miss = true;
	if (head && n_pages > 0 && spec.cache_key != 0)
	{
		/* the head alone: enough if the worker still holds this conversation */
		const char *p = VARDATA_ANY(head);
		Size		l = VARSIZE_ANY_EXHDR(head);

		kl_run(&spec, &p, &l, 1, KL_RUN_CACHE_MISS_OK, &res);
	}
	if (res.cache_miss)
	{
		const char **parts = palloc(sizeof(char *) * (n_pages + 1));
		Size	   *lens = palloc(sizeof(Size) * (n_pages + 1));
		int			np = 0;

		if (n_pages > 0)
		{
			if (SPI_execute_with_args("SELECT page_no, data FROM kimi_linear.conversation_pages"
									  " WHERE conversation_id = $1 ORDER BY page_no",
									  1, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
				elog(ERROR, "kimi_linear: could not read the conversation's pages");
			if ((int64) SPI_processed != n_pages)
				ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("conversation %lld lost pages", (long long) cid)));
			for (uint64 i = 0; i < SPI_processed; i++)
			{
				HeapTuple	t = SPI_tuptable->vals[i];
				int32		no = DatumGetInt32(SPI_getbinval(t, SPI_tuptable->tupdesc, 1, &isnull));
				bytea	   *b = DatumGetByteaPP(SPI_getbinval(t, SPI_tuptable->tupdesc, 2, &isnull));

				if (no != (int32) i)
					ereport(ERROR,
							(errcode(ERRCODE_DATA_CORRUPTED),
							 errmsg("conversation %lld is missing page %lld", (long long) cid, (long long) i)));
				parts[np] = VARDATA_ANY(b);
				lens[np++] = VARSIZE_ANY_EXHDR(b);
			}
		}
		if (head)
		{
			parts[np] = VARDATA_ANY(head);
			lens[np++] = VARSIZE_ANY_EXHDR(head);
		}
		kl_run(&spec, parts, lens, np, 0, &res);
	}

	/* store: the new pages, the new head, the two messages */
	{
		bytea	   *new_head = NULL;
		int			added = 0;

		argtypes[0] = INT8OID;
		argtypes[1] = INT4OID;
		argtypes[2] = BYTEAOID;
		argtypes[3] = NAMEOID;
		for (int i = 0; i < res.n_parts; i++)
		{
			KlStatePart *p = &res.parts[i];

			if (p->kind == KL_STATE_HEAD)
			{
				new_head = p->blob;
				continue;
			}
			if (p->from_pos % page_size != 0)
				elog(ERROR, "kimi_linear: the worker returned a page at position %lld", (long long) p->from_pos);
			args[0] = Int64GetDatum(cid);
			args[1] = Int32GetDatum((int32) (p->from_pos / page_size));
			args[2] = PointerGetDatum(p->blob);
			args[3] = DirectFunctionCall1(namein, CStringGetDatum(owner));
			if (SPI_execute_with_args("INSERT INTO kimi_linear.conversation_pages (conversation_id, page_no, data, owner)"
									  " VALUES ($1, $2, $3, $4)", 4, argtypes, args, NULL, false, 0) != SPI_OK_INSERT)
				elog(ERROR, "kimi_linear: could not store a conversation page");
			added++;
		}
		if (!new_head)
			ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("the inference worker returned no state")));
		argtypes[1] = BYTEAOID;
		argtypes[2] = INT8OID;
		args[0] = Int64GetDatum(cid);
		args[1] = PointerGetDatum(new_head);
		args[2] = Int64GetDatum(res.done.positions);
		if (SPI_execute_with_args("UPDATE kimi_linear.conversations SET state = $2, positions = $3,"
								  " turns = turns + 1, updated_at = now() WHERE id = $1",
								  3, argtypes, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "kimi_linear: could not store the conversation state");

		/* the reply, made in the caller's memory (SPI's goes away at SPI_finish) */
		{
			MemoryContext spi = MemoryContextSwitchTo(caller);

			reply = kl_utf8_to_text(res.text, res.text_len);
			MemoryContextSwitchTo(spi);
		}
		argtypes[1] = INT4OID;
		argtypes[2] = TEXTOID;
		argtypes[3] = TEXTOID;
		argtypes[4] = INT4ARRAYOID;
		argtypes[5] = NAMEOID;
		args[1] = Int32GetDatum(turns + 1);
		args[5] = DirectFunctionCall1(namein, CStringGetDatum(owner));
		for (int m = 0; m < 2; m++)
		{
			char		nulls[7] = "      ";

			args[2] = CStringGetTextDatum(m == 0 ? "user" : "assistant");
			args[3] = m == 0 ? PointerGetDatum(PG_GETARG_TEXT_PP(1)) : PointerGetDatum(reply);
			if (m == 0)
				nulls[4] = 'n';
			else
				args[4] = PointerGetDatum(kl_ids_to_array(res.ids, res.n_ids));
			if (SPI_execute_with_args("INSERT INTO kimi_linear.messages (conversation_id, turn, role, content, token_ids, owner)"
									  " VALUES ($1, $2, $3, $4, $5, $6)", 6, argtypes, args, nulls, false, 0) != SPI_OK_INSERT)
				elog(ERROR, "kimi_linear: could not store the messages");
		}
		(void) added;
	}
	SPI_finish();
	PG_RETURN_TEXT_P(reply);
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
		check_head(part, part_len, &info, "kimi_linear state");
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
