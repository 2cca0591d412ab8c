"""Layer configs: how a module is rebuilt from plain JSON, so that bundles load without pickle.

A bundle's manifest lists, for every task model, the modules whose structure a stage may have
changed (a pruned conv, a Tucker layer in place of a dense one) as ``(path, type, config)``.
Loading rebuilds the architecture, then builds each listed module with ``build_layer``.

Torch's own layers are described by reading their attributes. A custom layer registers itself
with ``@register_layer`` and provides ``layer_config() -> dict`` such that ``cls(**config)``
builds a module of the same structure (its tensors are loaded separately).

Examples
--------
>>> conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
>>> build_layer("Conv2d", layer_config(conv)).weight.shape
torch.Size([8, 3, 3, 3])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from jtucker_plugin.recipe.schema import did_you_mean

_LAYERS: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]]]] = {}
# The plugin's own layer types, registered when their modules are imported: a bundle must load in
# a fresh process that has imported none of them.
_BUILTIN_MODULES = (
    "jtucker_plugin.cifar_models",
    "jtucker_plugin.decompose.layers",
    "jtucker_plugin.decompose.shared_core",
    "jtucker_plugin.merge.hybrid",
)


def _layers() -> dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict[str, Any]]]]:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return _LAYERS


def register_layer(
    cls: type[nn.Module] | None = None,
    *,
    config: Callable[[Any], dict[str, Any]] | None = None,
) -> Any:
    """Register a module class as rebuildable from its config; usable as a decorator.

    Parameters
    ----------
    cls
        The module class. Its registered name is ``cls.__name__``, which must be unique.
    config
        ``module -> dict`` of constructor arguments; defaults to ``module.layer_config()``.

    Raises
    ------
    ValueError
        If another class is already registered under that name.
    """

    def wrap(klass: type[nn.Module]) -> type[nn.Module]:
        name = klass.__name__
        if name in _LAYERS and _LAYERS[name][0] is not klass:
            raise ValueError(f"a layer named {name!r} is already registered ({_LAYERS[name][0]})")
        _LAYERS[name] = (klass, config or (lambda m: m.layer_config()))
        return klass

    return wrap(cls) if cls is not None else wrap


def is_registered(module: nn.Module) -> bool:
    """Whether ``module``'s exact type can be rebuilt from a config."""
    entry = _LAYERS.get(type(module).__name__)
    return entry is not None and entry[0] is type(module)


def layer_config(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild ``module``'s structure.

    Raises
    ------
    TypeError
        If the module's type is not registered.
    """
    if not is_registered(module):
        raise TypeError(
            f"cannot describe a {type(module).__qualname__} as a layer config; register it with "
            "jtucker_plugin.layers.register_layer and give it a layer_config() method"
        )
    return _LAYERS[type(module).__name__][1](module)


def layer_config_as(module: nn.Module, type_name: str) -> dict[str, Any]:
    """``module``'s config read as the registered type ``type_name``, one of its base classes.

    For subclasses that are not layers of their own (``merge.branches``' masked deltas).
    """
    if type_name not in _layers() or not isinstance(module, _LAYERS[type_name][0]):
        raise TypeError(f"a {type(module).__qualname__} is not a registered {type_name!r}")
    return _LAYERS[type_name][1](module)


def build_layer(type_name: str, config: dict[str, Any]) -> nn.Module:
    """Build a module of the registered type ``type_name`` from its config.

    Raises
    ------
    KeyError
        If no layer type has that name.
    """
    if type_name not in _layers():
        raise KeyError(
            f"unknown layer type {type_name!r}{did_you_mean(type_name, _LAYERS)}; "
            f"registered: {', '.join(sorted(_LAYERS))}"
        )
    return _LAYERS[type_name][0](**config)


def _conv_config(m: nn.Conv2d) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _batchnorm_config(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


register_layer(nn.Conv2d, config=_conv_config)
register_layer(nn.Conv1d, config=_conv_config)
register_layer(nn.BatchNorm1d, config=_batchnorm_config)
register_layer(nn.BatchNorm2d, config=_batchnorm_config)
register_layer(
    nn.Linear,
    config=lambda m: {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
    },
)
register_layer(
    nn.LayerNorm,
    config=lambda m: {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": m.bias is not None if m.elementwise_affine else True,
    },
)
register_layer(nn.Identity, config=lambda m: {})


def find_module(model: nn.Module, path: str) -> nn.Module | None:
    """``model.get_submodule(path)``, or ``None`` when there is no module at ``path``."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def same_structure(module: nn.Module, type_name: str, config: dict[str, Any]) -> bool:
    """Whether ``module`` already is a ``type_name`` built from ``config``."""
    return (
        type(module).__name__ == type_name
        and is_registered(module)
        and _normalise(layer_config(module)) == _normalise(config)
    )


def _normalise(value: Any) -> Any:
    # JSON turns tuples into lists; compare in that form.
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, torch.Size):
        return list(value)
    return value
