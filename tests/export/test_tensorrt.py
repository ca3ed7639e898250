"""The TensorRT path (admrt.export.tensorrt, admrt.export.trt_plugins) without TensorRT: the import
and the error without the package, the engine cache key, the batch profile, the plugins' launch
plans, their Triton -> PTX compile (no GPU needed), their kernels in TensorRT's argument order
against the torch references (Triton interpreter, subprocess), and the ONNX rewrite into plugin
nodes. Building and running engines needs TensorRT and a GPU: those tests are skipped here."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

# Without onnx (an optional extra) the module is skipped, as test_onnx.py is, instead of failing
# collection: the TensorRT path goes through ONNX files.
onnx = pytest.importorskip("onnx", reason="the TensorRT path needs onnx (pip install 'admrt[export]')")
import onnx.helper as oh  # noqa: E402
import onnx.numpy_helper  # noqa: E402

import admrt.export.onnx_ops  # noqa: E402,F401  (registers the admrt-domain schemas with onnx.defs)
from admrt.export import MissingPackageError  # noqa: E402
from admrt.export import tensorrt as trt_export  # noqa: E402
from admrt.export import trt_plugins as tp  # noqa: E402
from admrt.kernels import group_norm as gn  # noqa: E402

NO_TRT = "TensorRT cannot be installed here (PyPI's tensorrt packages download from NVIDIA's index)"
needs_triton = pytest.mark.skipif(not tp.HAS_TRITON, reason="triton is not installed")
needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason=NO_TRT)
TP = onnx.TensorProto


def _write(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def tiny_fused_model(batch="batch", spatial=(4, 4)) -> onnx.ModelProto:
    """x (B, 8, H, W) -> GroupNormAct -> AdaGroupNormAct(scale, shift) -> (B, 8, L) -> 1x1 conv to
    qkv (B, 24, L) -> QKVAttention(2 heads, legacy) -> out (B, 12, L)."""
    length = spatial[0] * spatial[1]
    g = torch.Generator().manual_seed(0)

    def init(name, *shape):
        return onnx.numpy_helper.from_array(torch.randn(*shape, generator=g).numpy(), name)

    inits = [init("gamma", 8), init("beta", 8), init("w_qkv", 24, 8, 1), init("b_qkv", 24),
             onnx.numpy_helper.from_array(np.array([0, 8, -1], dtype=np.int64), "shape")]
    norm = dict(num_groups=4, epsilon=1e-5, activation="silu")
    nodes = [
        oh.make_node("GroupNormAct", ["x", "gamma", "beta"], ["h1"], name="norm1", domain="admrt", **norm),
        oh.make_node("AdaGroupNormAct", ["h1", "gamma", "beta", "scale", "shift"], ["h2"], name="norm2",
                     domain="admrt", **{**norm, "activation": "none"}),
        oh.make_node("Reshape", ["h2", "shape"], ["h3"]),
        oh.make_node("Conv", ["h3", "w_qkv", "b_qkv"], ["qkv"]),
        oh.make_node("QKVAttention", ["qkv"], ["out"], name="attn", domain="admrt", num_heads=2, legacy_order=1),
    ]
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT, [batch, 8, *spatial]),
              oh.make_tensor_value_info("scale", TP.FLOAT, [batch, 8]),
              oh.make_tensor_value_info("shift", TP.FLOAT, [batch, 8])]
    outputs = [oh.make_tensor_value_info("out", TP.FLOAT, [batch, 12, length])]
    model = oh.make_model(oh.make_graph(nodes, "tiny", inputs, outputs, inits),
                          opset_imports=[oh.make_opsetid("", 23), oh.make_opsetid("admrt", 1)])
    model.metadata_props.add(key="admrt", value=json.dumps({"role": "test"}))
    return model


# -- without TensorRT ------------------------------------------------------------------------------

def test_modules_import_without_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import admrt.export.tensorrt, admrt.export.trt_plugins\n"
            "assert sys.modules['tensorrt'] is None\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_missing_tensorrt_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # import tensorrt -> ImportError
    onnx_path = _write(tiny_fused_model(), tmp_path / "m.onnx")
    calls = [trt_export.require_tensorrt,
             lambda: trt_export.build_engine(onnx_path, max_batch=4, cache_dir=tmp_path),
             lambda: trt_export.TensorRTUnit(b"engine"),
             lambda: trt_export.export_tensorrt(tmp_path, tmp_path / "out"),
             lambda: trt_export.tensorrt_denoiser(object()),
             lambda: trt_export.tensorrt_gradient(object()),
             tp.register_plugins]
    for call in calls:
        with pytest.raises(MissingPackageError) as e:
            call()
        msg = str(e.value)
        assert "`tensorrt`" in msg and "pypi.nvidia.com" in msg and "CUDA GPU" in msg, msg
    assert not (tmp_path / "out").exists()


def test_engine_cache_key_changes_with_each_input(tmp_path):
    a = _write(tiny_fused_model(), tmp_path / "a.onnx")
    base = dict(trt_version="10.13.0", gpu_name="NVIDIA H100", compute_capability=(9, 0),
                batch=trt_export.BatchProfile(1, 8, 8), plugins="")

    def key(path=a, **change):
        kw = {**base, **change}
        return trt_export.engine_cache_key(path, kw.pop("trt_version"), kw.pop("gpu_name"), **kw)

    k0 = key()
    assert k0 == key() and re.fullmatch("[0-9a-f]{64}", k0)
    variants = [key(path=_write(tiny_fused_model(spatial=(2, 8)), tmp_path / "b.onnx")),
                key(trt_version="11.0.0"), key(gpu_name="NVIDIA H200"), key(compute_capability=(8, 0)),
                key(batch=trt_export.BatchProfile(2, 8, 8)), key(batch=trt_export.BatchProfile(1, 4, 8)),
                key(batch=trt_export.BatchProfile(1, 8, 16)), key(plugins=tp.plugin_fingerprint())]
    assert len({k0, *variants}) == len(variants) + 1


def test_engine_cache_key_covers_external_data(tmp_path):
    model = tiny_fused_model()
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    kw = dict(compute_capability=(9, 0), batch=trt_export.BatchProfile(1, 1, 1))
    k0 = trt_export.engine_cache_key(path, "10", "gpu", **kw)
    data = tmp_path / "ext.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1                            # new weights, same .onnx bytes
    data.write_bytes(bytes(raw))
    assert trt_export.engine_cache_key(path, "10", "gpu", **kw) != k0


def test_batch_profile_and_profile_shapes():
    b = trt_export.BatchProfile(1, 4, 8)
    shapes = trt_export.profile_shapes({"x": (-1, 3, 8, 8), "t": (-1,), "w": (3, 3)}, b)
    assert shapes == {"x": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)), "t": ((1,), (4,), (8,))}
    with pytest.raises(ValueError, match="only the batch"):
        trt_export.profile_shapes({"x": (-1, 3, -1, 8)}, b)
    with pytest.raises(ValueError, match=r"min <= opt <= max"):
        trt_export.BatchProfile(1, 9, 8)
    with pytest.raises(ValueError, match=r"min_batch=0"):
        trt_export.BatchProfile(0, 1, 8)


def test_onnx_entry_reads_io_and_metadata(tmp_path):
    entry = trt_export.onnx_entry(_write(tiny_fused_model(), tmp_path / "m.onnx"))
    assert [i["name"] for i in entry["inputs"]] == ["x", "scale", "shift"]
    assert entry["inputs"][0] == {"name": "x", "dtype": "float32", "shape": [-1, 8, 4, 4]}
    assert entry["outputs"] == [{"name": "out", "dtype": "float32", "shape": [-1, 12, 16]}]
    assert entry["admrt"] == {"role": "test"}


# -- launch plans ------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape", [(2, 64, 8 * 8, 32), (3, 128, 16 * 16, 32), (1, 256, 7 * 7, 32), (5, 96, 1, 8)])
def test_group_norm_launches(shape):
    batch, channels, length, groups = shape
    stats = tp.group_norm_stats_launch(batch, channels, length, groups, "fp16")
    block_c, block_l, cpp, n_cb, tiles = tp.group_norm_tiles(channels, length, groups)
    cpg = channels // groups
    assert cpp % cpg == 0 and n_cb * cpp >= channels and block_c >= cpp    # whole groups per program
    assert tiles * block_l >= length and (tiles - 1) * block_l < length    # one split covers L
    assert stats.grid == (batch, n_cb, 1) and stats.block_x == 32 * tp.NUM_WARPS_GN
    assert stats.extra_args() == (channels, length, cpg, cpp, tiles)
    assert dict(stats.constexprs) == {"BLOCK_C": block_c, "BLOCK_L": block_l}
    for ada in (False, True):
        apply = tp.group_norm_apply_launch(batch, channels, length, groups, 1e-6, "none", "fp32", ada=ada)
        assert apply.grid == stats.grid and apply.extra_args() == (channels, length, groups, cpg, cpp, tiles)
        assert [n for n, _ in apply.inputs] == ["X", "PSUM", "PSQ", "W", "BIAS"] + (["SCALE", "SHIFT"] if ada else [])
        const = dict(apply.constexprs)
        assert const["INV_N"] == 1.0 / (cpg * length) and const["EPS"] == 1e-6 and const["SILU"] is False


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("heads,ch,length", [(4, 64, 64), (1, 32, 257), (8, 128, 1024)])
def test_attention_launches(dtype, heads, ch, length):
    import sympy

    batch = sympy.Symbol("B")   # stands for TensorRT's symbolic batch: the grid carries it through
    launch = tp.qkv_attention_launch(batch, 3 * heads * ch, length, heads, 1, dtype)
    const = dict(launch.constexprs)
    assert launch.grid == (-(-length // const["BLOCK_M"]), batch * heads, 1)
    assert launch.extra_args() == (length, heads, ch) and launch.block_x == 32 * launch.num_warps
    assert const["BLOCK_D"] >= ch and const["LEGACY"] is True
    assert const["QK_SCALE"] == pytest.approx(1.4426950408889634 / ch ** 0.5)
    assert const["PREC"] == (1 if dtype == "fp32" else 0)   # fp32: IEEE dots, no tf32


@needs_triton
def test_launch_parameter_order_is_tensorrts():
    """Inputs, then the int32 scalars, then the outputs, then constexprs: the wrappers' parameters."""
    launches = [tp.group_norm_stats_launch(2, 64, 64, 32, "fp32"),
                tp.group_norm_apply_launch(2, 64, 64, 32, 1e-5, "silu", "fp32", ada=False),
                tp.group_norm_apply_launch(2, 64, 64, 32, 1e-5, "silu", "fp32", ada=True),
                tp.qkv_attention_launch(2, 192, 64, 2, 0, "fp32")]
    for launch in launches:
        assert list(getattr(tp, launch.kernel).arg_names) == launch.parameters()
        sig = list(launch.signature().values())
        n_in, n_sc, n_out = len(launch.inputs), len(launch.scalars), len(launch.outputs)
        assert all(s.startswith("*") for s in sig[:n_in] + sig[n_in + n_sc:n_in + n_sc + n_out])
        assert sig[n_in:n_in + n_sc] == ["i32"] * n_sc and set(sig[n_in + n_sc + n_out:]) == {"constexpr"}


