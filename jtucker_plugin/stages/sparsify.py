"""Stage ``sparsify``: keep each layer's largest weight entries, zeros elsewhere (see ``merge.sparse``).

The cut is one-shot and the stage does not train: follow it with a fine-tune, which moves only
the kept values (the zeros stay). After ``share`` it makes the one shared copy sparse::

    stages:
      - share:    {keep_per_task: ["conv1"]}
      - sparsify: {density: 0.5, keep_dense: ["conv1"]}
      - finetune: {joint: true, epochs: 3, lr: 0.01}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jtucker_plugin import defaults
from jtucker_plugin.merge.nonzeros import check_target
from jtucker_plugin.merge.sparse import sparsify
from jtucker_plugin.metrics import state_bytes
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.registry import register_stage
from jtucker_plugin.recipe.stage import StageContext, StageResult


@dataclass(frozen=True)
class SparsifyConfig:
    """How many weight entries to keep, which layers stay dense, and the execution."""

    # target (exactly one): share of each layer's weight entries kept, or entries kept over all
    # the layers together (global magnitude: the largest win, wherever they are)
    density: float | None = None
    budget: int | None = None
    # keep_dense: fnmatch patterns of layers left as they are; classifier heads always are
    keep_dense: list[str] = field(default_factory=list)
    # execution: keep the dense weight after the first forward (fast) or rebuild it per forward
    materialize: bool = defaults.MATERIALIZE

    def __post_init__(self) -> None:
        check_target(self.density, self.budget)


@register_stage("sparsify", config=SparsifyConfig)
def sparsify_stage(bundle: Bundle, config: SparsifyConfig, ctx: StageContext) -> StageResult:
    """Unstructured magnitude sparsity, one-shot, stored as values and positions."""
    made = sparsify(
        bundle,
        density=config.density,
        budget=config.budget,
        keep_dense=config.keep_dense,
        materialize=config.materialize,
    )
    ctx.log(
        f"sparsify: {len(made['layers'])} layers, {made['nonzeros']} entries kept; unique parameters "
        f"{made['unique_parameters']['before']} -> {made['unique_parameters']['after']}"
    )
    return StageResult(
        bundle,
        {
            "sparsify": made,
            "bundle": {
                "unique_parameters": bundle.unique_parameters(),
                "compression_ratio": bundle.compression_ratio(),
                "bytes": state_bytes(bundle.stored_tensors()),
            },
        },
    )
