"""bench_cuda_fla.py — flash-linear-attention's chunk_kda (Triton), the reference
KDA prefill kernels, timed on the same GPU and shape as our KDA op
(bench_cuda kda), for bench/results/cuda.md.

    python3 bench/bench_cuda_fla.py FLA_DIR H K T1,T2,...

FLA_DIR holds the `fla` package (fetched source, carried to the GPU machine,
never committed).  chunk_kda runs with the gate, the q/k L2 norm and the beta
sigmoid fused in its kernels (as our op does them), an initial state and the
final state out; inputs bf16 (its usual precision) and, separately, fp32.
Our op additionally does the short convolutions and the gated output norm.
For a like-for-like row, "kind=fla_layer" (bf16) times the same work as our
op: fla's causal_conv1d (silu) on q, k and v with their conv tails, chunk_kda
as above, and fla's rms_norm_gated (sigmoid gate) on its output.
Time: triton.testing.do_bench, median, after warm-up.  Prints
"RESULT kind=fla ..." lines.
"""
import math
import os
import sys

import torch
import triton

sys.path.insert(0, sys.argv[1])
H, K = int(sys.argv[2]), int(sys.argv[3])
Ts = [int(t) for t in sys.argv[4].split(",")]

try:
    from fla.ops.kda import chunk_kda
except Exception as e:  # noqa: BLE001 - report any import failure and stop
    print(f"RESULT kind=fla error=\"import failed: {type(e).__name__}: {e}\"", flush=True)
    sys.exit(0)

torch.manual_seed(0)
dev = "cuda"
CONV_W = 4


def time_row(kind, dname, T, make_run):
    """One RESULT line: make_run() builds the inputs and returns run(), which
    returns (output, final state); timed after one call, both checked finite.
    Any failure (setup included) is reported as the row's error= and the
    next row goes on."""
    run = None
    try:
        run = make_run()
        o, ht = run()
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(o).all()) and bool(torch.isfinite(ht).all())
        del o, ht
        ms = triton.testing.do_bench(run, warmup=50, rep=300, return_mode="median")
        print(f"RESULT kind={kind} dtype={dname} H={H} K={K} T={T} ms={ms:.3f} "
              f"tokens_per_s={T / ms * 1e3:.0f} finite={int(ok)}", flush=True)
    except Exception as e:  # noqa: BLE001 - one failing row must not stop the others
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        print(f"RESULT kind={kind} dtype={dname} H={H} K={K} T={T} error=\"{msg}\"", flush=True)
    del run
    torch.cuda.empty_cache()


def gate_params():
    """A_log and dt_bias as Kimi Linear initialises them (fp32)"""
    A_log = torch.log(1 + 15 * torch.rand(H, device=dev, dtype=torch.float32))
    dt = torch.exp(math.log(1e-3) + torch.rand(H * K, device=dev) * (math.log(0.1) - math.log(1e-3)))
    return A_log, (dt + torch.log(-torch.expm1(-dt))).float()


def chunk_kda_run(T, dtype):
    """chunk_kda alone (kind=fla)"""
    q = torch.randn(1, T, H, K, device=dev, dtype=dtype)
    k = torch.randn(1, T, H, K, device=dev, dtype=dtype)
    v = torch.randn(1, T, H, K, device=dev, dtype=dtype)
    g = (torch.randn(1, T, H, K, device=dev) * 3).to(dtype)
    beta = (torch.randn(1, T, H, device=dev) * 2).to(dtype)
    A_log, dt_bias = gate_params()
    h0 = torch.zeros(1, H, K, K, device=dev, dtype=torch.float32)

    def run():
        return chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                         use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                         use_beta_sigmoid_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
    return run


def layer_run(T):
    """conv + chunk_kda + gated norm, bf16: the work of our KDA op (kind=fla_layer)"""
    from fla.modules.conv import causal_conv1d
    from fla.modules.fused_norm_gate import rms_norm_gated
    bf = torch.bfloat16
    D = H * K
    xq, xk, xv = (torch.randn(1, T, D, device=dev, dtype=bf) for _ in range(3))
    wq, wk, wv = (torch.randn(D, CONV_W, device=dev, dtype=bf) * 0.5 for _ in range(3))
    tails = [torch.randn(1, D, CONV_W, device=dev, dtype=bf) for _ in range(3)]
    g = (torch.randn(1, T, H, K, device=dev) * 3).to(bf)
    beta = (torch.randn(1, T, H, device=dev) * 2).to(bf)
    gate = torch.randn(1, T, H, K, device=dev, dtype=bf)
    wn = torch.ones(K, device=dev, dtype=bf)
    A_log, dt_bias = gate_params()
    h0 = torch.zeros(1, H, K, K, device=dev, dtype=torch.float32)

    def run():
        q, _ = causal_conv1d(xq, wq, None, initial_state=tails[0], activation="silu")
        k, _ = causal_conv1d(xk, wk, None, initial_state=tails[1], activation="silu")
        v, _ = causal_conv1d(xv, wv, None, initial_state=tails[2], activation="silu")
        o, ht = chunk_kda(q.view(1, T, H, K), k.view(1, T, H, K), v.view(1, T, H, K), g, beta,
                          initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                          use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, A_log=A_log,
                          dt_bias=dt_bias)
        return rms_norm_gated(o, gate, wn, None, activation="sigmoid", eps=1e-5), ht
    return run


# FLA_DTYPES=bf16 (or fp32): that input precision only
DTYPES = {"bf16": (torch.bfloat16,), "fp32": (torch.float32,)}.get(os.environ.get("FLA_DTYPES", ""),
                                                                   (torch.bfloat16, torch.float32))
for dtype in DTYPES:
    dname = str(dtype).split('.')[-1]
    for T in Ts:
        time_row("fla", dname, T, lambda: chunk_kda_run(T, dtype))
        if dtype == torch.bfloat16:
            time_row("fla_layer", dname, T, lambda: layer_run(T))
