"""A global cost budget: the ``budget`` rank strategy and the greedy that shares a cap out over layers.

A :class:`Budget` caps the layers' total cost, the parameters of all tasks or one task's MACs,
as a fraction of their dense total. :func:`allocate_budget` picks every layer's ranks
``(R1, R2)`` to meet it while dropping the rank directions that lose the least energy; a layer
costs ``min(dense, Tucker)``, as the orchestrator keeps a layer dense when Tucker does not save.
Recipes name it ``ranks: {strategy: budget, budget: {params: 0.3}}``; the genetic search
(``search.ga``) starts from its answer under the same :class:`Budget`.

Examples
--------
>>> import torch
>>> from jtucker_plugin.decompose.ranks import LayerInfo, rank_config_from_dict, tucker_params
>>> eig = torch.tensor([8.0, 4.0, 2.0, 1.0])
>>> layer = LayerInfo("conv", 4, 4, (3, 3), 2, eig_out=eig, eig_in=eig)
>>> allocate_budget([layer], 0.5, cost="params")
{'conv': (2, 3)}
>>> tucker_params(layer, (2, 3)), layer.dense_params
(128, 288)
>>> rank_config_from_dict({"strategy": "budget", "budget": {"params": 0.5}})
BudgetConfig(strategy='budget', budget=Budget(params=0.5, macs=None))
"""

from __future__ import annotations

import functools
import heapq
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch import Tensor

from jtucker_plugin.decompose.ranks import LayerInfo, Ranks, macs_cost, params_cost, register_rank_strategy


@dataclass(frozen=True)
class Budget:
    """A cost cap as a fraction in (0, 1] of the layers' dense total: exactly one of
    ``params`` (all tasks' weights) and ``macs`` (one task's multiply-accumulates)."""

    params: float | None = None
    macs: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("params", self.params), ("macs", self.macs)) if v is not None}
        if len(given) != 1:
            raise ValueError(f"expected exactly one of params, macs; got {given or 'neither'}")
        ((key, value),) = given.items()
        if isinstance(value, bool) or not 0 < value <= 1:
            raise ValueError(f"{key}: must be a fraction in (0, 1] of the dense cost, got {value!r}")

    @property
    def cost(self) -> Literal["params", "macs"]:
        """``"params"`` or ``"macs"``: what is counted."""
        return "params" if self.params is not None else "macs"

    @property
    def fraction(self) -> float:
        """The cap, as a fraction of the dense total."""
        return self.params if self.params is not None else typing.cast(float, self.macs)


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """A global cost budget shared out over the layers by :func:`allocate_budget`."""

    strategy: Literal["budget"] = "budget"
    budget: Budget


@register_rank_strategy("budget", config=BudgetConfig)
def budget_ranks(config: BudgetConfig, layers: Sequence[LayerInfo], **_: Any) -> Ranks:
    """Greedy allocation of a params or MACs budget (see :func:`allocate_budget`)."""
    return allocate_budget(layers, config.budget.fraction, cost=config.budget.cost)


@dataclass(eq=False)
class _Greedy:
    """One layer's state in :func:`allocate_budget`."""

    dense: int
    cost: Callable[[int, int], int]
    loss1: np.ndarray  # normalised eigenvalues: the loss of dropping each mode-1 direction
    loss2: np.ndarray
    tail1: np.ndarray  # tail1[r] = loss1[r:].sum(), the loss of keeping rank r
    tail2: np.ndarray
    r1: int
    r2: int
    tucker: bool = False
    version: int = 0

    def effective(self) -> int:
        return self.cost(self.r1, self.r2) if self.tucker else self.dense


