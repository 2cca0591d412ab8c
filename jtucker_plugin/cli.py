"""The ``jtucker`` command: run and validate recipes, list stages, describe bundles."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _run(args: argparse.Namespace) -> int:
    from jtucker_plugin.recipe.load import load_recipe
    from jtucker_plugin.recipe.runner import run_recipe

    recipe = load_recipe(args.recipe)
    report = run_recipe(recipe, output=args.output, force=args.force, quiet=args.quiet)
    report.print()
    return 0


def _validate(args: argparse.Namespace) -> int:
    from jtucker_plugin.recipe.load import load_recipe

    recipe = load_recipe(args.recipe)
    stages = ", ".join(s.name for s in recipe.stages)
    tasks = f"{len(recipe.tasks)} task{'s' if len(recipe.tasks) > 1 else ''}: {', '.join(recipe.tasks)}"
    print(f"{args.recipe}: valid ({tasks}; stages: {stages})")
    return 0


def _stages(args: argparse.Namespace) -> int:
    from jtucker_plugin.recipe.registry import get_stage, list_stages
    from jtucker_plugin.recipe.schema import describe_fields

    for name in list_stages(args.pattern):
        stage = get_stage(name)
        print(f"{name}: {stage.doc}")
        for field, type_name, default in describe_fields(stage.config):
            print(f"    {field}: {type_name} = {default!r}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from jtucker_plugin.multitask import describe_bundle

    info = describe_bundle(args.bundle)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    s = info["summary"]
    print(
        f"bundle {args.bundle}: {len(info['tasks'])} tasks, {s['unique_parameters']:,} unique parameters "
        f"({s['compression_ratio']:.2f}x against {s['dense_parameters']:,} dense), {info['bytes']:,} bytes"
    )
    for task, t in info["tasks"].items():
        layers = ", ".join(f"{n} {k}" for k, n in t["layer_types"].items())
        print(f"  {task}: {t['arch']}, {t['num_classes']} classes, {t['parameters']:,} parameters; {layers}")
    print(
        f"  shared: {len(info['shared_modules'])} modules, {info['shared_tensors']} tensors "
        f"({info['shared_parameters']:,} parameters)"
    )
    print("  history: " + (", ".join(f"{k} x{v}" for k, v in info["history"].items()) or "none"))
    print("  provenance: " + ", ".join(f"{k}={v}" for k, v in info["provenance"].items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jtucker", description=__doc__)
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe (resumes after finished stages)")
    run.add_argument("recipe")
    run.add_argument("--output", "-o", help="output folder (default: the recipe's output)")
    run.add_argument("--force", action="store_true", help="rerun every stage")
    run.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    run.set_defaults(func=_run)
    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.set_defaults(func=_validate)
    stages = sub.add_parser("stages", help="list registered stages and their parameters")
    stages.add_argument("pattern", nargs="?", default="*")
    stages.set_defaults(func=_stages)
    info = sub.add_parser("info", help="describe a saved bundle")
    info.add_argument("bundle")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    from jtucker_plugin.recipe.schema import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        # Library input errors carry their own explanation; a traceback adds nothing for a user.
        print(f"error: {err}", file=sys.stderr)
        return 1
