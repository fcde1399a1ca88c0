"""`data.format: mixture`: several sources with weights, one reader each, chosen per micro-batch.

Each source of `data.mixture` is a full reader of its own format (tokens, webdataset, dali, mds)
with its own per-rank state. Micro-batch k comes from source i with probability w_i / sum(w):
u = mix64(key ^ k * golden) / 2**64 picks i by the cumulative weights, so the choice depends only
on (seed, k) and is the SAME on every dp rank: a step's global batch is one source. That keeps
every rank running the same modules in a step (FSDP's per-module reduce-scatters need all ranks;
a rank that skipped the video patch embedding while another ran it would hang) and the token
reader's ranks in step. Mixing whole micro-batches lets sources of different modalities share a
run (Omnivore alternates image and video batches); a token mixture (Llama 3's data mix) gets its
proportions over steps, and over the micro-batches of gradient accumulation.
Only the chosen source advances, so resuming restores each source's own position and k.

State: {"batches": k, "sources": [each source's state]}. After a dp-size change every source
re-deals its own unfinished work (its `resume_from_layout`) and k continues from the old ranks'
(equal) count. The batch gets one extra key, "source" (B,) int64: the source index.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from .sampler import GOLDEN64, MASK64, _mix64

__all__ = ["MixtureLoader", "build_mixture_loader"]


class MixtureLoader:
    def __init__(self, loaders: list, weights: list[float], seed: int, dp_rank: int, names: list[str]):
        if not loaders or len(loaders) != len(weights) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"a mixture needs >= 1 source and non-negative weights with a positive sum, got {weights}")
        self.loaders, self.names, self.dp_rank = loaders, names, dp_rank
        total, running = sum(weights), 0.0
        self.cumulative = []
        for w in weights:
            running += w / total
            self.cumulative.append(running)
        self.key = _mix64(_mix64((seed ^ 0x5DEECE66D) & MASK64))  # no dp_rank: all ranks choose alike
        self.batches = 0
        self.counts = [0] * len(loaders)

    def choose(self, k: int) -> int:
        u = _mix64(self.key ^ (k * GOLDEN64 & MASK64)) / 2.0 ** 64
        return next((i for i, c in enumerate(self.cumulative) if u < c), len(self.cumulative) - 1)

    def next_batch(self) -> dict[str, torch.Tensor]:
        i = self.choose(self.batches)
        batch = dict(self.loaders[i].next_batch())
        first = next(iter(batch.values()))
        batch["source"] = torch.full((first.shape[0],), i, dtype=torch.int64)
        self.batches += 1
        self.counts[i] += 1
        return batch

    def state_dict(self) -> dict:
        return {"format": "mixture", "batches": self.batches, "counts": list(self.counts),
                "sources": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.loaders):
            raise ValueError(f"the checkpoint's mixture has {len(state['sources'])} sources, this recipe {len(self.loaders)}")
        for loader, source_state in zip(self.loaders, state["sources"]):
            loader.load_state_dict(source_state)
        self.batches, self.counts = int(state["batches"]), list(state["counts"])

    def resume_from_layout(self, states: list[dict]) -> None:
        for i, loader in enumerate(self.loaders):
            column = [s["sources"][i] for s in states]
            if hasattr(loader, "resume_from_layout"):
                loader.resume_from_layout(column)
            else:
                loader.load_state_dict(column[min(self.dp_rank, len(column) - 1)])
        self.batches = max(int(s["batches"]) for s in states)
        self.counts = list(states[min(self.dp_rank, len(states) - 1)]["counts"])

    def stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for i, loader in enumerate(self.loaders):
            for key, value in loader.stats().items():
                total[key] = total.get(key, 0) + value
            total[f"batches_{self.names[i]}"] = self.counts[i]
        return total

    def close(self) -> None:
        for loader in self.loaders:
            if hasattr(loader, "close"):
                loader.close()


def build_mixture_loader(cfg, split: str, dp_rank: int, dp_size: int) -> MixtureLoader:
    from .loader import build_loader

    if not cfg.data.mixture:
        raise ValueError("data.format is mixture but data.mixture lists no source")
    loaders, names = [], []
    for i, source in enumerate(cfg.data.mixture):
        if source.format == "mixture":
            raise ValueError(f"data.mixture[{i}]: a mixture cannot contain a mixture")
        sub = copy.copy(cfg)
        sub.data = dataclasses.replace(cfg.data, format=source.format, path=source.path, eval_path=source.eval_path,
                                       modality=source.modality or cfg.data.modality, mixture=[])
        loaders.append(build_loader(sub, split, dp_rank, dp_size))
        names.append(f"{i}_{source.format}")
    return MixtureLoader(loaders, [s.weight for s in cfg.data.mixture], cfg.train.seed, dp_rank, names)
