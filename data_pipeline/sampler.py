"""The training data stream: packed token windows, shuffled, DP-sharded. Streaming, deterministic, O(1) memory.

Packing. The token stream of a `TokenShards` dataset (documents concatenated, each [bos] ... [eos])
is cut into fixed windows of T + 1 tokens that overlap by one: window k covers tokens
[k*T, k*T + T + 1), so inputs are its first T tokens and labels its last T (the next tokens), and
no token is ever padding. There are N = (num_tokens - 1) // T windows; the last < T tokens are not
used. A window may span several documents: labels that cross a boundary (eos -> next bos) are kept,
as in standard packing, and `document_ids` tells the model where the boundaries are so that it can
build a document (block-diagonal causal) attention mask.

Shuffling in O(1) memory. Global sample g (counted over all ranks since step 0) belongs to epoch
e = g // N and reads window perm_e(g % N), where perm_e is a pseudo-random permutation of [0, N)
keyed by (seed, e). perm_e is a Feistel network (a block cipher on 2h bits, 2**2h >= N; Luby and
Rackoff: a few rounds of a good mixing function give a pseudo-random permutation) with
cycle-walking: re-encrypt until the value falls below N. A bijection of [0, 4**h) restricted this
way stays a bijection of [0, N), and since 4**h < 4N a lookup costs fewer than 4 encryptions on
average. Nothing of size N is ever built: no permutation array, no global index. A 15T-token corpus
costs the same few integers of state as a test file, and the first batch is ready at once.

Global sample accounting. The only progress state is `samples_consumed`, a count of GLOBAL samples.
Call i of rank r (of dp_size) reads global samples g = S + r*B + j, j < B, where S is
samples_consumed before the call; then every rank adds B * dp_size. So the union over ranks of one
call is the contiguous block [S, S + B*dp_size) of one global order, whatever dp_size is: dp=2 with
B=4 and dp=1 with B=8 train on the same global batches, and a checkpoint written at dp=2 resumes at
dp=1 (or with another micro-batch size) exactly where it stopped, because nothing in the state
depends on the layout. All ranks hold the same state, so saving rank 0's is enough.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .token_shards import TokenShards

__all__ = ["FeistelPermutation", "PackedBatchStream"]

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the splitmix64 increment


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast, well-tested bijective 64-bit mixing function."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A seeded pseudo-random permutation of [0, n) that needs O(1) memory: `perm(i)` in O(1) time.

    Args:
        n: size of the domain, >= 1.
        seed, epoch: the key; each (seed, epoch) pair gives an unrelated permutation.
        rounds: Feistel rounds (4 suffice in theory for a pseudo-random function; 6 for margin).
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, rounds: int = 6):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = int(n)
        # Two halves of h bits each, 4**h >= n (h >= 1 so that even n = 1 has a real network).
        self.half_bits = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self.half_mask = (1 << self.half_bits) - 1
        base = _mix64(_mix64(seed & MASK64) ^ ((epoch + 1) * GOLDEN64 & MASK64))
        self.round_keys = tuple(_mix64((base + r * GOLDEN64) & MASK64) for r in range(rounds))

    def _encrypt(self, x: int) -> int:
        """One pass of the Feistel network: a bijection of [0, 4**half_bits)."""
        left, right = x >> self.half_bits, x & self.half_mask
        for key in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
        return (left << self.half_bits) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range [0, {self.n})")
        # Cycle-walking: follow the cycle of `index` until it re-enters [0, n). It must: the cycle
        # is finite and contains `index` itself.
        value = self._encrypt(index)
        while value >= self.n:
            value = self._encrypt(value)
        return value

    def __len__(self) -> int:
        return self.n


class PackedBatchStream:
    """Endless stream of packed, shuffled micro-batches for one data-parallel rank.

    Args:
        shards: the tokenized dataset.
        seq_len: T, tokens per sample (inputs and labels each have T).
        micro_batch_size: B, samples per `next_batch()` on this rank.
        dp_rank, dp_size: this rank's place among the data-parallel replicas (0 and 1 for one GPU).
        seed: keys the per-epoch permutations; the same seed gives the same global stream.

    `next_batch()` returns {"input_ids": (B, T) int64, "labels": (B, T) int64,
    "document_ids": (B, T) int32}. document_ids numbers the documents inside each row from 0 (the
    document holding the row's first token) upwards: only equality matters for a document mask,
    and row-relative ids fit int32 even when a corpus holds more than 2**31 documents.
    """

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.shards = shards
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.num_samples = (shards.num_tokens - 1) // self.seq_len  # N windows of T + 1 tokens
        if self.num_samples < 1:
            raise ValueError(f"{shards.num_tokens} tokens are too few for one sample of seq_len {seq_len} (+1 label)")
        self.samples_consumed = 0  # GLOBAL samples, all ranks together: the whole progress state
        self._permutation = FeistelPermutation(self.num_samples, self.seed, epoch=0)
        self._permutation_epoch = 0

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    @property
    def epoch(self) -> int:
        """The epoch of the next global sample."""
        return self.samples_consumed // self.num_samples

    def window_index(self, global_sample: int) -> int:
        """Window k read by global sample g: perm_{seed, g // N}(g % N)."""
        epoch, position = divmod(global_sample, self.num_samples)
        if epoch != self._permutation_epoch:  # a new epoch: a new key, still O(1) memory
            self._permutation = FeistelPermutation(self.num_samples, self.seed, epoch=epoch)
            self._permutation_epoch = epoch
        return self._permutation(position)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch; advances the (global) position by B * dp_size samples."""
        T, B = self.seq_len, self.micro_batch_size
        first = self.samples_consumed + self.dp_rank * B
        windows = [self.window_index(first + j) for j in range(B)]
        tokens = np.stack([self.shards.window(k * T, T + 1) for k in windows]).astype(np.int64)  # (B, T+1)
        documents = np.stack([self.shards.document_ids(k * T, T) for k in windows])  # (B, T), global ids
        documents -= documents[:, :1]  # row-relative: 0 for the document holding the first token
        self.samples_consumed += B * self.dp_size
        return {
            "sample_index": torch.arange(first, first + B, dtype=torch.int64),  # (B,) global sample ids
            "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),  # (B, T)
            "labels": torch.from_numpy(np.ascontiguousarray(tokens[:, 1:])),  # (B, T)
            "document_ids": torch.from_numpy(documents.astype(np.int32)),  # (B, T)
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Progress in global samples plus what the stream's identity depends on (checked on load)."""
        return {
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_tokens": self.shards.num_tokens,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            # Informational only: a resume may change the layout (see the module docstring).
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly after the last consumed global sample; dp_size and B may differ."""
        mine = {"seed": self.seed, "seq_len": self.seq_len, "num_tokens": self.shards.num_tokens}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"cannot resume the data stream: the checkpoint has {key}={state[key]}, this run has "
                    f"{key}={value}; the global sample order depends on it, so the run would see different data"
                )
        self.samples_consumed = int(state["samples_consumed"])


class TokenLoader(PackedBatchStream):
    """The `tokens` reader of `data_pipeline/loader.py`: a PackedBatchStream over one split.

    Held-out split: the last `eval_fraction` of the windows (at least one) form the "eval" split and
    the rest the "train" split; the two never share a window. Each split shuffles only its own range."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, split: str = "train", eval_fraction: float = 0.0):
        super().__init__(shards, seq_len, micro_batch_size, dp_rank, dp_size, seed)
        total = self.num_samples
        n_eval = min(total - 1, max(1, int(total * eval_fraction))) if eval_fraction > 0 else 0
        self.first_window = total - n_eval if split == "eval" else 0
        self.num_samples = n_eval if split == "eval" else total - n_eval
        if self.num_samples < 1:
            raise ValueError(f"the {split} split of {shards} has no window of seq_len {seq_len}")
        self.seed = seed + (7919 if split == "eval" else 0)  # the eval split has its own order
        self._permutation = FeistelPermutation(self.num_samples, self.seed, epoch=0)

    def window_index(self, global_sample: int) -> int:
        return self.first_window + super().window_index(global_sample)

    def stats(self) -> dict[str, float]:
        return {}

    def resume_from_layout(self, states: list[dict]) -> None:
        """Resume under another dp size: the stream's position is a count of GLOBAL samples, the same
        in every old rank's state, so any of them continues the one global order exactly."""
        if len({s["samples_consumed"] for s in states}) != 1:
            raise ValueError(f"the saved data-parallel ranks disagree on the stream position: "
                             f"{[s['samples_consumed'] for s in states]}")
        self.load_state_dict(states[0])


def build_token_loader(cfg, split: str, dp_rank: int, dp_size: int) -> TokenLoader:
    """The "tokens" reader. If the shards are missing, global rank 0 tokenizes the recipe's sources
    (data.sources) first while the other ranks wait for the finished shards to appear: a file wait,
    not a collective, so a long tokenization never runs into a process-group timeout."""
    import os
    import time

    t, d = cfg.train, cfg.data
    ready = d.path + ".json"  # written last by the shard writer
    if not os.path.exists(ready):
        if int(os.environ.get("RANK", "0")) == 0:
            from gigatron.data_pipeline.prepare import prepare_text

            prepare_text(d.sources, d.path, d.tokenizer, max_bytes=int(d.max_mb * 1e6) or None)
        while not os.path.exists(ready):
            time.sleep(0.5)
    shards = TokenShards(d.path)
    vocab = getattr(cfg.model, "vocab_size", None)
    if vocab is not None and shards.vocab_size > vocab:
        from gigatron.core.config_loader import ConfigError

        raise ConfigError("model.vocab_size", f"{vocab} is smaller than the data's vocabulary "
                          f"({shards.vocab_size}, {d.path}); raise it or use a matching data.tokenizer")
    return TokenLoader(shards, t.seq_len, t.micro_batch_size, dp_rank, dp_size, t.seed,
                       split=split, eval_fraction=d.eval_fraction)
