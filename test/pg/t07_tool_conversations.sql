-- Agent conversations: tools declared with the conversation, replies with
-- tool calls stored in messages, their results handed back (matched to the
-- call ids), and the conversation resumed at the cost of its new tokens —
-- equal to replaying its whole history (conversation_messages + chat_json).
-- Errors: bad declarations, results for calls that do not exist or twice,
-- turns before the results, other roles' conversations.
BEGIN;
SELECT plan(36);
SET LOCAL kimi_linear.page_size = 64;	-- several pages: resumed turns read them back

CREATE TEMP TABLE k (name text PRIMARY KEY, v jsonb);
INSERT INTO k VALUES ('tools',
  '[{"type": "function", "function": {"name": "run_sql", "description": "Run one read-only SQL query.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 60}}, "required": ["query"]}}},
    {"type": "function", "function": {"name": "table_size", "description": "Size of a table in bytes.",
     "parameters": {"type": "object", "properties": {"table": {"enum": ["pg_class", "pg_proc"]}}, "required": ["table"]}}}]');

SELECT throws_like($$SELECT kimi_linear.new_conversation(tools => '[{"type": "function", "function": {"name": "a b"}}]')$$,
  '%letters, digits%', 'new_conversation checks the tool declarations');
SELECT kimi_linear.new_conversation(system => 'You can query the database.',
                                    tools => (SELECT v FROM k WHERE name = 'tools')) AS cid \gset
SELECT is((SELECT tools FROM kimi_linear.conversations WHERE id = :cid), (SELECT v FROM k WHERE name = 'tools'),
          'the declarations are stored with the conversation');

-- turn 1: a call of run_sql
SELECT kimi_linear.say_json(:cid, 'How many tables are there?', tool_choice => 'run_sql', max_tokens => 120) AS r1 \gset
SELECT is((:'r1'::jsonb) -> 'tool_calls' -> 0 ->> 'id', 'functions.run_sql:0', 'turn 1: a call of run_sql');
SELECT is((SELECT tool_calls -> 0 ->> 'id' FROM kimi_linear.messages WHERE conversation_id = :cid AND role = 'assistant'),
          'functions.run_sql:0', 'the reply is stored with its calls');
SELECT ok((SELECT token_ids IS NOT NULL FROM kimi_linear.messages WHERE conversation_id = :cid AND role = 'assistant'),
          '... and with its token ids');
SELECT ok((SELECT count(*) > 0 FROM kimi_linear.conversation_pages WHERE conversation_id = :cid), 'the history has pages');

SELECT throws_like(format($$SELECT kimi_linear.say_json(%s, 'And?')$$, :cid),
  '%tool call "functions.run_sql:0" of the last reply has no result yet%', 'no turn before the results are in');
SELECT throws_like(format($$SELECT kimi_linear.add_tool_result(%s, 'functions.run_sql:5', '[]')$$, :cid),
  '%has no tool call "functions.run_sql:5"%', 'a result for a call that does not exist');
SELECT throws_like(format($$SELECT kimi_linear.add_tool_results(%s, '{"tool_call_id": "x"}')$$, :cid),
  '%non-empty JSON array%', 'results must be an array');
SELECT throws_like(format($$SELECT kimi_linear.add_tool_results(%s, '[{"content": "x"}]')$$, :cid),
  '%each result must be%', 'a result without its call id');
SELECT throws_like($$SELECT kimi_linear.add_tool_result(-1, 'functions.run_sql:0', '[]')$$,
  '%conversation -1 does not exist%', 'results for a conversation that does not exist');
SELECT lives_ok(format($$SELECT kimi_linear.add_tool_results(%s, '[{"tool_call_id": "functions.run_sql:0", "content": [{"count": 68}]}]')$$, :cid),
  'the result of the call');
SELECT throws_like(format($$SELECT kimi_linear.add_tool_result(%s, 'functions.run_sql:0', '[]')$$, :cid),
  '%already has a result%', 'a second result for the same call');
SELECT is((SELECT content FROM kimi_linear.messages WHERE conversation_id = :cid AND role = 'tool'),
          '[{"count": 68}]', 'a JSON result is stored as its text');

-- turn 2: the result goes back (no user message); resumed = the whole history replayed
SELECT kimi_linear.conversation_messages(:cid) AS h2 \gset
SELECT kimi_linear.say_json(:cid, NULL, tool_choice => 'table_size', max_tokens => 120) AS r2 \gset
SELECT is((:'r2'::jsonb) -> 'tool_calls' -> 0 ->> 'id', 'functions.table_size:1', 'turn 2: the next call is numbered 1');
SELECT is(kimi_linear.chat_json(:'h2', tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'table_size',
                                max_tokens => 120), :'r2'::jsonb,
          'turn 2 resumed from the stored state = the whole history replayed');
SELECT ok((:'h2'::jsonb) @> '[{"role": "tool", "tool_call_id": "functions.run_sql:0"}]',
          'conversation_messages has the tool result with its call id');

