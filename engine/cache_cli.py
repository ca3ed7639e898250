"""`admrt cache list | clear`: what the compile cache holds (admrt.engine.cache) and emptying it."""
from __future__ import annotations

import argparse
import datetime

from admrt.cli import CommandError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "clear"), help="list: one line per entry; clear: remove the entries")
    p.add_argument("--cache-dir", default=None,
                   help="the cache (default $ADMRT_CACHE_DIR, else $XDG_CACHE_HOME/admrt, else ~/.cache/admrt)")
    p.add_argument("--backend", default=None, help="only this backend's entries (aoti, onnxruntime)")


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    from .cache import CompileCache

    try:
        cache = CompileCache(args.cache_dir)
    except ValueError as exc:   # ADMRT_CACHE_MAX_GB
        raise CommandError(str(exc)) from None
    if args.action == "clear":
        removed = cache.clear(args.backend)
        left = [e for e in cache.entries() if args.backend in (None, e.backend)]
        print(f"admrt cache: removed {len(removed)} entries ({_size(sum(e.size for e in removed))}) from {cache.root}"
              + (f"; {len(left)} in use by another process were kept" if left else ""))
        return 0
    entries = [e for e in cache.entries() if args.backend in (None, e.backend)]
    print(f"{cache.root}: {len(entries)} entries, {_size(sum(e.size for e in entries))} "
          f"(bound {_size(cache.max_bytes)}; least recently used first)")
    for e in entries:
        r = e.record
        fields = r.get("fields", {})
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M")
        print(f"  {e.backend:<12} {e.key[:12]}  {_size(e.size):>10}  used {used}  compiled in "
              f"{r.get('compile_s', '?')} s  {r.get('what', '?')}  {fields.get('dtype', '?')}  "
              f"{fields.get('device', '?')}  weights {str(fields.get('weights', '?'))[:12]}")
    return 0
