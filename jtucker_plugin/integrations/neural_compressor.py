"""Intel Neural Compressor 3.x: Tucker and J-Tucker as INC algorithms, and int8 task bundles.

Importing this module registers two algorithms with INC, for the whole process:

- ``"tucker"`` (:class:`TuckerConfig`): every eligible conv / linear layer of one model becomes a
  ``TuckerConv2d`` / ``FactorizedLinear`` holding the Tucker-2 factors of its own weights.
- ``"jtucker"`` (:class:`JTuckerConfig`): the same layer of T task models is decomposed jointly:
  one pair of factor modules (``in_proj``, ``out_proj``) shared by every task, a core per task.

INC's ``quantize(model, config)`` takes one model, J-Tucker needs T of them: they go in as one
:class:`MultiTaskModel`, an ``nn.ModuleDict`` of the task models whose ``forward`` takes one
input per task and returns one output per task. ``quantize`` changes the task models inside it
in place, as INC's own algorithms do, and nothing else: afterwards its children share their
factor modules by identity, exactly like a :class:`~jtucker_plugin.multitask.Bundle`'s models
(``Bundle(dict(multi.items()), info)``). Holding the other task models in the config instead
would make ``quantize`` change models it was not given.

Composition, as INC 3.10 runs it (checked in the tests):

- ``TuckerConfig(...) + RTNConfig(white_list=[".*"])`` (either order) decomposes, then rounds
  the remaining ``nn.Linear`` weights to int. Three INC 3.10 constraints show through: INC runs
  algorithms in registration order, so this module moves Tucker and J-Tucker to the front
  (decompose first); INC's ``ComposableConfig`` applies only per-op (``white_list`` /
  ``set_local``) entries, so an ``RTNConfig`` with the default ``white_list`` adds nothing to a
  composition (hence ``white_list=[".*"]``); and INC's RTN reads its options from the *last*
  entry of the composed mapping, so the Tucker entry moves its own entries first. A dict
  config (``quantize(model, {"tucker": {...}})``) works for one algorithm; INC's
  ``ComposableConfig.from_dict`` reads only the first entry of a longer dict.
- Static and dynamic int8 (``INT8StaticQuantConfig``, ``DynamicQuantConfig``) run on a graph
  exported with ``neural_compressor.torch.export.export``, which the decomposition must
  precede: call ``quantize`` with the Tucker config, export, then ``prepare``/``convert``.
  Adding them to a Tucker config raises ``TypeError`` saying so. :func:`quantize_tasks` does
  that second step for the task models of a bundle
  (``integrations/inc_quantize.py``).

Examples
--------
>>> import jtucker_plugin.integrations.neural_compressor as inc       # doctest: +SKIP
>>> from neural_compressor.torch.quantization import quantize        # doctest: +SKIP
>>> tasks = inc.MultiTaskModel({"cars": model_a, "pets": model_b})   # doctest: +SKIP
>>> tasks = quantize(tasks, inc.JTuckerConfig(energy=0.9), example_inputs=(x,))  # doctest: +SKIP
>>> tasks["cars"].layer1[0].conv1.in_proj is tasks["pets"].layer1[0].conv1.in_proj  # doctest: +SKIP
True
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from neural_compressor.common.base_config import BaseConfig, ComposableConfig, register_config
from neural_compressor.common.utils import DEFAULT_WHITE_LIST, Mode
from neural_compressor.torch.quantization.config import OperatorConfig, TorchBaseConfig
from neural_compressor.torch.utils import register_algo
from neural_compressor.torch.utils.constants import PT2E_DYNAMIC_QUANT, PT2E_STATIC_QUANT
from neural_compressor.torch.utils.utility import algos_mapping
from torch import Tensor, nn

from jtucker_plugin import defaults
from jtucker_plugin.decompose.apply import decompose_layers, find_layers, layer_infos
from jtucker_plugin.decompose.ranks import (
    EnergyConfig,
    FixedConfig,
    RankConfig,
    RatioConfig,
    rank_config_from_dict,
    select_ranks,
)
from jtucker_plugin.recipe.schema import did_you_mean

log = logging.getLogger("jtucker_plugin")

TUCKER = "tucker"
JTUCKER = "jtucker"
_PT2E_NAMES = ("static_quant", PT2E_STATIC_QUANT, PT2E_DYNAMIC_QUANT)
# What INC itself puts in a config's __dict__ and passes back to __init__ (see BaseConfig._post_init).
_INC_INTERNAL = ("params_list", "non_tunable_params", "_is_initialized")


class MultiTaskModel(nn.ModuleDict):
    """Task models as one module, so that INC's single-model API can take them all.

    ``forward(*inputs)`` runs task ``i`` on ``inputs[i]`` (or every task on a single input) and
    returns a tuple of the tasks' outputs, in the order of the tasks.

    Examples
    --------
    >>> multi = MultiTaskModel({"a": nn.Linear(4, 2), "b": nn.Linear(4, 3)})
    >>> [y.shape[1] for y in multi(torch.zeros(1, 4))]
    [2, 3]
    """

    def __init__(self, models: Mapping[str, nn.Module]):
        if not models:
            raise ValueError("MultiTaskModel needs at least one task model, got none")
        super().__init__(dict(models))

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) == 1:
            inputs = inputs * len(self)
        if len(inputs) != len(self):
            raise ValueError(
                f"MultiTaskModel: expected one input per task ({len(self)}: {', '.join(self)}) or "
                f"one input for all, got {len(inputs)}"
            )
        return tuple(model(x) for model, x in zip(self.values(), inputs, strict=True))


class _DecompositionConfig(TorchBaseConfig):
    """What Tucker and J-Tucker share: rank choice, layer selection, decomposition options.

    Exactly one of ``rank``, ``energy`` and ``ranks`` chooses the ranks; with none of them, each
    layer keeps ``defaults.RANK_ENERGY`` of its energy. Lists of values (``energy=[0.8, 0.9]``)
    make a config set for INC's autotune, which expands it before running.

    Parameters
    ----------
    rank
        An int or ``[R1, R2]`` (the same ranks for every layer, clipped to its full size), or a
        fraction in (0, 1) of each mode's full rank.
    energy
        Per layer and mode, the smallest rank keeping this fraction of the (joint) spectrum.
    ranks
        Any registered rank strategy as recipe data, e.g.
        ``{"strategy": "budget", "budget": {"params": 0.3}}``.
    exclude
        fnmatch patterns of layer names to keep dense (heads and grouped convs always are).
    min_params
        Layers with fewer weights (per task) stay dense.
    n_iter_max, tol
        HOOI options (``None``: the defaults of ``joint_tucker``).
    seed
        For rank strategies that draw random numbers.
    white_list
        INC's op selection: ``"*"`` (all eligible layers) or a list of layer-name regexes /
        module types; per-layer overrides with ``set_local(pattern, config)``.
    """

    def __init__(
        self,
        rank: int | float | list[int] | None = None,
        energy: float | list[float] | None = None,
        ranks: dict[str, Any] | None = None,
        exclude: list[str] | None = None,
        min_params: int = defaults.DECOMPOSE_MIN_PARAMS,
        n_iter_max: int | None = None,
        tol: float | None = None,
        seed: int = 0,
        white_list: Any = DEFAULT_WHITE_LIST,
        **kwargs: Any,
    ):
        _check_internal_kwargs(type(self).__name__, kwargs)
        super().__init__(white_list=white_list)
        given = [k for k, v in (("rank", rank), ("energy", energy), ("ranks", ranks)) if v is not None]
        if len(given) > 1:
            raise ValueError(
                f"{type(self).__name__}: give one of rank, energy, ranks; got {', '.join(given)}"
            )
        # Validated now rather than inside quantize; a list of energies is a set for autotune.
        for option in energy if isinstance(energy, list) else [energy]:
            _rank_config(rank, option, ranks)
        if not isinstance(min_params, int) or min_params < 0:
            raise ValueError(f"{type(self).__name__}: min_params must be an int >= 0, got {min_params!r}")
        self.rank = rank
        self.energy = energy
        self.ranks = ranks
        self.exclude = list(exclude or [])
        self.min_params = min_params
        self.n_iter_max = n_iter_max
        self.tol = tol
        self.seed = seed
        self._post_init()

    def rank_config(self) -> RankConfig:
        """The rank strategy config these parameters describe."""
        return _rank_config(self.rank, self.energy, self.ranks)

    def to_dict(self) -> dict[str, Any]:
        # INC's weight-only entries (RTN, GPTQ) print precision statistics over the whole composed
        # mapping and read "dtype" from every entry: factorized layers keep float weights.
        return {**super().to_dict(), "dtype": "fp32"}

    def to_config_mapping(self, config_list: Any = None, model_info: Any = None) -> OrderedDict:
        # INC's semantics (global, then module type, then name regexes, the last match winning)
        # without reading _get_op_name_op_type_config, which is reserved for ComposableConfig.
        types, names = {}, {}
        for key, config in self.local_config.items():
            (names if isinstance(key, str) else types)[key] = config
        mapping = OrderedDict()
        for op_name, op_type in model_info or []:
            chosen = self.global_config
            for key, config in types.items():
                chosen = config if getattr(key, "__name__", key) == op_type else chosen
            for pattern, config in names.items():
                chosen = config if re.match(pattern, op_name) else chosen
            if chosen is not None:
                mapping[(op_name, op_type)] = chosen
        return mapping

    def _get_op_name_op_type_config(self) -> tuple[dict, dict]:
        # Only ComposableConfig calls this, and it applies name patterns only: the global config
        # becomes a catch-all pattern placed first, so that local patterns still override it.
        if any(not isinstance(key, str) for key in self.local_config):
            raise ValueError(
                f"{type(self).__name__}: in a composed config (+), INC 3.10 maps per-layer "
                "overrides by layer-name pattern only; use set_local('layer3.*', ...) instead of a "
                "module type"
            )
        names = {} if self.global_config is None else {".*": self.global_config}
        return {}, {**names, **self.local_config}

    def __add__(self, other: BaseConfig) -> BaseConfig:
        inner = other.config_list if isinstance(other, ComposableConfig) else [other]
        if any(getattr(c, "name", None) in _PT2E_NAMES for c in inner):
            raise TypeError(
                f"{type(self).__name__} + {type(other).__name__}: INC runs static/dynamic int8 on a "
                "graph exported with neural_compressor.torch.export.export, and the decomposition "
                "must come before that export. Call quantize(model, "
                f"{type(self).__name__}(...), example_inputs=...) first, then export and "
                "prepare/convert (jtucker_plugin.integrations.inc_quantize.quantize_tasks does both)"
            )
        return super().__add__(other)

    @classmethod
    def register_supported_configs(cls) -> None:
        cls.supported_configs = [OperatorConfig(config=cls(), operators=[nn.Conv2d, nn.Linear])]

    @classmethod
    def get_config_set_for_tuning(cls) -> _DecompositionConfig:
        return cls(energy=[0.95, 0.9, 0.8])


@register_config(framework_name="torch", algo_name=TUCKER)
class TuckerConfig(_DecompositionConfig):
    """Tucker-2 of each layer of one model (INC algorithm ``"tucker"``).

    Parameters: see :class:`_DecompositionConfig`.

    Examples
    --------
    >>> quantize(model, TuckerConfig(rank=0.5), example_inputs=(x,))      # doctest: +SKIP
    """

    name = TUCKER

    def get_model_info(self, model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
        """``(layer name, module type)`` of the layers Tucker can decompose (not the head)."""
        return _candidates({"model": model}, self.exclude)


@register_config(framework_name="torch", algo_name=JTUCKER)
class JTuckerConfig(_DecompositionConfig):
    """J-Tucker of the task models of a ``MultiTaskModel`` (INC algorithm ``"jtucker"``).

    One pair of factor modules per layer shared by all tasks, a core per task. Layer names (in
    ``exclude``, ``white_list``, ``set_local``) are those inside one task model, e.g.
    ``"layer1.0.conv1"``. Parameters: see :class:`_DecompositionConfig`.

    Examples
    --------
    >>> quantize(MultiTaskModel(models), JTuckerConfig(energy=0.9), example_inputs=(x,))  # doctest: +SKIP
    """

    name = JTUCKER

    def get_model_info(self, model: nn.Module, example_inputs: Any = None) -> list[tuple[str, str]]:
        """``(layer name, module type)`` of the layers J-Tucker can decompose, inside one task."""
        return _candidates(_task_models(model), self.exclude)


def _check_internal_kwargs(cls_name: str, kwargs: dict[str, Any]) -> None:
    # INC requires **kwargs (it passes its own attributes back); anything else is a typo.
    unknown = [k for k in kwargs if k not in _INC_INTERNAL and not (k == "dtype" and kwargs[k] == "fp32")]
    if unknown:
        allowed = [
            "rank",
            "energy",
            "ranks",
            "exclude",
            "min_params",
            "n_iter_max",
            "tol",
            "seed",
            "white_list",
        ]
        raise TypeError(
            f"{cls_name}: unknown parameter {unknown[0]!r}{did_you_mean(unknown[0], allowed)}; "
            f"allowed: {', '.join(allowed)}"
        )


def _rank_config(rank: Any, energy: Any, ranks: Any) -> RankConfig:
    if ranks is not None:
        return rank_config_from_dict(ranks, "ranks")
    if isinstance(energy, list):
        raise ValueError(f"energy: {energy!r} is a config set for autotune; expand it before quantize")
    if rank is None:
        return EnergyConfig(energy=defaults.RANK_ENERGY if energy is None else energy)
    if isinstance(rank, float) and 0 < rank < 1:
        return RatioConfig(ratio=rank)
    if isinstance(rank, int | list | tuple) and not isinstance(rank, bool):
        try:
            return FixedConfig(rank=tuple(rank) if isinstance(rank, list | tuple) else rank, clip=True)
        except ValueError:
            pass
    raise ValueError(f"rank: expected an int >= 1, [R1, R2] or a fraction in (0, 1), got {rank!r}")


def _candidates(models: dict[str, nn.Module], exclude: Sequence[str]) -> list[tuple[str, str]]:
    # Only layers that can be decomposed: in a composed config, a layer listed here (a head, say)
    # would take this config instead of the other algorithm's.
    names, _ = find_layers(models, exclude=exclude)
    ref = next(iter(models.values()))
    return [(name, type(ref.get_submodule(name)).__name__) for name in names]


def _task_models(model: nn.Module) -> dict[str, nn.Module]:
    if not isinstance(model, nn.ModuleDict) or len(model) == 0:
        raise TypeError(
            f"JTuckerConfig decomposes several task models jointly: pass them as "
            f"MultiTaskModel({{task: model, ...}}), got a {type(model).__name__}"
        )
    return dict(model.items())


def _input_shape(example_inputs: Any, algo: str) -> tuple[int, ...]:
    x = example_inputs[0] if isinstance(example_inputs, tuple | list) and example_inputs else example_inputs
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(
            f"{algo}: pass example_inputs=(batch,) to quantize (a tensor N x C x H x W); it measures "
            f"each layer's spatial size. Got {type(example_inputs).__name__}"
        )
    return tuple(x.shape[1:])


def _decompose(
    models: dict[str, nn.Module], configs_mapping: Mapping, algo: str, example_inputs: Any
) -> None:
    ours = [(op, c) for (op, _), c in configs_mapping.items() if c.name == algo]
    # INC 3.10's weight-only entries (RTN, GPTQ) read their options from the last entry of the
    # mapping, whichever algorithm it belongs to: this entry runs first, and moves the others'
    # entries to the end so that any composition order works.
    for key in [k for k, c in configs_mapping.items() if c.name not in (TUCKER, JTUCKER)]:
        configs_mapping.move_to_end(key)
    shape = _input_shape(example_inputs, algo)
    groups: dict[int, tuple[_DecompositionConfig, list[str]]] = {}
    for op_name, config in ours:
        groups.setdefault(id(config), (config, []))[1].append(op_name)
    for config, names in groups.values():
        chosen, _ = find_layers(models, include=names, exclude=config.exclude, min_params=config.min_params)
        if not chosen:
            continue
        infos = layer_infos(models, chosen, shape)
        ranks = select_ranks(config.rank_config(), infos, seed=config.seed)
        rows = decompose_layers(models, infos, ranks, n_iter_max=config.n_iter_max, tol=config.tol)
        done = [name for name, row in rows.items() if "kept_dense" not in row]
        log.info("%s: %d of %d layers decomposed across %d model(s)", algo, len(done), len(rows), len(models))


@register_algo(TUCKER)
@torch.no_grad()
def tucker_entry(
    model: nn.Module, configs_mapping: Mapping, mode: Mode = Mode.QUANTIZE, *args: Any, **kwargs: Any
) -> nn.Module:
    """INC's entry for ``"tucker"``: decompose ``model``'s selected layers in place.

    Runs in ``quantize`` and ``prepare``; ``convert`` finds the model already decomposed.
    """
    if mode == Mode.CONVERT:
        return model
    _decompose({"model": model}, configs_mapping, TUCKER, kwargs.get("example_inputs"))
    return model


@register_algo(JTUCKER)
@torch.no_grad()
def jtucker_entry(
    model: nn.Module, configs_mapping: Mapping, mode: Mode = Mode.QUANTIZE, *args: Any, **kwargs: Any
) -> nn.Module:
    """INC's entry for ``"jtucker"``: decompose the task models of a ``MultiTaskModel`` jointly."""
    if mode == Mode.CONVERT:
        return model
    _decompose(_task_models(model), configs_mapping, JTUCKER, kwargs.get("example_inputs"))
    return model


def _run_first(*names: str) -> None:
    # INC applies the algorithms of a composed config in the order they were registered, and its
    # own quantizers were registered first: decomposition has to run before them.
    first = {name: algos_mapping[name] for name in names}
    rest = {k: v for k, v in algos_mapping.items() if k not in first}
    algos_mapping.clear()
    algos_mapping.update({**first, **rest})


_run_first(JTUCKER, TUCKER)
