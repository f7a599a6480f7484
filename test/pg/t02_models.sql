-- Models: loading from kimi_linear.model_dir only, who may load, the models
-- view, a model without tokenizer, states of another model, devices, the MoE
-- routing rule.
BEGIN;
SELECT plan(64);

SELECT pid AS worker_pid FROM kimi_linear.workers WHERE worker = 0 \gset
SELECT kimi_linear._resolve_model(NULL);  -- the bundled model, loaded on first use

SELECT lives_ok($$SELECT kimi_linear.load_model('tiny', 'tiny_a')$$, 'load the golden tiny model');
SELECT results_eq($$SELECT name, status, device, parameters > 0 FROM kimi_linear.models ORDER BY name$$,
                  $$VALUES ('pgdocs-kimi-18m'::text, 'ready'::text, 'cpu'::text, true), ('tiny', 'ready', 'cpu', true)$$,
                  'the models view lists both');
SELECT lives_ok($$SELECT kimi_linear.load_model('tiny', 'tiny_a')$$, 'loading the same model again is a no-op');
SELECT throws_like($$SELECT kimi_linear.load_model('tiny', 'pgdocs-kimi-18m')$$, '%already loaded from another directory%',
                   'a name is not silently reused');

-- MoE routing: 'select' by default, 'reference' on request; the same ids as ./kl under each rule
-- (a state made under one rule and refused under the other: test_golden.c; these models take no text)
SELECT lives_ok($$SELECT kimi_linear.load_model('tiny_ref', 'tiny_a', moe_routing => 'reference')$$,
                'load a MoE model under the reference routing rule');
SELECT results_eq($$SELECT name, moe_routing FROM kimi_linear.models ORDER BY name$$,
                  $$VALUES ('pgdocs-kimi-18m'::text, NULL::text), ('tiny', 'select'), ('tiny_ref', 'reference')$$,
                  'the models view shows the rule in force (none for a dense model)');
SELECT throws_like($$SELECT kimi_linear.load_model('tiny', 'tiny_a', moe_routing => 'reference')$$,
                   '%already loaded with other options%', 'a loaded name does not silently change its rule');
SELECT throws_like($$SELECT kimi_linear.load_model('z', 'tiny_a', moe_routing => 'bias')$$,
                   'moe_routing must be ''select'' or ''reference'', got ''bias''', 'an unknown rule is refused');
SELECT is(kimi_linear.generate_ids(ARRAY[1, 2, 3, 4], max_tokens => 12, model => 'tiny', ignore_eos => true),
          (SELECT ids FROM kl_routing WHERE rule = 'select'), 'default rule: the ids ./kl generate gives');
SELECT is(kimi_linear.generate_ids(ARRAY[1, 2, 3, 4], max_tokens => 12, model => 'tiny_ref', ignore_eos => true),
          (SELECT ids FROM kl_routing WHERE rule = 'reference'), 'reference rule: the ids ./kl generate --moe-routing reference gives');
SELECT lives_ok($$SELECT kimi_linear.unload_model('tiny_ref')$$, 'unload it');

-- precision: load_model's argument, or kimi_linear.precision when a model is loaded (default auto: fp32 on the CPU,
-- which has no bf16 arithmetic); kept with the model; the view shows the precision in force
SELECT is((SELECT matmul_precision FROM kimi_linear.models WHERE name = 'tiny'), 'fp32',
          'precision auto (the default) runs in fp32 on the CPU, and the models view says so');
SET LOCAL kimi_linear.precision = 'fp32';
SELECT lives_ok($$SELECT kimi_linear.load_model('tiny_fp32', 'tiny_a')$$, 'load a model with kimi_linear.precision = fp32');
RESET kimi_linear.precision;
SELECT throws_like($$SELECT kimi_linear.load_model('tiny_fp32', 'tiny_a')$$, '%already loaded with other options%',
                   'the precision is one of the load options: auto and fp32 are not the same request');
SELECT lives_ok($$SELECT kimi_linear.load_model('tiny_fp32', 'tiny_a', matmul_precision => 'fp32')$$,
                '... and the argument gives the same options as the setting');
SELECT results_eq($$SELECT name, matmul_precision FROM kimi_linear.models WHERE name LIKE 'tiny%' ORDER BY name$$,
                  $$VALUES ('tiny'::text, 'fp32'::text), ('tiny_fp32', 'fp32')$$,
                  'the models view shows each model''s precision');
SELECT is(kimi_linear.generate_ids(ARRAY[1, 2, 3, 4], max_tokens => 12, model => 'tiny_fp32', ignore_eos => true),
          (SELECT ids FROM kl_routing WHERE rule = 'select'), 'the same ids as ./kl generate');
SELECT lives_ok($$SELECT kimi_linear.unload_model('tiny_fp32')$$, 'unload it');
SELECT throws_like($$SELECT kimi_linear.load_model('tiny_bf16', 'tiny_a', matmul_precision => 'bf16')$$,
                   'precision bf16 runs only on a GPU, and kimi_linear.device is cpu', 'bf16 on the CPU is refused');
