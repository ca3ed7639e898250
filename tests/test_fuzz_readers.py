"""Fuzz test of the file readers a user or a hostile file reaches: manifest.json as the C++ package
loader reads it (json::parse_file), .npz as the C++ run folder reads its shards (read_npz) and as
`admrt eval` reads sample and reference batches (admrt.evaluation.npz). Random and structured
mutations (truncation, byte flips, huge and odd numbers, deep nesting, wrong types, duplicate keys,
bad UTF-8; zip headers lying about sizes and offsets, zip64, .npy headers with absurd shapes,
dtypes and fortran_order) of valid files, from a fixed seed; each case must be read or refused
with the reader's one-line error naming the file -- never a crash, a hang or another exception.

The C++ readers run in admrt-read-check (engine/csrc/tools/read_check.cpp: many files per
process, one line each), the Python reader in one worker process; both under a memory bound, so a
reader that allocates what a header declares fails here instead of taking the machine. Each reader
gets ADMRT_FUZZ_SECONDS (default 20) of cases at most; ADMRT_FUZZ_SEED picks another corpus.
tests/engine/test_sanitizers.py runs the same corpus through an ASan/UBSan build of the driver.

Also the regression of a manifest nested 20000 deep (it crashed both front ends with SIGSEGV)."""
from __future__ import annotations

import copy
import io
import json
import os
import random
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from child_limits import address_space

from admrt.engine import sample_program

READ_CHECK = str(Path(sample_program).parent / "admrt-read-check")
SEED = int(os.environ.get("ADMRT_FUZZ_SEED", "29"))
SECONDS = float(os.environ.get("ADMRT_FUZZ_SECONDS", "20"))
MIN_CASES = 500  # per reader within SECONDS, even on a slow or busy runner (about 4000 on an idle 2-core one)
MAX_CASES = int(os.environ.get("ADMRT_FUZZ_CASES", "4000"))
BATCH = 250                       # files per admrt-read-check process
MEMORY = 3 << 30                  # bytes of address space for a reader process (a normal run needs < 1 GiB)

pytestmark = pytest.mark.skipif(not Path(READ_CHECK).is_file(), reason="admrt-read-check not built (setup.py)")


# ------------------------------------------------------------------------------------------------
# Valid starting points

FAKE_UNIT = b"PK\x03\x04 not an AOTInductor unit" * 8   # the fuzz stops at loading it, after every field check


def base_manifest() -> dict:
    """A package manifest as `admrt export aoti` writes it (one 16px stage, one respacing), whose
    every field passes the loader's checks; its unit is FAKE_UNIT (hash recorded)."""
    import dataclasses
    import hashlib

    from admrt import __version__, core
    from admrt.export.stack import schedule_entry
    from admrt.presets import get_preset

    preset = get_preset("fashion16-cond")
    model = {"file": "denoiser.pt2", "kind": "unet", "image_size": 16, "in_channels": 1, "out_channels": 2,
             "num_classes": 10, "low_res_size": None, "preset": json.loads(preset.to_json()),
             "variance": "learned_range", "diffusion": dataclasses.asdict(preset.diffusion),
             "schedules": {"t4": schedule_entry(preset.diffusion, "ddim4")},
             "sha256": hashlib.sha256(FAKE_UNIT).hexdigest()}
    return {"format": "admrt-aoti", "format_version": core.PACKAGE_FORMAT_VERSION, "admrt_version": __version__,
            "torch_version": "2.13.0+cpu", "device": "cpu", "dtype": "fp32", "batch": {"min": 1, "max": 2},
            "seeded_noise": core.SEEDED_NOISE_FORMAT, "default_steps": "ddim4", "default_upsampler_steps": None,
            "models": {"model": model}, "weights": "ab" * 32, "title": "caf\u00e9 \U0001F600"}


_BASE = None


def _base_manifest() -> dict:
    global _BASE
    if _BASE is None:
        _BASE = base_manifest()
    return copy.deepcopy(_BASE)


