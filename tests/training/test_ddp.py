"""DDP on 2 CPU processes (gloo, launched by torchrun) equals 1 process at the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_one(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(HERE / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)

    sys.path.insert(0, str(HERE))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(HERE))
    single = ddp_worker.make_trainer(microbatch=0)  # 1 process, the whole global batch at once
    ref = ddp_worker.result(single, single.train())
    assert ref.keys() == ddp.keys()
    torch.testing.assert_close(ddp["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    # every rank recorded the losses of the whole global batch, in the same order
    torch.testing.assert_close(ddp["history"], ref["history"], rtol=1e-5, atol=1e-7)
    assert int((ref["history"] != 0).sum()) > 0
    for k in ref:
        if k.startswith("grad/"):
            torch.testing.assert_close(ddp[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
