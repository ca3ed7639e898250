"""ONNX export and the onnxruntime backend: every exported file passes onnx.checker and, run in
onnxruntime from one file at batch 1 and 5, matches eager (fp32: <= 1e-5 relative to max(1, |eager|))
for the denoiser, the upsampler, the classifier and its gradient, on the bundled and tiny presets;
`admrt sample --backend onnxruntime` gives eager's images; the custom-domain (--fused-ops) form runs
through onnxruntime-extensions; bad arguments are one clear line each.

The bundled stack is exported once per session through the CLI (about a minute on 2 cores)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx, onnxscript and onnxruntime (pip install "
                                          "'admrt[export]')")
ort = pytest.importorskip("onnxruntime")

import admrt  # noqa: E402
from admrt.engine import ClassifierGradient, Denoiser  # noqa: E402
from admrt.export.onnx import (FILES, ClassifierLogits, ExportCheckError, OnnxRuntimeUnit, check_file,  # noqa: E402
                               export_onnx, export_unit_onnx, gradient_decompositions, session)
from admrt.export.onnx_ops import custom_nodes  # noqa: E402
from admrt.export.stack import example_inputs, relative_error  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gd_reference import oracle_twin, random_model  # noqa: E402

FP32_TOLERANCE = 1e-5


def check_against_eager(path: Path, unit, *, fused_ops=False, low_res=None, tolerance=FP32_TOLERANCE):
    """Run the file in onnxruntime at batch 1 and 5 (one session) against the eager unit."""
    onnx.checker.check_model(str(path), full_check=not fused_ops)
    runner = OnnxRuntimeUnit(session(path, fused_ops=fused_ops), _shape_of(unit))
    n_inputs = len(runner.inputs)
    for batch in (1, 5):
        args = example_inputs(unit.info, batch, "cpu", low_res, seed=10 + batch)[:n_inputs]
        got, want = runner(*args), unit(*args)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert relative_error(got, want) <= tolerance, (path.name, batch, relative_error(got, want))


def _shape_of(unit):
    from admrt.export.onnx import _output_shape
    return _output_shape(unit)


def node_types(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled stack exported by `admrt export onnx` (its defaults), and the loaded models."""
    from admrt.cli import main

    out = tmp_path_factory.mktemp("onnx") / "bundled"
    assert main(["export", "onnx", "--out", str(out)]) == 0
    models = {"model": admrt.load_model("fashion16-cond"), "classifier": admrt.load_model("fashion16-classifier"),
              "upsampler": admrt.load_model("fashion-upsample16-32")}
    return out, models


