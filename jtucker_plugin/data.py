"""Task datasets: a recipe's ``data`` mapping in, train/val/test arrays in memory out.

A :class:`DataSpec` names a dataset (a torchvision one, an ImageFolder directory or tarball,
an ``.npz`` file, or scikit-learn's bundled digits) and how to cut a task out of it: a class
subset relabelled ``0..k-1``, per-class caps, a validation split, resizing and channel
conversion. :func:`load_task_data` turns it into a :class:`TaskData` whose splits keep their
images as ``uint8`` tensors ``N x C x H x W``; :func:`iterate_batches` yields normalised float
batches with vectorised augmentation, which is what CPU training reads.

Everything random takes ``seed`` and draws from its own generator: the same spec and seed give
bit-identical tensors. Per-class choices (caps, validation split) use one stream per original
class, so a class's sample does not depend on which other classes a task takes.

Only the images a task selects are decoded. An ImageFolder tarball is unpacked once into the
cache (:func:`default_cache_dir`), atomically, as one blob and an index rather than a file per
image; a class read whole is cached decoded, as an ``.npy`` keyed by its files, so a second
run reads arrays instead of decoding JPEGs (all of CIFAR-10: ~17 s the first time, unpacking
included, ~0.4 s after).

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

import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import struct
import tarfile
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from jtucker_plugin.recipe.schema import did_you_mean

DatasetName = Literal[
    "cifar10", "cifar100", "stl10", "svhn", "mnist", "fashionmnist", "imagefolder", "npz", "digits"
]
DATASETS: tuple[str, ...] = typing.get_args(DatasetName)
# What the pretrained CIFAR ResNets were trained with; grey images use the mean of each.
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
STL10_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)
DIGITS_TEST_FRACTION = 0.25
# The digits test split is part of the dataset, not of a run: fixed, so runs with different
# seeds are evaluated on the same images.
DIGITS_SPLIT_SEED = 0

_FILE_DATASETS = ("imagefolder", "npz")
_TORCHVISION_DATASETS = ("cifar10", "cifar100", "stl10", "svhn", "mnist", "fashionmnist")
_TORCHVISION_FOLDERS = {
    "cifar10": ("cifar-10-batches-py",),
    "cifar100": ("cifar-100-python",),
    "stl10": ("stl10_binary",),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# Random-number streams, so that caps, validation split and test split never share draws.
_STREAM_TRAIN_CAP, _STREAM_TEST_CAP, _STREAM_VAL, _STREAM_DIGITS_TEST = 1, 2, 3, 4
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


@dataclass(frozen=True)
class _Split:
    """A split before selection: labels, and a reader of the chosen images.

    ``read(sorted_indices)`` returns chunks ``n_i x C_i x H_i x W_i`` (uint8) that cover the
    indices in order; chunks may differ in size or channels when the files do.
    """

    labels: np.ndarray
    read: Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class _Source:
    train: _Split
    test: _Split
    class_names: list[str]


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
        return [("path", _resolve(spec.path, data_root))]
    if spec.dataset == "digits" or spec.download:
        return []
    root = _resolve(spec.root or ".", data_root)
    if spec.dataset in _TORCHVISION_FOLDERS:
        return [("root", root / name) for name in _TORCHVISION_FOLDERS[spec.dataset]]
    raw = _idx_folder(spec.dataset, root)
    return [("root", _idx_file(raw / name)) for names in _IDX_FILES.values() for name in names]


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
    source = _load_source(spec, data_root, cache)
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
        is_val = torch.from_numpy(_holdout(np.asarray(ids)[train_y], spec.val_fraction, seed, _STREAM_VAL))
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


def _holdout(keys: np.ndarray, fraction: float, seed: int, stream: int) -> np.ndarray:
    """Boolean mask: a seeded ``fraction`` of each class (``keys`` are original class ids),
    at least one and never all of a class with two or more members."""
    mask = np.zeros(len(keys), dtype=bool)
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        if count > 0:
            rng = np.random.default_rng([seed, stream, int(key)])
            mask[rng.permutation(members)[:count]] = True
    return mask


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


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """NHWC, NCHW (C in 1, 3) or N x H x W -> NCHW uint8."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ValueError(
            f"{where}: expected images N x H x W x C, N x C x H x W or N x H x W, got shape {x.shape}"
        )
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer) or x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(f"{where}: expected uint8 pixels (0..255), got {x.dtype}")
        x = x.astype(np.uint8)
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise ValueError(f"{where}: expected {n} integer labels >= 0, got shape {y.shape}, dtype {y.dtype}")
    return y.astype(np.int64)


