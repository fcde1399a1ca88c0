"""Read one WebDataset tar shard as a stream of (index, sample), detecting truncation.

A sample is one group of consecutive members with the same key (the name up to its first dot after
the last slash, WebDataset's rule): {"jpg": bytes, "cls": bytes, ...}. Its index is its ordinal in
the shard, the same numbering as the shard's DALI index file (one line per sample). The tar is
parsed by webdataset's own `tar_file_iterator` (Python's tarfile in stream mode) and opened by
webdataset's `gopen` when it is not a local path ("pipe:aws s3 cp s3://b/s.tar -", "https://..."),
so shards can stream from an object store; members of samples that are not wanted are skipped without
being copied. A truncated tar ends the stream early: the sample being read at the cut and every
sample after it count as lost against the shard's index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .shards import shard_sample_count

__all__ = ["ShardEnd", "read_tar_shard"]


@dataclass
class ShardEnd:
    """What the stream learnt at the end of a shard: complete samples parsed, the index's count."""

    parsed: int
    listed: int | None
    error: str = ""

    @property
    def lost(self) -> int:
        return max(0, self.listed - self.parsed) if self.listed is not None else 0


def read_tar_shard(url: str, start: int = 0, wanted: list[int] | None = None) -> Iterator:
    """Yield (index, sample) for samples index >= start (or in `wanted`), then one final ShardEnd."""
    wanted_set = set(wanted) if wanted is not None else None
    want = (lambda i: i in wanted_set) if wanted_set is not None else (lambda i: i >= start)
    last_wanted = max(wanted_set) if wanted_set else None
    state = {"key": None, "index": -1}

    def select(fname: str) -> bool:
        key, _ = base_plus_ext(fname)
        if key != state["key"]:
            state["key"], state["index"] = key, state["index"] + 1
        return want(state["index"])

    parsed, error, current, current_key, current_index = 0, "", {}, None, -1
    try:
        with (open(url, "rb") if "://" not in url and not url.startswith("pipe:") else gopen(url, "rb")) as stream:
            for member in tar_file_iterator(stream, select_files=select):
                key, extension = base_plus_ext(member["fname"])
                if key != current_key:
                    if current_key is not None:
                        yield current_index, current
                    current, current_key, current_index = {}, key, state["index"]
                if extension is None:
                    continue
                current[extension.lower()] = member["data"]
                if last_wanted is not None and state["index"] > last_wanted:
                    break
            if current_key is not None and (last_wanted is None or current_index <= last_wanted):
                yield current_index, current
            parsed = state["index"] + 1
    except OSError as err:  # a missing shard or an I/O error
        error = f"{type(err).__name__}: {err}"
    except Exception as err:  # tarfile.ReadError / EOFError at the cut of a truncated tar
        error = f"{type(err).__name__}: {err}"
        # The sample being read at the cut (index state["index"]) is incomplete: lost. The one before
        # it is complete when the cut fell in the first member of the next sample.
        if current_key is not None and current_index < state["index"] and want(current_index):
            yield current_index, current
        parsed = max(0, state["index"])
    if wanted is not None:
        yield ShardEnd(parsed=parsed, listed=None, error=error)
    else:
        yield ShardEnd(parsed=parsed, listed=shard_sample_count(url), error=error)
