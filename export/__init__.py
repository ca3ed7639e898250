"""admrt.export: the stack as AOTInductor packages (aoti), ONNX (onnx, onnx_ops), TensorRT engines
(tensorrt, trt_plugins); what they share is in stack."""


class MissingPackageError(ImportError):
    """An optional package an export format or backend needs is not installed; the message says
    which and how to install it (the CLI prints it as one line)."""