def npy_bytes(a: np.ndarray, header_edit=None, version=(1, 0)) -> bytes:
    """The .npy serialisation of `a`, its header dict text optionally edited (text -> text)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=version, allow_pickle=False)
    raw = buf.getvalue()
    if header_edit is None:
        return raw
    hlen_size = 2 if version == (1, 0) else 4
    start = 8 + hlen_size
    hlen = int.from_bytes(raw[8:start], "little")
    header = raw[start:start + hlen].decode("latin1")
    new = header_edit(header.rstrip("\n ")).encode("latin1", "replace") + b"\n"
    return raw[:8] + (len(new) % (1 << 8 * hlen_size)).to_bytes(hlen_size, "little") + new + raw[start + hlen:]


def zip_bytes(members: dict[str, bytes], compress=zipfile.ZIP_STORED, zip64=False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compress
            with zf.open(info, "w", force_zip64=zip64) as f:
                f.write(data)
    return buf.getvalue()


def base_npz_members(rng: random.Random) -> dict[str, np.ndarray]:
    n = rng.choice([1, 2, 3])
    arrays = {"arr_0": np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3),
              "arr_1": np.arange(n, dtype=np.int64)}
    if rng.random() < 0.3:
        arrays.update(mu=np.zeros(3), sigma=np.eye(3), mu_s=np.ones(2), sigma_s=np.eye(2))
    return arrays


# ------------------------------------------------------------------------------------------------
# Mutations

ODD_NUMBERS = ["1e999", "-1e999", "1e-999", "-0", "-0.0", "NaN", "Infinity", "-Infinity", "01", "1.", ".5", "+1",
               "1e", "--1", "0x10", "1_000", str(2 ** 63), str(2 ** 64), str(-2 ** 63 - 1), "9" * 400,
               "1" + "0" * 30, "-", "1e+", "0.0000000000000000000000001", str(10 ** 12), "-5"]
ODD_VALUES = [None, True, False, 0, -1, 1.5, "", "x" * 1000, [], {}, [1, 2], {"a": 1}, "../../../../etc/passwd",
              "/etc/passwd", "fp64", 10 ** 9, 10 ** 12, -5, 2 ** 63 - 1]
BAD_TEXT = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\\ud800", b"\\udc00x",
            b"\\u12", b"\\x", b"\x00", b"\x1f", b"\\", b"\"", b"\\ud83d\\u0041"]


def _leaves(value, path=()):
    if isinstance(value, dict):
        yield path, value
        for k, v in value.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(value, list):
        yield path, value
        for i, v in enumerate(value):
            yield from _leaves(v, path + (i,))
    else:
        yield path, value


def _set(root, path, new):
    for k in path[:-1]:
        root = root[k]
    root[path[-1]] = new


def _get(root, path):
    for k in path:
        root = root[k]
    return root


def _byte_mutation(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and data:                                  # truncation
        return bytes(data[:rng.randrange(len(data))])
    if kind == 1:                                           # byte flips
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2 and data:                                  # delete a range
        i = rng.randrange(len(data))
        del data[i:i + rng.randrange(1, 64)]
        return bytes(data)
    if kind == 3 and data:                                  # duplicate a range
        i = rng.randrange(len(data))
        j = min(len(data), i + rng.randrange(1, 256))
        return bytes(data[:j] + data[i:j] + data[j:])
    if kind == 4:                                           # insert random bytes
        i = rng.randrange(len(data) + 1)
        return bytes(data[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))) + data[i:])
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))  # garbage


def json_case(rng: random.Random) -> bytes:
    m = _base_manifest()
    text = json.dumps(m, indent=rng.choice([None, 1]))
    kind = rng.randrange(8)
    leaves = list(_leaves(m))
    if kind == 0:                                           # a value replaced by a wrong type or an odd value
        for _ in range(rng.choice([1, 2, 5])):
            path, _ = rng.choice(list(_leaves(m))[1:])
            _set(m, path, copy.deepcopy(rng.choice(ODD_VALUES)))
        return json.dumps(m).encode()
    if kind == 1:                                           # an odd number token
        token = rng.choice(ODD_NUMBERS)
        path, _ = rng.choice(leaves[1:])
        _set(m, path, "@@NUM@@")
        return json.dumps(m).replace('"@@NUM@@"', token).encode()
    if kind == 2:                                           # deep nesting, at the top or inside
        depth = rng.choice([100, 255, 256, 257, 300, 1000, 20000, 100000])
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}"), ("[{\"k\":", "}]")])
        inner = opener * depth + "1" + closer * (depth if rng.random() < 0.8 else rng.randrange(depth))
        if rng.random() < 0.5:
            return inner.encode()
        path, _ = rng.choice(leaves[1:])
        _set(m, path, "@@DEEP@@")
        return json.dumps(m).replace('"@@DEEP@@"', inner).encode()
    if kind == 3:                                           # duplicate keys
        path, obj = rng.choice([(p, v) for p, v in leaves if isinstance(v, dict) and v])
        key = rng.choice(list(obj))
        dup = json.dumps({key: rng.choice(ODD_VALUES)})[1:-1]
        sub = json.dumps(obj)
        new_sub = "{" + dup + ", " + sub[1:]
        _set(m, path, "@@OBJ@@") if path else None
        return (json.dumps(m).replace('"@@OBJ@@"', new_sub) if path else new_sub).encode()
    if kind == 4:                                           # bad UTF-8 or escapes inside a string
        raw = text.encode()
        quotes = [i for i, b in enumerate(raw) if b == ord('"')]
        i = rng.choice(quotes) + 1
        return raw[:i] + rng.choice(BAD_TEXT) + raw[i:]
    if kind == 5:                                           # a key removed
        path, obj = rng.choice([(p, v) for p, v in leaves if isinstance(v, dict) and v])
        del obj[rng.choice(list(obj))]
        return json.dumps(m).encode()
    return _byte_mutation(rng, text.encode())               # random bytes


SHAPES = ["()", "(0,)", "(-1,)", "(-1, 4, 4, 3)", "(10**20,)", "(100000000000000000000,)", "(9223372036854775807,)",
          "(9223372036854775807, 2)", "(4294967296, 4294967296)", "(4294967296, 4294967296, 2)", "(2, 4, 4, 3)",
          "(1, 4, 4, 3)", "(3,)", "(" + "1, " * 40 + ")", "(1e3,)", "('a',)", "[2, 4]", "(2, 4, 4, 3", "None",
          "(0, 4, 4, 3)", "(100, 0, 4, 3)", "(1000000000000000000, 0, 4, 3)", "(18446744073709551616,)",
          "(2, 2147483648, 2147483648, 3)"]
DESCRS = ["'|u1'", "'<i8'", "'<f8'", "'>f8'", "'|O'", "'|V0'", "'<U0'", "'|S0'", "'<f2'", "'|b1'", "'<c16'",
          "[('a', '<f4')]", "'bogus'", "'<i8", "5", "'<U1000000000000'", "'|V4294967296'", "''"]
FORTRAN = ["True", "False", "maybe", "1", "'True'"]


def _edit_header(rng, header: str) -> str:
    kind = rng.randrange(5)
    d = header
    if kind == 0:
        old = d[d.index("'shape'"):d.rindex(")") + 1] if "'shape'" in d else ""
        return d.replace(old, "'shape': " + rng.choice(SHAPES))
    if kind == 1:
        i = d.index("'descr'")
        j = d.index(",", i)
        return d[:i] + "'descr': " + rng.choice(DESCRS) + d[j:]
    if kind == 2:
        i = d.index("'fortran_order'")
        j = d.index(",", i)
        return d[:i] + "'fortran_order': " + rng.choice(FORTRAN) + d[j:]
    if kind == 3:                                           # a key dropped or duplicated
        key = rng.choice(["'descr'", "'shape'", "'fortran_order'"])
        i = d.index(key)
        j = d.index(",", i) if key != "'shape'" else d.index(")", i) + 1
        return d[:i] + (d[i:j] + ", " if rng.random() < 0.5 else "") + d[j:].lstrip(", ")
    return d + " " * rng.randrange(0, 70000) if rng.random() < 0.2 else d[:rng.randrange(len(d))]


def _zip_lie(rng, data: bytes) -> bytes:
    """A zip record field set to a lie: sizes, offsets, counts, name lengths, zip64 records."""
    data = bytearray(data)
    big = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, len(data), len(data) + 1, 2 ** 32 - 2])
    big64 = rng.choice([0, 2 ** 63 - 1, 2 ** 64 - 1, len(data), 2 ** 40, 0xFFFFFFFF])
    sites = []
    for sig, fields in ((b"PK\x01\x02", [(10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4)]),
                        (b"PK\x03\x04", [(8, 2), (18, 4), (22, 4), (26, 2), (28, 2)]),
                        (b"PK\x05\x06", [(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)]),
                        (b"PK\x06\x06", [(24, 8), (32, 8), (40, 8), (48, 8)]),
                        (b"PK\x06\x07", [(8, 8)]),
                        (b"\x01\x00\x18\x00", [(4, 8), (12, 8), (20, 8)]),
                        (b"\x01\x00\x10\x00", [(4, 8), (12, 8)])):
        at = data.find(sig)
        while at >= 0:
            sites += [(at + off, size) for off, size in fields]
            at = data.find(sig, at + 1)
    if not sites:
        return bytes(data)
    for _ in range(rng.choice([1, 1, 2])):
        at, size = rng.choice(sites)
        if at + size <= len(data):
            value = (big64 if size == 8 else big) % (1 << (8 * size))
            data[at:at + size] = value.to_bytes(size, "little")
    return bytes(data)


def npz_case(rng: random.Random) -> bytes:
    arrays = base_npz_members(rng)
    zip64 = rng.random() < 0.25
    compress = zipfile.ZIP_DEFLATED if rng.random() < 0.1 else zipfile.ZIP_STORED
    kind = rng.randrange(5)
    members = {}
    for name, a in arrays.items():
        version = (2, 0) if rng.random() < 0.1 else (1, 0)
        edit = (lambda h: _edit_header(rng, h)) if kind == 0 and rng.random() < 0.6 else None
        members[name + ".npy"] = npy_bytes(a, edit, version)
    if kind == 1:                                           # an object array, or pickled data
        members["arr_0.npy"] = _object_npy(rng)
    data = zip_bytes(members, compress, zip64)
    if kind == 2:
        return _zip_lie(rng, data)
    if kind == 3:
        return _byte_mutation(rng, data)
    if kind == 4 and rng.random() < 0.5:                    # a member's .npy bytes flipped, CRC kept valid
        name = rng.choice(list(members))
        members[name] = _byte_mutation(rng, members[name])
        return zip_bytes(members, compress, zip64)
    return data


def _object_npy(rng) -> bytes:
    """An object-dtype .npy (a pickle follows the header): 1-D or 4-D."""
    a = np.empty(rng.choice([(3,), (1, 1, 1, 3)]), dtype=object)
    a.flat[:] = [1, "a", None]
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def corpus(kind: str, folder: Path, count: int, seed: int = SEED) -> list[Path]:
    """`count` fuzz cases of `kind` written under `folder`, from `seed`: "npz" files, or "package"
    folders (a fuzzed manifest.json beside FAKE_UNIT as denoiser.pt2)."""
    rng = random.Random(f"{seed}-{kind}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        if kind == "npz":
            p = folder / f"case{i:05d}.npz"
            p.write_bytes(npz_case(rng))
        else:
            p = folder / f"case{i:05d}"
            p.mkdir()
            (p / "manifest.json").write_bytes(json_case(rng))
            (p / "denoiser.pt2").write_bytes(FAKE_UNIT)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------
# Running the readers

_limit_memory = address_space(MEMORY)


def run_read_check(program: str, mode: str, paths: list[Path], seconds: float, env=None, memory_bound=True):
    """(path, status, message) for each file, in batches until `seconds` pass; a crash, a hang or an
    unexpected exception fails, naming the file."""
    results, t_end = [], time.monotonic() + seconds
    for b in range(0, len(paths), BATCH):
        if time.monotonic() > t_end:
            break
        batch = paths[b:b + BATCH]
        try:
            res = subprocess.run([program, mode, *map(str, batch)], capture_output=True, text=True, timeout=120,
                                 errors="replace", env=env, preexec_fn=_limit_memory if memory_bound else None)
        except subprocess.TimeoutExpired as e:
            done = (e.stdout or b"").count(b"\n") if isinstance(e.stdout, bytes) else (e.stdout or "").count("\n")
            pytest.fail(f"{program} {mode} hung on {batch[min(done, len(batch) - 1)]}")
        lines = res.stdout.splitlines()
        if res.returncode not in (0, 1) or len(lines) != len(batch):
            culprit = batch[min(len(lines), len(batch) - 1)]
            pytest.fail(f"{program} {mode} died (rc {res.returncode}) on {culprit}: {res.stderr[-3000:]}")
        results += _parsed(batch, lines)
    return results


def _parsed(batch, lines) -> list:
    """(path, status, message) of each case from the readers' output lines: STATUS<TAB>MESSAGE."""
    parsed = []
    for path, line in zip(batch, lines):
        status, _, message = line.partition("\t")
        parsed.append((path, status, _unescape(message)))
    return parsed


