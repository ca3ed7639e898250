"""AOTInductor packages and the Python-free runtime: `admrt export aoti` -> `admrt-sample` (C++, no
Python) and `admrt.Engine.from_package` give the images admrt.Engine gives (eager, seeded), for the
cascade guided base -> upsampler, DDIM and DDPM, guided and unguided; bad packages and arguments
are one clear error each, with nothing written.

One package of tiny models (8px base, 8px classifier, 8->16 upsampler) is exported once per test
session (three AOT compiles, a few minutes on 2 cores)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import admrt
from admrt.config import ModelConfig
from admrt import core
from admrt.engine import cmake_prefix_path, sample_program

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gd_reference import random_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = ModelConfig(kind="unet", image_size=8, model_channels=32, out_channels=6, num_res_blocks=1,
                   attention_resolutions=(4,), channel_mult=(1, 2), num_classes=10, num_head_channels=16)
CLASSIFIER = ModelConfig(kind="classifier", image_size=8, model_channels=32, out_channels=10, num_res_blocks=1,
                         attention_resolutions=(4,), channel_mult=(1, 2), num_head_channels=16, pool="attention")
# DDIM, DDPM, sectioned DDPM and solver-grid plans of each stage
STEPS, UP_STEPS = "ddim5 6 2,2,2 dpmpp2m4", "ddim3 4 unipc2m3"
MAX_BATCH = 8


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """(folder of the three .safetensors, the models, the exported package folder)."""
    d = tmp_path_factory.mktemp("aoti")
    models = {"base": random_model(BASE), "clf": random_model(CLASSIFIER), "up": random_model("tiny-upsample")}
    for name, m in models.items():
        admrt.save_model(m, d / f"{name}.safetensors")
    from admrt.cli import main
    rc = main(["export", "aoti", "--model", str(d / "base.safetensors"), "--classifier", str(d / "clf.safetensors"),
               "--upsampler", str(d / "up.safetensors"), "--steps", STEPS, "--upsampler-steps", UP_STEPS,
               "--device", "cpu", "--max-batch", str(MAX_BATCH), "--out", str(d / "pkg")])
    assert rc == 0
    return d, models, d / "pkg"


def _program(*args, env=None, cwd=None):
    return subprocess.run([sample_program, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=600)


def test_manifest_records_versions_tables_and_bounds(stack):
    _, models, pkg = stack
    m = json.loads((pkg / "manifest.json").read_text())
    assert (m["format"], m["format_version"], m["device"], m["dtype"]) == ("admrt-aoti", core.PACKAGE_FORMAT_VERSION,
                                                                          "cpu", "fp32")
    assert m["torch_version"] == torch.__version__ and m["admrt_version"] == admrt.__version__
    assert m["batch"] == {"min": 1, "max": MAX_BATCH}
    assert sorted(m["models"]) == ["classifier", "model", "upsampler"]
    assert sorted(m["models"]["model"]["schedules"]) == ["2,2,2", "6", "ddim5", "t4"]
    assert sorted(m["models"]["upsampler"]["schedules"]) == ["4", "ddim3", "t3"]
    from admrt.diffusion import build_tables
    want = build_tables(models["base"].preset.diffusion, "ddim5").tensors()
    got = m["models"]["model"]["schedules"]["ddim5"]["tables"]
    for name, table in want.items():  # the tables travel exactly (JSON floats round-trip)
        assert got[name] == table.tolist(), name
    for f in ("denoiser.pt2", "classifier_grad.pt2", "upsampler.pt2"):
        assert (pkg / f).stat().st_size > 0


def test_package_units_match_eager_at_other_batch_sizes(stack):
    _, models, pkg = stack
    from admrt.engine import ClassifierGradient, Denoiser
    package = core.Stack.load_package(str(pkg))
    g = torch.Generator().manual_seed(5)
    for b in (1, 4, MAX_BATCH):
        x, t, y = torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g).float(), \
            torch.randint(0, 10, (b,), generator=g)
        torch.testing.assert_close(package.run("model", [x, t, y]), Denoiser(models["base"])(x, t, y),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(package.run("classifier", [x, t, y]), ClassifierGradient(models["clf"])(x, t, y),
                                   rtol=1e-4, atol=1e-7)
        x16, low = torch.randn(b, 3, 16, 16, generator=g), torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
        torch.testing.assert_close(package.run("upsampler", [x16, t, y, low]),
                                   Denoiser(models["up"])(x16, t, y, low), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps,up_steps,guidance", [("ddim5", "ddim3", 1.0), ("6", "4", 2.0), ("ddim5", "4", 0.0),
                                                     ("2,2,2", "ddim3", 1.0), ("ddim:6", "ddpm:ddim3", 1.0),
                                                     ("dpmpp2m4", "unipc2m3", 1.0),
                                                     ("unipc3m4", "dpmpp2m-sde:4", 2.0)])
def test_program_and_from_package_equal_the_engine(stack, tmp_path, steps, up_steps, guidance):
    """The C++ program's npz, and Engine.from_package's floats, against admrt.Engine (eager)."""
    _, models, pkg = stack
    classes, seed, num = [1, 2, 3, 9, 0], 11, 5
    eng = admrt.Engine(models["base"], classifier=models["clf"], upsampler=models["up"], backend="eager")
    want = eng.sample(classes=classes, steps=steps, upsampler_steps=up_steps, guidance=guidance, seeds=seed,
                      batch_size=2, keep_float=True)

    got = admrt.Engine.from_package(pkg).sample(classes=classes, steps=steps, upsampler_steps=up_steps,
                                                guidance=guidance, seeds=seed, batch_size=3, keep_float=True)
    # The compiled units differ from eager by float rounding (~2e-6 a call); through DDPM's chain
    # with guidance 2 that grows to 1.2e-4 (measured), hence 2e-4 there and 1e-4 elsewhere; the
    # solvers' few large extrapolating steps (3-4 here) grow it to 2.3e-4 (measured), hence 5e-4.
    solver = core.StepPlan.parse(steps).solver or core.StepPlan.parse(up_steps).solver
    assert np.abs(got.samples - want.samples).max() <= (5e-4 if solver else 2e-4 if steps in ("6", "2,2,2") else 1e-4)
    assert np.abs(got.images.astype(int) - want.images.astype(int)).max() <= 1
    assert np.abs(got.base_images.astype(int) - want.base_images.astype(int)).max() <= 1

    out = tmp_path / "run"
    res = _program("--package", pkg, "--num", num, "--classes", ",".join(map(str, classes)), "--batch-size", 2,
                   "--shard-size", 3, "--seed", seed, "--steps", steps, "--upsampler-steps", up_steps,
                   "--guidance", guidance, "--out", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    npz = np.load(out / "samples_5x16x16x3.npz")
    assert npz["arr_1"].tolist() == classes
    assert np.abs(npz["arr_0"].astype(int) - want.images.astype(int)).max() <= 1
    assert (npz["arr_0"] == got.images).all()  # the same C++ Context, batch-invariant noise


def test_package_honours_the_recorded_parameterisation(stack, tmp_path):
    """diffusion.predict_xstart in the manifest makes the C++ Context read the same compiled network
    as an x_0 predictor, as admrt.Engine does (and a package that lacks the key is an eps model)."""
    import dataclasses
    _, models, pkg = stack
    edited = tmp_path / "pkg"
    shutil.copytree(pkg, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["models"]["model"]["diffusion"]["predict_xstart"] = True
    del manifest["models"]["upsampler"]["diffusion"]["predict_xstart"]  # as packages before it was recorded
    (edited / "manifest.json").write_text(json.dumps(manifest))
    x0_model = dataclasses.replace(models["base"].preset.diffusion, predict_xstart=True)
    eng = admrt.Engine(models["base"], classifier=models["clf"], upsampler=models["up"], diffusion=x0_model, backend="eager")
    # Unguided: a guided DDIM step through an x_0 model cancels large terms (x_t / sqrt(abar) against
    # the predicted x_0) and the compiled classifier gradient's rounding can move a base pixel across a
    # uint8 bin, which the upsampler then amplifies; the guided x_0 loops are checked against
    # guided-diffusion in tests/test_gd_dropin.py, on the same C++ Sampler.
    for steps in ("ddim5", "6"):
        kwargs = dict(classes=[1, 4], steps=steps, upsampler_steps="4", guidance=0.0, seeds=3, keep_float=True)
        want = eng.sample(**kwargs)
        got = admrt.Engine.from_package(edited).sample(**kwargs)
        assert np.abs(got.samples - want.samples).max() <= 2e-4
        assert (got.base_images == want.base_images).all()
        eps = admrt.Engine.from_package(pkg).sample(**kwargs)
        assert np.abs(eps.base_images.astype(int) - got.base_images.astype(int)).max() > 10


def test_program_resumes_and_shares_the_run_folder_with_admrt_sample(stack, tmp_path, cli_error):
    _, _, pkg = stack
    from admrt.cli import main
    args = ["--package", pkg, "--num", 5, "--batch-size", 2, "--shard-size", 2, "--seed", 3, "--out", tmp_path / "r",
            "--no-progress"]
    assert main(["sample", *map(str, args)]) == 0
    first = np.load(tmp_path / "r" / "samples_5x16x16x3.npz")["arr_0"]
    (tmp_path / "r" / "shards" / "shard_00001.npz").unlink()
    res = _program(*args)  # the C++ program resumes the Python front end's run
    assert res.returncode == 0 and "resuming: 2 of 3 shards" in res.stderr, res.stderr
    assert (np.load(tmp_path / "r" / "samples_5x16x16x3.npz")["arr_0"] == first).all()
    other = [str(a) for a in args]
    other[other.index("--seed") + 1] = "4"
    res = _program(*other)
    assert res.returncode == 1 and "holds a run with other arguments (seed: 3 -> 4)" in res.stderr
    assert "holds a run with other arguments (seed: 3 -> 4)" in cli_error(["sample", *other])
    # The record fingerprints the verified units that run, not only the weights the manifest claims
    # (a package re-exported with others, or with one unit swapped, is not resumed into).
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    manifest_weights = json.loads((pkg / "manifest.json").read_text())["weights"]
    assert record["weights"] == core.Stack.load_package(str(pkg)).weights != manifest_weights
    assert record["weights"].startswith("sha256:") and record["device"] == "cpu"
    # One process per run folder, whichever front end holds it.
    from admrt.core import RunFolder
    holder = RunFolder(tmp_path / "r", "test holder")
    holder.lock()
    try:
        res = _program(*args)
        assert res.returncode == 1 and f"is in use by process {os.getpid()} (test holder" in res.stderr, res.stderr
    finally:
        holder.unlock()
    (tmp_path / "r" / "shards" / ".shard_00001.npz.tmp").write_bytes(b"half")  # a killed run's leftover
    assert _program(*args).returncode == 0
    assert not list((tmp_path / "r").rglob("*.tmp"))


def test_either_front_end_resumes_the_others_run(stack, tmp_path):
    """A run started by admrt-sample is finished by `admrt sample --package` and the reverse (both
    run engine/csrc/runfolder.cpp): the same record, and the final array of an uninterrupted run."""
    _, _, pkg = stack
    from admrt.cli import main
    args = ["--package", pkg, "--num", 5, "--batch-size", 2, "--shard-size", 2, "--seed", 11, "--classes", "4,1",
            "--guidance", 0.5, "--no-progress"]
    assert main(["sample", *map(str, args), "--out", str(tmp_path / "whole")]) == 0
    whole = np.load(tmp_path / "whole" / "samples_5x16x16x3.npz")
    for first, second in (("program", "python"), ("python", "program")):
        out = tmp_path / f"{first}-then-{second}"
        if first == "program":
            assert _program(*args, "--out", out).returncode == 0
        else:
            assert main(["sample", *map(str, args), "--out", str(out)]) == 0
        # interrupted after its first shard: the later shards and the final file never written
        for name in ("shard_00001.npz", "shard_00002.npz"):
            (out / "shards" / name).unlink()
        (out / "samples_5x16x16x3.npz").unlink()
        if second == "program":
            res = _program(*args, "--out", out)
            assert res.returncode == 0 and "admrt-sample: resuming: 1 of 3 shards already done" in res.stderr
        else:
            assert main(["sample", *map(str, args), "--out", str(out)]) == 0
        assert (out / "run.json").read_text() == (tmp_path / "whole" / "run.json").read_text()
        got = np.load(out / "samples_5x16x16x3.npz")
        assert (got["arr_0"] == whole["arr_0"]).all() and got["arr_1"].tolist() == [4, 1, 4, 1, 4]


def test_the_same_request_through_eager_units_and_a_package(stack, tmp_path):
    """`admrt sample` over the models (eager units handed to the core) and over their package (AOTI
    units): the same images (uint8 within one level) and the same run record fields for the request."""
    d, _, pkg = stack
    from admrt.cli import main
    request = ["--num", 5, "--batch-size", 2, "--shard-size", 3, "--seed", 11, "--classes", "4,1", "--guidance", 0.5,
               "--steps", "2,2,2", "--upsampler-steps", "ddim3", "--no-progress"]
    models = ["--model", d / "base.safetensors", "--classifier", d / "clf.safetensors",
              "--upsampler", d / "up.safetensors", "--backend", "eager"]
    assert main(["sample", *map(str, models + request), "--out", str(tmp_path / "eager")]) == 0
    assert main(["sample", *map(str, ["--package", pkg] + request), "--out", str(tmp_path / "package")]) == 0
    eager, packaged = (np.load(tmp_path / name / "samples_5x16x16x3.npz") for name in ("eager", "package"))
    assert np.abs(eager["arr_0"].astype(int) - packaged["arr_0"].astype(int)).max() <= 1
    assert eager["arr_1"].tolist() == packaged["arr_1"].tolist() == [4, 1, 4, 1, 4]
    records = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("eager", "package")]
    for key in ("steps", "upsampler_steps", "guidance", "classes", "num", "seed", "eta", "noise", "shard_size",
                "seeded_noise"):
        assert records[0][key] == records[1][key], key
    assert records[0]["steps"] == "2,2,2" and records[0]["upsampler_steps"] == "ddim3"


def test_run_samples_stops_on_keyboard_interrupt_and_keeps_its_shards(stack, tmp_path):
    """Ctrl-C in the progress callback (Python's KeyboardInterrupt) stops the C++ run as
    KeyboardInterrupt; the shards finished before it stay, and the rerun resumes."""
    _, _, pkg = stack
    ctx = admrt.Engine.from_package(pkg).context(batch_size=1)
    calls = []

    def progress(done, total):
        calls.append(done)
        if done == 3 * ctx.steps_per_batch():  # the third image's last step: two shards of one written
            raise KeyboardInterrupt

    kwargs = dict(out=str(tmp_path / "r"), command="test", num=4, shard_size=1, seed=2)
    with pytest.raises(KeyboardInterrupt):
        core.run_samples(ctx, progress=progress, **kwargs)
    assert sorted(p.name for p in (tmp_path / "r" / "shards").iterdir()) == ["shard_00000.npz", "shard_00001.npz"]
    final = core.run_samples(ctx, **kwargs)
    assert final.endswith("samples_4x16x16x3.npz")
    want = admrt.Engine.from_package(pkg).sample(num=4, seeds=2, batch_size=1)
    assert (np.load(final)["arr_0"] == want.images).all()


def test_program_needs_no_python(stack, tmp_path):
    _, _, pkg = stack
    if shutil.which("ldd") is not None:
        names = [line.split()[0] for line in subprocess.run(["ldd", sample_program], capture_output=True,
                                                             text=True).stdout.splitlines() if line.strip()]
        assert any(n.startswith("libtorch") for n in names), names
        assert not [n for n in names if "python" in n], names  # no libpython, no libtorch_python
    res = _program("--package", pkg.resolve(), "--num", 2, "--out", tmp_path / "o", "--no-progress",
                   env={}, cwd=tmp_path)  # empty environment: no PATH, no PYTHONPATH
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / "samples_2x16x16x3.npz").exists()


def _broken(stack, tmp_path, edit):
    pkg = tmp_path / "broken"
    shutil.copytree(stack[2], pkg)
    edit(pkg)
    return pkg


def _manifest(change):
    def edit(pkg):
        m = json.loads((pkg / "manifest.json").read_text())
        change(m)
        (pkg / "manifest.json").write_text(json.dumps(m))
    return edit


@pytest.mark.parametrize("case,edit,args,message", [
    ("missing package", None, ["--package", "{tmp}/nope"], "no such package folder"),
    ("corrupted unit", lambda p: (p / "denoiser.pt2").write_bytes(b"not a zip"), [],
     "denoiser.pt2: content differs from manifest.json's sha256"),
    ("missing unit", lambda p: (p / "upsampler.pt2").unlink(), [], "upsampler.pt2: missing"),
    ("not json", lambda p: (p / "manifest.json").write_text("{"), [], "not valid JSON"),
    ("other format version", _manifest(lambda m: m.update(format_version=99)), [],
     f"format_version 99, but this admrt reads version {core.PACKAGE_FORMAT_VERSION}"),
    ("wrong device", None, ["--device", "cuda"], "the package {pkg} was compiled for 'cpu'"),
    ("class out of range", None, ["--classes", "3,10"], r"classes: [10] out of range; expected ids in [0, 10)"),
    ("batch above the bound", None, ["--batch-size", MAX_BATCH + 1], "exported for batches of 1..8"),
    ("unknown steps", None, ["--steps", "ddim7"], "has the model's tables for 2,2,2, 6, ddim5, t4 only"),
    ("guidance not finite", None, ["--guidance", "nan"], "expected finite scales"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(stack, tmp_path, case, edit, args, message):
    pkg = _broken(stack, tmp_path, edit) if edit else stack[2]
    args = [a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args]
    if "--package" not in args:
        args = ["--package", pkg, *args]
    out = tmp_path / "out"
    res = _program(*args, "--num", 2, "--out", out)
    assert res.returncode != 0
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("admrt-sample: "), res.stderr
    assert message.format(pkg=pkg) in line, line
    assert not out.exists()  # nothing written: the corrected command is not blocked


# One table of bad requests: (case, Engine.sample kwargs, admrt-sample args or None where the program
# has no such option, whether an eager Engine refuses it too, the message). One piece of code (the
# core's Context) raises each, so every front end shows the same text.
BAD_REQUESTS = [
    ("class out of range", dict(classes=[3, 10]), ["--classes", "3,10"], True,
     "classes: [10] out of range; expected ids in [0, 10)"),
    ("guidance not finite", dict(classes=[1], guidance=float("nan")), ["--guidance", "nan"], True,
     "guidance=nan: expected finite scales"),
    ("num 0", dict(num=0), ["--num", "0"], True, "num=0: expected a positive int"),
    ("unknown plan", dict(classes=[1], steps="fast"), ["--steps", "fast"], True,
     "steps='fast': expected 'ddimN' (DDIM), 'N' or 'a,b,c' (DDPM over N steps, or over sections of a, b, c "
     "steps), a solver with N steps ('dpmpp2m10', 'dpmpp3m10', 'dpmpp2m-sde20', 'unipc2m8', 'unipc3m8', '-logsnr' "
     "appended for a log-SNR grid), optionally prefixed by a method such as 'ddim:' (over 'tN' / 'logsnrN' too); N "
     "a positive integer"),
    ("negative eta", dict(classes=[1], eta=-1.0), ["--eta", "-1"], True, "eta=-1.0: expected a finite eta >= 0"),
    ("batch above the package's bound", dict(classes=[1], batch_size=MAX_BATCH + 1),
     ["--batch-size", str(MAX_BATCH + 1)], False, "batch_size=9: the package {pkg} was exported for batches of 1..8"),
    ("guidance per image", dict(classes=[1, 2, 3], guidance=[1.0, 2.0]), None, True,
     "guidance: expected one scale or 3 (one per image), got 2"),
    ("seeds per image", dict(classes=[1, 2, 3], seeds=[1, 2]), None, True,
     "seeds: expected 3 (one per image) or one int, got 2"),
    ("num and classes disagree", dict(classes=[1, 2], num=3), None, True, "num=3: differs from len(classes)=2"),
    ("unknown noise", dict(classes=[1], noise="fancy"), None, True,
     "noise='fancy': expected one of ('seeded', 'reference')"),
    ("unknown method", dict(classes=[1], method="plms"), None, True,
     "method='plms': expected one of ('ddpm', 'ddim', 'dpmpp2m', 'dpmpp3m', 'dpmpp2m-sde', 'unipc2m', 'unipc3m')"),
    ("guidance interval reversed", dict(classes=[1], guidance_interval=(500, 100)), ["--guidance-interval", "500,100"],
     True, "guidance_interval=(500, 100): expected min <= max"),
    ("guidance every 0", dict(classes=[1], guidance_every=0), ["--guidance-every", "0"], True,
     "guidance_every=0: expected a positive int"),
    ("dynamic threshold 1", dict(classes=[1], dynamic_threshold=1.0), ["--dynamic-threshold", "1"], True,
     "dynamic_threshold=1.0: expected a percentile in (0, 1), e.g. 0.995, or 0 (off)"),
    ("unknown variance", dict(classes=[1], variance="big"), None, True,
     "variance='big': expected one of ('learned_range', 'fixed_small', 'fixed_large')"),
]


@pytest.mark.parametrize("case,kwargs,args,eager_too,message", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_give_the_same_message_in_every_front_end(stack, tmp_path, case, kwargs, args, eager_too,
                                                               message):
    _, models, pkg = stack
    want = message.format(pkg=pkg.resolve())
    with pytest.raises(ValueError) as got:
        admrt.Engine.from_package(pkg).sample(**{"steps": "ddim5", **kwargs})
    assert str(got.value) == want
    eager = admrt.Engine(models["base"], classifier=models["clf"], upsampler=models["up"], backend="eager")
    if eager_too:
        with pytest.raises(ValueError) as got:
            eager.sample(**{"steps": "ddim5", **kwargs})
        assert str(got.value) == want
    else:
        eager.check(**{"steps": "ddim5", **kwargs})  # no bound on units given from Python
    if args is not None:
        out = tmp_path / "out"
        res = _program("--package", pkg, "--steps", "ddim5", *args, "--out", out, "--no-progress")
        assert res.returncode != 0 and res.stderr.strip() == f"admrt-sample: {want}", res.stderr
        assert not out.exists()


def test_export_refuses_to_overwrite_and_checks_arguments(stack, tmp_path, cli_error):
    d, _, pkg = stack
    before = sorted(p.name for p in pkg.iterdir())
    assert "exists; choose another folder or pass --force" in cli_error(
        ["export", "aoti", "--model", d / "base.safetensors", "--out", pkg])
    assert sorted(p.name for p in pkg.iterdir()) == before
    assert "steps='ddimx'" in cli_error(["export", "aoti", "--model", d / "base.safetensors", "--steps", "ddimx",
                                         "--out", tmp_path / "p"])
    assert not (tmp_path / "p").exists()


def test_python_front_end_errors_name_the_argument(stack):
    _, _, pkg = stack
    eng = admrt.Engine.from_package(pkg)
    with pytest.raises(ValueError, match=r"classes: \[12\] out of range"):
        eng.sample(classes=[12])
    with pytest.raises(ValueError, match="batch_size=9: the package .* was exported for batches of 1..8"):
        eng.sample(classes=[1], batch_size=9)
    with pytest.raises(ValueError, match="device='cuda'"):
        admrt.Engine.from_package(pkg, device="cuda")
    with pytest.raises(RuntimeError, match="no such package folder"):
        admrt.Engine.from_package(pkg.parent / "missing")


def test_embedding_example_builds_with_find_package(stack, tmp_path):
    """A downstream CMake project: find_package(admrt) and admrt::admrt (engine/examples/embed)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = ["cmake", str(ROOT / "engine" / "examples" / "embed"), *gen, "-DCMAKE_BUILD_TYPE=Release",
           f"-DCMAKE_PREFIX_PATH={cmake_prefix_path};{torch.utils.cmake_prefix_path}"]
    for cmd in (cfg, ["cmake", "--build", ".", "-j", "2"]):
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = subprocess.run([str(tmp_path / "embed"), str(stack[2])], capture_output=True, text=True, env={},
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "images [3, 16, 16, 3]" in res.stdout
    want = admrt.Engine.from_package(stack[2]).sample(classes=[1, 2, 3], guidance=1.0, seeds=[7, 8, 9], batch_size=4)
    assert f"sum {int(want.images.astype(np.int64).sum())}" in res.stdout


def test_torchrun_ranks_share_the_shards(stack, tmp_path):
    """`torchrun --nproc_per_node 2 -m -- admrt.cli sample ...` (gloo on CPU): each rank samples its
    own shards, rank 0 writes the result, which equals one process's."""
    _, _, pkg = stack
    args = ["--package", str(pkg), "--num", "5", "--batch-size", "1", "--shard-size", "2", "--seed", "3",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "--",
                          "admrt.cli", "sample", *args, "--out", str(tmp_path / "dist")], capture_output=True,
                         text=True, env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    from admrt.cli import main
    assert main(["sample", *args, "--out", str(tmp_path / "one")]) == 0
    a, b = np.load(tmp_path / "dist" / "samples_5x16x16x3.npz"), np.load(tmp_path / "one" / "samples_5x16x16x3.npz")
    assert (a["arr_0"] == b["arr_0"]).all() and (a["arr_1"] == b["arr_1"]).all()


def test_npz_reader_and_writer_agree_with_numpy(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 1), dtype=np.uint8)
    labels = np.array([1, 2, 3], dtype=np.int64)
    core.write_npz(str(tmp_path / "a.npz"), [torch.from_numpy(images), torch.from_numpy(labels)])
    z = np.load(tmp_path / "a.npz")
    assert (z["arr_0"] == images).all() and (z["arr_1"] == labels).all() and z["arr_0"].dtype == np.uint8
    np.savez(tmp_path / "b.npz", images, labels)  # numpy's own (zip64 extras) read back by the C++ reader
    back = core.read_npz(str(tmp_path / "b.npz"))
    assert (back[0].numpy() == images).all() and (back[1].numpy() == labels).all()
    (tmp_path / "c.npz").write_bytes((tmp_path / "b.npz").read_bytes()[:100])
    with pytest.raises(RuntimeError, match="c.npz: damaged .npz"):
        core.read_npz(str(tmp_path / "c.npz"))


def test_npz_zip64_records_round_trip(tmp_path):
    """The writer's zip64 path (taken from 4 GiB on; forced here on a small file): numpy, Python's
    zipfile and the C++ reader all read it back."""
    import zipfile
    images = np.random.default_rng(1).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    labels = np.array([7, 9], dtype=np.int64)
    path = tmp_path / "z.npz"
    core.write_npz_zip64(str(path), [torch.from_numpy(images), torch.from_numpy(labels)])
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None and [i.file_size > 0 for i in z.infolist()] == [True, True]
    assert b"PK\x06\x06" in path.read_bytes()  # the zip64 end of central directory record
    with np.load(path) as z:
        assert (z["arr_0"] == images).all() and (z["arr_1"] == labels).all()
    back = core.read_npz(str(path))
    assert (back[0].numpy() == images).all() and (back[1].numpy() == labels).all()


def test_aoti_backend_compiles_the_units_in_process():
    """Engine(model, backend="aoti"): the units exported and AOT-compiled when the Engine is built,
    run as C++ units by the core; the same images as eager."""
    model = random_model("tiny-uncond")
    want = admrt.Engine(model, backend="eager").sample(num=3, steps="ddim3", seeds=5, keep_float=True)
    got = admrt.Engine(model, backend="aoti").sample(num=3, steps="ddim3", seeds=5, keep_float=True)
    assert np.abs(got.samples - want.samples).max() <= 1e-4


def test_step_batching_over_a_package(stack):
    """admrt serve --package: the StepBatcher over a package's units (DDPM plans "6" and "2,2,2",
    upsampler "4"): a request alone equals Engine.from_package's sample bitwise; requests sharing the
    batch at different steps, within one uint8 level."""
    _, _, pkg = stack
    eng = admrt.Engine.from_package(pkg)
    ctx = eng.context("6", "4", 4, keep=False)
    b = core.StepBatcher(eng.stack, ctx.params, ["6", "2,2,2"], True)
    alone = b.submit([1, 2, 3], [1.0], [5], None, "6")
    while b.busy:
        b.iterate()
    images, _, base, _ = b.take(alone)
    want = eng.sample(classes=[1, 2, 3], steps="6", upsampler_steps="4", guidance=1.0, seeds=5, batch_size=3)
    assert np.array_equal(images.numpy(), want.images) and np.array_equal(base.numpy(), want.base_images)
    first = b.submit([4, 5], [2.0], [9], None, "6")
    b.iterate()
    b.iterate()
    second = b.submit([6, 7, 8], [1.0], [20], None, "2,2,2")
    mixed = False
    while b.busy:
        b.iterate()
        s = b.stats()
        mixed = mixed or (s["base_slots"] > 1 and len(set(s["base_steps"])) > 1)
    assert mixed
    for rid, (classes, g, seed, plan) in {first: ([4, 5], 2.0, 9, "6"), second: ([6, 7, 8], 1.0, 20, "2,2,2")}.items():
        images, _, _, _ = b.take(rid)
        want = eng.sample(classes=classes, steps=plan, upsampler_steps="4", guidance=g, seeds=seed)
        assert np.abs(images.numpy().astype(int) - want.images.astype(int)).max() <= 1
