"""Context-parallel communication: measured / analytic bytes on mesh "cp" per attention layer
(forward + backward, per rank), for the all-gather (Llama 3) and ring (Movie Gen) modes, cp 2 and 4,
(a) for one attention layer alone (GQA shapes) and (b) inside the debug Llama trained by the real
trainer (cp2 x dp2, one micro-batch, bytes / n_layers). Every ratio must print 1.00. The wall time
of one layer's forward + backward is printed for information only (2 shared CPU cores, gloo).

    python benchmarks/bench_context.py [--out runs/bench/context.json] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

B, H, HKV, D = 1, 8, 2, 64  # GQA 4:1 as Llama 3
MODES = [(True, "allgather"), (False, "ring"), (True, "ring"), (False, "allgather")]


def _layer(rank, world_size, seq_len):
    """One attention layer alone on a (cp=4) and a (dp=2, cp=2) mesh: bytes and time per mode."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from gigatron.parallel.comm import CommRecorder, cp_attention_bytes
    from gigatron.parallel.context import ContextParallelAttention, cp_positions

    dist.init_process_group("gloo")
    meshes = {4: init_device_mesh("cpu", (4,), mesh_dim_names=("cp",)),
              2: init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))}
    rows = []
    for cp, mesh in meshes.items():
        pos = cp_positions(seq_len, cp, mesh["cp"].get_local_rank())
        t = seq_len // cp
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(B, H, t, D, generator=g, requires_grad=True)  # (B, H, T/cp, D)
        k, v = (torch.randn(B, HKV, t, D, generator=g, requires_grad=True) for _ in range(2))  # (B, Hkv, T/cp, D)
        docs = (pos[None, :] // (seq_len // 3)).expand(B, t)  # 3 documents, boundaries inside chunks
        for causal, mode in MODES:
            core = ContextParallelAttention(causal, "torch", mesh, mode)
            dist.barrier()
            start = time.perf_counter()
            with CommRecorder(mesh) as rec:
                core(q, k, v, pos, docs).sum().backward()
            elapsed = time.perf_counter() - start
            measured = {f"{kind}": size for (dim, kind), size in rec.bytes_by().items() if dim == "cp"}
            expected = {kind: size for (_, kind), size in
                        cp_attention_bytes(mode, B, seq_len, HKV, D, cp, 4, segment_ids=True).items()}
            rows.append({"case": f"layer cp{cp} {'causal' if causal else 'bidir'} {mode}", "measured": measured,
                         "expected": expected, "seconds": elapsed})
    return rows


def main() -> int:
    from tests.distributed import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs/bench/context.json"))
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    rows = run_distributed(_layer, 4, args.seq_len)[0]  # whole training steps: benchmarks/bench_comm.py
    ok = True
    print(f"{'case':<32} {'kind':<15} {'measured B/layer':>17} {'analytic B/layer':>17} {'ratio':>6} {'fwd+bwd s':>9}")
    for row in rows:
        row["ratios"] = {}
        for kind in sorted(set(row["measured"]) | set(row["expected"])):
            got, want = row["measured"].get(kind, 0), row["expected"].get(kind, 0)
            ratio = got / want if want else float("inf")
            row["ratios"][kind] = ratio
            ok &= abs(ratio - 1) < 1e-9
            secs = f"{row['seconds']:.3f}" if row["seconds"] is not None else "-"
            print(f"{row['case']:<32} {kind:<15} {got:>17,} {want:>17,} {ratio:>6.2f} {secs:>9}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"seq_len": args.seq_len, "shapes": {"B": B, "H": H, "Hkv": HKV, "D": D}, "rows": rows,
                   "all_ratios_1": ok}, f, indent=1)
    print(f"{'all ratios 1.00' if ok else 'MISMATCH'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
