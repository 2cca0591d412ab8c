"""Hybrid sharing: a shared weight plus sparse per-task deltas (merge.composed, merge.hybrid, stage)."""

from __future__ import annotations

import copy
import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import close_tasks_bundle

import jtucker_plugin.stages.hybrid  # noqa: F401  (registers the stage)
from jtucker_plugin.data import ArrayDataset, TaskData
from jtucker_plugin.merge.composed import HybridLayer, decode_positions, encode_positions, scatter_entries
from jtucker_plugin.merge.hybrid import (
    hybrid_groups,
    hybrid_storage,
    hybridize,
    l1_penalty,
    nonzero_schedule,
    train_hybrid,
)
from jtucker_plugin.merge.nonzeros import allocate_nonzeros
from jtucker_plugin.merge.share import hard_share
from jtucker_plugin.metrics import count_macs
from jtucker_plugin.multitask import TENSORS, Bundle
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.recipe.schema import ConfigError, from_dict
from jtucker_plugin.stages.hybrid import HybridConfig
from jtucker_plugin.train import FitConfig, fit

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))


def _bundle(n_tasks: int = 3, width: float = 0.5) -> Bundle:
    bundle = close_tasks_bundle(n_tasks, width)
    for model in bundle.models.values():
        model.eval()
    return bundle


def _outputs(bundle: Bundle) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {t: m.eval()(X) for t, m in bundle.models.items()}


def _data(seed: int) -> TaskData:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=gen)
    ds = ArrayDataset(images, torch.randint(0, 10, (48,), generator=gen), (0.5,) * 3, (0.25,) * 3)
    return TaskData(ds, None, ds, [str(i) for i in range(10)], augment=False)


def _save_checking_storage(bundle: Bundle, path: Path) -> tuple[dict[str, int], Path]:
    """``hybrid_storage`` of ``bundle``, checked against the file ``Bundle.save`` writes to ``path``."""
    storage = hybrid_storage(bundle)
    path = bundle.save(path)
    file = path / TENSORS
    header = struct.unpack("<Q", file.read_bytes()[:8])[0]
    assert storage["file_bytes"] == file.stat().st_size
    assert storage["tensor_bytes"] == file.stat().st_size - 8 - header
    return storage, path


def test_density_one_reconstructs_each_task_exactly():
    bundle = _bundle()
    reference = copy.deepcopy(bundle)
    report = hybridize(bundle, density=1.0)
    assert "linear" in report["kept"] and "head" in report["kept"]["linear"]
    assert all(e < 1e-6 for row in report["layers"].values() for e in row["relative_error"])
    expected, got = _outputs(reference), _outputs(bundle)
    for task in bundle.tasks:
        assert torch.allclose(got[task], expected[task], atol=1e-5)
        dense = bundle.models[task].layer2[0].conv1.to_dense()
        assert torch.allclose(dense.weight, reference.models[task].layer2[0].conv1.weight, atol=1e-6)
    a, b, c = (m.layer2[0].conv1 for m in bundle.models.values())
    assert a.shared_weight is b.shared_weight is c.shared_weight and a.delta_values is not b.delta_values
    # The op of a composed layer runs the dense conv: MACs are the dense model's.
    assert count_macs(bundle.models["t0"], (3, 16, 16)) == count_macs(reference.models["t0"], (3, 16, 16))


def test_density_zero_is_hard_sharing():
    hybrid, shared = _bundle(), _bundle()
    hybridize(hybrid, density=0.0, keep_per_task=["conv1"])
    hard_share(shared, init="mean", keep_per_task=["conv1"])
    expected, got = _outputs(shared), _outputs(hybrid)
    for task in hybrid.tasks:
        assert torch.equal(got[task], expected[task])
    assert hybrid.unique_parameters() == shared.unique_parameters()
    assert hybrid_storage(hybrid)["nonzeros"] == 0


def test_density_keeps_the_largest_differences_per_layer_and_task():
    bundle = _bundle()
    weights = torch.stack([m.layer3[0].conv2.weight.detach().reshape(-1) for m in bundle.models.values()])
    diffs = (weights - weights.mean(0)).abs()
    report = hybridize(bundle, density=0.1)
    n = weights.shape[1]
    assert report["layers"]["layer3.0.conv2"]["nnz"] == [round(0.1 * n)] * 3
    for t, model in enumerate(bundle.models.values()):
        kept = torch.zeros(n, dtype=torch.bool)
        kept[model.layer3[0].conv2.positions()] = True
        assert diffs[t][kept].min() >= diffs[t][~kept].max()


