"""The planner against published runs, its fit, and how long a search takes.

    python benchmarks/bench_planner.py            the projected-vs-published table (stored constants)
    python benchmarks/bench_planner.py --fit      refit the two fitted constants on the Megatron-Core
                                                  rows, print them (copy them into hardware.py) and
                                                  the table under them
    python benchmarks/bench_planner.py --search   time the 405B / Movie Gen / ViT searches
    --out FILE                                    also write the numbers as JSON
                                                  (benchmarks/results/bench_planner.json)
"""

from __future__ import annotations

import argparse
import json
import time

from gigatron.cluster.planner import calibration
from gigatron.cluster.planner.hardware import COST_MODEL, gpu, with_constants
from gigatron.cluster.planner.model_shape import movie_gen_30b, vit_6_5b
from gigatron.cluster.planner.published import LLAMA3_405B
from gigatron.cluster.planner.search import layout_key, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--search", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result: dict = {}
    constants = COST_MODEL
    if args.fit:
        start = time.perf_counter()
        fitted = calibration.fit()
        result["fit"] = {**fitted, "seconds": time.perf_counter() - start}
        print("fitted: " + ", ".join(f"{k} = {v:.4f}" for k, v in fitted.items()) + f" ({result['fit']['seconds']:.1f} s)")
        constants = with_constants(**{k: round(v, 3) for k, v in fitted.items()})
    rows = calibration.comparison(constants)
    print(calibration.format_table(rows))
    result["rows"] = [{"name": r.name, "published": r.published, "projected": r.projected, "baseline": r.baseline,
                       "held_out": r.held_out} for r in rows]
    if args.search:
        h100 = gpu("h100-sxm")
        for label, shape, gpus, batch in (("405B", LLAMA3_405B[1].shape, 16384, 2048),
                                          ("Movie Gen 30B", movie_gen_30b(), 6144, 1536),
                                          ("ViT-6.5B", vit_6_5b(), 512, 8192)):
            start = time.perf_counter()
            ranked, fitting = search(shape, gpus, batch, h100, top=10 ** 9, constants=constants)
            seconds = time.perf_counter() - start
            best = ranked[0]
            print(f"search {label} on {gpus:,} H100: {fitting} layouts fit, {seconds:.1f} s; best "
                  f"{best.layout.describe()} MFU {best.projection.mfu:.1%}, {best.memory.total / 1e9:.1f} GB")
            entry = {"seconds": seconds, "fitting": fitting, "best": best.layout.as_dict(), "mfu": best.projection.mfu}
            if label == "405B":  # Llama 3's own layout among them (published: 400 TFLOP/s, MFU 41%)
                keys = [layout_key(c.layout) for c in ranked]
                own = LLAMA3_405B[1].layout
                rank = keys.index(layout_key(own)) + 1 if layout_key(own) in keys else None
                mine = ranked[rank - 1] if rank else None
                print(f"  Llama 3's layout {own.describe().rsplit(' ac=', 1)[0]}: "
                      + (f"rank {rank} of {fitting}, fits with ac={mine.layout.activation_checkpoint} at "
                         f"{mine.memory.total / 1e9:.1f} GB, projected MFU {mine.projection.mfu:.1%} "
                         f"(published 41%); best/Llama {best.projection.mfu / mine.projection.mfu:.3f}"
                         if mine else "does not fit"))
                entry["llama3_layout"] = {"rank": rank, "mfu": mine.projection.mfu if mine else None,
                                          "activation_checkpoint": mine.layout.activation_checkpoint if mine else None,
                                          "memory_gb": mine.memory.total / 1e9 if mine else None,
                                          "published_mfu": 0.41}
            result.setdefault("search", {})[label] = entry
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
