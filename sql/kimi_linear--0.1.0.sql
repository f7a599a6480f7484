-- kimi_linear 0.1.0: Kimi Linear (KDA + MLA hybrid) inference inside PostgreSQL.
-- Requires shared_preload_libraries = 'kimi_linear' (inference runs in background workers).

\echo Use "CREATE EXTENSION kimi_linear" to load this file. \quit

-- Members of kimi_linear_admin (and superusers) may load and unload models.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kimi_linear_admin') THEN
    CREATE ROLE kimi_linear_admin NOLOGIN;
  END IF;
END
$$;

GRANT USAGE ON SCHEMA @extschema@ TO PUBLIC;

-------------------------------------------------------------------- generation

-- Parallel safety.  A parallel worker can do everything these functions do:
-- resolve the model in shared memory (and register the bundled model on first
-- use: shared memory only, nothing written to the database), load its own copy
-- of the tokenizer (a per-process cache, filled on first use), create a DSM
-- segment, take a request slot and wait on its own latch for the reply.  When
-- the leader is cancelled or fails, its workers exit, and their exit detaches
-- the segments, which cancels their requests.  None of them writes to the
-- database or keeps state the leader would need, so the generation functions
-- are PARALLEL SAFE: a query over a large table can spread its rows over
-- parallel workers, whose requests the inference worker batches together.
-- Functions that write (say, new_conversation, fork_conversation), that change
-- server-wide state (load_model, unload_model) or that need subtransactions
-- (the set-based *_each functions) are PARALLEL UNSAFE; see each one.