@needs_triton
def test_launch_argument_errors():
    with pytest.raises(ValueError, match="num_groups=5"):
        tp.group_norm_stats_launch(1, 64, 16, 5, "fp32")
    with pytest.raises(ValueError, match="dtype='bf16'"):
        tp.group_norm_stats_launch(1, 64, 16, 32, "bf16")
    with pytest.raises(ValueError, match="activation='gelu'"):
        tp.group_norm_apply_launch(1, 64, 16, 32, 1e-5, "gelu", "fp32", ada=False)
    with pytest.raises(ValueError, match="num_heads=5"):
        tp.qkv_attention_launch(1, 96, 16, 5, 1, "fp32")
    with pytest.raises(ValueError, match="legacy_order=2"):
        tp.qkv_attention_launch(1, 96, 16, 2, 2, "fp32")


# -- Triton -> PTX (no GPU needed) -------------------------------------------------------------------

@pytest.mark.skipif(not tp.HAS_TRITON or gn.INTERPRET, reason="needs Triton, not under TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", ["stats-fp32-sm80", "ada-apply-fp16-sm90", "attention-fp16-sm90"])
def test_triton_compiles_ptx_without_a_gpu(case):
    launch, sm = {
        "stats-fp32-sm80": lambda: (tp.group_norm_stats_launch(4, 64, 64, 32, "fp32"), 80),
        "ada-apply-fp16-sm90": lambda: (tp.group_norm_apply_launch(4, 64, 64, 32, 1e-5, "silu", "fp16", ada=True), 90),
        "attention-fp16-sm90": lambda: (tp.qkv_attention_launch(4, 384, 64, 4, 1, "fp16"), 90),
    }[case]()
    kernel = tp.compile_kernel(launch, sm)
    assert kernel.name == launch.kernel and kernel.num_warps == launch.num_warps
    assert f".entry {kernel.name}(" in kernel.ptx and re.search(rf"\.target\s+sm_{sm}", kernel.ptx)
    params = tp.ptx_entry_params(kernel.ptx, kernel.name)
    n_in, n_sc, n_out = len(launch.inputs), len(launch.scalars), len(launch.outputs)
    assert params[:n_in + n_sc + n_out] == [".u64"] * n_in + [".u32"] * n_sc + [".u64"] * n_out
    assert kernel.shared >= 0 and tp.compile_kernel(launch, sm) is kernel   # cached


