#!/usr/bin/env bash
# bench-summarize-gpu.sh — kimi_linear.summarize() of one long document (about
# 100k tokens of the PostgreSQL manual) on the GPU machine, end to end through
# SQL, against the engine alone (bench/engine-summarize.c: the same prompt,
# prefill in the same chunks, greedy decode, same model, device and precision)
# on the same document.  Issue 13's goal: the SQL call within 1.2x the
# engine's own prefill + decode time.  Prints one table and RESULT lines.
#
# On the development machine: what test/gpu/pg-e2e.sh needs (.gpu/pg-runtime.tar.xz
# and .gpu/stage with the CUDA library; /work/notes/prep-gpu-b.sh packs them) and
# `make cuda-device-bins` (.gpu/bin/engine-summarize; or .gpu/b/engine-summarize.xz).
# On the GPU machine, from the repository root (carry those paths):
#   bash bench/bench-summarize-gpu.sh
# Settings (environment):
#   KL_BENCH_DOC_TOKENS  tokens of the document (default 100000; the manual has about 2.0M)
#   KL_BENCH_NEW         summarize's max_tokens (default 200, its default)
#   KL_BENCH_CHUNK       kimi_linear.prefill_chunk and the engine's KL_PREFILL_CHUNK (default 8192,
#                        bench_cuda's prefill step; the GUC's default 512 is a CPU worker's setting)
#   KL_BENCH_PRECISIONS  kimi_linear.precision values to run (default "fp32 bf16")
#   KL_BENCH_REPS        timed runs of each side, best kept (default 2)
#   KL_BENCH_REUSE=1     use the cluster already up (. /tmp/pgenv) instead of starting one as
#                        pg-e2e.sh does; prefill_chunk is then set by ALTER SYSTEM and a reload
# The model's context: pgdocs-kimi-18m has no positional encoding (mla_use_nope, docs/model.md), so
# nothing in the model bounds the length; kimi_linear.max_context (default 131072) must hold the
# prompt plus max_tokens.
set -uo pipefail
cd "$(dirname "$0")/.."
TOKENS=${KL_BENCH_DOC_TOKENS:-100000}
NEW=${KL_BENCH_NEW:-200}
CHUNK=${KL_BENCH_CHUNK:-8192}
PRECISIONS=${KL_BENCH_PRECISIONS:-fp32 bf16}
REPS=${KL_BENCH_REPS:-2}
MODEL=pgdocs-kimi-18m
W=$(mktemp -d /tmp/kl-sum.XXXXXX)
chmod a+rx "$W"
trap 'rm -rf "$W"' EXIT

# ------------------------------------------------------------------ PostgreSQL on the GPU, as pg-e2e.sh starts it
CONF=("shared_preload_libraries = 'kimi_linear'" "kimi_linear.device = 'cuda'" "kimi_linear.prefill_chunk = $CHUNK"
      "kimi_linear.prefill_budget = 0" "kimi_linear.max_context = $((TOKENS + NEW + 4096))")
if [ "${KL_BENCH_REUSE:-0}" = 1 ]; then
	. /tmp/pgenv
	for l in "${CONF[@]:2}"; do
		psql -XAtq -v ON_ERROR_STOP=1 -c "ALTER SYSTEM SET ${l%% =*} = ${l#*= }" || exit 1
	done
	psql -XAtq -c "SELECT pg_reload_conf()" >/dev/null
	sleep 2		# the inference worker re-reads the configuration on SIGHUP
else
	share=.gpu/stage/usr/share/postgresql/15/kimi_linear/models
	mkdir -p $share && cp -r models/$MODEL $share/
	PG_CONF=$(printf '%s\n' "${CONF[@]}") bash test/gpu/pg-on-device.sh .gpu/pg-runtime.tar.xz .gpu/stage >/dev/null || exit 1
	. /tmp/pgenv
fi
q() { psql -XAtq -v ON_ERROR_STOP=1 "$@"; }
ENGINE=${ENGINE:-.gpu/bin/engine-summarize}
if [ ! -x "$ENGINE" ] && [ -f .gpu/b/engine-summarize.xz ]; then
	xz -dc .gpu/b/engine-summarize.xz >"$W/engine-summarize" && chmod +x "$W/engine-summarize"
	ENGINE=$W/engine-summarize
fi
export KL_CUDA_LIB=${KL_CUDA_LIB:-$PWD/.gpu/stage/usr/lib/postgresql/15/lib/kimi_linear_cuda.so}

# ------------------------------------------------------------------ the document
# manual pages in file order, concatenated until TOKENS, then cut to TOKENS tokens of its own tokenization
CORPUS=$W/pgdocs.json
xz -dc test/fixtures/corpus/pgdocs.json.xz >"$CORPUS" 2>/dev/null ||
	python3 -c "import lzma, sys; sys.stdout.buffer.write(lzma.open('test/fixtures/corpus/pgdocs.json.xz').read())" >"$CORPUS"
chmod a+r "$CORPUS"
q -c "CREATE EXTENSION IF NOT EXISTS kimi_linear" >/dev/null || exit 1
for p in $PRECISIONS; do
	q -c "SET kimi_linear.device = 'cuda'" -c "SET kimi_linear.precision = '$p'" \
	  -c "SELECT kimi_linear.load_model('sum_$p', '$MODEL')" >/dev/null || exit 1
