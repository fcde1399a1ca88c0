"""`gigatron prepare-images SRC OUT [--shard-size N] [--resize S] [--mds] [--caption T --text-encoder SPEC]`: images -> WebDataset tar shards.

SRC is an image folder tree (SRC/<class>/<file>.jpg|jpeg|png|webp|bmp: the class is the sub-folder,
numbered in sorted order) or a labelled array file (.npz with "images" (N, H, W) or (N, H, W, 3)
uint8 and "labels" (N,), read without pickle). Every sample is validated (fully decoded, RGB, at
least 1 x 1) and re-encoded as JPEG (quality 95) when --resize is given or the source is an array;
otherwise JPEG bytes are kept as they are. Written to OUT: train-000000.tar, ... each with its
DALI index (.tar.idx), refused.jsonl (one {"source", "reason"} per refused sample) and
dataset.json (the shard pattern for data.path, counts, class names). With --mds the same samples
are also written as MDS shards (mosaicml-streaming's MDSWriter) to OUT/mds, for data.format mds.

Captions from labels (text-to-image training, e.g. CrossFlow on digits): --caption "a handwritten
{class}" writes each sample's caption (.txt) with {class} replaced by its class name (--class-names
zero,one,... renames the classes of an array file, numbered 0..K-1), and --text-encoder SPEC embeds
each distinct caption once with the frozen stand-in encoder (data_pipeline/text_encoder.py, as
prepare-videos does) into .emb.npy (L, D) float32, read as data.text_embeddings.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np

from .shard_writer import TarShardWriter, npy_bytes

IMAGE_FILES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _folder_samples(src: str):
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise ValueError(f"{src} has no class sub-folders (expected SRC/<class>/<image>)")
    items = [(os.path.join(src, c, f), label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(src, c))) if f.lower().endswith(IMAGE_FILES)]
    return classes, len(items), ((path, label, lambda path=path: open(path, "rb").read()) for path, label in items)


def _array_samples(src: str):
    with np.load(src, allow_pickle=False) as arrays:
        if "images" not in arrays or "labels" not in arrays:
            raise ValueError(f"{src} must hold arrays 'images' and 'labels' (has {', '.join(arrays.files)})")
        images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise ValueError(f"{src}: {len(images)} images but {len(labels)} labels")
    classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    return classes, len(images), ((f"{src}[{i}]", int(labels[i]), images[i]) for i in range(len(images)))


def encode_image(source, resize: int, force_encode: bool) -> bytes:
    """Validate one image (bytes, or an array) and return the bytes to store; raises ValueError."""
    from PIL import Image

    if isinstance(source, np.ndarray):
        array = source
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.number) or array.min() < 0:
                raise ValueError(f"array of {array.dtype} is not an image")
            array = np.clip(array * (255.0 / max(1.0, float(array.max()))), 0, 255).astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3)):
            raise ValueError(f"array of shape {array.shape} is not (H, W) or (H, W, 3)")
        image, data = Image.fromarray(array.squeeze()).convert("RGB"), None
    else:
        data = source
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as err:
            raise ValueError(f"does not decode ({type(err).__name__}: {err})") from None
        keep = image.format == "JPEG" and image.mode == "RGB" and not resize and not force_encode
        image = image.convert("RGB")
        if keep:
            return data
    if image.size[0] < 1 or image.size[1] < 1:
        raise ValueError(f"empty image {image.size}")
    if resize:
        scale = resize / min(image.size)
        image = image.resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                             Image.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def tar_to_mds(shard_paths: list[str], out: str, shard_bytes: int = 1 << 26) -> int:
    """Copy validated tar shards into MDS shards (columns jpg: bytes, cls: int)."""
    from .mds import write_mds
    from .tar_reader import ShardEnd, read_tar_shard

    def samples():
        for path in shard_paths:
            for got in read_tar_shard(path):
                if not isinstance(got, ShardEnd):
                    yield {"jpg": got[1]["jpg"], "cls": int(got[1]["cls"])}

    return write_mds(out, samples(), {"jpg": "bytes", "cls": "int"}, size_limit=shard_bytes)


def prepare_images(src: str, out: str, shard_size: int = 1000, resize: int = 0, progress: bool = True,
                   mds: bool = False, caption: str = "", class_names: list[str] | None = None,
                   text_encoder: str = "", text_tokens: int = 64) -> dict:
    """Write the shards; returns the summary also written to OUT/dataset.json."""
    from tqdm import tqdm

    if os.path.isdir(src):
        classes, total, samples = _folder_samples(src)
    elif src.endswith(".npz"):
        classes, total, samples = _array_samples(src)
    else:
        raise ValueError(f"{src} is neither an image folder tree nor a .npz array file")
    if class_names:
        if len(class_names) != len(classes):
            raise ValueError(f"--class-names gives {len(class_names)} names for {len(classes)} classes")
        classes = list(class_names)
    if text_encoder and not caption:
        raise ValueError("--text-encoder embeds captions: give --caption (e.g. 'a handwritten {class}')")
    if caption and "{class}" not in caption:
        raise ValueError(f"--caption {caption!r} has no {{class}} placeholder")
    encoder, embedded = None, {}
    if text_encoder:
        from .text_encoder import TextEncoder

        encoder = TextEncoder(text_encoder, text_tokens)
    os.makedirs(out, exist_ok=True)
    refused = 0
    with TarShardWriter(out, "train", shard_size) as writer, open(os.path.join(out, "refused.jsonl"), "w") as log:
        for source, label, read in tqdm(samples, total=total, desc="prepare-images", unit="img", disable=not progress):
            try:
                data = encode_image(read() if callable(read) else read, resize, isinstance(read, np.ndarray))
            except (ValueError, OSError) as err:
                refused += 1
                log.write(json.dumps({"source": source, "reason": str(err)}) + "\n")
                continue
            members = {"jpg": data, "cls": str(label).encode()}
            if caption:
                text = caption.replace("{class}", classes[label])
                members["txt"] = text.encode()
                if encoder is not None:
                    if text not in embedded:  # one forward per distinct caption
                        embedded[text] = npy_bytes(encoder(text))
                    members["emb.npy"] = embedded[text]
            writer.write(f"{writer.samples:09d}", members)
    summary = {"path": writer.pattern, "samples": writer.samples, "shards": len(writer.shards), "refused": refused,
               "classes": classes, "shard_size": shard_size, "resize": resize, "caption": caption,
               "text_encoder": text_encoder, "text_tokens": text_tokens if text_encoder else 0}
    if mds:
        summary["mds_path"] = os.path.join(out, "mds")
        summary["mds_samples"] = tar_to_mds(writer.shards, summary["mds_path"])
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigatron prepare-images", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="image folder tree (class = sub-folder) or a labelled .npz (images, labels)")
    parser.add_argument("out", help="output folder for train-NNNNNN.tar shards + DALI .idx files")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--resize", type=int, default=0, help="resize the shorter side to S pixels (0 = keep)")
    parser.add_argument("--mds", action="store_true", help="also write MDS shards to OUT/mds (data.format mds)")
    parser.add_argument("--caption", default="", metavar="TEMPLATE",
                        help="write a caption per image, {class} replaced by its class name (e.g. 'a handwritten {class}')")
    parser.add_argument("--class-names", default="", help="comma-separated class names for an array file's labels 0..K-1")
    parser.add_argument("--text-encoder", default="", metavar="SPEC",
                        help="embed the captions: llama-bytes:DIM or a gigatron Llama checkpoint (as prepare-videos)")
    parser.add_argument("--text-tokens", type=int, default=64, help="longest caption in tokens (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = prepare_images(args.src, args.out, args.shard_size, args.resize, not args.no_progress,
                                 args.mds, args.caption, [c for c in args.class_names.split(",") if c] or None,
                                 args.text_encoder, args.text_tokens)
    except (ValueError, OSError) as err:
        print(f"prepare-images: error: {err}", file=sys.stderr)
        return 1
    print(f"prepare-images: {summary['samples']} samples in {summary['shards']} shards, {summary['refused']} refused "
          f"(see {os.path.join(args.out, 'refused.jsonl')}); data.path: {summary['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
