"""The device mesh: one DeviceMesh over all ranks, in Llama 3's order [TP, CP, PP, DP], TP innermost.

Rank r sits at coordinates (dp, pp, cp, tp) with tp varying fastest, so the tp ranks of a group are
adjacent (on one node, over NVLink) and dp is outermost (FSDP hides its latency by prefetching).
`torch.distributed.device_mesh.init_device_mesh` lays out dimensions outermost-first, hence the
reversed tuple below. DP is split into ("dp_replicate", "dp_shard") for HSDP.

Derived meshes are named for their use, and are the only handle to a process group:
- "tp", "cp", "pp": the parallel dimensions;
- "dp_shard" (+ "dp_replicate"): FSDP's mesh; "batch" = the ranks that read different data
  (dp); "loss" = the ranks over which the loss is averaged (dp x cp).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from gigatron.core.config import ParallelConfig
from gigatron.core.heartbeat import collective_timeout

log = logging.getLogger("gigatron")

MESH_DIMS = ("dp_replicate", "dp_shard", "pp", "cp", "tp")  # outermost -> innermost


@dataclass
class ParallelDims:
    """The degrees of a layout, and the mesh built from them."""

    tp: int
    cp: int
    pp: int
    dp: int
    dp_replicate: int = 1
    mesh: DeviceMesh | None = None

    @classmethod
    def from_config(cls, cfg: ParallelConfig) -> ParallelDims:
        return cls(tp=cfg.tp, cp=cfg.cp, pp=cfg.pp, dp=cfg.dp, dp_replicate=cfg.dp_replicate)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    def build_mesh(self, device_type: str) -> DeviceMesh:
        sizes = (self.dp_replicate, self.dp_shard, self.pp, self.cp, self.tp)
        mesh = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
        mesh[("dp_replicate", "dp_shard")]._flatten("batch")
        mesh[("dp_replicate", "dp_shard", "cp")]._flatten("loss")
        mesh[("dp_shard", "cp")]._flatten("fsdp_shard")
        self.mesh = mesh
        return mesh

    def groups(self) -> list:
        """The default process group, then every group of the mesh with more than one rank."""
        names = (*MESH_DIMS, "batch", "loss", "fsdp_shard")
        return [dist.group.WORLD] + [self.mesh[n].get_group() for n in names if self.mesh[n].size() > 1]

    def coordinates(self) -> dict[str, int]:
        return {name: self.mesh.get_local_rank(name) for name in MESH_DIMS}


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(cfg: ParallelConfig, cluster=None) -> ParallelDims:
    """Start the default process group (NCCL on GPU, gloo on CPU) and build the mesh.

    With `cluster` (ClusterConfig) every group's collective timeout starts at the slow-phase one
    (start-up); core/heartbeat.py then keeps it just above its own per-phase timeout, so the watchdog
    names a stuck rank before a collective times out. torch's flight recorder stays on (the last
    2,000 collectives per rank, a ring buffer) unless TORCH_FR_BUFFER_SIZE says otherwise: the
    watchdog reports from it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(cfg)
    assert dims.world_size == world_size, "validate(cfg, world_size) must run before init_distributed"
    dev = device_type()
    if dev == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a plain `python -m gigatron.core.train` run
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                              RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
        timeout = {} if cluster is None else {"timeout": collective_timeout(cluster, cluster.slow_phase_timeout_s)}
        dist.init_process_group("nccl" if dev == "cuda" else "gloo", **timeout)
    dims.build_mesh(dev)
    if cluster is not None and hasattr(dist.distributed_c10d, "_set_pg_timeout"):  # the mesh's own groups
        seconds = collective_timeout(cluster, cluster.slow_phase_timeout_s)
        for group in dims.groups()[1:]:
            dist.distributed_c10d._set_pg_timeout(seconds, group)
    coords = " ".join(f"{k}={v}" for k, v in dims.coordinates().items())
    log.info("rank %d/%d on %s: %s (backend %s)", dist.get_rank(), world_size,
             os.environ.get("SLURMD_NODENAME", os.uname().nodename), coords, dist.get_backend())
    return dims
