"""The `Rollout`: everything one batch of on-policy samples carries from the sampler to the learner."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kat.scorer import ChunkScores

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

    ``teacher_logits``, when present, holds the teacher's logits at the N positions of
    ``loss_mask`` only, packed row-major (row 0's kept positions in order, then row 1's, ...):
    the lockstep sampler keeps them for the ``full`` loss so that the learner need not run the
    teacher again (`kat.sampler.sample`'s ``teacher_cache_mb``). `select` picks the packed rows
    of the selected rows with them.
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
    teacher_logits: Tensor | None = None  # (N, V) model dtype, N = loss_mask.sum(): see above
    # the sampler's counts of the batch (decode_steps, slot_steps): an attribute, not a field (not per row)
    engine: ClassVar[dict | None] = None

    @property
    def lengths(self) -> Tensor:
        """(B,) number of generated tokens per row."""
        return self.completion_mask.sum(-1)

    def select(self, rows: Tensor | slice) -> Rollout:
        """A Rollout of a subset of rows (micro-batching)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "teacher_logits" and v is not None:
                out[f.name] = v[self._packed(rows)]
            else:
                out[f.name] = v[rows] if isinstance(v, Tensor) else v
        return Rollout(**out)

    def _packed(self, rows: Tensor | slice) -> Tensor | slice:
        """Index into the packed ``teacher_logits`` of the kept positions of `rows`, in their order."""
        counts = self.loss_mask.sum(-1).cpu()  # (B,)
        ends = counts.cumsum(0)  # (B,) row b's kept positions are ends[b] - counts[b] .. ends[b] - 1
        if isinstance(rows, slice) and rows.step in (None, 1):  # consecutive rows: a view, no copy
            picked = range(len(counts))[rows]
            if len(picked) == 0:
                return slice(0, 0)
            return slice(int(ends[picked[0]] - counts[picked[0]]), int(ends[picked[-1]]))
        picked = torch.arange(len(counts))[rows.cpu() if isinstance(rows, Tensor) else rows]  # (b,) any index
        first = (ends - counts)[picked]  # (b,)
        row_of = torch.repeat_interleave(torch.arange(len(picked)), counts[picked])  # (n,)
        offset = torch.arange(len(row_of)) - (counts[picked].cumsum(0) - counts[picked])[row_of]  # (n,)
        return (first[row_of] + offset).to(self.teacher_logits.device)  # (n,)

    def trim(self) -> Rollout:
        """The same rows without the columns that are padding in every row: prompt columns before the
        first real token of any row, completion columns past the longest completion. Nothing a loss
        reads changes (pads are never attended and positions come from the mask), and a micro-batch
        of short rows then costs what its rows are long, not what the whole batch's longest is."""
        first = int(self.prompt_mask.any(0).long().argmax()) if self.prompt_mask.numel() else 0
        T = int(self.lengths.max()) if self.completion_mask.numel() else 0
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("prompt_ids", "prompt_mask"):
                v = v[:, first:]  # (b, P')
            elif isinstance(v, Tensor) and v.dim() >= 2 and f.name != "teacher_logits":
                v = v[:, :T]  # (b, T', ...)
            out[f.name] = v
        return Rollout(**out)

    def with_kl(self, kl: Tensor) -> Rollout:
        """The same rollout with `kl` replaced (an unscored rollout takes the learner's d_t); the
        sampler's counts go with it."""
        out = replace(self, kl=kl)
        out.engine = self.engine
        return out

    def to(self, device: torch.device | str) -> Rollout:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device) if isinstance(v, Tensor) else v
        return Rollout(**out)


def pack_kept(chunks: list[tuple[Tensor, int, Tensor]] | None, loss_mask: Tensor) -> Tensor | None:
    """`Rollout.teacher_logits` from per-chunk logits: (N, V) at the N loss_mask positions, row-major.

    chunks: (rows, t0, (A, c, V) logits of positions t0..t0+c-1 of those rows), covering every
    loss_mask position once; None or empty: nothing kept. Each chunk is released from the list
    once copied, so the peak is what the chunks hold plus the packed result.
    """
    if not chunks:
        return None
    T, first = loss_mask.shape[1], chunks[0][2]
    slot = (loss_mask.flatten().cumsum(0) - 1).view_as(loss_mask)  # (B, T) packed row of a kept position
    out = first.new_empty(int(loss_mask.sum()), first.shape[-1])  # (N, V)
    while chunks:
        rows, t0, logits = chunks.pop(0)
        c = min(logits.shape[1], T - t0)
        kept = loss_mask[rows, t0 : t0 + c]  # (A, c)
        out[slot[rows, t0 : t0 + c][kept]] = logits[:, :c][kept]  # (n, V)
    return out


