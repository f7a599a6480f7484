#!/usr/bin/env bash
# test/fuzz/run.sh SECONDS NAME... — run each libFuzzer harness (built by
# make fuzz) for SECONDS over its committed seeds, one after the other, and
# print one TAP line per harness.  `make fuzz-run FUZZ_SECONDS=60` calls it.
#
# A harness reads test/fuzz/seeds/NAME (fuzz_state_crc: fuzz_state's) and
# writes what it finds new to build/fuzz/corpus/NAME, so the committed seeds
# stay as they are; a crash leaves its input in build/fuzz/crashes/ and the
# report in build/fuzz/NAME.log.  Exits non-zero if any harness failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
secs=$1
shift
mkdir -p build/fuzz/crashes
n=0
failed=0
for name in "$@"; do
  n=$((n + 1))
  seeds=test/fuzz/seeds/${name%_crc}
  corpus=build/fuzz/corpus/$name
  log=build/fuzz/$name.log
  mkdir -p "$corpus"
  # -rss_limit_mb: a leak or a runaway allocation is a finding; -timeout: a hang is one too
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 OPENBLAS_NUM_THREADS=1 \
    test/fuzz/bin/"$name" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix=build/fuzz/crashes/"$name"- "$corpus" "$seeds" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1)
  if [ $rc = 0 ]; then
    echo "ok $n - $name: ${runs:-?} inputs in ${secs} s, ${cov:-cov: ?}, $(ls "$corpus" | wc -l) corpus entries, no finding"
  else
    failed=1
    echo "not ok $n - $name (exit $rc): see $log and build/fuzz/crashes/"
    grep -E 'ERROR: |SUMMARY: |runtime error|fuzz_[a-z_]+: ' "$log" | head -5 | sed 's/^/# /'
  fi
done
echo "1..$n"
exit $failed
