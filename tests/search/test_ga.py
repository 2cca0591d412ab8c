"""The ``ga`` rank strategy: known optima, the budget, determinism, the cache, recipes."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_recipe_data

from jtucker_plugin.decompose.budget import Budget
from jtucker_plugin.decompose.layers import TuckerConv2d
from jtucker_plugin.decompose.ranks import (
    LayerInfo,
    energy_kept,
    list_rank_strategies,
    rank_config_from_dict,
    select_ranks,
    tucker_macs,
    tucker_params,
)
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.load import load_recipe, parse_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.recipe.schema import ConfigError, to_dict
from jtucker_plugin.search.ga import GAConfig, search_ranks


def spectrum(n: int, rng: np.random.Generator) -> torch.Tensor:
    values = rng.random(n) ** 2 * np.logspace(0, -3, n) + 1e-9
    return torch.tensor(np.sort(values)[::-1].copy())


def make_layers(shapes=((16, 16), (32, 16), (32, 32)), seed=0, hw=(4, 4)) -> list[LayerInfo]:
    rng = np.random.default_rng(seed)
    return [
        LayerInfo(f"l{i}", s, c, (3, 3), 2, spectrum(s, rng), spectrum(c, rng), out_hw=hw, in_hw=hw)
        for i, (s, c) in enumerate(shapes)
    ]


def cost_fraction(layers, ranks, cost="params") -> float:
    """min(dense, Tucker) summed over layers, over the dense sum: the ``budget`` meaning."""
    fn, dense = (tucker_params, "dense_params") if cost == "params" else (tucker_macs, "dense_macs")
    used = sum(min(getattr(l, dense), fn(l, ranks[l.name])) for l in layers)
    return used / sum(getattr(l, dense) for l in layers)


def mean_energy(layers):
    """A monotone accuracy proxy: the mean energy kept; its optimum sits on the budget's edge."""
    return lambda ranks: float(np.mean([energy_kept(l, ranks[l.name]) for l in layers]))


def config(fraction=0.3, cost="params", **kw) -> GAConfig:
    return GAConfig(budget=Budget(**{cost: fraction}), progress=False, **kw)


