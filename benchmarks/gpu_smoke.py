"""GPU smoke check: the first things to run when a GPU is lent. Under 5 minutes on one H100/H200,
no network, the machine's own torch (>= 2.11) and Triton; data is the Python standard library's own
source on byte tokens (no tokenizer download). Prints PASS / FAIL per check and writes a JSON.

    python benchmarks/gpu_smoke.py [--out benchmarks/results/gpu_smoke.json] [--only attention,train,resume]

1. attention: gigatron's Triton flash attention against the PyTorch reference at real sizes: bf16,
   8,192 tokens, head dim 128, GQA (32 query / 8 KV heads), causal with and without document masks,
   forward and backward; max errors and the TFLOP/s of each (causal FLOPs counted as half).
   The reference materialises T x T scores, so it runs on the first KV group only (4 query heads).
2. train: the debug recipe for 20 steps in bf16 with the Triton kernels (1 process): the loss falls.
3. resume: 10 steps with a checkpoint at 5, killed (SIGKILL) after the checkpoint and resumed, in
   deterministic mode (train.deterministic=true): final weights and AdamW state bitwise equal to an
   uninterrupted run.

Without a GPU, check 1 is skipped (said so) and checks 2-3 run on the CPU in fp32, which proves the
script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes/llama3_debug.yaml")
SMALL = ["data.tokenizer=bytes", "model.vocab_size=258", "data.max_mb=2", "parallel.dp=1", "run.tensorboard=false",
         "run.progress=false", "train.warmup_steps=2"]


def check_attention(results: dict) -> bool:
    import torch

    from gigatron.kernels.attention import attention

    if not torch.cuda.is_available():
        results["attention"] = {"status": "SKIP", "why": "no CUDA device"}
        return True
    torch.manual_seed(0)
    B, H, HKV, T, D = 1, 32, 8, 8192, 128
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, H, T, D, device=dev, dtype=dt)
    k, v = (torch.randn(B, HKV, T, D, device=dev, dtype=dt) for _ in range(2))
    dout = torch.randn(B, H, T, D, device=dev, dtype=dt)
    docs = (torch.arange(T, device=dev) // 1000).expand(B, T).contiguous()  # 9 documents
    out, ok = {}, True
    for case, seg in (("causal", None), ("causal+documents", docs)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
        for _ in range(2):  # warm-up: autotune and compile
            o = attention(*leaves, backend="triton", **kw)
            o.backward(dout)
        torch.cuda.synchronize()
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        o = attention(*leaves, backend="triton", **kw)
        mid.record()
        o.backward(dout)
        end.record()
        torch.cuda.synchronize()
        flops = 4 * B * H * T * T * D * 0.5  # causal: half the score matrix
        fwd_s, bwd_s = start.elapsed_time(mid) / 1e3, mid.elapsed_time(end) / 1e3
        # reference on the first KV group (4 query heads): fp32 math on bf16 inputs
        G = H // HKV
        ref_leaves = [q[:, :G].clone().requires_grad_(), k[:, :1].clone().requires_grad_(),
                      v[:, :1].clone().requires_grad_()]
        r = attention(*ref_leaves, backend="torch", **kw)
        r.backward(dout[:, :G])
        err = {"out": (o[:, :G] - r).abs().max().item(),
               "dq": (leaves[0].grad[:, :G] - ref_leaves[0].grad).abs().max().item()}
        good = err["out"] <= 2e-2 and err["dq"] <= 5e-2  # bf16 inputs; the reference accumulates in fp32
        ok &= good
        out[case] = {"errors": err, "forward_tflops": flops / fwd_s / 1e12, "backward_tflops": 2.5 * flops / bwd_s / 1e12,
                     "status": "PASS" if good else "FAIL"}
        print(f"attention {case:<18} out err {err['out']:.2e} dq err {err['dq']:.2e} "
              f"fwd {out[case]['forward_tflops']:.0f} TFLOP/s bwd {out[case]['backward_tflops']:.0f} TFLOP/s "
              f"{out[case]['status']}")
    results["attention"] = out
    return ok


def _train_args(run_dir: str, extra: list[str]) -> list[str]:
    args = [RECIPE, "--set", f"run.dir={run_dir}"]
    for o in SMALL + extra:
        args += ["--set", o]
    return args


def _dtype_flags(gpu: bool) -> list[str]:
    return ["train.dtype=bfloat16", "model.attention_backend=triton"] if gpu else ["train.dtype=float32"]


def check_train(results: dict, work: str, gpu: bool) -> bool:
    run_dir = os.path.join(work, "train")
    cmd = [sys.executable, "-m", "gigatron.core.train", *_train_args(run_dir, ["train.steps=20",
                                                                             f"data.path={work}/data/bytes"]
                                                                    + _dtype_flags(gpu))]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))] if proc.returncode == 0 else []
    losses = [r["loss"] for r in rows]
    ok = proc.returncode == 0 and len(losses) == 20 and sum(losses[-5:]) / 5 < losses[0] - 0.5
    results["train"] = {"status": "PASS" if ok else "FAIL", "first_loss": losses[0] if losses else None,
                        "last5_mean": sum(losses[-5:]) / 5 if losses else None, "seconds": time.time() - start,
                        "tokens_per_s": rows[-1].get("tokens_per_s") if rows else None,
                        "mfu": rows[-1].get("mfu") if rows else None,
                        "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}
    print(f"train     20 steps: loss {results['train']['first_loss']} -> {results['train']['last5_mean']} "
          f"{results['train']['status']}")
    return ok


def check_resume(results: dict, work: str, gpu: bool) -> bool:
    from gigatron.core.checkpoint.reader import CheckpointReader

    import torch

    extra = ["train.steps=10", "checkpoint.interval=5", "train.deterministic=true", f"data.path={work}/data/bytes"]
    extra += _dtype_flags(gpu)
    ref, killed = os.path.join(work, "ref"), os.path.join(work, "killed")
    run = lambda d: [sys.executable, "-m", "gigatron.core.train", *_train_args(d, extra)]  # noqa: E731
    assert subprocess.run(run(ref), cwd=ROOT, capture_output=True, timeout=600).returncode == 0
    proc = subprocess.Popen(run(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pointer = os.path.join(killed, "checkpoints", "latest")
    deadline = time.time() + 600
    while not os.path.exists(pointer) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(run(killed), cwd=ROOT, capture_output=True, text=True, timeout=600)
    a = CheckpointReader(os.path.join(ref, "checkpoints", "step_00000010"))
    b = CheckpointReader(os.path.join(killed, "checkpoints", "step_00000010"))
    keys = [k for k in a.keys() if k.startswith(("model.", "optim."))]
    different = [k for k in keys if not torch.equal(a.read(k), b.read(k))]
    ok = resumed.returncode == 0 and bool(keys) and not different
    results["resume"] = {"status": "PASS" if ok else "FAIL", "killed_at": open(pointer).read().strip(),
                         "tensors": len(keys), "different": different[:5]}
    print(f"resume    killed after {results['resume']['killed_at']}, resumed: {len(keys)} tensors, "
          f"{len(different)} differ {results['resume']['status']}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/gpu_smoke.json"))
    parser.add_argument("--only", default="attention,train,resume")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    results = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if gpu else "cpu"}
    work = tempfile.mkdtemp(prefix="gigatron_smoke_")
    ok = True
    for name in args.only.split(","):
        try:
            ok &= {"attention": lambda: check_attention(results), "train": lambda: check_train(results, work, gpu),
                   "resume": lambda: check_resume(results, work, gpu)}[name]()
        except Exception as err:  # noqa: BLE001 - a smoke check reports, it does not crash
            results[name] = {"status": "FAIL", "error": repr(err)}
            print(f"{name:<9} FAIL: {err!r}")
            ok = False
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"{'PASS' if ok else 'FAIL'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
