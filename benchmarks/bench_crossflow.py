"""CrossFlow on real captioned images: does the text-to-image flow draw the digit its caption names?

1. Data: scikit-learn's 1,797 digits through `prepare-images --caption "a handwritten {class}"
   --text-encoder llama-bytes:32` (runs/data/crossflow_digits, 32 px); CrossFlow trains on shards
   0..15 (the 1,600 images the classifier also trains on; 16..17 stay held out).
2. The judge: a digit classifier trained by gigatron's own vision recipe (recipes/vit_debug_swag.yaml,
   conv stem, on runs/data/digits32 through bench_vit_common); its held-out accuracy must be >= 95%.
3. CrossFlow trains recipes/crossflow_debug.yaml (the real trainer, torchrun). From its EMA weights,
   --per-class samples per caption ("a handwritten zero" .. "nine"), each from its own draw of the
   caption's text latent, by 50 Euler steps, with guidance 1 (none) and the --guidance scales.
4. Each sample (8 x 8 latent pixels = the digits' own resolution) goes the way a real digit went to the
   classifier: uint8 8 x 8, bicubic to 32 px (prepare-images), the loader's normalisation. The same
   path applied to the training images' own latents gives the ceiling; chance is 10%.
Writes benchmarks/results/bench_crossflow.json, crossflow_samples.png (one row per caption, samples
without and with guidance) and crossflow_interpolation.png (caption latents mixed in equal steps).

    python benchmarks/bench_crossflow.py [--steps 2000] [--per-class 50] [--guidance 1.5 2 3] [--reuse]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vit_common import DATA, ROOT, accuracy, checkpoints, heldout, prepare_digits, train  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks/results")
RUNS = os.path.join(ROOT, "runs/bench_crossflow")
WORDS = "zero,one,two,three,four,five,six,seven,eight,nine".split(",")
CAPTION, ENCODER, TOKENS = "a handwritten {class}", "llama-bytes:32", 24
SHARDS = "train-{000000..000015}.tar"


def prepare_captioned(data: str = DATA) -> str:
    from gigatron.data_pipeline.prepare_images import prepare_images

    out = os.path.join(data, "crossflow_digits")
    if not os.path.exists(os.path.join(out, "dataset.json")):
        prepare_digits(data)  # writes data/digits.npz
        prepare_images(os.path.join(data, "digits.npz"), out, shard_size=100, resize=32, progress=False,
                       caption=CAPTION, class_names=WORDS, text_encoder=ENCODER, text_tokens=TOKENS)
    return out


def judge(steps: int) -> tuple[str, float]:
    """The classifier's checkpoint (trained here unless a previous run left one) and its held-out accuracy."""
    root = os.path.join(RUNS, "classifier")
    found = checkpoints(os.path.join(root, "checkpoints"))
    if not found:
        print(f"training the judge: recipes/vit_debug_swag.yaml, conv stem, {steps} steps", flush=True)
        train("recipes/vit_debug_swag.yaml", ["model.stem=conv", f"train.steps={steps}",
                                             f"checkpoint.interval={steps}"], root, nproc=2)
        found = checkpoints(os.path.join(root, "checkpoints"))
    images, labels = heldout()
    return found[-1][1], accuracy(found[-1][1], images, labels)


def to_classifier(latents: torch.Tensor, m) -> torch.Tensor:
    """Latents (B, 3, 1, 8, 8) of the pixel stand-in -> the classifier's input (B, 3, 32, 32): uint8 pixels,
    bicubic to 32 px as prepare-images resized the 8 x 8 digits, then the loader's normalisation."""
    from PIL import Image

    from gigatron.core.sample import to_uint8
    from gigatron.data_pipeline.shard_loader import normalise

    small = m.pixel_downsample
    frames = to_uint8(latents, m)[:, 0, ::small, ::small]  # (B, 8, 8, 3): one pixel per latent pixel
    big = [np.asarray(Image.fromarray(f).resize((32, 32), Image.BICUBIC)) for f in frames]
    return normalise(np.stack(big))


