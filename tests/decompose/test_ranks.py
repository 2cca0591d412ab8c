"""Rank strategies: each one on synthetic spectra, the budget greedy, EVBMF, configs, registry."""

import dataclasses
import os
import random
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from jtucker_plugin.decompose import ranks
from jtucker_plugin.decompose.budget import Budget, BudgetConfig, allocate_budget
from jtucker_plugin.decompose.ranks import (
    EnergyConfig,
    FixedConfig,
    LayerInfo,
    RatioConfig,
    energy_kept,
    energy_rank,
    list_rank_strategies,
    rank_config_from_dict,
    register_rank_strategy,
    select_ranks,
    tucker_macs,
    tucker_params,
)
from jtucker_plugin.decompose.vbmf import VBMFConfig, evbmf
from jtucker_plugin.recipe.schema import ConfigError, to_dict

BUILTINS = ["budget", "energy", "fixed", "ratio", "vbmf"]


def spectrum(n: int, rng: np.random.Generator, decay: float = 3.0) -> torch.Tensor:
    """Random descending positive eigenvalues, decaying by about 10**-decay over n."""
    values = rng.random(n) ** 2 * np.logspace(0, -decay, n) + 1e-9
    return torch.tensor(np.sort(values)[::-1].copy())


def make_layer(name, s, c, rng, k=3, t=2, out_hw=(1, 1), in_hw=(1, 1), **eig) -> LayerInfo:
    return LayerInfo(
        name,
        out_channels=s,
        in_channels=c,
        kernel_size=(k, k),
        n_tasks=t,
        eig_out=eig.get("eig_out", spectrum(s, rng)),
        eig_in=eig.get("eig_in", spectrum(c, rng)),
        out_hw=out_hw,
        in_hw=in_hw,
    )


def random_layers(rng: np.random.Generator, n: int) -> list[LayerInfo]:
    out = []
    for i in range(n):
        k = int(rng.choice([1, 3, 5]))
        hw = int(rng.choice([1, 4, 8]))
        stride = int(rng.choice([1, 2]))
        out.append(
            make_layer(
                f"block{i}.conv",
                int(rng.integers(1, 48)),
                int(rng.integers(1, 48)),
                rng,
                k=k,
                t=int(rng.integers(1, 5)),
                out_hw=(hw, hw),
                in_hw=(hw * stride, hw * stride),
            )
        )
    return out


# Independent restatements of the cost formulas (METHODS.md sections 1 and 5).
def params(layer: LayerInfo, r1: int, r2: int) -> int:
    k = layer.kernel_size[0] * layer.kernel_size[1]
    s, c = layer.out_channels, layer.in_channels
    return s * r1 + c * r2 + layer.n_tasks * r1 * r2 * k


def macs(layer: LayerInfo, r1: int, r2: int) -> int:
    k = layer.kernel_size[0] * layer.kernel_size[1]
    hw, hw_out = np.prod(layer.in_hw), np.prod(layer.out_hw)
    return int(hw * layer.in_channels * r2 + hw_out * r2 * r1 * k + hw_out * r1 * layer.out_channels)


COST = {"params": (params, "dense_params"), "macs": (macs, "dense_macs")}


def effective_cost(layers, chosen, cost) -> tuple[int, int]:
    """(sum of min(dense, Tucker) at the chosen ranks, sum of dense)."""
    fn, dense = COST[cost]
    used = sum(min(getattr(l, dense), fn(l, *chosen[l.name])) for l in layers)
    return used, sum(getattr(l, dense) for l in layers)


def largest_step(layers, cost) -> int:
    """The largest cost of adding one rank direction anywhere (at the other mode's full rank)."""
    fn, _ = COST[cost]
    return max(
        max(
            fn(l, 1, l.in_channels) - fn(l, 0, l.in_channels),
            fn(l, l.out_channels, 1) - fn(l, l.out_channels, 0),
        )
        for l in layers
    )


