"""Real captioned images for the CrossFlow tests: scikit-learn's digits through `prepare-images`,
captions written from their labels ("a handwritten seven") and embedded by the stand-in text encoder
(llama-bytes:16), 32 px as in recipes/crossflow_debug.yaml. The first 96 digits, 32 per shard."""

import os

import numpy as np
import pytest

CLASSES = "zero,one,two,three,four,five,six,seven,eight,nine".split(",")


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory):
    from sklearn.datasets import load_digits

    from gigatron.data_pipeline.prepare_images import prepare_images

    d = load_digits()
    src = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(src, images=np.round(d.images[:96] * (255 / 16)).astype(np.uint8), labels=d.target[:96])
    out = str(tmp_path_factory.mktemp("crossflow_shards"))
    summary = prepare_images(str(src), out, shard_size=32, resize=32, progress=False, caption="a handwritten {class}",
                             class_names=CLASSES, text_encoder="llama-bytes:16", text_tokens=24)
    summary["dir"] = out
    summary["path"] = os.path.join(out, "train-{000000..000002}.tar")
    return summary
