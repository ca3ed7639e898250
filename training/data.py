"""Training data: Fashion-MNIST from Debian's IDX files, and image folders.

- `load_fashion_mnist(split)` reads the IDX .gz files that Debian's `dataset-fashion-mnist`
  installs under /usr/share/datasets/fashion-mnist/ (no download at run time).
- `FashionMNIST` is a torch Dataset of (image (1, S, S) float32 in [-1, 1], label int64):
  the 28x28 digits are padded with a 2-pixel black border to 32x32 (so that a 32x32 image
  and its 2x area-downsampled 16x16 version form a consistent cascade), then area-resized
  to S. The whole split is preprocessed once and held in memory (`.images`, `.labels`).
- `ImageFolder` follows guided-diffusion's image_datasets.py convention: images found
  recursively, class = the file name's prefix before the first `_` (sorted class names ->
  indices), box downsampling while the short side is >= 2*S, bicubic resize of the short
  side to S, center crop (or random crop), optional random horizontal flip, [-1, 1].
"""
from __future__ import annotations

import gzip
import os
import random
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (LeCun's format): magic (0, 0, dtype code, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} bytes of data for dims {dims}, got {arr.size}")
    return arr.reshape(dims)


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the IDX files: `root`, else Debian's path."""
    return Path(root or FASHION_MNIST_ROOT)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train": 60000, "test": 10000) as (images uint8 (N, 28, 28),
    labels int64 (N,)), read from the IDX .gz files under `root` (default: Debian's
    /usr/share/datasets/fashion-mnist, from `apt-get install dataset-fashion-mnist`)."""
    if split not in _FILES:
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    folder = fashion_mnist_root(root)
    paths = []
    for name in _FILES[split]:
        p = folder / name
        if not p.exists() and (folder / name[:-3]).exists():  # uncompressed copy
            p = folder / name[:-3]
        if not p.exists():
            raise FileNotFoundError(
                f"Fashion-MNIST file {folder / name} is missing. Install the data set with "
                f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass root= "
                f"(CLI: --data-root) a folder holding {_FILES[split]}. admrt never downloads data."
            )
        paths.append(p)
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: IDX shapes {images.shape} and {labels.shape} do not form a data set")
    return np.array(images, copy=True), labels.astype(np.int64)


def fashion_to_size(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, S, S) in [-1, 1]: pad to 32x32 with black
    (-1), then area-resize to S (exact 2x box averages for S = 16, 8)."""
    x = images.to(torch.float32).unsqueeze(1) / 127.5 - 1.0
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 28 -> 32
    if image_size == 32:
        return x.contiguous()
    if 32 % image_size == 0:
        return F.interpolate(x, size=(image_size, image_size), mode="area")
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(-1, 1)


class FashionMNIST(Dataset):
    """Fashion-MNIST at `image_size` (1 channel, [-1, 1]) with labels, held in memory.

    channels=3 repeats the gray image (for RGB models). `.images` float32 (N, C, S, S) and `.labels` int64 (N,) are exposed so trainers can
    index whole batches without a DataLoader."""

    num_classes = 10
    channels = 1

    def __init__(self, split: str = "train", image_size: int = 16, root=None, limit: int | None = None,
                 channels: int = 1):
        if image_size <= 0:
            raise ValueError(f"image_size={image_size}: expected a positive int")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: expected 1, or 3 (the gray image repeated)")
        images, labels = load_fashion_mnist(split, root)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.image_size = image_size
        self.images = fashion_to_size(torch.from_numpy(images), image_size)
        if channels == 3:
            self.images = self.images.repeat(1, 3, 1, 1)
        self.channels = channels
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted (the reference's _list_image_files_recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data={str(folder)!r}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"data={str(folder)!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """Box-downsample while the short side >= 2*S, bicubic-resize the short side to S, then
    center-crop S x S (as guided-diffusion's center_crop_arr). Returns uint8 HWC."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def random_crop_arr(pil_image, image_size: int, rng: random.Random,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
    """Resize the short side to a random size in [S/max_frac, S/min_frac], then crop S x S at a
    random place (as guided-diffusion's random_crop_arr, used to train the classifiers)."""
    import math

    from PIL import Image

    min_side = math.ceil(image_size / max_crop_frac)
    max_side = math.ceil(image_size / min_crop_frac)
    side = rng.randrange(min_side, max_side + 1)
    while min(*pil_image.size) >= 2 * side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = side / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[top:top + image_size, left:left + image_size]


class ImageFolder(Dataset):
    """A folder of images; class = file name prefix before the first `_` (e.g. `cat_001.png`).

    channels: 3 (RGB) or 1 (grayscale). class_cond=False gives label 0 for every image.
    Items: (image (C, S, S) float32 in [-1, 1], label int64)."""

    def __init__(self, folder, image_size: int, *, class_cond: bool = True, channels: int = 3,
                 random_flip: bool = True, random_crop: bool = False, seed: int = 0):
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: expected 1 or 3")
        self.files = list_image_files(folder)
        self.image_size, self.channels = image_size, channels
        self.random_flip, self.random_crop = random_flip, random_crop
        names = [p.name.split("_")[0] for p in self.files]
        self.classes = sorted(set(names)) if class_cond else ["all"]
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = torch.tensor([index[n] for n in names] if class_cond else [0] * len(names),
                                   dtype=torch.int64)
        self.num_classes = len(self.classes)
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im.load()
            im = im.convert("RGB" if self.channels == 3 else "L")
        arr = (random_crop_arr(im, self.image_size, self._rng) if self.random_crop
               else center_crop_arr(im, self.image_size))
        if self.random_flip and self._rng.random() < 0.5:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.array(arr, dtype=np.float32)) / 127.5 - 1.0  # a writable copy (no torch warning)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return x.contiguous(), self.labels[i]


def make_dataset(data: str, image_size: int, *, channels: int = 1, split: str = "train",
                 class_cond: bool = True, random_crop: bool = False, limit: int | None = None):
    """`data` = "fashion-mnist" (Debian's files) or a folder of images."""
    if data in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return FashionMNIST(split, image_size, limit=limit, channels=channels)
    return ImageFolder(data, image_size, channels=channels, class_cond=class_cond, random_crop=random_crop)
