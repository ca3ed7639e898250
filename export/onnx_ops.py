"""admrt's fused ops as ONNX custom-domain nodes (`admrt export onnx --fused-ops`), for runtimes
that supply the kernels (TensorRT plugins: admrt.export.trt_plugins).

One schema each, domain "admrt", version 1, registered with onnx.defs (so onnx.checker and the
exporter know them). T is tensor(float) | tensor(float16) | tensor(bfloat16); statistics,
affine and softmax are fp32 whatever T is (docs/design.md's precision policy).

    GroupNormAct(X: T (B, C, *spatial), gamma: float (C,), beta: float (C,)) -> Y: T like X
        attributes num_groups: int, epsilon: float, activation: string "silu" | "none"
        Y = act(GroupNorm(X) * gamma + beta)
    AdaGroupNormAct(X, gamma, beta, scale: float (B, C), shift: float (B, C)) -> Y: T like X
        same attributes; Y = act((GroupNorm(X) * gamma + beta) * (1 + scale) + shift)
        (the paper's AdaGN, Sec. 3: y_s = 1 + scale, y_b = shift)
    QKVAttention(QKV: T (B, 3*H*C, T_len)) -> Y: T (B, H*C, T_len)
        attributes num_heads: int, legacy_order: int (1: per head [q|k|v], guided-diffusion's
        QKVAttentionLegacy; 0: [q of all heads | k | v], its QKVAttention)
        Y = softmax(q^T k / sqrt(C)) v per head

The torch graph carries them as `torch.ops.admrt.group_norm_act` / `qkv_attention` (the models'
fused="opaque" form, admrt.kernels); `translations()` turns those into these nodes.

`reference_session` runs such a graph in onnxruntime with onnxruntime-extensions' Python custom
ops calling admrt's torch references (fp32): the check of the custom-node graphs, here and in CI.
Extensions' Python ops live in its own domain (ai.onnx.contrib), so the session loads a copy of
the graph with the nodes moved there.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Optional

import onnx
import torch
from onnx.defs import OpSchema

from . import MissingPackageError

DOMAIN = "admrt"
VERSION = 1
EXTENSIONS_DOMAIN = "ai.onnx.contrib"
NODE_TYPES = ("GroupNormAct", "AdaGroupNormAct", "QKVAttention")

_T = ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "the activations' type")
_F = ("F", ["tensor(float)"], "fp32 parameters")


def _param(name: str, type_str: str, doc: str) -> OpSchema.FormalParameter:
    return OpSchema.FormalParameter(name, type_str, doc)


def _norm_schema(name: str, ada: bool) -> OpSchema:
    inputs = [_param("X", "T", "(B, C, *spatial)"), _param("gamma", "F", "(C,)"), _param("beta", "F", "(C,)")]
    if ada:
        inputs += [_param("scale", "F", "(B, C): y_s - 1"), _param("shift", "F", "(B, C): y_b")]
    formula = "act((GroupNorm(X) * gamma + beta) * (1 + scale) + shift)" if ada else "act(GroupNorm(X) * gamma + beta)"
    return OpSchema(
        name, DOMAIN, VERSION, doc=f"Y = {formula}; statistics and affine in fp32, Y in X's type.",
        inputs=inputs, outputs=[_param("Y", "T", "like X")], type_constraints=[_T, _F],
        attributes=[OpSchema.Attribute("num_groups", OpSchema.AttrType.INT, "groups of C"),
                    OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "variance epsilon"),
                    OpSchema.Attribute("activation", OpSchema.AttrType.STRING, "'silu' or 'none'")])


def _attention_schema() -> OpSchema:
    return OpSchema(
        "QKVAttention", DOMAIN, VERSION,
        doc="ADM multi-head attention over the qkv convolution's output; softmax in fp32, logits / sqrt(C).",
        inputs=[_param("QKV", "T", "(B, 3*H*C, T)")], outputs=[_param("Y", "T", "(B, H*C, T)")],
        type_constraints=[_T],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "H"),
                    OpSchema.Attribute("legacy_order", OpSchema.AttrType.INT,
                                       "1: per head [q|k|v] (QKVAttentionLegacy); 0: [q|k|v] over all heads")])


def register_schemas() -> None:
    """Register the three schemas with onnx.defs (once per process)."""
    for schema in (_norm_schema("GroupNormAct", False), _norm_schema("AdaGroupNormAct", True), _attention_schema()):
        if not onnx.defs.has(schema.name, schema.since_version, schema.domain):
            onnx.defs.register_schema(schema)


register_schemas()


@functools.lru_cache(maxsize=None)
def translations() -> dict:
    """torch.onnx.export's custom_translation_table: the opaque torch ops -> the nodes above."""
    from onnxscript.values import Opset

    admrt = Opset(DOMAIN, VERSION)

    def group_norm_act(x, weight, bias, scale=None, shift=None, num_groups: int = 32, eps: float = 1e-5,
                       act: str = "silu"):
        attrs = dict(num_groups=num_groups, epsilon=eps, activation=act)
        if scale is None:
            return admrt.GroupNormAct(x, weight, bias, **attrs)
        return admrt.AdaGroupNormAct(x, weight, bias, scale, shift, **attrs)

    def qkv_attention(qkv, num_heads: int, legacy_order: bool):
        return admrt.QKVAttention(qkv, num_heads=num_heads, legacy_order=int(legacy_order))

    return {torch.ops.admrt.group_norm_act.default: group_norm_act,
            torch.ops.admrt.qkv_attention.default: qkv_attention}


