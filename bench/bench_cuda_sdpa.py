"""bench_cuda_sdpa.py — PyTorch's scaled_dot_product_attention with the cuDNN
backend, the reference for our MLA prefill attention (bench_cuda mla), timed
on the same GPU and shapes, for bench/results/cuda.md.

    python3 bench/bench_cuda_sdpa.py T1,T2,...

Shapes as the 48B model's MLA prefill: one sequence, 32 heads, q/k head 192
(128 nope + 64 rope), v head 128, bf16, causal, T queries over T keys.
(PyTorch's flash backend refuses q/k 192 with v 128; cuDNN's runs them.)
Each length runs twice (the first pays cuDNN's plan building); the second is
reported.  Time: CUDA events around each call, median of the repetitions,
after warm-up.  FLOPs as bench_cuda counts them: 2 H T (T + 1) / 2 (192 + 128).
Prints "RESULT kind=sdpa ..." lines.
"""
import sys

import torch

H, DQK, DV = 32, 192, 128
Ts = [int(t) for t in sys.argv[1].split(",")]

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except Exception as e:  # noqa: BLE001 - report any import failure and stop
    print(f"RESULT kind=sdpa error=\"import failed: {type(e).__name__}: {e}\"", flush=True)
    sys.exit(0)


def time_once(T, reps):
    q = torch.randn(1, H, T, DQK, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, H, T, DQK, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, H, T, DV, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
    ok = bool(torch.isfinite(o).all())
    del q, k, v, o
    torch.cuda.empty_cache()
    times.sort()
    return times[len(times) // 2], ok


torch.manual_seed(0)
for T in Ts:
    try:
        reps = 3 if T >= 65536 else 5 if T >= 16384 else 11
        time_once(T, reps)  # first run: plans, autotuning, allocator
        ms, ok = time_once(T, reps)
        flops = 2.0 * H * (T * (T + 1) / 2) * (DQK + DV)
        print(f"RESULT kind=sdpa backend=cudnn Ha={H} Dqk={DQK} Dv={DV} T={T} ms={ms:.3f} "
              f"tflops={flops / (ms * 1e-3) / 1e12:.1f} finite={int(ok)}", flush=True)
    except Exception as e:  # noqa: BLE001 - one failing size must not stop the others
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        print(f"RESULT kind=sdpa backend=cudnn Ha={H} T={T} error=\"{msg}\"", flush=True)
        torch.cuda.empty_cache()