def _in_memory(x: np.ndarray, y: np.ndarray, where: str) -> _Split:
    images = _to_nchw(x, where)
    return _Split(_labels(y, len(images), where), lambda index: [images[index]])


# -- sources ------------------------------------------------------------------------------------


def _resolve(path: str | Path, data_root: str | Path | None) -> Path:
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = Path(data_root if data_root is not None else ".").expanduser() / path
    return path.resolve()


def _load_source(spec: DataSpec, data_root: str | Path | None, cache: Path) -> _Source:
    if spec.dataset == "imagefolder":
        return _imagefolder(_resolve(spec.path, data_root), cache)
    if spec.dataset == "npz":
        return _npz(_resolve(spec.path, data_root))
    if spec.dataset == "digits":
        return _digits()
    root = _resolve(spec.root or ".", data_root)
    if spec.dataset in ("mnist", "fashionmnist"):
        return _idx_dataset(spec, root)
    return _torchvision(spec, root)


def _npz(path: Path) -> _Source:
    with np.load(path, allow_pickle=False) as arrays:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise ValueError(
                f"path: {path} has no {', '.join(missing)}; expected arrays x_train, y_train, "
                f"x_test, y_test (and optionally class_names), found {', '.join(arrays.files)}"
            )
        train = _in_memory(arrays["x_train"], arrays["y_train"], f"path: {path}: x_train/y_train")
        test = _in_memory(arrays["x_test"], arrays["y_test"], f"path: {path}: x_test/y_test")
        top = int(max(train.labels.max(initial=0), test.labels.max(initial=0)))
        if "class_names" in arrays:
            names = [str(n) for n in arrays["class_names"]]
            if top >= len(names):
                raise ValueError(f"path: {path}: label {top} but only {len(names)} class_names")
        else:
            names = [str(i) for i in range(top + 1)]
    return _Source(train, test, names)


def _digits() -> _Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    is_test = _holdout(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED, _STREAM_DIGITS_TEST)
    train = _in_memory(images[~is_test], labels[~is_test], "digits")
    test = _in_memory(images[is_test], labels[is_test], "digits")
    return _Source(train, test, [str(i) for i in range(10)])


def _idx_folder(dataset: str, root: Path) -> Path:
    return root / ("MNIST" if dataset == "mnist" else "FashionMNIST") / "raw"


def _idx_file(path: Path) -> Path:
    """The plain IDX file if present, else its ``.gz``."""
    return path if path.exists() else path.with_name(path.name + ".gz")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"root: cannot read {path}: {err}") from None
    # Magic: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"root: {path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"root: {path} holds {array.size} values, its header says {dims}")
    return array.reshape(dims)


def _idx_dataset(spec: DataSpec, root: Path) -> _Source:
    if spec.download:
        import torchvision.datasets as tvd

        cls = tvd.MNIST if spec.dataset == "mnist" else tvd.FashionMNIST
        cls(str(root), train=True, download=True)
    raw = _idx_folder(spec.dataset, root)
    splits = {}
    for split, (images, labels) in _IDX_FILES.items():
        x = _read_idx(_idx_file(raw / images))
        splits[split] = _in_memory(x, _read_idx(_idx_file(raw / labels)), f"root: {raw}")
    names = [str(i) for i in range(10)] if spec.dataset == "mnist" else list(FASHION_MNIST_CLASSES)
    return _Source(splits["train"], splits["test"], names)


def _torchvision(spec: DataSpec, root: Path) -> _Source:
    import torchvision.datasets as tvd

    splits, names = {}, [str(i) for i in range(10)]
    for split in ("train", "test"):
        try:
            if spec.dataset in ("cifar10", "cifar100"):
                cls = tvd.CIFAR10 if spec.dataset == "cifar10" else tvd.CIFAR100
                ds = cls(str(root), train=split == "train", download=spec.download)
                x, y, names = ds.data, ds.targets, list(ds.classes)
            elif spec.dataset == "stl10":
                ds = tvd.STL10(str(root), split=split, download=spec.download)
                x, y, names = ds.data, ds.labels, list(getattr(ds, "classes", STL10_CLASSES))
            else:
                ds = tvd.SVHN(str(root), split=split, download=spec.download)
                x, y = ds.data, ds.labels
        except RuntimeError as err:
            raise ValueError(f"root: torchvision could not load {spec.dataset} from {root}: {err}") from None
        splits[split] = _in_memory(np.asarray(x), np.asarray(y), f"root: {root}")
    return _Source(splits["train"], splits["test"], names)


