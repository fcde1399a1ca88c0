"""Drive the real trainer on the tiny ImageBind (tests/imagebind/imagebind_tiny.yaml) in
`run_distributed` workers. Sample g of the test reader is a function of g alone, so every layout sees
the same samples: scikit-learn digit g % 1797 (real), its caption "a handwritten {class}" as byte
tokens (BOS ... EOS, padded), and a SYNTHETIC spectrogram (B, 1, 8, 8): a band at the class's row
plus noise keyed by g (the real speech data is tested in tests/data_pipeline/test_audio.py)."""

from __future__ import annotations

import os

import torch

from tests.omnivore.harness import _Reader
from tests.vit.harness import digits, write_digits  # noqa: F401  (write_digits: the tests' .npz)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "tests/imagebind/imagebind_tiny.yaml")
WORDS = "zero,one,two,three,four,five,six,seven,eight,nine".split(",")


def captions(labels: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from gigatron.data_pipeline.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    ids = [tok.encode(f"a handwritten {WORDS[int(y)]}", bos=True, eos=True)[:length] for y in labels]
    out = torch.zeros(len(ids), length, dtype=torch.int64)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row)
    return out, torch.tensor([len(r) for r in ids])


class Reader(_Reader):
    """Omnivore's test reader (the sample indices, the resumable state) with captions and spectrograms."""

    def __init__(self, cfg, split: str, dp_rank: int, dp_size: int):
        super().__init__(cfg, split, dp_rank, dp_size)
        self.tokens, self.mels = cfg.data.text_tokens, (cfg.model.n_mels, cfg.model.audio_frames)

    def next_batch(self):
        batch = super().next_batch()  # the real digits of samples g: sample_index, images, labels
        g, y = batch["sample_index"], batch["labels"]
        batch["text_tokens"], batch["text_lengths"] = captions(y, self.tokens)
        audio = torch.stack([torch.randn(1, *self.mels, generator=torch.Generator().manual_seed(int(i))) for i in g])
        audio[torch.arange(len(g)), 0, y % self.mels[0]] += 3.0  # synthetic: a band at the class's row
        batch["audio"] = audio
        return batch


def register() -> None:
    from gigatron.data_pipeline.loader import register_format

    register_format("imagebind_test", Reader)


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def imagebind_run(rank: int, world_size: int, overrides: list[str], run_dir: str, steps: int = 3) -> dict:
    """`steps` steps; losses, gradient norms before clipping, and how far each encoder moved."""
    from gigatron.core.config import load_config
    from gigatron.core.train import Trainer
    from gigatron.parallel.mesh import init_distributed

    register()
    cfg = load_config(RECIPE, overrides, world_size=world_size)
    cfg.data.path = os.path.join(run_dir, "digits.npz")
    cfg.run.dir = os.path.join(run_dir, "ib_" + "_".join(o.replace("=", "") for o in overrides)[:80])
    trainer = Trainer(cfg, init_distributed(cfg.parallel))
    model = trainer.model
    before = {m: [_full(p) for p in model.encoder_parameters(m)] for m in cfg.model.modalities}
    scale = _full(model.logit_scale)
    values = [trainer.train_step() for _ in range(steps)]
    moved = {m: sum(float((_full(p) - b).abs().sum()) for p, b in zip(model.encoder_parameters(m), before[m]))
             for m in cfg.model.modalities}
    return {"losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values],
            "moved": moved, "logit_scale_moved": float((_full(model.logit_scale) - scale).abs())}


def imagebind_many(rank: int, world_size: int, runs: list[list[str]], run_dir: str) -> list[dict]:
    return [imagebind_run(rank, world_size, overrides, run_dir) for overrides in runs]
