"""The run folder's record (engine/csrc/runfolder.cpp, bound as core.RunFolder): written as
json.dumps(record, indent=1) writes it, compared as Python compares what json.loads returns
(nested lists and objects included), refused with each changed field, replaced when the run
finished nothing, extended when an older admrt did not record a field; another kind of run's
work and work without its record refused; the lock never through a link; abandon() removing only
what the failed command made and what holds no work."""
import json
import os

import pytest

from admrt.core import RunFolder, RunFolderError

RECORD = {"command": "train", "lr": 1e-4, "ema_rates": [0.9999], "eta": 0.0, "big": 1e16, "tiny": 1.5e-7,
          "preset": {"name": "tiny-cond", "channel_mult": [1, 2]}, "seed": 3, "flag": True, "text": "it's", "none": None}


def test_record_is_written_as_python_writes_it_and_resumed(tmp_path, capsys):
    folder = RunFolder(tmp_path / "r", "test")
    folder.lock()
    assert folder.check_record(RECORD, finished=0) is False
    assert (tmp_path / "r" / "run.json").read_text() == json.dumps(RECORD, indent=1) + "\n"
    assert folder.check_record(dict(RECORD, ema_rates=(0.9999,)), finished=2) is True  # a tuple is a list
    assert folder.check_record(dict(RECORD, seed=3.0), finished=2) is True  # 3 == 3.0, as in Python
    folder.unlock()


def test_changed_fields_are_listed_and_a_run_that_finished_nothing_is_replaced(tmp_path, capsys):
    folder = RunFolder(tmp_path / "r", "test")
    folder.lock()
    folder.check_record(RECORD, finished=0)
    changed = dict(RECORD, lr=0.01, preset={"name": "tiny-cond", "channel_mult": [1, 2, 2]}, text="x" * 70,
                   seed=4, eta=0.5, big=1, tiny=2, flag=False)
    with pytest.raises(RunFolderError) as exc:
        folder.check_record(changed, finished=1, may_differ=("seed",))
    message = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert message.startswith(f"--out={str(tmp_path / 'r')!r} holds a run with other arguments (big: 1e+16 -> 1; "
                              "eta: 0.0 -> 0.5; flag: true -> false; lr: 0.0001 -> 0.01; "
                              'preset: {"name": "tiny-cond", "channel_mult": [1, 2]} -> {"name": "tiny-cond", '
                              '"channel_mult": [1, 2, 2]}; text: "it\'s" -> ')
    assert " (and 1 more)); rerun with the recorded values to resume it" in message and "seed" not in message
    capsys.readouterr()
    assert folder.check_record(changed, finished=0) is False
    assert "test: " + str(tmp_path / "r") + " held a run that finished nothing; starting over" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "run.json").read_text()) == changed
    folder.unlock()


def test_fields_an_older_record_lacks_are_added(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text(json.dumps({k: v for k, v in RECORD.items() if k not in ("lr", "seed")}))
    folder = RunFolder(tmp_path / "r", "test")
    folder.lock()
    assert folder.check_record(RECORD, finished=1) is True
    assert (f"test: {tmp_path / 'r' / 'run.json'} did not record lr, seed (an older admrt); recorded now"
            in capsys.readouterr().err)
    assert json.loads((tmp_path / "r" / "run.json").read_text()) == RECORD
    with pytest.raises(ValueError, match="run record: lr=nan: expected a finite number"):
        folder.check_record(dict(RECORD, lr=float("nan")), finished=0)
    folder.unlock()


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"work")


def test_another_kind_of_runs_work_is_refused_and_orphans_are_not_adopted(tmp_path, capsys):
    out = tmp_path / "r"
    folder = RunFolder(out, "test")
    folder.lock()
    folder.check_record(RECORD, finished=0)  # a "train" record
    _touch(out / "state_000005.safetensors")
    sample = {"command": "sample", "seed": 0}
    with pytest.raises(RunFolderError, match=r"holds an `admrt train` run \(run.json, 1 checkpoint\); use another"):
        folder.check_record(sample, finished=0)
    assert json.loads((out / "run.json").read_text()) == RECORD
    (out / "state_000005.safetensors").unlink()
    assert folder.check_record(sample, finished=0) is False  # its run finished nothing: replaced
    assert "held an `admrt train` run that finished nothing; starting over" in capsys.readouterr().err
    # Without run.json, finished work cannot be told apart from another run's: refused, unless adopted.
    (out / "run.json").unlink()
    _touch(out / "shards" / "shard_00000.npz")
    _touch(out / "shards" / "shard_00001.npz")
    with pytest.raises(RunFolderError, match=r"holds 2 shards but no run.json \(its record was lost or deleted\)"):
        folder.check_record(sample, finished=2)
    with pytest.raises(RunFolderError, match=r"holds an `admrt sample` run \(2 shards\)"):
        folder.check_record(RECORD, finished=0)
    assert not (out / "run.json").exists()
    assert folder.check_record(sample, finished=2, adopt=True) is False
    folder.unlock()


