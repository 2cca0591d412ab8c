"""What every benchmark script shares: timestamped progress lines and the result files."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_results(
    out: Path,
    tag: str,
    rows: list[dict[str, Any]],
    extra: dict[str, Any],
    *,
    plot: Callable[[Path, list[dict[str, Any]], str], None] | None = None,
) -> None:
    """``<tag>.csv`` of the rows (columns in order of first appearance), ``<tag>.json`` of
    ``extra``, and ``<tag>.png`` drawn by ``plot(path, rows, tag)`` when given."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{tag}.json").write_text(json.dumps(extra, indent=1))
    if plot is not None:
        plot(out / f"{tag}.png", rows, tag)
    log(f"wrote {out / tag}.csv, .json{', .png' if plot else ''}")
