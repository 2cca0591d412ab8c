"""Structured channel pruning of a multi-task bundle through torch-pruning.

The T task models are pruned as *one* network: ``BundleNet`` holds them side by side and runs
each on its own input, so torch-pruning traces a single graph in which a module shared by
several tasks (J-Tucker's ``in_proj``/``out_proj``) is one node. Its channels are then coupled to
every task's layers that read or write them, and one pruning group spans all of them: the
importance is measured jointly (each member on its own task's calibration data, the naive-Bayes
features averaged across the tasks' members, the loss summed over the tasks) and the same
indices are removed from the shared module and from every task's layers around it. Sharing is
kept because torch-pruning prunes modules in place, and a shared module is one object.

What gets pruned, with the default guards of ``guarded``:

- J-Tucker / Tucker layers: the inner ranks (``core``'s output channels with ``out_proj``'s
  inputs, ``in_proj``'s outputs with ``core``'s inputs) and their outer channels where the
  architecture allows (a block's inner channels);
- CIFAR ResNets with option-A shortcuts: the inner channels of each block only (groups through
  ``PadShortcut`` are never scored, see ``groups.crosses_channel_change``);
- classifier heads never (each task's head is always ignored).

Two ways to say how much: ``pruning_ratio`` (torch-pruning's channel ratio, reached in
``iterative_steps`` equal steps, the importance re-estimated before each), or ``macs_target``
(the share of the bundle's MACs to keep, summed over tasks): in each of ``iterative_steps``
steps the importance is measured once, then the channel ratio that meets that step's target
(``macs_target ** (k / steps)``) is found by bisection on copies, and applied.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from jtucker_plugin import defaults
from jtucker_plugin.merge.branches import BRANCHES, PRUNERS, MixBranches, from_branches, to_branches
from jtucker_plugin.metrics import count_macs
from jtucker_plugin.models import head_name
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.prune.groups import is_scorable
from jtucker_plugin.prune.naive_bayes import NaiveBayesImportance

IMPORTANCES = ("naive_bayes", "magnitude", "taylor", "lamp", "bn_scale")
_BISECTION_STEPS = 10
_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)

Batch = tuple[Any, Any]


class BundleNet(nn.Module):
    """The task models of a bundle as one module: ``forward(*inputs)`` runs task i on input i.

    Modules shared by several task models are one object here too, so torch-pruning sees them
    once, coupled to every task that uses them.
    """

    def __init__(self, models: dict[str, nn.Module]):
        super().__init__()
        self.models = nn.ModuleDict(models)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(model(x) for model, x in zip(self.models.values(), inputs, strict=True))


def joint_loss(outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Sum over tasks of the cross-entropy of task i's outputs against its targets."""
    return sum(nn.functional.cross_entropy(o, t) for o, t in zip(outputs, targets, strict=True))


class GuardedImportance(tp.importance.Importance):
    """Any importance, with the groups that are unsafe to prune left unscored (``None``).

    Unsafe: a group that crosses a parameter-free channel-count change (option-A
    ``PadShortcut``) or that no layer consumes (the model's outputs); see
    ``groups.is_scorable``. Torch-pruning's pruners skip a group scored ``None``.
    """

    def __init__(self, importance: Callable[[Any], Tensor | None]):
        self.importance = importance

    def __call__(self, group: Any) -> Tensor | None:
        return self.importance(group) if is_scorable(group) else None


class _FrozenImportance(tp.importance.Importance):
    """Scores measured once, looked up by the root layer's name (valid on copies of the model)."""

    def __init__(self, scores: dict[str, Tensor]):
        self.scores = scores

    def __call__(self, group: Any) -> Tensor | None:
        score = self.scores.get(group._DG._module2name[group[0].dep.target.module])
        return None if score is None or len(score) != len(group[0].idxs) else score[list(group[0].idxs)]


