"""Token shards: round trip, document ids at boundaries, atomic writes."""

import json
import os

import numpy as np
import pytest

from gigatron.data_pipeline.token_shards import TokenShards, TokenShardWriter

DOCS = [[256, 1, 2, 257], [256, 257], [256, 5, 6, 7, 8, 257], [256, 9, 257]]


def write(prefix, docs=DOCS, **metadata):
    with TokenShardWriter(prefix, "bytes", 258, metadata=metadata) as writer:
        for doc in docs:
            writer.add_document(doc)
    return TokenShards(prefix)


def test_round_trip(tmp_path):
    shards = write(tmp_path / "sub" / "data", sources=4)
    flat = np.concatenate([np.array(d) for d in DOCS])
    assert shards.num_tokens == len(flat) == 15 and shards.num_documents == 4 and shards.vocab_size == 258
    np.testing.assert_array_equal(shards.window(0, 15), flat)
    np.testing.assert_array_equal(shards.window(3, 4), flat[3:7])
    for i, doc in enumerate(DOCS):
        np.testing.assert_array_equal(shards.document(i), doc)
    # The documented on-disk format, read with plain numpy and json.
    np.testing.assert_array_equal(np.fromfile(tmp_path / "sub" / "data.bin", dtype="<u4"), flat)
    starts = np.load(tmp_path / "sub" / "data.idx.npy", mmap_mode="r", allow_pickle=False)
    assert starts.dtype == np.int64 and starts.tolist() == [0, 4, 6, 12]
    meta = json.loads((tmp_path / "sub" / "data.json").read_text())
    assert {k: meta[k] for k in ("tokenizer", "vocab_size", "num_tokens", "num_documents", "sources")} == {
        "tokenizer": "bytes", "vocab_size": 258, "num_tokens": 15, "num_documents": 4, "sources": 4}
    assert "created" in meta
    with pytest.raises(IndexError):
        shards.window(10, 6)


def test_document_ids_at_boundaries(tmp_path):
    shards = write(tmp_path / "data")
    expected = [0] * 4 + [1] * 2 + [2] * 6 + [3] * 3
    assert shards.document_ids(0, 15).tolist() == expected
    for start in range(15):  # every window, including ones that start or end exactly on a boundary
        for length in range(0, 16 - start):
            assert shards.document_ids(start, length).tolist() == expected[start : start + length]


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with TokenShardWriter(tmp_path / "data", "bytes", 258) as writer:
            writer.add_document([256, 1, 257])
            assert os.listdir(tmp_path)  # temporaries exist while writing ...
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # ... and are all gone afterwards
    with pytest.raises(FileNotFoundError, match="no complete token-shard dataset"):
        TokenShards(tmp_path / "data")


def test_rejects_bad_documents(tmp_path):
    with TokenShardWriter(tmp_path / "data", "bytes", 258) as writer:
        with pytest.raises(ValueError, match="out of range"):
            writer.add_document([256, 258])
        with pytest.raises(ValueError, match="non-empty"):
            writer.add_document([])
        writer.add_document([1])
    assert TokenShards(tmp_path / "data").num_tokens == 1


def test_overwrite_and_empty(tmp_path):
    write(tmp_path / "data")
    shards = write(tmp_path / "data", docs=[[256, 257]])
    assert shards.num_tokens == 2 and shards.document_starts.tolist() == [0]
    empty = write(tmp_path / "empty", docs=[])
    assert empty.num_tokens == 0 and empty.num_documents == 0
