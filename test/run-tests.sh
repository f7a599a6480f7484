#!/usr/bin/env bash
# test/run-tests.sh — the whole test suite (make test runs it):
#   1. the engine's C tests (make check-engine)
#   2. build the extension and install it into a private copy of the
#      PostgreSQL installation (.test-cluster/pg: kl_stage_pg in cluster.sh),
#      never into the system's
#   3. a throwaway cluster run by an unprivileged OS user (kltest, created if
#      missing) with kimi_linear preloaded, a test model directory, fixtures
#      computed with the ./kl CLI
#   4. pg_regress (sql/, expected/) and pgTAP (test/pg/*.sql, by pg_prove)
#   5. the shell tests, TAP output each: concurrency (test/pg/concurrency.sh),
#      pg_dump/pg_restore (dump_restore.sh), the state cache's memory bound
#      (state_cache.sh), pg_dump and restore of an agent conversation (dump.sh),
#      a streaming-replication standby of the cluster (standby.sh), and last, a
#      server restart (restart.sh)
# Exits non-zero on any failure and ends with each runner's summary (with its
# wall time) and one line "N passed, N failed" over all of them.
#
# Test data: test/fixtures (golden checkpoints and outputs, the manual corpus).
# Environment (the Makefile's test-* targets set these; see the README, "Developing"):
#   KL_SKIP_ENGINE=1, KL_SKIP_REGRESS=1, KL_SKIP_TAP=1, KL_SKIP_CONCURRENCY=1, KL_SKIP_STANDBY=1   skip a step
#   KL_ENGINE_TESTS="test_golden ..."   a subset of the engine tests
#   KL_REGRESS="basic state"            a subset of the pg_regress tests
#   KL_TAP_FILES="test/pg/t01_generate.sql ..."   a subset of the pgTAP files
#   KL_SHELL_TESTS="dump_restore ..."   the shell tests to run (names without .sh; empty: none; default all)
#   KL_SANITIZE=1        also the engine tests under ASan+UBSan and (threads) TSan (CI)
#   KL_FUZZ_SECONDS=N    also every fuzzer for N seconds over its seeds (CI)
#   KL_KEEP_CLUSTER=1    leave the cluster running at the end (for make installcheck)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
FIXTURES=$REPO/test/fixtures
source test/pg/cluster.sh
LOGS=$KL_CLUSTER_DIR/test-logs		# each runner's whole output
rm -rf "$LOGS"; mkdir -p "$LOGS"

declare -a SUMMARY=()
FAILED=0
STEP_T0=$(date +%s)
note() { SUMMARY+=("$1 ($(( $(date +%s) - STEP_T0 )) s)"); echo "$1"; }
fail() { FAILED=1; note "FAIL: $1"; }
step() { STEP_T0=$(date +%s); echo; echo "======== $* ($(date +%T))"; }
T0=$(date +%s)
# prove's closing lines, on one line
prove_result() { grep -E '^Result|^Files=' "$1" | tr '\n' ' '; }

# ------------------------------------------------------------------ 1. engine
if [ "${KL_SKIP_ENGINE:-0}" != 1 ]; then
  step "engine tests (make check-engine)"
  if make -s check-engine TESTS="${KL_ENGINE_TESTS:-}" 2>&1 | tee $LOGS/engine-tests.log | tail -25; [ "${PIPESTATUS[0]}" = 0 ]; then
    note "engine: $(prove_result $LOGS/engine-tests.log)"
  else
    fail "engine tests ($(prove_result $LOGS/engine-tests.log))"
  fi
fi

# ------------------------------------------------------------------ 1b. sanitizers, fuzzers (CI)
if [ "${KL_SANITIZE:-0}" = 1 ]; then
  for san in asan tsan; do
    step "engine tests under ${san} (make check-engine-$san)"
    if make -s -j"$(nproc)" check-engine-$san TESTS="${KL_ENGINE_TESTS:-}" >$LOGS/engine-$san.log 2>&1; then
      tail -8 $LOGS/engine-$san.log
      note "engine ($san): $(prove_result $LOGS/engine-$san.log)"
    else
      grep -vE '^(gcc|cc) ' $LOGS/engine-$san.log | tail -60
      fail "engine ($san): $(prove_result $LOGS/engine-$san.log) (see $LOGS/engine-$san.log)"
    fi
  done
