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
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION generate(text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Continue prompt with up to max_tokens tokens. temperature 0 is greedy; a seed makes sampling reproducible; generation ends at the model''s end token (unless ignore_eos), at a stop string (not included in the result) or at max_tokens.';

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
LANGUAGE C VOLATILE PARALLEL RESTRICTED ROWS 64;

COMMENT ON FUNCTION generate_stream(text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Like generate, one row per piece of text as it is produced (always complete UTF-8 characters).';

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
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION generate_tokens(text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Like generate, but returns the generated token ids (the prompt is encoded after the model''s bos token, as ./kl generate --prompt does).';

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
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION generate_ids(int[], int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Continue a sequence of token ids (used as given: no bos is added) and return the generated ids; works for models without a tokenizer (stop must be NULL).';

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
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION chat(jsonb, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'The assistant''s reply to a conversation given as [{"role": "system"|"user"|"assistant", "content": "..."}], rendered in the model''s chat format.';

CREATE FUNCTION summarize(doc text, max_tokens int DEFAULT 200, model text DEFAULT NULL, temperature float8 DEFAULT 0)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_summarize'
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION summarize(text, int, text, float8) IS
'A short summary of a (long) document. The whole document is read: long inputs are prefilled in chunks.';

CREATE FUNCTION _summarize_agg_step(internal, text) RETURNS internal
AS 'MODULE_PATHNAME', 'kl_sql_summarize_agg_step' LANGUAGE C CALLED ON NULL INPUT;
CREATE FUNCTION _summarize_agg_step(internal, text, int) RETURNS internal
AS 'MODULE_PATHNAME', 'kl_sql_summarize_agg_step' LANGUAGE C CALLED ON NULL INPUT;
CREATE FUNCTION _summarize_agg_final(internal) RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_summarize_agg_final' LANGUAGE C;

CREATE AGGREGATE summarize_agg(text) (
    SFUNC = _summarize_agg_step, STYPE = internal, FINALFUNC = _summarize_agg_final);
CREATE AGGREGATE summarize_agg(text, int) (
    SFUNC = _summarize_agg_step, STYPE = internal, FINALFUNC = _summarize_agg_final);

COMMENT ON AGGREGATE summarize_agg(text) IS
'Summarize the documents of a group together (joined with blank lines, in the order given: use ORDER BY inside the call).';
COMMENT ON AGGREGATE summarize_agg(text, int) IS
'summarize_agg with the summary''s max_tokens.';

-------------------------------------------------------------------- tokens

CREATE FUNCTION tokenize(input text, model text DEFAULT NULL, special boolean DEFAULT false)
RETURNS int[]
AS 'MODULE_PATHNAME', 'kl_sql_tokenize'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION tokenize(text, text, boolean) IS
'The token ids of a text. special: special-token texts such as <|im_end|> become their ids.';

CREATE FUNCTION detokenize(ids int[], model text DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_detokenize'
LANGUAGE C STABLE PARALLEL SAFE;

COMMENT ON FUNCTION detokenize(int[], text) IS
'The text of token ids; bytes that do not form complete UTF-8 characters become U+FFFD.';

-------------------------------------------------------------------- states

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
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION generate_with_state(bytea, text, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'Continue a sequence from its state (NULL: a new one) with prompt; returns the reply and the new state. Only the new tokens are computed. The state is checked (checksum, model) before use.';

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
LANGUAGE C VOLATILE PARALLEL RESTRICTED;

COMMENT ON FUNCTION chat_with_state(bytea, jsonb, int, float8, float8, int, bigint, text[], text, float8, float8, boolean) IS
'One chat turn on a state the caller keeps (NULL: a new conversation): the new messages are rendered in the chat format after the history the state holds; returns the reply and the new state. say() runs the same turn on a stored conversation.';

-------------------------------------------------------------------- models

CREATE FUNCTION load_model(name text, path text, quantize text DEFAULT NULL) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_load_model'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION load_model(text, text, text) IS
'Load the model in directory path (relative to kimi_linear.model_dir, or inside it) under name; quantize => ''fp8'', ''int8'' or ''int4'' quantizes a bf16/f32 checkpoint''s weights at load (checkpoints published quantized load as they are). Superusers and members of kimi_linear_admin only.';

CREATE FUNCTION unload_model(name text) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_unload_model'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION unload_model(text) IS
'Unload a model from every inference worker; requests running on it fail. Superusers and members of kimi_linear_admin only.';

REVOKE ALL ON FUNCTION load_model(text, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION unload_model(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION load_model(text, text, text) TO kimi_linear_admin;
GRANT EXECUTE ON FUNCTION unload_model(text) TO kimi_linear_admin;

CREATE FUNCTION _resolve_model(name text DEFAULT NULL) RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_resolve_model'
LANGUAGE C VOLATILE;

CREATE FUNCTION _models(
    OUT name text, OUT path text, OUT parameters bigint, OUT bytes bigint, OUT device text,
    OUT status text, OUT loaded_at timestamptz, OUT error text,
    OUT weight_format text, OUT weight_bytes bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_models'
LANGUAGE C VOLATILE;

CREATE VIEW models AS SELECT * FROM _models();
COMMENT ON VIEW models IS 'Models registered with the inference workers: bytes of the checkpoint''s tensors as stored; weight_format (bf16, or how the weights are quantized) and weight_bytes, the weights as the workers hold them.';

CREATE FUNCTION _activity(
    OUT worker int, OUT request_id bigint, OUT backend_pid int, OUT model text, OUT phase text,
    OUT prompt_tokens_done bigint, OUT prompt_tokens bigint, OUT generated_tokens bigint,
    OUT max_tokens bigint, OUT tokens_per_second float8, OUT submitted_at timestamptz,
    OUT started_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_activity'
LANGUAGE C VOLATILE;

CREATE VIEW activity AS SELECT * FROM _activity();
COMMENT ON VIEW activity IS 'Every inference request in flight: its worker, backend, phase (queued, prefill, decode, finishing), prompt tokens done of total, tokens generated, and the current rate (prompt tokens/s while prefilling, generated tokens/s while decoding).';

CREATE FUNCTION _workers(OUT worker int, OUT pid int, OUT active_requests int, OUT restarts int,
    OUT started_at timestamptz, OUT steps bigint, OUT tokens bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_workers'
LANGUAGE C VOLATILE;

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

CREATE FUNCTION new_conversation(model text DEFAULT NULL, system text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = @extschema@, pg_catalog
AS $$
DECLARE
  cid bigint;
BEGIN
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

CREATE FUNCTION fork_conversation(conversation_id bigint)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = @extschema@, pg_catalog
AS $$
DECLARE
  nid bigint;
BEGIN
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
