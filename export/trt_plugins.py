"""TensorRT plugins for admrt's fused ONNX nodes (`admrt export onnx --fused-ops`, schemas in
admrt.export.onnx_ops): ahead-of-time (AOT) Python plugins of TensorRT's `tensorrt.plugin` module
(quickly deployable plugins: `trtp.register` + `trtp.aot_impl`), whose kernels are PTX compiled
with `triton.compile` from admrt's own Triton kernels (admrt.kernels), so the engine holds the
kernels and runs without Python.

Followed: the `tensorrt.plugin.aot_impl` reference (docs.nvidia.com/deeplearning/tensorrt/latest/
_static/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/index.html), the Python plugin guide
(.../_static/python-api/pluginGuide.html) and NVIDIA/TensorRT samples/python/
quickly_deployable_plugins (README and qdp_defs.py). What they fix:
- an AOT implementation returns ONE kernel: (name, PTX, KernelLaunchParams(grid, block_x = 32 *
  num_warps, shared_mem), extra args); TensorRT calls it with the input pointers, then the extra
  args (SymInt32 only: int32 scalars), then the output pointers; no float scalars;
- the ONNX parser imports a node it has no importer for as the plugin named by the node's
  op_type, in the namespace of its string attribute `plugin_namespace` (attribute
  `plugin_version`, default "1"); it passes the plugin only the attributes the plugin declares;
  an int attribute `aot` = 1 asks for the AOT implementation (the sample's README). The parser
  dispatches on op_type alone (onnx-tensorrt ModelImporter.cpp, FallbackPluginImporter), not the
  domain; ours is PLUGIN_DOMAIN so that onnx.checker accepts the graph.

One launch per plugin, so the graph is rewritten. admrt's group norm forward is two launches
with a torch sum over L splits between them (kernels/group_norm.py). With split = 1 the stats
kernel writes one partial sum per channel and the apply kernel reads it directly, so each fused
node becomes single-launch plugin nodes (`rewrite_for_tensorrt`, on an onnx.ModelProto):

    GroupNormAct(X, gamma, beta)     -> GroupNormStats(X) -> psum, psq       (B, C) fp32
                                        GroupNormApply(X, psum, psq, gamma, beta) -> Y, mean, rstd
    AdaGroupNormAct(..., scale, shift) -> GroupNormStats + AdaGroupNormApply(..., scale, shift)
    QKVAttention(QKV)                -> QKVAttentionFwd(QKV) -> Y, lse       (B*H, T) fp32

mean, rstd and lse are written by the kernels (they exist for the backward) and left unused.
The price of split = 1: the stats pass runs B x channel-blocks programs, fewer in flight at a
small batch than the torch launcher's split plan.

Calling convention. admrt's kernels take pointers, ints and floats in their own order, so each
plugin compiles a thin @triton.jit wrapper that takes TensorRT's order and calls admrt's kernel
(inlined by Triton): the maths exists once. Every int the kernel takes at run time is an extra
SymInt32 arg; floats (epsilon, 1/n, the softmax scale) and tl.constexprs are compile-time
constants; strides are those of TensorRT's LINEAR (contiguous) format; only the batch may be
dynamic (it sets the grid). Triton (3.7 here) appends two pointer parameters to every kernel
(global and profile scratch) that the plugin API does not pass; NVIDIA's sample, which pins
Triton 3.5, hands Triton's PTX over unchanged all the same. `compile_kernel` checks that the
kernel needs no scratch memory (so those pointers are never read) and that the PTX parameters
start in TensorRT's order. No divisibility hints are given (Triton's JIT would add them), so loads are
not vectorised: correct, not yet tuned.

The launch plans and the rewrite are plain Python (tested without TensorRT); `register_plugins`
needs TensorRT >= 10.9 (AOT Python plugins) and a CUDA GPU. No `from __future__ import annotations`:
tensorrt.plugin reads the decorated functions' annotations as classes.
"""
import functools
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Tuple, Union

import onnx
import torch

from admrt.kernels import attention as _attn
from admrt.kernels import group_norm as _gn

try:  # Triton is optional: without it only the plain-Python parts work.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