def _unescape(message: str) -> str:
    """The message as the reader raised it (the readers' lines escape \\, newline, CR and tab)."""
    out, i = [], 0
    while i < len(message):
        if message[i] == "\\" and i + 1 < len(message):
            out.append({"n": "\n", "r": "\r", "t": "\t"}.get(message[i + 1], message[i + 1]))
            i += 2
        else:
            out.append(message[i])
            i += 1
    return "".join(out)


def check_results(results, what, names_file=True):
    """The set of statuses; fails unless every case was read ("ok") or refused in one line that
    starts with its path (names_file) or names its folder."""
    def one_line(p, m):
        named = m.startswith(f"{p}: ") if names_file else str(p) in m
        return named and "\n" not in m and "\r" not in m

    bad = [(p, s, m) for p, s, m in results if s not in ("ok", "error") or (s == "error" and not one_line(p, m))]
    assert not bad, f"{what}: {len(bad)} cases neither read nor refused in one line naming the file, e.g. " + \
        "; ".join(f"{p.name}: {s}: {m[:300]}" for p, s, m in bad[:5])
    statuses = {s for _, s, _ in results}
    return statuses


PY_WORKER = textwrap.dedent("""
    import signal, sys
    from admrt.evaluation import npz

    class Hang(Exception):
        pass

    def alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, alarm)
    for path in sys.stdin.read().splitlines():
        signal.setitimer(signal.ITIMER_REAL, 10)
        status = "ok"
        try:
            # what `admrt eval` reads of a batch: arr_0's header, arr_0 streamed, the statistics
            npz.array_info(path)
            for _ in npz.iter_batches(path, 2):
                pass
            npz.load_statistics(path)
            npz.load_images(path)
            npz.content_hash(path)
            message = ""
        except npz.NpzError as e:
            status, message = "error", str(e)
        except Hang:
            status, message = "hang", ""
        except BaseException as e:
            status, message = "unexpected", f"{type(e).__name__}: {e}"
        signal.setitimer(signal.ITIMER_REAL, 0)
        escaped = message.replace("\\\\", "\\\\\\\\").replace("\\n", "\\\\n").replace("\\r", "\\\\r")
        print(status + "\\t" + escaped.replace("\\t", "\\\\t"), flush=True)
""")


