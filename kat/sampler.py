"""Chunked decoding of a student, scored by a teacher, with online termination.

One call of `sample` turns a batch of left-padded prompts into a `Rollout`. It runs in one of
three modes (`Mode`, chosen by `sampling_mode` from the terminator and `score`):

- lockstep: the teacher scores each chunk while the student decodes, which a terminator that
  reads the KL (`needs_kl`, e.g. `TrapDetector`) needs to stop a rollout early:

      prefill student and teacher on the prompts
      repeat until no row is alive on any process (kat.distributed; a process whose rows ended feeds a pad row):
          the student samples C tokens, one cached decode step each
          the teacher reads the same C tokens in ONE cached forward
          d_t = KL(p_student || q_teacher) at those C positions       (kat.scorer.reverse_kl)
          the terminator observes (d, valid) for the chunk and may fire with a cut
          rows that ended (EOS, max_new_tokens, terminator) leave both caches

- post-hoc: no terminator reads the KL (none, or a random cut that only counts positions), so
  the student decodes alone and the teacher scores the finished rollout in one forward.
- unscored: as post-hoc, but the teacher never runs here (`score=False`). With the `full` loss the
  learner runs the teacher over the rollout anyway and its per-token loss is exactly d_t (`learn`
  returns it as `token_kl`), so scoring here would run the teacher twice. The rollout's kl,
  student_logp and teacher_logp are NaN ("not scored") and no student logits are held.

Lockstep: the teacher's logits for completion position t come from its forward over token t-1.
Its chunk forward over tokens t..t+C-1 therefore yields the logits of positions t+1..t+C: the
first C-1 score this chunk together with the logits carried from before (the prefill's last
position for the first chunk), and the last one is carried to the next chunk. C = 1 is exact
token-level lockstep. A larger C costs the teacher one forward per C tokens instead of one per
token, and a row whose terminator fires stops at the end of that chunk (at most C-1 tokens later
than with C = 1). A terminator cut is not an end of sequence: no EOS is ever appended, the row
just stops, and the learner drops positions >= cut through `loss_mask`.

Kept teacher logits (lockstep only, `teacher_cache_mb` > 0): the `full` loss needs the teacher's
logits at every kept position, and lockstep has just computed them. Each chunk's (A, C, V) teacher
logits are held in the model dtype while the total stays within the budget, and packed at the end
into `Rollout.teacher_logits` at the loss_mask positions only (cut and post-EOS positions dropped),
so the learner does not run the teacher again. The budget bounds what is held while decoding
(every generated position: a later cut can reach back into earlier chunks); once it would be
exceeded, everything held is dropped and the learner runs the teacher as without a budget.

Post-hoc: the student keeps its per-chunk logits in the model dtype (the logits that actually
produced the tokens, so `student_logp` is the behaviour policy's log-prob exactly as in lockstep,
and no second student forward is needed); the teacher's one forward over prompt + completion is
then compared with them chunk by chunk. Held memory is one (rows, T, V) tensor per model in the
model dtype; no (B, T, V) fp32 tensor exists in any mode.

Temperature and top-p shape only which token is drawn. Every number the rollout records (kl,
student_logp, teacher_logp, top-k) is computed at temperature 1 on the raw logits, because the
objective and the learner's recomputed log-probs are defined on the student policy itself. With
temperature != 1 or top_p < 1 the samples come from a reshaped policy: slightly off-policy.

Reproducibility: each decode step draws one uniform per ORIGINAL row from `generator`, and a
row's token is found by inverse CDF over its own sorted (nucleus-filtered) probabilities. A row's
tokens therefore do not depend on which other rows are still in the batch, nor on the mode, so
C = 1, C = 8 and the three modes give the same tokens for one seed whenever the terminator
decides the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from kat.config import check_value
from kat.distributed import any_process, draw_range
from kat.draw import positions as _positions
from kat.draw import sample_token
from kat.draw import uniforms as _uniforms
from kat.rollout import STOP_EOS, STOP_LENGTH, RolloutBuffer
from kat.scorer import ChunkScores, check_finite, score_chunk


class Mode(str, Enum):
    """When the teacher scores a rollout (see the module docstring)."""

    LOCKSTEP = "lockstep"  # each chunk while decoding: a KL-driven terminator needs it
    POSTHOC = "post-hoc"  # one forward over the finished rollout
    UNSCORED = "unscored"  # never here: the `full` learner's teacher pass gives the KL


def sampling_mode(terminator, score: bool = True) -> Mode:
    """The mode `sample` runs in: lockstep whenever the terminator reads the KL, else `score` decides."""
    if terminator is not None and terminator.needs_kl:
        return Mode.LOCKSTEP
    return Mode.POSTHOC if score else Mode.UNSCORED


# ---------------------------------------------------------------------------------------------
# Model calls and cache row selection
# ---------------------------------------------------------------------------------------------

# The decode loop's SDPA backends on CUDA (None: PyTorch's choice). PyTorch picks cuDNN's fused
# attention for the masked decode step on Hopper GPUs; on an H200 leaving it out made this loop
# 1.07x and `generate` 3x faster (docs/results/gpu_scale_h200.md, run 3). The others take any
# mask; prefill and post-hoc scoring keep PyTorch's choice.
DECODE_SDPA_BACKENDS: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def decode_attention(device: torch.device):
    """A context in which attention on `device` uses `DECODE_SDPA_BACKENDS` (a no-op off CUDA)."""
    if device.type != "cuda" or DECODE_SDPA_BACKENDS is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, name) for name in DECODE_SDPA_BACKENDS])


def _forward(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache,
             use_cache: bool, logits_to_keep: int = 0) -> tuple[Tensor, object]:
    """One forward of an HF causal LM; returns logits (A, L', V) on the inputs' device and the cache.

    The full attention mask (prompt + everything generated so far) and explicit position ids are
    always passed: with left padding the model cannot infer positions from the cache length.
    """
    dev = model.device
    out = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                position_ids=position_ids.to(dev), cache=cache, use_cache=use_cache,
                logits_to_keep=logits_to_keep)
    return out.logits.to(input_ids.device), out.cache


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def _eos_ids(eos_token_id: int | Sequence[int], device: torch.device) -> Tensor:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)  # (E,)


def _check_args(prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, temperature: float,
                top_p: float, chunk: int, topk: int, score: bool, teacher_cache_mb: float) -> None:
    """Shapes here; the ranges are the config's (`kat.config.check_value`), so both reject alike."""
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be (B, P), got {tuple(prompt_ids.shape)} "
                         f"and {tuple(prompt_mask.shape)}")
    mask = prompt_mask.bool()
    if not mask[:, -1].all() or (mask[:, 1:].long() < mask[:, :-1].long()).any():
        raise ValueError("prompt_mask must be left-padded with at least one real token per row "
                         "(0s then 1s); set tokenizer.padding_side = 'left'")
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("chunk", chunk), ("teacher_cache_mb", teacher_cache_mb)):
        check_value(name, value)
    if topk != 0:  # 0: no top-k capture
        check_value("topk", topk)
    if not score and topk:
        raise ValueError("topk > 0 captures the teacher's top-K log-probs, which needs score=True")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

