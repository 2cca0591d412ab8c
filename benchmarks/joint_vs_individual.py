"""J-Tucker against individual Tucker and hard sharing, after the same fine-tuning.

Scenario ``resnet20`` (the default, ``recipes/cifar10-split-resnet20.yaml`` at benchmark
sizes): three tasks, vehicles (4 CIFAR-10 classes), animals (the other 6) and Fashion-MNIST
(32 x 32, 3 channels), each a ResNet-20 fine-tuned per task from the pretrained CIFAR-10
weights. Scenario ``vgg``: the same tasks from a width-reduced VGG-16-BN that this script first
trains on CIFAR-10 (cached in ``--work-dir``).

Protocol, for every method the same training:

1. The task models: the backbone fine-tuned per task (``--base-epochs``).
2. The reference: those dense models after the recovery fine-tune below (per task), so that no
   method looks better merely for having trained longer. The accuracy drop of a method is
   ``mean over tasks of (reference - method)`` in percentage points (pp).
3. Each compressed bundle gets one recovery fine-tune of ``--finetune-epochs`` epochs of exactly
   ``steps`` batches per task (``steps`` = the smallest task's batches per epoch): jointly
   (every step one batch of each task, shared parts summing the gradients) for J-Tucker and
   hard sharing, per task for individual Tucker. Same optimiser, learning rate and seed.

Methods: ``jtucker`` (``decompose_bundle(joint=True)``, budget strategy, a fraction of the
decomposed layers' dense parameters of all tasks), ``tucker`` (``joint=False``: each task alone
at the same fraction of its own layers), ``share`` (``hard_share``, mean initialisation, first
conv, batch norm and heads per task; the scenario's ``share_variants`` keep more layers per task
for points of lower ratio) and ``share+tucker`` (hard sharing, then Tucker-2 of the
one shared copy of each layer at a budget fraction of that copy, then the joint fine-tune).
Layers with fewer than ``defaults.DECOMPOSE_MIN_PARAMS`` weights (the first conv) stay dense.

Compression ratio = the tasks' dense parameters summed / the bundle's unique parameters (batch
norm and heads included). "CR at <= 1 pp": the largest measured ratio whose mean drop is at
most 1 pp (``best``), and the ratio where the curve, anchored at the dense point (1x, 0 pp),
crosses 1 pp, linearly interpolated in log(ratio) between the two measured points around the
last crossing (``interp``).

Output under ``--out`` (default ``benchmarks/results``), named
``joint_vs_individual-<scenario>[-quick]-pt<torch>-cpu``: ``.csv`` (one row per point: scenario,
method, budget, kept_per_task (extra keep_per_task patterns of a partial hard sharing),
compression_ratio, unique_parameters, dense_parameters, init_error (mean
relative weight error right after decomposition / distance to the shared mean), acc_<task>,
mean_accuracy, mean_drop_pp, finetune_steps_per_task, seconds (compression and fine-tune,
evaluation excluded)), ``.json`` (summary and
environment) and ``.png`` (mean drop against compression ratio).

Run: ``python benchmarks/joint_vs_individual.py --data-dir /work/shared/data [--quick]
[--scenario vgg] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from common import log, write_results  # noqa: E402  (same folder: run as a script)

from jtucker_plugin import defaults  # noqa: E402
from jtucker_plugin.data import DataSpec, TaskData, load_task_data  # noqa: E402
from jtucker_plugin.decompose.apply import (  # noqa: E402
    decompose_bundle,
    decompose_layers,
    find_layers,
    layer_infos,
)
from jtucker_plugin.decompose.budget import Budget, BudgetConfig  # noqa: E402
from jtucker_plugin.decompose.ranks import select_ranks  # noqa: E402
from jtucker_plugin.merge import hard_share  # noqa: E402
from jtucker_plugin.metrics import count_parameters  # noqa: E402
from jtucker_plugin.models import create_model  # noqa: E402
from jtucker_plugin.multitask import Bundle, TaskInfo  # noqa: E402
from jtucker_plugin.train import FitConfig, evaluate, fit  # noqa: E402

CIFAR = "cifar10-jpeg-imagefolder.tar.gz"
RESNET20_WEIGHTS = "weights/resnet20-12fca82f.th"
LIMIT_PP = 1.0
# The summary also gives the ratios at these looser drops: where the methods' order changes.
OTHER_LIMITS_PP = (2.0, 5.0)
_OVERRIDES = ("train_per_class", "test_per_class", "base_epochs", "finetune_epochs", "seed")


@dataclass(frozen=True)
class Settings:
    """Sizes and schedules of one run."""

    train_per_class: int = 300
    test_per_class: int = 200
    base_epochs: int = 3
    base_lr: float = 0.02
    finetune_epochs: int = 2
    finetune_lr: float = 0.01
    batch_size: int = 64
    # params fractions; a few epochs of recovery reach ~1 pp only at mild budgets, so the sweep
    # is denser there
    budgets: tuple[float, ...] = (0.8, 0.65, 0.5, 0.35, 0.2)
    share_tucker_budgets: tuple[float, ...] = (0.7, 0.4)
    # vgg scenario: the backbone trained on CIFAR-10 first
    vgg_width: float = 0.25
    pretrain_per_class: int = 1000
    pretrain_epochs: int = 15
    seed: int = 0


QUICK = Settings(
    train_per_class=100,
    test_per_class=50,
    base_epochs=1,
    finetune_epochs=1,
    budgets=(0.5, 0.2),
    share_tucker_budgets=(0.5,),
    pretrain_per_class=100,
    pretrain_epochs=2,
)


@dataclass(frozen=True)
class Scenario:
    arch: str
    width: float = 1.0
    weights: str | None = None  # relative to the data folder; None: pretrain on CIFAR-10
    # per task in every hard-sharing point: the first conv (besides batch norm and heads)
    keep_per_task: tuple[str, ...] = ()
    # hard sharing's curve: more layers kept per task, from none to all but the last ones
    share_variants: tuple[tuple[str, ...], ...] = ((),)


SCENARIOS = {
    "resnet20": Scenario(
        "resnet20",
        weights=RESNET20_WEIGHTS,
        keep_per_task=("conv1",),
        share_variants=(
            (),
            ("layer1", "layer2"),
            ("layer1", "layer2", "layer3.0"),
            ("layer1", "layer2", "layer3.0", "layer3.1"),
        ),
    ),
    "vgg": Scenario(
        "vgg16_bn",
        keep_per_task=("features.0",),
        share_variants=(
            (),
            ("features.[0-9]", "features.1[0-9]", "features.2[0-6]"),  # share from features.27
            ("features.[0-9]", "features.[12][0-9]", "features.3[0-3]"),  # the last block only
        ),
    ),
}


def task_specs(s: Settings) -> dict[str, DataSpec]:
    caps = {"train_per_class": s.train_per_class, "test_per_class": s.test_per_class}
    return {
        "vehicles": DataSpec(
            dataset="imagefolder", path=CIFAR, classes=["airplane", "automobile", "ship", "truck"], **caps
        ),
        "animals": DataSpec(
            dataset="imagefolder", path=CIFAR, classes=["bird", "cat", "deer", "dog", "frog", "horse"], **caps
        ),
        "fashion": DataSpec(dataset="fashionmnist", root=".", image_size=32, channels=3, **caps),
    }


def pretrain_vgg(scenario: Scenario, s: Settings, data_dir: Path, work_dir: Path) -> Path:
    """The width-reduced VGG-16-BN trained on all of CIFAR-10 (cached by settings)."""
    name = f"vgg16_bn-w{s.vgg_width}-{s.pretrain_per_class}pc-{s.pretrain_epochs}ep-s{s.seed}"
    path = work_dir / f"{name}.safetensors"
    if path.is_file():
        log(f"backbone: cached {path}")
        return path
    from safetensors.torch import save_file

    spec = DataSpec(
        dataset="imagefolder",
        path=CIFAR,
        train_per_class=s.pretrain_per_class,
        test_per_class=s.test_per_class,
    )
    data = load_task_data(spec, data_dir, seed=s.seed, cache_dir=work_dir / "cache")
    model = create_model(scenario.arch, 10, width=s.vgg_width, seed=s.seed)
    start = time.perf_counter()
    config = FitConfig(epochs=s.pretrain_epochs, lr=0.05, batch_size=s.batch_size)
    fit({"cifar10": model}, {"cifar10": data}, config, seed=s.seed)
    accuracy = evaluate(model, data.test)["accuracy"]
    log(f"backbone: CIFAR-10 test accuracy {accuracy:.4f} after {time.perf_counter() - start:.0f} s")
    work_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def base_bundle(scenario: Scenario, s: Settings, data: dict[str, TaskData], weights: Path) -> Bundle:
    models, info = {}, {}
    width = s.vgg_width if scenario.weights is None else scenario.width
    for task, d in data.items():
        model = create_model(scenario.arch, d.num_classes, width=width, weights=weights, seed=s.seed)
        models[task] = model
        info[task] = TaskInfo(
            arch=scenario.arch,
            num_classes=d.num_classes,
            width=width,
            input_shape=d.input_shape,
            dense_parameters=count_parameters(model),
        )
    return Bundle(models, info)


def accuracies(
    models: dict[str, torch.nn.Module], data: dict[str, TaskData], split: str = "test"
) -> dict[str, float]:
    """Each task model's accuracy on its task's ``split`` (``test`` or ``val``)."""
    return {t: evaluate(m, getattr(data[t], split))["accuracy"] for t, m in models.items()}


def budget_select(fraction: float) -> Callable:
    config = BudgetConfig(budget=Budget(params=fraction))
    return lambda infos, _evaluate: select_ranks(config, infos)


def mean_error(rows: dict[str, Any]) -> float:
    errors = [e for row in rows.values() for e in row.get("errors", [])]
    return sum(errors) / len(errors) if errors else 0.0


def jtucker(bundle: Bundle, budget: float, keep: list[str]) -> float:
    rows = decompose_bundle(
        bundle, budget_select(budget), joint=True, min_params=defaults.DECOMPOSE_MIN_PARAMS
    )["layers"]
    return mean_error(rows)


def tucker(bundle: Bundle, budget: float, keep: list[str]) -> float:
    rows = decompose_bundle(
        bundle, budget_select(budget), joint=False, min_params=defaults.DECOMPOSE_MIN_PARAMS, stage="tucker"
    )["layers"]
    return mean_error(rows)


def share(bundle: Bundle, budget: float | None, keep: list[str]) -> float:
    report = hard_share(bundle, init="mean", keep_per_task=keep)
    distances = [d for row in report["layers"].values() for d in row["relative_distance"].values()]
    return sum(distances) / len(distances)


def share_tucker(bundle: Bundle, budget: float, keep: list[str]) -> float:
    """Hard sharing, then Tucker-2 of the one shared copy of each layer (T = 1)."""
    report = hard_share(bundle, init="mean", keep_per_task=keep)
    first = bundle.tasks[0]
    model = bundle.models[first]
    # find_layers on one model: the shared layers count as that model's own.
    names, _ = find_layers({first: model}, min_params=defaults.DECOMPOSE_MIN_PARAMS)
    names = [n for n in names if n in report["layers"]]
    infos = layer_infos({first: model}, names, bundle.info[first].input_shape)
    rows = decompose_layers(
        {first: model}, infos, select_ranks(BudgetConfig(budget=Budget(params=budget)), infos)
    )
    for task in bundle.tasks[1:]:
        for name in names:
            bundle.models[task].set_submodule(name, model.get_submodule(name))
    return mean_error(rows)


METHODS: dict[str, tuple[Callable, bool]] = {
    # name: (compress(bundle, budget, keep_per_task) -> init error, joint fine-tune)
    "jtucker": (jtucker, True),
    "tucker": (tucker, False),
    "share": (share, True),
    "share+tucker": (share_tucker, True),
}


def ratio_at_drop(points: list[tuple[float, float]], limit: float = LIMIT_PP) -> dict[str, float | None]:
    """``best``: the largest measured ratio within ``limit`` pp; ``interp``: the last crossing."""
    meeting = [cr for cr, drop in points if drop <= limit]
    curve = sorted([(1.0, 0.0), *points])
    interp = None
    for (c0, d0), (c1, d1) in zip(curve, curve[1:], strict=False):
        if d0 <= limit < d1:
            f = (limit - d0) / (d1 - d0)
            interp = math.exp(math.log(c0) + f * (math.log(c1) - math.log(c0)))
    if curve[-1][1] <= limit:
        interp = curve[-1][0]  # never crosses within the measured range
    return {"best": max(meeting) if meeting else None, "interp": interp}


def task_models(
    scenario: Scenario, s: Settings, data_dir: Path, work_dir: Path
) -> tuple[dict[str, TaskData], Bundle]:
    """Every task's data and the task models: the backbone fine-tuned on each task."""
    data = {
        t: load_task_data(spec, data_dir, seed=s.seed, cache_dir=work_dir / "cache")
        for t, spec in task_specs(s).items()
    }
    log("data: " + ", ".join(f"{t} {len(d.train)} train / {len(d.test)} test" for t, d in data.items()))
    if scenario.weights is not None:
        weights = data_dir / scenario.weights
    else:
        weights = pretrain_vgg(scenario, s, data_dir, work_dir)
    base = base_bundle(scenario, s, data, weights)
    t0 = time.perf_counter()
    fit(
        base.models, data, FitConfig(epochs=s.base_epochs, lr=s.base_lr, batch_size=s.batch_size), seed=s.seed
    )
    log(f"task models: {fmt(accuracies(base.models, data))} ({time.perf_counter() - t0:.0f} s)")
    return data, base


