"""Hybrid sharing: one weight shared by all tasks plus a sparse delta per task (METHODS.md section 4).

Task models fine-tuned from one backbone differ from their mean in few entries that matter.
``hybridize`` replaces every conv/linear layer whose weight has one shape across tasks by a
``HybridLayer`` per task: ``W_t = W_shared + S_t``, with ``W_shared`` the tasks' mean (ONE
``nn.Parameter`` object in every task's layer) and ``S_t`` the largest entries of
``W_t - W_shared``, at a ``density`` per layer and task or a global ``budget`` of non-zeros.
Batch norm, the classifier heads and layers named in ``keep_per_task`` stay per task.
``train_hybrid`` then fine-tunes all tasks jointly with an L1 penalty on the deltas while a
cubic magnitude schedule shrinks them to the target; positions never come back, so the masks
are fixed once the target is reached.

Density 1 reconstructs every task exactly; density 0 is hard sharing (``merge.share``).

The shared weight may itself be sparse (``shared_density`` or ``shared_budget``): it keeps the
mean's entries of largest magnitude, stored as values at positions (tied across tasks), and
the deltas start from the largest differences to that sparse weight. Where the tasks agree,
a cut entry costs nothing per task; where one task needs it, its delta restores it.

Storage: ``|W_shared| + sum_t nnz(S_t) x (value + index)``, a sparse ``W_shared`` as its values
and positions. ``Bundle.unique_parameters`` counts the shared weight (its values) once and the
``nnz`` values per task; the positions (about a byte each as gaps, or a bitmask, see
``merge.composed``) are buffers and appear in the bytes (``hybrid_storage``).

Examples
--------
>>> from jtucker_plugin.models import create_model
>>> from jtucker_plugin.multitask import TaskInfo
>>> models = {t: create_model("resnet8", 4, seed=i) for i, t in enumerate("ab")}
>>> bundle = Bundle(models, {t: TaskInfo("resnet8", 4) for t in "ab"})
>>> report = hybridize(bundle, density=0.05, keep_per_task=["conv1"])
>>> a, b = (m.layer1[0].conv1 for m in models.values())
>>> a.shared_weight is b.shared_weight, a.nnz                  # 16*16*3*3 = 2304 entries
(True, 115)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from jtucker_plugin import defaults
from jtucker_plugin import layers as layer_configs
from jtucker_plugin.data import TaskData
from jtucker_plugin.merge.composed import HybridLayer, encode_positions, is_plain_layer
from jtucker_plugin.merge.nonzeros import allocate_nonzeros, check_target
from jtucker_plugin.merge.patterns import check_patterns, check_patterns_match, patterns_of
from jtucker_plugin.metrics import state_bytes
from jtucker_plugin.models import head_name
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.train import Distillation, FitConfig, fit


def find_hybrid_layers(
    models: dict[str, nn.Module], keep_per_task: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """The layers to share with sparse deltas, and ``{layer: reason}`` for other conv/linear layers.

    A layer qualifies when it is a ``Conv1d``/``Conv2d``/``Linear`` with its own weight, not the
    classifier head, not matched by ``keep_per_task`` (a pattern matching its path or the path of
    a module containing it), with the same configuration in every task and not already one
    weight shared by all tasks.

    Raises
    ------
    TypeError
        If ``keep_per_task`` is not a list of strings.
    ValueError
        If a ``keep_per_task`` pattern matches no module (the message names the pattern).
    """
    patterns = check_patterns(keep_per_task, "keep_per_task")
    tasks = list(models)
    ref = models[tasks[0]]
    check_patterns_match(patterns, [name for name, _ in ref.named_modules() if name], "keep_per_task")
    head = head_name(ref)
    chosen, skipped = [], {}
    for name, module in ref.named_modules():
        if not is_plain_layer(module):
            continue
        others = [layer_configs.find_module(models[t], name) for t in tasks[1:]]
        matched = patterns_of(name, patterns)
        if name == head or name.startswith(head + "."):
            reason = "classifier head (per task)"
        elif matched:
            reason = f"kept per task by keep_per_task pattern {matched[0]!r}"
        elif any(not _same_layer(module, o) for o in others):
            reason = "type, configuration or weight shape differ across tasks"
        elif others and all(o.weight is module.weight for o in others):
            reason = "already one weight shared by all tasks"
        else:
            chosen.append(name)
            continue
        skipped[name] = reason
    return chosen, skipped


def _same_layer(a: nn.Module, b: nn.Module | None) -> bool:
    return (
        b is not None
        and type(a) is type(b)
        and isinstance(b._parameters.get("weight"), nn.Parameter)
        and layer_configs.layer_config(a) == layer_configs.layer_config(b)
        and a.weight.shape == b.weight.shape
    )


def _flat(module: nn.Module) -> Tensor:
    """``[weight, bias]`` flattened, in float64."""
    parts = [module.weight.detach().reshape(-1)]
    if module.bias is not None:
        parts.append(module.bias.detach())
    return torch.cat(parts).to(torch.float64)


def _shared_start(stacked: Tensor, weight_entries: int, keep: int | None) -> tuple[Tensor, Tensor | None]:
    """The shared ``[weight, bias]`` to start from, and the positions of the weight entries kept.

    The tasks' mean (rows of ``stacked``); with ``keep``, only its ``keep`` weight entries of
    largest magnitude (ascending positions), zeros elsewhere. ``keep=None``: all of it (``None``).
    """
    mean = stacked.mean(0)
    if keep is None:
        return mean, None
    positions = mean[:weight_entries].abs().topk(keep).indices.sort().values
    shared = torch.zeros_like(mean)
    shared[weight_entries:] = mean[weight_entries:]
    shared[positions] = mean[positions]
    return shared, positions


@torch.no_grad()
def make_hybrid(
    originals: Sequence[nn.Module],
    counts: Sequence[int],
    *,
    shared_count: int | None = None,
    materialize: bool = defaults.MATERIALIZE,
) -> list[HybridLayer]:
    """One ``HybridLayer`` per task layer in ``originals``, all sharing one weight (their mean).

    With ``shared_count`` the shared weight keeps only that many entries of the mean, the
    largest (``_shared_start``). Task ``t`` keeps the ``counts[t]`` largest entries of
    ``W_t - W_shared`` as its delta (differences taken from the float32 shared weight, so that
    density 1 gives ``W_t`` back to rounding).
    """
    first = originals[0]
    dtype, device = first.weight.dtype, first.weight.device
    stacked = torch.stack([_flat(m) for m in originals])
    n_weight = first.weight.numel()
    start, positions = _shared_start(stacked, n_weight, shared_count)
    start = start.to(dtype)
    diffs = stacked - start.to(torch.float64)
    if positions is None:
        shared = {"shared_weight": nn.Parameter(start[:n_weight].view(first.weight.shape).clone())}
    else:
        shared = {
            "shared_values": nn.Parameter(start[positions].clone()),
            "shared_indices": encode_positions(positions, n_weight).to(device),
        }
    if first.bias is not None:
        shared["shared_bias"] = nn.Parameter(start[n_weight:].clone())
    config = layer_configs.layer_config(first)
    out = []
    for diff, k in zip(diffs, counts, strict=True):
        layer = HybridLayer(
            type(first).__name__,
            config,
            bias=first.bias is not None,
            materialize=materialize,
            shared_nnz=shared_count,
        ).to(device=device, dtype=dtype)
        for attr, tensor in shared.items():
            setattr(layer, attr, tensor)
        top = diff.abs().topk(int(k)).indices
        layer.set_delta(top, diff[top])
        out.append(layer)
    return out


def hybridize(
    bundle: Bundle,
    *,
    density: float | None = None,
    budget: int | None = None,
    shared_density: float | None = None,
    shared_budget: int | None = None,
    keep_per_task: Sequence[str] = (),
    materialize: bool = defaults.MATERIALIZE,
    stage: str = "hybrid",
) -> dict[str, Any]:
    """Replace each layer of ``find_hybrid_layers`` by Hybrid layers at a density or budget.

    Parameters
    ----------
    bundle
        The task models; changed in place (``dense_parameters`` stay, so the compression ratio
        rises by what is no longer stored per task).
    density, budget
        Exactly one: the share of each layer's entries a task's delta keeps, or the non-zeros
        over all layers and tasks (the largest differences win, wherever they are).
    shared_density, shared_budget
        At most one: a sparse shared weight keeping this share of each layer's weight entries,
        or this many entries over all layers, the mean's largest; neither: a dense shared weight.
    keep_per_task
        fnmatch patterns of layers (or modules containing them) that stay per task.
    materialize
        Execution of the new layers (see ``merge.composed``).
    stage
        Written in the history records.

    Returns
    -------
    dict
        ``{"layers": {name: {"entries", "shared_nnz", "nnz": [per task], "relative_distance":
        [per task], "relative_error": [per task]}}, "kept": {name: reason}, "nonzeros": int,
        "shared_nonzeros": int or None, "unique_parameters": {"before", "after"}}``.
        ``relative_distance`` is ``||W_t - W_shared|| / ||W_t||``, ``relative_error`` the same
        with ``W_shared + S_t``; ``shared_nnz`` is ``None`` for a dense shared weight.

    Raises
    ------
    ValueError
        For a bad target or ``keep_per_task`` pattern (naming the field), or when no layer
        qualifies (with the reasons).
    """
    check_target(density, budget)
    sparse_shared = shared_density is not None or shared_budget is not None
    if sparse_shared:
        check_target(shared_density, shared_budget, ("shared_density", "shared_budget"))
    names, kept = find_hybrid_layers(bundle.models, keep_per_task)
    if not names:
        raise ValueError(
            f"{stage}: no layer to share; conv/linear layers kept per task: "
            + "; ".join(f"{n} ({r})" for n, r in list(kept.items())[:6])
        )
    tasks = bundle.tasks
    before = bundle.unique_parameters()
    originals = {name: [bundle.models[t].get_submodule(name) for t in tasks] for name in names}
    stacked = {name: torch.stack([_flat(m) for m in mods]) for name, mods in originals.items()}
    weight_entries = [originals[name][0].weight.numel() for name in names]
    shared_counts: list[int | None] = [None] * len(names)
    if sparse_shared:
        means = [stacked[name].mean(0)[:n].abs() for name, n in zip(names, weight_entries, strict=True)]
        shared_counts = allocate_nonzeros(means, weight_entries, density=shared_density, budget=shared_budget)
    starts = [
        _shared_start(stacked[name], n, k)[0]
        for name, n, k in zip(names, weight_entries, shared_counts, strict=True)
    ]
    diffs = [row for name, start in zip(names, starts, strict=True) for row in (stacked[name] - start).abs()]
    counts = allocate_nonzeros(diffs, [d.numel() for d in diffs], density=density, budget=budget)
    rows: dict[str, Any] = {}
    for j, name in enumerate(names):
        layer_counts = counts[j * len(tasks) : (j + 1) * len(tasks)]
        hybrids = make_hybrid(
            originals[name], layer_counts, shared_count=shared_counts[j], materialize=materialize
        )
        for t, layer in zip(tasks, hybrids, strict=True):
            bundle.models[t].set_submodule(name, layer)
        rows[name] = _layer_row(stacked[name], hybrids)
        bundle.history.append({"stage": stage, "layer": name, "tasks": list(tasks), "nnz": rows[name]["nnz"]})
    return {
        "layers": rows,
        "kept": kept,
        "nonzeros": sum(counts),
        "shared_nonzeros": sum(shared_counts) if sparse_shared else None,
        "unique_parameters": {"before": before, "after": bundle.unique_parameters()},
    }


@torch.no_grad()
def _layer_row(stacked: Tensor, hybrids: Sequence[HybridLayer]) -> dict[str, Any]:
    shared = hybrids[0].shared_flat().to(torch.float64)
    norms = stacked.norm(dim=1).clamp_min(1e-30)
    recon = torch.stack([shared + h.delta().to(torch.float64) for h in hybrids])
    return {
        "entries": int(stacked.shape[1]),
        "shared_nnz": hybrids[0].shared_nnz,
        "nnz": [h.nnz for h in hybrids],
        "relative_distance": [round(float(v), 6) for v in (stacked - shared).norm(dim=1) / norms],
        "relative_error": [round(float(v), 6) for v in (stacked - recon).norm(dim=1) / norms],
    }


def hybrid_groups(
    models: dict[str, nn.Module], names: Iterable[str] | None = None
) -> dict[str, list[HybridLayer]]:
    """``{layer: [its HybridLayer in each task]}`` for ``names`` (default: every Hybrid layer)."""
    ref = next(iter(models.values()))
    if names is None:
        names = [n for n, m in ref.named_modules() if isinstance(m, HybridLayer)]
    groups = {}
    for name in names:
        group = [m.get_submodule(name) for m in models.values()]
        if not all(isinstance(layer, HybridLayer) for layer in group):
            raise ValueError(f"layer {name!r} is not a HybridLayer in every task model")
        groups[name] = group
    return groups


def prune_deltas(
    groups: dict[str, list[HybridLayer]], *, density: float | None = None, budget: int | None = None
) -> int:
    """Keep the largest delta values: ``density`` of each layer per task, or ``budget`` in all.

    Returns the non-zeros left. Deltas never grow: a layer below the target keeps what it has.
    """
    members = [layer for group in groups.values() for layer in group]
    counts = allocate_nonzeros(
        [layer.delta_values.detach().abs() for layer in members],
        [layer.numel for layer in members],
        density=density,
        budget=budget,
    )
    for layer, k in zip(members, counts, strict=True):
        layer.keep_largest(k)
    return sum(layer.nnz for layer in members)


def nonzero_schedule(start: float, end: float, steps: int) -> list[float]:
    """The cubic magnitude-pruning schedule (Zhu & Gupta 2017) from ``start`` down to ``end``.

    ``steps`` values; the last is ``end``. Step ``i`` (1-based) is
    ``end + (start - end) * (1 - i / steps) ** 3``: fast pruning first, gentle near the target.

    >>> [round(v, 4) for v in nonzero_schedule(0.4, 0.1, 3)]
    [0.1889, 0.1111, 0.1]
    """
    if steps < 0:
        raise ValueError(f"steps: expected an integer >= 0, got {steps}")
    return [end + (start - end) * (1 - i / steps) ** 3 for i in range(1, steps + 1)]


def _add_l1(values: Tensor, strength: float, grad: Tensor) -> Tensor:
    return grad + strength * values.detach().sign()


@contextlib.contextmanager
def l1_penalty(layers: Iterable[HybridLayer], strength: float) -> Iterator[None]:
    """While open, the gradients of the layers' delta values carry ``strength * sign(value)``.

    That is the (sub)gradient of ``strength * sum |S_t|_1`` added to the loss, without changing
    the training loop: ``fit`` stays as it is.
    """
    handles = []
    if strength:
        for layer in layers:
            values = layer.delta_values
            handles.append(values.register_hook(functools.partial(_add_l1, values, strength)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_hybrid(
    bundle: Bundle,
    data: dict[str, TaskData],
    config: FitConfig,
    *,
    names: Iterable[str] | None = None,
    density: float | None = None,
    budget: int | None = None,
    l1: float = defaults.HYBRID_L1,
    prune_epochs: int | None = None,
    seed: int = 0,
    progress: Callable[..., Iterable] | None = None,
    distill: Distillation | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune all tasks jointly while the deltas shrink to the target on a cubic schedule.

    One joint ``fit`` over all epochs, with the L1 penalty on the deltas; after each of the
    first ``prune_epochs`` epochs the deltas are cut back by magnitude to the schedule's next
    level, the last one the target. The remaining epochs train with the masks fixed. The
    optimiser's momentum and learning-rate schedule run across the cuts (``fit``'s
    ``epoch_end``).

    Parameters
    ----------
    bundle, data
        The Hybrid bundle and every task's data.
    config
        Length (``epochs``), optimiser and batches; ``joint`` is implied.
    names
        The layers on the schedule (default: every Hybrid layer); others train unpruned.
    density, budget
        The target (exactly one), as in ``hybridize``.
    l1
        Strength of the L1 penalty ``l1 * sum_t |S_t|_1``.
    prune_epochs
        Epochs over which the schedule runs, ``0 <= prune_epochs <= epochs``; default
        ``epochs - 1`` (at least one epoch with fixed masks). With 0 the deltas are cut to the
        target before training.
    distill
        Teachers to distil from, as in ``train.fit``.

    Returns
    -------
    list[dict]
        Per epoch: ``{"epoch", "lr", "nonzeros", "loss": {task: float}}``.
    """
    check_target(density, budget)
    epochs = config.epochs
    prune_epochs = max(0, epochs - 1) if prune_epochs is None else prune_epochs
    if not 0 <= prune_epochs <= epochs:
        raise ValueError(f"prune_epochs: expected an integer in [0, epochs={epochs}], got {prune_epochs}")
    if l1 < 0:
        raise ValueError(f"l1: expected a number >= 0, got {l1}")
    groups = hybrid_groups(bundle.models, names)
    members = [layer for group in groups.values() for layer in group]
    if density is not None:
        start = max((layer.nnz / layer.numel for layer in members), default=0.0)
        levels = [{"density": v} for v in nonzero_schedule(start, density, prune_epochs)]
    else:
        start = sum(layer.nnz for layer in members)
        levels = [{"budget": round(v)} for v in nonzero_schedule(start, budget, prune_epochs)]
    if prune_epochs == 0:
        prune_deltas(groups, density=density, budget=budget)
    records: list[dict[str, Any]] = []
    penalty = contextlib.ExitStack()

    def epoch_end(epoch: int, losses: dict[str, float]) -> None:
        if epoch < prune_epochs:
            prune_deltas(groups, **levels[epoch])
            # Pruning replaced the values: the penalty moves to the new ones.
            penalty.close()
            penalty.enter_context(l1_penalty(members, l1))
        lr = config.lr
        if config.schedule == "cosine":
            lr *= 0.5 * (1 + math.cos(math.pi * epoch / epochs))  # where the epoch started
        nonzeros = sum(m.nnz for m in members)
        records.append({"epoch": epoch + 1, "lr": lr, "nonzeros": nonzeros, "loss": losses})

    with penalty:
        penalty.enter_context(l1_penalty(members, l1))
        # One fit over all epochs, pruning between them: one optimiser, whose momentum and
        # learning-rate schedule run across epochs as in every other fine-tune (restarting them
        # each epoch cost 0.7-1.0 pp after 78 steps on the ResNet-20 scenario).
        fit(
            bundle.models,
            data,
            dataclasses.replace(config, joint=True),
            seed=seed,
            progress=progress,
            distill=distill,
            epoch_end=epoch_end,
        )
    return records


