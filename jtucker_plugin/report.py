"""The end-of-run report: per-task and bundle metrics, stage timings and provenance.

A run fills a ``Report`` with plain numbers (accuracy as a fraction, counts as ints) and writes
it with ``write_report`` as ``report.json`` (raw numbers), ``report.md`` (tables formatted for
people) and ``report.png`` (a plot). Any metric may be missing or ``None``; it is shown as
``–``. This module imports neither torch nor, until it plots, matplotlib, so the command line
starts fast.

Examples
--------
>>> report = Report(
...     name="digits",
...     tasks={"mnist": {"accuracy": 0.91, "parameters": 272474}},
...     bundle={"tasks": 1, "compression_ratio": 3.214},
...     stages=[{"stage": "finetune", "index": 0, "seconds": 12.3, "status": "ran"}],
...     provenance={"seed": 0},
... )
>>> Report.from_json(report.to_json()) == report
True
>>> format_metric("parameters", 272474), format_metric("compression_ratio", 3.214)
('0.27M', '3.21x')
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.console import Console

MISSING = "–"

# Task columns in this order first; other keys follow in the order they first appear.
_TASK_ORDER = ("accuracy_before", "accuracy", "parameters", "macs", "bytes")
_LABELS = {
    "accuracy_before": "accuracy before",
    "accuracy": "accuracy",
    "parameters": "parameters",
    "macs": "MACs",
    "bytes": "size",
    "tasks": "tasks",
    "unique_parameters": "unique parameters",
    "dense_parameters": "dense parameters",
    "compression_ratio": "compression ratio",
}
_LATENCY = re.compile(r"latency_ms_b(\d+)")


@dataclasses.dataclass
class Report:
    """Everything a run reports, as plain data.

    Parameters
    ----------
    name
        The run's name (usually the recipe's).
    tasks
        Task name -> metrics, any of ``accuracy``, ``accuracy_before`` (fractions),
        ``parameters``, ``macs``, ``bytes`` (ints), ``latency_ms_b<batch>`` (ms); values may be
        ``None``.
    bundle
        Bundle metrics: ``tasks``, ``unique_parameters``, ``dense_parameters``,
        ``compression_ratio``, ``bytes``.
    stages
        One record per stage: ``{"stage", "index", "seconds", "status": "ran" | "resumed"}``.
    provenance
        Where the numbers come from: recipe path, seed, package versions, date.
    """

    name: str
    tasks: dict[str, dict[str, Any]]
    bundle: dict[str, Any]
    stages: list[dict[str, Any]]
    provenance: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Report.name: expected a str, got {self.name!r}")
        for field in ("tasks", "bundle", "provenance"):
            if not isinstance(getattr(self, field), dict):
                raise TypeError(f"Report.{field}: expected a dict, got {type(getattr(self, field)).__name__}")
        for task, metrics in self.tasks.items():
            if not isinstance(metrics, dict):
                raise TypeError(
                    f"Report.tasks[{task!r}]: expected a dict of metrics, got {type(metrics).__name__}"
                )
        if not isinstance(self.stages, list) or not all(isinstance(s, dict) for s in self.stages):
            raise TypeError(f"Report.stages: expected a list of dicts, got {self.stages!r}")

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data with raw numbers.

        Numpy scalars become Python numbers, paths and dates strings, tuples lists, and
        non-finite floats ``None`` (JSON has no NaN).

        Raises
        ------
        TypeError
            If a value cannot be represented in JSON (its location is named).
        """
        return {
            field.name: _plain(getattr(self, field.name), field.name) for field in dataclasses.fields(self)
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from ``to_json`` data.

        Raises
        ------
        KeyError
            If a field is missing or unknown.
        TypeError
            If ``data`` or one of its fields has the wrong type.
        """
        if not isinstance(data, dict):
            raise TypeError(f"Report.from_json: expected a dict, got {type(data).__name__}")
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = [k for k in data if k not in names]
        if missing or unknown:
            raise KeyError(
                f"Report.from_json: missing fields {missing}, unknown fields {unknown}; "
                f"expected exactly {names}"
            )
        return cls(**data)

    def to_markdown(self) -> str:
        """The report as Markdown: a task table, a bundle table, the stages, provenance."""
        lines = [f"# {_escape(self.name)}", ""]
        for title, (header, rows) in self._sections():
            lines += [f"## {title}", ""]
            if rows:
                lines.append(_md_row(header))
                lines.append("|" + "|".join(" --- " for _ in header) + "|")
                lines += [_md_row(row) for row in rows]
            else:
                lines.append(f"(no {title.lower()} recorded)")
            lines.append("")
        if self.provenance:
            lines += ["## Provenance", ""]
            lines += [f"- {_escape(k)}: {_escape(_describe(v))}" for k, v in self.provenance.items()]
            lines.append("")
        return "\n".join(lines)

    def print(self, console: Console | None = None) -> None:
        """Print the tables on the terminal with rich (to ``console`` or a new one)."""
        from rich.console import Console
        from rich.table import Table

        if console is None:
            console = Console()
            if not console.is_terminal:  # logs and pipes: no 80-column wrapping of the tables
                console = Console(width=160)
        for title, (header, rows) in self._sections():
            if not rows:
                continue
            table = Table(title=f"{self.name}: {title.lower()}", title_justify="left")
            for i, column in enumerate(header):
                text = i == 0 or column in ("stage", "status")
                table.add_column(column, justify="left" if text else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)

    def _sections(self) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
        return [
            ("Tasks", _task_table(self.tasks)),
            ("Bundle", _bundle_table(self.bundle)),
            ("Stages", _stage_table(self.stages)),
        ]


def format_metric(key: str, value: Any) -> str:
    """A metric formatted for a table, chosen by its key.

    ``accuracy*`` as a percentage, ``*parameters`` in millions, ``*macs`` in millions (or
    billions), ``bytes`` in KB/MB/GB of 1024, ``latency_ms*`` in ms with two decimals,
    ``compression_ratio`` as ``3.21x``, ``seconds`` as a duration; ``None`` as ``–``.

    Examples
    --------
    >>> [format_metric(k, v) for k, v in [("accuracy", 0.91), ("macs", 40_600_000),
    ...  ("bytes", 1_090_000), ("latency_ms_b1", 2.1), ("parameters", None)]]
    ['91.00%', '40.6M', '1.04 MB', '2.10 ms', '–']
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    for matches, formatter in _FORMATTERS:
        if matches(key):
            return formatter(value)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _count_millions(value: float) -> str:
    # Small layers and toy models would all read 0.00M; below 10k the exact count is clearer.
    return f"{value / 1e6:.2f}M" if abs(value) >= 10_000 else f"{value:,.0f}"


def _macs(value: float) -> str:
    if abs(value) >= 1e9:
        return f"{value / 1e9:.2f}G"
    return f"{value / 1e6:.1f}M" if abs(value) >= 100_000 else f"{value:,.0f}"


def _bytes(value: float) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


_FORMATTERS: list[tuple[Callable[[str], bool], Callable[[float], str]]] = [
    (lambda k: k.startswith("accuracy"), _percent),
    (lambda k: k.endswith("parameters"), _count_millions),
    (lambda k: k.endswith("macs"), _macs),
    (lambda k: k == "bytes" or k.endswith("_bytes"), _bytes),
    (lambda k: k.startswith("latency_ms"), lambda v: f"{v:.2f} ms"),
    (lambda k: k == "compression_ratio", lambda v: f"{v:.2f}x"),
    (lambda k: k == "seconds", _duration),
]


def _label(key: str) -> str:
    latency = _LATENCY.fullmatch(key)
    if latency:
        return f"latency b{latency.group(1)}"
    return _LABELS.get(key, key.replace("_", " "))


def _task_table(tasks: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    present: list[str] = []
    for metrics in tasks.values():
        present += [k for k in metrics if k not in present]
    latencies = sorted(
        (k for k in present if _LATENCY.fullmatch(k)),
        key=lambda k: int(_LATENCY.fullmatch(k).group(1)),  # type: ignore[union-attr]
    )
    first = [k for k in _TASK_ORDER if k in present] + latencies
    keys = first + [k for k in present if k not in first]
    header = ["task"] + [_label(k) for k in keys]
    rows = [[str(task)] + [format_metric(k, metrics.get(k)) for k in keys] for task, metrics in tasks.items()]
    return header, rows


def _bundle_table(bundle: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [[_label(k), format_metric(k, v)] for k, v in bundle.items()]
    return ["metric", "value"], rows


def _stage_table(stages: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            _describe(s.get("index", MISSING)),
            _describe(s.get("stage", MISSING)),
            _describe(s.get("status", MISSING)),
            format_metric("seconds", s.get("seconds")),
        ]
        for s in stages
    ]
    return ["#", "stage", "status", "time"], rows


def _describe(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, dict):
        return ", ".join(f"{k} {_describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_describe(v) for v in value)
    return str(value)


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(_escape(c) for c in cells) + " |"


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON data; ``where`` names its place for the error message."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"Report.{where}: keys must be str, got {k!r}")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    # numpy scalars and 0-d tensors, recognised without importing either library.
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _plain(value.item(), where)
    raise TypeError(
        f"Report.{where}: cannot store a {type(value).__qualname__} in JSON; use numbers, "
        "str, None, lists and dicts"
    )


def _number(value: Any) -> float | None:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if finite and math.isfinite(value) else None


def _bars(
    axes: Any,
    tasks: dict[str, dict[str, Any]],
    series: list[tuple[str, str]],
    scale: float,
    text: Callable[[float], str],
) -> None:
    """Grouped bars of ``(label, key)`` per task, each labelled with ``text(value)``.

    A missing value gets an "n/a" mark at its place instead of a bar, so the groups stay aligned.
    """
    width = 0.8 / len(series)
    for s, (label, key) in enumerate(series):
        offset = (s - (len(series) - 1) / 2) * width
        for i, metrics in enumerate(tasks.values()):
            value = _number(metrics.get(key))
            if value is None:
                axes.text(i + offset, 0, "n/a", ha="center", va="bottom", fontsize=8)
                continue
            bars = axes.bar(i + offset, value * scale, width, color=f"C{s}", label=label)
            axes.bar_label(bars, [text(value)], fontsize=8)
            label = "_nolegend_"  # one legend entry per series
    if not tasks:
        axes.text(0.5, 0.5, "no tasks recorded", ha="center", transform=axes.transAxes)
    axes.set_xticks(range(len(tasks)), list(tasks), rotation=30 if len(tasks) > 4 else 0)
    axes.set_xlim(-0.6, max(len(tasks), 1) - 0.4)
    axes.set_ylim(bottom=0)


def _plot(report: Report) -> Figure:
    """Accuracy before/after and parameters per task, on a figure outside pyplot's state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(8, 2 + 1.6 * len(report.tasks)), 4), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axes, parameter_axes = figure.subplots(1, 2)
    _bars(
        accuracy_axes,
        report.tasks,
        [("before", "accuracy_before"), ("after", "accuracy")],
        100,
        lambda v: f"{100 * v:.1f}",
    )
    # Headroom above 100% for the bar labels and the legend.
    accuracy_axes.set(title="accuracy per task", ylabel="accuracy (%)", ylim=(0, 122))
    if accuracy_axes.get_legend_handles_labels()[0]:
        accuracy_axes.legend(loc="upper center", ncols=2, fontsize=8)
    _bars(
        parameter_axes,
        report.tasks,
        [("parameters", "parameters")],
        1e-6,
        lambda v: format_metric("parameters", v),
    )
    parameter_axes.margins(y=0.1)
    parameter_axes.set(title="parameters per task", ylabel="parameters (millions)")
    ratio = report.bundle.get("compression_ratio")
    suffix = f" (bundle {format_metric('compression_ratio', ratio)})" if ratio is not None else ""
    figure.suptitle(f"{report.name}{suffix}")
    return figure


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write through ``write(file)`` to a temporary file next to ``path``, then rename it."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_report(report: Report, folder: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``folder``, atomically each.

    Each file is written under a temporary name in ``folder`` and renamed, so a reader never
    sees a partial file. ``folder`` is created if needed.

    Parameters
    ----------
    report
        The report.
    folder
        Destination folder.

    Returns
    -------
    dict[str, Path]
        ``{"json": ..., "markdown": ..., "plot": ...}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    paths = {
        "json": folder / "report.json",
        "markdown": folder / "report.md",
        "plot": folder / "report.png",
    }
    _write_atomic(
        paths["json"],
        lambda f: f.write(json.dumps(data, indent=2, allow_nan=False) + "\n"),
        "w",
    )
    _write_atomic(paths["markdown"], lambda f: f.write(report.to_markdown()), "w")
    figure = _plot(report)
    _write_atomic(paths["plot"], lambda f: figure.savefig(f, format="png", dpi=120), "wb")
    return paths
