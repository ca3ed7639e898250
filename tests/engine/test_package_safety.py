"""Packages are verified at load (engine/csrc/package.cpp), through the real `admrt-sample` binary
and `admrt sample --package`: a damaged or replaced unit, a unit path leading out of the package,
a manifest field out of range, a NaN table or a unit of the wrong shape is one line naming the unit
or manifest.json and the field, with nothing written to --out; the run record fingerprints the
units that run (a resume over a swapped unit is refused); --num too large is refused before
anything is allocated; a killed run's extracted units do not accumulate in TMPDIR.

One package of a tiny base model is exported once per module (one AOT compile, under a minute on
2 cores) and copied per test."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from child_limits import address_space

import admrt
from admrt.config import ModelConfig
from admrt.engine import sample_program

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gd_reference import random_model  # noqa: E402

BASE = ModelConfig(kind="unet", image_size=8, model_channels=32, out_channels=6, num_res_blocks=1,
                   attention_resolutions=(4,), channel_mult=(1, 2), num_classes=10, num_head_channels=16)
MEMORY = 3 << 30  # address-space bound of every child: a normal run needs under 2 GiB


_bounded = address_space(MEMORY)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    d = tmp_path_factory.mktemp("pkg")
    admrt.save_model(random_model(BASE), d / "base.safetensors")
    from admrt.cli import main
    assert main(["export", "aoti", "--model", str(d / "base.safetensors"), "--steps", "ddim3", "--device", "cpu",
                 "--max-batch", "4", "--out", str(d / "pkg")]) == 0
    return d / "pkg"


@pytest.fixture
def pkg(package, tmp_path):
    """A copy of the package this test may damage."""
    return Path(shutil.copytree(package, tmp_path / "pkg"))


def _program(*args, env=None, **kw):
    return subprocess.run([sample_program, *map(str, args)], capture_output=True, text=True, timeout=300,
                          preexec_fn=_bounded, env=env, **kw)


def _cli(*args):
    code = "import sys; from admrt.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "sample", *map(str, args)], capture_output=True, text=True,
                          timeout=300, preexec_fn=_bounded)


def _refused(res, prefix, message, code=1):
    """rc, exactly one stderr line starting with prefix, holding message."""
    assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), res.stderr
    assert message in lines[0], lines[0]
    return lines[0]


def _refused_by_both_front_ends(pkg, out, message):
    """admrt-sample and `admrt sample --package` each refuse the package in one line holding
    message, and write nothing to out."""
    _refused(_program("--package", pkg, "--num", 2, "--out", out, "--no-progress"), "admrt-sample: ", message)
    assert not out.exists()
    _refused(_cli("--package", pkg, "--num", 2, "--out", out), "admrt sample: ", message)
    assert not out.exists()


def _edit(pkg, change):
    m = json.loads((pkg / "manifest.json").read_text())
    change(m)
    (pkg / "manifest.json").write_text(json.dumps(m))


def _rehash(pkg, role="model", file="denoiser.pt2"):
    _edit(pkg, lambda m: m["models"][role].update(sha256=hashlib.sha256((pkg / file).read_bytes()).hexdigest()))


def _flip(path, at=None, n=4096):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def test_export_records_each_units_sha256(package):
    m = json.loads((package / "manifest.json").read_text())
    assert m["models"]["model"]["sha256"] == hashlib.sha256((package / "denoiser.pt2").read_bytes()).hexdigest()


def test_a_damaged_unit_is_refused_naming_it_in_both_front_ends(pkg, tmp_path):
    _flip(pkg / "denoiser.pt2")  # 4 KB flipped inside the compiled library: it loaded and sampled before
    out = tmp_path / "out"
    want = "denoiser.pt2: content differs from manifest.json's sha256 (damaged or replaced); re-export the package"
    _refused_by_both_front_ends(pkg, out, want)


def test_a_resume_over_a_swapped_unit_is_refused(pkg, tmp_path):
    out = tmp_path / "out"
    args = ("--package", pkg, "--num", 4, "--shard-size", 2, "--out", out, "--no-progress")
    assert _program(*args).returncode == 0
    for f in out.glob("samples_*.npz"):
        f.unlink()
    (out / "shards" / "shard_00001.npz").unlink()  # an unfinished run
    record = (out / "run.json").read_text()
    # Another export's unit with its hash written into the manifest: it loads and runs, and the
    # manifest's weights fingerprint is unchanged, but the record fingerprints what runs.
    with zipfile.ZipFile(pkg / "denoiser.pt2", "a") as z:
        z.comment = b"another export"
    _rehash(pkg)
    line = _refused(_program(*args), "admrt-sample: ", "holds a run with other arguments (weights: ")
    assert "->" in line
    assert (out / "run.json").read_text() == record and not (out / "shards" / "shard_00001.npz").exists()


@pytest.mark.parametrize("file", ["../../../../etc/passwd", "/etc/passwd", "sub/../denoiser.pt2", "", "outside"])
def test_a_unit_path_outside_the_package_is_refused(pkg, tmp_path, file):
    if file == "outside":  # a symlink to a copy outside the folder, with the right hash
        shutil.copy(pkg / "denoiser.pt2", tmp_path / "elsewhere.pt2")
        (pkg / "link.pt2").symlink_to(tmp_path / "elsewhere.pt2")
        file = "link.pt2"
    _edit(pkg, lambda m: m["models"]["model"].update(file=file))
    out = tmp_path / "out"
    _refused(_program("--package", pkg, "--num", 2, "--out", out, "--no-progress"), "admrt-sample: ",
             f"manifest.json: models.model.file={json.dumps(file)}: expected a file name inside the package folder")
    assert not out.exists()


def _set(path, value):
    def change(m):
        *parents, last = path
        node = m
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return change


TABLES = ["models", "model", "schedules", "ddim3", "tables"]
BAD_MANIFESTS = [
    ("batch.min -5", _set(["batch", "min"], -5), "batch.min=-5: expected 1"),
    ("batch.min above max", _set(["batch", "min"], 9), "batch.min=9: expected 1"),
    ("batch.max 0", _set(["batch", "max"], 0), "batch.max=0: expected an integer from 1 to 65536"),
    ("dtype fp64", _set(["dtype"], "fp64"), "dtype=\"fp64\": expected one of ('fp32', 'fp16', 'bf16')"),
    ("timestep 1e9", lambda m: m["models"]["model"]["schedules"]["ddim3"]["tables"]["timestep_map"].__setitem__(
        1, 10 ** 9), "models.model.schedules.ddim3.tables.timestep_map[1]=1000000000: expected increasing integers"),
    ("num_classes 1e12", _set(["models", "model", "num_classes"], 10 ** 12),
     "models.model.num_classes=1000000000000: expected null or an integer from 1 to 1048576"),
    ("NaN in a table", lambda m: m["models"]["model"]["schedules"]["ddim3"]["tables"]["alphas_cumprod"].__setitem__(
        0, float("nan")), "models.model.schedules.ddim3.tables.alphas_cumprod[0]=nan: expected numbers from 0 to 1"),
    ("table too short", lambda m: m["models"]["model"]["schedules"]["ddim3"]["tables"]["log_betas"].pop(),
     "models.model.schedules.ddim3.tables."),
    ("image_size 0", _set(["models", "model", "image_size"], 0), "models.model.image_size=0: expected an integer"),
    ("image too large", _set(["models", "model", "image_size"], 16384),
     "models.model.image_size=16384: expected in_channels x image_size^2 at most 268435456"),
    ("image_size text", _set(["models", "model", "image_size"], "8"), "models.model.image_size=\"8\": expected"),
    ("out_channels 7", _set(["models", "model", "out_channels"], 7),
     "models.model.out_channels=7: expected in_channels (3) or twice it"),
    ("unknown kind", _set(["models", "model", "kind"], "gan"), "models.model.kind=\"gan\": expected one of ('unet')"),
    ("unknown role", _set(["models", "critic"], {}), "models.critic: unknown role"),
    ("no model", _set(["models", "model"], KeyError), "models.model: missing; expected an object"),
    ("default steps bogus", _set(["default_steps"], "fast"), "default_steps=\"fast\": expected a step plan"),
    ("default steps not carried", _set(["default_steps"], "ddim7"), "default_steps: steps='ddim7'"),
    ("original_num_steps 0", _set(TABLES[:-1] + ["original_num_steps"], 0),
     "models.model.schedules.ddim3.original_num_steps=0: expected an integer from 1 to"),
    ("weights missing", _set(["weights"], KeyError), "weights: missing; expected a string"),
    ("no sha256", _set(["models", "model", "sha256"], KeyError),
     "models.model.sha256: missing; expected the unit's sha256 (64 hex digits)"),
    ("older format", _set(["format_version"], 1), "format_version 1, but this admrt reads version 2; export the "
     "package again with this admrt"),
]


@pytest.mark.parametrize("case,change,message", BAD_MANIFESTS, ids=[c[0] for c in BAD_MANIFESTS])
def test_every_manifest_field_is_checked_at_load(pkg, tmp_path, case, change, message):
    _edit(pkg, change)
    out = tmp_path / "out"
    line = _refused(_program("--package", pkg, "--num", 2, "--out", out, "--no-progress"), "admrt-sample: ", message)
    assert "manifest.json" in line
    assert not out.exists()


def test_a_unit_of_the_wrong_shape_is_refused_at_load(pkg, tmp_path):
    # The manifest says 3 output channels (fixed variance); the unit gives 6: found before the
    # run folder is touched, naming the unit.
    _edit(pkg, lambda m: m["models"]["model"].update(out_channels=3, variance="fixed_small"))
    out = tmp_path / "out"
    want = "denoiser.pt2: gives shape [1, 6, 8, 8] for a batch of 1, but manifest.json's model entry says [1, 3, 8, 8]"
    _refused_by_both_front_ends(pkg, out, want)


def test_num_too_large_is_refused_before_allocation(package, tmp_path):
    out = tmp_path / "out"
    res = _program("--package", package, "--num", 10 ** 12, "--out", out, "--no-progress")
    _refused(res, "admrt-sample: ", "num=1000000000000: the run's images take ", code=2)
    assert "expected at most" in res.stderr and not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--seed", str(2 ** 64)], "--seed=18446744073709551616: expected an integer from 0 to 18446744073709551615"),
    (["--seed", "-1"], "--seed=-1: expected an integer from 0 to 18446744073709551615"),
    (["--seed", "1e3"], "--seed=1e3: expected an integer from 0 to 18446744073709551615"),
    (["--steps", ""], "--steps='': expected a value"),
    (["--device", ""], "--device='': expected a value"),
    (["--classes", ""], "--classes='': expected comma-separated ints"),
    (["--out", ""], "--out='': expected a value"),
])
def test_bad_arguments_are_refused(package, tmp_path, args, message):
    out = tmp_path / "out"
    res = _program("--package", package, "--num", 2, *(["--out", out] if "--out" not in args else []), *args,
                   "--no-progress", cwd=tmp_path)
    _refused(res, "admrt-sample: ", message, code=2)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_largest_seed_is_taken(package, tmp_path):
    res = _program("--package", package, "--num", 2, "--seed", 2 ** 64 - 1, "--out", tmp_path / "o", "--no-progress")
    assert res.returncode == 0, res.stderr


def test_killed_runs_leave_no_extracted_units_behind(package, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    for i in range(3):
        proc = subprocess.Popen([sample_program, "--package", str(package), "--num", "100000", "--batch-size", "1",
                                 "--out", str(tmp_path / f"o{i}"), "--no-progress"], env=env, preexec_fn=_bounded,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list(tmp.rglob("*.so")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert list(tmp.rglob("*.so")), "the units were not extracted under TMPDIR (the folder the test watches)"
        time.sleep(0.5)  # sampling
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Each load removes what killed runs left: at most the last one's folder remains.
        assert len(list(tmp.iterdir())) <= 1, list(tmp.iterdir())
    res = _program("--package", package, "--num", 2, "--out", tmp_path / "done", "--no-progress", env=env)
    assert res.returncode == 0, res.stderr
    assert list(tmp.iterdir()) == []  # the finished run removed its own, and the killed one's
