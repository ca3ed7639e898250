"""`admrt train` end to end on a few real Fashion-MNIST images (tiny preset, 3 steps, CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest

import admrt
from admrt.training import cli
from admrt.training import data as D

HAVE_FMNIST = all((Path(D.FASHION_MNIST_ROOT) / f).exists() for pair in D._FILES.values() for f in pair)


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_train_cli_writes_log_checkpoints_and_export(tmp_path):
    out = tmp_path / "run"
    export = tmp_path / "final.safetensors"
    argv = ["classifier", "--preset", "tiny-classifier", "--steps", "3", "--batch-size", "8",
            "--limit", "64", "--eval-images", "16", "--log-every", "1", "--save-every", "2",
            "--device", "cpu", "--out", str(out), "--export", str(export)]
    assert cli.main(argv) == 0
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,time_s,loss,acc@1") and len(rows) == 4
    names = {p.name for p in out.iterdir()}
    assert {"model_000002.safetensors", "state_000002.safetensors", "model_000003.safetensors",
            "state_000003.safetensors", "summary.txt"} <= names
    m = admrt.load_model(export)
    assert m.preset.name == "tiny-classifier"
    # resume continues from the last checkpoint to the new --steps
    argv2 = [a if a != "3" else "4" for a in argv] + ["--resume", str(out)]
    assert cli.main(argv2) == 0
    assert (out / "state_000004.safetensors").exists()
    assert len((out / "log.csv").read_text().strip().splitlines()) == 5


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_train_cli_diffusion_sample_grid(tmp_path):
    from PIL import Image

    out = tmp_path / "run"
    argv = ["diffusion", "--preset", "tiny-cond", "--steps", "2", "--batch-size", "4", "--limit", "16",
            "--eval-images", "8", "--ema", "0.9", "--sample-every", "2", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    grids = sorted(out.glob("grid_*.png"))
    assert grids, "no sample grid written"
    assert Image.open(grids[0]).size == (16 * 10, 16 * 2)  # tiny-cond: 10 classes, 16x16


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_train_cli_from_guided_diffusion_flags(tmp_path, cli_error):
    """image_train.py's model and diffusion flags give the network and its objective (x_0 target, KL)."""
    out, export = tmp_path / "run", tmp_path / "final.safetensors"
    flags = ("--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
             "--class_cond True --learn_sigma True --predict_xstart True --use_kl True --diffusion_steps 100")
    argv = ["diffusion", "--gd-flags", flags, "--steps", "2", "--batch-size", "4", "--limit", "16",
            "--eval-images", "8", "--ema", "0.9", "--log-every", "1", "--device", "cpu", "--out", str(out),
            "--export", str(export)]
    assert cli.main(argv) == 0
    m = admrt.load_model(export)
    assert m.preset.name == "gd-flags-unet" and m.in_channels == 3 and m.num_classes == 1000
    d = m.preset.diffusion
    assert (d.steps, d.predict_xstart, d.use_kl) == (100, True, True)
    header, *rows = (out / "log.csv").read_text().strip().splitlines()
    mse = [float(r.split(",")[header.split(",").index("mse")]) for r in rows]
    assert mse == [0.0, 0.0]  # use_kl: the bound alone, no MSE term
    assert "--preset and --gd-flags both give the model" in cli_error(["train", *argv, "--preset", "tiny-cond"])
