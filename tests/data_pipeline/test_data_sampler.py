"""PackedBatchStream and its O(1)-memory permutation: bijection, determinism, DP layouts, exact resume."""

import json
import tracemalloc

import numpy as np
import pytest
import torch

from gigatron.data_pipeline.sampler import FeistelPermutation, PackedBatchStream
from gigatron.data_pipeline.token_shards import FORMAT, TokenShards, TokenShardWriter

T = 8  # seq_len


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """~1.6K tokens of byte-level documents of random lengths (N = 201 windows of T=8)."""
    rng = np.random.default_rng(0)
    prefix = tmp_path_factory.mktemp("shards") / "data"
    with TokenShardWriter(prefix, "bytes", 258) as writer:
        total = 0
        while total < 1609:
            doc = [256, *rng.integers(0, 256, size=int(rng.integers(0, 40))).tolist(), 257]
            writer.add_document(doc[: 1609 - total])
            total += len(doc[: 1609 - total])
    return TokenShards(prefix)


def stream(shards, B=4, dp_rank=0, dp_size=1, seed=1234, seq_len=T):
    return PackedBatchStream(shards, seq_len=seq_len, micro_batch_size=B, dp_rank=dp_rank, dp_size=dp_size, seed=seed)


def rows(batches):
    return torch.cat([b["input_ids"] for b in batches]).tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 997, 1000, 1024, 1025])
def test_permutation_is_a_bijection(n):
    for seed, epoch in [(0, 0), (1234, 0), (1234, 7)]:
        permutation = FeistelPermutation(n, seed=seed, epoch=epoch)
        assert sorted(permutation(i) for i in range(n)) == list(range(n))
    with pytest.raises(IndexError):
        permutation(n)


def test_permutation_looks_random_and_depends_on_key():
    n = 1000
    orders = {key: [FeistelPermutation(n, *key)(i) for i in range(n)] for key in [(0, 0), (0, 1), (1, 0)]}
    assert len({tuple(order) for order in orders.values()}) == 3  # other epoch, other seed: other order
    order = np.array(orders[(0, 0)])
    assert np.sum(order == np.arange(n)) < 10  # a random permutation has ~1 fixed point
    assert abs(np.corrcoef(order, np.arange(n))[0, 1]) < 0.15
    with pytest.raises(ValueError):
        FeistelPermutation(0, seed=0)


def test_batch_contents(shards):
    data = stream(shards, B=3)
    assert data.num_samples == (shards.num_tokens - 1) // T == 201
    batch = data.next_batch()
    assert batch["input_ids"].shape == batch["labels"].shape == batch["document_ids"].shape == (3, T)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["document_ids"].dtype == torch.int32
    for j in range(3):
        k = data.window_index(j)
        window = torch.from_numpy(shards.window(k * T, T + 1).astype(np.int64))
        assert torch.equal(batch["input_ids"][j], window[:-1]) and torch.equal(batch["labels"][j], window[1:])
        documents = shards.document_ids(k * T, T)
        assert batch["document_ids"][j].tolist() == (documents - documents[0]).tolist()


def test_one_epoch_reads_every_window_once(shards):
    data = stream(shards, B=3)  # 201 = 67 * 3: one epoch is exactly 67 calls
    seen = [data.window_index(g) for g in range(data.num_samples)]
    assert sorted(seen) == list(range(data.num_samples))
    got = rows(data.next_batch() for _ in range(67))
    assert sorted(got) == sorted(shards.window(k * T, T).tolist() for k in range(data.num_samples))
    assert data.epoch == 1
    second = [data.window_index(data.num_samples + g) for g in range(data.num_samples)]
    assert sorted(second) == sorted(seen) and second != seen  # epoch 1: same windows, new order


def test_deterministic(shards):
    a, b, c = stream(shards), stream(shards), stream(shards, seed=99)
    first = [a.next_batch() for _ in range(5)]
    assert rows(first) == rows(b.next_batch() for _ in range(5))
    assert rows(first) != rows(c.next_batch() for _ in range(5))


def test_dp_ranks_partition_the_global_batch(shards):
    single = stream(shards, B=4)
    ranks = [stream(shards, B=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        assert rows([ranks[0].next_batch(), ranks[1].next_batch()]) == rows([single.next_batch()])
    assert ranks[0].samples_consumed == ranks[1].samples_consumed == single.samples_consumed == 12


def test_exact_resume_mid_epoch(shards):
    reference = stream(shards)
    expected = [reference.next_batch() for _ in range(7)]
    first = stream(shards)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    assert state["samples_consumed"] == 12 and state["seed"] == 1234 and state["seq_len"] == T
    resumed = stream(shards)
    resumed.load_state_dict(state)
    for want in expected[3:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[key], want[key]) for key in want)


def test_resume_with_a_different_dp_size(shards):
    """dp2 x B=2 for 3 steps, then dp1 x B=4: the same global stream as dp1 x B=4 throughout."""
    reference = stream(shards, B=4)
    expected = rows(reference.next_batch() for _ in range(6))
    ranks = [stream(shards, B=2, dp_rank=r, dp_size=2) for r in range(2)]
    got = []
    for _ in range(3):
        got += rows([ranks[0].next_batch(), ranks[1].next_batch()])
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()  # every rank holds the same (global) state
    single = stream(shards, B=4)
    single.load_state_dict(state)
    got += rows(single.next_batch() for _ in range(3))
    assert got == expected


def test_resume_refuses_another_stream(shards):
    state = stream(shards).state_dict()
    with pytest.raises(ValueError, match="seed=1234.*seed=5"):
        stream(shards, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        stream(shards, seq_len=16).load_state_dict(state)


def test_no_state_of_size_n(tmp_path):
    """A 2**28-token dataset (a sparse file, N = 33.5M windows) streams with ~no memory."""
    prefix = tmp_path / "huge"
    num_tokens = 1 << 28
    with open(f"{prefix}.bin", "wb") as f:
        f.truncate(num_tokens * 4)  # sparse: no disk blocks, reads as zeros
    np.save(f"{prefix}.idx.npy", np.zeros(1, dtype=np.int64))
    meta = {"format": FORMAT, "tokenizer": "bytes", "vocab_size": 258, "num_tokens": num_tokens, "num_documents": 1}
    (tmp_path / "huge.json").write_text(json.dumps(meta))
    shards = TokenShards(prefix)

    tracemalloc.start()
    data = stream(shards, B=4, dp_rank=1, dp_size=8)
    for _ in range(3):
        batch = data.next_batch()
    data.window_index(3 * data.num_samples - 1)  # last sample of epoch 2
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert data.num_samples == (num_tokens - 1) // T
    assert batch["input_ids"].shape == (4, T)
    assert peak < 256 * 1024  # an index of N int64s alone would be 268 MB

    def small(value):
        return not isinstance(value, (np.ndarray, torch.Tensor, list, tuple, dict, set)) or len(value) <= 16

    assert all(small(v) for k, v in vars(data).items() if k != "shards")
    assert all(small(v) for v in vars(data._permutation).values())
