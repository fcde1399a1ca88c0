"""The manifest of a checkpoint: every file with its size and CRC-32, written last, before commit.

`manifest.json` is what makes a folder a checkpoint. `verify` re-reads the files and refuses a
checkpoint whose manifest is missing, a file missing (a lost shard), shorter or longer than
recorded (a truncated copy), or whose checksum differs (a flipped bit); the error names the file.
CRC-32 (zlib) runs at ~1 GB/s per core, so checksumming costs about as much as reading the data,
and `verify_distributed` spreads the files over the ranks.
"""

from __future__ import annotations

import json
import os
import zlib

MANIFEST = "manifest.json"
FORMAT = "gigatron-checkpoint/1"
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded; the message names the folder and the bad file."""


def crc32_file(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def describe(folder: str, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "crc32"}} for files of `folder`."""
    return {n: {"size": os.path.getsize(os.path.join(folder, n)), "crc32": crc32_file(os.path.join(folder, n))}
            for n in names}


def write_manifest(folder: str, files: dict[str, dict], info: dict) -> None:
    """Write manifest.json durably (temp file, fsync, rename): a reader sees all of it or nothing."""
    body = {"format": FORMAT, **info, "files": dict(sorted(files.items()))}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST}: it was never committed (an interrupted "
                              f"save) or is not a gigatron checkpoint")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({err})") from err
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} has format {manifest.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return manifest


def check_files(folder: str, files: dict[str, dict], names: list[str]) -> str | None:
    """The first problem among `names` (a message naming the file), or None."""
    for name in names:
        want, path = files[name], os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"checkpoint {folder}: file {name} is missing (a lost shard)"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"checkpoint {folder}: file {name} has {size} bytes, the manifest says {want['size']} (truncated?)"
        crc = crc32_file(path)
        if crc != want["crc32"]:
            return (f"checkpoint {folder}: file {name} fails its checksum (crc32 {crc}, manifest {want['crc32']}): "
                    f"the data is corrupt")
    return None


def _dcp_files(folder: str) -> set[str]:
    """Data files the DCP metadata refers to (guards against a manifest that missed one)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(folder).read_metadata()
    return {info.relative_path for info in (metadata.storage_data or {}).values()}


def verify(folder: str, rank: int = 0, world_size: int = 1) -> dict:
    """Check this rank's share of the files (all of them by default); raise CheckpointError."""
    manifest = read_manifest(folder)
    files = manifest["files"]
    names = sorted(files)
    problem = check_files(folder, files, names[rank::world_size])
    if problem is None and rank == 0 and ".metadata" in files:
        unlisted = sorted(_dcp_files(folder) - set(files))
        if unlisted:
            problem = f"checkpoint {folder}: shard {unlisted[0]} is referenced by .metadata but not in {MANIFEST}"
    if problem:
        raise CheckpointError(problem)
    return manifest


def verify_distributed(folder: str) -> dict:
    """Every rank checks 1/world of the files; all ranks raise the same error if any fails."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return verify(folder)
    problems: list = [None] * dist.get_world_size()
    manifest, problem = None, None
    try:
        manifest = verify(folder, dist.get_rank(), dist.get_world_size())
    except CheckpointError as err:
        problem = str(err)
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise CheckpointError(first)
    return manifest
