-- Generation: same ids as the ./kl CLI for the same prompt and settings
-- (fixture table kl_cli, made by test/run-tests.sh), determinism, streaming.
BEGIN;
SELECT plan(11);

SELECT is(kimi_linear.generate_tokens(prompt, max_tokens => max_tokens, temperature => temperature,
                                      seed => seed, top_k => top_k, top_p => top_p),
          ids, format('generate_tokens = ./kl generate --prompt %L (temperature %s)', prompt, temperature))
FROM kl_cli ORDER BY prompt;

-- the text is the CLI's ids decoded (without the final end token, which is markup)
SELECT is(kimi_linear.generate(prompt, max_tokens => max_tokens, temperature => temperature,
                               seed => seed, top_k => top_k, top_p => top_p),
          kimi_linear.detokenize(CASE WHEN ids[array_length(ids, 1)] = 3842
                                      THEN ids[1:array_length(ids, 1) - 1] ELSE ids END),
          format('generate = the CLI''s text for %L', prompt))
FROM kl_cli WHERE temperature = 0 ORDER BY prompt;

SELECT is(kimi_linear.generate('Write-ahead logging', max_tokens => 40, temperature => 0.7, seed => 99),
          kimi_linear.generate('Write-ahead logging', max_tokens => 40, temperature => 0.7, seed => 99),
          'a seed makes sampling reproducible');

SELECT is((SELECT string_agg(p, '') FROM (SELECT kimi_linear.generate_stream('Write-ahead logging', max_tokens => 40) p) s),
          kimi_linear.generate('Write-ahead logging', max_tokens => 40),
          'generate_stream''s pieces make up generate''s text');

-- a cursor gets the first pieces before the rest is generated
DECLARE c CURSOR FOR SELECT kimi_linear.generate_stream('The planner', max_tokens => 500, ignore_eos => true);
MOVE FORWARD 2 IN c;
SELECT is((SELECT count(*)::int FROM kimi_linear.activity WHERE backend_pid = pg_backend_pid() AND phase IN ('decode', 'finishing')), 1,
          'while the cursor is open the request is still decoding');
CLOSE c;

SELECT * FROM finish();
ROLLBACK;