def training_latents(path: str, m, n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n training images' latents (what CrossFlow learns to draw) and their labels."""
    from PIL import Image

    from gigatron.core.objectives.flow_matching import to_latents
    from gigatron.data_pipeline.shard_loader import normalise
    from gigatron.data_pipeline.tar_reader import ShardEnd, read_tar_shard

    pixels, labels = [], []
    for i in range(16):
        for got in read_tar_shard(os.path.join(path, f"train-{i:06d}.tar")):
            if not isinstance(got, ShardEnd) and len(labels) < n:
                pixels.append(np.asarray(Image.open(io.BytesIO(got[1]["jpg"])).convert("RGB")))
                labels.append(int(got[1]["cls"]))
    return to_latents(normalise(np.stack(pixels))[:, :, None], m), torch.tensor(labels)


def guidance_raises(results: list[dict], n: int) -> tuple[bool, float]:
    """(the best guided rate beats the unguided one by more than 2 binomial standard errors, that margin)."""
    none = results[0]["recognised"]
    margin = 2 * (none * (1 - none) / n) ** 0.5
    return max(r["recognised"] for r in results[1:]) > none + margin, margin


def spread(latents: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise distance between latents of the class (sample diversity)."""
    flat = latents.flatten(1)
    return float(np.mean([torch.pdist(flat[labels == c]).mean().item() for c in range(10)]))


@torch.no_grad()
def recognised(classifier, latents, labels, m) -> tuple[float, list[float]]:
    from bench_vit_common import load_model

    model = load_model(classifier) if isinstance(classifier, str) else classifier
    x = to_classifier(latents, m)
    predicted = torch.cat([model(x[i:i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    hits = (predicted == labels).float()
    return hits.mean().item(), [hits[labels == c].mean().item() for c in range(10)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="CrossFlow training steps")
    parser.add_argument("--judge-steps", type=int, default=800, help="classifier training steps (conv stem)")
    parser.add_argument("--per-class", type=int, default=50, help="samples per caption")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--sampler-steps", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], help="recipe override for CrossFlow (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="score the run a previous call trained (no training)")
    args = parser.parse_args()

    from bench_vit_common import load_model

    from gigatron.core.families.crossflow import flow, generate, sources
    from gigatron.core.sample import encode_prompts, load_model as load_crossflow, save_grid, to_uint8

    started = time.time()
    data = prepare_captioned()
    prepare_digits()
    classifier, judge_accuracy = judge(args.judge_steps)
    print(f"judge: held-out accuracy {judge_accuracy:.4f} (target >= 0.95) ({classifier})", flush=True)

    run = os.path.join(RUNS, "crossflow")
    t0 = time.time()
    if args.reuse and checkpoints(os.path.join(run, "checkpoints")):  # score the trained run again (sampler changes)
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        train_s = sum(r.get("step_time_s", 0.0) for r in rows)
    else:
        rows = train("recipes/crossflow_debug.yaml", [f"data.path={data}/{SHARDS}", f"train.steps={args.steps}",
                                                      f"checkpoint.interval={args.steps}", *args.set], run, nproc=2)
        train_s = time.time() - t0
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"crossflow: {len(losses)} steps in {train_s:.0f} s, loss {np.mean(losses[:20]):.4f} (first 20) -> "
          f"{np.mean(losses[-50:]):.4f} (last 50)", flush=True)

    model, config = load_crossflow(run)
    m = model.cfg
    judge_model = load_model(classifier)
    real, real_labels = training_latents(data, m)
    ceiling, _ = recognised(judge_model, real, real_labels, m)
    prompts = [CAPTION.replace("{class}", w) for w in WORDS]
    text, lengths = encode_prompts(prompts, ENCODER, TOKENS)
    k = args.per_class
    text_k, lengths_k = text.repeat_interleave(k, 0), lengths.repeat_interleave(k, 0)
    labels = torch.arange(10).repeat_interleave(k)
    real_spread = spread(real, real_labels)
    with torch.no_grad():
        sigma = torch.exp(0.5 * model.encode(text, lengths)[1]).mean().item()
    print(f"text latents: mean sigma {sigma:.3g}; real images' within-class spread {real_spread:.3f}", flush=True)
    results, samples = [], {}
    for w in [1.0] + list(args.guidance):
        t1 = time.time()
        latents = generate(model, text_k, lengths_k, seed=0, guidance=w, steps=args.sampler_steps)
        rate, per_class = recognised(judge_model, latents, labels, m)
        samples[w] = latents
        diversity = spread(latents, labels) / real_spread
        results.append({"guidance": w, "recognised": rate, "per_class": per_class, "diversity": diversity,
                        "sample_s": time.time() - t1})
        print(f"guidance {w:>4}: {rate:.3f} of {len(labels)} samples recognised as their caption's digit "
              f"(chance 0.100, real latents {ceiling:.3f}: ratio {rate / ceiling:.2f}); within-caption spread "
              f"{diversity:.2f} of the real images'", flush=True)

    # pictures: one row per caption, 8 samples without guidance | 8 with the best guidance
    best = max(results, key=lambda r: r["recognised"])["guidance"]
    show = 8
    pictures = []
    for c in range(10):
        rows_c = [to_uint8(samples[w][c * k:c * k + show], m)[:, 0] for w in (1.0, best)]
        gap = np.full_like(rows_c[0][:1], 255)
        pictures.append(np.concatenate([rows_c[0], gap, rows_c[1]]))
    os.makedirs(OUT, exist_ok=True)
    save_grid(pictures, os.path.join(OUT, "crossflow_samples.png"), labels=prompts)
    pairs = [(1, 7), (3, 8), (0, 6), (4, 9)]
    alphas = torch.linspace(0, 1, 9)
    mix = torch.stack([1 - alphas, alphas], dim=1)
    frames = []
    for a, b in pairs:
        frames.append(to_uint8(flow(model, *sources(model, text[[a, b]], lengths[[a, b]], mix=mix), best,
                                    args.sampler_steps), m)[:, 0])
    save_grid(frames, os.path.join(OUT, "crossflow_interpolation.png"),
              labels=[f"{WORDS[a]} -> {WORDS[b]}" for a, b in pairs])

    none = results[0]["recognised"]
    out = {"benchmark": "bench_crossflow", "date": time.strftime("%Y-%m-%d"), "recipe": "recipes/crossflow_debug.yaml",
           "overrides": args.set, "steps": args.steps, "reused_run": args.reuse, "train_s": round(train_s, 1),
           "loss_first_20": float(np.mean(losses[:20])), "loss_last_50": float(np.mean(losses[-50:])),
           "judge": {"recipe": "recipes/vit_debug_swag.yaml", "stem": "conv", "steps": args.judge_steps,
                     "heldout_accuracy": judge_accuracy, "target": 0.95},
           "samples_per_caption": k, "sampler_steps": args.sampler_steps, "chance": 0.1,
           "real_latents_recognised": ceiling, "text_latent_sigma": sigma, "results": results, "best_guidance": best,
           "target_recognised": 0.5,
           "weights": config["_weights"], "total_s": round(time.time() - started, 1)}
    out["guidance_raises"], out["guidance_margin"] = guidance_raises(results, len(labels))
    out["passed"] = judge_accuracy >= 0.95 and none >= 0.5 and out["guidance_raises"]
    with open(os.path.join(OUT, "bench_crossflow.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"{'PASS' if out['passed'] else 'FAIL'}: judge {judge_accuracy:.3f}, recognised {none:.3f} without guidance, "
          f"{max(r['recognised'] for r in results):.3f} at best (w={best}); guidance raises it by more than 2 standard "
          f"errors ({out['guidance_margin']:.3f}): {out['guidance_raises']} -> benchmarks/results/bench_crossflow.json")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