# -- ImageFolder --------------------------------------------------------------------------------

# The images of one class of one split, in sorted order: file paths, or (member name, bytes)
# of a packed tarball.
_Images = Sequence[str] | Sequence[tuple[str, bytes]]
_SPLITS = ("train", "test")


def _imagefolder(path: Path, cache: Path) -> _Source:
    listing = _pack_listing(_pack(path, cache)) if path.is_file() else _dir_listing(path)
    names = sorted(listing["train"])
    empty = [name for name in names if not len(listing["train"][name][0])]
    if not names or empty:
        raise ValueError(f"path: {path} has no training images for classes {empty or 'any'}")
    extra = sorted(set(listing["test"]) - set(names))
    if extra:
        raise ValueError(f"path: {path} has test classes not in train: {', '.join(extra)}")
    train, test = (
        _class_split([listing[split].get(name, ([], "")) for name in names], cache) for split in _SPLITS
    )
    return _Source(train, test, names)


def _layout_error(path: Path, found: Iterable[str]) -> ValueError:
    return ValueError(
        f"path: {path} is not an ImageFolder dataset: expected train/<class>/<image> and "
        f"test/<class>/<image>, found {', '.join(sorted(found)) or 'nothing'}"
    )


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(_IMAGE_EXTENSIONS)


def _dir_listing(path: Path) -> dict[str, dict[str, tuple[_Images, str]]]:
    entries = [p.name for p in path.iterdir() if not p.name.startswith(".")]
    top = path
    if not (path / "train").is_dir() and len(entries) == 1 and (path / entries[0] / "train").is_dir():
        top = path / entries[0]  # the dataset's folder inside the given one
    if not ((top / "train").is_dir() and (top / "test").is_dir()):
        raise _layout_error(path, entries)
    return {
        split: {
            d.name: _list_class(d)
            for d in (top / split).iterdir()
            if d.is_dir() and not d.name.startswith(".")
        }
        for split in _SPLITS
    }


