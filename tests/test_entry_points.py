"""Third-party stages: a separate package declares a stage through the entry-point group
``jtucker_plugin.stages``; once installed, a recipe runs it (in a fresh process, as a user would).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from jtucker_plugin.recipe.registry import ENTRY_POINT_GROUP

# Unique per process: two test runs sharing the venv must not install over each other.
PACKAGE = f"jtucker_probe_stage_{os.getpid()}"
STAGE = f"probe_{os.getpid()}"

PYPROJECT = f"""
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{PACKAGE.replace("_", "-")}"
version = "0.1.0"

[project.entry-points."{ENTRY_POINT_GROUP}"]
{STAGE} = "{PACKAGE}"
"""

MODULE = f'''
"""A third-party stage: counts each task's parameters and leaves a file in its stage folder."""

from dataclasses import dataclass

from jtucker_plugin import StageResult, register_stage


@dataclass(frozen=True)
class ProbeConfig:
    scale: int = 1


@register_stage("{STAGE}", config=ProbeConfig)
def probe(bundle, config, ctx):
    """Count each task's parameters (times scale)."""
    counts = {{t: config.scale * sum(p.numel() for p in m.parameters()) for t, m in bundle.models.items()}}
    (ctx.folder / "probe.json").write_text(__import__("json").dumps(counts))
    return StageResult(bundle, {{"tasks": {{t: {{"probe_parameters": n}} for t, n in counts.items()}}}})
'''


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def installed_stage(tmp_path):
    source = tmp_path / "probe"
    (source / PACKAGE).mkdir(parents=True)
    (source / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (source / PACKAGE / "__init__.py").write_text(textwrap.dedent(MODULE))
    done = _pip("install", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--quiet", str(source))
    if done.returncode != 0:
        pytest.fail(f"pip install of the probe package failed:\n{done.stdout}\n{done.stderr}")
    try:
        yield STAGE
    finally:
        done = _pip("uninstall", "--yes", "--quiet", PACKAGE.replace("_", "-"))
        assert done.returncode == 0, f"could not uninstall the probe package:\n{done.stderr}"


def test_an_installed_package_adds_a_stage_that_recipes_run(installed_stage, tmp_path):
    task = {
        "data": {
            "dataset": "digits",
            "classes": ["0", "1"],
            "image_size": 8,
            "channels": 1,
            "mean": [0.5],
            "std": [0.5],
            "train_per_class": 5,
            "test_per_class": 5,
        },
        "model": {"arch": "resnet8", "width": 0.5},
    }
    recipe = {
        "name": "third-party",
        "seed": 0,
        "output": str(tmp_path / "out"),
        "tasks": {"a": task},
        "stages": [{installed_stage: {"scale": 2}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    listed = subprocess.run(
        [sys.executable, "-m", "jtucker_plugin", "stages", installed_stage],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr
    assert installed_stage in listed.stdout and "Count each task's parameters" in listed.stdout

    run = subprocess.run(
        [sys.executable, "-m", "jtucker_plugin", "--quiet", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    expected = 2 * report["tasks"]["a"]["parameters"]
    assert report["tasks"]["a"]["probe_parameters"] == expected
    files = tmp_path / "out" / "stages" / f"00-{installed_stage}" / "files" / "probe.json"
    assert json.loads(files.read_text()) == {"a": expected}
