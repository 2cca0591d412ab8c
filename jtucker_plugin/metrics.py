"""Measurements of task models and bundles: parameters, MACs, bytes, latency, compression.

Every function reads its model and leaves it as it found it (training flags, hooks,
``requires_grad``). Parameters shared between task models are the same ``nn.Parameter`` object
in each (see ``multitask.py``), so sharing is counted by identity.

Examples
--------
>>> conv = nn.Conv2d(3, 8, 3, bias=False)
>>> count_parameters(conv), count_macs(conv, (3, 10, 10))
(216, 13824)
>>> compression_ratio(3 * 216, 216)
3.0
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import statistics
import time
from collections.abc import Iterable

import safetensors.torch
import torch
import torch_pruning as tp
from torch import Tensor, nn

# Layers whose weight multiply-accumulates count_macs adds up; torch-pruning's hook gives
# exactly k*k*C/groups*S MACs per output position for these (ConvTranspose it gets wrong).
_MAC_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements in ``model``, each ``nn.Parameter`` counted once.

    A parameter reached through several module paths (a tied weight, a submodule used twice)
    counts once.

    Parameters
    ----------
    model
        Any module.

    Returns
    -------
    int
        The total ``numel`` of the model's distinct parameters.
    """
    return unique_parameters([model])


def unique_parameters(models: Iterable[nn.Module]) -> int:
    """Number of parameter elements across ``models``, shared parameter objects counted once.

    This is what a bundle costs: a factor conv or a single ``nn.Parameter`` shared by several
    task models is stored once.

    Parameters
    ----------
    models
        The task models.

    Returns
    -------
    int
        The total ``numel`` of the distinct parameters of all models.

    Raises
    ------
    TypeError
        If an item of ``models`` is not an ``nn.Module``.
    """
    seen: dict[int, nn.Parameter] = {}
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{i}]: expected an nn.Module, got {type(model).__qualname__}")
        for p in model.parameters():
            seen.setdefault(id(p), p)
    return sum(p.numel() for p in seen.values())


def _check_shape(input_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    if (
        not isinstance(input_shape, (tuple, list))
        or len(input_shape) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in input_shape)
    ):
        raise ValueError(
            f"{where}: input_shape must be three positive ints (channels, height, width), got {input_shape!r}"
        )
    return tuple(input_shape)


