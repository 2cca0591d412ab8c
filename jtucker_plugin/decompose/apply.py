"""Tucker-decompose the layers of a bundle: jointly across tasks (J-Tucker) or per task.

Three steps, each a plain function so that other methods (a GA over ranks, BATUDE) can reuse
them: ``find_layers`` picks the layers (and says why the others stay dense), ``layer_infos``
measures their joint spectra and spatial sizes, and ``decompose_layers`` replaces them with
factorized layers at the chosen ranks, sharing ``in_proj``/``out_proj`` across tasks.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from jtucker_plugin.decompose.layers import FactorizedLinear, TuckerConv2d
from jtucker_plugin.decompose.ranks import LayerInfo, Ranks, tucker_params
from jtucker_plugin.decompose.tucker import joint_spectrum, joint_tucker
from jtucker_plugin.layers import find_module
from jtucker_plugin.merge.composed import ComposedLayer
from jtucker_plugin.models import head_name
from jtucker_plugin.multitask import Bundle

FACTORIZED = (TuckerConv2d, FactorizedLinear)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_layers(
    models: dict[str, nn.Module],
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    min_params: int = 0,
) -> tuple[list[str], dict[str, str]]:
    """The conv/linear layers to decompose, and ``{layer: reason}`` for those kept dense.

    A layer qualifies when it is an ungrouped conv or a linear layer, not the classifier head,
    with the same weight shape in every task, not already one module shared by all tasks, and
    with at least ``min_params`` weights per task; ``include``/``exclude`` are fnmatch patterns.
    """
    tasks = list(models)
    ref = models[tasks[0]]
    head = head_name(ref)
    chosen, skipped = [], {}
    for name, module in ref.named_modules():
        if isinstance(module, ComposedLayer) and not _inside_factorized(ref, name):
            skipped[name] = f"{type(module).__name__}: composed from shared parts; decompose before sharing"
            continue
        if not isinstance(module, nn.Conv2d | nn.Linear) or _inside_factorized(ref, name):
            continue
        others = [find_module(models[t], name) for t in tasks[1:]]
        if name == head or name.startswith(head + "."):
            reason = "classifier head (per task)"
        elif not _matches(name, include) or _matches(name, exclude):
            reason = "not selected by layers/exclude"
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            reason = f"grouped conv (groups={module.groups})"
        elif isinstance(module, nn.Conv2d) and (
            isinstance(module.padding, str) or module.padding_mode != "zeros"
        ):
            reason = "padding mode not supported"
        elif any(o is None or o.weight.shape != module.weight.shape for o in others):
            reason = "weight shapes differ across tasks"
        elif others and all(o is module for o in others):
            reason = "already one layer shared by all tasks"
        elif module.weight.numel() < min_params:
            reason = f"too small to gain ({module.weight.numel()} < min_params={min_params} weights)"
        elif min(module.weight.shape[:2]) < 2:
            reason = "a single channel: nothing to factorize"
        else:
            chosen.append(name)
            continue
        skipped[name] = reason
    return chosen, skipped


def _inside_factorized(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(
        isinstance(find_module(model, ".".join(parts[:i])), (*FACTORIZED, ComposedLayer))
        for i in range(1, len(parts))
    )


def _spatial_sizes(model: nn.Module, names: Sequence[str], input_shape: Sequence[int]) -> dict[str, tuple]:
    sizes: dict[str, tuple] = {}
    hooks = []
    for name in names:

        def hook(module, inputs, output, name=name):
            x = inputs[0]
            sizes[name] = (
                (tuple(x.shape[-2:]), tuple(output.shape[-2:])) if x.dim() == 4 else ((1, 1), (1, 1))
            )

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sizes


def stacked_weight(models: Sequence[nn.Module], name: str) -> torch.Tensor:
    """The T task weights of layer ``name`` stacked: T x S x C (x d x d)."""
    return torch.stack([m.get_submodule(name).weight.detach() for m in models])


def layer_infos(
    models: dict[str, nn.Module],
    names: Sequence[str],
    input_shape: Sequence[int],
    core_copies: float | None = None,
) -> list[LayerInfo]:
    """What rank strategies need of each layer: shapes, joint spectra, spatial sizes, and what
    its cores cost (``LayerInfo.core_copies``)."""
    ref = next(iter(models.values()))
    sizes = _spatial_sizes(ref, names, input_shape)
    infos = []
    for name in names:
        weight = stacked_weight(list(models.values()), name)
        eig_out, eig_in = joint_spectrum(weight)
        kernel = tuple(weight.shape[3:5]) if weight.dim() == 5 else (1, 1)
        in_hw, out_hw = sizes[name]
        infos.append(
            LayerInfo(
                name=name,
                out_channels=weight.shape[1],
                in_channels=weight.shape[2],
                kernel_size=kernel,
                n_tasks=weight.shape[0],
                eig_out=eig_out,
                eig_in=eig_in,
                out_hw=out_hw,
                in_hw=in_hw,
                core_copies=core_copies,
            )
        )
    return infos


def decompose_layers(
    models: dict[str, nn.Module],
    infos: Sequence[LayerInfo],
    ranks: Ranks,
    *,
    n_iter_max: int | None = None,
    tol: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Replace each layer of ``infos`` in every model by a factorized layer at ``ranks``.

    The factors (``in_proj``, ``out_proj``) are one module shared by all of ``models``; each
    model gets its own core. A layer whose ranks would not save parameters stays dense.
    Returns, per layer, the ranks, parameters before/after and each task's relative error, or
    the reason it stayed dense.
    """
    kw = {k: v for k, v in (("n_iter_max", n_iter_max), ("tol", tol)) if v is not None}
    tasks = list(models)
    rows: dict[str, dict[str, Any]] = {}
    for info in infos:
        r = tuple(ranks[info.name])
        dense, factored = info.dense_params, tucker_params(info, r)
        if factored >= dense:
            rows[info.name] = {
                "ranks": list(r),
                "kept_dense": f"ranks {r} would not save parameters ({factored} >= {dense})",
            }
            continue
        originals = [models[t].get_submodule(info.name) for t in tasks]
        result = joint_tucker(stacked_weight(list(models.values()), info.name), r, **kw)
        cls = TuckerConv2d if isinstance(originals[0], nn.Conv2d) else FactorizedLinear
        first = cls.from_factors(originals[0], result.U, result.cores[0], result.V)
        for i, (task, original) in enumerate(zip(tasks, originals, strict=True)):
            layer = (
                first
                if i == 0
                else cls.from_factors(
                    original,
                    result.U,
                    result.cores[i],
                    result.V,
                    in_proj=first.in_proj,
                    out_proj=first.out_proj,
                )
            )
            models[task].set_submodule(info.name, layer)
        rows[info.name] = {
            "ranks": list(r),
            "params_before": dense,
            "params_after": factored,
            "errors": [round(float(e), 6) for e in result.errors],
        }
    return rows


