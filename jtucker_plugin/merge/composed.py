"""Layers whose weight is composed from stored parts, and the Hybrid layer: shared + sparse delta.

A ``ComposedLayer`` stores a conv or linear layer as parts (a weight shared by all tasks and a
sparse per-task delta; shared basis cores and per-task mixing weights, see
``decompose/shared_core.py``) and builds the dense weight from them. It runs that weight through
a plain ``nn.Conv2d`` / ``nn.Linear`` child ``op`` that holds no tensors of its own, so that what
counts torch layers (``metrics.count_macs``) sees the layer's multiply-accumulates.

Execution, ``materialize``:

- ``True``: without gradients (evaluation, export) the dense weight is built once, at the first
  forward, and kept until one of the parts changes (an optimiser step, a load). As fast as the
  dense layer, at the memory of one dense weight per task layer on top of the stored parts.
- ``False``: the weight is rebuilt at every forward and dropped after it: the least memory (one
  layer's dense weight at a time), at the cost of an ``index_add`` (or a small matrix product)
  per layer and forward. ``benchmarks/hybrid_execution.py`` measures the trade-off.

With gradients (training) the weight is always rebuilt, so that gradients reach the parts.

``HybridLayer`` is Hybrid sharing (METHODS.md section 4): ``W_t = W_shared + S_t``. The shared
weight (and bias) is ONE ``nn.Parameter`` object in every task's layer: stored, counted and
trained once. ``S_t`` is stored compactly as its ``nnz`` non-zero values (a parameter) and their
positions in the flattened ``[weight, bias]`` (a buffer), so ``Bundle.save`` writes exactly
values + indices. Positions are stored in whichever of three forms takes the fewest bytes
(``encode_positions``):

- gaps (``int8``): one byte per stored entry, its distance to the previous one (1-255), a gap
  above 255 preceded by one escape byte (+255, no entry) per 255 skipped: the relative indices
  of Deep Compression (Han et al., 2016), with escapes instead of filler entries. About one byte
  a position once more than 1 entry in 255 is stored;
- fixed width: 2 bytes a position (``int16``, stored as ``position - 32768`` so the whole 16-bit
  range is used) up to 65,536 entries, else 4 (``int32``): what sparser layers take;
- a bitmask (``uint8``), one bit an entry: what more than 1 entry in 8 stored takes.

Gaps and fixed positions decode in time proportional to the stored entries, a bitmask to all of
the layer's; it is only chosen where it beats one byte a position.
``Bundle.unique_parameters`` counts the shared weight once and the ``nnz`` values of each task;
the indices are buffers: they are counted in bytes (``merge.hybrid.hybrid_storage``), not as
parameters.

``SparseLayer`` is unstructured sparsity (``merge.sparse``): a layer that stores only its kept
weight entries, values at positions in the same forms; its zeros stay zero in training, since
only the values are parameters.

Examples
--------
>>> layer = HybridLayer("Conv2d", {"in_channels": 4, "out_channels": 8, "kernel_size": 3}, nnz=5)
>>> layer.delta_values.shape, layer.delta_indices.dtype        # 5 of 8*4*3*3 = 288 entries: gaps
(torch.Size([5]), torch.int8)
>>> layer(torch.zeros(1, 4, 6, 6)).shape
torch.Size([1, 8, 4, 4])
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jtucker_plugin import defaults, layers

OPS = ("Conv1d", "Conv2d", "Linear")
"""Layer types a composed layer can run: its ``op``."""

_GEOMETRY = frozenset(
    {
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "in_features",
        "out_features",
    }
)
_INT16_SPAN = 1 << 16
_INT16_OFFSET = 1 << 15
_GAP_LIMIT = 255
_GAP_OFFSET = 128  # gap bytes 0-255 are stored as int8 -128-127
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
# Row b: the 8 bits of byte b, lowest first (a lookup decodes a bitmask in one gather).
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) % 2).bool()
_PLAIN_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _gap_bytes(positions: Tensor) -> Tensor:
    """Ascending ``positions`` as gap bytes (``int64`` in 0-255; 0 is an escape, +255)."""
    gaps = torch.diff(positions, prepend=positions.new_full((1,), -1))
    escapes = (gaps - 1) // _GAP_LIMIT
    ends = (escapes + 1).cumsum(0) - 1
    out = positions.new_zeros(int(ends[-1]) + 1 if ends.numel() else 0)
    out[ends] = gaps - escapes * _GAP_LIMIT
    return out


def _walk_gaps(stored: Tensor) -> tuple[Tensor, Tensor]:
    """Per stored gap byte: the position it reaches, and whether it is an entry (not an escape)."""
    # In place on the one new tensor: decoding runs at every forward that rebuilds a weight.
    steps = stored.to(torch.int64).add_(_GAP_OFFSET)
    entry = steps != 0
    return steps.masked_fill_(~entry, _GAP_LIMIT).cumsum_(0).sub_(1), entry


def encode_positions(positions: Tensor, numel: int, form: torch.dtype | None = None) -> Tensor:
    """Ascending flat positions (``0 <= p < numel``) in their smallest form (module docstring).

    The dtype says the form: ``int8`` gaps, ``int16``/``int32`` positions, ``uint8`` bitmask.
    ``form`` forces one (``int16`` only up to 65,536 entries, ``int32`` only above).

    >>> encode_positions(torch.tensor([3, 4, 300]), 288 * 4)           # gaps 4, 1, 255 + 41
    tensor([-124, -127, -128,  -87], dtype=torch.int8)
    >>> encode_positions(torch.arange(0, 288, 3), 288).dtype            # 1 entry in 3: bits
    torch.uint8

    Raises
    ------
    ValueError
        If the positions are not strictly ascending, or ``form`` is not one of the forms.
    """
    positions = positions.to(torch.int64).reshape(-1)
    if bool((positions.diff() <= 0).any()):
        raise ValueError("encode_positions: positions must be distinct and ascending")
    fixed = torch.int16 if numel <= _INT16_SPAN else torch.int32
    gaps = _gap_bytes(positions)
    sizes = {
        fixed: positions.numel() * (2 if fixed == torch.int16 else 4),
        torch.int8: gaps.numel(),
        torch.uint8: math.ceil(numel / 8),
    }
    if form is None:
        form = min(sizes, key=sizes.__getitem__)
    elif form not in sizes:
        raise ValueError(f"form: expected one of {sorted(map(str, sizes))} for {numel} entries, got {form}")
    if form == torch.int8:
        return (gaps - _GAP_OFFSET).to(torch.int8)
    if form == torch.uint8:
        bits = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.uint8, device=positions.device)
        bits[positions] = 1
        return (bits.view(-1, 8) << _BIT_SHIFTS.to(positions.device)).sum(1, dtype=torch.uint8)
    if form == torch.int16:
        return (positions - _INT16_OFFSET).to(torch.int16)
    return positions.to(torch.int32)


def decode_positions(stored: Tensor) -> Tensor:
    """The ``int64`` positions, ascending, that ``encode_positions`` stored."""
    if stored.dtype == torch.uint8:
        return _BYTE_BITS.to(stored.device)[stored.long()].reshape(-1).nonzero().reshape(-1)
    if stored.dtype == torch.int8:
        reached, entry = _walk_gaps(stored)
        return reached[entry]
    if stored.dtype == torch.int16:
        return stored.to(torch.int64) + _INT16_OFFSET
    return stored.to(torch.int64)


def _check_entries(positions: Tensor, values: Tensor, numel: int, what: str) -> tuple[Tensor, Tensor]:
    """``positions`` (int64) and ``values``, flat, sorted by position, checked.

    Raises
    ------
    ValueError
        Naming ``what``, if the shapes differ, a position is out of range or repeated.
    """
    positions = positions.to(torch.int64).reshape(-1)
    values = values.detach().reshape(-1)
    if positions.shape != values.shape:
        raise ValueError(f"{what}: {positions.numel()} positions but {values.numel()} values")
    if positions.numel():
        if int(positions.min()) < 0 or int(positions.max()) >= numel:
            raise ValueError(f"{what}: positions must be in [0, {numel})")
        if positions.unique().numel() != positions.numel():
            raise ValueError(f"{what}: positions must not repeat")
    order = positions.argsort()
    return positions[order], values[order]


def scatter_entries(values: Tensor, stored: Tensor, numel: int, base: Tensor | None = None) -> Tensor:
    """``base`` (default ``numel`` zeros) plus ``values`` at the positions ``stored`` holds.

    ``stored`` is in ``encode_positions`` form. Differentiable in ``values`` and ``base``, and
    free of data-dependent shapes, so that torch.export and the ONNX exporter trace it.
    """
    if stored.dtype == torch.uint8:
        bits = _BYTE_BITS.to(stored.device)[stored.long()].reshape(-1)[:numel]
        scattered = values.new_zeros(numel).masked_scatter(bits, values)
        return scattered if base is None else base + scattered.to(base.dtype)
    out = values.new_zeros(numel) if base is None else base
    if stored.dtype == torch.int8:
        # Escape bytes add a zero at the position they reach: shapes stay data-independent.
        reached, entry = _walk_gaps(stored)
        spread = values.new_zeros(entry.shape).masked_scatter(entry, values)
        return out.index_add(0, reached, spread.to(out.dtype))
    return out.index_add(0, decode_positions(stored), values.to(out.dtype))


def _split(flat: Tensor, shape: tuple[int, ...], bias: bool) -> tuple[Tensor, Tensor | None]:
    """The flattened ``[weight, bias]`` as weight and bias."""
    n = flat.numel() - (shape[0] if bias else 0)
    return flat[:n].view(shape), (flat[n:] if bias else None)


def is_plain_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a ``Conv1d``/``Conv2d``/``Linear`` with a weight of its own.

    A composed layer's ``op`` is one of those types without a weight: not a layer to compose.
    """
    return type(module) in _PLAIN_TYPES and isinstance(module._parameters.get("weight"), nn.Parameter)


