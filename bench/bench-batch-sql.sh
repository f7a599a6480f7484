#!/usr/bin/env bash
# bench/bench-batch-sql.sh — summarizing a column: one row at a time against
# the set-based form, and the engine's own batched loop doing the same work.
#
#   KL_BENCH_PAGES manual pages (default 256, from test/fixtures/corpus/pgdocs.json),
#   each cut to its first KL_BENCH_PAGE_TOKENS tokens (default 128 on the CPU,
#   1024 on the GPU: enough text to summarize, small enough for a few minutes
#   on 2 cores), summarized with max_tokens => KL_BENCH_NEW_TOKENS (64), greedy:
#     1. SELECT summarize(body) FROM docs            one request at a time
#     2. the same with a parallel plan               a request per parallel process
#     3. summarize_each(ids, bodies, concurrency)    for each of KL_BENCH_CONCURRENCY ("16 64")
#     4. bench/engine-summarize.c, no PostgreSQL     the same prompts and stopping rules,
#                                                    the same number in flight, one decode
#                                                    kl_forward per step
#   Every run's summaries (SQL) or token counts (engine) are checked equal to
#   the one-by-one run's: the comparison is of the same work.
#
# CPU (the development machine):  bash bench/bench-batch-sql.sh
#   builds, installs into a private PostgreSQL copy, runs its own cluster
#   (test/pg/cluster.sh), prints the table and writes bench/results/batch-sql.md.
#
# GPU machine:  bash bench/bench-batch-sql.sh --gpu      (the model on cuda; prints the table;
#   KL_BENCH_OUT=$OUT/batch-sql-gpu.md also writes it as bench/results/batch-sql.md is written)
#   prepared on the development machine, then carried (device tool: carry .gpu):
#     EXTRA_DEBS=libisal2 bash test/gpu/make-pg-runtime.sh .gpu/pg-runtime.tar.xz
#     make && make install DESTDIR=$PWD/.gpu/stage && rm -rf .gpu/stage/usr/share/postgresql/15/kimi_linear/models
#     make .gpu/bin/engine-summarize
#   (PostgreSQL is started by test/gpu/pg-on-device.sh, as in test/gpu/pg-e2e.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=cpu
[ "${1:-}" = --gpu ] && MODE=gpu
N=${KL_BENCH_PAGES:-256}
NEW=${KL_BENCH_NEW_TOKENS:-64}
CONCS=${KL_BENCH_CONCURRENCY:-"16 64"}
REPEAT=${KL_BENCH_REPEAT:-2}
W=$(mktemp -d)
MODEL=models/pgdocs-kimi-18m
CONF_LINES=("kimi_linear.max_requests = 160" "kimi_linear.max_requests_per_call = 64" "max_worker_processes = 16")
# KL_BENCH_CONF: more postgresql.conf lines, ';'-separated (e.g. "kimi_linear.prefill_chunk = 2048; kimi_linear.prefill_budget = 4096");
# the engine alone cuts prompts by the same kimi_linear.prefill_chunk
IFS=';' read -r -a EXTRA_CONF <<<"${KL_BENCH_CONF:-}"
for l in "${EXTRA_CONF[@]}"; do [ -n "${l// /}" ] && CONF_LINES+=("$(echo "$l" | sed 's/^ *//; s/ *$//')"); done
export KL_PREFILL_CHUNK=$(printf '%s\n' "${CONF_LINES[@]}" | sed -n 's/^kimi_linear.prefill_chunk *= *\([0-9]*\).*/\1/p' | tail -1)
KL_PREFILL_CHUNK=${KL_PREFILL_CHUNK:-512}
SETTINGS=$(printf '%s; ' "${CONF_LINES[@]}")

