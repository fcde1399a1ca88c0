"""Shared test set-up: multi-rank tests spawn real processes on gloo through `run_distributed`."""

import os
import shutil

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores shared by up to 16 processes
if shutil.which("nvidia-smi") is None:
    # No GPU: Triton kernels run in the interpreter. It must be set before anything imports triton
    # (torch may, while tests are collected), so it is set here rather than in the kernel tests.
    os.environ.setdefault("TRITON_INTERPRET", "1")
