"""Composed layers as branches, shared plain layers plus per-task parts, for tools that need plain layers.

torch-pruning prunes the channels of ``nn.Conv2d`` / ``nn.Linear`` objects, and PT2E quantizes
a conv's weight once only when it is a stored tensor, not one that ``HybridLayer`` composes per
call. A layer is linear in its weight, so ``(W_shared + S_t) x = W_shared x + S_t x``: every
task's ``HybridLayer`` is exactly a ``HybridBranches(shared, delta)``, where ``shared`` is ONE
plain layer object in every task (tied, as hard sharing's layers are) and ``delta`` is the
task's own:

- ``delta="masked"`` (pruning): a dense layer of the same kind (``MaskedConv2d`` ...) holding
  the delta's values at their positions and zeros elsewhere, with a boolean mask of the
  positions that the pruners in ``PRUNERS`` cut along with the weight. ``from_branches`` turns
  the pruned branches back into ``HybridLayer``\\ s: the same values at the positions that are
  left, exactly (a stored value of 0 is kept too: the mask says what is stored).
- ``delta="sparse"`` (quantization): a ``SparseDelta`` (values and positions, composed per
  forward), so that only the shared layer is quantized and stored once; the deltas stay sparse
  float.

J-Tucker's task-mixed cores (``TaskMixLayer``, ``G_t = sum_r mix_t[r] B_r``) split the same
way, into ``MixBranches``: one plain layer per shared basis core ``B_r`` (tied across tasks)
and the task's mixing weights, ``sum_r mix_t[r] (B_r x)``.

A ``HybridLayer`` whose shared weight is sparse splits the same way, its shared part a
``SparseLayer`` (one object, holding the tied values and positions) that is then treated as
every ``SparseLayer`` is.

A ``SparseLayer`` (``merge.sparse``) has no shared part to split off: for pruning it becomes one
masked dense layer (one object wherever the layer was shared), and ``from_branches`` turns it
back into a ``SparseLayer`` with the positions its mask still holds.

Examples
--------
>>> from jtucker_plugin.merge.hybrid import hybridize
>>> from jtucker_plugin.models import create_model
>>> from jtucker_plugin.multitask import Bundle, TaskInfo
>>> models = {t: create_model("resnet8", 4, seed=i) for i, t in enumerate("ab")}
>>> bundle = Bundle(models, {t: TaskInfo("resnet8", 4) for t in "ab"})
>>> _ = hybridize(bundle, density=0.05, keep_per_task=["conv1"])
>>> to_branches(models, delta="masked")[:2]  # then torch-pruning, customized_pruners=PRUNERS
['a.layer1.0.conv1.delta', 'a.layer1.0.conv2.delta']
>>> a, b = (m.layer1[0].conv1 for m in models.values())
>>> type(a).__name__, a.shared is b.shared, type(a.delta).__name__
('HybridBranches', True, 'MaskedConv2d')
>>> from_branches(models)
>>> type(models["a"].layer1[0].conv1).__name__
'HybridLayer'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn

from jtucker_plugin import layers
from jtucker_plugin.decompose.shared_core import TaskMixLayer
from jtucker_plugin.merge.composed import ComposedLayer, HybridLayer, SparseDelta, SparseLayer


class HybridBranches(nn.Module):
    """``shared(x) + delta(x)``: a ``HybridLayer`` split into its shared and its per-task part."""

    def __init__(self, shared: nn.Module, delta: nn.Module, materialize: bool):
        super().__init__()
        self.shared = shared
        self.delta = delta
        self.materialize = materialize  # of the HybridLayer it came from, restored by from_branches

    def forward(self, x: Tensor) -> Tensor:
        return self.shared(x) + self.delta(x)


class MixBranches(nn.Module):
    """``sum_r mix[r] * basis[r](x)``: a ``TaskMixLayer`` split into its shared basis layers."""

    def __init__(self, basis: nn.ModuleList, mix: nn.Parameter, materialize: bool):
        super().__init__()
        self.basis = basis
        self.mix = mix
        self.materialize = materialize

    def forward(self, x: Tensor) -> Tensor:
        out = self.mix[0] * self.basis[0](x)
        for r in range(1, len(self.basis)):
            out = out + self.mix[r] * self.basis[r](x)
        return out


BRANCHES = (HybridBranches, MixBranches)
"""What ``to_branches`` puts in place of a composed layer."""


def _masked(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` with a ``weight_mask`` (and ``bias_mask``) buffer: a delta's stored positions."""
    return type(
        f"Masked{base.__name__}", (base,), {"__doc__": f"A dense {base.__name__} delta and its mask."}
    )


MaskedConv1d, MaskedConv2d, MaskedLinear = (_masked(b) for b in (nn.Conv1d, nn.Conv2d, nn.Linear))
_MASKED = {"Conv1d": MaskedConv1d, "Conv2d": MaskedConv2d, "Linear": MaskedLinear}
MASKED = tuple(_MASKED.values())


