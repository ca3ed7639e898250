"""Nothing lost, nothing mixed, one clear line: the run folder of `admrt train` and `admrt sample`
(engine/csrc/runfolder.cpp), validation before anything is written, the CLI's one error path, Ctrl-C,
and the checks of the checkpoint loader, `admrt eval` and the Engine API. One test per finding."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from child_limits import address_space

import admrt
from admrt.cli import main

SAMPLE = ["sample", "--model", "tiny-cond", "--classifier", "tiny-classifier", "--num", "3", "--batch-size", "2",
          "--shard-size", "2", "--steps", "ddim2", "--device", "cpu", "--no-progress", "--backend", "eager"]
TRAIN = ["train", "diffusion", "--preset", "tiny-cond", "--batch-size", "4", "--eval-images", "0", "--log-every",
         "1", "--device", "cpu", "--no-progress"]


def _files(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".lock"}


def _log_steps(out: Path) -> list[int]:
    return [int(r.split(",")[0]) for r in (out / "log.csv").read_text().strip().splitlines()[1:]]


def _with(argv, option, value) -> list[str]:
    """argv with `option` set to `value` (replaced where it is given)."""
    argv = [str(a) for a in argv]
    if option in argv:
        i = argv.index(option)
        return argv[:i] + [option, value] + argv[i + 2:]
    return argv + [option, value]


def _admrt(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "admrt.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=600, **kw)


# 1. and 5. (train): one run per folder; the same command resumes it; other settings are refused.
def test_train_refuses_another_run_in_its_folder_and_resumes_its_own(tmp_path, images, capsys, cli_error):
    out = tmp_path / "run"
    run = TRAIN + ["--data", images, "--save-every", "1", "--out", out]
    assert main([str(a) for a in run + ["--steps", "2"]]) == 0
    before = _files(out)
    record = json.loads((out / "run.json").read_text())
    assert (record["lr"], record["batch_size"], record["seed"], record["preset"]["name"]) == (1e-4, 4, 0, "tiny-cond")

    for option, value, shown in (("--lr", "0.01", "lr: 0.0001 -> 0.01"), ("--batch-size", "8", "batch_size: 4 -> 8"),
                                 ("--seed", "1", "seed: 0 -> 1"), ("--preset", "tiny-uncond", "preset:")):
        line = cli_error(_with(run + ["--steps", "2"], option, value))
        assert "holds a run with other arguments" in line and shown in line, line
    assert _files(out) == before  # nothing of the old run touched

    # The same command with more steps continues the run; no log row is written twice.
    (out / "log.csv").write_text((out / "log.csv").read_text() + "3,0.1,9,9,9,0.0001\n")  # a row after the checkpoint
    assert main([str(a) for a in run + ["--steps", "3"]]) == 0
    assert "resuming from step 2" in capsys.readouterr().err
    assert _log_steps(out) == [1, 2, 3]
    assert "9,9,9" not in (out / "log.csv").read_text()

    # Going back to an earlier checkpoint while later ones exist would mix two histories.
    line = cli_error(run + ["--steps", "3", "--resume", out / "state_000001.safetensors"])
    assert "later checkpoints of this run (steps 2, 3)" in line
    # Checkpoints without a record (an older admrt): refused without --resume.
    (out / "run.json").unlink()
    assert "and no run.json; pass --resume" in cli_error(run + ["--steps", "3"])


def test_train_fork_checks_the_checkpoints_settings(tmp_path, images, cli_error):
    """--resume into an empty --out continues a checkpoint's run; other settings or another preset
    are named (the checkpoint loader's report, not a KeyError)."""
    first = tmp_path / "first"
    base = TRAIN + ["--data", images, "--steps", "2"]
    assert main([str(a) for a in base + ["--out", first]]) == 0
    line = cli_error(base + ["--lr", "0.01", "--resume", first, "--out", tmp_path / "fork1"])
    assert "the checkpoint's run has other settings (lr: 0.0001 -> 0.01)" in line
    line = cli_error(_with(base, "--preset", "tiny-uncond") + ["--resume", first, "--out", tmp_path / "fork2"])
    assert "the run trains preset 'tiny-cond', this trainer 'tiny-uncond'" in line and "model.num_classes" in line
    fork = base + ["--resume", first, "--out", tmp_path / "fork3"]
    assert main([str(a) for a in _with(fork, "--steps", "3")]) == 0
    assert sorted(p.name for p in (tmp_path / "fork3").glob("state_*")) == ["state_000003.safetensors"]
    # The same command again (e.g. a requeued job) continues the fork, not the run it came from.
    assert main([str(a) for a in _with(fork, "--steps", "4")]) == 0
    assert sorted(p.name for p in (tmp_path / "fork3").glob("state_*"))[-1] == "state_000004.safetensors"
    assert _log_steps(tmp_path / "fork3") == [3, 4]


def test_train_with_an_annealed_lr_refuses_other_steps(tmp_path, images, cli_error):
    """lr_at divides by --steps: under --anneal-lr another --steps would change every later step."""
    run = TRAIN + ["--data", images, "--anneal-lr", "--out", tmp_path / "run"]
    assert main([str(a) for a in run + ["--steps", "2"]]) == 0
    assert "steps: 2 -> 3" in cli_error(run + ["--steps", "3"])


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_train_under_torchrun_saves_once_and_refuses_on_every_rank(tmp_path, images):
    """2 CPU processes (gloo): the final checkpoint's collectives match on both ranks, and a run
    refused by rank 0 stops every rank with its one line (no rank left waiting)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "admrt.cli", *map(str, TRAIN[:-1]), "--data", str(images),
           "--steps", "2", "--save-every", "2", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in out.glob("state_*")) == ["state_000002.safetensors"]
    cmd[cmd.index("--master_port") + 1] = str(_free_port())
    res = subprocess.run(cmd + ["--lr", "0.01"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "holds a run with other arguments (lr: 0.0001 -> 0.01)" in res.stderr


# 2.
def test_train_save_every_zero_still_writes_the_final_checkpoint(tmp_path, images, cli_error):
    out = tmp_path / "run"
    assert main([str(a) for a in TRAIN + ["--data", images, "--steps", "2", "--save-every", "0", "--out", out]]) == 0
    assert sorted(p.name for p in out.glob("state_*")) == ["state_000002.safetensors"]
    assert "--save-every=-1: expected an int >= 0" in cli_error(TRAIN + ["--save-every", "-1", "--out", tmp_path / "x"])
    assert not (tmp_path / "x").exists()


# 3.
def test_train_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, images, cli_error):
    assert "lr=inf: expected a finite positive float" in cli_error(
        TRAIN + ["--data", images, "--lr", "inf", "--out", tmp_path / "inf"])
    assert not (tmp_path / "inf").exists()
    out = tmp_path / "run"
    line = cli_error(TRAIN + ["--data", images, "--lr", "1e10", "--steps", "8", "--save-every", "1", "--out", out])
    assert "training diverged" in line and "is not finite" in line and "the last good checkpoint is" in line, line
    states = sorted(out.glob("state_*"))
    assert states and str(states[-1]) in line
    for p in out.glob("*_0*.safetensors"):  # no checkpoint holds NaN/Inf weights
        if not p.name.startswith("state_"):
            m = admrt.load_model(p)
            assert all(torch.isfinite(t).all() for t in m.state_dict().values()), p.name


# 4. and 6. (sample): every rejected command writes nothing and names its argument.
@pytest.mark.parametrize("argv,message", [
    (["--classes", "3,12"], "classes: [12] out of range; expected ids in [0, 10)"),
    (["--steps", "ddimx"], "steps='ddimx': expected 'ddimN'"),
    (["--eta", "nan"], "eta=nan: expected a finite eta >= 0"),
    (["--classifier", "none", "--guidance", "2"], "--guidance=2.0: guidance needs a --classifier"),
    (["--model", "nope"], "--model='nope': not a file, a bundled model or a preset name"),
])
def test_sample_rejects_bad_arguments_before_writing_anything(tmp_path, cli_error, argv, message):
    out = tmp_path / "run"
    line = cli_error(SAMPLE + argv + ["--out", out])
    assert message in line, line
    assert not out.exists()


def test_sample_corrected_command_runs_where_a_rejected_one_was(tmp_path, cli_error):
    out = tmp_path / "run"
    cli_error(SAMPLE + ["--eta", "nan", "--out", out])
    assert main(SAMPLE + ["--out", str(out)]) == 0
    json.loads((out / "run.json").read_text())  # valid JSON (no NaN)
    # Its final samples file is finished work even with the shards gone: not replaced by another run.
    for shard in (out / "shards").iterdir():
        shard.unlink()
    assert "holds a run with other arguments (seed: 0 -> 5)" in cli_error(SAMPLE + ["--seed", "5", "--out", out])
    # A run that finished nothing (killed before its first shard) does not block another one.
    for done in out.glob("samples_*.npz"):
        done.unlink()
    assert main(SAMPLE + ["--seed", "5", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 5


# 5. (sample): the record names the weights, device, precision, backend; batch size under reference noise.
def test_sample_resume_refuses_other_weights_dtype_or_reference_batch_size(tmp_path, cli_error):
    weights = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    admrt.save_model(admrt.create_model("tiny-cond"), weights)
    out = tmp_path / "run"
    run = [a if a != "tiny-cond" else str(weights) for a in SAMPLE] + ["--out", str(out)]
    assert main(run) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["weights"][0].startswith("sha256:") and record["device"] == "cpu"
    assert (record["dtype"], record["backend"], record["batch_size"]) == ("fp32", "eager", 2)
    (out / "shards" / "shard_00001.npz").unlink()
    original = weights.read_bytes()
    torch.manual_seed(1)
    admrt.save_model(admrt.create_model("tiny-cond"), weights)  # other weights under the same name
    line = cli_error(run)
    assert "weights: [" in line and record["weights"][0] in line, line
    weights.write_bytes(original)  # (the file's bytes are fingerprinted: safetensors' header order varies)
    assert "dtype: 'fp32' -> 'bf16'" in cli_error(run + ["--dtype", "bf16"])
    # Seeded noise does not depend on the batch size: a resume may change it.
    assert main(run + ["--batch-size", "1"]) == 0
    # A record written before a field was recorded (an older admrt) gains it; the run resumes.
    old = {k: v for k, v in json.loads((out / "run.json").read_text()).items() if k not in ("weights", "device")}
    (out / "run.json").write_text(json.dumps(old))
    (out / "shards" / "shard_00001.npz").unlink()
    assert main(run + ["--batch-size", "1"]) == 0
    assert json.loads((out / "run.json").read_text())["weights"] == record["weights"]
    ref = tmp_path / "ref"
    assert main(SAMPLE + ["--noise", "reference", "--out", str(ref)]) == 0
    (ref / "shards" / "shard_00001.npz").unlink()
    assert "batch_size: 2 -> 1" in cli_error(SAMPLE + ["--noise", "reference", "--batch-size", "1", "--out", ref])


# 6. misleading errors of the loaders and of `admrt sample`'s final step.
def test_checkpoint_errors_name_the_file_and_legacy_torch_files_load(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for preset in (None, "tiny-cond"):
        with pytest.raises(ValueError, match="not a checkpoint"):
            admrt.load_model(text, preset=preset)
    model = admrt.create_model("tiny-cond")
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    loaded = admrt.load_model(legacy, preset="tiny-cond")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.save(model.state_dict(), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:4000])
    with pytest.raises(ValueError, match="cut.pt'?: cannot read the torch checkpoint"):
        admrt.load_model(tmp_path / "cut.pt", preset="tiny-cond")
    with pytest.raises(ValueError, match="is a torch checkpoint .* does not record its config"):
        admrt.load_model(tmp_path / "full.pt")


def test_sample_names_a_damaged_shard(tmp_path, cli_error):
    out = tmp_path / "run"
    assert main(SAMPLE + ["--out", str(out)]) == 0
    shard = out / "shards" / "shard_00001.npz"
    shard.write_bytes(b"not a zip")
    line = cli_error(SAMPLE + ["--out", out])
    assert f"{shard}: damaged shard" in line and "delete it and rerun" in line


# 7. one line per expected error, exit codes, --debug; Ctrl-C.
def test_errors_are_one_line_with_exit_codes_and_debug_shows_the_traceback(tmp_path):
    res = _admrt("sample", "--model", "nope", "--out", tmp_path / "a")
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("admrt sample: --model='nope'")
    res = _admrt("sample", "--num", "x")
    assert res.returncode == 2 and res.stderr.strip() == (
        "admrt sample: --num=x: expected a positive int (see `admrt sample --help`)")
    res = _admrt("sample", "--model", "nope", "--out", tmp_path / "a", "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr and "CommandError" in res.stderr
    assert not (tmp_path / "a").exists()


def _interrupt_when(cmd, ready, timeout=300.0) -> subprocess.CompletedProcess:
    """Start `admrt CMD`, send SIGINT once ready() holds, and wait. The child gets SIGINT's default
    disposition: a test run started in the background (`.ci/run &`) inherits it ignored."""
    proc = subprocess.Popen([sys.executable, "-m", "admrt.cli", *map(str, cmd)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    start = time.time()
    while not ready() and proc.poll() is None and time.time() - start < timeout:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ctrl_c_in_sample_keeps_the_finished_shards(tmp_path):
    out = tmp_path / "run"
    cmd = [a if a != "ddim2" else "ddim50" for a in SAMPLE] + ["--num", "80", "--out", out]
    res = _interrupt_when(cmd, lambda: len(list((out / "shards").glob("shard_*.npz"))) >= 1)
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "admrt sample: interrupted; the finished shards are kept: rerun the same command to resume")
    done = len(list((out / "shards").glob("shard_*.npz")))
    assert 1 <= done < 40 and not list(out.rglob("*.tmp"))


def test_ctrl_c_in_train_writes_a_checkpoint_and_the_rerun_resumes(tmp_path, images):
    out = tmp_path / "run"
    cmd = TRAIN + ["--data", images, "--steps", "100000", "--save-every", "0", "--out", out]
    res = _interrupt_when(cmd, lambda: (out / "log.csv").exists() and len(_log_steps(out)) >= 3)
    assert res.returncode == 130, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("admrt train: interrupted; checkpoint of step ") and "rerun the same command" in last
    step = int(last.split("checkpoint of step ")[1].split()[0])
    assert (out / f"state_{step:06d}.safetensors").exists()
    cmd[cmd.index("100000")] = str(step + 1)
    res = _admrt(*cmd)
    assert res.returncode == 0 and f"resuming from step {step}" in res.stderr, res.stderr


# 8.
def test_eval_refuses_batches_of_other_sizes_or_channels(tmp_path, cli_error):
    from admrt.evaluation.npz import save_batch

    gray = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
    save_batch(tmp_path / "gray.npz", gray)
    save_batch(tmp_path / "rgb.npz", np.repeat(gray, 3, axis=-1))
    save_batch(tmp_path / "big.npz", np.repeat(np.repeat(gray, 2, axis=1), 2, axis=2))
    cache = ["--cache-dir", tmp_path / "cache"]
    line = cli_error(["eval", *cache, tmp_path / "gray.npz", tmp_path / "rgb.npz"])
    assert "reference images are 16x16x1 (HxWxC) and the samples 16x16x3" in line
    assert "16x16x1 (HxWxC) and the samples 32x32x1" in cli_error(["eval", *cache, tmp_path / "gray.npz",
                                                                   tmp_path / "big.npz"])
    assert "fashion-test:SIZE with SIZE the images' side in pixels, from 1 to 256" in cli_error(
        ["eval", *cache, "fashion-test:0", tmp_path / "gray.npz"], code=2)
    from admrt.evaluation.evaluator import Evaluator
    with pytest.raises(ValueError, match=r"expected uint8 \(N, H, W, 1\|3\) images, got shape \(12, 16, 16\)"):
        Evaluator(None).evaluate(gray[..., 0], gray)


# 9.
def test_engine_api_checks_types():
    model, clf = admrt.create_model("tiny-cond"), admrt.create_model("tiny-classifier")
    with pytest.raises(TypeError, match="classifier='tiny-classifier': expected a torch.nn.Module"):
        admrt.Engine(model, classifier="tiny-classifier", backend="eager")
    with pytest.raises(TypeError, match="upsampler=3: expected a torch.nn.Module"):
        admrt.Engine(model, upsampler=3, backend="eager")
    eng = admrt.Engine(model, classifier=clf, backend="eager")
    for kwargs, message in ((dict(num=2.5), "num=2.5: expected a positive int"),
                            (dict(num=True), "num=True: expected a positive int"),
                            (dict(classes=[1.5, 2]), "classes: expected integer ids, got float64"),
                            (dict(classes=["3"]), "classes: expected integer ids"),
                            (dict(classes=[1, 2], seeds=[0.5, 1]), "seeds: expected ints, got \\[0.5\\]"),
                            (dict(num=2, seeds=1.5), "seeds=1.5: expected an int"),
                            (dict(num=2, guidance="a"), "guidance='a': expected a number")):
        with pytest.raises((TypeError, ValueError), match=message):
            eng.check(steps="ddim2", **kwargs)
        with pytest.raises((TypeError, ValueError), match=message):
            eng.sample(steps="ddim2", **kwargs)
    eng.check(classes=np.array([1, 2]), seeds=np.array([3, 4]), steps="ddim2")
    eng.check(classes=torch.tensor([1, 2]), steps="ddim2")


# 10.
def test_a_second_process_is_refused_and_stale_temporary_files_are_removed(tmp_path, cli_error):
    from admrt.core import RunFolder

    out = tmp_path / "run"
    holder = RunFolder(out, "test holder")
    holder.lock()
    try:
        line = cli_error(SAMPLE + ["--out", out])
        assert f"is in use by process {os.getpid()} (test holder, since" in line
    finally:
        holder.unlock()
    (out / "shards").mkdir()
    stale = [out / ".run.json.abc123.tmp", out / "shards" / ".shard_00000.npz.x1y2.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    assert main(SAMPLE + ["--out", str(out)]) == 0
    assert not any(p.exists() for p in stale)


# Also: --version, and --help that states every default and explains every option.
def test_version_and_help_state_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith(f"admrt {admrt.__version__} (torch ")
    import argparse
    import importlib

    from admrt.cli import COMMANDS, ArgumentParser
    parsers = []
    for name, (module, _) in COMMANDS.items():
        p = ArgumentParser(prog=f"admrt {name}")
        importlib.import_module(module).add_arguments(p)
        parsers.append(p)
    from admrt.evaluation.cli import sweep_parser
    parsers.append(sweep_parser())
    for p in parsers:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
                continue
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            assert action.help, f"{p.prog} {action.option_strings[0]}: no help text"
            shown = p._get_formatter()._get_help_string(action)
            if action.default is not None and action.default is not False and not action.required:
                assert "default" in shown, f"{p.prog} {action.option_strings[0]}: the default is not stated"


# Issue 29: every bad value is one line through the real command line, before any work or write.
LIMIT_AS = 4 * 2 ** 30   # a refusal runs in well under 2 GiB of address space (torch's mappings included)
NO_CUDA = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no CUDA device is visible"


_bounded = address_space(LIMIT_AS)


def _admrt_bounded(argv, cwd) -> subprocess.CompletedProcess:
    """`admrt ARGV` in a child of at most LIMIT_AS bytes of address space (a regression that
    allocates fails instead of taking the machine)."""
    return subprocess.run([sys.executable, "-m", "admrt.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, preexec_fn=_bounded)


def _one_line(res, command: str, code: int) -> str:
    """The one stderr line of a refused command, after checking the exit code and that there is no traceback."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code and len(lines) == 1 and "Traceback" not in res.stderr, (res.returncode, res.stderr)
    assert lines[0].startswith(f"admrt {command}"), lines[0]
    return lines[0]


# (argv, the message): exit 2, one line, nothing written (the refusals of the option parser and the
# commands' up-front checks). Each was a traceback, a silent default or minutes of work before.
REFUSED = [
    (["sample", "--classes", str(10 ** 20)], f"--classes={10 ** 20}: expected comma-separated ints"),
    (["sample", "--classes", ""], "--classes='': expected comma-separated ints"),
    (["sample", "--steps", ""], "--steps='': expected a value"),
    (["sample", "--out", ""], "--out='': expected a value"),
    (["sample", "--device", "bogus"], "--device=bogus: not a device; expected one of cpu"),
    (["sample", "--seed", "-1"], "--seed=-1: expected an integer from 0 to 18446744073709551615"),
    (["sample", "--seed", str(2 ** 64)], f"--seed={2 ** 64}: expected an integer from 0 to 18446744073709551615"),
    (["sample", "--num", "0"], "--num=0: expected a positive int"),
    (["export", "aoti", "--device", "bogus", "--out", "pkg"], "--device=bogus: not a device"),
    (["export", "onnx", "--device", "bogus", "--out", "pkg"], "--device=bogus: not a device"),
    (["eval", "--threads", "0", "fashion-test", "s.npz"], "--threads=0: expected a thread count from 1 to 4096"),
    (["eval", "fashion-test:100000", "s.npz"], "reference 'fashion-test:100000': expected fashion-test or "
                                               "fashion-test:SIZE with SIZE the images' side in pixels, from 1 to 256"),
    (["eval", "--json", "folder", "fashion-test", "s.npz"], "--json='folder': a folder; expected a file name"),
    (["eval", "sweep", "--scales", "0", "nan"], "--scales=nan: expected a finite number"),
    (["eval", "sweep", "--samplers", "ddim5", "ddimx"], "--samplers=ddimx: expected 'ddimN' (DDIM)"),
    (["eval", "sweep", "--batch-size", "0"], "--batch-size=0: expected a positive int"),
    (["eval", "sweep", "--out", "s.npz"], "--out='s.npz': not a folder"),
    (["eval", "sweep", "--merge", "/nonexistent", "--out", "merged"], "--merge /nonexistent: No such file or directory"),
    (["eval", "sweep", "--reference", "missing.npz"], "--reference='missing.npz': no such file"),
    (["bench", "--guidance", "nan"], "--guidance=nan: expected a finite number"),
    (["serve", "--device", "bogus"], "--device=bogus: not a device"),
    (["sample", "--guidance", "nan"], "--guidance=nan: expected a finite number"),
]
if not torch.cuda.is_available():
    REFUSED += [(["sample", "--device", "cuda"], f"--device=cuda: {NO_CUDA}; available: cpu"),
                (["export", "aoti", "--device", "cuda", "--out", "pkg"], f"--device=cuda: {NO_CUDA}; available: cpu")]


@pytest.mark.parametrize("argv,message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_option_values_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    """In-process through admrt.cli.main (the exit code of the parser's SystemExit or main's return);
    test_bad_option_values_through_the_real_command_line runs a few as processes."""
    from admrt.evaluation.npz import save_batch

    save_batch(tmp_path / "s.npz", np.zeros((20, 16, 16, 1), dtype=np.uint8))
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    res = subprocess.CompletedProcess(argv, code, "", capsys.readouterr().err)
    line = _one_line(res, argv[0], 2)
    assert message in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["folder", "s.npz"]   # nothing written or half made


@pytest.mark.parametrize("argv", [
    ["sample", "--device", "cuda" if not torch.cuda.is_available() else "bogus"],
    ["export", "aoti", "--device", "cuda" if not torch.cuda.is_available() else "bogus", "--out", "pkg"],
    ["eval", "sweep", "--scales", "0", "nan"],
    ["eval", "fashion-test:100000", "s.npz"],
    ["bench", "--guidance", "nan"],
], ids=" ".join)
def test_bad_option_values_through_the_real_command_line(tmp_path, argv):
    message = dict((" ".join(a), m) for a, m in REFUSED)[" ".join(argv)]
    line = _one_line(_admrt_bounded(argv, tmp_path), argv[0], 2)
    assert message in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict:
    """tiny-cond and tiny-classifier saved as files (no 'random weights' notice when loaded)."""
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    files = {"model": folder / "model.safetensors", "classifier": folder / "classifier.safetensors"}
    admrt.save_model(admrt.create_model("tiny-cond"), files["model"])
    admrt.save_model(admrt.create_model("tiny-classifier"), files["classifier"])
    return files


def test_sample_refuses_a_num_beyond_memory_and_takes_the_largest_seed(tmp_path, tiny_files):
    """--num 10**12 was a MemoryError traceback (or the OOM killer): refused, naming --num and the
    memory it needs, before anything is written. Seeds run 0..2**64-1 (refused beyond, above)."""
    base = ["sample", "--model", tiny_files["model"], "--classifier", tiny_files["classifier"], "--steps", "ddim2",
            "--backend", "eager", "--device", "cpu", "--no-progress"]
    res = _admrt_bounded(base + ["--num", 10 ** 12, "--out", tmp_path / "big"], tmp_path)
    line = _one_line(res, "sample", 2)
    assert line.startswith("admrt sample: --num=1000000000000: the run's images take "), line   # the driver's check
    assert not (tmp_path / "big").exists()
    res = _admrt_bounded(base + ["--num", 2, "--seed", 2 ** 64 - 1, "--out", tmp_path / "last"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "last" / "run.json").read_text())["seed"] == -1   # the int64 of the same bits


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory) -> dict:
    """Files that are not weights a feature network loads: missing, text, cut short, a torch file
    of other tensors, a pickle whose payload would create a file."""
    from admrt.evaluation.features import BUNDLED_FASHION_FEATURES

    folder = tmp_path_factory.mktemp("weights")
    (folder / "notes.safetensors").write_text("hello")
    (folder / "cut.safetensors").write_bytes(BUNDLED_FASHION_FEATURES.read_bytes()[:3000])
    torch.save({"a": torch.zeros(2)}, folder / "other.pth")
    (folder / "evil.pt").write_bytes(_code_pickle(folder / "PWNED"))
    return {"folder": folder, "missing": folder / "missing.pth", "text": folder / "notes.safetensors",
            "cut": folder / "cut.safetensors", "other": folder / "other.pth", "evil": folder / "evil.pt"}


def _code_pickle(target: Path) -> bytes:
    """A torch file whose pickle would call os.system to create `target` if unpickled unsafely."""
    import io

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))
    buf = io.BytesIO()
    torch.save({"w": Payload()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("option,kind,message", [
    ("--feature-weights", "missing", "fashion feature network '{path}' not found"),
    ("--feature-weights", "text", "{path}: not a .safetensors file"),
    ("--feature-weights", "other", "{path}: not a .safetensors file"),
    ("--feature-weights", "cut", "path='{path}': cannot read the safetensors file (truncated or corrupted?)"),
    ("--inception-weights", "missing", "inception weights '{path}' not found"),
    ("--inception-weights", "text", "path='{path}': cannot read the safetensors file"),
    ("--inception-weights", "cut", "path='{path}': cannot read the safetensors file"),
    ("--inception-weights", "other", "{path}: not pytorch-fid's pt_inception-2015-12-05 layout"),
    ("--inception-weights", "evil", "path='{path}': not a weights file admrt loads safely"),
])
def test_eval_names_a_bad_weights_file_in_one_line(tmp_path, bad_weights, option, kind, message):
    """Each was a SafetensorError traceback (or torch's advice to load the file with
    weights_only=False, i.e. to run its code); exit 1 as for every bad file."""
    path = bad_weights[kind]
    extra = ["--features", "inception"] if option == "--inception-weights" else []
    res = _admrt_bounded(["eval", *extra, option, path, "--cache-dir", tmp_path / "cache", "fashion-test",
                          tmp_path / "s.npz"], tmp_path)
    line = _one_line(res, "eval", 1)
    assert message.format(path=path) in line and "weights_only" not in line, line
    assert not (bad_weights["folder"] / "PWNED").exists() and not (tmp_path / "cache").exists()


def test_a_pickle_with_code_is_not_a_weights_file_and_is_never_run(tmp_path):
    (tmp_path / "evil.pt").write_bytes(_code_pickle(tmp_path / "PWNED"))
    with pytest.raises(ValueError) as err:
        admrt.load_model(tmp_path / "evil.pt", preset="tiny-cond")
    assert str(err.value) == (f"path='{tmp_path / 'evil.pt'}': not a weights file admrt loads safely: it holds "
                              "Python objects other than tensors (code a pickle would run; admrt never runs it)")
    assert not (tmp_path / "PWNED").exists()


def test_a_write_that_fails_without_a_file_name_is_named(tmp_path, capsys):
    """A full disk is `[Errno 28] No space left on device` with no file: atomic_write names the file,
    and the CLI's one line shows it."""
    import errno

    from admrt.cli import error_line
    from admrt.io import atomic_write

    def full(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    target = tmp_path / "out" / "results.json"
    with pytest.raises(OSError) as err:
        atomic_write(target, full)
    assert error_line(err.value) == f"{target}: No space left on device"
    assert list((tmp_path / "out").iterdir()) == []   # no temporary file left


def test_one_cache_root_for_the_compile_cache_the_eval_cache_and_tensorrt(tmp_path, monkeypatch):
    """$ADMRT_CACHE_DIR, else $XDG_CACHE_HOME/admrt, else ~/.cache/admrt: the eval cache honoured
    only XDG and TensorRT's engines neither."""
    from admrt.engine.cache import CompileCache
    from admrt.evaluation.evaluator import Evaluator
    from admrt.io import cache_root

    pytest.importorskip("onnx")
    from admrt.export.tensorrt import default_cache_dir as tensorrt_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for admrt_dir, xdg, want in ((tmp_path / "a", tmp_path / "x", tmp_path / "a"),
                                 (None, tmp_path / "x", tmp_path / "x" / "admrt"),
                                 (None, None, tmp_path / "home" / ".cache" / "admrt")):
        for name, value in (("ADMRT_CACHE_DIR", admrt_dir), ("XDG_CACHE_HOME", xdg)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
        assert cache_root() == want
        assert CompileCache().root == want
        assert Evaluator(None).cache_dir == want / "eval"
        assert tensorrt_dir() == want / "tensorrt"


def test_a_killed_export_leaves_no_staging_folder_after_the_next_export(tmp_path):
    """SIGKILL of `admrt export onnx` mid-export left `.OUT.XXXX.tmp` beside --out for ever (19 MB
    to over 1 GB): the next export of OUT removes it (its process is gone), and succeeds."""
    out = tmp_path / "stack.onnx"
    cmd = [sys.executable, "-m", "admrt.cli", "export", "onnx", "--model", "tiny-cond", "--classifier", "none",
           "--upsampler", "none", "--steps", "ddim2", "--no-check", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_bounded)
    start = time.time()
    while not list(tmp_path.glob(".stack.onnx.*.tmp")) and proc.poll() is None and time.time() - start < 120:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    stale = list(tmp_path.glob(".stack.onnx.*.tmp"))
    assert len(stale) == 1 and not out.exists(), stale
    other = tmp_path / ".stack.onnx.1.abcdefgh.tmp"   # a live process's (pid 1): kept
    other.mkdir()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=_bounded)
    assert res.returncode == 0, res.stderr
    assert (out / "denoiser.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, out.name])


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, '{"rows": [{"sampler": "ddim5"}]}', '{"rows": 3}', b"\xff"],
                         ids=["deep", "missing-fields", "rows-not-a-list", "not-utf8"])
def test_sweep_merge_of_a_malformed_results_json_is_one_line(tmp_path, capsys, text):
    """--merge DIR read DIR/results.json with json.loads: a deep one raised RecursionError (a
    traceback); each malformed one is one line naming the file (exit 2), nothing made."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    capsys.readouterr()
    code = main(["eval", "sweep", "--merge", str(tmp_path / "r"), "--out", str(tmp_path / "merged")])
    res = subprocess.CompletedProcess([], code, "", capsys.readouterr().err)
    line = _one_line(res, "eval", 2)
    assert "results.json is not a sweep's results" in line, line
    assert not (tmp_path / "merged").exists()


def test_a_damaged_reference_cache_file_is_recomputed_not_a_traceback(tmp_path):
    """A truncated eval cache .npz raised zipfile.BadZipFile out of Evaluator._read_cache (a traceback);
    it is logged and ignored, so the statistics are recomputed."""
    from types import SimpleNamespace

    from admrt.evaluation.evaluator import Evaluator

    path = tmp_path / "ref.npz"
    np.savez(path, version=np.int64(1), k=np.int64(3), mu=np.zeros(4))
    path.write_bytes(path.read_bytes()[:60])
    assert Evaluator._read_cache(SimpleNamespace(k=3), path) is None