if [ $MODE = cpu ]; then
  PAGE_TOKENS=${KL_BENCH_PAGE_TOKENS:-128}
  DEVICE=cpu
  OUT=${KL_BENCH_OUT:-bench/results/batch-sql.md}
  KL_CLUSTER_DIR=${KL_CLUSTER_DIR:-/tmp/kimi-linear-bench-batch}
  source test/pg/cluster.sh
  make -s -j"$(nproc)" all cli corpus >/dev/null
  mkdir -p "$KL_CLUSTER_DIR"
  kl_stage_pg "$KL_CLUSTER_DIR/pg"
  KL_EXTRA_CONF=$(printf '%s\n' "${CONF_LINES[@]}") kl_cluster_start
  trap 'kl_cluster_stop >/dev/null 2>&1; rm -rf "$W"' EXIT
  ENGINE=$W/engine-summarize
  cc -O2 -Isrc/engine -I/usr/include/x86_64-linux-gnu/openblas-pthread -o "$ENGINE" bench/engine-summarize.c src/engine/*.o \
    -lopenblas -lpcre2-8 -ljansson -lisal -lcrypto -lpthread -ldl -lm
  CORPUS=test/fixtures/corpus/pgdocs.json
  MACHINE="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) cores, $(free -g | awk '/^Mem/ { print $2 }') GB"
else
  PAGE_TOKENS=${KL_BENCH_PAGE_TOKENS:-1024}
  DEVICE=cuda
  OUT=${KL_BENCH_OUT:-}
  share=.gpu/stage/usr/share/postgresql/15/kimi_linear/models
  mkdir -p $share && cp -r $MODEL $share/
  PG_CONF=$(printf '%s\n' "shared_preload_libraries = 'kimi_linear'" "kimi_linear.device = 'cuda'" "${CONF_LINES[@]}") \
    bash test/gpu/pg-on-device.sh .gpu/pg-runtime.tar.xz .gpu/stage >/dev/null
  . /tmp/pgenv
  ENGINE=.gpu/bin/engine-summarize
  export KL_CUDA_LIB=$PWD/.gpu/stage/usr/lib/postgresql/15/lib/kimi_linear_cuda.so
  CORPUS=$W/pgdocs.json
  xz -dc test/fixtures/corpus/pgdocs.json.xz >"$CORPUS" 2>/dev/null ||
    python3 -c "import lzma, sys; sys.stdout.buffer.write(lzma.open('test/fixtures/corpus/pgdocs.json.xz').read())" >"$CORPUS"
  chmod a+r "$CORPUS"; chmod a+rx "$W"
  MACHINE="$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'a GPU') | head -1), $(nproc) CPU cores"
  trap 'rm -rf "$W"' EXIT
fi
q() { psql -XAtq -v ON_ERROR_STOP=1 "$@"; }
# the inference worker's CPU time (user + system, seconds), to measure work independently of the machine's load
CLK=$(getconf CLK_TCK)
worker_cpu() { awk -v hz="$CLK" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$(q -c "SELECT pid FROM kimi_linear.workers WHERE worker = 0")/stat"; }
# timed SQL: prints "wall_seconds worker_cpu_seconds"
timed() {
  local c0 t c1
  c0=$(worker_cpu)
  t=$(q -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)
  c1=$(worker_cpu)
  awk -v t="$t" -v a="$c0" -v b="$c1" 'BEGIN { printf "%.3f %.2f\n", t / 1000, b - a }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
per_s() { awk -v n="$1" -v t="$2" 'BEGIN { printf "%.1f", n / t }'; }
best() { printf '%s\n' "$@" | sort -g | head -1; }
runs() { printf '%s\n' "$@" | sort -g | paste -sd/ -; }

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
T_START=$(date +%s)

# ------------------------------------------------------------------ the documents
q -c "CREATE EXTENSION IF NOT EXISTS kimi_linear" -c "SELECT kimi_linear._resolve_model(NULL)" >/dev/null
DEV_SHOWN=$(q -c "SELECT device FROM kimi_linear.models")
q -c "DROP TABLE IF EXISTS corpus_raw, docs" \
  -c "CREATE TABLE corpus_raw (n serial, line text)" \
  -c "\\copy corpus_raw (line) FROM '$CORPUS' WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')" \
  -c "CREATE TABLE docs AS
      WITH pages AS (SELECT d->>'page' AS page, kimi_linear.tokenize(d->>'text') AS ids
                     FROM (SELECT string_agg(line, E'\\n' ORDER BY n)::jsonb AS j FROM corpus_raw) r, jsonb_array_elements(r.j) d)
      SELECT row_number() OVER (ORDER BY page)::int AS id, page, kimi_linear.detokenize(ids[1:$PAGE_TOKENS]) AS body
      FROM pages WHERE array_length(ids, 1) >= $PAGE_TOKENS ORDER BY page LIMIT $N" \
  -c "DROP TABLE corpus_raw" -c "ANALYZE docs" >/dev/null
ROWS=$(q -c "SELECT count(*) FROM docs")
q -c "SELECT json_agg(body ORDER BY id) FROM docs" >"$W/docs.json"
q -c "SELECT kimi_linear.summarize(body, max_tokens => $NEW) FROM docs WHERE id = 1" >/dev/null   # warm: tokenizer, model

# ------------------------------------------------------------------ 1. one by one
echo "== one by one ($ROWS rows)" >&2
read -r t_one c_one < <(timed "SET max_parallel_workers_per_gather = 0;
               CREATE TABLE r_one AS SELECT id, kimi_linear.summarize(body, max_tokens => $NEW) AS s FROM docs")

# ------------------------------------------------------------------ 2. parallel query
echo "== parallel query" >&2
PAR_SET="SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
         SET max_parallel_workers_per_gather = 3; SET cpu_operator_cost = 100;"
PAR_WORKERS=$(q -c "$PAR_SET" -c "EXPLAIN SELECT id, kimi_linear.summarize(body, max_tokens => $NEW) FROM docs" |
              sed -n 's/.*Workers Planned: \([0-9]*\).*/\1/p')
