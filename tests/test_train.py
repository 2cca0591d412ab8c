"""train.fit: distillation pulls the student towards its teacher (and the finetune stage takes its
teachers from an earlier stage; bad settings are named); epoch_end may replace parameters."""

from __future__ import annotations

import copy

import pytest
import torch

from jtucker_plugin.data import ArrayDataset, TaskData
from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe
from jtucker_plugin.recipe.schema import ConfigError
from jtucker_plugin.train import Distillation, FitConfig, fit

CONFIG = FitConfig(epochs=6, batch_size=16, lr=0.05)


def _data(seed: int) -> TaskData:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=gen)
    # Labels that carry nothing: only a teacher can say what the outputs should be.
    ds = ArrayDataset(images, torch.randint(0, 4, (64,), generator=gen), (0.5,) * 3, (0.25,) * 3)
    return TaskData(ds, None, ds, [str(i) for i in range(4)], augment=False)


def _kl_to(teacher: torch.nn.Module, student: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = torch.log_softmax(teacher.eval()(x), dim=1)
        q = torch.log_softmax(student.eval()(x), dim=1)
    return float(torch.nn.functional.kl_div(q, p, reduction="batchmean", log_target=True))


def test_distillation_pulls_the_student_to_its_teacher_and_leaves_the_teacher_alone():
    torch.manual_seed(0)
    teacher = create_model("resnet8", 4, width=0.5, seed=1).eval()
    before = copy.deepcopy(teacher.state_dict())
    start = create_model("resnet8", 4, width=0.5, seed=2)
    data = {"t": _data(3)}
    x = data["t"].train.images[:32].float().sub(127.5).div(64)

    plain, distilled = copy.deepcopy(start), copy.deepcopy(start)
    fit({"t": plain}, data, CONFIG, seed=0)
    fit({"t": distilled}, data, CONFIG, seed=0, distill=Distillation({"t": teacher}, weight=1.0))

    assert _kl_to(teacher, distilled, x) < 0.5 * _kl_to(teacher, plain, x)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_distillation_settings_are_named():
    teacher = create_model("resnet8", 4, width=0.5, seed=1)
    with pytest.raises(ValueError, match=r"distill: expected a number in \[0, 1\], got 1.5"):
        Distillation({"t": teacher}, weight=1.5)
    with pytest.raises(ValueError, match="temperature: expected a number > 0, got 0"):
        Distillation({"t": teacher}, temperature=0)
    student = create_model("resnet8", 4, width=0.5, seed=2)
    with pytest.raises(ValueError, match=r"distill: no teacher model for task\(s\) \['t'\]"):
        fit({"t": student}, {"t": _data(3)}, CONFIG, distill=Distillation({"other": teacher}))


TRAIN = {"train": {"epochs": 2, "batch_size": 16, "lr": 0.05}}


def _mean_kl_to_teachers(out_dir, stage: str) -> float:
    stages = out_dir / "out" / "stages"
    teacher, student = Bundle.load(stages / "00-train" / "bundle"), Bundle.load(stages / stage / "bundle")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    return sum(_kl_to(teacher.models[t], student.models[t], x) for t in teacher.tasks) / len(teacher.tasks)


@pytest.mark.parametrize(
    ("compress", "recover"),
    [
        (
            {"jtucker": {"ranks": {"strategy": "ratio", "ratio": 0.5}, "min_params": 0}},
            {"finetune": {"epochs": 3, "batch_size": 16}},
        ),
        # At the training's learning rate: the noise labels move a student that is not pulled.
        (None, {"hybrid": {"density": 0.02, "epochs": 3, "batch_size": 16, "lr": 0.05}}),
    ],
    ids=["finetune", "hybrid"],
)
def test_stages_distil_from_an_earlier_stage(tiny_recipe, tmp_path, compress, recover):
    # The same recipe with and without distill: only the teachers' pull tells them apart.
    (name, options), stages = next(iter(recover.items())), [TRAIN, *([compress] if compress else [])]
    last = f"{len(stages):02d}-{name}"
    kl = {}
    for weight in (0.0, 1.0):
        distill = {"distill": weight, "teacher_stage": 0} if weight else {}
        out = tmp_path / f"distill{weight}"
        out.mkdir()
        recipe = tiny_recipe([*stages, {name: {**options, **distill}}], train_per_class=20)
        run_recipe(load_recipe(recipe), quiet=True, output=out / "out")
        kl[weight] = _mean_kl_to_teachers(out, last)
    assert kl[1.0] < 0.8 * kl[0.0]


def test_bad_distillation_options_are_named_when_the_recipe_loads(tiny_recipe):
    for options, message in (
        ({"distill": 0.5}, r"teacher_stage: distill needs the index of the stage"),
        ({"distill": 2.0, "teacher_stage": 0}, r"distill: expected a number in \[0, 1\], got 2.0"),
        ({"temperature": 0}, r"temperature: expected a number > 0, got 0"),
        ({"distill": 0.5, "teacher_stage": 1}, r"teacher_stage: expected .* earlier stage \(0 to 0\), got 1"),
    ):
        with pytest.raises(ConfigError, match=rf"stages\[1\]\.finetune\.{message}"):
            load_recipe(tiny_recipe([TRAIN, {"finetune": options}], train_per_class=20))
    with pytest.raises(
        ConfigError, match=r"stages\[0\]\.hybrid\.teacher_stage: .*\(none: this is the first stage\)"
    ):
        load_recipe(tiny_recipe([{"hybrid": {"density": 0.1, "distill": 0.5, "teacher_stage": 0}}]))
    with pytest.raises(ConfigError, match=r"stages\[0\]\.hybrid\.joint: .*trains all tasks jointly"):
        load_recipe(tiny_recipe([{"hybrid": {"density": 0.1, "joint": False}}]))


def test_epoch_end_sees_every_epoch_and_a_parameter_it_replaces_trains_on():
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))

    data = {"a": _data(0)}
    config = FitConfig(epochs=3, batch_size=16, max_batches=2, lr=0.05)
    plain, watched, cut = model(), model(), model()
    fit({"a": plain}, data, config, seed=1)
    seen = []
    fit({"a": watched}, data, config, seed=1, epoch_end=lambda epoch, losses: seen.append((epoch, losses)))
    # Watching changes nothing: the same optimiser and schedule throughout.
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters(), strict=True))
    assert [e for e, _ in seen] == [0, 1, 2] and all(set(losses) == {"a"} for _, losses in seen)

    replaced = {}

    def replace_weight(epoch: int, losses: dict[str, float]) -> None:
        if epoch == 0:  # a pruning step would make a new, smaller tensor
            cut[1].weight = torch.nn.Parameter(cut[1].weight.detach().clone())
            replaced["weight"] = cut[1].weight.detach().clone()

    fit({"a": cut}, data, config, seed=1, epoch_end=replace_weight)
    assert not torch.equal(cut[1].weight, replaced["weight"])  # the new parameter was trained