fi
if [ -n "${KL_FUZZ_SECONDS:-}" ]; then
  step "fuzzers, ${KL_FUZZ_SECONDS} s each (make fuzz-run)"
  if make -s -j"$(nproc)" fuzz-run FUZZ_SECONDS="$KL_FUZZ_SECONDS" 2>&1 | tee $LOGS/fuzz.log | grep -vE '^(clang|gcc)'; [ "${PIPESTATUS[0]}" = 0 ]; then
    note "fuzz: $(grep -c '^ok' $LOGS/fuzz.log) harnesses, no finding"
  else
    fail "fuzz: $(grep -c '^not ok' $LOGS/fuzz.log) of $(grep -cE '^(not )?ok' $LOGS/fuzz.log) harnesses found something (build/fuzz/*.log)"
  fi
fi

# ------------------------------------------------------------------ 2. build, install
step "build and install"
if ! make -s -j"$(nproc)" all cli corpus >$LOGS/build.log 2>&1 || ! kl_stage_pg "$KL_CLUSTER_DIR/pg" >>$LOGS/build.log 2>&1; then
  tail -40 $LOGS/build.log
  fail "build/install (see $LOGS/build.log)"
  printf '%s\n' "${SUMMARY[@]}"
  exit 1
fi
grep -i "warning" $LOGS/build.log | grep "src/pg" && echo "(build warnings above)"

# ------------------------------------------------------------------ 3. cluster, models, fixtures
step "cluster"
kl_ensure_user
TM=$KL_CLUSTER_DIR/models
rm -rf "$TM" "$KL_CLUSTER_DIR/outside" "$KL_CLUSTER_DIR/fixtures"
mkdir -p "$TM" "$KL_CLUSTER_DIR/outside" "$KL_CLUSTER_DIR/fixtures"
cp -r models/pgdocs-kimi-18m "$TM/"
# the golden tiny model (no tokenizer): a second model, and a source of foreign states
mkdir -p "$TM/tiny_a" "$KL_CLUSTER_DIR/outside/tiny_copy"
cp "$FIXTURES/golden/tiny_a/config.json" "$FIXTURES/golden/tiny_a/model.safetensors" "$TM/tiny_a/"
cp "$FIXTURES/golden/tiny_a/config.json" "$FIXTURES/golden/tiny_a/model.safetensors" "$KL_CLUSTER_DIR/outside/tiny_copy/"
# a broken checkpoint, and escapes: a symbolic link out of the directory
mkdir -p "$TM/broken"
echo '{"model_type": "kimi_linear", "hidden_size": -1}' >"$TM/broken/config.json"
ln -s "$KL_CLUSTER_DIR/outside/tiny_copy" "$TM/escape"
# ... and files of a model directory linked out of it (the directory itself is inside)
mkdir -p "$TM/linked_config" "$TM/linked_tokenizer" "$KL_CLUSTER_DIR/outside/tokenizer"
cp "$FIXTURES/golden/tiny_a/model.safetensors" "$TM/linked_config/"
ln -s "$KL_CLUSTER_DIR/outside/tiny_copy/config.json" "$TM/linked_config/config.json"
cp models/pgdocs-kimi-18m/tiktoken.model "$KL_CLUSTER_DIR/outside/tokenizer/"
cp "$FIXTURES/golden/tiny_a/config.json" "$FIXTURES/golden/tiny_a/model.safetensors" \
   models/pgdocs-kimi-18m/tokenizer_config.json "$TM/linked_tokenizer/"
ln -s "$KL_CLUSTER_DIR/outside/tokenizer/tiktoken.model" "$TM/linked_tokenizer/tiktoken.model"
# a "config.json" that is not one: its content must never appear in an error
mkdir -p "$TM/not_a_config"
cp "$FIXTURES/golden/tiny_a/model.safetensors" "$TM/not_a_config/"
echo 'KL-SECRET-CONTENT: this is not JSON' >"$TM/not_a_config/config.json"
chmod -R a+rX "$KL_CLUSTER_DIR"

KL_MODEL_DIR=$TM KL_EXTRA_CONF="kimi_linear.max_requests = 16" kl_cluster_start || { fail "cluster start"; exit 1; }
echo "cluster on port $PGPORT, data in $KL_CLUSTER_DIR/data, model_dir $TM"

