"""Peak memory of `gigatron convert to-hf` on a ~1B-parameter checkpoint.

    python benchmarks/bench_convert.py [--work DIR] [--json OUT.json] [--dtype float32]

Builds a Llama (dim 2048, 16 layers, 32/8 heads, SwiGLU 5632, vocab 128256: 1.24B parameters) on
the meta device, fills it with random values one tensor at a time and saves it with DCP from a
single process (a model-only checkpoint, as `convert from-hf` writes). Then runs to-hf in a child
process and reads that child's peak RSS with os.wait4 (ru_maxrss: covers torch's own allocations,
which tracemalloc does not see). A child that only imports the same modules gives the fixed
overhead. The claim checked: peak RSS < 2 x largest tensor + overhead (streaming holds about one
tensor at a time; a whole-model conversion would need > 4 GB here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

GEN = r"""
import dataclasses, sys, warnings, torch
warnings.filterwarnings("ignore")
import torch.distributed.checkpoint as dcp
from gigatron.core.checkpoint.store import commit
from gigatron.core.config import Config
from gigatron.core.models.llama import LlamaConfig
from gigatron.core.models.llama import Llama
m = LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=5632, vocab_size=128256)
with torch.device("meta"):
    names = [(n, p.shape) for n, p in Llama(m).named_parameters()]
gen = torch.Generator().manual_seed(0)
state = {n: torch.randn(s, generator=gen, dtype=torch.float32).to(getattr(torch, sys.argv[2])) for n, s in names}
dcp.save({"model": state}, checkpoint_id=sys.argv[1] + ".tmp", no_dist=True)
commit(sys.argv[1] + ".tmp", sys.argv[1], None, {"step": 0}, dataclasses.asdict(Config(model=m)), {})
largest = max(t.numel() * t.element_size() for t in state.values())
print(sum(t.numel() for t in state.values()), largest)
"""
IMPORTS = "import torch, gigatron.core.convert.hf, gigatron.core.convert.cli, torch.distributed.checkpoint"


def peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    """(peak RSS bytes, seconds, stdout) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed:\n{out}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=None, help="scratch folder (needs ~2x the checkpoint size on disk)")
    parser.add_argument("--json", default="benchmarks/results/bench_convert.json")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_convert_")
    ckpt, out = os.path.join(work, "ckpt"), os.path.join(work, "hf")
    try:
        _, gen_s, gen_out = peak_rss([sys.executable, "-c", GEN, ckpt, args.dtype])
        n_params, largest = map(int, gen_out.split()[-2:])
        overhead, _, _ = peak_rss([sys.executable, "-c", IMPORTS])
        peak, conv_s, conv_out = peak_rss([sys.executable, "-m", "gigatron.core.convert.cli", "to-hf", ckpt, out,
                                           "--no-tokenizer", "--max-shard-gb", "2"])
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    bound = 2 * largest + overhead
    result = {"parameters": n_params, "dtype": args.dtype, "checkpoint_bytes": size, "largest_tensor_bytes": largest,
              "import_overhead_rss_bytes": overhead, "to_hf_peak_rss_bytes": peak,
              "ratio_peak_minus_overhead_to_largest": (peak - overhead) / largest,
              "bound_bytes": bound, "within_bound": peak < bound, "generate_s": gen_s, "to_hf_s": conv_s}
    print(conv_out.strip().splitlines()[-1])
    print(f"{n_params / 1e9:.2f}B params ({args.dtype}), checkpoint {size / 1e9:.2f} GB, largest tensor "
          f"{largest / 1e9:.3f} GB")
    print(f"to-hf peak RSS {peak / 1e9:.3f} GB = overhead {overhead / 1e9:.3f} GB + "
          f"{(peak - overhead) / largest:.2f} x largest tensor; bound 2 x largest + overhead = {bound / 1e9:.3f} GB: "
          f"{'OK' if peak < bound else 'EXCEEDED'} ({conv_s:.1f} s)")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    return 0 if peak < bound else 1


if __name__ == "__main__":
    sys.exit(main())
