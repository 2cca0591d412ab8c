"""Tucker and J-Tucker as Intel Neural Compressor algorithms, and INC quantization of task models.

The first test is written like INC's own examples: after ``import jtucker_plugin`` only INC's
API is called (and torch's), and the result is a J-Tucker-decomposed set of task models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import jtucker_plugin
import jtucker_plugin.integrations.inc_quantize as inc_quantize
import jtucker_plugin.integrations.neural_compressor as inc  # until `import jtucker_plugin` does it
from jtucker_plugin.decompose.apply import decompose_bundle
from jtucker_plugin.decompose.layers import TuckerConv2d
from jtucker_plugin.decompose.ranks import FixedConfig, RatioConfig, select_ranks
from jtucker_plugin.integrations.inc_quantize import quantize_tasks
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo

SHAPE = (1, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _models(n: int = 2) -> dict[str, nn.Module]:
    """Task models whose batch norms are not the identity, as after training (folding them matters)."""
    models = {}
    for i in range(n):
        model = create_model("resnet8", 3 + i, in_channels=1, width=0.5, seed=i).eval()
        g = torch.Generator().manual_seed(100 + i)
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            c = bn.num_features
            bn.running_mean.copy_(0.5 * torch.randn(c, generator=g))
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.data.copy_(0.2 * torch.randn(c, generator=g))
        models[f"t{i}"] = model
    return models


def _inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _plugin_jtucker(models: dict[str, nn.Module], rank_config, joint: bool = True) -> dict[str, nn.Module]:
    """The same decomposition through the plugin's own API, for comparison."""
    models = copy.deepcopy(models)
    info = {t: TaskInfo(arch="resnet8", num_classes=3, in_channels=1, input_shape=SHAPE) for t in models}
    bundle = Bundle(models, info)
    decompose_bundle(bundle, lambda infos, _: select_ranks(rank_config, infos), joint=joint, min_params=0)
    return bundle.models


def test_inc_example_script_decomposes_with_plain_inc_calls():
    # --- what a user writes -------------------------------------------------------------------
    assert jtucker_plugin.__version__  # `import jtucker_plugin` registers the algorithms
    from neural_compressor.torch.quantization import quantize

    fp32_models = _models()
    tasks = nn.ModuleDict(copy.deepcopy(fp32_models))  # one task model per task, same architecture
    x = _inputs()
    q_tasks = quantize(tasks, quant_config={"jtucker": {"rank": 0.5, "min_params": 0}}, example_inputs=(x,))
    # -------------------------------------------------------------------------------------------
    expected = _plugin_jtucker(fp32_models, RatioConfig(ratio=0.5))
    a, b = q_tasks["t0"], q_tasks["t1"]
    layer_a, layer_b = a.get_submodule("layer2.0.conv2"), b.get_submodule("layer2.0.conv2")
    assert isinstance(layer_a, TuckerConv2d) and layer_a.ranks == (8, 8)
    assert layer_a.in_proj is layer_b.in_proj and layer_a.out_proj is layer_b.out_proj  # shared factors
    assert layer_a.core is not layer_b.core  # a core per task
    assert isinstance(a.linear, nn.Linear)  # heads stay dense
    unique = {id(p): p.numel() for p in q_tasks.parameters()}
    dense = sum(p.numel() for m in fp32_models.values() for p in m.parameters())
    assert sum(unique.values()) < 0.75 * dense
    with torch.no_grad():
        for task in fp32_models:
            torch.testing.assert_close(q_tasks[task](x), expected[task].eval()(x), atol=1e-4, rtol=1e-4)


def test_tucker_config_matches_the_plugin_and_takes_per_layer_overrides():
    model = _models(1)["t0"]
    x = _inputs()
    config = inc.TuckerConfig(rank=0.5, min_params=0, exclude=["layer1.*"])
    config.set_local("layer3.*", inc.TuckerConfig(rank=[3, 2], min_params=0))
    from neural_compressor.torch.quantization import quantize

    out = quantize(copy.deepcopy(model), config, example_inputs=(x,))

    assert not isinstance(out.get_submodule("layer1.0.conv1"), TuckerConv2d)  # excluded
    assert out.get_submodule("layer2.0.conv1").ranks == (8, 4)  # ratio 0.5 of 16 x 8
    assert out.get_submodule("layer3.0.conv2").ranks == (3, 2)  # the local config
    reference = _plugin_jtucker({"t0": model}, RatioConfig(ratio=0.5), joint=False)["t0"]
    with torch.no_grad():
        torch.testing.assert_close(
            out.get_submodule("layer2.0.conv1")(torch.ones(1, 8, 8, 8)),
            reference.get_submodule("layer2.0.conv1")(torch.ones(1, 8, 8, 8)),
        )
    fixed = _plugin_jtucker({"t0": model}, FixedConfig(rank=(3, 2)), joint=False)["t0"]
    with torch.no_grad():
        torch.testing.assert_close(
            out.get_submodule("layer3.0.conv2").core.weight, fixed.get_submodule("layer3.0.conv2").core.weight
        )


