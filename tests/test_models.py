"""Tests of jtucker_plugin.models: the registry, the architectures and checkpoint loading."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from jtucker_plugin.cifar_models import PadShortcut
from jtucker_plugin.layers import build_layer, layer_config
from jtucker_plugin.models import (
    create_model,
    head_name,
    list_models,
    load_weights,
    model_input_channels,
    register_model,
)

# Small widths keep the big CIFAR nets fast to build; the ResNets are small at full width.
_TEST_WIDTH = {"vgg11_bn": 0.125, "vgg16_bn": 0.125, "alexnet_cifar": 0.0625}


def _shared_data() -> Path | None:
    env = os.environ.get("JTUCKER_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return root if root.is_dir() else None


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _NotATensor:
    """A custom object that a weights-only checkpoint must not unpickle."""


# --- registry ---------------------------------------------------------------------------------


def test_list_models_has_the_documented_architectures():
    expected = {"resnet8", "resnet20", "resnet32", "resnet44", "resnet56"}
    expected |= {"vgg11_bn", "vgg16_bn", "alexnet_cifar"}
    assert expected <= set(list_models())
    assert list_models("resnet*") == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet8"]
    assert list_models("nothing*") == []


def test_register_model_rejects_a_duplicate_name():
    def resnet20(num_classes, *, in_channels=3, width=1.0):
        return nn.Linear(1, num_classes)

    with pytest.raises(ValueError, match="'resnet20' is already registered"):
        register_model(resnet20)
    assert _n_params(create_model("resnet20")) == 269_722


def test_unknown_arch_suggests_the_closest_name():
    with pytest.raises(KeyError, match=r"unknown arch 'resnet2'; did you mean 'resnet20'\?.*resnet56"):
        create_model("resnet2")
    with pytest.raises(KeyError, match="did you mean 'resnet18'"):
        create_model("tv:resnet17")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 0}, ValueError, "num_classes must be >= 1, got 0"),
        ({"num_classes": 2.0}, TypeError, "num_classes must be an int, got 2.0"),
        ({"in_channels": 0}, ValueError, "in_channels must be >= 1"),
        ({"width": 0}, ValueError, "width must be > 0, got 0"),
        ({"width": "1"}, TypeError, "width must be a number"),
    ],
)
def test_create_model_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        create_model("resnet8", **kwargs)


def test_torchvision_models_take_no_width():
    with pytest.raises(ValueError, match="width must be 1 for torchvision model 'tv:resnet18'"):
        create_model("tv:resnet18", width=0.5)


# --- architectures ----------------------------------------------------------------------------


def test_parameter_counts_match_the_paper():
    # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters.
    assert _n_params(create_model("resnet20")) == 269_722
    assert _n_params(create_model("resnet56")) == 853_018
    assert _n_params(create_model("resnet20", num_classes=4)) == 269_722 - 6 * 65


@pytest.mark.parametrize("arch", list_models())
def test_every_arch_runs_a_forward_pass(arch):
    model = create_model(arch, num_classes=7, width=_TEST_WIDTH.get(arch, 1.0)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    head = model.get_submodule(head_name(model))
    assert isinstance(head, nn.Linear) and head.out_features == 7


@pytest.mark.parametrize("arch", ["resnet8", "vgg11_bn", "alexnet_cifar", "tv:resnet18"])
def test_first_conv_takes_in_channels(arch):
    model = create_model(arch, num_classes=3, in_channels=1, width=_TEST_WIDTH.get(arch, 1.0))
    assert model_input_channels(model) == 1
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_head_names():
    assert head_name(create_model("resnet20")) == "linear"
    assert head_name(create_model("vgg11_bn", width=0.125)) == "classifier"
    assert head_name(create_model("alexnet_cifar", width=0.0625)) == "classifier.6"
    assert head_name(create_model("tv:resnet18")) == "fc"
    # SqueezeNet has no Linear layer: its head is the last (1x1) convolution.
    assert head_name(create_model("tv:squeezenet1_1")) == "classifier.1"


def test_width_scales_resnet_channels_and_odd_widths_pad_unevenly():
    half = create_model("resnet20", width=0.5)
    assert [half.layer1[0].conv1.out_channels, half.layer3[0].conv1.out_channels] == [8, 32]
    # 0.3 gives 5 -> 10 -> 19 channels: the stage 3 shortcut pads 9 channels as 4 + 5.
    odd = create_model("resnet8", width=0.3)
    assert layer_config(odd.layer3[0].shortcut) == {"stride": 2, "pad_before": 4, "pad_after": 5}
    with torch.no_grad():
        assert odd(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_pad_shortcut_is_option_a_and_rebuilds_from_its_config():
    x = torch.arange(2 * 4 * 6 * 6, dtype=torch.float32).reshape(2, 4, 6, 6)
    shortcut = PadShortcut(stride=2, pad_before=2, pad_after=3)
    out = shortcut(x)
    assert out.shape == (2, 9, 3, 3)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert not out[:, :2].any() and not out[:, 6:].any()
    rebuilt = build_layer("PadShortcut", layer_config(shortcut))
    assert torch.equal(rebuilt(x), out)
    with pytest.raises(ValueError, match="pad_after must be >= 0, got -1"):
        PadShortcut(2, 1, -1)


# --- seeding ----------------------------------------------------------------------------------


def test_create_model_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = create_model("resnet8", seed=5), create_model("resnet8", seed=5)
    c = create_model("resnet8", seed=6)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


# --- loading weights --------------------------------------------------------------------------


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("fmt", ["plain.pth", "legacy.th", "file.safetensors"])
def test_loading_a_checkpoint_with_another_class_count_keeps_the_new_head(tmp_path, fmt):
    source = create_model("resnet8", num_classes=10, seed=1)
    saved = {k: v.clone() for k, v in source.state_dict().items()}
    if fmt == "legacy.th":
        ckpt = {"best_prec1": 90.0, "state_dict": {f"module.{k}": v for k, v in saved.items()}}
        path = tmp_path / fmt
        torch.save(ckpt, path)
    else:
        path = _save(saved, tmp_path / fmt)

    fresh = create_model("resnet8", num_classes=4, seed=2)
    loaded = create_model("resnet8", num_classes=4, seed=2, weights=path)
    for name, tensor in loaded.state_dict().items():
        if name.startswith("linear."):
            assert torch.equal(tensor, fresh.state_dict()[name]), name
        else:
            assert torch.equal(tensor, saved[name]), name
    assert loaded.linear.weight.shape == (4, 64)


def test_loading_the_same_class_count_loads_the_head(tmp_path):
    source = create_model("resnet8", seed=1)
    path = _save(source.state_dict(), tmp_path / "w.pt")
    loaded = load_weights(create_model("resnet8", seed=2), path)
    assert torch.equal(loaded.linear.weight, source.linear.weight)


def test_a_shape_mismatch_outside_the_head_names_file_key_and_shapes(tmp_path):
    state = create_model("resnet8").state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(32, 8, 3, 3)
    path = _save(state, tmp_path / "bad-shape.pth")
    with pytest.raises(
        ValueError,
        match=r"bad-shape\.pth.*layer2\.0\.conv1\.weight: checkpoint \(32, 8, 3, 3\) "
        r"vs model \(32, 16, 3, 3\)",
    ):
        create_model("resnet8", weights=path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = create_model("resnet8").state_dict()
    del state["bn1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = _save(state, tmp_path / "keys.safetensors")
    with pytest.raises(ValueError, match=r"keys\.safetensors.*missing keys \(1\): bn1\.weight"):
        create_model("resnet8", weights=path)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): extra\.weight"):
        create_model("resnet8", weights=path)


def test_a_head_of_another_input_width_is_a_mismatch_not_a_resize(tmp_path):
    state = create_model("resnet8").state_dict()
    state["linear.weight"] = torch.zeros(10, 32)
    path = _save(state, tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"linear\.weight: checkpoint \(10, 32\) vs model \(4, 64\)"):
        create_model("resnet8", num_classes=4, weights=path)


def test_a_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": create_model("resnet8").state_dict(), "hook": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"refusing to load weights file .*evil\.pth"):
        create_model("resnet8", weights=path)


def test_unsupported_and_absent_files(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported weights file .*w\.bin: expected one of"):
        create_model("resnet8", weights=tmp_path / "w.bin")
    with pytest.raises(FileNotFoundError, match=r"absent\.pth does not exist"):
        create_model("resnet8", weights=tmp_path / "absent.pth")
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match=r"notes\.pt is not a state dict: entries epoch"):
        create_model("resnet8", weights=path)


# --- pretrained weights on real data ----------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize(("arch", "min_top1"), [("resnet20", 0.91), ("resnet56", 0.925)])
def test_pretrained_cifar_resnets_reach_their_reported_accuracy(arch, min_top1):
    root = _shared_data()
    if root is None:
        pytest.skip("shared data not found: set JTUCKER_DATA or provide <repo>/../shared/data")
    (weights,) = sorted((root / "weights").glob(f"{arch}-*.th"))
    data = np.load(root / "cifar10-lossless-subset.npz")
    x = torch.from_numpy(data["x_test"]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    y = torch.from_numpy(data["y_test"]).long()

    model = create_model(arch, weights=weights).eval()
    with torch.inference_mode():
        pred = torch.cat([model(batch).argmax(1) for batch in x.split(250)])
    top1 = (pred == y).float().mean().item()
    assert len(y) == 1000
    assert top1 >= min_top1, f"{arch} top-1 {top1:.3f} < {min_top1}"
