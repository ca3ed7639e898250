"""What keeps the fused custom ops traceable by torch.compile, torch.export and AOTInductor.

- `size_hint`: launch choices (tile sizes, splits) read sizes that are `torch.SymInt`s when a
  dimension is dynamic; they take the example value, without a guard, and the kernels give the
  same result (up to fp32 rounding) whatever the choice.
- `reference_backward`: the fused backwards are not differentiable themselves; when a backward
  runs under create_graph=True, the gradient is taken through the op's torch reference instead,
  so double backward works (logged once per op at INFO).
"""
from __future__ import annotations

import logging

import torch

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _hint
except ImportError:  # torch releases before optimization_hint
    from torch.fx.experimental.symbolic_shapes import hint_int as _hint

log = logging.getLogger("admrt.kernels")
_logged: set[str] = set()


def size_hint(n, fallback: int = 1) -> int:
    """n as an int: a SymInt's example value (no guard), or fallback for a size without one."""
    return _hint(n, fallback=fallback) if isinstance(n, torch.SymInt) else int(n)


def reference_backward(op: str, reference, inputs, grad_output):
    """Gradients of reference(*inputs) for grad_output, themselves differentiable.

    inputs: the forward's saved inputs (None for absent optionals); returns one gradient per
    input, None where the input is None or does not require grad.
    """
    if op not in _logged:
        _logged.add(op)
        log.info("%s: backward with create_graph=True (double backward) runs through the torch "
                 "reference", op)
    live = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    if not live:
        return [None] * len(inputs)
    with torch.enable_grad():
        out = reference(*inputs)
        grads = torch.autograd.grad(out, [inputs[i] for i in live], grad_output,
                                    create_graph=True, allow_unused=True)
    result = [None] * len(inputs)
    for i, g in zip(live, grads):
        result[i] = g
    return result
