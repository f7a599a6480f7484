-- Security of conversations between roles, and the extension's SQL against a
-- hostile search_path:
--   * a role writes pages and messages only under conversations it owns;
--     another role's conversation ids are indistinguishable from missing ones
--     (the same error, whatever the table and statement);
--   * ids are the extension's: no role chooses or changes one;
--   * functions, operators and tables another role put in public, or a
--     temporary table named like the extension's, never stand in for the
--     extension's own objects.
BEGIN;
SELECT plan(29);
SET LOCAL kimi_linear.page_size = 64;   -- small pages: a few turns complete several

CREATE ROLE kl_alice;
CREATE ROLE kl_bob;
GRANT USAGE ON SCHEMA kimi_linear TO kl_alice, kl_bob;

SET LOCAL ROLE kl_alice;
SELECT kimi_linear.new_conversation(NULL, 'Alice''s conversation.') AS cid \gset
RESET ROLE;
SELECT max(id) + 1000000 AS missing FROM kimi_linear.conversations \gset

-------------------------------------------------------------------- writes under another role's conversation
SET LOCAL ROLE kl_bob;
SELECT throws_ok(format($$INSERT INTO kimi_linear.conversation_pages (conversation_id, page_no, data) VALUES (%s, 0, '\x00')$$, :cid),
                 '42501', 'new row violates row-level security policy for table "conversation_pages"',
                 'bob cannot add a page to alice''s conversation');
SELECT throws_ok(format($$INSERT INTO kimi_linear.conversation_pages (conversation_id, page_no, data) VALUES (%s, 0, '\x00')$$, :missing),
                 '42501', 'new row violates row-level security policy for table "conversation_pages"',
                 'a missing conversation id gives the same error');
SELECT throws_ok(format($$INSERT INTO kimi_linear.messages (conversation_id, turn, role, content) VALUES (%s, 1, 'user', 'x')$$, :cid),
                 '42501', 'new row violates row-level security policy for table "messages"',
                 'bob cannot add a message to alice''s conversation');
SELECT throws_ok(format($$INSERT INTO kimi_linear.messages (conversation_id, turn, role, content) VALUES (%s, 1, 'user', 'x')$$, :missing),
                 '42501', 'new row violates row-level security policy for table "messages"',
                 'a missing conversation id gives the same error');
-- nor move his own rows there
SELECT kimi_linear.new_conversation() AS bob_cid \gset
INSERT INTO kimi_linear.conversation_pages (conversation_id, page_no, data) VALUES (:bob_cid, 100, '\x00');
INSERT INTO kimi_linear.messages (conversation_id, turn, role, content) VALUES (:bob_cid, 1, 'user', 'mine');
SELECT throws_ok(format($$UPDATE kimi_linear.conversation_pages SET conversation_id = %s, page_no = 0 WHERE conversation_id = %s$$, :cid, :bob_cid),
                 '42501', 'new row violates row-level security policy for table "conversation_pages"',
                 'bob cannot move his page under alice''s conversation');
SELECT throws_ok(format($$UPDATE kimi_linear.conversation_pages SET conversation_id = %s, page_no = 0 WHERE conversation_id = %s$$, :missing, :bob_cid),
                 '42501', 'new row violates row-level security policy for table "conversation_pages"',
                 '... the same error as for a missing id');
SELECT throws_ok(format($$UPDATE kimi_linear.messages SET conversation_id = %s WHERE conversation_id = %s$$, :cid, :bob_cid),
                 '42501', 'new row violates row-level security policy for table "messages"',
                 'bob cannot move his message under alice''s conversation');
-- ids are drawn by the extension: choosing one would tell whether it exists (or take it from its owner)
SELECT throws_ok(format($$INSERT INTO kimi_linear.conversations (id, model, page_size) VALUES (%s, 'm', 64)$$, :cid),
                 '42501', 'permission denied for table conversations', 'bob cannot insert a conversation with alice''s id');
SELECT throws_ok(format($$INSERT INTO kimi_linear.conversations (id, model, page_size) VALUES (%s, 'm', 64)$$, :missing),
                 '42501', 'permission denied for table conversations', '... nor with a free id (the same error)');
SELECT throws_ok(format($$UPDATE kimi_linear.conversations SET id = %s WHERE id = %s$$, :missing, :bob_cid),
                 '42501', 'permission denied for table conversations', 'nor change his conversation''s id');
SELECT throws_ok(format($$INSERT INTO kimi_linear.messages (id, conversation_id, turn, role, content) VALUES (%s, %s, 1, 'user', 'x')$$, :missing, :bob_cid),
                 '42501', 'permission denied for table messages', 'nor choose a message id');
