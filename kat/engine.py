"""The slot engine: a step's rollouts stream through S slots of fixed-shape KV caches (kat.slots).

`kat.sampler.sample` runs here when `slots` > 0 or `decode` is "static". Every forward covers all
S slots, so shapes never change while decoding:

    while a slot is busy or a prompt waits, on any process (kat.distributed):
        refill: each empty slot takes the next waiting prompt (student and, in lockstep, teacher
                prefill of those slots only; a process with nothing to refill runs a pad forward)
        the student samples C tokens over the S slots, one (S, 1) cached forward each
        lockstep: the teacher reads the (S, C) chunk in one cached forward; the chunk is scored
        rows that ended (EOS, max_new_tokens, terminator) free their slots

A rollout's own positions run 0, C, 2C, ... at the chunk boundaries wherever it starts, so the
terminator decides at the same positions as in `kat.sampler`'s loop. Slots hold rows at different
positions; the terminator, written for one position per batch, is shown each group of rows that
share a position through a view of its state restricted to those rows (`observe_rows`), and its
state keeps every rollout of the step, so `end_batch` sees all of them.

Randomness: the sampler's loop draws one uniform per global row per decode position, in order,
from the step's generator. `UniformTable` draws the same numbers in the same order into a
(positions x rows) table, and a row reads entry (its position, its global row) whenever it runs.
Its tokens are therefore today's tokens, whatever S, the refill order or the process count.

On CUDA with `compiled`, the per-token decode step (student forward + sampling) runs through
torch.compile with CUDA graphs (`decode_step_fn`); the teacher's chunk forward keeps static shapes.
No host synchronisation happens inside a chunk: the bookkeeping that reads values (which rows
ended) runs once per chunk.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from kat.distributed import any_process
from kat.draw import positions, sample_token, uniforms
from kat.rollout import STOP_EOS, RolloutBuffer
from kat.scorer import check_finite, score_chunk
from kat.slots import SlotCache


class UniformTable:
    """Row p holds the p-th (n_draw,) draw of `generator`: the uniforms of decode position p."""

    def __init__(self, positions: int, n_draw: int, generator: torch.Generator | None, device: torch.device):
        self.table = torch.zeros(positions, n_draw, dtype=torch.float32, device=device)
        self.drawn, self.n_draw, self.generator, self.device = 0, n_draw, generator, device

    def extend(self, upto: int) -> None:
        """Draw positions up to `upto` (exclusive), one call per position as the sampler's loop does."""
        while self.drawn < min(upto, self.table.shape[0]):
            self.table[self.drawn] = uniforms(self.n_draw, self.generator, self.device)
            self.drawn += 1


def observe_rows(terminator, state, rows: Tensor, t0: int, kl: Tensor, valid: Tensor, logp: Tensor | None):
    """`terminator.observe` for `rows` (R,) of the step, all at completion position t0, on a view of
    `state` restricted to them; what it changes is written back. Returns (fired (R,), cut (R,))."""
    batch = state.fired.shape[0]
    sub = {}
    for f in fields(state):
        v = getattr(state, f.name)
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            sub[f.name] = v[rows]
        elif isinstance(v, list):
            sub[f.name] = []
    sub = replace(state, **sub, pos=t0)
    extra = {"teacher_logp_chunk": logp} if getattr(terminator, "needs_teacher_logp", False) else {}
    fired, cut = terminator.observe(sub, kl, valid, **extra)
    for f in fields(state):
        v, w = getattr(state, f.name), getattr(sub, f.name)
        if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch:
            v[rows] = w
        elif isinstance(v, list):
            for entry in w:  # (R,) per evaluation: the step's (B,) with NaN for the other rows
                full = entry.new_full((batch,), float("nan"))
                full[rows] = entry
                v.append(full)
    return fired.bool(), cut


