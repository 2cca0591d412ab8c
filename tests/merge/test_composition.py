"""Hybrid and hard sharing composed with prune and quantize (merge.branches, issue 6 item 5)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch_pruning as tp
from conftest import close_tasks_bundle

from jtucker_plugin.decompose.apply import decompose_bundle
from jtucker_plugin.decompose.ranks import RatioConfig, rank_config_from_dict, select_ranks
from jtucker_plugin.decompose.shared_core import CoreSharing, TaskMixLayer, share_cores
from jtucker_plugin.integrations.inc_quantize import quantize_tasks
from jtucker_plugin.merge.branches import HybridBranches, MaskedConv2d, from_branches, to_branches
from jtucker_plugin.merge.composed import ComposedLayer, HybridLayer
from jtucker_plugin.merge.hybrid import hybrid_groups, hybrid_storage, hybridize
from jtucker_plugin.merge.share import hard_share
from jtucker_plugin.multitask import TENSORS, Bundle
from jtucker_plugin.prune.prune import prune_bundle
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
SHAPE = (3, 16, 16)


def _hybrid_bundle(density: float = 0.1, shared_density: float | None = None) -> Bundle:
    bundle = close_tasks_bundle(3)
    hybridize(bundle, density=density, shared_density=shared_density, keep_per_task=["conv1"])
    for model in bundle.models.values():
        model.eval()
    return bundle


def _outputs(models) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {t: m.eval()(X) for t, m in models.items()}


def _dense_equivalent(model: torch.nn.Module, weight: str = "weight") -> torch.nn.Module:
    """``model`` with every composed layer as a plain layer holding its composed weight
    (``"weight"``) or, for Hybrid layers, 1.0 at the delta's stored positions and 0 elsewhere
    (``"mask"``)."""
    model = copy.deepcopy(model)
    for name, layer in _composed(model).items():
        plain = layer.to_dense()
        if weight == "mask" and isinstance(layer, HybridLayer):
            mask = torch.zeros(layer.numel).index_fill(0, layer.positions(), 1.0)
            with torch.no_grad():
                plain.weight.copy_(mask[: plain.weight.numel()].view_as(plain.weight))
        model.set_submodule(name, plain)
    return model


def _prune_like(model: torch.nn.Module, records: list[dict]) -> None:
    """Remove the channels that the prune stage's history records say it removed, with torch-pruning."""
    for record in records:
        before, _ = record["channels"]
        gone = [i for i in range(before) if i not in set(record["kept"])]
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=X[:1])
        layer = model.get_submodule(record["layer"])
        graph.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=gone).prune()


def _task_mix_bundle() -> Bundle:
    """J-Tucker layers whose cores are spanned by 2 basis cores shared by the 3 tasks."""
    bundle = close_tasks_bundle(3)
    config = rank_config_from_dict({"strategy": "ratio", "ratio": 0.5})
    result = decompose_bundle(
        bundle, lambda infos, _: select_ranks(config, infos), joint=True, min_params=100
    )
    names = [n for n, row in result["layers"].items() if "kept_dense" not in row]
    share_cores(bundle, names, CoreSharing("task_rank", task_rank=2))
    for model in bundle.models.values():
        model.eval()
    return bundle


BUNDLES = {
    "hybrid": _hybrid_bundle,
    "hybrid_sparse_shared": lambda: _hybrid_bundle(shared_density=0.4),
    "task_rank": _task_mix_bundle,
}


def _composed(model: torch.nn.Module) -> dict[str, ComposedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ComposedLayer)}