def make_importance(
    name: str,
    *,
    calibration: Sequence[Batch] = (),
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    calibration_batches: int = defaults.PRUNE_CALIBRATION_BATCHES,
    probes: int = defaults.NAIVE_BAYES_PROBES,
    labels: str = "masking",
    seed: int = 0,
) -> tp.importance.Importance:
    """The importance called ``name`` (one of ``IMPORTANCES``).

    ``magnitude`` is torch-pruning's group L2 norm, ``taylor`` its first-order Taylor criterion
    (needs gradients: ``prune_bundle`` computes them on the calibration data before each step),
    ``lamp`` its LAMP, ``bn_scale`` its batch-norm |gamma| (groups without batch norm, e.g. Tucker
    cores, are not scored), ``naive_bayes`` ``NaiveBayesImportance`` on ``calibration``.

    Raises
    ------
    KeyError
        If ``name`` is unknown.
    """
    if name == "naive_bayes":
        return NaiveBayesImportance(
            calibration,
            loss_fn,
            calibration_batches=calibration_batches,
            probes=probes,
            labels=labels,
            seed=seed,
        )
    makers = {
        "magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": tp.importance.GroupTaylorImportance,
        "lamp": tp.importance.LAMPImportance,
        "bn_scale": tp.importance.BNScaleImportance,
    }
    if name not in makers:
        raise KeyError(f"unknown importance {name!r}; available: {', '.join(IMPORTANCES)}")
    return makers[name]()


def needs_gradients(name: str) -> bool:
    """Whether the importance ``name`` reads the parameters' gradients."""
    return name == "taylor"


def joint_batches(calibration: dict[str, Sequence[Batch]]) -> list[Batch]:
    """Per-task batches zipped into ``BundleNet`` batches ``((x_1, ..., x_T), (y_1, ..., y_T))``."""
    tasks = list(calibration)
    n = min(len(calibration[t]) for t in tasks)
    return [
        (tuple(calibration[t][i][0] for t in tasks), tuple(calibration[t][i][1] for t in tasks))
        for i in range(n)
    ]


def ignored_modules(bundle: Bundle, patterns: Sequence[str]) -> list[nn.Module]:
    """Every task's classifier head, and each module whose path matches one of ``patterns``.

    Raises
    ------
    ValueError
        If a pattern matches no module of any task (most likely a typo).
    """
    found: list[nn.Module] = []
    for i, pattern in enumerate(patterns):
        matches = [
            m
            for model in bundle.models.values()
            for path, m in model.named_modules()
            if path and fnmatch.fnmatchcase(path, pattern)
        ]
        if not matches:
            example = [p for p, _ in next(iter(bundle.models.values())).named_modules() if p][:6]
            raise ValueError(
                f"ignored_layers[{i}]: pattern {pattern!r} matches no module; module paths look like "
                f"{', '.join(example)}"
            )
        found += matches
    found += [model.get_submodule(head_name(model)) for model in bundle.models.values()]
    return found