def hybrid_storage(bundle: Bundle) -> dict[str, int]:
    """What the bundle stores, in bytes, by kind: exactly the tensors ``Bundle.save`` writes.

    Returns
    -------
    dict
        ``shared_bytes`` (Hybrid shared weights and biases; a sparse shared weight's values
        and positions), ``value_bytes`` and
        ``index_bytes`` (the deltas), ``other_bytes`` (everything else), ``tensor_bytes``
        (their sum: the data section of ``tensors.safetensors``), ``file_bytes`` (the whole
        file, with its header), and ``nonzeros`` (delta values over all tasks).
    """
    tensors = bundle.stored_tensors()
    kinds = {
        "shared_weight": "shared",
        "shared_bias": "shared",
        "shared_values": "shared",
        "shared_indices": "shared",
        "delta_values": "value",
        "delta_indices": "index",
    }
    out = dict.fromkeys(("shared_bytes", "value_bytes", "index_bytes", "other_bytes"), 0)
    nonzeros = 0
    for key, tensor in tensors.items():
        kind = kinds.get(key.rpartition(".")[2], "other")
        out[f"{kind}_bytes"] += tensor.numel() * tensor.element_size()
        nonzeros += tensor.numel() if kind == "value" else 0
    out["tensor_bytes"] = sum(out.values())
    out["file_bytes"] = state_bytes(tensors)
    out["nonzeros"] = nonzeros
    return out
