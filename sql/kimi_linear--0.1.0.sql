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

-------------------------------------------------------------------- models

CREATE FUNCTION load_model(name text, path text) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_load_model'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION load_model(text, text) IS
'Load the model in directory path (relative to kimi_linear.model_dir, or inside it) under name. Superusers and members of kimi_linear_admin only.';

CREATE FUNCTION unload_model(name text) RETURNS void
AS 'MODULE_PATHNAME', 'kl_sql_unload_model'
LANGUAGE C VOLATILE;

REVOKE ALL ON FUNCTION load_model(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION unload_model(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION load_model(text, text) TO kimi_linear_admin;
GRANT EXECUTE ON FUNCTION unload_model(text) TO kimi_linear_admin;

CREATE FUNCTION _resolve_model(name text DEFAULT NULL) RETURNS text
AS 'MODULE_PATHNAME', 'kl_sql_resolve_model'
LANGUAGE C VOLATILE;

CREATE FUNCTION _models(
    OUT name text, OUT path text, OUT parameters bigint, OUT bytes bigint, OUT device text,
    OUT status text, OUT loaded_at timestamptz, OUT error text)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_models'
LANGUAGE C VOLATILE;

CREATE VIEW models AS SELECT * FROM _models();
COMMENT ON VIEW models IS 'Models registered with the inference workers.';

CREATE FUNCTION _activity(
    OUT worker int, OUT request_id bigint, OUT backend_pid int, OUT model text, OUT phase text,
    OUT prompt_tokens_done bigint, OUT prompt_tokens bigint, OUT generated_tokens bigint,
    OUT tokens_per_second float8, OUT submitted_at timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'kl_sql_activity'
LANGUAGE C VOLATILE;

CREATE VIEW activity AS SELECT * FROM _activity();
COMMENT ON VIEW activity IS 'Every inference request in flight: phase (queued, prefill, decode) and progress.';

GRANT SELECT ON models, activity TO PUBLIC;

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

CREATE FUNCTION _chat_turn(
    model text, page_size int, pages bytea[], head bytea, system text, message text,
    max_tokens int, temperature float8, top_p float8, top_k int, seed bigint, stop text[],
    unused_model text, repetition_penalty float8, min_p float8, ignore_eos boolean,
    OUT reply text, OUT reply_ids int[], OUT head bytea, OUT new_pages bytea[],
    OUT pages_from bigint, OUT positions bigint)
AS 'MODULE_PATHNAME', 'kl_sql_chat_turn'
LANGUAGE C VOLATILE;

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
    repetition_penalty float8 DEFAULT 1)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = @extschema@, pg_catalog
AS $$
DECLARE
  c conversations;
  r record;
BEGIN
  IF say.conversation_id IS NULL THEN
    RAISE EXCEPTION 'conversation_id must not be NULL' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  -- the row lock serializes turns: two sessions never lose one
  SELECT * INTO c FROM conversations WHERE id = say.conversation_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'conversation % does not exist', say.conversation_id
      USING ERRCODE = 'undefined_object', HINT = 'Create one with kimi_linear.new_conversation().';
  END IF;
  r := _chat_turn(c.model, c.page_size,
                  ARRAY(SELECT p.data FROM conversation_pages p
                        WHERE p.conversation_id = c.id ORDER BY p.page_no),
                  c.state, CASE WHEN c.state IS NULL THEN c.system END, say.message,
                  say.max_tokens, say.temperature, say.top_p, say.top_k, say.seed, say.stop,
                  NULL, say.repetition_penalty, 0, false);
  INSERT INTO conversation_pages (conversation_id, page_no, data)
  SELECT c.id, (r.pages_from / c.page_size)::int + t.i - 1, t.p
  FROM unnest(r.new_pages) WITH ORDINALITY AS t(p, i);
  UPDATE conversations
     SET state = r.head, positions = r.positions, turns = turns + 1, updated_at = now()
   WHERE id = c.id;
  INSERT INTO messages (conversation_id, turn, role, content)
  VALUES (c.id, c.turns + 1, 'user', say.message);
  INSERT INTO messages (conversation_id, turn, role, content, token_ids)
  VALUES (c.id, c.turns + 1, 'assistant', r.reply, r.reply_ids);
  RETURN r.reply;
END
$$;

COMMENT ON FUNCTION say(bigint, text, int, float8, float8, int, bigint, text[], float8) IS
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
