-- Conversations: say() runs only the new turn, stores the state in the
-- caller's transaction; pages of attention rows are written once.
\pset null '(null)'
SET kimi_linear.page_size = 64;   -- small pages, so that a few turns make several

SELECT kimi_linear.new_conversation(NULL, 'You answer questions about PostgreSQL.') AS cid \gset
SELECT model, system, page_size, state IS NULL AS fresh, positions, turns
FROM kimi_linear.conversations WHERE id = :cid;

CREATE TEMP TABLE replies (turn int, reply text);
INSERT INTO replies SELECT 1, kimi_linear.say(:cid, 'What is VACUUM?', max_tokens => 40);
INSERT INTO replies SELECT 2, kimi_linear.say(:cid, 'And ANALYZE?', max_tokens => 40);
SELECT turns, positions > 64 AS paged, (SELECT count(*) FROM kimi_linear.conversation_pages WHERE conversation_id = :cid) AS pages,
       (SELECT count(*) FROM kimi_linear.messages WHERE conversation_id = :cid) AS messages
FROM kimi_linear.conversations WHERE id = :cid;
-- pages cover exactly the positions before the head
SELECT bool_and(page_no = n - 1) AS contiguous
FROM (SELECT page_no, row_number() OVER (ORDER BY page_no) AS n FROM kimi_linear.conversation_pages WHERE conversation_id = :cid) p;

-- a rolled-back turn leaves everything as it was
SELECT positions AS pos_before, turns AS turns_before, md5(state) AS state_before FROM kimi_linear.conversations WHERE id = :cid \gset
SELECT count(*) AS pages_before FROM kimi_linear.conversation_pages WHERE conversation_id = :cid \gset
BEGIN;
SELECT length(kimi_linear.say(:cid, 'This turn will be rolled back, with a long message to add pages: ' || repeat('vacuum analyze ', 40), max_tokens => 20)) > 0 AS said;
ROLLBACK;
SELECT positions = :pos_before AS same_positions, turns = :turns_before AS same_turns, md5(state) = :'state_before' AS same_state,
       (SELECT count(*) FROM kimi_linear.conversation_pages WHERE conversation_id = :cid) = :pages_before AS same_pages
FROM kimi_linear.conversations WHERE id = :cid;

-- fork: two branches from one history
SELECT kimi_linear.fork_conversation(:cid) AS fid \gset
SELECT turns, positions = :pos_before AS same_history FROM kimi_linear.conversations WHERE id = :fid;
INSERT INTO replies SELECT 3, kimi_linear.say(:cid, 'Thanks. What about indexes?', max_tokens => 40);
INSERT INTO replies SELECT 4, kimi_linear.say(:fid, 'Thanks. What about indexes?', max_tokens => 40);
INSERT INTO replies SELECT 5, kimi_linear.say(:fid, 'And what is a sequence?', max_tokens => 40);
-- the same question after the same history gets the same answer in both branches
SELECT (SELECT reply FROM replies WHERE turn = 3) = (SELECT reply FROM replies WHERE turn = 4) AS branches_agree;
SELECT c.id = :cid AS original, c.turns FROM kimi_linear.conversations c WHERE c.id IN (:cid, :fid) ORDER BY c.id;

-- three turns of say = the whole history rendered with the chat template and run once
SELECT kimi_linear.chat(jsonb_build_array(
         jsonb_build_object('role', 'system', 'content', 'You answer questions about PostgreSQL.'),
         jsonb_build_object('role', 'user', 'content', 'What is VACUUM?'),
         jsonb_build_object('role', 'assistant', 'content', (SELECT reply FROM replies WHERE turn = 1)),
         jsonb_build_object('role', 'user', 'content', 'And ANALYZE?'),
         jsonb_build_object('role', 'assistant', 'content', (SELECT reply FROM replies WHERE turn = 2)),
         jsonb_build_object('role', 'user', 'content', 'Thanks. What about indexes?')), max_tokens => 40)
     = (SELECT reply FROM replies WHERE turn = 3) AS say_equals_history;

-- the messages table has the whole exchange
SELECT turn, role, content = coalesce((SELECT reply FROM replies r WHERE r.turn = m.turn AND m.role = 'assistant'), content) AS stored
FROM kimi_linear.messages m WHERE conversation_id = :cid ORDER BY id;

-- bad input
SELECT kimi_linear.say(NULL, 'hi');
SELECT kimi_linear.say(:cid, NULL);
SELECT kimi_linear.say(:cid, '');
SELECT kimi_linear.say(-1, 'hi');
SELECT kimi_linear.say(:cid, 'hi', max_tokens => -5);
SELECT kimi_linear.fork_conversation(-1);
SELECT kimi_linear.new_conversation('no_such_model');

-- row-level security: another role sees none of these conversations
CREATE ROLE kl_regress_other;
GRANT USAGE ON SCHEMA kimi_linear TO kl_regress_other;
SET ROLE kl_regress_other;
SELECT count(*) AS visible FROM kimi_linear.conversations;
SELECT kimi_linear.say(:cid, 'hi');
RESET ROLE;
DROP OWNED BY kl_regress_other;
DROP ROLE kl_regress_other;
