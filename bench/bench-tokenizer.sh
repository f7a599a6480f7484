#!/usr/bin/env bash
# Tokenizer throughput: `./kl bench-tokenizer` encodes every page of the
# PostgreSQL manual (test/fixtures/corpus/pgdocs.json, made by `make corpus`) with the bundled model's
# vocabulary on one thread, best of three runs, once with the scanner that
# kl_encode uses and once with PCRE2 running the pattern, and checks that both
# give the same ids.  The reference is tiktoken's 8.7 MB/s.
#
# Run from anywhere; writes bench/results/tokenizer.md and prints it.
#   bash bench/bench-tokenizer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
make -s cli corpus >/dev/null
corpus=test/fixtures/corpus/pgdocs.json
model=models/pgdocs-kimi-18m
table=$(./kl bench-tokenizer --model "$model" --corpus "$corpus")
pcre2=$(pcre2-config --version 2>/dev/null || dpkg-query -W -f='${Version}' libpcre2-8-0 2>/dev/null || echo unknown)
{
  echo "# Tokenizer benchmark"
  echo
  echo "Produced by \`bash bench/bench-tokenizer.sh\` (tree $(git describe --always --dirty 2>/dev/null || echo unknown), $(cc --version | head -1), PCRE2 $pcre2)."
  echo "\`./kl bench-tokenizer\` encodes the text of all pages of \`$corpus\` with the vocabulary of"
  echo "\`$model\` (3840 ordinary tokens) on one thread; MB/s is 10^6 bytes of UTF-8 input per second."
  echo
  echo "$table"
  echo
  echo "Goal: 20 MB/s or more on one core."
  echo
  echo "- *scanner* is what \`kl_encode\` uses: a hand-written matcher of the pre-tokenizer pattern whose character"
  echo "  classes come from PCRE2's Unicode tables (computed at load time), then byte-pair merging on"
  echo "  (left, right) rank pairs. The engine tests check that it cuts every page, and every code point in"
  echo "  context, exactly as PCRE2 running the pattern does."
  echo "- *PCRE2 JIT* is the same encoder with the pattern itself matched by PCRE2 (\`kl_encode_with(..., KL_SPLIT_PCRE2, ...)\`)."
  echo "- The machine is shared with other work, so figures vary by some 20% from run to run."
} > bench/results/tokenizer.md
cat bench/results/tokenizer.md