def run_python_reader(paths: list[Path], seconds: float):
    results, t_end = [], time.monotonic() + seconds
    for b in range(0, len(paths), 4 * BATCH):
        if time.monotonic() > t_end:
            break
        batch = paths[b:b + 4 * BATCH]
        res = subprocess.run([sys.executable, "-c", PY_WORKER], input="\n".join(map(str, batch)), capture_output=True,
                             text=True, timeout=600, preexec_fn=_limit_memory)
        lines = res.stdout.splitlines()
        if res.returncode != 0 or len(lines) != len(batch):
            culprit = batch[min(len(lines), len(batch) - 1)]
            pytest.fail(f"the eval reader died (rc {res.returncode}) on {culprit}: {res.stderr[-3000:]}")
        results += _parsed(batch, lines)
    return results


# ------------------------------------------------------------------------------------------------

def test_base_manifest_passes_every_field_check(tmp_path):
    """The fuzz starts from a manifest the loader accepts up to loading its (fake) unit, so that
    mutations reach every field check."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text(json.dumps(base_manifest()))
    (pkg / "denoiser.pt2").write_bytes(FAKE_UNIT)
    ((_, status, message),) = run_read_check(READ_CHECK, "package", [pkg], 60)
    assert status == "error" and message.startswith(f"{pkg / 'denoiser.pt2'}: "), message
    assert "manifest.json" not in message and "sha256" not in message, message


def test_manifest_reader_never_crashes(tmp_path):
    packages = corpus("package", tmp_path / "json", MAX_CASES)
    results = run_read_check(READ_CHECK, "json", [p / "manifest.json" for p in packages], SECONDS)
    assert len(results) >= min(MIN_CASES, len(packages)), f"only {len(results)} cases in {SECONDS} s"
    assert check_results(results, "json::parse_file") == {"ok", "error"}  # both outcomes reached


def test_package_loader_never_crashes(tmp_path):
    """The same manifests through Stack::load_package (every field, unit path and hash checked)."""
    packages = corpus("package", tmp_path / "pkg", MAX_CASES)
    results = run_read_check(READ_CHECK, "package", packages, SECONDS)
    assert len(results) >= min(MIN_CASES, len(packages)), f"only {len(results)} cases in {SECONDS} s"
    assert check_results(results, "Stack::load_package", names_file=False) == {"error"}
    reached = {m.split(": ", 2)[1].split(":")[0] for _, _, m in results if "manifest.json: " in m}
    assert len(reached) >= 20, sorted(reached)  # the mutations reach many fields' checks


def test_cpp_npz_reader_never_crashes(tmp_path):
    paths = corpus("npz", tmp_path / "npz", MAX_CASES)
    results = run_read_check(READ_CHECK, "npz", paths, SECONDS)
    assert len(results) >= min(MIN_CASES, len(paths)), f"only {len(results)} cases in {SECONDS} s"
    assert check_results(results, "read_npz") == {"ok", "error"}


def test_eval_npz_reader_never_crashes(tmp_path):
    paths = corpus("npz", tmp_path / "npz", MAX_CASES)
    results = run_python_reader(paths, SECONDS)
    assert len(results) >= min(MIN_CASES, len(paths)), f"only {len(results)} cases in {SECONDS} s"
    assert check_results(results, "admrt.evaluation.npz") == {"ok", "error"}


# ------------------------------------------------------------------------------------------------
# Regressions found by trying the readers (each failed before its fix)

def _bounded(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=_limit_memory, **kw)


@pytest.mark.parametrize("front_end", ["admrt-sample", "admrt sample"])
def test_deeply_nested_manifest_is_one_line_not_a_crash(tmp_path, front_end):
    """A manifest.json nested 20000 deep (40 KB) made both front ends die with SIGSEGV."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text("[" * 20000 + "]" * 20000)
    out = tmp_path / "out"
    cmd = ([sample_program] if front_end == "admrt-sample" else [sys.executable, "-m", "admrt.cli", "sample"])
    res = _bounded([*cmd, "--package", str(pkg), "--num", "2", "--out", str(out)])
    assert res.returncode > 0, (res.returncode, res.stderr[-2000:])  # an error exit, not a signal
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert f"{pkg / 'manifest.json'}: not valid JSON at line 1 (byte 256): nested deeper than 256 levels" in line
    assert not out.exists()