NAMESPACE = "admrt"             # plugin namespace: plugin ids are "admrt::<name>"
SOURCE_DOMAIN = "admrt"         # the fused nodes' ONNX domain (admrt.export.onnx_ops.DOMAIN)
PLUGIN_DOMAIN = "admrt.trt"     # the plugin nodes' ONNX domain
PLUGINS = ("GroupNormStats", "GroupNormApply", "AdaGroupNormApply", "QKVAttentionFwd")
DTYPES = ("fp32", "fp16")       # Triton's names of the activation types the plugins take
ACTIVATIONS = ("silu", "none")
NUM_WARPS_GN = 4                # as the torch launcher (kernels/group_norm.py)


# -- the kernels, in TensorRT's argument order: inputs, int32 scalars, outputs, constexprs ------

if HAS_TRITON:

    @triton.jit
    def admrt_gn_stats(X, C, L, CPG, CPP, TILES, PSUM, PSQ,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        # X (B, C, L) contiguous: strides (C*L, L, 1); one split, so PSUM, PSQ are (B, C)
        _gn._gn_stats_kernel(X, PSUM, PSQ, C, L, C * L, L, 1, CPG, CPP, TILES, 1, BLOCK_C, BLOCK_L)

    @triton.jit
    def admrt_gn_apply(X, PSUM, PSQ, W, BIAS, C, L, G, CPG, CPP, TILES, Y, MEAN, RSTD,
                       INV_N: tl.constexpr, EPS: tl.constexpr, SILU: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        _gn._gn_fwd_kernel(X, Y, PSUM, PSQ, W, BIAS, W, BIAS, MEAN, RSTD, C, L, G,
                           C * L, L, 1, C * L, L, 1, CPG, CPP, TILES, 1, INV_N, EPS,
                           False, SILU, BLOCK_C, BLOCK_L, 2)

    @triton.jit
    def admrt_gn_apply_ada(X, PSUM, PSQ, W, BIAS, SCALE, SHIFT, C, L, G, CPG, CPP, TILES, Y, MEAN, RSTD,
                           INV_N: tl.constexpr, EPS: tl.constexpr, SILU: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        _gn._gn_fwd_kernel(X, Y, PSUM, PSQ, W, BIAS, SCALE, SHIFT, MEAN, RSTD, C, L, G,
                           C * L, L, 1, C * L, L, 1, CPG, CPP, TILES, 1, INV_N, EPS,
                           True, SILU, BLOCK_C, BLOCK_L, 2)

    @triton.jit
    def admrt_qkv_attention(QKV, T, H, CH, O, LSE,
                            QK_SCALE: tl.constexpr, LEGACY: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        _attn._attn_fwd_kernel(QKV, O, LSE, T, H, CH, QK_SCALE, LEGACY, PREC, BLOCK_M, BLOCK_N, BLOCK_D)


# -- launch plans: plain functions of shapes and dtypes -----------------------------------------

@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch as TensorRT's AOT plugin API makes it.

    inputs / outputs: (parameter, Triton pointer type), in the plugin's tensor order; scalars:
    (parameter, int value), TensorRT's extra args in order; constexprs: compile-time constants;
    grid: (x, y, z), ints or the batch's symbolic expression (tensorrt.plugin.ShapeExpr).
    """

    kernel: str
    inputs: tuple
    scalars: tuple
    outputs: tuple
    constexprs: tuple
    num_warps: int
    num_stages: int = 3
    grid: tuple = field(default=(1, 1, 1), compare=False, hash=False)

    @property
    def block_x(self) -> int:
        return 32 * self.num_warps

    def parameters(self) -> list[str]:
        """The kernel's parameters in TensorRT's order: inputs, scalars, outputs, constexprs."""
        return [name for group in (self.inputs, self.scalars, self.outputs, self.constexprs) for name, _ in group]

    def signature(self) -> dict[str, str]:
        """triton.compiler.ASTSource's signature: parameter -> type, in parameter order."""
        sig = dict(self.inputs)
        sig.update({name: "i32" for name, _ in self.scalars})
        sig.update(dict(self.outputs))
        sig.update({name: "constexpr" for name, _ in self.constexprs})
        return sig

    def extra_args(self) -> tuple[int, ...]:
        """The int32 scalars TensorRT passes between the input and the output pointers."""
        return tuple(value for _, value in self.scalars)


def _check_dtype(dtype: str, what: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{what}: dtype={dtype!r}: expected one of {DTYPES}")


def _check_int32(value: int, what: str) -> None:
    if not 0 <= value < 2 ** 31:
        raise ValueError(f"{what}={value}: the kernels index with int32; expected < 2**31")


def group_norm_tiles(channels: int, length: int, num_groups: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_C, BLOCK_L, channels per program, channel blocks, L tiles) for (B, C, L) contiguous:
    admrt's two-pass tiles (kernels/group_norm.py `_two_pass_tiles`, NCHW) with one split, one
    program per (sample, channel block) walking all of L."""
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups={num_groups}: expected a divisor of the channel count {channels}")
    _check_int32(channels * length, "C * L")
    block_c, block_l, cpp, n_cb = _gn._two_pass_tiles(channels, length, num_groups, False)
    return block_c, block_l, cpp, n_cb, triton.cdiv(length, block_l)


def group_norm_stats_launch(batch, channels: int, length: int, num_groups: int, dtype: str) -> KernelLaunch:
    """GroupNormStats: X (B, C, L) -> per-channel sums PSUM, PSQ (B, C) fp32 of (x - K), (x - K)^2
    (K = the group's first element)."""
    _check_dtype(dtype, "GroupNormStats")
    block_c, block_l, cpp, n_cb, tiles = group_norm_tiles(channels, length, num_groups)
    return KernelLaunch(
        "admrt_gn_stats", inputs=(("X", f"*{dtype}"),),
        scalars=(("C", channels), ("L", length), ("CPG", channels // num_groups), ("CPP", cpp), ("TILES", tiles)),
        outputs=(("PSUM", "*fp32"), ("PSQ", "*fp32")),
        constexprs=(("BLOCK_C", block_c), ("BLOCK_L", block_l)),
        num_warps=NUM_WARPS_GN, grid=(batch, n_cb, 1))


def group_norm_apply_launch(batch, channels: int, length: int, num_groups: int, eps: float, activation: str,
                            dtype: str, *, ada: bool) -> KernelLaunch:
    """(Ada)GroupNormApply: X, PSUM, PSQ, gamma, beta[, scale, shift] -> Y like X, mean, rstd (B, G)."""
    _check_dtype(dtype, "GroupNormApply")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    block_c, block_l, cpp, n_cb, tiles = group_norm_tiles(channels, length, num_groups)
    cpg = channels // num_groups
    inputs = (("X", f"*{dtype}"), ("PSUM", "*fp32"), ("PSQ", "*fp32"), ("W", "*fp32"), ("BIAS", "*fp32"))
    if ada:
        inputs += (("SCALE", "*fp32"), ("SHIFT", "*fp32"))
    return KernelLaunch(
        "admrt_gn_apply_ada" if ada else "admrt_gn_apply", inputs=inputs,
        scalars=(("C", channels), ("L", length), ("G", num_groups), ("CPG", cpg), ("CPP", cpp), ("TILES", tiles)),
        outputs=(("Y", f"*{dtype}"), ("MEAN", "*fp32"), ("RSTD", "*fp32")),
        constexprs=(("INV_N", 1.0 / (cpg * length)), ("EPS", float(eps)), ("SILU", activation == "silu"),
                    ("BLOCK_C", block_c), ("BLOCK_L", block_l)),
        num_warps=NUM_WARPS_GN, grid=(batch, n_cb, 1))


def qkv_attention_launch(batch, width: int, length: int, num_heads: int, legacy_order: int,
                         dtype: str) -> KernelLaunch:
    """QKVAttentionFwd: QKV (B, 3*H*C, T) -> O (B, H*C, T), LSE (B*H, T) fp32; admrt's forward
    blocks (kernels/attention.py `_attn_blocks`)."""
    _check_dtype(dtype, "QKVAttentionFwd")
    if num_heads < 1 or width % (3 * num_heads):
        raise ValueError(f"qkv width={width}, num_heads={num_heads}: expected width a multiple of 3*num_heads")
    if legacy_order not in (0, 1):
        raise ValueError(f"legacy_order={legacy_order!r}: expected 0 or 1")
    _check_int32(width * length, "3*H*C * T")
    ch = width // (3 * num_heads)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    bm, bn, warps, stages = _attn._attn_blocks(ch, length, torch_dtype, "fwd")
    return KernelLaunch(
        "admrt_qkv_attention", inputs=(("QKV", f"*{dtype}"),),
        scalars=(("T", length), ("H", num_heads), ("CH", ch)),
        outputs=(("O", f"*{dtype}"), ("LSE", "*fp32")),
        constexprs=(("QK_SCALE", _attn._LOG2E / math.sqrt(ch)), ("LEGACY", bool(legacy_order)),
                    ("PREC", _attn._prec(torch_dtype)), ("BLOCK_M", bm), ("BLOCK_N", bn),
                    ("BLOCK_D", max(16, triton.next_power_of_2(ch)))),
        num_warps=warps, num_stages=stages, grid=(triton.cdiv(length, bm), batch * num_heads, 1))


# -- Triton -> PTX ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PtxKernel:
    name: str
    ptx: str
    num_warps: int
    shared: int    # bytes of shared memory per block (KernelLaunchParams.shared_mem)


def ptx_entry_params(ptx: str, name: str) -> list[str]:
    """The PTX types (.u64, .u32, ...) of kernel `name`'s parameters, in order."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ValueError(f"PTX: no `.entry {name}(`")
    return re.findall(r"\.param\s+(\.\w+)", m.group(1))


@functools.lru_cache(maxsize=None)
def compile_kernel(launch: KernelLaunch, sm: int) -> PtxKernel:
    """PTX of `launch`'s kernel for compute capability `sm` (e.g. 90), with triton.compile for
    GPUTarget("cuda", sm, 32). Needs no GPU."""
    if not HAS_TRITON:
        raise RuntimeError("compile_kernel: triton is not installed")
    if _gn.INTERPRET:
        raise RuntimeError("compile_kernel: TRITON_INTERPRET=1 is set, so the kernels are interpreted and "
                           "cannot be compiled; unset it")
    from triton.backends.compiler import GPUTarget

    fn = globals()[launch.kernel]
    if list(fn.arg_names) != launch.parameters():
        raise RuntimeError(f"{launch.kernel}: parameters {fn.arg_names} != the launch's {launch.parameters()}")
    src = triton.compiler.ASTSource(fn=fn, signature=launch.signature(), constexprs=dict(launch.constexprs))
    compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32),
                              options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    meta = compiled.metadata
    ptx = compiled.asm["ptx"]
    scratch = {k: getattr(meta, k, 0) for k in ("global_scratch_size", "profile_scratch_size")}
    if any(scratch.values()):
        raise RuntimeError(f"{launch.kernel}: needs Triton scratch memory {scratch}, which TensorRT's AOT "
                           "plugins do not provide")
    expect = [".u64"] * len(launch.inputs) + [".u32"] * len(launch.scalars) + [".u64"] * len(launch.outputs)
    params = ptx_entry_params(ptx, meta.name)
    if params[:len(expect)] != expect or any(p != ".u64" for p in params[len(expect):]):
        raise RuntimeError(f"{launch.kernel}: PTX parameters {params} do not start with TensorRT's "
                           f"(inputs, int32 scalars, outputs) = {expect}")
    return PtxKernel(meta.name, ptx, meta.num_warps, meta.shared)


def plugin_fingerprint() -> str:
    """sha256 of what decides the plugins' kernels: this file, admrt's kernel sources and the
    Triton version (part of the engine cache key)."""
    h = hashlib.sha256(",".join(PLUGINS).encode())
    for path in (Path(__file__), Path(_gn.__file__), Path(_attn.__file__)):
        h.update(path.read_bytes())
    h.update((triton.__version__ if HAS_TRITON else "no-triton").encode())
    return h.hexdigest()


# -- the ONNX rewrite ------------------------------------------------------------------------------

def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _plugin_node(op_type: str, inputs, outputs, name: str, **attrs) -> onnx.NodeProto:
    return onnx.helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=PLUGIN_DOMAIN,
                                 plugin_namespace=NAMESPACE, aot=1, **attrs)


def plugin_nodes(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The plugin nodes that compute one admrt-domain node (see the module docstring)."""
    attrs = _attrs(node)
    base = node.name or node.output[0]
    tmp = f"{node.output[0]}__"
    if node.op_type in ("GroupNormAct", "AdaGroupNormAct"):
        ada = node.op_type == "AdaGroupNormAct"
        if len(node.input) != (5 if ada else 3):
            raise ValueError(f"{node.op_type} node {base!r}: {len(node.input)} inputs, expected {5 if ada else 3}")
        num_groups, eps = int(attrs["num_groups"]), float(attrs["epsilon"])
        act = attrs["activation"].decode() if isinstance(attrs["activation"], bytes) else attrs["activation"]
        if act not in ACTIVATIONS:
            raise ValueError(f"{node.op_type} node {base!r}: activation={act!r}, expected one of {ACTIVATIONS}")
        x = node.input[0]
        psum, psq = tmp + "psum", tmp + "psq"
        stats = _plugin_node("GroupNormStats", [x], [psum, psq], base + "/stats", num_groups=num_groups)
        apply = _plugin_node("AdaGroupNormApply" if ada else "GroupNormApply", [x, psum, psq, *node.input[1:]],
                             [node.output[0], tmp + "mean", tmp + "rstd"], base + "/apply",
                             num_groups=num_groups, epsilon=eps, activation=act)
        return [stats, apply]
    if node.op_type == "QKVAttention":
        legacy = int(attrs["legacy_order"])
        if legacy not in (0, 1):
            raise ValueError(f"QKVAttention node {base!r}: legacy_order={legacy}, expected 0 or 1")
        return [_plugin_node("QKVAttentionFwd", [node.input[0]], [node.output[0], tmp + "lse"], base + "/fwd",
                             num_heads=int(attrs["num_heads"]), legacy_order=legacy)]
    raise ValueError(f"node {base!r}: unknown {SOURCE_DOMAIN}-domain op {node.op_type!r}; expected "
                     "GroupNormAct, AdaGroupNormAct or QKVAttention")


def rewrite_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every admrt-domain node replaced by its plugin nodes; graph inputs,
    outputs and the other nodes unchanged. Weights stored as external data stay external."""
    for fn in model.functions:
        if any(n.domain == SOURCE_DOMAIN for n in fn.node):
            raise ValueError(f"local function {fn.name!r} holds {SOURCE_DOMAIN}-domain nodes; expected them "
                             "in the main graph (export with the functions inlined)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        nodes.extend(plugin_nodes(node) if node.domain == SOURCE_DOMAIN else [node])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    imports = [o for o in out.opset_import if o.domain not in (SOURCE_DOMAIN, PLUGIN_DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend(imports + [onnx.helper.make_opsetid(PLUGIN_DOMAIN, 1)])
    return out


def has_fused_nodes(model: onnx.ModelProto) -> bool:
    """Whether the main graph has admrt-domain (fused op) nodes."""
    return any(n.domain == SOURCE_DOMAIN for n in model.graph.node)


# -- registration with tensorrt.plugin (needs TensorRT and a CUDA GPU) ------------------------------

_registered = False


def register_plugins() -> None:
    """Register the four AOT plugins with tensorrt.plugin, once per process. The ONNX parser then
    finds them for the nodes `rewrite_for_tensorrt` writes."""
    global _registered
    if _registered:
        return
    from . import require_tensorrt

    trt = require_tensorrt()
    import tensorrt.plugin as trtp

    if not hasattr(trt, "QuickPluginCreationRequest"):   # tensorrt.plugin's own test for AOT support
        raise RuntimeError(f"TensorRT {trt.__version__} has no AOT Python plugins; they need TensorRT >= 10.9")
    if not torch.cuda.is_available():
        raise RuntimeError("register_plugins: the plugins' kernels are compiled for the CUDA GPU in use; "
                           "torch.cuda.is_available() is False")
    _define(trt, trtp)
    _registered = True


def _define(trt, trtp) -> None:
    f32 = trt.float32
    Ret = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]
    Desc = trtp.TensorDesc

    def static(desc, dims, plugin: str) -> list[int]:
        out = []
        for d in dims:
            e = desc.shape_expr[d]
            if not e.is_constant:
                raise ValueError(f"{NAMESPACE}::{plugin}: input dimension {d} is dynamic; only the batch "
                                 "(dimension 0) may be")
            out.append(e.constant_value())
        return out

    def dtype_name(desc, plugin: str) -> str:
        names = {trt.float32: "fp32", trt.float16: "fp16"}
        if desc.dtype not in names:
            raise TypeError(f"{NAMESPACE}::{plugin}: input dtype {desc.dtype}; expected float32 or float16")
        return names[desc.dtype]

    def aot(launch: KernelLaunch):
        major, minor = torch.cuda.get_device_capability()
        kernel = compile_kernel(launch, 10 * major + minor)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch.grid
        params.block_x = launch.block_x
        params.shared_mem = kernel.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in launch.extra_args()])
        return kernel.name, kernel.ptx, params, extra

    def channels_length(x, plugin: str) -> tuple[int, int]:
        c, *spatial = static(x, range(1, len(x.shape_expr)), plugin)
        return c, math.prod(spatial)

    @trtp.register(f"{NAMESPACE}::GroupNormStats")
    def _stats_desc(x: Desc, num_groups: int) -> Tuple[Desc, Desc]:
        bc = (x.shape_expr[0], x.shape_expr[1])
        return trtp.from_shape_expr(bc, dtype=f32), trtp.from_shape_expr(bc, dtype=f32)

    @trtp.aot_impl(f"{NAMESPACE}::GroupNormStats")
    def _stats_aot(x, num_groups, outputs, tactic) -> Ret:
        c, length = channels_length(x, "GroupNormStats")
        return aot(group_norm_stats_launch(x.shape_expr[0], c, length, num_groups, dtype_name(x, "GroupNormStats")))

    def apply_outputs(x, num_groups):
        stats = (x.shape_expr[0], num_groups)
        return x.like(), trtp.from_shape_expr(stats, dtype=f32), trtp.from_shape_expr(stats, dtype=f32)

    def apply_aot(x, num_groups, epsilon, activation, ada):
        plugin = "AdaGroupNormApply" if ada else "GroupNormApply"
        c, length = channels_length(x, plugin)
        return aot(group_norm_apply_launch(x.shape_expr[0], c, length, num_groups, epsilon, activation,
                                           dtype_name(x, plugin), ada=ada))

    @trtp.register(f"{NAMESPACE}::GroupNormApply")
    def _apply_desc(x: Desc, psum: Desc, psq: Desc, gamma: Desc, beta: Desc, num_groups: int, epsilon: float,
                    activation: str) -> Tuple[Desc, Desc, Desc]:
        return apply_outputs(x, num_groups)

    @trtp.aot_impl(f"{NAMESPACE}::GroupNormApply")
    def _apply_aot(x, psum, psq, gamma, beta, num_groups, epsilon, activation, outputs, tactic) -> Ret:
        return apply_aot(x, num_groups, epsilon, activation, False)

    @trtp.register(f"{NAMESPACE}::AdaGroupNormApply")
    def _ada_desc(x: Desc, psum: Desc, psq: Desc, gamma: Desc, beta: Desc, scale: Desc, shift: Desc,
                  num_groups: int, epsilon: float, activation: str) -> Tuple[Desc, Desc, Desc]:
        return apply_outputs(x, num_groups)

    @trtp.aot_impl(f"{NAMESPACE}::AdaGroupNormApply")
    def _ada_aot(x, psum, psq, gamma, beta, scale, shift, num_groups, epsilon, activation, outputs, tactic) -> Ret:
        return apply_aot(x, num_groups, epsilon, activation, True)

    @trtp.register(f"{NAMESPACE}::QKVAttentionFwd")
    def _attn_desc(qkv: Desc, num_heads: int, legacy_order: int) -> Tuple[Desc, Desc]:
        b, width, length = qkv.shape_expr[0], qkv.shape_expr[1], qkv.shape_expr[2]
        return (trtp.from_shape_expr((b, width // 3, length), dtype=qkv.dtype),
                trtp.from_shape_expr((b * num_heads, length), dtype=f32))

    @trtp.aot_impl(f"{NAMESPACE}::QKVAttentionFwd")
    def _attn_aot(qkv, num_heads, legacy_order, outputs, tactic) -> Ret:
        width, length = static(qkv, (1, 2), "QKVAttentionFwd")
        return aot(qkv_attention_launch(qkv.shape_expr[0], width, length, num_heads, legacy_order,
                                        dtype_name(qkv, "QKVAttentionFwd")))
