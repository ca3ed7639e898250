"""Atomic file writes: a finished file or none, never a partial one (long runs keep their work);
and what run records (OUT/run.json, engine/csrc/runfolder.cpp) say of files and devices."""
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
