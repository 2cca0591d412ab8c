"""Stage ``prune``: structured channel pruning of every task model, shared parts jointly."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from jtucker_plugin import defaults
from jtucker_plugin.data import iterate_batches
from jtucker_plugin.metrics import count_macs, count_parameters
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.prune.prune import prune_bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult


@dataclass(frozen=True)
class PruneConfig:
    """How channels are ranked, how many go, and which layers are left alone."""

    # ranking: naive_bayes (calibrated naive-Bayes posterior) or a torch-pruning criterion
    importance: Literal["naive_bayes", "magnitude", "taylor", "lamp", "bn_scale"] = "naive_bayes"
    # amount: exactly one of a channel ratio and the share of MACs kept (summed over tasks)
    pruning_ratio: float | None = None
    macs_target: float | None = None
    global_pruning: bool = False
    iterative_steps: int = defaults.PRUNE_ITERATIVE_STEPS
    max_pruning_ratio: float = defaults.MAX_PRUNING_RATIO
    round_to: int | None = None
    # layers: fnmatch patterns over module paths; classifier heads are always left alone
    ignored_layers: list[str] = field(default_factory=list)
    # calibration data: the first batches of each task's shuffled training split
    calibration_batches: int = defaults.PRUNE_CALIBRATION_BATCHES
    batch_size: int = 64
    # naive_bayes: channels masked to label the classifier, or consensus labels
    probes: int = defaults.NAIVE_BAYES_PROBES
    labels: Literal["masking", "consensus"] = "masking"

    def __post_init__(self) -> None:
        if (self.pruning_ratio is None) == (self.macs_target is None):
            raise ValueError(
                f"pruning_ratio: give exactly one of pruning_ratio and macs_target, got "
                f"{self.pruning_ratio!r} and {self.macs_target!r}"
            )
        if self.pruning_ratio is not None and not 0 < self.pruning_ratio < 1:
            raise ValueError(f"pruning_ratio: expected a number in (0, 1), got {self.pruning_ratio}")
        if self.macs_target is not None and not 0 < self.macs_target < 1:
            raise ValueError(
                f"macs_target: expected the share of MACs kept, in (0, 1), got {self.macs_target}"
            )
        if not 0 < self.max_pruning_ratio <= 1:
            raise ValueError(f"max_pruning_ratio: expected a number in (0, 1], got {self.max_pruning_ratio}")
        for name in ("iterative_steps", "calibration_batches", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.round_to is not None and self.round_to < 1:
            raise ValueError(f"round_to: expected an integer >= 1, got {self.round_to}")
        if self.probes < 4:
            raise ValueError(
                f"probes: expected an integer >= 4 (two labelled channels per class), got {self.probes}"
            )
        for i, pattern in enumerate(self.ignored_layers):
            if not pattern:
                raise ValueError(f"ignored_layers: item {i} is an empty pattern")


def _calibration(bundle: Bundle, config: PruneConfig, ctx: StageContext) -> dict:
    # A fixed, seeded sample of training images without augmentation: the same data every run.
    return {
        task: list(
            itertools.islice(
                iterate_batches(ctx.data(task).train, config.batch_size, shuffle=True, seed=ctx.seed),
                config.calibration_batches,
            )
        )
        for task in bundle.tasks
    }


@register_stage("prune", config=PruneConfig)
def prune(bundle: Bundle, config: PruneConfig, ctx: StageContext) -> StageResult:
    """Remove channels (naive-Bayes or torch-pruning importance), shared layers jointly across tasks."""
    summary = prune_bundle(
        bundle,
        config.importance,
        calibration=_calibration(bundle, config, ctx),
        pruning_ratio=config.pruning_ratio,
        macs_target=config.macs_target,
        global_pruning=config.global_pruning,
        ignored_layers=config.ignored_layers,
        round_to=config.round_to,
        iterative_steps=config.iterative_steps,
        max_pruning_ratio=config.max_pruning_ratio,
        probes=config.probes,
        labels=config.labels,
        seed=ctx.seed,
    )
    ctx.log(
        f"prune ({config.importance}): {summary['layers']} layers, MACs {summary['macs_before']} -> "
        f"{summary['macs_after']} ({summary['macs_kept']:.1%} kept)"
    )
    tasks = {
        task: {
            "parameters": count_parameters(model),
            "macs": count_macs(model, bundle.info[task].input_shape),
        }
        for task, model in bundle.models.items()
    }
    return StageResult(
        bundle,
        {"prune": summary, "tasks": tasks, "bundle": {"unique_parameters": bundle.unique_parameters()}},
    )