def test_registered_and_config_from_recipe_data():
    assert "ga" in list_rank_strategies()
    data = {"strategy": "ga", "budget": {"macs": 0.5}, "crossover": [0.5, 0.9], "workers": 2}
    cfg = rank_config_from_dict(data)
    assert cfg == GAConfig(budget=Budget(macs=0.5), crossover=(0.5, 0.9), workers=2)
    assert rank_config_from_dict(to_dict(cfg)) == cfg
    bad = {
        "elite": (16, r"ranks\.elite: must be below population \(16\), got 16"),
        "tournament": (17, r"ranks\.tournament: must be at most population"),
        "mutation": ([0.5, 0.1], r"ranks\.mutation: expected \[low, high\]"),
        "crossover": ([0.5], r"ranks\.crossover: expected \[low, high\]"),
        "rank_step": (0, r"ranks\.rank_step: expected an integer >= 1, got 0"),
        "penalty": (-1.0, r"ranks\.penalty: expected a number >= 0"),
        "generation": (
            3,
            r"ranks\.generation: unknown key 'generation'; did you mean 'generations'",
        ),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            rank_config_from_dict({"strategy": "ga", "budget": {"params": 0.3}, key: value})
    with pytest.raises(ConfigError, match=r"ranks\.budget: missing required key"):
        rank_config_from_dict({"strategy": "ga"})


def test_finds_a_known_optimum_inside_the_budget():
    layers = make_layers()
    target = {"l0": (8, 4), "l1": (12, 8), "l2": (16, 20)}  # on the rank_step=4 grid
    assert cost_fraction(layers, target) < 0.4

    def peaked(ranks):  # 1 at target, falling with the L1 distance
        return 1 - sum(abs(a - b) for n in ranks for a, b in zip(ranks[n], target[n], strict=True)) / 200

    for seed in (0, 2, 3):
        result = search_ranks(layers, peaked, config(0.4, population=12, generations=20), seed=seed)
        assert result.ranks == target, seed
        assert result.accuracy == 1.0
        assert result.cost_fraction == pytest.approx(cost_fraction(layers, target))


def test_finds_the_brute_force_optimum_on_the_budget_edge():
    """Accuracy grows with ranks, so the best ranks spend the budget: the GA must find the
    best trade-off among the 5^6 grid points, not just move towards larger ranks."""
    layers, fraction = make_layers(), 0.2
    score = mean_energy(layers)
    grids = [
        list(itertools.product(*(sorted({1, *range(4, n, 4), n}) for n in (l.out_channels, l.in_channels))))
        for l in layers
    ]
    best = max(
        (score(r), r)
        for combo in itertools.product(*grids)
        if cost_fraction(layers, r := dict(zip(["l0", "l1", "l2"], combo, strict=True))) <= fraction
    )
    for seed in (0, 1):
        result = search_ranks(layers, score, config(fraction, generations=25), seed=seed)
        assert result.ranks == best[1], seed
        assert result.accuracy == pytest.approx(best[0])
        # It improved on the greedy start (generation 0 holds it and its perturbations).
        assert result.history[0]["best_accuracy"] < result.accuracy


@pytest.mark.parametrize("cost", ["params", "macs"])
def test_budget_respected_under_pressure(cost):
    """A proxy rewarding any extra rank pushes the search beyond the cap; the answer stays in."""
    layers = make_layers(((16, 8), (32, 16), (24, 24), (8, 32)), seed=3)
    scored = []

    def greedy_for_ranks(ranks):
        scored.append(cost_fraction(layers, ranks, cost))
        return sum(r1 + r2 for r1, r2 in ranks.values()) / 1000

    for fraction in (0.15, 0.4):
        scored.clear()
        result = search_ranks(layers, greedy_for_ranks, config(fraction, cost, generations=5), seed=1)
        assert result.cost_fraction == pytest.approx(cost_fraction(layers, result.ranks, cost))
        assert result.cost_fraction <= fraction
        assert max(scored) > fraction  # it did look beyond the budget
        for name, (r1, r2) in result.ranks.items():
            layer = next(l for l in layers if l.name == name)
            assert 1 <= r1 <= layer.out_channels and 1 <= r2 <= layer.in_channels


def test_impossible_budgets_and_bad_evaluate_raise():
    layers = make_layers()
    least = cost_fraction(layers, {l.name: (1, 1) for l in layers})
    with pytest.raises(ValueError, match=r"ga ranks: budget params=0\.001 cannot be met.*at least 0\.0"):
        search_ranks(layers, mean_energy(layers), config(0.001))
    with pytest.raises(ValueError, match=r"budget macs=0\.001 cannot be met"):
        search_ranks(layers, mean_energy(layers), config(0.001, "macs"))
    # Just at the least cost, the only answer is ranks (1, 1) everywhere.
    result = search_ranks(layers, mean_energy(layers), config(least * 1.0001, generations=2))
    assert result.ranks == {l.name: (1, 1) for l in layers}
    with pytest.raises(ValueError, match="rank strategy 'ga'.*needs evaluate"):
        select_ranks(config(), layers)
    with pytest.raises(ValueError, match="no layers to rank"):
        search_ranks([], mean_energy(layers), config())
    with pytest.raises(ValueError, match=r"evaluate returned nan for ranks \{'l0': \("):
        search_ranks(layers, lambda ranks: float("nan"), config())


def test_cache_scores_each_ranks_once():
    layers = make_layers(((8, 8), (8, 8)))
    calls = []

    def counted(ranks):
        calls.append(tuple(ranks.values()))
        return mean_energy(layers)(ranks)

    cfg = config(0.5, population=8, generations=12, rank_step=4)
    result = search_ranks(layers, counted, cfg)
    assert len(calls) == len(set(calls)) == result.evaluations
    # 8 + 12 * 6 chromosomes were scored, over a grid of only (3 * 3)^2 = 81 ranks.
    assert result.evaluations < 8 + 12 * 6
    assert [h["evaluations"] for h in result.history] == sorted(h["evaluations"] for h in result.history)
    # Ranks that cannot beat dense are handed over as full ranks: one key for all of them.
    assert all(
        tucker_params(l, r) < l.dense_params or r == (l.out_channels, l.in_channels)
        for ranks in calls
        for l, r in zip(layers, ranks, strict=True)
    )


def test_deterministic_under_a_seed_for_any_number_of_workers():
    layers = make_layers()
    score = mean_energy(layers)  # a closure: the workers inherit it by fork, unpickled
    cfg = config(0.25, population=6, generations=3)
    first = search_ranks(layers, score, cfg, seed=7)
    again = search_ranks(layers, score, cfg, seed=7)
    forked = search_ranks(layers, score, dataclasses.replace(cfg, workers=2), seed=7)
    assert first == again == forked
    others = [search_ranks(layers, score, cfg, seed=s).history for s in (8, 9)]
    assert any(h != first.history for h in others)  # the seed does drive the search


def test_recipe_jtucker_with_ga_ranks_end_to_end(tmp_path):
    """On the untrained initial models (the search does not care, and training is slow on a
    busy machine), with two forked workers scoring real decompositions."""
    ranks = {
        "strategy": "ga",
        "budget": {"params": 0.3},
        "generations": 2,
        "population": 4,
        "workers": 2,
    }
    stages = [{"jtucker": {"ranks": ranks, "min_params": 0, "calibration_samples": 64}}]
    data = tiny_recipe_data(tmp_path, stages, name="tiny-ga")
    recipe = parse_recipe(data)
    assert recipe.stages[0].config.ranks == GAConfig(
        budget=Budget(params=0.3), generations=2, population=4, workers=2
    )
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    report = run_recipe(load_recipe(path), quiet=True)
    assert [s["status"] for s in report.stages] == ["ran"]
    stage = tmp_path / "out" / "stages" / "00-jtucker"
    rows = json.loads((stage / "result.json").read_text())["metrics"]["jtucker"]["layers"]
    assert len(rows) == 6
    model = Bundle.load(stage / "bundle").models["a"]
    # Budget meaning: min(dense, Tucker) over the layers' dense weights, for both tasks.
    dense = {
        name: 2 * model.get_submodule(name).weight.numel()
        for name, row in rows.items()
        if "kept_dense" in row
    }
    before = sum(row.get("params_before", dense.get(name)) for name, row in rows.items())
    after = sum(row.get("params_after", dense.get(name)) for name, row in rows.items())
    assert after <= 0.3 * before
    assert any(isinstance(m, TuckerConv2d) for m in model.modules())
