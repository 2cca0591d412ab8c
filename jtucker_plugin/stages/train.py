"""Stages ``train`` and ``finetune``: per task, or jointly with interleaved batches, optionally
distilling from the task models an earlier stage wrote (``distill``, ``teacher_stage``)."""

from __future__ import annotations

from dataclasses import dataclass

from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult
from jtucker_plugin.train import Distillation, FitConfig, fit


@dataclass(frozen=True)
class FinetuneConfig(FitConfig):
    """``finetune``: a ``FitConfig``, plus distillation from an earlier stage's task models."""

    # distill: weight of the teachers' softened predictions in the loss (0: labels only);
    # teacher_stage: index of the stage whose bundle holds the teachers (e.g. the fine-tuned
    # dense models before compression)
    distill: float = 0.0
    teacher_stage: int | None = None
    temperature: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        Distillation({}, self.distill, self.temperature)  # checks distill and temperature
        if self.distill and self.teacher_stage is None:
            raise ValueError("teacher_stage: distill needs the index of the stage whose models teach")


@dataclass(frozen=True)
class TrainConfig(FinetuneConfig):
    """``train``: longer and at a higher learning rate than ``finetune`` by default."""

    epochs: int = 10
    lr: float = 0.1


def distillation(config: FinetuneConfig, ctx: StageContext) -> Distillation | None:
    """The config's distillation, its teachers loaded from the checkpoint of ``teacher_stage``."""
    if not config.distill:
        return None
    teachers = ctx.checkpoint(config.teacher_stage, "teacher_stage").models
    return Distillation(teachers, config.distill, config.temperature)


def _fit_stage(bundle: Bundle, config: FinetuneConfig, ctx: StageContext) -> StageResult:
    tasks = list(config.tasks or bundle.tasks)
    losses = fit(
        bundle.models,
        {t: ctx.data(t) for t in tasks},
        config,
        seed=ctx.seed,
        progress=ctx.progress,
        distill=distillation(config, ctx),
    )
    return StageResult(bundle, {"tasks": {t: {"train_loss": v} for t, v in losses.items()}})


@register_stage("train", config=TrainConfig)
def train(bundle: Bundle, config: TrainConfig, ctx: StageContext) -> StageResult:
    """Train every task model on its own data (joint: true interleaves all tasks)."""
    return _fit_stage(bundle, config, ctx)


@register_stage("finetune", config=FinetuneConfig)
def finetune(bundle: Bundle, config: FinetuneConfig, ctx: StageContext) -> StageResult:
    """Fine-tune every task model on its own data (joint: true interleaves all tasks)."""
    return _fit_stage(bundle, config, ctx)
