"""Recipes on the real data in ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("recipe", "task", "minimum"), [("resnet20", "resnet20", 0.91), ("resnet56", "resnet56", 0.925)]
)
def test_pretrained_cifar_resnets_reach_their_accuracy(
    shared_data, monkeypatch, tmp_path, recipe, task, minimum
):
    """Architecture, weights and preprocessing are right: the published accuracy on lossless images."""
    monkeypatch.setenv("JTUCKER_DATA", str(shared_data))
    run_recipe(load_recipe(REPO / "recipes" / f"pretrained-{recipe}-npz.yaml"), output=tmp_path, quiet=True)
    report = json.loads((tmp_path / "report.json").read_text())
    accuracy = report["tasks"][task]["accuracy"]
    assert minimum <= accuracy <= 1.0
