"""Run a recipe: build the task models, run the stages in order, checkpoint, resume, report.

Every finished stage leaves ``<output>/stages/<NN>-<name>/`` with the bundle after it
(``bundle/``), its ``result.json`` (metrics, seconds, fingerprint) and its own files. The
fingerprint hashes the recipe's tasks and seed and every stage up to this one, so re-running
resumes after the last finished stage whose inputs have not changed; ``force`` reruns all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from jtucker_plugin._version import __version__
from jtucker_plugin.data import TaskData, load_task_data
from jtucker_plugin.io import atomic_directory
from jtucker_plugin.metrics import count_parameters
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo
from jtucker_plugin.recipe.load import Recipe
from jtucker_plugin.recipe.registry import get_stage
from jtucker_plugin.recipe.schema import to_dict
from jtucker_plugin.recipe.stage import StageContext, StageResult, log
from jtucker_plugin.report import Report, write_report


def stage_fingerprints(recipe: Recipe) -> list[str]:
    """One hash per stage, covering the tasks, the seed and every stage up to it.

    Stage configs enter with their explicitly set fields only, and ``data_root`` as an absolute
    path, so that a new optional field or another spelling of the same folder does not throw
    away finished stages.
    """
    data_root = str(Path(recipe.data_root).expanduser().resolve()) if recipe.data_root else None
    head = {
        "version": __version__,
        "seed": recipe.seed,
        "data_root": data_root,
        "tasks": to_dict(recipe.tasks),
    }
    digest = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()
    out = []
    for stage in recipe.stages:
        step = json.dumps([digest, stage.name, _explicit_fields(stage.config)], sort_keys=True, default=str)
        digest = hashlib.sha256(step.encode()).hexdigest()
        out.append(digest)
    return out


def _explicit_fields(config: Any) -> dict[str, Any]:
    """The config's fields whose values differ from their declared defaults, as plain data."""
    out = {}
    for f in dataclasses.fields(config):
        value = to_dict(getattr(config, f.name))
        if f.default is not dataclasses.MISSING:
            default = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = to_dict(f.default_factory())
        else:
            default = dataclasses.MISSING
        if value != default:
            out[f.name] = value
    return out


def build_bundle(recipe: Recipe, data: dict[str, TaskData]) -> Bundle:
    """The recipe's task models before any stage: one architecture, one seed, each task's head."""
    models, info = {}, {}
    for task, cfg in recipe.tasks.items():
        d = data[task]
        weights = recipe.resolve(cfg.model.weights) if cfg.model.weights else None
        model = create_model(
            cfg.model.arch,
            d.num_classes,
            in_channels=d.input_shape[0],
            width=cfg.model.width,
            weights=weights,
            seed=recipe.seed,
        )
        models[task] = model
        info[task] = TaskInfo(
            arch=cfg.model.arch,
            num_classes=d.num_classes,
            in_channels=d.input_shape[0],
            width=cfg.model.width,
            input_shape=tuple(d.input_shape),
            class_names=tuple(d.class_names),
            mean=tuple(d.train.mean),
            std=tuple(d.train.std),
            dense_parameters=count_parameters(model),
        )
    provenance = {"recipe": recipe.source, "recipe_name": recipe.name, "seed": recipe.seed}
    return Bundle(models, info, provenance=provenance)


def _stage_dir(out: Path, index: int, name: str) -> Path:
    return out / "stages" / f"{index:02d}-{name}"


def _finished(out: Path, recipe: Recipe, fingerprints: list[str]) -> int:
    """How many leading stages have a checkpoint whose fingerprint still matches."""
    done = 0
    for i, (stage, fp) in enumerate(zip(recipe.stages, fingerprints, strict=True)):
        result = _stage_dir(out, i, stage.name) / "result.json"
        try:
            if json.loads(result.read_text())["fingerprint"] != fp:
                break
        except (OSError, ValueError, KeyError):
            break
        done = i + 1
    return done