SET LOCAL kimi_linear.precision = 'bf16';
SELECT throws_like($$SELECT kimi_linear.load_model('tiny_bf16', 'tiny_a')$$,
                   'precision bf16 runs only on a GPU%', '... through the setting too');
RESET kimi_linear.precision;
SELECT throws_like($$SELECT kimi_linear.load_model('tiny_bf16', 'tiny_a', matmul_precision => 'half')$$,
                   'matmul_precision must be ''auto'', ''fp32'', ''bf16'' or ''fp8'', got ''half''', 'an unknown precision is refused');
SELECT throws_like($$SET kimi_linear.precision = 'half'$$, '%invalid value for parameter "kimi_linear.precision"%',
                   'the setting refuses an unknown value');
SELECT ok(NOT EXISTS (SELECT FROM kimi_linear.models WHERE name = 'tiny_bf16'), 'refused loads leave nothing behind');

-- a model without tokenizer: token ids only
SELECT is(array_length(kimi_linear.generate_ids(ARRAY[1, 2, 3, 4], max_tokens => 6, model => 'tiny', ignore_eos => true), 1), 6,
          'generate_ids works on a model without tokenizer');
SELECT throws_like($$SELECT kimi_linear.generate('hello', model => 'tiny')$$, '%has no tokenizer%',
                   'text needs a tokenizer');
SELECT throws_like($$SELECT kimi_linear.new_conversation('tiny')$$, 'model "tiny" cannot hold a conversation: it has no tokenizer',
                   'a conversation cannot start on a model without tokenizer');

-- with two models loaded, a call must say which (or the default setting does)
SELECT throws_like($$SELECT kimi_linear.generate('hello')$$, '%several models are loaded%', 'ambiguous default model');
SET LOCAL kimi_linear.default_model = 'pgdocs-kimi-18m';
SELECT lives_ok($$SELECT kimi_linear.generate('hello', max_tokens => 2)$$, 'kimi_linear.default_model picks one');
RESET kimi_linear.default_model;

-- a state made by another model
SELECT throws_like($$SELECT kimi_linear.generate_with_state((SELECT data FROM kl_files WHERE name = 'tiny_state'), 'x', model => 'pgdocs-kimi-18m')$$,
                   '%different model (fingerprint mismatch)%', 'a state of another model is refused');

