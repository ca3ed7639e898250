"""Leaving a torchrun process group, shared by `admrt sample` and `admrt train`."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def leaving_process_group():
    """Destroy the default process group (if one was joined) when the block ends. After a block
    that finished, every rank first waits for the others: a gloo rank that tears down while a peer
    is still busy (rank 0 saving or merging, say) can abort with "terminate called without an
    active exception". After an error or Ctrl-C there is no barrier: a peer may never arrive."""
    import torch.distributed as dist

    available = dist.is_available()
    try:
        yield
    except BaseException:
        if available and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if available and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