INTERPRETED_CHECK = textwrap.dedent("""
    import torch
    from admrt.export import trt_plugins as tp
    from admrt.kernels import group_norm_act_reference, qkv_attention_reference

    def run(launch, ins, outs):   # as TensorRT calls it: inputs, extra int32 args, outputs
        getattr(tp, launch.kernel)[launch.grid](*ins, *launch.extra_args(), *outs, **dict(launch.constexprs),
                                                num_warps=launch.num_warps)

    torch.manual_seed(0)
    B, C, G, H, W = 2, 16, 4, 3, 5
    x = torch.randn(B, C, H, W) * 3 + 1
    gamma, beta, scale, shift = torch.randn(C), torch.randn(C), torch.randn(B, C), torch.randn(B, C)
    psum, psq = torch.empty(B, C), torch.empty(B, C)
    run(tp.group_norm_stats_launch(B, C, H * W, G, "fp32"), [x], [psum, psq])
    for ada, act in ((False, "silu"), (True, "none")):
        y, mean, rstd = torch.empty_like(x), torch.empty(B, G), torch.empty(B, G)
        run(tp.group_norm_apply_launch(B, C, H * W, G, 1e-5, act, "fp32", ada=ada),
            [x, psum, psq, gamma, beta] + ([scale, shift] if ada else []), [y, mean, rstd])
        ref = group_norm_act_reference(x, gamma, beta, num_groups=G, eps=1e-5, scale=scale if ada else None,
                                       shift=shift if ada else None, act=act)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean, x.reshape(B, G, -1).mean(-1), rtol=1e-5, atol=1e-5)
    for legacy in (0, 1):
        heads, ch, T = 2, 8, 7
        qkv = torch.randn(B, 3 * heads * ch, T)
        out, lse = torch.empty(B, heads * ch, T), torch.empty(B * heads, T)
        run(tp.qkv_attention_launch(B, 3 * heads * ch, T, heads, legacy, "fp32"), [qkv], [out, lse])
        ref = qkv_attention_reference(qkv, heads, legacy_order=bool(legacy))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    print("ok")
""")


