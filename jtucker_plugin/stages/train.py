"""Stages ``train`` and ``finetune``: per task, or jointly with interleaved batches."""

from __future__ import annotations

from dataclasses import dataclass

from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult
from jtucker_plugin.train import FitConfig, fit


@dataclass(frozen=True)
class TrainConfig(FitConfig):
    """``train``: longer and at a higher learning rate than ``finetune`` by default."""

    epochs: int = 10
    lr: float = 0.1


def _fit_stage(bundle: Bundle, config: FitConfig, ctx: StageContext) -> StageResult:
    tasks = list(config.tasks or bundle.tasks)
    losses = fit(
        bundle.models,
        {t: ctx.data(t) for t in tasks},
        config,
        seed=ctx.seed,
        progress=ctx.progress,
    )
    return StageResult(bundle, {"tasks": {t: {"train_loss": v} for t, v in losses.items()}})


@register_stage("train", config=TrainConfig)
def train(bundle: Bundle, config: TrainConfig, ctx: StageContext) -> StageResult:
    """Train every task model on its own data (joint: true interleaves all tasks)."""
    return _fit_stage(bundle, config, ctx)


@register_stage("finetune", config=FitConfig)
def finetune(bundle: Bundle, config: FitConfig, ctx: StageContext) -> StageResult:
    """Fine-tune every task model on its own data (joint: true interleaves all tasks)."""
    return _fit_stage(bundle, config, ctx)