def test_npz_header_sizes_are_checked_before_allocation(tmp_path):
    """A shard whose .npy header declares (2^32, 2^32, 2) uint8 (2^65 bytes, overflowing int64) or
    2^40 bytes in a 1 KB file is refused in one line; the reader allocated first (or overflowed)."""
    cases = {"overflow": "(4294967296, 4294967296, 2)", "huge": "(1099511627776,)", "negative": "(-1, 4)"}
    paths = []
    for name, shape in cases.items():
        npy = npy_bytes(np.zeros(4, np.uint8), lambda h, s=shape: h.replace("(4,)", s))
        p = tmp_path / f"{name}.npz"
        p.write_bytes(zip_bytes({"arr_0.npy": npy}))
        paths.append(p)
    results = run_read_check(READ_CHECK, "npz", paths, 60)
    for path, status, message in results:
        assert status == "error" and message.startswith(f"{path}: damaged .npy data (shape"), (path, status, message)


@pytest.mark.parametrize("content,expected", [
    (b"not a zip at all", "damaged .npz (File is not a zip file); expected an .npz as np.savez writes it"),
    ("object-1d", "arr_0 is an object array (dtype object); expected numbers (object arrays are never unpickled)"),
    ("shape-1d", "arr_0 must be uint8 (N, H, W, 1|3), got uint8 (5,)"),
])
def test_eval_refuses_malformed_npz_in_one_line(tmp_path, content, expected):
    """`admrt eval` on a non-zip .npz and on a 1-D object array printed tracebacks."""
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.zeros((4, 8, 8, 3), np.uint8))
    bad = tmp_path / "bad.npz"
    if content == "object-1d":
        np.savez(bad, np.array([1, "a", None], dtype=object))
    elif content == "shape-1d":
        np.savez(bad, np.zeros(5, np.uint8))
    else:
        bad.write_bytes(content)
    for args in ([ref, bad], [bad, ref]):
        res = _bounded([sys.executable, "-m", "admrt.cli", "eval", *map(str, args), "--no-cache"])
        assert res.returncode == 2 or res.returncode == 1, res.stderr[-2000:]
        line = res.stderr.strip()
        assert "\n" not in line and line.startswith(f"admrt eval: {bad}: {expected}"), res.stderr[-2000:]


