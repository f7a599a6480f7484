#!/usr/bin/env bash
# test/pg/concurrency.sh — tests that need several sessions at once, against
# the cluster test/run-tests.sh started (PGHOST/PGPORT/PGUSER set).  TAP output.
#   1. 8 sessions generating at once get the same ids as each alone
#   2. a full request table is an immediate ERROR, not a wait
#   3. a terminated worker: waiting sessions fail at once, the worker comes back
#   4. a long prefill shows its progress in kimi_linear.activity and does not stall a short request
#   5. pgbench: say() on a few shared conversations for 30 s loses no turn
#   6. a set-based call shows its progress in kimi_linear.activity; pg_cancel_backend cancels the whole batch
#   7. a set-based call waits for request slots other sessions hold, instead of failing
#   8. kimi_linear.prefill_budget (several prompts prefilled per step) changes no result
set -uo pipefail
cd "$(dirname "$0")/../.."
DB=kl_conc
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
n=0
failed=0
ok() { n=$((n + 1)); if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=1; fi; }
q() { psql -XAtq -d $DB -v ON_ERROR_STOP=1 "$@"; }
now() { date +%s.%N; }

psql -Xq -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null 2>&1
q -c "CREATE EXTENSION kimi_linear"
q -c "SELECT kimi_linear._resolve_model(NULL)" >/dev/null

# ------------------------------------------------------------------ 1. same results together as alone
prompts=("The VACUUM command" "CREATE TABLE" "Indexes" "The planner" "Write-ahead logging" "pg_dump" "Replication" "A transaction")
for i in "${!prompts[@]}"; do
  q -c "SELECT kimi_linear.generate_tokens('${prompts[$i]}', max_tokens => 64, ignore_eos => true)" >"$W/alone.$i"
  q -c "SELECT kimi_linear.generate_tokens('${prompts[$i]}', max_tokens => 64, temperature => 0.8, seed => $i, ignore_eos => true)" >"$W/alone_s.$i"
done
for i in "${!prompts[@]}"; do
  q -c "SELECT kimi_linear.generate_tokens('${prompts[$i]}', max_tokens => 64, ignore_eos => true)" >"$W/together.$i" &
  q -c "SELECT kimi_linear.generate_tokens('${prompts[$i]}', max_tokens => 64, temperature => 0.8, seed => $i, ignore_eos => true)" >"$W/together_s.$i" &
done
wait
same=0
for i in "${!prompts[@]}"; do
  cmp -s "$W/alone.$i" "$W/together.$i" || { same=1; echo "# greedy differs for '${prompts[$i]}'"; }
  cmp -s "$W/alone_s.$i" "$W/together_s.$i" || { same=1; echo "# seeded differs for '${prompts[$i]}'"; }
done
ok $same "16 concurrent sessions (8 greedy, 8 seeded) get the ids each gets alone"

# ------------------------------------------------------------------ 2. full request table
max=$(q -c "SHOW kimi_linear.max_requests")
for i in $(seq 1 $((max + 4))); do
  # the clock starts once psql is connected (its \! runs after the connection): on a busy machine
  # starting 20 psql processes at once takes seconds, which is not what this checks
  ( q -c "\\! date +%s.%N >$W/full_t0.$i" \
      -c "SELECT length(kimi_linear.generate('x', max_tokens => 400, ignore_eos => true))" >/dev/null 2>"$W/full.$i"
    echo "$(cat "$W/full_t0.$i") $(now)" >"$W/full_t.$i" ) &
done
wait
refused=$(grep -l "too many kimi_linear requests in flight" "$W"/full.* 2>/dev/null | wc -l)
fast=1
for f in $(grep -l "too many kimi_linear requests" "$W"/full.* 2>/dev/null); do
  t=$(cat "${f/full./full_t.}"); awk -v a="${t% *}" -v b="${t#* }" 'BEGIN { exit !(b - a < 2.0) }' && fast=0
done
[ "$refused" -ge 1 ] && [ "$fast" = 0 ]; ok $? "with $((max + 4)) sessions and max_requests = $max, $refused are refused at once with a clear error"
ok "$(q -c "SELECT count(*) FROM kimi_linear.activity" | grep -qx 0; echo $?)" "every slot is free again"

# ------------------------------------------------------------------ 3. worker terminated mid-request
old_pid=$(q -c "SELECT pid FROM kimi_linear.workers WHERE worker = 0")
for i in 1 2 3; do
  ( q -c "SELECT kimi_linear.generate('x', max_tokens => 4000, ignore_eos => true)" >/dev/null 2>"$W/kill.$i"; now >"$W/kill_t.$i" ) &
