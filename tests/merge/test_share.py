"""Hard sharing: one layer object for all tasks, its parameter count, save/load, stage, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from conftest import tiny_recipe_data
from torch import nn

import jtucker_plugin.stages.share  # noqa: F401  (registers the stage until registry.py lists it)
from jtucker_plugin.decompose.apply import decompose_bundle
from jtucker_plugin.decompose.layers import TuckerConv2d
from jtucker_plugin.decompose.ranks import RatioConfig, select_ranks
from jtucker_plugin.merge import hard_share
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.recipe.schema import ConfigError, from_dict
from jtucker_plugin.stages.share import ShareConfig

TASKS = ("a", "b", "c")


def _bundle(in_channels: dict[str, int] | None = None) -> Bundle:
    # Different seeds and class counts: every layer starts different in every task.
    models, info = {}, {}
    for i, t in enumerate(TASKS):
        ch = (in_channels or {}).get(t, 3)
        models[t] = create_model("resnet8", 3 + i, in_channels=ch, width=0.5, seed=i)
        info[t] = TaskInfo(
            "resnet8",
            3 + i,
            in_channels=ch,
            width=0.5,
            input_shape=(ch, 16, 16),
            dense_parameters=sum(p.numel() for p in models[t].parameters()),
        )
    return Bundle(models, info)


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _outputs(bundle: Bundle, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for t, m in bundle.models.items():
        m.eval()
        with torch.no_grad():
            out[t] = m(x)
    return out


def test_convs_become_one_object_batch_norm_and_heads_stay_per_task():
    bundle = _bundle()
    report = hard_share(bundle)
    a, b, c = (bundle.models[t] for t in TASKS)
    convs = _convs(a)
    assert len(convs) == 7 and set(report["layers"]) == set(convs)
    for name in convs:
        assert a.get_submodule(name) is b.get_submodule(name) is c.get_submodule(name)
    for name, m in a.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m is not b.get_submodule(name) and m is not c.get_submodule(name)
            assert report["kept"][name] == "normalisation layer (per task)"
    assert a.linear is not b.linear and report["kept"]["linear"] == "classifier head (per task)"
    assert [r["layer"] for r in bundle.history if r["stage"] == "share"] == list(convs)


def test_unique_parameters_drop_by_the_shared_copies():
    bundle = _bundle()
    conv_weights = sum(m.weight.numel() for m in _convs(bundle.models["a"]).values())
    before = bundle.unique_parameters()
    report = hard_share(bundle)
    # Three copies of every conv become one: 2 x the conv weights fewer (resnet8 convs: no bias).
    assert before - bundle.unique_parameters() == 2 * conv_weights
    assert report["unique_parameters"] == {"before": before, "after": bundle.unique_parameters()}
    assert bundle.compression_ratio() == pytest.approx(
        bundle.dense_parameters() / (before - 2 * conv_weights)
    )


def test_mean_init_is_the_mean_and_task_init_keeps_that_task_exact():
    bundle = _bundle()
    weights = {t: bundle.models[t].layer1[0].conv2.weight.detach().clone() for t in TASKS}
    twin = copy.deepcopy(bundle)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = _outputs(twin, x)

    report = hard_share(bundle, init="mean")
    mean = torch.stack(list(weights.values())).mean(0)
    torch.testing.assert_close(bundle.models["c"].layer1[0].conv2.weight.detach(), mean)
    distance = report["layers"]["layer1.0.conv2"]["relative_distance"]
    for t in TASKS:
        expected = float((weights[t] - mean).norm() / weights[t].norm())
        assert distance[t] == pytest.approx(expected, abs=1e-6)

    hard_share(twin, init="task:b")
    after = _outputs(twin, x)
    assert torch.equal(after["b"], before["b"])  # b's own weights: the same function
    assert not torch.allclose(after["a"], before["a"], atol=1e-3)


def test_keep_per_task_patterns_keep_layers_and_what_they_contain():
    bundle = _bundle()
    a, b = bundle.models["a"], bundle.models["b"]
    report = hard_share(bundle, keep_per_task=["conv1", "layer2"])
    assert a.conv1 is not b.conv1
    assert a.layer2[0].conv1 is not b.layer2[0].conv1 and a.layer2[0].conv2 is not b.layer2[0].conv2
    assert a.layer1[0].conv1 is b.layer1[0].conv1 and a.layer3[0].conv2 is b.layer3[0].conv2
    assert report["kept"]["layer2.0.conv2"] == "kept per task by keep_per_task pattern 'layer2'"
    assert set(report["layers"]) == {
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer3.0.conv1",
        "layer3.0.conv2",
    }


def test_layers_whose_shapes_differ_stay_per_task_and_a_second_pass_shares_nothing():
    bundle = _bundle(in_channels={"c": 1})  # a grey task: its first conv has another shape
    report = hard_share(bundle)
    assert report["kept"]["conv1"] == "weights differ in type or shape across tasks"
    assert bundle.models["a"].conv1 is not bundle.models["b"].conv1
    assert bundle.models["a"].layer1[0].conv1 is bundle.models["c"].layer1[0].conv1
    unique = bundle.unique_parameters()
    again = hard_share(bundle)
    assert again["layers"] == {} and bundle.unique_parameters() == unique
    assert again["kept"]["layer1.0.conv1"] == "already one module shared by all tasks"


def test_save_load_round_trip_keeps_the_sharing(tmp_path):
    bundle = _bundle()
    hard_share(bundle, keep_per_task=["layer3.0.conv2"])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = _outputs(bundle, x)
    loaded = Bundle.load(bundle.save(tmp_path / "shared"))
    a, b, c = (loaded.models[t] for t in TASKS)
    assert a.layer2[0].conv1 is b.layer2[0].conv1 is c.layer2[0].conv1
    assert a.layer3[0].conv2 is not b.layer3[0].conv2 and a.bn1 is not b.bn1
    assert loaded.unique_parameters() == bundle.unique_parameters()
    got = _outputs(loaded, x)
    for t in TASKS:
        assert torch.equal(got[t], expected[t])
    # The shared weights are written once.
    manifest = json.loads((tmp_path / "shared" / "manifest.json").read_text())
    keys = {manifest["tasks"][t]["tensors"]["layer2.0.conv1.weight"] for t in TASKS}
    assert len(keys) == 1 and next(iter(keys)).startswith("shared/")


def test_on_a_jtucker_bundle_the_cores_become_shared_and_survive_save_load(tmp_path):
    bundle = _bundle()
    ratio = RatioConfig(ratio=0.5)
    decompose_bundle(bundle, lambda infos, _: select_ranks(ratio, infos), joint=True, include=["layer*"])
    a, b = bundle.models["a"], bundle.models["b"]
    # Per task before sharing: each Tucker layer's core, and the convs left dense.
    per_task = sum(
        m.core.weight.numel() if isinstance(m, TuckerConv2d) else m.weight.numel()
        for n, m in a.named_modules()
        if isinstance(m, TuckerConv2d) or (isinstance(m, nn.Conv2d) and "." not in n)
    )
    before = bundle.unique_parameters()
    report = hard_share(bundle)
    assert isinstance(a.layer1[0].conv1, TuckerConv2d)
    assert a.layer1[0].conv1.core is b.layer1[0].conv1.core
    assert a.layer1[0].conv1.in_proj is b.layer1[0].conv1.in_proj  # shared before, still
    assert report["kept"]["layer1.0.conv1.in_proj"] == "already one module shared by all tasks"
    assert before - bundle.unique_parameters() == 2 * per_task
    loaded = Bundle.load(bundle.save(tmp_path / "jt"))
    assert loaded.models["a"].layer3[0].conv2.core is loaded.models["c"].layer3[0].conv2.core
    assert loaded.unique_parameters() == bundle.unique_parameters()


def test_stage_in_a_recipe_then_joint_finetune_and_export(tmp_path):
    recipe = tiny_recipe_data(
        tmp_path,
        [
            {"share": {"init": "task:a", "keep_per_task": ["conv1"]}},
            {"finetune": {"epochs": 1, "joint": True, "batch_size": 16}},
            {"export": {}},
        ],
        tasks={"a": ["0", "1"], "b": ["2", "3", "4"]},
        train_per_class=20,
        seed=0,
        name="share",
    )
    path = tmp_path / "share.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    report = run_recipe(load_recipe(path), quiet=True)
    loaded = Bundle.load(tmp_path / "out" / "bundle")
    a, b = loaded.models["a"], loaded.models["b"]
    assert a.layer1[0].conv1 is b.layer1[0].conv1 and a.conv1 is not b.conv1
    assert report.bundle["unique_parameters"] == loaded.unique_parameters()
    assert loaded.compression_ratio() > 1.5


def test_bad_input_names_the_field():
    bundle = _bundle()
    with pytest.raises(ValueError, match=r"keep_per_task: pattern 'layer9\*' matches no layer"):
        hard_share(bundle, keep_per_task=["conv1", "layer9*"])
    with pytest.raises(TypeError, match=r"keep_per_task: expected a list .*write \['conv1'\]"):
        hard_share(bundle, keep_per_task="conv1")
    with pytest.raises(ValueError, match=r"init: expected 'mean' or 'task:<name>', got 'median'"):
        hard_share(bundle, init="median")
    with pytest.raises(ValueError, match=r"init: unknown task 'd'.*tasks are a, b, c"):
        hard_share(bundle, init="task:d")
    # Nothing was changed by the refused calls.
    assert bundle.models["a"].layer1[0].conv1 is not bundle.models["b"].layer1[0].conv1
    assert bundle.history == []
    with pytest.raises(ConfigError, match=r"init: expected 'mean' or 'task:<name>'"):
        from_dict(ShareConfig, {"init": "task:"}, "stages[0].share")
    with pytest.raises(ConfigError, match=r"keep_per_tsk"):
        from_dict(ShareConfig, {"keep_per_tsk": ["conv1"]}, "stages[0].share")