@dataclass
class _Active:
    """The rows still decoding (A of them) and what decoding them needs; the caches hold A rows."""

    rows: Tensor  # (A,) original row of each active row
    attn: Tensor  # (A, P + t) one column per generated position, 0 after EOS
    pos: Tensor  # (A,) position id of the next token (real prompt length + t)
    s_last: Tensor  # (A, V) student logits for the next position
    s_cache: object
    t_last: Tensor | None = None  # (A, V) lockstep: teacher logits for the next position
    t_cache: object = None
    pad: bool = False  # every row has ended; the one row left only feeds pad forwards (`_pad_chunk`)
    decode_steps: int = 0  # student decode forwards so far
    row_steps: int = 0  # rows sampled at each position, summed (the slot engine's slot_steps)
    error: FloatingPointError | None = None  # the first non-finite chunk, raised once decoding has ended

    def keep(self, live: Tensor) -> None:
        """Keep only the active rows where `live` (A,) holds, in the tensors and in both caches (in place;
        with none left, one row stays as the pad row)."""
        self.pad = not bool(live.any())
        idx = live.new_zeros(1, dtype=torch.long) if self.pad else live.nonzero().squeeze(-1)  # (A',)
        for cache in (self.s_cache, self.t_cache):  # a CPU index selects rows on any device, or across several
            if cache is not None:
                cache.batch_select_indices(idx.cpu())
        self.rows, self.attn, self.pos, self.s_last = self.rows[idx], self.attn[idx], self.pos[idx], self.s_last[idx]
        if self.t_last is not None:
            self.t_last = self.t_last[idx]


