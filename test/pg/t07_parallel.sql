-- Parallel query: the generation functions are PARALLEL SAFE (they run in
-- parallel workers: their own tokenizer, DSM segments, request slots and
-- latches), give the same results as a serial plan, and the functions that
-- write or need subtransactions are PARALLEL UNSAFE (a query using them is
-- never run in parallel mode).  PostgreSQL 15: force_parallel_mode.
BEGIN;
SELECT plan(16);
SELECT kimi_linear._resolve_model(NULL);

-- the labels, per function (see the comments in sql/kimi_linear--0.1.0.sql)
SELECT results_eq(
  $$SELECT p.proname::text COLLATE "default", string_agg(DISTINCT p.proparallel::text, '') FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'kimi_linear' AND p.proname NOT LIKE '\_%' GROUP BY p.proname ORDER BY 1$$,
  $$VALUES ('add_tool_result', 'u'), ('add_tool_results', 'u'), ('chat', 's'), ('chat_each', 'u'), ('chat_json', 's'),
           ('chat_with_state', 's'), ('chat_with_state_each', 'u'), ('conversation_messages', 'u'), ('detokenize', 's'),
           ('extract', 's'), ('extract_each', 'u'),
           ('fork_conversation', 'u'), ('generate', 's'), ('generate_each', 'u'), ('generate_ids', 's'), ('generate_stream', 's'),
           ('generate_tokens', 's'), ('generate_with_state', 's'), ('generate_with_state_each', 'u'), ('load_model', 'u'),
           ('new_conversation', 'u'), ('run_query', 'u'), ('say', 'u'), ('say_json', 'u'), ('summarize', 's'), ('summarize_agg', 's'),
           ('summarize_each', 'u'), ('tokenize', 's'), ('unload_model', 'u')$$,
  'parallel safety labels: generation and tokens safe; writers, model loading and the set-based forms unsafe');

-- a table of one row per page, so that a parallel scan hands rows to several workers
CREATE TABLE kl_par (id int, prompt text, pad text) WITH (fillfactor = 10);
INSERT INTO kl_par SELECT g, 'Topic number ' || g || ' of the manual', repeat('x', 900) FROM generate_series(1, 16) g;
ANALYZE kl_par;

CREATE FUNCTION pg_temp.plan_of(q text, do_analyze bool DEFAULT false) RETURNS text LANGUAGE plpgsql AS $$
DECLARE line text; out text := '';
BEGIN
  FOR line IN EXECUTE format('EXPLAIN (VERBOSE, COSTS OFF%s) %s', CASE WHEN do_analyze THEN ', ANALYZE, TIMING OFF, SUMMARY OFF' ELSE '' END, q) LOOP
    out := out || line || E'\n';
  END LOOP;
  RETURN out;
END $$;

-- serial results first
CREATE TEMP TABLE serial AS
SELECT id, kimi_linear.generate(prompt, max_tokens => 8) AS g,
       kimi_linear.generate_tokens(prompt, max_tokens => 8) AS t,
       kimi_linear.summarize(prompt, max_tokens => 8) AS s,
       kimi_linear.chat(jsonb_build_array(jsonb_build_object('role', 'user', 'content', prompt)), max_tokens => 8) AS c,
       (kimi_linear.generate_with_state(NULL, prompt, max_tokens => 8)).new_state AS st,
       (kimi_linear.chat_with_state(NULL, jsonb_build_array(jsonb_build_object('role', 'user', 'content', prompt)), max_tokens => 8)).reply AS cs,
       kimi_linear.tokenize(prompt) AS tok
FROM kl_par;
SELECT kimi_linear.summarize_agg(prompt, 8 ORDER BY id) AS serial_agg FROM kl_par \gset

SET LOCAL force_parallel_mode = on;
SET LOCAL parallel_setup_cost = 0;
SET LOCAL parallel_tuple_cost = 0;
SET LOCAL min_parallel_table_scan_size = 0;
SET LOCAL max_parallel_workers_per_gather = 2;
SET LOCAL parallel_leader_participation = off;
SET LOCAL cpu_operator_cost = 100;	-- make the functions' cost count, as their real cost would