def custom_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each admrt type the graph has."""
    counts = {name: 0 for name in NODE_TYPES}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            counts[node.op_type] += 1
    return counts


# -- the reference runtime: onnxruntime-extensions' Python ops over admrt's torch references ----

@functools.lru_cache(maxsize=None)
def _register_reference_ops() -> None:
    """Python custom ops (fp32) for the three node types, in onnxruntime-extensions' domain (once)."""
    from onnxruntime_extensions import PyCustomOpDef as dt
    from onnxruntime_extensions import onnx_op

    from admrt.kernels import group_norm_act_reference, qkv_attention_reference

    norm_attrs = {"num_groups": dt.dt_int64, "epsilon": dt.dt_float, "activation": dt.dt_string}

    def norm(x, gamma, beta, scale=None, shift=None, *, num_groups, epsilon, activation):
        t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        y = group_norm_act_reference(t(x), t(gamma), t(beta), num_groups=int(num_groups), eps=float(epsilon),
                                     scale=t(scale), shift=t(shift), act=activation)
        return y.numpy()

    onnx_op(op_type="GroupNormAct", inputs=[dt.dt_float] * 3, outputs=[dt.dt_float], attrs=norm_attrs)(
        lambda x, gamma, beta, **a: norm(x, gamma, beta, **a))
    onnx_op(op_type="AdaGroupNormAct", inputs=[dt.dt_float] * 5, outputs=[dt.dt_float], attrs=norm_attrs)(
        lambda x, gamma, beta, scale, shift, **a: norm(x, gamma, beta, scale, shift, **a))
    onnx_op(op_type="QKVAttention", inputs=[dt.dt_float], outputs=[dt.dt_float],
            attrs={"num_heads": dt.dt_int64, "legacy_order": dt.dt_int64})(
        lambda qkv, num_heads, legacy_order: qkv_attention_reference(
            torch.from_numpy(qkv), int(num_heads), legacy_order=bool(legacy_order)).numpy())


def reference_session(path: str | os.PathLike, providers: Optional[list] = None, options=None):
    """An onnxruntime InferenceSession of an admrt custom-node graph whose nodes run admrt's
    torch references (fp32 graphs), through onnxruntime-extensions."""
    import onnxruntime as ort

    require_extensions()
    from onnxruntime_extensions import get_library_path

    _register_reference_ops()
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)   # weights beyond 2 GB stay in their files
    for node in model.graph.node:
        if node.domain == DOMAIN:
            node.domain = EXTENSIONS_DOMAIN
    imports = [o for o in model.opset_import if o.domain not in (DOMAIN, EXTENSIONS_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend(imports + [onnx.helper.make_opsetid(EXTENSIONS_DOMAIN, 1)])
    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    # beside the original, so that external-data locations (relative to the model) resolve
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".contrib.onnx") as copy:
        copy.write(model.SerializeToString())
        copy.flush()
        return ort.InferenceSession(copy.name, options, providers=providers or ["CPUExecutionProvider"])


def require_extensions() -> None:
    """MissingPackageError unless onnxruntime-extensions (which runs the reference ops) is installed."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime_extensions") is None:
        raise MissingPackageError("running a --fused-ops graph in onnxruntime (its check) needs "
                                  "onnxruntime-extensions, not installed here: pip install onnxruntime-extensions (or pass --no-check)")