def _prefill(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, mode: Mode) -> _Active:
    """Both caches over the prompts (the teacher's in lockstep only). Only the last position's
    logits are kept: they predict completion token 0."""
    attn = prompt_mask.long()  # (B, P)
    act = _Active(rows=torch.arange(prompt_ids.shape[0], device=prompt_ids.device), attn=attn,
                  pos=attn.sum(dim=-1), s_last=None, s_cache=None)
    s_last, act.s_cache = _forward(student, prompt_ids, attn, _positions(attn), None, True, logits_to_keep=1)
    act.s_last = s_last[:, -1]  # (B, V)
    if mode is Mode.LOCKSTEP:
        t_last, act.t_cache = _forward(teacher, prompt_ids, attn, _positions(attn), None, True, logits_to_keep=1)
        act.t_last = t_last[:, -1]  # (B, V)
    return act


def _student_chunk(student, act: _Active, c: int, t: int, *, max_new_tokens: int, eos: Tensor,
                   pad_token_id: int, temperature: float, top_p: float, generator, first: int, n_draw: int,
                   keep_logits: bool) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """The student samples c tokens from position t; after a row's EOS it is fed pads that the mask hides.

    Returns tokens (A, c), valid (A, c), alive (A,) (no EOS yet) and, with `keep_logits`, the c
    logit tensors (A, V) that produced the tokens.
    """
    A, device = act.rows.numel(), act.rows.device
    alive = torch.ones(A, dtype=torch.bool, device=device)  # (A,)
    tokens = torch.full((A, c), pad_token_id, dtype=torch.long, device=device)  # (A, c)
    valid = torch.zeros((A, c), dtype=torch.bool, device=device)  # (A, c)
    # Set up once per chunk rather than per token: the mask grows inside one buffer (step j passes
    # a view of its first L + j + 1 columns) instead of a new concatenation per token, and the
    # position ids and this process's uniform indices are fixed for the chunk.
    L = act.attn.shape[1]
    attn = act.attn.new_zeros(A, L + c)  # (A, L + c)
    attn[:, :L] = act.attn
    positions = act.pos[:, None] + torch.arange(c, device=device)  # (A, c)
    draw = first + act.rows  # (A,) the active rows' uniforms among the n_draw of each step
    s_chunk = []
    for j in range(c):
        u = _uniforms(n_draw, generator, device)[draw] if temperature > 0 else None  # (A,)
        token = sample_token(act.s_last, u, temperature, top_p)  # (A,)
        tokens[:, j] = torch.where(alive, token, pad_token_id)
        valid[:, j] = alive
        attn[:, L + j] = alive  # 0 from the token after a row's EOS on
        alive = alive & torch.isin(token, eos, invert=True)
        if keep_logits:
            s_chunk.append(act.s_last)
        if t + j + 1 < max_new_tokens:  # the rollout's last token needs no next-token logits
            s_last, act.s_cache = _forward(student, tokens[:, j : j + 1], attn[:, : L + j + 1], positions[:, j : j + 1],
                                           act.s_cache, True)
            act.s_last = s_last[:, -1]  # (A, V)
            act.decode_steps += 1
        act.row_steps += A
    act.attn = attn  # (A, L + c)
    return tokens, valid, alive, s_chunk


def _teacher_chunk(teacher, act: _Active, tokens: Tensor, valid: Tensor, s_chunk: list[Tensor], t: int,
                   topk: int, buf: RolloutBuffer | None) -> ChunkScores:
    """Lockstep: the teacher reads the chunk in one cached forward (its output at token t+j
    predicts t+j+1); the chunk is scored into `buf`, which may keep the teacher's logits (no `buf`:
    a pad chunk, whose outputs are discarded)."""
    c = tokens.shape[1]
    s_logits = torch.stack(s_chunk, dim=1)  # (A, c, V) model dtype
    chunk_pos = act.pos[:, None] + torch.arange(c, device=tokens.device)  # (A, c)
    t_out, act.t_cache = _forward(teacher, tokens, act.attn, chunk_pos, act.t_cache, True)  # (A, c, V)
    t_logits = torch.cat([act.t_last[:, None], t_out[:, :-1]], dim=1)  # (A, c, V) positions t..t+c-1
    act.t_last = t_out[:, -1]  # (A, V) position t+c, for the next chunk
    scores = score_chunk(s_logits, t_logits, tokens, topk)
    try:
        check_finite(scores, valid, act.rows, t, s_logits, t_logits)
    except FloatingPointError as err:  # raised after decoding: other processes may still be decoding
        act.error = act.error or err
    if buf is not None:
        buf.write_scores(act.rows, t, scores, valid)
        buf.keep_teacher_logits(act.rows, t, t_logits)
    return scores