done
q -c "DROP TABLE IF EXISTS sum_corpus_raw, sum_doc" \
  -c "CREATE TABLE sum_corpus_raw (n serial, line text)" \
  -c "\\copy sum_corpus_raw (line) FROM '$CORPUS' WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')" \
  -c "CREATE TABLE sum_doc AS
      WITH pages AS (SELECT o, d->>'text' AS t,
                            array_length(kimi_linear.tokenize(d->>'text', model => 'sum_fp32'), 1) AS n
                     FROM (SELECT string_agg(line, E'\\n' ORDER BY n)::jsonb AS j FROM sum_corpus_raw) r,
                          jsonb_array_elements(r.j) WITH ORDINALITY AS e(d, o)),
           run AS (SELECT o, t, sum(n) OVER (ORDER BY o) - n AS before FROM pages),
           doc AS (SELECT string_agg(t, E'\\n\\n' ORDER BY o) AS t FROM run WHERE before < $TOKENS * 1.05)
      SELECT kimi_linear.detokenize((kimi_linear.tokenize(t, model => 'sum_fp32'))[1:$TOKENS], model => 'sum_fp32') AS body
      FROM doc" \
  -c "DROP TABLE sum_corpus_raw" >/dev/null || exit 1
DOC_TOKENS=$(q -c "SELECT array_length(kimi_linear.tokenize(body, model => 'sum_fp32'), 1) FROM sum_doc")
q -c "SELECT json_agg(body) FROM sum_doc" >"$W/doc.json"
echo "document: $DOC_TOKENS tokens, $(q -c "SELECT octet_length(body) FROM sum_doc") bytes" >&2

# ------------------------------------------------------------------ timed runs
# best() of the timed runs; timed SQL prints wall seconds (psql's \timing: the server's round trip)
best() { printf '%s\n' "$@" | sort -g | head -1; }
sql_s() {
	q -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1 | awk '{ printf "%.3f", $1 / 1000 }'
}
GPU=$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'a GPU') | head -1)
declare -A R
for p in $PRECISIONS; do
	# warm: cuBLAS, the worker's buffers for a chunk of this size (about 10k tokens)
	q -c "SELECT kimi_linear.summarize(left(body, 40000), max_tokens => 8, model => 'sum_$p') FROM sum_doc" >/dev/null
	ts=() te=()
	for r in $(seq "$REPS"); do
		# alternated, so that both see the same machine
		q -c "DROP TABLE IF EXISTS sum_out" >/dev/null
		ts+=("$(sql_s "CREATE TABLE sum_out AS SELECT kimi_linear.summarize(body, max_tokens => $NEW,
		                  model => 'sum_$p') AS s FROM sum_doc; ")")
		out_sql=$(q -c "SELECT coalesce(array_length(kimi_linear.tokenize(s, model => 'sum_$p'), 1), 0) FROM sum_out" \
		            2>/dev/null || echo "?")
		[ "$r" = 1 ] && q -c "SELECT left(s, 300) FROM sum_out" | sed 's/^/summary: /' >&2
		q -c "DROP TABLE sum_out" >/dev/null
		# the engine: rows generated prompt seconds cpu_seconds counts
		line=$(KL_PREFILL_CHUNK=$CHUNK "$ENGINE" models/$MODEL "$W/doc.json" 1 "$NEW" cuda "$p") || {
			echo "engine-summarize failed" >&2; exit 1; }
		read -r _ gen_eng prompt_eng t_eng _ _ <<<"$line"
		te+=("$t_eng")
	done
	R[$p]="$(best "${ts[@]}") $(best "${te[@]}") $prompt_eng $gen_eng $out_sql $(printf '%s\n' "${ts[@]}" | paste -sd/ -) $(printf '%s\n' "${te[@]}" | paste -sd/ -)"
done

echo
echo "summarize() of one $DOC_TOKENS-token document (the PostgreSQL manual, pages in order), $MODEL on $GPU,"
echo "prefill chunk $CHUNK, max_tokens $NEW, greedy; best of $REPS runs each ($(date -u +%Y-%m-%d)):"
echo
echo "| precision | tokens in (prompt) | tokens out (engine / SQL, retokenized) | SQL wall s | engine s | SQL / engine | runs SQL | runs engine |"
echo "|---|---:|---:|---:|---:|---:|---|---|"
for p in $PRECISIONS; do
	read -r s e pin gout sout rs re <<<"${R[$p]}"
	ratio=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.2f", a / b }')
	echo "| $p | $pin | $gout / $sout | $s | $e | ${ratio}x | $rs | $re |"
done
echo
for p in $PRECISIONS; do
	read -r s e pin gout sout rs re <<<"${R[$p]}"
	ratio=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.3f", a / b }')
	echo "RESULT kind=summarize model=$MODEL precision=$p chunk=$CHUNK doc_tokens=$DOC_TOKENS tokens_in=$pin" \
	     "tokens_out_engine=$gout tokens_out_sql=$sout sql_s=$s engine_s=$e ratio=$ratio"
done