def prune_bundle(
    bundle: Bundle,
    importance: str = "naive_bayes",
    *,
    calibration: dict[str, Sequence[Batch]] | None = None,
    pruning_ratio: float | None = None,
    macs_target: float | None = None,
    global_pruning: bool = False,
    ignored_layers: Sequence[str] = (),
    round_to: int | None = None,
    iterative_steps: int = defaults.PRUNE_ITERATIVE_STEPS,
    max_pruning_ratio: float = defaults.MAX_PRUNING_RATIO,
    probes: int = defaults.NAIVE_BAYES_PROBES,
    labels: str = "masking",
    seed: int = 0,
    stage: str = "prune",
) -> dict[str, Any]:
    """Prune the channels of every task model of ``bundle`` in place, shared parts jointly.

    Parameters
    ----------
    bundle
        The bundle; its models are changed in place, its history gets one record per pruned
        layer: ``{"stage", "layer", "tasks", "channels": [before, after], "kept": [indices]}``
        (``kept`` in the layer's original numbering).
    importance
        One of ``IMPORTANCES``.
    calibration
        Task -> batches ``(images, labels)``; needed by ``naive_bayes`` and ``taylor``.
    pruning_ratio, macs_target
        Exactly one: torch-pruning's channel ratio, or the share of the bundle's MACs to keep.
    global_pruning
        Rank channels across layers (one threshold) instead of within each layer.
    ignored_layers
        fnmatch patterns of module paths (e.g. ``"layer1.*"``) never pruned; heads always are.
    round_to
        Keep channel counts multiples of this.
    iterative_steps
        Pruning steps; the importance is re-estimated before each.
    max_pruning_ratio
        No layer loses more than this share of its channels.
    probes, labels
        Of ``NaiveBayesImportance``.
    seed
        Of the importance's random choices.

    Returns
    -------
    dict
        ``macs_before``, ``macs_after`` (bundle totals), ``macs_kept``, ``parameters_before``,
        ``parameters_after`` (unique), ``layers`` (pruned root layers), ``steps``.

    Raises
    ------
    ValueError
        If both or neither of ``pruning_ratio``/``macs_target`` are given, a value is out of
        range, a pattern matches nothing, calibration data is missing, or the MACs target cannot
        be met (the bundle may then be partly pruned).
    KeyError
        If ``importance`` is unknown.
    """
    _check_amount(pruning_ratio, macs_target, iterative_steps, max_pruning_ratio)
    if importance not in IMPORTANCES:
        raise KeyError(f"unknown importance {importance!r}; available: {', '.join(IMPORTANCES)}")
    needs_data = importance == "naive_bayes" or needs_gradients(importance)
    if needs_data and not calibration:
        raise ValueError(f"importance {importance!r} needs calibration data (task -> batches), got none")
    if calibration and set(calibration) != set(bundle.tasks):
        raise ValueError(f"calibration: expected batches for tasks {bundle.tasks}, got {sorted(calibration)}")
    net = BundleNet(bundle.models)
    ordered = {t: calibration[t] for t in bundle.tasks} if calibration else {}
    batches = joint_batches(ordered) if ordered else []
    imp = GuardedImportance(
        make_importance(
            importance,
            calibration=batches,
            loss_fn=joint_loss,
            calibration_batches=max(1, len(batches)),
            probes=probes,
            labels=labels,
            seed=seed,
        )
    )
    example = tuple(torch.zeros(2, *bundle.info[t].input_shape) for t in bundle.tasks)
    macs_before, params_before = _bundle_macs(bundle), bundle.unique_parameters()
    # Hybrid layers are pruned as their shared layer (one object: coupled across tasks) plus
    # each task's masked delta, task-mixed cores as their basis layers; from_branches rebuilds them.
    to_branches(bundle.models, delta="masked")
    flags = [(m, m.training) for m in net.modules()]
    try:
        ignored = ignored_modules(bundle, ignored_layers)
        # A task-mixed core's mixing weights (its task-mode rank, not channels) belong to no conv or
        # linear layer, so torch-pruning would warn and prune their last dimension along with the
        # basis layers' channels: declare them (unwrapped_parameters) and keep them whole (an
        # nn.Parameter in ignored_layers becomes one of torch-pruning's ignored_params).
        mixes = [m.mix for m in net.modules() if isinstance(m, MixBranches)]
        options = {
            "global_pruning": global_pruning,
            "ignored_layers": ignored + mixes,
            "unwrapped_parameters": [(p, 0) for p in mixes],
            "round_to": round_to,
            "max_pruning_ratio": max_pruning_ratio,
            "root_module_types": list(_ROOT_TYPES),
            "customized_pruners": PRUNERS,
        }
        prepare = (
            (lambda: _accumulate_gradients(net, batches)) if needs_gradients(importance) else (lambda: None)
        )
        tracker = _Tracker(bundle, net)
        net.eval()  # tracing and scoring must not move batch-norm statistics
        net_before = _net_macs(net, example)
        if pruning_ratio is not None:
            pruner = tp.pruner.BasePruner(
                net,
                example,
                importance=imp,
                pruning_ratio=pruning_ratio,
                iterative_steps=iterative_steps,
                **options,
            )
            for _ in range(iterative_steps):
                prepare()
                for group in pruner.step(interactive=True):
                    tracker.record(group)
                    group.prune()
        else:
            for k in range(1, iterative_steps + 1):
                prepare()
                goal = net_before * macs_target ** (k / iterative_steps)
                frozen = _frozen_scores(net, example, imp, options)
                ratio = _ratio_for_macs(net, example, frozen, options, goal, max_pruning_ratio)
                pruner = tp.pruner.BasePruner(net, example, importance=frozen, pruning_ratio=ratio, **options)
                for group in pruner.step(interactive=True):
                    tracker.record(group)
                    group.prune()
    finally:
        for m, flag in flags:
            m.training = flag
        if needs_gradients(importance):
            net.zero_grad(set_to_none=True)
        from_branches(bundle.models)  # after the modes: each rebuilt layer takes its branches'
    macs_after = _bundle_macs(bundle)
    bundle.history.extend(tracker.records(stage))
    return {
        "importance": importance,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_kept": macs_after / macs_before,
        "parameters_before": params_before,
        "parameters_after": bundle.unique_parameters(),
        "layers": len(tracker.kept),
        "steps": iterative_steps,
    }


