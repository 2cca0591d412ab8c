from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jtucker_plugin.recipe.load import dump_recipe, load_recipe, parse_recipe
from jtucker_plugin.recipe.schema import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _recipe(**over):
    data = {
        "name": "t",
        "tasks": {
            "low": {
                "data": {"dataset": "digits", "classes": ["0", "1"]},
                "model": {"arch": "resnet8"},
            },
            "high": {
                "data": {"dataset": "digits", "classes": ["2", "3"]},
                "model": {"arch": "resnet8"},
            },
        },
        "stages": [{"finetune": {"epochs": 1}}, "evaluate", {"export": {}}],
    }
    data.update(over)
    return data


def _write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_multi_stage_recipe_round_trips():
    recipe = parse_recipe(
        _recipe(
            stages=[
                {"finetune": {"epochs": 2, "joint": True}},
                {"jtucker": {"ranks": {"strategy": "budget", "budget": {"params": 0.3}}}},
                {"tucker": {"ranks": {"strategy": "energy", "energy": 0.8}, "exclude": ["linear"]}},
                "evaluate",
                {"export": {}},
            ]
        )
    )
    assert [s.name for s in recipe.stages] == [
        "finetune",
        "jtucker",
        "tucker",
        "evaluate",
        "export",
    ]
    assert parse_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_quickstart_recipes_validate():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        text = path.read_text()
        if "${JTUCKER_DATA}" in text:
            continue  # checked against real data in test_shared_recipes_validate
        load_recipe(path)


def test_shared_recipes_validate(shared_data, monkeypatch):
    monkeypatch.setenv("JTUCKER_DATA", str(shared_data))
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        load_recipe(path)


def test_env_expansion_and_missing_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("JT_TEST_OUT", str(tmp_path / "out"))
    recipe = parse_recipe(_recipe(output="${JT_TEST_OUT}/run", data_root="${JT_UNSET_VAR:-.}"))
    assert recipe.output == f"{tmp_path}/out/run" and recipe.data_root == "."
    monkeypatch.delenv("JT_UNSET_VAR", raising=False)
    path = _write(tmp_path, _recipe(data_root="${JT_UNSET_VAR}"))
    with pytest.raises(
        ConfigError, match=r"r\.yaml: data_root: environment variable JT_UNSET_VAR is not set"
    ):
        load_recipe(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"stages": [{"tuker": {}}]},
            r"stages\[0\]: unknown stage 'tuker'; did you mean 'tucker'\?",
        ),
        (
            {"stages": [{"finetune": {"epoch": 1}}]},
            r"stages\[0\]\.finetune\.epoch: unknown key 'epoch'",
        ),
        (
            {"stages": [{"finetune": {"lr": "fast"}}]},
            r"stages\[0\]\.finetune\.lr: expected a number, got 'fast'",
        ),
        ({"stages": [{"finetune": {}, "evaluate": {}}]}, r"stages\[0\]: expected one stage"),
        (
            {"stages": [{"jtucker": {"ranks": {"strategy": "budget", "budget": 0.3}}}]},
            r"stages\[0\]\.jtucker\.ranks\.budget: ",
        ),
        ({"seed": "zero"}, r"seed: expected an integer"),
        ({"colour": 1}, r"colour: unknown key 'colour'"),
        ({"tasks": {}}, r"tasks: expected at least one task"),
        (
            {"tasks": {"a": {"data": {"dataset": "digitz"}, "model": {"arch": "resnet8"}}}},
            r"tasks\.a\.data\.dataset: expected one of .*did you mean 'digits'",
        ),
        (
            {"tasks": {"a": {"data": {"dataset": "digits"}}}},
            r"tasks\.a\.model: missing required key",
        ),
    ],
)
def test_schema_errors_name_file_and_field(tmp_path, change, message):
    path = _write(tmp_path, _recipe(**change))
    with pytest.raises(ConfigError, match=rf"r\.yaml: {message}"):
        load_recipe(path)


def test_file_checks(tmp_path):
    bad_weights = _recipe()
    bad_weights["tasks"]["low"]["model"]["weights"] = "nope.th"
    with pytest.raises(ConfigError, match=r"tasks\.low\.model\.weights: file not found: .*nope\.th"):
        load_recipe(_write(tmp_path, bad_weights))
    bad_npz = _recipe()
    bad_npz["tasks"]["low"]["data"] = {"dataset": "npz", "path": "missing.npz"}
    with pytest.raises(ConfigError, match=r"tasks\.low\.data\.path: not found: .*missing\.npz"):
        load_recipe(_write(tmp_path, bad_npz))
    with pytest.raises(ConfigError, match=r"data_root: folder not found"):
        load_recipe(_write(tmp_path, _recipe(data_root=str(tmp_path / "absent"))))


def test_architecture_checks(tmp_path):
    mixed = _recipe()
    mixed["tasks"]["high"]["model"]["arch"] = "resnet20"
    with pytest.raises(
        ConfigError,
        match=r"tasks\.(high|low)\.model: all tasks must share one architecture; this task has resnet",
    ):
        load_recipe(_write(tmp_path, mixed))
    unknown = _recipe()
    unknown["tasks"]["low"]["model"]["arch"] = "resnet2O"
    with pytest.raises(ConfigError, match=r"tasks\.low\.model\.arch: unknown architecture 'resnet2O'"):
        load_recipe(_write(tmp_path, unknown))


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(
        ConfigError, match=r"r\.yaml: line 3, column 1: not valid YAML: expected the node content"
    ):
        load_recipe(_write(tmp_path, "name: x\nstages: [a, {b: \n"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
