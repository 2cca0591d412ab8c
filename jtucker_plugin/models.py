"""Model zoo: CIFAR architectures registered by name, torchvision models, checkpoint loading.

An architecture is a function ``fn(num_classes, *, in_channels, width) -> nn.Module``
registered with ``@register_model`` under its own name; ``create_model`` builds one with a
seeded initialisation that leaves the global RNG untouched, and optionally loads weights.
``"tv:<name>"`` builds any model ``torchvision.models.get_model`` knows, without pretrained
weights (nothing is ever downloaded; weights come from a local file only).

Registered architectures, all for 32 x 32 inputs:

- ``resnet8`` ... ``resnet56``: the CIFAR ResNets of He et al. 2016 with "option A"
  shortcuts, module for module as in Yerlan Idelbayev's ``pytorch_resnet_cifar10``, so its
  checkpoints load directly. Head: ``linear``.
- ``vgg11_bn``, ``vgg16_bn``: conv3x3-BN-ReLU stacks with max pools (``features``), global
  average pooling and one ``classifier`` Linear(512 -> classes): the layout (and state-dict
  keys) of kuangliu's ``pytorch-cifar`` VGG.
- ``alexnet_cifar``: 5 convs (64-192-384-256-256, first one stride 2) and 3 fully connected
  layers (1024-4096-4096-classes), module names as in torchvision's AlexNet. Head:
  ``classifier.6``.

Examples
--------
>>> model = create_model("resnet20", num_classes=4, seed=0)
>>> head_name(model), model.linear.out_features
('linear', 4)
>>> sum(p.numel() for p in create_model("resnet20").parameters())
269722
"""

from __future__ import annotations

import fnmatch
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from jtucker_plugin.layers import register_layer
from jtucker_plugin.recipe.schema import did_you_mean

ModelFn = Callable[..., nn.Module]

TORCHVISION_PREFIX = "tv:"
_TORCH_SUFFIXES = (".th", ".pth", ".pt")
_WEIGHT_SUFFIXES = (*_TORCH_SUFFIXES, ".safetensors")

_MODELS: dict[str, ModelFn] = {}


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
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered ({_MODELS[name]})")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered architectures matching a shell-style ``pattern``.

    Torchvision models (``"tv:<name>"``) are not listed; see
    ``torchvision.models.list_models()``.
    """
    return sorted(name for name in _MODELS if fnmatch.fnmatchcase(name, pattern))


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
    _check_int("num_classes", num_classes, minimum=1)
    _check_int("in_channels", in_channels, minimum=1)
    _check_int("seed", seed, minimum=None)
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


# --- the CIFAR ResNets ------------------------------------------------------------------------


@register_layer
class PadShortcut(nn.Module):
    """The "option A" shortcut: subsample the identity, zero-pad the channels.

    Parameters
    ----------
    stride
        Spatial subsampling step (``x[:, :, ::stride, ::stride]``).
    pad_before, pad_after
        Zero channels added before and after the input's channels.
    """

    def __init__(self, stride: int, pad_before: int, pad_after: int):
        super().__init__()
        for name, value, minimum in (
            ("stride", stride, 1),
            ("pad_before", pad_before, 0),
            ("pad_after", pad_after, 0),
        ):
            _check_int(name, value, minimum=minimum)
        self.stride, self.pad_before, self.pad_after = stride, pad_before, pad_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.pad_before, self.pad_after))

    def layer_config(self) -> dict[str, int]:
        """The constructor arguments."""
        return {"stride": self.stride, "pad_before": self.pad_before, "pad_after": self.pad_after}

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_before={self.pad_before}, pad_after={self.pad_after}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs and a shortcut (identity, or ``PadShortcut`` on a shape change)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            extra = planes - in_planes
            self.shortcut: nn.Module = PadShortcut(stride, extra // 2, extra - extra // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016's ResNet for CIFAR: 6n + 2 layers, option A shortcuts."""

    def __init__(self, n: int, num_classes: int, *, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        planes = [_scale(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.layer1 = self._make_layer(planes[0], planes[0], n, stride=1)
        self.layer2 = self._make_layer(planes[0], planes[1], n, stride=2)
        self.layer3 = self._make_layer(planes[1], planes[2], n, stride=2)
        self.linear = nn.Linear(planes[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model
def resnet8(num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """ResNet-8 for CIFAR (n = 1; 75k parameters): for tiny tests and the quickstart."""
    return CifarResNet(1, num_classes, in_channels=in_channels, width=width)


@register_model
def resnet20(num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """ResNet-20 for CIFAR (n = 3; 0.27M parameters)."""
    return CifarResNet(3, num_classes, in_channels=in_channels, width=width)


@register_model
def resnet32(num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """ResNet-32 for CIFAR (n = 5; 0.46M parameters)."""
    return CifarResNet(5, num_classes, in_channels=in_channels, width=width)


@register_model
def resnet44(num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """ResNet-44 for CIFAR (n = 7; 0.66M parameters)."""
    return CifarResNet(7, num_classes, in_channels=in_channels, width=width)


@register_model
def resnet56(num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """ResNet-56 for CIFAR (n = 9; 0.85M parameters)."""
    return CifarResNet(9, num_classes, in_channels=in_channels, width=width)


# --- VGG and AlexNet for CIFAR --------------------------------------------------------------

_VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"] + [512, 512, 512, "M", 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32 x 32 inputs: ``features``, global pooling, one ``classifier``.

    A single Linear head after global pooling (rather than ImageNet VGG's 4096-4096 block)
    is the usual CIFAR choice: with five max pools a 32 x 32 image is 1 x 1 x 512 by then.
    """

    def __init__(self, cfg: list[int | str], num_classes: int, *, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                out = _scale(int(item), width)
                layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_relu_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class CifarAlexNet(nn.Module):
    """AlexNet for 32 x 32 inputs: 5 convs, 2 x 2 pooled features, 3 fully connected layers."""

    def __init__(self, num_classes: int, *, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c1, c2, c3, c4, c5 = (_scale(c, width) for c in (64, 192, 384, 256, 256))
        hidden = _scale(4096, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c3, c4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c4, c5, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(c5 * 4, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        _init_relu_net(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register_model
def vgg11_bn(num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """VGG-11 with BatchNorm for CIFAR (9.2M parameters)."""
    return CifarVGG(_VGG_CFGS["vgg11"], num_classes, in_channels=in_channels, width=width)


@register_model
def vgg16_bn(num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """VGG-16 with BatchNorm for CIFAR (14.7M parameters)."""
    return CifarVGG(_VGG_CFGS["vgg16"], num_classes, in_channels=in_channels, width=width)


@register_model
def alexnet_cifar(num_classes: int, *, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """AlexNet for CIFAR (23.3M parameters, 21M of them in the fully connected layers)."""
    return CifarAlexNet(num_classes, in_channels=in_channels, width=width)


# --- helpers ----------------------------------------------------------------------------------


def _resolve(arch: str, width: float) -> ModelFn:
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a string, got {arch!r}")
    if not arch.startswith(TORCHVISION_PREFIX):
        if arch not in _MODELS:
            raise KeyError(
                f"unknown arch {arch!r}{_suggest(arch, _MODELS)}; available: "
                f"{', '.join(list_models())}, or 'tv:<name>' for a torchvision model"
            )
        return _MODELS[arch]
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


def _scale(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _init_relu_net(model: nn.Module) -> None:
    # He initialisation for ReLU nets; zero biases so the seed alone fixes the output scale.
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_int(name: str, value: object, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
