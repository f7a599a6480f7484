#!/usr/bin/env bash
# test/pg/state_cache.sh — kimi_linear.state_cache bounds the inference
# worker's memory, against the cluster test/run-tests.sh started (PGHOST/
# PGPORT/PGUSER set; reads the worker's /proc/PID/status).  TAP output.
#
# More long conversations than the cache holds, each with its MLA rows in
# several engine pages (1024 positions each) but a small stored head (64-
# position conversation pages): the worker's private memory (RssAnon) grows
# by at most the cache's size plus the working margin the README documents
# (the sequence of the request in flight and the buffers of its reply:
# KL_STATE_CACHE_MARGIN_MB below), and the cached turns still hit.
set -uo pipefail
cd "$(dirname "$0")/../.."
DB=kl_cache
CACHE_MB=16
MARGIN_MB=${KL_STATE_CACHE_MARGIN_MB:-24}
N=12				# conversations: about 6 MB of sequence each, 72 MB in all
n=0
failed=0
ok() { n=$((n + 1)); if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=1; fi; }
q() { psql -XAtq -d $DB -v ON_ERROR_STOP=1 "$@"; }
worker_pid() { q -c "SELECT pid FROM kimi_linear.workers WHERE worker = 0"; }
rss_anon_kb() { awk '/^RssAnon:/ { print $2 }' "/proc/$(worker_pid)/status"; }
set_cache() {
  psql -XAtq -c "ALTER SYSTEM SET kimi_linear.state_cache = '$1'" -c "SELECT pg_reload_conf()" >/dev/null
  # the worker applies it at its next loop turn (within a second when idle)
  for _ in $(seq 1 50); do [ "$(q -c "SHOW kimi_linear.state_cache")" = "$1" ] && break; sleep 0.1; done
  sleep 1.5
}
restore() { psql -XAtq -c "ALTER SYSTEM RESET kimi_linear.state_cache" -c "SELECT pg_reload_conf()" >/dev/null; }
trap restore EXIT

psql -Xq -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null 2>&1
q -c "CREATE EXTENSION kimi_linear"
msg="'Tell me about it. ' || repeat('The autovacuum daemon checks tables and runs VACUUM. ', 236)"

# baseline: the model loaded, one long turn done (working buffers allocated), then the cache emptied
set_cache ${CACHE_MB}MB
q -c "SET kimi_linear.page_size = 64; SELECT length(kimi_linear.say(kimi_linear.new_conversation(), $msg, max_tokens => 1))" >/dev/null
set_cache 0
base=$(rss_anon_kb)
pid0=$(worker_pid)
echo "# worker $pid0: RssAnon $((base / 1024)) MB with the model loaded and nothing cached"

set_cache ${CACHE_MB}MB
q -c "CREATE TABLE convs (k int, id bigint)"
q -c "SET kimi_linear.page_size = 64; INSERT INTO convs SELECT k, kimi_linear.new_conversation() FROM generate_series(1, $N) k"
peak=0
for k in $(seq 1 $N); do
  q -c "SELECT length(kimi_linear.say(id, $msg, max_tokens => 1)) FROM convs WHERE k = $k" >/dev/null || failed=1
  r=$(rss_anon_kb); [ "$r" -gt "$peak" ] && peak=$r
done
positions=$(q -c "SELECT min(positions) || '-' || max(positions) FROM kimi_linear.conversations c JOIN convs USING (id)")
after=$(rss_anon_kb)
grow=$(( (peak - base) / 1024 ))
echo "# $N conversations of $positions positions: RssAnon $((after / 1024)) MB at the end, peak $((peak / 1024)) MB (+$grow MB)"
[ "$(worker_pid)" = "$pid0" ]; ok $? "the worker served all $N conversations (pid $pid0)"
[ $grow -le $((CACHE_MB + MARGIN_MB)) ]
ok $? "the worker's memory grew by $grow MB <= state_cache ${CACHE_MB} MB + margin ${MARGIN_MB} MB"

# one more turn on a cached conversation
q -c "SELECT length(kimi_linear.say(id, 'And then?', max_tokens => 1)) FROM convs WHERE k = $N" >/dev/null
r=$(rss_anon_kb)
[ $(( (r - base) / 1024 )) -le $((CACHE_MB + MARGIN_MB)) ]; ok $? "after a turn on a cached conversation: +$(( (r - base) / 1024 )) MB"

# with the cache off, everything cached is freed
set_cache 0
r=$(rss_anon_kb)
echo "# cache off: RssAnon $((r / 1024)) MB"
[ $(( (r - base) / 1024 )) -le 4 ]; ok $? "state_cache = 0 gives the cached sequences' memory back (+$(( (r - base) / 1024 )) MB over the baseline)"

restore
psql -Xq -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1
echo "1..$n"
exit $failed