@pytest.mark.parametrize("kind", BUNDLES)
def test_branches_run_the_composed_layers_and_turn_back_bit_exactly(kind):
    bundle = BUNDLES[kind]()
    original = copy.deepcopy(bundle.models)
    expected = _outputs(bundle.models)
    names = list(_composed(original["t0"]))
    assert names

    paths = to_branches(bundle.models, delta="masked")
    assert len(paths) == (0 if kind == "task_rank" else 3 * len(names))
    branches = [m.get_submodule(names[-1]) for m in bundle.models.values()]
    shared = [b.shared if isinstance(b, HybridBranches) else b.basis[1] for b in branches]
    # A sparse shared weight is a masked dense layer, whose mask torch-pruning cuts with it.
    expected_type = MaskedConv2d if kind == "hybrid_sparse_shared" else torch.nn.Conv2d
    assert shared[0] is shared[1] is shared[2] and type(shared[0]) is expected_type
    got = _outputs(bundle.models)
    assert all(torch.allclose(got[t], expected[t], atol=1e-5) for t in bundle.tasks)

    bundle.models["t1"].get_submodule(names[-1]).train()
    from_branches(bundle.models)  # each rebuilt layer in its branches' mode
    assert bundle.models["t1"].get_submodule(names[-1]).training
    assert not bundle.models["t0"].get_submodule(names[-1]).training
    for name in names:
        layers = [m.get_submodule(name) for m in bundle.models.values()]
        assert all(layer.parts()[0] is layers[0].parts()[0] for layer in layers)  # shared: one object
        for task, layer in zip(bundle.tasks, layers, strict=True):
            before = original[task].get_submodule(name)
            assert type(layer) is type(before)
            assert all(torch.equal(a, b) for a, b in zip(layer.parts(), before.parts(), strict=True))


@pytest.mark.parametrize("kind", BUNDLES)
def test_prune_after_sharing_equals_pruning_each_dense_task_model_at_the_same_channels(kind):
    bundle = BUNDLES[kind]()
    if kind != "task_rank":
        layer = bundle.models["t0"].layer2[0].conv1
        values = layer.delta_values.detach().index_fill(0, torch.tensor([0]), 0.0)
        layer.set_delta(layer.positions(), values)  # a stored 0 stays stored
    dense = {t: _dense_equivalent(m) for t, m in bundle.models.items()}
    masks = {t: _dense_equivalent(m, "mask") for t, m in bundle.models.items()}

    bundle.models["t1"].train()
    modes = {t: {n: m.training for n, m in model.named_modules()} for t, model in bundle.models.items()}
    result = prune_bundle(bundle, "magnitude", pruning_ratio=0.5)
    assert modes == {
        t: {n: m.training for n, m in model.named_modules()} for t, model in bundle.models.items()
    }

    records = [r for r in bundle.history if r["stage"] == "prune"]
    assert records and all(r["channels"][1] < r["channels"][0] for r in records)
    got = _outputs(bundle.models)
    for task in bundle.tasks:
        _prune_like(dense[task], records)
        torch.testing.assert_close(got[task], _outputs({task: dense[task]})[task], atol=1e-5, rtol=1e-4)
        if kind != "task_rank":
            _prune_like(masks[task], records)
            for name, hybrid in _composed(bundle.models[task]).items():
                # Every stored position in a kept row and column is still stored, a stored 0 too.
                mask = masks[task].get_submodule(name).weight.detach()
                assert hybrid.nnz == int(mask.count_nonzero())
                assert hybrid.weight_shape == tuple(mask.shape)
    for name in _composed(bundle.models["t0"]):
        layers = [m.get_submodule(name) for m in bundle.models.values()]
        assert all(layer.parts()[0] is layers[0].parts()[0] for layer in layers)
    assert result["parameters_after"] == bundle.unique_parameters() < result["parameters_before"]


@pytest.mark.parametrize("amount", [{"pruning_ratio": 0.5}, {"macs_target": 0.6}])
def test_pruning_task_mixed_cores_leaves_every_mix_whole_without_an_unwrapped_parameter_warning(amount):
    bundle = _task_mix_bundle()
    before = {(t, n): m.mix.detach().clone() for t, n, m in _task_mix_layers(bundle)}
    assert before

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune_bundle(bundle, "magnitude", iterative_steps=2, **amount)

    assert not [w for w in caught if "Unwrapped parameters" in str(w.message)]
    assert any(r["stage"] == "prune" and r["layer"].endswith(".core") for r in bundle.history)
    after = {(t, n): m.mix.detach() for t, n, m in _task_mix_layers(bundle)}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # the task-mode rank is no channel


def _task_mix_layers(bundle: Bundle) -> list[tuple[str, str, TaskMixLayer]]:
    return [
        (t, n, m)
        for t, model in bundle.models.items()
        for n, m in model.named_modules()
        if isinstance(m, TaskMixLayer)
    ]


