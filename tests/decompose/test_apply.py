"""Applying J-Tucker and per-task Tucker to a bundle."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import close_tasks_bundle

from jtucker_plugin.decompose.apply import decompose_bundle, find_layers
from jtucker_plugin.decompose.layers import TuckerConv2d
from jtucker_plugin.decompose.ranks import rank_config_from_dict, select_ranks
from jtucker_plugin.multitask import Bundle


def _select(config):
    cfg = rank_config_from_dict(config)
    return lambda infos, evaluate: select_ranks(cfg, infos, evaluate=evaluate)


def test_find_layers_keeps_heads_and_small_layers_dense():
    bundle = close_tasks_bundle()
    chosen, skipped = find_layers(bundle.models, min_params=500)
    assert "linear" in skipped and "head" in skipped["linear"]
    assert "conv1" in skipped and "too small" in skipped["conv1"]  # 3 -> 8 channels, 216 weights
    assert "layer1.0.conv1" in chosen


def test_joint_shares_factors_and_output_matches_dense_reconstruction(tmp_path):
    bundle = close_tasks_bundle()
    reference = copy.deepcopy(bundle)
    result = decompose_bundle(
        bundle, _select({"strategy": "ratio", "ratio": 0.5}), joint=True, min_params=100
    )
    assert result["layers"] and bundle.compression_ratio() > 1.0
    layers = [m.get_submodule("layer2.0.conv1") for m in bundle.models.values()]
    assert all(isinstance(layer, TuckerConv2d) for layer in layers)
    assert layers[0].in_proj is layers[1].in_proj is layers[2].in_proj
    assert layers[0].out_proj is layers[2].out_proj and layers[0].core is not layers[1].core
    x = torch.randn(2, 3, 16, 16)
    for task, model in bundle.models.items():
        dense = copy.deepcopy(model).eval()
        for name, module in list(dense.named_modules()):
            if isinstance(module, TuckerConv2d):
                dense.set_submodule(name, module.to_dense())
        model.eval()
        assert torch.allclose(model(x), dense(x), atol=1e-5)
        # Recorded errors are the real reconstruction errors of the stacked weights.
        i = list(bundle.models).index(task)
        w = reference.models[task].get_submodule("layer2.0.conv1").weight
        err = (dense.get_submodule("layer2.0.conv1").weight - w).norm() / w.norm()
        assert err.item() == pytest.approx(
            result["layers"]["layer2.0.conv1"]["errors"][i], rel=1e-3, abs=1e-6
        )
    saved = Bundle.load(bundle.save(tmp_path / "b"))
    loaded = [m.get_submodule("layer2.0.conv1") for m in saved.models.values()]
    assert loaded[0].in_proj is loaded[1].in_proj
    assert saved.unique_parameters() == bundle.unique_parameters()


def test_joint_stores_factors_once_individual_per_task():
    joint, individual = close_tasks_bundle(), close_tasks_bundle()
    select = _select({"strategy": "fixed", "rank": [4, 4], "clip": True})
    decompose_bundle(joint, select, joint=True, min_params=100)
    decompose_bundle(individual, select, joint=False, min_params=100)
    assert joint.unique_parameters() < individual.unique_parameters()
    per_task = [m.get_submodule("layer1.0.conv2") for m in individual.models.values()]
    assert per_task[0].in_proj is not per_task[1].in_proj


def test_budget_is_met_on_the_decomposed_layers():
    bundle = close_tasks_bundle()
    chosen, _ = find_layers(bundle.models, min_params=100)
    dense = sum(bundle.models["t0"].get_submodule(n).weight.numel() for n in chosen) * 3
    decompose_bundle(
        bundle,
        _select({"strategy": "budget", "budget": {"params": 0.4}}),
        joint=True,
        min_params=100,
    )
    kept = 0
    seen = set()
    for model in bundle.models.values():
        for n in chosen:
            for p in model.get_submodule(n).parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    kept += p.numel()
    assert kept <= 0.4 * dense


def test_ranks_that_do_not_save_keep_the_layer_dense():
    bundle = close_tasks_bundle()
    result = decompose_bundle(
        bundle, _select({"strategy": "ratio", "ratio": 1.0}), joint=True, min_params=100
    )
    assert all("kept_dense" in row for row in result["layers"].values())
    assert not any(isinstance(m, TuckerConv2d) for m in bundle.models["t0"].modules())


def test_nothing_to_decompose_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"no layer to decompose \(layers=\[.linear.\], exclude=\[\]\); "
        r"kept dense: .*linear \(classifier head",
    ):
        decompose_bundle(
            close_tasks_bundle(), _select({"strategy": "ratio", "ratio": 0.5}), joint=True, include=["linear"]
        )
