"""Stage ``quantize``: every task model through Intel Neural Compressor, shared parts once.

The stage quantizes all task models of the bundle together (``quantize_tasks`` in
``integrations/inc_quantize.py``), measures each task's accuracy, size and CPU latency
before and after, and writes the quantized program into the run's output folder
(``<output>/quantized/``: ``program.pt2``, all tasks in one ``torch.export`` archive with the
shared tensors once, and ``quantized.json`` saying which input is which task).

The bundle it returns is the float bundle, unchanged: a quantized graph cannot be rebuilt from
registered layer configs, so it cannot be a ``Bundle`` checkpoint. Stages after this one
(``evaluate``, ``export``) therefore see the float models; the quantized numbers are this
stage's metrics (``accuracy_quantized``, ``quantized_bytes``, ``latency_ms_b*_quantized``).

Shared parts: every task's graph is one PT2E program, so a weight shared by several tasks is
quantized once and stored once, with one set of scales: J-Tucker's factors, hard sharing's
convs, Hybrid's shared weights (its deltas stay sparse: int8 values, one scale each),
task-mixed basis cores. A batch norm after a shared weight stays each task's affine
(``x * scale + shift``, stored in float16, computed in float32) instead of being folded into a
copy of the weight; so does one that cannot fold (after a Hybrid layer's branches). The metric
``quantized_shared_tensors`` counts what stays shared.

Sizes are those of the tensors (a safetensors file of them, like a bundle's): the ``.pt2``
archive adds the serialized graph, which dominates for tiny models. Latency is eager PyTorch:
PT2E graphs run reference quantize/dequantize ops around float kernels there, so they are not
faster than float until compiled (``torch.compile``) or run by an int8 runtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from jtucker_plugin import defaults
from jtucker_plugin.data import TaskData, iterate_batches
from jtucker_plugin.io import atomic_directory
from jtucker_plugin.metrics import latency_ms, model_bytes, state_bytes
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.schema import did_you_mean
from jtucker_plugin.recipe.stage import StageContext, StageResult
from jtucker_plugin.train import evaluate

# The same names as integrations.inc_quantize.SCHEMES, kept here so that validating a recipe
# does not import Intel Neural Compressor (several seconds).
Scheme = Literal["int8_static", "int8_dynamic", "weight_only_rtn"]
Toolkit = Literal["neural_compressor"]
SCHEMES: tuple[str, ...] = typing.get_args(Scheme)
TOOLKITS: tuple[str, ...] = typing.get_args(Toolkit)


@dataclass(frozen=True)
class QuantizeConfig:
    """How the task models are quantized, and what is measured."""

    # toolkit and scheme: int8_static (PT2E, calibrated), int8_dynamic (PT2E), weight_only_rtn
    toolkit: Toolkit = "neural_compressor"
    scheme: Scheme = "int8_static"
    # calibration: batches of each task's own training images (int8_dynamic uses one)
    calibration_batches: int = defaults.CALIBRATION_BATCHES
    batch_size: int = 32
    # weight_only_rtn: bits per weight, and weights per scale (-1: one scale per output channel)
    bits: int = 8
    group_size: int = -1
    # measurement
    split: Literal["test", "val"] = "test"
    latency: bool = True
    repeats: int = 10
    # output: a folder relative to the run's output folder, or null to write nothing
    path: str | None = "quantized"

    def __post_init__(self) -> None:
        if self.toolkit not in TOOLKITS:
            raise ValueError(
                f"toolkit: {self.toolkit!r} is not supported{did_you_mean(self.toolkit, TOOLKITS)}; "
                f"available: {', '.join(TOOLKITS)}"
            )
        if self.scheme not in SCHEMES:
            raise ValueError(
                f"scheme: {self.scheme!r} is not a scheme Intel Neural Compressor offers here"
                f"{did_you_mean(self.scheme, SCHEMES)}; available on CPU: {', '.join(SCHEMES)}"
            )
        for name in ("calibration_batches", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits: INC's RTN takes 1 to 8 bits, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(
                f"group_size: expected -1 (per channel) or a positive size, got {self.group_size}"
            )


def calibration_batches(data: TaskData, task: str, batches: int, batch_size: int, seed: int) -> list:
    """The first ``batches`` shuffled, unaugmented batches of the task's training images.

    Raises
    ------
    ValueError
        If the task has no training images to calibrate on.
    """
    if len(data.train) == 0:
        raise ValueError(
            f"quantize: task {task!r} has no training images to calibrate on; static int8 sets "
            "each task's activation ranges from its own data"
        )
    out = []
    for images, _ in iterate_batches(data.train, batch_size, shuffle=True, seed=seed):
        out.append(images)
        if len(out) == batches:
            break
    return out


@contextlib.contextmanager
def _inc_logs(*, quiet: bool) -> Iterator[None]:
    # INC logs each step at INFO on its own handler; a quiet run shows its warnings only.
    logger = logging.getLogger("neural_compressor")
    level = logger.level
    if quiet:
        logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


@register_stage("quantize", config=QuantizeConfig)
def quantize(bundle: Bundle, config: QuantizeConfig, ctx: StageContext) -> StageResult:
    """Quantize every task model with Intel Neural Compressor; accuracy, size, latency before/after."""
    from jtucker_plugin.integrations.inc_quantize import quantize_tasks  # imports INC: seconds

    tasks = bundle.tasks
    splits = {}
    for task in tasks:
        data = ctx.data(task)
        splits[task] = data.val if config.split == "val" else data.test
        if splits[task] is None:
            raise ValueError(
                f"quantize.split: task {task!r} has no validation split; set val_fraction in its data"
            )
    calibration = None
    if config.scheme != "weight_only_rtn":
        n = config.calibration_batches if config.scheme == "int8_static" else 1
        calibration = {t: calibration_batches(ctx.data(t), t, n, config.batch_size, ctx.seed) for t in tasks}
    shapes = {t: tuple(bundle.info[t].input_shape) for t in tasks}
    ctx.log(f"quantize: {config.scheme} of {len(tasks)} task models with Intel Neural Compressor")
    with _inc_logs(quiet=ctx.quiet):
        result = quantize_tasks(
            bundle.models,
            config.scheme,
            shapes,
            calibration=calibration,
            bits=config.bits,
            group_size=config.group_size,
        )

    rows = {}
    for task in tasks:
        row = {}
        for label, model in (("float", bundle.models[task]), ("quantized", result.models[task])):
            row[f"accuracy_{label}"] = evaluate(model, splits[task], progress=ctx.progress)["accuracy"]
            if config.latency:
                for batch in (1, 32):
                    row[f"latency_ms_b{batch}_{label}"] = latency_ms(
                        model, shapes[task], batch, repeats=config.repeats
                    )
        row.update(
            float_bytes=model_bytes(bundle.models[task]),
            quantized_bytes=state_bytes(result.task_tensors(task)),
        )
        before, after = row["accuracy_float"], row["accuracy_quantized"]
        ctx.log(f"{task}: accuracy {before:.4f} -> {after:.4f} ({config.scheme})")
        rows[task] = row

    stored = result.stored_tensors()
    summary = {
        "quantize_scheme": config.scheme,
        "float_bytes": state_bytes(bundle.stored_tensors()),
        "quantized_bytes": state_bytes(stored),
        # Tensors that several tasks use as one object: shared parts quantized once.
        "quantized_shared_tensors": result.shared_tensors(),
    }
    if config.path is not None:
        with atomic_directory(ctx.output / config.path) as folder:
            program = result.save(folder / "program.pt2")
            (folder / "quantized.json").write_text(
                json.dumps(
                    {
                        "scheme": config.scheme,
                        "toolkit": config.toolkit,
                        "tasks": tasks,
                        "input_shapes": {t: list(s) for t, s in shapes.items()},
                        "usage": "torch.export.load('program.pt2').module()(*inputs): one input per "
                        "task, in the order of 'tasks'",
                        "metrics": {"tasks": rows, "bundle": summary},
                    },
                    indent=1,
                )
            )
            summary["quantized_file_bytes"] = program.stat().st_size
        summary["quantized_program"] = str(ctx.output / config.path / "program.pt2")
    return StageResult(bundle, {"tasks": rows, "bundle": summary})