-- paths: only under model_dir, symbolic links resolved first; a path outside
-- gets exactly the error of a missing one (whether it exists is not told)
CREATE FUNCTION pg_temp.load_error(path text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  hint text;
BEGIN
  PERFORM kimi_linear.load_model('x', path);
  RETURN 'loaded';
EXCEPTION WHEN others THEN
  GET STACKED DIAGNOSTICS hint = PG_EXCEPTION_HINT;
  RETURN SQLSTATE || ': ' || replace(SQLERRM, path, '<path>') || ' HINT: ' || coalesce(hint, '');
END $$;
SELECT throws_like($$SELECT kimi_linear.load_model('x', 'no_such_dir')$$, '%does not exist%', 'missing directory');
SELECT is(pg_temp.load_error('../outside/tiny_copy'), pg_temp.load_error('../outside/no_such_dir'),
          '../ to an existing directory outside: the error of a missing one');
SELECT is(pg_temp.load_error((SELECT path FROM kl_files WHERE name = 'outside')),
          pg_temp.load_error((SELECT path FROM kl_files WHERE name = 'outside') || '_not_there'),
          'absolute path outside: the same');
SELECT is(pg_temp.load_error('escape'), pg_temp.load_error('no_such_dir'), 'symbolic link pointing outside: the same');
SELECT is(pg_temp.load_error('tiny_a/../../outside/tiny_copy'), pg_temp.load_error('tiny_a/../../outside/nothing'), 'nested ../: the same');
SELECT is(pg_temp.load_error('tiny_a/..'), pg_temp.load_error('tiny_a/no_such_dir'), 'model_dir itself: the same');
SELECT throws_like($$SELECT kimi_linear.load_model('x', 'broken')$$, 'could not load model "x": %', 'a broken checkpoint');
-- every file of a model is checked, not only the directory
SELECT throws_like($$SELECT kimi_linear.load_model('x', 'linked_config')$$,
                   '%config.json: no such file in the model directory', 'a config.json linked outside model_dir is not read');
SELECT throws_like($$SELECT kimi_linear.load_model('x', 'linked_tokenizer')$$,
                   '%tiktoken.model: no such file in the model directory', 'a tiktoken.model linked outside model_dir is not read');
SELECT doesnt_match(pg_temp.load_error('not_a_config'), 'KL-SECRET', 'an error about a file quotes nothing of it');
SELECT matches(pg_temp.load_error('not_a_config'), 'config.json: not valid JSON', '... it names the file and what is wrong');
SELECT ok(NOT EXISTS (SELECT FROM kimi_linear.models WHERE name = 'x'), 'failed loads leave nothing behind');

-- who may load: superusers and kimi_linear_admin members; functions are not even executable by others
CREATE ROLE kl_tap_user;
CREATE ROLE kl_tap_granted;
GRANT USAGE ON SCHEMA kimi_linear TO kl_tap_user, kl_tap_granted;
GRANT EXECUTE ON FUNCTION kimi_linear.load_model(text, text, text, text, text) TO kl_tap_granted;
SET LOCAL ROLE kl_tap_user;
SELECT throws_ok($$SELECT kimi_linear.load_model('y', 'tiny_a')$$, '42501', NULL, 'an ordinary user cannot load');
SELECT throws_ok($$SET kimi_linear.precision = 'fp32'$$, '42501', NULL,
                 'nor set kimi_linear.precision (superuser only, like kimi_linear.device)');
SELECT throws_ok($$SELECT kimi_linear.unload_model('tiny')$$, '42501', NULL, 'nor unload');
RESET ROLE;
SET LOCAL ROLE kl_tap_granted;
SELECT throws_like($$SELECT kimi_linear.load_model('y', 'tiny_a')$$, 'permission denied to load or unload kimi_linear models',
                   'EXECUTE alone is not enough: the function checks the role too');
RESET ROLE;
GRANT kimi_linear_admin TO kl_tap_user;
SET LOCAL ROLE kl_tap_user;
SELECT lives_ok($$SELECT kimi_linear.load_model('y', 'tiny_a')$$, 'a kimi_linear_admin member can load');
SELECT lives_ok($$SELECT kimi_linear.unload_model('y')$$, 'and unload');
RESET ROLE;

-- quantization at load: the view shows the format and the bytes held; a state
-- made under one quantization is refused by another, saying why
SELECT lives_ok($$SELECT kimi_linear.load_model('pg4', 'pgdocs-kimi-18m', quantize => 'int4')$$,
                'load the bundled model quantized to int4');
SELECT results_eq($$SELECT weight_format, weight_bytes < bytes / 2 FROM kimi_linear.models WHERE name = 'pg4'$$,
                  $$VALUES ('int4 g32 (quantized at load from bf16)'::text, true)$$,
                  'the models view shows the weight format and the bytes held');
SELECT is((SELECT weight_format FROM kimi_linear.models WHERE name = 'pgdocs-kimi-18m'), 'bf16', 'and bf16 for the bundled model');
SELECT is(length((kimi_linear.generate_with_state(NULL, 'The VACUUM command', max_tokens => 8, model => 'pg4')).reply) > 0, true,
          'the int4 model generates');
SELECT throws_like($$SELECT kimi_linear.generate_with_state(
                       (kimi_linear.generate_with_state(NULL, 'The VACUUM command', max_tokens => 2, model => 'pgdocs-kimi-18m')).new_state,
                       'x', model => 'pg4')$$,
                   '%made by this model without quantization, but it is loaded quantized at load to int4%',
                   'a state of the unquantized model is refused by the int4 one, saying why');
SELECT throws_like($$SELECT kimi_linear.load_model('pg4', 'pgdocs-kimi-18m', quantize => 'int8')$$,
                   '%already loaded with other options%', 'a name is not reloaded under another quantization');
SELECT throws_like($$SELECT kimi_linear.load_model('pgx', 'pgdocs-kimi-18m', quantize => 'int3')$$,
                   '%unknown quantization "int3"%', 'an unknown quantization is a clear error');
SELECT lives_ok($$SELECT kimi_linear.load_model('tiny8', 'tiny_a', quantize => 'fp8')$$, 'a quantized model without tokenizer');
SELECT is(array_length(kimi_linear.generate_ids(ARRAY[1, 2, 3], max_tokens => 4, model => 'tiny8', ignore_eos => true), 1), 4,
          'generates ids');
SELECT lives_ok($$SELECT kimi_linear.unload_model('pg4'); SELECT kimi_linear.unload_model('tiny8')$$, 'unload them');

-- devices: cuda without a GPU is a clear error; auto falls back to the CPU
SET LOCAL kimi_linear.device = 'auto';
SELECT lives_ok($$SELECT kimi_linear.load_model('tiny_auto', 'tiny_a')$$, 'device auto loads');
SELECT ok((SELECT device IN ('cpu', 'cuda') FROM kimi_linear.models WHERE name = 'tiny_auto'), 'and says where it runs');
SELECT lives_ok($$SELECT kimi_linear.unload_model('tiny_auto')$$, 'unload it');
SET LOCAL kimi_linear.device = 'cuda';
SELECT CASE WHEN (SELECT size IS NOT NULL FROM pg_stat_file('/dev/nvidia0', true))
            THEN skip('a GPU is present', 1)
            ELSE throws_like($$SELECT kimi_linear.load_model('tiny_cuda', 'tiny_a')$$, '%CUDA%', 'device cuda without a GPU: a clear error') END;
RESET kimi_linear.device;

-- unload: gone from the view, calls fail clearly
SELECT lives_ok($$SELECT kimi_linear.unload_model('tiny')$$, 'unload tiny');
SELECT throws_like($$SELECT kimi_linear.generate_ids(ARRAY[1], model => 'tiny')$$, '%is not loaded%', 'an unloaded model is not used');

SELECT is((SELECT pid FROM kimi_linear.workers WHERE worker = 0), :worker_pid, 'the worker never restarted');

SELECT * FROM finish();
ROLLBACK;
