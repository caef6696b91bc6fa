"""Session-wide test setup.

Without CUDA the Triton kernels can only run in Triton's CPU interpreter, which reads TRITON_INTERPRET
when `opd_kernels.triton_sparse` is first imported; set it here, before any test module imports it, so the
result does not depend on which test file happens to import the kernels first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
