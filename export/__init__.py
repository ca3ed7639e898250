"""admrt.export: the stack as AOTInductor packages (aoti), ONNX (onnx, onnx_ops), TensorRT engines
(tensorrt, trt_plugins); what they share is in stack; the Engine's compiled backends in backends.

Here: the error every format raises for a missing optional package, and the TensorRT import that
tensorrt.py (engines) and trt_plugins.py (its plugins) both need (so neither imports the other
for it: tensorrt.py uses trt_plugins, not the reverse)."""


class MissingPackageError(ImportError):
    """An optional package an export format or backend needs is not installed; the message says
    which and how to install it (the CLI prints it as one line)."""


def require_tensorrt():
    """The `tensorrt` module, or a MissingPackageError saying how to install it."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:
        raise MissingPackageError(
            "the TensorRT backend needs the Python package `tensorrt` (NVIDIA TensorRT), which is not "
            f"importable here ({e}). Install it with `pip install tensorrt` on a machine that can reach "
            "NVIDIA's package index (pypi.nvidia.com: the PyPI packages are stubs that download from it), "
            "with a CUDA GPU and driver.") from e
    return tensorrt
