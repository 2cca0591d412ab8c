"""Stage ``export``: write the bundle (safetensors + manifest) into the run's output folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jtucker_plugin.multitask import TENSORS, Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult


@dataclass(frozen=True)
class ExportConfig:
    formats: list[Literal["safetensors"]] = field(default_factory=lambda: ["safetensors"])
    path: str = "bundle"  # relative to the run's output folder


@register_stage("export", config=ExportConfig)
def export(bundle: Bundle, config: ExportConfig, ctx: StageContext) -> StageResult:
    """Save the multi-task bundle (shared tensors once) into the run's output folder."""
    path = bundle.save(ctx.output / config.path)
    size = (path / TENSORS).stat().st_size
    ctx.log(f"bundle written to {path} ({size} bytes of tensors)")
    return StageResult(bundle, {"bundle": {"bytes": size, "export": str(path)}})
