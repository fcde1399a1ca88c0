"""MAWS on real images, on the CPU: recipes/vit_debug_maws.yaml (stage "mae": MAE on every training
digit, labels unused; stage "supervised": the classifier on 10 labelled images per class, started
from the MAE stage's checkpoint through the multi-stage recipe mechanism) against the same model
trained from scratch on the same 100 labelled images with the same schedule (the baseline, in the
same run), over 3 seeds. Held-out accuracy on the 197 held-out digits (never trained on, no crop).

Prints the mean and spread (min..max, std) of each, and the ratio MAWS / scratch of the means.
Writes benchmarks/results/bench_vit_maws.json (+ .png: the MAE loss, and the accuracies).

    python benchmarks/bench_vit_maws.py [--seeds 0 1 2] [--mae-steps 200]

--mae-steps N shortens stage "mae" to N steps (the recipe's is 400) and keeps stage "supervised" at
its 300 steps (train.steps = N + 300), for a loaded machine; the JSON records the length used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vit_common import DATA, FEW, ROOT, accuracy, checkpoints, heldout, prepare_digits, train  # noqa: E402

MAWS = os.path.join(ROOT, "recipes/vit_debug_maws.yaml")
SWAG = os.path.join(ROOT, "recipes/vit_debug_swag.yaml")
# the scratch baseline: the supervised stage's settings on the same 100 images, no MAE stage
SCRATCH = ["model.patch=8", "model.decoder_dim=32", "train.steps=300", "train.global_batch_size=32",
           "train.micro_batch_size=32", "train.warmup_steps=20", "train.decay_steps=280", "train.lr=1.0e-3",
           "train.beta2=0.95", "train.eval_every=0", f"data.path={os.path.join(DATA, FEW)}/train-000000.tar",
           f"data.eval_path={os.path.join(DATA, 'digits32')}/train-{{000016..000017}}.tar", "data.shuffle_buffer=100"]


def mae_overrides(mae_steps: int | None) -> tuple[list[str], int, int]:
    """Overrides that end stage "mae" at mae_steps, the supervised stage keeping its length (the whole
    run is shortened by the same amount); and the lengths of the two stages."""
    with open(MAWS) as f:
        recipe = yaml.safe_load(f)
    stages, steps = recipe["stages"], recipe["train"]["steps"]
    assert len(stages) == 2 and stages[0]["name"] == "mae", "expects the two stages mae, supervised"
    supervised = steps - stages[0]["until_step"]
    if mae_steps is None:
        return [], stages[0]["until_step"], supervised
    if mae_steps <= 0:
        raise SystemExit("--mae-steps must be > 0")
    stages[0]["until_step"] = mae_steps
    return [f"stages={json.dumps(stages)}", f"train.steps={mae_steps + supervised}"], mae_steps, supervised


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mae-steps", type=int, default=None,
                        help="length of stage mae (default: the recipe's 400); stage supervised keeps its 300 steps")
    parser.add_argument("--work", default="/tmp/bench_vit_maws")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/bench_vit_maws.json"))
    args = parser.parse_args()
    prepare_digits(DATA)
    images, labels = heldout(DATA)
    stage_overrides, mae_steps, supervised_steps = mae_overrides(args.mae_steps)
    runs = []
    for seed in args.seeds:
        row = {"seed": seed}
        for kind in ("maws", "scratch"):
            run_dir = os.path.join(args.work, f"{kind}_{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)
            start = time.time()
            if kind == "maws":
                metrics = train(MAWS, [f"train.seed={seed}", "run.log_every=100"] + stage_overrides, run_dir)
                mae = [m["loss"] for m in metrics if m.get("stage") == "mae"]
                row["mae_loss_first_last"] = [sum(mae[:10]) / 10, sum(mae[-10:]) / 10]
                row["mae_loss_curve"] = mae[::10]
                final = checkpoints(os.path.join(run_dir, "checkpoints", "supervised"))[-1][1]
            else:
                train(SWAG, [f"train.seed={seed}", "run.log_every=100"] + SCRATCH, run_dir)
                final = checkpoints(os.path.join(run_dir, "checkpoints"))[-1][1]
            row[f"{kind}_heldout_accuracy"] = accuracy(final, images, labels)
            row[f"{kind}_seconds"] = time.time() - start
            print(f"seed {seed} {kind:7s}: held-out accuracy {row[f'{kind}_heldout_accuracy']:.4f} "
                  f"({row[f'{kind}_seconds']:.0f} s)" + (f", MAE loss {row['mae_loss_first_last'][0]:.3f} -> "
                                                         f"{row['mae_loss_first_last'][1]:.3f}" if kind == "maws" else ""))
        runs.append(row)
    maws, scratch = summary([r["maws_heldout_accuracy"] for r in runs]), summary([r["scratch_heldout_accuracy"] for r in runs])
    out = {"benchmark": "bench_vit_maws", "date": time.strftime("%Y-%m-%d"), "recipe": "recipes/vit_debug_maws.yaml",
           "mae_steps": mae_steps, "supervised_steps": supervised_steps, "overrides": stage_overrides,
           "labels_per_class": 10, "heldout_images": len(labels), "maws": maws, "scratch": scratch,
           "ratio_maws_over_scratch": maws["mean"] / scratch["mean"],
           "mae_loss_falls": all(r["mae_loss_first_last"][1] < r["mae_loss_first_last"][0] for r in runs), "runs": runs}
    print(f"MAWS    {maws['mean']:.4f} (std {maws['std']:.4f}, {maws['min']:.4f}..{maws['max']:.4f})")
    print(f"scratch {scratch['mean']:.4f} (std {scratch['std']:.4f}, {scratch['min']:.4f}..{scratch['max']:.4f})")
    print(f"ratio MAWS / scratch mean held-out accuracy: {out['ratio_maws_over_scratch']:.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        a.plot([10 * i for i in range(len(r["mae_loss_curve"]))], r["mae_loss_curve"], label=f"seed {r['seed']}")
    a.set(xlabel="step", ylabel="MAE loss (normalised pixels)", title="stage mae")
    a.legend()
    b.bar(["MAWS (MAE -> supervised)", "from scratch"], [maws["mean"], scratch["mean"]],
          yerr=[[maws["mean"] - maws["min"], scratch["mean"] - scratch["min"]],
                [maws["max"] - maws["mean"], scratch["max"] - scratch["mean"]]], capsize=6)
    b.set(ylabel="held-out accuracy, 10 labels/class", ylim=(0, 1), title=f"{len(runs)} seeds (min..max)")
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