def _keep(size: int, idxs) -> list[int]:
    gone = set(int(i) for i in idxs)
    return [i for i in range(size) if i not in gone]


def _mask_pruner(base: type[tp.pruner.function.BasePruningFunc]) -> tp.pruner.function.BasePruningFunc:
    """torch-pruning's pruner for ``base``'s layers that cuts the masks with the weight."""

    class MaskPruner(base):
        def prune_out_channels(self, layer: nn.Module, idxs):
            keep = _keep(layer.weight_mask.shape[0], idxs)
            layer.weight_mask = layer.weight_mask[keep]
            if getattr(layer, "bias_mask", None) is not None:
                layer.bias_mask = layer.bias_mask[keep]
            return super().prune_out_channels(layer, idxs)

        def prune_in_channels(self, layer: nn.Module, idxs):
            if getattr(layer, "groups", 1) != 1:
                raise ValueError(f"{type(layer).__name__}: pruning a grouped conv's delta is not supported")
            layer.weight_mask = layer.weight_mask[:, _keep(layer.weight_mask.shape[1], idxs)]
            return super().prune_in_channels(layer, idxs)

    return MaskPruner()


PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {
    MaskedConv1d: _mask_pruner(tp.pruner.function.ConvPruner),
    MaskedConv2d: _mask_pruner(tp.pruner.function.ConvPruner),
    MaskedLinear: _mask_pruner(tp.pruner.function.LinearPruner),
}
"""``customized_pruners`` for torch-pruning when the models hold ``delta="masked"`` branches."""


def _masked_delta(layer: HybridLayer) -> nn.Module:
    module = _MASKED[type(layer.op).__name__](**layer.op_config())
    module = module.to(dtype=layer.delta_values.dtype, device=layer.delta_values.device)
    n = module.weight.numel()
    values = torch.zeros(layer.numel, dtype=module.weight.dtype, device=module.weight.device)
    mask = torch.zeros(layer.numel, dtype=torch.bool, device=module.weight.device)
    positions = layer.positions().to(values.device)
    values[positions] = layer.delta_values.detach()
    mask[positions] = True
    with torch.no_grad():
        module.weight.copy_(values[:n].view_as(module.weight))
        if module.bias is not None:
            module.bias.copy_(values[n:])
    module.register_buffer("weight_mask", mask[:n].view_as(module.weight).clone())
    module.register_buffer("bias_mask", mask[n:].clone() if module.bias is not None else None)
    return module


def _masked_sparse(layer: SparseLayer) -> nn.Module:
    module = _MASKED[type(layer.op).__name__](**layer.op_config())
    module = module.to(dtype=layer.values.dtype, device=layer.values.device)
    weight, bias = layer.compose()
    mask = torch.zeros(layer.numel, dtype=torch.bool, device=weight.device)
    mask[layer.positions().to(weight.device)] = True
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    module.register_buffer("weight_mask", mask.view_as(module.weight))
    module.register_buffer("bias_mask", None)
    module.materialize = layer.materialize  # restored by from_branches
    return module.train(layer.training)


def _plain(layer: ComposedLayer, weight: nn.Parameter, bias: nn.Parameter | None = None) -> nn.Module:
    module = layers.build_layer(type(layer.op).__name__, layer.op_config())
    module.weight = weight
    if bias is not None:
        module.bias = bias
    return module


def _shared_sparse(layer: HybridLayer) -> SparseLayer:
    """A Hybrid layer's sparse shared weight as a ``SparseLayer`` holding the same tensors."""
    op = type(layer.op).__name__
    sparse = SparseLayer(op, layers.layer_config(layer.op), False, 0, layer.materialize)
    sparse.values, sparse.indices = layer.shared_values, layer.shared_indices
    if layer.shared_bias is not None:
        sparse.dense_bias = layer.shared_bias
    return sparse.train(layer.training)


def _shared_part(layer: ComposedLayer, delta: str) -> nn.Module:
    if isinstance(layer, HybridLayer) and layer.shared_values is not None:
        sparse = _shared_sparse(layer)
        return _masked_sparse(sparse) if delta == "masked" else sparse
    if isinstance(layer, HybridLayer):
        return _plain(layer, layer.shared_weight, layer.shared_bias)
    basis = layer.basis.detach()
    return nn.ModuleList(_plain(layer, nn.Parameter(b.clone())) for b in basis)


