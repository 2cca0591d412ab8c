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

Built-ins: ``fixed``, ``ratio``, ``energy``, ``budget`` and ``vbmf``. ``select_ranks`` runs
one and checks its answer; ``rank_config_from_dict`` reads its config from recipe data.
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
import heapq
import importlib
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from scipy.optimize import minimize_scalar
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
            _check_positive_int(getattr(self, key), f"LayerInfo {self.name!r}: {key}")
        for key in ("kernel_size", "out_hw", "in_hw"):
            value = getattr(self, key)
            if not isinstance(value, tuple | list) or len(value) != 2:
                raise ValueError(f"LayerInfo {self.name!r}: {key} must be a pair, got {value!r}")
            for v in value:
                _check_positive_int(v, f"LayerInfo {self.name!r}: {key}")
            object.__setattr__(self, key, tuple(value))
        for key, size in (("eig_out", self.out_channels), ("eig_in", self.in_channels)):
            spectrum = _spectrum(getattr(self, key), size, f"LayerInfo {self.name!r}: {key}")
            object.__setattr__(self, key, spectrum)

    @property
    def dense_params(self) -> int:
        """``T * S * C * kh * kw``: the layer's dense weights for all tasks."""
        return self.n_tasks * self.out_channels * self.in_channels * _taps(self)

    @property
    def dense_macs(self) -> int:
        """``H'W' * S * C * kh * kw``: one task's dense multiply-accumulates."""
        return _area(self.out_hw) * self.out_channels * self.in_channels * _taps(self)


def _check_positive_int(value: Any, where: str) -> None:
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


def _taps(layer: LayerInfo) -> int:
    return layer.kernel_size[0] * layer.kernel_size[1]


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


def _params(layer: LayerInfo, r1: int, r2: int) -> float:
    s, c = layer.out_channels, layer.in_channels
    copies = layer.n_tasks if layer.core_copies is None else layer.core_copies
    return s * r1 + c * r2 + copies * r1 * r2 * _taps(layer)


def _macs(layer: LayerInfo, r1: int, r2: int) -> int:
    out = _area(layer.out_hw)
    return (
        _area(layer.in_hw) * layer.in_channels * r2
        + out * r2 * r1 * _taps(layer)
        + out * r1 * layer.out_channels
    )


def tucker_params(layer: LayerInfo, ranks: Sequence[int]) -> int:
    """Parameters of the joint Tucker layer for all tasks: ``S*R1 + C*R2 + T*R1*R2*kh*kw``.

    The factors are stored once and a core per task (``T`` is ``layer.core_copies`` when the
    cores are shared); biases are not counted (nor are they in :attr:`LayerInfo.dense_params`).
    """
    return round(_params(layer, *_check_ranks(layer, ranks)))


def tucker_macs(layer: LayerInfo, ranks: Sequence[int]) -> int:
    """One task's MACs: ``H*W*C*R2 + H'W'*R2*R1*kh*kw + H'W'*R1*S`` (METHODS.md, section 5)."""
    return _macs(layer, *_check_ranks(layer, ranks))


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
_BUILTIN_MODULES = ("jtucker_plugin.search.ga",)


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


# --------------------------------------------------------------------------------------------
# budget


@dataclass(frozen=True)
class Budget:
    """A cost cap as a fraction in (0, 1] of the layers' dense total: exactly one of
    ``params`` (all tasks' weights) and ``macs`` (one task's multiply-accumulates)."""

    params: float | None = None
    macs: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("params", self.params), ("macs", self.macs)) if v is not None}
        if len(given) != 1:
            raise ValueError(f"expected exactly one of params, macs; got {given or 'neither'}")
        ((key, value),) = given.items()
        if isinstance(value, bool) or not 0 < value <= 1:
            raise ValueError(f"{key}: must be a fraction in (0, 1] of the dense cost, got {value!r}")

    @property
    def cost(self) -> Literal["params", "macs"]:
        """``"params"`` or ``"macs"``: what is counted."""
        return "params" if self.params is not None else "macs"

    @property
    def fraction(self) -> float:
        """The cap, as a fraction of the dense total."""
        return self.params if self.params is not None else typing.cast(float, self.macs)


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """A global cost budget shared out over the layers by :func:`allocate_budget`."""

    strategy: Literal["budget"] = "budget"
    budget: Budget


