"""Ranks by analytic empirical VBMF: the ``vbmf`` rank strategy.

Empirical variational Bayesian matrix factorisation (Nakajima et al., 2013) estimates a
matrix's noise variance from its singular values and keeps the ones above the resulting
threshold, so it picks a rank with no option to tune. :func:`evbmf` does so for one matrix,
given the eigenvalues of ``Y @ Y.T``; the ``vbmf`` strategy (``ranks: {strategy: vbmf}``)
applies it to both unfoldings of each layer's stacked kernels, whose joint spectra a
:class:`~jtucker_plugin.decompose.ranks.LayerInfo` carries.

Examples
--------
A rank-3 matrix plus noise of variance 0.01:

>>> g = torch.Generator().manual_seed(0)
>>> y = torch.randn(20, 3, generator=g) @ torch.randn(3, 50, generator=g)
>>> y = y + 0.1 * torch.randn(20, 50, generator=g)
>>> rank, sigma2 = evbmf(torch.linalg.svdvals(y) ** 2, n_rows=20, n_cols=50)
>>> rank, round(sigma2, 3)
(3, 0.01)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from jtucker_plugin.decompose.ranks import (
    LayerInfo,
    Ranks,
    check_positive_int,
    register_rank_strategy,
)


def evbmf(eigenvalues: Tensor, n_rows: int, n_cols: int) -> tuple[int, float]:
    """Rank and noise variance of a matrix by analytic empirical VBMF (Nakajima et al., 2013).

    Parameters
    ----------
    eigenvalues
        Descending eigenvalues of ``Y @ Y.T`` for the ``n_rows x n_cols`` matrix ``Y``: its
        squared singular values (beyond ``min(n_rows, n_cols)`` they are ignored).
    n_rows, n_cols
        The shape of ``Y``.

    Returns
    -------
    rank : int
        The number of singular values above the EVB threshold ``sqrt(M * sigma2 * x_bar)``;
        may be 0.
    sigma2 : float
        The noise variance, minimising the EVB free energy over
        ``[max(gamma_k^2 / (M x_bar), mean(gamma_{k:}^2) / M), sum(gamma^2) / (L M)]`` with
        ``k = min(ceil(L / (1 + alpha)) - 1, L)``, as in the reference ``VBMF.py``.

    Notes
    -----
    ``L <= M`` are the matrix's sides, ``alpha = L / M``, ``tau_bar = 2.5129 sqrt(alpha)`` and
    ``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)``. With ``x_h = gamma_h^2 / (M sigma2)``, the
    free energy is ``sum_h psi0(x_h) + sum_{x_h > x_bar} psi1(x_h)``, ``psi0(x) = x - log x``,
    ``psi1(x) = log(tau + 1) + alpha log(tau / alpha + 1) - tau`` where
    ``tau = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2``. Two choices differ from
    the reference: the search runs over ``log sigma2`` (bounded Brent), so its tolerance does
    not depend on the weights' scale, and singular values are floored at ``1e-12`` times the
    largest, as an exact zero makes the free energy infinite at every ``sigma2``.
    """
    check_positive_int(n_rows, "evbmf: n_rows")
    check_positive_int(n_cols, "evbmf: n_cols")
    small, large = min(n_rows, n_cols), max(n_rows, n_cols)
    s2 = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp(min=0).numpy()[:small]
    if len(s2) < small:
        raise ValueError(f"evbmf: a {n_rows}x{n_cols} matrix needs {small} eigenvalues, got {len(s2)}")
    if s2.max(initial=0.0) <= 0:
        return 0, 0.0
    s2 = np.maximum(s2, 1e-12 * s2.max())
    alpha = small / large
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    k = min(math.ceil(small / (1 + alpha)) - 1, small)
    upper = s2.sum() / (small * large)
    lower = min(max(s2[k] / (large * x_bar), s2[k:].mean() / large), upper)

    def free_energy(log_sigma2: float) -> float:
        x = s2 / (large * math.exp(log_sigma2))
        signal = x[x > x_bar]
        b = signal - 1 - alpha
        tau = (b + np.sqrt(b * b - 4 * alpha)) / 2
        psi1 = np.log(tau + 1) + alpha * np.log(tau / alpha + 1) - tau
        return float(np.sum(x - np.log(x)) + np.sum(psi1))

    if lower < upper:
        bounds = (math.log(lower), math.log(upper))
        sigma2 = math.exp(minimize_scalar(free_energy, bounds=bounds, method="bounded").x)
    else:
        sigma2 = upper
    rank = int(np.sum(s2 > large * sigma2 * x_bar))
    return rank, sigma2


@dataclass(frozen=True, kw_only=True)
class VBMFConfig:
    """Each mode's rank by EVBMF on its unfolding: mode 1 is ``S x (T*C*kh*kw)``, mode 2
    ``C x (T*S*kh*kw)``; at least 1."""

    strategy: Literal["vbmf"] = "vbmf"


@register_rank_strategy("vbmf", config=VBMFConfig)
def vbmf_ranks(config: VBMFConfig, layers: Sequence[LayerInfo], **_: Any) -> Ranks:
    """Ranks by analytic empirical VBMF on each mode's joint spectrum (see :func:`evbmf`)."""
    out = {}
    for layer in layers:
        spread = layer.n_tasks * layer.taps
        r1, _ = evbmf(layer.eig_out, layer.out_channels, spread * layer.in_channels)
        r2, _ = evbmf(layer.eig_in, layer.in_channels, spread * layer.out_channels)
        out[layer.name] = (max(1, r1), max(1, r2))
    return out
