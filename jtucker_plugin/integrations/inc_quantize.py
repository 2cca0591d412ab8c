"""Int8 task bundles through Intel Neural Compressor: every task model in one program, shared parts once.

``quantize_tasks`` quantizes the T task models of a bundle together (INC's PT2E static or
dynamic int8, or its weight-only RTN), so that a tensor shared by several tasks is quantized and
stored once, and returns one runnable model per task plus the whole program for saving. The
graph rewrites it needs around INC's ``prepare``/``convert`` live here too: batch norms after a
shared weight kept as per-task affines, Hybrid deltas kept sparse (int8 values, one scale
each), weights folded to int8.
"""

from __future__ import annotations

import copy
import io
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from neural_compressor.torch.quantization import (
    RTNConfig,
    convert,
    get_default_dynamic_config,
    get_default_static_config,
    prepare,
    quantize,
)
from torch import Tensor, nn

from jtucker_plugin.integrations.neural_compressor import MultiTaskModel
from jtucker_plugin.io import atomic_write_bytes
from jtucker_plugin.merge.branches import to_branches
from jtucker_plugin.merge.composed import SparseDelta, SparseLayer, encode_positions, scatter_entries
from jtucker_plugin.recipe.schema import did_you_mean

SCHEMES = ("int8_static", "int8_dynamic", "weight_only_rtn")
PACK_SAVING = 0.25
"""Share of an int8 weight's bytes that storing it sparse must save (``_pack_sparse_weights``)."""
AFFINE_PREFIX = "_bn_"
AFFINE_DTYPE = torch.float16
"""How the per-task batch-norm affines are stored in an int8 program (``_store_affines_half``)."""


@dataclass
class QuantizedTasks:
    """Task models quantized together by INC.

    Attributes
    ----------
    scheme
        One of ``SCHEMES``.
    models
        Task -> runnable quantized model taking that task's batch. A tensor shared by several
        tasks (J-Tucker's factors, quantized once) is the same object in each.
    program
        All tasks in one module (``forward(*inputs)``, one input per task): what ``save`` writes.
    example_inputs
        One example batch per task, for exporting ``program``.
    dynamic_shapes
        The batch dimension of each input, free.
    """

    scheme: str
    models: dict[str, nn.Module]
    program: nn.Module
    example_inputs: tuple[Tensor, ...]
    dynamic_shapes: tuple[Any, ...]

    def stored_tensors(self) -> dict[str, Tensor]:
        """Each distinct tensor of all task models once (by identity), under its first name."""
        return _unique_tensors(self.models)

    def task_tensors(self, task: str) -> dict[str, Tensor]:
        """The tensors of one task's model."""
        return _unique_tensors({task: self.models[task]})

    def shared_tensors(self) -> int:
        """How many tensors several task models hold as one object (quantized once)."""
        users: dict[int, set[str]] = {}
        for task, model in self.models.items():
            for tensor in model.state_dict(keep_vars=True).values():
                users.setdefault(id(tensor), set()).add(task)
        return sum(len(u) > 1 for u in users.values())

    def save(self, path: str | Path) -> Path:
        """Write ``program`` as a ``torch.export`` archive (``.pt2``) atomically; returns ``path``.

        Load it with ``torch.export.load(path).module()``; shared tensors are stored once.
        """
        program = torch.export.export(self.program, self.example_inputs, dynamic_shapes=self.dynamic_shapes)
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        path = atomic_write_bytes(path, buffer.getvalue())
        return path