@register_rank_strategy("budget", config=BudgetConfig)
def budget_ranks(config: BudgetConfig, layers: Sequence[LayerInfo], **_: Any) -> Ranks:
    """Greedy allocation of a params or MACs budget (see :func:`allocate_budget`)."""
    return allocate_budget(layers, config.budget.fraction, cost=config.budget.cost)


@dataclass(eq=False)
class _Greedy:
    """One layer's state in :func:`allocate_budget`."""

    dense: int
    cost: Callable[[int, int], int]
    loss1: np.ndarray  # normalised eigenvalues: the loss of dropping each mode-1 direction
    loss2: np.ndarray
    tail1: np.ndarray  # tail1[r] = loss1[r:].sum(), the loss of keeping rank r
    tail2: np.ndarray
    r1: int
    r2: int
    tucker: bool = False
    version: int = 0

    def effective(self) -> int:
        return self.cost(self.r1, self.r2) if self.tucker else self.dense


def _greedy_layer(layer: LayerInfo, cost: str) -> _Greedy:
    fn = _params if cost == "params" else _macs
    dense = layer.dense_params if cost == "params" else layer.dense_macs
    w1, w2 = (_normalised(eig) for eig in (layer.eig_out, layer.eig_in))
    return _Greedy(
        dense=dense,
        cost=functools.partial(fn, layer),
        loss1=w1,
        loss2=w2,
        tail1=np.concatenate([np.cumsum(w1[::-1])[::-1], [0.0]]),
        tail2=np.concatenate([np.cumsum(w2[::-1])[::-1], [0.0]]),
        r1=layer.out_channels,
        r2=layer.in_channels,
    )


def _normalised(eig: Tensor) -> np.ndarray:
    total = float(eig.sum())
    return eig.numpy() / total if total > 0 else np.zeros(len(eig))


def _best_jump(g: _Greedy) -> tuple[float, int, int] | None:
    """From dense, the Tucker ranks losing least energy per unit of cost saved.

    Single steps down from full rank save nothing while the Tucker layer still costs more than
    the dense one, so a dense layer moves in one jump. Its candidates are the points of the
    layer's own greedy path (full rank down to (1, 1), each step dropping the mode with the
    least loss per unit of Tucker cost) that beat dense; the first best ratio wins.
    """
    r1, r2, best = len(g.loss1), len(g.loss2), None
    c = g.cost(r1, r2)
    while r1 > 1 or r2 > 1:
        d1 = c - g.cost(r1 - 1, r2) if r1 > 1 else 0
        d2 = c - g.cost(r1, r2 - 1) if r2 > 1 else 0
        if r2 == 1 or (r1 > 1 and g.loss1[r1 - 1] * d2 <= g.loss2[r2 - 1] * d1):
            r1, c = r1 - 1, c - d1
        else:
            r2, c = r2 - 1, c - d2
        if c < g.dense:
            ratio = (g.tail1[r1] + g.tail2[r2]) / (g.dense - c)
            if best is None or ratio < best[0]:
                best = (ratio, r1, r2)
    return best


