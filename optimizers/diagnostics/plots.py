"""Matplotlib figures from the diagnostics' records (no pyplot state: each function returns a ``Figure``; save it
with ``fig.savefig(path)``). matplotlib is imported when a plot is made, so the library itself does not need it.

* ``plot_spectrum``: eigenvalue bars (``Eigenpairs``) and/or the SLQ density (``SpectralDensity``, log scale as in
  Ghorbani, Krishnan, Xiao 2019, Fig. 1), or the histogram of a full explicit spectrum;
* ``plot_taylor``: the remainders of a ``TaylorTest`` on log-log axes with their fitted slopes (seed 000 Fig. 14.1);
* ``plot_surface``: a ``LossSurface`` as a contour plot or a 3-D surface (seed 000 Fig. 15.1), ``plot_line`` a
  ``LossLine``.
"""
from __future__ import annotations

from typing import Any

import torch

from optimizers.diagnostics.density import SpectralDensity
from optimizers.diagnostics.spectrum import Eigenpairs
from optimizers.diagnostics.surface import LossLine, LossSurface
from optimizers.diagnostics.taylor import TaylorTest


def _figure(width: float = 5.0, height: float = 4.0) -> Any:
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def plot_spectrum(eigenpairs: list[Eigenpairs] | Eigenpairs | None = None, density: SpectralDensity | None = None,
                  full: torch.Tensor | None = None, title: str = "") -> Any:
    """Bars of the computed eigenvalues, the SLQ density, and/or a histogram of a full spectrum ``full`` (n,)."""
    pairs = [eigenpairs] if isinstance(eigenpairs, Eigenpairs) else list(eigenpairs or [])
    panels = [p for p in (pairs or None, density, full) if p is not None]
    fig = _figure(5.0 * max(len(panels), 1), 4.0)
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    i = 0
    if pairs:
        ax, width = axes[i], 0.8 / len(pairs)
        for j, p in enumerate(pairs):       # grouped bars: eigenvalue number j from the wanted end, one bar per record
            x = [n + 1 + (j - (len(pairs) - 1) / 2) * width for n in range(len(p.eigenvalues))]
            ax.bar(x, p.eigenvalues.tolist(), width, label=f"{p.curvature} {p.which} ({p.method})")
        ax.set_xlabel("eigenvalue number from the end"), ax.set_ylabel("eigenvalue"), ax.legend(fontsize=8)
        ax.axhline(0.0, color="black", linewidth=0.5)
        i += 1
    if density is not None:
        grid, phi = density.density()
        axes[i].semilogy(grid.tolist(), phi.clamp_min(1e-12).tolist())
        axes[i].set_xlabel("eigenvalue"), axes[i].set_ylabel("density (SLQ)")
        i += 1
    if full is not None:
        axes[i].hist(full.detach().cpu().double().numpy(), bins=100, log=True)
        axes[i].set_xlabel("eigenvalue"), axes[i].set_ylabel(f"count (all {full.numel()})")
    if title:
        fig.suptitle(title)
    return fig


def plot_taylor(test: TaylorTest, title: str = "") -> Any:
    """Remainders r0, r1, r2 against h on log-log axes; the legend gives the fitted slopes (expected 1, 2, 3)."""
    fig = _figure()
    ax = fig.add_subplot()
    names = ("zeroth order |L - L0|", "first order (+ h g.d)", f"second order (+ h^2/2 d.{test.curvature[0].upper()}d)")
    for k, name in enumerate(names):
        r = test.remainders[k].clamp_min(1e-300)
        ax.loglog(test.distances.tolist(), r.tolist(), "o-", label=f"{name}: slope {float(test.slopes[k]):.2f}")
        used = test.fitted[k]
        ax.loglog(test.distances[used].tolist(), r[used].tolist(), "o", mfc="none", mec="black")
    ax.set_xlabel("distance h"), ax.set_ylabel("Taylor remainder"), ax.legend(fontsize=8)
    ax.set_title(title or "Taylor test (circled: points used by the fit)")
    return fig


def plot_surface(surface: LossSurface, kind: str = "contour", title: str = "",
                 labels: tuple[str, str] = ("direction 1", "direction 2")) -> Any:
    """The loss on the grid: filled contours (``kind="contour"``) or a 3-D surface (``kind="3d"``)."""
    if kind not in ("contour", "3d"):
        raise ValueError(f"kind={kind!r} is not one of ['contour', '3d'].")
    a, b = torch.meshgrid(surface.alphas, surface.betas, indexing="ij")
    fig = _figure(5.5, 4.5)
    if kind == "contour":
        ax = fig.add_subplot()
        filled = ax.contourf(a.numpy(), b.numpy(), surface.losses.numpy(), levels=30, cmap="viridis")
        ax.contour(a.numpy(), b.numpy(), surface.losses.numpy(), levels=30, colors="black", linewidths=0.3)
        ax.plot([0.0], [0.0], "r+", markersize=10)
        fig.colorbar(filled, ax=ax, label="loss")
    else:
        ax = fig.add_subplot(projection="3d")
        ax.plot_surface(a.numpy(), b.numpy(), surface.losses.numpy(), cmap="viridis", linewidth=0)
        ax.set_zlabel("loss")
    ax.set_xlabel(labels[0]), ax.set_ylabel(labels[1])
    if title:
        ax.set_title(title)
    return fig


def plot_line(line: LossLine, title: str = "", label: str = "t") -> Any:
    """L(w + t d) against t, with L(w) marked."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(line.distances.tolist(), line.losses.tolist(), "-")
    ax.plot([0.0], [line.loss], "ro")
    ax.set_xlabel(label), ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    return fig
