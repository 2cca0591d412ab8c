"""NaiveBayesImportance through torch-pruning's own API: ResNet, VGG, J-Tucker layers."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch_pruning as tp
from sklearn.naive_bayes import GaussianNB as SklearnGaussianNB
from torch import nn

from jtucker_plugin.data import DataSpec, iterate_batches, load_task_data
from jtucker_plugin.decompose.layers import TuckerConv2d
from jtucker_plugin.models import create_model
from jtucker_plugin.prune import FEATURES, NaiveBayesImportance, fit_gaussian_nb, nb_log_odds
from jtucker_plugin.train import FitConfig, fit


def _batches(n: int, classes: int, shape=(3, 32, 32), size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, *shape, generator=g), torch.randint(0, classes, (size,), generator=g))
        for _ in range(n)
    ]


def _group(model: nn.Module, layer: nn.Module, idxs=None):
    DG = tp.DependencyGraph().build_dependency(model.eval(), example_inputs=torch.randn(1, 3, 32, 32))
    idxs = list(range(layer.out_channels)) if idxs is None else idxs
    return DG.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=idxs)


def test_resnet20_with_torch_pruning_only():
    """Only torch-pruning's API and the importance: no ignored layers, no plugin helpers."""
    model = create_model("resnet20")
    example = torch.randn(2, 3, 32, 32)
    inner = [b.conv1.out_channels for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    params = sum(p.numel() for p in model.parameters())

    imp = NaiveBayesImportance(_batches(1, 10), probes=8, seed=0)
    pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.3)
    pruner.step()

    assert model.eval()(example).shape == (2, 10)
    after = [b.conv1.out_channels for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    assert after == [int(n * (1 - 0.3)) for n in inner]  # torch-pruning keeps int(n * (1 - ratio))
    # Option-A shortcuts: the residual streams (stem, conv2 outputs, head input) are left alone.
    assert model.conv1.out_channels == 16 and model.layer3[2].conv2.out_channels == 64
    assert model.linear.in_features == 64 and model.linear.out_features == 10
    assert sum(p.numel() for p in model.parameters()) < 0.75 * params


def test_vgg_small_width():
    model = create_model("vgg11_bn", num_classes=5, width=0.125)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    before = [c.out_channels for c in convs]
    imp = NaiveBayesImportance(_batches(2, 5), probes=12, seed=1)
    tp.pruner.BasePruner(model, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=0.5).step()

    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert [c.out_channels for c in convs] == [n // 2 for n in before]
    assert model.classifier.in_features == convs[-1].out_channels and model.classifier.out_features == 5


def _tucker_resnet8() -> nn.Module:
    model = create_model("resnet8", num_classes=4, width=0.5)
    for name in ("layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"):
        conv = model.get_submodule(name)
        ranks = (conv.out_channels * 3 // 4, conv.in_channels * 3 // 4)
        model.set_submodule(name, TuckerConv2d.from_conv(conv, ranks))
    return model


def test_jtucker_factorized_model_prunes_inner_ranks():
    model = _tucker_resnet8()
    layers = [m for m in model.modules() if isinstance(m, TuckerConv2d)]
    ranks = [layer.ranks for layer in layers]
    imp = NaiveBayesImportance(_batches(1, 4), probes=8)
    tp.pruner.BasePruner(model, torch.randn(1, 3, 32, 32), importance=imp, pruning_ratio=0.5).step()

    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    for layer, (r1, r2) in zip(layers, ranks, strict=True):
        assert layer.ranks == (r1 // 2, r2 // 2)
        # Each factor still matches the core it feeds or reads.
        assert layer.in_proj.out_channels == layer.core.in_channels
        assert layer.out_proj.in_channels == layer.core.out_channels


def test_scores_have_the_group_length_and_are_deterministic():
    model = create_model("resnet20").eval()
    batches = _batches(1, 10, seed=3)
    group = _group(model, model.layer2[1].conv1)
    first = NaiveBayesImportance(batches, probes=8, seed=5)(group)
    again = NaiveBayesImportance(batches, probes=8, seed=5)(group)
    assert first.shape == (32,) and first.dtype == torch.float64
    assert ((first >= 0) & (first <= 1)).all()
    assert torch.equal(first, again)

    imp = NaiveBayesImportance(batches, probes=8, seed=5)
    part = imp(_group(model, model.layer2[1].conv1, idxs=[3, 9, 20]))
    assert torch.allclose(part, first[[3, 9, 20]])
    assert imp.features(group).shape == (32, len(FEATURES))


def test_unscorable_groups_are_left_out():
    model = create_model("resnet20").eval()
    imp = NaiveBayesImportance(_batches(1, 10), probes=8)
    # The stem's channels reach the next stages through PadShortcut's channel padding.
    assert imp(_group(model, model.conv1)) is None
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    head = DG.get_pruning_group(model.linear, tp.prune_linear_out_channels, idxs=list(range(10)))
    assert imp(head) is None


@pytest.fixture(scope="module")
def digits_resnet8():
    """ResNet-8 trained for a second on the embedded digits: a model whose channels matter."""
    data = load_task_data(
        DataSpec(dataset="digits", image_size=16, channels=1, mean=[0.5], std=[0.5], augment=False)
    )
    model = create_model("resnet8", 10, in_channels=1, width=0.5, seed=0)
    fit({"digits": model}, {"digits": data}, FitConfig(epochs=1, lr=0.05, batch_size=32), seed=0)
    return model.eval(), list(itertools.islice(iterate_batches(data.train, 64, shuffle=True, seed=0), 2))


def test_dead_channels_score_lowest(digits_resnet8):
    """Channels that carry nothing (zero kernel, zero batch-norm affine) rank last, also when the
    importance has already scored the model before they died (it notices the change)."""
    model, batches = copy.deepcopy(digits_resnet8[0]), digits_resnet8[1]
    block = model.layer2[0]
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 1, 16, 16))
    group = DG.get_pruning_group(block.conv1, tp.prune_conv_out_channels, idxs=list(range(16)))
    imp = NaiveBayesImportance(batches, probes=24, seed=0)
    alive = imp(group)
    dead = alive.argsort()[-4:].sort().values.tolist()  # kill the channels it likes best
    with torch.no_grad():
        block.conv1.weight[dead] = 0
        block.bn1.weight[dead] = 0
        block.bn1.bias[dead] = 0
    for scores in (imp(group), NaiveBayesImportance(batches, probes=24, seed=1)(group)):
        assert sorted(scores.argsort()[: len(dead)].tolist()) == dead


def test_consensus_labels():
    model = create_model("resnet20").eval()
    group = _group(model, model.layer1[0].conv1)
    scores = NaiveBayesImportance(_batches(1, 10), labels="consensus")(group)
    assert scores.shape == (16,) and not scores.isnan().any()


def test_gaussian_nb_matches_scikit_learn_and_marginalises_missing_features():
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(30, 4, generator=g), torch.randn(20, 4, generator=g) * 2 + 1]).double()
    y = torch.cat([torch.zeros(30), torch.ones(20)]).long()
    model = fit_gaussian_nb(X, y, var_smoothing=1e-2, shared_variance=False)
    reference = SklearnGaussianNB(var_smoothing=1e-2).fit(X.numpy(), y.numpy())
    expected = torch.from_numpy(reference.predict_proba(X.numpy())[:, 1])
    assert torch.allclose(torch.sigmoid(nb_log_odds(model, X)), expected, atol=1e-10)

    # A missing feature leaves the posterior of the other features.
    missing = X.clone()
    missing[:, 2] = torch.nan
    keep = [0, 1, 3]
    sub = type(model)(model.log_prior, model.mean[:, keep], model.var[:, keep])
    assert torch.allclose(nb_log_odds(model, missing), nb_log_odds(sub, X[:, keep]))