def assert_in_range(layers, chosen) -> None:
    assert list(chosen) == [l.name for l in layers]
    for l in layers:
        r1, r2 = chosen[l.name]
        assert type(r1) is int and type(r2) is int
        assert 1 <= r1 <= l.out_channels and 1 <= r2 <= l.in_channels, (l.name, r1, r2)


# --- LayerInfo


def test_costs_by_hand():
    layer = LayerInfo("conv", 8, 4, (3, 3), 2, torch.ones(8), torch.ones(4), out_hw=(5, 5), in_hw=(10, 10))
    assert layer.dense_params == 2 * 8 * 4 * 9
    assert layer.dense_macs == 25 * 8 * 4 * 9
    assert tucker_params(layer, (3, 2)) == 8 * 3 + 4 * 2 + 2 * 3 * 2 * 9
    assert tucker_macs(layer, (3, 2)) == 100 * 4 * 2 + 25 * 2 * 3 * 9 + 25 * 3 * 8
    with pytest.raises(ValueError, match=r"layer 'conv'.*\[1, 8\].*\[1, 4\].*\(9, 2\)"):
        tucker_params(layer, (9, 2))
    with pytest.raises(ValueError, match="must be two integers"):
        tucker_macs(layer, (0, 2))


def test_shared_cores_cost_their_stored_copies_and_a_budget_buys_higher_ranks():
    spectrum = torch.linspace(1.0, 0.1, 16)
    per_task = LayerInfo("conv", 16, 16, (3, 3), 3, spectrum, spectrum)
    shared = LayerInfo("conv", 16, 16, (3, 3), 3, spectrum, spectrum, core_copies=1.15)
    assert tucker_params(per_task, (8, 8)) == 16 * 8 * 2 + 3 * 64 * 9
    assert tucker_params(shared, (8, 8)) == round(16 * 8 * 2 + 1.15 * 64 * 9)
    low = allocate_budget([per_task], 0.3, cost="params")["conv"]
    high = allocate_budget([shared], 0.3, cost="params")["conv"]
    assert high[0] * high[1] > low[0] * low[1]
    assert tucker_params(shared, high) <= 0.3 * shared.dense_params
    with pytest.raises(ValueError, match="core_copies must be a number > 0, got 0"):
        LayerInfo("conv", 16, 16, (3, 3), 3, spectrum, spectrum, core_copies=0)


def test_layer_info_validates_spectra():
    # Rounding noise from eigh below zero is tolerated and clamped.
    layer = LayerInfo("fc", 3, 2, (1, 1), 1, [2.0, 1.0, -1e-9], np.array([1.0, 0.5]))
    assert layer.eig_out.dtype == torch.float64 and layer.eig_out[-1] == 0
    with pytest.raises(ValueError, match=r"'fc': eig_out must have shape \(3,\), got \(2,\)"):
        LayerInfo("fc", 3, 2, (1, 1), 1, torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="eig_in must be in descending order"):
        LayerInfo("fc", 3, 2, (1, 1), 1, torch.ones(3), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="eig_in has a negative eigenvalue"):
        LayerInfo("fc", 3, 2, (1, 1), 1, torch.ones(3), torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="n_tasks must be a positive integer, got 0"):
        LayerInfo("fc", 3, 2, (1, 1), 0, torch.ones(3), torch.ones(2))


