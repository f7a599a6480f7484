-- kimi_linear 0.1.0: Kimi Linear (KDA + MLA hybrid) inference inside PostgreSQL.
-- Requires shared_preload_libraries = 'kimi_linear' (inference runs in background workers).

\echo Use "CREATE EXTENSION kimi_linear" to load this file. \quit

-- Members of kimi_linear_admin (and superusers) may load and unload models.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'kimi_linear_admin') THEN
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
    ignore_eos boolean DEFAULT false,
    json_schema jsonb DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_generate'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION generate(text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean, jsonb) IS
'Continue prompt with up to max_tokens tokens. temperature 0 is greedy; a seed makes sampling reproducible; generation ends at the model''s end token (unless ignore_eos), at a stop string (not included in the result) or at max_tokens. json_schema: the continuation is one JSON value matching the schema (decoding is constrained to it).';

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
    ignore_eos boolean DEFAULT false,
    tools jsonb DEFAULT NULL,
    tool_choice text DEFAULT NULL,
    json_schema jsonb DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_chat'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION chat(jsonb, int, float8, float8, int, bigint, text[], text, float8, float8, boolean, jsonb, text, jsonb) IS
'The assistant''s reply to a conversation given as [{"role": "system"|"user"|"assistant", "content": "..."}], rendered in the model''s chat format. With tools (OpenAI function declarations), tool_choice or json_schema, the full Kimi format (tool messages, tool calls) and constrained decoding; the reply is returned as the model wrote it (chat_json parses it).';

CREATE FUNCTION chat_json(
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
    tools jsonb DEFAULT NULL,
    tool_choice text DEFAULT NULL,
    json_schema jsonb DEFAULT NULL)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'kl_sql_chat_json'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION chat_json(jsonb, int, float8, float8, int, bigint, text[], text, float8, float8, boolean, jsonb, text, jsonb) IS
'chat, with the reply as jsonb: {"content", "tool_calls": [{"id", "type", "function": {"name", "arguments": text}, "name", "arguments": {...}}], "finish_reason"} (plus "invalid_tool_calls" for calls cut off or with arguments that are not JSON, and "parsed" with json_schema). Messages may be the full OpenAI form: tool messages with tool_call_id, assistant messages with tool_calls, content parts, names.';

CREATE FUNCTION @extschema@.extract(
    body text,
    schema jsonb,
    instructions text DEFAULT NULL,
    model text DEFAULT NULL,
    max_tokens int DEFAULT 512)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'kl_sql_extract'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION @extschema@.extract(text, jsonb, text, text, int) IS
'The fields a JSON schema describes, read out of a document by the model (greedy decoding constrained to the schema): SELECT kimi_linear.extract(body, schema) FROM docs. NULL body: NULL.';

