"""Stage ``prune`` and ``prune_bundle``: every task model, shared J-Tucker factors pruned jointly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import jtucker_plugin.stages.prune  # noqa: F401  (registers the stage; the lead adds it to the built-ins)
from jtucker_plugin.cli import main
from jtucker_plugin.decompose.apply import decompose_bundle
from jtucker_plugin.decompose.layers import TuckerConv2d
from jtucker_plugin.decompose.ranks import rank_config_from_dict, select_ranks
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo
from jtucker_plugin.prune import IMPORTANCES, prune_bundle
from jtucker_plugin.prune.prune import BundleNet, _net_macs
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.recipe.schema import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _jtucker_bundle(seed: int = 0) -> Bundle:
    models = {t: create_model("resnet8", 3, width=0.5, seed=seed + i) for i, t in enumerate("ab")}
    info = {t: TaskInfo(arch="resnet8", num_classes=3, width=0.5, dense_parameters=20_000) for t in "ab"}
    bundle = Bundle(models, info)
    ranks = rank_config_from_dict({"strategy": "ratio", "ratio": 0.75})
    decompose_bundle(bundle, lambda infos, _: select_ranks(ranks, infos), joint=True, min_params=0)
    return bundle


def _calibration(tasks="ab", classes: int = 3):
    g = torch.Generator().manual_seed(0)
    return {
        t: [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, classes, (8,), generator=g))]
        for t in tasks
    }


def _tucker_layers(bundle: Bundle) -> dict[str, dict[str, TuckerConv2d]]:
    return {
        t: {n: m for n, m in model.named_modules() if isinstance(m, TuckerConv2d)}
        for t, model in bundle.models.items()
    }


def test_stage_prunes_a_two_task_bundle_with_shared_factors(tmp_path, tiny_recipe):
    stages = [
        {"train": {"epochs": 1, "batch_size": 16}},
        {"jtucker": {"ranks": {"strategy": "ratio", "ratio": 0.75}, "min_params": 0}},
        {
            "prune": {
                "importance": "naive_bayes",
                "pruning_ratio": 0.4,
                "iterative_steps": 1,
                "probes": 8,
                "calibration_batches": 1,
                "batch_size": 16,
            }
        },
        {"evaluate": {"latency": False}},
        {"export": {}},
    ]
    report = run_recipe(load_recipe(tiny_recipe(stages)), quiet=True)
    out = tmp_path / "out"
    before = Bundle.load(out / "stages" / "01-jtucker" / "bundle")
    after = Bundle.load(out / "bundle")

    # Still shared after pruning and a save/load round trip: the same groups of modules.
    assert after.shared_modules() == before.shared_modules() and after.shared_modules()
    layers_before, layers_after = _tucker_layers(before), _tucker_layers(after)
    assert layers_after["a"].keys() == layers_before["a"].keys()
    for name, layer in layers_after["a"].items():
        other = layers_after["b"][name]
        assert layer.in_proj is other.in_proj and layer.out_proj is other.out_proj
        assert layer.ranks == other.ranks  # the cores of both tasks fit the shared factors
        r1, r2 = layers_before["a"][name].ranks
        assert layer.ranks == (int(r1 * 0.6), int(r2 * 0.6))
    x = torch.randn(4, 1, 8, 8)
    for model in after.models.values():
        assert model.eval()(x).shape == (4, 3)
    assert after.unique_parameters() < before.unique_parameters()

    records = [r for r in after.history if r["stage"] == "prune"]
    assert records and all(r["tasks"] == ["a", "b"] and r["channels"][1] == len(r["kept"]) for r in records)
    metrics = json.loads((out / "stages" / "02-prune" / "result.json").read_text())["metrics"]
    assert metrics["prune"]["macs_kept"] < 0.8 and metrics["prune"]["layers"] == len(records)
    for task in ("a", "b"):
        assert 0 <= report.tasks[task]["accuracy"] <= 1


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_every_importance_prunes_jointly_and_round_trips(importance, tmp_path):
    bundle = _jtucker_bundle()
    shared = bundle.shared_modules()
    summary = prune_bundle(
        bundle, importance, calibration=_calibration(), pruning_ratio=0.5, probes=8, iterative_steps=2
    )
    assert bundle.shared_modules() == shared
    assert summary["macs_after"] < summary["macs_before"] and summary["layers"] > 0
    x = torch.randn(2, 3, 32, 32)
    loaded = Bundle.load(bundle.save(tmp_path / "b"))
    for task in bundle.tasks:
        expected = bundle.models[task].eval()(x)
        assert torch.allclose(loaded.models[task].eval()(x), expected, atol=1e-5)
    assert not any(p.grad is not None for m in bundle.models.values() for p in m.parameters())


def test_joint_pruning_keeps_the_same_channels_of_a_shared_factor():
    bundle = _jtucker_bundle()
    prune_bundle(
        bundle, "naive_bayes", calibration=_calibration(), pruning_ratio=0.5, probes=8, iterative_steps=1
    )
    by_layer = {r["layer"]: r for r in bundle.history if r["stage"] == "prune"}
    # A core's output channels are the shared out_proj's inputs: one decision for both tasks.
    core = by_layer["layer2.0.conv1.core"]
    assert core["tasks"] == ["a", "b"] and core["channels"] == [12, 6] and len(core["kept"]) == 6
    assert bundle.models["b"].layer2[0].conv1.core.out_channels == 6


def test_global_pruning_ranks_channels_across_layers():
    channels = {}
    for global_pruning in (False, True):
        bundle = _jtucker_bundle()
        prune_bundle(
            bundle,
            "naive_bayes",
            calibration=_calibration(),
            pruning_ratio=0.4,
            global_pruning=global_pruning,
            probes=8,
            iterative_steps=1,
        )
        channels[global_pruning] = {
            r["layer"]: r["channels"] for r in bundle.history if r["stage"] == "prune"
        }
    local = channels[False]
    assert all(after == int(before * 0.6) for before, after in local.values())
    # One threshold over all layers' posteriors: layers lose different shares.
    assert {n: c[1] for n, c in channels[True].items()} != {n: c[1] for n, c in local.items()}


def test_macs_target_is_met_closely():
    bundle = _jtucker_bundle()
    summary = prune_bundle(bundle, "magnitude", macs_target=0.6, iterative_steps=2)
    assert 0.5 < summary["macs_kept"] <= 0.6
    assert summary["macs_after"] == _net_macs(
        BundleNet(bundle.models).eval(), (torch.zeros(1, 3, 32, 32),) * 2
    )


def test_ignored_layers_are_left_alone():
    bundle = _jtucker_bundle()
    kept = {
        n: tuple(m.weight.shape)
        for n, m in bundle.models["a"].named_modules()
        if n.startswith("layer1.") and hasattr(m, "weight") and m.weight is not None
    }
    prune_bundle(bundle, "magnitude", pruning_ratio=0.5, ignored_layers=["layer1.*"], iterative_steps=1)
    assert {n: tuple(bundle.models["a"].get_submodule(n).weight.shape) for n in kept} == kept
    assert bundle.models["a"].layer2[0].conv1.core.out_channels < 12


def test_bad_arguments_say_where():
    bundle = _jtucker_bundle()
    with pytest.raises(ValueError, match=r"ignored_layers\[1\]: pattern 'layr2\.\*' matches no module"):
        prune_bundle(bundle, "magnitude", pruning_ratio=0.3, ignored_layers=["layer1.*", "layr2.*"])
    with pytest.raises(ValueError, match="give exactly one of pruning_ratio and macs_target"):
        prune_bundle(bundle, "magnitude", pruning_ratio=0.3, macs_target=0.5)
    with pytest.raises(ValueError, match="importance 'naive_bayes' needs calibration data"):
        prune_bundle(bundle, "naive_bayes", pruning_ratio=0.3)
    with pytest.raises(KeyError, match="unknown importance 'l1'; available: naive_bayes, magnitude"):
        prune_bundle(bundle, "l1", pruning_ratio=0.3)
    with pytest.raises(
        ValueError, match="macs_target: this step needs the bundle at 5.0% of its current MACs"
    ):
        prune_bundle(bundle, "magnitude", macs_target=0.05, iterative_steps=1)


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"pruning_ratio": 1.5}, "stages[0].prune.pruning_ratio", r"expected a number in \(0, 1\), got 1.5"),
        ({}, "stages[0].prune.pruning_ratio", "give exactly one of pruning_ratio and macs_target"),
        ({"macs_target": 0.5, "pruning_ratio": 0.3}, "stages[0].prune.pruning_ratio", "give exactly one"),
        ({"macs_target": 0}, "stages[0].prune.macs_target", r"share of MACs kept, in \(0, 1\), got 0"),
        (
            {"pruning_ratio": 0.3, "importance": "taylr"},
            "stages[0].prune.importance",
            "did you mean 'taylor'",
        ),
        (
            {"pruning_ratio": 0.3, "ignored_layers": "linear"},
            "stages[0].prune.ignored_layers",
            "expected a list",
        ),
        ({"pruning_ratio": 0.3, "probes": 2}, "stages[0].prune.probes", "expected an integer >= 4"),
        ({"pruning_ratio": 0.3, "round_to": 0}, "stages[0].prune.round_to", "expected an integer >= 1"),
        ({"pruning_ratio": 0.3, "ratio": 0.3}, "stages[0].prune.ratio", "unknown key 'ratio'"),
    ],
)
def test_bad_config_values_name_the_field(tiny_recipe, fields, where, message):
    path = tiny_recipe([{"prune": fields}])
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path)
    assert err.value.path == where


def test_prune_resnet56_recipe_validates(shared_data, capsys, monkeypatch):
    monkeypatch.setenv("JTUCKER_DATA", os.fspath(shared_data))
    assert main(["validate", str(REPO / "recipes" / "prune-resnet56.yaml")]) == 0
    assert "valid (1 task" in capsys.readouterr().out