def test_energy_kept_bounds_the_true_kept_energy():
    rng = np.random.default_rng(0)
    t, s, c, k = 3, 12, 10, 3
    x = torch.tensor(rng.normal(size=(t, s, c, k, k))) * torch.linspace(2, 0.1, s)[:, None, None, None]
    unfold1 = x.permute(1, 0, 2, 3, 4).reshape(s, -1)
    unfold2 = x.permute(2, 0, 1, 3, 4).reshape(c, -1)
    e1, u = torch.linalg.eigh(unfold1 @ unfold1.T)
    e2, v = torch.linalg.eigh(unfold2 @ unfold2.T)
    layer = LayerInfo("conv", s, c, (k, k), t, e1.flip(0), e2.flip(0))
    for r1, r2 in [(1, 1), (3, 7), (12, 2), (12, 10)]:
        uu, vv = u.flip(1)[:, :r1], v.flip(1)[:, :r2]
        projected = torch.einsum("tscij,sa,cb->tabij", x, uu, vv)
        true = float(projected.pow(2).sum() / x.pow(2).sum())
        kept1 = float(layer.eig_out[:r1].sum() / layer.eig_out.sum())
        kept2 = float(layer.eig_in[:r2].sum() / layer.eig_in.sum())
        assert energy_kept(layer, (r1, r2)) == pytest.approx(kept1 * kept2)
        # The product lies where the true value must: between the HOSVD bound and min(e1, e2).
        assert kept1 + kept2 - 1 - 1e-9 <= true <= min(kept1, kept2) + 1e-9
        assert kept1 + kept2 - 1 - 1e-9 <= kept1 * kept2 <= min(kept1, kept2) + 1e-9
    assert energy_kept(layer, (s, c)) == pytest.approx(1.0)
    zero = LayerInfo("z", 2, 2, (1, 1), 1, torch.zeros(2), torch.zeros(2))
    assert energy_kept(zero, (1, 1)) == 1.0


# --- fixed, ratio, energy


def test_fixed_ranks_overrides_and_clip():
    rng = np.random.default_rng(1)
    layers = [
        make_layer("conv1", 16, 3, rng),
        make_layer("layer3.0.conv1", 64, 32, rng),
        make_layer("layer3.1.conv1", 64, 64, rng),
    ]
    config = FixedConfig(rank=[8, 4], layers={"layer3.*": 16, "layer3.1.*": [20, 10]}, clip=True)
    assert config.rank == (8, 4)  # lists are normalised to tuples
    chosen = select_ranks(config, layers)
    assert chosen == {"conv1": (8, 3), "layer3.0.conv1": (16, 16), "layer3.1.conv1": (20, 10)}
    with pytest.raises(ValueError, match=r"\(8, 4\) exceed the full ranks \(16, 3\) of layer 'conv1'.*clip"):
        select_ranks(FixedConfig(rank=[8, 4]), layers)
    with pytest.raises(ValueError, match="pattern 'layer4.*' in 'layers' matches no layer"):
        select_ranks(FixedConfig(rank=1, layers={"layer4.*": 2}), layers)


def test_ratio_ranks_round_half_up_and_at_least_one():
    rng = np.random.default_rng(2)
    layers = [make_layer("a", 10, 5, rng), make_layer("b", 3, 100, rng)]
    assert select_ranks(RatioConfig(ratio=0.25), layers) == {"a": (3, 1), "b": (1, 25)}
    assert select_ranks(RatioConfig(ratio=[0.5, 0.1]), layers) == {"a": (5, 1), "b": (2, 10)}
    assert select_ranks(RatioConfig(ratio=1), layers) == {"a": (10, 5), "b": (3, 100)}


def test_energy_ranks_on_known_spectra():
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.7) == 2  # 7/10 exactly
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.71) == 3
    assert energy_rank(torch.tensor([5.0, 5.0, 0.0, 0.0]), 1.0) == 2  # zero directions dropped
    assert energy_rank(torch.zeros(3), 0.9) == 1
    layer = LayerInfo(
        "fc", 4, 3, (1, 1), 2, torch.tensor([8.0, 1.0, 0.5, 0.5]), torch.tensor([6.0, 3.0, 1.0])
    )
    assert select_ranks(EnergyConfig(energy=0.85), [layer]) == {"fc": (2, 2)}
    assert select_ranks(EnergyConfig(energy=0.95), [layer]) == {"fc": (3, 3)}
    assert select_ranks(EnergyConfig(energy=1.0), [layer]) == {"fc": (4, 3)}


# --- budget