def _check_amount(ratio: float | None, target: float | None, steps: int, max_ratio: float) -> None:
    if (ratio is None) == (target is None):
        raise ValueError(
            f"pruning_ratio: give exactly one of pruning_ratio and macs_target, got {ratio!r} and {target!r}"
        )
    if ratio is not None and not 0 < ratio < 1:
        raise ValueError(f"pruning_ratio: expected a number in (0, 1), got {ratio!r}")
    if target is not None and not 0 < target < 1:
        raise ValueError(f"macs_target: expected the share of MACs kept, in (0, 1), got {target!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"iterative_steps: expected an integer >= 1, got {steps!r}")
    if not 0 < max_ratio <= 1:
        raise ValueError(f"max_pruning_ratio: expected a number in (0, 1], got {max_ratio!r}")


def _bundle_macs(bundle: Bundle) -> int:
    return sum(count_macs(model, bundle.info[t].input_shape) for t, model in bundle.models.items())


def _accumulate_gradients(net: BundleNet, batches: Sequence[Batch]) -> None:
    net.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x, y in batches:
            joint_loss(net(*x), y).backward()


def _frozen_scores(
    net: BundleNet, example: tuple, imp: tp.importance.Importance, options: dict
) -> _FrozenImportance:
    ignored = [m for m in options["ignored_layers"] if isinstance(m, nn.Module)]
    DG = tp.DependencyGraph().build_dependency(
        net,
        example,
        verbose=False,
        customized_pruners=options["customized_pruners"],
        # A copy: torch-pruning appends the parameters it detects itself to this list.
        unwrapped_parameters=list(options["unwrapped_parameters"]),
        ignored_params=[p for p in options["ignored_layers"] if isinstance(p, nn.Parameter)],
    )
    scores = {}
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=_ROOT_TYPES):
        score = imp(group)
        if score is not None:
            scores[DG._module2name[group[0].dep.target.module]] = score.detach().cpu()
    return _FrozenImportance(scores)


