"""Imported once by the multiprocessing fork server of tests/distributed.py, before it forks any rank:
the modules every rank needs (torch, torch.distributed, DTensor, the engine), so a rank starts in
well under a second instead of importing them afresh. One thread per process, as in the ranks."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed  # noqa: E402,F401
import torch.distributed.tensor  # noqa: E402,F401

torch.set_num_threads(1)

import gigatron.core.train  # noqa: E402,F401  the trainer and, through it, the parallel engine
