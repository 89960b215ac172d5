"""Data parallel training under torchrun: DDP, or FSDP (fully_shard) to shard parameters, gradients and
optimizer state. gloo on CPU, NCCL on GPUs. A single process without torchrun needs none of this, and the
same calls work there, so the training loop has one path."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from camelid.errors import CamelidError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Cluster:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_cluster(device: str) -> tuple[Cluster, torch.device]:
    """Join the process group torchrun describes in the environment (if any); returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Cluster(), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return Cluster(rank, world, local_rank), torch.device(f"cuda:{local_rank}" if on_gpu else device)


def close_cluster(cluster: Cluster, finished: bool = False):
    """After a run that finished, every rank waits for the others first: a rank that tore its process group
    down while rank 0 still wrote the model could hang in gloo's teardown."""
    if cluster.world > 1 and dist.is_initialized():
        work = dist.barrier(async_op=True) if finished else None
        if work is not None:
            work.wait()
        dist.destroy_process_group()
        # The barrier's work is let go only now, by this thread: when gloo's thread dropped it last it needed
        # the GIL, which this thread held while tearing the group down (a deadlock seen on a loaded machine).
        del work


def wrap(model: torch.nn.Module, cluster: Cluster, fsdp: bool, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP with each transformer block a shard unit; unchanged in a single process."""
    if cluster.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            if len({p.dtype for p in block.parameters()}) > 1:
                # FSDP gathers one dtype per unit: fp32 LoRA adapters over a bf16 base get units of their own
                # (each adapted layer, its frozen base apart), inside the block's
                for module in block.modules():
                    if hasattr(module, "lora_A"):
                        if any(True for _ in module.base.parameters()):
                            fully_shard(module.base)
                        fully_shard(module)
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # Buffers are not broadcast on every forward: camelid's are rotary tables and, under QLoRA, the frozen
    # quantized weights, the same on every rank from the start.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def no_sync(model: torch.nn.Module, fsdp: bool, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    import contextlib

    if fsdp and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def reshard(model: torch.nn.Module):
    """After forwards with no backward (validation, samples): FSDP keeps the root's parameters gathered until a
    backward, which leaves the optimizer's shards out of the model's parameters for a checkpoint taken now."""
    if hasattr(model, "reshard"):
        model.reshard()


def sum_across(value: float, cluster: Cluster, device: torch.device) -> float:
    if cluster.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def gather(obj, cluster: Cluster) -> list:
    if cluster.world == 1:
        return [obj]
    out = [None] * cluster.world
    dist.all_gather_object(out, obj)
    return out


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state on CPU, keyed by parameter name (collective under FSDP;
    complete on rank 0)."""
    model_state = get_model_state_dict(model, options=FULL)
    return model_state, get_optimizer_state_dict(model, optimizer, options=FULL) if optimizer else None


def full_trainable_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                         trainable: dict[str, torch.nn.Parameter]) -> tuple[dict, dict | None]:
    """The trained parameters, unsharded, and the optimizer's full state, on CPU (collective under FSDP): what a
    fine-tuning checkpoint keeps, without gathering the frozen base."""
    from torch.distributed.tensor import DTensor

    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu() for n, p in trainable.items()}
    return params, get_optimizer_state_dict(model, optimizer, options=FULL) if optimizer else None


def load_full_trainable_state(model, optimizer, trainable: dict[str, torch.nn.Parameter], params: dict,
                              optimizer_state: dict, where: str):
    """The reverse of `full_trainable_state`: each rank copies in its shard of every trained parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    try:
        with torch.no_grad():
            for name, p in trainable.items():
                full = params[name].to(device=p.device, dtype=p.dtype)
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CamelidError(f"{where}: does not fit this model and optimizer ({str(exc).splitlines()[0]})") from None


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict, where: str):
    try:
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CamelidError(f"{where}: does not fit this model and optimizer ({str(exc).splitlines()[0]})") from None
