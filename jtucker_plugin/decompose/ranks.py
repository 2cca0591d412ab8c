"""Shared rank selection: the Tucker-2 ranks ``(R1, R2)`` of each layer, chosen once for all tasks.

J-Tucker factors each layer's stacked kernels ``X`` (``T x S x C x kh x kw``) as
``W_t ~= G_t x1 U x2 V`` with ``U`` (``S x R1``) and ``V`` (``C x R2``) shared by the ``T``
tasks. A rank strategy sees each layer as a :class:`LayerInfo` (its shape and the joint
spectra: the eigenvalues of ``sum_t X_t(1) X_t(1)^T`` and of the mode-2 analogue) and returns
``{layer name: (R1, R2)}``. Both spectra sum to ``sum_t ||W_t||^2``, the layer's energy.

A strategy is a function registered with a frozen dataclass config, so that recipes name it as
data (``ranks: {strategy: energy, energy: 0.9}``) and a new one (the genetic algorithm,
BATUDE) plugs in from its own module without touching the orchestrator::

    @register_rank_strategy("ga", config=GAConfig)
    def ga_ranks(config, layers, *, evaluate=None, seed=0) -> Ranks: ...

This module holds what strategies share: :class:`LayerInfo`, what ranks cost
(:func:`tucker_params`, :func:`tucker_macs`, :func:`energy_kept`), the registry, and the simple
strategies ``fixed``, ``ratio`` and ``energy``. The others have their own modules, which the
registry imports on first use: ``budget`` (:mod:`jtucker_plugin.decompose.budget`), ``vbmf``
(:mod:`jtucker_plugin.decompose.vbmf`) and ``ga`` (:mod:`jtucker_plugin.search.ga`).
``select_ranks`` runs one and checks its answer; ``rank_config_from_dict`` reads its config
from recipe data.
Full ranks ``(S, C)``, or any ranks whose Tucker layer stores more than the dense one, mean
"keep this layer dense": the orchestrator decides that by comparing parameter counts.

Examples
--------
>>> layer = LayerInfo("fc", out_channels=4, in_channels=3, kernel_size=(1, 1), n_tasks=2,
...                   eig_out=torch.tensor([8.0, 1.0, 0.5, 0.5]),
...                   eig_in=torch.tensor([9.0, 0.5, 0.5]))
>>> select_ranks(EnergyConfig(energy=0.8), [layer])
{'fc': (1, 1)}
>>> tucker_params(layer, (1, 1)), layer.dense_params
(9, 24)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor

from jtucker_plugin.recipe.schema import ConfigError, did_you_mean, from_dict, join_path

Ranks = dict[str, tuple[int, int]]


# --------------------------------------------------------------------------------------------
# What a strategy knows about a layer, and what ranks cost


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value, compare by identity
class LayerInfo:
    """One decomposable layer as rank strategies see it.

    Parameters
    ----------
    name
        Dotted module path, e.g. ``"layer2.0.conv1"``.
    out_channels, in_channels
        ``S`` and ``C``: the full ranks of modes 1 and 2.
    kernel_size
        ``(kh, kw)``; ``(1, 1)`` for a linear layer.
    n_tasks
        ``T``, the number of task models sharing the factors.
    eig_out, eig_in
        Descending eigenvalues (``(S,)`` and ``(C,)``) of the joint Gram matrices of the mode-1
        and mode-2 unfoldings. Stored as float64; rounding negatives (above ``-1e-3 * max``)
        become zero.
    out_hw, in_hw
        Output and input spatial sizes, for MACs (the first 1x1 conv runs at input resolution).
    core_copies
        What the cores cost, in cores: ``None`` for one core per task (``n_tasks``), fewer when
        the cores are stored shared (``decompose.shared_core.CoreSharing.core_copies``), so that
        a parameter budget spends what sharing saves on higher ranks.

    Examples
    --------
    >>> info = LayerInfo("conv", 8, 4, (3, 3), 2, torch.ones(8), torch.ones(4), out_hw=(5, 5))
    >>> info.dense_params, info.dense_macs
    (576, 7200)
    """

    name: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    n_tasks: int
    eig_out: Tensor
    eig_in: Tensor
    out_hw: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] = (1, 1)
    core_copies: float | None = None

    def __post_init__(self) -> None:
        copies = self.core_copies
        if copies is not None and (
            isinstance(copies, bool) or not isinstance(copies, int | float) or copies <= 0
        ):
            raise ValueError(f"LayerInfo {self.name!r}: core_copies must be a number > 0, got {copies!r}")
        for key in ("out_channels", "in_channels", "n_tasks"):
            check_positive_int(getattr(self, key), f"LayerInfo {self.name!r}: {key}")
        for key in ("kernel_size", "out_hw", "in_hw"):
            value = getattr(self, key)
            if not isinstance(value, tuple | list) or len(value) != 2:
                raise ValueError(f"LayerInfo {self.name!r}: {key} must be a pair, got {value!r}")
            for v in value:
                check_positive_int(v, f"LayerInfo {self.name!r}: {key}")
            object.__setattr__(self, key, tuple(value))
        for key, size in (("eig_out", self.out_channels), ("eig_in", self.in_channels)):
            spectrum = _spectrum(getattr(self, key), size, f"LayerInfo {self.name!r}: {key}")
            object.__setattr__(self, key, spectrum)

    @property
    def taps(self) -> int:
        """Kernel positions, ``kh * kw`` (1 for a linear layer)."""
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def dense_params(self) -> int:
        """``T * S * C * kh * kw``: the layer's dense weights for all tasks."""
        return self.n_tasks * self.out_channels * self.in_channels * self.taps

    @property
    def dense_macs(self) -> int:
        """``H'W' * S * C * kh * kw``: one task's dense multiply-accumulates."""
        return _area(self.out_hw) * self.out_channels * self.in_channels * self.taps