def test_budget_is_shared_out_globally_by_magnitude():
    bundle = _bundle()
    reference = copy.deepcopy(bundle)
    report = hybridize(bundle, budget=777)
    assert report["nonzeros"] == 777 == hybrid_storage(bundle)["nonzeros"]
    kept, dropped = [], []
    for name, layers in hybrid_groups(bundle.models).items():
        weights = torch.stack(
            [m.get_submodule(name).weight.detach().reshape(-1) for m in reference.models.values()]
        )
        for layer, diff in zip(layers, (weights - weights.mean(0)).abs(), strict=True):
            mask = torch.zeros(layer.numel, dtype=torch.bool)
            mask[layer.positions()] = True
            kept.append(diff[mask])
            dropped.append(diff[~mask])
    assert torch.cat(kept).min() >= torch.cat(dropped).max() - 1e-7
    assert allocate_nonzeros([torch.ones(3), torch.ones(5)], [3, 5], budget=100) == [3, 5]


@pytest.mark.parametrize("density", [0.1, 0.01])
def test_save_load_is_bit_exact_and_storage_counts_are_the_written_bytes(tmp_path, density):
    bundle = _bundle()
    hybridize(bundle, density=density, keep_per_task=["conv1"])
    storage, path = _save_checking_storage(bundle, tmp_path / "b")
    groups = hybrid_groups(bundle.models)
    # Fewer than 1 entry in 8 kept: gaps, a byte a position, plus an escape byte per 255 entries
    # skipped. At 0.01 some gaps exceed 255: positions longer than nnz, which loading must take.
    members = [layer for group in groups.values() for layer in group]
    assert {m.delta_indices.dtype for m in members} == {torch.int8}
    escapes = sum(int((m.delta_indices == -128).sum()) for m in members)
    assert storage["index_bytes"] == storage["nonzeros"] + escapes
    assert (escapes > 0) == (density == 0.01)
    assert storage["value_bytes"] == 4 * storage["nonzeros"]
    shared = sum(g[0].shared_weight.numel() for g in groups.values())
    others = sum(
        p.numel()
        for n, p in bundle.models["t0"].named_parameters()
        if "shared_" not in n and "delta_" not in n
    )
    others += sum(
        p.numel()
        for m in list(bundle.models.values())[1:]
        for n, p in m.named_parameters()
        if "shared_" not in n and "delta_" not in n
    )
    assert bundle.unique_parameters() == shared + storage["nonzeros"] + others

    loaded = Bundle.load(path)
    assert loaded.unique_parameters() == bundle.unique_parameters()
    for name, layers in hybrid_groups(loaded.models).items():
        assert all(layer.shared_weight is layers[0].shared_weight for layer in layers)
        for layer, original in zip(layers, groups[name], strict=True):
            assert torch.equal(layer.delta_indices, original.delta_indices)
            assert torch.equal(layer.delta_values, original.delta_values)
            assert torch.equal(layer.shared_weight, original.shared_weight)
    expected, got = _outputs(bundle), _outputs(loaded)
    assert all(torch.equal(got[t], expected[t]) for t in bundle.tasks)


def test_sparse_shared_weight_keeps_the_means_largest_entries_and_density_one_deltas_restore_each_task():
    bundle = _bundle()
    reference = copy.deepcopy(bundle)
    report = hybridize(bundle, density=1.0, shared_density=0.3)
    expected, got = _outputs(reference), _outputs(bundle)
    assert all(torch.allclose(got[t], expected[t], atol=1e-5) for t in bundle.tasks)
    assert all(e < 1e-6 for row in report["layers"].values() for e in row["relative_error"])
    layers = list(hybrid_groups(bundle.models)["layer3.0.conv2"])
    weights = torch.stack([m.layer3[0].conv2.weight.detach().reshape(-1) for m in reference.models.values()])
    mean = weights.mean(0).abs()
    kept = torch.zeros(mean.numel(), dtype=torch.bool)
    kept[decode_positions(layers[0].shared_indices)] = True
    assert layers[0].shared_nnz == round(0.3 * mean.numel()) == int(kept.sum())
    assert report["layers"]["layer3.0.conv2"]["shared_nnz"] == layers[0].shared_nnz
    assert mean[kept].min() >= mean[~kept].max()
    assert layers[0].shared_weight is None
    assert all(
        layer.shared_values is layers[0].shared_values and layer.shared_indices is layers[0].shared_indices
        for layer in layers
    )