CREATE FUNCTION extract_each(
    keys anycompatiblearray,
    bodies text[],
    schema jsonb,
    instructions text DEFAULT NULL,
    model text DEFAULT NULL,
    max_tokens int DEFAULT 512,
    concurrency int DEFAULT NULL,
    on_error text DEFAULT 'row',
    OUT key anycompatible,
    OUT fields jsonb,
    OUT tokens int,
    OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_extract_each'
LANGUAGE C VOLATILE PARALLEL UNSAFE ROWS 100;

COMMENT ON FUNCTION extract_each(anycompatiblearray, text[], jsonb, text, text, int, int, text) IS
'extract for many documents at once (see generate_each): one row (key, fields, tokens generated, error) per document, in the order they finish. A NULL document, or a value cut off by max_tokens, is an error on its row. PARALLEL UNSAFE like the other set-based forms (subtransactions).';

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

CREATE FUNCTION load_model(name text, path text, moe_routing text DEFAULT NULL, quantize text DEFAULT NULL,
                           matmul_precision text DEFAULT NULL) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_load_model'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION load_model(text, text, text, text, text) IS
'Load the model in directory path (relative to kimi_linear.model_dir, or inside it) under name. moe_routing (MoE models): ''select'' (default: the router bias chooses the experts, the scores weight them, as the serving engines do) or ''reference'' (the bias is also added into the weights, as the released kimi_linear code does). quantize => ''fp8'', ''int8'' or ''int4'' quantizes a bf16/f32 checkpoint''s weights at load (checkpoints published quantized load as they are). matmul_precision: ''auto'' (bf16 on a GPU, fp32 on the CPU), ''fp32'' (the GPU matches the CPU to float rounding), ''bf16'' (the GPU''s matrix products on tensor cores; refused on the CPU) or ''fp8'' (bf16 plus FP8 activations in the prefill products of FP8 weights, W8A8; GPU only, models with FP8 weights); NULL: the setting kimi_linear.precision. Superusers and members of kimi_linear_admin only.';

CREATE FUNCTION unload_model(name text) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_unload_model'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION unload_model(text) IS
'Unload a model from every inference worker; requests running on it fail. Superusers and members of kimi_linear_admin only.';

REVOKE ALL ON FUNCTION load_model(text, text, text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION unload_model(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION load_model(text, text, text, text, text) TO kimi_linear_admin;
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
    OUT moe_routing text, OUT status text, OUT loaded_at timestamptz, OUT error text,
    OUT weight_format text, OUT weight_bytes bigint, OUT matmul_precision text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_models'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW models AS SELECT * FROM @extschema@._models();
COMMENT ON VIEW models IS 'Models registered with the inference workers: bytes of the checkpoint''s tensors as stored; weight_format (bf16, or how the weights are quantized) and weight_bytes, the weights as the workers hold them; matmul_precision, the activations of its matrix products: fp32, bf16 or fp8 once loaded (auto resolved: bf16 on a GPU, fp32 on the CPU), before that the precision asked for (load_model''s matmul_precision, or kimi_linear.precision when it was loaded).';

CREATE FUNCTION _activity(
    OUT worker int, OUT request_id bigint, OUT backend_pid int, OUT model text, OUT phase text,
    OUT prompt_tokens_done bigint, OUT prompt_tokens bigint, OUT generated_tokens bigint,
    OUT max_tokens bigint, OUT tokens_per_second float8, OUT submitted_at timestamptz,
    OUT started_at timestamptz, OUT batch_id bigint, OUT batch_done bigint, OUT batch_total bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_activity'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW activity AS SELECT * FROM @extschema@._activity();
COMMENT ON VIEW activity IS 'Every inference request in flight: its worker, backend, phase (queued, prefill, decode, finishing), prompt tokens done of total, tokens generated, and the current rate (prompt tokens/s while prefilling, generated tokens/s while decoding); for a request of a set-based call (generate_each, summarize_each, ...), the call''s batch_id and how many of its batch_total inputs are done (batch_done).';

CREATE FUNCTION _workers(OUT worker int, OUT pid int, OUT active_requests int, OUT restarts int,
    OUT started_at timestamptz, OUT steps bigint, OUT tokens bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_workers'
LANGUAGE C VOLATILE PARALLEL SAFE;

CREATE VIEW workers AS SELECT * FROM @extschema@._workers();
COMMENT ON VIEW workers IS 'The inference background workers (pid NULL while one restarts).';

GRANT SELECT ON models, activity, workers TO PUBLIC;

-------------------------------------------------------------------- conversations

-- A conversation's state is a head (the KDA state and the attention rows since
-- the last page boundary, rewritten every turn) plus pages of attention rows
-- (page_size positions each, written once).
--
-- Who may do what (row-level security and column privileges):
--   * a role sees, changes and deletes only rows it owns (owner = current_user);
--   * it adds pages and messages only under a conversation it owns: the
--     policies' WITH CHECK looks the parent conversation up (as the role, so
--     another role's conversation is invisible: its id gets the same error
--     as a missing one, never a foreign-key or duplicate-key error);
--   * ids come from the sequences only: no role may write an id column, so
--     none can take an id before its owner gets it, or learn which ids exist
--     from a duplicate-key error.
-- Every name in expressions and function bodies is schema-qualified, and the
-- functions run with search_path = pg_catalog, pg_temp: nothing a role puts
-- in another schema (or a temporary table) stands in for the extension's own.
CREATE TABLE conversations (
    id bigserial PRIMARY KEY,
    owner name NOT NULL DEFAULT CURRENT_USER,
    model text NOT NULL,
    system text,
    page_size int NOT NULL,
    state bytea,
    positions bigint NOT NULL DEFAULT 0,
    turns int NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    tools jsonb
);

CREATE TABLE conversation_pages (
    conversation_id bigint NOT NULL REFERENCES @extschema@.conversations(id) ON DELETE CASCADE,
    page_no int NOT NULL,
    owner name NOT NULL DEFAULT CURRENT_USER,
    data bytea NOT NULL,
    PRIMARY KEY (conversation_id, page_no)
);

CREATE TABLE messages (
    id bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES @extschema@.conversations(id) ON DELETE CASCADE,
    turn int NOT NULL,
    role text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content text NOT NULL,
    token_ids int[],
    owner name NOT NULL DEFAULT CURRENT_USER,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    tool_calls jsonb,
    tool_call_id text,
    CHECK ((tool_call_id IS NOT NULL) OPERATOR(pg_catalog.=) (role OPERATOR(pg_catalog.=) 'tool')
           AND (tool_calls IS NULL OR role OPERATOR(pg_catalog.=) 'assistant'))
);
CREATE INDEX messages_conversation ON messages (conversation_id, id);

-- states are floating-point numbers: compression would only cost time
ALTER TABLE conversations ALTER COLUMN state SET STORAGE EXTERNAL;
ALTER TABLE conversation_pages ALTER COLUMN data SET STORAGE EXTERNAL;

ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
ALTER TABLE conversation_pages ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_conversations ON conversations
    USING (owner OPERATOR(pg_catalog.=) CURRENT_USER)
    WITH CHECK (owner OPERATOR(pg_catalog.=) CURRENT_USER);
CREATE POLICY own_pages ON conversation_pages
    USING (owner OPERATOR(pg_catalog.=) CURRENT_USER)
    WITH CHECK (owner OPERATOR(pg_catalog.=) CURRENT_USER AND EXISTS (
        SELECT FROM @extschema@.conversations c
         WHERE c.id OPERATOR(pg_catalog.=) conversation_pages.conversation_id
           AND c.owner OPERATOR(pg_catalog.=) CURRENT_USER));
CREATE POLICY own_messages ON messages
    USING (owner OPERATOR(pg_catalog.=) CURRENT_USER)
    WITH CHECK (owner OPERATOR(pg_catalog.=) CURRENT_USER AND EXISTS (
        SELECT FROM @extschema@.conversations c
         WHERE c.id OPERATOR(pg_catalog.=) messages.conversation_id
           AND c.owner OPERATOR(pg_catalog.=) CURRENT_USER));
GRANT SELECT, DELETE ON conversations, conversation_pages, messages TO PUBLIC;
GRANT INSERT (owner, model, system, page_size, state, positions, turns, created_at, updated_at, tools),
      UPDATE (owner, model, system, page_size, state, positions, turns, created_at, updated_at, tools)
    ON conversations TO PUBLIC;
GRANT INSERT, UPDATE ON conversation_pages TO PUBLIC;
GRANT INSERT (conversation_id, turn, role, content, token_ids, owner, created_at, tool_calls, tool_call_id),
      UPDATE (conversation_id, turn, role, content, token_ids, owner, created_at, tool_calls, tool_call_id)
    ON messages TO PUBLIC;
GRANT USAGE ON SEQUENCE conversations_id_seq, messages_id_seq TO PUBLIC;

-- pg_dump saves the tables' rows and the sequences' positions (without the
-- sequences, a restored database would hand out ids that are taken)
SELECT pg_catalog.pg_extension_config_dump('@extschema@.conversations', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.conversation_pages', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.messages', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.conversations_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.messages_id_seq', '');

CREATE FUNCTION _chat_model(name text DEFAULT NULL) RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_chat_model'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION _chat_model(text) IS
'The model a conversation started with this name would use; an error unless it has a tokenizer with a chat format.';

CREATE FUNCTION _check_tools(tools jsonb) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_check_tools'
LANGUAGE C STABLE;

-- Functions that must write check first that they can (not on a standby, not in a
-- read-only transaction) and say so in their own words.
CREATE FUNCTION _require_writable(fn text, why text) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_require_writable'
LANGUAGE C VOLATILE;

-- new_conversation, say and fork_conversation write: PARALLEL UNSAFE (the default).
CREATE FUNCTION new_conversation(model text DEFAULT NULL, system text DEFAULT NULL, tools jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  cid bigint;
BEGIN
  PERFORM @extschema@._require_writable('new_conversation', 'new_conversation() inserts the conversation''s row');
  INSERT INTO @extschema@.conversations (model, system, page_size)
  VALUES (@extschema@._chat_model(new_conversation.model), new_conversation.system,
          pg_catalog.current_setting('kimi_linear.page_size')::int)
  RETURNING id INTO cid;
  IF new_conversation.tools IS NOT NULL THEN
    PERFORM @extschema@._check_tools(new_conversation.tools);
    UPDATE @extschema@.conversations c SET tools = new_conversation.tools WHERE c.id = cid;
  END IF;
  IF new_conversation.system IS NOT NULL THEN
    INSERT INTO @extschema@.messages (conversation_id, turn, role, content)
    VALUES (cid, 0, 'system', new_conversation.system);
  END IF;
  RETURN cid;
END
$$;

COMMENT ON FUNCTION new_conversation(text, text, jsonb) IS
'Start a conversation (with an optional system message, and the tools it may call: OpenAI function declarations, checked here); returns its id for say().';

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
    ignore_eos boolean DEFAULT false,
    tool_choice text DEFAULT NULL,
    json_schema jsonb DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_say'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION say(bigint, text, int, float8, float8, int, bigint, text[], float8, float8, boolean, text, jsonb) IS
'Add a user message to a conversation and return the reply. Only the new turn is computed; the new state is stored in the caller''s transaction (a rollback undoes the turn). After a reply with tool calls, the turn first hands back their results (add_tool_results); the message may then be NULL. tool_choice and json_schema constrain the reply.';

CREATE FUNCTION say_json(
    conversation_id bigint,
    message text DEFAULT NULL,
    max_tokens int DEFAULT 256,
    temperature float8 DEFAULT 0,
    top_p float8 DEFAULT 1,
    top_k int DEFAULT 0,
    seed bigint DEFAULT NULL,
    stop text[] DEFAULT NULL,
    repetition_penalty float8 DEFAULT 1,
    min_p float8 DEFAULT 0,
    ignore_eos boolean DEFAULT false,
    tool_choice text DEFAULT NULL,
    json_schema jsonb DEFAULT NULL)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'kl_sql_say_json'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION say_json(bigint, text, int, float8, float8, int, bigint, text[], float8, float8, boolean, text, jsonb) IS
'say, with the reply as jsonb (as chat_json returns it): its content, its tool calls (stored with the reply in messages), finish_reason.';

CREATE FUNCTION add_tool_results(conversation_id bigint, results jsonb)
RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  conv record;
  calls jsonb;
  r jsonb;
  n int := 0;
BEGIN
  IF results IS NULL OR jsonb_typeof(results) <> 'array' OR jsonb_array_length(results) = 0 THEN
    RAISE EXCEPTION 'results must be a non-empty JSON array of {"tool_call_id": ..., "content": ...}'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- row-level security: only the conversation's owner sees it (and may add to it)
  SELECT c.id, c.turns INTO conv FROM @extschema@.conversations c
   WHERE c.id = add_tool_results.conversation_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'conversation % does not exist', add_tool_results.conversation_id
      USING ERRCODE = 'undefined_object',
            HINT = 'You see only your own conversations.';
  END IF;
  SELECT m.tool_calls INTO calls FROM @extschema@.messages m
   WHERE m.conversation_id = conv.id AND m.role = 'assistant' AND m.turn = conv.turns
   ORDER BY m.id DESC LIMIT 1;
  IF calls IS NULL THEN
    RAISE EXCEPTION 'the last reply of conversation % made no tool calls', conv.id
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  FOR r IN SELECT e FROM jsonb_array_elements(results) e LOOP
    IF jsonb_typeof(r) <> 'object' OR jsonb_typeof(r -> 'tool_call_id') IS DISTINCT FROM 'string'
       OR coalesce(jsonb_typeof(r -> 'content'), 'null') = 'null' THEN
      RAISE EXCEPTION 'each result must be {"tool_call_id": text, "content": text or JSON}, got %', r
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(calls) c WHERE c ->> 'id' = r ->> 'tool_call_id') THEN
      RAISE EXCEPTION 'the last reply of conversation % has no tool call "%"', conv.id, r ->> 'tool_call_id'
        USING ERRCODE = 'invalid_parameter_value',
              HINT = 'Its calls: ' || (SELECT string_agg(c ->> 'id', ', ') FROM jsonb_array_elements(calls) c) || '.';
    END IF;
    IF EXISTS (SELECT 1 FROM @extschema@.messages m WHERE m.conversation_id = conv.id AND m.role = 'tool'
                AND m.turn = conv.turns + 1 AND m.tool_call_id = r ->> 'tool_call_id') THEN
      RAISE EXCEPTION 'tool call "%" of conversation % already has a result', r ->> 'tool_call_id', conv.id
        USING ERRCODE = 'unique_violation';
    END IF;
    -- the result belongs to the next turn, which hands it to the model
    INSERT INTO @extschema@.messages (conversation_id, turn, role, content, tool_call_id)
    VALUES (conv.id, conv.turns + 1, 'tool',
            CASE jsonb_typeof(r -> 'content') WHEN 'string' THEN r ->> 'content' ELSE (r -> 'content')::text END,
            r ->> 'tool_call_id');
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

COMMENT ON FUNCTION add_tool_results(bigint, jsonb) IS
'Store the results of the last reply''s tool calls, [{"tool_call_id": ..., "content": text or JSON}], as tool messages of the next turn (say / say_json then hands them to the model, in the order of the calls). Unknown call ids, results given twice and conversations that are not yours are errors.';

CREATE FUNCTION add_tool_result(conversation_id bigint, tool_call_id text, content text)
RETURNS void
LANGUAGE sql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT @extschema@.add_tool_results($1, jsonb_build_array(jsonb_build_object('tool_call_id', $2, 'content', $3)));
$$;

COMMENT ON FUNCTION add_tool_result(bigint, text, text) IS
'add_tool_results for one call.';

CREATE FUNCTION run_query(query text, max_rows int DEFAULT 100)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'kl_sql_run_query'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION run_query(text, int) IS
'Run one read-only query (SELECT, VALUES, TABLE or WITH ... SELECT) with the caller''s privileges and return up to max_rows rows as a jsonb array; the statement_timeout in force when it is called limits this query (inside a function, statement_timeout alone does not). For agent loops that execute SQL a model wrote: call it under a restricted role in a read-only transaction (README).';

CREATE FUNCTION conversation_messages(conversation_id bigint)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
  SELECT coalesce(jsonb_agg(CASE m.role
           WHEN 'assistant' THEN jsonb_strip_nulls(jsonb_build_object('role', 'assistant', 'content', m.content,
                                   'tool_calls', m.tool_calls, 'token_ids', to_jsonb(m.token_ids)))
           WHEN 'tool' THEN jsonb_build_object('role', 'tool', 'tool_call_id', m.tool_call_id, 'content', m.content)
           ELSE jsonb_build_object('role', m.role, 'content', m.content) END ORDER BY m.id), '[]'::jsonb)
    FROM @extschema@.messages m WHERE m.conversation_id = $1;
$$;

COMMENT ON FUNCTION conversation_messages(bigint) IS
'A conversation''s history as chat messages (for chat / chat_json): its replies with their tool calls and the token ids the model generated (rendered as they are, so that the history replays to exactly the tokens the conversation''s state holds).';

-- PARALLEL UNSAFE (the default): writes the copy.
CREATE FUNCTION fork_conversation(conversation_id bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  nid bigint;
BEGIN
  PERFORM @extschema@._require_writable('fork_conversation', 'fork_conversation() copies the conversation''s rows');
  INSERT INTO @extschema@.conversations (model, system, page_size, state, positions, turns, tools)
  SELECT c.model, c.system, c.page_size, c.state, c.positions, c.turns, c.tools FROM @extschema@.conversations c
   WHERE c.id = fork_conversation.conversation_id
  RETURNING id INTO nid;
  IF nid IS NULL THEN
    RAISE EXCEPTION 'conversation % does not exist', fork_conversation.conversation_id
      USING ERRCODE = 'undefined_object';
  END IF;
  INSERT INTO @extschema@.conversation_pages (conversation_id, page_no, data)
  SELECT nid, p.page_no, p.data FROM @extschema@.conversation_pages p
   WHERE p.conversation_id = fork_conversation.conversation_id;
  INSERT INTO @extschema@.messages (conversation_id, turn, role, content, token_ids, tool_calls, tool_call_id)
  SELECT nid, m.turn, m.role, m.content, m.token_ids, m.tool_calls, m.tool_call_id FROM @extschema@.messages m
   WHERE m.conversation_id = fork_conversation.conversation_id ORDER BY m.id;
  RETURN nid;
END
$$;

COMMENT ON FUNCTION fork_conversation(bigint) IS
'Copy a conversation; the two continue independently from the same history.';
