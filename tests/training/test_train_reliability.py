"""issue 29, `admrt train` and the run folder it shares with `admrt sample`, through the real command
lines: a rejected command writes nothing (every argument, --resume's file and the memory a step
needs are checked before OUT is touched), a damaged or wrong --resume file is one line, another
command's finished work and work without its run.json are refused (never adopted or replaced), a
link planted at OUT/.lock is not followed, a run that fails before finishing anything leaves
nothing that it made. Each child's memory is bounded (RLIMIT_AS), so a regression fails instead of
taking the machine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from child_limits import address_space


TRAIN = ["train", "diffusion", "--preset", "tiny-cond", "--batch-size", "4", "--eval-images", "0", "--log-every",
         "1", "--device", "cpu", "--no-progress"]
SAMPLE = ["sample", "--model", "tiny-cond", "--num", "3", "--batch-size", "2", "--shard-size", "2", "--steps",
          "ddim2", "--device", "cpu", "--no-progress", "--backend", "eager"]
MEMORY = 4 << 30  # a normal tiny run here maps under 3 GiB


_bounded = address_space(MEMORY)


def _admrt(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "admrt.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, preexec_fn=_bounded)


def _refused(res: subprocess.CompletedProcess, command: str, *parts: str, code: int = 1) -> str:
    """The one stderr line of a refused command (exit 1; 2 for the option parser's), holding every
    part (beside the note on tiny-cond's random weights)."""
    lines = [ln for ln in res.stderr.strip().splitlines() if "using RANDOM weights" not in ln]
    assert res.returncode == code and len(lines) == 1 and lines[0].startswith(f"admrt {command}: "), res.stderr
    assert all(p in lines[0] for p in parts), lines[0]
    return lines[0]


def _run(*argv) -> subprocess.CompletedProcess:
    """`admrt ARGV` in this process (fast: no new interpreter), as a CompletedProcess."""
    import contextlib
    import io

    from admrt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # the option parser's refusal
            rc = exc.code
    return subprocess.CompletedProcess(argv, rc, "", err.getvalue())


@pytest.fixture
def trained(tmp_path, images) -> Path:
    """A training run folder with a step-1 checkpoint (run.json, model/ema/state files)."""
    out = tmp_path / "trained"
    res = _run(*TRAIN, "--data", images, "--steps", "1", "--out", out)
    assert res.returncode == 0, res.stderr
    return out


def test_rejected_train_commands_write_nothing(tmp_path, images, trained):
    """Bad arguments, a damaged or wrong --resume file and a batch whose activations cannot fit are
    one line each, before OUT is made (the batch one within a bounded address space: before the
    fix it allocated until it died)."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    pickle = tmp_path / "state.pt"
    pickle.write_bytes(b"\x80\x04N.")
    cases = [(["--batch-size", "100000"], ["--batch-size=100000", "GiB of activations", "--microbatch"]),
             (["--batch-size", "100000000", "--microbatch", "1"],
              ["--batch-size=100000000: a step's images and noise alone take about"]),
             (["--microbatch", "3"], ["--microbatch=3: expected a divisor of the per-process batch 4"]),
             (["--device", "bogus"], ["--device=bogus: not a device; expected one of cpu"]),
             (["--out", ""], ["--out='': expected a value"]),
             (["--batch-size", "0"], ["--batch-size=0: expected a positive int"]),
             (["--resume", bad], [f"{bad}: not a readable .safetensors file", "expected a training-state file"]),
             (["--resume", pickle], [f"{pickle}: not a readable .safetensors file"]),
             (["--resume", trained / "model_000001.safetensors"], ["a model's weights, not a training state"]),
             (["--resume", trained, "--lr", "0.5"], ["the checkpoint's run has other settings (lr: 0.0001 -> 0.5)"])]
    for argv, parts in cases:
        out = tmp_path / "new" / "run"
        big = argv[0] == "--batch-size" and len(argv[1]) > 4
        run = _admrt if big else _run  # the memory cases in a child of bounded memory
        code = 2 if argv[0] in ("--device", "--out", "--batch-size") and not big else 1
        line = _refused(run(*TRAIN, "--data", images, "--steps", "2", "--out", out, *argv), "train", *parts, code=code)
        assert "weights_only" not in line and not (tmp_path / "new").exists(), (argv, line)


def test_train_and_sample_refuse_each_others_folders(tmp_path, trained):
    sample = tmp_path / "sample"
    assert _run(*SAMPLE, "--out", sample).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in sample.rglob("*") if p.name != ".lock"}
    _refused(_run(*TRAIN, "--data", tmp_path / "images", "--steps", "2", "--out", sample), "train",
             f"--out={str(sample)!r} holds an `admrt sample` run (run.json, 2 shards, 1 samples file); use another --out")
    assert {p: p.stat().st_mtime_ns for p in sample.rglob("*") if p.name != ".lock"} == before
    record = (trained / "run.json").read_text()
    _refused(_run(*SAMPLE, "--out", trained), "sample",
             f"--out={str(trained)!r} holds an `admrt train` run (run.json, 1 checkpoint); use another --out")
    assert (trained / "run.json").read_text() == record and not (trained / "shards").exists()
    # The training run is still resumed by its own command.
    res = _run(*TRAIN, "--data", tmp_path / "images", "--steps", "2", "--out", trained)
    assert res.returncode == 0 and "resuming from step 1" in res.stderr, res.stderr


def test_shards_without_their_run_json_are_refused_not_adopted(tmp_path):
    out = tmp_path / "run"
    assert _run(*SAMPLE, "--out", out).returncode == 0
    first = np.load(out / "samples_3x16x16x3.npz")["arr_0"]
    (out / "run.json").unlink()
    (out / "samples_3x16x16x3.npz").unlink()
    (out / "shards" / "shard_00001.npz").unlink()
    _refused(_run(*SAMPLE, "--seed", "100", "--out", out), "sample",
             f"--out={str(out)!r} holds 1 shard but no run.json", "move them away or use another --out")
    assert not (out / "run.json").exists() and not (out / "samples_3x16x16x3.npz").exists()
    # Moved away, the folder runs the new command from scratch.
    (out / "shards" / "shard_00000.npz").rename(tmp_path / "old.npz")
    assert _run(*SAMPLE, "--seed", "100", "--out", out).returncode == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 100
    assert not (np.load(out / "samples_3x16x16x3.npz")["arr_0"] == first).all()


def test_an_explicit_default_guidance_resumes_the_run(tmp_path):
    out = tmp_path / "run"
    run = SAMPLE + ["--classifier", "tiny-classifier", "--out", out]
    assert _run(*run).returncode == 0
    assert json.loads((out / "run.json").read_text())["guidance"] == 1.0  # what the run uses
    (out / "shards" / "shard_00001.npz").unlink()
    res = _run(*run, "--guidance", "1.0")
    assert res.returncode == 0 and "resuming: 1 of 2 shards already done" in res.stderr, res.stderr
    # A record of an older admrt (null for the default) resumes too; another scale is still a change.
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(dict(record, guidance=None)))
    (out / "shards" / "shard_00001.npz").unlink()
    _refused(_run(*run, "--guidance", "2"), "sample", "guidance: null -> 2.0")
    assert _run(*run).returncode == 0


@pytest.mark.parametrize("command", ["sample", "train"])
def test_a_link_planted_at_the_lock_is_not_followed(tmp_path, images, command):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (out / ".lock").symlink_to(target)
    argv = SAMPLE if command == "sample" else TRAIN + ["--data", images, "--steps", "1"]
    _refused(_run(*argv, "--out", out), command, f"{out / '.lock'}: a symbolic link, not a lock file")
    assert target.read_text() == "keep me\n" and sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_run_that_finishes_nothing_leaves_nothing_it_made(tmp_path, images):
    """A failure after the lock (here a diverging loss at step 1) removes run.json, .lock and the
    folder it made; the corrected command then runs."""
    out = tmp_path / "new" / "run"
    res = _run(*TRAIN, "--data", images, "--steps", "2", "--lr", "1e30", "--out", out)
    _refused(res, "train", "the loss of step 1 is not finite")
    assert sorted(p.name for p in out.iterdir()) == ["log.csv"]  # the log of what ran; no .lock, no run.json
    assert _run(*TRAIN, "--data", images, "--steps", "1", "--out", out).returncode == 0
    # A sample run refused after the lock (the record of another run) leaves the folder as it was.
    sample = tmp_path / "sample"
    assert _run(*SAMPLE, "--out", sample).returncode == 0
    (sample / "shards" / "shard_00001.npz").unlink()
    (sample / ".lock").unlink()
    _refused(_run(*SAMPLE, "--seed", "7", "--out", sample), "sample", "seed: 0 -> 7")
    assert not (sample / ".lock").exists()


def test_checkpoints_without_run_json_are_refused_unless_resume_names_them(tmp_path, trained):
    (trained / "run.json").unlink()
    base = TRAIN + ["--data", tmp_path / "images", "--steps", "2", "--out", trained]
    _refused(_run(*base), "train", "holds checkpoints (up to step 1) and no run.json; pass --resume")
    _refused(_run(*SAMPLE, "--out", trained), "sample", "holds an `admrt train` run (1 checkpoint)")
    _refused(_run(*base, "--seed", "5", "--resume", trained), "train", "other settings (seed: 0 -> 5)")
    assert not (trained / "run.json").exists()
    res = _run(*base, "--resume", trained)  # named: its own settings were checked against this command's
    assert res.returncode == 0 and "resuming from step 1" in res.stderr, res.stderr
    assert json.loads((trained / "run.json").read_text())["command"] == "train"


def test_the_batch_memory_check_holds_without_an_activation_estimate(monkeypatch):
    """_check_fits returned before its batch check whenever the activation estimate failed (an op
    without a meta kernel), so --batch-size 10**8 could allocate until killed again."""
    from types import SimpleNamespace

    import torch

    from admrt.cli import CommandError
    from admrt.presets import get_preset
    from admrt.training import cli as train_cli

    monkeypatch.setattr(train_cli, "_activation_bytes", lambda preset, cfg: None)
    cfg = SimpleNamespace(microbatch=0, batch_size=10 ** 8)
    with pytest.raises(CommandError, match=r"--batch-size=100000000: a step's images and noise alone take about"):
        train_cli._check_fits(SimpleNamespace(), get_preset("fashion16-cond"), cfg, torch.device("cpu"), 1)
