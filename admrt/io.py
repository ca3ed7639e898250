"""Atomic file writes: a finished file or none, never a partial one (long runs keep their work);
what run records (OUT/run.json, engine/csrc/runfolder.cpp) say of files and devices; the one
check of a --device argument; the one cache root (the compile cache, the evaluator's reference
statistics and TensorRT's engines live under it)."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int = 0o644) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it onto `path`.

    The file gets permissions `mode` (mkstemp's own 0600 would hide results from other users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None or exc.filename == tmp:  # a full disk names no file (errno 28): name `path`
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def hash_file(path, h=None):
    """Stream a file's bytes into the hash h (a new sha256 by default) and return h: about a second per GB."""
    h = hashlib.sha256() if h is None else h
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h


def file_fingerprint(path) -> str:
    """sha256 of a file's bytes (its first 16 hex digits)."""
    return "sha256:" + hash_file(path).hexdigest()[:16]


def hash_weights(modules: dict, h=None):
    """Hash the weights' content into h (a new sha256 by default) and return h: role, key, dtype,
    shape and bytes of every tensor of each module of `modules` (role -> nn.Module). The content,
    not a file's bytes: an identical re-saved checkpoint hashes the same."""
    import torch

    h = hashlib.sha256() if h is None else h
    for role in sorted(modules):
        for key, value in sorted(modules[role].state_dict().items()):
            t = value.detach().cpu().contiguous()
            h.update(f"{role}/{key}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def device_description(device) -> str:
    """'cpu' or 'cuda (NVIDIA H100 80GB HBM3)': what decides the numbers, not the index."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a folder named for its pid is stale once it is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def cache_root() -> Path:
    """Where admrt keeps what it computes once: $ADMRT_CACHE_DIR, else $XDG_CACHE_HOME/admrt, else
    ~/.cache/admrt. The compile cache is this folder, the evaluator's reference statistics are under
    eval/ and TensorRT's engines under tensorrt/ (each command's --cache-dir overrides its own)."""
    if os.environ.get("ADMRT_CACHE_DIR"):
        return Path(os.environ["ADMRT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "admrt"


def available_devices() -> list[str]:
    """The devices this torch can run on here: cpu, and cuda, cuda:0 .. cuda:N-1 (and mps) where present."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def device_problem(value: str) -> str | None:
    """What is wrong with a --device argument on this machine (naming the devices available), or
    None when it names one this machine has: the one check behind every command's --device."""
    import torch

    available = available_devices()
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return f"not a device; expected one of {', '.join(available)}"
    name = device.type if device.index is None or device.type == "cpu" else f"{device.type}:{device.index}"
    if name in available:
        return None
    if device.type == "cuda" and not torch.backends.cuda.is_built():
        why = "this torch is built without CUDA"
    elif device.type == "cuda" and not torch.cuda.is_available():
        why = "no CUDA device is visible"
    else:
        why = "no such device here"
    return f"{why}; available: {', '.join(available)}"


def check_device(value: str) -> str:
    """`value` when this machine has that device, else ValueError naming it and the devices available."""
    problem = device_problem(value)
    if problem is not None:
        raise ValueError(f"device={value!r}: {problem}")
    return value
