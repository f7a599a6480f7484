-- The agent loop of the README, run as it is written there (the block
-- between "-- BEGIN agent example" and "-- END agent example" is read from
-- README.md), so that the example cannot rot: the model calls run_sql, the
-- query runs under the restricted role, read-only and with a time limit, the
-- rows (or the error) go back, and the loop ends with a text answer.
BEGIN;
SELECT plan(14);

\set agent_example `sed -n '/^-- BEGIN agent example/,/^-- END agent example/p' README.md`
SELECT ok(length(:'agent_example') > 1000, 'the README has the agent example');
:agent_example

SELECT has_function('public', 'run_sql', ARRAY['text'], 'the example defines run_sql');
SELECT has_function('public', 'ask', ARRAY['text', 'integer'], 'the example defines ask');

-- the tool itself: what the model's SQL can and cannot do
CREATE TABLE public.kl_agent_secret (x int);
SELECT ok(jsonb_array_length(run_sql('SELECT relname FROM pg_class LIMIT 3')) = 3, 'run_sql returns rows as JSON');
SELECT is(jsonb_array_length(run_sql('SELECT relname FROM pg_class')), 20, '... at most 20 of them');
SELECT is(run_sql('SELECT * FROM public.kl_agent_secret') ->> 'error', 'permission denied for table kl_agent_secret',
          'it runs as agent_reader: no access to other tables');
SELECT alike(run_sql('INSERT INTO public.kl_agent_secret VALUES (1)') ->> 'error', '%syntax error%',
             'one SELECT-like statement only');
SELECT alike(run_sql('SELECT 1; DROP TABLE public.kl_agent_secret') ->> 'error', '%',
             'a second statement is refused');
SELECT alike(run_sql('SELECT pg_sleep(5)') ->> 'error', '%ran longer than statement_timeout (2000 ms)%',
             'a slow query is stopped after 2 s');
SELECT is(current_user::text, session_user::text, 'the role is back after each query');
SELECT is(current_setting('transaction_read_only'), 'off', '... and the transaction writable');

-- the loop
SELECT ask('How many tables are there?') AS answer \gset
SELECT ok(:'answer' IS NOT NULL, 'ask returns the model''s text answer');
SELECT is((SELECT string_agg(role, ',' ORDER BY id) FROM kimi_linear.messages
           WHERE conversation_id = (SELECT max(id) FROM kimi_linear.conversations)),
          'system,user,assistant,tool,assistant',
          'the exchange is kept: question, call, its result, answer');
SELECT ok((SELECT content::jsonb IS NOT NULL FROM kimi_linear.messages
           WHERE conversation_id = (SELECT max(id) FROM kimi_linear.conversations) AND role = 'tool'),
          'the call''s result (rows or an error) went back as JSON');

SELECT * FROM finish();
ROLLBACK;