def _forward(model, ids: Tensor, mask4d: Tensor, positions: Tensor, cache, keep: int = 0) -> Tensor:
    dev = model.device
    out = model(input_ids=ids.to(dev), attention_mask=mask4d.to(dev), position_ids=positions.to(dev),
                cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits.to(ids.device)


def decode_step(student, cache: SlotCache, s_last: Tensor, u: Tensor | None, alive: Tensor, room: Tensor,
                advance: Tensor, positions: Tensor, eos: Tensor, pad_token_id: int, temperature: float,
                top_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One token over all S slots: sample from s_last (S, V), then the student's (S, 1) forward.

    alive (S,): rows not ended; room (S,): the position still within max_new_tokens. Returns
    (token (S,), valid (S,), alive (S,), next logits (S, V)). Shapes never change, no host sync.
    """
    token = sample_token(s_last, u, temperature, top_p)  # (S,)
    valid = alive & room  # (S,)
    token = torch.where(valid, token, pad_token_id)
    alive = alive & ~(valid & torch.isin(token, eos))
    mask = cache.plan(None, valid[:, None], student.dtype, advance=advance)  # (S, 1, 1, capacity)
    logits = _forward(student, token[:, None], mask, positions[:, None], cache)
    return token, valid, alive, logits[:, -1]


_COMPILED: dict[tuple, object] = {}


def _graphed(fn):
    """A CUDA-graph step: each call is a new graph step, and what outlives the call is cloned
    (a replay overwrites the graph's output buffers)."""
    def step(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(x.clone() for x in fn(*args))
    return step


def decode_step_fn(student, compiled: bool, backend: str | None = None):
    """`decode_step` as run: through torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs)
    for a CUDA student when `compiled`, eager otherwise; `backend` compiles it with that backend on
    any device (the CPU tests: the step traces as one graph). One compiled function per student."""
    if backend is not None:
        key = (id(student), backend)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False)
        return _COMPILED[key]
    if not (compiled and student.device.type == "cuda"):
        return decode_step
    key = (id(student), "cudagraphs")
    if key not in _COMPILED:
        _COMPILED[key] = _graphed(torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False))
    return _COMPILED[key]


class _Slots:
    """Which row each slot holds and what decoding it needs (the host lists change at chunk boundaries only)."""

    def __init__(self, student, teacher, S: int, capacity: int, lockstep: bool, device: torch.device):
        self.row = [-1] * S  # local row held by each slot, -1: empty
        self.t = [0] * S  # completion position of each slot's next token
        self.s_cache = SlotCache.for_model(student, S, capacity)
        self.t_cache = SlotCache.for_model(teacher, S, capacity) if lockstep else None
        self.base = torch.zeros(S, dtype=torch.long, device=device)  # real prompt length of each slot's row
        self.s_last: Tensor | None = None  # (S, V) student logits for each slot's next position
        self.t_last: Tensor | None = None  # (S, V) lockstep: teacher logits for it
        self.device = device

    def busy(self) -> list[int]:
        return [s for s, r in enumerate(self.row) if r >= 0]

    def tensor(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _prefill_slots(model, cache: SlotCache, slots: Tensor, ids: Tensor, mask: Tensor, last: Tensor | None) -> Tensor:
    """Empty `slots` and run `model` over their new prompts (k, P); the last position's logits go
    into `last` (S, V) at those slots (allocated on first use). Returns `last`."""
    cache.reset(slots)
    attn = cache.plan(slots, mask, model.dtype)  # (k, 1, P, capacity)
    logits = _forward(model, ids, attn, positions(mask.long()), cache, keep=1)[:, -1]  # (k, V)
    if last is None:
        last = logits.new_zeros(cache.slots, logits.shape[-1])
    last[slots] = logits
    return last


def _pad_forward(model, device: torch.device) -> None:
    """A forward whose output is discarded: a process with no prompt to prefill joins the others'."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _refill(student, teacher, sl: _Slots, queue: list[int], prompt_ids: Tensor, prompt_mask: Tensor,
            lockstep: bool, counts: dict) -> None:
    """Empty slots take the next waiting rows; every process runs the prefill forwards when any does."""
    free = [s for s, r in enumerate(sl.row) if r < 0]
    take = min(len(free), len(queue))
    if not any_process(take > 0):
        return
    counts["prefills"] += 1
    if take == 0:  # this process has nothing to prefill: pad forwards keep the forward counts equal
        _pad_forward(student, sl.device)
        if lockstep:
            _pad_forward(teacher, sl.device)
        return
    slots, rows = free[:take], queue[:take]
    del queue[:take]
    for s, r in zip(slots, rows):
        sl.row[s], sl.t[s] = r, 0
    slot_ix, row_ix = sl.tensor(slots), sl.tensor(rows)
    ids, mask = prompt_ids[row_ix], prompt_mask[row_ix]
    sl.base[slot_ix] = mask.long().sum(-1)
    sl.s_last = _prefill_slots(student, sl.s_cache, slot_ix, ids, mask, sl.s_last)
    if lockstep:
        sl.t_last = _prefill_slots(teacher, sl.t_cache, slot_ix, ids, mask, sl.t_last)


def _student_chunk(student, sl: _Slots, table: UniformTable, first: int, c: int, max_new_tokens: int, eos: Tensor,
                   pad_token_id: int, temperature: float, top_p: float, keep_logits: bool, step_fn,
                   counts: dict) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """C tokens over all slots. Returns tokens (S, C), valid (S, C), alive (S,) at the chunk's end and,
    with `keep_logits`, the C (S, V) logits that produced them."""
    S, device = len(sl.row), sl.device
    busy = sl.tensor([int(r >= 0) for r in sl.row]).bool()  # (S,)
    t0 = sl.tensor(sl.t)  # (S,)
    column = first + sl.tensor([max(r, 0) for r in sl.row])  # (S,) each slot's global row
    room = max_new_tokens - t0  # (S,) positions left in each row
    if temperature > 0:
        table.extend(max([sl.t[s] for s in sl.busy()], default=0) + c)
    alive = busy.clone()
    tokens = torch.full((S, c), pad_token_id, dtype=torch.long, device=device)  # (S, C)
    valid = torch.zeros((S, c), dtype=torch.bool, device=device)  # (S, C)
    s_chunk = []
    for j in range(c):
        # an empty slot reads entry 0 of its column: a number that no row uses for a token
        u = table.table[(t0 + j).clamp(max=table.table.shape[0] - 1) * busy, column] if temperature > 0 else None
        if keep_logits:
            s_chunk.append(sl.s_last)
        tok, valid[:, j], alive, sl.s_last = step_fn(student, sl.s_cache, sl.s_last, u, alive, room > j, busy,
                                                     sl.base + t0 + j, eos, pad_token_id, temperature, top_p)
        tokens[:, j] = tok
        counts["decode_steps"] += 1
    return tokens, valid, alive, s_chunk


def _teacher_chunk(teacher, sl: _Slots, tokens: Tensor, valid: Tensor) -> Tensor:
    """The teacher reads the (S, C) chunk in one cached forward; returns its logits of the chunk's
    positions (S, C, V) (the first from the carried logits) and carries the last to the next chunk."""
    c = tokens.shape[1]
    busy = sl.tensor([int(r >= 0) for r in sl.row]).bool()  # (S,)
    positions = sl.base[:, None] + sl.tensor(sl.t)[:, None] + torch.arange(c, device=sl.device)  # (S, C)
    mask = sl.t_cache.plan(None, valid, teacher.dtype, advance=busy)  # (S, 1, C, capacity)
    out = _forward(teacher, tokens, mask, positions, sl.t_cache)  # (S, C, V)
    t_logits = torch.cat([sl.t_last[:, None], out[:, :-1]], dim=1)  # (S, C, V)
    sl.t_last = out[:, -1]
    return t_logits


def _groups(sl: _Slots) -> dict[int, list[int]]:
    """Busy slots grouped by their rows' position (rows that started at the same boundary)."""
    out: dict[int, list[int]] = {}
    for s in sl.busy():
        out.setdefault(sl.t[s], []).append(s)
    return out


def _book_chunk(sl: _Slots, tokens: Tensor, valid: Tensor, alive: Tensor, s_chunk: list[Tensor],
                t_logits: Tensor | None, ctx: dict) -> None:
    """A chunk's outputs into the buffer, group by group (rows at one position): tokens, scores or
    held logits, the terminator's decisions, and the slots of the rows that ended set free."""
    buf, term, state, C = ctx["buf"], ctx["terminator"], ctx["state"], tokens.shape[1]
    s_logits = torch.stack(s_chunk, dim=1) if s_chunk else None  # (S, C, V)
    for t0, group in _groups(sl).items():
        c = min(C, ctx["max_new_tokens"] - t0)
        ix, rows = sl.tensor(group), sl.tensor([sl.row[s] for s in group])
        tok, val = tokens[ix, :c], valid[ix, :c]  # (R, c)
        buf.write_tokens(rows, t0, tok, val)
        scores = None
        if t_logits is not None:  # lockstep
            s_c, t_c = s_logits[ix, :c], t_logits[ix, :c]
            scores = score_chunk(s_c, t_c, tok, ctx["topk"])
            try:
                check_finite(scores, val, rows, t0, s_c, t_c)
            except FloatingPointError as err:  # raised after decoding: other processes may still be decoding
                ctx["error"] = ctx["error"] or err
            buf.write_scores(rows, t0, scores, val)
            buf.keep_teacher_logits(rows, t0, t_c)
        elif s_logits is not None:  # post-hoc: the teacher scores the finished rollout
            ctx["held"].append((rows, t0, s_logits[ix, :c]))
        ended = ~alive[ix] | (t0 + c >= ctx["max_new_tokens"])  # (R,)
        ctx["stop"][rows[~alive[ix]]] = STOP_EOS
        if term is not None:
            ended = ended | _decide(term, state, rows, t0, c, val, scores, ctx)
        for s, e in zip(group, ended.tolist()):
            sl.t[s] += C
            if e:
                sl.row[s] = -1
        ctx["tokens"] += int(val.sum())


def _decide(term, state, rows: Tensor, t0: int, c: int, valid: Tensor, scores, ctx: dict) -> Tensor:
    """The terminator's view of one group's chunk (KL 0 when unscored); stop and cut of the rows it fires on."""
    kl = torch.where(valid, scores.kl, 0.0) if scores is not None else torch.zeros(valid.shape, device=valid.device)
    logp = None
    if getattr(term, "needs_teacher_logp", False):
        logp = torch.where(valid, scores.teacher_logp, 0.0) if scores is not None else torch.zeros_like(kl)
    fired, cut = observe_rows(term, state, rows, t0, kl.float(), valid, logp)
    if fired.any():
        fired_rows, row_cut = rows[fired], cut[fired].long()
        if ((row_cut < 0) | (row_cut > t0 + c)).any():
            raise ValueError(f"terminator {type(term).__name__} fired rows {fired_rows.tolist()} with cut "
                             f"{row_cut.tolist()}, outside [0, {t0 + c}] (the positions generated so far)")
        ctx["stop"][fired_rows] = int(term.stop_code)
        ctx["cut"][fired_rows] = row_cut
    return fired


def _free(sl: _Slots) -> None:
    """Empty the caches of slots whose rows ended (their write positions stop moving)."""
    empty = sl.tensor([s for s, r in enumerate(sl.row) if r < 0])
    if empty.numel():
        for cache in (sl.s_cache, sl.t_cache):
            if cache is not None:
                cache.reset(empty)


def run_slots(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, *, slots: int, lockstep: bool,
              keep_logits: bool, buf: RolloutBuffer, stop: Tensor, cut: Tensor, terminator, state,
              max_new_tokens: int, eos: Tensor, pad_token_id: int, temperature: float, top_p: float,
              chunk: int, topk: int, generator, first: int, n_draw: int, compiled: bool = False,
              backend: str | None = None) -> dict:
    """Decode the B prompts through min(slots, B) slots into `buf`, `stop` and `cut` (see the module
    docstring). Returns the post-hoc held logits, the first non-finite error and the counts
    (decode_steps: student decode forwards; slot_steps: slots x decode forwards; tokens generated)."""
    B, P = prompt_ids.shape
    S = min(slots, B) if slots > 0 else B
    sl = _Slots(student, teacher, S, P + max_new_tokens + chunk, lockstep, prompt_ids.device)
    table = UniformTable(max_new_tokens + chunk, n_draw, generator, prompt_ids.device)
    step_fn = decode_step_fn(student, compiled, backend)
    counts = {"decode_steps": 0, "prefills": 0}
    ctx = {"buf": buf, "terminator": terminator, "state": state, "stop": stop, "cut": cut, "held": [],
           "error": None, "max_new_tokens": max_new_tokens, "topk": topk, "tokens": 0}
    queue = list(range(B))
    while any_process(bool(queue) or bool(sl.busy())):  # same loop count on every process (kat.distributed)
        _refill(student, teacher, sl, queue, prompt_ids, prompt_mask, lockstep, counts)
        tokens, valid, alive, s_chunk = _student_chunk(student, sl, table, first, chunk, max_new_tokens, eos,
                                                       pad_token_id, temperature, top_p, keep_logits, step_fn,
                                                       counts)
        t_logits = _teacher_chunk(teacher, sl, tokens, valid) if lockstep else None
        _book_chunk(sl, tokens, valid, alive, s_chunk, t_logits, ctx)
        _free(sl)
    return {"held": ctx["held"], "error": ctx["error"], "decode_steps": counts["decode_steps"],
            "slot_steps": counts["decode_steps"] * S, "tokens": ctx["tokens"], "prefills": counts["prefills"]}


def decode_row(sums: dict, processes: int) -> dict:
    """The step's metrics from the sums over processes: decode_steps (student decode forwards, the
    same on every process) and slot_occupancy (generated tokens per slot and decode forward)."""
    if "decode_steps" not in sums:
        return {}
    return {"decode_steps": sums["decode_steps"] / processes,
            "slot_occupancy": sums["tokens"] / max(sums["slot_steps"], 1.0)}
