-- The set-based forms (generate_each, chat_each, summarize_each,
-- generate_with_state_each, chat_with_state_each): one row per input with its
-- key, the same result as the single-row function, errors on their rows,
-- progress in kimi_linear.activity, cancellation of the whole batch.
BEGIN;
SELECT plan(32);
SELECT kimi_linear._resolve_model(NULL);

CREATE FUNCTION pg_temp.idle_after_ms(limit_ms int) RETURNS bool LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..limit_ms / 5 LOOP
    IF NOT EXISTS (SELECT FROM kimi_linear.activity WHERE backend_pid = pg_backend_pid()) THEN RETURN true; END IF;
    PERFORM pg_sleep(0.005);
  END LOOP;
  RETURN false;
END $$;

CREATE FUNCTION pg_temp.elapsed_ms(sql text) RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
  BEGIN
    EXECUTE sql;
  EXCEPTION WHEN query_canceled THEN
    NULL;
  END;
  RETURN extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;

CREATE FUNCTION pg_temp.fetch_key(cur refcursor) RETURNS text LANGUAGE plpgsql AS $$
DECLARE k text;
BEGIN
  FETCH cur INTO k;
  RETURN k;
END $$;

-- ------------------------------------------------------------------ same results as one by one
CREATE TEMP TABLE prompts AS
SELECT row_number() OVER (ORDER BY prompt) AS id, prompt FROM (SELECT DISTINCT prompt FROM kl_cli) p;

SELECT is((SELECT count(*)::int FROM kimi_linear.generate_each(ARRAY(SELECT id FROM prompts ORDER BY id),
                                                              ARRAY(SELECT prompt FROM prompts ORDER BY id), max_tokens => 24)),
          (SELECT count(*)::int FROM prompts), 'generate_each: one row per prompt');
SELECT is((SELECT count(*)::int FROM prompts p
           JOIN kimi_linear.generate_each(ARRAY(SELECT id FROM prompts ORDER BY id), ARRAY(SELECT prompt FROM prompts ORDER BY id),
                                          max_tokens => 24) e ON e.key = p.id
           WHERE e.reply = kimi_linear.generate(p.prompt, max_tokens => 24) AND e.error IS NULL),
          (SELECT count(*)::int FROM prompts), 'generate_each: each reply equals generate of its prompt (joined back by key)');
SELECT is((SELECT count(*)::int FROM prompts p
           JOIN kimi_linear.generate_each(ARRAY(SELECT id FROM prompts ORDER BY id), ARRAY(SELECT prompt FROM prompts ORDER BY id),
                                          max_tokens => 24, temperature => 0.8, seed => 5, ignore_eos => true) e ON e.key = p.id
           WHERE e.reply = kimi_linear.generate(p.prompt, max_tokens => 24, temperature => 0.8, seed => 5, ignore_eos => true)
             AND e.tokens = 24),
          (SELECT count(*)::int FROM prompts), 'generate_each with a seed: the same samples as generate; tokens counts the generated tokens');

CREATE TEMP TABLE pages AS
SELECT page, text FROM kl_docs WHERE length(text) BETWEEN 500 AND 1500 ORDER BY page LIMIT 6;
SELECT is((SELECT count(*)::int FROM pages p
           JOIN kimi_linear.summarize_each(ARRAY(SELECT page FROM pages), ARRAY(SELECT text FROM pages), max_tokens => 16) s
             ON s.key = p.page
           WHERE s.summary = kimi_linear.summarize(p.text, max_tokens => 16)),
          6, 'summarize_each with text keys: each summary equals summarize of its page');

SELECT is((SELECT count(*)::int FROM prompts p
           JOIN kimi_linear.chat_each(ARRAY(SELECT id FROM prompts ORDER BY id),
                                      ARRAY(SELECT jsonb_build_array(jsonb_build_object('role', 'user', 'content', prompt)) FROM prompts ORDER BY id),
                                      max_tokens => 16) c ON c.key = p.id
           WHERE c.reply = kimi_linear.chat(jsonb_build_array(jsonb_build_object('role', 'user', 'content', p.prompt)), max_tokens => 16)),
          (SELECT count(*)::int FROM prompts), 'chat_each: each reply equals chat of its messages');

CREATE TEMP TABLE states AS
SELECT k, (kimi_linear.generate_with_state(NULL, 'Topic ' || k, max_tokens => 8)).new_state AS state FROM generate_series(1, 3) k;
SELECT is((SELECT count(*)::int FROM states s
           JOIN kimi_linear.generate_with_state_each(ARRAY(SELECT k FROM states ORDER BY k), ARRAY(SELECT state FROM states ORDER BY k),
                                                     ARRAY[' and', ' or', ''], max_tokens => 8) e ON e.key = s.k
           CROSS JOIN LATERAL kimi_linear.generate_with_state(s.state, (ARRAY[' and', ' or', ''])[s.k], max_tokens => 8) o
           WHERE e.reply = o.reply AND e.new_state = o.new_state),
          3, 'generate_with_state_each: each reply and new state equal generate_with_state''s');
