"""`data.format: mds`: mosaicml-streaming's MDS shards, read by the same lanes as the webdataset reader.

The MDS format (index.json listing shards, each shard a table of sample offsets and the encoded
columns) is read with mosaicml-streaming's own shard readers (`reader_from_json`), one shard at a
time; sharding, shuffling, resumption and dp-size changes are the lanes' (`stream.py`), so an MDS
source behaves exactly like a WebDataset one (and mixes with it). Streaming's StreamingDataset is
not used: it builds a global sample partition and initialises its own process group when
WORLD_SIZE > 1. index.json holds one entry per shard (not per sample).

Columns become sample members by name: a "bytes", "jpeg" or "png" column keeps its encoded bytes
(decoded later by `decode.py`, with the random-resized crop), other safe encodings ("int", "str",
"ndarray:...") are decoded by streaming's `mds_decode`. A pickle column ("pkl") is never decoded:
the sample is refused as `skipped_unsafe`. A shard whose file is cut short loses the samples whose
bytes are missing (counted in lost_samples against index.json's sample count).

Install trap: `pip install mosaicml-streaming` pulls torchvision and a CUDA torch; install it with
--no-deps plus xxhash, zstd, python-snappy, Brotli, catalogue. `import streaming` then still needs
torchvision (streaming.vision), so `streaming_base()` loads `streaming.base` without running the
package's __init__.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np

from .decode import SampleDecoder
from .shard_loader import ShardLoader
from .tar_reader import ShardEnd

__all__ = ["MDSShards", "build_mds_loader", "streaming_base", "write_mds"]

RAW_COLUMNS = {"bytes", "jpeg", "png"}


def streaming_base():
    """mosaicml-streaming's `streaming.base`, imported without `streaming/__init__` (torchvision)."""
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None:
            raise ImportError("data.format mds needs mosaicml-streaming: pip install --no-deps mosaicml-streaming==0.13.0 "
                              "xxhash zstd python-snappy Brotli catalogue")
        package = types.ModuleType("streaming")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["streaming"] = package
    import streaming.base
    import streaming.base.format
    import streaming.base.format.mds.encodings

    return streaming.base


class MDSShards:
    """The shards of an MDS directory (index.json): `reader(i)` gives streaming's reader of shard i."""

    def __init__(self, dirname: str):
        self.dirname = dirname
        try:
            with open(os.path.join(dirname, "index.json")) as f:
                self.entries = json.load(f)["shards"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{dirname} is not an MDS directory (index.json: {err})") from None
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def reader(self, index: int):
        if index not in self._readers:
            from streaming.base.format import reader_from_json

            streaming_base()
            self._readers = {index: reader_from_json(self.dirname, None, self.entries[index])}  # one open at a time
        return self._readers[index]


def _split_columns(reader, data: bytes) -> dict:
    """One raw MDS sample -> {column: bytes or safe value}; a pickle column becomes a refused member."""
    from streaming.base.format.mds.encodings import is_mds_encoding_safe, mds_decode

    sizes, offset = [], 0
    for size in reader.column_sizes:
        if size:
            sizes.append(size)
        else:
            sizes.append(int(np.frombuffer(data[offset:offset + 4], np.uint32)[0]))
            offset += 4
    sample = {}
    for name, encoding, size in zip(reader.column_names, reader.column_encodings, sizes):
        value = data[offset:offset + size]
        offset += size
        if len(value) != size:
            raise ValueError("sample bytes cut short")
        if not is_mds_encoding_safe(encoding):
            sample[f"{name}.pkl"] = b""  # never unpickled: decode.py refuses the sample
        elif encoding in RAW_COLUMNS:
            sample[name] = value
        else:
            sample[name] = mds_decode(encoding, value)
    return sample


def make_mds_reader(shards: MDSShards):
    def read_mds_shard(index: int, start: int = 0, wanted: list[int] | None = None):
        try:
            reader = shards.reader(index)
        except Exception as err:
            yield ShardEnd(parsed=0, listed=shards.entries[index].get("samples"), error=str(err))
            return
        listed = reader.samples
        parsed = start  # samples before `start` were read (and counted) earlier
        for i in (wanted if wanted is not None else range(start, listed)):
            try:
                sample = _split_columns(reader, reader.get_sample_data(i))
            except Exception as err:  # a cut-short or missing shard file
                yield ShardEnd(parsed=i, listed=None if wanted is not None else listed, error=f"{type(err).__name__}: {err}")
                return
            parsed = i + 1
            yield i, sample
        yield ShardEnd(parsed=parsed if wanted is None else 0, listed=None if wanted is not None else listed)

    return read_mds_shard


def write_mds(out: str, samples, columns: dict[str, str], size_limit: int | str = 1 << 26) -> int:
    """Write (dict) samples with streaming's MDSWriter (uncompressed, so shards can be read in place)."""
    streaming_base()
    from streaming.base.format.mds.writer import MDSWriter

    count = 0
    with MDSWriter(out=out, columns=columns, compression=None, size_limit=size_limit, exist_ok=True) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return count


def build_mds_loader(cfg, split: str, dp_rank: int, dp_size: int) -> ShardLoader:
    """`data.format: mds`: data.path (or data.eval_path for "eval") is an MDS directory."""
    d, t = cfg.data, cfg.train
    shards = MDSShards(d.eval_path if split == "eval" and d.eval_path else d.path)
    from .shards import split_shards

    indices = range(len(shards)) if d.eval_path else split_shards(shards, d.eval_fraction)[split == "eval"]
    if len(indices) == 0:
        raise ValueError(f"data.path {d.path!r} has no MDS shard for the {split} split")
    decoder = SampleDecoder(d.modality, d.image_size, d.crop_scale_min, d.num_frames, d.label_key, d.num_labels,
                            d.text_embeddings)
    offset, read = indices.start, make_mds_reader(shards)
    return ShardLoader(lambda i: offset + i, len(indices), read, decoder, t.micro_batch_size, dp_rank, dp_size,
                       d.num_workers, t.seed + (7919 if split == "eval" else 0), d.shuffle_buffer, d.prefetch,
                       d.num_labels, d.max_skip_fraction, d.skip_check_after, "mds")
