#!/usr/bin/env python3
"""ncu-kernels.py NCU_CSV STEPS — per-kernel GPU time of the decode steps that
bench_cuda ran inside cudaProfilerStart/Stop (KL_BENCH_NCU_STEPS=STEPS), from
Nsight Compute's CSV (--csv --print-units base --metrics gpu__time_duration.sum),
as RESULT lines for bench/cuda-table.py: per kernel (name up to its argument
list) the launches per step and microseconds per step, kernels run one at a
time (so launch gaps and overlap are not in these times)."""
import csv
import re
import sys

path, steps = sys.argv[1], int(sys.argv[2])
rng = {}
rows = []
for line in open(path, errors="replace"):
    if line.startswith("RESULT ") and "kind=ncu_range" in line:
        rng = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line[7:]))
    elif line.startswith('"'):
        rows.append(line)
agg = {}
header = None
for rec in csv.reader(rows):
    if header is None:
        header = rec
        continue
    r = dict(zip(header, rec))
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = r["Kernel Name"].split("(")[0].replace("void ", "").strip()
    try:
        ns = float(r["Metric Value"].replace(",", ""))
    except ValueError:
        continue
    a = agg.setdefault(name, [0, 0.0])
    a[0] += 1
    a[1] += ns
total = sum(v[1] for v in agg.values())
for name, (n, ns) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
    print(f'RESULT kind=kernel tag={rng.get("tag", "-")} sample={rng.get("sample", "greedy")} ctx={rng.get("ctx", "?")} '
          f'batch={rng.get("batch", "?")} name="{name.replace(chr(34), "")}" per_step={n / steps:.2f} '
          f'us_per_step={ns / steps / 1e3:.2f}')
print(f'RESULT kind=kernel_total tag={rng.get("tag", "-")} sample={rng.get("sample", "greedy")} ctx={rng.get("ctx", "?")} '
      f'batch={rng.get("batch", "?")} launches_per_step={sum(v[0] for v in agg.values()) / steps:.1f} '
      f'us_per_step={total / steps / 1e3:.1f}')