def _greedy_layer(layer: LayerInfo, cost: str) -> _Greedy:
    fn = params_cost if cost == "params" else macs_cost
    dense = layer.dense_params if cost == "params" else layer.dense_macs
    w1, w2 = (_normalised(eig) for eig in (layer.eig_out, layer.eig_in))
    return _Greedy(
        dense=dense,
        cost=functools.partial(fn, layer),
        loss1=w1,
        loss2=w2,
        tail1=np.concatenate([np.cumsum(w1[::-1])[::-1], [0.0]]),
        tail2=np.concatenate([np.cumsum(w2[::-1])[::-1], [0.0]]),
        r1=layer.out_channels,
        r2=layer.in_channels,
    )


def _normalised(eig: Tensor) -> np.ndarray:
    total = float(eig.sum())
    return eig.numpy() / total if total > 0 else np.zeros(len(eig))


def _best_jump(g: _Greedy) -> tuple[float, int, int] | None:
    """From dense, the Tucker ranks losing least energy per unit of cost saved.

    Single steps down from full rank save nothing while the Tucker layer still costs more than
    the dense one, so a dense layer moves in one jump. Its candidates are the points of the
    layer's own greedy path (full rank down to (1, 1), each step dropping the mode with the
    least loss per unit of Tucker cost) that beat dense; the first best ratio wins.
    """
    r1, r2, best = len(g.loss1), len(g.loss2), None
    c = g.cost(r1, r2)
    while r1 > 1 or r2 > 1:
        d1 = c - g.cost(r1 - 1, r2) if r1 > 1 else 0
        d2 = c - g.cost(r1, r2 - 1) if r2 > 1 else 0
        if r2 == 1 or (r1 > 1 and g.loss1[r1 - 1] * d2 <= g.loss2[r2 - 1] * d1):
            r1, c = r1 - 1, c - d1
        else:
            r2, c = r2 - 1, c - d2
        if c < g.dense:
            ratio = (g.tail1[r1] + g.tail2[r2]) / (g.dense - c)
            if best is None or ratio < best[0]:
                best = (ratio, r1, r2)
    return best


