"""ONNX export: one file per task model, checked against PyTorch with onnxruntime.

Each task model is exported on its own (an ONNX file cannot point into another), so factor
modules shared by several tasks are repeated in each file; the bundle (safetensors) is where
they are stored once. The batch axis is dynamic. The export uses torch's TorchScript-based
exporter: the newer ``dynamo=True`` exporter needs the ``onnxscript`` package, which is not a
dependency of the plugin.

A check runs the file with onnxruntime (the ``onnx`` extra: ``pip install
'jtucker-plugin[onnx]'``) on seeded random inputs at another batch size than the export's and
requires ``|ort - torch| <= atol + rtol * |torch|`` elementwise (``defaults.ONNX_ATOL`` and
``ONNX_RTOL``: 1e-4 each; float32 exports of the CIFAR ResNets differ by ~1e-6).

Examples
--------
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))   # doctest: +SKIP
>>> export_onnx(model, "m.onnx", (3, 8, 8))                                   # doctest: +SKIP
>>> check_onnx("m.onnx", model, (3, 8, 8))                                    # doctest: +SKIP
1.2e-07
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jtucker_plugin import defaults
from jtucker_plugin.io import atomic_directory
from jtucker_plugin.multitask import Bundle

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# The export traces at this batch size; the check runs another one, so the dynamic axis is tested.
_EXPORT_BATCH, _CHECK_BATCH = 2, 5


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def export_onnx(
    model: nn.Module, path: str | Path, input_shape: Sequence[int], *, opset: int = defaults.ONNX_OPSET
) -> Path:
    """Write ``model`` (in eval mode) as an ONNX file with a dynamic batch axis.

    Parameters
    ----------
    model
        Takes a float batch ``N x C x H x W`` and returns one tensor; its training flags are kept.
    path
        The ``.onnx`` file to write; its folder is created.
    input_shape
        ``(C, H, W)``.
    opset
        The ONNX opset.

    Returns
    -------
    Path
        ``path``. The input is named ``"input"``, the output ``"logits"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(_EXPORT_BATCH, *input_shape)
    with _eval_mode(model), warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation, skips folding strided slices (the
        # option-A shortcut), and warns that index_add would be wrong for repeated indices (a
        # sparse layer's positions are distinct by construction); none changes the file's numbers.
        for message in (
            "You are using the legacy TorchScript",
            "The feature will be removed",
            "Constant folding",
            "Warning: ONNX export does not support duplicated values in 'index'",
        ):
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return path


def check_onnx(
    path: str | Path,
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    atol: float = defaults.ONNX_ATOL,
    rtol: float = defaults.ONNX_RTOL,
    seed: int = 0,
) -> float:
    """Run the ONNX file with onnxruntime and compare it with ``model``; returns the max abs diff.

    Raises
    ------
    ImportError
        If onnxruntime is not installed (the ``onnx`` extra).
    ValueError
        If an output is off by more than ``atol + rtol * |torch|``, naming the file and the diff.
    """
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "checking ONNX files needs onnxruntime: pip install 'jtucker-plugin[onnx]'"
        ) from err
    x = torch.randn(_CHECK_BATCH, *input_shape, generator=torch.Generator().manual_seed(seed))
    with _eval_mode(model), torch.inference_mode():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    if got.shape != expected.shape:
        raise ValueError(f"{path}: onnxruntime gives shape {got.shape}, PyTorch {expected.shape}")
    diff = abs(got - expected)
    excess = diff - (atol + rtol * abs(expected))
    if (excess > 0).any():
        raise ValueError(
            f"{path}: onnxruntime's outputs differ from PyTorch's by up to {diff.max():.3g} "
            f"(allowed: atol={atol} + rtol={rtol} * |output|)"
        )
    return float(diff.max())


def export_bundle_onnx(
    bundle: Bundle,
    folder: str | Path,
    *,
    check: bool = True,
    opset: int = defaults.ONNX_OPSET,
    atol: float = defaults.ONNX_ATOL,
    rtol: float = defaults.ONNX_RTOL,
) -> dict[str, dict[str, Any]]:
    """One ``<task>.onnx`` per task in ``folder``, each checked with onnxruntime when ``check``.

    The folder is written atomically: if an export or a check fails, an existing ``folder`` is
    left as it was.

    Returns
    -------
    dict
        Task -> ``{"path", "bytes", "max_abs_diff"}`` (``max_abs_diff`` is ``None`` unchecked).
    """
    folder = Path(folder)
    unsafe = [t for t in bundle.tasks if not t or "/" in t or "\\" in t or t.startswith(".")]
    if unsafe:
        raise ValueError(f"export_bundle_onnx: task names {unsafe} cannot be file names (<task>.onnx)")
    out: dict[str, dict[str, Any]] = {}
    with atomic_directory(folder) as tmp:
        for task, model in bundle.models.items():
            shape = bundle.info[task].input_shape
            file = export_onnx(model, tmp / f"{task}.onnx", shape, opset=opset)
            diff = check_onnx(file, model, shape, atol=atol, rtol=rtol) if check else None
            out[task] = {"path": str(folder / file.name), "bytes": file.stat().st_size, "max_abs_diff": diff}
    return out
