"""Speed of the joint Tucker-2 (J-Tucker) against tensorly's partial_tucker on VGG-16 layers.

Both decompose the same stacked float32 tensor T x S x C x 3 x 3 on its two channel modes, at
the same ranks, from the same HOSVD start, for the same number of HOOI sweeps: ours with
``n_iter_max=N, tol=0``; tensorly with ``n_iter_max=N, tol=0``, which its loop reads as "no
early stop" (``if tol and ...``), so it also runs exactly N sweeps, each updating both factors
(checked on every run). tensorly's start also takes the SVD of the mode-1 unfolding, which its
first sweep discards; ours skips that product, with the same result. Times cover the
decomposition only (the reconstructions for the errors are made outside them). The two run
alternately in one process, the order swapped every round, because the machine is shared and
noisy: compare the ratios more than the absolute times.

Columns: median wall times, the ratio of the medians (and the median of the per-round
ratios), the total relative error ``||X - X^|| / ||X||`` of each, computed the same way in
float64 from the reconstructions, and their relative difference; then the matmul work our
method does (init Gram + per sweep two projections and two Grams + the core, in GFLOP; each
Gram's lower triangle only, by blocks, as eigh reads no more), the rate it achieved, and the
time that work would take at the rate of one large matmul measured in the same process (the
bound a Gram formulation cannot beat; the rest is eigh and copies).

Weights are synthetic (no VGG-16 checkpoint is available offline): ``structured`` are T
fine-tuned copies of one base kernel with decaying channel spectra, ``gaussian`` are i.i.d.
(flat spectrum, tiny eigengaps: the hardest case for the precision of a float32 Gram).

Run: ``python benchmarks/decompose_speed.py [--repeats 5] [--quick] [--profile] [--threads N]``.
``--profile`` adds the top operators of one run of each on the first layer: with its cores to
itself, ours is mostly matmuls (about 3/4) and eigh; on an oversubscribed machine the
eigensolver takes over (LAPACK's many small parallel steps stall whenever one of their threads
is descheduled), as the SVD does tensorly's. ``--threads 1`` gives the steadiest ratios there.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from jtucker_plugin.decompose.tucker import joint_tucker  # noqa: E402

# (name, T, S, C, R1, R2): VGG-16's 3x3 conv shapes, T = 3 tasks, ranks a quarter of the channels.
FULL_CASES = [
    ("conv5_x 512x512", 3, 512, 512, 128, 128),
    ("conv4_1 512x256", 3, 512, 256, 128, 64),
    ("conv3_x 256x256", 3, 256, 256, 64, 64),
]
QUICK_CASES = [
    ("conv3_x 256x256", 3, 256, 256, 64, 64),
    ("conv2_x 128x128", 3, 128, 128, 32, 32),
]
KERNEL = 3


def make_weights(kind: str, n_tasks: int, n_out: int, n_in: int, seed: int) -> torch.Tensor:
    """T x S x C x 3 x 3 float32 weights of the given kind, He-scaled."""
    g = torch.Generator().manual_seed(seed)
    shape = (n_out, n_in, KERNEL, KERNEL)
    if kind == "gaussian":
        weights = torch.randn(n_tasks, *shape, generator=g)
    else:
        # One base kernel whose channel energies decay like a trained layer's, plus a
        # per-task change of 20% of its norm (fine-tuned copies of one pretrained model).
        decay_out = torch.arange(1, n_out + 1, dtype=torch.float32) ** -0.7
        decay_in = torch.arange(1, n_in + 1, dtype=torch.float32) ** -0.7
        base = torch.randn(*shape, generator=g) * decay_out[:, None, None, None]
        base = base * decay_in[None, :, None, None]
        noise = torch.randn(n_tasks, *shape, generator=g)
        weights = base + 0.2 * noise * (base.norm() / noise[0].norm())
    return weights * (2.0 / (n_in * KERNEL**2)) ** 0.5 / weights.std()


def ours(weights: torch.Tensor, ranks: tuple[int, int], n_iter: int) -> Callable[[], Tensor]:
    """Decompose; return how to reconstruct (outside the timed part)."""
    result = joint_tucker(weights, ranks, n_iter_max=n_iter, tol=0)
    if result.n_iter != n_iter:
        raise RuntimeError(f"joint_tucker ran {result.n_iter} sweeps, expected {n_iter}")
    return result.reconstruct


def theirs(weights: torch.Tensor, ranks: tuple[int, int], n_iter: int) -> Callable[[], Tensor]:
    """Decompose; return how to reconstruct (outside the timed part)."""
    with tl.backend_context("pytorch"):
        (core, factors), errors = partial_tucker(
            weights, rank=list(ranks), modes=[1, 2], init="svd", n_iter_max=n_iter, tol=0
        )
    if len(errors) != n_iter:
        raise RuntimeError(f"partial_tucker ran {len(errors)} sweeps, expected {n_iter}")
    return lambda: torch.einsum("trqhw,sr,cq->tschw", core, factors[0], factors[1])


def gram_gflop(n: int, m: int) -> float:
    """Multiply-adds x 2 / 1e9 of an n x n Gram of an n x m matrix as joint_tucker forms it.

    Only the lower triangle, by min(4, n // 128) row blocks (``tucker._lower_gram``), when m >= n;
    otherwise the m x m Gram instead.
    """
    n, m = min(n, m), max(n, m)
    blocks = min(4, n // 128)
    share = (blocks + 1) / (2 * blocks) if blocks > 1 else 1.0
    return 2 * n * n * m * share / 1e9


def matmul_gflop(n_tasks: int, n_out: int, n_in: int, r1: int, r2: int, n_iter: int) -> float:
    """GFLOP of joint_tucker's matmuls: init Gram, sweeps (projections, Grams), core."""
    taps = n_tasks * KERNEL**2
    init = gram_gflop(n_in, taps * n_out)
    projections = 2 * taps * n_out * n_in * (r1 + r2) / 1e9
    grams = gram_gflop(n_out, taps * r2) + gram_gflop(n_in, taps * r1)
    core = 2 * taps * r1 * n_in * r2 / 1e9
    return init + n_iter * (projections + grams) + core


def matmul_rate(n_tasks: int, n_out: int, n_in: int, repeats: int) -> float:
    """GFLOP/s of the largest matmul joint_tucker runs (the init Gram), median of ``repeats``."""
    rows = torch.randn(n_out * n_tasks * KERNEL**2, n_in)
    rows.T @ rows
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows.T @ rows
        times.append(time.perf_counter() - start)
    return 2 * rows.shape[0] * n_in**2 / statistics.median(times) / 1e9


def total_error(weights: torch.Tensor, approx: torch.Tensor) -> float:
    w = weights.double()
    return float((w - approx.double()).norm() / w.norm())


def run_case(case, kind: str, n_iter: int, repeats: int, seed: int) -> dict:
    name, n_tasks, n_out, n_in, r1, r2 = case
    weights = make_weights(kind, n_tasks, n_out, n_in, seed)
    ranks = (r1, r2)
    # The first (untimed) run of each is the warm-up and gives the reconstruction.
    approx = {"ours": ours(weights, ranks, n_iter)(), "tensorly": theirs(weights, ranks, n_iter)()}
    times: dict[str, list[float]] = {"ours": [], "tensorly": []}
    runners = [("ours", ours), ("tensorly", theirs)]
    for i in range(repeats):
        for label, fn in runners if i % 2 == 0 else runners[::-1]:
            start = time.perf_counter()
            fn(weights, ranks, n_iter)
            times[label].append(time.perf_counter() - start)
    t_ours, t_theirs = (statistics.median(times[k]) for k in ("ours", "tensorly"))
    e_ours, e_theirs = (total_error(weights, approx[k]) for k in ("ours", "tensorly"))
    gflop = matmul_gflop(n_tasks, n_out, n_in, r1, r2, n_iter)
    peak = matmul_rate(n_tasks, n_out, n_in, repeats=max(repeats, 5))
    return {
        "layer": f"{name} r{r1}/{r2}",
        "ours_s": t_ours,
        "tl_s": t_theirs,
        "ratio": t_theirs / t_ours,
        "paired": statistics.median(t / o for t, o in zip(times["tensorly"], times["ours"], strict=True)),
        "err_ours": e_ours,
        "err_tl": e_theirs,
        "err_rel": abs(e_ours - e_theirs) / e_theirs,
        "gflop": gflop,
        "rate": gflop / t_ours,
        "peak": peak,
        "bound_s": gflop / peak,
    }


def profile_case(case, kind: str, n_iter: int, seed: int) -> None:
    """Where the time goes: the top operators of one run of each, by self CPU time."""
    name, n_tasks, n_out, n_in, r1, r2 = case
    weights = make_weights(kind, n_tasks, n_out, n_in, seed)
    for label, fn in (("ours", ours), ("tensorly", theirs)):
        fn(weights, (r1, r2), n_iter)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn(weights, (r1, r2), n_iter)
        print(f"\nprofile: {label}, {name}, {kind}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def environment() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} | {cpu} | {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()} | load {load} | torch {torch.__version__}, "
        f"tensorly {tl.__version__}, python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--n-iter", type=int, default=5, help="HOOI sweeps for both methods")
    parser.add_argument("--quick", action="store_true", help="smaller layers, 3 rounds")
    parser.add_argument(
        "--weights",
        default="structured,gaussian",
        help="comma-separated kinds of synthetic weights: structured, gaussian",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also profile the first case")
    args = parser.parse_args(argv)
    kinds = args.weights.split(",")
    unknown = sorted(set(kinds) - {"structured", "gaussian"})
    if unknown:
        parser.error(f"--weights: unknown kinds {unknown}; allowed: structured, gaussian")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    print(environment())
    print(
        f"T x S x C x 3 x 3 float32, {args.n_iter} HOOI sweeps each, {repeats} alternating "
        "rounds, median times"
    )
    header = (
        f"{'layer':<26}{'weights':<11}{'ours s':>8}{'tl s':>8}{'ratio':>7}{'paired':>7}"
        f"{'err ours':>10}{'err tl':>10}{'rel diff':>9}{'GFLOP':>7}{'GFLOP/s':>8}"
        f"{'peak':>6}{'bound s':>8}"
    )
    print(header)
    print("-" * len(header))
    for kind in kinds:
        for case in cases:
            r = run_case(case, kind, args.n_iter, repeats, args.seed)
            print(
                f"{r['layer']:<26}{kind:<11}{r['ours_s']:>8.3f}{r['tl_s']:>8.3f}"
                f"{r['ratio']:>6.1f}x{r['paired']:>6.1f}x{r['err_ours']:>10.6f}"
                f"{r['err_tl']:>10.6f}{r['err_rel']:>9.1e}{r['gflop']:>7.1f}{r['rate']:>8.0f}"
                f"{r['peak']:>6.0f}{r['bound_s']:>8.3f}",
                flush=True,
            )
    if args.profile:
        profile_case(cases[0], kinds[0], args.n_iter, args.seed)


if __name__ == "__main__":
    main()