@pytest.mark.parametrize("cost", ["params", "macs"])
def test_budget_is_respected_and_tight_on_random_layers(cost):
    rng = np.random.default_rng(3)
    for _ in range(40):
        layers = random_layers(rng, int(rng.integers(1, 6)))
        fn, dense = COST[cost]
        total = sum(getattr(l, dense) for l in layers)
        least = sum(min(getattr(l, dense), fn(l, 1, 1)) for l in layers) / total
        fraction = float(rng.uniform(least, 1.0))
        chosen = allocate_budget(layers, fraction, cost=cost)
        assert_in_range(layers, chosen)
        used, total = effective_cost(layers, chosen, cost)
        assert used <= fraction * total
        # After the refill no direction fits: the slack is below one step of some layer.
        slack = fraction * total - used
        assert slack < largest_step(layers, cost)
        for l in layers:  # and no Tucker layer can grow or return to dense within it
            r1, r2 = chosen[l.name]
            dense_cost, here = getattr(l, dense), fn(l, r1, r2)
            if here < dense_cost:
                assert dense_cost - here > slack
                for g1, g2 in ((r1 + 1, r2), (r1, r2 + 1)):
                    if g1 <= l.out_channels and g2 <= l.in_channels:
                        grown = fn(l, g1, g2)
                        assert grown >= dense_cost or grown - here > slack


def test_budget_is_tight_on_a_vgg16_sized_network():
    rng = np.random.default_rng(4)
    sizes = [(64, 3, 32), (64, 64, 32), (128, 64, 16), (128, 128, 16), (256, 128, 8)]
    sizes += [(256, 256, 8)] * 2 + [(512, 256, 4)] + [(512, 512, 4)] * 2 + [(512, 512, 2)] * 3
    layers = [
        make_layer(f"features.{i}", s, c, rng, t=3, out_hw=(hw, hw), in_hw=(hw, hw))
        for i, (s, c, hw) in enumerate(sizes)
    ]
    for cost, fraction in [("params", 0.1), ("params", 0.5), ("macs", 0.3), ("macs", 0.95)]:
        chosen = select_ranks(BudgetConfig(budget=Budget(**{cost: fraction})), layers)
        used, total = effective_cost(layers, chosen, cost)
        assert fraction - 1e-3 < used / total <= fraction


@pytest.mark.parametrize("flat_first", [True, False])
def test_budget_cuts_the_flat_then_negligible_layer_first(flat_first):
    negligible = torch.cat([torch.ones(8), torch.full((56,), 1e-6)])
    spread = torch.linspace(1.0, 0.5, 64)
    rng = np.random.default_rng(5)
    flat = make_layer("flat", 64, 64, rng, t=3, eig_out=negligible, eig_in=negligible)
    wide = make_layer("spread", 64, 64, rng, t=3, eig_out=spread, eig_in=spread)
    layers = [flat, wide] if flat_first else [wide, flat]
    chosen = allocate_budget(layers, 0.3)
    # Its 8 strong directions are kept, and little else (the refill may add back a few).
    assert min(chosen["flat"]) >= 8 and max(chosen["flat"]) <= 12
    assert 30 < min(chosen["spread"]) < 64
    assert energy_kept(flat, chosen["flat"]) > 0.9999
    # With room for the spread layer to stay dense, it does: full ranks mean dense.
    roomy = allocate_budget(layers, 0.9)
    assert roomy["spread"] == (64, 64)
    assert min(roomy["flat"]) >= 8


def test_budget_handles_layers_that_cannot_beat_dense():
    rng = np.random.default_rng(6)
    # 2 -> 1 linear: dense 2 params, Tucker at (1, 1) costs 2 + 1 + 1 = 4.
    tiny = make_layer("tiny", 2, 1, rng, k=1, t=1)
    # 16 -> 32 pointwise conv, one task: Tucker beats dense (512) only below ranks ~(10, 10).
    pointwise = make_layer("pointwise", 32, 16, rng, k=1, t=1)
    big = make_layer("big", 32, 32, rng, t=2)
    assert params(tiny, 1, 1) > tiny.dense_params
    chosen = allocate_budget([tiny, big], 0.5)
    assert chosen["tiny"] == (2, 1)
    used, total = effective_cost([tiny, big], chosen, "params")
    assert used <= 0.5 * total
    # A single layer whose Tucker form saves only at low ranks: one jump from dense, then refill.
    for fraction in (0.3, 0.6, 0.9):
        chosen = allocate_budget([pointwise], fraction)
        r1, r2 = chosen["pointwise"]
        assert params(pointwise, r1, r2) <= fraction * 512
        assert fraction * 512 - params(pointwise, r1, r2) < largest_step([pointwise], "params")
    assert allocate_budget([pointwise], 1.0) == {"pointwise": (32, 16)}
    # The least achievable fraction counts the tiny layer as dense: (2 + 49) / (2 + 512).
    with pytest.raises(ValueError, match=r"budget params=0\.05 cannot be met.*at least 0\.09922"):
        allocate_budget([tiny, pointwise], 0.05)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_budget_outside_unit_interval_raises_with_the_least_fraction(fraction):
    layer = make_layer("fc", 32, 16, np.random.default_rng(7), k=1, t=1)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\].*at least 0\.0957"):
        allocate_budget([layer], fraction)
    with pytest.raises(ValueError, match="must be a fraction in"):
        Budget(params=fraction)