def _ratio_for_macs(
    net: BundleNet, example: tuple, frozen: _FrozenImportance, options: dict, goal: float, max_ratio: float
) -> float:
    """The smallest channel ratio (to ``max_ratio / 2**10``) whose pruning brings ``net`` to ``goal`` MACs."""

    def macs_at(ratio: float) -> int:
        trial = copy.deepcopy(net)
        ignored = [_same_part(trial, net, m) for m in options["ignored_layers"]]
        unwrapped = [(_same_part(trial, net, p), dim) for p, dim in options["unwrapped_parameters"]]
        tp.pruner.BasePruner(
            trial,
            example,
            importance=frozen,
            pruning_ratio=ratio,
            **{**options, "ignored_layers": ignored, "unwrapped_parameters": unwrapped},
        ).step()
        return _net_macs(trial, example)

    reachable = macs_at(max_ratio)
    if reachable > goal:
        before = _net_macs(net, example)
        raise ValueError(
            f"macs_target: this step needs the bundle at {goal / before:.1%} of its current MACs, but "
            f"pruning every scored layer by max_pruning_ratio={max_ratio} leaves {reachable / before:.1%}; "
            "raise macs_target, max_pruning_ratio or iterative_steps, or ignore fewer layers"
        )
    low, high = 0.0, max_ratio
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if macs_at(middle) <= goal:
            high = middle
        else:
            low = middle
    return high


@torch.no_grad()
def _net_macs(net: nn.Module, example: tuple) -> int:
    """MACs of one forward pass per task at batch 1, counted as ``metrics.count_macs`` does
    (conv and linear weights only, a module called by several tasks once per call) but in one
    pass without copying: fast enough for a bisection."""
    total = 0

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        nonlocal total
        per_output = (
            module.weight[0].numel() if isinstance(module, nn.modules.conv._ConvNd) else module.in_features
        )
        total += output.numel() // output.shape[0] * per_output

    # A masked delta computes nothing of its own: its hybrid layer runs one dense weight.
    counted = [m for m in net.modules() if isinstance(m, _ROOT_TYPES) and type(m) not in PRUNERS]
    handles = [m.register_forward_hook(hook) for m in counted]
    try:
        net(*(x[:1] for x in example))
    finally:
        for h in handles:
            h.remove()
    return total


def _same_part(
    copy_root: nn.Module, original_root: nn.Module, part: nn.Module | nn.Parameter
) -> nn.Module | nn.Parameter:
    """The module or parameter of ``copy_root`` (a deep copy) that is ``part`` of ``original_root``."""
    if isinstance(part, nn.Parameter):
        names = {id(p): n for n, p in original_root.named_parameters()}
        return copy_root.get_parameter(names[id(part)])
    names = {id(m): n for n, m in original_root.named_modules()}
    return copy_root.get_submodule(names[id(part)])


class _Tracker:
    """Which original channels of each pruned root layer are left, across steps."""

    def __init__(self, bundle: Bundle, net: BundleNet):
        self.bundle = bundle
        self.where: dict[int, tuple[str, str]] = {}
        for task, model in bundle.models.items():
            # A layer inside a composed layer's branches is recorded under the composed layer's name.
            branches = [p + "." for p, m in model.named_modules() if isinstance(m, BRANCHES)]
            for path, module in model.named_modules():
                owner = next((b[:-1] for b in branches if path.startswith(b)), path)
                self.where.setdefault(id(module), (task, owner))
        self.initial: dict[int, int] = {}
        self.kept: dict[int, list[int]] = {}
        self.tasks: dict[int, set[str]] = {}
        self.modules: dict[int, nn.Module] = {}

    def record(self, group: Any) -> None:
        DG = group._DG
        root = group[0].dep.target.module
        key = id(root)
        if key not in self.kept:
            channels = DG.get_out_channels(root)
            self.initial[key], self.kept[key], self.modules[key] = channels, list(range(channels)), root
            self.tasks[key] = set()
        gone = set(group[0].idxs)
        self.kept[key] = [c for i, c in enumerate(self.kept[key]) if i not in gone]
        users = {id(dep.target.module) for dep, _ in group}
        self.tasks[key] |= {
            t for t, model in self.bundle.models.items() if any(id(m) in users for m in model.modules())
        }

    def records(self, stage: str) -> list[dict[str, Any]]:
        return [
            {
                "stage": stage,
                "layer": self.where[key][1],
                "tasks": [t for t in self.bundle.tasks if t in self.tasks[key]],
                "channels": [self.initial[key], len(kept)],
                "kept": kept,
            }
            for key, kept in self.kept.items()
        ]
