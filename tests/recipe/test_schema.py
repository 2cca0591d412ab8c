from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from jtucker_plugin.recipe.schema import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    params: float


@dataclass(frozen=True)
class Outer:
    name: str
    epochs: int = 1
    mode: Literal["a", "b"] = "a"
    flags: list[bool] = field(default_factory=list)
    budget: Inner | None = None
    table: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs: expected an integer >= 0, got {self.epochs}")


def test_builds_nested_configs_and_round_trips():
    cfg = from_dict(Outer, {"name": "x", "epochs": 2, "budget": {"params": 1}, "table": {"a": 1}})
    assert cfg == Outer("x", 2, "a", [], Inner(1.0), {"a": 1})
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_names_path_and_suggests():
    with pytest.raises(ConfigError, match=r"s\[1\]\.epocs: unknown key 'epocs'; did you mean 'epochs'\?"):
        from_dict(Outer, {"name": "x", "epocs": 2}, "s[1]")


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"name": 3}, "name", "expected a string, got 3"),
        ({"name": "x", "epochs": 1.5}, "epochs", "expected an integer, got 1.5"),
        ({"name": "x", "epochs": True}, "epochs", "expected an integer, got True"),
        ({"name": "x", "mode": "c"}, "mode", "expected one of 'a', 'b', got 'c'"),
        ({"name": "x", "flags": [True, "no"]}, r"flags\[1\]", "expected true or false"),
        ({"name": "x", "budget": 0.3}, "budget", "expected a mapping or null, got 0.3"),
        ({"name": "x", "budget": {"param": 1}}, "budget.param", "unknown key 'param'"),
        ({"name": "x", "table": {"a": "b"}}, "table.a", "expected an integer"),
        ({}, "name", "missing required key"),
        ({"name": "x", "epochs": -1}, "epochs", "expected an integer >= 0, got -1"),
    ],
)
def test_each_error_names_the_field(data, path, expected):
    with pytest.raises(ConfigError, match=rf"^stages\[2\]\.jtucker\.{path}: {expected}"):
        from_dict(Outer, data, "stages[2].jtucker")


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping, got"):
        from_dict(Outer, [1, 2], "tasks.a")
