"""Model registry and loading: architectures by name, torchvision models, checkpoint loading.

An architecture is a function ``fn(num_classes, *, in_channels, width) -> nn.Module``
registered with ``@register_model`` under its own name; ``create_model`` builds one with a
seeded initialisation that leaves the global RNG untouched, and optionally loads weights.
``"tv:<name>"`` builds any model ``torchvision.models.get_model`` knows, without pretrained
weights (nothing is ever downloaded; weights come from a local file only).

The built-in architectures, the CIFAR ResNets, VGGs and AlexNet, are defined in
``jtucker_plugin.cifar_models``, which registers them when the registry is first used.

Examples
--------
>>> model = create_model("resnet20", num_classes=4, seed=0)
>>> head_name(model), model.linear.out_features
('linear', 4)
>>> list_models("vgg*")
['vgg11_bn', 'vgg16_bn']
"""

from __future__ import annotations

import fnmatch
import importlib
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import safetensors.torch
import torch
import torchvision
from torch import nn

from jtucker_plugin.recipe.schema import did_you_mean

ModelFn = Callable[..., nn.Module]

TORCHVISION_PREFIX = "tv:"
_TORCH_SUFFIXES = (".th", ".pth", ".pt")
_WEIGHT_SUFFIXES = (*_TORCH_SUFFIXES, ".safetensors")

_MODELS: dict[str, ModelFn] = {}
# The built-in architectures, imported on first use of the registry (they import this module).
_BUILTIN_MODULE = "jtucker_plugin.cifar_models"


def _registry() -> dict[str, ModelFn]:
    importlib.import_module(_BUILTIN_MODULE)
    return _MODELS


