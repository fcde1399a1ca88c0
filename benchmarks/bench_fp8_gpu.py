"""Training speed of gigatron's Llama in bf16, bf16 + torch.compile of the blocks, and FP8, next to Hugging
Face transformers' LlamaForCausalLM (SDPA), the same architecture in the same run.

GPU (the issue's benchmark): Llama 3 8B width (dim 4096, 32 heads, 8 KV heads, SwiGLU 14336, vocabulary
128,256), 8 layers, one sequence of 8,192 tokens per step, on one GPU. Printed and written to JSON:
- tokens/s and MFU of every variant (rows "ours" = bf16 eager, "ours_compile" = blocks compiled,
  "ours_fp8", "hf_sdpa"; MFU = model FLOPs of core/families/llama3.flops_per_sample over the device's dense bf16
  peak, core/metrics.PEAK_FLOPS; FP8 runs are quoted against the same bf16 peak, as torchtitan does),
  and ratios: FP8 / bf16, ours bf16 / transformers;
- the transformer layers alone (the blocks' forward + backward on fixed hidden states, every block
  linear in FP8), FP8 / bf16: the part FP8 accelerates, without the bf16 embedding / output / loss.
FP8 comes from parallel/fp8.py with fp8.backend=auto: Transformer Engine where installed, else torchao,
else gigatron's Fp8Linear calling torch._scaled_mm (tensorwise scaling); the JSON says which.
Parameters in bf16 with a fused AdamW for every variant (throughput, not the engine's fp32-master
policy), so the comparison is the model code alone.

CPU (no GPU): the same code on small shapes in fp32 (FP8 emulated, no compile), so CI exercises it; the
ratios then say nothing about GPU speed.

    python benchmarks/bench_fp8_gpu.py --out benchmarks/results/bench_fp8_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from gigatron.core.config import Config, Fp8Config
from gigatron.core.family import get_family
from gigatron.core.metrics import device_peak_flops
from gigatron.core.models.llama import LlamaConfig
from gigatron.parallel.fp8 import apply_fp8, resolve_backend
from gigatron.parallel.parallelize import init_weights

GPU_SHAPE = dict(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256)
CPU_SHAPE = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=258)


def _config(shape: dict, seq: int, fp8: bool, keep_bf16=None) -> Config:
    cfg = Config(model=LlamaConfig(**shape, max_seq_len=max(seq, 8192), document_mask=False))
    cfg.train.seq_len = seq
    cfg.fp8 = Fp8Config(enabled=fp8, recipe="tensorwise")
    if keep_bf16 is not None:
        cfg.fp8.keep_bf16 = keep_bf16
    return cfg


def build_ours(cfg, device, dtype, compile_blocks=False):
    """As the trainer builds it: on meta, FP8 conversion (parallel/fp8.py), then allocated on the device and
    initialised there; parameters cast to `dtype` (the FP8 scaling buffers stay fp32)."""
    family = get_family("llama3")
    with torch.device("meta"):
        model = family.build(cfg.model)
    apply_fp8(model, None, cfg, family.plan, cfg.model.n_layers)
    model.to_empty(device=device)
    init_weights(model, family, cfg, seed=0)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if compile_blocks:
        for block in model.layers.values():
            block.compile()  # as parallelize.py step 4 (train.compile)
    return model


def build_hf(cfg, device, dtype):
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    m = cfg.model
    hf = HFConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
                  num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
                  rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_seq_len, tie_word_embeddings=False,
                  rope_theta=m.rope_theta, attn_implementation="sdpa")
    return LlamaForCausalLM(hf).to(device, dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, loss_fn, tokens, steps, warmup, device) -> float:
    """Median seconds of a training step (forward, backward, fused AdamW where available)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        loss_fn(model, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def hf_loss(model, tokens):
    logits = model(input_ids=tokens[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def time_layers(model, seq, steps, warmup, device, dtype) -> float:
    """Median seconds of forward + backward through the blocks alone, on fixed hidden states."""
    m = model.cfg
    h0 = torch.randn(1, seq, m.dim, device=device, dtype=dtype, requires_grad=True)
    positions = torch.arange(seq, device=device)
    angles = positions.float()[:, None] * model.rope_inv_freq[None, :]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        h = h0
        for layer in model.layers.values():
            h = layer(h, cos, sin, positions, None)
        h.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, autotune)")
    parser.add_argument("--seq", type=int, default=0, help="tokens per sequence (default 8192 GPU, 64 CPU)")
    parser.add_argument("--layers", type=int, default=0, help="blocks (default 8 GPU, 3 CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(1)  # tiny shapes: more threads only contend (restored at the end)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    shape = dict(GPU_SHAPE if gpu else CPU_SHAPE)
    shape["n_layers"] = args.layers or shape["n_layers"]
    seq = args.seq or (8192 if gpu else 64)
    torch.manual_seed(0)
    tokens = torch.randint(0, shape["vocab_size"], (1, seq + 1), device=device)
    base = _config(shape, seq, fp8=False)
    flops_per_token = get_family("llama3").flops_per_sample(base) / seq
    peak = device_peak_flops()
    fp8_cfg = _config(shape, seq, fp8=True)
    backend = resolve_backend(fp8_cfg.fp8, tp=1)
    variants = [("ours", base, False), ("ours_fp8", fp8_cfg, False)]
    if gpu and not args.no_compile:
        variants.append(("ours_compile", base, True))
    results, layer_times = {}, {}
    for name, cfg, comp in variants:
        model = build_ours(cfg, device, dtype, compile_blocks=comp)
        results[name] = time_steps(model, ours_loss, tokens, args.steps, args.warmup, device)
        del model
        _free()
    for name, keep in (("base", None), ("fp8", [])):  # the layers alone: every block linear in FP8
        cfg = _config(shape, seq, fp8=name == "fp8", keep_bf16=keep)
        model = build_ours(cfg, device, dtype)
        layer_times[name] = time_layers(model, seq, args.steps, args.warmup, device, dtype)
        del model
        _free()
    if not args.no_hf:
        model = build_hf(base, device, dtype)
        results["hf_sdpa"] = time_steps(model, hf_loss, tokens, args.steps, args.warmup, device)
        del model
        _free()
    rows = {}
    for name, t in results.items():
        tps = seq / t
        rows[name] = {"step_s": t, "tokens_per_s": tps, "mfu": tps * flops_per_token / peak if peak else None}
    ratios = {"fp8_over_base": results["ours"] / results["ours_fp8"],
              "layers_fp8_over_base": layer_times["base"] / layer_times["fp8"]}
    if "ours_compile" in results:
        ratios["compile_over_eager"] = results["ours"] / results["ours_compile"]
    if "hf_sdpa" in results:
        ratios["ours_over_hf"] = results["hf_sdpa"] / results["ours"]
        ratios["ours_best_over_hf"] = results["hf_sdpa"] / min(results.values())
    out = {"benchmark": "bench_fp8_gpu", "date": time.strftime("%Y-%m-%d"), "device":
           torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()})",
           "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "shape": shape, "seq_len": seq,
           "fp8_backend": backend, "fp8_recipe": "tensorwise", "peak_flops": peak, "variants": rows,
           "layers_only_s": layer_times, "ratios": ratios,
           "note": "" if gpu else "CPU path: small fp32 shapes, FP8 emulated; exercises the code, not a speed figure"}
    for name, r in rows.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{name:>13}: {r['tokens_per_s']:10.1f} tokens/s  MFU {mfu}")
    print(f"   layers only: {str(dtype)[6:]} {layer_times['base'] * 1e3:.1f} ms, fp8 {layer_times['fp8'] * 1e3:.1f} ms "
          f"(fp8 backend {backend})")
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}x")
    torch.set_num_threads(threads)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
