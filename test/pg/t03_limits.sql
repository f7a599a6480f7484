-- Limits and cancellation: statement_timeout stops a request at once and
-- frees its slot; inputs beyond the limits are errors; the worker survives
-- all of it.
BEGIN;
SELECT plan(18);
SELECT pid AS worker_pid FROM kimi_linear.workers WHERE worker = 0 \gset
SELECT kimi_linear._resolve_model(NULL);

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

CREATE FUNCTION pg_temp.idle_after_ms(limit_ms int) RETURNS bool LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..limit_ms / 5 LOOP
    IF NOT EXISTS (SELECT FROM kimi_linear.activity WHERE backend_pid = pg_backend_pid()) THEN RETURN true; END IF;
    PERFORM pg_sleep(0.005);
  END LOOP;
  RETURN false;
END $$;

SET LOCAL statement_timeout = '200ms';
SELECT cmp_ok(pg_temp.elapsed_ms($$SELECT kimi_linear.generate('The', max_tokens => 4000, ignore_eos => true)$$), '<', 500::float8,
              'statement_timeout cancels a long generation promptly');
RESET statement_timeout;
SELECT ok(pg_temp.idle_after_ms(100), 'the cancelled request''s slot is free within 100 ms (the worker drops it before its next step)');

SET LOCAL statement_timeout = '300ms';
SELECT cmp_ok(pg_temp.elapsed_ms($$SELECT kimi_linear.generate(repeat('vacuum analyze ', 4000), max_tokens => 1)$$), '<', 1500::float8,
              'statement_timeout cancels a long prefill between chunks');
RESET statement_timeout;
SELECT ok(pg_temp.idle_after_ms(1000), 'and its slot is freed');

SET LOCAL kimi_linear.max_context = 100;
SELECT throws_like($$SELECT kimi_linear.generate(repeat('word ', 200))$$, 'the input does not fit in the context%', 'prompt over max_context');
SELECT is(array_length(kimi_linear.generate_tokens('The', max_tokens => 500, ignore_eos => true), 1),
          101 - (1 + array_length(kimi_linear.tokenize('The'), 1)),
          'generation stops at max_context (the last token is the pending one)');
SELECT kimi_linear.new_conversation() AS cid \gset
SELECT lives_ok(format($$SELECT kimi_linear.say(%s, 'hello', max_tokens => 60, ignore_eos => true)$$, :cid), 'a turn within the context');
SELECT throws_like(format($$SELECT kimi_linear.say(%s, %L)$$, :cid, repeat('more words ', 20)), 'the input does not fit in the context%',
                   'a conversation that would outgrow max_context');
RESET kimi_linear.max_context;

SET LOCAL kimi_linear.max_new_tokens = 8;
SELECT throws_like($$SELECT kimi_linear.generate('x', max_tokens => 9)$$, 'max_tokens must be between 0 and 8%', 'max_tokens over max_new_tokens');
RESET kimi_linear.max_new_tokens;

SELECT throws_ok($$SELECT kimi_linear.generate_ids(array_fill(1, ARRAY[200000]))$$, '54000', NULL, 'a huge id array');

-- settings are checked as given (double precision) and reported as given, before the
-- sampler's single precision: a value that only looks valid after rounding is refused
SELECT throws_ok($$SELECT kimi_linear.generate('x', top_p => 1e-300)$$, '22023',
                 'top_p must be in (0, 1] (1 = no limit), got 1e-300', 'top_p 1e-300 (0 in single precision)');
SELECT throws_ok($$SELECT kimi_linear.generate('x', temperature => 100.0001)$$, '22023',
                 'temperature must be between 0 and 100 (0 = greedy), got 100.0001', 'temperature 100.0001 (100 in single precision)');
SELECT throws_ok($$SELECT kimi_linear.generate('x', min_p => 0.9999999999)$$, '22023',
                 'min_p must be in [0, 1) (0 = no limit), got 0.9999999999', 'min_p just below 1 (1 in single precision)');
SELECT throws_ok($$SELECT kimi_linear.generate('x', repetition_penalty => 1e-60)$$, '22023',
                 'repetition_penalty must be in (0, 100] (1 = none), got 1e-60', 'repetition_penalty 1e-60');
SELECT throws_ok($$SELECT kimi_linear.say(1, 'x', top_p => 1.0000001)$$, '22023',
                 'top_p must be in (0, 1] (1 = no limit), got 1.0000001', 'say checks them the same way');
SELECT lives_ok($$SELECT kimi_linear.generate('x', max_tokens => 1, top_p => 1e-30, temperature => 99.99999)$$,
                'small and large values that single precision holds are accepted');

SELECT is((SELECT count(*)::int FROM kimi_linear.activity), 0, 'nothing left in flight');
SELECT is((SELECT pid FROM kimi_linear.workers WHERE worker = 0), :worker_pid, 'the worker never restarted');

SELECT * FROM finish();
ROLLBACK;