def allocate_budget(
    layers: Sequence[LayerInfo], fraction: float, *, cost: Literal["params", "macs"] = "params"
) -> Ranks:
    """Share a cost budget over layers, cutting the rank directions that lose least energy.

    A layer's cost is ``min(dense, Tucker)``: the orchestrator keeps a layer dense when Tucker
    does not save. Its loss is ``tail_out(R1) + tail_in(R2)``, the normalised eigenvalues of
    the directions dropped (``lambda_i / sum(lambda)``, an upper bound on the relative squared
    error of the HOSVD truncation, and 0 for a dense layer), so that layers of any size and
    scale compare. The greedy minimises the summed loss under the budget in two phases:

    1. Cut: start dense; repeatedly take the move with the least loss added per unit of cost
       saved, over all layers, until the total meets the budget. A Tucker layer's moves drop one
       direction of mode 1 or 2; a dense layer's move is the jump to its best Tucker ranks
       (see ``_best_jump``), as no single step from full rank saves anything.
    2. Refill: the last cut (a jump especially) may overshoot, so spend the slack on the moves
       regaining the most loss per unit of cost that still fit: add back a direction (while the
       Tucker layer stays below dense), or return a layer to dense.

    Both use a heap with per-layer versions (a layer's moves are re-costed only when it
    changes), so the work is O((S + C) log n) per layer. With ``cost="macs"``, a layer made
    Tucker saves parameters too (so the orchestrator does not keep it dense) whenever its input
    is at least as large as its output, spatially: the parameter ratio is then the smaller.

    Parameters
    ----------
    layers
        The layers sharing the budget.
    fraction
        The cap, in (0, 1], as a fraction of ``sum(dense cost)``.
    cost
        ``"params"`` (:attr:`LayerInfo.dense_params` against :func:`tucker_params`) or
        ``"macs"`` (:attr:`LayerInfo.dense_macs` against :func:`tucker_macs`).

    Returns
    -------
    dict
        ``{name: (R1, R2)}``; full ranks ``(S, C)`` for layers kept dense.

    Raises
    ------
    ValueError
        If ``fraction`` is outside (0, 1] or below the least achievable fraction (every layer at
        ranks (1, 1), or dense where that is cheaper); the message gives that fraction.
    """
    if cost not in ("params", "macs"):
        raise ValueError(f"cost must be 'params' or 'macs', got {cost!r}")
    layers = list(layers)
    state = [_greedy_layer(layer, cost) for layer in layers]
    dense_total = sum(g.dense for g in state)
    least = sum(min(g.dense, g.cost(1, 1)) for g in state)
    least_fraction = least / dense_total if dense_total else 1.0
    if isinstance(fraction, bool) or not 0 < fraction <= 1 or fraction * dense_total < least:
        raise ValueError(
            f"budget {cost}={fraction!r} cannot be met: it must be a fraction in (0, 1] of the "
            f"dense {cost} ({dense_total}) of at least {least_fraction:.4g}, what remains with "
            f"ranks (1, 1) everywhere (layers that cannot beat dense stay dense)"
        )
    target = fraction * dense_total
    jumps = [_best_jump(g) for g in state]
    heap: list[tuple] = []

    def push_cuts(i: int) -> None:
        g = state[i]
        if not g.tucker:
            if jumps[i] is not None:
                ratio, r1, r2 = jumps[i]
                saved = g.dense - g.cost(r1, r2)
                heapq.heappush(heap, (ratio, -saved, i, g.version, r1, r2))
            return
        c = g.cost(g.r1, g.r2)
        if g.r1 > 1:  # drop mode-1 direction g.r1 - 1 (0-based)
            saved = c - g.cost(g.r1 - 1, g.r2)
            heapq.heappush(heap, (g.loss1[g.r1 - 1] / saved, -saved, i, g.version, g.r1 - 1, g.r2))
        if g.r2 > 1:
            saved = c - g.cost(g.r1, g.r2 - 1)
            heapq.heappush(heap, (g.loss2[g.r2 - 1] / saved, -saved, i, g.version, g.r1, g.r2 - 1))

    for i in range(len(state)):
        push_cuts(i)
    total = dense_total
    while total > target:
        *_, i, version, r1, r2 = heapq.heappop(heap)
        g = state[i]
        if version != g.version:
            continue
        before = g.effective()
        g.r1, g.r2, g.tucker, g.version = r1, r2, True, g.version + 1
        total += g.effective() - before
        push_cuts(i)

    def push_refills(i: int) -> None:
        g = state[i]
        c = g.cost(g.r1, g.r2)
        gained = g.tail1[g.r1] + g.tail2[g.r2]
        moves = [(gained, g.dense - c, len(g.loss1), len(g.loss2), False)]
        if g.r1 < len(g.loss1):
            moves.append((g.loss1[g.r1], g.cost(g.r1 + 1, g.r2) - c, g.r1 + 1, g.r2, True))
        if g.r2 < len(g.loss2):
            moves.append((g.loss2[g.r2], g.cost(g.r1, g.r2 + 1) - c, g.r1, g.r2 + 1, True))
        for gain, extra, r1, r2, tucker in moves:
            # Adding back past dense cost is dominated by returning to dense.
            if gain > 0 and (not tucker or c + extra < g.dense):
                heapq.heappush(heap, (-gain / extra, extra, i, g.version, r1, r2, tucker))

    heap = []
    for i, g in enumerate(state):
        if g.tucker:
            push_refills(i)
    slack = target - total
    while heap:
        _, extra, i, version, r1, r2, tucker = heapq.heappop(heap)
        g = state[i]
        if version != g.version or extra > slack:
            continue
        g.r1, g.r2, g.tucker, g.version = r1, r2, tucker, g.version + 1
        slack -= extra
        if tucker:
            push_refills(i)
    return {layer.name: (g.r1, g.r2) for layer, g in zip(layers, state, strict=True)}


# --------------------------------------------------------------------------------------------
# vbmf