SELECT matches(pg_temp.plan_of($$SELECT id, kimi_linear.generate(prompt, max_tokens => 8) FROM kl_par$$),
               'Gather.*Parallel Seq Scan on public\.kl_par\s+Output: id, kimi_linear\.generate\(',
               'the plan runs generate in the parallel workers (under Gather, in the Parallel Seq Scan''s output)');
SELECT pg_temp.plan_of($$SELECT id, kimi_linear.generate(prompt, max_tokens => 8) FROM kl_par$$, true) AS analyzed \gset
SELECT matches(:'analyzed'::text, 'Workers Launched: [12]', 'workers were launched');
SELECT is((SELECT sum(m[1]::int)::int FROM regexp_matches(:'analyzed'::text, 'Worker \d+:  actual rows=(\d+)', 'g') m), 16,
          'the workers computed all 16 rows (the leader does not participate)');

SELECT results_eq($$SELECT id, kimi_linear.generate(prompt, max_tokens => 8) FROM kl_par ORDER BY id$$,
                  $$SELECT id, g FROM serial ORDER BY id$$, 'generate in parallel workers = serial');
SELECT results_eq($$SELECT id, kimi_linear.generate_tokens(prompt, max_tokens => 8), kimi_linear.tokenize(prompt) FROM kl_par ORDER BY id$$,
                  $$SELECT id, t, tok FROM serial ORDER BY id$$, 'generate_tokens and tokenize in parallel workers = serial');
SELECT results_eq($$SELECT id, kimi_linear.summarize(prompt, max_tokens => 8) FROM kl_par ORDER BY id$$,
                  $$SELECT id, s FROM serial ORDER BY id$$, 'summarize in parallel workers = serial');
SELECT results_eq($$SELECT id, kimi_linear.chat(jsonb_build_array(jsonb_build_object('role', 'user', 'content', prompt)), max_tokens => 8)
                    FROM kl_par ORDER BY id$$,
                  $$SELECT id, c FROM serial ORDER BY id$$, 'chat in parallel workers = serial');
SELECT results_eq($$SELECT id, (kimi_linear.generate_with_state(NULL, prompt, max_tokens => 8)).new_state,
                    (kimi_linear.chat_with_state(NULL, jsonb_build_array(jsonb_build_object('role', 'user', 'content', prompt)), max_tokens => 8)).reply
                    FROM kl_par ORDER BY id$$,
                  $$SELECT id, st, cs FROM serial ORDER BY id$$, 'generate_with_state and chat_with_state in parallel workers = serial');
SELECT is((SELECT kimi_linear.summarize_agg(prompt, 8 ORDER BY id) FROM kl_par), :'serial_agg', 'summarize_agg under force_parallel_mode = serial');
SELECT matches(pg_temp.plan_of($$SELECT kimi_linear.generate('The VACUUM command', max_tokens => 8)$$),
               'Single Copy: true', 'force_parallel_mode: even a bare generate() runs in a parallel worker');
SELECT ok(kimi_linear.generate('The VACUUM command', max_tokens => 8) IS NOT NULL, 'a bare generate() in a parallel worker answers');

-- the unsafe ones keep the query out of parallel mode, and work under force_parallel_mode
SELECT doesnt_match(pg_temp.plan_of($$SELECT * FROM kimi_linear.summarize_each(ARRAY(SELECT id FROM kl_par), ARRAY(SELECT prompt FROM kl_par))$$),
                    'Gather', 'a query with summarize_each gets no Gather');
SELECT is((SELECT count(*)::int FROM kimi_linear.generate_each(ARRAY(SELECT id FROM kl_par), ARRAY(SELECT prompt FROM kl_par), max_tokens => 8) e
           JOIN serial s ON s.id = e.key WHERE e.reply = s.g), 16,
          'generate_each under force_parallel_mode: runs (no subtransaction in parallel mode), same replies');
SELECT kimi_linear.new_conversation() AS cid \gset
SELECT ok(length(kimi_linear.say(:cid, 'Hello', max_tokens => 4)) >= 0, 'say under force_parallel_mode writes normally (not in parallel mode)');
RESET force_parallel_mode;

SELECT is((SELECT count(*)::int FROM kimi_linear.activity), 0, 'nothing left in flight');

SELECT * FROM finish();
ROLLBACK;
