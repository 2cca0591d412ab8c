"""Training and evaluation of task models, one task at a time or all tasks jointly.

Joint training interleaves the tasks: each optimiser step sums one batch's loss from every task,
so a parameter shared by several task models (a J-Tucker factor, a shared dense weight) gets the
gradients of all of them, while per-task parts (cores, batch norm, heads) get only their own.

Distillation (``fit(..., distill=Distillation(teachers))``, e.g. the task models before
compression): each task's loss becomes ``(1 - weight) * CE(labels) + weight * T^2 *
KL(teacher || student)`` at temperature ``T``, so that a compressed model recovers towards what
its dense model predicted, not only towards the few labels a recovery fine-tune sees. In
recipes: ``finetune: {distill: 0.7, teacher_stage: 1}`` (the teachers are the task models that
stage 1 wrote).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from jtucker_plugin.data import ArrayDataset, TaskData, iterate_batches

Progress = Callable[..., Iterable]
EpochEnd = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class FitConfig:
    """How to train: the shared parameters of ``train`` and ``finetune``."""

    # length
    epochs: int = 1
    max_batches: int | None = None  # per epoch and task; caps quick runs
    batch_size: int = 64
    # optimiser: SGD with momentum
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = 0.0
    # tasks
    joint: bool = False  # interleave all tasks' batches in each step
    tasks: list[str] | None = None  # default: all

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs: expected an integer >= 0, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected a number > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches: expected an integer >= 1, got {self.max_batches}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing: expected a number in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class Distillation:
    """Teachers to distil from while fitting (see the module docstring).

    Parameters
    ----------
    teachers
        Task name -> teacher model (run in eval mode without gradients, never trained).
    weight
        Of the KL term, in [0, 1]; the labels' cross-entropy gets ``1 - weight``.
    temperature
        Softens both distributions; the KL term is scaled by its square.
    """

    teachers: dict[str, nn.Module]
    weight: float = 0.5
    temperature: float = 4.0

    def __post_init__(self) -> None:
        # Named as the train / finetune stages' options, which are checked here too.
        if not 0 <= self.weight <= 1:
            raise ValueError(f"distill: expected a number in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature}")


def unique_parameters(models: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Trainable parameters of several models, each shared one once."""
    seen, out = set(), []
    for model in models:
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _steps_per_epoch(datasets: Iterable[ArrayDataset], config: FitConfig) -> int:
    steps = max(math.ceil(len(d) / config.batch_size) for d in datasets)
    return min(steps, config.max_batches) if config.max_batches else steps


