"""The one rule that sharding adds to decoding: every process runs the same forwards.

Under FSDP every forward of the student all-gathers its parameters, a collective that each
process must join. Processes sample different rows whose rollouts end at different lengths, so
decoding goes on until no row is alive on any process (`any_process`, one small all-reduce per
chunk), and a process whose rows have all ended keeps feeding a pad row whose outputs are
discarded (`kat.sampler`). Without torch.distributed, or with one process, nothing is exchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a tensor sent through a collective must live: NCCL moves CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_process(flag: bool) -> bool:
    """True when `flag` holds on at least one process. Every process must call it together."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def draw_range(global_rows: tuple[int, int] | None, batch: int) -> tuple[int, int]:
    """(offset of this process's first row, uniforms drawn per step) for `kat.sampler.sample`'s
    `global_rows`: each process draws the global batch's uniforms and takes its own rows' share."""
    first, n_draw = global_rows if global_rows is not None else (0, batch)
    if not (0 <= first and first + batch <= n_draw):
        raise ValueError(f"global_rows={global_rows} must satisfy 0 <= offset and offset + B <= total (B={batch})")
    return first, n_draw
