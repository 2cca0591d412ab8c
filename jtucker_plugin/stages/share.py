"""Stage ``share``: hard parameter sharing, one layer object for all tasks (see ``merge.share``).

The stage only ties the layers; follow it with ``finetune: {joint: true}`` so that the shared
layers learn from every task's batches::

    stages:
      - share:    {init: mean, keep_per_task: ["conv1"]}
      - finetune: {joint: true, epochs: 3, lr: 0.01}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jtucker_plugin.merge.share import hard_share
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult


@dataclass(frozen=True)
class ShareConfig:
    """How the shared layers start and which layers stay per task."""

    # init: 'mean' of the tasks' weights, or 'task:<name>' to copy one task's layers
    init: str = "mean"
    # keep_per_task: fnmatch patterns over module paths; batch norm and heads always stay
    keep_per_task: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        named_task = isinstance(self.init, str) and self.init.startswith("task:")
        if self.init != "mean" and not (named_task and len(self.init) > len("task:")):
            raise ValueError(f"init: expected 'mean' or 'task:<name>', got {self.init!r}")


@register_stage("share", config=ShareConfig)
def share(bundle: Bundle, config: ShareConfig, ctx: StageContext) -> StageResult:
    """Hard sharing: one layer for all tasks wherever shapes agree (batch norm, heads per task)."""
    result = hard_share(bundle, init=config.init, keep_per_task=config.keep_per_task)
    ctx.log(
        f"share: {len(result['layers'])} layers shared, unique parameters "
        f"{result['unique_parameters']['before']} -> {result['unique_parameters']['after']}"
    )
    return StageResult(
        bundle,
        {
            "share": result,
            "bundle": {
                "unique_parameters": bundle.unique_parameters(),
                "compression_ratio": bundle.compression_ratio(),
            },
        },
    )