def check_positive_int(value: Any, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``value`` is an int >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")


def _spectrum(values: Any, size: int, where: str) -> Tensor:
    eig = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)
    if eig.shape != (size,):
        raise ValueError(f"{where} must have shape ({size},), got {tuple(eig.shape)}")
    if not torch.isfinite(eig).all():
        raise ValueError(f"{where} has non-finite values")
    # eigh of a float32 Gram matrix leaves rounding noise of this order around zero.
    tol = 1e-3 * float(eig.abs().max())
    if float(eig.min()) < -tol:
        raise ValueError(f"{where} has a negative eigenvalue {float(eig.min()):.4g}")
    if size > 1 and bool((eig[1:] - eig[:-1] > tol).any()):
        raise ValueError(f"{where} must be in descending order, got {eig[:5].tolist()}...")
    return eig.clamp(min=0.0)


def _area(hw: tuple[int, int]) -> int:
    return hw[0] * hw[1]


def _check_ranks(layer: LayerInfo, ranks: Sequence[int]) -> tuple[int, int]:
    if (
        len(ranks) != 2
        or any(not isinstance(r, int | np.integer) or isinstance(r, bool) for r in ranks)
        or not (1 <= ranks[0] <= layer.out_channels and 1 <= ranks[1] <= layer.in_channels)
    ):
        raise ValueError(
            f"ranks for layer {layer.name!r} must be two integers in [1, {layer.out_channels}] "
            f"and [1, {layer.in_channels}], got {tuple(ranks)!r}"
        )
    return int(ranks[0]), int(ranks[1])


def params_cost(layer: LayerInfo, r1: int, r2: int) -> float:
    """:func:`tucker_params` unrounded and unchecked: what a search compares in its inner loop."""
    s, c = layer.out_channels, layer.in_channels
    copies = layer.n_tasks if layer.core_copies is None else layer.core_copies
    return s * r1 + c * r2 + copies * r1 * r2 * layer.taps


def macs_cost(layer: LayerInfo, r1: int, r2: int) -> int:
    """:func:`tucker_macs` unchecked."""
    out = _area(layer.out_hw)
    return (
        _area(layer.in_hw) * layer.in_channels * r2
        + out * r2 * r1 * layer.taps
        + out * r1 * layer.out_channels
    )


