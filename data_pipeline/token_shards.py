"""Token shards: a tokenized corpus on disk, written as a stream and read through memory maps.

On-disk format. A dataset is a prefix path `P` naming three files:

    P.bin      all documents' token ids concatenated: flat little-endian uint32, no header.
               By convention (prepare_text) each document is [bos] + tokens + [eos], so document
               boundaries are also visible in the stream itself.
    P.idx.npy  int64 array of document START offsets into the token stream (sorted, first 0,
               one per document), a plain .npy: np.load(P.idx.npy, mmap_mode="r", allow_pickle=False).
    P.json     metadata: {"format": "gigatron-token-shards-v1", "tokenizer", "vocab_size",
               "num_tokens", "num_documents", "sources", "created", ...extra}.

Why this shape. uint32 holds any vocabulary up to 4G ids (Llama 3 has 128,256, too many for
uint16). A flat stream plus an offset index is the Megatron-style indexed dataset, minus its
pickled headers: numpy alone reads it, any window of tokens is one contiguous slice of a memory
map (no per-document Python objects, so a 15T-token corpus costs page cache, not RAM), and the
document containing a token is one binary search in the start offsets.

Writing is streaming and atomic. `TokenShardWriter` appends each document to temporary files
(`P.bin.tmp-<pid>`, and the starts to a raw int64 side file), so memory stays constant whatever
the corpus size. Only on a clean `close()` does it convert the starts to .npy and rename the files
into place, `P.json` last: the JSON is the commit marker, and `TokenShards` refuses a prefix
without it. On an exception inside the `with` block every temporary file is removed, so a failed
run leaves nothing under `P` that a reader could mistake for a dataset.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

__all__ = ["TokenShardWriter", "TokenShards", "FORMAT"]

FORMAT = "gigatron-token-shards-v1"
TOKEN_DTYPE = np.dtype("<u4")
INDEX_DTYPE = np.dtype("<i8")


def shard_paths(prefix: str) -> dict[str, str]:
    prefix = os.fspath(prefix)
    return {"bin": prefix + ".bin", "idx": prefix + ".idx.npy", "json": prefix + ".json"}


class TokenShardWriter:
    """Stream documents into `prefix.{bin,idx.npy,json}`; use as a context manager.

    Args:
        prefix: output path prefix; its directory is created if needed.
        tokenizer_name: recorded in the metadata ("llama3", "bytes").
        vocab_size: every id must be in [0, vocab_size); checked per document.
        metadata: extra JSON-able fields for P.json (e.g. {"sources": 12}); may also be updated
            through `writer.metadata` before close.
    """

    def __init__(self, prefix: str, tokenizer_name: str, vocab_size: int, metadata: dict | None = None):
        if not 0 < vocab_size <= 2**32:
            raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")
        self.paths = shard_paths(prefix)
        self.tokenizer_name, self.vocab_size = tokenizer_name, int(vocab_size)
        self.metadata = {"sources": 0, **(metadata or {})}
        self.num_tokens = 0
        self.num_documents = 0
        directory = os.path.dirname(self.paths["bin"]) or "."
        os.makedirs(directory, exist_ok=True)
        tag = f".tmp-{os.getpid()}-{id(self):x}"
        self._tmp = {"bin": self.paths["bin"] + tag, "starts": self.paths["bin"] + tag + ".starts",
                     "idx": self.paths["idx"] + tag + ".npy", "json": self.paths["json"] + tag}
        self._bin = open(self._tmp["bin"], "wb")
        self._starts = open(self._tmp["starts"], "wb")
        self._closed = False

    def add_document(self, ids) -> None:
        """Append one document (a sequence or array of ids, written verbatim: include bos/eos)."""
        if self._closed:
            raise RuntimeError("TokenShardWriter is closed")
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"a document must be a non-empty 1-D sequence of ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size}): min {ids.min()}, max {ids.max()}")
        self._starts.write(np.asarray([self.num_tokens], dtype=INDEX_DTYPE).tobytes())
        self._bin.write(ids.astype(TOKEN_DTYPE, copy=False).tobytes())
        self.num_tokens += int(ids.size)
        self.num_documents += 1

    def close(self) -> dict:
        """Finish the files and move them into place (JSON last). Returns the metadata."""
        if self._closed:
            raise RuntimeError("TokenShardWriter is already closed")
        self._closed = True
        try:
            self._bin.close()
            self._starts.close()
            # Raw starts -> .npy, in chunks, so even billions of documents never sit in RAM at once.
            if self.num_documents == 0:
                np.save(self._tmp["idx"], np.zeros(0, dtype=INDEX_DTYPE), allow_pickle=False)
            else:
                starts = np.memmap(self._tmp["starts"], dtype=INDEX_DTYPE, mode="r")
                index = np.lib.format.open_memmap(self._tmp["idx"], mode="w+", dtype=INDEX_DTYPE, shape=starts.shape)
                for begin in range(0, len(starts), 1 << 22):
                    index[begin : begin + (1 << 22)] = starts[begin : begin + (1 << 22)]
                index.flush()
                del index, starts
            metadata = {
                "format": FORMAT,
                "tokenizer": self.tokenizer_name,
                "vocab_size": self.vocab_size,
                "num_tokens": self.num_tokens,
                "num_documents": self.num_documents,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            for key, value in self.metadata.items():  # extras never override the format's own fields
                metadata.setdefault(key, value)
            with open(self._tmp["json"], "w") as f:
                json.dump(metadata, f, indent=2)
                f.write("\n")
            # The JSON is the commit marker: drop an old one first and rename the new one last, so a
            # crash between renames never pairs old metadata with new tokens.
            if os.path.exists(self.paths["json"]):
                os.remove(self.paths["json"])
            for name in ("bin", "idx", "json"):
                os.replace(self._tmp[name], self.paths[name])
        finally:
            self._remove_temporaries()
        return metadata

    def abort(self) -> None:
        """Drop everything written so far; no file under the prefix is created."""
        if not self._closed:
            self._closed = True
            self._bin.close()
            self._starts.close()
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:  # the body may have called close() itself to get the metadata
            self.close()


class TokenShards:
    """Read-only view of a token-shard dataset through memory maps (nothing is loaded into RAM)."""

    def __init__(self, prefix: str):
        self.prefix = os.fspath(prefix)
        paths = shard_paths(self.prefix)
        if not os.path.exists(paths["json"]):
            raise FileNotFoundError(f"{paths['json']} not found: no complete token-shard dataset at prefix {self.prefix!r}")
        with open(paths["json"]) as f:
            self.metadata: dict = json.load(f)
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{paths['json']}: format {self.metadata.get('format')!r}, expected {FORMAT!r}")
        self.num_tokens: int = int(self.metadata["num_tokens"])
        self.num_documents: int = int(self.metadata["num_documents"])
        self.vocab_size: int = int(self.metadata["vocab_size"])
        self.tokenizer_name: str = self.metadata["tokenizer"]
        bin_bytes = os.path.getsize(paths["bin"])
        if bin_bytes != self.num_tokens * TOKEN_DTYPE.itemsize:
            raise ValueError(f"{paths['bin']} holds {bin_bytes} bytes, metadata says {self.num_tokens} uint32 tokens")
        # np.memmap refuses empty files; an empty dataset gets an empty array instead.
        self.tokens = np.memmap(paths["bin"], dtype=TOKEN_DTYPE, mode="r") if self.num_tokens else np.zeros(0, TOKEN_DTYPE)
        self.document_starts = np.load(paths["idx"], mmap_mode="r", allow_pickle=False)
        if self.document_starts.shape != (self.num_documents,) or self.document_starts.dtype != INDEX_DTYPE:
            raise ValueError(f"{paths['idx']}: {self.document_starts.dtype}{self.document_starts.shape}, expected int64 ({self.num_documents},)")

    def __len__(self) -> int:
        return self.num_tokens

    def _check_range(self, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of range for {self.num_tokens} tokens")

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as a uint32 array (a copy; the map stays read-only)."""
        self._check_range(start, length)
        return np.array(self.tokens[start : start + length])

    def document_ids(self, start: int, length: int) -> np.ndarray:
        """For each token in [start, start + length), the index of its document (int64)."""
        self._check_range(start, length)
        if length == 0:
            return np.zeros(0, dtype=np.int64)
        starts = self.document_starts
        first = int(np.searchsorted(starts, start, side="right")) - 1  # document holding `start`
        last = int(np.searchsorted(starts, start + length - 1, side="right")) - 1
        # Only the boundaries inside the window matter: a slice of (last - first) starts, not all N.
        inner = np.asarray(starts[first + 1 : last + 1])
        positions = np.arange(start, start + length, dtype=np.int64)
        return first + np.searchsorted(inner, positions, side="right")

    def document(self, index: int) -> np.ndarray:
        """The tokens of document `index`."""
        begin = int(self.document_starts[index])
        end = int(self.document_starts[index + 1]) if index + 1 < self.num_documents else self.num_tokens
        return self.window(begin, end - begin)

    def __repr__(self) -> str:
        return (f"TokenShards({self.prefix!r}, tokenizer={self.tokenizer_name}, "
                f"num_tokens={self.num_tokens:,}, num_documents={self.num_documents:,})")
