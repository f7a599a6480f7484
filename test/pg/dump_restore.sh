#!/usr/bin/env bash
# test/pg/dump_restore.sh — pg_dump and pg_restore of a database with
# conversations, against the cluster test/run-tests.sh started (PGHOST/PGPORT/
# PGUSER set).  TAP output.
#   1. the dump and the restore succeed, and the restored tables hold the
#      same rows
#   2. a restored conversation continues exactly: its next greedy reply is
#      the original's, and its turns are stored
#   3. new conversations and turns work in the restored database (the
#      sequences behind the ids were restored too)
set -uo pipefail
cd "$(dirname "$0")/../.."
SRC=kl_dump_src
DST=kl_dump_dst
PGBIN=${KL_PGBIN:-$(pg_config --bindir)}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
n=0
failed=0
ok() { n=$((n + 1)); if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=1; fi; }
q() { psql -XAtq -v ON_ERROR_STOP=1 "$@"; }
one_line() { printf '%s' "${1:0:${2:-60}}" | tr '\n' ' '; }

psql -Xq -c "DROP DATABASE IF EXISTS $SRC" -c "DROP DATABASE IF EXISTS $DST" -c "CREATE DATABASE $SRC" >/dev/null 2>&1
q -d $SRC -c "CREATE EXTENSION kimi_linear"

# two conversations of a few turns over small pages, and a table of the caller's pointing at them
q -d $SRC >/dev/null <<'SQL'
SET kimi_linear.page_size = 64;
CREATE TABLE my_chats (k int PRIMARY KEY, conversation bigint);
INSERT INTO my_chats SELECT k, kimi_linear.new_conversation(NULL, 'You answer questions about PostgreSQL (' || k || ').')
FROM generate_series(1, 2) k;
SELECT kimi_linear.say(conversation, 'What does VACUUM do? ' || repeat('Think of dead tuples. ', 8), max_tokens => 16)
FROM my_chats ORDER BY k;
SELECT kimi_linear.say(conversation, 'And ANALYZE?', max_tokens => 16) FROM my_chats ORDER BY k;
SQL
[ "$(q -d $SRC -c "SELECT count(*) >= 2 FROM kimi_linear.conversation_pages")" = t ]
ok $? "the source database has conversations spanning several pages"

"$PGBIN/pg_dump" -Fc -d $SRC -f "$W/kl.dump" 2>"$W/dump.err"
ok $? "pg_dump -Fc" || cat "$W/dump.err"
psql -Xq -c "CREATE DATABASE $DST" >/dev/null
"$PGBIN/pg_restore" -d $DST "$W/kl.dump" 2>"$W/restore.err"
rc=$?
ok $rc "pg_restore into a new database"
[ $rc = 0 ] || sed 's/^/# /' "$W/restore.err"

# the same rows on both sides
rows_md5() {
  q -d "$1" -c "SELECT md5(string_agg(t, '|' ORDER BY t)) FROM (
      SELECT format('c %s %s %s %s %s %s %s %s', id, owner, model, system, page_size, md5(state), positions, turns) FROM kimi_linear.conversations
      UNION ALL SELECT format('p %s %s %s %s', conversation_id, page_no, owner, md5(data)) FROM kimi_linear.conversation_pages
      UNION ALL SELECT format('m %s %s %s %s %s %s %s', id, conversation_id, turn, role, content, token_ids, owner) FROM kimi_linear.messages) r(t)"
}
a=$(rows_md5 $SRC); b=$(rows_md5 $DST)
[ -n "$a" ] && [ "$a" = "$b" ]; ok $? "the restored conversations, pages and messages are the originals ($a)"

# the next turn of a restored conversation = the original's next turn
next='Thanks. What about indexes? '"$(printf 'B-trees and hash indexes. %.0s' 1 2 3 4 5 6)"
say_next() { q -d "$1" -c "SELECT kimi_linear.say(conversation, \$m\$$next\$m\$, max_tokens => 32) FROM my_chats WHERE k = 1" 2>&1; }
r_src=$(say_next $SRC)
r_dst=$(say_next $DST)
echo "# original: $(one_line "$r_src" 100)"
echo "# restored: $(one_line "$r_dst" 100)"
[ -n "$r_src" ] && [ "$r_src" = "$r_dst" ]; ok $? "a restored conversation's next greedy reply equals the original's"
[ "$(q -d $DST -c "SELECT turns FROM kimi_linear.conversations c JOIN my_chats m ON m.conversation = c.id WHERE k = 1")" = 3 ]
ok $? "the restored conversation's turn is stored"

# new conversations and turns
new_id=$(q -d $DST -c "SELECT kimi_linear.new_conversation(NULL, 'A new conversation after the restore.')" 2>&1)
echo "# new_conversation(): $(one_line "$new_id" 200)"
[[ "$new_id" =~ ^[0-9]+$ ]] && [ "$new_id" -gt "$(q -d $DST -c "SELECT max(conversation) FROM my_chats")" ]
ok $? "new_conversation() in the restored database returns a new id"
[[ "$new_id" =~ ^[0-9]+$ ]] || new_id=NULL
reply=$(q -d $DST -c "SELECT kimi_linear.say($new_id, 'What is a sequence?', max_tokens => 8)" 2>&1)
[ -n "$reply" ] && [ "$(q -d $DST -c "SELECT count(*) FROM kimi_linear.messages WHERE conversation_id = $new_id")" = 3 ]
ok $? "say() on it stores its turn (reply: $(one_line "$reply"))"
reply=$(q -d $DST -c "SELECT kimi_linear.say(conversation, 'One more question.', max_tokens => 8) FROM my_chats WHERE k = 2" 2>&1)
[ "$(q -d $DST -c "SELECT turns FROM kimi_linear.conversations c JOIN my_chats m ON m.conversation = c.id WHERE k = 2")" = 3 ]
ok $? "and on the other restored conversation (reply: $(one_line "$reply"))"
[ "$(q -d $DST -c "SELECT kimi_linear.fork_conversation(conversation) > 0 FROM my_chats WHERE k = 1" 2>&1)" = t ]
ok $? "fork_conversation() in the restored database"

psql -Xq -c "DROP DATABASE IF EXISTS $SRC" -c "DROP DATABASE IF EXISTS $DST" >/dev/null 2>&1
echo "1..$n"
exit $failed