def test_deltas_start_from_the_differences_to_the_sparse_shared_weight():
    bundle = _bundle()
    weights = torch.stack([m.layer3[0].conv2.weight.detach().reshape(-1) for m in bundle.models.values()])
    hybridize(bundle, density=0.1, shared_density=0.5)
    layers = hybrid_groups(bundle.models)["layer3.0.conv2"]
    shared = layers[0].shared_flat().detach()
    for layer, diff in zip(layers, (weights - shared).abs(), strict=True):
        kept = torch.zeros(layer.numel, dtype=torch.bool)
        kept[layer.positions()] = True
        assert diff[kept].min() >= diff[~kept].max() - 1e-7


def test_shared_density_one_is_the_dense_shared_weight_and_shared_budget_is_global():
    dense, full = _bundle(), _bundle()
    hybridize(dense, density=0.1)
    hybridize(full, density=0.1, shared_density=1.0)
    expected, got = _outputs(dense), _outputs(full)
    assert all(torch.allclose(got[t], expected[t], atol=1e-6) for t in dense.tasks)
    assert full.unique_parameters() == dense.unique_parameters()

    budgeted = _bundle()
    report = hybridize(budgeted, density=0.1, shared_budget=5000)
    groups = hybrid_groups(budgeted.models)
    assert report["shared_nonzeros"] == 5000 == sum(g[0].shared_nnz for g in groups.values())
    assert len({round(g[0].shared_nnz / math.prod(g[0].weight_shape), 2) for g in groups.values()}) > 1


def test_sparse_shared_weight_is_stored_once_and_round_trips_bit_exactly(tmp_path):
    bundle = _bundle()
    hybridize(bundle, density=0.05, shared_density=0.4, keep_per_task=["conv1"])
    storage, path = _save_checking_storage(bundle, tmp_path / "b")
    groups = hybrid_groups(bundle.models)
    firsts = [g[0] for g in groups.values()]
    # Shared: each layer's values (4 bytes) and positions (a bitmask: 40% kept) once, its bias none.
    assert storage["shared_bytes"] == sum(
        4 * f.shared_nnz + f.shared_indices.numel() * f.shared_indices.element_size() for f in firsts
    )
    assert {f.shared_indices.dtype for f in firsts} == {torch.uint8}
    others = sum(
        p.numel()
        for m in bundle.models.values()
        for n, p in m.named_parameters()
        if "shared_" not in n and "delta_" not in n
    )
    assert bundle.unique_parameters() == sum(f.shared_nnz for f in firsts) + storage["nonzeros"] + others

    loaded = Bundle.load(path)
    assert loaded.unique_parameters() == bundle.unique_parameters()
    for name, layers in hybrid_groups(loaded.models).items():
        assert all(layer.shared_values is layers[0].shared_values for layer in layers)
        assert all(layer.shared_indices is layers[0].shared_indices for layer in layers)
        for layer, original in zip(layers, groups[name], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(layer.parts(), original.parts(), strict=True))
    expected, got = _outputs(bundle), _outputs(loaded)
    assert all(torch.equal(got[t], expected[t]) for t in bundle.tasks)


def test_training_moves_the_tied_shared_values_at_fixed_positions():
    bundle = _bundle()
    hybridize(bundle, density=0.2, shared_density=0.5)
    before = {n: g[0].shared_values.detach().clone() for n, g in hybrid_groups(bundle.models).items()}
    positions = {n: g[0].shared_indices.clone() for n, g in hybrid_groups(bundle.models).items()}
    data = {t: _data(i) for i, t in enumerate(bundle.tasks)}
    train_hybrid(bundle, data, FitConfig(epochs=2, batch_size=16, max_batches=2), density=0.05, seed=0)
    for name, layers in hybrid_groups(bundle.models).items():
        first = layers[0]
        assert all(layer.shared_values is first.shared_values for layer in layers)
        assert torch.equal(first.shared_indices, positions[name])
        assert not torch.equal(first.shared_values, before[name])