@needs_triton
def test_plugin_kernels_match_references_interpreted():
    """The wrappers TensorRT launches (its argument order, split = 1, LINEAR strides) compute
    admrt's ops: Triton interpreter on CPU, in a subprocess (TRITON_INTERPRET=1 before import)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


# -- the ONNX rewrite ----------------------------------------------------------------------------------

def test_rewrite_into_plugin_nodes():
    model = tiny_fused_model()
    onnx.checker.check_model(model)
    out = tp.rewrite_for_tensorrt(model)
    onnx.checker.check_model(out)
    assert tp.has_fused_nodes(model) and not tp.has_fused_nodes(out)
    assert [n.op_type for n in model.graph.node] == ["GroupNormAct", "AdaGroupNormAct", "Reshape", "Conv",
                                                      "QKVAttention"]
    assert [n.op_type for n in out.graph.node] == ["GroupNormStats", "GroupNormApply", "GroupNormStats",
                                                    "AdaGroupNormApply", "Reshape", "Conv", "QKVAttentionFwd"]
    plugin = [n for n in out.graph.node if n.domain == tp.PLUGIN_DOMAIN]
    assert len(plugin) == 5 and {o.domain for o in out.opset_import} == {"", tp.PLUGIN_DOMAIN}
    for n in plugin:
        a = {x.name: oh.get_attribute_value(x) for x in n.attribute}
        assert n.op_type in tp.PLUGINS and a["plugin_namespace"] == b"admrt" and a["aot"] == 1
    stats, apply, _, ada, _, _, attn = (
        {"node": n, **{x.name: oh.get_attribute_value(x) for x in n.attribute}} for n in out.graph.node)
    assert list(stats["node"].input) == ["x"] and stats["num_groups"] == 4
    assert list(apply["node"].input) == ["x", *stats["node"].output, "gamma", "beta"]
    assert apply["node"].output[0] == "h1" and apply["activation"] == b"silu"
    assert apply["epsilon"] == pytest.approx(1e-5)
    assert list(ada["node"].input)[3:] == ["gamma", "beta", "scale", "shift"] and ada["activation"] == b"none"
    assert list(attn["node"].input) == ["qkv"] and attn["node"].output[0] == "out"
    assert attn["num_heads"] == 2 and attn["legacy_order"] == 1
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert len(set(o for n in out.graph.node for o in n.output)) == sum(len(n.output) for n in out.graph.node)
    assert model.graph.node[0].op_type == "GroupNormAct"   # the input model is untouched


def test_rewrite_errors():
    model = tiny_fused_model()
    model.graph.node[0].op_type = "LayerNormAct"
    with pytest.raises(ValueError, match="unknown admrt-domain op 'LayerNormAct'"):
        tp.rewrite_for_tensorrt(model)
    model = tiny_fused_model()
    next(a for a in model.graph.node[0].attribute if a.name == "activation").s = b"gelu"
    with pytest.raises(ValueError, match="activation='gelu'"):
        tp.rewrite_for_tensorrt(model)


def test_build_engine_refuses_fused_nodes_without_plugins(monkeypatch, tmp_path):
    path = tmp_path / "m.onnx"
    _write(tiny_fused_model(), path)
    with pytest.raises(ValueError, match="use_plugins=True"):
        trt_export._use_plugins(onnx.load(str(path)), False, path)
    assert trt_export._use_plugins(onnx.load(str(path)), None, path) is True


# -- with TensorRT and a GPU (skipped here) --------------------------------------------------------------

@needs_tensorrt
@pytest.mark.gpu
def test_plugin_engine_matches_references(tmp_path):
    from admrt.kernels import group_norm_act_reference, qkv_attention_reference

    model = tiny_fused_model()
    path = _write(model, tmp_path / "fused.onnx")
    engine = trt_export.build_engine(path, min_batch=1, opt_batch=3, max_batch=4, cache_dir=tmp_path / "cache")
    assert trt_export.build_engine(path, min_batch=1, opt_batch=3, max_batch=4, cache_dir=tmp_path / "cache") == engine
    assert (tmp_path / "cache" / trt_export.TIMING_CACHE).is_file()
    unit = trt_export.TensorRTUnit(engine, input_names=["x", "scale", "shift"])
    w = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t)).cuda() for t in model.graph.initializer}
    for batch in (1, 3):
        x, scale, shift = torch.randn(batch, 8, 4, 4).cuda(), torch.randn(batch, 8).cuda(), torch.randn(batch, 8).cuda()
        h = group_norm_act_reference(x, w["gamma"], w["beta"], num_groups=4, eps=1e-5, act="silu")
        h = group_norm_act_reference(h, w["gamma"], w["beta"], num_groups=4, eps=1e-5, scale=scale, shift=shift,
                                     act="none")
        qkv = torch.nn.functional.conv1d(h.reshape(batch, 8, -1), w["w_qkv"], w["b_qkv"])
        ref = qkv_attention_reference(qkv, 2, legacy_order=True)
        torch.testing.assert_close(unit(x, scale, shift), ref, rtol=1e-4, atol=1e-4)


@needs_tensorrt
@pytest.mark.gpu
def test_tensorrt_denoiser_matches_eager(tmp_path):
    from gd_reference import random_model

    from admrt.config import ModelConfig
    from admrt.engine import Denoiser

    cfg = ModelConfig(kind="unet", image_size=8, model_channels=32, out_channels=6, num_res_blocks=1,
                      attention_resolutions=(4,), channel_mult=(1, 2), num_classes=10, num_head_channels=16)
    unit = Denoiser(random_model(cfg), "fp32", device="cuda")
    engine = trt_export.tensorrt_denoiser(unit, max_batch=4, cache_dir=tmp_path)
    x, t, y = torch.randn(3, 3, 8, 8).cuda(), torch.rand(3).cuda() * 999, torch.randint(0, 10, (3,)).cuda()
    with torch.no_grad():
        torch.testing.assert_close(engine(x, t, y, None), unit(x, t, y), rtol=1e-3, atol=1e-3)  # as the core calls


def test_module_is_skipped_not_an_error_without_onnx(tmp_path):
    """Where onnx is not installed, collecting this file was an error (test_onnx.py skipped)."""
    code = ("import sys; sys.modules['onnx'] = None\n"
            "import pytest\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rs', {__file__!r}]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 5, res.stdout[-3000:] + res.stderr[-2000:]  # 5: no tests collected (all skipped)
    assert "1 skipped" in res.stdout and "the TensorRT path needs onnx" in res.stdout, res.stdout[-3000:]
