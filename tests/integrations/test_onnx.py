"""ONNX export of task models: onnxruntime matches PyTorch, shared factors included, bad input."""

from __future__ import annotations

import pytest
import torch

from jtucker_plugin import defaults
from jtucker_plugin.decompose.apply import decompose_bundle
from jtucker_plugin.decompose.layers import TuckerConv2d
from jtucker_plugin.decompose.ranks import RatioConfig, select_ranks
from jtucker_plugin.integrations.onnx import check_onnx, export_bundle_onnx, export_onnx
from jtucker_plugin.merge.composed import HybridLayer, SparseLayer
from jtucker_plugin.merge.hybrid import hybridize
from jtucker_plugin.merge.share import hard_share
from jtucker_plugin.merge.sparse import sparsify
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo

pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")

SHAPE = (1, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet8_bundle() -> Bundle:
    models = {t: create_model("resnet8", 3 + i, in_channels=1, width=0.5, seed=i) for i, t in enumerate("ab")}
    info = {
        t: TaskInfo(arch="resnet8", num_classes=3 + i, in_channels=1, width=0.5, input_shape=SHAPE)
        for i, t in enumerate("ab")
    }
    return Bundle(models, info)


def _jtucker_bundle() -> Bundle:
    bundle = _resnet8_bundle()
    decompose_bundle(bundle, lambda infos, _: select_ranks(RatioConfig(ratio=0.5), infos), joint=True)
    return bundle


def test_each_task_file_matches_pytorch_within_the_stated_tolerance(tmp_path):
    bundle = _jtucker_bundle()
    assert bundle.shared_modules(), "the fixture must have shared factor modules"
    bundle.models["a"].train()  # export must not depend on (or change) the training flags
    bundle.models["b"].eval()

    result = export_bundle_onnx(bundle, tmp_path / "onnx")

    assert sorted(result) == ["a", "b"]
    for task, row in result.items():
        assert (tmp_path / "onnx" / f"{task}.onnx").stat().st_size == row["bytes"] > 0
        assert row["max_abs_diff"] <= defaults.ONNX_ATOL
    assert bundle.models["a"].training and not bundle.models["b"].training
    # The outputs have each task's own number of classes.
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(tmp_path / "onnx" / "b.onnx"), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(None, {"input": torch.zeros(7, *SHAPE).numpy()})
    assert logits.shape == (7, 4)


@pytest.mark.parametrize("materialize", [True, False])
def test_hybrid_and_sparse_layers_export_with_every_position_form(tmp_path, materialize):
    """Positions stored as a bitmask (half-kept weights), gaps (deltas) or int16 (the sparsest) export."""
    bundle = _resnet8_bundle()
    hard_share(bundle, keep_per_task=["conv1", "layer1"])
    sparsify(bundle, density=0.5, keep_dense=["conv1", "layer1"], materialize=materialize)
    hybridize(bundle, density=0.02, materialize=materialize)  # what is left per task: layer1
    hybrids = [m for m in bundle.models["a"].modules() if isinstance(m, HybridLayer)]
    largest = max(hybrids, key=lambda m: m.numel)
    largest.set_delta(torch.tensor([largest.numel - 1]), torch.ones(1))  # 2 bytes as int16, 3 as gaps
    forms = {m.indices.dtype for m in bundle.models["a"].modules() if isinstance(m, SparseLayer)}
    forms |= {m.delta_indices.dtype for m in hybrids}
    assert forms == {torch.uint8, torch.int8, torch.int16}

    result = export_bundle_onnx(bundle, tmp_path / "onnx")

    assert all(row["max_abs_diff"] <= defaults.ONNX_ATOL for row in result.values())


def test_hybrid_layers_with_a_sparse_shared_weight_export(tmp_path):
    bundle = _resnet8_bundle()
    hybridize(bundle, density=0.02, shared_density=0.3, keep_per_task=["conv1"])
    assert any(m.shared_nnz for m in bundle.models["a"].modules() if isinstance(m, HybridLayer))

    result = export_bundle_onnx(bundle, tmp_path / "onnx")

    assert all(row["max_abs_diff"] <= defaults.ONNX_ATOL for row in result.values())


def test_a_model_that_changed_after_export_fails_the_check(tmp_path):
    model = create_model("resnet8", 3, in_channels=1, width=0.5, seed=0).eval()
    path = export_onnx(model, tmp_path / "m.onnx", SHAPE)
    assert check_onnx(path, model, SHAPE) <= defaults.ONNX_ATOL

    layer = model.get_submodule("layer1.0.conv1")
    with torch.no_grad():
        layer.weight.mul_(1.5)
    with pytest.raises(ValueError, match=r"m\.onnx: onnxruntime's outputs differ from PyTorch's by up to"):
        check_onnx(path, model, SHAPE)


def test_failed_check_leaves_the_existing_folder_untouched(tmp_path):
    bundle = _jtucker_bundle()
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "keep.txt").write_text("previous export")
    assert isinstance(bundle.models["a"].get_submodule("layer1.0.conv1"), TuckerConv2d)

    with pytest.raises(ValueError, match="differ from PyTorch"):
        export_bundle_onnx(bundle, folder, atol=0.0, rtol=0.0)  # no tolerance: float rounding fails it

    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_task_names_that_are_not_file_names_are_refused(tmp_path):
    model = create_model("resnet8", 3, in_channels=1, width=0.5, seed=0)
    bundle = Bundle(
        {"a/b": model}, {"a/b": TaskInfo(arch="resnet8", num_classes=3, in_channels=1, input_shape=SHAPE)}
    )
    with pytest.raises(ValueError, match=r"task names \['a/b'\] cannot be file names"):
        export_bundle_onnx(bundle, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