SELECT is((SELECT count(*)::int FROM states s
           JOIN kimi_linear.chat_with_state_each(ARRAY(SELECT k FROM states ORDER BY k), ARRAY(SELECT state FROM states ORDER BY k),
                                                 ARRAY(SELECT '[{"role": "user", "content": "Go on."}]'::jsonb FROM states), max_tokens => 8) e
             ON e.key = s.k
           CROSS JOIN LATERAL kimi_linear.chat_with_state(s.state, '[{"role": "user", "content": "Go on."}]', max_tokens => 8) o
           WHERE e.reply = o.reply AND e.new_state = o.new_state),
          3, 'chat_with_state_each: each reply and new state equal chat_with_state''s');

SELECT is((SELECT array_agg(key ORDER BY key) FROM kimi_linear.generate_each(ARRAY[10::bigint, 20, NULL], ARRAY['a', 'b', 'c'], max_tokens => 1)),
          ARRAY[10::bigint, 20, NULL], 'bigint keys, a NULL key included, come back as given');
SELECT is((SELECT count(*)::int FROM kimi_linear.summarize_each(ARRAY[]::int[], ARRAY[]::text[])), 0, 'no inputs, no rows');

-- ------------------------------------------------------------------ errors on their rows
SELECT results_eq(
  $$SELECT key, reply IS NULL, tokens IS NULL, error FROM kimi_linear.generate_each(ARRAY[1, 2, 3, 4],
      ARRAY['fine', NULL, '', repeat('word ', 140000)], max_tokens => 2) ORDER BY key$$,
  $$VALUES (1, false, false, NULL::text), (2, true, true, 'prompt must not be NULL'), (3, true, true, 'prompt must not be empty'),
           (4, true, true, 'the input does not fit in the context: 0 positions of history + 140002 new tokens > kimi_linear.max_context (131072)')$$,
  'a NULL, an empty and a too long prompt: each an error on its row, the others run');
SELECT is((SELECT error FROM kimi_linear.chat_each(ARRAY[1], ARRAY['[{"role": "robot", "content": "x"}]'::jsonb])),
          'message 1 has role "robot"', 'chat_each: bad messages, an error on the row');
SELECT results_eq(
  $$SELECT key, new_state IS NULL, error LIKE 'invalid kimi_linear state: %' FROM kimi_linear.generate_with_state_each(ARRAY[1, 2],
      ARRAY['\x00010203'::bytea, (SELECT state FROM states WHERE k = 1)], ARRAY['x', 'y'], max_tokens => 2) ORDER BY key$$,
  $$VALUES (1, true, true), (2, false, NULL)$$,
  'a corrupt state: an error on its row (found in the backend)');
SELECT matches((SELECT error FROM kimi_linear.generate_with_state_each(ARRAY[1], ARRAY[(SELECT data FROM kl_files WHERE name = 'tiny_state')],
                                                                       ARRAY['x'], max_tokens => 2)),
               'fingerprint|another model|different model|model', 'another model''s state: the worker''s error on its row');
SELECT throws_ok($$SELECT * FROM kimi_linear.generate_each(ARRAY[1, 2], ARRAY['fine', ''], max_tokens => 2, on_error => 'abort')$$,
                 '22023', 'prompt must not be empty', 'on_error => ''abort'': the first input error ends the statement');
SELECT throws_like($$SELECT * FROM kimi_linear.generate_with_state_each(ARRAY[1], ARRAY[(SELECT data FROM kl_files WHERE name = 'tiny_state')],
                                                                         ARRAY['x'], max_tokens => 2, on_error => 'abort')$$,
                   '%model%', 'on_error => ''abort'': the worker''s error ends the statement');
SELECT throws_ok($$SELECT * FROM kimi_linear.generate_each(ARRAY[1, 2], ARRAY['only one'])$$, '2202E',
                 'keys has 2 elements and prompts has 1', 'keys and inputs of different lengths');
SELECT throws_ok($$SELECT * FROM kimi_linear.summarize_each(ARRAY[1], ARRAY['x'], on_error => 'skip')$$, '22023',
                 'on_error must be ''row'' or ''abort'', got ''skip''', 'an unknown on_error');
SELECT throws_ok($$SELECT * FROM kimi_linear.summarize_each(ARRAY[1], ARRAY['x'], concurrency => 0)$$, '22023',
                 'concurrency must be at least 1, got 0', 'concurrency below 1');
