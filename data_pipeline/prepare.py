"""Text preparation: files on disk -> tokenized token shards (`gigatron prepare-text`).

    gigatron prepare-text stdlib --out data/stdlib --tokenizer llama3 --max-mb 5
    gigatron prepare-text docs/ notes.md --out data/mine --tokenizer bytes

A source is a file, a directory (every file below it matching the patterns, by default *.py, *.txt
and *.md), or the word "stdlib": the Python standard library's own source directory
(`sysconfig.get_paths()["stdlib"]`, without site-packages), ~30 MB of real text on every machine
with no download. Each non-empty file is one document, [bos] + tokens + [eos].

Determinism: the files of each source are sorted by relative path and sources keep the order
given, so the same inputs give byte-identical shards (the `created` field aside). Files are read
as bytes and decoded as UTF-8 with errors="replace", keeping the original newlines.

Streaming: files are read in batches of ~`batch_bytes`, tokenized with the tokenizer's threaded
`encode_batch`, and appended to a `TokenShardWriter`, so memory holds one batch, not the corpus.
`max_bytes` stops before the first file that starts past the limit: whole files only, so the
total may pass max_bytes by at most one file.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import sysconfig
import time
from typing import Sequence

from tqdm import tqdm

from .token_shards import TokenShardWriter
from .tokenizer import TOKENIZERS, build_tokenizer

__all__ = ["prepare_text", "list_source_files", "stdlib_source_dir", "main"]

DEFAULT_PATTERNS = ("*.py", "*.txt", "*.md")
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}  # never source text
TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_source_dir() -> str:
    """The directory of the running Python's standard library sources."""
    return sysconfig.get_paths()["stdlib"]


def _walk(root: str, patterns: Sequence[str], skip_tests: bool) -> list[str]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIPPED_DIRS and not (skip_tests and d in TEST_DIRS)]
        for name in files:
            path = os.path.join(directory, name)
            if any(fnmatch.fnmatch(name, p) for p in patterns) and os.path.isfile(path):
                found.append(path)
    # Sort by path components, not by string, so "a/b" and "a.b" order the same on every OS.
    return sorted(found, key=lambda path: os.path.relpath(path, root).split(os.sep))


def list_source_files(sources: Sequence[str], patterns: Sequence[str] = DEFAULT_PATTERNS, skip_tests: bool = False) -> list[str]:
    """Resolve sources (files, directories, "stdlib") into a deterministic, duplicate-free file list."""
    files, seen = [], set()
    for source in sources:
        if source == "stdlib":
            found = _walk(stdlib_source_dir(), patterns, skip_tests)
        elif os.path.isdir(source):
            found = _walk(source, patterns, skip_tests)
        elif os.path.isfile(source):
            found = [source]
        else:
            raise FileNotFoundError(f"source {source!r} is neither a file, a directory nor 'stdlib'")
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def prepare_text(
    sources: list[str],
    prefix: str,
    tokenizer_name: str = "llama3",
    max_bytes: int | None = None,
    progress: bool = True,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    skip_tests: bool = False,
    batch_bytes: int = 4 << 20,
) -> dict:
    """Tokenize the sources into `prefix.{bin,idx.npy,json}`; returns the metadata written to P.json.

    Args:
        sources: files, directories and/or "stdlib".
        prefix: output prefix (see token_shards for the format).
        tokenizer_name: "llama3" or "bytes".
        max_bytes: stop before the first file that starts past this many bytes read (None: all).
        progress: show a tqdm bar in bytes.
        patterns: file-name globs for directory sources.
        skip_tests: leave out directories named test/tests/idle_test.
        batch_bytes: bytes of text handed to one threaded encode_batch call.
    """
    started = time.perf_counter()
    tokenizer = build_tokenizer(tokenizer_name)
    files = list_source_files(sources, patterns, skip_tests)
    total = sum(os.path.getsize(path) for path in files)
    if max_bytes is not None:
        total = min(total, max_bytes)
    bytes_read, files_read = 0, 0

    with TokenShardWriter(prefix, tokenizer.name, tokenizer.vocab_size, metadata={"inputs": list(sources)}) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:

        def flush(texts: list[str], size: int) -> None:
            for ids in tokenizer.encode_batch(texts, bos=True, eos=True):
                writer.add_document(ids)
            bar.update(size)  # the bar counts tokenized bytes

        batch, batch_size = [], 0
        for path in files:
            if max_bytes is not None and bytes_read >= max_bytes:
                break
            with open(path, "rb") as f:
                data = f.read()
            bytes_read += len(data)
            if not data:  # empty files (e.g. bare __init__.py) would be [bos, eos] noise
                continue
            files_read += 1
            batch.append(data.decode("utf-8", errors="replace"))
            batch_size += len(data)
            if batch_size >= batch_bytes:
                flush(batch, batch_size)
                batch, batch_size = [], 0
        if batch:
            flush(batch, batch_size)
        writer.metadata.update(sources=files_read, bytes=bytes_read, seconds=round(time.perf_counter() - started, 3))
        metadata = writer.close()
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: gigatron prepare-text SOURCES... --out PREFIX [--tokenizer llama3|bytes] [--max-mb N]."""
    parser = argparse.ArgumentParser(
        prog="gigatron prepare-text",
        description="Tokenize text files into memory-mapped token shards (PREFIX.bin, PREFIX.idx.npy, PREFIX.json).",
    )
    parser.add_argument("sources", nargs="+", help='files, directories, or "stdlib" (the Python standard library sources)')
    parser.add_argument("--out", required=True, metavar="PREFIX", help="output path prefix")
    parser.add_argument("--tokenizer", default="llama3", choices=sorted(TOKENIZERS), help="tokenizer (default: llama3)")
    parser.add_argument("--max-mb", type=float, default=None, help="stop after about this many MB (10**6 bytes) of text")
    parser.add_argument("--pattern", action="append", default=None,
                        help=f"file-name glob for directories, repeatable (default: {' '.join(DEFAULT_PATTERNS)})")
    parser.add_argument("--skip-tests", action="store_true", help="leave out test/tests/idle_test directories")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    metadata = prepare_text(
        args.sources,
        args.out,
        tokenizer_name=args.tokenizer,
        max_bytes=None if args.max_mb is None else int(args.max_mb * 1e6),
        progress=not args.no_progress,
        patterns=tuple(args.pattern) if args.pattern else DEFAULT_PATTERNS,
        skip_tests=args.skip_tests,
    )
    print(
        f"{metadata['sources']:,} files, {metadata['bytes'] / 1e6:.2f} MB -> {metadata['num_tokens']:,} tokens "
        f"({metadata['bytes'] / max(metadata['num_tokens'], 1):.2f} bytes/token, {metadata['tokenizer']}) "
        f"in {metadata['seconds']:.1f} s: {args.out}.bin, {args.out}.idx.npy, {args.out}.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
