"""The runner end to end on the embedded digits data: stages, checkpoints, resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jtucker_plugin.cli import main
from jtucker_plugin.multitask import Bundle
from jtucker_plugin.recipe.load import load_recipe
from jtucker_plugin.recipe.runner import run_recipe

REPO = Path(__file__).resolve().parents[2]


def test_resume_skips_finished_stages_and_reruns_changed_ones(tmp_path, tiny_recipe):
    stages = [
        {"train": {"epochs": 1, "batch_size": 16}},
        {"evaluate": {"latency": False}},
        {"export": {}},
    ]
    path = tiny_recipe(stages)
    first = run_recipe(load_recipe(path), quiet=True)
    assert [s["status"] for s in first.stages] == ["ran", "ran", "ran"]
    out = tmp_path / "out"
    checkpoint = out / "stages" / "00-train" / "result.json"
    stamp = checkpoint.stat().st_mtime_ns

    second = run_recipe(load_recipe(path), quiet=True)
    assert [s["status"] for s in second.stages] == ["resumed", "resumed", "resumed"]
    assert second.tasks["a"]["accuracy"] == first.tasks["a"]["accuracy"]
    assert checkpoint.stat().st_mtime_ns == stamp

    stages[1] = {
        "evaluate": {"latency": False, "batch_size": 64}
    }  # a changed stage reruns, with what follows
    path = tiny_recipe(stages)
    third = run_recipe(load_recipe(path), quiet=True)
    assert [s["status"] for s in third.stages] == ["resumed", "ran", "ran"]
    assert checkpoint.stat().st_mtime_ns == stamp

    forced = run_recipe(load_recipe(path), quiet=True, force=True)
    assert [s["status"] for s in forced.stages] == ["ran", "ran", "ran"]
    # Same recipe and seed: the same result.
    assert forced.tasks["a"]["accuracy"] == first.tasks["a"]["accuracy"]
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_report_files_and_bundle(tmp_path, tiny_recipe):
    stages = [
        {"train": {"epochs": 2, "batch_size": 16}},
        {"evaluate": {"repeats": 2}},
        {"finetune": {"epochs": 1, "joint": True, "batch_size": 16}},
        {"evaluate": {"repeats": 2}},
        {"export": {}},
    ]
    report = run_recipe(load_recipe(tiny_recipe(stages)), quiet=True)
    out = tmp_path / "out"
    data = json.loads((out / "report.json").read_text())
    for task in ("a", "b"):
        row = data["tasks"][task]
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["accuracy_before"] <= 1
        assert row["parameters"] > 0 and row["macs"] > 0 and row["bytes"] > 0
        assert row["latency_ms_b1"] > 0 and row["latency_ms_b32"] > 0
    assert data["bundle"]["compression_ratio"] == pytest.approx(1.0)
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    bundle = Bundle.load(out / "bundle")
    assert bundle.tasks == ["a", "b"] and report.bundle["unique_parameters"] == bundle.unique_parameters()


def test_cli_validate_and_stages(tmp_path, capsys, tiny_recipe):
    path = tiny_recipe([{"evaluate": {}}])
    assert main(["validate", str(path)]) == 0
    assert "valid (2 tasks" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("evaluate: {}", "evaluate: {batch: 3}"))
    assert main(["validate", str(bad)]) == 2
    assert "bad.yaml: stages[0].evaluate.batch: unknown key 'batch'" in capsys.readouterr().err
    assert main(["stages"]) == 0
    listing = capsys.readouterr().out
    for name in ("train", "finetune", "evaluate", "export", "jtucker", "tucker"):
        assert f"\n{name}: " in "\n" + listing
    assert "    epochs: an integer = 1" in listing


def test_quickstart_recipe_end_to_end(tmp_path, capsys):
    """The README's main job: the embedded digits recipe, as shipped."""
    out = tmp_path / "quickstart"
    assert (
        main(
            [
                "--quiet",
                "run",
                str(REPO / "recipes" / "quickstart-digits.yaml"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    for task in ("low", "high"):
        assert report["tasks"][task]["accuracy"] >= 0.8, report["tasks"][task]
    assert report["bundle"]["compression_ratio"] > 1.5
    assert main(["info", str(out / "bundle")]) == 0
    assert "TuckerConv2d" in capsys.readouterr().out
