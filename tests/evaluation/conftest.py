import pytest
import torch


@pytest.fixture
def one_thread():
    """Small CPU convolutions run far faster on one thread when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