-- what bob can do under alice's id is what he can do under a missing one: nothing, and the same answers
SELECT throws_ok(format($$SELECT kimi_linear.say(%s, 'hi')$$, :cid), '42704', format('conversation %s does not exist', :cid),
                 'say: alice''s conversation does not exist for bob');
SELECT throws_ok(format($$SELECT kimi_linear.fork_conversation(%s)$$, :cid), '42704', format('conversation %s does not exist', :cid),
                 'fork: the same');
SELECT is((SELECT count(*)::int FROM kimi_linear.conversations WHERE id = :cid), 0, 'bob sees nothing of it');
SELECT lives_ok(format($$DELETE FROM kimi_linear.conversations WHERE id = %s$$, :cid), 'deleting it is a no-op ...');
RESET ROLE;

-------------------------------------------------------------------- alice's conversation is intact and keeps working
SELECT is((SELECT count(*)::int FROM kimi_linear.conversations WHERE id = :cid), 1, '... it is still there');
SELECT is((SELECT count(*)::int FROM kimi_linear.conversation_pages WHERE conversation_id = :cid), 0, 'nobody wrote a page under it');
SELECT is((SELECT array_agg(owner::text) FROM kimi_linear.messages WHERE conversation_id = :cid), ARRAY['kl_alice'], 'nor a message');
SET LOCAL ROLE kl_alice;
SELECT lives_ok(format($$SELECT kimi_linear.say(%s, %L, max_tokens => 8)$$, :cid, 'Explain VACUUM. ' || repeat('Dead tuples and visibility. ', 12)),
                'alice''s turns complete pages ...');
SELECT lives_ok(format($$SELECT kimi_linear.say(%s, %L, max_tokens => 8)$$, :cid, 'And ANALYZE? ' || repeat('Statistics. ', 20)),
                '... turn after turn');
SELECT cmp_ok((SELECT count(*)::int FROM kimi_linear.conversation_pages WHERE conversation_id = :cid), '>=', 2, 'her pages are stored');
RESET ROLE;

-------------------------------------------------------------------- a hostile search_path
-- Another role's objects in public, first on the path: none of them may run inside the extension's functions.
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'public.now() was called'; END $$;
CREATE FUNCTION public.current_setting(text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'public.current_setting() was called'; END $$;
CREATE FUNCTION public.kl_evil_eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'public.= was called'; END $$;
CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.kl_evil_eq);
CREATE FUNCTION public.kl_evil_count(bigint) RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'public.count(*) was called'; END $$;
CREATE AGGREGATE public.count(*) (SFUNC = public.kl_evil_count, STYPE = bigint, INITCOND = '0');

SELECT lives_ok($$SELECT set_config('search_path', 'public, pg_catalog', true), kimi_linear.new_conversation(NULL, 'hostile path')$$,
                'new_conversation with public before pg_catalog');
SELECT lives_ok(format($$SELECT set_config('search_path', 'public, pg_catalog', true), kimi_linear.say(%s, 'hello', max_tokens => 4)$$, :cid),
                'say with public before pg_catalog');
SELECT lives_ok(format($$SELECT set_config('search_path', 'public, pg_catalog', true), kimi_linear.fork_conversation(%s)$$, :cid),
                'fork_conversation with public before pg_catalog');
RESET search_path;

-------------------------------------------------------------------- temporary tables named like the extension's
CREATE TEMP TABLE conversations (id bigint, owner name, model text, system text, page_size int, state bytea,
                                 positions bigint, turns int, created_at timestamptz, updated_at timestamptz);
CREATE TEMP TABLE messages (id bigint, conversation_id bigint, turn int, role text, content text, token_ids int[],
                            owner name, created_at timestamptz);
CREATE TEMP TABLE conversation_pages (conversation_id bigint, page_no int, owner name, data bytea);
SELECT kimi_linear.new_conversation(NULL, 'behind a temp table') AS tcid \gset
SELECT isnt(:'tcid'::text, ''::text, 'new_conversation returns an id with a temp table named conversations');
SELECT is((SELECT count(*)::int FROM kimi_linear.conversations WHERE id = nullif(:'tcid', '')::bigint), 1,
          'the conversation is in kimi_linear.conversations');
SELECT is((SELECT count(*)::int FROM pg_temp.conversations) + (SELECT count(*)::int FROM pg_temp.messages), 0,
          'nothing went into the temp tables');
SELECT lives_ok(format($$SELECT kimi_linear.fork_conversation(%s)$$, :cid), 'fork_conversation with the temp tables');
SELECT is((SELECT count(*)::int FROM pg_temp.conversations) + (SELECT count(*)::int FROM pg_temp.messages)
          + (SELECT count(*)::int FROM pg_temp.conversation_pages), 0, 'the fork went into the real tables');

SELECT * FROM finish();
ROLLBACK;