def evbmf(eigenvalues: Tensor, n_rows: int, n_cols: int) -> tuple[int, float]:
    """Rank and noise variance of a matrix by analytic empirical VBMF (Nakajima et al., 2013).

    Parameters
    ----------
    eigenvalues
        Descending eigenvalues of ``Y @ Y.T`` for the ``n_rows x n_cols`` matrix ``Y``: its
        squared singular values (beyond ``min(n_rows, n_cols)`` they are ignored).
    n_rows, n_cols
        The shape of ``Y``.

    Returns
    -------
    rank : int
        The number of singular values above the EVB threshold ``sqrt(M * sigma2 * x_bar)``;
        may be 0.
    sigma2 : float
        The noise variance, minimising the EVB free energy over
        ``[max(gamma_k^2 / (M x_bar), mean(gamma_{k:}^2) / M), sum(gamma^2) / (L M)]`` with
        ``k = min(ceil(L / (1 + alpha)) - 1, L)``, as in the reference ``VBMF.py``.

    Notes
    -----
    ``L <= M`` are the matrix's sides, ``alpha = L / M``, ``tau_bar = 2.5129 sqrt(alpha)`` and
    ``x_bar = (1 + tau_bar)(1 + alpha / tau_bar)``. With ``x_h = gamma_h^2 / (M sigma2)``, the
    free energy is ``sum_h psi0(x_h) + sum_{x_h > x_bar} psi1(x_h)``, ``psi0(x) = x - log x``,
    ``psi1(x) = log(tau + 1) + alpha log(tau / alpha + 1) - tau`` where
    ``tau = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2``. Two choices differ from
    the reference: the search runs over ``log sigma2`` (bounded Brent), so its tolerance does
    not depend on the weights' scale, and singular values are floored at ``1e-12`` times the
    largest, as an exact zero makes the free energy infinite at every ``sigma2``.
    """
    _check_positive_int(n_rows, "evbmf: n_rows")
    _check_positive_int(n_cols, "evbmf: n_cols")
    small, large = min(n_rows, n_cols), max(n_rows, n_cols)
    s2 = torch.as_tensor(eigenvalues, dtype=torch.float64).clamp(min=0).numpy()[:small]
    if len(s2) < small:
        raise ValueError(f"evbmf: a {n_rows}x{n_cols} matrix needs {small} eigenvalues, got {len(s2)}")
    if s2.max(initial=0.0) <= 0:
        return 0, 0.0
    s2 = np.maximum(s2, 1e-12 * s2.max())
    alpha = small / large
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    k = min(math.ceil(small / (1 + alpha)) - 1, small)
    upper = s2.sum() / (small * large)
    lower = min(max(s2[k] / (large * x_bar), s2[k:].mean() / large), upper)

    def free_energy(log_sigma2: float) -> float:
        x = s2 / (large * math.exp(log_sigma2))
        signal = x[x > x_bar]
        b = signal - 1 - alpha
        tau = (b + np.sqrt(b * b - 4 * alpha)) / 2
        psi1 = np.log(tau + 1) + alpha * np.log(tau / alpha + 1) - tau
        return float(np.sum(x - np.log(x)) + np.sum(psi1))

    if lower < upper:
        bounds = (math.log(lower), math.log(upper))
        sigma2 = math.exp(minimize_scalar(free_energy, bounds=bounds, method="bounded").x)
    else:
        sigma2 = upper
    rank = int(np.sum(s2 > large * sigma2 * x_bar))
    return rank, sigma2


@dataclass(frozen=True, kw_only=True)
class VBMFConfig:
    """Each mode's rank by EVBMF on its unfolding: mode 1 is ``S x (T*C*kh*kw)``, mode 2
    ``C x (T*S*kh*kw)``; at least 1."""

    strategy: Literal["vbmf"] = "vbmf"


@register_rank_strategy("vbmf", config=VBMFConfig)
def vbmf_ranks(config: VBMFConfig, layers: Sequence[LayerInfo], **_: Any) -> Ranks:
    """Ranks by analytic empirical VBMF on each mode's joint spectrum (see :func:`evbmf`)."""
    out = {}
    for layer in layers:
        spread = layer.n_tasks * _taps(layer)
        r1, _ = evbmf(layer.eig_out, layer.out_channels, spread * layer.in_channels)
        r2, _ = evbmf(layer.eig_in, layer.in_channels, spread * layer.out_channels)
        out[layer.name] = (max(1, r1), max(1, r2))
    return out
