"""The `data:` section of a recipe. A plain dataclass (no heavy imports): `core/config.py` embeds it.

`format` selects the reader (`data_pipeline/loader.py` maps each name to its builder); the other
fields belong to the readers. Every field has a one-line doc: unit, meaning, why the default.

A mixture (`format: mixture`) lists its sources, each a reader of its own with a weight:

    data:
      format: mixture
      mixture:
        - {format: webdataset, path: "images/train-{000000..000999}.tar", weight: 0.6}
        - {format: webdataset, path: "videos/train-{000000..000099}.tar", weight: 0.4, modality: video}
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SourceConfig:
    format: str = "webdataset"            # reader of this source: tokens | webdataset | dali | mds
    path: str = ""                        # shard pattern / list (comma-separated) / token prefix of this source
    weight: float = 1.0                   # relative share of micro-batches drawn from this source
    eval_path: str = ""                   # held-out shards of this source; empty = hold out by eval_fraction
    modality: str = ""                    # image | video for this source; empty = data.modality (Omnivore mixes both)


@dataclass
class DataConfig:
    format: str = "tokens"                # reader: tokens | webdataset | dali | mds | mixture; see data_pipeline/loader.py
    path: str = "runs/data/stdlib"        # token-shard prefix (tokens) or shard pattern "d/s-{000..099}.tar", a comma list, or an MDS dir
    sources: list[str] = field(default_factory=lambda: ["stdlib"])  # what prepare-text reads if missing
    tokenizer: str = "llama3"             # llama3 | bytes
    max_mb: float = 0.0                   # cap on prepared text in MB; 0 = everything
    eval_fraction: float = 0.01           # share of samples (tokens) or shards (others) held out for evaluation
    eval_path: str = ""                   # held-out shards for split "eval"; empty = the last eval_fraction of the shards
    mixture: list[SourceConfig] = field(default_factory=list)  # sources of format "mixture", with weights
    num_workers: int = 2                  # background reader processes per rank (DALI: CPU threads); 0 = in the main process
    prefetch: int = 2                     # micro-batches each worker prepares ahead (overlap with compute)
    shuffle_buffer: int = 1000            # samples in each worker's shuffle buffer (shard shuffle + buffer)
    image_size: int = 224                 # S: side of the square crop in pixels (ViT-H/14 at 224 px)
    crop_scale_min: float = 0.08          # random-resized-crop area range [min, 1] (Inception / torchvision default)
    modality: str = "image"               # image | video: what the shard readers decode (one modality per source)
    label_key: str = "cls"                # member holding the class label(s); "" = unlabelled data
    text_embeddings: bool = False         # video: require emb.npy (L, D) per clip -> "text_embeddings"
    text_tokens: int = 0                  # L > 0: captions as byte tokens (B, L) "text_tokens" + "text_lengths" (ImageBind)
    audio: bool = False                   # log-mel spectrograms (B, 1, n_mels, frames) "audio" (ImageBind)
    num_labels: int = 0                   # K > 0: multi-label; labels are multi-hot (B, K) float32 from "a,b,c" in .cls
    num_frames: int = 8                   # F: frames per video clip
    max_skip_fraction: float = 0.01       # stop with DataError when (skipped + lost) / read samples exceeds this
    skip_check_after: int = 1000          # samples read before the skip fraction is checked (avoids noise at start)