def _endless(
    dataset: ArrayDataset, config: FitConfig, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from iterate_batches(
            dataset, config.batch_size, shuffle=True, augment=True, seed=seed * 100_003 + epoch
        )
        epoch += 1


def fit(
    models: dict[str, nn.Module],
    data: dict[str, TaskData],
    config: FitConfig,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    distill: Distillation | None = None,
    epoch_end: EpochEnd | None = None,
) -> dict[str, float]:
    """Train task models in place; returns each task's mean loss over the last epoch.

    Parameters
    ----------
    models, data
        Task name -> model / its data; ``config.tasks`` (default: all of ``models``) are trained.
    config
        Length, optimiser and whether tasks are trained jointly.
    seed
        Drives shuffling and augmentation; the same seed gives the same updates.
    progress
        ``progress(iterable, total=..., desc=...)``, e.g. ``tqdm``; ``None`` for silence.
    distill
        Teachers to distil from; every trained task needs one.
    epoch_end
        Called after every epoch (of each task alone, or of all at once when ``joint``) as
        ``epoch_end(epoch, losses)``: the 0-based epoch and each task's mean loss over it. It may
        replace parameters (a pruning step that shrinks a tensor): training goes on with the
        models' current parameters in the same optimiser, so the learning-rate schedule and the
        momentum of every parameter it keeps run on as in one uninterrupted fit.

    Raises
    ------
    KeyError
        If ``config.tasks`` names a task that is not in ``models``.
    ValueError
        If ``distill`` has no teacher for a trained task.
    """
    tasks = list(config.tasks or models)
    for t in tasks:
        if t not in models:
            raise KeyError(f"tasks: unknown task {t!r}; the bundle has {', '.join(models)}")
    if distill is not None and (missing := [t for t in tasks if t not in distill.teachers]):
        raise ValueError(f"distill: no teacher model for task(s) {missing}")
    groups = [tasks] if config.joint else [[t] for t in tasks]
    losses: dict[str, float] = {}
    for group in groups:
        losses.update(
            _fit_group(
                {t: models[t] for t in group},
                {t: data[t] for t in group},
                config,
                seed,
                progress,
                distill,
                epoch_end,
            )
        )
    return losses


def _task_loss(criterion: nn.Module, distill: Distillation | None, task: str):
    """The task's loss ``(logits, labels, inputs)``: cross-entropy, mixed with the teacher's
    softened predictions when distilling."""
    if distill is None or distill.weight == 0:
        return lambda logits, y, x: criterion(logits, y)
    teacher = distill.teachers[task].eval()
    t, w = distill.temperature, distill.weight

    def loss(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = torch.log_softmax(teacher(x) / t, dim=1)
        kl = nn.functional.kl_div(
            torch.log_softmax(logits / t, dim=1), target, reduction="batchmean", log_target=True
        )
        return (1 - w) * criterion(logits, y) + w * t * t * kl

    return loss


def _fit_group(models, data, config, seed, progress, distill=None, epoch_end=None) -> dict[str, float]:
    params = unique_parameters(models.values())
    steps = _steps_per_epoch((d.train for d in data.values()), config)
    total = steps * config.epochs
    if total == 0 or not params:
        return {}
    optimizer = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total) if config.schedule == "cosine" else None
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    losses = {t: _task_loss(criterion, distill, t) for t in models}
    streams = {t: _endless(d.train, config, seed + i) for i, (t, d) in enumerate(data.items())}
    for m in models.values():
        m.train()
    desc = "joint" if len(models) > 1 else next(iter(models))
    steps_iter: Iterable[int] = range(total)
    if progress is not None:
        steps_iter = progress(steps_iter, total=total, desc=f"fit {desc}")
    sums = dict.fromkeys(models, 0.0)
    for step in steps_iter:
        if step % steps == 0:
            sums = dict.fromkeys(models, 0.0)
        optimizer.zero_grad(set_to_none=True)
        for t, model in models.items():
            x, y = next(streams[t])
            loss = losses[t](model(x), y, x)
            loss.backward()
            sums[t] += loss.item()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if epoch_end is not None and (step + 1) % steps == 0:
            epoch_end(step // steps, {t: s / steps for t, s in sums.items()})
            _follow_parameters(optimizer, models.values())
    return {t: s / steps for t, s in sums.items()}


def _follow_parameters(optimizer: torch.optim.Optimizer, models: Iterable[nn.Module]) -> None:
    """Point ``optimizer`` (one parameter group) at the models' current parameters.

    Parameters it already had keep their state (momentum); new ones start without; state of
    parameters no longer in the models is dropped.
    """
    params = unique_parameters(models)
    ids = {id(p) for p in params}
    optimizer.param_groups[0]["params"] = params
    for p in [p for p in optimizer.state if id(p) not in ids]:
        del optimizer.state[p]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: ArrayDataset,
    *,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Top-1 accuracy (a fraction) and mean cross-entropy of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    batches: Iterable = iterate_batches(dataset, batch_size)
    if progress is not None:
        batches = progress(batches, total=math.ceil(len(dataset) / batch_size), desc="evaluate")
    for x, y in batches:
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate: the dataset is empty")
    return {"accuracy": correct / n, "loss": loss / n}