def to_branches(models: Mapping[str, nn.Module], delta: Literal["masked", "sparse"]) -> list[str]:
    """Replace every ``HybridLayer`` and ``TaskMixLayer`` of ``models`` in place by branches (in
    the layer's train/eval mode), and with ``delta="masked"`` every ``SparseLayer`` by its masked
    dense layer.

    Layers that share a weight (a basis) get one shared layer object (list of layers). Returns
    the paths (``"<task>.<layer>.delta"``) of the Hybrid delta branches.
    """
    if delta not in ("masked", "sparse"):
        raise ValueError(f"delta: expected 'masked' or 'sparse', got {delta!r}")
    shared: dict[int, nn.Module] = {}
    paths = []
    for task, model in models.items():
        if delta == "masked":
            for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLayer)]:
                if id(layer) not in shared:
                    shared[id(layer)] = _masked_sparse(layer)
                model.set_submodule(name, shared[id(layer)])
        composed = [(n, m) for n, m in model.named_modules() if isinstance(m, HybridLayer | TaskMixLayer)]
        for name, layer in composed:
            key = id(layer.parts()[0])
            if key not in shared:
                shared[key] = _shared_part(layer, delta)
            if isinstance(layer, TaskMixLayer):
                branches = MixBranches(shared[key], layer.mix, layer.materialize)
            else:
                part = _masked_delta(layer) if delta == "masked" else SparseDelta.of(layer)
                branches = HybridBranches(shared[key], part, layer.materialize)
                paths.append(f"{task}.{name}.delta")
            model.set_submodule(name, branches.train(layer.training))
    return paths


def from_branches(models: Mapping[str, nn.Module]) -> None:
    """Turn the branches of ``to_branches(..., delta="masked")`` back into composed layers, in place.

    The shared weight (one ``nn.Parameter``, as before) is the shared layer's, a basis the
    stacked basis layers' weights; each delta, and each masked ``SparseLayer``, keeps the values at
    the positions its mask still holds. Each rebuilt layer is in its branches' train/eval mode.
    """
    made: dict[int, Any] = {}  # shared layer -> its rebuilt shared parameter(s), made once
    for model in models.values():
        for name, branches in [(n, m) for n, m in model.named_modules() if isinstance(m, BRANCHES)]:
            rebuild = _hybrid_layer if isinstance(branches, HybridBranches) else _mix_layer
            model.set_submodule(name, rebuild(branches, made).train(branches.training))
    # What is left masked stands alone: a SparseLayer's (a delta's was inside its branches).
    for model in models.values():
        for name, masked in [(n, m) for n, m in model.named_modules() if isinstance(m, MASKED)]:
            if id(masked) not in made:
                made[id(masked)] = _sparse_layer(masked)
            model.set_submodule(name, made[id(masked)])


def _hybrid_layer(branches: HybridBranches, made: dict[int, Any]) -> HybridLayer:
    shared, part = branches.shared, branches.delta
    mask = part.weight_mask.reshape(-1)
    values = part.weight.detach().reshape(-1)
    if shared.bias is not None:
        mask = torch.cat([mask, part.bias_mask])
        values = torch.cat([values, part.bias.detach()])
    positions = mask.nonzero().reshape(-1)
    if id(shared) not in made:
        made[id(shared)] = _shared_parts(shared)
    parts = made[id(shared)]
    op = next(name for name, klass in _MASKED.items() if isinstance(part, klass))
    layer = HybridLayer(
        op,
        layers.layer_config_as(part, op),
        bias=shared.bias is not None,
        nnz=positions.numel(),
        materialize=branches.materialize,
        shared_nnz=parts["shared_values"].numel() if "shared_values" in parts else None,
    ).to(dtype=shared.weight.dtype, device=shared.weight.device)
    for attr, tensor in parts.items():
        setattr(layer, attr, tensor)
    layer.set_delta(positions, values[positions])
    return layer


def _shared_parts(shared: nn.Module) -> dict[str, Tensor | None]:
    """A Hybrid layer's shared tensors from its shared branch: plain, or masked (a sparse weight)."""
    if not isinstance(shared, MASKED):
        return {"shared_weight": shared.weight, "shared_bias": shared.bias}
    sparse = _sparse_layer(shared)
    return {
        "shared_values": sparse.values,
        "shared_indices": sparse.indices,
        "shared_bias": sparse.dense_bias,
    }


def _sparse_layer(masked: nn.Module) -> SparseLayer:
    positions = masked.weight_mask.reshape(-1).nonzero().reshape(-1)
    op = next(name for name, klass in _MASKED.items() if isinstance(masked, klass))
    config = layers.layer_config_as(masked, op)
    bias = config.pop("bias")
    layer = SparseLayer(op, config, bias, positions.numel(), masked.materialize)
    layer = layer.to(dtype=masked.weight.dtype, device=masked.weight.device)
    layer.set_entries(positions, masked.weight.detach().reshape(-1)[positions])
    if masked.bias is not None:
        with torch.no_grad():
            layer.dense_bias.copy_(masked.bias)
    return layer.train(masked.training)


def _mix_layer(branches: MixBranches, made: dict[int, Any]) -> TaskMixLayer:
    first = branches.basis[0]
    if id(first) not in made:
        made[id(first)] = nn.Parameter(torch.stack([b.weight.detach() for b in branches.basis]))
    layer = TaskMixLayer(
        type(first).__name__, layers.layer_config(first), len(branches.basis), branches.materialize
    ).to(dtype=first.weight.dtype, device=first.weight.device)
    layer.basis, layer.mix = made[id(first)], branches.mix
    return layer
