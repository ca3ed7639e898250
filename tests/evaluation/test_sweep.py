"""The guidance sweep and the `admrt eval` CLI on tiny random models (few samples)."""
import json

import numpy as np
import pytest
import torch

import admrt
from admrt.cli import main as admrt_main
from admrt.evaluation import npz
from admrt.evaluation.evaluator import Evaluator
from admrt.evaluation.features import FashionFeatureNet, FashionNetConfig
from admrt.evaluation.sweep import SweepConfig, plot_tradeoff, run_sweep, save_grid, write_report


class FakeEngine:
    """Engine stand-in: the image of a seed is fixed noise whose contrast grows with guidance."""

    num_classes = 10

    def __init__(self):
        self.calls = []

    def sample(self, classes, steps, guidance, seeds, batch_size):
        from admrt.engine.engine import SampleResult
        self.calls.append((steps, guidance, batch_size))
        base = np.stack([np.random.default_rng(int(s)).normal(size=(16, 16, 1)) for s in seeds])
        images = np.clip(128 + 40 * (1 + guidance) * base, 0, 255).astype(np.uint8)
        return SampleResult(images=images, labels=np.asarray(classes), seeds=np.asarray(seeds))


def _evaluator(tmp_path):
    torch.manual_seed(1)
    net = FashionFeatureNet(FashionNetConfig(stages=((4,), (8,), (8,), (16,)), input_size=16)).eval()
    net.fingerprint = "0" * 64
    return Evaluator(net, cache_dir=tmp_path / "cache")


