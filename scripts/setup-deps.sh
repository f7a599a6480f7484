#!/usr/bin/env bash
# scripts/setup-deps.sh — install (Debian 12) everything needed to build
# kimi_linear and run its tests: compiler, PostgreSQL 15 server and headers,
# pgTAP and pg_prove, and the engine's libraries.  Run as root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  build-essential make gcc ca-certificates util-linux \
  postgresql-15 postgresql-server-dev-15 postgresql-15-pgtap libtap-parser-sourcehandler-pgtap-perl \
  libopenblas-dev libpcre2-dev libjansson-dev libisal-dev libssl-dev xz-utils
