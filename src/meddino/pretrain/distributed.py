"""Process group from the ``torchrun`` environment, device choice, and DDP / FSDP2 wrapping of the student.

The same command runs on 1 CPU process, N CPU processes (gloo) or N GPUs (nccl): when ``WORLD_SIZE`` > 1
is in the environment (torchrun sets it with RANK, LOCAL_RANK, MASTER_ADDR/PORT) the default group is
initialised from it; otherwise nothing distributed happens and every helper is the identity. DDP is the
default; ``train.fsdp=true`` shards student, teachers and optimiser with FSDP2 (also on CPU with gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from meddino.errors import CheckpointError, ConfigError
from meddino.models.checkpoints import load_into_strict


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is a one-line error."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available (use auto or cpu)")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Initialise the default process group from torchrun's env (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank, world, local_rank, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Objects from every rank (``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Mean of a small tensor over ranks (for logging / the non-finite check)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def wrap_student(student: nn.Module, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """DDP over backbone + heads together (one gradient all-reduce for both); returned unchanged on a single
    process or when the student is already FSDP2-sharded (:func:`shard_fsdp`, which must run before the
    optimiser is built)."""
    if not env.distributed or fsdp:
        return student

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(student, device_ids=ids, forward_sync_buffers=False)


def shard_fsdp(student: nn.Module, teacher: nn.Module, gram_teacher: nn.Module | None, env: DistEnv) -> None:
    """FSDP2 (``fully_shard``) for large backbones: parameters, gradients and AdamW state sharded over ranks.

    Units: every transformer block, the backbone (its embeddings and final norm) and each head, for the
    student, the EMA teacher and the Gram teacher alike, so that teacher and student shards line up
    parameter by parameter and the EMA update is a local foreach on the shards. ``forward_features`` is
    registered as an FSDP forward method so that calling it (not ``forward``) gathers the backbone's own
    parameters. Works with nccl on GPUs and with gloo on CPU processes.
    """
    from torch.distributed.device_mesh import init_device_mesh  # why: FSDP2/DTensor only when sharding
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method  # why: as above

    mesh = init_device_mesh(env.device.type, (env.world_size,))

    # reshard_after_forward=True everywhere: the teacher runs without backward, so a root left unsharded
    # after its forward (FSDP2's root default) would keep plain full tensors until the next forward
    def shard(module: nn.Module) -> None:
        fully_shard(module, mesh=mesh, reshard_after_forward=True)

    def shard_backbone(bb: nn.Module) -> None:
        for block in bb.blocks:
            shard(block)
        shard(bb)
        register_fsdp_forward_method(bb, "forward_features")

    for model in (student, teacher):
        shard_backbone(model.backbone)
        done: set[int] = set()
        for head in (model.dino_head, model.ibot_head):
            if head is not None and id(head) not in done:
                shard(head)
                done.add(id(head))
    if gram_teacher is not None:
        shard_backbone(gram_teacher)


def full_state_dict(module: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The module's complete state dict as plain CPU tensors (gathered from the shards under FSDP2: a
    collective, every rank must call it, and only rank 0 receives the tensors -- an empty dict elsewhere)."""
    if not sharded:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # why: DCP, FSDP2 only

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], sharded: bool, source: str = "resume checkpoint"
) -> None:
    """Load a complete (unsharded) state dict, scattering it into the shards under FSDP2; a checkpoint of
    another architecture (e.g. the config changed before ``resume``) is refused with one line."""
    if not sharded:
        load_into_strict(module, state, source)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # why: DCP, FSDP2 only

    # a module registered under two names (the shared DINO/iBOT head) appears twice in a state dict; keep
    # the canonical name only, the alias would be copied as a plain tensor into a sharded parameter
    canonical = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    state = {k: v for k, v in state.items() if k in canonical}
    result = set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))
    refuse_load_mismatch(result, canonical, source)


def refuse_load_mismatch(result: Any, canonical: set[str], source: str) -> None:
    """One line when ``set_model_state_dict(strict=False)`` (``result``: its missing/unexpected keys) left
    out a tensor of ``canonical`` (the names that must load; the shared head's alias names are not among
    them) or met one the module does not have."""
    missing = [k for k in result.missing_keys if k in canonical]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: does not match the model (missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )
