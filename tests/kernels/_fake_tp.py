"""A process-group-free stand-in for a tp group: `world` threads, one per rank, and an
all_reduce(tensor, op) callback per rank ("max" / "sum", summed in rank order so every rank gets the
same bits, as NCCL's ring does not guarantee but a deterministic reduction would). Lets the
vocabulary-parallel code paths run on CPU without torch.distributed."""

import threading
from collections import Counter


class FakeGroup:
    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots = [None] * world
        self.calls = Counter()  # op -> number of collective calls (counted once, by rank 0)

    def all_reduce_for(self, rank):
        import torch

        def all_reduce(tensor, op):
            self.slots[rank] = tensor.detach().clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            out = stacked.amax(0) if op == "max" else stacked.sum(0)
            if op not in ("max", "sum"):
                raise ValueError(op)
            self.barrier.wait()  # everyone has read the slots before they are overwritten
            if rank == 0:
                self.calls[op] += 1
            return out

        return all_reduce


def run_tp(world, fn):
    """Run fn(rank, all_reduce) on `world` threads; return ([results by rank], group)."""
    group = FakeGroup(world)
    results, errors = [None] * world, []

    def body(rank):
        try:
            results[rank] = fn(rank, group.all_reduce_for(rank))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, group
