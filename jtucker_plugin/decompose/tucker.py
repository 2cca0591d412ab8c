"""Joint partial Tucker-2 of one layer across tasks (J-Tucker, METHODS.md section 1).

The T tasks' kernels of one layer are stacked into X (T x S x C x kh x kw) and approximated as
``W_t ~= G_t x1 U x2 V``: the factors U (S x R1) and V (C x R2) are shared by every task and
have orthonormal columns, the cores G_t (R1 x R2 x kh x kw) are per task. The task and spatial
modes are left whole, so this is a partial Tucker of X on its two channel modes, fitted by HOOI
from the HOSVD. T = 1 is ordinary Tucker-2; linear and 1x1 layers are the case kh = kw = 1.

How it is computed, and why:

- Each factor update takes the leading eigenvectors of a Gram matrix with ``torch.linalg.eigh``
  instead of an SVD of an unfolding thousands of columns wide: the Gram product is a few large
  matmuls, which run near the machine's peak (only its lower triangle is formed, by blocks,
  since eigh reads no more), and the eigensolver works on a small dense matrix.
  Of the two Grams of an unfolding A (n x m) the smaller is formed: ``A A^T`` (S x S or C x C)
  as a rule, ``A^T A`` when m < n (linear layers, or ranks with T*kh*kw*R < S), whose
  eigenvectors w give the factor ``A w / sqrt(lambda)``, made orthonormal again by a QR.
- X is copied once into the layout (S, T, kh*kw, C). Both projections (``X x2 V^T`` and
  ``X x1 U^T``), both Grams and the core are then single matmuls on contiguous views of it, with
  no further copy of anything of X's size.
- The first sweep updates U from V alone, so the HOSVD start of U is computed only when no sweep
  runs (``n_iter_max=0``). The result is the same as HOOI from the full HOSVD; it saves the
  most expensive product (``S^2 * T * C * kh * kw`` multiply-adds).
- The fit needs no reconstruction: with orthonormal factors, ``||X||^2 - ||G||^2`` is the
  squared error, and ``||G||^2`` is the sum of the R2 eigenvalues kept in the V update. The
  reported per-task errors come from the same identity, or from the residual where it cancels
  (errors of a few percent or less in float32), so they are accurate down to rounding.
- Precision: by default the work is done in the weights' own dtype (float32 for float16 and
  bfloat16 weights). A float32 Gram squares the condition number of the unfolding, which blurs
  eigenvalues below about 1e-7 of the largest; the kept subspace and the error are unaffected
  at the ranks compression uses (the error matches tensorly's SVD-based ``partial_tucker``
  within 1e-4 relative, see ``benchmarks/decompose_speed.py``), and float32 is several times
  faster. Ask for ``dtype=torch.float64`` for near-exact low-rank weights, whose factors a
  float32 Gram resolves only to ~1e-6 relative.
- Deterministic: each eigenvector's sign is fixed so that its largest-magnitude entry is
  positive; the same input gives bit-identical output on the same machine and thread count.

Examples
--------
>>> import torch
>>> weights = torch.randn(3, 64, 32, 3, 3, dtype=torch.float64)  # 3 tasks, one conv layer
>>> jt = joint_tucker(weights, rank=(16, 8))
>>> jt.U.shape, jt.V.shape, jt.cores.shape
(torch.Size([64, 16]), torch.Size([32, 8]), torch.Size([3, 16, 8, 3, 3]))
>>> jt.reconstruct().shape
torch.Size([3, 64, 32, 3, 3])
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from jtucker_plugin.defaults import TUCKER_N_ITER_MAX, TUCKER_TOL

__all__ = ["JointTucker", "joint_spectrum", "joint_tucker", "tucker2"]

_COMPUTE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class JointTucker:
    """One layer of T tasks as shared factors and per-task cores: ``W_t ~= G_t x1 U x2 V``.

    Attributes
    ----------
    U : Tensor
        S x R1, orthonormal columns, shared by every task (output channels).
    V : Tensor
        C x R2, orthonormal columns, shared by every task (input channels).
    cores : Tensor
        T x R1 x R2 x kh x kw, or T x R1 x R2 for 2-D weights: ``G_t = W_t x1 U^T x2 V^T``.
    errors : Tensor
        (T,) float64, relative reconstruction error ``||W_t - W^_t|| / ||W_t||`` of each task
        (0 for an all-zero weight).
    n_iter : int
        HOOI sweeps performed after the HOSVD start.

    Examples
    --------
    >>> import torch
    >>> jt = tucker2(torch.eye(4, dtype=torch.float64), rank=4)
    >>> torch.allclose(jt.reconstruct()[0], torch.eye(4, dtype=torch.float64))
    True
    """

    U: Tensor
    V: Tensor
    cores: Tensor
    errors: Tensor
    n_iter: int = 0

    def reconstruct(self) -> Tensor:
        """Rebuild every task's weight, T x S x C (x kh x kw), in the dtype of the input weights."""
        n_tasks, r1, r2 = self.cores.shape[:3]
        spatial = tuple(self.cores.shape[3:])
        taps = math.prod(spatial)
        n_out, n_in = self.U.shape[0], self.V.shape[0]
        # G x2 V first: it keeps the intermediate at R1 rows rather than S.
        cores = self.cores.reshape(n_tasks, r1, r2, taps).transpose(2, 3)
        partial = torch.matmul(cores, self.V.T)  # T x R1 x taps x C
        full = torch.matmul(self.U, partial.reshape(n_tasks, r1, taps * n_in))
        full = full.reshape(n_tasks, n_out, taps, n_in).transpose(2, 3)
        return full.reshape(n_tasks, n_out, n_in, *spatial)


