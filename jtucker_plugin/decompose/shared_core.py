"""J-Tucker with shared cores: the per-task cores of a joint Tucker layer stored as shared parts.

J-Tucker (METHODS.md section 1) shares the factor matrices and keeps a core ``G_t`` per task;
on tasks fine-tuned from one backbone the cores dominate storage and differ little. Two ways
to store only what differs, chosen with ``cores`` in the ``jtucker`` stage:

- ``shared_sparse``: ``G_t = G_shared + D_t``; ``G_shared`` is the cores' mean (one parameter
  for all tasks), ``D_t`` the largest entries of ``G_t - G_shared`` at ``core_density`` per
  layer and task, or ``core_budget`` non-zeros over all layers and tasks. The core becomes a
  ``merge.composed.HybridLayer``: values plus their positions (``encode_positions``). Exact at density 1.
- ``task_rank``: a Tucker rank ``R_T <= T`` on the task mode. The ``T x (R1*R2*d*d)`` matrix of
  the cores, by its SVD, is ``A B`` with ``B`` (``R_T`` shared basis cores) and ``A`` (per task,
  ``R_T`` mixing weights): ``G_t = sum_r A[t, r] B_r``, the best rank-``R_T`` fit in the
  Frobenius norm; exact at ``R_T = T``. The core becomes a ``TaskMixLayer``.

``per_task`` is the paper's layer and the default. Storage per layer (``S x C`` layer, ranks
``R1, R2``, ``d x d`` kernel, ``N = R1*R2*d*d``): factors ``S*R1 + C*R2`` plus, for the cores,
``T*N`` (per_task), ``N + sum_t nnz_t`` values and as many indices (shared_sparse), or
``R_T*N + T*R_T`` (task_rank).

Examples
--------
>>> CoreSharing("task_rank", task_rank=2).task_rank
2
>>> CoreSharing("shared_sparse", core_density=1.5)
Traceback (most recent call last):
...
ValueError: core_density: expected a number in [0, 1], got 1.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from jtucker_plugin import defaults, layers
from jtucker_plugin.decompose.layers import FactorizedLinear, TuckerConv2d
from jtucker_plugin.merge.composed import ComposedLayer
from jtucker_plugin.merge.hybrid import make_hybrid
from jtucker_plugin.merge.nonzeros import allocate_nonzeros, check_target
from jtucker_plugin.multitask import Bundle

CORES = ("per_task", "shared_sparse", "task_rank")
"""How the cores of a joint Tucker layer are stored."""


@dataclass(frozen=True)
class CoreSharing:
    """How the cores are stored: the ``jtucker`` stage's ``cores`` options, checked.

    Raises
    ------
    ValueError
        Naming the field: an unknown ``cores``, a density outside [0, 1], a negative budget,
        a ``task_rank`` below 1, or an option that does not go with ``cores``.
    """

    # cores: per_task (the paper), shared_sparse (G_shared + sparse D_t at core_density or
    # core_budget non-zeros), task_rank (spanned by task_rank shared cores)
    cores: Literal["per_task", "shared_sparse", "task_rank"] = "per_task"
    core_density: float | None = None
    core_budget: int | None = None
    task_rank: int | None = None
    # shared cores: keep each task's dense core after its first forward (see merge.composed)
    materialize: bool = defaults.MATERIALIZE

    def __post_init__(self) -> None:
        if self.cores not in CORES:
            raise ValueError(f"cores: expected one of {', '.join(CORES)}, got {self.cores!r}")
        if self.cores == "shared_sparse":
            check_target(self.core_density, self.core_budget, ("core_density", "core_budget"))
        else:
            for name in ("core_density", "core_budget"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only for cores: shared_sparse, got cores: {self.cores}")
        if self.cores == "task_rank":
            r = self.task_rank
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(
                    f"task_rank: expected an integer >= 1 (at most the number of tasks), got {r!r}"
                )
        elif self.task_rank is not None:
            raise ValueError(f"task_rank: only for cores: task_rank, got cores: {self.cores}")

    def core_copies(self, n_tasks: int) -> float | None:
        """What the cores of a layer cost, in dense cores, for rank strategies' budgets.

        ``None`` (one per task) for ``per_task``; ``1 + n_tasks * core_density`` for
        ``shared_sparse`` (the delta values; with ``core_budget``, 1: the budget's non-zeros
        are a cost of their own, not the ranks'); ``task_rank`` basis cores for ``task_rank``
        (the per-task mixing weights are negligible).
        """
        if self.cores == "shared_sparse":
            return 1.0 + n_tasks * (self.core_density or 0.0)
        if self.cores == "task_rank":
            return float(self.task_rank)
        return None

    def check_tasks(self, n_tasks: int) -> None:
        """Raise a ``ValueError`` naming ``task_rank`` if it is above the ``n_tasks`` tasks."""
        if self.cores == "task_rank" and self.task_rank > n_tasks:
            raise ValueError(
                f"task_rank: {self.task_rank} is above the number of tasks ({n_tasks}); the "
                f"task mode of the cores has rank at most {n_tasks}"
            )


@layers.register_layer
class TaskMixLayer(ComposedLayer):
    """A core spanned by shared basis cores: ``G_t = sum_r mix[r] * basis[r]``.

    Parameters
    ----------
    op, config, materialize
        See ``merge.composed.ComposedLayer``; the layer has no bias (a Tucker layer's bias is
        its own parameter).
    task_rank
        ``R_T``, the number of basis cores.

    Attributes
    ----------
    basis
        ``nn.Parameter`` ``R_T x (weight shape)``; the same object in every task's layer.
    mix
        ``nn.Parameter`` of ``R_T`` mixing weights: this task's.
    """

    def __init__(
        self, op: str, config: dict[str, Any], task_rank: int = 1, materialize: bool = defaults.MATERIALIZE
    ):
        super().__init__(op, config, materialize)
        self.basis = nn.Parameter(torch.zeros(task_rank, *self.weight_shape))
        self.mix = nn.Parameter(torch.zeros(task_rank))

    @property
    def has_bias(self) -> bool:
        return False

    def parts(self) -> tuple[Tensor, ...]:
        return self.basis, self.mix

    def compose(self) -> tuple[Tensor, Tensor | None]:
        return torch.tensordot(self.mix, self.basis, dims=1), None

    def layer_config(self) -> dict[str, Any]:
        return {
            "op": type(self.op).__name__,
            "config": layers.layer_config(self.op),
            "task_rank": self.mix.numel(),
            "materialize": self.materialize,
        }

    def extra_repr(self) -> str:
        return f"task_rank={self.mix.numel()}, materialize={self.materialize}"


@torch.no_grad()
def task_mix(
    cores: Sequence[nn.Module], task_rank: int, *, materialize: bool = defaults.MATERIALIZE
) -> list[TaskMixLayer]:
    """The ``TaskMixLayer`` of each task for the T core layers ``cores``: one shared basis.

    The cores' matrix ``M`` (``T x N``) is cut to its ``task_rank`` leading singular triplets,
    ``M ~= (U sqrt(T)) (S V^T / sqrt(T))``: mixing weights of order 1 (about 1 for the first
    basis core, which is then close to the cores' mean) and basis cores of the cores' scale.

    Raises
    ------
    ValueError
        If ``task_rank`` is not in ``[1, T]``.
    """
    n_tasks = len(cores)
    if not 1 <= task_rank <= n_tasks:
        raise ValueError(
            f"task_rank: expected an integer in [1, {n_tasks}] (the task mode has {n_tasks} "
            f"tasks), got {task_rank}"
        )
    first = cores[0]
    dtype = first.weight.dtype
    matrix = torch.stack([c.weight.detach().reshape(-1) for c in cores]).to(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = u[:, :task_rank], s[:task_rank], vh[:task_rank]
    # SVD signs are arbitrary: make each task's weights mostly positive, for reproducibility.
    signs = torch.where(u.sum(0) < 0, -1.0, 1.0).to(torch.float64)
    mix = u * signs * n_tasks**0.5
    basis = (signs * s / n_tasks**0.5)[:, None] * vh
    shared = nn.Parameter(basis.view(task_rank, *first.weight.shape).to(dtype))
    config = layers.layer_config(first)
    out = []
    for weights in mix:
        layer = TaskMixLayer(type(first).__name__, config, task_rank, materialize).to(
            device=first.weight.device, dtype=dtype
        )
        layer.basis = shared
        layer.mix = nn.Parameter(weights.to(dtype))
        out.append(layer)
    return out


def joint_layers(bundle: Bundle, name: str) -> list[TuckerConv2d | FactorizedLinear]:
    """The joint Tucker layer ``name`` of every task: factorized, with one set of factors.

    Raises
    ------
    ValueError
        If ``name`` is not such a layer in every task model.
    """
    group = [model.get_submodule(name) for model in bundle.models.values()]
    if not all(isinstance(layer, TuckerConv2d | FactorizedLinear) for layer in group) or not all(
        layer.in_proj is group[0].in_proj and layer.out_proj is group[0].out_proj for layer in group
    ):
        raise ValueError(f"layer {name!r} is not a joint Tucker layer (one in_proj/out_proj for all tasks)")
    return group


def share_cores(
    bundle: Bundle, names: Sequence[str], sharing: CoreSharing, *, stage: str = "jtucker"
) -> dict[str, Any]:
    """Store the cores of the joint Tucker layers ``names`` as ``sharing.cores`` says, in place.

    Returns
    -------
    dict
        ``{"cores": mode, "layers": {name: {"core_entries", "nnz" | "task_rank",
        "core_errors": [per task ||G_t - G'_t|| / ||G_t||]}}, "unique_parameters": {"before",
        "after"}}``; one history record per layer goes to ``bundle.history``.

    Raises
    ------
    ValueError
        If ``task_rank`` is above the number of tasks (naming ``task_rank``), or a name is not
        a joint Tucker layer.
    """
    n_tasks = len(bundle.tasks)
    sharing.check_tasks(n_tasks)
    groups = {name: joint_layers(bundle, name) for name in names}
    before = bundle.unique_parameters()
    rows: dict[str, Any] = {}
    if sharing.cores == "shared_sparse":
        diffs = []
        for group in groups.values():
            stacked = torch.stack([layer.core.weight.detach().reshape(-1) for layer in group])
            diffs.extend((stacked - stacked.mean(0)).abs())
        counts = allocate_nonzeros(
            diffs, [d.numel() for d in diffs], density=sharing.core_density, budget=sharing.core_budget
        )
    for j, (name, group) in enumerate(groups.items()):
        cores = [layer.core for layer in group]
        reference = torch.stack([c.weight.detach().reshape(-1) for c in cores])
        if sharing.cores == "shared_sparse":
            new = make_hybrid(cores, counts[j * n_tasks : (j + 1) * n_tasks], materialize=sharing.materialize)
            row: dict[str, Any] = {"nnz": [c.nnz for c in new]}
        elif sharing.cores == "task_rank":
            new = task_mix(cores, sharing.task_rank, materialize=sharing.materialize)
            row = {"task_rank": sharing.task_rank}
        else:
            continue
        for layer, core in zip(group, new, strict=True):
            layer.core = core
        with torch.no_grad():
            rebuilt = torch.stack([c.compose()[0].reshape(-1) for c in new])
        errors = (rebuilt - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-30)
        rows[name] = {
            "core_entries": reference.shape[1],
            **row,
            "core_errors": [round(float(e), 6) for e in errors],
        }
        bundle.history.append({"stage": stage, "layer": name, "cores": sharing.cores, **row})
    return {
        "cores": sharing.cores,
        "layers": rows,
        "unique_parameters": {"before": before, "after": bundle.unique_parameters()},
    }
