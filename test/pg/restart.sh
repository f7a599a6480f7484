#!/usr/bin/env bash
# test/pg/restart.sh — what a server restart keeps, against the cluster
# test/run-tests.sh started (PGHOST/PGPORT/PGUSER set; KL_PGBIN and
# KL_CLUSTER_DIR exported: the test restarts that cluster, so it runs last).
# TAP output.
#   1. models loaded with load_model are loaded again by the workers after a
#      restart, with the options they were loaded with; unloaded ones are not
#   2. a model that can no longer load after the restart is listed as failed,
#      with the reason, and can be unloaded
#   3. conversations (committed data) are intact and continue
set -uo pipefail
cd "$(dirname "$0")/../.."
source test/pg/cluster.sh
DB=kl_restart
n=0
failed=0
ok() { n=$((n + 1)); if [ "$1" = 0 ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=1; fi; }
q() { psql -XAtq -d $DB -v ON_ERROR_STOP=1 "$@"; }
restart() {
  kl_as_user "$KL_PGBIN/pg_ctl" -D "$KL_CLUSTER_DIR/data" -l "$KL_CLUSTER_DIR/log/server.log" -m fast -w -t 60 restart >/dev/null
}
# wait until the models view shows `want` (name:status list) or 30 s pass
models() { q -c "SELECT string_agg(name || ':' || status, ' ' ORDER BY name) FROM kimi_linear.models" 2>/dev/null; }
wait_models() {
  local want=$1 got=
  for _ in $(seq 1 150); do got=$(models); [ "$got" = "$want" ] && break; sleep 0.2; done
  echo "$got"
}

psql -Xq -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" >/dev/null 2>&1
q -c "CREATE EXTENSION kimi_linear" || { echo "Bail out! no database"; echo "not ok 1 - setup"; exit 1; }
MD=$(q -c "SHOW kimi_linear.model_dir")
rm -rf "$MD/tiny_gone"
cp -r "$MD/tiny_a" "$MD/tiny_gone"
chmod -R a+rX "$MD/tiny_gone"

# ------------------------------------------------------------------ 1. loaded models come back
for m in $(q -c "SELECT name FROM kimi_linear.models"); do q -c "SELECT kimi_linear.unload_model('$m')" >/dev/null; done
q -c "SELECT kimi_linear.load_model('pgdocs-kimi-18m', 'pgdocs-kimi-18m')" \
  -c "SELECT kimi_linear.load_model('tiny', 'tiny_a')" \
  -c "SET kimi_linear.precision = 'fp32'" \
  -c "SELECT kimi_linear.load_model('tiny_ref', 'tiny_a', moe_routing => 'reference')" \
  -c "RESET kimi_linear.precision" \
  -c "SELECT kimi_linear.load_model('tiny_unloaded', 'tiny_a')" \
  -c "SELECT kimi_linear.load_model('tiny_gone', 'tiny_gone')" \
  -c "SELECT kimi_linear.unload_model('tiny_unloaded')" >/dev/null
before=$(models)
ids_before=$(q -c "SELECT kimi_linear.generate_ids(ARRAY[1, 2, 3, 4], max_tokens => 6, model => 'tiny', ignore_eos => true)")
ref_before=$(q -c "SELECT kimi_linear.generate_ids(ARRAY[1, 2, 3, 4], max_tokens => 6, model => 'tiny_ref', ignore_eos => true)")
q -c "SET kimi_linear.page_size = 64" -c "CREATE TABLE chats (id bigint)" \
  -c "INSERT INTO chats SELECT kimi_linear.new_conversation('pgdocs-kimi-18m', 'Before the restart.')" \
  -c "SELECT kimi_linear.say(id, 'What is VACUUM? ' || repeat('Dead tuples. ', 10), max_tokens => 16) FROM chats" >/dev/null
turns_before=$(q -c "SELECT turns || '/' || positions FROM kimi_linear.conversations c JOIN chats USING (id)")
rm -rf "$MD/tiny_gone"					# this one cannot come back

old_pid=$(q -c "SELECT pid FROM kimi_linear.workers WHERE worker = 0")
restart; rc=$?
ok $rc "the server restarts (pg_ctl restart)"
new_pid=$(q -c "SELECT pid FROM kimi_linear.workers WHERE worker = 0" 2>/dev/null)
after=$(wait_models "pgdocs-kimi-18m:ready tiny:ready tiny_gone:failed tiny_ref:ready")
echo "# before: $before"
echo "# after:  $after (worker $old_pid -> $new_pid)"
[ "$after" = "pgdocs-kimi-18m:ready tiny:ready tiny_gone:failed tiny_ref:ready" ]
ok $? "the models loaded before the restart are loaded again; the unloaded one is not"
ids_after=$(q -c "SELECT kimi_linear.generate_ids(ARRAY[1, 2, 3, 4], max_tokens => 6, model => 'tiny', ignore_eos => true)" 2>&1)
[ -n "$ids_before" ] && [ "$ids_after" = "$ids_before" ]
ok $? "a reloaded model answers as before ($ids_after)"
[ "$(q -c "SELECT path FROM kimi_linear.models WHERE name = 'tiny'")" = "$(realpath "$MD/tiny_a")" ]
ok $? "from the same directory"
ref_after=$(q -c "SELECT moe_routing || ' ' || matmul_precision || ' ' || kimi_linear.generate_ids(ARRAY[1, 2, 3, 4], max_tokens => 6, model => 'tiny_ref', ignore_eos => true)::text FROM kimi_linear.models WHERE name = 'tiny_ref'" 2>&1)
[ "$ref_before" != "$ids_before" ] && [ "$ref_after" = "reference fp32 $ref_before" ]
ok $? "with the options it was loaded with (moe_routing, precision: $ref_after)"
# the precision asked for (fp32, where auto would also run fp32 on the CPU) is kept as asked: loading the
# name again with the same options is a no-op, with the default (auto) it is other options
q -c "SELECT kimi_linear.load_model('tiny_ref', 'tiny_a', moe_routing => 'reference', matmul_precision => 'fp32')" >/dev/null 2>&1 &&
  ! q -c "SELECT kimi_linear.load_model('tiny_ref', 'tiny_a', moe_routing => 'reference')" >/dev/null 2>&1
ok $? "the precision asked for (fp32, not auto) is kept across the restart"

# ------------------------------------------------------------------ 2. a model that cannot load any more
err=$(q -c "SELECT error FROM kimi_linear.models WHERE name = 'tiny_gone'")
echo "# tiny_gone: $err"
[[ "$err" == *"tiny_gone"* ]]; ok $? "a model whose directory is gone is listed as failed, with the reason"
q -c "SELECT kimi_linear.unload_model('tiny_gone')" >/dev/null 2>&1
ok $? "and can be unloaded"

# ------------------------------------------------------------------ 3. committed data
[ "$(q -c "SELECT turns || '/' || positions FROM kimi_linear.conversations c JOIN chats USING (id)")" = "$turns_before" ]
ok $? "the conversation is intact ($turns_before turns/positions)"
r=$(q -c "SELECT kimi_linear.say(id, 'And ANALYZE?', max_tokens => 8) FROM chats" 2>&1)
[ "$(q -c "SELECT turns FROM kimi_linear.conversations c JOIN chats USING (id)")" = 2 ]
ok $? "and continues (reply: $(printf '%s' "${r:0:50}" | tr '\n' ' '))"

# ------------------------------------------------------------------ unloaded stays unloaded
q -c "SELECT kimi_linear.unload_model('tiny')" -c "SELECT kimi_linear.unload_model('tiny_ref')" >/dev/null
restart
after=$(wait_models "pgdocs-kimi-18m:ready")
sleep 1; after=$(models)
[ "$after" = "pgdocs-kimi-18m:ready" ]; ok $? "after unload_model and another restart, only the others come back ($after)"

rm -rf "$MD/tiny_gone"
psql -Xq -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1
echo "1..$n"
exit $failed
