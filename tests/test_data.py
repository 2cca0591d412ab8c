"""Tests for jtucker_plugin.data: specs, sources, selection, caches and batches.

Most tests write tiny datasets to ``tmp_path`` whose pixels encode where each image came from
(channel 0: original class, channel 1: file index), so that labels, caps and splits can be
checked image by image. Tests marked ``shared_data`` read the real data in ../shared/data.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets as tvd
from PIL import Image

from jtucker_plugin.data import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    ArrayDataset,
    DataSpec,
    TaskData,
    default_cache_dir,
    iterate_batches,
    load_task_data,
    required_paths,
)
from jtucker_plugin.data_sources import FASHION_MNIST_CLASSES
from jtucker_plugin.recipe.schema import ConfigError, from_dict

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- fake data ----------------------------------------------------------------------------------


def pixels(class_id: int, index: int, size: int = 8, grey: bool = False) -> np.ndarray:
    """An image saying where it came from: channel 0 codes the class, channel 1 the index."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[..., 0] = 40 * class_id + 10
    image[..., 1] = 10 * index + 5
    image[..., 2] = (np.arange(size) * (250 // size))[None, :]
    return image[..., 0] if grey else image


def origin(images: torch.Tensor) -> list[tuple[int, int]]:
    """(original class, file index) of each image made by ``pixels``."""
    return [((int(im[0, 0, 0]) - 10) // 40, (int(im[1, 0, 0]) - 5) // 10) for im in images]


def make_imagefolder(
    root: Path,
    counts: dict[str, int] | None = None,
    test: int = 2,
    size: int = 8,
    grey: bool = False,
) -> Path:
    counts = counts or {"ant": 6, "bee": 5, "cat": 4}
    for class_id, name in enumerate(sorted(counts)):
        for split, n in (("train", counts[name]), ("test", test)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(pixels(class_id, i, size, grey)).save(folder / f"{i:03d}.png")
    return root


def make_tarball(folder: Path, tarball: Path, arcname: str = "") -> Path:
    with tarfile.open(tarball, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=f"{arcname}/{split}" if arcname else split)
    return tarball


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def need(shared_data: Path, name: str) -> Path:
    """A file of the real data folder, or a skip when it is not there."""
    if not (shared_data / name).exists():
        pytest.skip(f"real data {name} not found in {shared_data}")
    return shared_data / name


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "pets")


def load(path: Path, cache: Path, seed: int = 0, **fields) -> TaskData:
    return load_task_data(
        DataSpec(dataset="imagefolder", path=str(path), augment=False, **fields),
        seed=seed,
        cache_dir=cache,
    )


# -- DataSpec -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dataset": "cifar"}, r"^dataset: expected one of .*got 'cifar'; did you mean 'cifar10'"),
        ({"dataset": "npz"}, r"^path: required for dataset 'npz'$"),
        ({"dataset": "cifar10", "path": "x"}, r"^path: not used by dataset 'cifar10'.*take root"),
        ({"dataset": "npz", "path": "x.npz", "root": "r"}, r"^root: not used by dataset 'npz'"),
        ({"dataset": "digits", "download": True}, r"^download: not used by dataset 'digits'"),
        ({"dataset": "digits", "val_fraction": 1.5}, r"^val_fraction: .*\[0, 1\), got 1.5$"),
        ({"dataset": "digits", "val_fraction": 1}, r"^val_fraction: "),
        ({"dataset": "digits", "channels": 2}, r"^channels: expected 1 or 3, got 2$"),
        ({"dataset": "digits", "image_size": 0}, r"^image_size: expected a positive integer"),
        ({"dataset": "digits", "train_per_class": True}, r"^train_per_class: "),
        ({"dataset": "digits", "classes": []}, r"^classes: expected a non-empty list"),
        ({"dataset": "digits", "classes": [1, -2]}, r"^classes: .*got -2"),
        ({"dataset": "digits", "classes": ["1", 2, "1"]}, r"^classes: .*'1' twice"),
        (
            {"dataset": "digits", "mean": [0.5, 0.5]},
            r"^mean: expected a list of one number, or one per channel \(3\), got \[0.5, 0.5\]$",
        ),
        ({"dataset": "digits", "channels": 1, "std": [0.2] * 3}, r"^std: .* one per channel \(1\)"),
        ({"dataset": "digits", "std": [0.2, 0.0, 0.2]}, r"^std: expected positive numbers"),
    ],
)
def test_bad_spec_names_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataSpec(**fields)


def test_spec_errors_reach_recipe_paths_through_from_dict() -> None:
    data = {"dataset": "npz", "path": "a.npz", "val_fraction": 1.5}
    with pytest.raises(ConfigError) as err:
        from_dict(DataSpec, data, "tasks.animals.data")
    assert err.value.path == "tasks.animals.data.val_fraction"
    spec = from_dict(DataSpec, {"dataset": "imagefolder", "path": "x", "classes": ["cat", 3]})
    assert spec.classes == ["cat", 3]


def test_required_paths_resolve_against_data_root(tmp_path: Path) -> None:
    root = str(tmp_path)
    assert required_paths(DataSpec(dataset="npz", path="sub/a.npz"), root) == [
        ("path", tmp_path / "sub" / "a.npz")
    ]
    assert required_paths(DataSpec(dataset="npz", path="/abs/a.npz"), root) == [("path", Path("/abs/a.npz"))]
    assert required_paths(DataSpec(dataset="cifar10", root="tv"), root) == [
        ("root", tmp_path / "tv" / "cifar-10-batches-py")
    ]
    fashion = required_paths(DataSpec(dataset="fashionmnist"), root)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert fashion[0] == ("root", raw / "train-images-idx3-ubyte.gz")
    assert len(fashion) == 4
    assert required_paths(DataSpec(dataset="digits"), root) == []
    assert required_paths(DataSpec(dataset="cifar10", download=True), root) == []


def test_missing_file_is_reported_before_loading(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"^path: not found: {tmp_path}/nope.tar.gz$"):
        load_task_data(DataSpec(dataset="imagefolder", path="nope.tar.gz"), tmp_path)


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("JTUCKER_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("JTUCKER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "jtucker_plugin"


# -- ImageFolder: classes, caps, splits ---------------------------------------------------------


def test_classes_are_relabelled_in_the_order_given(folder: Path, tmp_path: Path) -> None:
    data = load(folder, tmp_path / "cache", classes=["cat", 0])  # 0 is 'ant'
    assert data.class_names == ["cat", "ant"]
    assert data.num_classes == 2
    assert data.input_shape == (3, 8, 8)
    for split, n_cat, n_ant in ((data.train, 4, 6), (data.test, 2, 2)):
        where = origin(split.images)
        expected = {0: 2, 1: 0}  # new label -> original class id
        assert all(expected[int(y)] == c for y, (c, _) in zip(split.labels, where, strict=True))
        assert split.labels.tolist().count(0) == n_cat
        assert split.labels.tolist().count(1) == n_ant


def test_unknown_class_suggests_a_close_name(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown class 'bea'.*did you mean 'bee'.*ant, bee, cat"):
        load(folder, tmp_path / "cache", classes=["bea"])
    with pytest.raises(ValueError, match=r"^classes: class id 3 out of range .* 3 classes"):
        load(folder, tmp_path / "cache", classes=[3])
    with pytest.raises(ValueError, match=r"^classes: class 'ant' \(id 0\) is given twice"):
        load(folder, tmp_path / "cache", classes=["ant", 0])


def test_per_class_caps_sample_within_each_class(folder: Path, tmp_path: Path) -> None:
    data = load(folder, tmp_path / "cache", train_per_class=3, test_per_class=1)
    assert data.train.labels.bincount().tolist() == [3, 3, 3]
    assert data.test.labels.bincount().tolist() == [1, 1, 1]
    where = origin(data.train.images)
    assert len(set(where)) == 9
    assert [c for c, _ in where] == data.train.labels.tolist()
    samples = {
        tuple(origin(load(folder, tmp_path / "c", seed=s, train_per_class=3).train.images)) for s in range(4)
    }
    assert len(samples) > 1, "different seeds should pick different images"


def test_val_split_is_stratified_and_disjoint(folder: Path, tmp_path: Path) -> None:
    data = load(folder, tmp_path / "cache", val_fraction=0.25)
    assert data.val is not None
    # round(0.25 * n) per class, at least one: 6 -> 2, 5 -> 1, 4 -> 1
    assert data.val.labels.bincount().tolist() == [2, 1, 1]
    assert data.train.labels.bincount().tolist() == [4, 4, 3]
    train, val = set(origin(data.train.images)), set(origin(data.val.images))
    assert not train & val
    assert train | val == {(c, i) for c, n in enumerate((6, 5, 4)) for i in range(n)}
    assert load(folder, tmp_path / "cache").val is None


def test_same_seed_gives_identical_tensors(folder: Path, tmp_path: Path) -> None:
    fields = {"train_per_class": 4, "val_fraction": 0.3, "image_size": 12, "channels": 1}
    a = load(folder, tmp_path / "a", seed=7, **fields)
    b = load(folder, tmp_path / "b", seed=7, **fields)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.labels, y.labels)


def test_grey_images_become_three_channels(tmp_path: Path) -> None:
    grey = make_imagefolder(tmp_path / "grey", grey=True)
    one = load(grey, tmp_path / "cache")
    assert one.input_shape == (1, 8, 8)
    assert one.train.mean == pytest.approx((np.mean(DEFAULT_MEAN),))
    assert one.train.std == pytest.approx((np.mean(DEFAULT_STD),))
    three = load(grey, tmp_path / "cache", channels=3)
    assert three.input_shape == (3, 8, 8)
    assert three.train.mean == DEFAULT_MEAN
    assert torch.equal(three.train.images, one.train.images.repeat(1, 3, 1, 1))


def test_colour_to_grey_averages_channels(folder: Path, tmp_path: Path) -> None:
    colour = load(folder, tmp_path / "cache")
    grey = load(folder, tmp_path / "cache", channels=1, mean=[0.5], std=[0.25])
    expected = (colour.train.images.double().mean(1, keepdim=True) + 1e-9).round()
    assert torch.equal(grey.train.images, expected.to(torch.uint8))
    assert grey.train.mean == (0.5,)


def test_resize_is_bilinear_antialiased(folder: Path, tmp_path: Path) -> None:
    small = load(folder, tmp_path / "cache")
    big = load(folder, tmp_path / "cache", image_size=20)
    assert big.input_shape == (3, 20, 20)
    expected = (
        F.interpolate(
            small.train.images.float(),
            size=(20, 20),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        .round()
        .clamp(0, 255)
    )
    assert torch.equal(big.train.images, expected.to(torch.uint8))
    assert origin(big.train.images) == origin(small.train.images)  # constant channels survive


def test_images_of_different_sizes_need_image_size(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "mixed", counts={"a": 2, "b": 2})
    Image.fromarray(pixels(1, 2, size=12)).save(root / "train" / "b" / "002.png")
    with pytest.raises(ValueError, match=r"^image_size: images differ in size \(8x8, 12x12\)"):
        load(root, tmp_path / "cache")
    data = load(root, tmp_path / "cache", image_size=10)
    assert data.input_shape == (3, 10, 10)
    assert origin(data.train.images) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]


def test_imagefolder_layout_is_checked(tmp_path: Path) -> None:
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^path: .* is not an ImageFolder dataset: expected train"):
        load(tmp_path / "flat", tmp_path / "cache")
    root = make_imagefolder(tmp_path / "extra", counts={"a": 2})
    (root / "test" / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"^path: .*extra has test classes not in train: zebra"):
        load(root, tmp_path / "cache")
    only_train = tmp_path / "train-only.tar.gz"
    with tarfile.open(only_train, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
    with pytest.raises(ValueError, match=r"^path: .*train-only.tar.gz is not an ImageFolder"):
        load(only_train, tmp_path / "cache")
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []


# -- tarballs and caches ------------------------------------------------------------------------


def test_tarball_loads_like_its_folder(folder: Path, tmp_path: Path) -> None:
    tarball = make_tarball(folder, tmp_path / "pets.tar.gz")
    wrapped = make_tarball(folder, tmp_path / "wrapped.tar.gz", arcname="pets")
    expected = load(folder, tmp_path / "cache", train_per_class=3)
    for path in (tarball, wrapped):
        data = load(path, tmp_path / "cache", train_per_class=3)
        assert data.class_names == expected.class_names
        assert torch.equal(data.train.images, expected.train.images)
        assert torch.equal(data.test.labels, expected.test.labels)
    assert len(list((tmp_path / "cache" / "extracted").iterdir())) == 2


def test_unpacked_tarball_is_reused(folder: Path, tmp_path: Path) -> None:
    tarball = make_tarball(folder, tmp_path / "pets.tar.gz")
    cache = tmp_path / "cache"
    first = load(tarball, cache, train_per_class=2)
    (unpacked,) = (cache / "extracted").iterdir()
    before = (unpacked / "images.bin").stat()
    again = load(tarball, cache, train_per_class=2)
    after = (unpacked / "images.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert torch.equal(first.train.images, again.train.images)
    assert sorted(p.name for p in unpacked.iterdir()) == ["images.bin", "index.json"]


def test_leftover_temp_dirs_are_ignored_and_cleaned(folder: Path, tmp_path: Path) -> None:
    tarball = make_tarball(folder, tmp_path / "pets.tar.gz")
    load(tarball, tmp_path / "first")
    (name,) = (p.name for p in (tmp_path / "first" / "extracted").iterdir())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / "cache" / "extracted"
    stale = parent / f".{name}.tmp-{dead.pid}-0000"
    busy = parent / f".{name}.tmp-{os.getpid()}-1111"  # a live process may still be writing
    for tmp in (stale, busy):
        (tmp / "train" / "ant").mkdir(parents=True)
        (tmp / "train" / "ant" / "half.png").write_bytes(b"")
    data = load(tarball, tmp_path / "cache")
    assert len(data.train) == 15
    assert not stale.exists()
    assert busy.exists()
    assert (parent / name / "index.json").exists()


def test_failed_extraction_leaves_no_cache(folder: Path, tmp_path: Path) -> None:
    tarball = make_tarball(folder, tmp_path / "pets.tar.gz")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"^path: .*truncated.tar.gz is neither a folder nor"):
        load(truncated, tmp_path / "cache")
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []


def test_tarball_members_cannot_escape(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload.png"
    Image.fromarray(pixels(0, 0)).save(payload)
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="train/a/000.png")
        tar.add(payload, arcname="../escaped.png")
    with pytest.raises(ValueError, match=r"^path: .*evil.tar.gz has an unsafe member '../escaped.png'"):
        load(evil, tmp_path / "cache")
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []  # nothing, not even a.png
    assert not (tmp_path / "cache" / "escaped.png").exists()


def test_decoded_classes_are_cached_and_invalidated(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    capped = load(folder, cache, train_per_class=2, test_per_class=1)
    assert not (cache / "decoded").exists(), "a partial read of a class is not cached"
    first = load(folder, cache)
    files = sorted((cache / "decoded").glob("*.npy"))
    assert len(files) == 6  # 3 classes x (train, test)
    for file in files:  # prove the next load reads these arrays: blank them
        np.save(file, np.zeros_like(np.load(file)))
    assert int(load(folder, cache).train.images.max()) == 0
    assert int(load(folder, cache, train_per_class=2).train.images.max()) == 0
    # Touching a class's files changes its key: the 'ant' images are decoded again.
    for png in (folder / "train" / "ant").iterdir():
        os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    fresh = load(folder, cache)
    ant = fresh.train.labels == 0
    assert torch.equal(fresh.train.images[ant], first.train.images[ant])
    assert int(fresh.train.images[~ant].max()) == 0
    assert set(origin(capped.train.images)) <= set(origin(first.train.images))


# -- other sources ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "grey"])
def test_npz_layouts(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 5, 6, 3), dtype=np.uint8)
    if layout == "grey":
        x = x[..., 0]
    stored = x.transpose(0, 3, 1, 2) if layout == "nchw" else x
    y = np.arange(12) % 3
    np.savez(
        tmp_path / "d.npz",
        x_train=stored,
        y_train=y,
        x_test=stored[:6],
        y_test=y[:6],
        class_names=np.array(["r", "g", "b"]),
    )
    data = load_task_data(DataSpec(dataset="npz", path="d.npz", classes=["b", "r"]), tmp_path)
    expected = x.transpose(0, 3, 1, 2) if layout != "grey" else x[:, None]
    assert data.class_names == ["b", "r"]
    assert torch.equal(data.train.images, torch.from_numpy(expected[(y == 2) | (y == 0)]))
    assert data.train.labels.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]


def test_npz_without_names_or_arrays(tmp_path: Path) -> None:
    x = np.zeros((4, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=[0, 1, 3, 3], x_test=x, y_test=[0, 1, 2, 3])
    data = load_task_data(DataSpec(dataset="npz", path="d.npz"), tmp_path)
    assert data.class_names == ["0", "1", "2", "3"]
    np.savez(tmp_path / "bad.npz", x_train=x, y_train=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"^path: .*bad.npz has no x_test, y_test; expected"):
        load_task_data(DataSpec(dataset="npz", path="bad.npz"), tmp_path)


@pytest.mark.parametrize(
    ("dataset", "folder", "suffix"),
    [("fashionmnist", "FashionMNIST", ".gz"), ("mnist", "MNIST", "")],
)
def test_idx_files_are_read_gzipped_or_plain(tmp_path: Path, dataset: str, folder: str, suffix: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    y_train, y_test = np.arange(20) % 10, np.array([9, 0, 2, 9, 5])
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", x_train)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", y_train)
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", x_train[:5])
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", y_test)
    data = load_task_data(DataSpec(dataset=dataset, image_size=32, channels=3), tmp_path)
    assert data.input_shape == (3, 32, 32)
    assert torch.equal(data.test.labels, torch.from_numpy(y_test))
    assert torch.equal(data.train.images[:, 0], data.train.images[:, 2])
    names = list(FASHION_MNIST_CLASSES) if dataset == "fashionmnist" else list("0123456789")
    assert data.class_names == names
    labels = raw / f"t10k-labels-idx1-ubyte{suffix}"
    with (gzip.open if suffix else open)(labels, "wb") as f:
        f.write(b"\x00\x00\x0d\x01\x00\x00\x00\x05" + bytes(20))  # 0x0d: float32
    with pytest.raises(ValueError, match=r"^root: .* is not an IDX file of unsigned bytes"):
        load_task_data(DataSpec(dataset=dataset), tmp_path)
    if suffix:
        labels.write_bytes(gzip.compress(y_test.astype(np.uint8).tobytes())[:10])
        with pytest.raises(ValueError, match=r"^root: cannot read .*t10k-labels-idx1-ubyte.gz"):
            load_task_data(DataSpec(dataset=dataset), tmp_path)


def test_cifar10_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(2)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [(i + k) % 10 for k in range(4)] if name != "test_batch" else [3, 5, 0, 3]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10, "num_vis": 3072}, f)
    # The fake files cannot match the official checksums; everything else is torchvision's.
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{k}", None] for k in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", None]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": None})

    data = load_task_data(DataSpec(dataset="cifar10", classes=["cat", "airplane"]), tmp_path)
    x = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    y = np.concatenate([batches[f"data_batch_{k}"][1] for k in range(1, 6)])
    keep = (y == 3) | (y == 0)
    assert data.class_names == ["cat", "airplane"]
    assert torch.equal(data.train.images, torch.from_numpy(x[keep]))
    assert data.train.labels.tolist() == [0 if v == 3 else 1 for v in y[keep]]
    test_x = batches["test_batch"][0].reshape(-1, 3, 32, 32)
    assert torch.equal(data.test.images, torch.from_numpy(test_x[[0, 2, 3]]))
    assert data.test.labels.tolist() == [0, 1, 0]
    (folder / "test_batch").unlink()
    with pytest.raises(ValueError, match=r"^root: torchvision could not load cifar10"):
        load_task_data(DataSpec(dataset="cifar10"), tmp_path)


def test_digits_are_split_and_scaled() -> None:
    data = load_task_data(DataSpec(dataset="digits"), seed=0)
    other = load_task_data(DataSpec(dataset="digits", val_fraction=0.2), seed=5)
    assert data.class_names == [str(i) for i in range(10)]
    assert data.input_shape == (1, 8, 8)
    assert len(data.train) + len(data.test) == 1797
    per_class = data.test.labels.bincount().double() / (
        data.test.labels.bincount() + data.train.labels.bincount()
    )
    assert torch.all((per_class - 0.25).abs() < 0.01)
    assert torch.equal(data.test.images, other.test.images), "the test split is fixed"
    assert int(data.train.images.max()) == 255
    upper = load_task_data(DataSpec(dataset="digits", classes=[5, 6, 7, 8, 9]))
    assert upper.class_names == ["5", "6", "7", "8", "9"]
    assert torch.equal(upper.test.images, data.test.images[data.test.labels >= 5])
    assert torch.equal(upper.test.labels, data.test.labels[data.test.labels >= 5] - 5)


# -- ArrayDataset and batches -------------------------------------------------------------------


def test_array_dataset_normalises_and_checks() -> None:
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    ds = ArrayDataset(images, torch.arange(5))
    image, label = ds[2]
    expected = (images[2].double() / 255 - torch.tensor(DEFAULT_MEAN).view(3, 1, 1).double()) / (
        torch.tensor(DEFAULT_STD).view(3, 1, 1).double()
    )
    assert image.dtype == torch.float32 and label == 2
    assert torch.allclose(image.double(), expected, atol=1e-5)
    with pytest.raises(TypeError, match=r"^images: expected a uint8 tensor"):
        ArrayDataset(images.float(), torch.arange(5))
    with pytest.raises(TypeError, match=r"^labels: expected an int64 tensor"):
        ArrayDataset(images, torch.arange(5).int())
    with pytest.raises(ValueError, match=r"^labels: expected 5 labels, one per image, got 4"):
        ArrayDataset(images, torch.arange(4))
    with pytest.raises(ValueError, match=r"^mean/std: expected 3 values"):
        ArrayDataset(images, torch.arange(5), mean=(0.5,), std=(0.5,))


def test_batches_follow_order_and_normalise() -> None:
    ds = ArrayDataset(torch.randint(0, 256, (10, 3, 6, 6), dtype=torch.uint8), torch.arange(10))
    batches = list(iterate_batches(ds, 4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.stack([ds[i][0] for i in range(10)]))
    shuffled = [y for _, y in iterate_batches(ds, 4, shuffle=True, seed=3)]
    assert sorted(torch.cat(shuffled).tolist()) == list(range(10))
    again = [y for _, y in iterate_batches(ds, 4, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again, strict=True))
    other = torch.cat([y for _, y in iterate_batches(ds, 4, shuffle=True, seed=4)])
    assert not torch.equal(torch.cat(shuffled), other)
    with pytest.raises(ValueError, match=r"^batch_size: expected a positive integer, got 0"):
        next(iterate_batches(ds, 0))


def test_augmentation_is_a_padded_crop_and_flip() -> None:
    n, size, pad = 48, 16, 2  # pad = size // 8
    ds = ArrayDataset(torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8), torch.arange(n))
    ((x, _),) = iterate_batches(ds, n, augment=True, seed=0)
    ((same, _),) = iterate_batches(ds, n, augment=True, seed=0)
    assert torch.equal(x, same)
    flips, shifted = set(), False
    for k in range(n):
        padded = F.pad(ds.images[k], (pad,) * 4)
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(
                ds.normalize((padded.flip(2) if flip else padded)[:, dy : dy + size, dx : dx + size]),
                x[k],
            )
        ]
        assert len(matches) == 1, f"batch image {k} is not a crop of its padded, maybe flipped, source"
        ((dy, dx, flip),) = matches
        flips.add(flip)
        shifted |= (dy, dx) != (pad, pad)
    assert flips == {False, True}
    assert shifted


