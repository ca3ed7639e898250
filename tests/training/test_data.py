"""Fashion-MNIST from Debian's IDX files, and the image-folder data set."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from admrt.training import data as D

HAVE_FMNIST = all((Path(D.FASHION_MNIST_ROOT) / f).exists() for pair in D._FILES.values() for f in pair)
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed "
                                  "(apt-get install dataset-fashion-mnist)")


@needs_fmnist
def test_real_fashion_mnist_files():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = D.load_fashion_mnist(split)
        assert x.shape == (n, 28, 28) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert set(np.unique(y).tolist()) == set(range(10))
        assert np.bincount(y).min() == n // 10  # balanced classes
        assert x.max() == 255 and x.min() == 0


@needs_fmnist
def test_fashion_dataset_sizes_and_cascade_consistency():
    d32 = D.FashionMNIST("test", 32, limit=64)
    d16 = D.FashionMNIST("test", 16, limit=64)
    assert d32.images.shape == (64, 1, 32, 32) and d16.images.shape == (64, 1, 16, 16)
    assert d16.images.min() >= -1 and d16.images.max() <= 1
    # the 2-pixel pad is black, and 16x16 is exactly the area-downsampled 32x32
    assert torch.all(d32.images[:, :, :2] == -1)
    torch.testing.assert_close(F.interpolate(d32.images, size=16, mode="area"), d16.images)
    x, y = d16[3]
    assert x.shape == (1, 16, 16) and y.dtype == torch.int64
    raw, labels = D.load_fashion_mnist("test")
    assert torch.equal(d16.labels, torch.from_numpy(labels[:64]))
    torch.testing.assert_close(d32.images[5, 0, 2:30, 2:30], torch.from_numpy(raw[5]).float() / 127.5 - 1)
    assert D.FashionMNIST("test", 8, limit=2, channels=3).images.shape == (2, 3, 8, 8)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_and_missing_data_error(tmp_path):
    imgs = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([2, 0, 9]))
    x, y = D.load_fashion_mnist("test", root=tmp_path)
    assert np.array_equal(x, imgs) and y.tolist() == [2, 0, 9]
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        D.load_fashion_mnist("val", root=tmp_path)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat_1.png", "cat_2.jpg", "dog_1.png", "sub/ant_x_y.png"):
        p = tmp_path / name
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(p)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = D.ImageFolder(tmp_path, 16, random_flip=False)
    assert len(ds) == 4 and ds.classes == ["ant", "cat", "dog"]
    assert sorted(ds.labels.tolist()) == [0, 1, 1, 2]
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
    # center crop of the reference: box-halve while >= 2*S, bicubic short side -> S, crop the middle
    arr = D.center_crop_arr(Image.new("RGB", (60, 40)), 16)
    assert arr.shape == (16, 16, 3)
    flipped = D.ImageFolder(tmp_path, 16, random_flip=True, seed=1)
    seen = {bool(torch.equal(flipped[0][0], x.flip(2))) for _ in range(20)}
    assert seen == {True, False}
    gray = D.ImageFolder(tmp_path, 8, channels=1, random_crop=True)
    assert gray[1][0].shape == (1, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        D.ImageFolder(tmp_path / "empty", 16)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        D.ImageFolder(tmp_path / "missing", 16)
