"""The compile cache (admrt.engine.cache) and backend="auto" (admrt.engine.backends.choose_backend):
keys, atomic entries, two processes on one key, eviction, damaged entries, the auto rule and its
fallbacks, and an aoti Engine built once and loaded from the cache by the next."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import admrt
from admrt.engine.backends import choose_backend
from admrt.engine.cache import CompileCache, default_root, key_of, unit_fields
from admrt.models.units import Denoiser


def _builder(calls, payload=b"compiled"):
    def build(folder):
        calls.append(folder)
        (folder / "unit.bin").write_bytes(payload)
        return {"note": "test"}
    return build


def _load(folder):
    return (folder / "unit.bin").read_bytes()


def test_root_follows_the_documented_order(monkeypatch, tmp_path):
    monkeypatch.setenv("ADMRT_CACHE_DIR", str(tmp_path / "a"))
    assert default_root() == tmp_path / "a"
    monkeypatch.delenv("ADMRT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "admrt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "admrt"
    monkeypatch.setenv("ADMRT_CACHE_MAX_GB", "-1")
    with pytest.raises(ValueError, match="ADMRT_CACHE_MAX_GB='-1': expected a positive number of GiB"):
        CompileCache(tmp_path)


def test_keys_hash_the_weights_content_not_the_file(tmp_path):
    """The same weights saved twice (two files) give one key; one changed weight, another dtype,
    device or torch version give another."""
    torch.manual_seed(0)
    model = admrt.create_model("tiny-cond")
    admrt.save_model(model, tmp_path / "a.safetensors")
    admrt.save_model(admrt.load_model(tmp_path / "a.safetensors"), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() != b"" and (tmp_path / "a.safetensors") != (tmp_path / "b.safetensors")
    a = unit_fields(Denoiser(admrt.load_model(tmp_path / "a.safetensors")))
    b = unit_fields(Denoiser(admrt.load_model(tmp_path / "b.safetensors")))
    assert key_of("aoti", a) == key_of("aoti", b)
    changed = admrt.load_model(tmp_path / "a.safetensors")
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert key_of("aoti", unit_fields(Denoiser(changed))) != key_of("aoti", a)
    assert key_of("aoti", unit_fields(Denoiser(admrt.load_model(tmp_path / "a.safetensors"), dtype="bf16"))) \
        != key_of("aoti", a)
    for field, value in (("device", "cuda NVIDIA H200 sm_90 cuda 13.0"), ("torch", "9.9"), ("admrt", "0.0 x")):
        assert key_of("aoti", {**a, field: value}) != key_of("aoti", a)
    assert key_of("onnxruntime", a) != key_of("aoti", a)


def test_an_entry_is_built_once_then_loaded(tmp_path):
    lines, calls = [], []
    cache = CompileCache(tmp_path, log=lines.append)
    assert cache.get_or_build("x", {"k": 1}, _builder(calls), _load, what="the base model") == b"compiled"
    assert len(calls) == 1
    assert lines[0].startswith("admrt: compiling the base model for backend x (") and str(tmp_path) in lines[0]
    lines.clear()
    assert cache.get_or_build("x", {"k": 1}, _builder(calls), _load, what="the base model") == b"compiled"
    assert len(calls) == 1 and lines == []
    [entry] = cache.entries()
    assert entry.record["note"] == "test" and entry.record["fields"] == {"k": 1}
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_failed_build_leaves_no_entry(tmp_path):
    cache = CompileCache(tmp_path, log=lambda line: None)

    def fail(folder):
        (folder / "unit.bin").write_bytes(b"half")
        raise RuntimeError("the compiler crashed")

    with pytest.raises(RuntimeError, match="the compiler crashed"):
        cache.get_or_build("x", {"k": 1}, fail, _load, what="u")
    assert cache.entries() == [] and list((tmp_path / "staging").iterdir()) == []
    calls = []
    assert cache.get_or_build("x", {"k": 1}, _builder(calls), _load, what="u") == b"compiled" and len(calls) == 1


def _worker(tmp_path, name, sleep, after=None):
    """A process that builds key {"k": 1} (sleeping `sleep` s inside the build, once the worker named
    `after` is about to ask the cache too) and prints what it loaded."""
    ready = str(tmp_path / f"{after}.ready") if after else ""
    code = textwrap.dedent(f"""
        import time, sys
        from pathlib import Path
        from admrt.engine.cache import CompileCache
        def build(folder):
            with open({str(tmp_path / 'builds')!r}, 'a') as f:
                f.write({name!r} + '\\n')
            (folder / 'unit.bin').write_bytes(b'partial')
            deadline = time.time() + 120
            while {ready!r} and not Path({ready!r}).exists() and time.time() < deadline:
                time.sleep(0.05)   # a process start (importing torch) can take longer than the sleep below
            time.sleep({sleep})
            (folder / 'unit.bin').write_bytes(b'from ' + {name!r}.encode())
        Path({str(tmp_path)!r}, {name + '.ready'!r}).touch()
        out = CompileCache({str(tmp_path / 'cache')!r}).get_or_build(
            'x', {{'k': 1}}, build, lambda f: (f / 'unit.bin').read_bytes(), what='u')
        print(out.decode())
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_compile_leaves_nothing_a_later_run_takes(tmp_path):
    proc = _worker(tmp_path, "killed", 60)
    deadline = time.time() + 60
    while not (tmp_path / "builds").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "cache" / "staging").iterdir())   # its half-written compile
    proc = _worker(tmp_path, "second", 0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "from second"
    assert (tmp_path / "builds").read_text().split() == ["killed", "second"]
    assert list((tmp_path / "cache" / "staging").iterdir()) == []   # the dead process's folder removed


def test_two_processes_on_one_key_compile_once(tmp_path):
    first = _worker(tmp_path, "first", 3, after="second")
    deadline = time.time() + 60
    while not (tmp_path / "builds").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = _worker(tmp_path, "second", 0)
    outs = [p.communicate(timeout=120) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == ["from first", "from first"]
    assert (tmp_path / "builds").read_text().split() == ["first"]
    assert "waiting for another process compiling the same unit" in outs[1][1]


def test_least_recently_used_entries_are_evicted(tmp_path):
    cache = CompileCache(tmp_path, max_bytes=25000, log=lambda line: None)
    for k in range(2):
        cache.get_or_build("x", {"k": k}, _builder([], b"x" * 10000), _load, what="u")
        time.sleep(0.02)
    os.utime(cache.entries()[0].path / "entry.json")   # k=0 used again: now k=1 is the least recent
    cache.get_or_build("x", {"k": 2}, _builder([], b"x" * 10000), _load, what="u")
    kept = sorted(e.record["fields"]["k"] for e in cache.entries())
    assert kept == [0, 2]
    assert sum(e.size for e in cache.entries()) <= 25000


def test_a_damaged_entry_is_rebuilt(tmp_path):
    lines, calls = [], []
    cache = CompileCache(tmp_path, log=lines.append)
    cache.get_or_build("x", {"k": 1}, _builder(calls), _load, what="u")
    [entry] = cache.entries()
    (entry.path / "unit.bin").write_bytes(b"compiles")   # same size, other bytes
    assert cache.get_or_build("x", {"k": 1}, _builder(calls), _load, what="u") == b"compiled"
    assert len(calls) == 2 and any("is damaged (unit.bin does not match its recorded size and sha256)" in line
                                   for line in lines)


def test_a_planted_lock_symlink_is_not_followed(tmp_path):
    cache = CompileCache(tmp_path / "c", log=lambda line: None)
    target = tmp_path / "victim"
    target.write_text("precious")
    (tmp_path / "c" / "locks").mkdir(parents=True)
    os.symlink(target, tmp_path / "c" / "locks" / f"{key_of('x', {'k': 1})}.lock")
    with pytest.raises(OSError, match="a symbolic link is never followed"):
        cache.get_or_build("x", {"k": 1}, _builder([]), _load, what="u")
    assert target.read_text() == "precious"


def test_cache_command_lists_and_clears(tmp_path, capsys):
    from admrt.cli import main
    cache = CompileCache(tmp_path, log=lambda line: None)
    cache.get_or_build("aoti", {"k": 1, "dtype": "fp32"}, _builder([]), _load, what="the upsampler")
    capsys.readouterr()
    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}: 1 entries" in out and "aoti" in out and "the upsampler" in out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and cache.entries() == []


# -- backend="auto" ------------------------------------------------------------------------------

def test_auto_rule(monkeypatch):
    model, clf = admrt.create_model("tiny-cond"), admrt.create_model("tiny-classifier")
    assert choose_backend(torch.device("cpu"), (model, clf, None)) == ("aoti", None)
    assert choose_backend(torch.device("cuda"), (model, clf, None)) == ("eager", None)
    from gd_oracle import reference_model
    name, why = choose_backend(torch.device("cpu"), (reference_model(model.config), None, None))
    assert name == "eager" and "UNetModel is not an admrt model" in why
    big = admrt.create_model("imagenet64-cond", device="meta")   # 296M parameters: the ONNX runtimes
    assert choose_backend(torch.device("cpu"), (big, None, None)) == ("openvino", None)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert choose_backend(torch.device("cpu"), (big, None, None)) == ("onnxruntime", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "onnx" in name else real(name, *a))
    name, why = choose_backend(torch.device("cpu"), (big, None, None))
    assert name == "eager" and "296M parameters runs fastest on CPU in OpenVINO or onnxruntime" in why
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    name, why = choose_backend(torch.device("cpu"), (model, None, None))
    assert name == "eager" and "needs a C++ compiler" in why


def test_auto_falls_back_to_eager_with_a_logged_line_and_a_named_backend_raises(monkeypatch, caplog):
    from admrt.engine import backends

    def broken(unit, cache):
        raise RuntimeError("no compiler works here\nsecond line")

    monkeypatch.setitem(backends._BACKENDS, "aoti", backends.Backend(broken, broken, True, True))
    model = admrt.create_model("tiny-cond")
    with caplog.at_level(logging.WARNING, logger="admrt.engine.engine"):
        eng = admrt.Engine(model)
    assert eng.backend_name == "eager"
    assert "backend='auto': aoti failed here (no compiler works here); running 'eager'" in caplog.text
    with pytest.raises(RuntimeError, match="no compiler works here"):
        admrt.Engine(model, backend="aoti")


def test_auto_compiles_once_and_the_next_engine_loads_it(tmp_path, capfd):
    """backend="auto" on CPU: aoti, compiled into the cache on the first Engine (one notice), loaded
    by the second (no notice, no compile); images within one uint8 level of eager's."""
    torch.manual_seed(0)
    model = admrt.create_model("tiny-cond")
    kw = dict(classes=[1, 3, 5], steps="ddim4", seeds=7)
    eng = admrt.Engine(model, cache_dir=tmp_path)
    assert eng.backend_name == "aoti"
    err = capfd.readouterr().err
    assert err.count("admrt: compiling the base model for backend aoti") == 1
    t0 = time.perf_counter()
    again = admrt.Engine(model, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 15
    assert "compiling" not in capfd.readouterr().err
    got = again.sample(**kw).images
    want = admrt.Engine(model, backend="eager").sample(**kw).images
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    [entry] = CompileCache(tmp_path).entries()
    assert entry.record["fields"]["max_batch"] == 1024 and json.loads((entry.path / "entry.json").read_text())
