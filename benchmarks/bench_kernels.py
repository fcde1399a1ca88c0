"""Fused kernels vs the unfused PyTorch composition they replace, forward + backward.

Ops: RMSNorm, SwiGLU gate, RoPE (gigatron.kernels.{rmsnorm,swiglu,rope}) and the chunked cross-
entropy (gigatron.kernels.chunked_cross_entropy) against h @ W^T followed by F.cross_entropy.
GPU (torch.cuda.is_available()): bf16, model-sized shapes, ours = impl="triton", timed with CUDA events,
peak memory from torch.cuda.max_memory_allocated.
CPU: fp32, small shapes, ours = impl="torch" (the reference paths; the Triton interpreter is far too
slow to time), peak memory = the largest single tensor any op returns (a TorchDispatchMode; CPU has no
allocator statistics). On CPU the ratios say what the reorganisation costs or saves in PyTorch ops,
not what the kernels will do on a GPU.

Runs are interleaved round-robin so machine noise hits both candidates alike; GPU: median, CPU: min.
Prints one line per op with time ratio ours / unfused (< 1: ours faster) and memory ratio, and writes
everything to --out as JSON.

    python benchmarks/bench_kernels.py --out benchmarks/results/bench_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gigatron.kernels.chunked_cross_entropy import chunked_cross_entropy
from gigatron.kernels.rmsnorm import rms_norm
from gigatron.kernels.rope import apply_rope
from gigatron.kernels.swiglu import swiglu


def _unfused_rmsnorm(x, w, eps=1e-5):  # core/models/llama.py RMSNorm
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * w


def _unfused_rope(x, cos, sin):  # core/models/llama.py apply_rope
    x1, x2 = x.chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1).float() * sin).type_as(x)


def _unfused_ce(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, reduction="sum")


def cases(device, dtype, impl, quick):
    """name -> (make inputs, ours(inputs) -> loss-like output, unfused(inputs) -> output)."""
    gpu = device.type == "cuda"
    B, T, dim, ffn, H, D, V = (4, 4096, 4096, 14336, 32, 128, 128256) if gpu else (2, 256, 256, 688, 4, 64, 8192)
    if quick:
        T, V = T // 4, V // 4

    def mk(*shape, scale=1.0):
        return lambda: (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    def rope_inputs():
        x = mk(B, T, H, D)().transpose(1, 2)  # (B, H, T, D) strided, as in the model
        ang = torch.arange(T, device=device)[:, None].float() * torch.rand(D // 2, device=device)
        return x, torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def ce_inputs():
        N = B * T // (2 if gpu else 1)
        return (mk(N, dim)(), mk(V, dim, scale=dim ** -0.5)(), torch.randint(0, V, (N,), device=device))

    return {
        "rmsnorm": (lambda: (mk(B, T, dim)(), mk(dim)()), lambda x, w: rms_norm(x, w, impl=impl), _unfused_rmsnorm),
        "swiglu": (lambda: (mk(B, T, ffn)(), mk(B, T, ffn)()), lambda a, b: swiglu(a, b, impl=impl),
                   lambda a, b: F.silu(a) * b),
        "rope": (rope_inputs, lambda x, c, s: apply_rope(x, c, s, impl=impl), _unfused_rope),
        # chunk: 1/8 of the rows on CPU (the default 256 MiB budget would make one chunk of these shapes)
        "chunked_cross_entropy": (ce_inputs, lambda h, w, y: chunked_cross_entropy(
            h, w, y, impl=impl, chunk_size=None if gpu else max(1, h.shape[0] // 8)), _unfused_ce),
    }


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _step(fn, inputs):
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(out.float().sum(), leaves)


def _time_once(fn, inputs, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(fn, inputs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    _step(fn, inputs)
    return time.perf_counter() - t0


def _peak_bytes(fn, inputs, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _LargestTensor() as mode:
        _step(fn, inputs)
    return mode.largest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "bench_kernels.json"),
                   help="JSON output path (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per op (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per candidate (default: %(default)s)")
    p.add_argument("--ops", nargs="*", default=None, help="subset of ops (default: all)")
    p.add_argument("--quick", action="store_true", help="quarter-size sequences / vocabulary")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads (default: torch's). On a shared, busy machine use 1: "
                        "2-thread barriers in many small ops (the chunked paths) then wait on the scheduler")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, impl = (torch.bfloat16, "triton") if device.type == "cuda" else (torch.float32, "torch")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "dtype": str(dtype), "ours_impl": impl, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "ops": {}}
    for name, (make, ours, unfused) in cases(device, dtype, impl, args.quick).items():
        if args.ops and name not in args.ops:
            continue
        torch.manual_seed(0)
        inputs = make()
        fns = {"ours": ours, "unfused": unfused}
        for fn in fns.values():
            for _ in range(args.warmup):
                _step(fn, inputs)
        times = {n: [] for n in fns}
        for _ in range(args.reps):
            for n, fn in fns.items():
                times[n].append(_time_once(fn, inputs, device))
        pick = (lambda ts: sorted(ts)[len(ts) // 2]) if device.type == "cuda" else min
        sec = {n: pick(ts) for n, ts in times.items()}
        mem = {n: _peak_bytes(fn, inputs, device) for n, fn in fns.items()}
        row = {"seconds": sec, "peak_bytes": mem, "time_ratio": sec["ours"] / sec["unfused"],
               "memory_ratio": mem["ours"] / max(mem["unfused"], 1),
               "shapes": [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]}
        results["ops"][name] = row
        print(f"{name:24s} ours {sec['ours'] * 1e3:8.2f} ms  unfused {sec['unfused'] * 1e3:8.2f} ms  "
              f"time ratio {row['time_ratio']:.2f}  peak-memory ratio {row['memory_ratio']:.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
