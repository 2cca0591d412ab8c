from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from jtucker_plugin.decompose.layers import TuckerConv2d
from jtucker_plugin.layers import register_layer
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import MANIFEST, TENSORS, Bundle, TaskInfo, describe_bundle


@register_layer
class _SharedPlusDelta(nn.Module):
    """Hybrid-style: one dense weight shared by the tasks, plus the task's own addition."""

    def __init__(self, features: int):
        super().__init__()
        self.shared = nn.Parameter(torch.randn(features, features))
        self.delta = nn.Parameter(torch.zeros(features, features))

    def forward(self, x):
        return x @ (self.shared + self.delta).T

    def layer_config(self):
        return {"features": self.shared.shape[0]}


def _bundle(n_tasks: int = 3) -> Bundle:
    tasks = [f"t{i}" for i in range(n_tasks)]
    models = {t: create_model("resnet8", 4 + i, seed=i) for i, t in enumerate(tasks)}
    # J-Tucker style: factor modules shared, cores per task.
    first = None
    for t in tasks:
        conv = models[t].get_submodule("layer1.0.conv1")
        U, V = torch.linalg.qr(torch.randn(16, 6))[0], torch.linalg.qr(torch.randn(16, 5))[0]
        core = torch.randn(6, 5, 3, 3)
        layer = (
            TuckerConv2d.from_factors(conv, U, core, V)
            if first is None
            else TuckerConv2d.from_factors(conv, U, core, V, in_proj=first.in_proj, out_proj=first.out_proj)
        )
        first = first or layer
        models[t].set_submodule("layer1.0.conv1", layer)
    # Parameter-level sharing (a shared dense weight with per-task deltas) inside the head.
    shared = nn.Parameter(torch.randn(8, 8))
    for t in tasks:
        extra = _SharedPlusDelta(8)
        extra.shared = shared
        extra.delta.data.normal_()
        models[t].extra = extra
    info = {
        t: TaskInfo(arch="resnet8", num_classes=4 + i, input_shape=(3, 32, 32), dense_parameters=78_000)
        for i, t in enumerate(tasks)
    }
    return Bundle(models, info, history=[{"stage": "test"}], provenance={"seed": 0})


def test_round_trip_is_bit_exact_and_shares_objects(tmp_path):
    bundle = _bundle()
    bundle.save(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b")
    assert loaded.tasks == bundle.tasks
    for t in bundle.tasks:
        a, b = bundle.models[t].state_dict(), loaded.models[t].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        x = torch.randn(2, 3, 32, 32)
        bundle.models[t].eval(), loaded.models[t].eval()
        assert torch.equal(bundle.models[t](x), loaded.models[t](x))
    m0, m1 = loaded.models["t0"], loaded.models["t1"]
    assert m0.layer1[0].conv1.in_proj is m1.layer1[0].conv1.in_proj
    assert m0.layer1[0].conv1.core is not m1.layer1[0].conv1.core
    assert m0.extra.shared is m1.extra.shared and m0.extra.delta is not m1.extra.delta
    assert loaded.unique_parameters() == bundle.unique_parameters()
    assert loaded.history == bundle.history and loaded.provenance["seed"] == 0


def test_shared_tensors_stored_once(tmp_path):
    bundle = _bundle()
    bundle.save(tmp_path / "b")
    stored = load_file(str(tmp_path / "b" / TENSORS))
    shared = [k for k in stored if k.startswith("shared/")]
    assert sorted(shared) == [
        "shared/t0/extra.shared",
        "shared/t0/layer1.0.conv1.in_proj.weight",
        "shared/t0/layer1.0.conv1.out_proj.weight",
    ]
    stored_numel = sum(
        v.numel()
        for k, v in stored.items()
        if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))
    )
    assert stored_numel == bundle.unique_parameters()
    assert bundle.unique_parameters() < sum(
        sum(p.numel() for p in m.parameters()) for m in bundle.models.values()
    )


def test_save_is_atomic_and_replaces_only_when_complete(tmp_path):
    bundle = _bundle(2)
    path = bundle.save(tmp_path / "b")
    before = (path / TENSORS).read_bytes()

    class Unsaveable(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    bundle.models["t1"].layer1[0].bn1 = Unsaveable()
    with pytest.raises(
        TypeError, match=r"task 't1': cannot save .*register the module types \['Unsaveable'\]"
    ):
        bundle.save(path)
    assert (path / TENSORS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_manifest_and_tensors_disagree(tmp_path):
    path = _bundle(2).save(tmp_path / "b")
    tensors = load_file(str(path / TENSORS))
    key = "t0/conv1.weight"
    tensors[key] = tensors[key][:8]
    save_file(tensors, str(path / TENSORS))
    with pytest.raises(ValueError, match=r"manifest and tensors disagree on 't0/conv1\.weight'"):
        Bundle.load(path)
    del tensors[key]
    save_file(tensors, str(path / TENSORS))
    with pytest.raises(ValueError, match=r"missing from tensors\.safetensors: \['t0/conv1\.weight'\]"):
        Bundle.load(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bundle folder"):
        Bundle.load(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "other"}))
    (tmp_path / TENSORS).write_bytes(b"")
    with pytest.raises(ValueError, match="not a jtucker-bundle manifest"):
        Bundle.load(tmp_path)


def test_describe_bundle(tmp_path):
    bundle = _bundle()
    info = describe_bundle(bundle.save(tmp_path / "b"))
    assert set(info["tasks"]) == {"t0", "t1", "t2"}
    assert info["summary"]["unique_parameters"] == bundle.unique_parameters()
    assert info["shared_tensors"] == 3 and info["tasks"]["t0"]["layer_types"]["TuckerConv2d"] == 1
    assert info["bytes"] == (tmp_path / "b" / TENSORS).stat().st_size


def test_mismatched_tasks_rejected():
    with pytest.raises(ValueError, match="models and info must name the same tasks"):
        Bundle({"a": nn.Linear(1, 1)}, {"b": TaskInfo(arch="resnet8", num_classes=2)})