def _terminate(terminator, state, act: _Active, valid: Tensor, scores: ChunkScores | None, t: int,
               batch: int, stop: Tensor, cut: Tensor) -> Tensor:
    """Show the chunk to the terminator (KL 0 when unscored); record stop and cut of the rows it
    fires on, which take precedence over EOS and length. Returns the fired active rows (A,)."""
    rows, c = act.rows, valid.shape[1]
    kl_full = torch.zeros((batch, c), dtype=torch.float32, device=rows.device)  # (B, c)
    valid_full = torch.zeros((batch, c), dtype=torch.bool, device=rows.device)  # (B, c)
    if scores is not None:
        kl_full[rows] = torch.where(valid, scores.kl, 0.0)
    valid_full[rows] = valid
    extra = {}
    if getattr(terminator, "needs_teacher_logp", False):  # the drift gate reads log q(y_t) too
        logp_full = torch.zeros((batch, c), dtype=torch.float32, device=rows.device)  # (B, c)
        if scores is not None:
            logp_full[rows] = torch.where(valid, scores.teacher_logp, 0.0)
        extra["teacher_logp_chunk"] = logp_full
    fired, fired_cut = terminator.observe(state, kl_full, valid_full, **extra)  # (B,), (B,)
    fired = fired[rows].bool()  # (A,) only active rows can fire
    if fired.any():
        fired_rows = rows[fired]
        row_cut = fired_cut[fired_rows].long()
        if ((row_cut < 0) | (row_cut > t + c)).any():
            raise ValueError(f"terminator {type(terminator).__name__} fired rows "
                             f"{fired_rows.tolist()} with cut {row_cut.tolist()}, outside "
                             f"[0, {t + c}] (the positions generated so far)")
        stop[fired_rows] = int(terminator.stop_code)
        cut[fired_rows] = row_cut
    return fired


def _pad_chunk(teacher, act: _Active, mode: Mode, tokens: Tensor, valid: Tensor, s_chunk: list[Tensor], t: int,
               topk: int) -> int:
    """The teacher's lockstep forward of a pad chunk (the student's ran on the pad row); outputs are discarded."""
    if mode is Mode.LOCKSTEP:
        _teacher_chunk(teacher, act, tokens, valid, s_chunk, t, topk, None)
    act.pos = act.pos + tokens.shape[1]
    return t + tokens.shape[1]


def _score_posthoc(teacher, prompt_ids: Tensor, prompt_mask: Tensor, buf: RolloutBuffer,
                   held: list[tuple[Tensor, int, Tensor]], topk: int) -> None:
    """One teacher forward over prompt + completion, then the KL chunk by chunk against the held
    student logits (`held`: (rows, t0, (A, c, V) logits) per chunk)."""
    T = int(buf.completion_mask.sum(dim=-1).max())
    ids = torch.cat([prompt_ids, buf.completion_ids[:, :T]], dim=1)  # (B, P + T)
    mask = torch.cat([prompt_mask, buf.completion_mask[:, :T]], dim=1).long()  # (B, P + T)
    # the logits at sequence index P-1+j predict completion token j: keep the last T+1, drop the end
    t_logits, _ = _forward(teacher, ids, mask, _positions(mask), None, False, logits_to_keep=T + 1)
    t_logits = t_logits[:, :T]  # (B, T, V) model dtype
    for chunk_rows, t0, s_chunk in held:
        c = min(s_chunk.shape[1], T - t0)  # positions past T are after every row's end
        tokens = buf.completion_ids[chunk_rows, t0 : t0 + c]  # (A, c)
        valid = buf.completion_mask[chunk_rows, t0 : t0 + c]  # (A, c)
        s_c, t_c = s_chunk[:, :c], t_logits[chunk_rows, t0 : t0 + c]  # (A, c, V) each
        scores = score_chunk(s_c, t_c, tokens, topk)
        check_finite(scores, valid, chunk_rows, t0, s_c, t_c)
        buf.write_scores(chunk_rows, t0, scores, valid)


