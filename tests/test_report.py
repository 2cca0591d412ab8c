import ast
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import jtucker_plugin.report as report_module
from jtucker_plugin.report import Report, format_metric, write_report

REPO = Path(__file__).resolve().parents[1]


def full_report() -> Report:
    return Report(
        name="digits-jtucker",
        tasks={
            "mnist": {
                "accuracy": 0.91,
                "accuracy_before": 0.92,
                "parameters": 272474,
                "macs": 40_600_000,
                "bytes": 1_090_000,
                "latency_ms_b1": 2.1,
                "latency_ms_b32": 20.5,
            },
            "svhn": {
                "accuracy": 0.875,
                "accuracy_before": 0.88,
                "parameters": 272474,
                "macs": 40_600_000,
                "bytes": 1_090_000,
                "latency_ms_b1": 2.3,
                "latency_ms_b32": 21.0,
            },
        },
        bundle={
            "tasks": 2,
            "unique_parameters": 169_500,
            "dense_parameters": 544_948,
            "compression_ratio": 3.2150,
            "bytes": 700_000,
        },
        stages=[
            {"stage": "finetune", "index": 0, "seconds": 12.3, "status": "ran"},
            {"stage": "jtucker", "index": 1, "seconds": 95.0, "status": "resumed"},
        ],
        provenance={
            "recipe": "recipes/digits.yaml",
            "seed": 0,
            "versions": {"torch": "2.14.1"},
            "date": "2025-01-01T00:00:00",
        },
    )


def sparse_report() -> Report:
    return Report(
        name="partial",
        tasks={
            "mnist": {"accuracy": None, "accuracy_before": 0.9, "parameters": None},
            "svhn": {"latency_ms_b1": None},
            "cifar": {},
        },
        bundle={"tasks": 3, "compression_ratio": None},
        stages=[{"stage": "finetune", "index": 0, "seconds": None, "status": "ran"}],
        provenance={},
    )


def test_json_round_trip():
    report = full_report()
    data = json.loads(json.dumps(report.to_json()))
    assert data["tasks"]["mnist"]["accuracy"] == 0.91  # raw fraction, not a percentage
    assert Report.from_json(data) == report


def test_to_json_makes_plain_data():
    report = Report(
        name="x",
        tasks={"a": {"accuracy": np.float64(0.5), "parameters": np.int64(7), "bytes": float("nan")}},
        bundle={"ranks": (1, 2)},
        stages=[],
        provenance={"recipe": Path("r.yaml")},
    )
    data = report.to_json()
    assert data["tasks"]["a"] == {"accuracy": 0.5, "parameters": 7, "bytes": None}
    assert type(data["tasks"]["a"]["parameters"]) is int
    assert data["bundle"] == {"ranks": [1, 2]}
    assert data["provenance"] == {"recipe": "r.yaml"}
    json.dumps(data, allow_nan=False)


def test_to_json_names_the_place_of_an_unstorable_value():
    report = Report("x", {"a": {"accuracy": object()}}, {}, [], {})
    with pytest.raises(TypeError, match=r"tasks\['a'\]\['accuracy'\]: cannot store a object"):
        report.to_json()


def test_from_json_rejects_missing_and_unknown_fields():
    data = full_report().to_json()
    del data["stages"]
    data["stagse"] = []
    with pytest.raises(KeyError, match=r"missing fields \['stages'\], unknown fields \['stagse'\]"):
        Report.from_json(data)
    with pytest.raises(TypeError, match="expected a dict"):
        Report.from_json([])


