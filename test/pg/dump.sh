#!/usr/bin/env bash
# test/pg/dump.sh — pg_dump and restore of an agent conversation (tool
# declarations, replies with tool calls, tool results, pages of state), run
# by test/run-tests.sh against its cluster (PGHOST/PGPORT/PGUSER set).  TAP.
#   1. the restored tables equal the dumped ones, row for row
#   2. the restored conversation goes on exactly as the original does
set -uo pipefail
cd "$(dirname "$0")/../.."
SRC=kl_dump_src
DST=kl_dump_dst
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
n=0
failed=0
ok() { n=$((n + 1)); if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=1; fi; }
q() { local db=$1; shift; psql -XAtq -d "$db" -v ON_ERROR_STOP=1 "$@"; }

psql -Xq -c "DROP DATABASE IF EXISTS $SRC" -c "DROP DATABASE IF EXISTS $DST" -c "CREATE DATABASE $SRC" >/dev/null 2>&1
q $SRC -c "CREATE EXTENSION kimi_linear"
TOOLS='[{"type": "function", "function": {"name": "run_sql", "description": "Run one read-only SQL query.",
  "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40}}, "required": ["query"]}}},
  {"type": "function", "function": {"name": "table_size", "description": "Size of a table in bytes.",
  "parameters": {"type": "object", "properties": {"table": {"enum": ["pg_class", "pg_proc"]}}, "required": ["table"]}}}]'
cid=$(q $SRC -v tools="$TOOLS" <<'EOF'
SET kimi_linear.page_size = 64;
SELECT kimi_linear.new_conversation(system => 'You can query the database.', tools => :'tools');
EOF
)
q $SRC >/dev/null <<EOF
SELECT kimi_linear.say_json($cid, 'How many tables are there?', tool_choice => 'run_sql', max_tokens => 80);
SELECT kimi_linear.add_tool_result($cid, 'functions.run_sql:0', '[{"count": 68}]');
SELECT kimi_linear.say_json($cid, NULL, tool_choice => 'table_size', max_tokens => 80);
SELECT kimi_linear.add_tool_result($cid, 'functions.table_size:1', '16384');
EOF
ok $? "an agent conversation with two tool calls and their results"

snapshot() {
  q "$1" <<EOF
SELECT 'c', id, owner, model, system, page_size, md5(state), positions, turns, tools FROM kimi_linear.conversations ORDER BY id;
SELECT 'p', conversation_id, page_no, owner, md5(data) FROM kimi_linear.conversation_pages ORDER BY 1, 2, 3;
SELECT 'm', id, conversation_id, turn, role, md5(content), token_ids, owner, tool_calls, tool_call_id
  FROM kimi_linear.messages ORDER BY id;
EOF
}
snapshot $SRC >"$W/src.txt"
[ "$(grep -c '^p' "$W/src.txt")" -ge 2 ] && grep -q '^m|.*|tool|.*|functions.run_sql:0$' "$W/src.txt" &&
  grep -q 'functions.table_size:1' "$W/src.txt"
ok $? "it has pages, tool calls and tool results"

pg_dump -Fc -d $SRC -f "$W/dump" 2>"$W/dump.err"
ok $? "pg_dump $(cat "$W/dump.err")"
psql -Xq -c "CREATE DATABASE $DST" >/dev/null && pg_restore -d $DST "$W/dump" 2>"$W/restore.err"
ok $? "pg_restore $(head -3 "$W/restore.err")"
snapshot $DST >"$W/dst.txt"
cmp -s "$W/src.txt" "$W/dst.txt"
ok $? "the restored conversations, pages and messages equal the dumped ones ($(wc -l <"$W/src.txt") rows)"

# new rows need the sequences past the restored ids (should pg_dump not carry them)
for db in $SRC $DST; do
  q $db -c "SELECT setval('kimi_linear.messages_id_seq', (SELECT max(id) FROM kimi_linear.messages))" >/dev/null
done
cont='SELECT kimi_linear.say_json(%s, NULL, tool_choice => '"'"'none'"'"', max_tokens => 24);'
a=$(q $SRC -c "$(printf "$cont" "$cid")" 2>&1)
b=$(q $DST -c "$(printf "$cont" "$cid")" 2>&1)
[ -n "$a" ] && [ "$a" = "$b" ]
ok $? "the restored conversation goes on as the original: $b"
a=$(q $SRC -c "SELECT kimi_linear.conversation_messages($cid)")
b=$(q $DST -c "SELECT kimi_linear.conversation_messages($cid)")
[ "$a" = "$b" ]
ok $? "... and both histories stay equal"

psql -Xq -c "DROP DATABASE $SRC" -c "DROP DATABASE $DST" >/dev/null 2>&1
echo "1..$n"
exit $failed
