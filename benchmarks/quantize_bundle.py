"""Int8 (Intel Neural Compressor) on top of J-Tucker: bytes, accuracy and CPU latency of 4 forms.

    python benchmarks/quantize_bundle.py --data-dir ../shared/data       # runs / resumes the recipe
    python benchmarks/quantize_bundle.py --data-dir ../shared/data --threads 1 \\
        --dense-bundle runs/jtucker-cifar10-split-resnet20/stages/00-finetune/bundle \\
        --jtucker-bundle runs/jtucker-cifar10-split-resnet20/stages/03-finetune/bundle

The three-task scenario of ``recipes/jtucker-cifar10-split-resnet20.yaml`` (``--recipe``):
vehicles, animals and Fashion-MNIST, each a pretrained ResNet-20 fine-tuned on its task. Forms:

- ``dense_fp32``: the task models after their own fine-tune (the recipe's checkpoint after the
  last stage before ``jtucker``; ``--dense-bundle``).
- ``dense_int8``: those, static int8 through INC (``quantize_tasks``: PT2E, int8 weights per
  channel, uint8 activations per tensor, calibrated on each task's own training images).
- ``jtucker_fp32``: the J-Tucker bundle after the joint fine-tune (the recipe's final
  checkpoint; ``--jtucker-bundle``).
- ``jtucker_int8``: that bundle, static int8 the same way; shared factors quantized once.

Without ``--dense-bundle``/``--jtucker-bundle`` the recipe runs through ``run_recipe``, which
resumes after the stages whose checkpoint matches (the fingerprint includes ``data_root`` as
spelled: pass the ``--data-dir`` the checkpoints were made with, or it trains again); the
bundles are read, never written. Accuracy is on the recipe's own test sets (``load_task_data``
of its task specs and seed).

Measures. ``tensor_bytes``: the safetensors file of the form's distinct tensors (one tensor held
by several tasks counts once): what the weights cost. ``disk_bytes``: the form as written, the
bundle folder (``tensors.safetensors`` + ``manifest.json``) for fp32, the ``torch.export``
archive (``program.pt2``, graph included) for int8. ``compression`` = dense_fp32 tensor_bytes
/ the form's; ``drop_pp`` = mean accuracy of dense_fp32 - the form's, in percentage points.
Latency: eager PyTorch on CPU, per task and batch size the four forms alternate within each
repeat so machine load hits all alike; the median per task, then the mean over tasks;
``speedup`` = dense_fp32 / form. Target of issue 5: jtucker_int8 at >= 10x at <= 1 pp.

Output: the table on stdout; under ``--out`` (default ``benchmarks/results``)
``quantize_bundle-resnet20-pt<torch>-cpu.csv``, one row per form and task (task ``mean``: the
whole form) with columns form, task, accuracy, drop_pp, tensor_bytes, disk_bytes, compression,
shared_tensor_bytes (bytes of tensors several tasks use as one), latency_ms_b1, latency_ms_b32,
speedup_b1, speedup_b32; and a ``.json`` with the environment, the command, the J-Tucker
bundle's tensor bytes by part (cores, ``in_proj``, ``out_proj``, the rest) and an int8 floor
estimate for it (every distinct weight once at one byte, a float32 scale and bias per task and
output channel: what int8 could reach with the sharing kept and no format overhead).
Run from the repository root (the recipe's ``output`` is relative to it).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from common import write_results
from torch import nn

from jtucker_plugin import defaults
from jtucker_plugin.data import TaskData, load_task_data
from jtucker_plugin.metrics import model_bytes, state_bytes
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.load import Recipe, load_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.stages.quantize import calibration_batches
from jtucker_plugin.train import evaluate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "jtucker-cifar10-split-resnet20.yaml"
FORMS = ("dense_fp32", "dense_int8", "jtucker_fp32", "jtucker_int8")
BATCHES = (1, 32)
TARGET_RATIO, TARGET_DROP_PP = 10.0, 1.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def recipe_bundles(recipe: Recipe, output: Path | None) -> tuple[Path, Path]:
    """Run (resume) ``recipe``; the checkpoints before its first ``jtucker`` stage and its last.

    Raises
    ------
    ValueError
        If the recipe has no ``jtucker`` stage, or nothing before it.
    """
    names = [stage.name for stage in recipe.stages]
    if "jtucker" not in names[1:]:
        raise ValueError(
            f"--recipe {recipe.source}: expected a jtucker stage after at least one other stage "
            f"(the dense models), got stages {names}"
        )
    run_recipe(recipe, output=output, quiet=True)
    out = output or recipe.output_dir()
    dense = names.index("jtucker") - 1
    last = len(names) - 1
    # The runner's layout: <output>/stages/<NN>-<name>/bundle after each finished stage.
    return (
        out / "stages" / f"{dense:02d}-{names[dense]}" / "bundle",
        out / "stages" / f"{last:02d}-{names[last]}" / "bundle",
    )


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def shared_bytes(models: Mapping[str, nn.Module]) -> int:
    """Bytes (safetensors) of the tensors that several task models hold as one object."""
    users: dict[int, set[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for task, model in models.items():
        for tensor in model.state_dict(keep_vars=True).values():
            users.setdefault(id(tensor), set()).add(task)
            tensors[id(tensor)] = tensor
    shared = {f"t{i}": tensors[key].detach() for i, (key, u) in enumerate(users.items()) if len(u) > 1}
    return state_bytes(shared) if shared else 0


def quantized_forms(
    bundles: dict[str, Bundle], data: dict[str, TaskData], seed: int, batches: int, work: Path
) -> dict[str, dict[str, Any]]:
    """The four forms: task models, tensor and disk bytes, bytes shared by several tasks."""
    from jtucker_plugin.integrations.inc_quantize import quantize_tasks  # imports INC: seconds

    forms: dict[str, dict[str, Any]] = {}
    for kind, (bundle, path) in bundles.items():
        shapes = {t: tuple(bundle.info[t].input_shape) for t in bundle.tasks}
        forms[f"{kind}_fp32"] = {
            "models": bundle.models,
            "task_bytes": {t: model_bytes(m) for t, m in bundle.models.items()},
            "tensor_bytes": state_bytes(bundle.stored_tensors()),
            "disk_bytes": folder_bytes(path),
            "shared_tensor_bytes": shared_bytes(bundle.models),
        }
        log(f"{kind}: static int8 with Intel Neural Compressor")
        calibration = {t: calibration_batches(data[t], t, batches, 32, seed) for t in bundle.tasks}
        result = quantize_tasks(bundle.models, "int8_static", shapes, calibration=calibration)
        program = result.save(work / f"{kind}_int8.pt2")
        forms[f"{kind}_int8"] = {
            "models": result.models,
            "task_bytes": {t: state_bytes(result.task_tensors(t)) for t in bundle.tasks},
            "tensor_bytes": state_bytes(result.stored_tensors()),
            "disk_bytes": program.stat().st_size,
            "shared_tensor_bytes": shared_bytes(result.models),
        }
    return {name: forms[name] for name in FORMS}


@torch.inference_mode()
def latencies(
    forms: dict[str, dict[str, Any]], shapes: dict[str, tuple[int, ...]], repeats: int, warmup: int
) -> dict[tuple[str, str, int], float]:
    """(form, task, batch) -> median ms; the forms alternate within each repeat."""
    out = {}
    for task, shape in shapes.items():
        models = {name: form["models"][task].eval() for name, form in forms.items()}
        for batch in BATCHES:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            for _ in range(warmup):
                for model in models.values():
                    model(x)
            times: dict[str, list[float]] = {name: [] for name in models}
            for _ in range(repeats):
                for name, model in models.items():
                    start = time.perf_counter()
                    model(x)
                    times[name].append((time.perf_counter() - start) * 1e3)
            for name, values in times.items():
                out[name, task, batch] = statistics.median(values)
        log(f"{task}: latency measured")
    return out


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    os.environ["JTUCKER_DATA"] = str(args.data_dir)
    recipe = load_recipe(args.recipe)
    if args.dense_bundle:
        dense_path, jtucker_path = args.dense_bundle, args.jtucker_bundle
    else:
        dense_path, jtucker_path = recipe_bundles(recipe, args.output)
    bundles = {"dense": Bundle.load(dense_path), "jtucker": Bundle.load(jtucker_path)}
    for kind, bundle in bundles.items():
        if sorted(bundle.tasks) != sorted(recipe.tasks):
            raise ValueError(
                f"{kind} bundle {dense_path if kind == 'dense' else jtucker_path}: tasks "
                f"{bundle.tasks}, but the recipe {recipe.source} has {list(recipe.tasks)}"
            )
    tasks = list(recipe.tasks)
    log(f"data: {', '.join(tasks)} (test sets of {recipe.source})")
    data = {t: load_task_data(recipe.tasks[t].data, recipe.data_root, seed=recipe.seed) for t in tasks}
    with tempfile.TemporaryDirectory(prefix="quantize_bundle-") as work:
        forms = quantized_forms(
            {"dense": (bundles["dense"], dense_path), "jtucker": (bundles["jtucker"], jtucker_path)},
            data,
            recipe.seed,
            args.calibration_batches,
            Path(work),
        )
    accuracy = {
        (name, t): evaluate(form["models"][t], data[t].test)["accuracy"]
        for name, form in forms.items()
        for t in tasks
    }
    log("accuracy measured")
    shapes = {t: tuple(bundles["dense"].info[t].input_shape) for t in tasks}
    ms = latencies(forms, shapes, args.repeats, args.warmup)

    rows: list[dict[str, Any]] = []
    for name, form in forms.items():
        task_rows = [
            {
                "form": name,
                "task": t,
                "accuracy": accuracy[name, t],
                "tensor_bytes": form["task_bytes"][t],
                **{f"latency_ms_b{b}": ms[name, t, b] for b in BATCHES},
            }
            for t in tasks
        ]
        rows += task_rows
        rows.append(
            {
                "form": name,
                "task": "mean",
                "accuracy": statistics.fmean(r["accuracy"] for r in task_rows),
                "tensor_bytes": form["tensor_bytes"],
                "disk_bytes": form["disk_bytes"],
                "shared_tensor_bytes": form["shared_tensor_bytes"],
                **{
                    f"latency_ms_b{b}": statistics.fmean(r[f"latency_ms_b{b}"] for r in task_rows)
                    for b in BATCHES
                },
            }
        )
    reference = {r["task"]: dict(r) for r in rows if r["form"] == "dense_fp32"}
    for row in rows:
        ref = reference[row["task"]]
        row["drop_pp"] = 100 * (ref["accuracy"] - row["accuracy"])
        row["compression"] = ref["tensor_bytes"] / row["tensor_bytes"]
        for b in BATCHES:
            row[f"speedup_b{b}"] = ref[f"latency_ms_b{b}"] / row[f"latency_ms_b{b}"]
    env = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, shared",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "neural_compressor": _version("neural_compressor_pt"),
        "recipe": str(recipe.source),
        "dense_bundle": str(dense_path),
        "jtucker_bundle": str(jtucker_path),
        "calibration_batches": args.calibration_batches,
        "repeats": args.repeats,
        "test_images": {t: len(data[t].test) for t in tasks},
        "jtucker_fp32_bytes_by_part": bytes_by_part(bundles["jtucker"]),
        "jtucker_int8_floor_bytes": int8_floor(bundles["jtucker"]),
    }
    return rows, env


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    by = {(r["form"], r["task"]): r for r in rows}
    head = (
        "| form | tensor bytes | on disk | vs dense fp32 | "
        + " | ".join(f"acc {t}" for t in tasks)
        + " | mean acc | drop (pp) | b1 ms | b1 speed-up | b32 ms | b32 speed-up |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for form in FORMS:
        m = by[form, "mean"]
        lines.append(
            f"| {form} | {m['tensor_bytes']:,} | {m['disk_bytes']:,} | {m['compression']:.2f}x | "
            + " | ".join(f"{by[form, t]['accuracy']:.4f}" for t in tasks)
            + f" | {m['accuracy']:.4f} | {m['drop_pp']:+.2f} | {m['latency_ms_b1']:.2f} | "
            f"{m['speedup_b1']:.2f}x | {m['latency_ms_b32']:.2f} | {m['speedup_b32']:.2f}x |"
        )
    return "\n".join(lines)


def int8_floor(bundle: Bundle) -> int:
    """Bytes an int8 form of ``bundle`` could reach with its sharing kept (an estimate).

    Every distinct conv / linear weight once at one byte per element, plus per task and output
    channel a float32 scale and a float32 bias (batch norm applied per task after a shared
    weight rather than folded into it); no tensor names, graph or zero points.
    """
    seen: set[int] = set()
    total = 0
    for model in bundle.models.values():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                total += 8 * module.weight.shape[0]
                if id(module.weight) not in seen:
                    seen.add(id(module.weight))
                    total += module.weight.numel()
    return total


def bytes_by_part(bundle: Bundle) -> dict[str, int]:
    """Bytes of the bundle's distinct tensors by J-Tucker part: core, in_proj, out_proj, other."""
    parts = dict.fromkeys(("core", "in_proj", "out_proj", "other"), 0)
    for name, tensor in bundle.stored_tensors().items():
        part = next((p for p in ("core", "in_proj", "out_proj") if f".{p}." in name), "other")
        parts[part] += tensor.numel() * tensor.element_size()
    return parts