def _list_class(class_dir: Path) -> tuple[list[str], str]:
    """The image files under ``class_dir``, sorted, and a key that changes when any of them is
    added, removed or modified (it names the class's decoded cache)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [os.path.join(dirpath, name) for name in filenames if _is_image(name)]
    files.sort()
    digest = hashlib.sha256(b"dir-v1")
    for file in files:
        st = os.stat(file)
        digest.update(f"\0{file}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return files, digest.hexdigest()[:32]


def _class_split(classes: list[tuple[_Images, str]], cache: Path) -> _Split:
    labels = np.repeat(np.arange(len(classes)), [len(images) for images, _ in classes])

    def read(index: np.ndarray) -> list[np.ndarray]:
        chunks, start = [], 0
        for images, key in classes:
            stop = start + len(images)
            local = index[(index >= start) & (index < stop)] - start
            if len(local):
                chunks.extend(_read_class(images, local, cache / "decoded" / f"{key}.npy"))
            start = stop
        return chunks

    return _Split(labels.astype(np.int64), read)


def _read_class(images: _Images, local: np.ndarray, cached: Path) -> list[np.ndarray]:
    """``images[local]`` decoded: from the class's cache if there is one, else decoded, caching
    the whole class when all of it is read and its images share one size."""
    if cached.exists():
        try:
            array = np.load(cached, mmap_mode="r")
        except (OSError, ValueError):
            array = None  # unreadable: decode again and overwrite
        if array is not None and array.ndim == 4 and len(array) == len(images):
            return [np.array(array[local])]
    decoded = [_decode(images[i]) for i in local]
    if len({im.shape[1:] for im in decoded}) > 1:
        return [im[None] for im in decoded]
    if len({im.shape[0] for im in decoded}) > 1:  # a few grey images among colour ones
        decoded = [np.repeat(im, 3, axis=0) if len(im) == 1 else im for im in decoded]
    stacked = np.stack(decoded)
    if len(local) == len(images):
        _save_npy(cached, stacked)
    return [stacked]


def _decode(image: str | tuple[str, bytes]) -> np.ndarray:
    from PIL import Image

    name, source = (image, image) if isinstance(image, str) else (image[0], io.BytesIO(image[1]))
    try:
        with Image.open(source) as im:
            array = np.array(im.convert("L" if im.mode in _GREY_MODES else "RGB"))
    except OSError as err:
        raise ValueError(f"path: cannot decode image {name}: {err}") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


# -- tarballs -----------------------------------------------------------------------------------


def _pack(tarball: Path, cache: Path) -> Path:
    """Copy the images of an ImageFolder tarball once into ``cache/extracted/<name>-<key>``.

    The folder holds ``images.bin`` (the members' bytes, back to back) and ``index.json``
    (where each image sits); it is written under a temporary name and renamed when complete,
    so an interrupted run leaves no half cache. One file instead of one per image: extracting
    CIFAR-10's 60,000 JPEGs to files took 7-40 s here (file creation), packing takes ~2 s.
    """
    st = tarball.stat()
    # The format version in the key keeps caches of other layouts from being read as this one.
    key = f"pack-v1\0{tarball}\0{st.st_size}\0{st.st_mtime_ns}"
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    final = cache / "extracted" / f"{tarball.name.split('.')[0]}-{key}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = _temp_sibling(final)
    try:
        tmp.mkdir()
        try:
            _write_pack(tarball, tmp)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile) as err:
            raise ValueError(
                f"path: {tarball} is neither a folder nor a complete tar archive: {err}"
            ) from None
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # else another process finished the same tarball first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_pack(tarball: Path, folder: Path) -> None:
    files: list[tuple[tuple[str, ...], int, int]] = []
    dirs: list[tuple[str, ...]] = []
    offset = 0
    # Streaming mode: one pass over the archive, no seeks back in the compressed stream.
    with tarfile.open(tarball, mode="r|*") as tar, open(folder / "images.bin", "wb") as blob:
        for member in tar:
            name = PurePosixPath(member.name)
            # Nothing is written under a member's name, but an archive that would escape its
            # folder when extracted is refused all the same.
            if name.is_absolute() or ".." in name.parts:
                raise ValueError(f"path: {tarball} has an unsafe member {member.name!r}, refused")
            parts = tuple(p for p in name.parts if p != ".")
            if not parts or any(p.startswith(".") for p in parts):
                continue
            if member.isdir():
                dirs.append(parts)
            elif member.isfile() and _is_image(parts[-1]):
                data = tar.extractfile(member).read()
                blob.write(data)
                files.append((parts, offset, len(data)))
                offset += len(data)
    tops = {p[0] for p in dirs} | {p[0] for p, _, _ in files}
    # Accept the dataset's folder itself archived (one top-level entry) as well as its contents.
    depth = 0 if tops & set(_SPLITS) else 1 if len(tops) == 1 else -1
    index: dict[str, dict[str, list]] = {split: {} for split in _SPLITS}
    for parts in dirs:
        if depth >= 0 and len(parts) == depth + 2 and parts[depth] in _SPLITS:
            index[parts[depth]].setdefault(parts[depth + 1], [])
    for parts, start, size in files:
        if depth >= 0 and len(parts) >= depth + 3 and parts[depth] in _SPLITS:
            entry = ["/".join(parts[depth + 2 :]), start, size]
            index[parts[depth]].setdefault(parts[depth + 1], []).append(entry)
    if not all(index.values()):
        raise _layout_error(tarball, tops)
    (folder / "index.json").write_text(json.dumps(index))


@dataclass(frozen=True)
class _Packed(Sequence):
    """One class's images in a packed tarball: ``(member name, bytes)``, sorted by name."""

    blob: np.ndarray
    entries: list[list]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: Any) -> tuple[str, bytes]:
        name, start, size = self.entries[i]
        return name, self.blob[start : start + size].tobytes()


def _pack_listing(folder: Path) -> dict[str, dict[str, tuple[_Images, str]]]:
    index = json.loads((folder / "index.json").read_text())
    path = folder / "images.bin"
    blob = np.memmap(path, mode="r") if path.stat().st_size else np.zeros(0, dtype=np.uint8)
    return {
        split: {
            name: (
                _Packed(blob, sorted(entries)),
                hashlib.sha256(f"pack-v1\0{folder}\0{split}\0{name}".encode()).hexdigest()[:32],
            )
            for name, entries in index[split].items()
        }
        for split in _SPLITS
    }


# -- cache --------------------------------------------------------------------------------------


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary siblings of ``path`` left by processes that died before finishing."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) is not a probe there; keep every temp
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
