#!/usr/bin/env bash
# scripts/setup-deps.sh — install (Debian 12) everything needed to build
# kimi_linear and run its tests: compiler, PostgreSQL 15 server and headers,
# pgTAP and pg_prove, and the engine's libraries.  Run as root.
#
#   bash scripts/setup-deps.sh           build and `make test`
#   bash scripts/setup-deps.sh --fuzz    also clang for the libFuzzer harnesses
#                                        (make fuzz, fuzz-run; CI runs them)
# The sanitizer builds (make check-engine-asan, check-engine-tsan) need
# nothing more: gcc's ASan, UBSan and TSan runtimes come with build-essential.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
extra=()
if [ "${1:-}" = --fuzz ]; then
  # clang, its libFuzzer runtime, and llvm-symbolizer for readable reports
  extra=(clang-14 libclang-rt-14-dev llvm-14)
fi
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  build-essential make gcc ca-certificates util-linux \
  postgresql-15 postgresql-server-dev-15 postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl \
  libopenblas-dev libpcre2-dev libjansson-dev libisal-dev libssl-dev xz-utils "${extra[@]}"
