"""The layout-invariant random generator: every random number is a pure function of (key, index).

A stream is named by a *key* (what the numbers are for: "init" + parameter name, "mae_mask", "noise",
plus the seed) and indexed by an *element counter*: the flat position of the element in the global
tensor (a parameter's full shape; sample g's patch p). The value at a counter never depends on who
asks for it, so any rank draws exactly its share and gets the numbers the single-process run has:

    init      a rank holding rows [a, b) x columns [c, d) of a (R, C) weight (TP, FSDP, pipeline
              stage) evaluates the counters r*C + j of its box only: no rank ever draws a full
              tensor, so initialising 405B costs each GPU its shard, not 25B random numbers;
    per sample  a counter of sample_index * n + i (the global sample index comes with the batch),
              so every TP rank and pipeline stage of a sample, and a resumed run, see the same mask
              or noise.

The generator is counter-based (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011,
the idea behind Philox): value = mix(key, counter), where mix is three rounds of the lowbias32
integer hash (an xor-shift-multiply bijection of 32-bit words with full avalanche), evaluated with
int64 tensor arithmetic that never overflows (products are split into 16-bit halves), so CPU and GPU
give bit-identical integers. It is not cryptographic; it is a well-mixed stream for initialisation,
masks and noise. Normals come from two independent uniforms by Box-Muller.
"""

from __future__ import annotations

import math
import zlib

import torch

M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers (C. Wellons, "Hash function prospector")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x holding uint32 values in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def stream_key(*parts) -> int:
    """A 32-bit key from any printable parts, e.g. stream_key("init", seed, "layers.3.wq.weight")."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())


def random_bits(key: int, counter: torch.Tensor) -> torch.Tensor:
    """32 well-mixed bits (as int64 in [0, 2**32)) for each int64 counter >= 0."""
    counter = counter.long()
    h = _hash32(((counter >> 32) ^ (key & M32)) & M32)
    return _hash32(h ^ (counter & M32))


CHUNK = 1 << 18  # elements per pass: the int64 temporaries of one pass stay in cache


def _chunked(fn, key: int, counter: torch.Tensor) -> torch.Tensor:
    flat = counter.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), CHUNK):
        out[start:start + CHUNK] = fn(key, flat[start:start + CHUNK])
    return out.view(counter.shape)


def _uniform(key: int, counter: torch.Tensor) -> torch.Tensor:
    return ((random_bits(key, counter) >> 8).float() + 0.5) * 2.0**-24  # 24 bits: exact in float32


def uniform(key: int, counter: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1), float32 (24 random bits), one per counter."""
    return _chunked(_uniform, key, counter)


def _normal(key: int, counter: torch.Tensor) -> torch.Tensor:
    # Box-Muller on the pair counter // 2: the even member takes r cos(theta), the odd r sin(theta)
    bits = random_bits(key, counter >> 1)
    u1 = ((bits >> 8).float() + 0.5) * 2.0**-24
    u2 = ((_hash32(bits ^ 0x9E3779B9) >> 8).float() + 0.5) * 2.0**-24
    theta = (2.0 * math.pi) * u2 - (math.pi / 2) * (counter & 1).float()
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def normal(key: int, counter: torch.Tensor) -> torch.Tensor:
    """Standard normal, float32, one per counter (Box-Muller: two counters share one pair of uniforms)."""
    return _chunked(_normal, key, counter)


def box_counters(global_shape, offset, local_shape, device=None) -> torch.Tensor:
    """Flat row-major counters of the box [offset, offset + local_shape) of a tensor of global_shape."""
    counters = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for d in reversed(range(len(global_shape))):
        index = torch.arange(offset[d], offset[d] + local_shape[d], dtype=torch.int64, device=device)
        counters = counters + (index * stride).view(-1, *([1] * (len(global_shape) - 1 - d)))
        stride *= global_shape[d]
    return counters.expand(*local_shape) if len(local_shape) else counters


def normal_box(key: int, global_shape, offset, local_shape, device=None) -> torch.Tensor:
    """The part [offset, offset + local_shape) of a virtual standard-normal tensor of global_shape."""
    return normal(key, box_counters(global_shape, offset, local_shape, device))