def tucker_params(layer: LayerInfo, ranks: Sequence[int]) -> int:
    """Parameters of the joint Tucker layer for all tasks: ``S*R1 + C*R2 + T*R1*R2*kh*kw``.

    The factors are stored once and a core per task (``T`` is ``layer.core_copies`` when the
    cores are shared); biases are not counted (nor are they in :attr:`LayerInfo.dense_params`).
    """
    return round(params_cost(layer, *_check_ranks(layer, ranks)))


def tucker_macs(layer: LayerInfo, ranks: Sequence[int]) -> int:
    """One task's MACs: ``H*W*C*R2 + H'W'*R2*R1*kh*kw + H'W'*R1*S`` (METHODS.md, section 5)."""
    return macs_cost(layer, *_check_ranks(layer, ranks))


def energy_kept(layer: LayerInfo, ranks: Sequence[int]) -> float:
    """The fraction of the layer's energy kept at ``ranks``: ``e1 * e2``.

    ``e1 = sum(eig_out[:R1]) / sum(eig_out)`` is what the mode-1 projection keeps, ``e2``
    likewise on mode 2. The true kept fraction of the two projections together lies between
    ``e1 + e2 - 1`` (the HOSVD bound) and ``min(e1, e2)``; the product, exact when the energy
    of the two modes is spread independently, lies between the two. A layer with zero energy
    keeps all of it (1.0).
    """
    r1, r2 = _check_ranks(layer, ranks)
    return _kept(layer.eig_out, r1) * _kept(layer.eig_in, r2)


def _kept(eig: Tensor, rank: int) -> float:
    total = float(eig.sum())
    return float(eig[:rank].sum()) / total if total > 0 else 1.0


# --------------------------------------------------------------------------------------------
# The registry


class RankConfig(Protocol):
    """A rank strategy's config: a frozen dataclass whose ``strategy`` field names it."""

    @property
    def strategy(self) -> str: ...


class RankStrategy(Protocol):
    """A config bound to its strategy: ``layers -> ranks``.

    ``evaluate(ranks) -> accuracy proxy`` is offered by the orchestrator to the strategies that
    search (the genetic algorithm); the others ignore it. ``seed`` drives any random choice.
    """

    def __call__(
        self,
        layers: Sequence[LayerInfo],
        *,
        evaluate: Callable[[Ranks], float] | None = None,
        seed: int = 0,
    ) -> Ranks: ...


_STRATEGIES: dict[str, tuple[type, Callable[..., Ranks]]] = {}
# Strategies defined in other modules, imported on first use of the registry (they import this one).
_BUILTIN_MODULES = (
    "jtucker_plugin.decompose.budget",
    "jtucker_plugin.decompose.vbmf",
    "jtucker_plugin.search.ga",
)


def _strategies() -> dict[str, tuple[type, Callable[..., Ranks]]]:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return _STRATEGIES


