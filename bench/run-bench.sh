#!/usr/bin/env bash
# Engine benchmark on the CPU: prefill and decode throughput against the
# machine's measured rooflines, for the bundled pgdocs-kimi-18m model and a
# ~500M-parameter random-weight MoE shape (bench/configs/kimi-linear-500m-moe.json).
# Writes bench/results/engine-cpu.md (the committed table) and prints it.
#
#   bash bench/run-bench.sh [--quick]     (--quick: 512 and 4k only)
set -euo pipefail
cd "$(dirname "$0")/.."
make -s cli >/dev/null

points_prefill=512,4096,32768
points_decode=0,4096,32768
if [ "${1:-}" = "--quick" ]; then points_prefill=512,4096; points_decode=0,4096; fi

# Some environments pin OpenBLAS to its AVX2 kernels (OPENBLAS_CORETYPE=Haswell);
# benchmark what OpenBLAS picks for this CPU by itself, and say which it was.
unset OPENBLAS_CORETYPE
core=$(OPENBLAS_VERBOSE=2 ./kl bench --model models/pgdocs-kimi-18m --prefill 16 --decode 0 --decode-steps 1 2>&1 | sed -n 's/^Core: //p' | head -1)

out=bench/results/engine-cpu.md
tmp=$(mktemp)
{
  echo "# Engine benchmark (CPU)"
  echo
  echo "Produced by \`bash bench/run-bench.sh\` on $(date -u +%Y-%m-%d); OpenBLAS $(dpkg-query -W -f='${Version}' libopenblas0-pthread 2>/dev/null || echo '?') with its ${core:-default} kernels."
  echo "Batch-1 decode feeds one token per step and samples greedily; prefill is one call from an empty state."
  echo
  ./kl bench --model models/pgdocs-kimi-18m --label "pgdocs-kimi-18m (bundled, bf16)" \
    --prefill "$points_prefill" --decode "$points_decode" --decode-steps 64
  ./kl bench --config bench/configs/kimi-linear-500m-moe.json --label "kimi-linear-500m-moe (random bf16 weights)" \
    --prefill "$points_prefill" --decode "$points_decode" --decode-steps 32
} | tee "$tmp"
mv "$tmp" "$out"
echo "wrote $out"
