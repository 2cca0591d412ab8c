"""Stage ``quantize`` end to end on the embedded digits data: train, J-Tucker, int8 static, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import jtucker_plugin.stages.quantize  # noqa: F401  (registers the stage until the registry lists it)
from jtucker_plugin.data import ArrayDataset, DataSpec, TaskData, load_task_data
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.recipe.schema import ConfigError
from jtucker_plugin.recipe.stage import StageContext
from jtucker_plugin.stages.quantize import QuantizeConfig, quantize

QUANTIZE = {"scheme": "int8_static", "calibration_batches": 2, "batch_size": 16, "repeats": 1}


def _recipe(folder: Path, quantize_options: dict) -> Path:
    def task(classes):
        return {
            "data": {
                "dataset": "digits",
                "classes": classes,
                "image_size": 8,
                "channels": 1,
                "mean": [0.5],
                "std": [0.5],
                "augment": False,
                "train_per_class": 60,
            },
            "model": {"arch": "resnet8", "width": 0.5},
        }

    stages = [  # decomposed, then trained: float models with shared factors that know their task
        {"jtucker": {"ranks": {"strategy": "ratio", "ratio": 0.75}, "min_params": 0}},
        {"train": {"epochs": 4, "batch_size": 16, "lr": 0.05}},
        {"quantize": quantize_options},
    ]
    data = {
        "name": "tiny-int8",
        "seed": 3,
        "output": str(folder / "out"),
        "tasks": {"low": task(["0", "1", "2"]), "high": task(["7", "8", "9"])},
        "stages": stages,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("quantize")
    report = run_recipe(load_recipe(_recipe(folder, QUANTIZE)), quiet=True)
    return folder, report


def test_int8_static_keeps_accuracy_and_stores_shared_parts_once(run):
    folder, report = run
    for task in ("low", "high"):
        row = report.tasks[task]
        assert row["accuracy_float"] > 0.7, (
            "the tiny models must have learnt their task for this test to mean much"
        )
        assert abs(row["accuracy_quantized"] - row["accuracy_float"]) <= 0.05
        assert row["quantized_bytes"] < 0.6 * row["float_bytes"]
        assert row["latency_ms_b1_quantized"] > 0 and row["latency_ms_b32_float"] > 0
    summary = report.bundle
    assert summary["quantize_scheme"] == "int8_static"
    assert summary["quantized_shared_tensors"] >= 12  # 6 factorized convs x (in_proj, out_proj)
    per_task = report.tasks["low"]["quantized_bytes"] + report.tasks["high"]["quantized_bytes"]
    assert summary["quantized_bytes"] < per_task  # the shared int8 factors counted once
    assert summary["quantized_bytes"] < 0.5 * summary["float_bytes"]


def test_program_loads_and_runs_every_task(run):
    folder, report = run
    out = folder / "out" / "quantized"
    meta = json.loads((out / "quantized.json").read_text())
    assert meta["tasks"] == ["low", "high"] and meta["scheme"] == "int8_static"
    assert (out / "program.pt2").stat().st_size == report.bundle["quantized_file_bytes"]
    program = torch.export.load(out / "program.pt2").module()
    floats = Bundle.load(folder / "out" / "stages" / "02-quantize" / "bundle").models
    data = load_task_data(
        DataSpec(dataset="digits", classes=["7", "8", "9"], image_size=8, channels=1, mean=[0.5], std=[0.5]),
        seed=3,
    )
    x = data.test.normalize(data.test.images)
    with torch.no_grad():
        low, high = program(x[:3], x)  # one input per task, each its own batch size
        expected = floats["high"].eval()(x)
    assert low.shape == (3, 3) and high.shape == expected.shape
    agreement = (high.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= 0.9
    assert (high.argmax(1) == data.test.labels).float().mean().item() > 0.7


def test_the_checkpoint_after_quantize_is_the_float_bundle(run):
    folder, _ = run
    stages = folder / "out" / "stages"
    after_train = Bundle.load(stages / "01-train" / "bundle")
    after_quantize = Bundle.load(stages / "02-quantize" / "bundle")
    assert after_quantize.stored_tensors().keys() == after_train.stored_tensors().keys()
    for key, tensor in after_quantize.stored_tensors().items():
        assert torch.equal(tensor, after_train.stored_tensors()[key])
    assert after_quantize.shared_modules()  # the J-Tucker factors, still shared


def test_a_corrupt_checkpoint_is_a_clear_error_and_nothing_is_written_over(run, tmp_path):
    folder, _ = run
    copy = tmp_path / "out"
    shutil.copytree(folder / "out", copy)
    manifest_path = copy / "stages" / "01-train" / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    key = next(k for k in manifest["storage"] if k.endswith("core.weight"))
    manifest["storage"][key]["shape"][0] += 1
    manifest_path.write_text(json.dumps(manifest))
    program, result = copy / "quantized" / "program.pt2", copy / "stages" / "02-quantize" / "result.json"
    before = program.read_bytes(), result.read_bytes()

    recipe = load_recipe(_recipe(tmp_path, {**QUANTIZE, "calibration_batches": 1}))  # reruns quantize only
    with pytest.raises(ValueError, match="manifest and tensors disagree on"):
        run_recipe(recipe, output=copy, quiet=True)
    assert (program.read_bytes(), result.read_bytes()) == before


def test_unknown_scheme_or_toolkit_is_reported_at_its_field(tmp_path):
    path = _recipe(tmp_path, {"scheme": "int8_statc"})
    with pytest.raises(
        ConfigError,
        match=r"stages\[2\]\.quantize\.scheme: expected one of 'int8_static', 'int8_dynamic', "
        r"'weight_only_rtn', got 'int8_statc'; did you mean 'int8_static'\?",
    ):
        load_recipe(path)
    path = _recipe(tmp_path, {"toolkit": "openvino"})
    with pytest.raises(ConfigError, match=r"toolkit: expected one of 'neural_compressor', got 'openvino'"):
        load_recipe(path)
    # Built in Python rather than from a recipe: the same checks.
    with pytest.raises(ValueError, match=r"scheme: 'fp8' is not a scheme Intel Neural Compressor offers"):
        QuantizeConfig(scheme="fp8")
    with pytest.raises(ValueError, match="bits: INC's RTN takes 1 to 8 bits, got 16"):
        QuantizeConfig(scheme="weight_only_rtn", bits=16)


def _digits_bundle() -> Bundle:
    model = create_model("resnet8", 3, in_channels=1, width=0.5, seed=0)
    return Bundle(
        {"t": model}, {"t": TaskInfo(arch="resnet8", num_classes=3, in_channels=1, input_shape=(1, 8, 8))}
    )


def _context(tmp_path, data: TaskData) -> StageContext:
    return StageContext(
        seed=0,
        index=0,
        folder=tmp_path / "files",
        output=tmp_path / "out",
        load_data=lambda task: data,
        quiet=True,
    )


def test_missing_calibration_data_is_a_clear_error_and_nothing_is_written(tmp_path):
    empty = ArrayDataset(
        torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), (0.5,), (0.5,)
    )
    test = ArrayDataset(
        torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), (0.5,), (0.5,)
    )
    data = TaskData(train=empty, val=None, test=test, class_names=["a", "b", "c"])

    with pytest.raises(ValueError, match="task 't' has no training images to calibrate on"):
        quantize(_digits_bundle(), QuantizeConfig(), _context(tmp_path, data))
    assert not (tmp_path / "out").exists()


def test_weight_only_rtn_through_the_stage(tmp_path):
    data = load_task_data(
        DataSpec(
            dataset="digits",
            classes=["0", "1", "2"],
            image_size=8,
            channels=1,
            mean=[0.5],
            std=[0.5],
            train_per_class=10,
        ),
        seed=0,
    )
    bundle = _digits_bundle()
    model = bundle.models["t"]

    result = quantize(
        bundle, QuantizeConfig(scheme="weight_only_rtn", latency=False, path=None), _context(tmp_path, data)
    )

    row = result.metrics["tasks"]["t"]
    assert result.bundle is bundle and type(model.linear).__name__ == "Linear"
    # Only the 32 x 3 head is an nn.Linear, the one layer type INC's RTN takes; its packed
    # weights, scales and zero points outweigh 96 floats: nothing is gained on this model.
    assert row["quantized_bytes"] != row["float_bytes"]
    assert abs(row["accuracy_quantized"] - row["accuracy_float"]) <= 0.05
    assert not (tmp_path / "out").exists()
