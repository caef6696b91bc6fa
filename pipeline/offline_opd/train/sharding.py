"""FSDP2 for `strategy: fsdp`: sharding, weight loading without a full copy per rank, sharded checkpoints, export.

`torch.distributed.fsdp.fully_shard` is applied to every decoder layer and then to the whole causal LM
(the root unit keeps the embeddings, the final norm and the lm_head, so tied embeddings stay in one
unit), through Lightning's `ModelParallelStrategy` (`TrainModule.configure_model` calls `shard_model`
with the strategy's device mesh). Every parameter becomes a `DTensor` sharded on dim 0 over the
data-parallel ranks; gradients and AdamW's moments follow the parameters, so each rank holds 1/N of the
model state.

Why each piece is here:
* `load_on_meta` + `materialize`: a pretrained model is built on the meta device (no memory; buffers
  such as rotary tables are real, they are small and not in the checkpoint), sharded, then each rank
  reads only its own rows of each tensor from the safetensors files (memory-mapped slices). No rank
  ever holds the whole model, so host memory per rank shrinks as ranks are added instead of staying at
  one full copy each.
* `mixed_precision`: `bf16-mixed` keeps fp32 master shards and AdamW state, computes with bf16
  parameters (gathered in bf16) and reduces gradients in fp32.
* `in_root_forward`: FSDP2 gathers a unit's parameters in that unit's forward hooks. The training
  step reads the decoder's hidden states and the lm_head weight itself (the fused lm_head + loss
  kernel never calls `lm_head`), so the step runs inside the root module's forward: the root's
  parameters (embeddings, norm, lm_head) are gathered for all of it and their gradients are
  reduce-scattered after backward, as for any FSDP unit.
* `ShardedStrategy`: writes each distributed (DCP) checkpoint into a fresh folder and then swaps the
  `last.ckpt` symlink to it in one rename, so a kill -9 mid-write leaves the previous checkpoint whole.
* `gather_full_state`: the export gathers one tensor at a time onto rank 0, already in the dtype the
  model is saved in.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from pytorch_lightning.strategies import ModelParallelStrategy

from offline_opd.models.loading import ModelPathError, loading

T = TypeVar("T")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"


def decoder_layer_classes(model: torch.nn.Module) -> set[type]:
    """The decoder layer class(es) FSDP shards one by one (Hugging Face names them in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
                         f"strategy fsdp cannot shard it per layer")
    return classes


@dataclass
class MetaWeights:
    """Where the weights of a meta-device model are: a safetensors folder, and each parameter's tensor name there.

    Keyed by the parameter object, not its name: a model edited after loading (layers pruned by
    `sft.prune_to_layers`, hence renumbered) still finds each parameter's tensor."""

    folder: Path
    names: dict[torch.nn.Parameter, str]

    def sources(self, model: torch.nn.Module) -> dict[str, str]:
        """Parameter name in `model` now -> tensor name in the files (taken before sharding replaces the
        parameter objects; FSDP2 keeps the names)."""
        return {name: self.names[param] for name, param in model.named_parameters()}


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real.

    `torch.device("meta")` would put buffers there too, and the non-persistent ones (rotary inverse
    frequencies) are computed at construction and are not in the checkpoint to be read back."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: Optional[torch.nn.Parameter]) -> None:
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or the files of an index)."""
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        with loading(folder, SAFETENSORS_INDEX):
            weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SAFETENSORS_FILE
    if not single.exists():
        raise ModelPathError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; strategy fsdp loads "
                             f"safetensors weights shard by shard (re-save the model with save_pretrained)")
    from safetensors import safe_open

    with loading(folder, SAFETENSORS_FILE), safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def load_on_meta(folder: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, MetaWeights]:
    """The causal LM in `folder`, its parameters on the meta device in `dtype`, and where their weights are."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with loading(folder, "config.json"):
        config = AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = str(folder)
    available = tensor_files(folder)
    names = {}
    for name, param in model.named_parameters():        # a tied parameter once, under its first name
        if name not in available:
            raise ModelPathError(f"{folder}: the safetensors files hold no tensor {name!r} of "
                                 f"{type(model).__name__}; the folder is not this architecture's checkpoint")
        names[param] = name
    return model, MetaWeights(folder, names)


