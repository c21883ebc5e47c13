"""Process groups, DDP / FSDP2 wrapping, activation checkpointing and torch.compile, applied from outside
the model (the model stays a plain nn.Module; see STYLE.md, "keep the model pure").

`torchrun --nproc_per_node N ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
`init_distributed` reads them (gloo on CPU, nccl on CUDA). Without them everything runs in one process.

FSDP2 (`fully_shard`) is applied to every decoder layer, then to the root (embeddings, final norm and
lm_head, tied or not). Parameter names are unchanged by both the sharding and activation checkpointing,
so checkpoints, freeze globs and lr_groups see the HF names. With `train.dtype="bfloat16"` FSDP2 gets a
`MixedPrecisionPolicy`: parameters are all-gathered and computed in bf16, gradients reduced in fp32 into
the fp32 master shards.

Both DDP and FSDP2 average gradients over ranks (they divide the all-reduced sum by the world size).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dyndepth.devices import resolve_device


@dataclass
class DistInfo:
    """Where this process sits: rank, world size, its device, and the process group (None: single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (in place and returned); the identity in a single process."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            tensor /= self.world_size
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)


def init_distributed(parallel: str = "none", device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment variables (or reuse an existing one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    dev = resolve_device(device, local_rank)
    if world_size > 1 and parallel == "none":
        raise ValueError(f"WORLD_SIZE={world_size} but train.parallel='none'; set train.parallel=ddp or fsdp.")
    if world_size == 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                    group=dist.group.WORLD)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward. Replaces the layer's bound `forward` only, so module
    names (and checkpoint keys) stay the same."""
    for layer in model.model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def apply_compile(model: nn.Module, checkpointed: bool = False) -> None:
    """Compile each decoder layer in place (per-layer compile keeps names). A plain decoder's layers share one
    graph (two compiles: the first specializes the slot number). A method's or a depth-recurrent model's
    per-forward state is keyed by layer position (Python containers dynamo guards on), so there each position
    compiles its own graph, for training and evaluation, with and without gradients. Past dynamo's recompile
    limit (8 by default) a function runs eager, with one easily missed warning, so the limit is raised (never
    lowered; it is global, so the user's own compiled code gets the same room) to cover every position of the
    longest forward: `model.max_applications()` where a model draws its depth in training.

    `checkpointed` (activation checkpointing follows): the layer's forward is compiled, and the checkpoint then
    wraps the compiled function. Compiling the module would trace through the checkpoint, where dynamo refuses
    the layer's side effects (its FLOP ledger entries) and runs the whole layer eager, compiling nothing. A routed
    model (a method, or MoR's routing) runs a data-dependent number of tokens through a layer, so there the checkpointed
    layers compile dynamic from the start: under automatic dynamic shapes a layer's other count made dynamo add a
    dynamic graph beside the static one, and a recomputation in backward could take the other graph than its forward
    ran (torch.utils.checkpoint's CheckpointError: other tensors saved). For the same reason dynamo's DDP graph
    split (`optimize_ddp`, global) is turned off with checkpointing: it split a layer's graph at DDP's bucket
    boundaries in the forward, which runs inside DDP's, but not in the recomputation in backward, outside it (per-layer
    graphs need no split: DDP's own gradient hooks overlap the all-reduce)."""
    import torch._dynamo.config as dynamo_config

    if hasattr(model, "max_applications"):
        positions = model.max_applications()
    else:
        positions = len(model.schedule) if hasattr(model, "schedule") else len(model.model.layers)
    limit = 8 * positions + 16  # train / eval x grad / no-grad per position, and room to spare
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 2 * limit)
    if checkpointed:
        dynamo_config.optimize_ddp = False
    routed = getattr(model, "method", None) is not None
    for layer in model.model.layers:
        if checkpointed and routed:
            layer.forward = _dynamic_shapes(torch.compile(layer.forward, dynamic=True))
        elif checkpointed:
            layer.forward = torch.compile(layer.forward)
        else:
            layer.compile()


def _dynamic_shapes(compiled):
    """`compiled` (dynamic=True) tracing shapes dynamic, but Python floats as constants (a method's knobs: MoD's
    capacity as a symbolic float failed in dynamo's ceil)."""
    import torch._dynamo.config as dynamo_config

    def forward(*args, **kwargs):
        with dynamo_config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    return forward


def wrap_model(model: nn.Module, parallel: str, info: DistInfo, dtype: str = "float32") -> nn.Module:
    """DDP wrapper or in-place FSDP2 sharding. Returns the module to call for forward/backward.

    `dtype` is train.dtype: "bfloat16" makes FSDP2 gather parameters in bf16 and reduce gradients in fp32.
    """
    if parallel == "none" or not info.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if dtype == "bfloat16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ValueError(f"unknown parallel mode {parallel!r}; use none, ddp or fsdp.")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch: skip the gradient all-reduce on all but the last micro-batch."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm (before clipping) as a plain tensor; clips when max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm


def reduce_stats(stats: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each scalar over the ranks that report it (one all-gather of the key names, one all-reduce). Ranks
    may report different keys (a statistic of something that happened on some ranks only, e.g. gateskip/packed):
    one vector of each rank's own sorted keys misaligned the all-reduce (a size mismatch, or values of other keys)."""
    if not info.distributed:
        return stats
    names: list = [None] * info.world_size
    dist.all_gather_object(names, sorted(stats), group=info.group)
    keys = sorted(set().union(*names))
    if not keys:
        return stats
    t = torch.tensor([[float(stats.get(k, 0.0)) for k in keys], [float(k in stats) for k in keys]],
                     dtype=torch.float64, device=info.device)  # (2, K): values, reported
    info.all_reduce_sum(t)
    return dict(zip(keys, (t[0] / t[1]).tolist()))
