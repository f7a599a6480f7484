#!/usr/bin/env python3
"""cuda-table.py RESULTS_LOG — the RESULT lines of bench/bench-cuda.sh as the
markdown tables of bench/results/cuda.md (rooflines from the measured ceilings:
decode = bytes of active weights, KDA state and MLA cache read per step over
the copy bandwidth; prefill = FLOPs over the bf16 GEMM rate)."""
import re
import sys

rows = []
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        rows.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line[7:])))
ceil = {r["what"]: float(r["value"]) for r in rows if r["kind"] == "ceiling"}
bw, gemm = ceil.get("copy_GBps"), ceil.get("bf16_gemm_TFLOPs")
print(f"Ceilings: copy {bw:.0f} GB/s, GEMV bf16 {ceil.get('gemv_bf16_GBps', 0):.0f} GB/s, "
      f"bf16 GEMM {gemm:.1f} TFLOP/s\n")
m = next((r for r in rows if r["kind"] == "model"), None)
if m:
    q = m.get("quantize", "none")
    if q == "none":
        print(f"Model: {m['layers']} layers, {int(m['params'])/1e9:.1f} B parameters, "
              f"{m['weight_GB']} GB of bf16 weights (random, made on the GPU)\n")
    else:
        print(f"Model: {m['layers']} layers, {int(m['params'])/1e9:.1f} B parameters, weights "
              f"{m.get('format', q).strip(chr(34))}: {m.get('resident_GB', '?')} GB resident on the GPU "
              f"({m['weight_GB']} GB as bf16; random, made on the GPU in that form)\n")
print("| decode | variant | sample | ctx | batch | ms / step | tokens/s | roofline ms | of roofline | kernels / step "
      "| GPU memory |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
done = set()
step_ms = {}
for r in rows:
    if r["kind"] != "decode":
        continue
    key = (r.get("tag", "-"), r.get("sample", "logits"), r["ctx"], r["batch"])
    if key in done:
        continue
    done.add(key)
    if "error" in r:
        print(f"| | {key[0]} | {key[1]} | {r['ctx']} | {r['batch']} | {r['error']} | | | | | |")
        continue
    roof = float(r["bytes"]) / (bw * 1e9) * 1e3
    ms = float(r["ms_per_step"])
    step_ms[(key[0], key[1], r["ctx"], r["batch"])] = ms
    print(f"| | {key[0]} | {key[1]} | {r['ctx']} | {r['batch']} | {ms:.2f} | {float(r['tokens_per_s']):.0f} "
          f"| {roof:.2f} | {roof / ms:.0%} | {r.get('kernels', '')} | {r['gpu_GB']} GB |")
kern = [r for r in rows if r["kind"] == "kernel"]
for key in sorted({(r["tag"], r.get("sample", "greedy"), r["ctx"], r["batch"]) for r in kern},
                  key=lambda k: (k[2], int(k[3]), k[0] != "base")):
    ms = step_ms.get(key)
    tot = next((r for r in rows if r["kind"] == "kernel_total" and
                (r["tag"], r.get("sample", "greedy"), r["ctx"], r["batch"]) == key), None)
    print(f"\nKernels of a decode step ({key[0]}, {key[1]}, ctx {key[2]}, batch {key[3]}; Nsight Compute, one kernel "
          "at a time"
          + (f"; {tot['launches_per_step']} launches, {float(tot['us_per_step']) / 1e3:.2f} ms of kernel time"
             if tot else "") + (f" in a {ms:.2f} ms step" if ms else "") + "):\n")
    print("| kernel | per step | µs per step | share of step |")
    print("|---|---:|---:|---:|")
    for r in kern:
        if (r["tag"], r.get("sample", "greedy"), r["ctx"], r["batch"]) != key:
            continue
        us = float(r["us_per_step"])
        share = f"{us / (ms * 1e3):.1%}" if ms else ""
        print(f"| `{r['name'].strip(chr(34))}` | {r['per_step']} | {us:.1f} | {share} |")
print("\n| prefill | tokens | s | tokens/s | TFLOP/s | roofline s | of roofline | GPU memory |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
seen = set()
for r in rows:
    if r["kind"] != "prefill" or r["T"] in seen:
        continue
    seen.add(r["T"])
    roof = float(r["flops"]) / (gemm * 1e12)
    print(f"| | {r['T']} | {float(r['s']):.3f} | {r['tokens_per_s']} | {r['tflops']} | {roof:.3f} "
          f"| {roof / float(r['s']):.0%} | {r['gpu_GB']} GB |")
for p in [r for r in rows if r["kind"] == "decode_parts"]:
    print(f"\nDecode step by part ({p.get('tag', '-')}, ctx {p['ctx']}, batch {p['batch']}; graphs off, every op "
          f"waited for, {p['ms_per_step_nograph_synced']} ms in all): " +
          ", ".join(f"{k} {p[k]} ms" for k in ("linear", "kda", "mla", "moe", "logits", "other")))
smp = [r for r in rows if r["kind"] == "sample"]
if smp:
    bs = sorted({int(r["batch"]) for r in smp})
    print(f"\n| device sampler alone (V {smp[0]['V']}) | logits | " + " | ".join(f"batch {b} ms" for b in bs) + " |")
    print("|---|---|" + "---:|" * len(bs))
    for key in dict.fromkeys((r["setting"], r["logits"]) for r in smp):
        vals = {int(r["batch"]): r["ms"] for r in smp if (r["setting"], r["logits"]) == key}
        print(f"| {key[0]} | {key[1]} | " + " | ".join(vals.get(b, "") for b in bs) + " |")
dr = [r for r in rows if r["kind"] == "drift"]
if dr:
    print("\n| bf16 KDA state (rounded at every store) vs fp32 state | precision | steps | logits rel. diff., first 100 "
          "| last 100 | max | greedy ids agreeing |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in dr:
        print(f"| {r['model']} | {r['precision']} | {r['steps']} | {r['relerr_first100']} | {r['relerr_last100']} "
              f"| {r['relerr_max']} | {r['greedy_agree']} of {r['steps']} |")
kda = {r["T"]: float(r["ms"]) for r in rows if r["kind"] == "kda"}
fla = {r["T"]: float(r["ms"]) for r in rows if r["kind"] == "fla" and "ms" in r}
if kda:
    print("\n| KDA op alone (H=32, K=V=128) | tokens | ours (fp32) ms | fla chunk_kda (bf16) ms | ours / fla speed |")
    print("|---|---:|---:|---:|---:|")
    for T, ms in kda.items():
        f = fla.get(T)
        print(f"| | {T} | {ms:.2f} | {f'{f:.2f}' if f else 'n/a'} | {f'{f / ms:.2f}x' if f else ''} |")
