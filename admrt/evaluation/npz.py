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
import math
import os
import struct
import tokenize
import zipfile
import zlib
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


# What a damaged or hostile file can raise from zipfile, zlib and numpy's header reader; each is
# turned into one ValueError line naming the file (the CLI's one-line error).
_READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError,
                RuntimeError, struct.error, OverflowError, UnicodeDecodeError, SyntaxError, TypeError,
                tokenize.TokenError, KeyError, IndexError, ValueError)
# (Not MemoryError: sizes are checked against the file before anything is allocated, so running out
# of memory is a bug of this reader, not a damaged file; the fuzz test fails on it.)
_EXPECTED = "expected an .npz as np.savez writes it (a zip of .npy arrays)"


class NpzError(ValueError):
    """A malformed .npz: one line naming the file and what was expected."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


@contextmanager
def _reading(path):
    """Turn whatever reading a damaged file raises into one NpzError line naming `path`."""
    try:
        yield
    except NpzError:
        raise
    except FileNotFoundError:
        raise NpzError(f"{path}: no such file") from None
    except OSError as e:
        raise NpzError(f"{path}: cannot be read ({e.strerror or _one_line(e)})") from None
    except _READ_ERRORS as e:
        raise NpzError(f"{path}: damaged .npz ({_one_line(e) or type(e).__name__}); {_EXPECTED}") from None


def _member_size_check(path, info: zipfile.ZipInfo, name: str, data_bytes: int) -> None:
    """The declared sizes of member `info` agree with its header and with the file, before reading it."""
    file_size = os.path.getsize(path)
    if info.compress_size > file_size:
        raise NpzError(f"{path}: {name} declares {info.compress_size} bytes, more than the file's {file_size}; "
                       f"{_EXPECTED}")
    # deflate expands at most ~1032:1; a larger declared size is a lie (or a zip bomb)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > 1100 * info.compress_size + 1024:
        raise NpzError(f"{path}: {name} declares {info.file_size} bytes from {info.compress_size} compressed; "
                       f"{_EXPECTED}")
    if data_bytes < 0 or data_bytes != info.file_size:
        raise NpzError(f"{path}: {name}: its .npy header describes {max(data_bytes, 0)} bytes, the member "
                       f"holds {info.file_size}; {_EXPECTED}")


@contextmanager
def _open_member(path: str | os.PathLike, name: str):
    """(file object positioned after the .npy header, shape, fortran_order, dtype) of member `name`,
    every size checked against the member and the file; object arrays refused (never unpickled)."""
    with _reading(path), zipfile.ZipFile(path, "r") as zf:
        names = zf.namelist()
        if f"{name}.npy" not in names:
            have = sorted(n[:-4] if n.endswith(".npy") else n for n in names)[:20]
            raise NpzError(f"{path}: no array {name!r} in the .npz (has {have})")
        info = zf.getinfo(f"{name}.npy")
        with zf.open(info, "r") as f:
            shape, fortran, dtype = _read_header(f, path, name)
            header_bytes = f.tell()
            _member_size_check(path, info, name, header_bytes + math.prod(shape) * dtype.itemsize)
            yield f, shape, fortran, dtype


def _read_header(f, path, name) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise NpzError(f"{path}: {name} is not .npy data; {_EXPECTED}") from None
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise NpzError(f"{path}: {name} is .npy format {version[0]}.{version[1]}; expected 1.0 or 2.0")
    if any(d < 0 for d in shape):
        raise NpzError(f"{path}: {name} has shape {tuple(shape)}; expected sizes >= 0")
    if dtype.itemsize == 0:
        raise NpzError(f"{path}: {name} has dtype {dtype} of 0 bytes; expected numbers")
    if dtype.hasobject:
        raise NpzError(f"{path}: {name} is an object array (dtype {dtype}); expected numbers "
                       "(object arrays are never unpickled)")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _read_array(path, name: str) -> np.ndarray:
    """Member `name` whole, its sizes checked before anything is allocated."""
    with _open_member(path, name) as (f, shape, fortran, dtype):
        data = f.read(math.prod(shape) * dtype.itemsize)
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise NpzError(f"{path}: {name} ends early; {_EXPECTED}")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _names(path) -> list[str]:
    with _reading(path), zipfile.ZipFile(path, "r") as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def array_info(path: str | os.PathLike, name: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz, read from its header only (sizes checked against the
    file). arr_0 must be images: uint8 (N, H, W, 1|3)."""
    with _open_member(path, name) as (_, shape, _, dtype):
        pass
    if name == "arr_0":
        _check_image_format(shape, dtype, path)
    return shape, dtype


def iter_batches(path: str | os.PathLike, batch_size: int, name: str = "arr_0") -> Iterator[np.ndarray]:
    """Yield `name` of the .npz in consecutive chunks of `batch_size` rows, streamed."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    with _open_member(path, name) as (f, shape, fortran, dtype):
        if not shape:
            raise NpzError(f"{path}: {name} is a scalar; expected an array of rows")
        if fortran:  # rows are not contiguous: read it whole (its size was checked)
            arr = _read_array(path, name)
            for i in range(0, len(arr), batch_size):
                yield arr[i:i + batch_size]
            return
        row = math.prod(shape[1:]) * dtype.itemsize
        if row == 0 and shape[0] > 0:
            raise NpzError(f"{path}: {name} has shape {shape}: rows of 0 values; expected non-empty rows")
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            with _reading(path):
                data = f.read(n * row)
            if len(data) != n * row:
                raise NpzError(f"{path}: {name} ends early (expected {shape[0]} rows)")
            yield np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))


def load_images(path: str | os.PathLike) -> np.ndarray:
    """arr_0 whole (uint8 NHWC), checked."""
    shape, dtype = array_info(path)
    return _read_array(path, "arr_0")


def _check_image_format(shape, dtype, where) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or 0 in shape[1:]:
        raise NpzError(f"{where}: arr_0 must be uint8 (N, H, W, 1|3), got {dtype} {tuple(shape)}")


def _check_images(images: np.ndarray, where) -> None:
    _check_image_format(images.shape, images.dtype, where)


def load_statistics(path: str | os.PathLike) -> tuple[FIDStatistics, FIDStatistics] | None:
    """The precomputed (pool, spatial) statistics of a reference batch, or None if absent."""
    names = _names(path)
    if "mu" not in names:
        return None
    missing = [k for k in ("sigma", "mu_s", "sigma_s") if k not in names]
    if missing:
        raise NpzError(f"{path}: has mu but not {missing}")
    z = {}
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        a = _read_array(path, k)
        if a.dtype.kind not in "fiu" or not np.all(np.isfinite(a)):
            raise NpzError(f"{path}: {k} is {a.dtype} {a.shape}; expected finite real numbers")
        z[k] = a
    try:
        return FIDStatistics(z["mu"], z["sigma"]), FIDStatistics(z["mu_s"], z["sigma_s"])
    except ValueError as e:
        raise NpzError(f"{path}: {_one_line(e)}") from None


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