def test_jtucker_after_hybrid_keeps_the_hybrid_layers_and_says_why():
    def ranks(infos, _):
        return select_ranks(RatioConfig(ratio=0.5), infos)

    bundle = _hybrid_bundle()  # conv1 per task, the other convs Hybrid
    result = decompose_bundle(bundle, ranks, joint=True)
    assert [n for n, row in result["layers"].items() if "kept_dense" not in row] == ["conv1"]
    assert (
        result["skipped"]["layer1.0.conv1"]
        == "HybridLayer: composed from shared parts; decompose before sharing"
    )
    everything = close_tasks_bundle(3)
    hybridize(everything, density=0.1)
    with pytest.raises(ValueError, match=r"no layer to decompose.*HybridLayer: composed from shared parts"):
        decompose_bundle(everything, ranks, joint=True)


def test_int8_after_hybrid_stores_the_shared_weight_once_and_the_deltas_sparse_in_int8():
    bundle = _hybrid_bundle(density=0.05)
    groups = hybrid_groups(bundle.models)
    result = quantize_tasks(bundle.models, "int8_dynamic", {t: SHAPE for t in bundle.tasks})

    stored = result.stored_tensors()
    shared_shapes = sorted(tuple(g[0].weight_shape) for g in groups.values())
    weights = {k: v for k, v in stored.items() if not k.endswith(("delta_values", "delta_indices"))}
    int8 = sorted(tuple(v.shape) for v in weights.values() if v.dtype == torch.int8)
    # conv1 and the head are per task; each Hybrid layer's shared weight is one int8 tensor.
    assert len(int8) == len(shared_shapes) + 2 * 3
    assert all(int8.count(s) >= 1 for s in shared_shapes)
    # Each delta: its nnz values as int8 codes, one float scale, its positions.
    values = [v for k, v in stored.items() if k.endswith("delta_values")]
    nnz = sorted(layer.nnz for layers in groups.values() for layer in layers)
    assert sorted(v.numel() for v in values) == nnz and all(v.dtype == torch.int8 for v in values)
    scales = [v for k, v in stored.items() if k.endswith("delta_scale")]
    assert len(scales) == len(values) and all(s.dtype == torch.float32 and s.numel() == 1 for s in scales)
    # A batch norm after the branches cannot fold: it is an affine, two tensors, not four.
    batch_norm = torch.ops.aten.batch_norm.default
    assert not [n for m in result.models.values() for n in m.graph.nodes if n.target == batch_norm]
    assert not [k for k in stored if k.endswith(("running_mean", "running_var"))]
    expected = _outputs(bundle.models)
    for task in bundle.tasks:
        with torch.no_grad():
            error = (result.models[task](X) - expected[task]).abs().max()
        assert error < 0.1 * expected[task].abs().max()


def test_int8_after_hybrid_with_a_sparse_shared_weight_stores_its_kept_codes_once():
    bundle = _hybrid_bundle(density=0.05, shared_density=0.4)
    groups = hybrid_groups(bundle.models)
    result = quantize_tasks(bundle.models, "int8_dynamic", {t: SHAPE for t in bundle.tasks})

    stored = result.stored_tensors()
    codes = sorted(v.numel() for k, v in stored.items() if k.endswith("_codes"))
    # Each shared weight: one tensor of its kept entries' int8 codes (a code may round to 0 and
    # drop out), with their positions; conv1 and the heads stay dense int8 per task.
    shared_nnz = sorted(g[0].shared_nnz for g in groups.values())
    assert len(codes) == len(shared_nnz)
    assert all(0.95 * n <= c <= n for c, n in zip(codes, shared_nnz, strict=True))
    dense_int8 = [v for k, v in stored.items() if v.dtype == torch.int8 and v.dim() > 1]
    assert len(dense_int8) == 2 * 3
    expected = _outputs(bundle.models)
    for task in bundle.tasks:
        with torch.no_grad():
            error = (result.models[task](X) - expected[task]).abs().max()
        assert error < 0.1 * expected[task].abs().max()


def test_weight_only_rtn_quantizes_a_hybrid_linear_layers_shared_weight_once():
    gen = torch.Generator().manual_seed(0)
    shared = torch.nn.Parameter(0.1 * torch.randn(32, 32, generator=gen))
    models = {}
    for task in ("a", "b"):
        layer = HybridLayer("Linear", {"in_features": 32, "out_features": 32}, nnz=20)
        layer.shared_weight = shared
        layer.set_delta(torch.randperm(32 * 32, generator=gen)[:20], 0.05 * torch.randn(20, generator=gen))
        head = torch.nn.Linear(32, 3)
        models[task] = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), layer, head).eval()
    result = quantize_tasks(models, "weight_only_rtn", {t: (1, 4, 4) for t in models})
    a, b = result.models["a"][2], result.models["b"][2]
    # INC's RTN replaced the shared linear layer once; the deltas' ops were left to compose.
    assert a.shared is b.shared and type(a.shared).__name__ == "INCWeightOnlyLinear"
    assert type(a.delta.op) is torch.nn.Linear and a.delta is not b.delta
    x = torch.randn(5, 1, 4, 4, generator=gen)
    with torch.no_grad():
        for task, model in models.items():
            torch.testing.assert_close(result.models[task](x), model(x), atol=0.01, rtol=0.01)