SELECT throws_ok($$SELECT * FROM kimi_linear.generate_each(ARRAY[1], ARRAY['x'], model => 'no_such_model')$$, '42704',
                 'model "no_such_model" is not loaded', 'an unknown model ends the statement (it is the call''s, not an input''s)');
SELECT is((SELECT count(*)::int FROM kimi_linear.activity), 0, 'nothing left in flight');

-- ------------------------------------------------------------------ streaming, progress, limits
-- a cursor over the select-list form gets rows as inputs finish: the short prompt first
DECLARE c1 CURSOR FOR
  SELECT (r).key, (r).error FROM (SELECT kimi_linear.generate_each(ARRAY['long', 'short'],
         ARRAY[repeat('The autovacuum daemon runs VACUUM. ', 600), 'Short'], max_tokens => 2) AS r) s;
SELECT is(pg_temp.fetch_key('c1'), 'short', 'rows come as inputs finish: the short prompt''s row first');
CLOSE c1;

DECLARE c2 CURSOR FOR
  SELECT (r).key FROM (SELECT kimi_linear.generate_each(ARRAY(SELECT g FROM generate_series(1, 12) g),
         ARRAY(SELECT 'Prompt ' || g FROM generate_series(1, 12) g), max_tokens => 200, ignore_eos => true, concurrency => 3) AS r) s;
MOVE FORWARD 1 IN c2;
SELECT is((SELECT count(*)::int FROM kimi_linear.activity WHERE backend_pid = pg_backend_pid()), 3,
          'concurrency => 3: three requests in flight');
SELECT results_eq($$SELECT count(DISTINCT batch_id)::int, min(batch_total)::int, min(batch_done) >= 1 FROM kimi_linear.activity
                    WHERE backend_pid = pg_backend_pid()$$,
                  $$VALUES (1, 12, true)$$, 'activity shows the batch: one batch_id, batch_total 12, batch_done counts the inputs done');
CLOSE c2;
SELECT ok(pg_temp.idle_after_ms(500), 'closing the cursor cancels every request of the batch and frees its slots');

SET LOCAL kimi_linear.max_requests_per_call = 2;
DECLARE c3 CURSOR FOR
  SELECT (r).key FROM (SELECT kimi_linear.generate_each(ARRAY(SELECT g FROM generate_series(1, 6) g),
         ARRAY(SELECT 'Prompt ' || g FROM generate_series(1, 6) g), max_tokens => 200, ignore_eos => true, concurrency => 8) AS r) s;
MOVE FORWARD 1 IN c3;
SELECT is((SELECT count(*)::int FROM kimi_linear.activity WHERE backend_pid = pg_backend_pid()), 2,
          'kimi_linear.max_requests_per_call caps the concurrency argument');
CLOSE c3;
RESET kimi_linear.max_requests_per_call;
SELECT ok(pg_temp.idle_after_ms(500), 'and that batch''s slots are free again');

-- LIMIT stops early and cancels the rest
SELECT is((SELECT count(*)::int FROM (SELECT kimi_linear.generate_each(ARRAY(SELECT g FROM generate_series(1, 8) g),
           ARRAY(SELECT 'Prompt ' || g FROM generate_series(1, 8) g), max_tokens => 2) LIMIT 1) s), 1, 'LIMIT 1 gets one row');
SELECT ok(pg_temp.idle_after_ms(500), 'and the rest of the batch is cancelled');

-- statement_timeout cancels the whole batch at once
SET LOCAL statement_timeout = '300ms';
SELECT cmp_ok(pg_temp.elapsed_ms($$SELECT * FROM kimi_linear.generate_each(ARRAY(SELECT g FROM generate_series(1, 20) g),
                ARRAY(SELECT 'Prompt ' || g FROM generate_series(1, 20) g), max_tokens => 2000, ignore_eos => true)$$),
              '<', 1000::float8, 'statement_timeout cancels a batch promptly');
RESET statement_timeout;
SELECT ok(pg_temp.idle_after_ms(500), 'every request of the cancelled batch is dropped and its slot freed');

-- a batch larger than the request table: it waits for its own slots, never fails
SELECT is((SELECT count(*)::int FROM kimi_linear.generate_each(ARRAY(SELECT g FROM generate_series(1, 40) g),
           ARRAY(SELECT 'Prompt ' || g FROM generate_series(1, 40) g), max_tokens => 2, concurrency => 1000) WHERE error IS NULL),
          40, 'a batch of 40 with a concurrency above max_requests completes without error');

SELECT is((SELECT count(*)::int FROM kimi_linear.activity), 0, 'nothing left in flight at the end');

SELECT * FROM finish();
ROLLBACK;
