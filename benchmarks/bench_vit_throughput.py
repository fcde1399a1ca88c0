"""Single-process ViT training throughput: gigatron's ViT (through the family seam: the model, the
classification objective and its fused soft-target cross-entropy) vs transformers'
ViTForImageClassification of the same shape, started from the same weights (exported with
core/convert/hf_vit.py), on the same real image batches (random crops of scikit-image photos), AdamW
with the same hyper-parameters, fp32, the same thread count, alternating steps so a noisy machine
slows both alike. Prints images/s of each and the ratio ours / transformers (target >= 1.2).
--compile compiles every transformer block of both (torch.compile per block, as `train.compile`
does for ours: like for like).

    python benchmarks/bench_vit_throughput.py [--dim 192 --depth 6 --image 64 --patch 8 --batch 32 --steps 8]
                                              [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo_batches(n: int, batch: int, size: int, classes: int, seed: int = 0) -> list[dict]:
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = []
    for _ in range(n):
        crops = []
        for _ in range(batch):
            p = photos[rng.integers(len(photos))]
            s = int(rng.integers(size, min(p.shape[:2])))
            y, x = rng.integers(0, p.shape[0] - s + 1), rng.integers(0, p.shape[1] - s + 1)
            img = np.asarray(Image.fromarray(p[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR)) / 255.0
            crops.append((img - mean) / std)
        images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().contiguous()
        out.append({"images": images, "labels": torch.from_numpy(rng.integers(0, classes, batch)),
                    "sample_index": torch.arange(batch)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block of both models")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/bench_vit_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import ViTForImageClassification

    from gigatron.core.convert import hf_vit
    from gigatron.core.models.vit import ViT, ViTConfig
    from gigatron.core.objectives.classification import ClassificationObjective

    m = ViTConfig(dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=4 * args.dim, patch=args.patch,
                  image_size=args.image, num_classes=args.classes, attention_backend="sdpa")
    torch.manual_seed(0)
    ours = ViT(m)
    with tempfile.TemporaryDirectory() as folder:  # the export as users load it (Hub names, converted on load)
        from safetensors.torch import save_file

        save_file(hf_vit.hf_state_dict(m, ours.state_dict()), os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf_vit.hf_config(m), f)
        hf, info = ViTForImageClassification.from_pretrained(folder, output_loading_info=True, dtype=torch.float32,
                                                             attn_implementation="sdpa")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    hf.train()
    if args.compile:
        for block in ours.blocks.values() if hasattr(ours.blocks, "values") else ours.blocks:
            block.compile()
        for layer in hf.vit.layers if hasattr(hf.vit, "layers") else hf.vit.encoder.layer:
            layer.compile()
    objective = ClassificationObjective(None, m.num_classes)

    def ours_loss(batch):
        batch = objective.prepare(dict(batch))
        args_, kwargs = objective.inputs(batch)
        return objective.loss(ours(*args_, **kwargs), batch) / objective.count(batch)

    def hf_loss(batch):
        return F.cross_entropy(hf(pixel_values=batch["images"]).logits, batch["labels"])

    runs = {"ours": (ours, ours_loss), "transformers": (hf, hf_loss)}
    opts = {k: torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05) for k, (model, _) in runs.items()}
    batches = photo_batches(args.steps + 2, args.batch, args.image, args.classes)
    times: dict[str, list[float]] = {k: [] for k in runs}
    first_loss = {}
    for i, batch in enumerate(batches):
        for name, (model, loss_fn) in runs.items():
            start = time.perf_counter()
            loss = loss_fn(batch)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if i == 0:
                first_loss[name] = loss.item()
            if i >= 2:
                times[name].append(elapsed)
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    ratio = rate["ours"] / rate["transformers"]
    print(f"images/s{' (compiled)' if args.compile else ''}  ours {rate['ours']:.1f}  transformers "
          f"{rate['transformers']:.1f}  ratio {ratio:.3f} "
          f"(target >= 1.2; first-step losses {first_loss['ours']:.5f} / {first_loss['transformers']:.5f})")
    out = {"benchmark": "bench_vit_throughput", "date": time.strftime("%Y-%m-%d"), "shape": vars(args),
           "images_per_s": rate, "ratio_ours_over_transformers": ratio, "target": 1.2,
           "first_step_loss": first_loss, "step_seconds": times, "machine": platform.processor() or platform.machine(),
           "load_average": os.getloadavg(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