class ComposedLayer(nn.Module, metaclass=abc.ABCMeta):
    """A conv or linear layer whose weight (and bias) ``compose()`` builds from stored parts.

    Subclasses register their parts in ``__init__`` and implement ``compose`` and ``parts``.

    Parameters
    ----------
    op
        ``'Conv1d'``, ``'Conv2d'`` or ``'Linear'``: the layer it computes.
    config
        That layer's config (``layers.layer_config`` of the original); its ``bias`` is ignored:
        the bias, if any, is one of the parts.
    materialize
        Keep the dense weight between forwards without gradients (see the module docstring).
    """

    def __init__(self, op: str, config: dict[str, Any], materialize: bool = defaults.MATERIALIZE):
        super().__init__()
        if op not in OPS:
            raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
        module = layers.build_layer(op, {**config, "bias": False})
        self.weight_shape = tuple(module.weight.shape)
        # The op computes with a weight lent to it for one call (see forward): it stores nothing.
        del module.weight
        module.weight = None
        self.op = module
        self.materialize = bool(materialize)
        self._cache: tuple[Any, ...] | None = None

    @abc.abstractmethod
    def compose(self) -> tuple[Tensor, Tensor | None]:
        """The dense weight and bias (``None`` without bias) from the parts, differentiably."""

    @abc.abstractmethod
    def parts(self) -> tuple[Tensor, ...]:
        """The tensors ``compose`` reads: a change to any of them invalidates the kept weight."""

    @property
    @abc.abstractmethod
    def has_bias(self) -> bool:
        """Whether the composed layer has a bias."""

    def __getattr__(self, name: str) -> Any:
        # Code that reads a layer's geometry (TuckerConv2d.layer_config reads its core's) sees
        # the op's.
        if name in _GEOMETRY:
            return getattr(self._modules["op"], name)
        return super().__getattr__(name)

    @property
    def weight(self) -> Tensor:
        """The dense weight (composed, or the kept one)."""
        return self.dense()[0]

    @property
    def bias(self) -> Tensor | None:
        """The dense bias, ``None`` without one."""
        return self.dense()[1]

    def dense(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the layer computes with: kept or rebuilt per ``materialize``."""
        parts = self.parts()
        if not self.materialize or (torch.is_grad_enabled() and any(p.requires_grad for p in parts)):
            return self.compose()
        # _version counts in-place changes (optimiser steps, load_state_dict): a stale weight is
        # never used.
        key = tuple((id(p), p._version, p.dtype, p.device) for p in parts)
        if self._cache is None or self._cache[0] != key:
            # Not an inference tensor, even when first built under inference_mode: the kept
            # weight may later serve a forward that records gradients for the input.
            with torch.inference_mode(False), torch.no_grad():
                self._cache = (key, *self.compose())
        return self._cache[1], self._cache[2]

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.dense()
        if torch.compiler.is_compiling():
            # Tracing (torch.export, PT2E quantization) records the same aten op from the
            # functional call; lending the weight would be a side effect it warns about.
            linear = isinstance(self.op, nn.Linear)
            y = F.linear(x, weight) if linear else self.op._conv_forward(x, weight, None)
        else:
            # Lend the weight to the op for this call only: a kept reference would hold memory
            # in recompose mode and an autograd graph across calls in training. Calling the op
            # is what lets forward hooks on it (MAC counters) see the layer.
            object.__setattr__(self.op, "weight", weight)
            try:
                y = self.op(x)
            finally:
                object.__setattr__(self.op, "weight", None)
        if bias is None:
            return y
        return y + (bias if isinstance(self.op, nn.Linear) else bias.view(-1, *[1] * (y.dim() - 2)))

    def _apply(self, fn, recurse=True):
        # A dtype or device move makes new parts; the kept weight would be of the old ones.
        self._cache = None
        return super()._apply(fn, recurse)

    def kept_bytes(self) -> int:
        """Bytes of the dense weight kept by ``materialize`` now (0 when none is kept)."""
        if self._cache is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._cache[1:] if t is not None)

    def op_config(self) -> dict[str, Any]:
        """The op's layer config, with the bias this layer has."""
        return {**layers.layer_config(self.op), "bias": self.has_bias}

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The equivalent plain layer (``nn.Conv2d`` ...), e.g. for export or quantization."""
        weight, bias = self.compose()
        module = layers.build_layer(type(self.op).__name__, self.op_config())
        module = module.to(dtype=weight.dtype, device=weight.device)
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
        return module


class StoredEntries(ComposedLayer):
    """A composed layer that stores ``nnz`` entries at positions: Hybrid's delta, a sparse weight.

    Subclasses name the buffer of the positions (``positions_buffer``) and define ``nnz``,
    ``numel`` and the parts; this class reads the positions, loads them in whichever form they
    were saved, and describes the layer.
    """

    positions_buffer: str

    @property
    @abc.abstractmethod
    def nnz(self) -> int:
        """Stored entries."""

    @property
    @abc.abstractmethod
    def numel(self) -> int:
        """Entries the positions index."""

    def positions(self) -> Tensor:
        """The stored entries' flat positions (``int64``, ascending)."""
        return decode_positions(getattr(self, self.positions_buffer))

    @property
    def position_buffers(self) -> tuple[str, ...]:
        """Names of the buffers of positions: their form and length are those of the saved ones."""
        return (self.positions_buffer,)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A layer starts with placeholder positions (0, 1, ...); the saved ones may take another
        # form or length (gaps depend on the positions; older bundles had no gaps or bitmask):
        # take the stored tensor's.
        for name in self.position_buffers:
            stored, current = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(stored, Tensor) and (current.dtype, current.shape) != (stored.dtype, stored.shape):
                setattr(self, name, torch.empty_like(stored, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def layer_config(self) -> dict[str, Any]:
        return {
            "op": type(self.op).__name__,
            "config": layers.layer_config(self.op),
            "bias": self.has_bias,
            "nnz": self.nnz,
            "materialize": self.materialize,
        }

    def extra_repr(self) -> str:
        return f"nnz={self.nnz}/{self.numel}, materialize={self.materialize}"


@layers.register_layer
class HybridLayer(StoredEntries):
    """``W_t = W_shared + S_t``: a weight shared by all tasks plus this task's sparse delta.

    The shared weight is dense, or itself sparse (``shared_nnz``): its ``shared_nnz`` kept
    entries at positions, as a ``SparseLayer`` stores them, tied across tasks too.

    Parameters
    ----------
    op, config, materialize
        See ``ComposedLayer``.
    bias
        Whether the layer has a bias; it is shared (dense) and the delta covers it too.
    nnz
        Non-zeros of the delta: entries of the flattened ``[weight, bias]`` that differ.
    shared_nnz
        Entries of the shared weight that are stored (``None``: all of it, dense).

    Attributes
    ----------
    shared_weight, shared_bias
        ``nn.Parameter``s; the same objects in every task's layer once tied (``merge.hybrid``).
        ``shared_weight`` is ``None`` when the shared weight is sparse.
    shared_values, shared_indices
        A sparse shared weight: ``nn.Parameter`` of ``shared_nnz`` values and the buffer of their
        positions in the flattened weight (``encode_positions`` form); ``None`` when it is dense.
    delta_values
        ``nn.Parameter`` of ``nnz`` values.
    delta_indices
        Buffer of their positions, ascending, in ``encode_positions`` form.
    """

    positions_buffer = "delta_indices"

    def __init__(
        self,
        op: str,
        config: dict[str, Any],
        bias: bool = False,
        nnz: int = 0,
        materialize: bool = defaults.MATERIALIZE,
        shared_nnz: int | None = None,
    ):
        super().__init__(op, config, materialize)
        weight_entries = math.prod(self.weight_shape)
        if shared_nnz is None:
            self.shared_weight = nn.Parameter(torch.zeros(self.weight_shape))
            self.register_parameter("shared_values", None)
            self.register_buffer("shared_indices", None)
        elif isinstance(shared_nnz, int) and 0 <= shared_nnz <= weight_entries:
            self.register_parameter("shared_weight", None)
            self.shared_values = nn.Parameter(torch.zeros(shared_nnz))
            self.register_buffer("shared_indices", encode_positions(torch.arange(shared_nnz), weight_entries))
        else:
            raise ValueError(f"shared_nnz: expected an integer in [0, {weight_entries}], got {shared_nnz!r}")
        out = self.weight_shape[0]
        self.shared_bias = nn.Parameter(torch.zeros(out)) if bias else None
        if not isinstance(nnz, int) or not 0 <= nnz <= self.numel:
            raise ValueError(f"nnz: expected an integer in [0, {self.numel}], got {nnz!r}")
        self.delta_values = nn.Parameter(torch.zeros(nnz))
        self.register_buffer("delta_indices", encode_positions(torch.arange(nnz), self.numel))

    @property
    def numel(self) -> int:
        """Entries of the flattened ``[weight, bias]``: what the delta indexes."""
        return math.prod(self.weight_shape) + (self.weight_shape[0] if self.shared_bias is not None else 0)

    @property
    def nnz(self) -> int:
        return self.delta_values.numel()

    @property
    def position_buffers(self) -> tuple[str, ...]:
        return super().position_buffers + (() if self.shared_indices is None else ("shared_indices",))

    @property
    def shared_nnz(self) -> int | None:
        """Stored entries of a sparse shared weight; ``None`` when it is dense."""
        return None if self.shared_values is None else self.shared_values.numel()

    @property
    def has_bias(self) -> bool:
        return self.shared_bias is not None

    def parts(self) -> tuple[Tensor, ...]:
        sparse = self.shared_values is not None
        weight = (self.shared_values, self.shared_indices) if sparse else (self.shared_weight,)
        bias = () if self.shared_bias is None else (self.shared_bias,)
        return (*weight, *bias, self.delta_values, self.delta_indices)

    def shared_flat(self) -> Tensor:
        """The shared part, dense, as the flattened ``[weight, bias]`` (differentiably)."""
        if self.shared_values is None:
            flat = self.shared_weight.reshape(-1)
        else:
            flat = scatter_entries(self.shared_values, self.shared_indices, math.prod(self.weight_shape))
        return flat if self.shared_bias is None else torch.cat([flat, self.shared_bias])

    def compose(self) -> tuple[Tensor, Tensor | None]:
        flat = scatter_entries(self.delta_values, self.delta_indices, self.numel, base=self.shared_flat())
        return _split(flat, self.weight_shape, self.has_bias)

    def delta(self) -> Tensor:
        """The dense delta ``S_t`` over the flattened ``[weight, bias]`` (for inspection)."""
        out = torch.zeros(self.numel, dtype=self.delta_values.dtype)
        return out.index_put((self.positions(),), self.delta_values.detach())

    def set_delta(self, positions: Tensor, values: Tensor) -> None:
        """Replace the delta by ``values`` at the flat ``positions`` (any order; kept sorted).

        The values become a new ``nn.Parameter``: optimisers made before hold the old one.

        Raises
        ------
        ValueError
            If the shapes differ, a position is out of range or repeated.
        """
        positions, values = _check_entries(positions, values, self.numel, "set_delta")
        self.delta_values = nn.Parameter(
            values.to(self.parts()[0].dtype).clone(), requires_grad=self.delta_values.requires_grad
        )
        self.delta_indices = encode_positions(positions, self.numel).to(self.delta_indices.device)
        self._cache = None

    def keep_largest(self, k: int) -> None:
        """Keep the ``k`` delta values of largest magnitude (all if ``k >= nnz``)."""
        if k >= self.nnz:
            return
        top = self.delta_values.detach().abs().topk(max(k, 0)).indices
        self.set_delta(self.positions()[top], self.delta_values.detach()[top])

    def layer_config(self) -> dict[str, Any]:
        config = super().layer_config()
        return config if self.shared_values is None else {**config, "shared_nnz": self.shared_nnz}

    def extra_repr(self) -> str:
        shared = "" if self.shared_values is None else f", shared_nnz={self.shared_nnz}"
        return super().extra_repr() + shared


@layers.register_layer
class SparseLayer(StoredEntries):
    """A conv or linear layer storing only its kept weight entries: ``values`` at positions.

    Unstructured sparsity (``merge.sparse``). The weight is zero but at the stored positions;
    the bias, if any, stays dense. Of the weight only ``values`` is a parameter, so training
    moves the kept entries and the zeros stay zero: the mask is fixed by construction.

    Parameters
    ----------
    op, config, materialize
        See ``ComposedLayer``.
    bias
        Whether the layer has a (dense) bias.
    nnz
        Kept entries of the weight.

    Attributes
    ----------
    values
        ``nn.Parameter`` of ``nnz`` values, in ascending position order.
    indices
        Buffer of their positions in the flattened weight, in ``encode_positions`` form.
    dense_bias
        The bias, an ``nn.Parameter``, or ``None`` (``bias`` is the composed one, as for every
        composed layer).
    """

    positions_buffer = "indices"

    def __init__(
        self,
        op: str,
        config: dict[str, Any],
        bias: bool = False,
        nnz: int = 0,
        materialize: bool = defaults.MATERIALIZE,
    ):
        super().__init__(op, config, materialize)
        if not isinstance(nnz, int) or not 0 <= nnz <= self.numel:
            raise ValueError(f"nnz: expected an integer in [0, {self.numel}], got {nnz!r}")
        self.values = nn.Parameter(torch.zeros(nnz))
        self.register_buffer("indices", encode_positions(torch.arange(nnz), self.numel))
        self.dense_bias = nn.Parameter(torch.zeros(self.weight_shape[0])) if bias else None

    @classmethod
    @torch.no_grad()
    def of(
        cls, module: nn.Module, positions: Tensor, materialize: bool = defaults.MATERIALIZE
    ) -> SparseLayer:
        """``module`` (``nn.Conv2d`` ...) keeping only its weight entries at the flat ``positions``."""
        op = type(module).__name__
        layer = cls(op, layers.layer_config(module), module.bias is not None, positions.numel(), materialize)
        layer = layer.to(dtype=module.weight.dtype, device=module.weight.device)
        layer.set_entries(positions, module.weight.reshape(-1)[positions.to(module.weight.device)])
        if module.bias is not None:
            layer.dense_bias.copy_(module.bias)
        return layer.train(module.training)

    @property
    def numel(self) -> int:
        """Entries of the weight: what the positions index."""
        return math.prod(self.weight_shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def has_bias(self) -> bool:
        return self.dense_bias is not None

    def parts(self) -> tuple[Tensor, ...]:
        bias = () if self.dense_bias is None else (self.dense_bias,)
        return (self.values, self.indices, *bias)

    def compose(self) -> tuple[Tensor, Tensor | None]:
        return scatter_entries(self.values, self.indices, self.numel).view(self.weight_shape), self.dense_bias

    def set_entries(self, positions: Tensor, values: Tensor) -> None:
        """Keep ``values`` at the flat ``positions`` (any order), zeros elsewhere; a new ``values``.

        Raises
        ------
        ValueError
            If the shapes differ, a position is out of range or repeated.
        """
        positions, values = _check_entries(positions, values, self.numel, "set_entries")
        self.values = nn.Parameter(
            values.to(self.values.dtype).clone(), requires_grad=self.values.requires_grad
        )
        self.indices = encode_positions(positions, self.numel).to(self.indices.device)
        self._cache = None


class SparseDelta(ComposedLayer):
    """A ``HybridLayer``'s delta ``S_t`` alone: its values at their positions, zeros elsewhere.

    ``merge.branches`` runs it beside the shared layer (``W_shared x + S_t x``) so that a
    quantizer sees the shared weight as one stored tensor; it recomposes per forward
    (``materialize=False``), so exported graphs store only the values and positions. The values
    are float, or integer codes times one ``delta_scale`` once ``set_codes`` has rounded them.
    """

    def __init__(self, op: str, config: dict[str, Any], bias: bool, values: Tensor, indices: Tensor):
        super().__init__(op, config, materialize=False)
        self.bias_entries = self.weight_shape[0] if bias else 0
        self.register_buffer("delta_values", values.detach().clone())
        self.register_buffer("delta_indices", indices.clone())
        self.register_buffer("delta_scale", None)

    @classmethod
    def of(cls, layer: HybridLayer) -> SparseDelta:
        """The delta of ``layer``, on its device and dtype."""
        delta = cls(
            type(layer.op).__name__,
            layers.layer_config(layer.op),
            layer.has_bias,
            layer.delta_values,
            layer.delta_indices,
        )
        return delta.to(device=layer.delta_values.device)

    def set_codes(self, codes: Tensor, scale: Tensor) -> None:
        """Store the values as integer ``codes`` (``values ~= codes * scale``, one scalar scale)."""
        if codes.shape != self.delta_values.shape or scale.numel() != 1:
            raise ValueError(f"set_codes: expected {self.nnz} codes and one scale")
        self.delta_values = codes.to(self.delta_indices.device)
        self.delta_scale = scale.reshape(()).to(torch.float32)

    @property
    def nnz(self) -> int:
        return self.delta_values.numel()

    @property
    def has_bias(self) -> bool:
        return self.bias_entries > 0

    def parts(self) -> tuple[Tensor, ...]:
        scale = () if self.delta_scale is None else (self.delta_scale,)
        return (self.delta_values, self.delta_indices, *scale)

    def compose(self) -> tuple[Tensor, Tensor | None]:
        values = self.delta_values
        if self.delta_scale is not None:
            values = values.to(self.delta_scale.dtype) * self.delta_scale
        flat = scatter_entries(values, self.delta_indices, math.prod(self.weight_shape) + self.bias_entries)
        return _split(flat, self.weight_shape, self.has_bias)