def test_budget_with_zero_energy_directions():
    rng = np.random.default_rng(8)
    low_rank = torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.zeros(29)])
    layers = [
        make_layer("a", 32, 32, rng, eig_out=low_rank, eig_in=low_rank),
        make_layer("b", 16, 8, rng),
    ]
    chosen = allocate_budget(layers, 0.2)
    assert_in_range(layers, chosen)
    assert chosen["a"][0] >= 3 and chosen["a"][1] >= 3
    assert energy_kept(layers[0], chosen["a"]) == pytest.approx(1.0)
    used, total = effective_cost(layers, chosen, "params")
    assert used <= 0.2 * total


# --- vbmf


def noisy_low_rank(rng, rows, cols, rank, noise):
    signal = rng.normal(size=(rows, rank)) @ rng.normal(size=(rank, cols)) * 3
    return signal + noise * rng.normal(size=(rows, cols))


@pytest.mark.parametrize("shape", [(30, 120), (120, 30), (50, 60)])
def test_evbmf_recovers_rank_and_noise(shape):
    rng = np.random.default_rng(9)
    y = noisy_low_rank(rng, *shape, rank=4, noise=0.5)
    eig = torch.tensor(np.linalg.eigvalsh(y @ y.T)[::-1].copy())
    rank, sigma2 = evbmf(eig, *shape)
    assert rank == 4
    assert sigma2 == pytest.approx(0.25, rel=0.15)
    # Scale-free: the same rank at the scale of typical weights.
    assert evbmf(eig * 1e-8, *shape)[0] == 4
    assert evbmf(torch.zeros(shape[0]), *shape) == (0, 0.0)


def test_vbmf_ranks_of_a_stacked_layer():
    rng = np.random.default_rng(10)
    t, s, c, k, r1, r2 = 3, 24, 16, 3, 5, 3
    u = np.linalg.qr(rng.normal(size=(s, r1)))[0]
    v = np.linalg.qr(rng.normal(size=(c, r2)))[0]
    cores = rng.normal(size=(t, r1, r2, k, k)) * 10
    x = np.einsum("tabij,sa,cb->tscij", cores, u, v) + 0.1 * rng.normal(size=(t, s, c, k, k))
    unfold1 = x.transpose(1, 0, 2, 3, 4).reshape(s, -1)
    unfold2 = x.transpose(2, 0, 1, 3, 4).reshape(c, -1)
    eig_out = np.linalg.eigvalsh(unfold1 @ unfold1.T)[::-1].copy()
    eig_in = np.linalg.eigvalsh(unfold2 @ unfold2.T)[::-1].copy()
    layer = LayerInfo("conv", s, c, (k, k), t, torch.tensor(eig_out), torch.tensor(eig_in))
    pure_noise = make_layer("noise", 8, 8, rng, eig_out=torch.ones(8), eig_in=torch.zeros(8))
    chosen = select_ranks(VBMFConfig(), [layer, pure_noise])
    assert chosen["conv"] == (r1, r2)
    assert chosen["noise"][1] == 1  # EVBMF finds rank 0; strategies answer at least 1


# --- all strategies


