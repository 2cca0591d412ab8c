"""Stage ``evaluate``: accuracy, size, MACs and latency of every task model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jtucker_plugin.metrics import (
    count_macs,
    count_parameters,
    latency_ms,
    model_bytes,
    state_bytes,
)
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult
from jtucker_plugin.train import evaluate as evaluate_model


@dataclass(frozen=True)
class EvaluateConfig:
    split: Literal["test", "val"] = "test"
    batch_size: int = 256
    latency: bool = True  # CPU latency at batch 1 and 32 (median of `repeats`)
    repeats: int = 10

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats: expected an integer >= 1, got {self.repeats}")


@register_stage("evaluate", config=EvaluateConfig)
def evaluate(bundle: Bundle, config: EvaluateConfig, ctx: StageContext) -> StageResult:
    """Measure each task's accuracy, parameters, MACs, bytes and CPU latency."""
    rows = {}
    for task, model in bundle.models.items():
        data = ctx.data(task)
        split = data.val if config.split == "val" else data.test
        if split is None:
            raise ValueError(
                f"evaluate.split: task {task!r} has no validation split; set val_fraction in its data"
            )
        shape = bundle.info[task].input_shape
        row = evaluate_model(model, split, batch_size=config.batch_size, progress=ctx.progress)
        row.update(
            parameters=count_parameters(model),
            macs=count_macs(model, shape),
            bytes=model_bytes(model),
        )
        if config.latency:
            for batch in (1, 32):
                row[f"latency_ms_b{batch}"] = latency_ms(model, shape, batch, repeats=config.repeats)
        ctx.log(f"{task}: accuracy {row['accuracy']:.4f}")
        rows[task] = row
    return StageResult(bundle, {"tasks": rows, "bundle": {"bytes": state_bytes(bundle.stored_tensors())}})
