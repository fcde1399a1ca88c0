"""`gigatron prepare-videos SRC OUT [--frames F] [--resize S] [--store frames|clip] [--vp9] [--reverse-labels]`: clips -> shards.

SRC is a folder of videos (any container / codec PyAV decodes: the offline clips are H.264), or a
folder tree SRC/<class>/<video> (the class becomes .cls). Each video is decoded with PyAV and cut
into consecutive clips of F frames (at most --max-clips per video); frames are resized so that the
shorter side is S (--resize, bilinear, 0 = keep) and the frame size is a multiple of 2. A clip
sample holds:
    frames.npy   (F, H, W, 3) uint8, the decoded frames (--store frames, the default), or
    mp4          the clip re-encoded with H.264 (--store clip: smaller, decoded again when read)
    txt          the caption: the sidecar <video>.txt, else the file name
    emb.npy      text embeddings (L, D) float32 from the sidecar <video>.emb.npy, when present, else
                 computed from the caption by --text-encoder SPEC (data_pipeline/text_encoder.py: the
                 frozen stand-in for Movie Gen's text encoders, precomputed here, outside training)
    cls          the class index, for a folder tree
With --reverse-labels (the arrow-of-time task: forwards or backwards?) every clip is written twice,
consecutively: frames in order with cls 0 ("forwards"), then the same frames reversed with cls 1
("backwards"), the reversed copy's key one after the forward one's. Only a flat folder of videos is
accepted (the two labels replace the folder classes), and the shard size must be even so a clip
and its reverse always land in the same shard: holding out shards, or another folder of videos,
never puts a clip in one split and its reverse in the other.
With --vp9 every clip is also re-encoded as VP9 (OUT/vp9/<key>.webm) with OUT/vp9/file_list.txt
("path label" lines), because DALI's CPU video reader decodes VP9 only. Every clip is validated
(decodes, has F frames, sidecars are well-formed); refused clips are listed in refused.jsonl.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np

from .shard_writer import TarShardWriter, npy_bytes

VIDEO_FILES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def decode_frames(path: str, resize: int = 0, max_frames: int | None = None):
    """Yield the frames of a video as (H, W, 3) uint8, resized (shorter side = resize, even sizes)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if resize:
            scale = resize / min(width, height)
            width, height = max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)
        for n, frame in enumerate(container.decode(stream)):
            if max_frames is not None and n >= max_frames:
                break
            if resize or frame.width % 2 or frame.height % 2:
                frame = frame.reformat(width=width - width % 2, height=height - height % 2, interpolation="BILINEAR")
            yield frame.to_ndarray(format="rgb24")


