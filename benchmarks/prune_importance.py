"""Naive-Bayes channel importance against torch-pruning's magnitude and Taylor, same MACs cut.

Protocol, the same for every importance:

1. The pretrained CIFAR-10 ResNet-56 (``weights/resnet56-4bfd9763.th``).
2. Pruned with ``prune_bundle`` to ``--macs-target`` of its MACs (default 0.5: 2x fewer), local
   pruning in ``--steps`` steps, calibration on ``--calibration-batches`` batches of the
   CIFAR-10 JPEG training subset (the same batches for every importance). Option-A shortcuts:
   the inner channel of each block is what gets pruned.
3. Evaluated on the 1,000 lossless CIFAR-10 test images right after pruning, then after the same
   recovery fine-tune (``--finetune-epochs`` over ``--train-per-class`` JPEG training images
   per class, SGD, cosine schedule, one seed) and evaluated again.

A ``dense`` row gets the same fine-tune without pruning, so that no importance looks better for
having trained longer. Prints a Markdown table; ``--csv`` also writes it.

Run: ``python benchmarks/prune_importance.py --data-dir /work/shared/data`` (about 6 minutes of
one CPU core at the defaults; ``--threads 1`` is the default because torch's thread pool slows
to a crawl on a shared, busy machine).
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import os
import platform
import time
from pathlib import Path

import torch

from jtucker_plugin.data import DataSpec, iterate_batches, load_task_data
from jtucker_plugin.metrics import count_macs, count_parameters
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo
from jtucker_plugin.prune import prune_bundle
from jtucker_plugin.train import FitConfig, evaluate, fit

WEIGHTS = "weights/resnet56-4bfd9763.th"
JPEG = "cifar10-jpeg-imagefolder.tar.gz"
LOSSLESS = "cifar10-lossless-subset.npz"
COLUMNS = ("importance", "macs_kept", "parameters", "acc_pruned", "acc_finetuned", "prune_s", "finetune_s")


def _arguments() -> argparse.Namespace:
    default_data = os.environ.get(
        "JTUCKER_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=default_data, help="folder with the CIFAR-10 files and weights/")
    p.add_argument("--importances", nargs="+", default=["naive_bayes", "magnitude", "taylor"])
    p.add_argument("--macs-target", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=2, help="pruning steps (importance re-estimated each)")
    p.add_argument("--calibration-batches", type=int, default=2)
    p.add_argument("--probes", type=int, default=48, help="naive Bayes: channels masked for labels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="for the extracted JPEGs (default: the plugin's cache)")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    return p.parse_args()


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    root = Path(args.data_dir)
    spec = DataSpec(dataset="imagefolder", path=JPEG, train_per_class=args.train_per_class, test_per_class=1)
    train = load_task_data(spec, root, seed=args.seed, cache_dir=args.cache_dir)
    test = load_task_data(DataSpec(dataset="npz", path=LOSSLESS), root).test
    batches = iterate_batches(train.train, args.batch_size, shuffle=True, seed=args.seed)
    calibration = {"cifar10": list(itertools.islice(batches, args.calibration_batches))}
    dense = create_model("resnet56", 10, weights=root / WEIGHTS)
    dense_macs = count_macs(dense, (3, 32, 32))
    finetune = FitConfig(epochs=args.finetune_epochs, batch_size=args.batch_size, lr=args.lr)

    rows = []
    for importance in ["dense", *args.importances]:
        model = copy.deepcopy(dense)
        began = time.perf_counter()
        if importance != "dense":
            bundle = Bundle({"cifar10": model}, {"cifar10": TaskInfo(arch="resnet56", num_classes=10)})
            prune_bundle(
                bundle,
                importance,
                calibration=calibration,
                macs_target=args.macs_target,
                iterative_steps=args.steps,
                probes=args.probes,
                seed=args.seed,
            )
        pruned_s = time.perf_counter() - began
        acc_pruned = evaluate(model, test)["accuracy"]
        began = time.perf_counter()
        fit({"cifar10": model}, {"cifar10": train}, finetune, seed=args.seed)
        rows.append(
            {
                "importance": importance,
                "macs_kept": count_macs(model, (3, 32, 32)) / dense_macs,
                "parameters": count_parameters(model),
                "acc_pruned": acc_pruned,
                "acc_finetuned": evaluate(model, test)["accuracy"],
                "prune_s": pruned_s,
                "finetune_s": time.perf_counter() - began,
            }
        )
        print(f"done: {importance}", flush=True)

    cpu = platform.processor() or platform.machine()
    print(
        f"\nResNet-56, MACs target {args.macs_target}, {args.steps} steps, fine-tune "
        f"{args.finetune_epochs} epoch(s) on {len(train.train)} JPEG images; accuracy on {len(test)} "
        f"lossless test images; torch {torch.__version__}, {args.threads} thread(s), {cpu}\n"
    )
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return str(value)


if __name__ == "__main__":
    main()
