-- Bad input: every case is an ERROR that says what is wrong (and what to do),
-- and the server goes on serving.
\pset null '(null)'
\set VERBOSITY default

-- NULLs and empty inputs
SELECT kimi_linear.generate(NULL);
SELECT kimi_linear.generate('');
SELECT kimi_linear.generate_ids(NULL);
SELECT kimi_linear.generate_ids('{}');
SELECT kimi_linear.generate_ids(ARRAY[1, NULL]);
SELECT kimi_linear.chat(NULL);
SELECT kimi_linear.chat('[]');
SELECT kimi_linear.chat('{"role": "user", "content": "hi"}');
SELECT kimi_linear.chat('[{"role": "user"}]');
SELECT kimi_linear.chat('[{"role": "wizard", "content": "hi"}]');
SELECT kimi_linear.summarize(NULL);
SELECT kimi_linear.summarize('');
SELECT kimi_linear.tokenize(NULL);
SELECT kimi_linear.detokenize(NULL);
SELECT kimi_linear.detokenize(ARRAY[-1]);
SELECT kimi_linear.detokenize(ARRAY[999999]);
SELECT kimi_linear.detokenize(ARRAY[[1, 2], [3, 4]]);
-- NULL settings mean the defaults
SELECT kimi_linear.generate('x', max_tokens => NULL, temperature => NULL, top_p => NULL, top_k => NULL, seed => NULL,
                            stop => NULL, model => NULL, repetition_penalty => NULL, min_p => NULL, ignore_eos => NULL) IS NOT NULL AS defaults;

-- settings out of range
SELECT kimi_linear.generate('x', max_tokens => -1);
SELECT kimi_linear.generate('x', max_tokens => 1000000000);
SELECT kimi_linear.generate('x', temperature => -0.5);
SELECT kimi_linear.generate('x', temperature => 1e10);
SELECT kimi_linear.generate('x', temperature => 'NaN');
SELECT kimi_linear.generate('x', temperature => 'Infinity');
SELECT kimi_linear.generate('x', top_p => 0);
SELECT kimi_linear.generate('x', top_p => 1.5);
SELECT kimi_linear.generate('x', top_k => -3);
SELECT kimi_linear.generate('x', min_p => 1);
SELECT kimi_linear.generate('x', repetition_penalty => 0);
SELECT kimi_linear.generate('x', stop => ARRAY[NULL]::text[]);
SELECT kimi_linear.generate('x', stop => ARRAY['']);
SELECT kimi_linear.generate('x', stop => ARRAY[repeat('z', 300)]);
SELECT kimi_linear.generate('x', stop => (SELECT array_agg(i::text) FROM generate_series(1, 20) i));
SELECT kimi_linear.generate_ids(ARRAY[1, 2], stop => ARRAY['x']);
SELECT kimi_linear.generate_ids(ARRAY[1, 5000]);

-- models
SELECT kimi_linear.generate('x', model => 'no_such_model');
SELECT kimi_linear.tokenize('x', 'no_such_model');
SELECT kimi_linear.unload_model('no_such_model');
SELECT kimi_linear.load_model(NULL, 'x');
SELECT kimi_linear.load_model('x', NULL);
SELECT kimi_linear.load_model('bad name!', 'x');
SELECT kimi_linear.load_model('x', '');
SELECT kimi_linear.load_model('x', 'x', quantize => 'int3');
-- precision: auto, fp32 or bf16, as the argument or the setting; bf16 needs a GPU
SELECT kimi_linear.load_model('x', 'x', matmul_precision => 'fp16');
SET kimi_linear.precision = 'fp16';
SET kimi_linear.precision = 'BF16';
SHOW kimi_linear.precision;
RESET kimi_linear.precision;
SELECT kimi_linear.load_model('x', 'x', matmul_precision => 'bf16');
SET kimi_linear.precision = 'bf16';
SELECT kimi_linear.load_model('x', 'x');
RESET kimi_linear.precision;

-- limits: the prompt must fit in the context
SET kimi_linear.max_context = 32;
SELECT kimi_linear.generate(repeat('vacuum ', 100));
RESET kimi_linear.max_context;
SET kimi_linear.max_new_tokens = 10;
SELECT kimi_linear.generate('x', max_tokens => 11);
RESET kimi_linear.max_new_tokens;
-- ordinary users cannot change the limits
CREATE ROLE kl_regress_user;
SET ROLE kl_regress_user;
SET kimi_linear.max_context = 100000000;
SET kimi_linear.model_dir = '/';
RESET ROLE;
DROP ROLE kl_regress_user;

-- the server and the worker are still up, and nothing is left in flight
SELECT kimi_linear.generate('x', max_tokens => 1) IS NOT NULL AS alive;
SELECT count(*) AS in_flight FROM kimi_linear.activity;
