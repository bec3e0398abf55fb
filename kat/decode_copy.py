"""A bf16 copy of an fp32 student for decoding, refreshed after every optimiser step.

A decode step reads every weight once, so reading fp32 master weights doubles its floor. With
`decode: static` on a CUDA device, an fp32 student decodes through a bf16 copy instead. The copy
is refreshed by a hook that runs after each optimiser step (`torch.optim.Optimizer`'s step post
hook), and counts its refreshes: `current()` refuses to hand out a copy whose count differs from
the optimiser steps taken, so a rollout can never read stale weights. The learner keeps training
the fp32 master weights; only the sampler reads the copy (its logits are the bf16 model's, which
is what a bf16 student would sample from as well).
"""

from __future__ import annotations

import copy

import torch


class DecodeCopy:
    """A bf16 copy of `student` that follows `optimizer`'s steps (see the module docstring)."""

    def __init__(self, student: torch.nn.Module, optimizer, dtype: torch.dtype = torch.bfloat16):
        self.student = student
        self.model = copy.deepcopy(student).to(dtype).eval()
        self.model.requires_grad_(False)
        self.steps = 0  # optimiser steps taken since the copy was made
        self.version = 0  # refreshes done since then
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the torch optimiser
        self._hook = inner.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the master weights (and buffers) into the copy, cast to its dtype."""
        for dst, src in zip(self.model.state_dict().values(), self.student.state_dict().values()):
            dst.copy_(src)
        self.version = self.steps

    def current(self) -> torch.nn.Module:
        """The copy, refreshed after the last optimiser step (an error otherwise, never a stale model)."""
        if self.version != self.steps:
            raise RuntimeError(f"the bf16 decode copy is at version {self.version} but the optimiser took "
                               f"{self.steps} steps")
        return self.model

    def close(self) -> None:
        self._hook.remove()


def wants_copy(student: torch.nn.Module, decode: str) -> bool:
    """decode static, on CUDA, with fp32 weights (a model already in 16 bits decodes as it is)."""
    p = next(student.parameters())
    return decode == "static" and p.device.type == "cuda" and p.dtype == torch.float32


def decode_model(run) -> torch.nn.Module:
    """The model `kat.train` samples from: the unwrapped student, or its bf16 copy (`wants_copy`),
    made on first use and refreshed by the optimiser's step hook from then on."""
    student = run.accelerator.unwrap_model(run.student)
    if not wants_copy(student, getattr(run.cfg, "decode", "dynamic")) or run.accelerator.num_processes > 1:
        return student  # several processes: the student may be sharded (FSDP); it decodes as it is
    held = getattr(run, "decode_copy", None)
    if held is None:
        held = run.decode_copy = DecodeCopy(student, run.optimizer)
    return held.current()
