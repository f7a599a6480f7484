#!/usr/bin/env bash
# Quantized weights on the CPU: what each format costs in quality and what
# it buys in decode speed, side by side in one run.  Writes
# bench/results/quant-cpu.md (the committed table) and prints it.
#
#   bash bench/run-quant-bench.sh [--rounds N] [--quick]
#
# Quality (bundled pgdocs-kimi-18m): ./kl perplexity over the first 50,000
# tokens of the manual corpus (pages encoded as [BOS] + page + <|im_end|>),
# for bf16 and the model quantized at load to fp8 / int8 / int4; greedy
# agreement with bf16, teacher-forced (the argmax next token at every one of
# those positions) and free-running (the three reference prompts of
# training.json, 60 greedy tokens each: tokens identical to bf16's).
#
# Speed: batch-1 decode tokens/s (./kl bench, context 0) of each format on
# the bundled model and on bench/configs/kimi-linear-500m-moe.json with
# random bf16 weights quantized at load.  The machine is shared: the formats
# run interleaved, N rounds (default 5), and the table gives the median and
# the range of each; the ratio to bf16 is taken within each round, then the
# median.  The load average is printed before and after.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=5
ppl_tokens=50000
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --quick) rounds=2; ppl_tokens=5000; shift ;;
    *) echo "usage: $0 [--rounds N] [--quick]" >&2; exit 2 ;;
  esac
done
make -s cli corpus >/dev/null
unset OPENBLAS_CORETYPE

model=models/pgdocs-kimi-18m
moe=bench/configs/kimi-linear-500m-moe.json
corpus=test/fixtures/corpus/pgdocs.json
formats="bf16 fp8 int8 int4"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
qopt() { [ "$1" = bf16 ] || echo "--quantize $1"; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
ceilings=$(./kl bench --model $model --prefill 16 --decode 0 --decode-steps 1 2>/dev/null |
  sed -n 's/^Ceilings measured here: \(.*\)\. Load.*/\1/p')

# ---------------------------------------------------------------- quality
for f in $formats; do
  # shellcheck disable=SC2046
  ./kl perplexity --model $model --corpus $corpus --max-tokens $ppl_tokens $(qopt $f) \
    --save-argmax "$work/argmax-$f" $( [ $f = bf16 ] || echo --agree-with "$work/argmax-bf16" ) >"$work/ppl-$f" 2>&1
  python3 - "$model/training.json" >"$work/prompts" <<'EOF'
import json, sys
for s in json.load(open(sys.argv[1]))["samples"]:
    print(",".join(str(i) for i in s["prompt_ids"]))
EOF
  : >"$work/gen-$f"
  while read -r ids; do
    # shellcheck disable=SC2046
    ./kl generate --model $model --ids "$ids" --max-tokens 60 --ignore-eos $(qopt $f) 2>/dev/null | head -1 >>"$work/gen-$f"
  done <"$work/prompts"
done

free_running() {  # tokens of format $1 identical to bf16's, position by position
  python3 - "$work/gen-bf16" "$work/gen-$1" <<'EOF'
import sys
a = [l.strip().split(",") for l in open(sys.argv[1])]
b = [l.strip().split(",") for l in open(sys.argv[2])]
same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
total = sum(len(r) for r in a)
first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b)]
print(f"{same} of {total} (first difference at {', '.join(str(i) for i in first)})")
EOF
}

# ---------------------------------------------------------------- speed
bench_decode() {  # model-args steps quantize -> tokens/s and the weights line
  # shellcheck disable=SC2086
  ./kl bench $1 --prefill 16 --decode 0 --decode-steps $2 --no-roofline $(qopt $3) 2>/dev/null
}
for r in $(seq 1 "$rounds"); do
  for f in $formats; do
    out=$(bench_decode "--model $model" 256 $f)
    echo "$out" | awk -F'|' '/^\| decode/ {gsub(/ /, "", $4); print $4}' >>"$work/small-$f"
    echo "$out" | sed -n 's/^Model: \(.*\)  *$/\1/p' | head -1 >"$work/small-model-$f"
    out=$(bench_decode "--config $moe" 32 $f)
    echo "$out" | awk -F'|' '/^\| decode/ {gsub(/ /, "", $4); print $4}' >>"$work/moe-$f"
    echo "$out" | sed -n 's/^Model: \(.*\)  *$/\1/p' | head -1 >"$work/moe-model-$f"
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

