"""jtucker-plugin: compress several task models of one architecture jointly.

The public API, loaded on first use so that ``import jtucker_plugin`` stays cheap::

    import jtucker_plugin as jt
    bundle = jt.Bundle.load("runs/x/bundle")
    result = jt.joint_tucker([w_a, w_b, w_c], rank=(16, 16))
"""

from __future__ import annotations

import importlib
from typing import Any

from jtucker_plugin._version import __version__

_API = {
    "Bundle": "jtucker_plugin.multitask",
    "TaskInfo": "jtucker_plugin.multitask",
    "create_model": "jtucker_plugin.models",
    "list_models": "jtucker_plugin.models",
    "register_model": "jtucker_plugin.models",
    "load_task_data": "jtucker_plugin.data",
    "DataSpec": "jtucker_plugin.data",
    "fit": "jtucker_plugin.train",
    "evaluate": "jtucker_plugin.train",
    "load_recipe": "jtucker_plugin.recipe.load",
    "run_recipe": "jtucker_plugin.recipe.runner",
    "register_stage": "jtucker_plugin.recipe.registry",
    "list_stages": "jtucker_plugin.recipe.registry",
    "StageResult": "jtucker_plugin.recipe.stage",
    "StageContext": "jtucker_plugin.recipe.stage",
    "register_layer": "jtucker_plugin.layers",
    "joint_tucker": "jtucker_plugin.decompose.tucker",
    "tucker2": "jtucker_plugin.decompose.tucker",
    "select_ranks": "jtucker_plugin.decompose.ranks",
    "register_rank_strategy": "jtucker_plugin.decompose.ranks",
    "decompose_bundle": "jtucker_plugin.decompose.apply",
    "NaiveBayesImportance": "jtucker_plugin.prune.naive_bayes",
    "prune_bundle": "jtucker_plugin.prune.prune",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'jtucker_plugin' has no attribute {name!r}")
