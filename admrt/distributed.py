"""Leaving a torchrun process group, shared by `admrt sample` and `admrt train`."""
from __future__ import annotations


def leave_process_group(*, synchronize: bool = True) -> None:
    """Destroy the default process group (no-op without one). With `synchronize`, every rank
    first waits for the others: a gloo rank that tears down while a peer is still busy (rank 0
    saving or merging, say) can abort with "terminate called without an active exception".
    Pass synchronize=False on an error path, where a peer may never arrive."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