def test_shared_variance_gives_log_odds_linear_in_each_feature():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 3, generator=g).double()
    y = (X[:, 0] + 0.5 * torch.randn(40, generator=g).double() > 0).long()
    model = fit_gaussian_nb(X, y)
    assert torch.equal(model.var[0], model.var[1])
    line = torch.zeros(5, 3, dtype=torch.float64)
    line[:, 0] = torch.tensor([-50.0, -10.0, 0.0, 10.0, 50.0])
    odds = nb_log_odds(model, line)
    slopes = (odds[1:] - odds[:-1]) / (line[1:, 0] - line[:-1, 0])
    assert torch.allclose(slopes, slopes[0].expand(4)) and slopes[0] > 0


def test_input_errors():
    with pytest.raises(ValueError, match="calibration holds no batch"):
        NaiveBayesImportance([])
    with pytest.raises(TypeError, match=r"calibration\[0\] must be an \(inputs, targets\) pair, got Tensor"):
        NaiveBayesImportance([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="probes must be an integer >= 4, got 2"):
        NaiveBayesImportance(_batches(1, 2), probes=2)
    with pytest.raises(ValueError, match=r"labels must be one of \('masking', 'consensus'\), got 'random'"):
        NaiveBayesImportance(_batches(1, 2), labels="random")
    with pytest.raises(ValueError, match="both classes need samples"):
        fit_gaussian_nb(torch.zeros(3, 2), torch.zeros(3))
