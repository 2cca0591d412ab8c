"""Layer patterns: the fnmatch patterns over module paths that options such as ``keep_per_task`` take.

A pattern selects a layer when it matches the layer's path or the path of a module containing
it (``"layer1"`` selects ``layer1.0.conv1``). A pattern that selects nothing is a mistake (a
typo, another architecture's names) and an error naming the option.

>>> patterns_of("layer1.0.conv1", ["layer1", "conv1", "layer2*"])
['layer1']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any


def check_patterns(patterns: Any, field: str) -> list[str]:
    """``patterns`` as a list, checked to be non-empty strings.

    Raises
    ------
    TypeError
        Naming ``field``, for a string (with the list to write instead) or a non-string entry.
    """
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        hint = f"; write [{patterns!r}]" if isinstance(patterns, str) else ""
        raise TypeError(f"{field}: expected a list of fnmatch patterns, got {patterns!r}{hint}")
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"{field}: expected non-empty pattern strings, got {p!r} in {patterns!r}")
    return list(patterns)


def patterns_of(name: str, patterns: Sequence[str]) -> list[str]:
    """The patterns matching ``name`` or the path of a module containing it."""
    parts = name.split(".")
    paths = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [p for p in patterns if any(fnmatch.fnmatchcase(path, p) for path in paths)]


def check_patterns_match(patterns: Sequence[str], names: Sequence[str], field: str) -> None:
    """Check that every pattern selects one of the layers ``names``.

    Raises
    ------
    ValueError
        Naming ``field`` and the pattern, with the first layers' names.
    """
    used = {p for name in names for p in patterns_of(name, patterns)}
    for p in patterns:
        if p not in used:
            raise ValueError(
                f"{field}: pattern {p!r} matches no layer; layers are "
                f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
            )
