"""The multi-task bundle: T task models of one architecture, with the parts they share stored once.

Sharing is by identity: a module (J-Tucker's factor convs) or a single ``nn.Parameter`` (a shared
dense weight with per-task additions, MTZ's shared neurons) that is the same Python object in
several task models is one set of numbers: trained once, counted once, saved once.

On disk a bundle is a folder with ``tensors.safetensors`` (each distinct tensor once) and
``manifest.json``: per task its architecture, the layers that differ from the plain
architecture (as registered layer configs, see ``layers.py``) and which stored tensor each of its
state-dict entries is; plus the shared modules, the history of the stages applied, and
provenance. Loading rebuilds everything from that data: nothing is unpickled.

Examples
--------
>>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
>>> shared = nn.Linear(4, 4)
>>> bundle = Bundle({"x": nn.Sequential(shared, a), "y": nn.Sequential(shared, b)},
...                 {t: TaskInfo(arch="custom", num_classes=4) for t in "xy"})
>>> bundle.unique_parameters()   # the shared Linear once: 3 x 20
60
"""

from __future__ import annotations

import json
import math
import platform
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from jtucker_plugin import layers
from jtucker_plugin._version import __version__
from jtucker_plugin.io import atomic_directory

MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
FORMAT = "jtucker-bundle"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TaskInfo:
    """What a bundle knows about one task besides its weights.

    ``arch``, ``num_classes``, ``in_channels`` and ``width`` rebuild the plain architecture with
    ``models.create_model``; ``dense_parameters`` is the parameter count of the task's dense model
    before any compression (the reference of the compression ratio).
    """

    arch: str
    num_classes: int
    in_channels: int = 3
    width: float = 1.0
    input_shape: tuple[int, int, int] = (3, 32, 32)
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    dense_parameters: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskInfo:
        tuples = {"input_shape", "class_names", "mean", "std"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


@dataclass
class Bundle:
    """T task models and what they share.

    Parameters
    ----------
    models
        Task name -> model. Shared parts are the same objects in several models.
    info
        Task name -> ``TaskInfo``; the same keys as ``models``.
    history
        One record per applied change, e.g. ``{"stage": "jtucker", "layer": "layer1.0.conv1",
        "ranks": [8, 8]}``: data that can be saved and replayed.
    provenance
        Where the bundle came from (recipe, seed, versions).
    """

    models: dict[str, nn.Module]
    info: dict[str, TaskInfo]
    history: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a bundle needs at least one task model")
        if set(self.models) != set(self.info):
            raise ValueError(
                f"models and info must name the same tasks; got {sorted(self.models)} and {sorted(self.info)}"
            )

    @property
    def tasks(self) -> list[str]:
        return list(self.models)

    def unique_parameters(self) -> int:
        """Parameters of all task models, each shared parameter counted once."""
        return sum(p.numel() for p in _unique_parameters(self.models.values()))

    def dense_parameters(self) -> int:
        """Sum of the task models' dense parameter counts before compression."""
        return sum(i.dense_parameters for i in self.info.values())

    def compression_ratio(self) -> float:
        """Dense parameters of all task models over the bundle's unique parameters."""
        return self.dense_parameters() / max(1, self.unique_parameters())

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Each distinct tensor once, under its storage name: exactly what ``save`` writes."""
        return _tensor_table(self.models)[0]

    def shared_modules(self) -> list[list[tuple[str, str]]]:
        """Groups of ``(task, module path)`` that are one module object, outermost only."""
        where: dict[int, list[tuple[str, str]]] = {}
        for task, model in self.models.items():
            for path, module in model.named_modules():
                if path:
                    where.setdefault(id(module), []).append((task, path))
        groups = [g for g in where.values() if len({t for t, _ in g}) > 1]
        in_group = {member for g in groups for member in g}
        return [g for g in groups if not any(_ancestors_in(m, in_group) for m in g[:1])]

    def save(self, path: str | Path) -> Path:
        """Write the bundle to the folder ``path`` atomically; returns ``path``.

        Raises
        ------
        TypeError
            If a task model holds a changed layer whose type is not registered in ``layers``.
        """
        path = Path(path)
        records = {task: _layer_records(model) for task, model in self.models.items()}
        for task, model in self.models.items():
            _check_rebuildable(task, model, _skeleton(self.info[task], records[task]))
        storage, per_task = _tensor_table(self.models)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tasks": {
                task: {
                    "info": asdict(self.info[task]),
                    "layers": records[task],
                    "tensors": per_task[task],
                }
                for task in self.models
            },
            "shared_modules": [[list(m) for m in g] for g in self.shared_modules()],
            "storage": {k: {"shape": list(t.shape), "dtype": str(t.dtype)} for k, t in storage.items()},
            "summary": {
                "unique_parameters": self.unique_parameters(),
                "dense_parameters": self.dense_parameters(),
                "compression_ratio": self.compression_ratio(),
            },
            "history": self.history,
            "provenance": {**default_provenance(), **self.provenance},
        }
        with atomic_directory(path) as tmp:
            save_file(storage, str(tmp / TENSORS))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read a bundle written by ``save``; shared parts come back as shared objects.

        Raises
        ------
        FileNotFoundError
            If the folder or one of its two files is missing.
        ValueError
            If the manifest is not a bundle manifest, or it and the tensors disagree.
        """
        path = Path(path)
        manifest = read_manifest(path)
        tensors = load_file(str(path / TENSORS))
        _check_storage(path, manifest["storage"], tensors)
        info = {t: TaskInfo.from_json(e["info"]) for t, e in manifest["tasks"].items()}
        models = {t: _skeleton(info[t], e["layers"]) for t, e in manifest["tasks"].items()}
        for group in manifest["shared_modules"]:
            (task0, path0), *rest = group
            shared = models[task0].get_submodule(path0)
            for task, module_path in rest:
                models[task].set_submodule(module_path, shared)
        _assign_tensors(path, models, {t: e["tensors"] for t, e in manifest["tasks"].items()}, tensors)
        return cls(models, info, manifest.get("history", []), manifest.get("provenance", {}))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the bundle folder ``path``, checked to be one."""
    path = Path(path)
    for name in (MANIFEST, TENSORS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a bundle folder (no {name})")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / MANIFEST}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path / MANIFEST}: format version {manifest['format_version']} is newer than this "
            f"jtucker-plugin ({__version__}) reads ({FORMAT_VERSION}); upgrade the plugin"
        )
    return manifest


def describe_bundle(path: str | Path) -> dict[str, Any]:
    """A summary of a saved bundle read from its manifest alone: tasks, shared parts, sizes,
    history and provenance (what ``jtucker info`` prints)."""
    path = Path(path)
    manifest = read_manifest(path)
    storage = manifest["storage"]

    def numel(key: str) -> int:
        return math.prod(storage[key]["shape"])

    shared = [k for k in storage if k.startswith("shared/")]
    history: dict[str, int] = {}
    for record in manifest.get("history", []):
        history[record.get("stage", "?")] = history.get(record.get("stage", "?"), 0) + 1
    return {
        "tasks": {
            task: {
                **entry["info"],
                "parameters": sum(numel(k) for n, k in entry["tensors"].items() if _is_parameter(n)),
                "layer_types": dict(Counter(t for _, t, _ in entry["layers"])),
            }
            for task, entry in manifest["tasks"].items()
        },
        "summary": manifest["summary"],
        "shared_modules": manifest["shared_modules"],
        "shared_tensors": len(shared),
        "shared_parameters": sum(numel(k) for k in shared if _is_parameter(k)),
        "bytes": (path / TENSORS).stat().st_size,
        "history": history,
        "provenance": manifest.get("provenance", {}),
    }


def _is_parameter(name: str) -> bool:
    # Buffers of the layers we store: batch-norm statistics.
    return not name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def default_provenance() -> dict[str, Any]:
    """Versions of what made a bundle."""
    import torchvision

    return {
        "jtucker_plugin": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _unique_parameters(models: Any) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for model in models:
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def _ancestors_in(member: tuple[str, str], members: set[tuple[str, str]]) -> bool:
    task, path = member
    parts = path.split(".")
    return any((task, ".".join(parts[:i])) in members for i in range(1, len(parts)))


def _tensor_table(
    models: dict[str, nn.Module],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, str]]]:
    # Which tasks use each tensor object decides its storage name: "shared/..." when several do.
    users: dict[int, set[str]] = {}
    states = {task: model.state_dict(keep_vars=True) for task, model in models.items()}
    for task, state in states.items():
        for tensor in state.values():
            users.setdefault(id(tensor), set()).add(task)
    storage: dict[str, torch.Tensor] = {}
    key_of: dict[int, str] = {}
    per_task: dict[str, dict[str, str]] = {}
    for task, state in states.items():
        per_task[task] = {}
        for name, tensor in state.items():
            if id(tensor) not in key_of:
                key = f"{task}/{name}" if len(users[id(tensor)]) == 1 else f"shared/{task}/{name}"
                key_of[id(tensor)] = key
                # Own, contiguous memory: safetensors refuses views of one storage.
                storage[key] = tensor.detach().contiguous().clone()
            per_task[task][name] = key_of[id(tensor)]
    return storage, per_task


def _layer_records(model: nn.Module) -> list[list[Any]]:
    return [
        [path, type(module).__name__, layers.layer_config(module)]
        for path, module in model.named_modules()
        if path and layers.is_registered(module)
    ]


def _skeleton(info: TaskInfo, records: list[list[Any]]) -> nn.Module:
    """The plain architecture with the recorded layers put in: a model to load tensors into."""
    from jtucker_plugin.models import create_model

    model = create_model(info.arch, info.num_classes, in_channels=info.in_channels, width=info.width)
    for layer_path, type_name, config in records:
        current = layers.find_module(model, layer_path)  # None: a module a stage added
        if current is None or not layers.same_structure(current, type_name, config):
            model.set_submodule(layer_path, layers.build_layer(type_name, config), strict=False)
    return model


def _position_buffers(module: nn.Module) -> tuple[str, ...]:
    # Buffers of positions (merge.composed) take the form and length of the saved ones at load.
    return getattr(module, "position_buffers", ())


def _check_rebuildable(task: str, model: nn.Module, skeleton: nn.Module) -> None:
    # Saving a bundle that could not be loaded again would lose the work: refuse it up front.
    free = {f"{p}.{b}" for p, m in skeleton.named_modules() for b in _position_buffers(m)}
    have = {k: () if k in free else tuple(v.shape) for k, v in model.state_dict().items()}
    rebuilt = {k: () if k in free else tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if have != rebuilt:
        diff = sorted(k for k in have.keys() | rebuilt.keys() if have.get(k) != rebuilt.get(k))
        owners = {type(model.get_submodule(k.rpartition(".")[0])).__name__ for k in diff if k in have}
        raise TypeError(
            f"task {task!r}: cannot save this model: it could not be rebuilt from its layer configs "
            f"(differs at {diff[:4]}); register the module types {sorted(owners)} with "
            "jtucker_plugin.layers.register_layer"
        )


def _check_storage(path: Path, expected: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path}: manifest and tensors disagree: missing from {TENSORS}: {missing[:5]}, "
            f"not in {MANIFEST}: {extra[:5]}"
        )
    for key, meta in expected.items():
        t = tensors[key]
        if list(t.shape) != meta["shape"] or str(t.dtype) != meta["dtype"]:
            raise ValueError(
                f"{path}: manifest and tensors disagree on {key!r}: manifest says "
                f"{meta['dtype']} {meta['shape']}, {TENSORS} holds {t.dtype} {list(t.shape)}"
            )


def _assign_tensors(
    path: Path,
    models: dict[str, nn.Module],
    mapping: dict[str, dict[str, str]],
    tensors: dict[str, torch.Tensor],
) -> None:
    made: dict[str, torch.Tensor] = {}
    for task, model in models.items():
        expected = set(model.state_dict())
        given = set(mapping[task])
        if expected != given:
            raise ValueError(
                f"{path}: task {task!r}: the rebuilt model and the manifest disagree; "
                f"missing: {sorted(expected - given)[:5]}, unexpected: {sorted(given - expected)[:5]}"
            )
        for name, key in mapping[task].items():
            module_path, _, attr = name.rpartition(".")
            module = model.get_submodule(module_path)
            current = module._parameters.get(attr, module._buffers.get(attr))
            value = tensors[key]
            if current is not None and current.shape != value.shape and attr not in _position_buffers(module):
                raise ValueError(
                    f"{path}: task {task!r}: {name} has shape {list(value.shape)} in the bundle but "
                    f"{list(current.shape)} in the rebuilt model"
                )
            if attr in module._parameters:
                if key not in made:
                    made[key] = nn.Parameter(value, requires_grad=current.requires_grad)
                module._parameters[attr] = made[key]
            else:
                made.setdefault(key, value)
                module._buffers[attr] = made[key]
