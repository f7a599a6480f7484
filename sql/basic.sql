-- The extension's surface: objects, settings, tokens, deterministic generation.
\pset null '(null)'

SELECT extname, extversion, nspname
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE extname = 'kimi_linear';

-- every function documented
SELECT p.proname, pg_get_function_identity_arguments(p.oid) <> '' AS has_args,
       obj_description(p.oid, 'pg_proc') IS NOT NULL AS documented
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'kimi_linear' AND p.proname NOT LIKE '\_%'
ORDER BY 1, 2;

-- settings and their defaults
SELECT name, setting, unit, context FROM pg_settings
WHERE name LIKE 'kimi_linear.%' AND name NOT IN ('kimi_linear.model_dir', 'kimi_linear.max_requests')
ORDER BY name;

-- the tokenizer runs in this backend (exact integer logic: stable everywhere)
SELECT kimi_linear.tokenize('SELECT * FROM pg_class;');
SELECT kimi_linear.detokenize(kimi_linear.tokenize('SELECT * FROM pg_class;'));
SELECT kimi_linear.detokenize(kimi_linear.tokenize('naïve café — ümlaut ✓'));
SELECT kimi_linear.tokenize('');
SELECT kimi_linear.tokenize('<|im_end|>') AS as_text, kimi_linear.tokenize('<|im_end|>', special => true) AS as_special;
-- a split character decodes to U+FFFD rather than invalid text
SELECT kimi_linear.detokenize((kimi_linear.tokenize('✓'))[1:1]) IS NOT NULL AS decodes;

-- the bundled model is loaded on first use
SELECT name, parameters, bytes, device, status FROM kimi_linear.models;

-- greedy generation is deterministic
SELECT kimi_linear.generate('The VACUUM command', max_tokens => 16)
     = kimi_linear.generate('The VACUUM command', max_tokens => 16) AS greedy_repeats;
-- sampling with a seed is deterministic; different seeds usually differ
SELECT kimi_linear.generate('Indexes', max_tokens => 16, temperature => 0.9, seed => 7)
     = kimi_linear.generate('Indexes', max_tokens => 16, temperature => 0.9, seed => 7) AS seeded_repeats;
SELECT count(DISTINCT kimi_linear.generate('Indexes', max_tokens => 16, temperature => 1.0, seed => s)) > 1 AS seeds_differ
FROM generate_series(1, 4) s;

-- max_tokens is respected; 0 generates nothing
SELECT array_length(kimi_linear.generate_tokens('A table', max_tokens => 5, ignore_eos => true), 1) AS five;
SELECT kimi_linear.generate('A table', max_tokens => 0) AS empty;

-- text and ids agree: generate_tokens decodes to generate's text (eos excluded)
WITH g AS (SELECT kimi_linear.generate_tokens('The pg_dump utility', max_tokens => 24) AS ids)
SELECT kimi_linear.detokenize(ids[1:array_length(ids, 1) - (ids[array_length(ids, 1)] = 3842)::int])
     = kimi_linear.generate('The pg_dump utility', max_tokens => 24) AS same_text
FROM g;

-- generate_ids: ids in, ids out, no bos added
SELECT kimi_linear.generate_ids(ARRAY[3840] || kimi_linear.tokenize('The pg_dump utility'), max_tokens => 24)
     = kimi_linear.generate_tokens('The pg_dump utility', max_tokens => 24) AS ids_path_equal;

-- the stream's pieces make up the whole text
SELECT string_agg(piece, '') = kimi_linear.generate('CREATE INDEX', max_tokens => 32) AS stream_equal
FROM (SELECT kimi_linear.generate_stream('CREATE INDEX', max_tokens => 32) AS piece) s;
-- a LIMIT ends the request early and frees it
SELECT count(*) FROM (SELECT kimi_linear.generate_stream('CREATE INDEX', max_tokens => 200, ignore_eos => true) LIMIT 3) s;
-- (the worker drops it before its next step)
DO $$ BEGIN
  FOR i IN 1..200 LOOP EXIT WHEN NOT EXISTS (SELECT FROM kimi_linear.activity); PERFORM pg_sleep(0.01); END LOOP;
END $$;
SELECT count(*) AS requests_left FROM kimi_linear.activity;

-- stop strings end the text before them
SELECT position(E'\n' IN kimi_linear.generate('The VACUUM command', max_tokens => 64, stop => ARRAY[E'\n'])) AS newline_at;
SELECT kimi_linear.generate('The VACUUM command', max_tokens => 64, stop => ARRAY[E'\n'])
     = split_part(kimi_linear.generate('The VACUUM command', max_tokens => 64), E'\n', 1) AS cut_at_stop;

-- chat: the template's stop token ends the reply and is not in the text
SELECT position('<|im_end|>' IN kimi_linear.chat('[{"role": "user", "content": "What is a tablespace?"}]', max_tokens => 64)) AS no_marker;

-- summarize and its aggregate
SELECT length(kimi_linear.summarize('PostgreSQL is an object-relational database system. It supports SQL.', max_tokens => 16)) > 0 AS summarized;
SELECT length(kimi_linear.summarize_agg(t ORDER BY t)) > 0 AS aggregated
FROM (VALUES ('VACUUM reclaims storage.'), ('ANALYZE collects statistics.')) v(t);
SELECT kimi_linear.summarize_agg(t) IS NULL AS empty_group FROM (SELECT 'x' WHERE false) v(t);

-- observability views answer
SELECT count(*) >= 0 AS ok FROM kimi_linear.activity;
SELECT worker, pid IS NOT NULL AS running FROM kimi_linear.workers;
