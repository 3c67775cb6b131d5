import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import their shared helpers (cases.py)

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels run in Triton's CPU interpreter. The variable must be set
    # before anything imports triton (diffusers does, through torch._dynamo): triton builds its
    # @jit standard library (tl.cdiv, tl.max, ...) for the mode in force at its import.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: thread start-up costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
