import os

import torch

# Without a GPU the real kernels run on CPU tensors in Triton's interpreter; it must be chosen
# before triton is first imported (torch does not import it on its own).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
