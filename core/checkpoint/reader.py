"""Read a DCP checkpoint one tensor at a time, in one process, whatever layout wrote it.

DCP's `.metadata` records each tensor's global shape, dtype, chunks (one per rank's shard) and,
per chunk, the byte range of its serialized record in a `.distcp` file. `read(key)` loads each
chunk straight from a read-only view of that byte range (`torch.load(weights_only=True)`
allocates the chunk once, with no intermediate byte buffer) and assembles the chunks, so peak
memory is one tensor plus one chunk; a tensor saved as one chunk is returned without any copy.
The conversion to Hugging Face streams 405B through this.
"""

from __future__ import annotations

import io
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata


class _FileSlice(io.RawIOBase):
    """The bytes [offset, offset + length) of an open file, as a seekable read-only file."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class CheckpointReader:
    def __init__(self, path: str):
        self.path = path
        self.metadata = dcp.FileSystemReader(path).read_metadata()
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.tensors if k.startswith(prefix)]

    def shape(self, key: str) -> torch.Size:
        return self.tensors[key].size

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def _chunk(self, key: str, offsets) -> torch.Tensor | None:
        info = self.metadata.storage_data[MetadataIndex(key, torch.Size(offsets))]
        if getattr(info, "transform_descriptors", None):  # compressed etc.: let DCP decode it
            return None
        with open(os.path.join(self.path, info.relative_path), "rb", buffering=0) as f:
            return torch.load(io.BufferedReader(_FileSlice(f, info.offset, info.length), 1 << 20),
                              map_location="cpu", weights_only=True)

    def read(self, key: str) -> torch.Tensor:
        """The full tensor `key` (e.g. "model.norm.weight"), assembled from all its shards."""
        meta = self.tensors[key]
        chunks = meta.chunks
        if len(chunks) == 1 and tuple(chunks[0].sizes) == tuple(meta.size):
            whole = self._chunk(key, chunks[0].offsets)
            if whole is not None:
                return whole.reshape(meta.size)
        out = torch.empty(meta.size, dtype=meta.properties.dtype)
        for chunk in chunks:
            piece = self._chunk(key, chunk.offsets)
            if piece is None:
                dcp.load({key: out}, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
                return out
            out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))].copy_(piece.reshape(chunk.sizes))
            del piece
        return out