@pytest.mark.parametrize("tucker_first", [True, False])
def test_composes_with_inc_rtn_in_either_order(tucker_first):
    from neural_compressor.common.base_config import config_registry
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
    from neural_compressor.torch.quantization import RTNConfig, quantize

    tucker = config_registry.get_cls_configs()["torch"]["tucker"](rank=0.5, min_params=0)
    rtn = RTNConfig(bits=8, group_size=-1, use_layer_wise=False, white_list=[".*"])
    model = _models(1)["t0"]
    x = _inputs()
    reference = model(x).detach()

    out = quantize(model, tucker + rtn if tucker_first else rtn + tucker, example_inputs=(x,))

    assert isinstance(out.linear, INCWeightOnlyLinear)
    assert sum(isinstance(m, TuckerConv2d) for m in out.modules()) == 6
    assert out(x).shape == reference.shape


def test_int8_graph_configs_cannot_be_added_to_a_tucker_config():
    from neural_compressor.torch.quantization import get_default_dynamic_config, get_default_static_config

    for other in (get_default_static_config(), get_default_dynamic_config()):
        with pytest.raises(TypeError, match="decomposition must come before that export"):
            inc.JTuckerConfig() + other


def test_registration_and_algorithm_order():
    from neural_compressor.common.base_config import config_registry
    from neural_compressor.torch.utils.utility import algos_mapping

    registered = config_registry.get_cls_configs()["torch"]
    assert registered["tucker"] is inc.TuckerConfig and registered["jtucker"] is inc.JTuckerConfig
    order = list(algos_mapping)
    assert order.index("jtucker") < order.index("rtn") and order.index("tucker") < order.index("rtn")
    expanded = inc.TuckerConfig.get_config_set_for_tuning().expand()  # what INC's autotune does
    assert [c.energy for c in expanded] == [0.95, 0.9, 0.8]


def test_bad_configs_and_models_give_clear_errors():
    from neural_compressor.torch.quantization import quantize

    with pytest.raises(TypeError, match=r"unknown parameter 'enrgy'; did you mean 'energy'"):
        inc.TuckerConfig(enrgy=0.9)
    with pytest.raises(ValueError, match="give one of rank, energy, ranks; got rank, energy"):
        inc.TuckerConfig(rank=4, energy=0.9)
    with pytest.raises(ValueError, match="rank: expected an int >= 1"):
        inc.JTuckerConfig(rank=0)
    with pytest.raises(ValueError, match="unknown rank strategy 'energi'"):
        inc.JTuckerConfig(ranks={"strategy": "energi"})
    with pytest.raises(
        TypeError, match=r"pass them as MultiTaskModel\(\{task: model, \.\.\.\}\), got a CifarResNet"
    ):
        quantize(_models(1)["t0"], inc.JTuckerConfig(), example_inputs=(_inputs(),))
    with pytest.raises(ValueError, match=r"pass example_inputs=\(batch,\) to quantize"):
        quantize(_models(1)["t0"], inc.TuckerConfig(min_params=0))


def test_multi_task_model_runs_each_task_on_its_input():
    models = _models()
    multi = inc.MultiTaskModel(models)
    x0, x1 = _inputs(0), _inputs(1)
    with torch.no_grad():
        y0, y1 = multi(x0, x1)
        torch.testing.assert_close(y1, models["t1"](x1))
        assert [y.shape[1] for y in multi(x0)] == [3, 4]
    with pytest.raises(
        ValueError, match=r"expected one input per task \(2: t0, t1\) or one input for all, got 3"
    ):
        multi(x0, x0, x0)


def test_rtn_keeps_shared_modules_shared():
    models = _models()
    shared = nn.Linear(32, 32)
    for model in models.values():
        model.extra = shared  # a shared linear layer, as FactorizedLinear's factors are
    result = quantize_tasks(models, "weight_only_rtn", {t: SHAPE for t in models})
    a, b = result.models["t0"], result.models["t1"]
    assert a.extra is b.extra and type(a.extra).__name__ == "INCWeightOnlyLinear"
    assert type(a.linear).__name__ == "INCWeightOnlyLinear" and a.linear is not b.linear
    assert result.shared_tensors() > 0
    assert type(models["t0"].extra) is nn.Linear  # the float models are untouched
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(x), models["t0"](x), atol=0.05, rtol=0.05)