def _form_bytes(positions: torch.Tensor, numel: int) -> dict[torch.dtype, int]:
    """Each form's bytes, counted independently of the encoder: a gap g takes ceil(g / 255) bytes."""
    gaps = torch.diff(positions, prepend=torch.tensor([-1]))
    fixed = torch.int16 if numel <= 65536 else torch.int32
    return {
        fixed: positions.numel() * (2 if fixed == torch.int16 else 4),
        torch.int8: int(((gaps + 254) // 255).sum()),
        torch.uint8: math.ceil(numel / 8),
    }


@pytest.mark.parametrize("numel", [7, 288, 5000, 65536, 70000])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.004, 0.02, 0.1, 0.2, 0.6, 1.0])
def test_positions_take_their_smallest_form_and_round_trip(numel, density):
    gen = torch.Generator().manual_seed(numel)
    positions = torch.randperm(numel, generator=gen)[: int(numel * density)].sort().values
    values = torch.randn(positions.numel(), generator=gen)
    stored = encode_positions(positions, numel)
    sizes = _form_bytes(positions, numel)
    assert stored.numel() * stored.element_size() == min(sizes.values())
    assert sizes[stored.dtype] == min(sizes.values())
    assert torch.equal(decode_positions(stored), positions)
    expected = torch.zeros(numel).index_add(0, positions, values)
    assert torch.equal(scatter_entries(values, stored, numel), expected)
    base = torch.randn(numel, generator=gen)
    with_base = scatter_entries(values, stored, numel, base=base)
    assert torch.equal(with_base, base.index_add(0, positions, values))


def test_gaps_above_255_take_escape_bytes():
    # gaps 1, 255, 256 (an escape, then 1), 511 (two escapes, then 1); stored as byte - 128
    positions = torch.tensor([0, 255, 511, 1022])
    stored = encode_positions(positions, 4096)
    assert stored.dtype == torch.int8
    assert (stored.to(torch.int64) + 128).tolist() == [1, 255, 0, 1, 0, 0, 1]
    assert torch.equal(decode_positions(stored), positions)
    # past the 16-bit range too
    far = torch.arange(60_000, 100_000, 100)
    assert encode_positions(far, 100_000).dtype == torch.int8
    assert torch.equal(decode_positions(encode_positions(far, 100_000)), far)


def test_the_sparsest_positions_take_two_bytes_up_to_65536_entries_then_four():
    small = torch.tensor([0, 32767, 65535])  # gaps of ~32k: 129 bytes each, 2 as int16
    assert encode_positions(small, 65536).dtype == torch.int16
    assert torch.equal(decode_positions(encode_positions(small, 65536)), small)
    big = torch.tensor([0, 65536, 99999])
    stored = encode_positions(big, 100_000)
    assert stored.dtype == torch.int32 and torch.equal(decode_positions(stored), big)


def test_positions_become_a_bitmask_above_one_entry_in_eight():
    many = torch.arange(0, 288, 3)  # 96 of 288 entries: 96 bytes as gaps, 36 as bits
    stored = encode_positions(many, 288)
    assert stored.dtype == torch.uint8 and stored.numel() == 36
    assert torch.equal(decode_positions(stored), many)
    ragged = torch.tensor([0, 5, 9, 10])  # 11 entries: 2 bytes of bits, the last one partly used
    assert encode_positions(ragged, 11).numel() == 2
    assert torch.equal(decode_positions(encode_positions(ragged, 11)), ragged)
    every_eighth = torch.arange(0, 288, 8)  # 36 entries: 36 bytes either way, gaps kept
    assert encode_positions(every_eighth, 288).dtype == torch.int8
    assert encode_positions(torch.cat([every_eighth, torch.tensor([287])]), 288).dtype == torch.uint8


@pytest.mark.parametrize("form", [torch.int8, torch.int16, torch.uint8])
def test_a_forced_position_form_round_trips(form):
    positions = torch.tensor([0, 3, 700, 701])
    stored = encode_positions(positions, 1000, form=form)
    assert stored.dtype == form and torch.equal(decode_positions(stored), positions)


