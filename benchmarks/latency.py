"""CPU latency of J-Tucker task models against their dense originals, with the MAC reduction.

    python benchmarks/latency.py --data-dir ../shared/data            # builds a 3-task bundle
    python benchmarks/latency.py --bundle runs/jtucker-cifar10-split-resnet20/bundle

The dense reference of each task is its own model with every factorized layer turned back into
the dense layer it approximates (``to_dense``): the same architecture as the original, so the
two differ only in the factorization. Dense and factorized runs alternate within each repeat, so
machine noise hits both alike; the table quotes medians and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from jtucker_plugin.decompose.apply import FACTORIZED, decompose_bundle
from jtucker_plugin.decompose.ranks import rank_config_from_dict, select_ranks
from jtucker_plugin.metrics import count_macs, count_parameters
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo


def densified(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every factorized layer replaced by its dense equivalent."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, FACTORIZED):
            dense.set_submodule(name, module.to_dense())
    return dense


def demo_bundle(data_dir: Path, budget: float) -> Bundle:
    """Three copies of the pretrained ResNet-20 (heads of 4, 6 and 10 classes), J-Tucker'd."""
    weights = next((data_dir / "weights").glob("resnet20-*.th"))
    models = {
        t: create_model("resnet20", n, weights=weights, seed=0) for t, n in (("a", 4), ("b", 6), ("c", 10))
    }
    info = {
        t: TaskInfo(arch="resnet20", num_classes=m.linear.out_features, dense_parameters=count_parameters(m))
        for t, m in models.items()
    }
    bundle = Bundle(models, info)
    config = rank_config_from_dict({"strategy": "budget", "budget": {"params": budget}})
    decompose_bundle(bundle, lambda infos, _: select_ranks(config, infos), joint=True, min_params=1024)
    return bundle


def timed(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return (time.perf_counter() - start) * 1e3


@torch.inference_mode()
def compare(bundle: Bundle, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for task, model in bundle.models.items():
        model.eval()
        dense = densified(model).eval()
        shape = bundle.info[task].input_shape
        row = {"task": task, "macs_dense": count_macs(dense, shape), "macs_jtucker": count_macs(model, shape)}
        for batch in (1, 32):
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            for _ in range(warmup):
                model(x), dense(x)
            times: dict[str, list[float]] = {"dense": [], "jtucker": []}
            for _ in range(repeats):
                times["dense"].append(timed(dense, x))
                times["jtucker"].append(timed(model, x))
            for kind, values in times.items():
                row[f"ms_{kind}_b{batch}"] = statistics.median(values)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, help="a saved J-Tucker bundle (default: build one)")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--budget", type=float, default=0.35, help="params budget when building")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = Bundle.load(args.bundle) if args.bundle else demo_bundle(args.data_dir, args.budget)
    rows = compare(bundle, args.repeats, args.warmup)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats, "
        f"{time.strftime('%Y-%m-%d')}; bundle compression {bundle.compression_ratio():.2f}x"
    )
    print(
        "| task | MACs dense | MACs J-Tucker | MAC ratio | b1 dense ms | b1 J-Tucker ms | b1 speed-up "
        "| b32 dense ms | b32 J-Tucker ms | b32 speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {r['macs_dense'] / 1e6:.1f}M | {r['macs_jtucker'] / 1e6:.1f}M "
            f"| {r['macs_dense'] / r['macs_jtucker']:.2f}x "
            f"| {r['ms_dense_b1']:.2f} | {r['ms_jtucker_b1']:.2f} "
            f"| {r['ms_dense_b1'] / r['ms_jtucker_b1']:.2f}x "
            f"| {r['ms_dense_b32']:.2f} | {r['ms_jtucker_b32']:.2f} "
            f"| {r['ms_dense_b32'] / r['ms_jtucker_b32']:.2f}x |"
        )


if __name__ == "__main__":
    main()
