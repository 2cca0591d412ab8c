"""Read a YAML recipe into a validated ``Recipe``, before anything runs.

Order of checks: YAML syntax; ``${ENV}`` expansion; the keys and types of every field (stage
names before their fields); then what needs the file system and the zoo: files that must exist,
known architectures, one architecture for all tasks. Each problem is one ``ConfigError`` naming
the recipe file, the field's path and what was expected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from jtucker_plugin.data import DataSpec, required_paths
from jtucker_plugin.recipe.registry import get_stage
from jtucker_plugin.recipe.schema import (
    ConfigError,
    convert,
    did_you_mean,
    from_dict,
    join_path,
    to_dict,
)


@dataclass(frozen=True)
class ModelSpec:
    """A recipe's ``tasks.<name>.model``: the architecture and where its weights come from."""

    arch: str
    weights: str | None = None  # relative to data_root unless absolute
    width: float = 1.0

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"width: expected a number > 0, got {self.width}")


@dataclass(frozen=True)
class TaskConfig:
    """One task: its data and its model."""

    data: DataSpec
    model: ModelSpec


@dataclass(frozen=True)
class StageCall:
    """One entry of a recipe's ``stages``: a registered stage name and its validated config."""

    name: str
    config: Any


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``source`` is the file it was read from, if any."""

    name: str
    tasks: dict[str, TaskConfig]
    stages: list[StageCall]
    seed: int = 0
    output: str | None = None
    data_root: str | None = None
    source: str | None = field(default=None, compare=False)

    def resolve(self, path: str) -> Path:
        """``path`` relative to ``data_root`` (or the working folder when there is none)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or not self.data_root else Path(self.data_root).expanduser() / p

    def output_dir(self) -> Path:
        """Where the run writes: ``output``, or ``runs/<name>``."""
        return Path(self.output or Path("runs") / self.name).expanduser()


_TOP_LEVEL = ("name", "seed", "output", "data_root", "tasks", "stages")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of ``value``.

    Raises
    ------
    ConfigError
        At the field's path when a variable is unset and has no default.
    """
    if isinstance(value, dict):
        return {k: expand_env(v, join_path(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, join_path(path, i)) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            path,
            f"environment variable {name} is not set (write ${{{name}:-default}} for a fallback)",
        )

    return _ENV.sub(sub, value)


def parse_recipe(data: Any, source: str | None = None) -> Recipe:
    """Validate recipe data (already read from YAML) into a ``Recipe``; no file-system checks."""
    try:
        return _parse(expand_env(data))
    except ConfigError as err:
        raise err.in_file(source) if source else err from None


def _parse(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(
            "",
            f"a recipe is a mapping with keys {', '.join(_TOP_LEVEL)}; got {type(data).__name__}",
        )
    top = from_dict(_TopLevel, {k: v for k, v in data.items() if k not in ("tasks", "stages")})
    for key in ("tasks", "stages"):
        if key not in data:
            raise ConfigError(key, "missing required key")
    tasks = convert(dict[str, TaskConfig], data["tasks"], "tasks")
    if not tasks:
        raise ConfigError("tasks", "expected at least one task")
    if not isinstance(data["stages"], list):
        raise ConfigError("stages", f"expected a list of stages, got {data['stages']!r}")
    stages = [_parse_stage(entry, f"stages[{i}]") for i, entry in enumerate(data["stages"])]
    for i, call in enumerate(stages):
        _check_stage_references(call, i)
    return Recipe(tasks=tasks, stages=stages, **to_dict(top))


@dataclass(frozen=True)
class _TopLevel:
    name: str
    seed: int = 0
    output: str | None = None
    data_root: str | None = None


def _parse_stage(entry: Any, path: str) -> StageCall:
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(path, f"expected one stage as '- name: {{options}}', got {entry!r}")
    ((name, params),) = entry.items()
    try:
        stage = get_stage(str(name))
    except KeyError as err:
        raise ConfigError(path, err.args[0]) from None
    return StageCall(stage.name, from_dict(stage.config, params, join_path(path, stage.name)))


def _check_stage_references(call: StageCall, index: int) -> None:
    # Options named ``*_stage`` (e.g. ``teacher_stage``) read the checkpoint of an earlier stage.
    for f in fields(call.config) if is_dataclass(call.config) else ():
        value = getattr(call.config, f.name)
        if f.name.endswith("_stage") and value is not None and not 0 <= value < index:
            earlier = f"0 to {index - 1}" if index else "none: this is the first stage"
            raise ConfigError(
                f"stages[{index}].{call.name}.{f.name}",
                f"expected the index of an earlier stage ({earlier}), got {value}",
            )


def check_recipe(recipe: Recipe) -> None:
    """The checks that need the file system and the model zoo.

    Raises
    ------
    ConfigError
        A missing file, an unknown architecture, or tasks of different architectures.
    """
    from jtucker_plugin.models import list_models

    try:
        if recipe.data_root and not Path(recipe.data_root).expanduser().is_dir():
            raise ConfigError("data_root", f"folder not found: {Path(recipe.data_root).resolve()}")
        first_name, first = next(iter(recipe.tasks.items()))
        known = list_models()
        for name, task in recipe.tasks.items():
            where = f"tasks.{name}"
            for field_name, p in required_paths(task.data, recipe.data_root):
                if not p.exists():
                    raise ConfigError(f"{where}.data.{field_name}", f"not found: {p.resolve()}")
            arch = task.model.arch
            if arch not in known and not arch.startswith("tv:"):
                raise ConfigError(
                    f"{where}.model.arch",
                    f"unknown architecture {arch!r}{did_you_mean(arch, known)}; "
                    f"available: {', '.join(known)}",
                )
            if task.model.weights and not recipe.resolve(task.model.weights).is_file():
                raise ConfigError(
                    f"{where}.model.weights",
                    f"file not found: {recipe.resolve(task.model.weights).resolve()}",
                )
            if (arch, task.model.width) != (first.model.arch, first.model.width):
                raise ConfigError(
                    f"{where}.model",
                    f"all tasks must share one architecture; this task has {arch} (width "
                    f"{task.model.width}) but tasks.{first_name} has {first.model.arch} (width "
                    f"{first.model.width})",
                )
    except ConfigError as err:
        raise err.in_file(recipe.source) if recipe.source else err from None


def load_recipe(path: str | Path, *, check: bool = True) -> Recipe:
    """Read, validate and (with ``check``) check the recipe file ``path``.

    Raises
    ------
    FileNotFoundError
        If there is no such file.
    ConfigError
        For any problem in the recipe, naming ``path`` and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(where, f"not valid YAML: {getattr(err, 'problem', err)}", str(path)) from None
    recipe = parse_recipe(data, str(path))
    recipe = Recipe(**{**recipe.__dict__, "source": str(path)})
    if check:
        check_recipe(recipe)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML; ``parse_recipe(yaml.safe_load(dump_recipe(r))) == r``."""
    data = {
        k: getattr(recipe, k)
        for k in ("name", "seed", "output", "data_root")
        if getattr(recipe, k) is not None
    }
    data["tasks"] = to_dict(recipe.tasks)
    data["stages"] = [{s.name: to_dict(s.config)} for s in recipe.stages]
    return yaml.safe_dump(data, sort_keys=False)
