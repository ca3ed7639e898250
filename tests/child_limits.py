"""Bounds of the child processes that reliability tests start: a regression that allocates fails
in the child instead of taking the machine."""
import resource


def address_space(nbytes: int):
    """A subprocess preexec_fn that limits the child's address space (RLIMIT_AS) to nbytes."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return limit
