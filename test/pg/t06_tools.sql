-- Tools, tool calls and structured output: chat / chat_json with tools and
-- tool_choice; bad declarations; json_schema on generate, chat, chat_json
-- (100 seeded generations at temperature 1 through the worker, each checked
-- against the schema); extract over a text column; errors that say what is
-- wrong.
BEGIN;
SELECT plan(47);

-- a small validator for the JSON schema keywords the constraint supports
CREATE FUNCTION pg_temp.valid(v jsonb, s jsonb) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
  t text;
  k text;
  ok boolean := false;
BEGIN
  IF s ? 'enum' THEN
    RETURN EXISTS (SELECT 1 FROM jsonb_array_elements(s -> 'enum') e WHERE e = v);
  END IF;
  IF s ? 'type' THEN
    FOR t IN SELECT jsonb_array_elements_text(CASE jsonb_typeof(s -> 'type') WHEN 'array' THEN s -> 'type'
                                                ELSE jsonb_build_array(s -> 'type') END) LOOP
      ok := ok OR CASE t WHEN 'integer' THEN jsonb_typeof(v) = 'number' AND v::text !~ '[.eE]'
                         WHEN 'number' THEN jsonb_typeof(v) = 'number'
                         ELSE jsonb_typeof(v) = t END;
    END LOOP;
    IF NOT ok THEN RETURN false; END IF;
  END IF;
  IF jsonb_typeof(v) = 'object' AND s ? 'properties' THEN
    FOR k IN SELECT jsonb_object_keys(v) LOOP
      IF NOT (s -> 'properties') ? k OR NOT pg_temp.valid(v -> k, s -> 'properties' -> k) THEN RETURN false; END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements_text(coalesce(s -> 'required', '[]')) r WHERE NOT v ? r) THEN
      RETURN false;
    END IF;
  END IF;
  IF jsonb_typeof(v) = 'array' THEN
    IF jsonb_array_length(v) > coalesce((s ->> 'maxItems')::int, 1000000) THEN RETURN false; END IF;
    IF s ? 'items' AND EXISTS (SELECT 1 FROM jsonb_array_elements(v) e WHERE NOT pg_temp.valid(e, s -> 'items')) THEN
      RETURN false;
    END IF;
  END IF;
  IF jsonb_typeof(v) = 'string' AND char_length(v #>> '{}') > coalesce((s ->> 'maxLength')::int, 1000000) THEN
    RETURN false;
  END IF;
  RETURN true;
END $$;

CREATE TEMP TABLE k (name text PRIMARY KEY, v jsonb);
INSERT INTO k VALUES
  ('tools', '[{"type": "function", "function": {"name": "run_sql", "description": "Run one read-only SQL query.",
              "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 60}},
                             "required": ["query"]}}},
             {"type": "function", "function": {"name": "table_size", "description": "Size of a table in bytes.",
              "parameters": {"type": "object", "properties": {"table": {"enum": ["pg_class", "pg_proc"]}},
                             "required": ["table"]}}}]'),
  ('question', '[{"role": "system", "content": "You can query the database."},
                 {"role": "user", "content": "How many tables are there?"}]'),
  ('schema', '{"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
               "rows": {"type": "integer"}, "kind": {"enum": ["table", "view", "index"]},
               "logged": {"type": ["boolean", "null"]},
               "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}},
               "required": ["name", "kind"]}');

-- ------------------------------------------------------------ tool calls
CREATE TEMP TABLE r AS SELECT kimi_linear.chat_json((SELECT v FROM k WHERE name = 'question'),
  tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'run_sql', max_tokens => 120) AS reply;
SELECT is(jsonb_array_length((SELECT reply FROM r) -> 'tool_calls'), 1, 'tool_choice naming a tool: one call');
SELECT is((SELECT reply FROM r) -> 'tool_calls' -> 0 ->> 'id', 'functions.run_sql:0', 'the call id is functions.NAME:INDEX');
SELECT is((SELECT reply FROM r) -> 'tool_calls' -> 0 ->> 'name', 'run_sql', '... of the named tool');
SELECT ok(pg_temp.valid((SELECT reply FROM r) -> 'tool_calls' -> 0 -> 'arguments',
                        (SELECT v -> 0 -> 'function' -> 'parameters' FROM k WHERE name = 'tools')),
          'its arguments are a JSON object matching the tool''s parameter schema');
