"""GA rank search against the energy and greedy-budget strategies, and prune -> Tucker (GA).

Protocol, on the pretrained CIFAR-10 ResNet-56 (``weights/resnet56-4bfd9763.th``):

1. Every conv with at least ``defaults.DECOMPOSE_MIN_PARAMS`` weights (all but the first) is
   Tucker-2 decomposed (``decompose_bundle``, one task) at ranks from one of three strategies,
   all at ``--budget``, the share of those layers' dense parameters they may keep:

   - ``budget``: the greedy allocation of the budget over the layers' spectra;
   - ``energy``: one energy threshold for every layer and mode, the largest (found by
     bisection) whose ranks fit in the budget; its search time is that bisection's;
   - ``ga``: the genetic algorithm (``--population``, ``--generations``; it starts from the
     greedy solution), fitness the accuracy right after decomposition on the JPEG training
     images held out by ``--val-fraction`` (all of them: 25 per class at the defaults; never
     the test images).

2. Accuracy on the 1,000 lossless CIFAR-10 test images right after decomposition, then after
   the same recovery fine-tune (``--finetune-epochs`` over ``--train-per-class`` JPEG training
   images per class minus the held-out ones, SGD, cosine schedule, one seed) and again.
3. The pipeline ``prune+ga``: naive-Bayes channel pruning to ``--macs-target`` of the MACs
   (``prune_bundle``, as ``benchmarks/prune_importance.py``), then Tucker at GA ranks (same
   budget, of the pruned layers), then the same single fine-tune. ``prune`` is that pipeline
   without its Tucker step and ``dense`` the model without any: both get the same fine-tune, so
   that no method looks better for having trained longer.

Columns: ``layers_kept`` (the decomposed layers' parameters after / before, the budget's
measure), ``parameters`` and ``macs`` (whole model), ``acc_before_ft`` / ``acc_finetuned``
(lossless test), ``search_s`` (rank search wall time; prune time for ``prune``),
``evaluations`` (GA fitness evaluations), ``finetune_s``.

Output: a Markdown table on stdout; ``--out`` (default ``benchmarks/results``) gets
``rank_search-resnet56[-seed<n>]-pt<torch>-cpu.csv`` and ``.json`` (environment, settings,
ranks, GA history).

Run: ``python benchmarks/rank_search.py --data-dir /work/shared/data`` (about 4 minutes of CPU
at the defaults, 11 minutes of wall time on a loaded 2-core machine; ``--threads 1`` is the
default, as torch's thread pool crawls on a shared, busy machine).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from common import write_results  # noqa: E402  (same folder: run as a script)

from jtucker_plugin import defaults  # noqa: E402
from jtucker_plugin.data import DataSpec, iterate_batches, load_task_data  # noqa: E402
from jtucker_plugin.decompose.apply import decompose_bundle  # noqa: E402
from jtucker_plugin.decompose.budget import Budget, allocate_budget  # noqa: E402
from jtucker_plugin.decompose.ranks import (  # noqa: E402
    EnergyConfig,
    LayerInfo,
    Ranks,
    select_ranks,
    tucker_params,
)
from jtucker_plugin.metrics import count_macs, count_parameters  # noqa: E402
from jtucker_plugin.models import create_model  # noqa: E402
from jtucker_plugin.multitask import Bundle, TaskInfo  # noqa: E402
from jtucker_plugin.prune import prune_bundle  # noqa: E402
from jtucker_plugin.search.ga import GAConfig, search_ranks  # noqa: E402
from jtucker_plugin.train import FitConfig, evaluate, fit  # noqa: E402

TASK = "cifar10"
WEIGHTS = "weights/resnet56-4bfd9763.th"
JPEG = "cifar10-jpeg-imagefolder.tar.gz"
LOSSLESS = "cifar10-lossless-subset.npz"
SHAPE = (3, 32, 32)
COLUMNS = (
    "method", "layers_kept", "parameters", "macs", "acc_before_ft", "acc_finetuned",
    "search_s", "evaluations", "finetune_s",
)  # fmt: skip
Select = Callable[[list[LayerInfo], Callable[[Ranks], float] | None], tuple[Ranks, dict]]


def _arguments() -> argparse.Namespace:
    default_data = os.environ.get(
        "JTUCKER_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=default_data, help="folder with the CIFAR-10 files and weights/")
    p.add_argument("--budget", type=float, default=0.5, help="share of the decomposed layers' params kept")
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--rank-step", type=int, default=4, help="GA rank grid: 1, step, 2 step, ..., full")
    p.add_argument("--workers", type=int, default=0, help="GA fitness in this many forked processes")
    p.add_argument("--macs-target", type=float, default=0.5, help="prune+ga: share of MACs kept by pruning")
    p.add_argument("--probes", type=int, default=defaults.NAIVE_BAYES_PROBES)
    p.add_argument("--train-per-class", type=int, default=250, help="JPEG images per class, before hold-out")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out: the GA's fitness data")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="for the extracted JPEGs (default: the plugin's cache)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args()


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = Path(args.data_dir)
    spec = DataSpec(
        dataset="imagefolder", path=JPEG, train_per_class=args.train_per_class, test_per_class=1,
        val_fraction=args.val_fraction,
    )  # fmt: skip
    data = load_task_data(spec, root, seed=args.seed, cache_dir=args.cache_dir)
    # All of the held-out images, never a prefix: the splits are stored sorted by class.
    calibration = data.val
    if calibration is None:
        raise ValueError(
            f"--val-fraction: expected a number in (0, 1) for the GA's fitness, got {args.val_fraction}"
        )
    test = load_task_data(DataSpec(dataset="npz", path=LOSSLESS), root).test
    dense = create_model("resnet56", 10, weights=root / WEIGHTS)
    finetune = FitConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr)
    ga = GAConfig(
        budget=Budget(params=args.budget), population=args.population, generations=args.generations,
        rank_step=args.rank_step, workers=args.workers, progress=False,
    )  # fmt: skip

    def fitness(bundle: Bundle) -> float:
        return evaluate(bundle.models[TASK], calibration)["accuracy"]

    def ga_select(infos: list[LayerInfo], evaluate_ranks: Callable[[Ranks], float] | None):
        result = search_ranks(infos, evaluate_ranks, ga, seed=args.seed)
        return result.ranks, {"evaluations": result.evaluations, "ga_history": result.history}

    def budget_select(infos: list[LayerInfo], _: Any):
        return allocate_budget(infos, args.budget, cost="params"), {}

    def energy_select(infos: list[LayerInfo], _: Any):
        energy, ranks = _energy_at_budget(infos, args.budget)
        return ranks, {"energy": energy}

    methods: dict[str, tuple[bool, Select | None]] = {
        "dense": (False, None),
        "budget": (False, budget_select),
        "energy": (False, energy_select),
        "ga": (False, ga_select),
        "prune": (True, None),
        "prune+ga": (True, ga_select),
    }
    rows, extras = [], {}
    for method, (prune, select) in methods.items():
        bundle = Bundle({TASK: copy.deepcopy(dense)}, {TASK: TaskInfo(arch="resnet56", num_classes=10)})
        row: dict[str, Any] = {"method": method, "layers_kept": 1.0, "search_s": 0.0, "evaluations": 0}
        if prune:
            began = time.perf_counter()
            batches = iterate_batches(data.train, args.batch_size, shuffle=True, seed=args.seed)
            prune_bundle(
                bundle, "naive_bayes",
                calibration={TASK: list(itertools.islice(batches, defaults.PRUNE_CALIBRATION_BATCHES))},
                macs_target=args.macs_target, iterative_steps=2, probes=args.probes, seed=args.seed,
            )  # fmt: skip
            row["search_s"] = time.perf_counter() - began
        if select is not None:
            found = _decompose(bundle, select, fitness, args.seed)
            extras[method] = found.pop("extra")
            row.update(found)
        model = bundle.models[TASK]
        row["acc_before_ft"] = evaluate(model, test)["accuracy"]
        began = time.perf_counter()
        fit({TASK: model}, {TASK: data}, finetune, seed=args.seed)
        row.update(
            finetune_s=time.perf_counter() - began,
            acc_finetuned=evaluate(model, test)["accuracy"],
            parameters=count_parameters(model),
            macs=count_macs(model, SHAPE),
        )
        rows.append(row)
        print(f"done: {method} ({time.perf_counter() - started:.0f} s)", flush=True)

    env = _environment(args, started)
    print(
        f"\nResNet-56, Tucker-2 at {args.budget:g} of the decomposed layers' parameters; GA "
        f"population {args.population}, {args.generations} generations, fitness on "
        f"{len(calibration)} held-out JPEG images; prune: naive Bayes to {args.macs_target:g} of "
        f"the MACs; fine-tune {args.finetune_epochs} epoch(s) on {len(data.train)} JPEG images; "
        f"accuracy on {len(test)} lossless test images.\n{env['command']}; {env['machine']}; "
        f"torch {env['torch']}, {args.threads} thread(s); {env['date']}\n"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    seed = f"-seed{args.seed}" if args.seed else ""
    tag = f"rank_search-resnet56{seed}-pt{torch.__version__.split('+')[0]}-cpu"
    write_results(args.out, tag, [{c: r.get(c) for c in COLUMNS} for r in rows], {**env, **extras})


def _decompose(
    bundle: Bundle, select: Select, fitness: Callable[[Bundle], float], seed: int
) -> dict[str, Any]:
    """Decompose in place at the ranks ``select`` picks; the budget's measure, timing, extras."""
    found: dict[str, Any] = {}

    def timed(infos: list[LayerInfo], evaluate_ranks: Callable[[Ranks], float] | None) -> Ranks:
        began = time.perf_counter()
        ranks, extra = select(infos, evaluate_ranks)
        seconds = time.perf_counter() - began
        dense = sum(info.dense_params for info in infos)
        kept = sum(min(info.dense_params, tucker_params(info, ranks[info.name])) for info in infos)
        found.update(
            layers_kept=kept / dense, search_s=seconds, evaluations=extra.get("evaluations", 0),
            extra={"ranks": {k: list(v) for k, v in ranks.items()}, **extra},
        )  # fmt: skip
        return ranks

    decompose_bundle(
        bundle, timed, joint=False, min_params=defaults.DECOMPOSE_MIN_PARAMS, evaluate=fitness, stage="tucker"
    )
    return found


def _energy_at_budget(infos: list[LayerInfo], budget: float, *, steps: int = 40) -> tuple[float, Ranks]:
    """The largest energy threshold (to ``2 ** -steps``) whose ranks keep at most ``budget``.

    A layer costs ``min(dense, Tucker)`` (the orchestrator keeps it dense when Tucker does not
    save), so the cost grows with the threshold and bisection finds it.
    """
    dense = sum(info.dense_params for info in infos)

    def ranks_and_kept(energy: float) -> tuple[Ranks, float]:
        ranks = select_ranks(EnergyConfig(energy=energy), infos)
        kept = sum(min(info.dense_params, tucker_params(info, ranks[info.name])) for info in infos)
        return ranks, kept / dense

    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        if mid > 0 and ranks_and_kept(mid)[1] <= budget:
            low = mid
        else:
            high = mid
    if low == 0:
        raise ValueError(f"energy: no threshold keeps the ranks within budget {budget}")
    return low, ranks_and_kept(low)[0]


def _environment(args: argparse.Namespace, started: float) -> dict[str, Any]:
    return {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, shared",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "total_seconds": round(time.perf_counter() - started),
    }


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)


if __name__ == "__main__":
    main()
