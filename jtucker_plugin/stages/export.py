"""Stage ``export``: write the bundle (safetensors + manifest) into the run's output folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jtucker_plugin.multitask import TENSORS, Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult


@dataclass(frozen=True)
class ExportConfig:
    # safetensors: the bundle (shared tensors once); onnx: one <task>.onnx per task, each
    # checked against PyTorch with onnxruntime (the `onnx` extra)
    formats: list[Literal["safetensors", "onnx"]] = field(default_factory=lambda: ["safetensors"])
    path: str = "bundle"  # relative to the run's output folder
    onnx_path: str = "onnx"

    def __post_init__(self) -> None:
        if not self.formats:
            raise ValueError("formats: expected at least one of 'safetensors', 'onnx'")


@register_stage("export", config=ExportConfig)
def export(bundle: Bundle, config: ExportConfig, ctx: StageContext) -> StageResult:
    """Write the bundle (safetensors + manifest) and/or one checked ONNX file per task."""
    metrics: dict = {"bundle": {}, "tasks": {}}
    if "safetensors" in config.formats:
        path = bundle.save(ctx.output / config.path)
        size = (path / TENSORS).stat().st_size
        ctx.log(f"bundle written to {path} ({size} bytes of tensors)")
        metrics["bundle"].update(bytes=size, export=str(path))
    if "onnx" in config.formats:
        from jtucker_plugin.integrations.onnx import export_bundle_onnx

        files = export_bundle_onnx(bundle, ctx.output / config.onnx_path)
        for task, row in files.items():
            ctx.log(f"{task}: {row['path']} (onnxruntime matches PyTorch within {row['max_abs_diff']:.1e})")
            metrics["tasks"][task] = {"onnx_bytes": row["bytes"], "onnx_max_abs_diff": row["max_abs_diff"]}
    return StageResult(bundle, metrics)