@pytest.mark.parametrize("text,error", [
    ("[" * 256 + "]" * 256, None),                                   # the limit itself reads
    ("[" * 257 + "]" * 257, "line 1 (byte 256): nested deeper than 256 levels"),
    ('{"a":\n [01]}', "line 2 (byte 8): bad number (a leading zero)"),
    ("[+1]", "line 1 (byte 1): expected a value"),
    ("[1e999]", "line 1 (byte 1): number 1e999 is beyond the range of a double"),
    ("[1e-999, -0, NaN, -Infinity]", None),                          # as Python's json reads them
    ('["caf\u00e9 \\ud83d\\ude00"]', None),
    (b'["\xff"]', "line 1 (byte 2): not UTF-8 text"),
    (b'["\xed\xa0\x80"]', "line 1 (byte 2): not UTF-8 text"),      # an encoded surrogate
    ('["\\ud800"]', "a lone surrogate \\u escape (not UTF-8 text)"),
    ('["a\tb"]', "line 1 (byte 3): a control character inside a string"),
])
def test_json_reader_is_strict_and_names_line_and_byte(tmp_path, text, error):
    """The C++ JSON reader (manifests, run records): JSON's grammar, UTF-8, 256 levels; a refusal
    names the file, line and byte. Before: no depth limit (SIGSEGV), +1, 01, control characters and
    bytes that are not UTF-8 were read."""
    path = tmp_path / "m.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    ((_, status, message),) = run_read_check(READ_CHECK, "json", [path], 60)
    if error is None:
        assert status == "ok", message
    else:
        assert status == "error" and message.startswith(f"{path}: not valid JSON at ") and error in message, message