SELECT is(((SELECT reply FROM r) -> 'tool_calls' -> 0 -> 'function' ->> 'arguments')::jsonb,
          (SELECT reply FROM r) -> 'tool_calls' -> 0 -> 'arguments',
          'function.arguments (the text as generated) parses to the same arguments');
SELECT is((SELECT reply FROM r) ->> 'finish_reason', 'tool_calls', 'finish_reason: tool_calls');

SELECT alike(kimi_linear.chat((SELECT v FROM k WHERE name = 'question'),
              tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'table_size', max_tokens => 120),
            '<|tool_calls_section_begin|><|tool_call_begin|>functions.table_size:0<|tool_call_argument_begin|>%<|tool_call_end|><|tool_calls_section_end|>',
            'chat returns the reply as written: the Kimi tool-call markup');
SELECT ok(jsonb_array_length(kimi_linear.chat_json((SELECT v FROM k WHERE name = 'question'),
            tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'required', max_tokens => 120) -> 'tool_calls') >= 1,
          'tool_choice required: at least one call');
SELECT is(kimi_linear.chat_json((SELECT v FROM k WHERE name = 'question'),
            tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'none', max_tokens => 24) -> 'tool_calls',
          '[]'::jsonb, 'tool_choice none: no calls');
SELECT is(kimi_linear.chat_json((SELECT v FROM k WHERE name = 'question'),
            tools => (SELECT v FROM k WHERE name = 'tools'), max_tokens => 24) ->> 'finish_reason', 'length',
          'tool_choice auto: the untrained bundled model answers in text (cut at max_tokens here)');

-- a call cut off by max_tokens: reported, not returned as broken JSON
CREATE TEMP TABLE cut AS SELECT kimi_linear.chat_json((SELECT v FROM k WHERE name = 'question'),
  tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'run_sql', max_tokens => 10) AS reply;
SELECT is((SELECT reply -> 'tool_calls' FROM cut), '[]'::jsonb, 'a call cut off by max_tokens is not in tool_calls');
SELECT alike((SELECT reply -> 'invalid_tool_calls' -> 0 ->> 'error' FROM cut), '%cut off%',
            '... but in invalid_tool_calls, saying it was cut off');
SELECT is((SELECT reply ->> 'finish_reason' FROM cut), 'length', '... with finish_reason length');

-- a history with calls and results (the full OpenAI message form), then the next reply
SELECT ok(kimi_linear.chat_json(
  (SELECT v FROM k WHERE name = 'question') || jsonb_build_array(
     jsonb_build_object('role', 'assistant', 'content', '', 'tool_calls', (SELECT reply -> 'tool_calls' FROM r)),
     jsonb_build_object('role', 'tool', 'tool_call_id', 'functions.run_sql:0', 'content', '[{"count": 68}]')),
  tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'table_size', max_tokens => 120)
  -> 'tool_calls' -> 0 ->> 'id' = 'functions.table_size:1',
  'after a call and its result, the next call is numbered 1');

-- ------------------------------------------------------------ bad declarations and calls
SELECT throws_ok($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]', tools => '{"name": "f"}')$$,
  '22023', NULL, 'tools not an array');
SELECT throws_like($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]', tools => '[{"type": "retrieval"}]')$$,
  '%must be a function declaration%', 'a declaration that is not a function');
SELECT throws_like($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]',
  tools => '[{"type": "function", "function": {"name": "drop table"}}]')$$, '%letters, digits%', 'a tool name with a space');
SELECT throws_like($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]',
  tools => '[{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]')$$,
  '%declared twice%', 'two tools with one name');
SELECT throws_like($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]',
  tools => '[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
             "properties": {"d": {"type": "string", "format": "date"}}}}}]')$$,
  '%"format" is not supported%', 'parameters with an unsupported schema keyword');
SELECT throws_like($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]',
  tools => '[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]')$$,
  '%schema of an object%', 'parameters that do not describe an object');
SELECT throws_like($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]',
  tools => '[{"type": "function", "function": {"name": "f"}}]', tool_choice => 'g')$$,
  '%tool_choice names "g", which is not a declared tool%', 'tool_choice naming an undeclared tool');
