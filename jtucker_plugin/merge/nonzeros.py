"""How many entries a sparse part keeps: a density per segment, or one budget over all of them.

Hybrid's deltas (``merge.hybrid``), J-Tucker's core deltas (``decompose.shared_core``) and sparse
layers (``merge.sparse``) all keep the entries of largest magnitude, either the same share of
every segment (a layer of one task) or the largest ``budget`` over all segments together.

>>> import torch
>>> allocate_nonzeros([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 0.5, 4.0])], [2, 3], budget=3)
[1, 2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_target(
    density: float | None, budget: int | None, names: tuple[str, str] = ("density", "budget")
) -> None:
    """Check that exactly one target is given, ``density`` in [0, 1] or ``budget`` >= 0.

    Raises
    ------
    ValueError
        Naming the field (``names``: how the caller calls the two).
    """
    d, b = names
    if (density is None) == (budget is None):
        raise ValueError(
            f"{d}: give exactly one target, {d} (non-zeros per layer and task, a fraction in "
            f"[0, 1]) or {b} (non-zeros over all layers and tasks); got {d}={density!r}, "
            f"{b}={budget!r}"
        )
    if density is not None and (
        isinstance(density, bool) or not isinstance(density, int | float) or not 0 <= density <= 1
    ):
        raise ValueError(f"{d}: expected a number in [0, 1], got {density!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"{b}: expected an integer >= 0 (non-zeros), got {budget!r}")


def allocate_nonzeros(
    magnitudes: Sequence[Tensor],
    sizes: Sequence[int],
    *,
    density: float | None = None,
    budget: int | None = None,
) -> list[int]:
    """How many entries to keep in each segment (a layer of one task): the largest magnitudes.

    Parameters
    ----------
    magnitudes
        Per segment, the magnitudes of its candidate entries.
    sizes
        Per segment, its full number of entries (what ``density`` is a fraction of).
    density
        Keep ``round(density * size)`` per segment (at most its candidates).
    budget
        Keep the ``budget`` largest magnitudes over all segments together.

    Returns
    -------
    list[int]
        Entries to keep per segment.
    """
    check_target(density, budget)
    if density is not None:
        return [min(m.numel(), math.floor(density * n + 0.5)) for m, n in zip(magnitudes, sizes, strict=True)]
    counts = [m.numel() for m in magnitudes]
    if budget >= sum(counts):
        return counts
    flat = torch.cat([m.detach().reshape(-1).to(torch.float64) for m in magnitudes])
    segment = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    top = flat.topk(budget).indices
    return torch.bincount(segment[top], minlength=len(counts)).tolist()