def test_bundled_export_files_metadata_and_runtime(bundled):
    out, models = bundled
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES.values())
    denoiser = Denoiser(models["model"])
    grad = ClassifierGradient(models["classifier"])
    units = {"model": (denoiser, None), "classifier": (ClassifierLogits(grad), None),
             "classifier_grad": (grad, None), "upsampler": (Denoiser(models["upsampler"]), 16)}
    for name, (unit, low) in units.items():
        path = out / FILES[name]
        check_against_eager(path, unit, low_res=low)
        model = onnx.load(str(path), load_external_data=False)
        assert min(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 23
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value  # one file, any batch
        meta = json.loads({p.key: p.value for p in model.metadata_props}["admrt"])
        assert meta["role"] == name and meta["dtype"] == "fp32" and meta["opset"] == 23
        assert meta["model"]["preset"]["name"] == models["classifier" if "classifier" in name else name].preset.name
    meta = json.loads({p.key: p.value for p in onnx.load(str(out / FILES["model"]),
                                                        load_external_data=False).metadata_props}["admrt"])
    schedule = meta["model"]["schedules"]["ddim25"]
    assert schedule["method"] == "ddim" and len(schedule["tables"]["timestep_map"]) == 25
    assert meta["model"]["diffusion"]["noise_schedule"] == models["model"].preset.diffusion.noise_schedule
    # the input gradient of every convolution is a plain Conv: no ConvTranspose (which OpenVINO's CPU
    # plugin computes wrongly in fp32 when it shares a square weight with a forward Conv)
    assert node_types(out / FILES["classifier_grad"]).get("ConvTranspose", 0) == 0
    # fp32 graphs at opset 23: attention as ONNX Attention, group norm as GroupNormalization
    for name in ("model", "classifier", "upsampler"):
        types = node_types(out / FILES[name])
        assert types.get("Attention", 0) > 0 and types.get("GroupNormalization", 0) > 0, (name, types)


def test_openvino_runs_the_exported_files_as_eager(bundled):
    """OpenVINO (CPU, fp32) on admrt's ONNX files: the denoiser and the classifier gradient (whose
    ConvTranspose form OpenVINO 2026.4 got wrong, relative error about 1, with no error raised)."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install openvino)")
    out, models = bundled
    grad = ClassifierGradient(models["classifier"])
    torch.manual_seed(0)
    for name, unit in (("model", Denoiser(models["model"])), ("classifier_grad", grad)):
        compiled = ov.Core().compile_model(str(out / FILES[name]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for batch in (1, 5):
            x = torch.randn(batch, 1, 16, 16)
            t = torch.randint(0, 1000, (batch,))
            y = torch.randint(0, 10, (batch,))
            got = torch.from_numpy(compiled([x.numpy(), t.numpy(), y.numpy()])[compiled.output(0)])
            want = unit(x, t, y)
            assert (got - want).abs().max() / want.abs().max() < 1e-4, (name, batch)


@pytest.mark.parametrize("steps", ["ddim8", "dpmpp2m-sde6"])
def test_sample_backend_onnxruntime_gives_eager_images(bundled, tmp_path, steps):
    from admrt.cli import main

    common = ["sample", "--model", "fashion16-cond", "--classifier", "fashion16-classifier", "--upsampler", "none",
              "--num", "6", "--batch-size", "4", "--steps", steps, "--guidance", "2", "--no-progress"]
    assert main([*common, "--backend", "eager", "--out", str(tmp_path / "eager")]) == 0
    assert main([*common, "--backend", "onnxruntime", "--out", str(tmp_path / "ort")]) == 0
    eager = np.load(next((tmp_path / "eager").glob("*.npz")))
    ort_run = np.load(next((tmp_path / "ort").glob("*.npz")))
    assert np.array_equal(eager["arr_1"], ort_run["arr_1"])
    assert np.abs(eager["arr_0"].astype(int) - ort_run["arr_0"]).max() <= 1
    record = json.loads((tmp_path / "ort" / "run.json").read_text())
    assert record["backend"] == "onnxruntime"
    if steps == "ddim8" and importlib.util.find_spec("openvino") is not None:
        # the openvino backend: the same cached ONNX files (no second export), OpenVINO in fp32
        assert main([*common, "--backend", "openvino", "--out", str(tmp_path / "ov")]) == 0
        ov_run = np.load(next((tmp_path / "ov").glob("*.npz")))
        assert np.abs(eager["arr_0"].astype(int) - ov_run["arr_0"]).max() <= 1
        assert json.loads((tmp_path / "ov" / "run.json").read_text())["backend"] == "openvino"


@pytest.fixture(scope="module")
def tiny():
    return {"model": random_model("tiny-cond"), "classifier": random_model("tiny-classifier"),
            "upsampler": random_model("tiny-upsample")}


def test_tiny_stack_export_and_upsampler_unit(tiny, tmp_path):
    report = export_onnx(tiny["model"], tiny["classifier"], out=tmp_path / "t", steps="ddim4 10 unipc3m6", opset=22,
                         log=lambda m: None)
    assert set(report.errors) == {"model", "classifier", "classifier_grad"}
    assert all(e is not None and e <= FP32_TOLERANCE for e in report.errors.values())
    grad = ClassifierGradient(tiny["classifier"])
    check_against_eager(tmp_path / "t" / FILES["model"], Denoiser(tiny["model"]))
    check_against_eager(tmp_path / "t" / FILES["classifier_grad"], grad)
    check_against_eager(tmp_path / "t" / FILES["classifier"], ClassifierLogits(grad))
    # opset 22 has no Attention node: the plain path, with its fp32 softmax
    types = node_types(tmp_path / "t" / FILES["model"])
    assert "Attention" not in types and types.get("Softmax", 0) > 0 and types.get("GroupNormalization", 0) > 0
    up = Denoiser(tiny["upsampler"])
    export_unit_onnx(up, tmp_path / "up.onnx")
    check_against_eager(tmp_path / "up.onnx", up, low_res=8)


def test_fp16_graph_is_typed_with_fp32_norms(tiny, tmp_path):
    unit = Denoiser(tiny["model"], "fp16")
    export_unit_onnx(unit, tmp_path / "d16.onnx")
    model = onnx.load(str(tmp_path / "d16.onnx"))
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    inits = {i.name: i.data_type for i in model.graph.initializer}
    conv_weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    assert FLOAT16 in conv_weights                                  # the body's convolutions in fp16
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update(inits)
    for node in model.graph.node:
        if node.op_type == "GroupNormalization":                    # statistics in fp32
            assert types[node.input[0]] == FLOAT, node.name
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [FLOAT]
    check_against_eager(tmp_path / "d16.onnx", unit, tolerance=2e-2)


def test_fused_ops_form_runs_through_onnxruntime_extensions(tiny, tmp_path):
    pytest.importorskip("onnxruntime_extensions", reason="runs the custom nodes' reference ops")
    report = export_onnx(tiny["model"], tiny["classifier"], out=tmp_path / "f", fused_ops=True, log=lambda m: None)
    assert all(e is not None and e <= FP32_TOLERANCE for e in report.errors.values()), report.errors
    counts = custom_nodes(onnx.load(str(tmp_path / "f" / FILES["model"])))
    # one node per fused call: a plain and an AdaGN norm per ResBlock, a norm and the attention per
    # AttentionBlock, and the output head's norm
    blocks = [type(m).__name__ for m in tiny["model"].modules()]
    res, attn = blocks.count("ResBlock"), blocks.count("AttentionBlock")
    assert counts == {"GroupNormAct": res + attn + 1, "AdaGroupNormAct": res, "QKVAttention": attn}, counts
    assert "GroupNormalization" not in node_types(tmp_path / "f" / FILES["model"])
    grad_counts = custom_nodes(onnx.load(str(tmp_path / "f" / FILES["classifier_grad"])))
    assert grad_counts["QKVAttention"] > 0     # the gradient graph's forward keeps the nodes
    check_against_eager(tmp_path / "f" / FILES["model"], Denoiser(tiny["model"]), fused_ops=True)
    check_against_eager(tmp_path / "f" / FILES["classifier_grad"], ClassifierGradient(tiny["classifier"]),
                        fused_ops=True)


def test_convolution_backward_decomposition_matches_autograd():
    """The gradient graph's input gradient of strided and padded convolutions (odd sizes need
    output padding), silu and 2x2 pooling, against autograd."""
    aten = torch.ops.aten
    table = gradient_decompositions()
    torch.manual_seed(0)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
    # (spatial dims, size, stride, kernel, padding, dilation, groups)
    for dims, size, stride, kernel, padding, dilation, groups in (
            (2, 9, 2, 3, 1, 1, 1), (2, 8, 2, 3, 1, 1, 1), (2, 7, 1, 1, 0, 1, 1), (2, 6, 1, 3, 1, 1, 1),
            (1, 11, 1, 1, 0, 1, 1), (1, 10, 2, 3, 1, 1, 2), (2, 9, 1, 3, 2, 2, 2), (3, 5, 2, 3, 1, 1, 1),
            (2, 9, 2, 3, 3, 1, 1), (1, 17, 2, 3, 0, 2, 2), (2, 13, 3, 5, 4, 1, 1)):
        x = torch.randn(2, 4, *[size] * dims, dtype=torch.float64, requires_grad=True)
        w = torch.randn(6, 4 // groups, *[kernel] * dims, dtype=torch.float64)
        y = conv[dims](x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
        g = torch.randn_like(y)
        (want,) = torch.autograd.grad(y, x, g)
        got, _, _ = table[aten.convolution_backward.default](
            g, x, w, None, [stride] * dims, [padding] * dims, [dilation] * dims, False, [0] * dims, groups,
            [True, False, False])
        assert got.shape == want.shape and torch.allclose(got, want), (dims, size, stride, dilation, groups)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    (want,) = torch.autograd.grad(torch.nn.functional.silu(x), x, g)
    assert torch.allclose(table[aten.silu_backward.default](g, x), want)
    for size in (8, 7):   # an odd side's last row and column get no gradient
        x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
        pooled = torch.nn.functional.avg_pool2d(x, 2)
        gp = torch.randn_like(pooled)
        (want,) = torch.autograd.grad(pooled, x, gp)
        got = table[aten.avg_pool2d_backward.default](gp, x, [2, 2], [2, 2], [0, 0], False, True, None)
        assert got.shape == want.shape and torch.allclose(got, want), size


def test_bad_arguments_are_one_clear_line(cli_error, tmp_path):
    out = tmp_path / "o"
    assert "--model='no-such-model': not a file, a bundled model or a preset name" in cli_error(
        ["export", "onnx", "--model", "no-such-model", "--out", out])
    assert "--opset=17: expected one of 21, 22, 23" in cli_error(["export", "onnx", "--opset", "17", "--out", out])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot create it in" in cli_error(["export", "onnx", "--out", blocker / "sub" / "o"])
    out.mkdir()
    assert "exists; choose another folder or pass --force" in cli_error(["export", "onnx", "--out", out])
    assert not (tmp_path / "file" / "sub").exists() and list(out.iterdir()) == []
    # TensorRT is not installable here: one line naming it, and nothing written
    if importlib.util.find_spec("tensorrt") is None:
        for argv in (["sample", "--backend", "tensorrt", "--num", "1", "--out", tmp_path / "s"],
                     ["export", "tensorrt", "--out", tmp_path / "e"]):
            assert "needs the Python package `tensorrt`" in cli_error(argv)
            assert not (tmp_path / argv[-1]).exists()
    with pytest.raises(ValueError, match="dtype='bf16': expected one of"):
        export_unit_onnx(Denoiser(random_model("tiny-cond"), "bf16"), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_check_catches_a_wrong_graph(tiny, tmp_path):
    """The export check compares with eager relative to the largest output: a file whose weights are off
    by 0.1% is refused, and so is a classifier gradient's (its values are all well below 1)."""
    unit = Denoiser(tiny["model"])
    export_unit_onnx(unit, tmp_path / "d.onnx")
    assert check_file(tmp_path / "d.onnx", unit, torch.device("cpu"))[0] <= FP32_TOLERANCE
    with pytest.raises(ExportCheckError, match="onnxruntime differs from eager by"):
        check_file(tmp_path / "d.onnx", _perturbed(unit), torch.device("cpu"))
    grad = ClassifierGradient(tiny["classifier"])
    export_unit_onnx(grad, tmp_path / "g.onnx")
    with pytest.raises(ExportCheckError):
        check_file(tmp_path / "g.onnx", _perturbed(grad, 1e-2), torch.device("cpu"))


def _perturbed(unit, scale=1e-3):
    """The unit with every weight moved by a relative `scale`: what a wrong graph looks like."""
    import copy
    wrong = copy.deepcopy(unit)
    with torch.no_grad():
        for p in wrong.net.parameters():
            p.mul_(1 + scale)
    return wrong


def test_backend_onnxruntime_runs_guided_diffusion_modules(tiny):
    """guided-diffusion's own modules (with the preset's diffusion) through the onnxruntime backend give
    what the eager backend gives with them."""
    model, clf = oracle_twin(tiny["model"]), oracle_twin(tiny["classifier"])
    kw = dict(classes=[1, 2, 3], steps="ddim4", guidance=1.0, seeds=[1, 2, 3], keep_float=True)
    diffusion = tiny["model"].preset.diffusion
    got = admrt.Engine(model, classifier=clf, backend="onnxruntime", diffusion=diffusion).sample(**kw)
    want = admrt.Engine(model, classifier=clf, diffusion=diffusion, backend="eager").sample(**kw)
    assert np.abs(got.samples - want.samples).max() <= 1e-4