def quantize_tasks(
    models: Mapping[str, nn.Module],
    scheme: str,
    input_shapes: Mapping[str, Sequence[int]],
    *,
    calibration: Mapping[str, Sequence[Tensor]] | None = None,
    bits: int = 8,
    group_size: int = -1,
) -> QuantizedTasks:
    """Quantize task models through Intel Neural Compressor, shared parts once.

    The models are copied together (sharing kept) and joined in a ``MultiTaskModel``; the float
    models are left as they are.

    - ``int8_static``: exported with ``neural_compressor.torch.export.export``, INC's default
      static config (PT2E, X86 inductor quantizer: int8 weights per channel, uint8 activations
      per tensor), calibrated with each task's own batches in one pass, converted; the weight
      quantize ops are then folded into int8 constants (INC 3.10 leaves them float), their
      all-zero zero points dropped, and the graph is split into one graph per task, the
      shared int8 weights being one tensor.
      Batch norms fold into the conv before them, except after a weight that several tasks
      share (J-Tucker's ``out_proj``, hard sharing's convs): those stay per-task affines, so
      the weight stays one int8 tensor. A batch norm PT2E leaves unfolded (after a Hybrid
      layer's branches) becomes such an affine too, two tensors instead of four. Every affine
      is stored in float16 (``AFFINE_DTYPE``) and computed in float32. Hybrid and task-mixed
      layers run as branches (``merge.branches``): the shared layer in int8 once; Hybrid's
      deltas stay sparse, their values rounded to int8 with one scale per delta (INC's
      symmetric RTN, ``qdq_weight_sym``) and added in float.
    - ``int8_dynamic``: the same with INC's default dynamic config (no calibration).
    - ``weight_only_rtn``: INC's RTN on the ``nn.Linear`` layers (the only ones INC's weight-only
      algorithms touch): ``bits``-bit weights in groups of ``group_size`` (-1: per channel).

    Parameters
    ----------
    models
        Task -> float model (eval mode is used).
    scheme
        One of ``SCHEMES``.
    input_shapes
        Task -> ``(C, H, W)``.
    calibration
        Task -> normalised batches of that task's own images; required for ``int8_static``.
        Tasks with fewer batches repeat theirs (min/max observers are unchanged by repeats).
        ``int8_dynamic`` runs the first batch of each (zeros without it): weight observers
        record their ranges in a forward pass.
    bits, group_size
        For ``weight_only_rtn``.

    Raises
    ------
    ValueError
        For an unknown scheme (naming the close ones) or missing calibration data.
    """
    if scheme not in SCHEMES:
        raise ValueError(
            f"scheme: {scheme!r} is not a quantization scheme offered here{did_you_mean(scheme, SCHEMES)}; "
            f"Intel Neural Compressor runs on CPU: {', '.join(SCHEMES)}"
        )
    tasks = list(models)
    if scheme == "int8_static":
        missing = [t for t in tasks if not (calibration or {}).get(t)]
        if missing:
            raise ValueError(
                f"int8_static: no calibration batches for task(s) {missing}; static int8 sets each "
                "task's activation ranges from its own images"
            )
    multi = MultiTaskModel(copy.deepcopy(dict(models))).eval()
    # Hybrid layers run as a shared layer (quantized once) plus their sparse delta, added in float.
    deltas = to_branches(dict(multi.items()), delta="sparse")
    _densify_sparse_layers(multi)
    examples = tuple(torch.zeros(2, *input_shapes[t]) for t in tasks)  # batch 2: 1 would specialise
    dynamic = (tuple({0: torch.export.Dim(f"batch_{i}", min=1)} for i in range(len(tasks))),)
    if scheme == "weight_only_rtn":
        groups = _shared_paths(multi)
        config = RTNConfig(bits=bits, group_size=group_size, use_layer_wise=False)
        for path in deltas:
            config.set_local(f"{path}.op", RTNConfig(dtype="fp32"))
        multi = quantize(multi, config)
        for paths in groups:  # INC replaces a shared module under its first name only
            for other in paths[1:]:
                multi.set_submodule(other, multi.get_submodule(paths[0]))
        return QuantizedTasks(scheme, dict(multi.items()), multi, examples, dynamic)
    from neural_compressor.torch.export import export

    _round_deltas(multi)
    graph = export(multi, example_inputs=examples, dynamic_shapes=dynamic)
    _unfold_shared_batch_norms(graph)
    _keep_float(graph, deltas)
    config = get_default_static_config() if scheme == "int8_static" else get_default_dynamic_config()
    prepared = prepare(graph, config)
    # Weight observers record their ranges in a forward pass, dynamic quantization too.
    batches = {t: list((calibration or {}).get(t) or [examples[i]]) for i, t in enumerate(tasks)}
    steps = max(len(b) for b in batches.values()) if scheme == "int8_static" else 1
    with torch.no_grad():
        for i in range(steps):
            prepared(*(batches[t][i % len(batches[t])] for t in tasks))
    program = convert(prepared)
    _batch_norms_as_affines(
        program, [n for n in program.graph.nodes if n.target == torch.ops.aten.batch_norm.default]
    )
    _fold_weight_quantization(program)
    _drop_zero_points(program)
    _store_affines_half(program)
    _pack_sparse_weights(program)
    per_task = {t: _task_graph(program, i) for i, t in enumerate(tasks)}
    return QuantizedTasks(scheme, per_task, program, examples, dynamic[0])


def _shared_paths(model: nn.Module) -> list[list[str]]:
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return [p for p in paths.values() if len(p) > 1]


def _round_deltas(model: nn.Module) -> None:
    """Store each Hybrid delta's values as int8 codes and one scale (INC's symmetric RTN)."""
    from neural_compressor.torch.algorithms.weight_only.utility import qdq_weight_sym

    for module in model.modules():
        if isinstance(module, SparseDelta) and module.nnz:
            values = module.delta_values.detach().to(torch.float32).clone().view(1, -1)
            codes, scale, _ = qdq_weight_sym(values, bits=8, return_int=True)
            module.set_codes(codes.view(-1).to(torch.int8), scale)


