"""torch's thread count for one block of a test, not for the whole process."""

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int):
    """torch on `count` threads inside the block only; the process's thread count is put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