def run_recipe(
    recipe: Recipe, *, output: str | Path | None = None, force: bool = False, quiet: bool = False
) -> Report:
    """Run ``recipe``'s stages, resuming after finished ones; returns the report.

    Parameters
    ----------
    recipe
        A validated recipe (``load_recipe``).
    output
        Overrides the recipe's ``output`` folder.
    force
        Rerun every stage even when a matching checkpoint exists.
    quiet
        No progress bars.
    """
    out = Path(output) if output else recipe.output_dir()
    fingerprints = stage_fingerprints(recipe)
    cache: dict[str, TaskData] = {}

    def load_data(task: str) -> TaskData:
        if task not in cache:
            log.info("loading data for task %s", task)
            cache[task] = load_task_data(recipe.tasks[task].data, recipe.data_root, seed=recipe.seed)
        return cache[task]

    start = 0 if force else _finished(out, recipe, fingerprints)
    records: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    for i in range(start):
        result = json.loads((_stage_dir(out, i, recipe.stages[i].name) / "result.json").read_text())
        records.append(
            {
                "stage": recipe.stages[i].name,
                "index": i,
                "seconds": result["seconds"],
                "status": "resumed",
            }
        )
        metrics.append(result["metrics"])
    if start:
        log.info("resuming after stage %d (%s)", start - 1, recipe.stages[start - 1].name)
        bundle = Bundle.load(_stage_dir(out, start - 1, recipe.stages[start - 1].name) / "bundle")
    else:
        bundle = build_bundle(recipe, {t: load_data(t) for t in recipe.tasks})

    for i in range(start, len(recipe.stages)):
        call = recipe.stages[i]
        stage = get_stage(call.name)
        log.info("stage %d: %s", i, call.name)
        began = time.perf_counter()
        with atomic_directory(_stage_dir(out, i, call.name)) as folder:
            ctx = StageContext(
                seed=recipe.seed + i,
                index=i,
                folder=folder / "files",
                output=out,
                load_data=load_data,
                quiet=quiet,
                data_root=recipe.data_root,
                load_checkpoint=lambda k: Bundle.load(_stage_dir(out, k, recipe.stages[k].name) / "bundle"),
            )
            ctx.folder.mkdir()
            result: StageResult = stage.fn(bundle, call.config, ctx)
            bundle = result.bundle
            seconds = time.perf_counter() - began
            bundle.save(folder / "bundle")
            (folder / "result.json").write_text(
                json.dumps(
                    {
                        "stage": call.name,
                        "index": i,
                        "fingerprint": fingerprints[i],
                        "seconds": seconds,
                        "metrics": result.metrics,
                    },
                    indent=1,
                    default=float,
                )
            )
        records.append({"stage": call.name, "index": i, "seconds": seconds, "status": "ran"})
        metrics.append(result.metrics)

    report = make_report(recipe, bundle, records, metrics)
    write_report(report, out)
    return report


def make_report(
    recipe: Recipe, bundle: Bundle, records: list[dict[str, Any]], metrics: list[dict[str, Any]]
) -> Report:
    """Merge the stages' metrics and the final bundle's counts into the run's report."""
    tasks: dict[str, dict[str, Any]] = {t: {} for t in bundle.tasks}
    summary: dict[str, Any] = {}
    for m in metrics:
        for task, values in m.get("tasks", {}).items():
            row = tasks.setdefault(task, {})
            if "accuracy" in values and "accuracy" in row and "accuracy_before" not in row:
                row["accuracy_before"] = row["accuracy"]
            row.update(values)
        summary.update(m.get("bundle", {}))
    for task, model in bundle.models.items():
        tasks[task]["parameters"] = count_parameters(model)
    summary.update(
        tasks=len(bundle.tasks),
        unique_parameters=bundle.unique_parameters(),
        dense_parameters=bundle.dense_parameters(),
        compression_ratio=bundle.compression_ratio(),
    )
    provenance = {
        **bundle.provenance,
        "recipe": recipe.source,
        "seed": recipe.seed,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return Report(name=recipe.name, tasks=tasks, bundle=summary, stages=records, provenance=provenance)