def test_every_builtin_gives_ranks_in_range_on_random_spectra():
    rng = np.random.default_rng(11)
    pyrng = random.Random(11)
    assert set(BUILTINS) <= set(list_rank_strategies())
    for _ in range(15):
        layers = random_layers(rng, int(rng.integers(1, 5)))
        total = sum(l.dense_params for l in layers)
        least = sum(min(l.dense_params, params(l, 1, 1)) for l in layers) / total
        configs = [
            FixedConfig(rank=[pyrng.randint(1, 60), pyrng.randint(1, 60)], clip=True),
            RatioConfig(ratio=pyrng.uniform(0.001, 1)),
            EnergyConfig(energy=pyrng.uniform(0.001, 1)),
            BudgetConfig(budget=Budget(params=pyrng.uniform(least, 1))),
            VBMFConfig(),
        ]
        for config in configs:
            assert_in_range(layers, select_ranks(config, layers))


def test_select_ranks_checks_what_a_strategy_returns():
    layer = make_layer("fc", 4, 3, np.random.default_rng(12), k=1)
    with pytest.raises(ValueError, match=r"layer 'fc' must be two integers.*got \(5, 1\)"):
        select_ranks(lambda layers, **_: {"fc": (5, 1)}, [layer])
    with pytest.raises(ValueError, match=r"missing \['fc'\] and for unknown layers \['fx'\]"):
        select_ranks(lambda layers, **_: {"fx": (1, 1)}, [layer])
    with pytest.raises(ValueError, match=r"duplicates \['fc'\]"):
        select_ranks(RatioConfig(ratio=0.5), [layer, layer])


# --- configs


