#!/usr/bin/env bash
# Tokenizer throughput: encode every page of the PostgreSQL manual on one
# thread (best of three), against the reference tiktoken's 8.7 MB/s.
# Writes bench/results/tokenizer.md and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s cli >/dev/null
shared=${KL_SHARED:-../shared}
{
  echo "# Tokenizer benchmark"
  echo
  echo "Produced by \`bash bench/bench-tokenizer.sh\`: \`./kl bench-tokenizer\` encodes the text of all pages of"
  echo "$shared/corpus/pgdocs.json with the bundled model's vocabulary (PCRE2 JIT pre-tokenizer, heap-based BPE), one thread."
  echo
  ./kl bench-tokenizer --model models/pgdocs-kimi-18m --corpus "$shared/corpus/pgdocs.json"
} | tee bench/results/tokenizer.md
