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
    print(f"Model: {m['layers']} layers, {int(m['params'])/1e9:.1f} B parameters, "
          f"{m['weight_GB']} GB of bf16 weights (random, made on the GPU)\n")
print("| decode | ctx | batch | ms / step | tokens/s | roofline ms | of roofline | GPU memory |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
done = set()
for r in rows:
    if r["kind"] != "decode" or (r["ctx"], r["batch"]) in done:
        continue
    done.add((r["ctx"], r["batch"]))
    if "error" in r:
        print(f"| | {r['ctx']} | {r['batch']} | {r['error']} | | | | |")
        continue
    roof = float(r["bytes"]) / (bw * 1e9) * 1e3
    ms = float(r["ms_per_step"])
    print(f"| | {r['ctx']} | {r['batch']} | {ms:.2f} | {float(r['tokens_per_s']):.0f} | {roof:.2f} "
          f"| {roof / ms:.0%} | {r['gpu_GB']} GB |")
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
parts = [r for r in rows if r["kind"] == "decode_parts"]
if parts:
    p = parts[-1]
    print(f"\nDecode step by part (ctx {p['ctx']}, batch {p['batch']}; graphs off, every op waited for, "
          f"{p['ms_per_step_nograph_synced']} ms in all): " +
          ", ".join(f"{k} {p[k]} ms" for k in ("linear", "kda", "mla", "moe", "logits", "other")))
kda = {r["T"]: float(r["ms"]) for r in rows if r["kind"] == "kda"}
fla = {r["T"]: float(r["ms"]) for r in rows if r["kind"] == "fla" and "ms" in r}
if kda:
    print("\n| KDA op alone (H=32, K=V=128) | tokens | ours (fp32) ms | fla chunk_kda (bf16) ms | ours / fla speed |")
    print("|---|---:|---:|---:|---:|")
    for T, ms in kda.items():
        f = fla.get(T)
        print(f"| | {T} | {ms:.2f} | {f'{f:.2f}' if f else 'n/a'} | {f'{f / ms:.2f}x' if f else ''} |")
