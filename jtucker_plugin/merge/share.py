"""Hard parameter sharing: one layer object for all tasks wherever their weights have one shape.

Task models fine-tuned from one backbone stay close to it (a few percent relative distance on
the three-task ResNet-20 scenario), so a single set of weights can serve them all. ``hard_share``
replaces every such layer of a bundle by ONE module object used by every task model: stored,
counted and trained once (joint fine-tuning sums the tasks' gradients into it). What carries the
tasks' own statistics or outputs stays per task: normalisation layers (batch norm keeps each
task's running statistics and affine parameters), the classifier heads, and any layer the caller
names in ``keep_per_task``.

Examples
--------
>>> from jtucker_plugin.models import create_model
>>> from jtucker_plugin.multitask import TaskInfo
>>> models = {t: create_model("resnet8", 4, seed=i) for i, t in enumerate("ab")}
>>> bundle = Bundle(models, {t: TaskInfo("resnet8", 4) for t in "ab"})
>>> before = bundle.unique_parameters()
>>> report = hard_share(bundle, init="mean", keep_per_task=["conv1"])
>>> models["a"].layer1[0].conv1 is models["b"].layer1[0].conv1
True
>>> report["kept"]["conv1"], report["kept"]["linear"]
("kept per task by keep_per_task pattern 'conv1'", 'classifier head (per task)')
>>> before - bundle.unique_parameters() == sum(r["params"] for r in report["layers"].values())
True
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from jtucker_plugin import layers as layer_configs
from jtucker_plugin.merge.patterns import check_patterns, check_patterns_match, patterns_of
from jtucker_plugin.models import head_name
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.schema import did_you_mean

NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)
"""Layer types that always stay per task: they hold a task's own statistics."""

_TASK_PREFIX = "task:"


def hard_share(
    bundle: Bundle,
    *,
    init: str = "mean",
    keep_per_task: Sequence[str] = (),
    stage: str = "share",
) -> dict[str, Any]:
    """Make every layer with one weight shape across tasks one module shared by all tasks.

    A *layer* is a module that owns parameters directly (a conv, a linear layer, a Tucker
    layer's core). Each one that is not a normalisation layer, not the classifier head (see
    ``models.head_name``), not matched by ``keep_per_task``, and whose type, configuration and
    parameter shapes agree in every task model is replaced in all of them by one new module,
    initialised from the tasks' mean or from one task's copy. The bundle is changed in place;
    its ``dense_parameters`` stay, so its compression ratio rises by the weights no longer
    stored per task. Fine-tune jointly afterwards (``fit(..., FitConfig(joint=True))`` or a
    ``finetune: {joint: true}`` stage) so that the shared layers learn from every task.

    Parameters
    ----------
    bundle
        The task models; changed in place.
    init
        ``'mean'``: each shared parameter (and floating buffer) is the mean over tasks;
        ``'task:<name>'``: a copy of that task's layer.
    keep_per_task
        fnmatch patterns over module paths; a layer stays per task when the pattern matches
        its path or the path of a module containing it (``'layer1'`` keeps all of layer1).
    stage
        The ``stage`` name written in the history records.

    Returns
    -------
    dict
        ``{"layers": {name: {"params": int, "relative_distance": {task: float}}},
        "kept": {name: reason}, "unique_parameters": {"before": int, "after": int}}``.
        ``params`` counts one copy of the shared layer (the bundle stores ``(T - 1) * params``
        fewer, or less where the layer was already shared by some tasks);
        ``relative_distance`` is ``||W_t - W_shared|| / ||W_t||`` at initialisation. One
        history record per shared layer is appended to ``bundle.history``.

    Raises
    ------
    TypeError
        If ``keep_per_task`` is a string rather than a list of patterns, or holds a non-string.
    ValueError
        If ``init`` is neither ``'mean'`` nor ``'task:<name>'`` of a task of the bundle, or a
        ``keep_per_task`` pattern matches no layer (the message names the pattern).
    """
    patterns = check_patterns(keep_per_task, "keep_per_task")
    source = _init_source(init, bundle.tasks)
    tasks = bundle.tasks
    models = bundle.models
    ref = models[tasks[0]]
    names = [name for name, m in ref.named_modules() if name and _own_parameters(m)]
    check_patterns_match(patterns, names, "keep_per_task")

    head = head_name(ref)
    before = bundle.unique_parameters()
    shared: dict[str, dict[str, Any]] = {}
    kept: dict[str, str] = {}
    for name in names:
        reason = _reason_to_keep(models, tasks, name, head, patterns)
        if reason is not None:
            kept[name] = reason
            continue
        originals = {t: models[t].get_submodule(name) for t in tasks}
        layer = _make_shared(originals, source)
        for t in tasks:
            models[t].set_submodule(name, layer)
        params = sum(p.numel() for p in layer.parameters())
        shared[name] = {
            "params": params,
            "relative_distance": {t: round(_relative_distance(m, layer), 6) for t, m in originals.items()},
        }
        bundle.history.append(
            {"stage": stage, "layer": name, "tasks": list(tasks), "init": init, "params": params}
        )
    return {
        "layers": shared,
        "kept": kept,
        "unique_parameters": {"before": before, "after": bundle.unique_parameters()},
    }


