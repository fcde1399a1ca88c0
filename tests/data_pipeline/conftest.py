"""Shared fixtures of the streaming-reader tests: tiny real image shards (scikit-learn digits)."""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from gigatron.data_pipeline.config import DataConfig


def make_cfg(path: str, B: int = 4, seed: int = 7, **data) -> SimpleNamespace:
    data.setdefault("image_size", 16)
    data.setdefault("shuffle_buffer", 6)
    data.setdefault("eval_fraction", 0.0)
    data.setdefault("skip_check_after", 10)
    return SimpleNamespace(data=DataConfig(format=data.pop("format", "webdataset"), path=path, **data),
                           train=SimpleNamespace(micro_batch_size=B, seq_len=8, seed=seed), model=SimpleNamespace())


@pytest.fixture(autouse=True)
def close_loaders():
    """Stop every reader's worker processes at the end of each test."""
    yield
    from gigatron.data_pipeline.shard_loader import _close_all

    _close_all()


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory) -> str:
    """96 real 8x8 digit images, upscaled to 24x24 uint8 RGB-able grey, with their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:96] * (255 / 16)).astype(np.uint8).repeat(3, axis=1).repeat(3, axis=2)  # (96, 24, 24)
    path = str(tmp_path_factory.mktemp("digits") / "digits.npz")
    np.savez(path, images=images, labels=digits.target[:96])
    return path


@pytest.fixture(scope="session")
def digit_shards(digits_npz, tmp_path_factory) -> dict:
    """12 shards of 8 samples (96 samples) written by prepare-images."""
    from gigatron.data_pipeline.prepare_images import prepare_images

    out = str(tmp_path_factory.mktemp("digit_shards"))
    return prepare_images(digits_npz, out, shard_size=8, resize=0, progress=False)


def copy_shards(summary: dict, to: str) -> list[str]:
    """Copy a prepared shard folder; returns the shard paths in order."""
    src = os.path.dirname(summary["path"])
    shutil.copytree(src, to, dirs_exist_ok=True)
    return sorted(os.path.join(to, f) for f in os.listdir(to) if f.endswith(".tar"))
