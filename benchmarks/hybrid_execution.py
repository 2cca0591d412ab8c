"""Execution of Hybrid layers: the dense weight kept after a first forward, or rebuilt at every one.

``HybridLayer(materialize=True)`` builds each task's dense weight ``W_shared + S_t`` once (at the
first forward without gradients) and keeps it; ``materialize=False`` rebuilds it at every
forward with an ``index_add`` and drops it. This script measures, on a Hybrid
bundle (tasks = one backbone plus small perturbations, as after fine-tuning) against the separate
dense models, and ``materialize=False`` once more with the deltas' positions as 2- or 4-byte
integers instead of byte gaps (what decoding gaps costs):

- latency: median wall time of one task's forward at batch 1 and 32 (``metrics.latency_ms``),
  the variants alternated in rounds, and the median per-round ratio to the dense model;
- memory, all tasks loaded and each run once: the stored tensors (shared weights once, every
  delta's values and indices, batch norm, heads; exactly what ``Bundle.save`` writes), the dense
  weights kept by ``materialize`` (exact, from the layers), and the transient extra of
  recomposing (the largest layer's dense weight: one layer at a time).

    python benchmarks/hybrid_execution.py                       # resnet20, 3 tasks, density 0.05
    python benchmarks/hybrid_execution.py --arch vgg16_bn --rounds 3

Prints a Markdown table and the command, machine and date. Timings vary with the machine's load:
compare the ratios.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics

import torch

from jtucker_plugin.merge.composed import ComposedLayer, encode_positions
from jtucker_plugin.merge.hybrid import hybridize
from jtucker_plugin.metrics import latency_ms, state_bytes
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo

SHAPE = (3, 32, 32)


def synthetic_bundle(arch: str, n_tasks: int, spread: float, seed: int) -> Bundle:
    """``n_tasks`` copies of one seeded model, each weight moved by ``spread`` of its std."""
    base = create_model(arch, 10, seed=seed)
    models = {}
    for i in range(n_tasks):
        model = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(seed + i + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(spread * p.std() * torch.randn(p.shape, generator=gen))
        models[f"task{i}"] = model.eval()
    dense = sum(p.numel() for p in base.parameters())
    return Bundle(models, {t: TaskInfo(arch, 10, dense_parameters=dense) for t in models})


def _composed(model: torch.nn.Module) -> list[ComposedLayer]:
    return [m for m in model.modules() if isinstance(m, ComposedLayer)]


def fixed_width_positions(bundle: Bundle) -> Bundle:
    """A copy whose deltas keep their positions as 2- or 4-byte integers (the form before gaps)."""
    bundle = copy.deepcopy(bundle)
    for model in bundle.models.values():
        for layer in _composed(model):
            fixed = torch.int16 if layer.numel <= 1 << 16 else torch.int32
            layer.delta_indices = encode_positions(layer.positions(), layer.numel, form=fixed)
    return bundle


def memory(bundle: Bundle) -> dict[str, int]:
    """The bytes all tasks hold once each has run a forward: stored, kept, transient."""
    with torch.inference_mode():
        for model in bundle.models.values():
            model.eval()(torch.zeros(1, *SHAPE))
    layers = [layer for model in bundle.models.values() for layer in _composed(model)]
    transient = 0
    if layers and not layers[0].materialize:
        transient = max(w.numel() * w.element_size() for w in (layer.shared_weight for layer in layers))
    return {
        "stored": state_bytes(bundle.stored_tensors()),
        "kept": sum(layer.kept_bytes() for layer in layers),
        "transient": transient,
    }


def latencies(bundles: dict[str, Bundle], rounds: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median latency of the first task's forward at batch 1 and 32, and its ratio to the first.

    The variants run alternately, ``rounds`` times ``repeats`` forwards each, so that the load of
    a shared machine falls on all of them alike; the ratio is the median of per-round ratios.
    """
    times: dict[str, dict[int, list[float]]] = {k: {1: [], 32: []} for k in bundles}
    for _ in range(rounds):
        for batch in (1, 32):
            for label, bundle in bundles.items():
                model = bundle.models[bundle.tasks[0]]
                times[label][batch].append(latency_ms(model, SHAPE, batch, repeats=repeats, warmup=1))
    reference = next(iter(bundles))
    out = {}
    for label in bundles:
        row = {}
        for batch in (1, 32):
            ratios = [t / d for t, d in zip(times[label][batch], times[reference][batch], strict=True)]
            row[f"b{batch}"] = statistics.median(times[label][batch])
            row[f"ratio_b{batch}"] = statistics.median(ratios)
        out[label] = row
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--spread", type=float, default=0.05, help="task perturbation, in weight stds")
    parser.add_argument("--rounds", type=int, default=7, help="alternations of the variants")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dense = synthetic_bundle(args.arch, args.tasks, args.spread, args.seed)
    bundles = {"dense (separate models)": dense}
    # The first conv stays per task, as in the recipes.
    first = next(n for n, m in dense.models[dense.tasks[0]].named_modules() if isinstance(m, torch.nn.Conv2d))
    for materialize in (True, False):
        bundle = copy.deepcopy(dense)
        hybridize(bundle, density=args.density, keep_per_task=[first], materialize=materialize)
        bundles[f"hybrid, materialize: {str(materialize).lower()}"] = bundle
    bundles["hybrid, materialize: false, fixed-width positions"] = fixed_width_positions(bundle)
    rows = latencies(bundles, args.rounds, args.repeats)
    for label, bundle in bundles.items():
        rows[label].update(memory(bundle))

    print(
        f"`python benchmarks/hybrid_execution.py --arch {args.arch} --tasks {args.tasks} --density "
        f"{args.density} --rounds {args.rounds} --repeats {args.repeats} --threads {args.threads}`  "
    )
    print(
        f"{platform.machine()}, {os.cpu_count()} cores (shared), {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}, {datetime.date.today()}\n"
    )
    print(
        "| all tasks | latency b1 (ms) | vs dense | latency b32 (ms) | vs dense | stored (KB) "
        "| kept dense weights (KB) | transient per forward (KB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(
            f"| {label} | {r['b1']:.2f} | {r['ratio_b1']:.2f} | {r['b32']:.2f} | {r['ratio_b32']:.2f} | "
            f"{r['stored'] / 1024:.0f} | {r['kept'] / 1024:.0f} | {r['transient'] / 1024:.0f} |"
        )


if __name__ == "__main__":
    main()
