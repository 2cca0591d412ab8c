"""Stage ``hybrid``: a weight shared by all tasks plus a sparse delta per task (see ``merge.hybrid``).

The stage trains, jointly, by itself: the magnitude schedule that shrinks the deltas to the
target runs between its epochs, which a separate ``finetune`` stage could not do. The deltas
start with ``init_factor`` times the target's non-zeros (the largest differences from the
tasks' mean), shrink over ``prune_epochs`` epochs under an L1 penalty, and train with fixed
masks for the remaining epochs. The shared weight can be sparse too (``shared_density`` or
``shared_budget``): cut once, before training, to the tasks' mean's largest entries, the deltas
then starting from the differences to it. A later ``finetune: {joint: true}`` stage keeps the masks (the
stored positions cannot grow) and only trains values, shared weights, batch norm and heads.
The training takes every option of ``finetune``, distillation from an earlier stage included::

    stages:
      - finetune: {epochs: 2}            # stage 0: the dense task models, the teachers below
      - hybrid:   {density: 0.05, keep_per_task: ["conv1"], epochs: 4, distill: 0.5, teacher_stage: 0}
      - evaluate: {}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from jtucker_plugin import defaults
from jtucker_plugin.merge.hybrid import hybrid_storage, hybridize, train_hybrid
from jtucker_plugin.merge.nonzeros import check_target
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult
from jtucker_plugin.stages.train import FinetuneConfig, distillation


@dataclass(frozen=True)
class HybridConfig(FinetuneConfig):
    """The target sparsity of the deltas, their schedule and the execution; the joint training
    is a ``finetune`` config (always joint, all tasks), distillation included."""

    # target (exactly one): share of each layer's entries a task's delta keeps, or non-zeros
    # summed over all layers and tasks (the largest differences win, wherever they are)
    density: float | None = None
    budget: int | None = None
    # a sparse shared weight (at most one; neither: dense): share of each layer's weight entries
    # kept, or entries kept over all layers (the tasks' mean's largest), fixed from the start
    shared_density: float | None = None
    shared_budget: int | None = None
    # keep_per_task: fnmatch patterns of layers that stay per task; batch norm and heads always do
    keep_per_task: list[str] = field(default_factory=list)
    # schedule: start at init_factor x the target non-zeros, cubic decrease over prune_epochs
    # epochs (default epochs - 1), L1 penalty l1 * sum_t |S_t|_1 throughout
    init_factor: float = 4.0
    prune_epochs: int | None = None
    l1: float = defaults.HYBRID_L1
    # training: the finetune options (lr, batch_size, distill, ...), longer, always joint
    epochs: int = 3
    joint: bool = True
    # execution: keep each task's dense weight after the first forward (fast) or rebuild it
    # at every forward (less memory); see merge.composed
    materialize: bool = defaults.MATERIALIZE

    def __post_init__(self) -> None:
        super().__post_init__()
        check_target(self.density, self.budget)
        if self.shared_density is not None or self.shared_budget is not None:
            check_target(self.shared_density, self.shared_budget, ("shared_density", "shared_budget"))
        if self.init_factor < 1:
            raise ValueError(f"init_factor: expected a number >= 1, got {self.init_factor}")
        if self.prune_epochs is not None and not 0 <= self.prune_epochs <= self.epochs:
            raise ValueError(
                f"prune_epochs: expected an integer in [0, epochs={self.epochs}], got {self.prune_epochs}"
            )
        if self.l1 < 0:
            raise ValueError(f"l1: expected a number >= 0, got {self.l1}")
        # One shared weight is trained from every task's loss, so the tasks train together.
        if not self.joint:
            raise ValueError("joint: the hybrid stage trains all tasks jointly; expected true")
        if self.tasks is not None:
            raise ValueError(
                f"tasks: the hybrid stage trains every task (its weights are shared); got {self.tasks}"
            )


@register_stage("hybrid", config=HybridConfig)
def hybrid(bundle: Bundle, config: HybridConfig, ctx: StageContext) -> StageResult:
    """Hybrid sharing: shared weights + sparse per-task deltas, trained jointly to a target."""
    prune_epochs = max(0, config.epochs - 1) if config.prune_epochs is None else config.prune_epochs
    # The schedule needs room to shrink from; without pruning epochs start at the target.
    factor = config.init_factor if prune_epochs else 1.0
    start_density = None if config.density is None else min(1.0, factor * config.density)
    start_budget = None if config.budget is None else math.ceil(factor * config.budget)
    made = hybridize(
        bundle,
        density=start_density,
        budget=start_budget,
        shared_density=config.shared_density,
        shared_budget=config.shared_budget,
        keep_per_task=config.keep_per_task,
        materialize=config.materialize,
    )
    ctx.log(f"hybrid: {len(made['layers'])} layers, {made['nonzeros']} non-zeros to start")
    epochs = train_hybrid(
        bundle,
        {t: ctx.data(t) for t in bundle.tasks},
        config,
        names=list(made["layers"]),
        density=config.density,
        budget=config.budget,
        l1=config.l1,
        prune_epochs=prune_epochs,
        seed=ctx.seed,
        progress=ctx.progress,
        distill=distillation(config, ctx),
    )
    storage = hybrid_storage(bundle)
    for name, row in made["layers"].items():
        row["nnz"] = [m.get_submodule(name).nnz for m in bundle.models.values()]
    ctx.log(
        f"hybrid: {storage['nonzeros']} non-zeros; unique parameters "
        f"{made['unique_parameters']['before']} -> {bundle.unique_parameters()}"
    )
    return StageResult(
        bundle,
        {
            "hybrid": {**made, "epochs": epochs, "storage": storage},
            "tasks": {t: {"train_loss": v} for t, v in (epochs[-1]["loss"] if epochs else {}).items()},
            "bundle": {
                "unique_parameters": bundle.unique_parameters(),
                "compression_ratio": bundle.compression_ratio(),
                "bytes": storage["file_bytes"],
            },
        },
    )