def register_rank_strategy(name: str, config: type) -> Callable[[Callable], Callable]:
    """Register ``fn(config, layers, *, evaluate=None, seed=0) -> Ranks`` under ``name``.

    Parameters
    ----------
    name
        The value of ``strategy`` in recipes.
    config
        A frozen dataclass whose ``strategy`` field defaults to ``name`` (annotate it
        ``Literal[name]``); its other fields are the strategy's options.

    Raises
    ------
    TypeError
        If ``config`` is not such a dataclass.
    ValueError
        If a strategy is already registered under ``name``.
    """
    fields = {f.name: f for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else {}
    if "strategy" not in fields or fields["strategy"].default != name:
        raise TypeError(
            f"rank strategy {name!r}: config must be a dataclass with a field "
            f"`strategy: Literal[{name!r}] = {name!r}`, got {config!r}"
        )

    def wrap(fn: Callable[..., Ranks]) -> Callable[..., Ranks]:
        if name in _STRATEGIES:
            raise ValueError(
                f"a rank strategy named {name!r} is already registered ({_STRATEGIES[name][1]!r})"
            )
        _STRATEGIES[name] = (config, fn)
        return fn

    return wrap


def list_rank_strategies() -> list[str]:
    """The registered strategy names, sorted."""
    return sorted(_strategies())


def rank_config_from_dict(data: Any, path: str = "ranks") -> RankConfig:
    """Build a strategy's config from recipe data; ``data["strategy"]`` picks the dataclass.

    Raises
    ------
    ConfigError
        At ``path.strategy`` for a missing or unknown strategy (with the closest name and the
        list of registered ones); at the offending key for anything else.

    Examples
    --------
    >>> rank_config_from_dict({"strategy": "ratio", "ratio": 0.5})
    RatioConfig(strategy='ratio', ratio=0.5)
    """
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping with a 'strategy' key, got {data!r}")
    available = ", ".join(list_rank_strategies())
    where = join_path(path, "strategy")
    if "strategy" not in data:
        raise ConfigError(where, f"missing required key (one of: {available})")
    name = data["strategy"]
    if name not in _strategies():
        hint = did_you_mean(name, _STRATEGIES) if isinstance(name, str) else ""
        raise ConfigError(where, f"unknown rank strategy {name!r}{hint}; available: {available}")
    return from_dict(_STRATEGIES[name][0], data, path)


def get_rank_strategy(config: RankConfig) -> RankStrategy:
    """``config`` bound to its registered function, as a :class:`RankStrategy`."""
    name = getattr(config, "strategy", None)
    if name not in _strategies():
        raise ValueError(
            f"no rank strategy registered for config {config!r}; "
            f"available: {', '.join(list_rank_strategies())}"
        )
    cls, fn = _STRATEGIES[name]
    if not isinstance(config, cls):
        raise TypeError(f"rank strategy {name!r} takes a {cls.__name__}, got {config!r}")
    return functools.partial(fn, config)


def select_ranks(
    config: RankConfig | RankStrategy,
    layers: Sequence[LayerInfo],
    *,
    evaluate: Callable[[Ranks], float] | None = None,
    seed: int = 0,
) -> Ranks:
    """Run a rank strategy and check its answer.

    Parameters
    ----------
    config
        A registered strategy's config, or any :class:`RankStrategy` callable.
    layers
        The layers to rank; names must be unique.
    evaluate
        ``ranks -> accuracy proxy``, for the strategies that search.
    seed
        Seed of any random choice.

    Returns
    -------
    dict
        ``{name: (R1, R2)}`` for every layer, in the order of ``layers``.

    Raises
    ------
    ValueError
        If the strategy leaves a layer out, names an unknown one, or gives ranks outside
        ``[1, S] x [1, C]``.
    """
    layers = list(layers)
    names = [layer.name for layer in layers]
    known = set(names)
    if len(known) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"layer names must be unique, got duplicates {dupes}")
    strategy = config if callable(config) else get_rank_strategy(config)
    ranks = strategy(layers, evaluate=evaluate, seed=seed)
    who = f"rank strategy {getattr(config, 'strategy', config)!r}"
    if not isinstance(ranks, dict):
        raise TypeError(f"{who} must return a dict of ranks, got {type(ranks).__name__}")
    missing = [n for n in names if n not in ranks]
    unknown = [n for n in ranks if n not in known]
    if missing or unknown:
        raise ValueError(f"{who} returned ranks missing {missing} and for unknown layers {unknown}")
    try:
        return {layer.name: _check_ranks(layer, tuple(ranks[layer.name])) for layer in layers}
    except (ValueError, TypeError) as err:
        raise ValueError(f"{who}: {err}") from None


# --------------------------------------------------------------------------------------------
# fixed, ratio, energy


def _pair(value: Any, key: str, kind: type) -> Any:
    """Validate one value or a pair; lists become tuples, so configs compare equal however built."""
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ValueError(f"{key}: expected one value or a pair [out, in], got {value!r}")
        value = tuple(value)
    for v in value if isinstance(value, tuple) else (value,):
        if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{key}: ranks must be integers >= 1, got {value!r}")
        if kind is float and (isinstance(v, bool) or not 0 < v <= 1):
            raise ValueError(f"{key}: ratios must be in (0, 1], got {value!r}")
    return value


def _as_pair(value: Any) -> tuple[Any, Any]:
    return value if isinstance(value, tuple) else (value, value)


