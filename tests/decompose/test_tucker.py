"""Joint Tucker-2 (J-Tucker) of one layer: exactness, optimality facts, tensorly parity, inputs."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker

from jtucker_plugin.decompose import JointTucker, joint_spectrum, joint_tucker, tucker2

F64 = torch.float64


def low_rank_tasks(generator, shape=(3, 32, 24, 3, 3), ranks=(8, 6), dtype=F64):
    """Weights that share U (S x R1) and V (C x R2) exactly, with their true factors."""
    n_tasks, n_out, n_in, *spatial = shape
    U, _ = torch.linalg.qr(torch.randn(n_out, ranks[0], generator=generator, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n_in, ranks[1], generator=generator, dtype=F64))
    cores = torch.randn(n_tasks, *ranks, *spatial, generator=generator, dtype=F64)
    weights = JointTucker(U, V, cores, torch.zeros(n_tasks)).reconstruct()
    return weights.to(dtype), U, V


def relative_errors(weights: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    w, a = weights.to(F64).flatten(1), approx.to(F64).flatten(1)
    return (w - a).norm(dim=1) / w.norm(dim=1)


def total_error(weights: torch.Tensor, approx: torch.Tensor) -> float:
    w, a = weights.to(F64), approx.to(F64)
    return float((w - a).norm() / w.norm())


def assert_identical(a: JointTucker, b: JointTucker) -> None:
    for name in ("U", "V", "cores", "errors"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.n_iter == b.n_iter


def test_recovers_exact_low_rank_tasks(generator):
    weights, U, V = low_rank_tasks(generator)
    jt = joint_tucker(weights, rank=(8, 6))
    assert jt.U.shape == (32, 8) and jt.V.shape == (24, 6)
    assert jt.cores.shape == (3, 8, 6, 3, 3)
    assert jt.errors.shape == (3,) and float(jt.errors.max()) < 1e-6
    assert float(relative_errors(weights, jt.reconstruct()).max()) < 1e-12
    # The shared subspaces, not just some factorization, are recovered.
    torch.testing.assert_close(jt.U @ jt.U.T, U @ U.T)
    torch.testing.assert_close(jt.V @ jt.V.T, V @ V.T)


@pytest.mark.parametrize("n_iter", [0, 5])
# (32, 24) by (8, 6) forms S x S and C x C Grams; (64, 48) by (24, 4) the smaller T*k*R x T*k*R;
# the last two form Grams of >= 256 rows by blocks, (256, 32) an S x S, (300, 32) a 270 x 270.
@pytest.mark.parametrize(
    ("shape", "ranks", "dtype"),
    [
        ((32, 24), (8, 6), torch.float32),
        ((32, 24), (8, 6), F64),
        ((64, 48), (24, 4), torch.float32),
        ((64, 48), (24, 4), F64),
        ((256, 32), (16, 30), torch.float32),
        ((300, 32), (40, 30), torch.float32),
    ],
)
def test_single_task_matches_tensorly(generator, n_iter, dtype, shape, ranks):
    # Gaussian weights: a flat spectrum with small gaps, the hardest case for a Gram-based solver.
    weight = torch.randn(*shape, 3, 3, generator=generator, dtype=F64)
    with tl.backend_context("pytorch"):
        (core, (u, v)), _ = partial_tucker(
            weight, rank=list(ranks), modes=[0, 1], init="svd", n_iter_max=n_iter, tol=0
        )
    theirs = total_error(weight, torch.einsum("abhw,sa,cb->schw", core, u, v))
    jt = tucker2(weight.to(dtype), ranks, n_iter_max=n_iter, tol=0)
    ours = total_error(weight, jt.reconstruct()[0])
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert float(jt.errors[0]) == pytest.approx(ours, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_factors_have_orthonormal_columns(generator, dtype):
    weights = torch.randn(3, 40, 20, 3, 3, generator=generator, dtype=dtype)
    jt = joint_tucker(weights, rank=(12, 7))
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(jt.U.T @ jt.U, torch.eye(12, dtype=dtype), atol=atol, rtol=0)
    torch.testing.assert_close(jt.V.T @ jt.V, torch.eye(7, dtype=dtype), atol=atol, rtol=0)


def test_sweeps_never_increase_the_error(generator):
    weights = torch.randn(3, 24, 20, 3, 3, generator=generator, dtype=F64)
    totals = []
    for n_iter in range(6):
        jt = joint_tucker(weights, rank=(6, 5), n_iter_max=n_iter, tol=0)
        assert jt.n_iter == n_iter
        totals.append(total_error(weights, jt.reconstruct()))
    assert all(later <= earlier + 1e-12 for earlier, later in pairwise(totals))
    assert totals[-1] < totals[0]  # HOOI improves on the HOSVD for a generic tensor


def test_errors_are_the_residual_norms(generator):
    weights = torch.randn(3, 20, 16, 3, 3, generator=generator, dtype=F64)
    jt = joint_tucker(weights, rank=(5, 4))
    torch.testing.assert_close(jt.errors, relative_errors(weights, jt.reconstruct()))


def test_cores_are_projections_of_the_weights(generator):
    weights = torch.randn(2, 20, 16, 3, 3, generator=generator, dtype=F64)
    jt = joint_tucker(weights, rank=(5, 4))
    projected = torch.einsum("tschw,sa,cb->tabhw", weights, jt.U, jt.V)
    torch.testing.assert_close(jt.cores, projected)


def test_single_matrix_error_is_eckart_young(generator):
    # T = 1, 2-D, R1 = R2 = r: the optimum is the truncated SVD.
    weight = torch.randn(30, 20, generator=generator, dtype=F64)
    jt = tucker2(weight, rank=7, n_iter_max=3)
    s = torch.linalg.svdvals(weight)
    expected = float(s[7:].norm() / s.norm())
    assert float(jt.errors[0]) == pytest.approx(expected, rel=1e-10)
    assert jt.cores.shape == (1, 7, 7)


def test_unbalanced_ranks_of_one_matrix_are_its_best_rank_r2_approximation(generator):
    # R1 > R2 = 3 for one 2-D weight: the projected unfolding has rank 3 < R1, so U is completed
    # by directions that cannot matter, and the optimum is still the rank-3 truncated SVD.
    weight = torch.randn(30, 20, generator=generator, dtype=F64)
    jt = tucker2(weight, rank=(12, 3))
    s = torch.linalg.svdvals(weight)
    assert float(jt.errors[0]) == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-10)
    torch.testing.assert_close(jt.U.T @ jt.U, torch.eye(12, dtype=F64))
    torch.testing.assert_close(jt.errors, relative_errors(weight[None], jt.reconstruct()))


def test_linear_weights_with_one_full_mode_are_joint_pca(generator):
    # With R2 = C the problem is PCA of the stacked mode-1 unfolding: the global optimum keeps
    # the top R1 eigenvalues of joint_spectrum's mode-1 Gram.
    weights = torch.randn(3, 24, 10, generator=generator, dtype=F64)
    weights[1] += weights[0]  # correlated tasks, as fine-tuned copies of one model are
    jt = joint_tucker(weights, rank=(6, 10))
    assert jt.cores.shape == (3, 6, 10)
    eig_out, _ = joint_spectrum(weights)
    kept_error = float((eig_out[6:].sum() / eig_out.sum()).sqrt())
    joint_sq = float((jt.errors**2 * weights.flatten(1).norm(dim=1) ** 2).sum())
    assert total_error(weights, jt.reconstruct()) == pytest.approx(kept_error, rel=1e-10)
    # Separate factors per task can only do better, and any one task's factors shared by
    # all can only do worse, than the joint optimum.
    separate_sq = sum(float(tucker2(w, (6, 10)).errors[0] ** 2 * w.norm() ** 2) for w in weights.unbind(0))
    assert separate_sq <= joint_sq * (1 + 1e-12)
    u0 = tucker2(weights[0], (6, 10)).U
    borrowed_sq = float((weights - u0 @ u0.T @ weights).norm() ** 2)
    assert joint_sq <= borrowed_sq * (1 + 1e-12)


def test_list_of_linear_weights_equals_stacked(generator):
    weights = torch.randn(3, 24, 10, generator=generator, dtype=F64)
    from_list = joint_tucker(list(weights.unbind(0)), rank=(5, 4))
    from_tensor = joint_tucker(weights, rank=(5, 4))
    assert_identical(from_list, from_tensor)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(2, 12, 9, 3, 3), (1, 12, 9)])
def test_full_ranks_reconstruct_exactly(generator, dtype, shape):
    weights = torch.randn(*shape, generator=generator, dtype=dtype)
    jt = joint_tucker(weights, rank=(12, 9))
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(jt.reconstruct(), weights, rtol=rtol, atol=rtol)
    assert jt.reconstruct().dtype == dtype


def test_deterministic_with_fixed_signs(generator):
    weights = torch.randn(3, 32, 24, 3, 3, generator=generator)
    first, second = (joint_tucker(weights, rank=(8, 6)) for _ in range(2))
    assert_identical(first, second)
    for factor in (first.U, first.V):
        lead = factor.abs().argmax(dim=0)
        assert bool((factor[lead, torch.arange(factor.shape[1])] > 0).all())


def test_tol_stops_early_and_zero_tol_runs_every_sweep(generator):
    weights, _, _ = low_rank_tasks(generator)
    assert joint_tucker(weights, rank=(8, 6), n_iter_max=10, tol=1e-8).n_iter < 10
    assert joint_tucker(weights, rank=(8, 6), n_iter_max=10, tol=0).n_iter == 10


def test_float64_computation_for_float32_weights(generator):
    weights, _, _ = low_rank_tasks(generator, dtype=torch.float32)
    single = joint_tucker(weights, rank=(8, 6))
    double = joint_tucker(weights, rank=(8, 6), dtype=F64)
    assert double.U.dtype == double.cores.dtype == torch.float32
    # The float32 weights are exactly low rank only up to their rounding (~1e-7 relative).
    assert float(double.errors.max()) < 1e-6
    assert float(single.errors.max()) < 1e-5
    torch.testing.assert_close(single.errors, relative_errors(weights, single.reconstruct()))


def test_half_precision_weights_come_back_in_half(generator):
    weights = torch.randn(2, 16, 8, 3, 3, generator=generator).half()
    jt = joint_tucker(weights, rank=(4, 4))
    assert jt.U.dtype == jt.V.dtype == jt.cores.dtype == jt.reconstruct().dtype == torch.float16


def test_all_zero_weights_have_zero_error():
    jt = joint_tucker(torch.zeros(2, 6, 5, 3, 3), rank=(2, 2))
    assert torch.equal(jt.errors, torch.zeros(2, dtype=F64))
    assert torch.equal(jt.reconstruct(), torch.zeros(2, 6, 5, 3, 3))


def test_joint_spectrum_is_the_stacked_unfoldings_energy(generator):
    weights = torch.randn(3, 12, 7, 3, 3, generator=generator, dtype=F64)
    eig_out, eig_in = joint_spectrum(weights)
    assert eig_out.shape == (12,) and eig_in.shape == (7,)
    assert bool((eig_out[:-1] >= eig_out[1:]).all()) and bool((eig_in >= 0).all())
    mode1 = weights.permute(1, 0, 2, 3, 4).reshape(12, -1)
    mode2 = weights.permute(2, 0, 1, 3, 4).reshape(7, -1)
    torch.testing.assert_close(eig_out, torch.linalg.svdvals(mode1) ** 2)
    torch.testing.assert_close(eig_in, torch.linalg.svdvals(mode2) ** 2)
    torch.testing.assert_close(eig_out.sum(), weights.norm() ** 2)
    # Grams of >= 256 rows are formed by blocks.
    big = torch.randn(2, 256, 130, generator=generator, dtype=F64)
    eig_out, _ = joint_spectrum(big)
    torch.testing.assert_close(eig_out, torch.linalg.svdvals(big.transpose(0, 1).reshape(256, -1)) ** 2)
    # A wide matrix: its mode-1 spectrum has C nonzero eigenvalues, then S - C zeros.
    eig_out, eig_in = joint_spectrum([weights[0, :, :, 0, 0]])
    s = torch.linalg.svdvals(weights[0, :, :, 0, 0])
    torch.testing.assert_close(eig_out, torch.cat([s**2, torch.zeros(5, dtype=F64)]))
    torch.testing.assert_close(eig_in, s**2)


W = torch.ones(2, 8, 6, 3, 3)


@pytest.mark.parametrize(
    ("weights", "rank", "kw", "error", "match"),
    [
        (W, (9, 2), {}, ValueError, r"rank: R1=9 is outside \[1, 8\] for a weight with S=8 output"),
        (W, (2, 0), {}, ValueError, r"rank: R2=0 is outside \[1, 6\] for a weight with C=6 input"),
        (W, 7, {}, ValueError, r"R2=7 is outside \[1, 6\]"),
        (W, (2, 2, 2), {}, ValueError, r"expected a pair \(R1, R2\); got \(2, 2, 2\), 3 values"),
        (W, 2.5, {}, TypeError, r"rank: expected an int or a pair of ints .*got 2.5 \(float\)"),
        (W, (2, True), {}, TypeError, r"rank: R2 must be an int; got True \(bool\)"),
        (W[0], 2, {}, ValueError, r"expected T x S x C x kh x kw \(5-D\).*got a 4-D tensor"),
        ([W[0], W[1, :4]], 2, {}, ValueError, r"weights\[1\] has shape \(4, 6, 3, 3\) but weights"),
        ([W[0, :, :, 0]], 2, {}, ValueError, r"weights\[0\]: expected .*got a 3-D tensor"),
        ([], 2, {}, ValueError, r"weights: got an empty sequence"),
        (torch.ones(0, 8, 6), 2, {}, ValueError, r"got shape \(0, 8, 6\), which has a zero-sized"),
        (W.int(), 2, {}, TypeError, r"expected floating-point tensors .*torch.int32"),
        ("W", 2, {}, TypeError, r"weights: expected a Tensor or a sequence of Tensors; got str"),
        (W, 2, {"n_iter_max": -1}, ValueError, r"n_iter_max: expected an int >= 0; got -1"),
        (W, 2, {"n_iter_max": 2.5}, TypeError, r"n_iter_max: expected an int; got 2.5"),
        (W, 2, {"tol": -1e-3}, ValueError, r"tol: expected a finite number >= 0; got -0.001"),
        (W, 2, {"tol": "0"}, TypeError, r"tol: expected a number; got '0' \(str\)"),
        (W, 2, {"dtype": torch.float16}, ValueError, r"dtype: expected None, .*got torch.float16"),
    ],
)
def test_bad_inputs_are_rejected(weights, rank, kw, error, match):
    with pytest.raises(error, match=match):
        joint_tucker(weights, rank, **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(bad):
    weights = torch.ones(3, 8, 6, 3, 3)
    weights[2, 1, 1, 0, 0] = bad
    with pytest.raises(ValueError, match=r"task 2 has 1 non-finite entries .* out of 432"):
        joint_tucker(weights, 2)
    with pytest.raises(ValueError, match=r"task 2 has 1 non-finite"):
        joint_spectrum(weights)


def test_tucker2_takes_one_weight(generator):
    weight = torch.randn(8, 6, 3, 3, generator=generator, dtype=F64)
    single = tucker2(weight, (3, 2))
    joint = joint_tucker(weight.unsqueeze(0), (3, 2))
    assert torch.equal(single.cores, joint.cores) and single.cores.shape == (1, 3, 2, 3, 3)
    with pytest.raises(ValueError, match=r"weight: expected S x C x kh x kw .*got a 3-D tensor"):
        tucker2(weight[0], 2)


def test_numpy_integer_ranks_are_accepted(generator):
    weights = torch.randn(2, 8, 6, generator=generator, dtype=F64)
    ranks = np.array([3, 2])
    assert joint_tucker(weights, (ranks[0], ranks[1])).cores.shape == (2, 3, 2)