read -r t_par c_par < <(timed "$PAR_SET CREATE TABLE r_par AS SELECT id, kimi_linear.summarize(body, max_tokens => $NEW) AS s FROM docs")

# ------------------------------------------------------------------ 3, 4. set-based, engine
declare -A T_SET T_ENG C_SET C_ENG R_SET R_ENG
SAME=ok
for c in $CONCS; do
  ts=()
  te=()
  cs=()
  ce=()
  # alternated, so that both see the same machine (a shared machine's load drifts)
  for r in $(seq 1 "$REPEAT"); do
    echo "== summarize_each, concurrency $c (run $r)" >&2
    read -r t cpu < <(timed "DROP TABLE IF EXISTS r_each; CREATE TABLE r_each AS SELECT key AS id, summary AS s, tokens, error
                   FROM kimi_linear.summarize_each(ARRAY(SELECT id FROM docs ORDER BY id), ARRAY(SELECT body FROM docs ORDER BY id),
                                                   max_tokens => $NEW, concurrency => $c)")
    ts+=("$t")
    cs+=("$cpu")
    bad=$(q -c "SELECT count(*) FROM docs d LEFT JOIN r_each e USING (id) JOIN r_one o USING (id)
                WHERE e.s IS DISTINCT FROM o.s OR e.error IS NOT NULL")
    [ "$bad" = 0 ] || { SAME="summarize_each at $c: $bad of $ROWS summaries differ from one by one"; echo "$SAME" >&2; }
    q -c "SELECT string_agg(tokens::text, ',' ORDER BY id) FROM r_each" >"$W/sql_tokens"
    GEN=$(q -c "SELECT sum(tokens) FROM r_each")
    echo "== engine alone, $c in flight (run $r)" >&2
    line=$("$ENGINE" "$MODEL" "$W/docs.json" "$c" "$NEW" "$DEVICE")
    te+=("$(echo "$line" | awk '{ print $4 }')")
    ce+=("$(echo "$line" | awk '{ print $5 }')")
    PROMPT_TOKENS=$(echo "$line" | awk '{ print $3 }')
    [ "$(echo "$line" | awk '{ print $6 }')" = "$(cat "$W/sql_tokens")" ] ||
      { SAME="the engine's token counts at $c differ from summarize_each's"; echo "$SAME" >&2; }
  done
  T_SET[$c]=$(best "${ts[@]}")
  T_ENG[$c]=$(best "${te[@]}")
  C_SET[$c]=$(best "${cs[@]}")
  C_ENG[$c]=$(best "${ce[@]}")
  R_SET[$c]=$(runs "${ts[@]}")
  R_ENG[$c]=$(runs "${te[@]}")
done
bad=$(q -c "SELECT count(*) FROM r_par p JOIN r_one o USING (id) WHERE p.s IS DISTINCT FROM o.s")
[ "$bad" = 0 ] || SAME="the parallel plan's summaries differ from one by one ($bad)"

# ------------------------------------------------------------------ the table
row() {	# label, in flight, seconds, all runs' seconds, CPU seconds, [engine seconds, engine CPU seconds]
  local vs_eng="" vs_cpu=""
  [ -n "${6:-}" ] && vs_eng=$(ratio "$6" "$3") && vs_cpu=$(ratio "$7" "$5")
  echo "| $1 | $2 | $3 | $4 | $(per_s "$ROWS" "$3") | $(per_s "$GEN" "$3") | $(ratio "$t_one" "$3") | $vs_eng | $(awk -v c="$5" 'BEGIN { printf "%.2f", c }') | $(per_s "$GEN" "$5") | $vs_cpu |"
}
TABLE=$W/table.md
{
  echo "| run | in flight | seconds | runs (s) | rows/s | generated tokens/s | vs one by one | set-based vs engine | CPU s | tokens per CPU s | set-based vs engine, CPU |"
  echo "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  row "\`SELECT summarize(body) FROM docs\` (one by one)" 1 "$t_one" "$t_one" "$c_one"
  row "the same, parallel plan ($((PAR_WORKERS + 1)) processes)" "$((PAR_WORKERS + 1))" "$t_par" "$t_par" "$c_par"
  for c in $CONCS; do
    row "\`summarize_each(ids, bodies, concurrency => $c)\`" "$c" "${T_SET[$c]}" "${R_SET[$c]}" "${C_SET[$c]}" "${T_ENG[$c]}" "${C_ENG[$c]}"
    row "engine alone, batched loop (\`bench/engine-summarize.c\`)" "$c" "${T_ENG[$c]}" "${R_ENG[$c]}" "${C_ENG[$c]}"
  done
} >"$TABLE"
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
SUMMARY="$ROWS pages of the manual, each cut to its first $PAGE_TOKENS tokens ($PROMPT_TOKENS prompt tokens with summarize's chat template), max_tokens => $NEW, greedy: $GEN tokens generated (the end token included; a summary stops at the model's end of message). Model pgdocs-kimi-18m on $DEV_SHOWN. Settings: ${SETTINGS%; }. Results checked equal: $SAME."
echo
echo "$SUMMARY"
echo
cat "$TABLE"

if [ -n "$OUT" ]; then
  {
    echo "# Summarizing a column: one by one, set-based, and the engine's batched loop"
    echo
    echo "Produced by \`bash bench/bench-batch-sql.sh$([ $MODE = gpu ] && echo ' --gpu')\` on $(date -u +%Y-%m-%d): $MACHINE;"
    echo "PostgreSQL $(q -c 'SHOW server_version'), one inference worker (threads = all cores); $(q -c 'SHOW kimi_linear.prefill_chunk') prompt tokens per prefill chunk, prefill budget per step $(q -c 'SHOW kimi_linear.prefill_budget') (0: one chunk)."
    echo "$SUMMARY"
    echo
    echo "The whole run took $(( ($(date +%s) - T_START) / 60 )) minutes; load average (1, 5, 15 min) $LOAD_START at the start, $LOAD_END at the end"
    echo "($(nproc) cores: other work shared the machine; compare rows of one run, not absolute numbers across runs)."
    echo
    echo "Times are wall clock, best of $REPEAT for the set-based and engine runs, which alternate (one run for the others; \"runs\" lists"
    echo "them all). \"vs one by one\": speed-up over row 1; \"set-based vs engine\": the engine's time over summarize_each's for the"
    echo "same number in flight (1.00x = as fast). \"CPU s\": the CPU time (user + system, least of the runs) of the inference worker"
    echo "for the SQL rows (the backends' tokenizing is not counted), of the engine process for the engine rows: the work done,"
    echo "which a busy machine changes less than the wall time."
    echo "The engine run renders the same prompts (before its clock starts), prefills each on its own in $KL_PREFILL_CHUNK-token chunks and"
    echo "decodes every sequence in flight in one forward step, as the inference worker does, with no PostgreSQL in between."
    echo
    cat "$TABLE"
  } >"$OUT"
  echo "wrote $OUT" >&2
fi