def test_int8_after_hard_sharing_keeps_each_shared_weight_once():
    bundle = close_tasks_bundle(3)
    hard_share(bundle, keep_per_task=["conv1"])
    for model in bundle.models.values():
        model.eval()
    result = quantize_tasks(bundle.models, "int8_dynamic", {t: SHAPE for t in bundle.tasks})
    int8 = [v for v in result.stored_tensors().values() if v.dtype == torch.int8]
    shared = {id(m) for m in bundle.models["t0"].modules() if isinstance(m, torch.nn.Conv2d)} & {
        id(m) for m in bundle.models["t1"].modules()
    }
    # Batch norms after the shared convs stay per-task affines instead of folding into copies.
    assert len(int8) == len(shared) + 2 * 3
    expected = _outputs(bundle.models)
    for task in bundle.tasks:
        with torch.no_grad():
            error = (result.models[task](X) - expected[task]).abs().max()
        assert error < 0.1 * expected[task].abs().max()


@pytest.mark.parametrize("first", ["hybrid", "hybrid_sparse_shared", "share"])
def test_sharing_then_prune_then_int8_in_one_recipe_with_exact_counts_after_each_stage(
    first, tiny_recipe, tmp_path
):
    sharing = {"keep_per_task": ["conv1"]}
    stage = "share" if first == "share" else "hybrid"
    if stage == "hybrid":
        sharing.update(density=0.1, epochs=1, batch_size=16, max_batches=2)
    if first == "hybrid_sparse_shared":
        sharing.update(shared_density=0.8)  # a tiny model trained 4 epochs has little to spare
    evaluate = {"evaluate": {"latency": False}}
    stages = [
        {"train": {"epochs": 4, "batch_size": 16, "lr": 0.05}},
        {stage: sharing},
        {"train": {"epochs": 2, "batch_size": 16, "lr": 0.02}},  # joint fine-tuning of the shared parts
        evaluate,
        {"prune": {"importance": "naive_bayes", "pruning_ratio": 0.3, "calibration_batches": 2}},
        {"train": {"epochs": 2, "batch_size": 16, "lr": 0.02}},
        evaluate,
        {"quantize": {"scheme": "int8_static", "calibration_batches": 2, "batch_size": 16, "latency": False}},
    ]
    report = run_recipe(load_recipe(tiny_recipe(stages, train_per_class=20)), quiet=True)

    folders = sorted((tmp_path / "out" / "stages").iterdir())
    for index in (3, 6):  # each evaluate's byte count is the file its stage wrote
        result = json.loads((folders[index] / "result.json").read_text())
        assert result["metrics"]["bundle"]["bytes"] == (folders[index] / "bundle" / TENSORS).stat().st_size
    pruned = Bundle.load(folders[4] / "bundle")
    prune_metrics = json.loads((folders[4] / "result.json").read_text())["metrics"]
    assert prune_metrics["bundle"]["unique_parameters"] == pruned.unique_parameters()
    assert prune_metrics["prune"]["parameters_after"] < prune_metrics["prune"]["parameters_before"]
    if stage == "hybrid":
        assert hybrid_storage(pruned)["file_bytes"] == (folders[4] / "bundle" / TENSORS).stat().st_size
    quantized = json.loads((folders[7] / "result.json").read_text())["metrics"]["bundle"]
    assert (
        quantized["quantized_bytes"] < 0.6 * quantized["float_bytes"]
        and quantized["quantized_shared_tensors"]
    )
    assert report.bundle["unique_parameters"] == pruned.unique_parameters()
    assert all(r["accuracy_float"] > 0.6 for r in report.tasks.values())
    assert all(abs(r["accuracy_quantized"] - r["accuracy_float"]) <= 0.05 for r in report.tasks.values())