def test_the_lock_is_never_opened_through_a_link_or_a_non_file(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    target = tmp_path / "target"
    target.write_text("keep")
    (out / ".lock").symlink_to(target)
    with pytest.raises(RunFolderError, match=r"\.lock: a symbolic link, not a lock file"):
        RunFolder(out, "test").lock()
    (out / ".lock").unlink()
    (out / ".lock").symlink_to(tmp_path / "missing")  # a dangling link would be created
    with pytest.raises(RunFolderError, match="a symbolic link"):
        RunFolder(out, "test").lock()
    assert target.read_text() == "keep" and not (tmp_path / "missing").exists()
    (out / ".lock").unlink()
    os.mkfifo(out / ".lock")
    with pytest.raises(RunFolderError, match=r"\.lock: not a regular file"):
        RunFolder(out, "test").lock()
    # A link planted as a temporary file is removed with the stale ones, never written through.
    (out / ".lock").unlink()
    (out / ".run.json.tmp").symlink_to(tmp_path / "elsewhere")
    folder = RunFolder(out, "test")
    folder.lock()
    assert not os.path.lexists(out / ".run.json.tmp")
    folder.check_record(RECORD, finished=0)
    assert not (tmp_path / "elsewhere").exists()
    folder.unlock()


def test_abandon_removes_what_the_command_made_and_never_work(tmp_path):
    out = tmp_path / "a" / "b"
    folder = RunFolder(out, "test")
    folder.lock()
    folder.check_record(RECORD, finished=0)
    (out / "shards").mkdir()
    folder.abandon()
    assert not (tmp_path / "a").exists() and not folder.locked()
    # Finished work keeps its record, and a folder that was there stays.
    folder = RunFolder(out, "test")
    folder.lock()
    folder.check_record(RECORD, finished=0)
    _touch(out / "state_000001.safetensors")
    folder.abandon()
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "state_000001.safetensors"]
    (out / "state_000001.safetensors").unlink()
    folder = RunFolder(out, "test")
    folder.lock()
    folder.check_record(RECORD, finished=0)  # a record there before this command: kept
    folder.abandon()
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # the .lock it made is gone too


def test_a_sample_run_stopped_before_its_first_shard_leaves_nothing(tmp_path):
    """run_samples (both front ends) abandons a run that finished nothing: no run.json, .lock or
    empty shards/ left, and the folder it made is gone; a run with finished shards keeps them."""
    import admrt
    from admrt import core

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ctx = admrt.Engine(admrt.create_model("tiny-cond"), backend="eager").context(steps="ddim2", batch_size=1)

    def stop_at(step):
        def progress(done, total):
            if done == step:
                raise KeyboardInterrupt
        return progress

    out = tmp_path / "new" / "r"
    kwargs = dict(out=str(out), command="test", num=3, shard_size=1)
    with pytest.raises(KeyboardInterrupt):
        core.run_samples(ctx, progress=stop_at(1), **kwargs)
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt):
        core.run_samples(ctx, progress=stop_at(2 * ctx.steps_per_batch() + 1), **kwargs)
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "shards"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_00000.npz", "shard_00001.npz"]


def test_run_samples_checks_num_before_sizing_anything_by_it(tmp_path):
    """run_samples built its per-image labels before validating num, so a front end that passed
    --num 10**12 on (a library caller, or a CLI without its own check) allocated until killed: it
    is refused in one line naming num, under an address-space bound, with nothing written."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, sys
        import admrt
        from admrt import core
        ctx = admrt.Engine(admrt.create_model("tiny-cond"), backend="eager").context(steps="ddim2", batch_size=1)
        limit = 3 << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            core.run_samples(ctx, out={str(tmp_path / "r")!r}, command="test", num=10 ** 12)
        except ValueError as e:
            print(e)
            sys.exit(3)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout.startswith("num=1000000000000: ") and len(res.stdout.splitlines()) == 1, res.stdout
    assert not (tmp_path / "r").exists()


def test_atomic_writes_never_follow_a_link_planted_at_the_temporary_name(tmp_path):
    """write_atomic (run.json, shards, the final .npz) opened OUT/.NAME.tmp with std::ofstream, which
    followed a link planted there and truncated its target; the temporary file is now made anew
    (O_EXCL | O_NOFOLLOW), the link replaced, the target untouched."""
    import numpy as np
    import torch

    from admrt import core

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".x.npz.tmp").symlink_to(victim)
    core.write_npz(str(out / "x.npz"), [torch.arange(6, dtype=torch.uint8).reshape(2, 3)])
    assert victim.read_text() == "keep me"
    assert (np.load(out / "x.npz")["arr_0"] == np.arange(6).reshape(2, 3)).all()
    assert sorted(p.name for p in out.iterdir()) == ["x.npz"]


def test_a_samples_file_is_finished_work_even_when_its_shards_are_gone(tmp_path):
    """run_samples counted only shards as finished work: with shards/ emptied, a rerun with other
    arguments replaced run.json and overwrote the samples file of the same name. It is refused."""
    out = tmp_path / "r"
    folder = RunFolder(out, "test")
    folder.lock()
    first = {"command": "sample", "seed": 0}
    folder.check_record(first, finished=0)
    _touch(out / "samples_4x16x16x1.npz")
    with pytest.raises(RunFolderError, match=r"holds a run with other arguments \(seed: 0 -> 1\)"):
        folder.check_record({"command": "sample", "seed": 1}, finished=0)
    assert json.loads((out / "run.json").read_text()) == first
    folder.unlock()