def test_quantize_tasks_refuses_unknown_schemes_and_missing_calibration():
    models = _models()
    with pytest.raises(
        ValueError, match=r"'int8_statc' is not a quantization scheme.*did you mean 'int8_static'"
    ):
        quantize_tasks(models, "int8_statc", {t: SHAPE for t in models})
    with pytest.raises(ValueError, match=r"int8_static: no calibration batches for task\(s\) \['t1'\]"):
        quantize_tasks(models, "int8_static", {t: SHAPE for t in models}, calibration={"t0": [_inputs()]})


def _jtucker_bundle() -> Bundle:
    """Two resnet8 task models, J-Tucker decomposed at half ranks."""
    models = _models()
    info = {t: TaskInfo(arch="resnet8", num_classes=3, in_channels=1, input_shape=SHAPE) for t in models}
    bundle = Bundle(models, info)
    decompose_bundle(
        bundle, lambda infos, _: select_ranks(RatioConfig(ratio=0.5), infos), joint=True, min_params=0
    )
    return bundle


def test_int8_dynamic_quantizes_shared_factors_once():
    bundle = _jtucker_bundle()
    models = bundle.models

    result = quantize_tasks(bundle.models, "int8_dynamic", {t: SHAPE for t in models})

    int8 = {k: v for k, v in result.stored_tensors().items() if v.dtype == torch.int8}
    # Per task: conv1, 6 cores and the head; once for both tasks: the 6 in_proj and 6 out_proj
    # factors (each task's batch norm after out_proj stays a per-task affine, not folded into U).
    assert len(int8) == 2 * 8 + 12
    assert result.shared_tensors() >= 12
    x = _inputs()
    with torch.no_grad():
        for task, model in bundle.models.items():
            expected = model(x)
            assert (result.models[task](x) - expected).abs().max() < 0.1 * expected.abs().max()
            assert result.models[task](x[:1]).shape == (1, expected.shape[1])  # any batch size


def test_int8_weights_are_symmetric_and_store_no_zero_points():
    bundle = _jtucker_bundle()
    models = bundle.models
    calibration = {t: [_inputs()] for t in models}

    result = quantize_tasks(bundle.models, "int8_static", {t: SHAPE for t in models}, calibration=calibration)

    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    nodes = [n for n in result.program.graph.nodes if n.op == "call_function" and n.target == dequantize]
    # Symmetric int8 weights: every zero point is zero, which the op takes as none given.
    assert len(nodes) > 12 and all(n.args[2] is None for n in nodes)
    assert not [t for t in result.stored_tensors().values() if t.dtype == torch.int64]
    x = _inputs()
    with torch.no_grad():
        for task, model in bundle.models.items():
            expected = model(x)
            assert (result.models[task](x) - expected).abs().max() < 0.1 * expected.abs().max()


def test_batch_norm_affines_are_stored_in_float16_and_computed_in_float32(monkeypatch):
    bundle = _jtucker_bundle()
    shapes = {t: SHAPE for t in bundle.models}
    calibration = {t: [_inputs()] for t in bundle.models}

    half = quantize_tasks(bundle.models, "int8_static", shapes, calibration=calibration)
    monkeypatch.setattr(inc_quantize, "AFFINE_DTYPE", torch.float32)
    full = quantize_tasks(bundle.models, "int8_static", shapes, calibration=calibration)

    # Each task's batch norm after a shared out_proj is an affine: a scale and a shift.
    affines = {k: v for k, v in half.stored_tensors().items() if "/_bn_" in k}
    assert len(affines) == 2 * 2 * 6 and all(v.dtype == torch.float16 for v in affines.values())
    in_float32 = {k: v for k, v in full.stored_tensors().items() if "/_bn_" in k}
    assert sorted(in_float32) == sorted(affines)
    for name, tensor in affines.items():
        assert torch.equal(tensor, in_float32[name].half())
    x = _inputs()
    with torch.no_grad():
        for task in bundle.models:
            out, reference = half.models[task](x), full.models[task](x)
            assert out.dtype == torch.float32
            # Only the affines' rounding differs: a few 8-bit activation codes may move by one.
            assert (out - reference).abs().max() <= 0.02 * reference.abs().max()