def _run_dynamic(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, *, mode: Mode, buf_args: tuple,
                 stop: Tensor, cut: Tensor, terminator, state, max_new_tokens: int, eos: Tensor, pad_token_id: int,
                 temperature: float, top_p: float, chunk: int, topk: int, generator, first: int,
                 n_draw: int) -> tuple[RolloutBuffer, dict]:
    """The DynamicCache loop (the module docstring): rows leave both caches as they end."""
    B = prompt_ids.shape[0]
    held: list[tuple[Tensor, int, Tensor]] = []  # post-hoc: (rows, t0, student chunk logits)
    act = _prefill(student, teacher, prompt_ids, prompt_mask, mode)
    topk = min(topk, act.s_last.shape[-1])  # K >= V keeps the whole vocabulary (empty tail)
    buf = RolloutBuffer(B, max_new_tokens, topk, *buf_args)
    if mode is Mode.UNSCORED:
        buf.mark_unscored()
    t = 0  # completion position of the chunk's first token
    while any_process(not act.pad):  # until no row is alive on any process (kat.distributed)
        c = min(chunk, max_new_tokens - t)
        tokens, valid, alive, s_chunk = _student_chunk(
            student, act, c, t, max_new_tokens=max_new_tokens, eos=eos, pad_token_id=pad_token_id,
            temperature=temperature, top_p=top_p, generator=generator, first=first, n_draw=n_draw,
            keep_logits=mode is not Mode.UNSCORED)
        if act.pad:  # every row here has ended: the pad row keeps this process's forwards in step
            t = _pad_chunk(teacher, act, mode, tokens, valid, s_chunk, t, topk)
            continue
        buf.write_tokens(act.rows, t, tokens, valid)
        scores = None
        if mode is Mode.LOCKSTEP:
            scores = _teacher_chunk(teacher, act, tokens, valid, s_chunk, t, topk, buf)
        elif mode is Mode.POSTHOC:
            held.append((act.rows, t, torch.stack(s_chunk, dim=1)))  # (A, c, V) model dtype
        act.pos = act.pos + c

        # Which rows end here: EOS, length, or the terminator.
        ended = ~alive | (t + c >= max_new_tokens)  # (A,)
        stop[act.rows[~alive]] = STOP_EOS
        if terminator is not None:
            ended = ended | _terminate(terminator, state, act, valid, scores, t, B, stop, cut)
        t += c
        if ended.any():  # ended rows leave the batch and both caches, so later chunks cost less
            act.keep(~ended)
    return buf, {"held": held, "error": act.error, "decode_steps": act.decode_steps, "slot_steps": act.row_steps,
                 "topk": topk}


def _run_slots(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, *, mode: Mode, buf_args: tuple,
               slots: int, compiled: bool, **kw) -> tuple[RolloutBuffer, dict]:
    """The slot engine (kat.engine): S slots of fixed-shape caches, refilled as rows end."""
    from kat.engine import run_slots

    vocab = student.get_output_embeddings().weight.shape[0]
    topk = min(kw.pop("topk"), vocab)
    buf = RolloutBuffer(prompt_ids.shape[0], kw["max_new_tokens"], topk, *buf_args)
    if mode is Mode.UNSCORED:
        buf.mark_unscored()
    out = run_slots(student, teacher, prompt_ids, prompt_mask, slots=slots, lockstep=mode is Mode.LOCKSTEP,
                    keep_logits=mode is not Mode.UNSCORED, buf=buf, topk=topk, compiled=compiled, **kw)
    return buf, {**out, "topk": topk}


DECODES = ("dynamic", "static")