def verdict(rows: list[dict[str, Any]]) -> str:
    m = next(r for r in rows if r["form"] == "jtucker_int8" and r["task"] == "mean")
    met = m["compression"] >= TARGET_RATIO and m["drop_pp"] <= TARGET_DROP_PP
    return (
        f"target (>= {TARGET_RATIO:g}x smaller at <= {TARGET_DROP_PP:g} pp mean drop): jtucker_int8 "
        f"{m['compression']:.2f}x at {m['drop_pp']:+.2f} pp: {'met' if met else 'NOT met'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = ROOT.parent / "shared" / "data"
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("JTUCKER_DATA", shared)),
        help="the recipe's ${JTUCKER_DATA}",
    )
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--output", type=Path, help="the recipe run's folder (default: its output)")
    parser.add_argument("--dense-bundle", type=Path, help="the fine-tuned dense task models")
    parser.add_argument("--jtucker-bundle", type=Path, help="the J-Tucker bundle after fine-tuning")
    parser.add_argument(
        "--calibration-batches",
        type=int,
        default=defaults.CALIBRATION_BATCHES,
        help="batches of 32 training images per task",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if (args.dense_bundle is None) != (args.jtucker_bundle is None):
        parser.error("--dense-bundle and --jtucker-bundle go together (or neither: run the recipe)")
    for name in ("calibration_batches", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    torch.set_num_threads(args.threads)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    rows, env = measure(args)
    tasks = [r["task"] for r in rows if r["form"] == "dense_fp32" and r["task"] != "mean"]
    print(
        f"{env['date']}, torch {env['torch']}, INC {env['neural_compressor']}, "
        f"{env['torch_threads']} thread(s), {env['machine']}"
    )
    print(table(rows, tasks))
    print(verdict(rows))
    floor, dense = (
        env["jtucker_int8_floor_bytes"],
        next(r["tensor_bytes"] for r in rows if r["form"] == "dense_fp32" and r["task"] == "mean"),
    )
    parts = ", ".join(f"{k} {v:,}" for k, v in env["jtucker_fp32_bytes_by_part"].items())
    print(f"jtucker_fp32 tensor bytes by part: {parts}")
    print(
        f"int8 floor of the J-Tucker bundle (weights once at 1 byte, fp32 scale + bias per task "
        f"and output channel): {floor:,} bytes, {dense / floor:.2f}x"
    )
    version = torch.__version__.split("+")[0]
    write_results(args.out, f"quantize_bundle-resnet20-pt{version}-cpu", rows, env)


if __name__ == "__main__":
    main()
