#!/usr/bin/env python3
"""cuda-table.py RESULTS_LOG — the RESULT lines of bench/bench-cuda.sh as the
markdown tables of bench/results/cuda.md (rooflines from the measured ceilings:
decode = bytes of active weights, KDA state and MLA cache read per step over
the copy bandwidth; prefill = FLOPs over the bf16 GEMM rate, the higher of ours
and PyTorch's), the MoE op alone (kind=moe: its expert products against that
ceiling), and the operators against their references in the same run: ours
(kind=kda / kind=mla, one column per variant=) against theirs (kind=fla by
dtype, kind=sdpa by backend), per number of tokens T, with the speed ratio
theirs ms / ours ms (above 1: ours faster).  Where a line repeats (fla timed
twice: the second after its autotuning), the last one counts."""
import re
import sys

rows = []
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        rows.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line[7:])))
ceil = {r["what"]: float(r["value"]) for r in rows if r["kind"] == "ceiling"}
bw, gemm = ceil.get("copy_GBps") or 0, ceil.get("bf16_gemm_TFLOPs") or 0
torch_gemm = ceil.get("torch_bf16_gemm_TFLOPs", 789.0)
gemm_ceiling = max(gemm, torch_gemm)
print(f"Ceilings: copy {bw:.0f} GB/s, GEMV bf16 {ceil.get('gemv_bf16_GBps', 0):.0f} GB/s, "
      f"bf16 GEMM {gemm:.1f} TFLOP/s (ours; PyTorch's {torch_gemm:.0f}: prefill rooflines use "
      f"{gemm_ceiling:.0f})\n")
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
if any(r["kind"] == "decode" for r in rows):
    print("| decode | variant | sample | ctx | batch | ms / step | tokens/s | roofline ms | of roofline "
          "| kernels / step | GPU memory |")
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
if any(r["kind"] == "prefill" for r in rows):
    print("\n| prefill | variant | tokens | s | tokens/s | TFLOP/s | roofline s | of roofline | GPU memory |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
seen = set()
for r in rows:
    key = (r.get("tag", "-"), r.get("T"))
    if r["kind"] != "prefill" or key in seen:
        continue
    seen.add(key)
    if "error" in r:
        print(f"| | {key[0]} | {r['T']} | {r['error']} | | | | | |")
        continue
    # the ceiling: the higher of the line's own (bench_cuda --ceiling-tflops) and this log's
    c = max(float(r.get("ceiling_tflops", 0)), gemm_ceiling)
    roof = float(r["flops"]) / (c * 1e12)
    print(f"| | {key[0]} | {r['T']} | {float(r['s']):.3f} | {r['tokens_per_s']} | {r['tflops']} | {roof:.3f} "
          f"| {roof / float(r['s']):.0%} | {r['gpu_GB']} GB |")
for p in [r for r in rows if r["kind"] == "prefill_parts"]:
    tot = float(p["s_synced"])
    print(f"\nPrefill of {p['T']} tokens by part ({p.get('tag', '-')}; every op waited for, {tot:.3f} s in all): " +
          ", ".join(f"{k} {float(p[k]):.3f} s ({float(p[k]) / tot:.0%})"
                    for k in ("linear", "kda", "mla", "moe", "logits", "other")))
moe = [r for r in rows if r["kind"] == "moe"]
if moe:
    r0 = moe[0]
    print(f"\n| MoE op alone (D {r0['D']}, {r0['E']} experts top {r0['k']} + {r0['shared']} shared, F {r0['F']}, bf16) "
          "| tokens | op ms | op TFLOP/s | expert products ms | of which shared | rest of the op ms "
          "| products TFLOP/s | of the bf16 GEMM ceiling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    last = {(r["variant"], r["T"]): r for r in moe}
    for (v, T), r in last.items():
        if "products_ms" in r:
            print(f"| {v} | {T} | {float(r['ms']):.2f} | {r['op_tflops']} | {float(r['products_ms']):.2f} "
                  f"| {float(r['shared_ms']):.2f} | {float(r['other_ms']):.2f} | {r['products_tflops']} "
                  f"| {float(r['pct_of_ceiling']):.0f}% of {float(r['ceiling_tflops']):.0f} |")
        else:
            print(f"| {v} | {T} | {float(r['ms']):.2f} | {r['op_tflops']} | | | | | |")
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


def ours_vs_theirs(title, ours_kind, ours_default, theirs_kinds, theirs_key):
    """One table: a row per T; ours per variant= or path= (ours_default where
    the line has neither; a tag= other than "-" labels it too), theirs per
    kind (theirs_kinds: kind -> label prefix) and theirs_key; then each of ours
    against each of theirs as theirs ms / ours ms (the last line of each
    (label, T) counts)."""
    ours, theirs = {}, {}
    for r in rows:
        if "ms" not in r or "T" not in r:
            continue
        if r["kind"] == ours_kind:
            label = r.get("variant") or (f"ours {r['path']}" if "path" in r else ours_default)
            if "tag" in r and r["tag"] not in ("", "-"):
                label += f" ({r['tag']})"
            ours[(label, int(r["T"]))] = float(r["ms"])
        elif r["kind"] in theirs_kinds:
            theirs[(f"{theirs_kinds[r['kind']]} {r.get(theirs_key, '?')}", int(r["T"]))] = float(r["ms"])
    if not ours:
        return
    ov = list(dict.fromkeys(v for v, _ in ours))
    tv = list(dict.fromkeys(v for v, _ in theirs))
    Ts = sorted({T for _, T in ours} | {T for _, T in theirs})
    ratios = [(o, t) for o in ov for t in tv]
    print(f"\n| {title} | tokens | " + " | ".join(f"{v} ms" for v in ov + tv) +
          "".join(f" | {o} vs {t}" for o, t in ratios) + " |")
    print("|---|---:|" + "---:|" * (len(ov) + len(tv) + len(ratios)))
    for T in Ts:
        cells = [f"{ours[(v, T)]:.2f}" if (v, T) in ours else "" for v in ov]
        cells += [f"{theirs[(v, T)]:.2f}" if (v, T) in theirs else "n/a" for v in tv]
        cells += [f"{theirs[(t, T)] / ours[(o, T)]:.2f}x" if (o, T) in ours and (t, T) in theirs else ""
                  for o, t in ratios]
        print(f"| | {T} | " + " | ".join(cells) + " |")


ours_vs_theirs("KDA op alone (H=32, K=V=128)", "kda", "ours fp32",
               {"fla": "fla chunk_kda", "fla_layer": "fla conv+chunk_kda+norm"}, "dtype")
ours_vs_theirs("MLA prefill attention (32 heads, q/k 192, v 128, causal)", "mla", "ours", {"sdpa": "torch sdpa"},
               "backend")