def _init_source(init: Any, tasks: Sequence[str]) -> str | None:
    """``None`` for the mean, else the task whose layers are copied."""
    if init == "mean":
        return None
    if isinstance(init, str) and init.startswith(_TASK_PREFIX):
        task = init[len(_TASK_PREFIX) :]
        if task in tasks:
            return task
        raise ValueError(
            f"init: unknown task {task!r}{did_you_mean(task, tasks)}; the bundle's tasks are "
            f"{', '.join(tasks)}"
        )
    raise ValueError(f"init: expected 'mean' or 'task:<name>', got {init!r}")


def _own_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _reason_to_keep(
    models: dict[str, nn.Module],
    tasks: Sequence[str],
    name: str,
    head: str,
    patterns: Sequence[str],
) -> str | None:
    module = models[tasks[0]].get_submodule(name)
    if name == head or name.startswith(head + "."):
        return "classifier head (per task)"
    if isinstance(module, NORM_LAYERS):
        return "normalisation layer (per task)"
    matched = patterns_of(name, patterns)
    if matched:
        return f"kept per task by keep_per_task pattern {matched[0]!r}"
    if any(_own_parameters(child) for child in module.modules() if child is not module):
        # Sharing it whole would also share sub-layers the rules above might keep per task.
        return "owns parameters beside its sub-layers' (kept per task)"
    others = [layer_configs.find_module(models[t], name) for t in tasks[1:]]
    if any(o is None or not _same_layout(module, o) for o in others):
        return "weights differ in type or shape across tasks"
    if all(o is module for o in others):
        return "already one module shared by all tasks"
    return None


def _same_layout(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b):
        return False
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    if shapes_a != {k: v.shape for k, v in b.state_dict().items()}:
        return False
    # Equal shapes but another stride or padding would compute something else.
    if layer_configs.is_registered(a):
        return layer_configs.layer_config(a) == layer_configs.layer_config(b)
    return True


@torch.no_grad()
def _make_shared(originals: dict[str, nn.Module], source: str | None) -> nn.Module:
    if source is not None:
        return copy.deepcopy(originals[source])
    first = next(iter(originals.values()))
    layer = copy.deepcopy(first)
    states = [m.state_dict() for m in originals.values()]
    for key, value in layer.state_dict().items():
        if value.is_floating_point():
            stacked = torch.stack([s[key].to(torch.float64) for s in states])
            value.copy_(stacked.mean(0).to(value.dtype))
    return layer


@torch.no_grad()
def _relative_distance(original: nn.Module, shared: nn.Module) -> float:
    diff, norm = 0.0, 0.0
    for p, q in zip(original.parameters(), shared.parameters(), strict=True):
        diff += float((p.double() - q.double()).pow(2).sum())
        norm += float(p.double().pow(2).sum())
    return (diff / norm) ** 0.5 if norm > 0 else 0.0