def test_a_forced_position_form_must_fit():
    with pytest.raises(ValueError, match=r"form: expected one of .* for 100000 entries"):
        encode_positions(torch.tensor([1]), 100_000, form=torch.int16)
    with pytest.raises(ValueError, match="form: expected one of"):
        encode_positions(torch.tensor([1]), 10, form=torch.float32)


def test_positions_must_ascend():
    with pytest.raises(ValueError, match="distinct and ascending"):
        encode_positions(torch.tensor([5, 3]), 10)
    with pytest.raises(ValueError, match="distinct and ascending"):
        encode_positions(torch.tensor([3, 3]), 10)


def test_positions_saved_in_another_length_load():
    # A layer starts with placeholder positions 0, 1, 2 (3 gap bytes); saved ones far apart take
    # escape bytes, in the delta and in a sparse shared weight alike.
    config = {"in_features": 300, "out_features": 300}
    positions = torch.tensor([0, 300, 600])  # gaps 1, 300, 300: 5 bytes
    state = {
        "shared_values": torch.randn(3),
        "shared_indices": encode_positions(positions, 90_000),
        "delta_values": torch.randn(3),
        "delta_indices": encode_positions(positions, 90_000),
    }
    assert state["delta_indices"].dtype == torch.int8 and state["delta_indices"].numel() == 5
    layer = HybridLayer("Linear", config, nnz=3, shared_nnz=3)
    layer.load_state_dict(state)
    assert torch.equal(layer.positions(), positions)
    assert torch.equal(decode_positions(layer.shared_indices), positions)
    expected = torch.zeros(90_000).index_add(0, positions, state["shared_values"] + state["delta_values"])
    assert torch.equal(layer.weight.reshape(-1), expected)


def test_a_delta_saved_with_two_byte_positions_loads_into_a_bitmask_layer():
    # Bundles written before the bitmask form stored every delta's positions as int16.
    config = {"in_channels": 4, "out_channels": 8, "kernel_size": 3}
    layer = HybridLayer("Conv2d", config, nnz=96)
    assert layer.delta_indices.dtype == torch.uint8
    positions = torch.arange(0, 288, 3)
    state = {
        "shared_weight": torch.randn(8, 4, 3, 3),
        "delta_values": torch.randn(96),
        "delta_indices": (positions - 32768).to(torch.int16),
    }
    layer.load_state_dict(state)
    assert torch.equal(layer.positions(), positions)
    expected = state["shared_weight"].reshape(-1).index_add(0, positions, state["delta_values"])
    assert torch.equal(layer.weight.reshape(-1), expected)


def test_materialize_keeps_the_weight_until_a_part_changes():
    layer = HybridLayer(
        "Conv2d",
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1},
        bias=True,
        materialize=True,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.shared_weight.copy_(torch.randn(layer.shared_weight.shape, generator=gen))
        layer.shared_bias.copy_(torch.randn(6, generator=gen))
    layer.set_delta(
        torch.tensor([0, 5, 216 + 2]), torch.tensor([1.0, -2.0, 3.0])
    )  # 216 weights, then the bias
    recompose = copy.deepcopy(layer)
    recompose.materialize = False
    x = torch.randn(1, 4, 5, 5, generator=gen)
    with torch.inference_mode():
        first = layer(x)
        assert torch.equal(first, recompose(x))
    assert layer.kept_bytes() == (216 + 6) * 4 and recompose.kept_bytes() == 0
    dense = layer.to_dense()
    assert torch.allclose(dense(x), first, atol=1e-6) and dense.bias[2] == layer.shared_bias[2] + 3.0

    # An optimiser step changes the values in place: the kept weight must not be reused.
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).sum().backward()
    optimizer.step()
    recompose.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert not torch.equal(layer(x), first)
        assert torch.equal(layer(x), recompose(x))


