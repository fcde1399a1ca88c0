"""Attention forward+backward throughput: gigatron kernels vs torch SDPA (and flash-attn when installed).

GPU (torch.cuda.is_available()): bf16, head dim 128, sequence 8K..73K, causal and bidirectional;
    ours = the Triton kernels (`attention(..., backend="triton")`; also with deterministic=True, the
    fixed configs, and with explicit arange positions as the engine passes them, which must take the
    same diagonal fast path), baselines = SDPA's flash backend and
    flash-attn's `flash_attn_func` if importable.
CPU: fp32, small shapes; ours = the pure-PyTorch path (`backend="torch"`), baselines = SDPA's math
    backend and SDPA's default CPU kernel. (The Triton interpreter is far too slow to time.)

FLOPs counted per call, the usual convention: forward 4 * B * H * T * S * D (two matmuls), backward
2.5x forward (five matmuls), halved for causal. TFLOP/s = FLOPs / time. The table prints the ratio
ours / best baseline per shape; `--out results.json` also writes everything as JSON.

    python benchmarks/bench_attention.py --out /tmp/attn.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gigatron.kernels import attention


def fwd_bwd_flops(B, H, T, S, D, causal):
    fwd = 4 * B * H * T * S * D
    return fwd * 3.5 * (0.5 if causal else 1.0)


def _run_once(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_round_robin(fns, device, warmup, reps):
    """Seconds per call for each fn: runs are interleaved (one of each per round) so that load changes on
    a shared machine hit all candidates alike. GPU: median; CPU: minimum (the least-disturbed run)."""
    times = {n: [] for n in fns}
    for n, fn in fns.items():
        for _ in range(warmup):
            fn()
    for _ in range(reps):
        for n, fn in fns.items():
            times[n].append(_run_once(fn, device))
    pick = (lambda ts: sorted(ts)[len(ts) // 2]) if device.type == "cuda" else min
    return {n: pick(ts) for n, ts in times.items()}


def make_impls(device):
    """name -> (layout, f(q, k, v, causal) -> out). layout "bhtd" = (B, H, T, D), "bthd" = (B, T, H, D)."""
    if device.type == "cuda":
        def sdpa_flash(q, k, v, causal):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def engine_positions(q, k, v, c):  # what core/models/attention.py passes: positions = arange(T)
            pos = torch.arange(q.shape[2], device=q.device)  # a new tensor per call: the range check syncs
            return attention(q, k, v, causal=c, q_positions=pos, kv_positions=pos, backend="triton")

        impls = {"ours (triton)": ("bhtd", lambda q, k, v, c: attention(q, k, v, causal=c, backend="triton")),
                 "ours (triton, deterministic)": ("bhtd", lambda q, k, v, c: attention(
                     q, k, v, causal=c, backend="triton", deterministic=True)),
                 "ours (triton, engine positions)": ("bhtd", engine_positions),
                 "sdpa flash": ("bhtd", sdpa_flash)}
        try:
            from flash_attn import flash_attn_func

            impls["flash-attn"] = ("bthd", lambda q, k, v, c: flash_attn_func(q, k, v, causal=c))
        except ImportError:
            pass
        return impls

    def sdpa_with(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    return {"ours (torch)": ("bhtd", lambda q, k, v, c: attention(q, k, v, causal=c, backend="torch")),
            "sdpa math": ("bhtd", sdpa_with(SDPBackend.MATH)),
            "sdpa cpu-flash": ("bhtd", sdpa_with(SDPBackend.FLASH_ATTENTION))}


def bench_shape(impls, B, H, T, D, causal, dtype, device, warmup, reps):
    g = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(B, H, T, D, generator=g, device=device, dtype=dtype) for _ in range(4)]
    flops = fwd_bwd_flops(B, H, T, T, D, causal)
    row, steps = {}, {}
    for name, (layout, fn) in impls.items():
        q, k, v, dout = (t.transpose(1, 2).contiguous() if layout == "bthd" else t for t in base)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

        def step(fn=fn, q=q, k=k, v=v, dout=dout):
            q.grad = k.grad = v.grad = None
            fn(q, k, v, causal).backward(dout)

        try:
            step()  # first call: compilation / autotuning, and a support check
            steps[name] = step
        except Exception as exc:  # e.g. a backend that does not support this shape / device
            row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    for name, sec in timed_round_robin(steps, device, warmup, reps).items():
        row[name] = {"ms": sec * 1e3, "tflops": flops / sec / 1e12}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {n: row[n] for n in impls}


def main(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write results as JSON to this path")
    p.add_argument("--seqs", type=int, nargs="+",
                   default=[8192, 16384, 32768, 65536, 73728] if gpu else [256, 512])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16 if gpu else 8)
    p.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--warmup", type=int, default=2 if gpu else 1)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)

    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    impls = make_impls(device)
    ours = next(iter(impls))
    modes = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    print(f"device={torch.cuda.get_device_name() if gpu else 'cpu'} dtype={dtype} batch={args.batch} "
          f"heads={args.heads} head_dim={args.head_dim}  (TFLOP/s, fwd+bwd)")
    print(f"{'seq':>7} {'mask':>6} " + " ".join(f"{n:>16}" for n in impls) + f" {'ours/best':>10}")
    results = []
    for causal in modes:
        for T in args.seqs:
            row = bench_shape(impls, args.batch, args.heads, T, args.head_dim, causal, dtype, device,
                              args.warmup, args.reps)
            best = max((r["tflops"] for n, r in row.items() if not n.startswith("ours") and "tflops" in r), default=None)
            ratio = row[ours]["tflops"] / best if best and "tflops" in row[ours] else None
            cells = " ".join(f"{r['tflops']:16.4g}" if "tflops" in r else f"{'error':>16}" for r in row.values())
            print(f"{T:>7} {'causal' if causal else 'full':>6} {cells} {ratio if ratio is None else f'{ratio:10.2f}'}")
            for n, r in row.items():
                if "error" in r:
                    print(f"        {n}: {r['error']}")
            results.append({"seq": T, "causal": causal, "batch": args.batch, "heads": args.heads,
                            "head_dim": args.head_dim, "dtype": str(dtype), "results": row, "ratio_ours_best": ratio})
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                "flops_convention": "fwd 4*B*H*T*S*D, bwd 2.5x fwd, causal x0.5"}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