def allocate_budget(
    layers: Sequence[LayerInfo], fraction: float, *, cost: Literal["params", "macs"] = "params"
) -> Ranks:
    """Share a cost budget over layers, cutting the rank directions that lose least energy.

    A layer's cost is ``min(dense, Tucker)``: the orchestrator keeps a layer dense when Tucker
    does not save. Its loss is ``tail_out(R1) + tail_in(R2)``, the normalised eigenvalues of
    the directions dropped (``lambda_i / sum(lambda)``, an upper bound on the relative squared
    error of the HOSVD truncation, and 0 for a dense layer), so that layers of any size and
    scale compare. The greedy minimises the summed loss under the budget in two phases:

    1. Cut: start dense; repeatedly take the move with the least loss added per unit of cost
       saved, over all layers, until the total meets the budget. A Tucker layer's moves drop one
       direction of mode 1 or 2; a dense layer's move is the jump to its best Tucker ranks
       (see ``_best_jump``), as no single step from full rank saves anything.
    2. Refill: the last cut (a jump especially) may overshoot, so spend the slack on the moves
       regaining the most loss per unit of cost that still fit: add back a direction (while the
       Tucker layer stays below dense), or return a layer to dense.

    Both use a heap with per-layer versions (a layer's moves are re-costed only when it
    changes), so the work is O((S + C) log n) per layer. With ``cost="macs"``, a layer made
    Tucker saves parameters too (so the orchestrator does not keep it dense) whenever its input
    is at least as large as its output, spatially: the parameter ratio is then the smaller.

    Parameters
    ----------
    layers
        The layers sharing the budget.
    fraction
        The cap, in (0, 1], as a fraction of ``sum(dense cost)``.
    cost
        ``"params"`` (:attr:`LayerInfo.dense_params` against :func:`tucker_params`) or
        ``"macs"`` (:attr:`LayerInfo.dense_macs` against :func:`tucker_macs`).

    Returns
    -------
    dict
        ``{name: (R1, R2)}``; full ranks ``(S, C)`` for layers kept dense.

    Raises
    ------
    ValueError
        If ``fraction`` is outside (0, 1] or below the least achievable fraction (every layer at
        ranks (1, 1), or dense where that is cheaper); the message gives that fraction.
    """
    if cost not in ("params", "macs"):
        raise ValueError(f"cost must be 'params' or 'macs', got {cost!r}")
    layers = list(layers)
    state = [_greedy_layer(layer, cost) for layer in layers]
    dense_total = sum(g.dense for g in state)
    least = sum(min(g.dense, g.cost(1, 1)) for g in state)
    least_fraction = least / dense_total if dense_total else 1.0
    if isinstance(fraction, bool) or not 0 < fraction <= 1 or fraction * dense_total < least:
        raise ValueError(
            f"budget {cost}={fraction!r} cannot be met: it must be a fraction in (0, 1] of the "
            f"dense {cost} ({dense_total}) of at least {least_fraction:.4g}, what remains with "
            f"ranks (1, 1) everywhere (layers that cannot beat dense stay dense)"
        )
    target = fraction * dense_total
    jumps = [_best_jump(g) for g in state]
    heap: list[tuple] = []

    def push_cuts(i: int) -> None:
        g = state[i]
        if not g.tucker:
            if jumps[i] is not None:
                ratio, r1, r2 = jumps[i]
                saved = g.dense - g.cost(r1, r2)
                heapq.heappush(heap, (ratio, -saved, i, g.version, r1, r2))
            return
        c = g.cost(g.r1, g.r2)
        if g.r1 > 1:  # drop mode-1 direction g.r1 - 1 (0-based)
            saved = c - g.cost(g.r1 - 1, g.r2)
            heapq.heappush(heap, (g.loss1[g.r1 - 1] / saved, -saved, i, g.version, g.r1 - 1, g.r2))
        if g.r2 > 1:
            saved = c - g.cost(g.r1, g.r2 - 1)
            heapq.heappush(heap, (g.loss2[g.r2 - 1] / saved, -saved, i, g.version, g.r1, g.r2 - 1))

    for i in range(len(state)):
        push_cuts(i)
    total = dense_total
    while total > target:
        *_, i, version, r1, r2 = heapq.heappop(heap)
        g = state[i]
        if version != g.version:
            continue
        before = g.effective()
        g.r1, g.r2, g.tucker, g.version = r1, r2, True, g.version + 1
        total += g.effective() - before
        push_cuts(i)

    def push_refills(i: int) -> None:
        g = state[i]
        c = g.cost(g.r1, g.r2)
        gained = g.tail1[g.r1] + g.tail2[g.r2]
        moves = [(gained, g.dense - c, len(g.loss1), len(g.loss2), False)]
        if g.r1 < len(g.loss1):
            moves.append((g.loss1[g.r1], g.cost(g.r1 + 1, g.r2) - c, g.r1 + 1, g.r2, True))
        if g.r2 < len(g.loss2):
            moves.append((g.loss2[g.r2], g.cost(g.r1, g.r2 + 1) - c, g.r1, g.r2 + 1, True))
        for gain, extra, r1, r2, tucker in moves:
            # Adding back past dense cost is dominated by returning to dense.
            if gain > 0 and (not tucker or c + extra < g.dense):
                heapq.heappush(heap, (-gain / extra, extra, i, g.version, r1, r2, tucker))

    heap = []
    for i, g in enumerate(state):
        if g.tucker:
            push_refills(i)
    slack = target - total
    while heap:
        _, extra, i, version, r1, r2, tucker = heapq.heappop(heap)
        g = state[i]
        if version != g.version or extra > slack:
            continue
        g.r1, g.r2, g.tucker, g.version = r1, r2, tucker, g.version + 1
        slack -= extra
        if tucker:
            push_refills(i)
    return {layer.name: (g.r1, g.r2) for layer, g in zip(layers, state, strict=True)}
