"""Session-wide test setup.

Without CUDA the Triton kernels can only run in Triton's CPU interpreter, which reads TRITON_INTERPRET
when `opd_kernels.triton_sparse` is first imported; set it here, before any test module imports it, so the
result does not depend on which test file happens to import the kernels first.

A shell without job control starts a background job (`bash .ci/run &`, nohup) with SIGINT ignored, and an
ignored signal stays ignored across exec: the stages the signal tests start would never see their Ctrl-C.
Those tests are about the stages, not about how CI was launched, so the suite gives SIGINT back its default.
"""

import os
import signal

import torch

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