def mixed_precision(precision: str) -> Any:
    """The FSDP2 policy for `precision`: bf16 compute and fp32 gradient reduction for bf16-mixed."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()    # 32-true and bf16-true: parameters are already in the compute dtype


def shard_model(model: torch.nn.Module, mesh: Any, precision: str, offload: bool) -> None:
    """fully_shard each decoder layer, then the whole model (root: embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mixed_precision(precision),
              "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()}
    layers = decoder_layer_classes(model)
    for module in list(model.modules()):
        if type(module) in layers:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)


def local_slice(param: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's shard of `param` (a DTensor) in the full tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def materialize(model: torch.nn.Module, folder: Path, sources: dict[str, str], device: torch.device) -> None:
    """Allocate this rank's shards on `device` and fill them from the safetensors files in `folder`, each
    rank reading only its own rows. `sources`: parameter name -> tensor name (`MetaWeights.sources`).

    Buffers are kept as built (to_empty leaves them uninitialised)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    files = tensor_files(folder)
    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        by_file.setdefault(files[sources[name]], []).append((sources[name], param))
    for file, params in by_file.items():
        with loading(folder, file.name), safe_open(file, "pt") as f:
            for source, param in params:
                local = param.to_local() if isinstance(param, DTensor) else param
                local.copy_(f.get_slice(source)[local_slice(param)])


def in_root_forward(model: torch.nn.Module, step: Callable[[], T]) -> T:
    """`step()` run as the forward of `model`, a fully_shard root: its forward hooks gather the root's
    parameters (embeddings, final norm, lm_head) before it and register their gradient reduction after.

    `step` takes no arguments, so FSDP's cast of forward inputs to the compute dtype leaves the
    batch's teacher log-probs alone."""
    model.forward = step                 # an instance attribute shadows the class's forward...
    try:
        return model()
    finally:
        del model.forward                # ...until it is removed again


def gather_full_state(model: torch.nn.Module, dtype: torch.dtype, skip: set[str]) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0's CPU, floating tensors in `dtype`; {} on the other ranks.

    Gathered one tensor at a time (every rank takes part in each gather), so rank 0 holds the model
    once, in the saved dtype, plus one tensor in the training dtype."""
    from torch.distributed.tensor import DTensor

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state = {}
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        if isinstance(tensor, DTensor):
            mesh_device = tensor.device_mesh.device_type
            if tensor.device.type != mesh_device:      # CPU-offloaded shards: gather on the mesh's device
                tensor = tensor.to(mesh_device)
            tensor = tensor.full_tensor()
        if rank0:
            state[name] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
    return state


def swap_link(link: Path, folder: Path) -> None:
    """Point `link` at `folder` (a sibling) in one rename, then delete the sibling checkpoint folders of
    `link` that are no longer pointed at (the previous one, or one a kill left half-written)."""
    tmp = link.with_name(f".{link.name}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(folder.name, tmp)
    if link.is_dir() and not link.is_symlink():     # a checkpoint not written by this class
        shutil.rmtree(link)
    os.replace(tmp, link)
    for old in link.parent.glob(f".{link.name}.*"):
        if old.name != folder.name and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks (data parallel only), with sharded DCP checkpoints written atomically.

    Each checkpoint goes into a new hidden folder next to `last.ckpt` (each rank writes its shards,
    rank 0 the Lightning metadata: step, data position, loss history), and only then is `last.ckpt`, a
    symlink, switched to it. With `offload`, parameter shards, gradients and AdamW state live on the
    CPU (FSDP2 copies each unit to the GPU for its forward and backward)."""

    def __init__(self, world_size: int, offload: bool) -> None:
        super().__init__(data_parallel_size=world_size, tensor_parallel_size=1, save_distributed_checkpoint=True)
        self.offload = offload

    def model_to_device(self) -> None:
        if not self.offload:
            super().model_to_device()
            return
        for module in self.model.modules():              # parameters stay on the CPU; buffers go to the GPU
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(self.root_device)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        link = Path(self.broadcast(str(filepath)))
        folder = link.with_name(f".{link.name}.{self.broadcast(uuid.uuid4().hex)}")
        super().save_checkpoint(checkpoint, folder, storage_options)
        # DCP's save ends with rank 0 collecting every rank's write results: all shards are on disk here.
        if self.global_rank == 0:
            swap_link(link, folder)
