"""`admrt sample`: npz (arr_0 uint8 NHWC, arr_1 labels) + PNG grid, sharded, resumable."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from admrt.cli import main

ARGS = ["sample", "--model", "tiny-cond", "--classifier", "tiny-classifier", "--num", "5", "--batch-size", "2",
        "--shard-size", "2", "--steps", "ddim2", "--classes", "3,8", "--seed", "7", "--device", "cpu",
        "--no-progress", "--backend", "eager"]


def test_sample_writes_npz_and_grid_and_resumes(tmp_path, capsys, cli_error):
    out = tmp_path / "run"
    assert main(ARGS + ["--out", str(out)]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    final = out / "samples_5x16x16x3.npz"
    with np.load(final) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert labels.tolist() == [3, 8, 3, 8, 3]
    side = 3 * 18 + 2  # 3x2 cells of 16 px + 2 px borders, enlarged by an integer factor to >= 512 px
    factor = 512 // side
    assert Image.open(out / "grid.png").size == (side * factor, (2 * 18 + 2) * factor)
    shards = sorted((out / "shards").glob("shard_*.npz"))
    assert [p.name for p in shards] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert not list(out.rglob("*.tmp"))

    # an interrupted run: one shard and the final file missing; the rerun only redoes that shard
    os.remove(shards[1])
    os.remove(final)
    before = shards[0].stat().st_mtime_ns
    assert main(ARGS + ["--out", str(out)]) == 0
    assert "resuming: 2 of 3 shards" in capsys.readouterr().err
    assert shards[0].stat().st_mtime_ns == before and shards[1].exists()
    with np.load(final) as f:
        np.testing.assert_array_equal(f["arr_0"], images)  # seeded: the same images again

    line = cli_error([a if a != "ddim2" else "ddim3" for a in ARGS] + ["--out", str(out)])
    assert "holds a run with other arguments (steps: 'ddim2' -> 'ddim3')" in line


def test_sample_help(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--guidance" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--preset", "nope"], "--preset='nope': unknown preset"),
    (["--batch", "0", "--device", "cpu"], "--batch=0: expected a positive int"),
    (["--reps", "0", "--device", "cpu"], "--reps=0: expected a positive int"),
    (["--impls", "gd,fast", "--device", "cpu"], "--impls='gd,fast': unknown implementation 'fast'; expected some of"),
    (["--impls", ",", "--device", "cpu"], "--impls='': expected some of"),
    (["--impls", "eager,graphs", "--device", "cpu"], "'graphs' (CUDA-graph replay) needs a CUDA --device, got 'cpu'"),
])
def test_bench_rejects_bad_arguments_in_one_line(argv, message, cli_error):
    assert message in cli_error(["bench", *argv])


@pytest.mark.parametrize("argv,message", [
    (["--device", "gpu0"], "--device=gpu0: not a device; expected one of cpu"),
    (["--guidance", "nan"], "--guidance=nan: expected a finite number"),
])
def test_bench_refuses_bad_option_values_as_the_parser_does(argv, message, capsys, monkeypatch):
    """Values no run could take: exit 2, before any model is built (guidance nan once made every
    variant fail and the command exit 0)."""
    from admrt.cli import bench_module

    def measured(args):
        raise AssertionError("measured with a bad option value")
    monkeypatch.setattr(bench_module(), "measure", measured)
    if torch.cuda.is_available():
        message = message.replace("expected one of cpu", "expected one of cpu, cuda")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith(f"admrt bench: {message}"), err


def test_a_failing_bench_variant_fails_the_command(monkeypatch, tmp_path, cli_error):
    """A variant that fails is a FAILED row and the command exits 1 naming it, after the others'
    results are written."""
    from admrt.cli import bench_module
    measure = bench_module()
    rows = [{"impl": "admrt eager", "median_s": 1.0}, {"impl": "guided-diffusion", "error": "RuntimeError: boom"}]
    monkeypatch.setattr(measure, "measure", lambda args: {"config": {}, "rows": rows})
    line = cli_error(["bench", "--device", "cpu", "--out", tmp_path])
    assert "1 of 2 variants failed (guided-diffusion; first: RuntimeError: boom); the other rows are in" in line
    assert len(list(tmp_path.glob("sampling_*.json"))) == 1


def test_sample_defaults_to_auto_and_compiles_once(tmp_path, capfd):
    """No --backend: auto (aoti on CPU), compiled on the first run with one notice per unit, taken
    from the cache by the next (no notice, the same images), recorded as the backend that ran;
    eager's images within one level. A forced backend whose cache cannot be written: one line."""
    import json
    args = ["sample", "--model", "tiny-cond", "--num", "2", "--batch-size", "2", "--steps", "ddim2", "--classes",
            "1,2", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert capfd.readouterr().err.count("admrt: compiling the base model for backend aoti") == 1
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "compiling" not in capfd.readouterr().err
    assert json.loads((tmp_path / "b" / "run.json").read_text())["backend"] == "aoti"
    assert main(args + ["--backend", "eager", "--out", str(tmp_path / "c")]) == 0
    images = {name: np.load(tmp_path / name / "samples_2x16x16x3.npz")["arr_0"].astype(int) for name in "abc"}
    assert np.array_equal(images["a"], images["b"]) and np.abs(images["a"] - images["c"]).max() <= 1
    (tmp_path / "file").write_text("not a folder")
    capfd.readouterr()
    assert main(args[:-1] + [str(tmp_path / "file" / "cache"), "--backend", "aoti", "--out", str(tmp_path / "d")]) == 1
    err = capfd.readouterr().err.strip().splitlines()   # the random-weights notice, then the one error line
    assert "Traceback" not in "".join(err) and err[-1].startswith("admrt sample: compile cache ") \
        and "cannot create it (Not a directory)" in err[-1], err
    assert not (tmp_path / "d").exists()