def decompose_bundle(
    bundle: Bundle,
    select: Callable[[list[LayerInfo], Callable[[Ranks], float] | None], Ranks],
    *,
    joint: bool,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    min_params: int = 0,
    evaluate: Callable[[Bundle], float] | None = None,
    n_iter_max: int | None = None,
    tol: float | None = None,
    core_copies: float | None = None,
    stage: str = "jtucker",
) -> dict[str, Any]:
    """Decompose a bundle in place, jointly (one set of factors for all tasks) or per task.

    Parameters
    ----------
    select
        ``select(infos, evaluate_ranks) -> ranks``: the rank strategy, already configured.
        ``evaluate_ranks(ranks)`` (offered when ``evaluate`` is given) decomposes a copy of the
        bundle at those ranks and returns ``evaluate(copy)``: the fitness of a rank search.
    joint
        J-Tucker when true; each task alone (T = 1 per layer) when false.
    core_copies
        What each joint layer's cores will cost once stored (``LayerInfo.core_copies``): the
        cores are shared afterwards (``decompose.shared_core``).

    Returns
    -------
    dict
        ``{"layers": {name: row}, "skipped": {name: reason}}``; history records are appended to
        ``bundle.history``.
    """
    layers, skipped = find_layers(bundle.models, include=include, exclude=exclude, min_params=min_params)
    if not layers:
        by_reason: dict[str, list[str]] = {}
        for name, reason in skipped.items():
            by_reason.setdefault(reason, []).append(name)
        raise ValueError(
            f"{stage}: no layer to decompose (layers={list(include)}, exclude={list(exclude)}); kept dense: "
            + "; ".join(
                f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({reason})"
                for reason, names in by_reason.items()
            )
        )
    groups = [bundle.tasks] if joint else [[t] for t in bundle.tasks]
    rows: dict[str, Any] = {}
    for group in groups:
        models = {t: bundle.models[t] for t in group}
        infos = layer_infos(models, layers, bundle.info[group[0]].input_shape, core_copies if joint else None)

        def evaluate_ranks(ranks: Ranks, models=models, infos=infos) -> float:
            trial = copy.deepcopy(bundle)
            decompose_layers(
                {t: trial.models[t] for t in models}, infos, ranks, n_iter_max=n_iter_max, tol=tol
            )
            return evaluate(trial)

        ranks = select(infos, evaluate_ranks if evaluate is not None else None)
        group_rows = decompose_layers(models, infos, ranks, n_iter_max=n_iter_max, tol=tol)
        for name, row in group_rows.items():
            key = name if joint else f"{group[0]}:{name}"
            rows[key] = row
            bundle.history.append({"stage": stage, "layer": name, "tasks": group, **row})
    return {"layers": rows, "skipped": skipped}