def test_builtin_configs_round_trip():
    configs = [
        FixedConfig(rank=4, layers={"layer3.*": [8, 2]}, clip=True),
        RatioConfig(ratio=[0.5, 0.25]),
        EnergyConfig(energy=0.9),
        BudgetConfig(budget=Budget(macs=0.4)),
        VBMFConfig(),
    ]
    for config in configs:
        assert rank_config_from_dict(to_dict(config)) == config
    assert rank_config_from_dict({"strategy": "budget", "budget": {"params": 0.3}}) == BudgetConfig(
        budget=Budget(params=0.3)
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"strategy": "enrgy", "energy": 0.9},
            "jt.ranks.strategy: unknown rank strategy 'enrgy'; did you mean 'energy'?; "
            "available: budget, energy, fixed, ga, ratio, vbmf",
        ),
        ({"energy": 0.9}, "jt.ranks.strategy: missing required key (one of: budget, energy"),
        (
            {"strategy": "energy", "enrgy": 0.9},
            "jt.ranks.enrgy: unknown key 'enrgy'; did you mean 'energy'?",
        ),
        ({"strategy": "energy", "energy": 1.5}, "jt.ranks.energy: must be in (0, 1], got 1.5"),
        (
            {"strategy": "ratio", "ratio": [0.5, 0.2, 0.1]},
            "jt.ranks.ratio: expected one value or a pair",
        ),
        ({"strategy": "fixed", "rank": 0}, "jt.ranks.rank: ranks must be integers >= 1, got 0"),
        (
            {"strategy": "fixed", "rank": 2, "layers": {"a.*": "x"}},
            "jt.ranks.layers.a.*: expected an integer or a list",
        ),
        ({"strategy": "budget", "budget": 0.3}, "jt.ranks.budget: expected a mapping, got 0.3"),
        (
            {"strategy": "budget", "budget": {"flops": 0.3}},
            "jt.ranks.budget.flops: unknown key 'flops'; allowed: params, macs",
        ),
        (
            {"strategy": "budget", "budget": {"params": 0.3, "macs": 0.3}},
            "jt.ranks.budget: expected exactly one of params, macs",
        ),
        (
            {"strategy": "budget", "budget": {"macs": 0}},
            "jt.ranks.budget.macs: must be a fraction in (0, 1]",
        ),
        ("energy", "jt.ranks: expected a mapping with a 'strategy' key"),
    ],
)
def test_config_errors_name_the_path(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        rank_config_from_dict(data, path="jt.ranks")


# --- registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyGAConfig:
    strategy: Literal["toy-ga"] = "toy-ga"
    population: int = 4


def test_a_strategy_from_another_module_plugs_in(monkeypatch):
    # A private copy of the registry, restored after the test, so the toy does not leak.
    monkeypatch.setattr(ranks, "_STRATEGIES", dict(ranks._STRATEGIES))

    @register_rank_strategy("toy-ga", config=ToyGAConfig)
    def toy_ga(config, layers, *, evaluate=None, seed=0):
        rng = random.Random(seed)
        candidates = [
            {l.name: (rng.randint(1, l.out_channels), rng.randint(1, l.in_channels)) for l in layers}
            for _ in range(config.population)
        ]
        return max(candidates, key=evaluate)

    assert "toy-ga" in list_rank_strategies()
    config = rank_config_from_dict({"strategy": "toy-ga", "population": 6})
    assert config == ToyGAConfig(population=6)
    layers = random_layers(np.random.default_rng(13), 3)
    seen = []

    def size(candidate):
        return sum(r1 + r2 for r1, r2 in candidate.values())

    def evaluate(candidate):
        seen.append(candidate)
        return size(candidate)

    chosen = select_ranks(config, layers, evaluate=evaluate, seed=3)
    assert len(seen) == 6 and chosen == max(seen, key=size)
    assert select_ranks(config, layers, evaluate=evaluate, seed=3) == chosen  # seeded
    with pytest.raises(ConfigError, match=r"ranks\.population: expected an integer"):
        rank_config_from_dict({"strategy": "toy-ga", "population": "many"})
    with pytest.raises(ValueError, match="'toy-ga' is already registered"):
        register_rank_strategy("toy-ga", config=ToyGAConfig)(toy_ga)


def test_register_rejects_configs_without_the_strategy_field():
    @dataclasses.dataclass(frozen=True)
    class NoName:
        population: int = 4

    with pytest.raises(TypeError, match=r"field `strategy: Literal\['nameless'\] = 'nameless'`"):
        register_rank_strategy("nameless", config=NoName)
    with pytest.raises(TypeError, match="takes a RatioConfig"):
        ranks.get_rank_strategy(dataclasses.replace(ToyGAConfig(), strategy="ratio"))


# --- real spectra


def shared_data() -> Path:
    root = Path(os.environ.get("JTUCKER_DATA", Path(__file__).parents[2] / ".." / "shared" / "data"))
    if not (root / "weights" / "resnet20-12fca82f.th").is_file():
        pytest.skip(f"ResNet-20 weights not found under {root} (set JTUCKER_DATA)")
    return root


@pytest.mark.shared_data
def test_strategies_on_resnet20_spectra():
    path = shared_data() / "weights" / "resnet20-12fca82f.th"
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    layers = []
    for key, weight in state.items():
        if key.endswith(".weight") and weight.ndim == 4:
            s, c, kh, kw = weight.shape
            w = weight.double()
            unfold1, unfold2 = w.reshape(s, -1), w.transpose(0, 1).reshape(c, -1)
            eig_out = torch.linalg.eigvalsh(unfold1 @ unfold1.T).flip(0)
            eig_in = torch.linalg.eigvalsh(unfold2 @ unfold2.T).flip(0)
            name = key.removeprefix("module.").removesuffix(".weight")
            layers.append(LayerInfo(name, s, c, (kh, kw), 1, eig_out, eig_in))
    assert len(layers) == 19
    for config in [VBMFConfig(), EnergyConfig(energy=0.9), RatioConfig(ratio=0.5)]:
        assert_in_range(layers, select_ranks(config, layers))
    chosen = select_ranks(BudgetConfig(budget=Budget(params=0.4)), layers)
    used, total = effective_cost(layers, chosen, "params")
    assert 0.39 < used / total <= 0.4
    # Trained weights have decaying spectra: the greedy keeps most energy at 40% of the params.
    kept = [energy_kept(l, chosen[l.name]) for l in layers if params(l, *chosen[l.name]) < l.dense_params]
    assert kept and float(np.mean(kept)) > 0.5
