"""Task datasets: a recipe's ``data`` mapping in, train/val/test arrays in memory out.

A :class:`DataSpec` names a dataset (a torchvision one, an ImageFolder directory or tarball,
an ``.npz`` file, or scikit-learn's bundled digits; :mod:`jtucker_plugin.data_sources` reads
them) and how to cut a task out of it: a class subset relabelled ``0..k-1``, per-class caps, a
validation split, resizing and channel conversion. :func:`load_task_data` turns it into a
:class:`TaskData` whose splits keep their images as ``uint8`` tensors ``N x C x H x W``;
:func:`iterate_batches` yields normalised float batches with vectorised augmentation, which is
what CPU training reads.

Everything random takes ``seed`` and draws from its own generator: the same spec and seed give
bit-identical tensors. Per-class choices (caps, validation split) use one stream per original
class, so a class's sample does not depend on which other classes a task takes. Only the
images a task selects are decoded; extracted tarballs and decoded images are cached in
:func:`default_cache_dir`.

Examples
--------
>>> spec = DataSpec(dataset="digits", classes=[0, 1, 2, 3, 4], val_fraction=0.1)
>>> data = load_task_data(spec, seed=0)
>>> data.num_classes, data.input_shape
(5, (1, 8, 8))
>>> images, labels = next(iterate_batches(data.train, 32, shuffle=True, augment=True))
>>> images.dtype, images.shape, labels.dtype
(torch.float32, torch.Size([32, 1, 8, 8]), torch.int64)
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from jtucker_plugin.data_sources import holdout, load_source, resolve_path, torchvision_files
from jtucker_plugin.recipe.schema import did_you_mean

DatasetName = Literal[
    "cifar10", "cifar100", "stl10", "svhn", "mnist", "fashionmnist", "imagefolder", "npz", "digits"
]
DATASETS: tuple[str, ...] = typing.get_args(DatasetName)
# What the pretrained CIFAR ResNets were trained with; grey images use the mean of each.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)

_FILE_DATASETS = ("imagefolder", "npz")
_TORCHVISION_DATASETS = ("cifar10", "cifar100", "stl10", "svhn", "mnist", "fashionmnist")
# Random-number streams, so that caps and validation split never share draws (nor with the
# digits test split, which jtucker_plugin.data_sources draws from stream 4).
_STREAM_TRAIN_CAP, _STREAM_TEST_CAP, _STREAM_VAL = 1, 2, 3
_RESIZE_CHUNK = 4096


@dataclass(frozen=True)
class DataSpec:
    """Where a task's images come from and how the task is cut out of them.

    This is the ``tasks.<name>.data`` mapping of a recipe. Relative ``path`` and ``root`` are
    taken relative to the recipe's ``data_root``.

    Examples
    --------
    >>> DataSpec(dataset="imagefolder", path="cifar10-jpeg-imagefolder.tar.gz",
    ...          classes=["airplane", "automobile", "ship", "truck"], train_per_class=100).path
    'cifar10-jpeg-imagefolder.tar.gz'
    >>> DataSpec(dataset="npz")
    Traceback (most recent call last):
    ...
    ValueError: path: required for dataset 'npz'
    """

    # Source
    dataset: DatasetName
    path: str | None = None
    root: str | None = None
    download: bool = False
    # Task: class subset (names or original ids, relabelled 0..k-1 in this order) and sizes
    classes: list[str | int] | None = None
    train_per_class: int | None = None
    test_per_class: int | None = None
    val_fraction: float = 0.0
    # Images
    image_size: int | None = None
    channels: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(
                f"dataset: expected one of {', '.join(DATASETS)}, got {self.dataset!r}"
                f"{did_you_mean(str(self.dataset), DATASETS)}"
            )
        _check_source_fields(self)
        _check_classes(self.classes)
        for name in ("image_size", "train_per_class", "test_per_class"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.channels is not None and (type(self.channels) is not int or self.channels not in (1, 3)):
            raise ValueError(f"channels: expected 1 or 3, got {self.channels!r}")
        frac = self.val_fraction
        if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac < 1:
            raise ValueError(f"val_fraction: expected a number in [0, 1), got {frac!r}")
        for name in ("mean", "std"):
            _check_stats(name, getattr(self, name), self.channels)
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment: expected true or false, got {self.augment!r}")


def _check_source_fields(spec: DataSpec) -> None:
    for name in ("path", "root"):
        value = getattr(spec, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    if spec.dataset in _FILE_DATASETS and spec.path is None:
        raise ValueError(f"path: required for dataset {spec.dataset!r}")
    if spec.dataset not in _FILE_DATASETS and spec.path is not None:
        raise ValueError(
            f"path: not used by dataset {spec.dataset!r}, only by 'imagefolder' and 'npz'"
            + ("; torchvision datasets take root" if spec.dataset != "digits" else "")
        )
    if spec.dataset not in _TORCHVISION_DATASETS:
        if spec.root is not None:
            raise ValueError(
                f"root: not used by dataset {spec.dataset!r}, only by torchvision datasets "
                f"({', '.join(_TORCHVISION_DATASETS)})"
            )
        if spec.download is not False:
            raise ValueError(f"download: not used by dataset {spec.dataset!r}, got {spec.download!r}")
    if not isinstance(spec.download, bool):
        raise ValueError(f"download: expected true or false, got {spec.download!r}")


def _check_classes(classes: Any) -> None:
    if classes is None:
        return
    if not isinstance(classes, list | tuple) or not classes:
        raise ValueError(f"classes: expected a non-empty list of names or ids, got {classes!r}")
    for c in classes:
        if not (isinstance(c, str) and c) and not (type(c) is int and c >= 0):
            raise ValueError(f"classes: expected class names or ids >= 0, got {c!r} in {classes!r}")
    duplicates = sorted({repr(c) for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f"classes: each class may appear once, got {', '.join(duplicates)} twice")


def _check_stats(name: str, values: Any, channels: int | None) -> None:
    if values is None:
        return
    allowed = (1, channels) if channels else (1, 3)
    if (
        not isinstance(values, list | tuple)
        or len(values) not in allowed
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    ):
        raise ValueError(
            f"{name}: expected a list of one number, or one per channel ({channels or 3}), got {values!r}"
        )
    if name == "std" and not all(v > 0 for v in values):
        raise ValueError(f"std: expected positive numbers, got {values!r}")


class ArrayDataset(torch.utils.data.Dataset):
    """Images kept in memory as ``uint8`` ``N x C x H x W``, normalised when read.

    Parameters
    ----------
    images
        ``uint8`` tensor ``N x C x H x W``.
    labels
        ``int64`` tensor of length ``N``.
    mean, std
        Per-channel normalisation in ``[0, 1]`` pixel units: ``(x / 255 - mean) / std``.

    Examples
    --------
    >>> ds = ArrayDataset(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8),
    ...                   torch.tensor([0, 1]), mean=(0.5,), std=(0.25,))
    >>> image, label = ds[1]
    >>> float(image[0, 0, 0]), label
    (2.0, 1)
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...] = DEFAULT_MEAN,
        std: tuple[float, ...] = DEFAULT_STD,
    ):
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(f"images: expected a uint8 tensor N x C x H x W, got {_describe(images)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
            raise TypeError(f"labels: expected an int64 tensor, got {_describe(labels)}")
        if len(labels) != len(images):
            raise ValueError(f"labels: expected {len(images)} labels, one per image, got {len(labels)}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean/std: expected {channels} values (one per channel), got {mean!r} / {std!r}"
            )
        self.images, self.labels = images, labels
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.normalize(self.images[index]), int(self.labels[index])

    def normalize(self, images: Tensor) -> Tensor:
        """``uint8`` images (``C x H x W`` or a batch) -> normalised ``float32``."""
        return images.to(torch.float32) * self._scale + self._shift


@dataclass
class TaskData:
    """One task's splits, labels ``0..num_classes-1`` named by ``class_names``.

    ``val`` is ``None`` when the spec asks for no validation split; ``augment`` says whether
    training batches should be augmented (``DataSpec.augment``).
    """

    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset
    class_names: list[str]
    augment: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.train.images.shape[1:]
        return (c, h, w)


def default_cache_dir() -> Path:
    """Where extracted tarballs and decoded images go: ``$JTUCKER_CACHE``, else
    ``~/.cache/jtucker_plugin``."""
    env = os.environ.get("JTUCKER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jtucker_plugin"


def required_paths(spec: DataSpec, data_root: str | Path | None) -> list[tuple[str, Path]]:
    """The files and folders ``spec`` reads, for checking a recipe before anything runs.

    Parameters
    ----------
    spec
        The task's data spec.
    data_root
        What relative paths are relative to; ``None`` means the current directory.

    Returns
    -------
    list of (str, Path)
        ``(field, absolute path)`` pairs, e.g. ``("path", Path("/data/x.tar.gz"))``. Empty for
        ``digits`` and for torchvision datasets with ``download: true``.

    Examples
    --------
    >>> required_paths(DataSpec(dataset="npz", path="a.npz"), "/data")
    [('path', PosixPath('/data/a.npz'))]
    """
    if spec.dataset in _FILE_DATASETS:
        return [("path", resolve_path(spec.path, data_root))]
    if spec.dataset == "digits" or spec.download:
        return []
    root = resolve_path(spec.root or ".", data_root)
    return [("root", path) for path in torchvision_files(spec.dataset, root)]


def load_task_data(
    spec: DataSpec,
    data_root: str | Path | None = None,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> TaskData:
    """Load the task that ``spec`` describes into memory.

    Parameters
    ----------
    spec
        The task's data spec.
    data_root
        What relative ``path``/``root`` are relative to, and the default torchvision root;
        ``None`` means the current directory.
    seed
        Drives the per-class caps and the validation split (``>= 0``).
    cache_dir
        For extracted tarballs and decoded images; default :func:`default_cache_dir`.

    Returns
    -------
    TaskData
        ``train`` holds the training images left after the per-class cap and the validation
        split (taken from the capped training images); labels follow ``spec.classes``.

    Raises
    ------
    FileNotFoundError
        If a file the spec needs is missing (see :func:`required_paths`).
    ValueError
        If ``spec.classes`` names an unknown class, or the files are not in the expected
        format.
    """
    if not isinstance(spec, DataSpec):
        raise TypeError(f"spec: expected a DataSpec, got {type(spec).__name__}")
    if type(seed) is not int or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    for field, path in required_paths(spec, data_root):
        if not path.exists():
            raise FileNotFoundError(f"{field}: not found: {path}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = load_source(spec, data_root, cache)
    ids = _class_ids(spec, source.class_names)

    train_idx, train_y = _select(source.train.labels, ids, spec.train_per_class, seed, _STREAM_TRAIN_CAP)
    test_idx, test_y = _select(source.test.labels, ids, spec.test_per_class, seed, _STREAM_TEST_CAP)
    if len(test_idx) == 0:
        raise ValueError(f"classes: no test images for {[source.class_names[i] for i in ids]}")
    train_x = _prepare(source.train.read(train_idx), spec)
    test_x = _prepare(source.test.read(test_idx), spec)
    channels = train_x.shape[1]
    mean = _stats(spec.mean, DEFAULT_MEAN, channels, "mean")
    std = _stats(spec.std, DEFAULT_STD, channels, "std")

    val = None
    if spec.val_fraction > 0:
        is_val = torch.from_numpy(holdout(np.asarray(ids)[train_y], spec.val_fraction, seed, _STREAM_VAL))
        val = ArrayDataset(train_x[is_val], torch.from_numpy(train_y)[is_val], mean, std)
        train_x, train_y = train_x[~is_val], train_y[~is_val.numpy()]
    return TaskData(
        train=ArrayDataset(train_x, torch.from_numpy(train_y), mean, std),
        val=val,
        test=ArrayDataset(test_x, torch.from_numpy(test_y), mean, std),
        class_names=[source.class_names[i] for i in ids],
        augment=spec.augment,
    )


def iterate_batches(
    dataset: ArrayDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised ``float32`` batches ``(images, labels)`` of ``dataset``, the last one partial.

    Shuffling and augmentation (random crop from the image zero-padded by ``H // 8`` pixels,
    4 for 32x32, and a horizontal flip with probability 1/2) are done in torch on whole
    batches, driven by one ``torch.Generator`` seeded with ``seed``: the same seed gives the
    same batches.

    Examples
    --------
    >>> ds = ArrayDataset(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.arange(10))
    >>> [len(y) for _, y in iterate_batches(ds, 4, shuffle=True, augment=True)]
    [4, 4, 2]
    """
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        images = dataset.images[idx]
        if augment:
            images = _crop_and_flip(images, generator)
        yield dataset.normalize(images), dataset.labels[idx]


def _crop_and_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    n, c, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = torch.arange(w)
    cols = dx[:, None] + torch.where(flip[:, None], cols.flip(0), cols)
    # One gather on the flattened padded images does crop and flip for the whole batch.
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w)
    return padded.view(n, c, -1).gather(2, flat.expand(n, c, h * w)).view(n, c, h, w)


# -- selection ----------------------------------------------------------------------------------


def _class_ids(spec: DataSpec, names: list[str]) -> list[int]:
    if spec.classes is None:
        return list(range(len(names)))
    ids: list[int] = []
    for entry in spec.classes:
        if isinstance(entry, int):
            if entry >= len(names):
                raise ValueError(
                    f"classes: class id {entry} out of range for dataset {spec.dataset!r}, "
                    f"which has {len(names)} classes (ids 0..{len(names) - 1})"
                )
            class_id = entry
        elif entry in names:
            class_id = names.index(entry)
        else:
            raise ValueError(
                f"classes: unknown class {entry!r} in dataset {spec.dataset!r}"
                f"{did_you_mean(entry, names)}; available: {', '.join(names)}"
            )
        if class_id in ids:
            raise ValueError(f"classes: class {names[class_id]!r} (id {class_id}) is given twice")
        ids.append(class_id)
    return ids


def _select(
    labels: np.ndarray, ids: list[int], cap: int | None, seed: int, stream: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the images of classes ``ids``, at most ``cap`` per class, and their
    new labels."""
    relabel = np.full(max(int(labels.max(initial=0)), max(ids)) + 1, -1, dtype=np.int64)
    relabel[ids] = np.arange(len(ids))
    new = relabel[labels]
    keep = new >= 0
    if cap is not None:
        for new_id, class_id in enumerate(ids):
            members = np.flatnonzero(new == new_id)
            if len(members) > cap:
                rng = np.random.default_rng([seed, stream, class_id])
                keep[members] = False
                keep[rng.permutation(members)[:cap]] = True
    index = np.flatnonzero(keep)
    return index, new[index]


def _stats(
    values: list[float] | None, default: tuple[float, ...], channels: int, field: str
) -> tuple[float, ...]:
    if values is None:
        return default if channels == 3 else (float(np.mean(default)),) * channels
    if len(values) == 1:
        return (float(values[0]),) * channels
    if len(values) != channels:
        raise ValueError(
            f"{field}: {len(values)} values for {channels}-channel images; give 1 or {channels}, "
            "or set channels"
        )
    return tuple(float(v) for v in values)


# -- image arrays -------------------------------------------------------------------------------


def _prepare(chunks: list[np.ndarray], spec: DataSpec) -> Tensor:
    """Chunks of uint8 images -> one ``N x C x H x W`` tensor with the spec's size and channels."""
    shapes = {chunk.shape[2:] for chunk in chunks}
    if len(shapes) > 1:
        if spec.image_size is None:
            raise ValueError(
                "image_size: images differ in size ("
                + ", ".join(f"{h}x{w}" for h, w in sorted(shapes))
                + "); set image_size to resize them"
            )
        chunks = [_resize(torch.from_numpy(c), spec.image_size).numpy() for c in chunks]
    colour = max(chunk.shape[1] for chunk in chunks)
    images = torch.cat([_to_channels(torch.from_numpy(np.ascontiguousarray(c)), colour) for c in chunks])
    channels = spec.channels or colour
    # Resize on whichever side of the channel conversion has fewer channels.
    if channels < colour:
        images = _to_channels(images, channels)
    if spec.image_size is not None:
        images = _resize(images, spec.image_size)
    return _to_channels(images, channels).contiguous()


def _to_channels(images: Tensor, channels: int) -> Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.repeat(1, channels, 1, 1)
    if channels == 1:
        # Integer mean, rounded half up: exact, so identical on every machine.
        total = images.sum(dim=1, keepdim=True, dtype=torch.int32)
        return ((2 * total + have) // (2 * have)).to(torch.uint8)
    raise ValueError(f"channels: cannot convert {have}-channel images to {channels} channels")


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].to(torch.float32)
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + _RESIZE_CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
