"""Streaming safetensors I/O: write a file one tensor at a time, and map one without reading it.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the raw little-endian tensor bytes. Because the header
holds only shapes and dtypes, it is written first and each tensor's bytes follow as they are read,
so writing never holds more than one tensor. Files are checked against the `safetensors` library
in the tests.
"""

from __future__ import annotations

import json
import mmap
import struct
from typing import Callable, Iterable

import torch

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}


def nbytes(shape, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * dtype.itemsize


def write_streaming(path: str, entries: Iterable[tuple[str, torch.Size, torch.dtype]],
                    produce: Callable[[str], torch.Tensor], metadata: dict | None = None) -> int:
    """Write `entries` (name, shape, dtype) to `path`, asking `produce(name)` for each tensor in
    turn. Returns the bytes of tensor data written."""
    entries = list(entries)
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            tensor = produce(name)
            if tensor.shape != torch.Size(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(shape)} {dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # no copy
            del tensor
    return offset


def map_file(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as views of a private memory map: nothing is read until
    used, and pages stay in the page cache (reclaimable) rather than in process memory."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = TORCH_DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin) if count else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out