def test_l1_penalty_adds_the_sign_of_each_value_to_its_gradient():
    layer = HybridLayer("Linear", {"in_features": 3, "out_features": 2}, nnz=0)
    layer.set_delta(torch.tensor([0, 2, 4]), torch.tensor([0.5, -0.25, 0.0]))
    with l1_penalty([layer], 0.1):
        (0.0 * layer(torch.ones(1, 3)).sum()).backward()
    assert torch.equal(layer.delta_values.grad, torch.tensor([0.1, -0.1, 0.0]))
    layer.delta_values.grad = None
    (0.0 * layer(torch.ones(1, 3)).sum()).backward()  # the hooks are gone once the block ends
    assert torch.equal(layer.delta_values.grad, torch.zeros(3))


def test_training_shrinks_the_deltas_to_the_target_then_keeps_the_masks():
    bundle = _bundle()
    hybridize(bundle, density=0.2)
    data = {t: _data(i) for i, t in enumerate(bundle.tasks)}
    config = FitConfig(epochs=2, batch_size=16, max_batches=2)
    records = train_hybrid(bundle, data, config, density=0.05, l1=1e-3, seed=0)
    target = sum(
        round(0.05 * layer.numel) for layers in hybrid_groups(bundle.models).values() for layer in layers
    )
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["nonzeros"] == records[1]["nonzeros"] == target  # prune_epochs = epochs - 1
    assert all(torch.isfinite(torch.tensor(list(r["loss"].values()))).all() for r in records)

    positions = {
        n: [layer.positions().clone() for layer in g] for n, g in hybrid_groups(bundle.models).items()
    }
    values = {
        n: [layer.delta_values.detach().clone() for layer in g]
        for n, g in hybrid_groups(bundle.models).items()
    }
    train_hybrid(bundle, data, FitConfig(epochs=1, batch_size=16, max_batches=2), density=0.05, seed=1)
    for name, layers in hybrid_groups(bundle.models).items():
        for i, layer in enumerate(layers):
            assert torch.equal(layer.positions(), positions[name][i])
        assert any(not torch.equal(layer.delta_values, values[name][i]) for i, layer in enumerate(layers))
    schedule = nonzero_schedule(0.2, 0.05, 4)
    assert schedule[-1] == 0.05 and all(a > b for a, b in zip(schedule, schedule[1:], strict=False))


def test_training_without_cuts_or_penalty_is_exactly_one_joint_fine_tune():
    # Pruning between epochs must not restart the optimiser: momentum and the learning-rate
    # schedule run across epochs as in a plain joint fit (restarts cost ~1 pp in benchmarks).
    bundle = _bundle()
    hybridize(bundle, density=0.05)
    twin = copy.deepcopy(bundle)
    data = {t: _data(i) for i, t in enumerate(bundle.tasks)}
    config = FitConfig(epochs=3, batch_size=16, max_batches=2)
    records = train_hybrid(bundle, data, config, density=0.05, l1=0.0, prune_epochs=0, seed=4)
    fit(twin.models, data, replace(config, joint=True), seed=4)
    for t in bundle.tasks:
        trained, plain = bundle.models[t].state_dict(), twin.models[t].state_dict()
        assert all(torch.equal(trained[k], plain[k]) for k in plain), t
    assert [r["lr"] for r in records] == pytest.approx([0.01, 0.0075, 0.0025])


def test_the_stage_config_drives_the_schedule_with_its_own_prune_epochs():
    # One-epoch steps of a HybridConfig would fail its prune_epochs <= epochs check.
    bundle = _bundle()
    hybridize(bundle, density=0.2)
    data = {t: _data(i) for i, t in enumerate(bundle.tasks)}
    config = HybridConfig(density=0.05, epochs=3, prune_epochs=2, batch_size=16, max_batches=2)
    records = train_hybrid(bundle, data, config, density=0.05, prune_epochs=config.prune_epochs, seed=0)
    target = sum(
        round(0.05 * layer.numel) for layers in hybrid_groups(bundle.models).values() for layer in layers
    )
    assert [r["nonzeros"] for r in records][1:] == [target, target]
    assert records[0]["nonzeros"] > target


