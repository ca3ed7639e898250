"""Shared test set-up: tests/ and bench/ on sys.path (gd_reference; bench's gd_oracle and
measure), the gpu marker, quiet warnings, and a compile cache of the session's own (what the
compiled backends build is shared by the session's tests, and never taken from or left in the
user's ~/.cache/admrt)."""
import os
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "bench"))
warnings.filterwarnings("ignore", category=FutureWarning, module="guided_diffusion")
torch.set_num_threads(2)
os.environ["ADMRT_CACHE_DIR"] = tempfile.mkdtemp(prefix="admrt-test-cache-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of 8 labelled 16x16 RGB images (class = file-name prefix): `admrt train --data` of
    the reliability tests."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i % 4}_{i}.png")
    return folder


@pytest.fixture
def cli_error(capsys):
    """Run `admrt ARGV` in-process and return the error line after checking the CLI's error path:
    exit code 1 (or `code`), no traceback, the last stderr line `admrt <command>: ...`."""
    from admrt.cli import main

    def run(argv, code=1):
        argv = [str(a) for a in argv]
        capsys.readouterr()
        assert main(argv) == code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert "Traceback" not in err and lines and lines[-1].startswith(f"admrt {argv[0]}: "), err
        return lines[-1]
    return run


def pytest_sessionfinish(session, exitstatus):
    import shutil
    shutil.rmtree(os.environ["ADMRT_CACHE_DIR"], ignore_errors=True)
