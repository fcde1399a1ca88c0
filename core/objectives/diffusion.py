"""Diffusion with the zero-terminal-SNR noise schedule and v-prediction (Emu Video's objective).

The schedule (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"):
Stable Diffusion's scaled-linear betas, beta_s = (sqrt(beta_start) + s/(T-1) (sqrt(beta_end) -
sqrt(beta_start)))^2 for s = 0..T-1, give alpha_bar_s = prod_{i<=s} (1 - beta_i); then sqrt(alpha_bar)
is shifted and scaled so that its first value is kept and its last is exactly 0:

    sqrt(ab) <- (sqrt(ab) - sqrt(ab_last)) * sqrt(ab_0) / (sqrt(ab_0) - sqrt(ab_last))

At the last step the input is pure noise (signal-to-noise ratio 0), as at sampling time. Noise
prediction is undefined there (x_t = eps says nothing about x0), so the model predicts v
(Salimans & Ho 2022):

    x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    v   = sqrt(ab) eps - sqrt(1 - ab) x0                        the target
    x0  = sqrt(ab) x_t - sqrt(1 - ab) v,   eps = sqrt(1 - ab) x_t + sqrt(ab) v   (recovered from v)
    loss = sum over real tokens and features of (model(x_t, s/T, text) - v)^2;  count = their number

The step s ~ uniform{0..T-1}, the noise eps and the text dropout (classifier-free guidance) come from
the layout-invariant generator (core/rng.py) keyed by the sample, drawn in `prepare` before context
parallelism splits the tokens, like flow matching's (core/objectives/flow_matching.py, whose latent
stand-in, token grid and sample keys this reuses). The model's time input is s / T (1000 t is the
integer step for T = 1000, DiT's convention): 0 is clean data, 1 pure noise (flow matching runs the
other way; a recipe picks one objective for all its stages). The target is stored under "velocity",
the name both objectives share for what the model predicts. The sampler is DDIM (core/sample.py).
"""

from __future__ import annotations

import torch

from gigatron.core import rng
from gigatron.core.objectives.flow_matching import FlowMatchingObjective, denoiser_batch, sample_keys, to_latents


def scaled_linear_betas(steps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """(steps,) float64 betas of Stable Diffusion's scaled-linear schedule."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(alphas_bar: torch.Tensor) -> torch.Tensor:
    """alpha_bar (T,) -> the same schedule with sqrt(alpha_bar) shifted and scaled to end at exactly 0
    (its first value kept): Lin et al.'s Algorithm 1."""
    root = alphas_bar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root ** 2


def alphas_bar(steps: int, beta_start: float = 0.00085, beta_end: float = 0.012, zero_terminal_snr: bool = True):
    """(steps,) float64 alpha_bar_s, s = 0..steps-1 (the last is 0 with zero_terminal_snr)."""
    ab = torch.cumprod(1.0 - scaled_linear_betas(steps, beta_start, beta_end), dim=0)
    return rescale_zero_terminal_snr(ab) if zero_terminal_snr else ab


def schedule_of(m) -> torch.Tensor:
    """The alpha_bar table of a model config (fields diffusion_steps, beta_start, beta_end, zero_terminal_snr)."""
    return alphas_bar(m.diffusion_steps, m.beta_start, m.beta_end, m.zero_terminal_snr)


def _b(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def diffuse(x0: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, v) for data x0, noise eps (same shape, batch first) and alpha_bar (B,)."""
    a, s = _b(ab.sqrt(), x0), _b((1 - ab).sqrt(), x0)
    return a * x0 + s * eps, a * eps - s * x0


def from_v(x_t: torch.Tensor, v: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) recovered from x_t and the v-prediction at alpha_bar (B,)."""
    a, s = _b(ab.sqrt(), x_t), _b((1 - ab).sqrt(), x_t)
    return a * x_t - s * v, s * x_t + a * v


class DiffusionObjective(FlowMatchingObjective):
    """Flow matching's batch layout, inputs, count and loss (the target stored under "velocity" is v);
    its own noise, step and dropout draws and the forward process."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.alphas_bar = schedule_of(cfg.model)

    def _key(self, what: str) -> int:
        return rng.stream_key("diffusion", what, self.seed)

    def draw(self, keys: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise eps of `shape` (B, ...), step s (B,) int64, text dropped (B,) bool) for the samples `keys`."""
        m, n = self.m, int(torch.Size(shape[1:]).numel())
        counters = keys[:, None] * n + torch.arange(n)[None, :]
        eps = rng.normal(self._key("eps"), counters).view(shape)
        steps = (rng.uniform(self._key("step"), keys) * m.diffusion_steps).long().clamp(max=m.diffusion_steps - 1)
        dropped = rng.uniform(self._key("text_dropout"), keys) < m.text_dropout
        return eps, steps, dropped

    def prepare(self, batch: dict) -> dict:
        m = self.m
        x0 = to_latents(batch["videos"].float(), m)  # (B, C, F, H', W')
        eps, steps, dropped = self.draw(sample_keys(batch), x0.shape)
        x_t, v = diffuse(x0, eps, self.alphas_bar[steps].float())
        return denoiser_batch(batch, m, x_t, v, steps.float() / m.diffusion_steps, dropped)
