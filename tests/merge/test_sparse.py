"""Unstructured sparsity: SparseLayer, sparsify, and their composition with J-Tucker, training, save/load,
prune and int8 (merge.sparse, stages/sparsify.py)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import close_tasks_bundle
from test_composition import SHAPE, X, _outputs, _prune_like
from test_hybrid import _data

from jtucker_plugin.decompose.apply import decompose_bundle
from jtucker_plugin.decompose.ranks import RatioConfig, select_ranks
from jtucker_plugin.integrations import inc_quantize
from jtucker_plugin.merge.composed import SparseLayer
from jtucker_plugin.merge.share import hard_share
from jtucker_plugin.merge.sparse import sparsify
from jtucker_plugin.metrics import state_bytes
from jtucker_plugin.multitask import TENSORS, Bundle
from jtucker_plugin.prune.prune import prune_bundle
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.recipe.schema import ConfigError
from jtucker_plugin.train import FitConfig, fit


def _sparse_layers(model: torch.nn.Module) -> dict[str, SparseLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLayer)}


def _shared_sparse_bundle(density: float = 0.3) -> Bundle:
    bundle = close_tasks_bundle(3)
    hard_share(bundle, keep_per_task=["conv1"])
    sparsify(bundle, density=density, keep_dense=["conv1"])
    for model in bundle.models.values():
        model.eval()
    return bundle


def test_a_sparse_layer_computes_with_its_kept_entries_and_zeros_elsewhere():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=True)
    positions = torch.randperm(conv.weight.numel(), generator=torch.Generator().manual_seed(0))[:50]
    layer = SparseLayer.of(conv, positions)
    mask = torch.zeros(conv.weight.numel()).index_fill(0, positions, 1.0).view_as(conv.weight)
    x = torch.randn(2, 4, 5, 5)
    assert layer.nnz == 50 and torch.equal(layer.positions(), positions.sort().values)
    assert torch.equal(layer.weight, conv.weight.detach() * mask)
    torch.testing.assert_close(layer(x), F.conv2d(x, conv.weight * mask, conv.bias, padding=1))
    with pytest.raises(ValueError, match="set_entries: positions must not repeat"):
        layer.set_entries(torch.tensor([1, 1]), torch.ones(2))


def test_sparsify_keeps_the_largest_entries_of_each_layer_or_over_all_layers():
    for target in ({"density": 0.25}, {"budget": 3000}):
        bundle = close_tasks_bundle(2)
        originals = copy.deepcopy(bundle.models)
        report = sparsify(bundle, **target)
        kept, dropped = [], []
        for task, model in bundle.models.items():
            for name, layer in _sparse_layers(model).items():
                weight = originals[task].get_submodule(name).weight.detach().abs().reshape(-1)
                mask = torch.zeros(weight.numel(), dtype=torch.bool)
                mask[layer.positions()] = True
                assert torch.equal(layer.weight.detach().abs().reshape(-1), weight * mask)
                if "density" in target:
                    assert layer.nnz == math.floor(0.25 * weight.numel() + 0.5)
                    assert weight[mask].min() >= weight[~mask].max()
                kept.append(weight[mask])
                dropped.append(weight[~mask])
        assert report["kept"] == {"linear": "classifier head"}
        if "budget" in target:  # one threshold over all layers and tasks
            assert report["nonzeros"] == 3000 == sum(k.numel() for k in kept)
            assert torch.cat(kept).min() >= torch.cat(dropped).max()


def test_density_one_keeps_every_model_exactly():
    bundle = close_tasks_bundle(2)
    expected = _outputs(bundle.models)
    sparsify(bundle, density=1.0)
    got = _outputs(bundle.models)
    assert all(torch.equal(got[t], expected[t]) for t in bundle.tasks)


def test_a_shared_layer_stays_one_object_counted_once():
    bundle = close_tasks_bundle(3)
    hard_share(bundle, keep_per_task=["conv1"])
    before = bundle.unique_parameters()
    report = sparsify(bundle, density=0.3, keep_dense=["conv1"])
    groups = {name: [m.get_submodule(name) for m in bundle.models.values()] for name in report["layers"]}
    assert groups and all(g[0] is g[1] is g[2] for g in groups.values())
    cut = sum(g[0].numel - g[0].nnz for g in groups.values())
    assert bundle.unique_parameters() == before - cut == report["unique_parameters"]["after"]
    assert report["nonzeros"] == sum(g[0].nnz for g in groups.values())
    assert "kept dense by keep_dense pattern 'conv1'" in report["kept"].values()


def test_training_moves_the_kept_values_and_the_cut_entries_stay_zero():
    bundle = _shared_sparse_bundle()
    data = {t: _data(i) for i, t in enumerate(bundle.tasks)}
    before = {
        n: (m.positions(), m.values.detach().clone()) for n, m in _sparse_layers(bundle.models["t0"]).items()
    }
    fit(bundle.models, data, FitConfig(epochs=1, batch_size=16, lr=0.05, joint=True), seed=0)
    for name, layer in _sparse_layers(bundle.models["t0"]).items():
        positions, values = before[name]
        assert torch.equal(layer.positions(), positions) and not torch.equal(layer.values.detach(), values)
        weight = layer.weight.detach().reshape(-1)
        assert int(weight.count_nonzero()) <= layer.nnz
        assert weight.index_fill(0, positions, 0.0).abs().max() == 0


def test_save_load_is_bit_exact_and_the_bytes_are_values_plus_positions(tmp_path):
    bundle = _shared_sparse_bundle()
    path = bundle.save(tmp_path / "b")
    assert state_bytes(bundle.stored_tensors()) == (path / TENSORS).stat().st_size
    layers = _sparse_layers(bundle.models["t0"])
    stored = bundle.stored_tensors()
    positions = [v for k, v in stored.items() if k.endswith(".indices")]
    # one tensor per shared layer: at density 0.3 one bit an entry (2 bytes a position is more
    # than twice that)
    assert all(p.dtype == torch.uint8 for p in positions)
    assert sorted(p.numel() for p in positions) == sorted(math.ceil(m.numel / 8) for m in layers.values())
    assert sum(v.numel() for k, v in stored.items() if k.endswith(".values")) == sum(
        m.nnz for m in layers.values()
    )
    loaded = Bundle.load(path)
    assert loaded.unique_parameters() == bundle.unique_parameters()
    for name, layer in layers.items():
        copies = [m.get_submodule(name) for m in loaded.models.values()]
        assert copies[0] is copies[1] is copies[2]
        assert torch.equal(copies[0].indices, layer.indices) and torch.equal(copies[0].values, layer.values)
    expected, got = _outputs(bundle.models), _outputs(loaded.models)
    assert all(torch.equal(got[t], expected[t]) for t in bundle.tasks)


def test_bad_targets_and_patterns_name_the_field():
    bundle = close_tasks_bundle(2)
    for target, message in (
        ({"density": 1.5}, "density: expected a number in"),
        ({"density": -0.1}, "density: expected a number in"),
        ({"density": 0.5, "budget": 10}, "density: give exactly one target"),
        ({}, "density: give exactly one target"),
        ({"budget": -1}, "budget: expected an integer >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            sparsify(bundle, **target)
    with pytest.raises(ValueError, match="keep_dense: pattern 'layer9' matches no layer"):
        sparsify(bundle, density=0.5, keep_dense=["layer9"])
    with pytest.raises(
        TypeError, match=r"keep_dense: expected a list of fnmatch patterns.*write \['conv1'\]"
    ):
        sparsify(bundle, density=0.5, keep_dense="conv1")
    nothing_left = r"sparsify: no layer to sparsify.*kept dense by keep_dense pattern 'layer\*'"
    with pytest.raises(ValueError, match=nothing_left):
        sparsify(bundle, density=0.5, keep_dense=["conv1", "layer*"])
    assert not any(_sparse_layers(m) for m in bundle.models.values())  # nothing changed


def test_prune_after_sparsify_equals_pruning_the_dense_models_and_keeps_the_cut():
    bundle = _shared_sparse_bundle()
    dense, masks = {}, {}
    for task, model in bundle.models.items():
        dense[task], masks[task] = copy.deepcopy(model), copy.deepcopy(model)
        for name, layer in _sparse_layers(model).items():
            plain = layer.to_dense()
            dense[task].set_submodule(name, plain)
            mask = copy.deepcopy(plain)
            with torch.no_grad():
                mask.weight.copy_(
                    torch.zeros(layer.numel).index_fill(0, layer.positions(), 1.0).view_as(plain.weight)
                )
            masks[task].set_submodule(name, mask)

    result = prune_bundle(bundle, "magnitude", pruning_ratio=0.5)

    records = [r for r in bundle.history if r["stage"] == "prune"]
    assert records and all(r["channels"][1] < r["channels"][0] for r in records)
    got = _outputs(bundle.models)
    for task in bundle.tasks:
        _prune_like(dense[task], records)
        torch.testing.assert_close(got[task], _outputs({task: dense[task]})[task], atol=1e-5, rtol=1e-4)
        _prune_like(masks[task], records)
        for name, layer in _sparse_layers(bundle.models[task]).items():
            mask = masks[task].get_submodule(name).weight.detach()
            assert layer.nnz == int(mask.count_nonzero()) and layer.weight_shape == tuple(mask.shape)
    for name in _sparse_layers(bundle.models["t0"]):
        copies = [m.get_submodule(name) for m in bundle.models.values()]
        assert copies[0] is copies[1] is copies[2]
    assert result["parameters_after"] == bundle.unique_parameters() < result["parameters_before"]


def test_int8_stores_the_sparse_weights_packed_and_computes_exactly_as_unpacked(monkeypatch, tmp_path):
    bundle = _shared_sparse_bundle(density=0.3)
    shapes = {t: SHAPE for t in bundle.tasks}
    calibration = {t: [X] for t in bundle.tasks}

    def int8_bytes(result) -> int:
        return sum(v.numel() * v.element_size() for v in result.stored_tensors().values())

    packed = inc_quantize.quantize_tasks(bundle.models, "int8_static", shapes, calibration=calibration)
    monkeypatch.setattr(inc_quantize, "PACK_SAVING", 1.0)  # nothing saves all its bytes: no packing
    plain = inc_quantize.quantize_tasks(bundle.models, "int8_static", shapes, calibration=calibration)

    layers = _sparse_layers(bundle.models["t0"]).values()
    codes = [v for k, v in packed.stored_tensors().items() if k.endswith("_codes")]
    assert len(codes) == len(layers) and not any(k.endswith("_codes") for k in plain.stored_tensors())
    # each shared layer once: its non-zero int8 codes (at most its kept entries) and positions
    assert sum(c.numel() for c in codes) <= sum(m.nnz for m in layers)
    saved = sum(m.numel for m in layers) - sum(c.numel() for c in codes)
    positions = [v for k, v in packed.stored_tensors().items() if k.endswith("_positions")]
    assert int8_bytes(plain) - int8_bytes(packed) == saved - sum(
        p.numel() * p.element_size() for p in positions
    )
    assert int8_bytes(packed) < 0.75 * int8_bytes(plain)
    expected = _outputs(bundle.models)
    for task in bundle.tasks:
        with torch.no_grad():
            assert torch.equal(packed.models[task](X), plain.models[task](X))
            assert (packed.models[task](X) - expected[task]).abs().max() < 0.1 * expected[task].abs().max()
    program = torch.export.load(packed.save(tmp_path / "int8.pt2")).module()
    with torch.no_grad():
        assert torch.equal(program(X, X, X)[1], packed.models["t1"](X))


def test_share_sparsify_finetune_prune_quantize_in_one_recipe_with_exact_counts(tiny_recipe, tmp_path):
    evaluate = {"evaluate": {"latency": False}}
    stages = [
        {"train": {"epochs": 4, "batch_size": 16, "lr": 0.05}},
        {"share": {"keep_per_task": ["conv1"]}},
        {"sparsify": {"density": 0.4, "keep_dense": ["conv1"]}},
        {"train": {"epochs": 2, "batch_size": 16, "lr": 0.02}},
        evaluate,
        {"prune": {"importance": "magnitude", "pruning_ratio": 0.3, "calibration_batches": 2}},
        evaluate,
        {"quantize": {"scheme": "int8_static", "calibration_batches": 2, "batch_size": 16, "latency": False}},
    ]
    report = run_recipe(load_recipe(tiny_recipe(stages, train_per_class=20)), quiet=True)

    folders = sorted((tmp_path / "out" / "stages").iterdir())
    sparse = Bundle.load(folders[2] / "bundle")
    metrics = json.loads((folders[2] / "result.json").read_text())["metrics"]
    assert metrics["bundle"]["unique_parameters"] == sparse.unique_parameters()
    assert metrics["bundle"]["bytes"] == (folders[2] / "bundle" / TENSORS).stat().st_size
    nnz = {n: m.nnz for n, m in _sparse_layers(sparse.models["a"]).items()}
    trained = Bundle.load(folders[3] / "bundle")
    assert {n: m.nnz for n, m in _sparse_layers(trained.models["a"]).items()} == nnz  # the cut held
    for index in (4, 6):
        result = json.loads((folders[index] / "result.json").read_text())
        assert result["metrics"]["bundle"]["bytes"] == (folders[index] / "bundle" / TENSORS).stat().st_size
    pruned = Bundle.load(folders[5] / "bundle")
    assert sum(m.nnz for m in _sparse_layers(pruned.models["a"]).values()) < sum(nnz.values())
    quantized = json.loads((folders[7] / "result.json").read_text())["metrics"]["bundle"]
    # unpacked, the int8 shared weights would take more than half the sparse float bytes
    assert quantized["quantized_bytes"] < 0.5 * quantized["float_bytes"]
    assert report.bundle["unique_parameters"] == pruned.unique_parameters()
    assert all(abs(r["accuracy_quantized"] - r["accuracy_float"]) <= 0.05 for r in report.tasks.values())


def test_a_recipe_with_a_bad_density_fails_at_load_naming_the_stage_field(tiny_recipe):
    stages = [{"share": {}}, {"sparsify": {"density": 2}}]
    with pytest.raises(ConfigError, match=r"stages\[1\]\.sparsify.*density: expected a number in \[0, 1\]"):
        load_recipe(tiny_recipe(stages))


def test_sparsify_after_jtucker_cuts_factors_and_cores_and_keeps_shared_factors_shared(tmp_path):
    bundle = close_tasks_bundle(3)
    config = RatioConfig(ratio=0.5)
    decompose_bundle(bundle, lambda infos, _: select_ranks(config, infos), joint=True, min_params=100)
    before = bundle.unique_parameters()

    sparsify(bundle, density=0.5)

    layers = [m.layer2[0].conv1 for m in bundle.models.values()]
    assert all(isinstance(layer.in_proj, SparseLayer) for layer in layers)
    assert layers[0].in_proj is layers[1].in_proj is layers[2].in_proj  # J-Tucker's shared factor
    assert layers[0].core is not layers[1].core  # a core per task
    assert bundle.unique_parameters() < 0.6 * before
    loaded = Bundle.load(bundle.save(tmp_path / "b"))
    expected, got = _outputs(bundle.models), _outputs(loaded.models)
    assert all(torch.equal(got[t], expected[t]) for t in bundle.tasks)
    result = inc_quantize.quantize_tasks(bundle.models, "int8_dynamic", {t: SHAPE for t in bundle.tasks})
    for task in bundle.tasks:
        with torch.no_grad():
            error = (result.models[task](X) - expected[task]).abs().max()
        assert error < 0.1 * expected[task].abs().max()