done
sleep 1
t_kill=$(now)
q -c "SELECT pg_terminate_backend($old_pid)" >/dev/null
wait
all_failed=0
for i in 1 2 3; do
  grep -q "inference worker was terminated" "$W/kill.$i" || { all_failed=1; cat "$W/kill.$i"; }
  awk -v a="$t_kill" -v b="$(cat "$W/kill_t.$i")" 'BEGIN { exit !(b - a < 1.0) }' || all_failed=1
done
ok $all_failed "sessions waiting on a terminated worker fail within a second with a clear error"
back=1
for _ in $(seq 1 50); do
  new_pid=$(q -c "SELECT pid FROM kimi_linear.workers WHERE worker = 0")
  if [ -n "$new_pid" ] && [ "$new_pid" != "$old_pid" ] && q -c "SELECT kimi_linear.generate('x', max_tokens => 2)" >/dev/null 2>&1; then back=0; break; fi
  sleep 0.2
done
ok $back "the worker is restarted (pid $old_pid -> ${new_pid:-none}) and serves again"

# ------------------------------------------------------------------ 4. long prefill: progress, no stall
page_sql="SELECT text FROM kl_docs_conc"
q -c "CREATE TABLE kl_docs_conc AS SELECT repeat('The autovacuum daemon checks tables and runs VACUUM and ANALYZE when needed. ', 900) AS text" >/dev/null
( q -c "SELECT length(kimi_linear.generate(text, max_tokens => 4)) FROM kl_docs_conc" >"$W/long.out" 2>&1 ) &
long=$!
prog=()
for _ in $(seq 1 40); do
  p=$(q -c "SELECT prompt_tokens_done || '/' || prompt_tokens FROM kimi_linear.activity WHERE phase = 'prefill' AND prompt_tokens > 5000")
  [ -n "$p" ] && prog+=("$p")
  [ ${#prog[@]} -ge 2 ] && [ "${prog[0]}" != "${prog[-1]}" ] && break
  sleep 0.25
done
t0=$(now)
q -c "SELECT kimi_linear.generate('Short', max_tokens => 4)" >/dev/null
t_short=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
still_running=$(kill -0 $long 2>/dev/null && echo 1 || echo 0)
wait $long
[ ${#prog[@]} -ge 2 ] && [ "${prog[0]}" != "${prog[-1]}" ]; ok $? "a long prefill shows its progress in kimi_linear.activity (${prog[*]:-nothing})"
[ "$still_running" = 1 ]; ok $? "a short request during it completes in ${t_short}s, before the long prefill ends"
grep -qE '^[0-9]+$' "$W/long.out"; ok $? "the long request completes"

# ------------------------------------------------------------------ 5. pgbench: no lost turns
q -c "CREATE TABLE kl_bench_conv (k int PRIMARY KEY, id bigint)" \
  -c "INSERT INTO kl_bench_conv SELECT k, kimi_linear.new_conversation(NULL, 'Conversation ' || k) FROM generate_series(1, 3) k" >/dev/null
cat >"$W/say.sql" <<'SQL'
\set k random(1, 3)
SELECT kimi_linear.say((SELECT id FROM kl_bench_conv WHERE k = :k), 'Tell me more about it.', max_tokens => 8);
SQL
secs=${KL_PGBENCH_SECONDS:-30}
"$(pg_config --bindir)/pgbench" -n -c 8 -j 2 -T "$secs" -f "$W/say.sql" $DB >"$W/pgbench.out" 2>&1
pgb_rc=$?
done_tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$W/pgbench.out")
failed_tx=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$W/pgbench.out")
turns=$(q -c "SELECT sum(turns) FROM kimi_linear.conversations c JOIN kl_bench_conv b ON b.id = c.id")
msgs=$(q -c "SELECT count(*) FROM kimi_linear.messages m JOIN kl_bench_conv b ON b.id = m.conversation_id WHERE role <> 'system'")
grep -E "^(number of|latency average|tps)|error" "$W/pgbench.out" | head -20 | sed "s/^/# /"
[ $pgb_rc = 0 ] && [ -n "$done_tx" ] && [ "$done_tx" -gt 0 ] && [ "${failed_tx:-0}" = 0 ] && [ "$turns" = "$done_tx" ] && [ "$msgs" = $((2 * done_tx)) ]
ok $? "pgbench: $done_tx say() calls in ${secs}s on 3 shared conversations, $turns turns stored, $msgs messages"
ok "$(q -c "SELECT bool_and(positions > 0 AND state IS NOT NULL) FROM kimi_linear.conversations c JOIN kl_bench_conv b ON b.id = c.id" | grep -qx t; echo $?)" "every conversation has its state"

# ------------------------------------------------------------------ 6. batch progress, pg_cancel_backend
batch_sql="SELECT count(*) FROM kimi_linear.generate_each(ARRAY(SELECT g FROM generate_series(1, 120) g),
             ARRAY(SELECT 'Prompt ' || g FROM generate_series(1, 120) g), max_tokens => 64, ignore_eos => true, concurrency => 4)"
( PGAPPNAME=klbatch q -c "$batch_sql" >"$W/batch.out" 2>&1; now >"$W/batch_t" ) &
bpid=""
seen=()
for _ in $(seq 1 100); do
  [ -z "$bpid" ] && bpid=$(q -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'klbatch' AND state = 'active'")
  p=$(q -c "SELECT max(batch_done) || '/' || max(batch_total) || ' in flight ' || count(*) FROM kimi_linear.activity WHERE batch_id IS NOT NULL")
  case "$p" in */120*) [ "${#seen[@]}" = 0 ] || [ "${seen[-1]}" != "$p" ] && seen+=("$p") ;; esac
  [ "${#seen[@]}" -ge 3 ] && break
  sleep 0.1
done
first_done=$(echo "${seen[0]:-}" | cut -d/ -f1); last_done=$(echo "${seen[-1]:-}" | cut -d/ -f1)
[ ${#seen[@]} -ge 2 ] && [ "${last_done:-0}" -gt "${first_done:-0}" ]
ok $? "a batch shows its progress in kimi_linear.activity (batch_done/batch_total: ${seen[*]:-nothing})"
over=$(printf '%s\n' "${seen[@]}" | awk '{ if ($4 > 4) print }' | wc -l)
[ "$over" = 0 ]; ok $? "concurrency => 4: never more than 4 of its requests in flight"
t_cancel=$(now)
q -c "SELECT pg_cancel_backend($bpid)" >/dev/null
wait
grep -q "canceling statement due to user request" "$W/batch.out"
ok $? "pg_cancel_backend cancels the batch ($(head -1 "$W/batch.out"))"
awk -v a="$t_cancel" -v b="$(cat "$W/batch_t")" 'BEGIN { exit !(b - a < 1.0) }'
ok $? "within a second"
idle=1
for _ in $(seq 1 50); do
  [ "$(q -c "SELECT count(*) FROM kimi_linear.activity")" = 0 ] && { idle=0; break; }
  sleep 0.02
done
ok $idle "every request of the cancelled batch is dropped and its slot freed"

# ------------------------------------------------------------------ 7. a batch waits for slots others hold
max=$(q -c "SHOW kimi_linear.max_requests")
for i in $(seq 1 $((max - 2))); do
  q -c "SELECT length(kimi_linear.generate('Hold $i', max_tokens => 600, ignore_eos => true))" >/dev/null 2>"$W/hold.$i" &
done
for _ in $(seq 1 100); do
  [ "$(q -c "SELECT count(*) FROM kimi_linear.activity")" -ge $((max - 2)) ] && break
  sleep 0.05
done
held=$(q -c "SELECT count(*) FROM kimi_linear.activity")
res=$(q -c "SELECT count(*) || ' rows, ' || count(error) || ' errors' FROM kimi_linear.generate_each(ARRAY(SELECT g FROM generate_series(1, 12) g),
             ARRAY(SELECT 'Batch ' || g FROM generate_series(1, 12) g), max_tokens => 16, concurrency => 8)" 2>&1)
wait
[ "$res" = "12 rows, 0 errors" ] && ! grep -q ERROR "$W"/hold.*
ok $? "with $held of $max slots held by other sessions, a batch of 12 (concurrency 8) waits for slots and completes: $res"

# ------------------------------------------------------------------ 8. a prefill budget of several chunks
each_sql="SELECT string_agg(key || ':' || tokens || ':' || md5(summary), ' ' ORDER BY key)
          FROM kimi_linear.summarize_each(ARRAY(SELECT g FROM generate_series(1, 8) g),
                 ARRAY(SELECT repeat('Chapter ' || g || ' of the manual explains how VACUUM, ANALYZE and autovacuum keep tables healthy. ', 12)
                       FROM generate_series(1, 8) g), max_tokens => 24, concurrency => 8)"
one_chunk=$(q -c "$each_sql")
set_budget() {	# VALUE: ALTER SYSTEM, reload, and wait until a new session sees it (the worker reloads at its next wake-up)
  q -c "ALTER SYSTEM SET kimi_linear.prefill_budget = $1" -c "SELECT pg_reload_conf()" >/dev/null
  for _ in $(seq 1 100); do [ "$(q -c 'SHOW kimi_linear.prefill_budget')" = "$1" ] && return 0; sleep 0.05; done
  return 1
}
set_budget 4096
many_chunks=$(q -c "$each_sql")
set_budget 0
q -c "ALTER SYSTEM RESET kimi_linear.prefill_budget" -c "SELECT pg_reload_conf()" >/dev/null
[ -n "$one_chunk" ] && [ "$one_chunk" = "$many_chunks" ]
ok $? "summarize_each of 8 prompts with prefill_budget = 4096 (8 prompts per step) = with one chunk per step"

echo "1..$n"
exit $failed
