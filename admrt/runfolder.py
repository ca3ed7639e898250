"""The run folder of `admrt sample` and `admrt train`: a long run never loses finished work and
never mixes two runs' work.

    OUT/run.json   the run's record: every setting that decides what the run writes (arguments,
                   fingerprints of the weights files, device, precision, backend). Written once,
                   after every argument has been validated, so a rejected command leaves nothing
                   that blocks the corrected one. A rerun compares it field by field: equal, the
                   run resumes from its finished work (shards, checkpoints); different, it is
                   refused with each field's recorded and new value. A record whose run finished
                   nothing is replaced.
    OUT/.lock      held (flock) by the process working in OUT; a second process is refused,
                   naming the holder. The OS releases it when the holder exits or is killed.
    .*.tmp         temporary files of atomic writes (admrt.io.atomic_write); those a killed
                   process left behind are removed once the lock is held.

The folder is started over by deleting it (or choosing another --out).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from .io import atomic_write

RECORD = "run.json"
LOCK = ".lock"
_TMP = re.compile(r"^\..+\.tmp$")


class RunFolderError(ValueError):
    """The folder holds another run, or another process works in it."""


class RunFolder:
    """OUT's lock and record for one command: `lock()`, `check_record(...)`, then `unlock()`."""

    def __init__(self, out, command: str):
        self.out, self.command = Path(out), command
        self._lock_file = None

    def lock(self) -> None:
        """Take OUT/.lock, or raise naming the process that holds it; then clean stale .tmp files."""
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.out / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunFolderError(f"--out={str(self.out)!r} is in use by {holder}; wait for it to finish, or stop "
                                 "it (its finished work is kept)") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({self.command}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self._lock_file = f
        for folder in (self.out, self.out / "shards"):  # not deeper: OUT may hold other runs' folders
            for p in (folder.iterdir() if folder.is_dir() else ()):
                if _TMP.match(p.name) and p.is_file():
                    p.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def check_record(self, record: dict, *, finished: int, may_differ=()) -> bool:
        """Write OUT/run.json, or compare it with `record`. Returns True when an earlier run with
        this record is resumed. `finished`: how much of the recorded run is done (shards,
        checkpoints): with none, a different record is replaced; `may_differ`: fields a resume
        may change (e.g. the batch size under seeded noise)."""
        path = self.out / RECORD
        text = to_json(record)
        record = json.loads(text)  # compared as JSON reads it back (tuples as lists)
        if path.exists():
            try:
                previous = json.loads(path.read_text())
            except (ValueError, OSError) as exc:
                previous = {"<unreadable run.json>": str(exc)}
            # A key the record did not have (written by an older admrt) is not a change: it is added.
            changed = [k for k in sorted(set(record) | set(previous))
                       if k not in may_differ and k in previous and previous.get(k) != record.get(k)]
            if not changed:
                added = [k for k in record if k not in previous]
                if added:
                    print(f"{self.command}: {path} did not record {', '.join(added)} (an older admrt); recorded "
                          "now", file=sys.stderr)
                if previous != record:
                    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
                return finished > 0
            if finished:
                diff = "; ".join(f"{k}: {_show(previous.get(k))} -> {_show(record.get(k))}" for k in changed[:6])
                more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
                raise RunFolderError(
                    f"--out={str(self.out)!r} holds a run with other arguments ({diff}{more}); rerun with the "
                    f"recorded values to resume it, or use another --out (or delete that folder) to start over")
            print(f"{self.command}: {self.out} held a run that finished nothing; starting over", file=sys.stderr)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return False


def to_json(record: dict) -> str:
    """The record as JSON; a non-finite float is a bug of validation, never written."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"run record: {bad[0]}={record[bad[0]]}: expected a finite number")
    return json.dumps(record, indent=1, allow_nan=False) + "\n"


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def file_fingerprint(path) -> str:
    """sha256 of a file's bytes (its first 16 hex digits), streamed: about a second per GB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def device_description(device) -> str:
    """'cpu' or 'cuda (NVIDIA H100 80GB HBM3)': what decides the numbers, not the index."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
