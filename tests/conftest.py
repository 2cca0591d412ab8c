"""Shared fixtures: where the real data is, and tiny seeded models."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from jtucker_plugin.models import create_model
from jtucker_plugin.multitask import Bundle, TaskInfo

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$JTUCKER_DATA`` or ``<repo>/../shared/data``, if it exists."""
    candidate = Path(os.environ.get("JTUCKER_DATA", REPO.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    """The real data folder; the test is skipped with the reason when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("needs ../shared/data (or JTUCKER_DATA): real CIFAR-10 / weights not on this machine")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Extraction caches go to a per-session temp folder, never the user's home.
    monkeypatch.setenv("JTUCKER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: on two cores shared with other jobs, several threads make
    quantization and export tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def tiny_recipe_data(
    folder: Path,
    stages: list,
    *,
    tasks: dict[str, list[str]] | None = None,
    train_per_class: int = 40,
    seed: int = 1,
    name: str = "tiny",
) -> dict:
    """A recipe (as data) on scikit-learn's bundled digits at 8x8, ResNet-8 at half width: a
    multi-task run that takes seconds. Tasks default to digits 0-2 (``a``) and 3-5 (``b``)."""
    tasks = tasks or {"a": ["0", "1", "2"], "b": ["3", "4", "5"]}
    data = {
        "dataset": "digits",
        "image_size": 8,
        "channels": 1,
        "mean": [0.5],
        "std": [0.5],
        "augment": False,
        "train_per_class": train_per_class,
    }
    return {
        "name": name,
        "seed": seed,
        "output": str(folder / "out"),
        "tasks": {
            t: {"data": {**data, "classes": c}, "model": {"arch": "resnet8", "width": 0.5}}
            for t, c in tasks.items()
        },
        "stages": stages,
    }


@pytest.fixture
def tiny_recipe(tmp_path):
    """``tiny_recipe(stages, **options) -> path`` of a written ``tiny_recipe_data`` recipe."""

    def write(stages: list, **options) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe_data(tmp_path, stages, **options), sort_keys=False))
        return path

    return write


def close_tasks_bundle(n_tasks: int = 3, width: float = 0.5) -> Bundle:
    """``n_tasks`` ResNet-8 task models that stay close to one backbone, as fine-tuned tasks do
    (each parameter moved by 5% of its spread, seeded per task); 3 x 16 x 16 inputs."""
    base = create_model("resnet8", 10, width=width, seed=0)
    models = {}
    for i in range(n_tasks):
        model = copy.deepcopy(base)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(i + 1)
            for p in model.parameters():
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
        models[f"t{i}"] = model
    info = {
        t: TaskInfo(
            arch="resnet8",
            num_classes=10,
            width=width,
            input_shape=(3, 16, 16),
            dense_parameters=sum(p.numel() for p in m.parameters()),
        )
        for t, m in models.items()
    }
    return Bundle(models, info)
