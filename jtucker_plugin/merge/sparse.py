"""Unstructured sparsity: conv and linear layers that keep only their largest weight entries.

``sparsify`` replaces layers by ``SparseLayer``\\ s (``merge.composed``) that keep the ``density``
share of each layer's weight entries of largest magnitude, or the ``budget`` largest over all
chosen layers together (global magnitude pruning), and zeros elsewhere. A layer that several
tasks share (hard sharing's layers, J-Tucker's factors) is one object and stays one: it is cut
once, by its own weight. Biases stay dense; classifier heads and layers named in ``keep_dense``
are left as they are.

The cut is one-shot: follow it with a fine-tune. Only the kept values are parameters, so the
zeros stay zero through later training, saving, loading and quantization. On the three-task
ResNet-20 scenario, cutting at once and then fine-tuning lost less than reaching the same
density gradually during the fine-tune (``docs/benchmarks.md``).

Storage: the values and their positions (about a byte a position as gaps, or one bit an entry
once more than 1 entry in 8 is kept; ``merge.composed.encode_positions``). ``Bundle.unique_parameters``
counts the values; the positions are buffers, counted in bytes.

Examples
--------
>>> from jtucker_plugin.merge.share import hard_share
>>> from jtucker_plugin.models import create_model
>>> from jtucker_plugin.multitask import TaskInfo
>>> models = {t: create_model("resnet8", 4, seed=i) for i, t in enumerate("ab")}
>>> bundle = Bundle(models, {t: TaskInfo("resnet8", 4) for t in "ab"})
>>> _ = hard_share(bundle, keep_per_task=["conv1"])
>>> report = sparsify(bundle, density=0.5, keep_dense=["conv1"])
>>> a, b = (m.layer1[0].conv1 for m in models.values())
>>> a is b, a.nnz, a.indices.dtype          # 16*16*3*3 = 2304 entries, half kept: a bitmask
(True, 1152, torch.uint8)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from jtucker_plugin import defaults
from jtucker_plugin.merge.composed import SparseLayer, is_plain_layer
from jtucker_plugin.merge.nonzeros import allocate_nonzeros, check_target
from jtucker_plugin.merge.patterns import check_patterns, check_patterns_match, patterns_of
from jtucker_plugin.models import head_name
from jtucker_plugin.multitask import Bundle


def find_sparse_layers(
    models: dict[str, nn.Module], keep_dense: Sequence[str] = ()
) -> tuple[dict[int, list[tuple[str, str]]], dict[str, str]]:
    """The layers to sparsify, each object once, and ``{path: reason}`` for the others.

    A layer qualifies when it is a ``Conv1d``/``Conv2d``/``Linear`` with its own weight, not a
    classifier head and not selected by a ``keep_dense`` pattern (``merge.patterns``).

    Returns
    -------
    tuple
        ``{id(layer): [(task, path), ...]}`` (every place the object sits, in task order), and
        the reasons of the conv/linear layers left dense (by path).

    Raises
    ------
    TypeError
        If ``keep_dense`` is not a list of strings.
    ValueError
        If a ``keep_dense`` pattern matches no layer (naming it).
    """
    patterns = check_patterns(keep_dense, "keep_dense")
    first = next(iter(models.values()))
    names = [n for n, m in first.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
    check_patterns_match(patterns, names, "keep_dense")
    chosen: dict[int, list[tuple[str, str]]] = {}
    kept: dict[str, str] = {}
    for task, model in models.items():
        head = head_name(model)
        for path, module in model.named_modules():
            if not is_plain_layer(module):
                continue
            matched = patterns_of(path, patterns)
            if path == head or path.startswith(head + "."):
                kept[path] = "classifier head"
            elif matched:
                kept[path] = f"kept dense by keep_dense pattern {matched[0]!r}"
            else:
                chosen.setdefault(id(module), []).append((task, path))
    return chosen, kept


def sparsify(
    bundle: Bundle,
    *,
    density: float | None = None,
    budget: int | None = None,
    keep_dense: Sequence[str] = (),
    materialize: bool = defaults.MATERIALIZE,
    stage: str = "sparsify",
) -> dict[str, Any]:
    """Replace each layer of ``find_sparse_layers`` by a ``SparseLayer`` keeping its largest entries.

    Parameters
    ----------
    bundle
        The task models; changed in place.
    density, budget
        Exactly one: the share of each layer's weight entries kept, or the entries kept over all
        the layers together (the largest magnitudes win, wherever they are; a shared layer counts
        once).
    keep_dense
        fnmatch patterns of layers (or modules containing them) left dense.
    materialize
        Execution of the new layers (see ``merge.composed``).
    stage
        Written in the history records.

    Returns
    -------
    dict
        ``{"layers": {path: {"entries", "nnz": {task: kept}}}, "kept": {path: reason},
        "nonzeros": int, "unique_parameters": {"before", "after"}}``; ``nonzeros`` counts a
        shared layer once.

    Raises
    ------
    ValueError
        For a bad target or ``keep_dense`` pattern (naming the field), or when no layer
        qualifies (with the reasons).
    """
    check_target(density, budget)
    chosen, kept = find_sparse_layers(bundle.models, keep_dense)
    if not chosen:
        raise ValueError(
            f"{stage}: no layer to sparsify; conv/linear layers left dense: "
            + "; ".join(f"{n} ({r})" for n, r in list(kept.items())[:6])
        )
    before = bundle.unique_parameters()
    places = list(chosen.values())
    modules = [bundle.models[task].get_submodule(path) for task, path in (p[0] for p in places)]
    magnitudes = [m.weight.detach().abs().reshape(-1) for m in modules]
    counts = allocate_nonzeros(magnitudes, [w.numel() for w in magnitudes], density=density, budget=budget)
    rows: dict[str, Any] = {}
    for module, where, weights, k in zip(modules, places, magnitudes, counts, strict=True):
        layer = SparseLayer.of(module, weights.topk(k).indices, materialize=materialize)
        for task, path in where:
            bundle.models[task].set_submodule(path, layer)
            row = rows.setdefault(path, {"entries": weights.numel(), "nnz": {}})
            row["nnz"][task] = k
        bundle.history.append({"stage": stage, "layers": [f"{t}/{p}" for t, p in where], "nnz": k})
    return {
        "layers": rows,
        "kept": kept,
        "nonzeros": sum(counts),
        "unique_parameters": {"before": before, "after": bundle.unique_parameters()},
    }