SELECT throws_like($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]', tool_choice => 'f')$$,
  '%no tools are declared%', 'tool_choice without tools');
SELECT throws_like($$SELECT kimi_linear.chat_json('[{"role": "assistant", "content": "",
  "tool_calls": [{"id": "functions.rm:0", "function": {"name": "rm", "arguments": "{}"}}]}]',
  tools => '[{"type": "function", "function": {"name": "f"}}]')$$,
  '%calls "rm", which is not a declared tool%', 'a history calling a tool that is not declared');
SELECT throws_like($$SELECT kimi_linear.chat_json('[{"role": "assistant", "content": "", "tool_calls": [
    {"id": "functions.f:0", "function": {"name": "f", "arguments": "{}"}},
    {"id": "functions.f:1", "function": {"name": "f", "arguments": "{}"}}]},
  {"role": "tool", "tool_call_id": "functions.f:1", "content": "b"}]')$$,
  '%the result of "functions.f:0" comes next%', 'tool results out of the calls'' order');
SELECT throws_like($$SELECT kimi_linear.chat_json('[{"role": "robot", "content": "x"}]')$$,
  '%the roles are system, user, assistant and tool%', 'an unknown role (chat_json)');

-- ------------------------------------------------------------ structured output
SELECT ok(pg_temp.valid(kimi_linear.generate('A table, as JSON:', max_tokens => 200,
            json_schema => (SELECT v FROM k WHERE name = 'schema'))::jsonb, (SELECT v FROM k WHERE name = 'schema')),
          'generate with json_schema: JSON matching the schema');
-- (the engine test runs 1,000 such generations; these go through the worker)
CREATE TEMP TABLE gens AS SELECT s, kimi_linear.generate('A table, as JSON:', max_tokens => 400, temperature => 1,
  seed => s, json_schema => (SELECT v FROM k WHERE name = 'schema')) AS out FROM generate_series(1, 20) s;
SELECT is((SELECT count(*)::int FROM gens WHERE pg_temp.valid(out::jsonb, (SELECT v FROM k WHERE name = 'schema'))), 20,
          '20 seeded generations at temperature 1 through the worker: all valid against the schema');
SELECT is(kimi_linear.generate('A table, as JSON:', max_tokens => 400, temperature => 1, seed => 7,
            json_schema => (SELECT v FROM k WHERE name = 'schema')),
          (SELECT out FROM gens WHERE s = 7), 'seeded constrained generation repeats');
SELECT throws_like($$SELECT kimi_linear.generate('x', max_tokens => 3, json_schema => '{"type": "object"}')$$,
  '%cut off by max_tokens (3)%', 'a JSON value cut off by max_tokens is an error, not broken JSON');
SELECT throws_like($$SELECT kimi_linear.generate('x', json_schema => '{"type": "string", "pattern": "^a"}')$$,
  '%"pattern" is not supported; supported: type, enum%', 'an unsupported keyword is refused, naming the supported ones');
SELECT throws_like($$SELECT kimi_linear.generate('x', json_schema => '{"type": "object", "required": ["a"], "properties": {}}')$$,
  '%required property "a" is not in "properties"%', 'an inconsistent schema');
SELECT throws_like($$SELECT kimi_linear.generate('x', json_schema => '{"type": "object"}', stop => ARRAY['}'])$$,
  '%stop strings cannot be combined%', 'stop strings with json_schema');
SELECT throws_like($$SELECT kimi_linear.generate('x', json_schema => '{"type": "object"}', ignore_eos => true)$$,
  '%ignore_eos cannot be combined%', 'ignore_eos with json_schema');

CREATE TEMP TABLE cj AS SELECT kimi_linear.chat_json('[{"role": "user", "content": "Describe pg_class as JSON."}]',
  max_tokens => 200, json_schema => (SELECT v FROM k WHERE name = 'schema')) AS reply;
SELECT ok(pg_temp.valid((SELECT reply -> 'parsed' FROM cj), (SELECT v FROM k WHERE name = 'schema')),
          'chat_json with json_schema: "parsed" holds the value, valid against the schema');
