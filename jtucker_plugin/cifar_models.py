"""The CIFAR architectures of the model zoo, each registered by name with ``register_model``.

Every architecture takes ``(num_classes, *, in_channels=3, width=1.0)``, is built for 32 x 32
inputs and is reached by name through ``jtucker_plugin.models.create_model``, which imports this
module on first use of the registry:

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
>>> sum(p.numel() for p in resnet20(10).parameters())
269722
>>> vgg11_bn(10, width=0.25).classifier
Linear(in_features=128, out_features=10, bias=True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jtucker_plugin.layers import register_layer
from jtucker_plugin.models import check_int, register_model

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
            check_int(name, value, minimum=minimum)
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


def _scale(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _init_relu_net(model: nn.Module) -> None:
    # He initialisation for ReLU nets; zero biases so the seed alone fixes the output scale.
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
