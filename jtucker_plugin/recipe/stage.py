"""What a stage receives (``StageContext``) and returns (``StageResult``).

A stage is ``fn(bundle, config, ctx) -> StageResult``, registered with
``jtucker_plugin.recipe.registry.register_stage``. It may change the bundle's models in place or
return a new bundle; what it measured goes in ``metrics`` and ends up in the run's report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jtucker_plugin.data import TaskData
from jtucker_plugin.multitask import Bundle

log = logging.getLogger("jtucker_plugin")


@dataclass
class StageResult:
    """A stage's outcome.

    ``metrics`` may hold ``{"tasks": {task: {key: value}}, "bundle": {key: value}}`` plus any
    stage-specific entries; the report merges the per-task and bundle entries of all stages, the
    latest value of a key winning, and keeps the first ``accuracy`` as ``accuracy_before``.
    """

    bundle: Bundle
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage may need besides the bundle and its config.

    Parameters
    ----------
    seed
        The recipe's seed; a stage derives its random choices from it.
    index
        The stage's position in the recipe.
    folder
        A folder for the stage's own files; it is kept with the stage's checkpoint.
    load_data
        ``task -> TaskData``, cached by the runner across stages.
    output
        The run's output folder, for results meant to be found there (an exported bundle).
    quiet
        No progress bars when true.
    load_checkpoint
        ``index -> Bundle``: the bundle an earlier stage of this run wrote (e.g. the task models
        before compression, as teachers to distil from).
    """

    seed: int
    index: int
    folder: Path
    output: Path
    load_data: Callable[[str], TaskData]
    quiet: bool = False
    data_root: str | None = None
    load_checkpoint: Callable[[int], Bundle] | None = None

    def data(self, task: str) -> TaskData:
        """The task's data (loaded once per run)."""
        return self.load_data(task)

    def checkpoint(self, index: int, field: str) -> Bundle:
        """The bundle stage ``index`` wrote; ``field`` names the option that asked, for errors.

        Raises
        ------
        ValueError
            If ``index`` is not an earlier stage of this run.
        """
        if not 0 <= index < self.index or self.load_checkpoint is None:
            raise ValueError(
                f"{field}: expected the index of an earlier stage (0 to {self.index - 1}), got {index}"
            )
        return self.load_checkpoint(index)

    def progress(self, iterable: Iterable, *, total: int | None = None, desc: str = "") -> Iterable:
        """``iterable`` wrapped in a progress bar, unless quiet."""
        if self.quiet:
            return iterable
        from tqdm.auto import tqdm

        # disable=None: no bars when the output is not a terminal (CI logs, pipes).
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)

    def log(self, message: str) -> None:
        """An info message (hidden with ``--quiet``)."""
        log.info(message)
