"""Stages ``jtucker`` (joint Tucker across tasks) and ``tucker`` (each task alone)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from jtucker_plugin import defaults
from jtucker_plugin.data import ArrayDataset
from jtucker_plugin.decompose.apply import decompose_bundle
from jtucker_plugin.decompose.ranks import rank_config_from_dict, select_ranks
from jtucker_plugin.decompose.shared_core import CoreSharing, share_cores
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult
from jtucker_plugin.train import evaluate


@dataclass(frozen=True)
class TuckerStageConfig:
    """Which layers to decompose and how their ranks are chosen."""

    # ranks: a rank strategy, e.g. {strategy: budget, budget: {params: 0.3}}
    ranks: Any = field(default_factory=lambda: {"strategy": "energy", "energy": 0.9})
    # layers: fnmatch patterns over module paths; heads and grouped convs always stay dense
    layers: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    min_params: int = defaults.DECOMPOSE_MIN_PARAMS
    # decomposition
    n_iter_max: int | None = None
    tol: float | None = None
    # rank strategies that evaluate candidates (ga) score them on this many samples per task
    calibration_samples: int = defaults.CALIBRATION_SAMPLES

    def __post_init__(self) -> None:
        if isinstance(self.ranks, dict):
            object.__setattr__(self, "ranks", rank_config_from_dict(self.ranks, "ranks"))
        if self.min_params < 0:
            raise ValueError(f"min_params: expected an integer >= 0, got {self.min_params}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples: expected an integer >= 1, got {self.calibration_samples}")


def _calibration_accuracy(ctx: StageContext, samples: int):
    """Mean accuracy over tasks on a fixed calibration subset (validation split, else train)."""
    subsets: dict[str, ArrayDataset] = {}

    def score(bundle: Bundle) -> float:
        accs = []
        for task, model in bundle.models.items():
            if task not in subsets:
                data = ctx.data(task)
                source = data.val if data.val is not None else data.train
                # A seeded random sample: the splits are stored class by class, so a prefix
                # would score a few classes only.
                generator = torch.Generator().manual_seed(ctx.seed)
                pick = torch.randperm(len(source), generator=generator)[: min(samples, len(source))]
                subsets[task] = ArrayDataset(
                    source.images[pick], source.labels[pick], source.mean, source.std
                )
            accs.append(evaluate(model, subsets[task])["accuracy"])
        return sum(accs) / len(accs)

    return score


def _decompose(
    bundle: Bundle,
    config: TuckerStageConfig,
    ctx: StageContext,
    *,
    joint: bool,
    stage: str,
    core_copies: float | None = None,
) -> StageResult:
    def select(infos, evaluate_ranks):
        return select_ranks(config.ranks, infos, evaluate=evaluate_ranks, seed=ctx.seed)

    before = bundle.unique_parameters()
    result = decompose_bundle(
        bundle,
        select,
        joint=joint,
        include=config.layers,
        exclude=config.exclude,
        min_params=config.min_params,
        evaluate=_calibration_accuracy(ctx, config.calibration_samples),
        n_iter_max=config.n_iter_max,
        tol=config.tol,
        core_copies=core_copies,
        stage=stage,
    )
    ctx.log(
        f"{stage}: {len(result['layers'])} layers, unique parameters {before} -> {bundle.unique_parameters()}"
    )
    return StageResult(bundle, {stage: result, "bundle": {"unique_parameters": bundle.unique_parameters()}})


@dataclass(frozen=True)
class JTuckerStageConfig(TuckerStageConfig, CoreSharing):
    """``jtucker``: plus how the cores are stored (the fields of ``decompose.shared_core.CoreSharing``)."""

    def __post_init__(self) -> None:
        TuckerStageConfig.__post_init__(self)
        CoreSharing.__post_init__(self)


@register_stage("jtucker", config=JTuckerStageConfig)
def jtucker(bundle: Bundle, config: JTuckerStageConfig, ctx: StageContext) -> StageResult:
    """J-Tucker: shared factor matrices for all tasks, a core per task, ranks chosen jointly."""
    config.check_tasks(len(bundle.tasks))
    # Ranks are chosen for the cores as they will be stored: a budget spends what sharing saves.
    copies = config.core_copies(len(bundle.tasks))
    result = _decompose(bundle, config, ctx, joint=True, stage="jtucker", core_copies=copies)
    if config.cores != "per_task":
        rows = result.metrics["jtucker"]["layers"]
        names = [name for name, row in rows.items() if "kept_dense" not in row]
        result.metrics["jtucker"]["cores"] = share_cores(bundle, names, config)
        result.metrics["bundle"]["unique_parameters"] = bundle.unique_parameters()
    return result


@register_stage("tucker", config=TuckerStageConfig)
def tucker(bundle: Bundle, config: TuckerStageConfig, ctx: StageContext) -> StageResult:
    """Tucker-2 of each task model on its own (the individual baseline)."""
    return _decompose(bundle, config, ctx, joint=False, stage="tucker")
