"""One loaded model that both generates and scores: the interface every stage uses, and its factory.

A stage builds one engine per model (`load_engine`) from its params section and calls `generate` or
`score`; it never branches on the backend name. Both backends (`hf` here in-process, `vllm` through
vLLM's engine) return the same `Sample` / `Scored` records (base.py), so the shards they write are
interchangeable, and `tests/test_vllm_backend.py` compares them on the same inputs. The backends import
base.py, never this module: only the factory below names them.

Seeds are per sequence: sample j of a `generate` call draws from its own generator seeded from
(sampling.seed, j), so a result does not depend on batch size, scheduling, or what ran before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from offline_opd.backends.base import Extras, Sample, Sampling, Scored
from offline_opd.config import EngineConfig
from offline_opd.models.loading import default_device
from offline_opd.provenance.record import check_unchanged

BACKENDS = ("hf", "vllm")


GREEDY = dict(n=1, temperature=0.0, seed=0)  # greedy draws no random numbers: the seed is irrelevant


class Engine(Protocol):
    tokenizer: object          # the model's tokenizer (left padding, pad token set)

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[Sample]]:
        """`sampling.n` samples per prompt, as [prompt][sample], with exact per-token log-probs."""
        ...

    def score(self, input_ids: list[list[int]], prompt_lens: list[int], k: int,
              extras: Extras | None = None) -> list[Scored]:
        """Top-k (or, with `extras`, the sparse targets of offline_opd.contract.sparse_targets) and sampled-token
        log-probs (T = 1) of each sequence's response positions."""
        ...

    def logits_model(self):
        """A transformers module over this engine's weights, for full-vocabulary computations that
        `generate`/`score` do not serve (evaluate's divergences). The caller owns it: it stays valid
        after `close`. `hf` returns the model it already holds (no second load)."""
        ...

    def close(self) -> None:
        """Free the model now: a stage that runs several models one after another (evaluate) must not
        keep one it is done with, and vLLM's worker processes outlive a plain `del`."""
        ...


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: fp32 on CPU (exact, and CPUs gain little from bf16), bf16 on GPU."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def backend_version(backend: str) -> str:
    """Library versions recorded in shard footers: numbers can change across versions of either."""
    if backend == "vllm":
        from offline_opd.backends.vllm_backend import vllm_version

        return vllm_version()
    import torch
    import transformers

    return f"transformers {transformers.__version__}, torch {torch.__version__}"


def engine_footer(cfg: EngineConfig, device: str | None = None) -> dict:
    """What a shard footer records about the engine that produced its numbers (no model is loaded)."""
    return {"backend": cfg.backend, "backend_version": backend_version(cfg.backend),
            "engine_dtype": resolve_dtype(cfg.dtype, device or default_device()),
            "max_model_len": cfg.max_model_len}


def load_engine(model_path: Path | str, cfg: EngineConfig, section: str, *, max_logprobs: int = 0,
                device: str | None = None, tensor_parallel: int = 1) -> Engine:
    """The engine named by `cfg.backend`, holding the model in `model_path`.

    `max_logprobs` is the largest k the engine will be asked to score (vLLM fixes it at start);
    `section` names the params section in error messages; `tensor_parallel` is the number of GPUs vLLM
    splits the model over (`<section>.cluster.gpus_per_replica`; the config refuses it above 1 for hf). A
    folder a stage wrote must still hold what that stage recorded (`check_unchanged`), or every number the
    engine produces is of another model.
    """
    check_unchanged(model_path)
    device = device or default_device()
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.backend == "hf":
        from offline_opd.backends.hf import HFEngine

        return HFEngine(model_path, batch_size=cfg.batch_size, dtype=dtype, max_model_len=cfg.max_model_len,
                        section=section, device=device)
    if cfg.backend == "vllm":
        from offline_opd.backends.vllm_backend import VLLMEngine

        return VLLMEngine(model_path, batch_size=cfg.batch_size, dtype=dtype, max_model_len=cfg.max_model_len,
                          kv_cache_gib=cfg.kv_cache_gib, max_logprobs=max_logprobs, section=section,
                          device=device, tensor_parallel=tensor_parallel)
    raise ValueError(f"unknown backend {cfg.backend!r}; use one of {', '.join(BACKENDS)}")


def greedy_responses(engine: Engine, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy response ids (deterministic: greedy decoding draws no random numbers)."""
    samples = engine.generate(prompt_ids, Sampling(max_new_tokens=max_new_tokens, **GREEDY))
    return [row[0].response_ids for row in samples]
