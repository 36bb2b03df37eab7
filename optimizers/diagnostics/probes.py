"""Random vectors for the estimators, from a private generator: results depend on ``seed`` alone and the global
RNG (``torch.manual_seed``'s stream, used by dropout and data order) is never read or advanced.

Vectors are drawn on the CPU and then moved, so a seed gives the same probes on every device.
"""
from __future__ import annotations

import torch
from torch import Tensor

DISTRIBUTIONS = ("rademacher", "gaussian")


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def draw(shape: tuple[int, ...] | int, gen: torch.Generator, dtype: torch.dtype, device: torch.device,
         distribution: str = "gaussian") -> Tensor:
    """Entries i.i.d. N(0, 1) or Rademacher (+-1 with probability 1/2); both have E[v v^T] = I."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r} is not one of {list(DISTRIBUTIONS)}.")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if distribution == "gaussian":
        out = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        out = torch.randint(0, 2, shape, generator=gen).to(torch.float64).mul_(2).sub_(1)
    return out.to(dtype=dtype, device=device)


def unit(n: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A random direction uniform on the unit sphere (a normalised Gaussian)."""
    v = draw(n, gen, dtype, device, "gaussian")
    return v / v.norm()