def encode_clip(frames: np.ndarray, codec: str = "libx264", container_format: str = "mp4", fps: int = 25) -> bytes:
    """(F, H, W, 3) uint8 -> an encoded clip (H.264 in mp4, or VP9 in webm)."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _videos(src: str):
    entries = sorted(os.listdir(src))
    classes = [d for d in entries if os.path.isdir(os.path.join(src, d))]
    if classes:
        return classes, [(os.path.join(src, c, f), label) for label, c in enumerate(classes)
                         for f in sorted(os.listdir(os.path.join(src, c))) if f.lower().endswith(VIDEO_FILES)]
    return [], [(os.path.join(src, f), None) for f in entries if f.lower().endswith(VIDEO_FILES)]


def _sidecars(path: str) -> tuple[str, np.ndarray | None]:
    stem = os.path.splitext(path)[0]
    caption = os.path.basename(stem).replace("_", " ")
    if os.path.exists(stem + ".txt"):
        with open(stem + ".txt", encoding="utf-8") as f:
            caption = f.read().strip()
    embedding = None
    if os.path.exists(stem + ".emb.npy"):
        embedding = np.load(stem + ".emb.npy", allow_pickle=False)
        if embedding.ndim != 2 or not np.issubdtype(embedding.dtype, np.floating) or not np.isfinite(embedding).all():
            raise ValueError(f"{stem}.emb.npy is {embedding.dtype} {embedding.shape}, need finite float (L, D)")
        embedding = embedding.astype(np.float32)
    return caption, embedding


def prepare_videos(src: str, out: str, frames: int = 8, resize: int = 0, shard_size: int = 100, store: str = "frames",
                   vp9: bool = False, max_clips: int = 0, progress: bool = True, text_encoder: str = "",
                   text_tokens: int = 64, reverse_labels: bool = False) -> dict:
    """Write the clip shards; returns the summary also written to OUT/dataset.json."""
    from tqdm import tqdm

    encoder = None
    if text_encoder:
        from .text_encoder import TextEncoder

        encoder = TextEncoder(text_encoder, text_tokens)

    if store not in ("frames", "clip"):
        raise ValueError(f"--store must be frames or clip, got {store!r}")
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    if not os.path.isdir(src):
        raise ValueError(f"{src} is not a folder of videos")
    classes, videos = _videos(src)
    if not videos:
        raise ValueError(f"{src} holds no video ({', '.join(VIDEO_FILES)})")
    if reverse_labels:
        if classes:
            raise ValueError(f"--reverse-labels labels clips forwards (0) / backwards (1): give a flat folder of "
                             f"videos, not the class folders {classes}")
        if shard_size % 2:
            raise ValueError(f"--reverse-labels needs an even --shard-size (a clip and its reverse share a shard), "
                             f"got {shard_size}")
        classes = ["forwards", "backwards"]
    os.makedirs(out, exist_ok=True)
    vp9_dir = os.path.join(out, "vp9")
    if vp9:
        os.makedirs(vp9_dir, exist_ok=True)
    refused, file_list = 0, []
    with TarShardWriter(out, "train", shard_size) as writer, open(os.path.join(out, "refused.jsonl"), "w") as log, \
            tqdm(total=len(videos), desc="prepare-videos", unit="video", disable=not progress) as bar:
        for path, label in videos:
            try:
                caption, embedding = _sidecars(path)
                if embedding is None and encoder is not None:
                    embedding = encoder(caption)
                limit = frames * max_clips if max_clips else None
                clips, buffer = 0, []
                for frame in decode_frames(path, resize, limit):
                    buffer.append(frame)
                    if len(buffer) < frames:
                        continue
                    clip = np.stack(buffer)  # (F, H, W, 3) uint8
                    buffer = []
                    versions = [(clip, label)] if not reverse_labels else [(clip, 0), (clip[::-1].copy(), 1)]
                    for frames_, label_ in versions:
                        key = f"{writer.samples:09d}"
                        members = {"txt": caption.encode()}
                        members["frames.npy" if store == "frames" else "mp4"] = \
                            npy_bytes(frames_) if store == "frames" else encode_clip(frames_)
                        if embedding is not None:
                            members["emb.npy"] = npy_bytes(embedding)
                        if label_ is not None:
                            members["cls"] = str(label_).encode()
                        writer.write(key, members)
                        if vp9:
                            webm = os.path.join(vp9_dir, key + ".webm")
                            with open(webm, "wb") as f:
                                f.write(encode_clip(frames_, "libvpx-vp9", "webm"))
                            file_list.append(f"{webm} {label_ if label_ is not None else 0}")
                    clips += 1
                if clips == 0:
                    raise ValueError(f"fewer than {frames} decodable frames")
            except Exception as err:  # PyAV raises its own error types on corrupt containers
                refused += 1
                log.write(json.dumps({"source": path, "reason": f"{type(err).__name__}: {err}"}) + "\n")
            bar.update(1)
    if vp9:
        with open(os.path.join(vp9_dir, "file_list.txt"), "w") as f:
            f.write("".join(line + "\n" for line in file_list))
    summary = {"path": writer.pattern, "samples": writer.samples, "shards": len(writer.shards), "refused": refused,
               "classes": classes, "frames": frames, "resize": resize, "store": store, "text_encoder": text_encoder,
               "vp9_file_list": os.path.join(vp9_dir, "file_list.txt") if vp9 else "", "reverse_labels": reverse_labels}
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gigatron prepare-videos", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="folder of videos, or SRC/<class>/<video> (sidecars: <video>.txt, <video>.emb.npy)")
    parser.add_argument("out", help="output folder for train-NNNNNN.tar shards + DALI .idx files")
    parser.add_argument("--frames", type=int, default=8, help="F: frames per clip (default 8)")
    parser.add_argument("--resize", type=int, default=0, help="resize the shorter side to S pixels (0 = keep)")
    parser.add_argument("--shard-size", type=int, default=100, help="clips per shard (default 100)")
    parser.add_argument("--store", choices=["frames", "clip"], default="frames",
                        help="frames: decoded frames.npy; clip: re-encoded H.264 mp4")
    parser.add_argument("--max-clips", type=int, default=0, help="clips per video at most (0 = all)")
    parser.add_argument("--vp9", action="store_true", help="also write VP9 .webm clips + file_list.txt for DALI")
    parser.add_argument("--text-encoder", default="", metavar="SPEC",
                        help="embed captions without an emb.npy sidecar: llama-bytes:DIM or a gigatron Llama checkpoint")
    parser.add_argument("--text-tokens", type=int, default=64, help="longest prompt in tokens (default 64)")
    parser.add_argument("--reverse-labels", action="store_true",
                        help="arrow of time: write each clip forwards (cls 0) and reversed (cls 1), side by side")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = prepare_videos(args.src, args.out, args.frames, args.resize, args.shard_size, args.store, args.vp9,
                                 args.max_clips, not args.no_progress, args.text_encoder, args.text_tokens,
                                 args.reverse_labels)
    except (ValueError, OSError) as err:
        print(f"prepare-videos: error: {err}", file=sys.stderr)
        return 1
    print(f"prepare-videos: {summary['samples']} clips in {summary['shards']} shards, {summary['refused']} refused "
          f"(see {os.path.join(args.out, 'refused.jsonl')}); data.path: {summary['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