# -- real data (../shared/data) -----------------------------------------------------------------


@pytest.mark.shared_data
def test_cifar10_tarball_vehicles(shared_data: Path) -> None:
    tarball = need(shared_data, "cifar10-jpeg-imagefolder.tar.gz")
    vehicles = ["airplane", "automobile", "ship", "truck"]
    spec = DataSpec(
        dataset="imagefolder",
        path=str(tarball),
        classes=vehicles,
        train_per_class=20,
        val_fraction=0.25,
    )
    data = load_task_data(spec, seed=0)  # cache: $JTUCKER_CACHE, set by conftest
    assert data.class_names == vehicles
    assert data.input_shape == (3, 32, 32)
    assert data.train.labels.bincount().tolist() == [15] * 4
    assert data.val.labels.bincount().tolist() == [5] * 4
    assert data.test.labels.bincount().tolist() == [1000] * 4
    # Known images: the lossless copies of official test images 3 (airplane) and 1 (ship).
    lossless = np.load(need(shared_data, "cifar10-lossless-subset.npz"))["x_test"]
    for index, label in ((3, 0), (1, 2)):
        reference = torch.from_numpy(lossless[index].transpose(2, 0, 1)).float()
        distance = (data.test.images.float() - reference).abs().mean(dim=(1, 2, 3))
        nearest = int(distance.argmin())
        assert float(distance[nearest]) < 12, "the JPEG copy is ~6 grey levels off on average"
        assert int(data.test.labels[nearest]) == label


@pytest.mark.shared_data
def test_fashion_mnist_at_32x32x3(shared_data: Path) -> None:
    root = need(shared_data, "FashionMNIST/raw").parents[1]
    data = load_task_data(DataSpec(dataset="fashionmnist", image_size=32, channels=3), root)
    assert data.input_shape == (3, 32, 32)
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.class_names[9] == "Ankle boot"
    assert data.train.labels[:3].tolist() == [9, 0, 0] and int(data.test.labels[0]) == 9
    assert torch.equal(data.test.images[:, 0], data.test.images[:, 1])


@pytest.mark.shared_data
def test_cifar10_lossless_npz(shared_data: Path) -> None:
    path = need(shared_data, "cifar10-lossless-subset.npz")
    data = load_task_data(DataSpec(dataset="npz", path=path.name), path.parent)
    arrays = np.load(path)
    assert (len(data.train), len(data.test)) == (2000, 1000)
    assert data.class_names == CIFAR10
    assert torch.equal(data.test.labels, torch.from_numpy(arrays["y_test"].astype(np.int64)))
    assert torch.equal(data.test.images[0], torch.from_numpy(arrays["x_test"][0].transpose(2, 0, 1)))
