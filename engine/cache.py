"""The persistent compile cache: what a backend compiles from a unit (an AOTInductor .pt2, an
ONNX file) is kept between runs, so a machine compiles a model once and later runs load it (as
TensorRT's engine cache and torch.compile's FX-graph cache do for theirs).

An entry is keyed by what decides the compiled code (CompileCache.key): the backend and its
options (batch bound, opset), the unit's kind and network (its config, structure and a content
hash of its weights: a re-saved identical file hits, one changed weight misses), precision and
layout, the device and its capability (CPU vector ISA, GPU name and compute capability), and the
versions of admrt (with a digest of its source), torch and the backend's runtime.

    ROOT/entries/<backend>/<key>/   the artifact files + entry.json (the key's fields, each file's
                                    size and sha256, when and how long it took to compile)
    ROOT/locks/<key>.lock           flock held while one process compiles or loads that key
    ROOT/staging/<pid>.<random>/    a compile in progress, renamed into entries/ when complete

ROOT: `cache_dir` (admrt's --cache-dir), else $ADMRT_CACHE_DIR, else $XDG_CACHE_HOME/admrt, else
~/.cache/admrt. An entry is taken only once the rename has put it in place, and its files are
checked against their recorded sizes and hashes when loaded (a damaged one is rebuilt), so a killed
compile leaves nothing that a later run takes for done; its staging folder is removed by the next
process that finds its owner gone. Two processes on one key: the first holds the key's lock and
compiles, the second waits and loads. The cache is bounded (max_bytes, default 10 GiB or
$ADMRT_CACHE_MAX_GB): after a write, the least recently used entries not locked by another process
are removed. `admrt cache list | clear` (admrt.engine.cache_cli) shows and empties it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.nn as nn

from admrt.io import cache_root as default_root  # the one cache root ($ADMRT_CACHE_DIR, XDG, ~/.cache/admrt)
from admrt.io import hash_file, hash_weights, pid_alive

T = TypeVar("T")
ENTRY = "entry.json"
DEFAULT_MAX_BYTES = 10 * 2 ** 30
# Rough compile seconds per unit on 2 CPU cores (bench/results/compile_cache_cpu): the estimate a
# first run prints before the cache holds a compile of this backend to scale from.
FIRST_ESTIMATE_S = {"aoti": 60.0, "onnxruntime": 25.0}


def _max_bytes_from_env() -> int:
    value = os.environ.get("ADMRT_CACHE_MAX_GB")
    if not value:
        return DEFAULT_MAX_BYTES
    try:
        gb = float(value)
    except ValueError:
        gb = float("nan")
    if not gb > 0:
        raise ValueError(f"ADMRT_CACHE_MAX_GB={value!r}: expected a positive number of GiB")
    return int(gb * 2 ** 30)


# -- what a key hashes -----------------------------------------------------------------------------

def weights_digest(module: nn.Module) -> str:
    """blake2b of the weights' content (admrt.io.hash_weights), so an identical re-saved checkpoint
    gives the same digest."""
    return hash_weights({"": module}, hashlib.blake2b(digest_size=16)).hexdigest()


def network_description(module: nn.Module) -> dict:
    """What decides a network's computation beyond its weights: its config (admrt models), its
    plain constructor attributes (guided-diffusion's, e.g. num_heads) and its module structure."""
    plain = (bool, int, float, str, tuple, list, type(None))
    config = getattr(module, "config", None)
    return {
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "attributes": {k: repr(v) for k, v in sorted(vars(module).items())
                       if not k.startswith("_") and isinstance(v, plain)},
        "structure": hashlib.blake2b(repr(module).encode(), digest_size=16).hexdigest(),
    }


def device_capability(device: torch.device) -> str:
    """What compiled code for `device` depends on: the CPU's vector ISA as torch sees it, or the
    GPU's name and compute capability with torch's CUDA version."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor} cuda {torch.version.cuda}"
    return f"{device.type} {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


_SOURCE_DIGEST: Optional[str] = None


def source_digest() -> str:
    """blake2b of the sources that decide what is compiled (admrt.models, admrt.kernels and
    admrt.export: the networks, their ops and the export; the core only loads the result): an edited checkout (same version number) compiles anew
    rather than loading what the old code compiled."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        import importlib.util

        h = hashlib.blake2b(digest_size=16)
        for package in ("admrt.models", "admrt.kernels", "admrt.export"):  # found, not imported
            root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
            for path in sorted(root.rglob("*.py")):
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
        _SOURCE_DIGEST = h.hexdigest()
    return _SOURCE_DIGEST


def unit_fields(unit: nn.Module) -> dict:
    """The key fields of an Engine unit (admrt.models.units: Denoiser or ClassifierGradient)."""
    import admrt
    from admrt.models.units import device_of

    device = device_of(unit)
    return {
        "unit": type(unit).__name__,
        "info": dataclasses.asdict(unit.info),
        "network": network_description(unit.net),
        "weights": weights_digest(unit.net),
        "dtype": unit.dtype,
        "memory_format": str(unit.memory_format),
        "device": device_capability(device),
        "admrt": f"{admrt.__version__} {source_digest()}",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


UNIT_NAMES = {"unet": "the base model", "superres": "the upsampler", "classifier": "the classifier gradient"}


def describe(unit: nn.Module) -> tuple[str, int]:
    """(what the compile notice calls an Engine unit, its parameter count)."""
    return UNIT_NAMES.get(unit.info.kind, unit.info.kind), sum(p.numel() for p in unit.net.parameters())


def key_of(backend: str, fields: dict) -> str:
    """The entry's name: a digest of the backend and the fields (JSON with sorted keys)."""
    text = json.dumps({"backend": backend, **fields}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# -- the cache -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    backend: str
    key: str
    path: Path
    size: int
    last_used: float
    record: dict


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class CompileCache:
    """Compiled artifacts kept under `root` (see the module docstring). `log(line)` gets the
    one-line notices (a compile starting, waiting for another process, a damaged entry)."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: Optional[int] = None,
                 log: Callable[[str], None] = None):
        self.root = Path(root) if root is not None else default_root()
        self.max_bytes = _max_bytes_from_env() if max_bytes is None else int(max_bytes)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    # -- paths ----------------------------------------------------------------------------------

    def _dirs(self) -> tuple[Path, Path, Path]:
        entries, locks, staging = self.root / "entries", self.root / "locks", self.root / "staging"
        try:
            for d in (entries, locks, staging):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"compile cache {self.root}: cannot create it ({exc.strerror}); pass --cache-dir DIR "
                          "or set ADMRT_CACHE_DIR to a writable folder") from None
        return entries, locks, staging

    @contextlib.contextmanager
    def _lock(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """The key's flock (exclusive), opened without following a planted symlink. Yields whether
        it was taken (always, when blocking)."""
        _, locks, _ = self._dirs()
        path = locks / f"{key}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            link = "; a symbolic link is never followed" if os.path.islink(path) else ""
            raise OSError(f"compile cache lock {path}: cannot open it ({exc.strerror}{link}); remove it or pass "
                          "another --cache-dir") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = True
            except BlockingIOError:
                taken = False
                if blocking:
                    self.log(f"admrt: waiting for another process compiling the same unit into {self.root}")
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    taken = True
            yield taken
        finally:
            os.close(fd)

    # -- use --------------------------------------------------------------------------------------

    def get_or_build(self, backend: str, fields: dict, build: Callable[[Path], dict],
                     load: Callable[[Path], T], what: str, size_hint: int = 0) -> T:
        """load(entry folder) of the entry for (backend, fields); on a miss, build(staging folder)
        writes the artifact files there (returning extra record fields), the folder is renamed into
        place, then loaded. `what` names the unit in the notice; `size_hint` (parameter count)
        scales the time estimate from earlier compiles."""
        key = key_of(backend, fields)
        entries, _, staging = self._dirs()
        final = entries / backend / key
        with self._lock(key):
            if final.is_dir():
                problem = self._verify(final)
                if problem is None:
                    os.utime(final / ENTRY)   # last used: the LRU order
                    return load(final)
                self.log(f"admrt: compile cache entry {final} is damaged ({problem}); compiling it again")
                shutil.rmtree(final, ignore_errors=True)
            self._clean_staging(staging)
            estimate = self._estimate(backend, what, size_hint)
            self.log(f"admrt: compiling {what} for backend {backend} (no compiled form in the cache for these "
                     f"weights, precision, device and versions; about {_duration(estimate)}, once); "
                     f"cached in {final.parent}")
            tmp = staging / f"{os.getpid()}.{os.urandom(4).hex()}"
            tmp.mkdir()
            try:
                t0 = time.perf_counter()
                with _heartbeat(f"admrt: compiling {what}"), warnings.catch_warnings():
                    # torch.export's and the exporters' deprecation notices concern their internals, not the user
                    warnings.filterwarnings("ignore", category=FutureWarning)
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    extra = build(tmp) or {}
                seconds = time.perf_counter() - t0
                files = {p.name: {"bytes": p.stat().st_size, "sha256": hash_file(p).hexdigest()}
                         for p in sorted(tmp.iterdir()) if p.is_file()}
                record = {"backend": backend, "key": key, "what": what, "fields": fields, "files": files,
                          "compile_s": round(seconds, 2), "size_hint": size_hint, "created": time.time(), **extra}
                (tmp / ENTRY).write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.log(f"admrt: compiled {what} in {seconds:.0f} s")
            result = load(final)
        self.evict(keep={key})
        return result

    def _verify(self, folder: Path) -> Optional[str]:
        """None when the entry's files match entry.json, else what is wrong."""
        try:
            record = json.loads((folder / ENTRY).read_text())
            for name, want in record["files"].items():
                path = folder / name
                if not path.is_file():
                    return f"{name} is missing"
                if path.stat().st_size != want["bytes"] or hash_file(path).hexdigest() != want["sha256"]:
                    return f"{name} does not match its recorded size and sha256"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{ENTRY} unreadable: {exc}"
        return None

    def _estimate(self, backend: str, what: str, size_hint: int) -> float:
        """Seconds: the compile of the same kind of unit and backend in the cache nearest in
        parameter count (a gradient graph compiles slower than a forward of its size), scaled by
        the count (within 0.25x-4x), else FIRST_ESTIMATE_S."""
        import math

        done = [e for e in self.entries() if e.backend == backend and e.record.get("what") == what
                and e.record.get("compile_s") and e.record.get("size_hint")]
        if not done or not size_hint:
            return FIRST_ESTIMATE_S.get(backend, 60.0)
        nearest = min(done, key=lambda e: abs(math.log(size_hint / e.record["size_hint"])))
        ratio = size_hint / nearest.record["size_hint"]
        return nearest.record["compile_s"] * min(4.0, max(0.25, ratio))

    def _clean_staging(self, staging: Path) -> None:
        """Remove staging folders whose process is gone (a killed compile)."""
        for tmp in staging.iterdir():
            pid = tmp.name.split(".")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)

    # -- inspect and bound ------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every complete entry, least recently used first."""
        found = []
        root = self.root / "entries"
        if not root.is_dir():
            return found
        for backend_dir in sorted(root.iterdir()):
            for folder in sorted(backend_dir.iterdir()) if backend_dir.is_dir() else ():
                try:
                    record = json.loads((folder / ENTRY).read_text())
                    used = (folder / ENTRY).stat().st_mtime
                except (OSError, ValueError):
                    record, used = {}, 0.0
                found.append(Entry(backend_dir.name, folder.name, folder, _folder_size(folder), used, record))
        return sorted(found, key=lambda e: e.last_used)

    def evict(self, keep: frozenset | set = frozenset()) -> list[Entry]:
        """Remove least recently used entries (not in `keep`, not locked by a process using them)
        until the cache holds at most max_bytes; returns the removed."""
        entries = self.entries()
        total = sum(e.size for e in entries)
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.key in keep:
                continue
            with self._lock(entry.key, blocking=False) as taken:
                if taken:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    total -= entry.size
                    removed.append(entry)
        return removed

    def clear(self, backend: Optional[str] = None) -> list[Entry]:
        """Remove every entry (of `backend`) that no process holds; returns the removed."""
        removed = []
        for entry in self.entries():
            if backend is not None and entry.backend != backend:
                continue
            with self._lock(entry.key, blocking=False) as taken:
                if taken:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry)
        staging = self.root / "staging"
        if staging.is_dir():
            self._clean_staging(staging)
        return removed


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


@contextlib.contextmanager
def _heartbeat(label: str, every: float = 1.0):
    """On a terminal: `label ... N s` rewritten in place while the block runs (a compile has no
    steps to count); elsewhere nothing."""
    if not sys.stderr.isatty():
        yield
        return
    stop = threading.Event()
    t0 = time.perf_counter()

    def beat():
        while not stop.wait(every):
            sys.stderr.write(f"\r{label} ... {time.perf_counter() - t0:.0f} s")
            sys.stderr.flush()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
