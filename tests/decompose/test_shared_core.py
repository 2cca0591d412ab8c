"""J-Tucker with shared cores: shared_sparse and task_rank (decompose.shared_core, jtucker stage)."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import close_tasks_bundle

import jtucker_plugin.stages.decompose  # noqa: F401  (registers the jtucker stage)
from jtucker_plugin.decompose.apply import decompose_bundle
from jtucker_plugin.decompose.ranks import rank_config_from_dict, select_ranks
from jtucker_plugin.decompose.shared_core import CoreSharing, TaskMixLayer, joint_layers, share_cores
from jtucker_plugin.merge.composed import HybridLayer
from jtucker_plugin.merge.hybrid import hybrid_storage
from jtucker_plugin.multitask import TENSORS, Bundle
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.recipe.schema import ConfigError, from_dict
from jtucker_plugin.stages.decompose import JTuckerStageConfig

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _joint_bundle() -> tuple[Bundle, list[str]]:
    """A J-Tucker bundle (per-task cores) of three resnet8 tasks close to one backbone."""
    bundle, names = _decomposed()
    return copy.deepcopy(bundle), list(names)


@functools.cache
def _decomposed() -> tuple[Bundle, tuple[str, ...]]:
    bundle = close_tasks_bundle(3, 0.5)
    for model in bundle.models.values():
        model.eval()
    config = rank_config_from_dict({"strategy": "ratio", "ratio": 0.5})
    result = decompose_bundle(
        bundle, lambda infos, ev: select_ranks(config, infos), joint=True, min_params=100
    )
    return bundle, tuple(n for n, row in result["layers"].items() if "kept_dense" not in row)


def _outputs(bundle: Bundle) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {t: m.eval()(X) for t, m in bundle.models.items()}


def _cores(bundle: Bundle, name: str) -> torch.Tensor:
    return torch.stack([layer.core.weight.detach().reshape(-1) for layer in joint_layers(bundle, name)])


def test_shared_sparse_at_density_one_reconstructs_the_joint_decomposition():
    bundle, names = _joint_bundle()
    reference = copy.deepcopy(bundle)
    report = share_cores(bundle, names, CoreSharing("shared_sparse", core_density=1.0))
    assert set(report["layers"]) == set(names)
    expected, got = _outputs(reference), _outputs(bundle)
    assert all(torch.allclose(got[t], expected[t], atol=1e-5) for t in bundle.tasks)
    for name in names:
        layers = joint_layers(bundle, name)
        assert all(isinstance(layer.core, HybridLayer) for layer in layers)
        assert layers[0].core.shared_weight is layers[2].core.shared_weight
        assert torch.allclose(_cores(bundle, name), _cores(reference, name), atol=1e-6)
        assert max(report["layers"][name]["core_errors"]) < 1e-6


def test_shared_sparse_budget_and_exact_counts():
    bundle, names = _joint_bundle()
    per_task = bundle.unique_parameters()
    report = share_cores(bundle, names, CoreSharing("shared_sparse", core_budget=400))
    nnz = sum(sum(row["nnz"]) for row in report["layers"].values())
    assert nnz == 400 == hybrid_storage(bundle)["nonzeros"]
    core = sum(row["core_entries"] for row in report["layers"].values())
    # Three cores per layer became one shared core plus the deltas' values.
    assert bundle.unique_parameters() == per_task - 3 * core + core + 400
    # The Tucker layer still reads its core's geometry (ranks) and densifies.
    layer = joint_layers(bundle, names[0])[1]
    assert layer.ranks == tuple(layer.core.weight.shape[:2]) and layer.to_dense().weight.dim() == 4


def test_task_rank_equal_to_the_tasks_reconstructs_exactly():
    bundle, names = _joint_bundle()
    reference = copy.deepcopy(bundle)
    per_task = bundle.unique_parameters()
    report = share_cores(bundle, names, CoreSharing("task_rank", task_rank=3))
    expected, got = _outputs(reference), _outputs(bundle)
    assert all(torch.allclose(got[t], expected[t], atol=1e-5) for t in bundle.tasks)
    for name in names:
        layers = joint_layers(bundle, name)
        assert all(isinstance(layer.core, TaskMixLayer) for layer in layers)
        assert layers[0].core.basis is layers[1].core.basis and layers[0].core.mix is not layers[1].core.mix
        assert torch.allclose(_cores(bundle, name), _cores(reference, name), atol=1e-6)
    # R_T = T stores T basis cores and T x T mixing weights: T*T more than per-task cores.
    assert bundle.unique_parameters() == per_task + 9 * len(names)
    assert all(max(row["core_errors"]) < 1e-6 for row in report["layers"].values())


def test_task_rank_below_the_tasks_is_the_best_low_rank_fit():
    bundle, names = _joint_bundle()
    matrices = {name: _cores(bundle, name).double() for name in names}
    per_task = bundle.unique_parameters()
    report = share_cores(bundle, names, CoreSharing("task_rank", task_rank=1))
    for name, matrix in matrices.items():
        error = (_cores(bundle, name).double() - matrix).norm()
        dropped = torch.linalg.svdvals(matrix)[1:].norm()  # Eckart-Young
        assert error.item() == pytest.approx(dropped.item(), rel=1e-4)
        mix = torch.stack([layer.core.mix.detach() for layer in joint_layers(bundle, name)])
        assert (mix > 0).all()  # signs fixed: the first basis core is close to the mean core
    core = sum(row["core_entries"] for row in report["layers"].values())
    assert bundle.unique_parameters() == per_task - 2 * core + 3 * len(names)


@pytest.mark.parametrize(
    "sharing", [CoreSharing("shared_sparse", core_density=0.2), CoreSharing("task_rank", task_rank=2)]
)
def test_save_load_round_trips_exactly(tmp_path, sharing):
    bundle, names = _joint_bundle()
    share_cores(bundle, names, sharing)
    path = bundle.save(tmp_path / "b")
    loaded = Bundle.load(path)
    assert loaded.unique_parameters() == bundle.unique_parameters()
    assert hybrid_storage(bundle)["file_bytes"] == (path / TENSORS).stat().st_size
    expected, got = _outputs(bundle), _outputs(loaded)
    assert all(torch.equal(got[t], expected[t]) for t in bundle.tasks)
    for name in names:
        layers, before = joint_layers(loaded, name), joint_layers(bundle, name)
        assert layers[0].in_proj is layers[1].in_proj
        for new, old in zip(layers, before, strict=True):
            assert type(new.core) is type(old.core)
            for (key, a), b in zip(
                new.core.state_dict().items(), old.core.state_dict().values(), strict=True
            ):
                assert a.dtype == b.dtype and torch.equal(a, b), key
        shared = "shared_weight" if isinstance(layers[0].core, HybridLayer) else "basis"
        assert getattr(layers[0].core, shared) is getattr(layers[2].core, shared)


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"cores": "shared"}, "cores", "did you mean 'shared_sparse'"),
        ({"cores": "shared_sparse", "core_density": 1.2}, "core_density", r"expected a number in \[0, 1\]"),
        ({"cores": "shared_sparse", "core_density": -0.5}, "core_density", r"in \[0, 1\]"),
        ({"cores": "shared_sparse"}, "core_density", "give exactly one target"),
        ({"cores": "shared_sparse", "core_budget": -1}, "core_budget", ">= 0"),
        ({"cores": "task_rank"}, "task_rank", "expected an integer >= 1"),
        ({"cores": "task_rank", "task_rank": 0}, "task_rank", "expected an integer >= 1"),
        ({"task_rank": 2}, "task_rank", "only for cores: task_rank"),
        ({"core_density": 0.1}, "core_density", "only for cores: shared_sparse"),
    ],
)
def test_bad_config_names_the_field(data, field, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(JTuckerStageConfig, data, "stages[1].jtucker")
    assert err.value.path == f"stages[1].jtucker.{field}"


def test_task_rank_above_the_tasks_is_an_error():
    bundle, names = _joint_bundle()
    with pytest.raises(ValueError, match=r"task_rank: 4 is above the number of tasks \(3\)"):
        share_cores(bundle, names, CoreSharing("task_rank", task_rank=4))
    with pytest.raises(ValueError, match="not a joint Tucker layer"):
        share_cores(bundle, ["linear"], CoreSharing("task_rank", task_rank=2))


def test_jtucker_stage_with_shared_cores_in_a_recipe(tiny_recipe, tmp_path):
    jtucker = {
        "ranks": {"strategy": "ratio", "ratio": 0.5},
        "min_params": 100,
        "cores": "task_rank",
        "task_rank": 1,
    }
    stages = [{"jtucker": jtucker}, {"evaluate": {"latency": False}}]
    tasks = {"a": ["0", "1"], "b": ["2", "3"], "c": ["4", "5"]}
    path = tiny_recipe(stages, tasks=tasks, train_per_class=20)
    report = run_recipe(load_recipe(path), quiet=True)
    checkpoint = tmp_path / "out" / "stages" / "00-jtucker"
    metrics = json.loads((checkpoint / "result.json").read_text())["metrics"]["jtucker"]
    assert metrics["cores"]["cores"] == "task_rank" and metrics["cores"]["layers"]
    bundle = Bundle.load(checkpoint / "bundle")
    assert report.bundle["unique_parameters"] == bundle.unique_parameters()
    assert metrics["cores"]["unique_parameters"]["after"] == bundle.unique_parameters()

    # A params budget counts the cores as stored: one basis core here, so the decomposed
    # layers end up near the budget's share of their dense parameters, at higher ranks.
    budget = {"ranks": {"strategy": "budget", "budget": {"params": 0.4}}, "min_params": 100}
    for cores in ({}, {"cores": "task_rank", "task_rank": 1}):
        path = tiny_recipe([{"jtucker": {**budget, **cores}}], tasks=tasks, train_per_class=20)
        run_recipe(load_recipe(path), quiet=True, force=True)
        result = json.loads((checkpoint / "result.json").read_text())["metrics"]["jtucker"]
        rows = [row for row in result["layers"].values() if "kept_dense" not in row]
        dense = sum(row["params_before"] for row in rows)
        stored = result["cores"]["unique_parameters"] if cores else None
        ranks = sum(row["ranks"][0] * row["ranks"][1] for row in rows)
        if not cores:
            per_task_ranks = ranks
            assert sum(row["params_after"] for row in rows) <= 0.4 * dense
        else:
            assert ranks > per_task_ranks and stored["after"] < stored["before"]

    jtucker["task_rank"] = 4
    path = tiny_recipe(stages, tasks=tasks, train_per_class=20)
    with pytest.raises(ValueError, match=r"task_rank: 4 is above the number of tasks \(3\)"):
        run_recipe(load_recipe(path), quiet=True)