-- turn 3: the result of the second call, and a user message
SELECT kimi_linear.add_tool_result(:cid, 'functions.table_size:1', '16384');
SELECT kimi_linear.conversation_messages(:cid) AS h3 \gset
SELECT kimi_linear.say_json(:cid, 'Thanks. Anything else?', tool_choice => 'none', max_tokens => 24) AS r3 \gset
SELECT is((:'r3'::jsonb) -> 'tool_calls', '[]'::jsonb, 'turn 3 (tool_choice none): an answer in text');
SELECT is(kimi_linear.chat_json((:'h3'::jsonb) || '[{"role": "user", "content": "Thanks. Anything else?"}]',
                                tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'none', max_tokens => 24),
          :'r3'::jsonb, 'turn 3 (result and message) resumed = replayed');
SELECT is((SELECT string_agg(role, ',' ORDER BY id) FROM kimi_linear.messages WHERE conversation_id = :cid),
          'system,user,assistant,tool,assistant,tool,user,assistant', 'the history as stored');
SELECT is((SELECT string_agg(turn::text, ',' ORDER BY id) FROM kimi_linear.messages WHERE conversation_id = :cid),
          '0,1,1,2,2,3,3,3', 'results belong to the turn that hands them back');
SELECT throws_like(format($$SELECT kimi_linear.add_tool_result(%s, 'functions.table_size:1', '1')$$, :cid),
  '%made no tool calls%', 'no results when the last reply made no calls');
SELECT throws_like(format($$SELECT kimi_linear.say_json(%s, NULL)$$, :cid),
  '%message must not be NULL%', 'a turn without results needs a message');

-- say (text) on the same conversation, json_schema on say_json
SELECT ok(length(kimi_linear.say(:cid, 'What is VACUUM?', max_tokens => 16)) > 0, 'say on an agent conversation');
SELECT ok((kimi_linear.say_json(:cid, 'Describe pg_class.', max_tokens => 200,
           json_schema => '{"type": "object", "properties": {"rows": {"type": "integer"}}, "required": ["rows"]}')
           -> 'parsed' -> 'rows') IS NOT NULL, 'say_json with json_schema: the parsed value');

-- a rolled back turn leaves the conversation as it was
SELECT positions AS p_before FROM kimi_linear.conversations WHERE id = :cid \gset
SAVEPOINT s;
SELECT kimi_linear.say_json(:cid, 'Count the views.', tool_choice => 'run_sql', max_tokens => 120) AS discarded \gset
ROLLBACK TO SAVEPOINT s;
SELECT is((SELECT positions FROM kimi_linear.conversations WHERE id = :cid), :'p_before'::bigint,
          'a rolled back turn is gone');
SELECT kimi_linear.conversation_messages(:cid) AS h4 \gset
SELECT kimi_linear.say_json(:cid, 'Count the views.', tool_choice => 'run_sql', max_tokens => 120) AS r4 \gset
SELECT is(kimi_linear.chat_json((:'h4'::jsonb) || '[{"role": "user", "content": "Count the views."}]',
                                tools => (SELECT v FROM k WHERE name = 'tools'), tool_choice => 'run_sql', max_tokens => 120),
          :'r4'::jsonb, 'after a rollback (the worker''s cache misses): resumed = replayed');
SELECT is((:'r4'::jsonb) -> 'tool_calls' -> 0 ->> 'id', 'functions.run_sql:2', '... and numbered on from the history');

-- a fork continues independently with the same tools and calls
SELECT kimi_linear.fork_conversation(:cid) AS fid \gset
SELECT is((SELECT tools FROM kimi_linear.conversations WHERE id = :fid), (SELECT v FROM k WHERE name = 'tools'),
          'a fork keeps the tools');
SELECT is(kimi_linear.conversation_messages(:fid), kimi_linear.conversation_messages(:cid),
          '... and the history with its calls and results');
SELECT lives_ok(format($$SELECT kimi_linear.add_tool_result(%s, 'functions.run_sql:2', '[]')$$, :fid),
                'the fork takes the result of its pending call');
SELECT kimi_linear.add_tool_result(:cid, 'functions.run_sql:2', '[]');
SELECT is(kimi_linear.say_json(:fid, NULL, tool_choice => 'none', max_tokens => 16),
          kimi_linear.say_json(:cid, NULL, tool_choice => 'none', max_tokens => 16),
          'fork and original continue alike');

-- only the owner
CREATE ROLE kl_tap_other;
GRANT USAGE ON SCHEMA kimi_linear TO kl_tap_other;
SET LOCAL ROLE kl_tap_other;
SELECT is((SELECT count(*)::int FROM kimi_linear.messages), 0, 'another role sees no messages');
SELECT throws_like(format($$SELECT kimi_linear.add_tool_result(%s, 'functions.run_sql:3', '[]')$$, :cid),
  '%does not exist%', 'another role cannot add tool results');
SELECT throws_like(format($$SELECT kimi_linear.say_json(%s, 'hi')$$, :cid),
  '%does not exist%', '... nor talk to the conversation');
SELECT is(kimi_linear.conversation_messages(:cid), '[]'::jsonb, '... nor read its history');
RESET ROLE;

SELECT * FROM finish();
ROLLBACK;
