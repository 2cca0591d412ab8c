"""jtucker-plugin: compress several task models of one architecture jointly.

Importing the package registers J-Tucker and Tucker with Intel Neural Compressor 3.x (INC's
own convention: algorithms register at import), so that a script can then call
``neural_compressor.torch.quantization.quantize(model, jtucker_plugin.JTuckerConfig(...))``.
The rest of the public API::

    import jtucker_plugin as jt
    bundle = jt.Bundle.load("runs/x/bundle")
    result = jt.joint_tucker([w_a, w_b, w_c], rank=(16, 16))
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
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
    "JTuckerConfig": "jtucker_plugin.integrations.neural_compressor",
    "TuckerConfig": "jtucker_plugin.integrations.neural_compressor",
    "MultiTaskModel": "jtucker_plugin.integrations.neural_compressor",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'jtucker_plugin' has no attribute {name!r}")


def _register_with_neural_compressor() -> None:
    # INC logs WARNING lines (accelerator detection) while it is imported. This import is the
    # plugin's, not the user's: keep it quiet, then leave INC's logger at the level INC itself
    # would have set (its LOGLEVEL variable).
    if "neural_compressor" in sys.modules:
        importlib.import_module("jtucker_plugin.integrations.neural_compressor")
        return
    user_level = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "ERROR"
    try:
        importlib.import_module("jtucker_plugin.integrations.neural_compressor")
    finally:
        if user_level is None:
            del os.environ["LOGLEVEL"]
        else:
            os.environ["LOGLEVEL"] = user_level
        logging.getLogger("neural_compressor").setLevel((user_level or "INFO").upper())


_register_with_neural_compressor()
