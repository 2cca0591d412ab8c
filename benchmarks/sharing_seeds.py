"""Runs of ``benchmarks/sharing.py`` on several seeds, pooled: each point's drops averaged over
the runs, and the points selected on the mean validation drop.

Every run must have a validation split (``--val-per-class``). A point (method and setting) is
pooled over the runs that all measured it. For each ratio (parameters, bytes, int8 bytes) a
method's selected point is its largest ratio whose validation drop, averaged over the runs, is
at most 1 pp; its test drop, averaged the same way, is what it costs. The pooled points go
through ``sharing.summarise``, so the targets of issue 6 are checked as for one run (``selected``),
on the mean drops.

Sampling noise: with validation half of the test images (``--val-per-class 500`` of 1000), the
validation and test splits are disjoint random halves of the same images, scored on the same
models, so ``validation drop - test drop`` is the difference of two
sampling errors, zero on average. Its root mean square over the points is sqrt(2) times one
half's error, and the whole test split's error is half that root mean square. The points of one
run share their dense reference and their images, so their differences move together: the
estimate rests on about as many independent draws as there are runs.

Run: ``python benchmarks/sharing_seeds.py RESULT.csv [RESULT.csv ...]`` (one per seed).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from sharing import drop_column, print_summary, summarise  # noqa: E402

UNITS = ("params", "bytes", "int8_bytes")


def read_run(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(method, setting): row}`` of one run, numbers as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    needed = ("mean_drop_val_pp", "mean_drop_pp", "cr_params", "cr_bytes")
    for column in needed:
        if not rows or column not in rows[0]:
            raise SystemExit(
                f"{path}: no column {column!r}; expected a run of benchmarks/sharing.py with --val-per-class"
            )
    out = {}
    for row in rows:
        key = (row["method"], row["setting"])
        out[key] = {k: (float(v) if k.startswith(("cr_", "mean_drop")) and v else v) for k, v in row.items()}
    return out


def pool(runs: list[dict[tuple[str, str], dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per point measured in every run: the ratios (the smallest over runs: escape bytes
    differ a little) and the drops, per run and averaged."""
    keys = [k for k in runs[0] if all(k in run for run in runs[1:])]
    pooled = []
    for key in keys:
        rows = [run[key] for run in runs]
        point: dict[str, Any] = {"method": key[0], "setting": key[1]}
        for unit in UNITS:
            if all(r.get(f"cr_{unit}", "") != "" for r in rows):
                point[f"cr_{unit}"] = min(r[f"cr_{unit}"] for r in rows)
            for split in ("val", "test"):
                column = drop_column(unit, split)
                if all(r.get(column, "") != "" for r in rows):
                    point[f"runs_{column}"] = [r[column] for r in rows]
                    point[column] = statistics.fmean(point[f"runs_{column}"])
        pooled.append(point)
    return pooled


def half_split_noise(runs: list[dict[tuple[str, str], dict[str, Any]]]) -> tuple[int, float]:
    """Points compared and the root mean square of their ``validation - test`` drop."""
    gaps = [
        row["mean_drop_val_pp"] - row["mean_drop_pp"]
        for run in runs
        for key, row in run.items()
        if key[0] != "dense"
    ]
    return len(gaps), math.sqrt(statistics.fmean(g * g for g in gaps)) if gaps else math.nan


def report(paths: list[Path]) -> None:
    runs = [read_run(p) for p in paths]
    points = pool(runs)
    print(f"{len(runs)} runs: " + ", ".join(p.name for p in paths))
    print(
        f"\n{'method':16s} {'setting':24s} {'CR par':>7s} {'CR byte':>7s} {'int8 CR':>7s} "
        f"{'val drop':>8s} {'test drop':>9s} {'int8 val':>8s} {'int8 test':>9s}"
        "  test drop per run, in the order given"
    )
    for p in points:
        cells = [
            f"{p[c]:{w}.2f}" if c in p else " " * w
            for c, w in (
                ("cr_params", 7),
                ("cr_bytes", 7),
                ("cr_int8_bytes", 7),
                ("mean_drop_val_pp", 8),
                ("mean_drop_pp", 9),
                ("mean_drop_int8_val_pp", 8),
                ("mean_drop_int8_pp", 9),
            )
        ]
        per_run = " ".join(f"{d:+.2f}" for d in p["runs_mean_drop_pp"])
        print(f"{p['method']:16s} {p['setting'][:24]:24s} " + " ".join(cells) + f"  {per_run}")
    methods = list(dict.fromkeys(p["method"] for p in points if p["method"] != "dense"))
    print_summary(summarise(points, methods))
    n, spread = half_split_noise(runs)
    print(
        f"\nvalidation - test drop over {n} points of {len(runs)} runs: root mean square {spread:.2f} pp;"
        f" so one drop on the whole test split carries about {spread / 2:.2f} pp of sampling noise"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="csv files of sharing.py, one per seed")
    args = parser.parse_args(argv)
    for path in args.results:
        if not path.is_file():
            parser.error(f"results: no such file: {path}")
    report(args.results)


if __name__ == "__main__":
    main()