def _example_input(model: nn.Module, shape: tuple[int, ...]) -> Tensor:
    """A fixed input on the model's device and in its floating dtype (float32 if it has none)."""
    like = next(
        (t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
        torch.empty(0),
    )
    # A private generator keeps the global RNG untouched; the values do not change the timing
    # or the operation count of dense layers.
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of the weight layers in one forward pass at batch size 1.

    Counted with ``torch_pruning.utils.count_ops_and_params`` on a copy of the model in eval
    mode, keeping only its per-layer counts of ``Conv1d/2d/3d`` and ``Linear`` modules, found at
    any depth (custom modules built of them are counted through their children). Compared with
    the total that torch-pruning returns, this leaves out the additions of biases, the
    element-wise work of norms, activations and pooling, and counts a module reached through
    several parents once per call instead of once per parent. A convolution gives
    ``H' * W' * S * C / groups * k_h * k_w`` MACs, a linear layer ``rows * in * out``.

    Work done by functional calls on raw parameters (``F.conv2d(x, self.weight)``) and by
    transposed convolutions is not counted.

    Parameters
    ----------
    model
        The model; it is not changed (a copy is measured).
    input_shape
        ``(channels, height, width)`` of one input image.

    Returns
    -------
    int
        The number of MACs for one image.

    Raises
    ------
    ValueError
        If ``input_shape`` is not three positive ints.

    Examples
    --------
    >>> count_macs(nn.Conv2d(3, 8, 3, bias=True), (3, 10, 10))  # 8*8 positions * 8 * 3 * 3*3
    13824
    """
    shape = _check_shape(input_shape, "count_macs")
    probe = copy.deepcopy(model)
    for module in probe.modules():
        if isinstance(module, _MAC_LAYERS) and module.bias is not None:
            # torch-pruning adds one op per bias element; without a bias its count is MACs only.
            module.bias = None
    example = _example_input(probe, (1, *shape))
    # torch-pruning prints warnings to stdout (e.g. for a module with two parents), which would
    # break a progress display; its counts do not depend on them.
    with contextlib.redirect_stdout(io.StringIO()):
        _, _, layer_ops, _ = tp.utils.count_ops_and_params(probe, example, layer_wise=True)
    macs = sum(ops for module, ops in layer_ops.items() if isinstance(module, _MAC_LAYERS) and ops)
    return round(macs)


def state_bytes(tensors: dict[str, Tensor]) -> int:
    """Exact size in bytes of the safetensors file that ``tensors`` make.

    Non-contiguous tensors are packed first, as saving requires; the size is the same.

    Parameters
    ----------
    tensors
        Name to tensor, as passed to ``safetensors.torch.save``.

    Returns
    -------
    int
        The length of the serialized file: header and data.

    Raises
    ------
    TypeError
        If ``tensors`` is not a dict of str to tensors.
    RuntimeError
        From safetensors, if two tensors share memory (dedupe them first, as ``model_bytes``
        does).
    """
    if not isinstance(tensors, dict):
        raise TypeError(f"state_bytes: expected a dict of name -> Tensor, got {type(tensors)}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise TypeError(
                f"state_bytes: expected str -> Tensor entries, got {name!r} -> {type(tensor).__qualname__}"
            )
    packed = {name: t.detach().contiguous() for name, t in tensors.items()}
    return len(safetensors.torch.save(packed))


def model_bytes(model: nn.Module) -> int:
    """Size in bytes of the safetensors file of ``model``'s state dict, shared tensors once.

    A tensor reachable under several names (a tied weight, a shared submodule) is kept under
    its first name only, as a bundle file stores it.

    Parameters
    ----------
    model
        Any module whose state dict holds only tensors.

    Returns
    -------
    int
        See ``state_bytes``.

    Raises
    ------
    TypeError
        If the state dict holds something other than tensors (e.g. packed quantized params).
    """
    kept: dict[str, Tensor] = {}
    seen: set[tuple] = set()
    for name, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"model_bytes: state dict entry {name!r} is a {type(value).__qualname__}, not "
                "a Tensor; safetensors stores tensors only"
            )
        storage = value.untyped_storage()
        view = (storage.data_ptr(), value.storage_offset(), value.shape, value.stride())
        if storage.nbytes() > 0 and (view, value.dtype) in seen:
            continue
        seen.add((view, value.dtype))
        kept[name] = value
    return state_bytes(kept)


def _training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def latency_ms(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int,
    *,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall time in milliseconds of one forward pass at ``batch_size``.

    The model runs in eval mode under ``torch.inference_mode`` with the current torch thread
    settings; every module's training flag is restored afterwards. Times are wall-clock
    (``time.perf_counter``), so they vary with the machine's load.

    Parameters
    ----------
    model
        The model to time.
    input_shape
        ``(channels, height, width)`` of one input image.
    batch_size
        Images per forward pass.
    repeats
        Timed forward passes; the median is returned.
    warmup
        Untimed forward passes run first (allocations, kernel selection).

    Returns
    -------
    float
        The median time of one forward pass, in milliseconds.

    Raises
    ------
    ValueError
        If ``input_shape`` is not three positive ints, ``batch_size`` or ``repeats`` is below 1
        or ``warmup`` below 0.
    """
    shape = _check_shape(input_shape, "latency_ms")
    for name, value, low in (("batch_size", batch_size, 1), ("repeats", repeats, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"latency_ms: {name} must be an int >= {low}, got {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"latency_ms: warmup must be an int >= 0, got {warmup!r}")
    example = _example_input(model, (batch_size, *shape))
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    flags = _training_flags(model)
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(example)
            sync()
            for _ in range(repeats):
                start = time.perf_counter()
                model(example)
                sync()
                times.append(time.perf_counter() - start)
    finally:
        for module, training in flags:
            module.training = training
    return statistics.median(times) * 1000.0


def compression_ratio(dense_parameters: int, unique: int) -> float:
    """How many times fewer parameters the bundle stores than the separate dense models.

    Parameters
    ----------
    dense_parameters
        Sum of the parameters of the uncompressed task models.
    unique
        Parameters the compressed bundle stores (see ``unique_parameters``).

    Returns
    -------
    float
        ``dense_parameters / unique``.

    Raises
    ------
    ValueError
        If ``unique`` is not positive or ``dense_parameters`` is negative.
    """
    if not unique > 0 or not math.isfinite(unique):
        raise ValueError(f"compression_ratio: unique must be a positive count, got {unique!r}")
    if not dense_parameters >= 0:
        raise ValueError(f"compression_ratio: dense_parameters must be >= 0, got {dense_parameters!r}")
    return dense_parameters / unique