speed_table() {  # prefix (small|moe)
  python3 - "$work" "$1" $formats <<'EOF'
import re, statistics, sys
work, prefix, formats = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = {f: [float(x) for x in open(f"{work}/{prefix}-{f}")] for f in formats}
print("| format | weights | decode tokens/s (median) | range | x bf16 (median of per-round ratios) |")
print("|---|---|---:|---:|---:|")
for f in formats:
    model = open(f"{work}/{prefix}-model-{f}").read().strip()
    m = re.search(r"\(([\d.]+ MB) of weights(?:, random)?, (.*)\), \d+ layers", model)
    weights = f"{m.group(2)}, {m.group(1)}" if m else "?"
    ratios = [a / b for a, b in zip(runs[f], runs["bf16"])]
    print(f"| {f} | {weights} | {statistics.median(runs[f]):.1f} | {min(runs[f]):.1f} - {max(runs[f]):.1f} | "
          f"{statistics.median(ratios):.2f}x |")
EOF
}

out=bench/results/quant-cpu.md
tmp=$(mktemp)
{
  echo "# Quantized weights on the CPU"
  echo
  echo "Produced by \`bash bench/run-quant-bench.sh\` on $(date -u +%Y-%m-%d) ($rounds rounds);"
  echo "machine: $(sed -n 's/^model name\t*: //p' /proc/cpuinfo | head -1), $(nproc) cores"
  echo "($(grep -o 'avx512_vnni\|avx512_bf16\|avx512f ' /proc/cpuinfo | sort -u | tr '\n' ' ')), shared with other work:"
  echo "load average $load_before before, $load_after after; ceilings measured before: $ceilings"
  echo "(bench/results/engine-cpu.md has the machine on a day of 63-68 GB/s)."
  echo "Kernels: $(./kl bench --model $model --prefill 16 --decode 0 --decode-steps 1 2>/dev/null | sed -n 's/.*threads (\([a-z0-9]*\) kernels.*/\1/p'); weight-only (activations stay fp32, see docs/engine.md)."
  echo
  echo "## Quality: pgdocs-kimi-18m, first $ppl_tokens tokens of the manual corpus"
  echo
  echo "| format | weights | perplexity | vs bf16 | greedy agreement, teacher-forced | free-running greedy tokens identical to bf16 (3 prompts x 60) |"
  echo "|---|---|---:|---:|---:|---|"
  base=$(sed -n 's/^perplexity: //p' "$work/ppl-bf16")
  for f in $formats; do
    p=$(sed -n 's/^perplexity: //p' "$work/ppl-$f")
    w=$(sed -n 's/^model: [^ ]* (\(.*\))$/\1/p' "$work/ppl-$f")
    a=$(sed -n 's/^greedy agreement: \([0-9.]*%\).*/\1/p' "$work/ppl-$f")
    [ $f = bf16 ] && a="-"
    fr=$(free_running $f)
    echo "| $f | $w | $p | $(python3 -c "print(f'{($p / $base - 1) * 100:+.2f}%')") | $a | $fr |"
  done
  echo
  echo "Goals: fp8 and int8 within +1% of bf16 perplexity, int4 within +6%."
  echo
  echo "## Decode speed: pgdocs-kimi-18m (batch 1, context 0, 256 steps)"
  echo
  speed_table small
  echo
  echo "## Decode speed: kimi-linear-500m-moe, random weights (batch 1, context 0, 32 steps)"
  echo
  speed_table moe
  echo
  echo "Goals: int8 >= 1.8x and int4 >= 3x the bf16 figure."
} | tee "$tmp"
mv "$tmp" "$out"
echo "wrote $out"
