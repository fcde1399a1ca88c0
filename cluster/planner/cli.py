"""`gigatron plan RECIPE [--gpus N] [--gpu KIND] [--set k=v ...] [--json] [--search [--top K]]`

Prints what `gigatron.cluster.plan` always printed (parameter count, layout, the pipeline chunk
table), then the memory per GPU by component and the projected step time, TFLOP/s per GPU and MFU
(cluster/planner/). `--gpus N` re-derives dp = N / (tp cp pp) for the recipe's layout; `--search`
lists the fastest layouts that fit for N GPUs instead. Errors print `gigatron: ...` and return 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from gigatron.cluster.planner.hardware import COST_MODEL, GPUS, gpu as gpu_kind
from gigatron.cluster.planner.layout import Layout, layout_from_config
from gigatron.cluster.planner.memory import estimate_memory
from gigatron.cluster.planner.model_shape import ModelShape, model_shape
from gigatron.cluster.planner.search import search
from gigatron.cluster.planner.throughput import project


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gigatron plan", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/llama3_405b.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set parallel.dp=4 (repeatable)")
    parser.add_argument("--gpus", type=int, default=None, help="GPU count (default: the recipe's world size)")
    parser.add_argument("--gpu", default="h100-sxm", help=f"GPU kind: {', '.join(sorted(GPUS))}")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--search", action="store_true", help="list the fastest layouts that fit")
    parser.add_argument("--top", type=int, default=10, help="layouts --search lists")
    return parser.parse_args(argv)


def summary(shape: ModelShape, layout: Layout, device, memory=None, projection=None) -> dict:
    """The fields `--json` promises, for one layout."""
    memory = memory or estimate_memory(shape, layout)
    projection = projection or project(shape, layout, device)
    return {"parameters": shape.parameters(),
            "memory_gb": memory.as_gb(),
            "memory_capacity_gb": round(device.memory_bytes / 1e9, 3),
            "fits": memory.total <= device.memory_bytes,
            "peak_memory_pp_rank": memory.pp_rank,
            "step_time_s": round(projection.step_time_s, 4),
            "tflops_per_gpu": round(projection.tflops_per_gpu, 2),
            "mfu": round(projection.mfu, 4),
            "tokens_per_s_per_gpu": round(projection.tokens_per_s_per_gpu, 2),
            "bubble": round(projection.bubble, 4),
            "step_breakdown_s": {k: (round(v, 4) if isinstance(v, float) else v)
                                 for k, v in projection.breakdown.items()},
            "layout": layout.as_dict()}


def format_summary(info: dict, gpu_name: str) -> list[str]:
    m, lay = info["memory_gb"], info["layout"]
    verdict = "fits" if info["fits"] else "DOES NOT FIT"
    b = info["step_breakdown_s"]
    return [
        f"memory/GPU   {m['total']:.1f} GB of {info['memory_capacity_gb']:.1f} GB on {gpu_name}: {verdict} "
        f"(pipeline rank {info['peak_memory_pp_rank']})",
        f"  parameters {m['parameters']:.2f}  gradients {m['gradients']:.2f}  optimizer {m['optimizer']:.2f}  "
        f"activations {m['activations']:.2f}  pipeline {m['pipeline']:.2f}  buffers {m['buffers']:.2f} GB",
        f"  (grad sync per {lay['grad_sync'].replace('_', '-')}, recompute {lay['recompute']}, "
        f"sequence parallel {lay['sequence_parallel']}, reshard after forward {lay['reshard_after_forward']})",
        f"projected    step {info['step_time_s']:.3f} s, {info['tflops_per_gpu']:.0f} TFLOP/s per GPU, "
        f"MFU {info['mfu']:.1%}, {info['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU",
        f"  compute {b['compute']:.3f} s, exposed: layer collectives {b['layer_collectives_exposed']:.3f} s, "
        f"p2p {b['p2p_exposed']:.3f} s, bubble {b['bubble']:.3f} s, data parallel {b['data_parallel_exposed']:.3f} s",
    ]


def format_search(rows: list[dict], fitting: int, gpus: int, gpu_name: str) -> list[str]:
    lines = [f"search       {fitting} layouts fit on {gpus:,} x {gpu_name}; the fastest:",
             f"  {'#':>2} {'tp':>3} {'cp':>3} {'pp':>3} {'v':>3} {'dp':>5} {'mb':>3} {'m':>4} {'recompute':>16} "
             f"{'reshard':>7} {'GB':>6} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6}"]
    for i, r in enumerate(rows, 1):
        lay = r["layout"]
        lines.append(f"  {i:>2} {lay['tp']:>3} {lay['cp']:>3} {lay['pp']:>3} {lay['pp_virtual_stages']:>3} "
                     f"{lay['dp']:>5} {lay['micro_batch']:>3} {lay['micro_batches']:>4} "
                     f"{lay['recompute']:>16} {str(lay['reshard_after_forward']):>7} "
                     f"{r['memory_gb']['total']:>6.1f} {r['step_time_s']:>8.3f} {r['tflops_per_gpu']:>8.0f} "
                     f"{r['mfu']:>6.1%}")
    return lines


def run(args: argparse.Namespace) -> int:
    from gigatron.cluster.plan import format_plan, plan
    from gigatron.core.config import load_config

    device = gpu_kind(args.gpu)
    cfg = load_config(args.recipe, args.overrides)
    gpus = args.gpus or cfg.parallel.world_size
    shape = model_shape(cfg)
    global_batch = cfg.train.global_batch_size
    if args.search:
        ranked, fitting = search(shape, gpus, global_batch, device, top=args.top,
                                 fewer=cfg.parallel.pp_first_last_fewer_layers)
        rows = [summary(shape, c.layout, device, c.memory, c.projection) for c in ranked]
        if args.json:
            print(json.dumps({"gpus": gpus, "gpu": device.name, "global_batch": global_batch, "fitting": fitting,
                              "parameters": shape.parameters(), "candidates": rows}, indent=2))
        else:
            print(f"model        {shape.name}: {shape.parameters():,} parameters, {global_batch:,} samples of "
                  f"{shape.seq_len:,} tokens per step")
            print("\n".join(format_search(rows, fitting, gpus, device.name)))
        return 0
    if gpus != cfg.parallel.world_size:
        model_parallel = cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.pp
        if gpus % model_parallel:
            print(f"gigatron: --gpus {gpus} is not a multiple of tp*cp*pp = {model_parallel}", file=sys.stderr)
            return 2
        cfg = load_config(args.recipe, args.overrides + [f"parallel.dp={gpus // model_parallel}"])
    layout = layout_from_config(cfg)
    basics = plan(cfg)
    info = {**basics, **summary(shape, layout, device)}
    info["layout"] = {**basics["layout"], **info["layout"]}  # today's keys (schedule, ...) and the planner's
    info["gpu"] = device.name
    info["cost_model"] = {k: v for k, v in vars(COST_MODEL).items()}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_plan(info))
        for note in shape.notes:  # the family's own breakdown (e.g. Movie Gen's parameters by part)
            print(f"  {note}")
        print("\n".join(format_summary(info, device.name)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; `argv` starts with the subcommand name ("plan")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        argv = argv[1:]
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse printed usage / help
        return int(exit_.code or 0)
    try:
        return run(args)
    except Exception as err:  # noqa: BLE001 - no traceback for any input: ConfigError, OSError, ...
        print(f"gigatron: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
