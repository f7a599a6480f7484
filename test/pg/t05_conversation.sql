-- Conversations over several pages: say() with the worker's state cache
-- (head only), after a cache miss (rolled-back turn: pages reloaded), and the
-- same turns through chat_with_state (the whole state passed every time)
-- give the same replies.
BEGIN;
SELECT plan(9);
SET LOCAL kimi_linear.page_size = 128;

SELECT kimi_linear.new_conversation(NULL, 'You are a PostgreSQL expert.') AS cid \gset
CREATE TEMP TABLE turns (n int, msg text);
INSERT INTO turns VALUES
  (1, 'Explain what VACUUM does. ' || repeat('Consider dead tuples, visibility maps and the free space map. ', 8)),
  (2, 'How does autovacuum decide when to run? ' || repeat('Think about thresholds and scale factors. ', 6)),
  (3, 'What about ANALYZE and the statistics it collects?'),
  (4, 'Summarize our discussion in one sentence.');

CREATE TEMP TABLE said (n int, reply text);
INSERT INTO said SELECT 1, kimi_linear.say(:cid, msg, max_tokens => 48) FROM turns WHERE n = 1;
INSERT INTO said SELECT 2, kimi_linear.say(:cid, msg, max_tokens => 48) FROM turns WHERE n = 2;  -- cache hit
SELECT cmp_ok((SELECT count(*)::int FROM kimi_linear.conversation_pages WHERE conversation_id = :cid), '>=', 2,
              'the history spans several pages');
SELECT pages AS pages_before FROM (SELECT count(*) AS pages FROM kimi_linear.conversation_pages WHERE conversation_id = :cid) p \gset
-- a turn that is rolled back (to a savepoint): the worker's cache now holds a state the table does not
SAVEPOINT s;
SELECT kimi_linear.say(:cid, 'A turn that will not count.', max_tokens => 8);
ROLLBACK TO SAVEPOINT s;
INSERT INTO said SELECT 3, kimi_linear.say(:cid, msg, max_tokens => 48) FROM turns WHERE n = 3;  -- miss: pages reloaded
INSERT INTO said SELECT 4, kimi_linear.say(:cid, msg, max_tokens => 48) FROM turns WHERE n = 4;  -- hit again
SELECT cmp_ok((SELECT count(*)::int FROM kimi_linear.conversation_pages WHERE conversation_id = :cid), '>=', :pages_before,
              'pages are only ever added');

-- the same turns with the whole state passed each time
CREATE TEMP TABLE chain (n int, reply text, st bytea);
INSERT INTO chain SELECT 1, r.* FROM turns t, kimi_linear.chat_with_state(NULL,
  jsonb_build_array(jsonb_build_object('role', 'system', 'content', 'You are a PostgreSQL expert.'),
                    jsonb_build_object('role', 'user', 'content', t.msg)), max_tokens => 48) r WHERE t.n = 1;
INSERT INTO chain SELECT t.n, r.* FROM turns t JOIN chain c ON c.n = t.n - 1,
  kimi_linear.chat_with_state(c.st, jsonb_build_array(jsonb_build_object('role', 'user', 'content', t.msg)), max_tokens => 48) r WHERE t.n = 2;
INSERT INTO chain SELECT t.n, r.* FROM turns t JOIN chain c ON c.n = t.n - 1,
  kimi_linear.chat_with_state(c.st, jsonb_build_array(jsonb_build_object('role', 'user', 'content', t.msg)), max_tokens => 48) r WHERE t.n = 3;
INSERT INTO chain SELECT t.n, r.* FROM turns t JOIN chain c ON c.n = t.n - 1,
  kimi_linear.chat_with_state(c.st, jsonb_build_array(jsonb_build_object('role', 'user', 'content', t.msg)), max_tokens => 48) r WHERE t.n = 4;

SELECT is((SELECT reply FROM said WHERE n = k), (SELECT reply FROM chain WHERE n = k), format('turn %s: say = chat_with_state chain', k))
FROM generate_series(1, 4) k;

SELECT cmp_ok((SELECT positions FROM kimi_linear.conversations WHERE id = :cid), '>', 256::bigint, 'positions recorded');

-- the history rendered in full and run once gives the last reply too
SELECT is(kimi_linear.chat(
            jsonb_build_array(jsonb_build_object('role', 'system', 'content', 'You are a PostgreSQL expert.'))
            || (SELECT jsonb_agg(m ORDER BY t.n, m->>'role' DESC) FROM turns t JOIN said s ON s.n = t.n,
                LATERAL (VALUES (jsonb_build_object('role', 'user', 'content', t.msg)),
                                (jsonb_build_object('role', 'assistant', 'content', s.reply))) v(m)
                WHERE t.n < 4)
            || jsonb_build_array(jsonb_build_object('role', 'user', 'content', (SELECT msg FROM turns WHERE n = 4))),
            max_tokens => 48),
          (SELECT reply FROM said WHERE n = 4), 'say = the whole history run from scratch');

SELECT is((SELECT count(*)::int FROM kimi_linear.messages WHERE conversation_id = :cid), 9, 'system + 4 exchanges stored');

SELECT * FROM finish();
ROLLBACK;
