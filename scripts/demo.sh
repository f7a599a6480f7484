#!/usr/bin/env bash
# scripts/demo.sh — kimi_linear on a new machine, from nothing:
#   installs the packages (scripts/setup-deps.sh), builds and installs the
#   extension with its bundled model, starts a local PostgreSQL cluster with
#   kimi_linear preloaded (run by an unprivileged user, kltest), then runs a
#   real generation and a two-turn conversation and prints the results.
# Run as root from the repository.  KL_DEMO_SKIP_DEPS=1 skips the packages;
# KL_DEMO_KEEP=1 leaves the cluster running (connection settings are printed);
# KL_CLUSTER_DIR (default /tmp/kimi-linear-demo) is created by the demo, and
# no other directory's permissions are changed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${KL_DEMO_SKIP_DEPS:-0}" = 1 ] || bash scripts/setup-deps.sh
make -s -j"$(nproc)"
make -s install
KL_CLUSTER_DIR=${KL_CLUSTER_DIR:-/tmp/kimi-linear-demo}
source test/pg/cluster.sh
# The cluster's directory is the demo's own: created here, marked, and the
# only one whose permissions the demo sets.  Directories above it (/tmp by
# default) are never touched: the unprivileged user must already be able to
# pass through them.
MARK="$KL_CLUSTER_DIR/.kimi-linear-demo"
if [ -e "$KL_CLUSTER_DIR" ] && [ ! -e "$MARK" ]; then
  echo "$KL_CLUSTER_DIR exists and is not a kimi_linear demo cluster; set KL_CLUSTER_DIR to a new directory" >&2
  exit 1
fi
mkdir -p "$KL_CLUSTER_DIR"
touch "$MARK"
kl_ensure_user
if ! runuser -u "$KL_PGUSER" -- test -x "$(dirname "$KL_CLUSTER_DIR")"; then
  echo "the user $KL_PGUSER cannot reach $KL_CLUSTER_DIR (a directory above it is closed to it);" \
       "set KL_CLUSTER_DIR to a directory under one it can enter, such as /tmp" >&2
  exit 1
fi
echo "== starting PostgreSQL 15 in $KL_CLUSTER_DIR with shared_preload_libraries = 'kimi_linear'"
kl_cluster_start
[ "${KL_DEMO_KEEP:-0}" = 1 ] || trap 'kl_cluster_stop >/dev/null' EXIT

psql -X -v ON_ERROR_STOP=1 <<'SQL'
\pset pager off
\echo == CREATE EXTENSION kimi_linear
CREATE EXTENSION kimi_linear;
\echo == load the bundled model (it would also load by itself on first use)
SELECT kimi_linear.load_model('pgdocs-kimi-18m', 'pgdocs-kimi-18m');
SELECT name, parameters, pg_size_pretty(bytes) AS weights, device, status FROM kimi_linear.models;
\echo == generate (greedy)
\timing on
SELECT kimi_linear.generate('The VACUUM command', max_tokens => 48) AS continuation;
\echo == generate (sampled, reproducible with a seed)
SELECT kimi_linear.generate('CREATE INDEX', max_tokens => 48, temperature => 0.8, top_p => 0.95, seed => 42) AS continuation;
\timing off
\echo == a two-turn conversation, stored in kimi_linear.conversations
SELECT kimi_linear.new_conversation(system => 'You are a helpful PostgreSQL expert.') AS cid \gset
SELECT kimi_linear.say(:cid, 'What does VACUUM do?', max_tokens => 48) AS reply_1;
SELECT kimi_linear.say(:cid, 'And how is ANALYZE different?', max_tokens => 48) AS reply_2;
SELECT turn, role, left(content, 70) AS content FROM kimi_linear.messages WHERE conversation_id = :cid ORDER BY id;
SELECT id, model, positions, turns, pg_size_pretty(length(state)::bigint) AS state FROM kimi_linear.conversations;
SQL
echo
echo "(the bundled model was trained on the PostgreSQL manual only: it writes manual-like text and does not follow instructions)"
if [ "${KL_DEMO_KEEP:-0}" = 1 ]; then
  echo "cluster left running: PGHOST=$PGHOST PGPORT=$PGPORT PGUSER=$PGUSER psql"
  echo "stop it with: runuser -u $KL_PGUSER -- $KL_PGBIN/pg_ctl -D $KL_CLUSTER_DIR/data stop"
fi