@torch.no_grad()
def sample(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
           eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0,
           top_p: float = 1.0, chunk: int = 8, terminator=None, topk: int = 0,
           generator: torch.Generator | None = None, global_rows: tuple[int, int] | None = None,
           score: bool = True, teacher_cache_mb: float = 0.0, slots: int = 0, decode: str = "dynamic"):
    """Sample completions from `student`, scored by `teacher`, with online termination.

    Args:
        student, teacher: HF causal LMs in eval mode (unwrapped), sharing one vocabulary.
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        max_new_tokens: completion length limit (rows reaching it stop with STOP_LENGTH).
        eos_token_id: id or list of ids that end a row (the EOS is part of the completion; [] disables).
        pad_token_id: fills completion positions after a row's end.
        temperature, top_p: sampling only (0 = greedy); all recorded numbers are at temperature 1.
        chunk: C, tokens the student samples between two teacher forwards (1 = exact lockstep).
        terminator: None, or an object with `needs_kl`, `stop_code`, `shadow`, `start(B, device=)` and
            `observe(state, kl_chunk, valid_chunk) -> (fired, cut)` ((B, C) in, (B,) out, called once per
            chunk while a row is active here; rows that already ended have valid False).
        topk: K > 0 also captures the student's top-K ids and the teacher's K+1 log-probs.
        generator: source of the sampling randomness (one uniform per original row per step).
        global_rows: (offset, total): these B rows are rows offset..offset+B-1 of `total` split across
            processes (tokens then do not depend on the process count: `kat.distributed.draw_range`).
            With torch.distributed, all processes call `sample` together; it ends when none decodes.
        score: False selects the unscored mode when no terminator needs the KL while decoding:
            kl / student_logp / teacher_logp stay NaN and the teacher never runs here.
        teacher_cache_mb: lockstep only: keep the teacher's logits at kept positions in `Rollout.teacher_logits`
            (the `full` loss's target) while what is held fits this many MiB (0: never; module docstring).
        slots: S > 0 streams the B rows through S slots of fixed-shape caches, refilled as rows end
            (kat.engine); 0 with decode "dynamic" is the DynamicCache loop above. The tokens are the same.
        decode: "dynamic" (DynamicCache; the slot engine when slots > 0) or "static" (the slot engine,
            S = slots or B, its decode step compiled with CUDA graphs on a CUDA device).
    Returns:
        (rollout, state): the `Rollout` (T = longest completion) and the terminator state to pass
        to `terminator.end_batch` (None without a terminator). `rollout.engine` holds the counts
        (decode_steps: student decode forwards; slot_steps: rows (slots) sampled, summed over positions).
    """
    _check_args(prompt_ids, prompt_mask, max_new_tokens, temperature, top_p, chunk, topk, score, teacher_cache_mb)
    if decode not in DECODES or not isinstance(slots, int) or slots < 0:
        raise ValueError(f"decode must be one of {DECODES} and slots a non-negative int, got {decode!r}, {slots!r}")
    device, B = prompt_ids.device, prompt_ids.shape[0]
    prompt_mask = prompt_mask.bool()
    first, n_draw = draw_range(global_rows, B)
    mode = sampling_mode(terminator, score)
    state = terminator.start(B, device=device) if terminator is not None else None
    stop = torch.full((B,), STOP_LENGTH, dtype=torch.long, device=device)  # overwritten on EOS / fire
    cut = torch.full((B,), -1, dtype=torch.long, device=device)  # -1: not cut
    kw = dict(mode=mode, buf_args=(pad_token_id, device, teacher_cache_mb * (mode is Mode.LOCKSTEP)), stop=stop,
              cut=cut, terminator=terminator, state=state, max_new_tokens=max_new_tokens,
              eos=_eos_ids(eos_token_id, device), pad_token_id=pad_token_id, temperature=temperature, top_p=top_p,
              chunk=chunk, topk=topk, generator=generator, first=first, n_draw=n_draw)
    with decode_attention(student.device):  # CUDA: no cuDNN attention while decoding (DECODE_SDPA_BACKENDS)
        if slots > 0 or decode == "static":
            buf, out = _run_slots(student, teacher, prompt_ids, prompt_mask, slots=slots,
                                  compiled=decode == "static", **kw)
        else:
            buf, out = _run_dynamic(student, teacher, prompt_ids, prompt_mask, **kw)
    if out["error"] is not None:
        raise out["error"]
    if mode is Mode.POSTHOC:
        _score_posthoc(teacher, prompt_ids, prompt_mask, buf, out["held"], out["topk"])
    shadow_cut = state.would_cut.clone() if terminator is not None and terminator.shadow else None  # (B,)
    rollout = buf.to_rollout(prompt_ids, prompt_mask, stop, cut, shadow_cut, mode is not Mode.UNSCORED)
    rollout.engine = {"decode_steps": float(out["decode_steps"]), "slot_steps": float(out["slot_steps"])}
    return rollout, state
