"""FSDP2 for the pretrain loop: shard MiniCPM over the workers, save checkpoints DDP can read.

`shard` applies torch's `fully_shard` (FSDP2, per-parameter DTensor sharding over a 1-D device
mesh: ZeRO-3) to each decoder block and then to the root, which holds the tied embedding/head and
the final norm; it rebuilds the μP AdamW groups over the sharded parameters and moves any loaded
optimizer state into them. Works on CUDA (NCCL) and on CPUs (gloo) alike.

Checkpoints are full state dicts gathered to rank 0 and written by trainables.checkpoint, the
same files DDP writes: a stable run under fsdp can be annealed under ddp and the reverse, and the
model-folder hand-off after pretraining reads them unchanged. The price is rank 0's host memory
(the gathered fp32 weights and AdamW moments, 12 bytes per parameter, plus the plain model they
are written from, 4 more: ~39 GB at 2.4B) and one gather per checkpoint;
torch.distributed.checkpoint (sharded files) would avoid both, at the cost of a second format
that nothing downstream reads.

Loading runs before sharding: the caller builds the model and optimizer on the CPU, loads a
checkpoint into them as under ddp, and `shard` moves the shards to the device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from trainables import checkpoint as ckpt

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
FULL = StateDictOptions(full_state_dict=True)
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # others get {}


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard(
    model: nn.Module, opt: torch.optim.Optimizer, device: torch.device, make_opt: MakeOptimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """fully_shard each block, then the root; a new optimizer holding `opt`'s state, sharded.

    Every rank must call it with the same full weights and optimizer state (same seed, or the
    same checkpoint loaded): each keeps its 1/W of both.
    """
    full_state = by_name(opt.state_dict(), model, opt)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embedding (tied head) and final norm
    sharded_opt = make_opt(model)
    if full_state["state"]:  # a resumed or annealed run; a fresh one has no moments yet
        set_optimizer_state_dict(model, sharded_opt, full_state, options=FULL)
    return model, sharded_opt


def by_name(state: dict, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """An optimizer state_dict keyed by parameter name (FQN) instead of position."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def by_position(state: dict) -> dict:
    """The inverse of by_name: positions in group order, as Optimizer.state_dict() numbers them."""
    ids = {name: i for i, name in enumerate(n for g in state["param_groups"] for n in g["params"])}
    return {
        "state": {ids[name]: s for name, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [ids[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def gather_full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full weights and optimizer state on rank 0's CPU ({} elsewhere); every rank must call."""
    weights = get_model_state_dict(model, options=FULL_ON_RANK0)
    optimizer = get_optimizer_state_dict(model, opt, options=FULL_ON_RANK0)
    return weights, optimizer


def save_full_checkpoint(
    directory: Path,
    full: tuple[dict, dict],
    build_model: Callable[[], nn.Module],
    make_opt: MakeOptimizer,
    state: dict,
) -> Path:
    """Rank 0: write the gathered state as an ordinary (ddp-format) checkpoint folder."""
    weights, optimizer = full
    with torch.device("meta"):  # no second initialisation: the weights come from `weights`
        plain = build_model()
    plain.to_empty(device="cpu")
    plain.load_state_dict(weights)  # rope tables are not saved (non-persistent), so not set
    plain_opt = make_opt(plain)
    plain_opt.load_state_dict(by_position(optimizer))
    return ckpt.save_checkpoint(directory, plain, plain_opt, state)