@dataclass(frozen=True, kw_only=True)
class FixedConfig:
    """The same ranks for every layer, with per-layer overrides.

    ``rank`` is one rank for both modes or ``[R1, R2]``. ``layers`` maps fnmatch patterns of
    layer names to ranks; later patterns take precedence, and a pattern matching no layer is
    an error (a typo would otherwise pass silently). A rank above a layer's full size is an
    error unless ``clip``.
    """

    strategy: Literal["fixed"] = "fixed"
    rank: int | tuple[int, int]
    layers: dict[str, int | tuple[int, int]] = field(default_factory=dict)
    clip: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", _pair(self.rank, "rank", int))
        overrides = {k: _pair(v, f"layers: {k!r}", int) for k, v in self.layers.items()}
        object.__setattr__(self, "layers", overrides)


@register_rank_strategy("fixed", config=FixedConfig)
def fixed_ranks(config: FixedConfig, layers: Sequence[LayerInfo], **_: Any) -> Ranks:
    """Ranks given in the config (see :class:`FixedConfig`)."""
    chosen = {layer.name: _as_pair(config.rank) for layer in layers}
    for pattern, rank in config.layers.items():
        matched = [name for name in chosen if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(
                f"fixed ranks: pattern {pattern!r} in 'layers' matches no layer; layers: {', '.join(chosen)}"
            )
        for name in matched:
            chosen[name] = _as_pair(rank)
    out = {}
    for layer in layers:
        r1, r2 = chosen[layer.name]
        full = (layer.out_channels, layer.in_channels)
        if config.clip:
            r1, r2 = min(r1, full[0]), min(r2, full[1])
        elif r1 > full[0] or r2 > full[1]:
            raise ValueError(
                f"fixed ranks ({r1}, {r2}) exceed the full ranks {full} of layer "
                f"{layer.name!r}; lower them or set clip: true"
            )
        out[layer.name] = (r1, r2)
    return out


@dataclass(frozen=True, kw_only=True)
class RatioConfig:
    """``R = max(1, round(ratio * full))`` per mode (halves round up); ``ratio`` or ``[r1, r2]``
    in (0, 1]."""

    strategy: Literal["ratio"] = "ratio"
    ratio: float | tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _pair(self.ratio, "ratio", float))


@register_rank_strategy("ratio", config=RatioConfig)
def ratio_ranks(config: RatioConfig, layers: Sequence[LayerInfo], **_: Any) -> Ranks:
    """A fixed fraction of each mode's full rank (see :class:`RatioConfig`)."""
    q1, q2 = _as_pair(config.ratio)
    return {
        layer.name: (
            max(1, math.floor(q1 * layer.out_channels + 0.5)),
            max(1, math.floor(q2 * layer.in_channels + 0.5)),
        )
        for layer in layers
    }


def energy_rank(eigenvalues: Tensor, energy: float) -> int:
    """The smallest rank whose leading ``eigenvalues`` hold ``energy`` of their sum.

    Comparisons allow a relative 1e-12 for rounding; a zero spectrum gives 1.

    Examples
    --------
    >>> energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), 0.7)
    2
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    cumulative = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp(min=0).cumsum(0)
    if len(cumulative) == 0 or cumulative[-1] <= 0:
        return 1
    need = torch.tensor([energy * float(cumulative[-1]) * (1 - 1e-12)], dtype=torch.float64)
    return int(torch.searchsorted(cumulative, need)) + 1


@dataclass(frozen=True, kw_only=True)
class EnergyConfig:
    """Per layer and mode, the smallest rank keeping ``energy`` (in (0, 1]) of the spectrum."""

    strategy: Literal["energy"] = "energy"
    energy: float

    def __post_init__(self) -> None:
        if isinstance(self.energy, bool) or not 0 < self.energy <= 1:
            raise ValueError(f"energy: must be in (0, 1], got {self.energy!r}")


@register_rank_strategy("energy", config=EnergyConfig)
def energy_ranks(config: EnergyConfig, layers: Sequence[LayerInfo], **_: Any) -> Ranks:
    """An energy threshold on each mode's joint spectrum (see :class:`EnergyConfig`)."""
    return {
        layer.name: (
            energy_rank(layer.eig_out, config.energy),
            energy_rank(layer.eig_in, config.energy),
        )
        for layer in layers
    }
