"""AOTInductor packages on CUDA (skipped without a GPU): the package compiled for CUDA (its units
hold the Triton kernels), run by the C++ Context with whole-step CUDA graphs, equals the eager
Engine; admrt-sample's latency against the Python front end on the same package is printed (the
table is `admrt bench --package`'s)."""
import subprocess
import time

import numpy as np
import pytest
import torch

import admrt
from admrt.engine import sample_program
from admrt.export.aoti import export_aoti
from gd_reference import random_model


@pytest.mark.gpu
def test_cuda_package_with_graphs_equals_eager(tmp_path):
    model, clf = random_model("tiny-cond").cuda(), random_model("tiny-classifier").cuda()
    export_aoti(model, clf, out=tmp_path / "pkg", steps="ddim10 25", device="cuda", max_batch=16)
    want = admrt.Engine(model, classifier=clf, cuda_graphs=False).sample(
        classes=list(range(8)), steps="ddim10", guidance=2.0, seeds=3, batch_size=8, keep_float=True)
    eng = admrt.Engine.from_package(tmp_path / "pkg")
    got = eng.sample(classes=list(range(8)), steps="ddim10", guidance=2.0, seeds=3, batch_size=8, keep_float=True)
    assert np.abs(got.samples - want.samples).max() <= 2e-3
    # graphs on and off give the same images
    off = admrt.Engine.from_package(tmp_path / "pkg", cuda_graphs=False).sample(
        classes=list(range(8)), steps="ddim10", guidance=2.0, seeds=3, batch_size=8)
    assert (off.images == got.images).all()

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    py = timed(lambda: eng.sample(num=16, steps="ddim25", seeds=0, batch_size=16))
    runs = iter(range(2))  # a fresh run folder each time (a rerun would resume, not sample)
    cpp = timed(lambda: subprocess.run([sample_program, "--package", str(tmp_path / "pkg"), "--num", "16",
                                        "--batch-size", "16", "--steps", "ddim25", "--out",
                                        str(tmp_path / f"run{next(runs)}"), "--no-progress"], check=True))
    print(f"\nddim25 b16 tiny guided: Python front end {py * 1e3:.1f} ms, admrt-sample (whole process, with "
          f"load) {cpp * 1e3:.1f} ms")
