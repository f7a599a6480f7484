-- generate_with_state and chat_with_state: states are complete heads, checked before use.
\pset null '(null)'

CREATE TEMP TABLE s AS
SELECT 1 AS turn, * FROM kimi_linear.generate_with_state(NULL, 'The CREATE TABLE command', max_tokens => 12, ignore_eos => true);
INSERT INTO s SELECT 2, r.* FROM s, kimi_linear.generate_with_state(s.new_state, ' Another sentence.', max_tokens => 12, ignore_eos => true) r WHERE s.turn = 1;
-- continuing from the pending token alone: an empty prompt is allowed with a state
INSERT INTO s SELECT 3, r.* FROM s, kimi_linear.generate_with_state(s.new_state, '', max_tokens => 12, ignore_eos => true) r WHERE s.turn = 2;

-- the chain equals one run over the same tokens: bos + prompt1 + reply1 + prompt2 ...
WITH t1 AS (SELECT kimi_linear.generate_tokens('The CREATE TABLE command', max_tokens => 12, ignore_eos => true) AS r1),
     full_ids AS (SELECT ARRAY[3840] || kimi_linear.tokenize('The CREATE TABLE command') || r1
                         || kimi_linear.tokenize(' Another sentence.') AS ids FROM t1)
SELECT kimi_linear.detokenize(kimi_linear.generate_ids(ids, max_tokens => 12, ignore_eos => true))
     = (SELECT reply FROM s WHERE turn = 2) AS chain_equals_whole
FROM full_ids;

-- same state in, same reply out (states are values: nothing is kept between calls)
SELECT (SELECT reply FROM s WHERE turn = 2)
     = (SELECT r.reply FROM s, kimi_linear.generate_with_state(s.new_state, ' Another sentence.', max_tokens => 12, ignore_eos => true) r WHERE s.turn = 1)
     AS replay_equal;

-- state sizes grow only by the attention rows of the new tokens
SELECT turn, length(new_state) - lag(length(new_state)) OVER (ORDER BY turn) AS growth FROM s ORDER BY turn;

-- chat_with_state: the first turn renders system + user; later turns only the new message
CREATE TEMP TABLE c AS
SELECT 1 AS turn, * FROM kimi_linear.chat_with_state(NULL,
  '[{"role": "system", "content": "You answer questions about PostgreSQL."}, {"role": "user", "content": "What is WAL?"}]',
  max_tokens => 24);
INSERT INTO c SELECT 2, r.* FROM c, kimi_linear.chat_with_state(c.new_state, '[{"role": "user", "content": "And a checkpoint?"}]', max_tokens => 24) r WHERE c.turn = 1;
-- equals rendering the whole history and generating once
SELECT kimi_linear.chat(jsonb_build_array(
         jsonb_build_object('role', 'system', 'content', 'You answer questions about PostgreSQL.'),
         jsonb_build_object('role', 'user', 'content', 'What is WAL?'),
         jsonb_build_object('role', 'assistant', 'content', (SELECT reply FROM c WHERE turn = 1)),
         jsonb_build_object('role', 'user', 'content', 'And a checkpoint?')), max_tokens => 24)
     = (SELECT reply FROM c WHERE turn = 2) AS chat_chain_equals_history;

-- bad states: each an error that says what is wrong (shown here: the SQLSTATE, and the message up to the
-- engine's own explanation, whose wording belongs to the engine)
CREATE FUNCTION pg_temp.try(sql text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE sql;
  RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || split_part(SQLERRM, ': ', 1) || CASE WHEN SQLERRM LIKE '%: %' THEN ': ...' ELSE '' END;
END $$;
SELECT pg_temp.try($$SELECT * FROM kimi_linear.generate_with_state('\x'::bytea, 'x')$$) AS empty;
SELECT pg_temp.try($$SELECT * FROM kimi_linear.generate_with_state('\x00112233'::bytea, 'x')$$) AS four_bytes;
SELECT pg_temp.try(format($$SELECT * FROM kimi_linear.generate_with_state(%L::bytea, 'x')$$,
       (SELECT substr(new_state, 1, length(new_state) - 10) FROM s WHERE turn = 1))) AS truncated;
SELECT pg_temp.try(format($$SELECT * FROM kimi_linear.generate_with_state(%L::bytea, 'x')$$,
       (SELECT set_byte(new_state, 500, get_byte(new_state, 500) # 1) FROM s WHERE turn = 1))) AS bit_flipped;
SELECT pg_temp.try(format($$SELECT * FROM kimi_linear.generate_with_state(%L::bytea, 'x')$$,
       (SELECT set_byte(new_state, 20, get_byte(new_state, 20) # 1) FROM s WHERE turn = 1))) AS fingerprint_flipped;
SELECT pg_temp.try(format($$SELECT * FROM kimi_linear.generate_with_state(%L::bytea, 'x')$$, decode(repeat('ab', 5000), 'hex'))) AS random;
SELECT pg_temp.try(format($$SELECT * FROM kimi_linear.generate_with_state(%L::bytea, 'x')$$,
       (SELECT new_state || '\x00'::bytea FROM s WHERE turn = 1))) AS trailing_byte;
SELECT * FROM kimi_linear.generate_with_state(NULL, '');
SELECT * FROM kimi_linear.chat_with_state(NULL, NULL);
SELECT * FROM kimi_linear.chat_with_state(NULL, '{"role": "user"}');
SELECT * FROM kimi_linear.chat_with_state(NULL, '[{"role": "robot", "content": "hi"}]');
-- still serving
SELECT kimi_linear.generate('x', max_tokens => 1) IS NOT NULL AS alive;