# fixtures for pgTAP: what the CLI computes for the same prompts and settings
FIX=$KL_CLUSTER_DIR/fixtures
if [ "${KL_SKIP_TAP:-0}" != 1 ]; then
cli_ids() { ./kl generate --model models/pgdocs-kimi-18m "$@" 2>/dev/null | head -1; }
{
  echo "CREATE TABLE kl_cli (prompt text, max_tokens int, temperature float8, seed bigint, top_k int, top_p float8, ids int[]);"
  while IFS='|' read -r prompt mt temp seed topk topp; do
    ids=$(cli_ids --prompt "$prompt" --max-tokens "$mt" --temperature "$temp" --seed "$seed" --top-k "$topk" --top-p "$topp")
    echo "INSERT INTO kl_cli VALUES (\$p\$$prompt\$p\$, $mt, $temp, $seed, $topk, $topp, '{$ids}');"
  done <<'EOF'
The VACUUM command|32|0|0|0|1
CREATE TABLE creates a new table|48|0|0|0|1
Indexes are a common way to enhance database performance|40|0|0|0|1
The autovacuum daemon|40|0.9|7|40|0.95
PostgreSQL|40|1.0|1234|0|0.9
EOF
  # the tiny MoE model's greedy ids under each routing rule
  echo "CREATE TABLE kl_routing (rule text, ids int[]);"
  for rule in select reference; do
    ids=$(./kl generate --model "$TM/tiny_a" --moe-routing $rule --ids 1,2,3,4 --max-tokens 12 --ignore-eos 2>/dev/null | head -1)
    echo "INSERT INTO kl_routing VALUES ('$rule', '{$ids}');"
  done
  # a state made by another model (the tiny golden model, via the CLI)
  ./kl generate --model "$TM/tiny_a" --ids 1,2,3,4 --max-tokens 3 --state-out "$FIX/tiny.state" >/dev/null 2>&1
  echo "CREATE TABLE kl_files (name text PRIMARY KEY, data bytea, path text);"
  echo "\\set tiny_state \`od -An -v -tx1 $FIX/tiny.state | tr -d ' \\n'\`"
  echo "INSERT INTO kl_files VALUES ('tiny_state', decode(:'tiny_state', 'hex'), NULL);"
  echo "INSERT INTO kl_files VALUES ('model_dir', NULL, '$TM'), ('outside', NULL, '$KL_CLUSTER_DIR/outside/tiny_copy');"
  # the longest pages of the manual, loaded with COPY from the corpus file
  echo "CREATE TABLE kl_corpus_raw (n serial, line text);"
  echo "\\copy kl_corpus_raw (line) FROM '$FIXTURES/corpus/pgdocs.json' WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
  echo "CREATE TABLE kl_docs AS SELECT d->>'page' AS page, d->>'text' AS text
        FROM (SELECT string_agg(line, E'\\n' ORDER BY n)::jsonb AS j FROM kl_corpus_raw) r, jsonb_array_elements(r.j) d;"
  echo "DROP TABLE kl_corpus_raw;"
} >"$FIX/fixtures.sql"
fi

# ------------------------------------------------------------------ 4a. pg_regress
if [ "${KL_SKIP_REGRESS:-0}" != 1 ]; then
step "pg_regress (installcheck)"
rm -rf results regression.diffs regression.out
# shellcheck disable=SC2086
if make -s installcheck ${KL_REGRESS:+REGRESS="$KL_REGRESS"} PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER="$PGUSER" 2>&1 | tee $LOGS/regress.log | tail -25; [ "${PIPESTATUS[0]}" = 0 ]; then
  note "pg_regress: $(grep -E 'tests passed|All [0-9]+ tests' $LOGS/regress.log | tail -1 | sed 's/[= ]*$//; s/^[= ]*//')"
else
  [ -f regression.diffs ] && head -150 regression.diffs
  fail "pg_regress: $(grep -E 'failed|passed' $LOGS/regress.log | tail -1 | sed 's/[= ]*$//; s/^[= ]*//')"
fi
kl_cluster_alive || fail "server down after pg_regress"
fi

# ------------------------------------------------------------------ 4b. pgTAP
if [ "${KL_SKIP_TAP:-0}" != 1 ]; then
step "pgTAP (pg_prove)"
psql -Xq -c "DROP DATABASE IF EXISTS kl_tap" -c "CREATE DATABASE kl_tap" >/dev/null
if ! psql -Xq -v ON_ERROR_STOP=1 -d kl_tap -c "CREATE EXTENSION pgtap" -c "CREATE EXTENSION kimi_linear" \
     -f "$FIX/fixtures.sql" >$LOGS/fixtures.log 2>&1; then
  cat $LOGS/fixtures.log
  fail "fixtures"
fi
TAP_FILES=${KL_TAP_FILES:-$(ls test/pg/t*.sql)}
# shellcheck disable=SC2086
if pg_prove -d kl_tap --timer $TAP_FILES 2>&1 | tee $LOGS/tap.log; [ "${PIPESTATUS[0]}" = 0 ]; then
  note "pgTAP: $(grep -E '^Files=' $LOGS/tap.log) $(grep -E '^Result' $LOGS/tap.log)"