SELECT is((SELECT (reply ->> 'content')::jsonb FROM cj), (SELECT reply -> 'parsed' FROM cj), '... and is the content, parsed');
SELECT is(kimi_linear.chat_json('[{"role": "user", "content": "x"}]', max_tokens => 3,
            json_schema => (SELECT v FROM k WHERE name = 'schema')) -> 'parsed', 'null'::jsonb,
          'chat_json: a value cut off gives parsed null (and an error field)');
SELECT ok(pg_temp.valid(kimi_linear.chat('[{"role": "user", "content": "Describe pg_class."}]', max_tokens => 200,
            json_schema => (SELECT v FROM k WHERE name = 'schema'))::jsonb, (SELECT v FROM k WHERE name = 'schema')),
          'chat with json_schema: the reply is the JSON text');

-- ------------------------------------------------------------ extract over a column
CREATE TEMP TABLE docs (id int, body text);
INSERT INTO docs VALUES (1, 'The table orders has 1200 rows and belongs to alice.'),
                        (2, 'The view recent_orders shows the last week of orders.'), (3, NULL);
CREATE TEMP TABLE ex AS SELECT id, kimi_linear.extract(body,
  '{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
    "kind": {"enum": ["table", "view"]}, "rows": {"type": ["integer", "null"]}}, "required": ["name", "kind"]}') AS fields
  FROM docs;
SELECT is((SELECT count(*)::int FROM ex WHERE fields ? 'name' AND fields ->> 'kind' IN ('table', 'view')), 2,
          'extract: one jsonb value per document, with the required fields');
SELECT ok((SELECT fields IS NULL FROM ex WHERE id = 3), 'extract of a NULL document is NULL');
SELECT throws_like($$SELECT kimi_linear.extract('x', '{"type": "object"}', max_tokens => 0)$$,
  '%max_tokens must be between 1%', 'extract: max_tokens is checked');

-- the set-based form: the same fields per document, errors on their rows
CREATE TEMP TABLE ex_each AS SELECT * FROM kimi_linear.extract_each(ARRAY(SELECT id FROM docs ORDER BY id),
  ARRAY(SELECT body FROM docs ORDER BY id),
  '{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
    "kind": {"enum": ["table", "view"]}, "rows": {"type": ["integer", "null"]}}, "required": ["name", "kind"]}');
SELECT is((SELECT count(*)::int FROM ex_each e JOIN ex ON ex.id = e.key WHERE e.fields = ex.fields AND e.error IS NULL), 2,
          'extract_each: each document''s fields equal extract''s');
SELECT is((SELECT error FROM ex_each WHERE key = 3), 'body must not be NULL', 'extract_each: a NULL document is an error on its row');
SELECT is((SELECT error FROM kimi_linear.extract_each(ARRAY[1], ARRAY['The table t.'], '{"type": "string"}', max_tokens => 2)),
          'the JSON value was cut off by max_tokens (2) before it was complete', 'extract_each: a value cut off is an error on its row');

-- ------------------------------------------------------------ the plain forms are unchanged
SELECT is(kimi_linear.chat('[{"role": "user", "content": "What is a tablespace?"}]', max_tokens => 20),
          kimi_linear.chat('[{"role": "user", "content": "What is a tablespace?"}]', max_tokens => 20,
                           tools => NULL, tool_choice => NULL, json_schema => NULL),
          'chat with the new arguments NULL is plain chat');
SELECT throws_like($$SELECT kimi_linear.chat('[{"role": "wizard", "content": "hi"}]')$$,
  'message 1 has role "wizard"', 'plain chat keeps its messages'' checks');
SELECT is(kimi_linear.chat_json('[{"role": "user", "content": "What is a tablespace?"}]', max_tokens => 20) ->> 'content',
          kimi_linear.chat('[{"role": "user", "content": "What is a tablespace?"}]', max_tokens => 20),
          'chat_json without tools: the same text as chat, in "content"');
SELECT is(kimi_linear.chat_json('[{"role": "user", "content": [{"type": "text", "text": "What is a "},
                                  {"type": "text", "text": "tablespace?"}]}]', max_tokens => 20) ->> 'content',
          kimi_linear.chat('[{"role": "user", "content": "What is a tablespace?"}]', max_tokens => 20),
          'content given as text parts is the same message');

SELECT * FROM finish();
ROLLBACK;