def run(args: argparse.Namespace) -> None:
    s = QUICK if args.quick else Settings()
    if args.budgets:
        s = replace(s, budgets=tuple(args.budgets))
    overrides = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    s = replace(s, **overrides)
    methods = list(METHODS) if args.methods is None else args.methods
    scenario = SCENARIOS[args.scenario]
    data_dir = args.data_dir.resolve()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    version = torch.__version__.split("+")[0]
    seeded = f"-seed{s.seed}" if s.seed else ""
    tag = f"joint_vs_individual-{args.scenario}{seeded}{'-quick' if args.quick else ''}-pt{version}-cpu"
    log(f"{tag}: settings {s}, threads {args.threads}")

    data, base = task_models(scenario, s, data_dir, args.work_dir)
    base_acc = accuracies(base.models, data)

    steps = min(math.ceil(len(d.train) / s.batch_size) for d in data.values())
    recovery = FitConfig(
        epochs=s.finetune_epochs, lr=s.finetune_lr, batch_size=s.batch_size, max_batches=steps
    )
    rows: list[dict[str, Any]] = []

    def record(
        method: str,
        budget: float | None,
        kept: tuple[str, ...],
        bundle: Bundle,
        error: float,
        seconds: float,
        acc: dict[str, float],
    ) -> dict[str, Any]:
        row = {
            "scenario": args.scenario,
            "method": method,
            "budget": budget,
            "kept_per_task": "+".join(kept),
            "compression_ratio": round(bundle.compression_ratio(), 4),
            "unique_parameters": bundle.unique_parameters(),
            "dense_parameters": bundle.dense_parameters(),
            "init_error": round(error, 5),
            **{f"acc_{t}": round(a, 4) for t, a in acc.items()},
            "mean_accuracy": round(sum(acc.values()) / len(acc), 5),
            "mean_drop_pp": round(100 * sum(ref[t] - acc[t] for t in acc) / len(acc), 3),
            "finetune_steps_per_task": s.finetune_epochs * steps,
            "seconds": round(seconds),
        }
        rows.append(row)
        log(
            f"{method:13s} budget {budget!s:5s} keep {'+'.join(kept) or '-'} "
            f"CR {row['compression_ratio']:6.2f}x  drop {row['mean_drop_pp']:+6.2f} pp  {fmt(acc)}  "
            f"({seconds:.0f} s)"
        )
        return row

    t0 = time.perf_counter()
    dense = copy.deepcopy(base)
    fit(dense.models, data, replace(recovery, joint=False), seed=s.seed)
    ref = accuracies(dense.models, data)
    record("dense", None, (), dense, 0.0, time.perf_counter() - t0, ref)

    for method in methods:
        compress, joint = METHODS[method]
        points: list[tuple[float | None, tuple[str, ...]]]
        if method == "share":
            points = [(None, extra) for extra in scenario.share_variants]
        else:
            budgets = s.share_tucker_budgets if method == "share+tucker" else s.budgets
            points = [(b, ()) for b in budgets]
        for budget, extra in points:
            t0 = time.perf_counter()
            bundle = copy.deepcopy(base)
            error = compress(bundle, budget, [*scenario.keep_per_task, *extra])
            fit(bundle.models, data, replace(recovery, joint=joint), seed=s.seed)
            seconds = time.perf_counter() - t0
            acc = accuracies(bundle.models, data)
            record(method, budget, extra, bundle, error, seconds, acc)

    summary = summarise(rows, methods)
    env = environment(args, s, started)
    write_results(
        args.out,
        tag,
        rows,
        {"summary": summary, "base_accuracy": base_acc, "reference_accuracy": ref, "environment": env},
        plot=plot_curves,
    )
    print_table(rows, summary, list(data))


def fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{t} {a:.4f}" for t, a in acc.items())


def summarise(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        points = [(r["compression_ratio"], r["mean_drop_pp"]) for r in rows if r["method"] == method]
        out[method] = ratio_at_drop(points)
        for limit in OTHER_LIMITS_PP:
            out[method][f"interp_{limit:g}pp"] = ratio_at_drop(points, limit)["interp"]
    jt, it = out.get("jtucker"), out.get("tucker")
    if jt and it:
        for key in ("best", "interp", *(f"interp_{limit:g}pp" for limit in OTHER_LIMITS_PP)):
            if jt[key] and it[key]:
                out[f"jtucker_over_tucker_{key}"] = round(jt[key] / it[key], 3)
    return out


def environment(args: argparse.Namespace, s: Settings, started: float) -> dict[str, Any]:
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, shared",
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(s).items()},
        "total_seconds": round(time.perf_counter() - started),
    }


def plot_curves(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {"jtucker": "o-", "tucker": "s--", "share": "D:", "share+tucker": "^-."}
    for ax, zoom in zip(axes, (False, True), strict=True):
        for method, style in styles.items():
            points = sorted(
                (r["compression_ratio"], r["mean_drop_pp"]) for r in rows if r["method"] == method
            )
            if points:
                ax.plot(*zip(*points, strict=True), style, label=method, markersize=7)
        ax.axhline(LIMIT_PP, color="grey", lw=0.8, ls=":", label=f"{LIMIT_PP:g} pp drop")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("compression ratio (dense parameters / unique parameters)")
        ax.grid(True, which="both", alpha=0.3)
        if zoom:
            ax.set_ylim(-1, 4 * LIMIT_PP)
            ax.set_title("zoom on the 1 pp region", fontsize=9)
        else:
            ax.set_ylabel("mean accuracy drop vs dense (pp)")
            ax.set_title(title, fontsize=9)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any], tasks: list[str]) -> None:
    head = f"{'method':13s} {'budget':>6s} {'CR':>7s} " + " ".join(f"{t:>9s}" for t in tasks)
    print("\n" + head + f" {'mean':>7s} {'drop pp':>8s} {'init err':>8s} {'s':>5s}")
    for r in rows:
        accs = " ".join(f"{100 * r[f'acc_{t}']:9.2f}" for t in tasks)
        budget = "" if r["budget"] is None else f"{r['budget']:g}"
        if r["kept_per_task"]:
            budget = "part"  # partial sharing: the CSV's kept_per_task says which
        print(
            f"{r['method']:13s} {budget:>6s} {r['compression_ratio']:7.2f} {accs} "
            f"{100 * r['mean_accuracy']:7.2f} {r['mean_drop_pp']:8.2f} {r['init_error']:8.4f} "
            f"{r['seconds']:5d}"
        )
    others = " / ".join(f"interp. at {limit:g} pp" for limit in OTHER_LIMITS_PP)
    print(
        f"\ncompression ratio at <= {LIMIT_PP:g} pp mean drop: best measured / interpolated (and {others}):"
    )
    for method, value in summary.items():
        if isinstance(value, dict):
            ratios = [value["best"], value["interp"], *list(value.values())[2:]]
            print(f"  {method:13s} " + " / ".join(f"{r:.2f}x" if r else "none" for r in ratios))
        else:
            print(f"  {method}: {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("JTUCKER_DATA", shared)))
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="resnet20")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of minutes")
    parser.add_argument("--budgets", type=float, nargs="+", help="override the params fractions")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all")
    for name in _OVERRIDES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="override the setting")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a loaded 2-core machine 2 threads were slower)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/tmp/jtucker-bench"),
        help="caches: decoded images, the vgg scenario's CIFAR-10 backbone",
    )
    args = parser.parse_args(argv)
    if not (args.data_dir / CIFAR).is_file():
        parser.error(f"--data-dir: {args.data_dir} has no {CIFAR}")
    run(args)


if __name__ == "__main__":
    main()