else
  fail "pgTAP: $(grep -E '^Files=' $LOGS/tap.log) $(grep -E '^Result' $LOGS/tap.log)"
fi
kl_cluster_alive || fail "server down after pgTAP"
fi

# ------------------------------------------------------------------ 5. shell tests
# (they run the cluster's own binaries: restart.sh restarts it)
export KL_PGBIN KL_CLUSTER_DIR
SHELL_TESTS=${KL_SHELL_TESTS-concurrency dump_restore dump state_cache standby restart}
[ "${KL_SKIP_CONCURRENCY:-0}" != 1 ] || SHELL_TESTS=$(echo " $SHELL_TESTS " | sed 's/ concurrency / /')
[ "${KL_SKIP_STANDBY:-0}" != 1 ] || SHELL_TESTS=$(echo " $SHELL_TESTS " | sed 's/ standby / /')
for t in $SHELL_TESTS; do
  step "$t"
  if bash test/pg/$t.sh 2>&1 | tee $LOGS/shell-$t.log; [ "${PIPESTATUS[0]}" = 0 ]; then
    note "$t: $(grep -c '^ok' $LOGS/shell-$t.log) passed"
  else
    fail "$t: $(grep -c '^not ok' $LOGS/shell-$t.log) of $(grep -cE '^(not )?ok' $LOGS/shell-$t.log) failed"
  fi
  kl_cluster_alive || fail "server down after $t"
done

# ------------------------------------------------------------------ end
step "stop"
if grep -E "PANIC|server process .* was terminated by signal|terminated by signal" "$KL_CLUSTER_DIR/log/server.log"; then
  fail "the server log shows a crash"
fi
if [ "${KL_KEEP_CLUSTER:-0}" = 1 ]; then
  echo "the cluster is left running; for example:"
  echo "  PGHOST=$PGHOST PGPORT=$PGPORT PGUSER=$PGUSER make installcheck REGRESS=basic"
  # the pgTAP database (extensions and fixtures) exists when that step ran
  if [ "${KL_SKIP_TAP:-0}" != 1 ]; then
    echo "  PGHOST=$PGHOST PGPORT=$PGPORT PGUSER=$PGUSER pg_prove -d kl_tap test/pg/t01_generate.sql"
  fi
  echo "  bash -c 'source test/pg/cluster.sh && kl_cluster_stop'      (stop it)"
else
  kl_cluster_stop >/dev/null || fail "cluster stop"
fi
echo
echo "======== summary ($(( $(date +%s) - T0 )) s)"
printf '%s\n' "${SUMMARY[@]}"
if [ $FAILED = 0 ]; then echo "ALL TESTS PASSED"; else echo "SOME TESTS FAILED"; fi
# one closing line over every runner's individual tests
prove_total() { sed -n 's/^Files=[0-9]*, Tests=\([0-9]*\),.*/\1/p' "$1" 2>/dev/null | tail -1; }
prove_failed() { grep -oE 'Failed [0-9]+/[0-9]+ subtests' "$1" 2>/dev/null | awk -F'[ /]' '{s += $2} END {print s + 0}'; }
e_total=$(prove_total $LOGS/engine-tests.log); e_bad=$(prove_failed $LOGS/engine-tests.log)
for san in asan tsan; do
  e_total=$(( ${e_total:-0} + $(prove_total $LOGS/engine-$san.log || true) + 0 ))
  e_bad=$(( e_bad + $(prove_failed $LOGS/engine-$san.log) ))
done
f_ok=$(grep -c '^ok' $LOGS/fuzz.log 2>/dev/null || true)
f_bad=$(grep -c '^not ok' $LOGS/fuzz.log 2>/dev/null || true)
t_total=$(prove_total $LOGS/tap.log); t_bad=$(prove_failed $LOGS/tap.log)
r_ok=$(grep -cE '^(test| ) *[a-z_]+ +\.\.\. ok' $LOGS/regress.log 2>/dev/null || true)
r_bad=$(grep -cE '\.\.\. FAILED' $LOGS/regress.log 2>/dev/null || true)
c_ok=$(cat $LOGS/shell-*.log 2>/dev/null | grep -c '^ok' || true)
c_bad=$(cat $LOGS/shell-*.log 2>/dev/null | grep -c '^not ok' || true)
n_ok=$(( ${e_total:-0} - e_bad + ${t_total:-0} - t_bad + r_ok + c_ok + f_ok ))
n_bad=$(( e_bad + t_bad + r_bad + c_bad + f_bad ))
[ $FAILED = 0 ] || [ $n_bad -gt 0 ] || n_bad=1
echo "$n_ok passed, $n_bad failed"
exit $FAILED
