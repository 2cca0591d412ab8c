import os

import pytest
import safetensors.torch
import torch
from torch import nn

from jtucker_plugin.metrics import (
    compression_ratio,
    count_macs,
    count_parameters,
    latency_ms,
    model_bytes,
    state_bytes,
    unique_parameters,
)


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


class Nested(nn.Module):
    """A custom module built of convs, one of them used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(6, 2, 1, bias=False)
        self.core = nn.Conv2d(2, 2, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core(self.core(self.reduce(x)))


def test_count_parameters_counts_a_shared_submodule_once():
    shared = nn.Linear(4, 4)  # 20 parameters
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))  # + 10
    assert len(model.state_dict()) == 6  # the shared weights do appear twice by name
    assert count_parameters(model) == 30


def test_unique_parameters_across_models_sharing_a_module_and_a_parameter():
    shared_module = nn.Conv2d(3, 4, 1, bias=False)  # 12
    a = nn.Sequential(shared_module, nn.Linear(4, 3))  # + 15
    b = nn.Sequential(shared_module, nn.Linear(4, 3))  # + 15, minus the tied weight below
    b[1].weight = a[1].weight  # one nn.Parameter shared, as MTZ's shared neurons
    assert count_parameters(a) == 27
    assert count_parameters(b) == 27
    assert unique_parameters([a, b]) == 12 + 15 + 3
    assert unique_parameters([a, a]) == 27
    assert unique_parameters([]) == 0


def test_unique_parameters_rejects_non_modules():
    with pytest.raises(TypeError, match=r"models\[1\].*Tensor"):
        unique_parameters([nn.Linear(2, 2), torch.zeros(2)])


@pytest.mark.parametrize(
    ("conv", "expected"),
    [
        # H'W' * S * C * k * k: biases add no multiply-accumulates
        (nn.Conv2d(3, 8, 3, padding=1), 10 * 12 * 8 * 3 * 9),
        (nn.Conv2d(3, 8, 3, bias=False), 8 * 10 * 8 * 3 * 9),
        (nn.Conv2d(3, 6, (3, 5), stride=2, bias=False), 4 * 4 * 6 * 3 * 15),
    ],
)
def test_count_macs_of_a_single_conv(conv, expected):
    assert count_macs(conv, (3, 10, 12)) == expected


def test_count_macs_of_a_grouped_conv():
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    assert count_macs(conv, (4, 6, 6)) == 36 * 8 * (4 // 2) * 9


def test_count_macs_of_a_linear():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 7))
    assert count_macs(model, (3, 4, 5)) == 60 * 7


def test_count_macs_of_a_sequential_cnn_ignores_norms_activations_and_pooling():
    expected = 16 * 16 * 8 * 3 * 9 + 16 * 16 * 4 * 8 + 4 * 5
    assert count_macs(small_cnn(), (3, 16, 16)) == expected


def test_count_macs_counts_nested_modules_once_per_call():
    model = nn.Sequential(Nested(), nn.Sequential(nn.Conv2d(2, 3, 1, bias=False)))
    per_position = 6 * 2 + 2 * (2 * 2 * 9) + 2 * 3
    assert count_macs(model, (6, 5, 5)) == 25 * per_position


def test_count_macs_counts_a_module_with_two_parents_by_its_calls():
    shared = nn.Conv2d(3, 3, 1, bias=False)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    assert count_macs(model, (3, 4, 4)) == 2 * 16 * 9


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_count_macs_leaves_the_model_unchanged():
    model = small_cnn()
    model.train()
    model[1].eval()  # a mixed state must survive too
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)

    count_macs(model, (3, 8, 8))

    assert [m.training for m in model.modules()] == [
        True,
        True,
        False,
        True,
        True,
        True,
        True,
        True,
    ]
    assert model[0].bias is not None and model[6].bias is not None
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert _hooks(model) == hooks
    assert not any(hasattr(m, "__flops__") for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("shape", [(3, 8), (3, 8, 0), [3, 8, 8.0], "3x8x8"])
def test_count_macs_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="three positive ints"):
        count_macs(small_cnn(), shape)


def test_state_bytes_equals_the_size_of_a_written_file(tmp_path):
    tensors = {
        "conv.weight": torch.randn(8, 3, 3, 3),
        "counts": torch.arange(7),
        "half": torch.ones(5, dtype=torch.float16),
        "transposed": torch.randn(4, 6).t(),  # non-contiguous: packed, same size
    }
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    assert state_bytes(tensors) == os.path.getsize(path)


def test_state_bytes_rejects_non_tensors():
    with pytest.raises(TypeError, match="'a' -> int"):
        state_bytes({"a": 3})


def test_model_bytes_stores_shared_tensors_once(tmp_path):
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(16, 2))
    state = model.state_dict()
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({k: state[k] for k in ("0.weight", "0.bias", "3.weight", "3.bias")}, path)
    assert model_bytes(model) == os.path.getsize(path)
    # Storing the shared layer twice would cost about its size again.
    assert model_bytes(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2))) > (
        model_bytes(model) + 16 * 17 * 4
    )


def test_latency_is_positive_and_restores_training_flags():
    model = small_cnn()
    model.train()
    model[1].eval()
    flags = [m.training for m in model.modules()]
    running_mean = model[1].running_mean.clone()

    ms = latency_ms(model, (3, 8, 8), 2, repeats=3, warmup=1)

    assert isinstance(ms, float) and ms > 0
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[1].running_mean, running_mean)
    model.eval()
    latency_ms(model, (3, 8, 8), 1, repeats=1, warmup=0)
    assert not model.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": 1, "repeats": 0}, "repeats must be an int >= 1"),
        ({"batch_size": 1, "warmup": -1}, "warmup must be an int >= 0"),
    ],
)
def test_latency_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        latency_ms(small_cnn(), (3, 8, 8), **kwargs)


def test_compression_ratio():
    assert compression_ratio(3 * 1000, 1000) == 3.0
    assert compression_ratio(0, 5) == 0.0
    with pytest.raises(ValueError, match="unique must be a positive count, got 0"):
        compression_ratio(100, 0)
    with pytest.raises(ValueError, match="dense_parameters must be >= 0"):
        compression_ratio(-1, 10)
