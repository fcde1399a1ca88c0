"""Checkpoint commit protocol, verification and retention, in one process (fast): a save killed at
any point leaves `latest` and the previous checkpoint intact; truncated, bit-flipped, unlisted or
missing files are refused with the file's name; fallback_to_previous picks the older good one."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gigatron.core.checkpoint import CheckpointError, Checkpointer, committed, latest, load, verify

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def _saved(tmp_path, steps=(1, 2), **kw):
    model, opt = _model()
    ck = Checkpointer(str(tmp_path), config={"model": {"dim": 8}}, **kw)
    for step in steps:
        ck.save(step, model, opt, {"step": step})
    return ck, model, opt


def test_round_trip_and_pointer(tmp_path):
    ck, model, opt = _saved(tmp_path)
    assert latest(str(tmp_path)).endswith("step_00000002")
    assert open(tmp_path / "latest").read().strip() == "step_00000002"
    other, other_opt = _model(seed=1)
    extra = load(latest(str(tmp_path)), other, other_opt, {"step": 0})
    assert extra == {"step": 2}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert os.path.isfile(tmp_path / "step_00000002" / "config.json")


def test_model_only_checkpoint_gives_none_and_fresh_optimizer(tmp_path):
    import torch.distributed.checkpoint as dcp

    from gigatron.core.checkpoint.store import commit

    model, _ = _model()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "m.tmp"), no_dist=True)
    commit(str(tmp_path / "m.tmp"), str(tmp_path / "m"), None, {"step": 0}, None, {})
    other, other_opt = _model(seed=1)
    fresh = {k: v["exp_avg"].clone() for k, v in other_opt.state_dict()["state"].items()}
    assert load(str(tmp_path / "m"), other, other_opt, {"step": 0}) is None
    assert torch.equal(other[0].weight, model[0].weight)
    assert all(torch.equal(other_opt.state_dict()["state"][k]["exp_avg"], v) for k, v in fresh.items())


def test_retention_keeps_last_k_and_every_nth(tmp_path):
    _saved(tmp_path, steps=range(1, 8), keep_last=2, keep_every=3)
    assert [os.path.basename(p) for p in committed(str(tmp_path))] == ["step_00000003", "step_00000006", "step_00000007"]


def _shard(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".distcp"))[0]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete_shard", "delete_manifest", "unlisted"])
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    ck, _, _ = _saved(tmp_path)
    folder = tmp_path / "step_00000002"
    shard = folder / _shard(folder)
    if damage == "truncate":
        os.truncate(shard, os.path.getsize(shard) - 7)
    elif damage == "bitflip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
    elif damage == "delete_shard":
        shard.unlink()
    elif damage == "delete_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "unlisted":  # a shard the manifest does not know (e.g. a hand-edited manifest)
        import json

        manifest = json.loads((folder / "manifest.json").read_text())
        del manifest["files"][shard.name]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    name = "manifest.json" if damage == "delete_manifest" else shard.name
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        verify(str(folder))
    with pytest.raises(CheckpointError, match="fallback_to_previous"):
        ck.resume_path()
    fallback = Checkpointer(str(tmp_path), fallback_to_previous=True)
    assert fallback.resume_path().endswith("step_00000001")


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from torch import nn
    import gigatron.core.checkpoint as ck, gigatron.core.checkpoint.store as store
    model = nn.Linear(256, 256); opt = torch.optim.AdamW(model.parameters())
    c = ck.Checkpointer(sys.argv[1], keep_last=1)
    c.save(1, model, opt, {"step": 1})
    with torch.no_grad():
        model.weight.add_(1.0)
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[2] == "before_rename":
        ck.commit = die                       # shards written, nothing committed
    elif sys.argv[2] == "before_pointer":
        store.write_latest = die              # renamed to step_2, `latest` not yet rewritten
    else:
        store.dcp.save = lambda sd, checkpoint_id, **k: (os.makedirs(checkpoint_id, exist_ok=True),
            open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb").write(b"partial"), die())
    c.save(2, model, opt, {"step": 2})
""")


@pytest.mark.parametrize("moment", ["while_writing", "before_rename", "before_pointer"])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, moment):
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), moment], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert open(tmp_path / "latest").read().strip() == "step_00000001"
    assert latest(str(tmp_path)).endswith("step_00000001")
    verify(str(tmp_path / "step_00000001"))
    model = nn.Linear(256, 256)
    assert load(latest(str(tmp_path)), model, torch.optim.AdamW(model.parameters()), {"step": 0}) == {"step": 1}
    if moment != "before_pointer":
        assert os.path.isdir(tmp_path / "step_00000002.tmp") and not os.path.isdir(tmp_path / "step_00000002")
        Checkpointer(str(tmp_path))  # a restart sweeps the interrupted save
        assert not os.path.isdir(tmp_path / "step_00000002.tmp")
