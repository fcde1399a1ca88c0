"""The MDS reader: streaming's MDSWriter output read back with exact resume (2 workers), dp change, no pickle."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import make_cfg

from gigatron.data_pipeline.loader import build_loader
from gigatron.data_pipeline.mds import streaming_base, write_mds

streaming_base()  # mosaicml-streaming is a real dependency of the tests (installed with --no-deps)


def _jpeg(array):
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def mds_dir(digits_npz, tmp_path_factory):
    with np.load(digits_npz) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    out = str(tmp_path_factory.mktemp("mds"))
    samples = ({"jpg": _jpeg(images[i]), "cls": int(labels[i])} for i in range(64))
    assert write_mds(out, samples, {"jpg": "bytes", "cls": "int"}, size_limit=4000) == 64
    return out


def ids(loader, n):
    return [loader.next_batch()["sample_ids"].tolist() for _ in range(n)]


def test_mds_resume_is_exact_with_two_workers(mds_dir):
    shards = json.load(open(f"{mds_dir}/index.json"))["shards"]
    assert len(shards) >= 6 and sum(s["samples"] for s in shards) == 64
    cfg = make_cfg(mds_dir, format="mds", num_workers=2, B=3)
    reference = ids(build_loader(cfg, "train", 0, 1), 30)
    assert len({i for b in reference[:21] for i in b}) == 63  # the first 63 of the 64-sample epoch, once each
    first = build_loader(cfg, "train", 0, 1)
    head = ids(first, 9)
    resumed = build_loader(cfg, "train", 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + ids(resumed, 21) == reference
    batch = resumed.next_batch()
    assert batch["images"].shape == (3, 3, 16, 16) and batch["labels"].max() <= 9


def test_mds_dp2_to_dp3_sees_each_sample_once(mds_dir):
    cfg = make_cfg(mds_dir, format="mds", num_workers=1, B=2)
    old = [build_loader(cfg, "train", r, 2) for r in range(2)]
    seen = [(e, i) for l in old for b in [l.next_batch() for _ in range(5)] for e, i in zip(b["epochs"].tolist(), b["sample_ids"].tolist())]
    new = [build_loader(cfg, "train", r, 3) for r in range(3)]
    for l in new:
        l.resume_from_layout([o.state_dict() for o in old])
        seen += [(e, i) for b in [l.next_batch() for _ in range(20)] for e, i in zip(b["epochs"].tolist(), b["sample_ids"].tolist())]
    epoch0 = [i for e, i in seen if e == 0]
    assert len(epoch0) == 64 == len(set(epoch0))


def test_mds_pickle_columns_are_refused_not_loaded(tmp_path, digits_npz):
    with np.load(digits_npz) as arrays:
        image = arrays["images"][0]
    out = str(tmp_path / "pkl")

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    write_mds(out, ({"jpg": _jpeg(image), "cls": 1, "extra": Boom()} for _ in range(4)),
              {"jpg": "bytes", "cls": "int", "extra": "pkl"})
    loader = build_loader(make_cfg(out, format="mds", num_workers=0, B=2, max_skip_fraction=1.0), "train", 0, 1)
    loader.epochs = 1
    with pytest.raises(StopIteration):
        loader.next_batch()
    assert loader.stats()["skipped_unsafe"] == 4
