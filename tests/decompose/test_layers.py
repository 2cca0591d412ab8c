from __future__ import annotations

import pytest
import torch
from torch import nn

from jtucker_plugin.decompose.layers import FactorizedLinear, TuckerConv2d
from jtucker_plugin.decompose.tucker import joint_tucker
from jtucker_plugin.layers import build_layer, layer_config


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "bias"), [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, True)]
)
def test_factorized_conv_equals_dense_reconstruction(stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 10, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    layer = TuckerConv2d.from_conv(conv, (6, 5))
    dense = layer.to_dense()
    x = torch.randn(2, 12, 9, 9, dtype=torch.float64)
    assert torch.allclose(layer(x), dense(x), atol=1e-10)
    assert layer(x).shape == conv(x).shape
    # At full ranks it is the same conv.
    full = TuckerConv2d.from_conv(conv, (10, 12))
    assert torch.allclose(full(x), conv(x), atol=1e-8)


def test_factorized_linear_equals_dense_and_is_exact_at_full_rank():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8).double()
    res = joint_tucker(linear.weight.detach()[None], (8, 8))
    layer = FactorizedLinear.from_factors(linear, res.U, res.cores[0], res.V)
    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), linear(x), atol=1e-10)
    assert torch.allclose(layer.to_dense().weight, linear.weight, atol=1e-10)


def test_layers_rebuild_from_config():
    conv = TuckerConv2d(8, 16, (4, 3), 3, stride=2, padding=1, bias=True)
    again = build_layer("TuckerConv2d", layer_config(conv))
    assert layer_config(again) == layer_config(conv)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in conv.state_dict().items()
    }


def test_rejects_grouped_conv():
    conv = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match="ungrouped"):
        TuckerConv2d.from_factors(conv, torch.eye(8)[:, :2], torch.zeros(2, 2, 3, 3), torch.eye(4)[:, :2])
