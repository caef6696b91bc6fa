"""Which implementation a kernel call runs: Triton or the chunked PyTorch path."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - triton is a declared dependency
        return False


def backend_for(device: torch.device | str, backend: str = "auto") -> str:
    """The backend `sparse_divergence` uses for tensors on `device`: 'triton' or 'torch'.

    auto: Triton on CUDA when triton imports, otherwise the chunked PyTorch path. 'triton' on CPU runs
    Triton's interpreter (needs TRITON_INTERPRET=1 set before opd_kernels.triton_sparse is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    dev = torch.device(device)
    return "triton" if dev.type == "cuda" and triton_available() else "torch"
