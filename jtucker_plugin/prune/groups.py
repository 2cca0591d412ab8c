"""Reading torch-pruning dependency groups: their graph, root channels, consumers, and safety.

A group (``DependencyGraph.get_pruning_group`` / ``get_all_groups``) lists every layer coupled to
its root layer's channels. Importances use these helpers to tell which groups are safe and
observable to prune (``is_scorable``): not ones that cross a parameter-free layer that changes
the channel count (``crosses_channel_change``, e.g. option-A ``PadShortcut``), nor ones no layer
consumes (``consumers``, e.g. the model's outputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
BATCHNORM = nn.modules.batchnorm._BatchNorm


def dependency_graph(group: Any) -> Any:
    """The ``torch_pruning.DependencyGraph`` that made ``group``.

    Raises
    ------
    TypeError
        If ``group`` was not made by a dependency graph.
    """
    DG = getattr(group, "_DG", None)
    if DG is None:
        raise TypeError(
            "expected a torch-pruning group made by a DependencyGraph (group._DG is set by "
            f"DependencyGraph.get_pruning_group / get_all_groups), got {type(group).__name__} without one"
        )
    return DG


def group_root_idxs(group: Any) -> list[int]:
    """The root layer's channel indices of ``group``, in the order scores are returned."""
    return list(group[0].idxs)


def _channels(DG: Any, dep: Any) -> int | None:
    module = dep.target.module
    if DG.is_out_channel_pruning_fn(dep.handler):
        return DG.get_out_channels(module)
    return DG.get_in_channels(module)


def crosses_channel_change(group: Any) -> bool:
    """Whether ``group`` couples channels through a parameter-free layer that changes their count.

    Torch-pruning treats such a layer (a channel zero-pad like option-A ``PadShortcut``) as
    element-wise, so the group would cover a part of some layer's output channels only: a member
    producing channels must cover the same share of them as the root does, or pruning the group
    corrupts the model.
    """
    DG = dependency_graph(group)
    root_dep, root_idxs = group[0]
    root_channels = _channels(DG, root_dep)
    if not root_channels:
        return False
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, (*CONV_LINEAR, BATCHNORM)) or not DG.is_out_channel_pruning_fn(dep.handler):
            continue
        channels = _channels(DG, dep)
        if channels and len(set(idxs)) * root_channels != len(set(root_idxs)) * channels:
            return True
    return False


def consumers(group: Any) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """The layers reading the group's channels: ``(module, input indices, root indices)`` each.

    Only conv and linear layers count; their input dimension 1 holds the channels (one root
    channel may map to several inputs of a linear layer after a flatten).
    """
    DG = dependency_graph(group)
    found = []
    for i, (dep, idxs) in enumerate(group):
        module = dep.target.module
        if isinstance(module, CONV_LINEAR) and DG.is_in_channel_pruning_fn(dep.handler) and len(idxs):
            found.append((module, torch.as_tensor(list(idxs)), torch.as_tensor(list(group[i].root_idxs))))
    return found


def is_scorable(group: Any) -> bool:
    """Whether channel pruning of ``group`` is safe and observable: no channel-count change
    inside it (see ``crosses_channel_change``) and at least one layer that consumes it."""
    return not crosses_channel_change(group) and bool(consumers(group))