@pytest.mark.parametrize("shared", [{}, {"shared_density": 0.5}])
def test_stage_in_a_recipe_reports_exact_counts_and_resumes(tiny_recipe, tmp_path, shared):
    hybrid = {"density": 0.05, "keep_per_task": ["conv1"], "epochs": 2, "batch_size": 16, "max_batches": 2}
    hybrid.update(shared)
    stages = [{"hybrid": hybrid}, {"evaluate": {"latency": False}}]
    path = tiny_recipe(stages, train_per_class=20)
    report = run_recipe(load_recipe(path), quiet=True)
    checkpoint = tmp_path / "out" / "stages" / "00-hybrid"
    bundle = Bundle.load(checkpoint / "bundle")
    assert report.bundle["unique_parameters"] == bundle.unique_parameters()
    assert report.bundle["bytes"] == (checkpoint / "bundle" / TENSORS).stat().st_size
    metrics = json.loads((checkpoint / "result.json").read_text())["metrics"]["hybrid"]
    assert metrics["kept"]["conv1"].startswith("kept per task") and metrics["storage"]["nonzeros"] > 0
    assert all(row["nnz"] == [round(0.05 * row["entries"])] * 2 for row in metrics["layers"].values())
    for name, row in metrics["layers"].items():
        layer = bundle.models["a"].get_submodule(name)
        expected = round(0.5 * math.prod(layer.weight_shape)) if shared else None
        assert row["shared_nnz"] == layer.shared_nnz == expected
    stages[1] = {"evaluate": {"latency": False, "batch_size": 32}}  # resumes from the saved Hybrid bundle
    path = tiny_recipe(stages, train_per_class=20)
    again = run_recipe(load_recipe(path), quiet=True)
    assert [s["status"] for s in again.stages] == ["resumed", "ran"]
    assert again.tasks["a"]["accuracy"] == report.tasks["a"]["accuracy"]


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"density": 1.5}, "density", r"expected a number in \[0, 1\], got 1.5"),
        ({"density": -0.1}, "density", r"in \[0, 1\]"),
        ({}, "density", "give exactly one target"),
        ({"density": 0.1, "budget": 10}, "density", "give exactly one target"),
        ({"budget": -3}, "budget", r"integer >= 0"),
        ({"density": 0.1, "epochs": 2, "prune_epochs": 3}, "prune_epochs", r"\[0, epochs=2\]"),
        ({"density": 0.1, "lr": 0}, "lr", "> 0"),
        ({"density": 0.1, "init_factor": 0.5}, "init_factor", ">= 1"),
        ({"density": 0.1, "shared_density": 1.2}, "shared_density", r"expected a number in \[0, 1\]"),
        (
            {"density": 0.1, "shared_density": 0.5, "shared_budget": 9},
            "shared_density",
            "give exactly one target, shared_density",
        ),
        ({"density": 0.1, "shared_budget": -1}, "shared_budget", r"integer >= 0"),
    ],
)
def test_bad_config_names_the_field(data, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(HybridConfig, data, "stages[0].hybrid")
    assert err.value.path == f"stages[0].hybrid.{field}"


def test_bad_input_errors():
    with pytest.raises(ValueError, match="keep_per_task: pattern 'layer9' matches no layer"):
        hybridize(_bundle(), density=0.1, keep_per_task=["layer9"])
    with pytest.raises(TypeError, match=r"keep_per_task: expected a list .*write \['conv1'\]"):
        hybridize(_bundle(), density=0.1, keep_per_task="conv1")
    with pytest.raises(ValueError, match="density: expected a number in"):
        hybridize(_bundle(), density=2.0)
    with pytest.raises(ValueError, match="no layer to share"):
        hybridize(_bundle(), density=0.1, keep_per_task=["conv1", "layer*"])
    with pytest.raises(ValueError, match=r"nnz: expected an integer in \[0, 216\]"):
        HybridLayer("Conv2d", {"in_channels": 3, "out_channels": 8, "kernel_size": 3}, nnz=300)
    with pytest.raises(ValueError, match=r"shared_density: expected a number in \[0, 1\], got -0.5"):
        hybridize(_bundle(), density=0.1, shared_density=-0.5)
    with pytest.raises(ValueError, match=r"shared_nnz: expected an integer in \[0, 216\]"):
        HybridLayer("Conv2d", {"in_channels": 3, "out_channels": 8, "kernel_size": 3}, shared_nnz=217)
    with pytest.raises(ValueError, match="op: expected one of"):
        HybridLayer("Conv3d", {}, nnz=0)