def test_report_rejects_wrongly_typed_fields():
    with pytest.raises(TypeError, match=r"Report.tasks\['a'\]: expected a dict of metrics"):
        Report("x", {"a": 0.9}, {}, [], {})
    with pytest.raises(TypeError, match="Report.stages: expected a list of dicts"):
        Report("x", {}, {}, {"stage": "a"}, {})


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("accuracy", 0.91, "91.00%"),
        ("accuracy_before", 0.8765, "87.65%"),
        ("parameters", 272474, "0.27M"),
        ("unique_parameters", 11_689_512, "11.69M"),
        ("parameters", 4321, "4,321"),
        ("macs", 40_600_000, "40.6M"),
        ("macs", 1_814_073_344, "1.81G"),
        ("bytes", 1_090_000, "1.04 MB"),
        ("bytes", 2048, "2.00 KB"),
        ("bytes", 100, "100 B"),
        ("latency_ms_b1", 2.1, "2.10 ms"),
        ("compression_ratio", 3.2149, "3.21x"),
        ("seconds", 12.34, "12.3 s"),
        ("seconds", 125, "2 min 05 s"),
        ("tasks", 3, "3"),
        ("accuracy", None, "–"),
        ("accuracy", float("nan"), "–"),
        ("anything", "text", "text"),
    ],
)
def test_format_metric(key, value, text):
    assert format_metric(key, value) == text


def test_markdown_has_each_task_the_bundle_and_the_stages():
    text = full_report().to_markdown()
    lines = text.splitlines()
    mnist = next(line for line in lines if line.startswith("| mnist "))
    for cell in ("92.00%", "91.00%", "0.27M", "40.6M", "1.04 MB", "2.10 ms", "20.50 ms"):
        assert f" {cell} " in mnist
    assert any(line.startswith("| svhn ") and " 87.50% " in line for line in lines)
    assert "| compression ratio | 3.21x |" in lines
    assert "| unique parameters | 0.17M |" in lines
    assert "| 1 | jtucker | resumed | 1 min 35 s |" in lines
    assert "- versions: torch 2.14.1" in lines
    header = next(line for line in lines if line.startswith("| task "))
    assert header.index("accuracy before") < header.index("latency b1") < header.index("b32")


def test_markdown_escapes_pipes():
    report = Report("a|b", {"t|1": {"accuracy": 0.5}}, {}, [], {})
    assert "| t\\|1 | 50.00% |" in report.to_markdown().splitlines()


def test_missing_values_still_render(tmp_path):
    report = sparse_report()
    text = report.to_markdown()
    assert "| mnist | 90.00% | – | – | – |" in text.splitlines()
    assert "| cifar | – | – | – | – |" in text.splitlines()
    assert "| compression ratio | – |" in text.splitlines()

    out = io.StringIO()
    report.print(Console(file=out, width=200))
    assert "mnist" in out.getvalue() and "90.00%" in out.getvalue()

    paths = write_report(report, tmp_path)
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")
    write_report(Report("empty", {}, {}, [], {}), tmp_path / "empty")


def test_print_shows_the_tables():
    out = io.StringIO()
    full_report().print(Console(file=out, width=200))
    text = out.getvalue()
    assert all(word in text for word in ("mnist", "svhn", "3.21x", "finetune", "91.00%"))


def test_write_report_writes_three_files_and_no_temporaries(tmp_path):
    report = full_report()
    folder = tmp_path / "run" / "report"
    paths = write_report(report, folder)
    assert paths == {
        "json": folder / "report.json",
        "markdown": folder / "report.md",
        "plot": folder / "report.png",
    }
    assert sorted(os.listdir(folder)) == ["report.json", "report.md", "report.png"]
    assert Report.from_json(json.loads(paths["json"].read_text())) == report
    assert paths["markdown"].read_text(encoding="utf-8") == report.to_markdown()
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")

    write_report(sparse_report(), folder)  # replaces the previous files
    assert sorted(os.listdir(folder)) == ["report.json", "report.md", "report.png"]
    assert json.loads(paths["json"].read_text())["name"] == "partial"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")

    def fail(file):
        file.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        report_module._write_atomic(target, fail, "w")
    assert os.listdir(tmp_path) == ["report.md"]
    assert target.read_text() == "old"


def test_report_module_imports_neither_torch_nor_matplotlib_at_import_time():
    tree = ast.parse(Path(report_module.__file__).read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert top_level.isdisjoint({"torch", "matplotlib", "numpy"})


def test_plotting_leaves_pyplot_alone(tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from jtucker_plugin.report import Report, write_report\n"
        "assert 'matplotlib' not in sys.modules\n"
        "write_report(Report('x', {'a': {'accuracy': 0.5}}, {}, [], {}), Path(sys.argv[1]))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.png").exists()
