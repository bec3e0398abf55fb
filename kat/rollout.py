"""The `Rollout`: everything one batch of on-policy samples carries from the sampler to the learner."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

# Why a row stopped (`Rollout.stop`): code i is STOP_NAMES[i]. The one list of these names;
# traces, plots and reports read them from here.
STOP_NAMES = ("eos", "length", "trap", "random")
STOP_EOS, STOP_LENGTH, STOP_TRAP, STOP_RANDOM = range(len(STOP_NAMES))


def stop_name(code: int) -> str:
    """The name of a stop code ('?' for a code this version does not know)."""
    return STOP_NAMES[code] if 0 <= code < len(STOP_NAMES) else "?"


@dataclass
class Rollout:
    """B rows, P prompt positions (left-padded), T completion positions (right-padded).

    Position t of a completion is the t-th generated token (0-based). Per-token quantities are
    aligned with the token they score: ``kl[b, t]`` is d_t for the distribution that produced
    ``completion_ids[b, t]``. A rollout sampled with ``score=False`` has not been through the
    teacher (``scored`` False): student_logp and teacher_logp are NaN, and so is kl until a
    caller fills it from the learner's ``token_kl`` (as `kat.train` does).
    """

    prompt_ids: Tensor  # (B, P) long, left-padded
    prompt_mask: Tensor  # (B, P) bool
    completion_ids: Tensor  # (B, T) long, right-padded with pad id
    completion_mask: Tensor  # (B, T) bool: tokens actually generated (EOS included)
    loss_mask: Tensor  # (B, T) bool: completion_mask and position < cut
    student_logp: Tensor  # (B, T) float32: log pi_s(y_t) at temperature 1, at rollout time
    teacher_logp: Tensor  # (B, T) float32: log pi_t(y_t)
    kl: Tensor  # (B, T) float32: exact reverse KL d_t at temperature 1
    stop: Tensor  # (B,) long: STOP_EOS / STOP_LENGTH / STOP_TRAP / STOP_RANDOM
    cut: Tensor  # (B,) long: first excluded position (= completion length when not cut)
    topk_ids: Tensor | None = None  # (B, T, K) long: the student's top-K ids (loss `topk`)
    teacher_topk_logp: Tensor | None = None  # (B, T, K+1) float32: teacher log-probs, last = tail
    shadow_cut: Tensor | None = None  # (B,) long: where a shadow detector would have cut, -1 if not
    scored: bool = True  # False: sampled with score=False; student_logp / teacher_logp are NaN

    @property
    def lengths(self) -> Tensor:
        """(B,) number of generated tokens per row."""
        return self.completion_mask.sum(-1)

    def select(self, rows: Tensor | slice) -> Rollout:
        """A Rollout of a subset of rows (micro-batching)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[rows] if isinstance(v, Tensor) else v
        return Rollout(**out)

    def to(self, device: torch.device | str) -> Rollout:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device) if isinstance(v, Tensor) else v
        return Rollout(**out)
