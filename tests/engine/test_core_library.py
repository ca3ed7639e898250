"""libadmrt is a Python-free library: a C++ program linked against it and libtorch alone
(engine/csrc/examples/analytic_sample.cpp) samples with a C++ Denoiser, and gives the numbers the
same Sampler context gives when driven from Python."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from admrt import core

ROOT = Path(__file__).resolve().parents[2]


def _tables(steps):
    """The tables analytic_sample.cpp builds (same ops, same order)."""
    T = 1000
    ac_full = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    idx = torch.tensor([i * (T - 1) // (steps - 1) for i in range(steps)])
    ac = ac_full.index_select(0, idx)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    betas = 1 - ac / ac_prev
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    large = torch.cat([post_var[1:2], betas[1:]])
    return {"alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev, "log_betas": torch.log(betas),
            "sqrt_recip_alphas_cumprod": torch.sqrt(1 / ac), "sqrt_recipm1_alphas_cumprod": torch.sqrt(1 / ac - 1),
            "posterior_variance": post_var, "posterior_log_variance_clipped": post_log,
            "posterior_mean_coef1": betas * torch.sqrt(ac_prev) / (1 - ac),
            "posterior_mean_coef2": (1 - ac_prev) * torch.sqrt(1 - betas) / (1 - ac),
            "fixed_large_variance": large, "fixed_large_log_variance": torch.log(large), "timestep_map": idx}


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("core_build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = ["cmake", str(ROOT), *gen, "-DCMAKE_BUILD_TYPE=Release", "-DADMRT_PYTHON=OFF", "-DADMRT_BUILD_EXAMPLES=ON",
           "-DADMRT_WITH_CUDA=OFF", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is not None:  # torch's CMake config then needs the CUDA toolkit (setup.py)
        from torch.utils.cpp_extension import CUDA_HOME
        cfg += [f"-DCUDA_TOOLKIT_ROOT_DIR={CUDA_HOME}", f"-DCUDAToolkit_ROOT={CUDA_HOME}",
                "-DTORCH_CUDA_ARCH_LIST=9.0"]
    for cmd in (cfg, ["cmake", "--build", ".", "--target", "analytic_sample", "-j", "2"]):
        out = subprocess.run(cmd, cwd=build, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return build / "analytic_sample"


def test_program_links_no_python(program):
    if shutil.which("ldd") is None:
        pytest.skip("ldd is not installed")
    names = [line.split()[0] for line in subprocess.run(["ldd", str(program)], capture_output=True,
                                                         text=True).stdout.splitlines() if line.strip()]
    assert any(n.startswith("libtorch") for n in names), names
    assert not [n for n in names if "python" in n], names  # no libpython, no libtorch_python


@pytest.mark.parametrize("method,steps,eta", [("ddim", 10, 0.5), ("ddpm", 8, 0.0)])
def test_program_matches_the_python_driven_context(program, method, steps, eta):
    seeds = [3, 2 ** 63 + 5, 11]
    lib_dir = Path(torch.__file__).parent / "lib"
    out = subprocess.run([str(program), method, str(steps), str(eta), *map(str, seeds)], capture_output=True,
                         text=True, timeout=300, env={"LD_LIBRARY_PATH": str(lib_dir)})
    assert out.returncode == 0, out.stderr
    got = torch.tensor([float(v) for v in out.stdout.split()]).reshape(3, 3, 4, 4)

    p = core.default_params()
    p.method = {"ddim": core.Method.DDIM, "ddpm": core.Method.DDPM}[method]
    p.eta, p.batch_size, p.image_shape = eta, 3, [3, 4, 4]
    ctx = core.Sampler(lambda x, t, y, lr: torch.cat([x * 0.1, torch.zeros_like(x)], 1), None,
                        core.Schedule(_tables(steps), 1000, False), p)
    want = ctx.sample(seeds=torch.tensor(seeds, dtype=torch.uint64).view(torch.int64)
                      if hasattr(torch, "uint64") else torch.tensor([s - 2 ** 64 if s >= 2 ** 63 else s for s in seeds]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
