"""Shared test set-up: multi-rank tests spawn real processes on gloo through `run_distributed`."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores shared by up to 16 processes
