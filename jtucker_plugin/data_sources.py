"""Readers of dataset formats: each turns a dataset on disk into a :class:`Source`.

A :class:`Source` is a dataset's train and test :class:`Split` and its class names. A split
holds every label but reads images only when asked, so that cutting a task out of a dataset
(:mod:`jtucker_plugin.data`) decodes only the images the task selects. The formats: torchvision
datasets (CIFAR-10/100, STL-10 and SVHN through torchvision; MNIST and Fashion-MNIST from their
IDX files), an ImageFolder directory or tarball, an ``.npz`` file and scikit-learn's bundled
digits.

An ImageFolder tarball is unpacked once into the cache, atomically, as one blob and an index
rather than a file per image; a class read whole is cached decoded, as an ``.npy`` keyed by its
files, so a second run reads arrays instead of decoding JPEGs (all of CIFAR-10: ~17 s the first
time, unpacking included, ~0.4 s after).

Examples
--------
>>> from jtucker_plugin.data import DataSpec
>>> source = load_source(DataSpec(dataset="digits"), data_root=None, cache=Path("unused"))
>>> len(source.train.labels), len(source.test.labels), source.class_names[:3]
(1347, 450, ['0', '1', '2'])
>>> [chunk.shape for chunk in source.test.read(np.array([0, 1, 2]))]
[(3, 1, 8, 8)]
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from jtucker_plugin.data import DataSpec

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
# The digits test split's random-number stream, distinct from those of jtucker_plugin.data
# (caps, validation split).
_STREAM_DIGITS_TEST = 4
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


@dataclass(frozen=True)
class Split:
    """A split before selection: labels, and a reader of the chosen images.

    ``read(sorted_indices)`` returns chunks ``n_i x C_i x H_i x W_i`` (uint8) that cover the
    indices in order; chunks may differ in size or channels when the files do.
    """

    labels: np.ndarray
    read: Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class Source:
    """A dataset as read: its train and test splits, labels indexing ``class_names``."""

    train: Split
    test: Split
    class_names: list[str]


def resolve_path(path: str | Path, data_root: str | Path | None) -> Path:
    """``path`` made absolute: ``~`` expanded, relative to ``data_root`` (``None``: the current
    directory)."""
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = Path(data_root if data_root is not None else ".").expanduser() / path
    return path.resolve()


def load_source(spec: DataSpec, data_root: str | Path | None, cache: Path) -> Source:
    """Read the dataset ``spec`` names; relative paths are relative to ``data_root``, and
    ImageFolder data is unpacked and decoded into ``cache``."""
    if spec.dataset == "imagefolder":
        return _imagefolder(resolve_path(spec.path, data_root), cache)
    if spec.dataset == "npz":
        return _npz(resolve_path(spec.path, data_root))
    if spec.dataset == "digits":
        return _digits()
    root = resolve_path(spec.root or ".", data_root)
    if spec.dataset in ("mnist", "fashionmnist"):
        return _idx_dataset(spec, root)
    return _torchvision(spec, root)


def torchvision_files(dataset: str, root: Path) -> list[Path]:
    """The folders or files under ``root`` that torchvision dataset ``dataset`` is read from
    (when not downloading); for MNIST and Fashion-MNIST the IDX files, plain or gzipped."""
    if dataset in _TORCHVISION_FOLDERS:
        return [root / name for name in _TORCHVISION_FOLDERS[dataset]]
    raw = _idx_folder(dataset, root)
    return [_idx_file(raw / name) for names in _IDX_FILES.values() for name in names]


# -- arrays in memory ---------------------------------------------------------------------------


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


def _in_memory(x: np.ndarray, y: np.ndarray, where: str) -> Split:
    images = _to_nchw(x, where)
    return Split(_labels(y, len(images), where), lambda index: [images[index]])


# -- formats ------------------------------------------------------------------------------------


def _npz(path: Path) -> Source:
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
    return Source(train, test, names)


def _digits() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    is_test = holdout(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED, _STREAM_DIGITS_TEST)
    train = _in_memory(images[~is_test], labels[~is_test], "digits")
    test = _in_memory(images[is_test], labels[is_test], "digits")
    return Source(train, test, [str(i) for i in range(10)])


def holdout(keys: np.ndarray, fraction: float, seed: int, stream: int) -> np.ndarray:
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


def _idx_dataset(spec: DataSpec, root: Path) -> Source:
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
    return Source(splits["train"], splits["test"], names)


def _torchvision(spec: DataSpec, root: Path) -> Source:
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
    return Source(splits["train"], splits["test"], names)


# -- ImageFolder --------------------------------------------------------------------------------

# The images of one class of one split, in sorted order: file paths, or (member name, bytes)
# of a packed tarball.
_Images = Sequence[str] | Sequence[tuple[str, bytes]]
_SPLITS = ("train", "test")


def _imagefolder(path: Path, cache: Path) -> Source:
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
    return Source(train, test, names)


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


def _class_split(classes: list[tuple[_Images, str]], cache: Path) -> Split:
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

    return Split(labels.astype(np.int64), read)


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
