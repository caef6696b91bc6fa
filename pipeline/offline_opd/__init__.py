"""Offline on-policy distillation: the DVC stages (`stages/`), the data contracts they share (`contract/`,
`provenance/`), and the engines, training stack and tasks behind them.

The folder `pipeline/` is a source root, like `src/`: it is never a package itself, so running Python from
the repository root shadows no installed distribution (a top-level `pipeline` or `kernels` package on PyPI).
"""