-- PARALLEL SAFE: tokenizes in the calling process, sends one request, stores nothing.
CREATE FUNCTION generate(
    prompt text,
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_generate'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION generate(text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Continue prompt with up to max_tokens tokens. temperature 0 is greedy; a seed makes sampling reproducible; generation ends at the model''s end token (unless ignore_eos), at a stop string (not included in the result) or at max_tokens.';

-- PARALLEL SAFE: as generate; in a parallel worker its rows pass through the Gather's queue
-- (a cursor, the way to read them as they come, never gets a parallel plan).
CREATE FUNCTION generate_stream(
    prompt text,
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false)
RETURNS SETOF text
AS 'MODULE_PATHNAME', 'kl_sql_generate_stream'
LANGUAGE C VOLATILE PARALLEL SAFE ROWS 64;

COMMENT ON FUNCTION generate_stream(text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Like generate, one row per piece of text as it is produced (always complete UTF-8 characters).';

-- PARALLEL SAFE: as generate.
CREATE FUNCTION generate_tokens(
    prompt text,
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false)
RETURNS int[]
AS 'MODULE_PATHNAME', 'kl_sql_generate_tokens'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION generate_tokens(text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Like generate, but returns the generated token ids (the prompt is encoded after the model''s bos token, as ./kl generate --prompt does).';

-- PARALLEL SAFE: as generate (no tokenizer at all).
CREATE FUNCTION generate_ids(
    prompt int[],
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false)
RETURNS int[]
AS 'MODULE_PATHNAME', 'kl_sql_generate_ids'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION generate_ids(int[], int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Continue a sequence of token ids (used as given: no bos is added) and return the generated ids; works for models without a tokenizer (stop must be NULL).';

-- PARALLEL SAFE: as generate (the chat template is rendered in the calling process).
CREATE FUNCTION chat(
    messages jsonb,
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_chat'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION chat(jsonb, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'The assistant''s reply to a conversation given as [{"role": "system"|"user"|"assistant", "content": "..."}], rendered in the model''s chat format.';

-- PARALLEL SAFE: as chat.
CREATE FUNCTION summarize(doc text, max_tokens int DEFAULT 200, model text DEFAULT NULL, temperature float8 DEFAULT 0)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_summarize'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION summarize(text, int, text, float8) IS
'A short summary of a (long) document. The whole document is read: long inputs are prefilled in chunks.';

-- PARALLEL SAFE: the state lives in the aggregating process; with no combine
-- function there is no partial aggregation, so a group is always aggregated,
-- and summarized, by one process (a parallel worker or the leader).
CREATE FUNCTION _summarize_agg_step(internal, text) RETURNS internal
AS 'MODULE_PATHNAME', 'kl_sql_summarize_agg_step' LANGUAGE C CALLED ON NULL INPUT PARALLEL SAFE;
CREATE FUNCTION _summarize_agg_step(internal, text, int) RETURNS internal
AS 'MODULE_PATHNAME', 'kl_sql_summarize_agg_step' LANGUAGE C CALLED ON NULL INPUT PARALLEL SAFE;
CREATE FUNCTION _summarize_agg_final(internal) RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_summarize_agg_final' LANGUAGE C PARALLEL SAFE;

CREATE AGGREGATE summarize_agg(text) (
    SFUNC = _summarize_agg_step, STYPE = internal, FINALFUNC = _summarize_agg_final, PARALLEL = SAFE);
CREATE AGGREGATE summarize_agg(text, int) (
    SFUNC = _summarize_agg_step, STYPE = internal, FINALFUNC = _summarize_agg_final, PARALLEL = SAFE);

COMMENT ON AGGREGATE summarize_agg(text) IS
'Summarize the documents of a group together (joined with blank lines, in the order given: use ORDER BY inside the call).';
COMMENT ON AGGREGATE summarize_agg(text, int) IS
'summarize_agg with the summary''s max_tokens.';

-------------------------------------------------------------------- set-based forms

-- Many inputs in, one row per input out, the requests in flight together so
-- that the inference worker decodes them in one batch (src/pg/pg_batch_call.c):
--
--   SELECT d.id, s.summary, s.error
--   FROM kimi_linear.summarize_each(ARRAY(SELECT id FROM docs ORDER BY id),
--                                   ARRAY(SELECT body FROM docs ORDER BY id)) s
--   JOIN docs d ON d.id = s.key;
--
-- keys: any array, one key per input (returned with the input's row, to join
-- back); rows come in the order the inputs finish.  Each input's request is
-- exactly its single-row function's, so a row's result equals generate / chat /
-- summarize of that input.  concurrency: requests in flight at once (NULL:
-- kimi_linear.max_requests_per_call, which also caps it); when other sessions
-- hold every request slot, the call waits for one instead of failing.
-- on_error: 'row' (an input's error, such as a NULL or too long input or the
-- worker's error for it, is reported in its row's error column) or 'abort' (it
-- ends the statement).
--
-- PARALLEL UNSAFE: each input is prepared in a subtransaction (so that its error
-- lands on its row), which PostgreSQL 15 does not allow in parallel mode; the
-- function already runs its inputs in parallel, through the inference worker's
-- batch.

CREATE FUNCTION generate_each(
    keys anycompatiblearray,
    prompts text[],
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false,
    concurrency int DEFAULT NULL,
    on_error text DEFAULT 'row',
    OUT key anycompatible,
    OUT reply text,
    OUT tokens int,
    OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_generate_each'
LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 100;

COMMENT ON FUNCTION generate_each(anycompatiblearray, text[], int, float8, float8, int, bigint, text[], text, float8, float8, boolean, int, text) IS
'generate for many prompts at once: one row (key, reply, tokens generated, error) per prompt, in the order they finish, up to kimi_linear.max_requests_per_call requests in flight together. keys: one per prompt, returned to join the rows back. Without a seed, each prompt gets its own random seed.';

CREATE FUNCTION chat_each(
    keys anycompatiblearray,
    messages jsonb[],
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false,
    concurrency int DEFAULT NULL,
    on_error text DEFAULT 'row',
    OUT key anycompatible,
    OUT reply text,
    OUT tokens int,
    OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_chat_each'
LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 100;

COMMENT ON FUNCTION chat_each(anycompatiblearray, jsonb[], int, float8, float8, int, bigint, text[], text, float8, float8, boolean, int, text) IS
'chat for many conversations at once (each element: [{"role": ..., "content": ...}, ...]): one row (key, reply, tokens generated, error) per conversation, in the order they finish.';

CREATE FUNCTION summarize_each(
    keys anycompatiblearray,
    docs text[],
    max_tokens int DEFAULT 200,
    model text DEFAULT NULL,
    temperature float8 DEFAULT 0,
    concurrency int DEFAULT NULL,
    on_error text DEFAULT 'row',
    OUT key anycompatible,
    OUT summary text,
    OUT tokens int,
    OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_summarize_each'
LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 100;

COMMENT ON FUNCTION summarize_each(anycompatiblearray, text[], int, text, float8, int, text) IS
'summarize for many documents at once: one row (key, summary, tokens generated, error) per document, in the order they finish, up to kimi_linear.max_requests_per_call requests in flight together. Example: SELECT * FROM kimi_linear.summarize_each(ARRAY(SELECT id FROM docs), ARRAY(SELECT body FROM docs)).';

CREATE FUNCTION generate_with_state_each(
    keys anycompatiblearray,
    states bytea[],
    prompts text[],
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false,
    concurrency int DEFAULT NULL,
    on_error text DEFAULT 'row',
    OUT key anycompatible,
    OUT reply text,
    OUT new_state bytea,
    OUT tokens int,
    OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_generate_with_state_each'
LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 100;

COMMENT ON FUNCTION generate_with_state_each(anycompatiblearray, bytea[], text[], int, float8, float8, int, bigint, text[], text, float8, float8, boolean, int, text) IS
'generate_with_state for many (state, prompt) pairs at once (a NULL state: a new sequence): one row (key, reply, new_state, tokens generated, error) per input, in the order they finish. A bad state is an error on its row.';

CREATE FUNCTION chat_with_state_each(
    keys anycompatiblearray,
    states bytea[],
    messages jsonb[],
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false,
    concurrency int DEFAULT NULL,
    on_error text DEFAULT 'row',
    OUT key anycompatible,
    OUT reply text,
    OUT new_state bytea,
    OUT tokens int,
    OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_chat_with_state_each'
LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 100;

COMMENT ON FUNCTION chat_with_state_each(anycompatiblearray, bytea[], jsonb[], int, float8, float8, int, bigint, text[], text, float8, float8, boolean, int, text) IS
'chat_with_state for many (state, messages) pairs at once: one chat turn per input on its state (NULL: a new conversation); one row (key, reply, new_state, tokens generated, error) per input, in the order they finish.';

-------------------------------------------------------------------- tokens

-- PARALLEL SAFE: runs in the calling process with its own copy of the tokenizer; no request.
CREATE FUNCTION tokenize(input text, model text DEFAULT NULL, special boolean DEFAULT false)
RETURNS int[]
AS 'MODULE_PATHNAME', 'kl_sql_tokenize'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION tokenize(text, text, boolean) IS
'The token ids of a text. special: special-token texts such as <|im_end|> become their ids.';

-- PARALLEL SAFE: as tokenize.
CREATE FUNCTION detokenize(ids int[], model text DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_detokenize'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION detokenize(int[], text) IS
'The text of token ids; bytes that do not form complete UTF-8 characters become U+FFFD.';

-------------------------------------------------------------------- states

-- PARALLEL SAFE: the state comes in as an argument and goes out as the result; nothing is stored.
CREATE FUNCTION generate_with_state(
    state bytea,
    prompt text,
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false,
    OUT reply text,
    OUT new_state bytea)
AS 'MODULE_PATHNAME', 'kl_sql_generate_with_state'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION generate_with_state(bytea, text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Continue a sequence from its state (NULL: a new one) with prompt; returns the reply and the new state. Only the new tokens are computed. The state is checked (checksum, model) before use.';

-- PARALLEL SAFE: as generate_with_state.
CREATE FUNCTION chat_with_state(
    state bytea,
    messages jsonb,
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    model text DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false,
    OUT reply text,
    OUT new_state bytea)
AS 'MODULE_PATHNAME', 'kl_sql_chat_with_state'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION chat_with_state(bytea, jsonb, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'One chat turn on a state the caller keeps (NULL: a new conversation): the new messages are rendered in the chat format after the history the state holds; returns the reply and the new state. say() runs the same turn on a stored conversation.';

-------------------------------------------------------------------- models

CREATE FUNCTION load_model(name text, path text, moe_routing text DEFAULT NULL) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_load_model'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION load_model(text, text, text) IS
'Load the model in directory path (relative to kimi_linear.model_dir, or inside it) under name. moe_routing (MoE models): ''select'' (default: the router bias chooses the experts, the scores weight them, as the serving engines do) or ''reference'' (the bias is also added into the weights, as the released kimi_linear code does). Superusers and members of kimi_linear_admin only.';

CREATE FUNCTION unload_model(name text) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_unload_model'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION unload_model(text) IS
'Unload a model from every inference worker; requests running on it fail. Superusers and members of kimi_linear_admin only.';

REVOKE ALL ON FUNCTION load_model(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION unload_model(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION load_model(text, text, text) TO kimi_linear_admin;
GRANT EXECUTE ON FUNCTION unload_model(text) TO kimi_linear_admin;

-- load_model and unload_model stay PARALLEL UNSAFE (the default): they change
-- what every inference worker holds, rarely, and gain nothing from running in
-- a parallel worker.  The functions below only read (or, for the bundled
-- model on first use, register in shared memory): PARALLEL SAFE.
CREATE FUNCTION _resolve_model(name text DEFAULT NULL) RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_resolve_model'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE FUNCTION _models(
    OUT name text, OUT path text, OUT parameters bigint, OUT bytes bigint, OUT device text,
    OUT moe_routing text, OUT status text, OUT loaded_at timestamptz, OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_models'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW models AS SELECT * FROM _models();
COMMENT ON VIEW models IS 'Models registered with the inference workers.';

CREATE FUNCTION _activity(
    OUT worker int, OUT request_id bigint, OUT backend_pid int, OUT model text, OUT phase text,
    OUT prompt_tokens_done bigint, OUT prompt_tokens bigint, OUT generated_tokens bigint,
    OUT max_tokens bigint, OUT tokens_per_second float8, OUT submitted_at timestamptz,
    OUT started_at timestamptz, OUT batch_id bigint, OUT batch_done bigint, OUT batch_total bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_activity'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW activity AS SELECT * FROM _activity();
COMMENT ON VIEW activity IS 'Every inference request in flight: its worker, backend, phase (queued, prefill, decode, finishing), prompt tokens done of total, tokens generated, and the current rate (prompt tokens/s while prefilling, generated tokens/s while decoding); for a request of a set-based call (generate_each, summarize_each, ...), the call''s batch_id and how many of its batch_total inputs are done (batch_done).';

CREATE FUNCTION _workers(OUT worker int, OUT pid int, OUT active_requests int, OUT restarts int,
    OUT started_at timestamptz, OUT steps bigint, OUT tokens bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_workers'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW workers AS SELECT * FROM _workers();
COMMENT ON VIEW workers IS 'The inference background workers (pid NULL while one restarts).';

GRANT SELECT ON models, activity, workers TO PUBLIC;

-------------------------------------------------------------------- conversations

-- A conversation's state is a head (the KDA state and the attention rows since
-- the last page boundary, rewritten every turn) plus pages of attention rows
-- (page_size positions each, written once).  Each role sees only its own
-- conversations (row-level security).
CREATE TABLE conversations (
    id bigserial PRIMARY KEY,
    owner name NOT NULL DEFAULT current_user,
    model text NOT NULL,
    system text,
    page_size int NOT NULL,
    state bytea,
    positions bigint NOT NULL DEFAULT 0,
    turns int NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversation_pages (
    conversation_id bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    page_no int NOT NULL,
    owner name NOT NULL DEFAULT current_user,
    data bytea NOT NULL,
    PRIMARY KEY (conversation_id, page_no)
);

CREATE TABLE messages (
    id bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    turn int NOT NULL,
    role text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content text NOT NULL,
    token_ids int[],
    owner name NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_conversation ON messages (conversation_id, id);

-- states are floating-point numbers: compression would only cost time
ALTER TABLE conversations ALTER COLUMN state SET STORAGE EXTERNAL;
ALTER TABLE conversation_pages ALTER COLUMN data SET STORAGE EXTERNAL;

ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
ALTER TABLE conversation_pages ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_conversations ON conversations USING (owner = current_user) WITH CHECK (owner = current_user);
CREATE POLICY own_pages ON conversation_pages USING (owner = current_user) WITH CHECK (owner = current_user);
CREATE POLICY own_messages ON messages USING (owner = current_user) WITH CHECK (owner = current_user);
GRANT SELECT, INSERT, UPDATE, DELETE ON conversations, conversation_pages, messages TO PUBLIC;
GRANT USAGE ON SEQUENCE conversations_id_seq, messages_id_seq TO PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('conversations', '');
SELECT pg_catalog.pg_extension_config_dump('conversation_pages', '');
SELECT pg_catalog.pg_extension_config_dump('messages', '');

-- Functions that must write check first that they can (not on a standby, not in a
-- read-only transaction) and say so in their own words.
CREATE FUNCTION _require_writable(fn text, why text) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_require_writable'
LANGUAGE C VOLATILE;

-- new_conversation, say and fork_conversation write: PARALLEL UNSAFE (the default).
CREATE FUNCTION new_conversation(model text DEFAULT NULL, system text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = @extschema@, pg_catalog
AS $$
DECLARE
  cid bigint;
BEGIN
  PERFORM @extschema@._require_writable('new_conversation', 'new_conversation() inserts the conversation''s row');
  INSERT INTO conversations (model, system, page_size)
  VALUES (_resolve_model(model), system, current_setting('kimi_linear.page_size')::int)
  RETURNING id INTO cid;
  IF system IS NOT NULL THEN
    INSERT INTO messages (conversation_id, turn, role, content) VALUES (cid, 0, 'system', system);
  END IF;
  RETURN cid;
END
$$;

COMMENT ON FUNCTION new_conversation(text, text) IS
'Start a conversation (with an optional system message); returns its id for say().';

-- PARALLEL UNSAFE (the default): locks the conversation's row and writes the turn.
CREATE FUNCTION say(
    conversation_id bigint,
    message text,
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_say'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION say(bigint, text, int, float8, float8, int, bigint, text[], float8, float8, boolean) IS
'Add a user message to a conversation and return the reply. Only the new turn is computed; the new state is stored in the caller''s transaction (a rollback undoes the turn).';

-- PARALLEL UNSAFE (the default): writes the copy.
CREATE FUNCTION fork_conversation(conversation_id bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = @extschema@, pg_catalog
AS $$
DECLARE
  nid bigint;
BEGIN
  PERFORM @extschema@._require_writable('fork_conversation', 'fork_conversation() copies the conversation''s rows');
  INSERT INTO conversations (model, system, page_size, state, positions, turns)
  SELECT model, system, page_size, state, positions, turns FROM conversations
   WHERE id = fork_conversation.conversation_id
  RETURNING id INTO nid;
  IF nid IS NULL THEN
    RAISE EXCEPTION 'conversation % does not exist', fork_conversation.conversation_id
      USING ERRCODE = 'undefined_object';
  END IF;
  INSERT INTO conversation_pages (conversation_id, page_no, data)
  SELECT nid, page_no, data FROM conversation_pages WHERE conversation_pages.conversation_id = fork_conversation.conversation_id;
  INSERT INTO messages (conversation_id, turn, role, content, token_ids)
  SELECT nid, turn, role, content, token_ids FROM messages
   WHERE messages.conversation_id = fork_conversation.conversation_id ORDER BY id;
  RETURN nid;
END
$$;

COMMENT ON FUNCTION fork_conversation(bigint) IS
'Copy a conversation; the two continue independently from the same history.';
