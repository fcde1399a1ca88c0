"""prepare-images: a folder tree of real photos (scikit-image) and a labelled array file -> validated shards."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest

from gigatron.data_pipeline.prepare_images import main
from gigatron.data_pipeline.shards import shard_sample_count


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    from PIL import Image
    from skimage import data

    src = tmp_path_factory.mktemp("photos")
    photos = {"animals": ["chelsea", "coffee"], "objects": ["rocket", "astronaut", "camera"]}
    for label, names in photos.items():
        os.makedirs(src / label)
        for name in names:
            image = getattr(data, name)()
            Image.fromarray(image).resize((64, 48)).save(src / label / f"{name}.png")
    (src / "objects" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return str(src)


def test_folder_tree_to_shards_with_dali_index_and_refusals(photo_tree, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main([photo_tree, out, "--shard-size", "2", "--resize", "32", "--no-progress"]) == 0
    summary = json.load(open(os.path.join(out, "dataset.json")))
    assert summary["samples"] == 5 and summary["shards"] == 3 and summary["refused"] == 1
    assert summary["classes"] == ["animals", "objects"]
    refused = [json.loads(line) for line in open(os.path.join(out, "refused.jsonl"))]
    assert refused[0]["source"].endswith("broken.jpg") and "does not decode" in refused[0]["reason"]
    assert "5 samples in 3 shards, 1 refused" in capsys.readouterr().out
    with tarfile.open(os.path.join(out, "train-000000.tar")) as tar:
        names = tar.getnames()
        assert names == ["000000000.cls", "000000000.jpg", "000000001.cls", "000000001.jpg"]
        assert tar.extractfile("000000000.cls").read() == b"0"
    index = open(os.path.join(out, "train-000000.tar.idx")).read().split("\n")
    assert index[0] == "v1.2 2" and index[1].split()[0::4] == ["cls", "jpg"]
    assert [shard_sample_count(os.path.join(out, f"train-{i:06d}.tar")) for i in range(3)] == [2, 2, 1]
    from PIL import Image
    import io

    with tarfile.open(os.path.join(out, "train-000002.tar")) as tar:
        image = Image.open(io.BytesIO(tar.extractfile("000000004.jpg").read()))
    assert min(image.size) == 32  # --resize: shorter side


def test_array_file_and_mds_output(digits_npz, tmp_path):
    out = str(tmp_path / "arr")
    assert main([digits_npz, out, "--shard-size", "40", "--mds", "--no-progress"]) == 0
    summary = json.load(open(os.path.join(out, "dataset.json")))
    assert summary["samples"] == 96 and summary["shards"] == 3 and summary["mds_samples"] == 96
    assert sum(s["samples"] for s in json.load(open(os.path.join(out, "mds", "index.json")))["shards"]) == 96


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("prepare-images: error:") and err.count("\n") == 1 and "Traceback" not in err
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((2, 4, 4)))
    assert main([str(bad), str(tmp_path / "o"), "--no-progress"]) == 1
    assert "must hold arrays 'images' and 'labels'" in capsys.readouterr().err
