-- Errors with their SQLSTATEs: the engine gives every error a code where it
-- raises it, and one table (src/pg/pg_errors.c; README.md, "Errors") maps the
-- codes to SQLSTATEs, for errors found in the backend and for those an
-- inference worker sends back alike.
BEGIN;
SELECT plan(10);
SET LOCAL kimi_linear.default_model = 'pgdocs-kimi-18m';
SET LOCAL kimi_linear.page_size = 128;

-- invalid input: 22023
SELECT throws_ok($$SELECT * FROM kimi_linear.generate_with_state('\x00010203'::bytea, 'x')$$, '22023', NULL,
                 'bytes that are not a state: invalid_parameter_value');
SELECT throws_ok($$SELECT * FROM kimi_linear.generate_with_state((SELECT data FROM kl_files WHERE name = 'tiny_state'), 'x')$$,
                 '22023', NULL, 'another model''s state, refused by the worker: invalid_parameter_value');
SELECT s AS good_state FROM (SELECT new_state AS s FROM kimi_linear.generate_with_state(NULL, 'The VACUUM command', max_tokens => 4)) r \gset
SELECT throws_ok(format($$SELECT * FROM kimi_linear.generate_with_state(%L::bytea, 'x')$$,
                        set_byte(:'good_state'::bytea, 300, get_byte(:'good_state'::bytea, 300) # 1)),
                 '22023', NULL, 'a damaged state given as an argument is the caller''s input: invalid_parameter_value');

-- past a limit: 54000
SELECT throws_ok($$SELECT kimi_linear.generate(repeat('word ', 140000))$$, '54000', NULL,
                 'an input longer than the context: program_limit_exceeded');

-- not supported: 0A000
SELECT throws_ok($$SELECT kimi_linear.chat('[{"role": "user", "content": "x"}]',
                                           json_schema => '{"type": "object", "patternProperties": {"^a": {}}}')$$,
                 '0A000', NULL, 'a JSON schema keyword the constraint does not support: feature_not_supported');
SELECT throws_ok($$SELECT kimi_linear.load_model('x', 'not_a_config')$$, '22023', NULL,
                 'a checkpoint whose config.json is not JSON: invalid_parameter_value');

-- corrupt data: XX001 (a conversation's stored state, written by the extension, that fails its checks)
SELECT kimi_linear.new_conversation() AS cid \gset
SELECT lives_ok(format($$SELECT kimi_linear.say(%s, %L, max_tokens => 4)$$, :cid,
                       'Explain what VACUUM does. ' || repeat('Consider dead tuples, visibility maps and the free space map. ', 8)),
                'a conversation of more than a page');
-- a damaged page: found by the worker when a fork of the conversation (not in its cache) reloads it
UPDATE kimi_linear.conversation_pages SET data = set_byte(data, 500, get_byte(data, 500) # 1)
 WHERE conversation_id = :cid AND page_no = 0;
SELECT kimi_linear.fork_conversation(:cid) AS fork \gset
SELECT throws_ok(format($$SELECT kimi_linear.say(%s, 'And ANALYZE?', max_tokens => 4)$$, :fork), 'XX001', NULL,
                 'a damaged stored page, refused by the worker: data_corrupted');
-- a damaged head: found by the backend before anything is sent
UPDATE kimi_linear.conversations SET state = set_byte(state, 300, get_byte(state, 300) # 1) WHERE id = :cid;
SELECT throws_ok(format($$SELECT kimi_linear.say(%s, 'And ANALYZE?', max_tokens => 4)$$, :cid), 'XX001', NULL,
                 'a damaged stored state: data_corrupted');

-- still serving
SELECT ok(length(kimi_linear.generate('x', max_tokens => 1)) >= 0, 'the worker goes on');

SELECT * FROM finish();
ROLLBACK;