def register_model(fn: ModelFn) -> ModelFn:
    """Register an architecture under ``fn.__name__``; usable as a decorator.

    Parameters
    ----------
    fn
        ``fn(num_classes: int, *, in_channels: int, width: float) -> nn.Module``.

    Returns
    -------
    ModelFn
        ``fn`` itself.

    Raises
    ------
    ValueError
        If an architecture of that name is already registered.
    """
    name = fn.__name__
    models = _registry()
    if name in models:
        raise ValueError(f"a model named {name!r} is already registered ({models[name]})")
    models[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered architectures matching a shell-style ``pattern``.

    Torchvision models (``"tv:<name>"``) are not listed; see
    ``torchvision.models.list_models()``.
    """
    return sorted(name for name in _registry() if fnmatch.fnmatchcase(name, pattern))


def create_model(
    arch: str,
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    width: float = 1.0,
    weights: str | Path | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build an architecture with a seeded initialisation, optionally loading weights.

    The global RNG state is the same after the call as before it, and the same arguments
    give identical weights.

    Parameters
    ----------
    arch
        A registered name (see ``list_models()``) or ``"tv:<name>"`` for
        ``torchvision.models.get_model(name, weights=None, num_classes=num_classes)``.
    num_classes
        Outputs of the classifier head.
    in_channels
        Input channels of the first convolution. Torchvision models get their first
        ``Conv2d`` replaced (default PyTorch initialisation) when this is not 3.
    width
        Multiplier of every hidden channel / feature count (nearest integer, at least 1).
        Must be 1 for torchvision models.
    weights
        A checkpoint to load with ``load_weights``: ``.th``/``.pth``/``.pt`` or
        ``.safetensors``.
    seed
        Seed of the initialisation.

    Returns
    -------
    nn.Module
        The model, in training mode.

    Raises
    ------
    KeyError
        If ``arch`` is unknown.
    ValueError
        If an argument is out of range, or the weights do not fit (see ``load_weights``).
    TypeError
        If an argument has the wrong type.
    """
    check_int("num_classes", num_classes, minimum=1)
    check_int("in_channels", in_channels, minimum=1)
    check_int("seed", seed, minimum=None)
    if isinstance(width, bool) or not isinstance(width, int | float):
        raise TypeError(f"width must be a number, got {width!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    build = _resolve(arch, width)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build(num_classes, in_channels=in_channels, width=width)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` in place, resizing the classifier head if needed.

    Accepted files: ``.th``/``.pth``/``.pt`` read with ``torch.load(weights_only=True)``,
    holding a state dict or a dict with a ``"state_dict"`` entry (legacy checkpoints), and
    ``.safetensors``. ``"module."`` key prefixes (``DataParallel``) are stripped. When the
    checkpoint's head (see ``head_name``) differs from the model's in the class dimension
    only, the model keeps its own head and everything else is loaded. BatchNorm's
    ``num_batches_tracked`` may be absent (old checkpoints).

    Parameters
    ----------
    model
        The model to load into.
    path
        The checkpoint file.

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file type is not supported, the file holds anything but tensors (pickled
        objects are refused), or any other key is missing, unexpected or of another shape.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    head = head_name(model)
    head_keys = [f"{head}.{k}" for k in model.get_submodule(head).state_dict()]
    differing = [k for k in head_keys if k in state and state[k].shape != own[k].shape]
    # Only the class dimension may differ; anything else means another architecture.
    if differing and all(state[k].shape[1:] == own[k].shape[1:] for k in differing):
        for k in head_keys:
            state.pop(k, None)
            own.pop(k)

    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{what} ({len(keys)}): {_shorten(keys)}"
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise ValueError(
            f"weights file {path} does not fit the {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)
    return model


def head_name(model: nn.Module) -> str:
    """Dotted path of the classifier head: the last ``nn.Linear`` (else the last ``nn.Conv2d``).

    "Last" is in registration order (``model.named_modules()``), which puts torchvision's
    ``fc`` after GoogLeNet's and Inception's auxiliary heads.

    Raises
    ------
    ValueError
        If the model has neither a Linear nor a Conv2d layer.
    """
    for kind in (nn.Linear, nn.Conv2d):
        names = [name for name, m in model.named_modules() if isinstance(m, kind)]
        if names:
            return names[-1]
    raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to act as its head")


def model_input_channels(model: nn.Module) -> int:
    """Input channels of the model's first ``nn.Conv2d`` (registration order).

    Raises
    ------
    ValueError
        If the model has no Conv2d layer.
    """
    return _first_conv(model)[1].in_channels


def check_int(name: str, value: object, *, minimum: int | None) -> None:
    """Check that argument ``name`` is an int (not a bool) and at least ``minimum`` if given.

    Raises
    ------
    TypeError
        If ``value`` is not an int.
    ValueError
        If ``value`` is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


# --- helpers ----------------------------------------------------------------------------------


def _resolve(arch: str, width: float) -> ModelFn:
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a string, got {arch!r}")
    if not arch.startswith(TORCHVISION_PREFIX):
        models = _registry()
        if arch not in models:
            raise KeyError(
                f"unknown arch {arch!r}{_suggest(arch, models)}; available: "
                f"{', '.join(list_models())}, or 'tv:<name>' for a torchvision model"
            )
        return models[arch]
    name = arch.removeprefix(TORCHVISION_PREFIX)
    known = torchvision.models.list_models()
    if name not in known:
        raise KeyError(
            f"unknown torchvision model {name!r} in arch {arch!r}{_suggest(name, known)}; "
            "see torchvision.models.list_models()"
        )
    if width != 1:
        raise ValueError(f"width must be 1 for torchvision model {arch!r}, got {width!r}")
    return lambda num_classes, *, in_channels, width: _torchvision_model(name, num_classes, in_channels)


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        path, conv = _first_conv(model)
        parent, _, leaf = path.rpartition(".")
        replacement = nn.Conv2d(
            in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        setattr(model.get_submodule(parent), leaf, replacement)
    return model


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError(f"{type(model).__name__} has no Conv2d layer")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix not in _WEIGHT_SUFFIXES:
        raise ValueError(f"unsupported weights file {path}: expected one of {', '.join(_WEIGHT_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if suffix == ".safetensors":
        raw: object = safetensors.torch.load_file(path, device="cpu")
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"refusing to load weights file {path}: it holds pickled objects other than "
                f"tensors (torch.load with weights_only=True failed: {str(err).splitlines()[0]})"
            ) from err
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"weights file {path} holds a {type(raw).__name__}, not a state dict")
    others = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ValueError(
            f"weights file {path} is not a state dict: entries {_shorten(others)} are not "
            "tensors (a dict with a 'state_dict' entry is also accepted)"
        )
    return {str(k).removeprefix("module."): v for k, v in raw.items()}


def _suggest(name: str, choices: Iterable[str]) -> str:
    # A name that starts a known one is most likely cut short ('resnet2' -> 'resnet20'), which
    # difflib alone ranks no higher than 'resnet32'.
    choices = list(choices)
    extensions = [c for c in choices if c.startswith(name)]
    return did_you_mean(name, extensions) or did_you_mean(name, choices)


def _shorten(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
