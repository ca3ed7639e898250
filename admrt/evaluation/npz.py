"""Sample and reference batches in the reference evaluator's .npz format.

`arr_0`: uint8 (N, H, W, C) images; optional `arr_1`: int64 (N,) labels (what
guided-diffusion's sample scripts write); reference batches may also carry precomputed
statistics `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial features).

`iter_batches` streams `arr_0` from the zip member without loading it whole, as the
reference's StreamingNpzArrayReader does, so 50000 ImageNet-256 samples fit in memory.
Writes are atomic (admrt.io.atomic_write).
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from admrt.io import atomic_write

from .metrics import FIDStatistics


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """np.savez to `path` via a temporary file and os.replace (readers never see a partial file)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def save_batch(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None,
               stats: tuple[FIDStatistics, FIDStatistics] | None = None) -> Path:
    """Write a batch: images uint8 (N, H, W, C) as arr_0, labels as arr_1, optional
    (pool, spatial) statistics as mu, sigma, mu_s, sigma_s."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected uint8 (N, H, W, 1|3), got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels: expected shape ({len(images)},), got {labels.shape}")
        arrays["arr_1"] = labels
    if stats is not None:
        pool, spatial = stats
        arrays.update(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    return atomic_savez(path, **arrays)


@contextmanager
def _open_member(path: str | os.PathLike, name: str):
    with zipfile.ZipFile(path, "r") as zf:
        if f"{name}.npy" not in zf.namelist():
            raise ValueError(f"{path}: no array {name!r} in the .npz (has {sorted(zf.namelist())})")
        with zf.open(f"{name}.npy", "r") as f:
            yield f


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def array_info(path: str | os.PathLike, name: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz, read from its header only."""
    with _open_member(path, name) as f:
        shape, _, dtype = _read_header(f)
    return tuple(shape), dtype


def iter_batches(path: str | os.PathLike, batch_size: int, name: str = "arr_0") -> Iterator[np.ndarray]:
    """Yield `name` of the .npz in consecutive chunks of `batch_size` rows, streamed."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    with _open_member(path, name) as f:
        shape, fortran, dtype = _read_header(f)
        if fortran or dtype.hasobject:
            arr = np.load(path)[name]
            for i in range(0, len(arr), batch_size):
                yield arr[i:i + batch_size]
            return
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            data = f.read(n * row)
            if len(data) != n * row:
                raise ValueError(f"{path}: {name} ends early (expected {shape[0]} rows)")
            yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))


def load_images(path: str | os.PathLike) -> np.ndarray:
    """arr_0 whole (uint8 NHWC), checked."""
    with np.load(path) as z:
        if "arr_0" not in z:
            raise ValueError(f"{path}: no arr_0 (expected the reference format: arr_0 uint8 NHWC)")
        images = z["arr_0"]
    _check_images(images, path)
    return images


def _check_images(images: np.ndarray, where) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: arr_0 must be uint8 (N, H, W, 1|3), got {images.dtype} {images.shape}")


def load_statistics(path: str | os.PathLike) -> tuple[FIDStatistics, FIDStatistics] | None:
    """The precomputed (pool, spatial) statistics of a reference batch, or None if absent."""
    with np.load(path) as z:
        if "mu" not in z:
            return None
        missing = [k for k in ("sigma", "mu_s", "sigma_s") if k not in z]
        if missing:
            raise ValueError(f"{path}: has mu but not {missing}")
        return FIDStatistics(z["mu"], z["sigma"]), FIDStatistics(z["mu_s"], z["sigma_s"])


def content_hash(path_or_images: str | os.PathLike | np.ndarray, chunk_rows: int = 1024) -> str:
    """sha256 of the images' shape, dtype and bytes (arr_0 streamed for a path)."""
    h = hashlib.sha256()
    if isinstance(path_or_images, np.ndarray):
        images = np.ascontiguousarray(path_or_images)
        h.update(f"{images.shape}|{images.dtype.str}".encode())
        h.update(memoryview(images).cast("B"))
        return h.hexdigest()
    shape, dtype = array_info(path_or_images)
    h.update(f"{tuple(shape)}|{dtype.str}".encode())
    for batch in iter_batches(path_or_images, chunk_rows):
        h.update(np.ascontiguousarray(batch).tobytes())
    return h.hexdigest()
