"""The run folder's record (engine/csrc/runfolder.cpp, bound as core.RunFolder): written as
json.dumps(record, indent=1) writes it, compared as Python compares what json.loads returns
(nested lists and objects included), refused with each changed field, replaced when the run
finished nothing, extended when an older admrt did not record a field."""
import json

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
                   seed=4, eta=0.5, big=1, tiny=2, command="sample")
    with pytest.raises(RunFolderError) as exc:
        folder.check_record(changed, finished=1, may_differ=("seed",))
    message = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert message.startswith(f"--out={str(tmp_path / 'r')!r} holds a run with other arguments (big: 1e+16 -> 1; "
                              "command: 'train' -> 'sample'; eta: 0.0 -> 0.5; lr: 0.0001 -> 0.01; "
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
