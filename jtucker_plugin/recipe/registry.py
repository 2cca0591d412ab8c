"""The stage registry: every recipe stage, built-in or third-party, resolves here by name.

Built-in stages are imported explicitly (``_BUILTIN_MODULES``); third-party packages add stages
by declaring an entry point in the group ``jtucker_plugin.stages`` whose object, once loaded,
has registered the stage (a module that uses ``@register_stage``, or the decorated function).

Examples
--------
>>> @dataclasses.dataclass(frozen=True)
... class ShoutConfig:
...     times: int = 1
>>> @register_stage("shout", config=ShoutConfig)           # doctest: +SKIP
... def shout(bundle, config, ctx):
...     '''Print the task names.'''
...     return StageResult(bundle)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from jtucker_plugin.recipe.schema import did_you_mean

ENTRY_POINT_GROUP = "jtucker_plugin.stages"
_BUILTIN_MODULES = (
    "jtucker_plugin.stages.train",
    "jtucker_plugin.stages.evaluate",
    "jtucker_plugin.stages.export",
    "jtucker_plugin.stages.decompose",
    "jtucker_plugin.stages.prune",
    "jtucker_plugin.stages.quantize",
    "jtucker_plugin.stages.share",
    "jtucker_plugin.stages.hybrid",
    "jtucker_plugin.stages.sparsify",
)


@dataclass(frozen=True)
class Stage:
    """A registered stage: its name, the function that runs it and its config dataclass."""

    name: str
    fn: Callable[..., Any]
    config: type

    @property
    def doc(self) -> str:
        """The first line of the function's docstring."""
        return (self.fn.__doc__ or "").strip().splitlines()[0] if self.fn.__doc__ else ""


_STAGES: dict[str, Stage] = {}
_loaded = False


def register_stage(name: str, *, config: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(bundle, config, ctx) -> StageResult`` as the stage ``name``.

    Parameters
    ----------
    name
        The key that recipes use, e.g. ``"finetune"``.
    config
        A frozen dataclass; the recipe's mapping for this stage is validated against it.

    Raises
    ------
    ValueError
        If ``name`` is taken by another function, or ``config`` is not a dataclass.
    """
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"stage {name!r}: config must be a dataclass, got {config!r}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _STAGES.get(name)
        if existing is not None and existing.fn.__qualname__ != fn.__qualname__:
            raise ValueError(
                f"a stage named {name!r} is already registered by "
                f"{existing.fn.__module__}.{existing.fn.__qualname__}"
            )
        _STAGES[name] = Stage(name, fn, config)
        return fn

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not hide the others; say which one
            raise ImportError(
                f"could not load stage plugin {ep.name!r} ({ep.value}) from entry point group "
                f"{ENTRY_POINT_GROUP!r}: {err}"
            ) from err
        if ep.name not in _STAGES:
            raise ValueError(
                f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} loaded but "
                f"registered no stage named {ep.name!r}; decorate it with @register_stage"
            )


def get_stage(name: str) -> Stage:
    """The stage registered as ``name``.

    Raises
    ------
    KeyError
        Naming the unknown stage, a close match and all available stages.
    """
    _load_all()
    if name not in _STAGES:
        raise KeyError(
            f"unknown stage {name!r}{did_you_mean(name, _STAGES)}; available: {', '.join(sorted(_STAGES))}"
        )
    return _STAGES[name]


def list_stages(pattern: str = "*") -> list[str]:
    """Sorted names of the registered stages matching the shell-style ``pattern``."""
    _load_all()
    return sorted(n for n in _STAGES if fnmatch.fnmatchcase(n, pattern))