def _densify_sparse_layers(model: nn.Module) -> None:
    """Each ``SparseLayer`` as its plain dense layer, one object wherever it sits (shared stays shared).

    The quantizer then quantizes its weight per channel like any other; the cut entries are
    exact zeros, which symmetric quantization keeps as code 0, and ``_pack_sparse_weights``
    stores only the others.
    """
    dense: dict[int, nn.Module] = {}
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, SparseLayer):
            if id(module) not in dense:
                dense[id(module)] = module.to_dense().train(module.training)
            model.set_submodule(path, dense[id(module)])


def _keep_float(gm: torch.fx.GraphModule, paths: Sequence[str]) -> None:
    """Mark the nodes computed inside the modules ``paths`` as annotated, with nothing to quantize.

    The quantizer then leaves them float (it skips annotated nodes): the sparse deltas of
    Hybrid layers, whose composed weight would otherwise be folded into a dense int8 copy per
    task. One pass over the graph; a ``set_local`` per module would re-run the whole annotation
    once per module (minutes for a ResNet-20 bundle).
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    inside = set(paths)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op == "call_function" and any(path in inside for path, _ in stack.values()):
            node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)


def _unfold_shared_batch_norms(gm: torch.fx.GraphModule) -> None:
    """Turn the batch norm after a conv whose weight several convs share into a channel affine.

    PT2E folds every batch norm into the conv before it. A weight shared by several tasks
    (hard sharing's convs, J-Tucker's ``out_proj``) is followed by each task's own batch norm:
    folded, it would become one int8 weight per task (torchao even folds only the first task's
    and drops the others). Written as ``x * scale + shift`` with each task's constants, the
    batch norm is not folded, so the shared weight is quantized and stored once; the affine
    runs in float (two ops per channel and pixel).
    """
    aten = torch.ops.aten
    convs = {aten.conv1d.default, aten.conv2d.default}
    norms = []
    for weight in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        users = [
            u for u in weight.users if u.op == "call_function" and u.target in convs and u.args[1] is weight
        ]
        if len(users) > 1:
            norms += [v for conv in users for v in conv.users if v.target == aten.batch_norm.default]
    _batch_norms_as_affines(gm, norms)


def _batch_norms_as_affines(gm: torch.fx.GraphModule, norms: Sequence[torch.fx.Node]) -> None:
    """Rewrite each of ``norms`` (inference batch norms) as ``x * scale + shift``.

    After conversion, a batch norm that PT2E did not fold (one after a Hybrid layer's sum of
    branches, say) would keep its weight, bias, mean and variance: four float tensors where the
    affine keeps two.
    """
    for norm in norms:
        _replace_batch_norm(gm, norm)
    if norms:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        _drop_unused_tensors(gm)


def _replace_batch_norm(gm: torch.fx.GraphModule, norm: torch.fx.Node) -> None:
    """``aten.batch_norm(x, w, b, mean, var, training=False, _, eps, _)`` -> ``x * scale + shift``."""
    x, w, b, mean, var, training, _, eps = norm.args[:8]
    if training:
        raise ValueError(f"{norm.name}: a batch norm in training mode cannot be rewritten")

    def value(node: torch.fx.Node) -> Tensor:
        owner, _, attr = node.target.rpartition(".")
        return getattr(gm.get_submodule(owner), attr).detach()

    mean, var = value(mean), value(var)
    scale = torch.rsqrt(var + eps)
    if w is not None:
        scale = scale * value(w)
    shift = -mean * scale
    if b is not None:
        shift = shift + value(b)
    view = (-1,) + (1,) * (norm.meta["val"].dim() - 2)
    graph = gm.graph
    with graph.inserting_before(norm):
        nodes = []
        for kind, tensor in (("scale", scale), ("shift", shift)):
            name = f"{AFFINE_PREFIX}{kind}_{norm.name}"
            gm.register_buffer(name, tensor.reshape(view).clone())
            node = graph.get_attr(name)
            node.meta["val"] = getattr(gm, name)
            nodes.append(node)
        scaled = graph.call_function(torch.ops.aten.mul.Tensor, (x, nodes[0]))
        shifted = graph.call_function(torch.ops.aten.add.Tensor, (scaled, nodes[1]))
    for node in (scaled, shifted):
        node.meta = {**norm.meta}
    norm.replace_all_uses_with(shifted)
    graph.erase_node(norm)


def _fold_weight_quantization(gm: torch.fx.GraphModule) -> None:
    # What convert_pt2e(fold_quantize=True) does; INC 3.10's entry does not pass the flag on, so
    # its graphs keep float weights and quantize them at every call.
    from torchao.quantization.pt2e.constant_fold import constant_fold

    ops = torch.ops.quantized_decomposed
    quantize_ops = {
        ops.quantize_per_tensor.default,
        ops.quantize_per_tensor.tensor,
        ops.quantize_per_channel.default,
    }
    constant_fold(gm, lambda n: n.op == "call_function" and n.target in quantize_ops)
    _drop_unused_tensors(gm)


def _drop_zero_points(gm: torch.fx.GraphModule) -> None:
    # The X86 quantizer's int8 weights are symmetric: each per-channel zero point is a tensor of
    # zeros, stored as int64 (8 bytes per output channel, 1.6% of VGG's J-Tucker int8 program).
    # The dequantize op takes no zero points as zeros.
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != dequantize:
            continue
        zero_point = node.args[2]
        stored = isinstance(zero_point, torch.fx.Node) and zero_point.op == "get_attr"
        if stored and not operator.attrgetter(zero_point.target)(gm).any():
            node.update_arg(2, None)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    _drop_unused_tensors(gm)


def _store_affines_half(gm: torch.fx.GraphModule) -> None:
    """Store the batch-norm affines (``_bn_*``) in ``AFFINE_DTYPE``; they still compute in float32.

    They are what an int8 program of shared weights cannot fold: a scale and a shift per channel
    and task, 8% of ResNet-20's Hybrid int8 program in float32. Float16 rounds a value by at most
    2^-11 of it; the 8-bit activations computed from them step by 2^-8 of their range.
    """
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(AFFINE_PREFIX)]:
        setattr(gm, node.target, getattr(gm, node.target).to(AFFINE_DTYPE))
        with gm.graph.inserting_after(node):
            upcast = gm.graph.call_function(
                torch.ops.aten._to_copy.default, (node,), {"dtype": torch.float32}
            )
        node.replace_all_uses_with(upcast, delete_user_cb=lambda user, upcast=upcast: user is not upcast)
    gm.recompile()


def _pack_sparse_weights(gm: torch.fx.GraphModule) -> None:
    # An int8 weight with many zero codes (a SparseLayer's cut) is stored as its non-zero codes
    # and their positions (merge.composed.encode_positions: gaps of a byte each or one bit an entry)
    # and unpacked at every call. Only where that saves at least PACK_SAVING of the bytes: a
    # dense weight's few zero codes are not worth an unpack per call.
    dequantize = {
        torch.ops.quantized_decomposed.dequantize_per_channel.default,
        torch.ops.quantized_decomposed.dequantize_per_tensor.default,
    }
    packed: dict[str, tuple[str, str] | None] = {}
    for node in list(gm.graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.target in dequantize else None
        if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
            continue
        weight = operator.attrgetter(source.target)(gm)
        if source.target not in packed:
            packed[source.target] = _pack(gm, source.target, weight)
        if packed[source.target] is None:
            continue
        codes, positions = packed[source.target]
        with gm.graph.inserting_before(node):
            flat = gm.graph.call_function(
                scatter_entries, (gm.graph.get_attr(codes), gm.graph.get_attr(positions), weight.numel())
            )
            unpacked = gm.graph.call_method("view", (flat, *weight.shape))
        node.replace_input_with(source, unpacked)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    _drop_unused_tensors(gm)


def _pack(gm: torch.fx.GraphModule, name: str, weight: Tensor) -> tuple[str, str] | None:
    """Register ``weight``'s non-zero codes and positions; their names, or ``None`` if not worth it."""
    if weight.dtype != torch.int8:
        return None
    flat = weight.reshape(-1)
    positions = flat.nonzero().reshape(-1)
    stored = encode_positions(positions, flat.numel())
    if positions.numel() + stored.numel() * stored.element_size() > (1 - PACK_SAVING) * flat.numel():
        return None
    base = name.replace(".", "_")
    gm.register_buffer(f"{base}_codes", flat[positions].clone())
    gm.register_buffer(f"{base}_positions", stored)
    return f"{base}_codes", f"{base}_positions"


def _drop_unused_tensors(gm: torch.fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)
    gm.delete_all_unused_submodules()


def _task_graph(program: torch.fx.GraphModule, index: int) -> torch.fx.GraphModule:
    """The part of a multi-task graph that computes task ``index``: its tensors are the program's."""
    gm = torch.fx.GraphModule(program, copy.deepcopy(program.graph))
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (output.args[0][index],)
    for node in list(graph.nodes):
        # torch.export's shape guards read every input; they were checked when exporting.
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph.eliminate_dead_code()
    for i, node in enumerate(inputs):
        if i != index:
            graph.erase_node(node)
    graph._codegen = torch.fx.graph.CodeGen()  # plain positional forward(x), no pytree specs
    gm.recompile()
    _drop_unused_tensors(gm)
    return gm


def _unique_tensors(models: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for task, model in models.items():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if isinstance(tensor, Tensor) and id(tensor) not in seen:
                seen.add(id(tensor))
                out[f"{task}/{name}"] = tensor.detach()
    return out
