#!/usr/bin/env bash
# test/pg/standby.sh — scaling out on a streaming-replication standby, against
# the cluster test/run-tests.sh started (the primary: PGHOST/PGPORT/PGUSER
# set; kimi_linear preloaded).  TAP output.
#   1. a hot standby made with pg_basebackup -R (its own port and data
#      directory under $KL_CLUSTER_DIR/standby; kimi_linear preloaded there too,
#      with its own inference worker)
#   2. the read-only functions run there and give the primary's results:
#      generate, summarize, the set-based summarize_each over a replicated
#      table, generate_with_state, chat_with_state, tokenize
#   3. a conversation written on the primary continues identically when its
#      next turn is computed on the standby (chat_with_state and
#      generate_with_state on the replicated state), and say() on the primary
#      commits that very turn (same reply, same state bytes), which replays
#   4. functions that must write say so in their own words on the standby;
#      load_model works there (models are per server, nothing is written)
set -uo pipefail
cd "$(dirname "$0")/../.."
source test/pg/cluster.sh
DB=kl_standby
SB=$KL_CLUSTER_DIR/standby
n=0
failed=0
ok() { n=$((n + 1)); if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=1; fi; }
qp() { psql -XAtq -d $DB -v ON_ERROR_STOP=1 "$@"; }
PRIMARY_PORT=$PGPORT
qs() { psql -XAtq -p "$STANDBY_PORT" -d $DB -v ON_ERROR_STOP=1 "$@"; }
# the standby's error for a statement (stderr), empty if it succeeded
qs_err() { psql -XAtq -p "$STANDBY_PORT" -d $DB -v ON_ERROR_STOP=1 -v VERBOSITY=default -c "$1" 2>&1 >/dev/null; }
stop_standby() { [ -d "$SB/data" ] && kl_as_user "$KL_PGBIN/pg_ctl" -D "$SB/data" -m fast -w -t 60 stop >/dev/null 2>&1; }
trap stop_standby EXIT
# until the standby has replayed everything the primary wrote so far.  The
# insert position, not pg_current_wal_lsn(): the test cluster commits
# asynchronously (synchronous_commit = off), so the last commit record may be
# inserted but not yet written when the write position is read.
wait_replay() {
  local lsn
  lsn=$(qp -c "SELECT pg_current_wal_insert_lsn()")
  for _ in $(seq 1 1200); do
    [ "$(qs -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ] && return 0
    sleep 0.05
  done
  return 1
}

# ------------------------------------------------------------------ primary: data
psql -Xq -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null 2>&1
qp -c "CREATE EXTENSION kimi_linear" >/dev/null
qp -c "CREATE TABLE docs (id int PRIMARY KEY, body text)" \
   -c "INSERT INTO docs VALUES
         (1, 'VACUUM reclaims storage occupied by dead tuples. In normal PostgreSQL operation, tuples that are deleted or obsoleted by an update are not physically removed from their table.'),
         (2, 'ANALYZE collects statistics about the contents of tables in the database, and stores the results in the pg_statistic system catalog.'),
         (3, 'CREATE INDEX constructs an index on the specified column(s) of the specified relation, which can be a table or a materialized view.'),
         (4, 'pg_dump is a utility for backing up a PostgreSQL database. It makes consistent backups even if the database is being used concurrently.')" >/dev/null
cid=$(qp -c "SELECT kimi_linear.new_conversation(NULL, 'You are a helpful PostgreSQL expert.')")
qp -c "SELECT kimi_linear.say($cid, 'What does VACUUM do?', max_tokens => 24)" >/dev/null
qp -c "SELECT kimi_linear.say($cid, 'And ANALYZE?', max_tokens => 24)" >/dev/null

# ------------------------------------------------------------------ 1. the standby
rm -rf "$SB"
mkdir -p "$SB"
chown "$KL_PGUSER" "$SB" 2>/dev/null || true
STANDBY_PORT=$(KL_PORT=$((PRIMARY_PORT + 1)) kl_free_port)
kl_as_user "$KL_PGBIN/pg_basebackup" -h "$PGHOST" -p "$PRIMARY_PORT" -U "$PGUSER" -D "$SB/data" -R -X stream -c fast \
  >"$SB/basebackup.log" 2>&1
ok $? "pg_basebackup -R made a standby in $SB/data"
printf '%s\n' "port = $STANDBY_PORT" "hot_standby = on" | kl_as_user tee -a "$SB/data/postgresql.conf" >/dev/null
kl_as_user "$KL_PGBIN/pg_ctl" -D "$SB/data" -l "$SB/server.log" -w -t 60 start >/dev/null
ok $? "the standby starts on port $STANDBY_PORT"
[ "$(qs -c "SELECT pg_is_in_recovery()")" = t ]
ok $? "it is a hot standby (pg_is_in_recovery)"
up=1
for _ in $(seq 1 100); do
  [ "$(qs -c "SELECT count(*) FROM kimi_linear.workers WHERE pid IS NOT NULL" 2>/dev/null)" = 1 ] && { up=0; break; }
  sleep 0.1
done
ok $up "kimi_linear is preloaded there: its inference worker runs"

# ------------------------------------------------------------------ 2. read-only functions, same results
same() { [ "$(qp -c "$1")" = "$(qs -c "$1")" ] && [ -n "$(qs -c "$1")" ]; }
same "SELECT kimi_linear.generate('The VACUUM command', max_tokens => 24)"
ok $? "generate on the standby = on the primary"
same "SELECT kimi_linear.summarize(body, max_tokens => 24) FROM docs WHERE id = 1"
ok $? "summarize of a replicated row on the standby = on the primary"
same "SELECT kimi_linear.tokenize(body) FROM docs WHERE id = 2"
ok $? "tokenize on the standby = on the primary"
sb_each=$(qs -c "SELECT count(*) FILTER (WHERE e.error IS NULL) || '/' || count(*) || ' ' || bool_and(e.summary = p.summary)
                 FROM kimi_linear.summarize_each(ARRAY(SELECT id FROM docs ORDER BY id), ARRAY(SELECT body FROM docs ORDER BY id),
                                                 max_tokens => 24) e
                 JOIN (SELECT id, kimi_linear.summarize(body, max_tokens => 24) AS summary FROM docs) p ON p.id = e.key")
pr_each=$(qp -c "SELECT string_agg(kimi_linear.summarize(body, max_tokens => 24), '|' ORDER BY id) FROM docs")
sb_one=$(qs -c "SELECT string_agg(summary, '|' ORDER BY key) FROM kimi_linear.summarize_each(ARRAY(SELECT id FROM docs), ARRAY(SELECT body FROM docs), max_tokens => 24)")
[ "$sb_each" = "4/4 true" ] && [ "$sb_one" = "$pr_each" ]
ok $? "summarize_each over the replicated table on the standby: $sb_each, the primary's summaries"
qp -c "CREATE TABLE states AS SELECT new_state AS s FROM kimi_linear.generate_with_state(NULL, 'The VACUUM command', max_tokens => 16)"
wait_replay
same "SELECT reply || md5(new_state) FROM kimi_linear.generate_with_state((SELECT s FROM states), ' Also,', max_tokens => 24)"
ok $? "generate_with_state continuing a replicated state on the standby = on the primary (reply and new state)"

# ------------------------------------------------------------------ 3. a conversation's next turn computed on the standby
wait_replay
ok $? "the standby has replayed the conversation"
msg='Thanks. What about REINDEX?'
turn_json="[{\"role\": \"user\", \"content\": \"$msg\"}]"
sb_turn=$(qs -c "SELECT reply || '|' || md5(new_state) FROM kimi_linear.chat_with_state(
                   (SELECT state FROM kimi_linear.conversations WHERE id = $cid), '$turn_json', max_tokens => 24)")
sb_gen=$(qs -c "SELECT reply || md5(new_state) FROM kimi_linear.generate_with_state(
                  (SELECT state FROM kimi_linear.conversations WHERE id = $cid), ' More:', max_tokens => 16)")
pr_gen=$(qp -c "SELECT reply || md5(new_state) FROM kimi_linear.generate_with_state(
                  (SELECT state FROM kimi_linear.conversations WHERE id = $cid), ' More:', max_tokens => 16)")
[ -n "$sb_gen" ] && [ "$sb_gen" = "$pr_gen" ]
ok $? "generate_with_state on the replicated conversation state: standby = primary"
sb_each_turn=$(qs -c "SELECT reply || '|' || md5(new_state) FROM kimi_linear.chat_with_state_each(ARRAY[$cid],
                        ARRAY(SELECT state FROM kimi_linear.conversations WHERE id = $cid), ARRAY['$turn_json'::jsonb], max_tokens => 24)")
[ -n "$sb_turn" ] && [ "$sb_turn" = "$sb_each_turn" ]
ok $? "chat_with_state_each on the standby computes the same turn"
pr_reply=$(qp -c "SELECT kimi_linear.say($cid, '$msg', max_tokens => 24)")
pr_state=$(qp -c "SELECT md5(state) FROM kimi_linear.conversations WHERE id = $cid")
[ "${sb_turn%|*}" = "$pr_reply" ]
ok $? "say() on the primary gives the reply the standby computed ('$(echo "$pr_reply" | tr '\n' ' ' | cut -c1-40)…')"
[ "${sb_turn##*|}" = "$pr_state" ]
ok $? "and stores the very state the standby computed (md5 $pr_state)"
wait_replay &&
  [ "$(qs -c "SELECT turns || ' ' || md5(state) FROM kimi_linear.conversations WHERE id = $cid")" = "3 $pr_state" ] &&
  [ "$(qs -c "SELECT count(*) FROM kimi_linear.messages WHERE conversation_id = $cid")" = 7 ]
ok $? "the committed turn replays to the standby (3 turns, 7 messages, the same state)"

# ------------------------------------------------------------------ 4. writers say why; models are per server
e=$(qs_err "SELECT kimi_linear.say($cid, 'Hello again')")
echo "$e" | sed 's/^/# /'
echo "$e" | grep -q 'kimi_linear.say() cannot run on a standby server' && echo "$e" | grep -q 'Run say() on the primary' &&
  ! echo "$e" | grep -q 'FOR UPDATE'
ok $? "say() on the standby: its own error (which function, why, run it on the primary)"
e=$(qs_err "SELECT kimi_linear.new_conversation()")
echo "$e" | grep -q 'kimi_linear.new_conversation() cannot run on a standby server' && echo "$e" | grep -q 'Run new_conversation() on the primary'
ok $? "new_conversation() on the standby: its own error ($(echo "$e" | head -1))"
e=$(qs_err "SELECT kimi_linear.fork_conversation($cid)")
echo "$e" | grep -q 'kimi_linear.fork_conversation() cannot run on a standby server'
ok $? "fork_conversation() on the standby: its own error"
e=$(psql -XAtq -d $DB -c "BEGIN READ ONLY" -c "SELECT kimi_linear.say($cid, 'Hello again')" 2>&1 >/dev/null)
echo "$e" | grep -q 'kimi_linear.say() cannot run in a read-only transaction'
ok $? "say() in a read-only transaction on the primary: its own error"
e=$(qs_err "SELECT kimi_linear.load_model('second', 'pgdocs-kimi-18m')")
[ -z "$e" ] && [ "$(qs -c "SELECT count(*) FROM kimi_linear.models WHERE name = 'second' AND status = 'ready'")" = 1 ] &&
  [ "$(qp -c "SELECT count(*) FROM kimi_linear.models WHERE name = 'second'")" = 0 ]
ok $? "load_model works on the standby and loads there only (models are per server) ${e}"
same "SELECT kimi_linear.generate('Indexes', max_tokens => 16, model => 'pgdocs-kimi-18m')" &&
  [ "$(qs -c "SELECT kimi_linear.generate('Indexes', max_tokens => 16, model => 'second')")" = \
    "$(qp -c "SELECT kimi_linear.generate('Indexes', max_tokens => 16)")" ]
ok $? "the standby's own model gives the same results"
qs -c "SELECT kimi_linear.unload_model('second')" >/dev/null
ok $? "unload_model works on the standby"
[ "$(qs -c "SELECT count(*) FROM kimi_linear.activity")" = 0 ]
ok $? "nothing left in flight on the standby"

stop_standby
ok $? "the standby stops"
grep -E "PANIC|terminated by signal" "$SB/server.log" && failed=1
rm -rf "$SB/data"
echo "1..$n"
exit $failed
