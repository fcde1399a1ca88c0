"""Sample decoding for the shard readers: bytes -> validated arrays, with no pickle anywhere.

A raw sample is a dict {extension: bytes} (one WebDataset key group, or one MDS row). Decoding
either returns arrays or raises `SampleError(kind)`, which the stream counts as `skipped_<kind>`:
  unsafe    a member that only pickle could read (.pyd .pickle .pkl .pt .pth): refused, never loaded
  missing   a required field is absent (no image / frames, no label when data.label_key is set)
  decode    the image or clip bytes do not decode (truncated or corrupt JPEG, bad video)
  shape     an array of the wrong shape or dtype (frames not (F', H, W, 3) uint8 with F' >= F, ...)
  label     a label that is not an integer list in range

Random-resized crop (Szegedy et al. 2015, torchvision's RandomResizedCrop): area fraction
a ~ U(crop_scale_min, 1), log-aspect ~ U(log 3/4, log 4/3), w = round(sqrt(a A r)), h = round(sqrt(a A / r)),
10 tries, else a centre crop; then a bilinear resize to S x S. Its random numbers come from
(seed, epoch, shard, index) alone, so a sample gets the same crop on any layout and after a resume.
JPEGs are decoded with PIL's draft mode at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the
crop at >= S pixels: the same crop box, fewer pixels decoded.
"""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = ["SampleError", "SampleDecoder", "random_resized_crop_box", "UNSAFE_EXTENSIONS"]

UNSAFE_EXTENSIONS = {"pyd", "pickle", "pkl", "pt", "pth"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CLIP_EXTENSIONS = ("mp4", "webm", "mkv")


class SampleError(Exception):
    def __init__(self, kind: str, message: str = ""):
        self.kind = kind
        super().__init__(f"{kind}: {message}")


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, scale_min: float,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random-resized crop of a width x height image (torchvision's algorithm)."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height  # fallback: the largest centre crop whose aspect lies in the range
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_image(data: bytes, rng: np.random.Generator, size: int, scale_min: float) -> np.ndarray:
    """Decode, random-resized-crop and resize one image: (S, S, 3) uint8, HWC."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        left, top, w, h = random_resized_crop_box(rng, width, height, scale_min)
        if image.format == "JPEG":  # decode at a reduced DCT scale that keeps the crop >= size
            image.draft("RGB", (max(1, width * size // w), max(1, height * size // h)))
        fx, fy = image.size[0] / width, image.size[1] / height
        image = image.convert("RGB")
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        out = np.asarray(image.resize((size, size), Image.BILINEAR, box=box))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on corrupt bytes
        raise SampleError("decode", f"image does not decode ({type(err).__name__}: {err})") from None
    return out


def decode_clip(data: bytes, num_frames: int) -> np.ndarray:
    """The first F frames of an encoded clip (H.264, VP9, ...) with PyAV: (F, H, W, 3) uint8."""
    import av

    frames = []
    try:
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == num_frames:
                    break
    except Exception as err:
        raise SampleError("decode", f"clip does not decode ({type(err).__name__}: {err})") from None
    if len(frames) < num_frames:
        raise SampleError("shape", f"clip has {len(frames)} frames, need {num_frames}")
    return np.stack(frames)


def load_array(data: bytes) -> np.ndarray:
    """A .npy member, read with allow_pickle=False (object arrays are refused)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err):
            raise SampleError("unsafe", "object array (would need pickle)") from None
        raise SampleError("shape", f"bad .npy ({err})") from None
    except Exception as err:
        raise SampleError("decode", f"bad .npy ({type(err).__name__}: {err})") from None


class SampleDecoder:
    """Raw sample -> {"pixels": (S, S, 3) uint8 | (F, S, S, 3) uint8, "label": int | list, "text": (L, D)}.

    Args:
        modality: "image" or "video".
        size: S, the crop side; scale_min: the random-resized-crop area floor (images).
        num_frames: F (video); label_key: the label member ("cls"), "" for unlabelled data;
        num_labels: K > 0 for multi-label ("3,7" in .cls); text_embeddings: require emb.npy (L, D).
    """

    def __init__(self, modality: str = "image", size: int = 224, scale_min: float = 0.08, num_frames: int = 8,
                 label_key: str = "cls", num_labels: int = 0, text_embeddings: bool = False):
        if modality not in ("image", "video"):
            raise ValueError(f"modality must be image or video, got {modality!r}")
        self.modality, self.size, self.scale_min, self.num_frames = modality, size, scale_min, num_frames
        self.label_key, self.num_labels, self.text_embeddings = label_key, num_labels, text_embeddings

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        unsafe = [k for k in sample if k.rsplit(".", 1)[-1].lower() in UNSAFE_EXTENSIONS]
        if unsafe:
            raise SampleError("unsafe", f"member .{unsafe[0]} needs pickle; refused")
        out = {"pixels": self._image(sample, rng) if self.modality == "image" else self._video(sample, rng)}
        if self.label_key:
            out["label"] = self._label(sample)
        if self.text_embeddings:
            if "emb.npy" not in sample:
                raise SampleError("missing", "no emb.npy")
            text = load_array(sample["emb.npy"])
            if text.ndim != 2 or not np.issubdtype(text.dtype, np.floating):
                raise SampleError("shape", f"emb.npy is {text.dtype} {text.shape}, need float (L, D)")
            out["text"] = text.astype(np.float32)
        return out

    def _image(self, sample: dict, rng: np.random.Generator) -> np.ndarray:
        key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
        if key is None:
            raise SampleError("missing", f"no image member (has {', '.join(sorted(sample)) or 'nothing'})")
        return decode_image(sample[key], rng, self.size, self.scale_min)

    def _video(self, sample: dict, rng: np.random.Generator) -> np.ndarray:
        F, S = self.num_frames, self.size
        if "frames.npy" in sample:
            frames = load_array(sample["frames.npy"])
        else:
            key = next((k for k in CLIP_EXTENSIONS if k in sample), None)
            if key is None:
                raise SampleError("missing", f"no frames.npy or clip member (has {', '.join(sorted(sample))})")
            frames = decode_clip(sample[key], F)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < F \
                or frames.shape[1] < S or frames.shape[2] < S:
            raise SampleError("shape", f"frames are {frames.dtype} {frames.shape}, need uint8 (>={F}, >={S}, >={S}, 3)")
        top = int(rng.integers(0, frames.shape[1] - S + 1))  # one random crop for the whole clip
        left = int(rng.integers(0, frames.shape[2] - S + 1))
        return np.ascontiguousarray(frames[:F, top:top + S, left:left + S])  # (F, S, S, 3)

    def _label(self, sample: dict) -> int | list[int]:
        if self.label_key not in sample:
            raise SampleError("missing", f"no .{self.label_key} label")
        value = sample[self.label_key]
        try:
            text = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
            labels = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
        except (UnicodeDecodeError, ValueError):
            raise SampleError("label", f"label {value!r} is not an integer list") from None
        if self.num_labels > 0:
            if any(not 0 <= label < self.num_labels for label in labels):
                raise SampleError("label", f"labels {labels} outside [0, {self.num_labels})")
            return labels
        if len(labels) != 1:
            raise SampleError("label", f"expected one class, got {labels}")
        return labels[0]