class RolloutBuffer:
    """What `kat.sampler.sample` fills: full-batch (B, max_new_tokens, ...) outputs that each chunk
    writes its active rows into, trimmed into a `Rollout` at the end."""

    def __init__(self, batch: int, max_new_tokens: int, topk: int, pad_token_id: int, device: torch.device,
                 teacher_cache_mb: float = 0.0):
        shape = (batch, max_new_tokens)
        self.completion_ids = torch.full(shape, pad_token_id, dtype=torch.long, device=device)
        self.completion_mask = torch.zeros(shape, dtype=torch.bool, device=device)
        self.student_logp = torch.zeros(shape, dtype=torch.float32, device=device)
        self.teacher_logp = torch.zeros(shape, dtype=torch.float32, device=device)
        self.kl = torch.zeros(shape, dtype=torch.float32, device=device)
        self.topk_ids = self.teacher_topk_logp = None
        if topk > 0:
            self.topk_ids = torch.zeros(*shape, topk, dtype=torch.long, device=device)
            self.teacher_topk_logp = torch.zeros(*shape, topk + 1, dtype=torch.float32, device=device)
        # lockstep teacher logits kept for the `full` loss: (rows, t0, (A, c, V)) per chunk; None = not kept
        self.teacher_chunks: list[tuple[Tensor, int, Tensor]] | None = [] if teacher_cache_mb > 0 else None
        self.teacher_budget, self.teacher_held = teacher_cache_mb * 2**20, 0

    def mark_unscored(self) -> None:
        """Nothing will score these rows: their numbers are absent (NaN), not 0."""
        for name in ("kl", "student_logp", "teacher_logp"):
            getattr(self, name).fill_(float("nan"))

    def write_tokens(self, rows: Tensor, t0: int, tokens: Tensor, valid: Tensor) -> None:
        c = tokens.shape[1]
        self.completion_ids[rows, t0 : t0 + c] = tokens  # (A, c), pad where invalid
        self.completion_mask[rows, t0 : t0 + c] = valid  # (A, c)

    def write_scores(self, rows: Tensor, t0: int, scores: ChunkScores, valid: Tensor) -> None:
        """Store a chunk's scores; positions after a row's EOS (valid False) stay 0."""
        c = valid.shape[1]
        for name in ("kl", "student_logp", "teacher_logp"):
            getattr(self, name)[rows, t0 : t0 + c] = torch.where(valid, getattr(scores, name), 0.0)
        if self.topk_ids is not None:
            v = valid[..., None]  # (A, c, 1)
            self.topk_ids[rows, t0 : t0 + c] = torch.where(v, scores.topk_ids, 0)
            self.teacher_topk_logp[rows, t0 : t0 + c] = torch.where(v, scores.teacher_topk_logp, 0.0)

    def keep_teacher_logits(self, rows: Tensor, t0: int, logits: Tensor) -> None:
        """Hold a chunk's teacher logits (A, c, V) while the total fits the budget; past it, drop
        everything held and keep nothing more (the learner then runs the teacher)."""
        if self.teacher_chunks is None:
            return
        self.teacher_held += logits.numel() * logits.element_size()
        if self.teacher_held > self.teacher_budget:
            self.teacher_chunks = None
            return
        self.teacher_chunks.append((rows, t0, logits))

    def to_rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, stop: Tensor, cut: Tensor,
                   shadow_cut: Tensor | None, scored: bool) -> Rollout:
        """Trim to T = the longest completion and fill `cut` / `loss_mask` for rows that were not cut."""
        lengths = self.completion_mask.sum(dim=-1)  # (B,)
        T = int(lengths.max())
        cut = torch.where(cut < 0, lengths, cut)  # (B,) uncut rows: cut = completion length
        position = torch.arange(T, device=cut.device)  # (T,)
        completion_mask = self.completion_mask[:, :T]  # (B, T)
        loss_mask = completion_mask & (position[None, :] < cut[:, None])  # (B, T)
        return Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            completion_ids=self.completion_ids[:, :T], completion_mask=completion_mask, loss_mask=loss_mask,
            student_logp=self.student_logp[:, :T], teacher_logp=self.teacher_logp[:, :T],
            kl=self.kl[:, :T], stop=stop, cut=cut,
            topk_ids=None if self.topk_ids is None else self.topk_ids[:, :T],
            teacher_topk_logp=None if self.teacher_topk_logp is None else self.teacher_topk_logp[:, :T],
            shadow_cut=shadow_cut, scored=scored, teacher_logits=pack_kept(self.teacher_chunks, loss_mask),
        )