def joint_spectrum(
    weights: Tensor | Sequence[Tensor], *, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Eigenvalues of the stacked mode-1 and mode-2 Gram matrices of one layer, descending.

    ``sum_t X_t(1) X_t(1)^T`` (length S) and ``sum_t X_t(2) X_t(2)^T`` (length C): the energy
    each output / input direction carries over all tasks, which is what the rank strategies
    (energy threshold, budget, VBMF) read. Both sum to ``sum_t ||W_t||^2``.

    Parameters
    ----------
    weights : Tensor or sequence of Tensor
        T x S x C x kh x kw or T x S x C, or a sequence of T weights S x C x kh x kw or S x C.
    dtype : {None, torch.float32, torch.float64}
        Precision of the Gram matrices; None uses the weights' dtype (float32 for half types).

    Returns
    -------
    tuple of Tensor
        ``(mode1, mode2)``, lengths S and C, in ``dtype``; the rounding noise of a
        positive semi-definite matrix's zero eigenvalues is clipped to 0.

    Raises
    ------
    ValueError
        Empty, zero-sized, non-finite or differently shaped weights, or a wrong ``dtype``.
    TypeError
        Weights that are not floating-point tensors.
    """
    x, _ = _layout(*_stack_shape(weights), dtype)
    n_out, n_in = x.shape[0], x.shape[-1]
    rows, cols = x.view(-1, n_in), x.view(n_out, -1)
    spectra = []
    for a in (cols, rows.T):
        # The nonzero eigenvalues of a a^T and a^T a are the same: use the smaller matrix.
        gram = _lower_gram(a if a.shape[0] <= a.shape[1] else a.T)
        values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
        spectra.append(torch.cat([values, values.new_zeros(a.shape[0] - len(values))]))
    return spectra[0], spectra[1]


def joint_tucker(
    weights: Tensor | Sequence[Tensor],
    rank: int | tuple[int, int],
    *,
    n_iter_max: int = TUCKER_N_ITER_MAX,
    tol: float = TUCKER_TOL,
    dtype: torch.dtype | None = None,
) -> JointTucker:
    """Joint partial Tucker-2 of one layer across T tasks, by HOOI from the HOSVD.

    Minimises ``sum_t ||W_t - G_t x1 U x2 V||^2`` over shared orthonormal U (S x R1),
    V (C x R2) and per-task cores G_t (R1 x R2 x kh x kw).

    Parameters
    ----------
    weights : Tensor or sequence of Tensor
        T x S x C x kh x kw (conv) or T x S x C (linear), or a sequence of T weights of one
        shape, S x C x kh x kw or S x C.
    rank : int or tuple of int
        ``(R1, R2)``, each in [1, S] and [1, C]; an int is used for both modes.
    n_iter_max : int
        HOOI sweeps after the HOSVD start (each updates U, then V); 0 returns the HOSVD.
    tol : float
        Stop once the fit, ``1 - sum_t ||W_t - W^_t||^2 / sum_t ||W_t||^2`` (the share of the
        energy kept), gains less than ``tol`` in a sweep; 0 always runs ``n_iter_max`` sweeps.
    dtype : {None, torch.float32, torch.float64}
        Precision of the computation; None uses the weights' dtype (float32 for half types).
        The results are returned in the weights' dtype whatever this is.

    Returns
    -------
    JointTucker
        Shared ``U``, ``V``, per-task ``cores``, per-task relative ``errors``.

    Raises
    ------
    ValueError
        A rank outside [1, S] or [1, C], weights of the wrong ndim, of different shapes, empty
        or non-finite, a negative ``n_iter_max``, a negative or infinite ``tol``, or a
        ``dtype`` other than float32 / float64.
    TypeError
        A rank that is not an int or a pair of ints, weights that are not floating tensors, a
        non-integer ``n_iter_max`` or a non-numeric ``tol``.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> U, _ = torch.linalg.qr(torch.randn(32, 8, generator=g, dtype=torch.float64))
    >>> V, _ = torch.linalg.qr(torch.randn(24, 6, generator=g, dtype=torch.float64))
    >>> cores = torch.randn(3, 8, 6, 3, 3, generator=g, dtype=torch.float64)
    >>> weights = JointTucker(U, V, cores, torch.zeros(3)).reconstruct()
    >>> bool(joint_tucker(weights, rank=(8, 6)).errors.max() < 1e-6)
    True
    """
    tasks, shape = _stack_shape(weights)
    r1, r2 = _check_rank(rank, shape[1], shape[2])
    if _as_int(n_iter_max) is None:
        raise TypeError(f"n_iter_max: expected an int; got {n_iter_max!r}")
    if n_iter_max < 0:
        raise ValueError(f"n_iter_max: expected an int >= 0; got {n_iter_max}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol: expected a number; got {tol!r} ({type(tol).__name__})")
    if not 0 <= tol < math.inf:
        raise ValueError(f"tol: expected a finite number >= 0; got {tol!r}")
    x, weight_sq = _layout(tasks, shape, dtype)
    n_out, n_tasks, taps, n_in = x.shape

    # Two views of one buffer: rows is X(2)^T (S*T*taps x C), cols is X(1) (S x T*taps*C).
    rows, cols = x.view(-1, n_in), x.view(n_out, -1)
    total = float(weight_sq.sum())
    V, _ = _leading_subspace(rows.T, r2)
    U = _leading_subspace(cols, r1)[0] if n_iter_max == 0 else None
    previous = -math.inf
    n_iter = 0
    while n_iter < n_iter_max:
        n_iter += 1
        projected = (rows @ V).view(n_out, -1)  # X x2 V^T, mode-1 unfolding
        U, _ = _leading_subspace(projected, r1)
        projected = (U.T @ cols).view(-1, n_in)  # X x1 U^T, mode-2 unfolding
        V, kept = _leading_subspace(projected.T, r2)
        # The fit (energy kept, 1 - error^2) rather than the error: near an exact fit the
        # error is the square root of rounding noise and would never settle below tol.
        fit = float(kept) / total if total > 0 else 1.0
        if tol > 0 and fit - previous < tol:
            break
        previous = fit
    if n_iter == 0:
        projected = (U.T @ cols).view(-1, n_in)
    cores = (projected @ V).view(r1, n_tasks, taps, r2).permute(1, 0, 3, 2)
    errors = _relative_errors(x, U, V, cores, weight_sq)
    cores = cores.reshape(n_tasks, r1, r2, *shape[3:])
    out = tasks[0].dtype
    return JointTucker(
        U=U.to(out),
        V=V.to(out),
        cores=cores.to(out),
        errors=errors,
        n_iter=n_iter,
    )


def tucker2(weight: Tensor, rank: int | tuple[int, int], **kw) -> JointTucker:
    """Tucker-2 of one task's weight: :func:`joint_tucker` with T = 1.

    Parameters
    ----------
    weight : Tensor
        S x C x kh x kw (conv) or S x C (linear).
    rank : int or tuple of int
        ``(R1, R2)``; an int is used for both modes.
    **kw
        ``n_iter_max``, ``tol``, ``dtype``, as in :func:`joint_tucker`.

    Returns
    -------
    JointTucker
        With ``cores`` of shape 1 x R1 x R2 (x kh x kw) and ``errors`` of shape (1,).

    Raises
    ------
    ValueError, TypeError
        As :func:`joint_tucker`, and for a weight that is not 2-D or 4-D.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a Tensor; got {type(weight).__name__}")
    if weight.ndim not in (2, 4):
        raise ValueError(
            f"weight: expected S x C x kh x kw (4-D) or S x C (2-D); got a {weight.ndim}-D "
            f"tensor of shape {tuple(weight.shape)}"
        )
    return joint_tucker(weight.unsqueeze(0), rank, **kw)


def _stack_shape(weights: Tensor | Sequence[Tensor]) -> tuple[list[Tensor], tuple[int, ...]]:
    """Check the weights and return them per task with their stacked shape (T, S, C, ...)."""
    if isinstance(weights, Tensor):
        if weights.ndim not in (3, 5):
            raise ValueError(
                "weights: expected T x S x C x kh x kw (5-D) or T x S x C (3-D); got a "
                f"{weights.ndim}-D tensor of shape {tuple(weights.shape)}. For one task's "
                "weight use tucker2, or pass a list of weights."
            )
        tasks = list(weights.unbind(0))
        if not tasks:
            raise ValueError(f"weights: got shape {tuple(weights.shape)}, which has a zero-sized dimension")
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        tasks = list(weights)
        if not tasks:
            raise ValueError("weights: got an empty sequence; expected at least one task's weight")
        for t, w in enumerate(tasks):
            if not isinstance(w, Tensor):
                raise TypeError(f"weights[{t}]: expected a Tensor; got {type(w).__name__}")
            if w.ndim not in (2, 4):
                raise ValueError(
                    f"weights[{t}]: expected S x C x kh x kw (4-D) or S x C (2-D); got a "
                    f"{w.ndim}-D tensor of shape {tuple(w.shape)}"
                )
            if w.shape != tasks[0].shape:
                raise ValueError(
                    f"weights[{t}] has shape {tuple(w.shape)} but weights[0] has shape "
                    f"{tuple(tasks[0].shape)}: every task's weight must have the same shape"
                )
    else:
        raise TypeError(f"weights: expected a Tensor or a sequence of Tensors; got {type(weights).__name__}")
    shape = (len(tasks), *tasks[0].shape)
    if 0 in shape:
        raise ValueError(f"weights: got shape {shape}, which has a zero-sized dimension")
    if not tasks[0].is_floating_point() or any(w.dtype != tasks[0].dtype for w in tasks):
        raise TypeError(
            "weights: expected floating-point tensors of one dtype; got "
            f"{sorted({str(w.dtype) for w in tasks})}"
        )
    return tasks, shape


def _layout(tasks: list[Tensor], shape: tuple[int, ...], dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Copy the weights once into the working layout (S, T, kh*kw, C), in the compute dtype.

    Returns the copy and each task's squared norm in float64.
    """
    if dtype is None:
        dtype = tasks[0].dtype if tasks[0].dtype in _COMPUTE_DTYPES else torch.float32
    elif dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype: expected None, torch.float32 or torch.float64; got {dtype}")
    n_out, n_in = shape[1], shape[2]
    x = torch.empty((n_out, len(tasks), math.prod(shape[3:]), n_in), dtype=dtype)
    for t, w in enumerate(tasks):
        x[:, t].copy_(w.reshape(n_out, n_in, -1).transpose(1, 2))
    # A cascade sum of squares: accurate to ~1e-7 in float32, where torch.linalg.vector_norm
    # over several dims loses ~1e-3. NaN and inf propagate, so this is also the finiteness check.
    weight_sq = x.square().sum(dim=(0, 2, 3)).double()
    for t, w in enumerate(tasks):
        if not math.isfinite(weight_sq[t]):
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(
                f"weights: task {t} has {bad} non-finite entries (NaN or inf) out of {w.numel()}"
                + ("" if bad else f" but its squared norm overflows {dtype}")
                + "; the decomposition needs finite weights"
            )
    return x, weight_sq


def _check_rank(rank: int | tuple[int, int], n_out: int, n_in: int) -> tuple[int, int]:
    """Return ``(R1, R2)`` after checking each is an integer in [1, S] and [1, C].

    Integers are anything with ``__index__`` but bool (so numpy integers pass).
    """
    pair = (rank, rank) if _as_int(rank) is not None else rank
    if not isinstance(pair, Sequence) or isinstance(pair, str):
        raise TypeError(
            f"rank: expected an int or a pair of ints (R1, R2); got {rank!r} ({type(rank).__name__})"
        )
    if len(pair) != 2:
        raise ValueError(f"rank: expected a pair (R1, R2); got {tuple(pair)!r}, {len(pair)} values")
    checked = []
    for name, r, full, what in (("R1", pair[0], n_out, "S"), ("R2", pair[1], n_in, "C")):
        value = _as_int(r)
        if value is None:
            raise TypeError(f"rank: {name} must be an int; got {r!r} ({type(r).__name__})")
        if not 1 <= value <= full:
            direction = "output" if what == "S" else "input"
            raise ValueError(
                f"rank: {name}={value} is outside [1, {full}] for a weight with {what}={full} "
                f"{direction} channels"
            )
        checked.append(value)
    return checked[0], checked[1]


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer other than a bool, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _relative_errors(x: Tensor, U: Tensor, V: Tensor, cores: Tensor, weight_sq: Tensor) -> Tensor:
    """``||W_t - W^_t|| / ||W_t||`` per task, in float64 (0 for an all-zero weight).

    With orthonormal factors and cores that are projections of the weights,
    ``||W_t - W^_t||^2 = ||W_t||^2 - ||G_t||^2``: no reconstruction is needed. Where that
    difference cancels down to rounding noise (errors below ~sqrt(1e4 eps), 0.035 in float32),
    the task's residual is formed instead.
    """
    core_sq = cores.square().sum(dim=(1, 2, 3), dtype=torch.float64)
    residual_sq = (weight_sq - core_sq).clamp_min(0)
    cancelled = residual_sq < 1e4 * torch.finfo(x.dtype).eps * weight_sq
    for t in cancelled.nonzero().flatten().tolist():
        approx = U @ (cores[t].transpose(1, 2) @ V.T).reshape(U.shape[1], -1)
        residual = x[:, t].reshape(x.shape[0], -1) - approx
        residual_sq[t] = residual.square().sum(dtype=torch.float64)
    errors = residual_sq.sqrt() / weight_sq.sqrt()
    return torch.where(weight_sq > 0, errors, torch.zeros_like(errors))


def _leading_subspace(a: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The r leading left singular vectors of ``a`` (n x m) and their energy (sum of sigma^2).

    From the smaller Gram matrix: ``a a^T`` (n x n) when n <= m; otherwise ``a^T a``
    (m x m), whose eigenvectors w give the singular vectors ``a w / sqrt(lambda)``, made
    orthonormal again by a QR and completed by it when ``a`` has rank below r. Each vector's
    largest-magnitude entry is positive.
    """
    n, m = a.shape
    if n <= m:
        values, vectors = _top_eigh(_lower_gram(a), r)
        return _fix_signs(vectors), values.sum()
    values, w = _top_eigh(_lower_gram(a.T), min(r, m))
    # Directions at the rounding level of the Gram are noise: leave them to the completion.
    rank = int((values > values[0] * m * torch.finfo(values.dtype).eps).sum())
    vectors = (a @ w[:, :rank]) / values[:rank].sqrt()
    if rank < r:
        vectors = torch.cat([vectors, torch.eye(n, r - rank, dtype=a.dtype)], dim=1)
    return _fix_signs(torch.linalg.qr(vectors).Q), values.sum()


def _lower_gram(a: Tensor) -> Tensor:
    """``a @ a.T`` where only the lower triangle is meant to be read, as eigh does.

    Computed by row blocks, each against the rows up to its own end: the blocks above the
    diagonal are left zero, which saves up to 3/8 of the multiply-adds (4 blocks).
    """
    n = a.shape[0]
    blocks = min(4, n // 128)
    if blocks <= 1:
        return a @ a.T
    gram = a.new_zeros(n, n)
    edges = [n * i // blocks for i in range(blocks + 1)]
    for lo, hi in itertools.pairwise(edges):
        gram[lo:hi, :hi] = a[lo:hi] @ a[:hi].T
    return gram


def _top_eigh(gram: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The r largest eigenvalues of a symmetric matrix, descending, and their eigenvectors."""
    values, vectors = torch.linalg.eigh(gram)  # ascending; reads the lower triangle only
    return values[-r:].flip(0), vectors[:, -r:].flip(1)


def _fix_signs(vectors: Tensor) -> Tensor:
    """Flip columns so that each one's largest-magnitude entry is positive (deterministic)."""
    lead = vectors.abs().argmax(dim=0)
    return (vectors * vectors.gather(0, lead.unsqueeze(0)).sign()).contiguous()