def test_sweep_writes_a_report(tmp_path):
    ev = _evaluator(tmp_path)
    ref_images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
    ref = ev.reference(ref_images)
    config = SweepConfig(scales=(0.0, 4.0), samplers=("ddim2", "3"), num_samples=(20, 30), batch_size=10)
    out = tmp_path / "report"
    engine = FakeEngine()
    rows = run_sweep(engine, ev, ref, config, out_dir=out, log=lambda s: None)
    assert engine.calls == [("ddim2", 0.0, 10), ("ddim2", 4.0, 10), ("3", 0.0, 10), ("3", 4.0, 10)]
    assert [(r.sampler, r.scale) for r in rows] == [("ddim2", 0.0), ("ddim2", 4.0), ("3", 0.0), ("3", 4.0)]
    for r in rows:
        assert np.isfinite([r.result.fid, r.result.sfid, r.result.inception_score]).all()
        assert 0 <= r.result.precision <= 1 and 0 <= r.result.recall <= 1
        assert r.result.num_samples == (20 if r.sampler == "ddim2" else 30) and r.result.num_reference == 40
        assert (out / r.grid).is_file()
    assert rows[0].result.fid != rows[1].result.fid
    a = np.load(out / "samples" / "ddim2_g0.npz")
    assert np.array_equal(a["arr_1"], np.arange(20) % 10)
    report = write_report(rows, out, {"command": "test", "description": "tiny"}, title="T")
    text = report.read_text()
    assert "| DDIM-2 | 4 |" in text and "| DDPM-3 | 0 |" in text and "tradeoff.png" in text
    assert (out / "tradeoff.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == 4 and saved["rows"][1]["fid"] == rows[1].result.fid


def test_sweep_with_a_real_engine(one_thread, tmp_path):
    torch.manual_seed(0)
    engine = admrt.Engine(admrt.create_model("tiny-cond"), classifier=admrt.create_model("tiny-classifier"), backend="eager")
    ev = _evaluator(tmp_path)
    ref = ev.reference(np.random.default_rng(0).integers(0, 256, (30, 16, 16, 3), dtype=np.uint8))
    config = SweepConfig(scales=(0.0, 8.0), samplers=("ddim2",), num_samples=(20,), batch_size=20)
    rows = run_sweep(engine, ev, ref, config, out_dir=tmp_path / "r", log=lambda s: None)
    a = np.load(tmp_path / "r" / "samples" / "ddim2_g0.npz")
    b = np.load(tmp_path / "r" / "samples" / "ddim2_g8.npz")
    # Same labels and seeds in both runs; guidance changes the images.
    assert np.array_equal(a["arr_1"], b["arr_1"]) and a["arr_0"].shape == (20, 16, 16, 3)
    assert not np.array_equal(a["arr_0"], b["arr_0"])
    assert all(np.isfinite(r.result.fid) for r in rows)


def test_pil_plot_and_grid(tmp_path):
    from PIL import Image
    from admrt.evaluation.evaluator import EvalResult
    from admrt.evaluation.sweep import SweepRow, _plot_pil
    rows = [SweepRow(s, g, EvalResult(1.0, 10.0 / (1 + g), 1.0, 0.5 + g / 20, 0.6 - g / 20, 10, 10, "x"), 1.0)
            for s in ("ddim25", "250") for g in (0.0, 1.0, 8.0)]
    path = plot_tradeoff(rows, tmp_path / "p.png")
    assert Image.open(path).size[0] > 600
    series = {"FID": {"250": [(0.0, 1.0), (1.0, 1.0)]}}
    assert Image.open(_plot_pil(series, [0.0, 1.0], ["250"], tmp_path / "q.png")).size[1] > 100
    imgs = np.random.default_rng(0).integers(0, 256, (30, 4, 4, 1), dtype=np.uint8)
    grid = Image.open(save_grid(tmp_path / "g.png", imgs, np.arange(30) % 10, 10, 3, scale=2, pad=1))
    assert grid.size == (3 * 9 + 1, 10 * 9 + 1)


def test_eval_cli_metrics(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref = npz.save_batch(tmp_path / "ref.npz", rng.integers(0, 256, (40, 16, 16, 1), dtype=np.uint8))
    sam = npz.save_batch(tmp_path / "sam.npz", rng.integers(0, 256, (30, 16, 16, 1), dtype=np.uint8))
    net = FashionFeatureNet(FashionNetConfig(stages=((4,), (8,), (8,), (16,)), input_size=16))
    net.save(tmp_path / "net.safetensors")
    common = ["--feature-weights", str(tmp_path / "net.safetensors"), "--cache-dir", str(tmp_path / "c")]
    assert admrt_main(["eval", *common, str(ref), str(sam), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "FID:" in out and "Precision:" in out and "NOT comparable" in out
    first = json.loads((tmp_path / "r.json").read_text())
    # Options after the operands work too, and the second run reads the cache.
    assert admrt_main(["eval", str(ref), str(sam), *common, "--json", str(tmp_path / "r2.json")]) == 0
    assert json.loads((tmp_path / "r2.json").read_text()) == first
    assert len(list((tmp_path / "c").iterdir())) == 1
    with pytest.raises(SystemExit) as exit_info:
        admrt_main(["eval"])  # no operands: a usage error
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        admrt_main(["eval", "sweep", "--help"])
    assert "--scales" in capsys.readouterr().out


def test_sweep_config_errors():
    with pytest.raises(ValueError, match="one per sampler"):
        SweepConfig(samplers=("ddim25", "250"), num_samples=(100, 100, 100))
    with pytest.raises(ValueError, match=">= 20"):
        SweepConfig(num_samples=(10,))
    with pytest.raises(ValueError, match="non-negative"):
        SweepConfig(scales=(-1.0,))


def test_eval_sweep_cli_end_to_end(one_thread, tmp_path, capsys):
    torch.manual_seed(0)
    admrt.save_model(admrt.create_model("tiny-cond"), tmp_path / "m.safetensors")
    admrt.save_model(admrt.create_model("tiny-classifier"), tmp_path / "c.safetensors")
    net = FashionFeatureNet(FashionNetConfig(stages=((4,), (8,), (8,), (16,)), input_size=16))
    net.save(tmp_path / "net.safetensors")
    ref = npz.save_batch(tmp_path / "ref.npz",
                         np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "out"
    argv = ["eval", "sweep", "--model", str(tmp_path / "m.safetensors"), "--classifier", str(tmp_path / "c.safetensors"),
            "--reference", str(ref), "--feature-weights", str(tmp_path / "net.safetensors"),
            "--cache-dir", str(tmp_path / "cache"), "--scales", "0", "2", "--samplers", "ddim2",
            "--num-samples", "20", "--batch-size", "20", "--out", str(out), "--title", "Tiny sweep"]
    assert admrt_main(argv) == 0
    text = (out / "report.md").read_text()
    assert text.startswith("# Tiny sweep") and "| DDIM-2 | 2 |" in text and "NOT comparable" in text
    assert "as large as the run's sample set" in text
    assert {p.name for p in out.iterdir()} >= {"report.md", "results.json", "tradeoff.png", "grid_ddim2_g0.png",
                                               "grid_ddim2_g2.png", "samples"}


def test_pr_reference_subset(tmp_path):
    ev = _evaluator(tmp_path)
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, (60, 16, 16, 1), dtype=np.uint8)
    sam = rng.integers(0, 256, (20, 16, 16, 1), dtype=np.uint8)
    full = ev.evaluate(ref_images, sam)
    ev.pr_reference_size = 20
    sub = ev.evaluate(ref_images, sam)
    assert sub.fid == full.fid and sub.num_reference == 60           # FID still uses every image
    assert (sub.precision, sub.recall) != (full.precision, full.recall)
    assert ev.evaluate(ref_images, sam) == sub                       # the subset is fixed
    with pytest.raises(ValueError, match="pr_reference_size"):
        Evaluator(ev.network, pr_reference_size=3)


def test_merge_reports(tmp_path):
    from admrt.evaluation.evaluator import EvalResult
    from admrt.evaluation.sweep import SweepRow, load_rows
    for i, s in enumerate(("ddim25", "250")):
        d = tmp_path / s
        rows = [SweepRow(s, g, EvalResult(1.0, 2.0 + g, 3.0, 0.5, 0.4, 20, 40, "x"), 1.0, f"grid_{s}_{g:g}.png")
                for g in (0.0, 1.0)]
        for r in rows:
            save_grid(d / r.grid, np.zeros((10, 4, 4, 1), np.uint8), np.arange(10), 10, 1)
        write_report(rows, d, {"command": f"admrt eval sweep --samplers {s}", "model": "m", "samples per run": str(i)})
    assert admrt_main(["eval", "sweep", "--merge", str(tmp_path / "ddim25"), str(tmp_path / "250"),
                       "--out", str(tmp_path / "all")]) == 0
    rows, meta = load_rows(tmp_path / "all" / "results.json")
    assert [(r.sampler, r.scale) for r in rows] == [("ddim25", 0.0), ("ddim25", 1.0), ("250", 0.0), ("250", 1.0)]
    assert meta["model"] == "m" and meta["samples per run"] == "0; 1" and "--samplers 250" in meta["command"]
    assert all((tmp_path / "all" / r.grid).is_file() for r in rows)
