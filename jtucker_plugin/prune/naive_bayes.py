"""Naive-Bayes channel importance for torch-pruning (Dai et al. 2022, *reconstruction*).

``NaiveBayesImportance`` is a ``torch_pruning.importance.Importance``: give it calibration data
and pass it to any torch-pruning pruner. For every channel of a pruning group it measures six
features on the calibration data and returns a Gaussian naive Bayes posterior
P(important | features) as the channel's score (low scores are pruned first).

Features of one channel (``FEATURES``), each averaged over the group's members that have it
(a feature no member has is missing and left out of the posterior, which is how naive Bayes
marginalises it):

- ``weight_l1``, ``weight_l2``: mean |w| and root-mean-square of the channel's output kernel in
  every conv/linear layer that produces it (per weight, so layers of different fan-in compare);
- ``bn_scale``: |gamma| of the batch norms on the channel;
- ``mean_activation``: mean |x| of the channel at the input of the layers that consume it (after
  a ReLU this is the mean activation);
- ``apoz``: the fraction of those inputs that are <= 0, i.e. zero after a ReLU (APoZ);
- ``taylor``: |sum of x * dL/dx| over a batch, the first-order estimate of the change of the
  calibration loss when the channel is masked, averaged over the calibration batches.

Labels of the classifier (the reconstruction's choice): a seeded *masking experiment*. On the
first calibration batch, ``probes`` channels, drawn round-robin from the groups in a seeded
order, are masked one at a time (zeroed at the input of every layer that consumes them, which is
what pruning them does) and the loss change is measured; channels whose loss change is above
the median of the probes are labelled important, the others unimportant. The classifier, fitted
on the probes' standardised features, then generalises to every channel from cheap features.
One classifier serves the whole model, so posteriors of different groups compare
(``global_pruning``). Should the probes not give two classes of at least two channels (a dead
network), or with ``labels="consensus"``, the labels are instead the top and bottom 30% of all
channels by their mean rank over the features (a consensus of the classic criteria).

The classifier is ``gaussian_nb``'s: missing features are left out of the posterior, and the
classes share one variance per feature, so that the posterior is monotone in every feature.

Groups that are not scored (``None``, which torch-pruning's pruners skip; ``groups.is_scorable``):

- groups that cross a parameter-free layer that changes the channel count, which torch-pruning
  treats as element-wise and would break. The CIFAR ResNets' option-A ``PadShortcut`` is one:
  it zero-pads channels, so the residual stream of each stage is coupled to the next stage's by
  an offset torch-pruning cannot express. Those groups are left alone, so on option-A ResNets
  only the inner channels of each block (``conv1`` -> ``bn1`` -> ``conv2``) are pruned: the
  standard practice for these networks. Detected generically: a group member that produces
  channels must cover the same share of its channels as the group's root does.
- groups no layer consumes: the model's outputs (the classifier's classes).

Scores are computed once per state of the model (its parameters' and buffers' identities,
shapes and versions) and reused for every group of that state, so an iterative pruner
re-estimates them after each step. The calibration runs the model in eval mode and leaves its
training flags and gradients as they were. Everything is deterministic under ``seed``.

Examples
--------
>>> import torch_pruning as tp
>>> model = create_model("resnet20")                                   # doctest: +SKIP
>>> batches = [(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))]
>>> imp = NaiveBayesImportance(batches, probes=32)                      # doctest: +SKIP
>>> pruner = tp.pruner.BasePruner(model, torch.randn(1, 3, 32, 32), importance=imp,
...                               pruning_ratio=0.3)                    # doctest: +SKIP
>>> pruner.step()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from jtucker_plugin import defaults
from jtucker_plugin.prune.gaussian_nb import GaussianNB, fit_gaussian_nb, nanmean, nanvar, nb_log_odds
from jtucker_plugin.prune.groups import (
    BATCHNORM,
    CONV_LINEAR,
    consumers,
    dependency_graph,
    group_root_idxs,
    is_scorable,
)

FEATURES = ("weight_l1", "weight_l2", "bn_scale", "mean_activation", "apoz", "taylor")
# Larger means more important, except for APoZ (the share of zeros): used by the consensus labels.
_FEATURE_SIGN = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
# Features spanning orders of magnitude are compared on a log scale; APoZ is a fraction.
_LOG_FEATURES = (0, 1, 2, 3, 5)
_CONSENSUS_QUANTILE = 0.3
_LABEL_CHOICES = ("masking", "consensus")

Batch = tuple[Any, Any]


# --- calibration --------------------------------------------------------------------------------


def default_forward(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    if isinstance(inputs, list | tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(outputs, targets)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class _InputStats:
    """Per-channel sums over a consumer's inputs: |x|, zeros, positions, and x * dL/dx per batch."""

    def __init__(self, channels: int):
        self.abs_sum = torch.zeros(channels, dtype=torch.float64)
        self.zeros = torch.zeros(channels, dtype=torch.float64)
        self.positions = 0.0
        self.batch_taylor = torch.zeros(channels, dtype=torch.float64)
        self.taylor = torch.zeros(channels, dtype=torch.float64)
        self.has_grad = False

    def add_input(self, x: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        self.abs_sum += x.abs().sum(dims).double().cpu()
        self.zeros += (x <= 0).sum(dims).double().cpu()
        self.positions += x.numel() / x.shape[1]

    def add_gradient(self, x: Tensor, grad: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        self.batch_taylor += (x * grad).sum(dims).double().cpu()
        self.has_grad = True

    def end_batch(self) -> None:
        # |dL| of the batch loss: signs cancel within a batch, as they do when a channel goes.
        self.taylor += self.batch_taylor.abs()
        self.batch_taylor.zero_()


@dataclass
class _Calibration:
    """What one model state gave: consumer input statistics and the fitted classifier."""

    fingerprint: tuple
    stats: dict[int, _InputStats]
    batches: int
    center: Tensor
    scale: Tensor
    floors: Tensor
    classifier: GaussianNB
    labels_used: str


def _fingerprint(model: nn.Module) -> tuple:
    # A pruned tensor is a new object of a new shape; an optimiser step or a training-mode forward
    # (batch-norm statistics) updates tensors in place, which bumps their version counter.
    tensors = (*model.parameters(), *model.buffers())
    return tuple((id(t), tuple(t.shape), t._version) for t in tensors)


class NaiveBayesImportance(tp.importance.Importance):
    """Channel importance: a Gaussian naive Bayes posterior P(important | features).

    See the module docstring for the features, the labels and which groups are left unscored.

    Parameters
    ----------
    calibration
        Batches ``(inputs, targets)``: a list, a ``DataLoader`` or any iterable; the first
        ``calibration_batches`` are kept (once, so a shuffling loader gives fixed data).
        ``inputs`` may be a tensor, or a tuple/dict unpacked into the model's arguments.
    loss_fn
        ``loss_fn(outputs, targets) -> scalar``; default cross-entropy.
    forward_fn
        ``forward_fn(model, inputs) -> outputs``; default ``default_forward``.
    calibration_batches
        How many batches of ``calibration`` to use.
    probes
        Channels masked one at a time to label the classifier (more: better labels, one forward
        pass of the first batch each).
    labels
        ``'masking'`` (default) or ``'consensus'``; see the module docstring.
    var_smoothing
        Added to every variance, times the largest feature variance.
    seed
        Drives the choice of probed channels.

    Raises
    ------
    ValueError
        If an argument is out of range or ``calibration`` holds no batch.
    TypeError
        If a batch is not an ``(inputs, targets)`` pair.
    """

    def __init__(
        self,
        calibration: Iterable[Batch],
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        *,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        calibration_batches: int = defaults.PRUNE_CALIBRATION_BATCHES,
        probes: int = defaults.NAIVE_BAYES_PROBES,
        labels: str = "masking",
        var_smoothing: float = defaults.NAIVE_BAYES_VAR_SMOOTHING,
        seed: int = 0,
    ):
        for name, value, minimum in (("calibration_batches", calibration_batches, 1), ("probes", probes, 4)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"NaiveBayesImportance: {name} must be an integer >= {minimum}, got {value!r}"
                )
        if labels not in _LABEL_CHOICES:
            raise ValueError(f"NaiveBayesImportance: labels must be one of {_LABEL_CHOICES}, got {labels!r}")
        if not var_smoothing > 0:
            raise ValueError(f"NaiveBayesImportance: var_smoothing must be > 0, got {var_smoothing!r}")
        batches = []
        for i, batch in enumerate(calibration):
            if i >= calibration_batches:
                break
            if not isinstance(batch, list | tuple) or len(batch) != 2:
                length = f" of length {len(batch)}" if isinstance(batch, list | tuple) else ""
                raise TypeError(
                    f"NaiveBayesImportance: calibration[{i}] must be an (inputs, targets) pair, "
                    f"got {type(batch).__name__}{length}"
                )
            batches.append((batch[0], batch[1]))
        if not batches:
            raise ValueError("NaiveBayesImportance: calibration holds no batch")
        self.batches = batches
        self.loss_fn = loss_fn or _default_loss
        self.forward_fn = forward_fn or default_forward
        self.probes = probes
        self.labels = labels
        self.var_smoothing = var_smoothing
        self.seed = seed
        self._state: _Calibration | None = None

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        """Posterior P(important) of each channel of ``group[0]``'s indices (float64), or ``None``
        for a group that is not scored (see ``is_scorable``)."""
        if not is_scorable(group):
            return None
        state = self._calibrate(dependency_graph(group))
        features = self._standardise(group_features(group, state.stats, state.batches), state)
        return torch.sigmoid(nb_log_odds(state.classifier, features))

    def features(self, group: Any) -> Tensor:
        """The raw ``FEATURES`` of the group's channels (n x 6, NaN = missing), for inspection."""
        state = self._calibrate(dependency_graph(group))
        return group_features(group, state.stats, state.batches)

    # --- one calibration per model state ---

    @torch.no_grad()
    def _calibrate(self, DG: Any) -> _Calibration:
        model = DG.model
        fingerprint = _fingerprint(model)
        if self._state is not None and self._state.fingerprint == fingerprint:
            return self._state
        groups = [g for g in DG.get_all_groups(root_module_types=CONV_LINEAR) if is_scorable(g)]
        if not groups:
            raise ValueError(f"NaiveBayesImportance: {type(model).__name__} has no prunable group to score")
        plans = [consumers(g) for g in groups]
        hooked = {id(m): m for plan in plans for m, _, _ in plan}
        stats: dict[int, _InputStats] = {}
        masks: dict[int, Tensor] = {}
        captured: list[tuple[int, Tensor]] = []

        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            mask = masks.get(id(module))
            if mask is not None:
                x = x.index_fill(1, mask.to(x.device), 0.0)
                return (x, *args[1:])
            if collecting:
                stats.setdefault(id(module), _InputStats(x.shape[1])).add_input(x.detach())
                if x.requires_grad:
                    captured.append((id(module), x))
            return None

        flags = [(m, m.training) for m in model.modules()]
        handles = [m.register_forward_pre_hook(pre_hook) for m in hooked.values()]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            model.eval()
            collecting = True
            base_loss = None
            for x, y in self.batches:
                x, y = _to(x, device), _to(y, device)
                captured.clear()
                with torch.enable_grad():
                    loss = self.loss_fn(self.forward_fn(model, x), y)
                    tensors = list({id(t): t for _, t in captured}.values())
                    grads = (
                        torch.autograd.grad(loss, tensors, allow_unused=True)
                        if tensors and loss.requires_grad
                        else []
                    )
                grad_of = {id(t): g for t, g in zip(tensors, grads, strict=True)}
                for key, t in captured:
                    if grad_of.get(id(t)) is not None:
                        stats[key].add_gradient(t.detach(), grad_of[id(t)])
                for s in stats.values():
                    s.end_batch()
                base_loss = float(loss) if base_loss is None else base_loss
            captured.clear()
            collecting = False
            batches = len(self.batches)
            raw = [group_features(g, stats, batches) for g in groups]
            floors = _log_floors(torch.cat(raw))
            logged = [_log_transform(f, floors) for f in raw]
            everything = torch.cat(logged)
            center = nanmean(everything)
            scale = nanvar(everything).sqrt().nan_to_num(1.0).clamp_min(1e-12)
            center = center.nan_to_num(0.0)
            standardised = [(f - center) / scale for f in logged]
            X, y, used = self._labelled(groups, plans, standardised, masks, model, device, base_loss)
        finally:
            for h in handles:
                h.remove()
            for m, flag in flags:
                m.training = flag
        classifier = fit_gaussian_nb(X, y, var_smoothing=self.var_smoothing)
        self._state = _Calibration(fingerprint, stats, batches, center, scale, floors, classifier, used)
        return self._state

    def _labelled(
        self, groups, plans, standardised, masks, model, device, base_loss
    ) -> tuple[Tensor, Tensor, str]:
        if self.labels == "masking":
            x, y = _to(self.batches[0][0], device), _to(self.batches[0][1], device)
            chosen, deltas = [], []
            for g, c in _probe_order(groups, self.probes, self.seed):
                masks.clear()
                for module, idxs, root in plans[g]:
                    masks[id(module)] = idxs[root == group_root_idxs(groups[g])[c]]
                deltas.append(float(self.loss_fn(self.forward_fn(model, x), y)) - base_loss)
                chosen.append(standardised[g][c])
            masks.clear()
            delta = torch.tensor(deltas, dtype=torch.float64)
            labels = (delta > delta.median()).long()
            if min(int(labels.sum()), int((1 - labels).sum())) >= 2:
                return torch.stack(chosen), labels, "masking"
        return (*_consensus_labels(torch.cat(standardised)), "consensus")

    def _standardise(self, raw: Tensor, state: _Calibration) -> Tensor:
        return (_log_transform(raw, state.floors) - state.center) / state.scale


def _probe_order(groups: Sequence[Any], probes: int, seed: int) -> list[tuple[int, int]]:
    """``probes`` (group, channel position) pairs: groups taken in turn, channels in a seeded order."""
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(len(group_root_idxs(g)), generator=generator).tolist() for g in groups]
    chosen: list[tuple[int, int]] = []
    depth = 0
    while len(chosen) < probes and any(depth < len(o) for o in orders):
        for g, order in enumerate(orders):
            if depth < len(order) and len(chosen) < probes:
                chosen.append((g, order[depth]))
        depth += 1
    return chosen


def _consensus_labels(X: Tensor) -> tuple[Tensor, Tensor]:
    """Top / bottom ``_CONSENSUS_QUANTILE`` of all channels by their mean signed feature rank."""
    ranks = torch.full_like(X, torch.nan)
    for j in range(X.shape[1]):
        present = ~X[:, j].isnan()
        if present.sum() > 1:
            order = X[present, j].argsort().argsort().double()
            ranks[present, j] = (order / (present.sum() - 1) - 0.5) * _FEATURE_SIGN[j]
    consensus = nanmean(ranks.T).nan_to_num(0.0)
    low, high = (
        torch.quantile(consensus, _CONSENSUS_QUANTILE),
        torch.quantile(consensus, 1 - _CONSENSUS_QUANTILE),
    )
    keep = (consensus <= low) | (consensus >= high)
    labels = (consensus >= high).long()
    if labels[keep].sum() == 0 or labels[keep].sum() == keep.sum():
        # All channels look alike: split at the median rank, ties by position.
        order = consensus.argsort(stable=True).argsort()
        keep = torch.ones_like(keep)
        labels = (order >= len(order) // 2).long()
    return X[keep], labels[keep]


def _log_floors(raw: Tensor) -> Tensor:
    """Per feature, a floor added before the log: a thousandth of the median positive value, so
    that a dead channel (0) lands a fixed distance below the others instead of at -inf."""
    floors = torch.ones(raw.shape[1], dtype=torch.float64)
    for j in _LOG_FEATURES:
        values = raw[:, j]
        positive = values[(values > 0) & ~values.isnan()]
        if len(positive):
            floors[j] = 1e-3 * positive.median()
    return floors


def _log_transform(raw: Tensor, floors: Tensor) -> Tensor:
    out = raw.clone()
    for j in _LOG_FEATURES:
        out[:, j] = torch.log(raw[:, j] + floors[j])
    return out


def group_features(group: Any, stats: dict[int, _InputStats], batches: int) -> Tensor:
    """``FEATURES`` of each channel of ``group[0]``'s indices (n x 6, float64, NaN = missing).

    Each member of the group adds what it knows about a channel (its kernel norms, its batch-norm
    scale, or the statistics of the channel at its input), mapped to the root channel through
    the group's index mapping; a feature is the mean over the members that have it.
    """
    DG = dependency_graph(group)
    root = group_root_idxs(group)
    position = {r: i for i, r in enumerate(root)}
    sums = torch.zeros(len(root), len(FEATURES), dtype=torch.float64)
    counts = torch.zeros_like(sums)

    def add(feature: int, roots: Sequence[int], values: Tensor) -> None:
        for r, v in zip(roots, values.tolist(), strict=True):
            if r in position and not math.isnan(v):
                sums[position[r], feature] += v
                counts[position[r], feature] += 1

    for i, (dep, idxs) in enumerate(group):
        module, roots, idx = dep.target.module, group[i].root_idxs, list(idxs)
        if not idx:
            continue
        out = DG.is_out_channel_pruning_fn(dep.handler)
        if out and isinstance(module, CONV_LINEAR):
            weight = module.weight.detach()
            if getattr(module, "transposed", False):
                weight = weight.transpose(0, 1)
            w = weight[idx].flatten(1).double()
            add(0, roots, w.abs().mean(1))
            add(1, roots, w.pow(2).mean(1).sqrt())
        elif out and isinstance(module, BATCHNORM) and module.affine:
            add(2, roots, module.weight.detach()[idx].abs().double())
        elif not out and isinstance(module, CONV_LINEAR) and id(module) in stats:
            s = stats[id(module)]
            add(3, roots, s.abs_sum[idx] / max(s.positions, 1.0))
            add(4, roots, s.zeros[idx] / max(s.positions, 1.0))
            if s.has_grad:
                add(5, roots, s.taylor[idx] / batches)
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)
