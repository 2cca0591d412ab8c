"""Typed configs from plain data: one validator for every config in the plugin.

Every config (a recipe, a task, each stage's parameters) is a frozen dataclass. ``from_dict``
builds one from YAML-shaped data and checks it against the dataclass's type hints, so that a
wrong key, type or value is reported with its place in the recipe, e.g.
``recipes/x.yaml: stages[2].jtucker.ranks.budget: expected a mapping, got 0.3``.

Supported annotations: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``None``,
``Literal[...]``, ``X | Y``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and nested
dataclasses. A dataclass may define ``__post_init__`` raising ``ValueError``; the message is
reported at that dataclass's path, or at ``path.field`` when it starts with ``"field: "``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or config value that is not what was expected.

    ``str(err)`` reads ``<file>: <field path>: <message>``; ``err.path`` and ``err.file`` keep the
    parts for programs.
    """

    def __init__(self, path: str, message: str, file: str | None = None):
        self.path, self.message, self.file = path, message, file
        where = ": ".join(p for p in (file, path) if p)
        super().__init__(f"{where}: {message}" if where else message)

    def in_file(self, file: str) -> ConfigError:
        """The same error, attributed to ``file``."""
        return ConfigError(self.path, self.message, file)


def did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` when ``name`` is close to one of ``choices``, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def join_path(path: str, key: str | int) -> str:
    """``join_path("stages[2]", "ranks") == "stages[2].ranks"``; ints become ``[i]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that shape."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        # type() as well as ==, so that True is not taken for 1.
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        if isinstance(value, str):
            options = [str(a) for a in typing.get_args(tp)]
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}{did_you_mean(value, options)}")
    elif origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return convert(arm, value, path)
            except ConfigError as err:
                errors.append(err)
        # A mapping that is meant to be a dataclass deserves the inner, more precise message.
        deep = [e for e in errors if e.path != path]
        if deep:
            raise deep[0]
    elif origin in (list, tuple):
        if isinstance(value, list | tuple):
            (item_tp, *_) = typing.get_args(tp) or (Any,)
            items = [convert(item_tp, v, join_path(path, i)) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, val_tp = typing.get_args(tp) or (Any, Any)
            out = {}
            for k, v in value.items():
                if key_tp is str and not isinstance(k, str):
                    raise ConfigError(join_path(path, str(k)), f"keys must be strings, got {k!r}")
                out[k] = convert(val_tp, v, join_path(path, str(k)))
            return out
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {tp!r} at {path}")
    raise ConfigError(path, f"expected {_type_name(tp)}, got {_describe(value)}")


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Parameters
    ----------
    cls
        A dataclass type; its fields' annotations say what each key accepts.
    data
        A mapping (``None`` means an empty one).
    path
        Where ``data`` sits in the recipe, for messages.

    Raises
    ------
    ConfigError
        Naming the field's path and what was expected.

    Examples
    --------
    >>> @dataclasses.dataclass(frozen=True)
    ... class Cfg:
    ...     lr: float = 0.1
    >>> from_dict(Cfg, {"lr": 1})
    Cfg(lr=1.0)
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        raise ConfigError(
            join_path(path, key),
            f"unknown key {key!r}{did_you_mean(key, fields)}; allowed: {', '.join(fields)}",
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], join_path(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(join_path(path, name), f"missing required key ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # Raised by a nested parser in __post_init__: its path is relative to this dataclass.
        raise ConfigError(join_path(path, err.path), err.message) from None
    except ValueError as err:
        message = str(err)
        field, sep, rest = message.partition(": ")
        if sep and field in fields:
            raise ConfigError(join_path(path, field), rest) from None
        raise ConfigError(path, message) from None


def to_dict(config: Any) -> Any:
    """The plain-data form of a config: ``from_dict(type(c), to_dict(c)) == c``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def describe_fields(cls: type) -> list[tuple[str, str, Any]]:
    """``(name, type, default)`` for each field of a config dataclass, for ``jtucker stages``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "required"
        out.append((f.name, _type_name(hints[f.name]), default))
    return out
