"""Factorized layers: a Tucker-2 conv and a factorized linear layer whose factors can be shared.

``TuckerConv2d`` runs W ~= G x1 U x2 V as three convs: ``in_proj`` (1x1, C -> R2, V^T), ``core``
(d x d, R2 -> R1, G, with the original stride, padding and dilation) and ``out_proj`` (1x1,
R1 -> S, U). ``FactorizedLinear`` is the same with linear layers (W ~= U G V^T). The bias, if
any, is a parameter of the layer itself, so that ``in_proj`` and ``out_proj`` can be one module
object shared by every task's layer while cores and biases stay per task.

Examples
--------
>>> conv = nn.Conv2d(16, 32, 3, padding=1)
>>> layer = TuckerConv2d.from_conv(conv, ranks=(32, 16))      # full ranks: exact
>>> torch.allclose(layer.to_dense().weight, conv.weight, atol=1e-5)
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from jtucker_plugin.layers import register_layer


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@register_layer
class TuckerConv2d(nn.Module):
    """A conv factorized as 1x1 (V^T) -> d x d core (G) -> 1x1 (U), plus the bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ranks: tuple[int, int] | list[int],
        kernel_size: int | tuple[int, int] | list[int],
        stride: int | tuple[int, int] | list[int] = 1,
        padding: int | tuple[int, int] | list[int] = 0,
        dilation: int | tuple[int, int] | list[int] = 1,
        bias: bool = False,
    ):
        super().__init__()
        r1, r2 = (int(r) for r in ranks)
        self.in_proj = nn.Conv2d(in_channels, r2, 1, bias=False)
        self.core = nn.Conv2d(
            r2, r1, _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), bias=False
        )
        self.out_proj = nn.Conv2d(r1, out_channels, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def ranks(self) -> tuple[int, int]:
        return self.core.out_channels, self.core.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out_proj(self.core(self.in_proj(x)))
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def layer_config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_proj.in_channels,
            "out_channels": self.out_proj.out_channels,
            "ranks": list(self.ranks),
            "kernel_size": list(self.core.kernel_size),
            "stride": list(self.core.stride),
            "padding": list(self.core.padding),
            "dilation": list(self.core.dilation),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, ranks: tuple[int, int], *, n_iter_max: int | None = None
    ) -> TuckerConv2d:
        """Tucker-2 of one dense conv (the single-task case)."""
        from jtucker_plugin.decompose.tucker import tucker2

        kw = {} if n_iter_max is None else {"n_iter_max": n_iter_max}
        result = tucker2(conv.weight.detach(), ranks, **kw)
        return cls.from_factors(conv, result.U, result.cores[0], result.V)

    @classmethod
    def from_factors(
        cls,
        conv: nn.Conv2d,
        U: torch.Tensor,
        core: torch.Tensor,
        V: torch.Tensor,
        *,
        in_proj: nn.Conv2d | None = None,
        out_proj: nn.Conv2d | None = None,
    ) -> TuckerConv2d:
        """The layer replacing ``conv``: U (S x R1), core (R1 x R2 x d x d), V (C x R2).

        Pass ``in_proj`` / ``out_proj`` to reuse modules already holding V / U (shared by tasks).
        """
        if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(
                f"TuckerConv2d replaces ungrouped, zero-padded convs with numeric padding; got "
                f"groups={conv.groups}, padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            (U.shape[1], V.shape[1]),
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            bias=conv.bias is not None,
        ).to(conv.weight.dtype)
        dtype = conv.weight.dtype
        with torch.no_grad():
            layer.core.weight.copy_(core.to(dtype))
            if in_proj is None:
                layer.in_proj.weight.copy_(V.T.to(dtype)[:, :, None, None])
            else:
                layer.in_proj = in_proj
            if out_proj is None:
                layer.out_proj.weight.copy_(U.to(dtype)[:, :, None, None])
            else:
                layer.out_proj = out_proj
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def to_dense(self) -> nn.Conv2d:
        """The equivalent dense conv (G x1 U x2 V), e.g. for export or where it runs faster."""
        U = self.out_proj.weight[:, :, 0, 0]
        V = self.in_proj.weight[:, :, 0, 0].T
        weight = torch.einsum("sa,abhw,cb->schw", U, self.core.weight, V)
        conv = nn.Conv2d(
            V.shape[0],
            U.shape[0],
            self.core.kernel_size,
            self.core.stride,
            self.core.padding,
            self.core.dilation,
            bias=self.bias is not None,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


@register_layer
class FactorizedLinear(nn.Module):
    """A linear layer factorized as ``out_proj(core(in_proj(x)))`` = U G V^T x, plus the bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: tuple[int, int] | list[int],
        bias: bool = True,
    ):
        super().__init__()
        r1, r2 = (int(r) for r in ranks)
        self.in_proj = nn.Linear(in_features, r2, bias=False)
        self.core = nn.Linear(r2, r1, bias=False)
        self.out_proj = nn.Linear(r1, out_features, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def ranks(self) -> tuple[int, int]:
        return self.core.out_features, self.core.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out_proj(self.core(self.in_proj(x)))
        return y if self.bias is None else y + self.bias

    def layer_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_proj.in_features,
            "out_features": self.out_proj.out_features,
            "ranks": list(self.ranks),
            "bias": self.bias is not None,
        }

    @classmethod
    def from_factors(
        cls,
        linear: nn.Linear,
        U: torch.Tensor,
        core: torch.Tensor,
        V: torch.Tensor,
        *,
        in_proj: nn.Linear | None = None,
        out_proj: nn.Linear | None = None,
    ) -> FactorizedLinear:
        """The layer replacing ``linear``: U (S x R1), core (R1 x R2), V (C x R2)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            (U.shape[1], V.shape[1]),
            bias=linear.bias is not None,
        ).to(linear.weight.dtype)
        dtype = linear.weight.dtype
        with torch.no_grad():
            layer.core.weight.copy_(core.reshape(U.shape[1], V.shape[1]).to(dtype))
            if in_proj is None:
                layer.in_proj.weight.copy_(V.T.to(dtype))
            else:
                layer.in_proj = in_proj
            if out_proj is None:
                layer.out_proj.weight.copy_(U.to(dtype))
            else:
                layer.out_proj = out_proj
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """The equivalent dense linear layer."""
        weight = self.out_proj.weight @ self.core.weight @ self.in_proj.weight
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=self.bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear
