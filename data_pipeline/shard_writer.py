"""Write WebDataset tar shards with a DALI index file per shard, and an MDS writer for the MDS reader.

    writer = TarShardWriter(out_dir, prefix="train", shard_size=1000)
    writer.write("key", {"jpg": bytes, "cls": b"3"})   # members, in sorted extension order
    writer.close()                                      # -> train-000000.tar, train-000000.tar.idx, ...

The index (DALI's wds2idx format, version v1.2) has a header "v1.2 N" and one line per sample
listing "ext offset size name" for each member, offset being the member's data offset in the tar.
DALI's fn.readers.webdataset needs it; the shard readers use its N to count samples lost to a
truncated tar. Shards are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import os
import tarfile

from webdataset.tariterators import base_plus_ext

__all__ = ["TarShardWriter", "write_dali_index"]


def npy_bytes(array) -> bytes:
    """An array as .npy bytes (no pickle: numeric dtypes only), for .npy shard members."""
    import numpy as np

    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def write_dali_index(tar_path: str, index_path: str | None = None) -> int:
    """Scan a tar and write its DALI index; returns the number of samples."""
    lines, current, current_key = [], [], None
    with tarfile.open(tar_path, "r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, extension = base_plus_ext(member.name)
            if key != current_key and current:
                lines.append(" ".join(current))
                current = []
            current_key = key
            current.append(f"{extension} {member.offset_data} {member.size} {os.path.basename(member.name)}")
    if current:
        lines.append(" ".join(current))
    index_path = index_path or tar_path + ".idx"
    with open(index_path + ".tmp", "w") as f:
        f.write(f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
    os.replace(index_path + ".tmp", index_path)
    return len(lines)


class TarShardWriter:
    """Rotating writer of `{prefix}-{i:06d}.tar` shards of at most `shard_size` samples each."""

    def __init__(self, out_dir: str, prefix: str = "train", shard_size: int = 1000):
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.shards: list[str] = []
        self.samples = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def _open(self) -> None:
        path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.shards):06d}.tar")
        self.shards.append(path)
        self._tar = tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.shards[-1]
        os.replace(path + ".tmp", path)
        write_dali_index(path)
        self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
        if self._tar is None or self._in_shard >= self.shard_size:
            self._close_shard()
            self._open()
        for extension in sorted(members):
            data = members[extension]
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.samples += 1

    def close(self) -> None:
        self._close_shard()

    @property
    def pattern(self) -> str:
        """The brace pattern naming every shard written, for data.path."""
        last = max(0, len(self.shards) - 1)
        return os.path.join(self.out_dir, f"{self.prefix}-{{{0:06d}..{last:06d}}}.tar")

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
