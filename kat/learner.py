"""The learner: OPD losses on a `Rollout` and one optimiser step over it.

Objective (the student minimises reverse KL on its own samples, teacher frozen):

    J(theta) = E_{y ~ pi_s} [ sum_t d_t ],   d_t = sum_v p(v) (log p(v) - log q(v))

Three estimators of the per-token term (`kind`):
- ``full``:    exact d_t over the vocabulary; the teacher's logits are recomputed (no grad),
               or taken from ``rollout.teacher_logits`` when the lockstep sampler kept them
               (then the teacher does not run here). Its per-token values are d_t itself, so
               `learn` also returns them (`token_kl`) for rollouts sampled with ``score=False``.
- ``topk``:    the student's top-K set S captured at rollout time plus one pooled tail bucket,
               d_t ~= sum_{v in S} p(v) log(p(v)/q(v)) + p_tail log(p_tail/q_tail);
               only the teacher's K+1 log-probs stored in the rollout are needed.
- ``sampled``: one-sample policy gradient with advantage A_t = -(log p_old(y_t) - log q(y_t)),
               loss -exp(log p(y_t) - log p_old(y_t)) A_t, discount 0.
Every loss counts only positions in ``rollout.loss_mask`` (the kept part of each completion).

The step normalises by the number of loss tokens over the whole rollout on all processes, so the
gradient is the same whatever the micro-batch size or the number of processes (Accelerate's recipe
for token-level losses under gradient accumulation). `KeptTokenNormaliser` is the normalisation
control (Config.norm_from): the same loss divided by the kept-token count of a matched run instead.
"""

from __future__ import annotations

import contextlib
import json
import math

import torch
from torch import Tensor

from kat.config import ConfigError, allowed, check_value
from kat.rollout import Rollout
from kat.scorer import reverse_kl, token_logp

LOSSES = allowed("loss")  # ("full", "topk", "sampled")


def completion_logits(model: torch.nn.Module, rollout: Rollout) -> Tensor:
    """Logits that predict each completion token: (B, T, V) in the model's dtype.

    One forward over prompt + completion. Prompts are left-padded and completions right-padded,
    so positions come from the cumulative attention mask rather than the column index.
    """
    device = next(model.parameters()).device
    prompt_len, completion_len = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1).to(device)  # (B, P + T)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1).long().to(device)  # (B, P + T)
    position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, P + T) pads get 0, never attended
    # The logits at column P-1+t predict completion token t: keep the last T+1 columns, drop the end.
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=completion_len + 1)
    logits = out.logits[:, -(completion_len + 1) : -1]  # (B, T, V)
    if logits.shape[1] != completion_len:
        raise ValueError(f"model returned {out.logits.shape[1]} logit columns for {prompt_len + completion_len} "
                         "inputs; it must support `logits_to_keep`")
    return logits


def _full_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(B, T): exact d_t = KL(p || q); the teacher is a constant target."""
    return reverse_kl(student_logits, teacher_logits.detach())


def _topk_kl(student_logits: Tensor, topk_ids: Tensor, teacher_topk_logp: Tensor, mask: Tensor) -> Tensor:
    """(B, T): the top-K + tail estimate of d_t.

    log p on S is recomputed with gradient without a (tokens, V) fp32 buffer: for any anchor a in S,
        log p(v) = (x_v - x_a) + log p(a)
    where x are raw logits and log p(a) comes from the chunked `token_logp` (whose backward carries
    the softmax normaliser's gradient). The tail mass uses log1mexp for accuracy near full coverage:
        p_tail = 1 - sum_S p(v) = -expm1(logsumexp_S log p(v))
    With K >= V the tail is empty (teacher log q_tail = -inf) and its term is 0.
    """
    ids = torch.where(mask[..., None], topk_ids, 0)  # (B, T, K) padding may hold any id
    logq = torch.where(mask[..., None], teacher_topk_logp, 0.0)  # (B, T, K+1)
    logq_head, logq_tail = logq[..., :-1], logq[..., -1]  # (B, T, K), (B, T)
    x = student_logits.gather(-1, ids).float()  # (B, T, K)
    logp_anchor = token_logp(student_logits, ids[..., 0])  # (B, T) fp32
    logp = x - x[..., :1] + logp_anchor[..., None]  # (B, T, K)
    head = (logp.exp() * (logp - logq_head)).sum(-1)  # (B, T)  sum_{v in S} p(v) (log p(v) - log q(v))
    p_tail = -torch.expm1(torch.logsumexp(logp, dim=-1))  # (B, T)
    # Empty tail (K >= V) or a mass that rounds to <= 0: the term's limit is 0. The inputs of the
    # unused branch are replaced too, so its gradient is 0 rather than NaN.
    has_tail = (p_tail > 0) & torch.isfinite(logq_tail)  # (B, T)
    p_tail = torch.where(has_tail, p_tail, 1.0)
    logq_tail = torch.where(has_tail, logq_tail, 0.0)
    tail = torch.where(has_tail, p_tail * (p_tail.log() - logq_tail), 0.0)  # p_tail log(p_tail / q_tail)
    return head + tail


def _sampled_pg(student_logits: Tensor, rollout: Rollout, mask: Tensor) -> Tensor:
    """(B, T): -exp(log p(y_t) - log p_old(y_t)) * A_t with A_t = -(log p_old(y_t) - log q(y_t))."""
    if not rollout.scored:
        raise ValueError("loss 'sampled' needs the rollout's student_logp and teacher_logp: "
                         "sample with score=True")
    logp_old = torch.where(mask, rollout.student_logp, 0.0)  # (B, T) behaviour policy, at rollout time
    teacher_logp = torch.where(mask, rollout.teacher_logp, 0.0)  # (B, T)
    advantage = -(logp_old - teacher_logp)  # (B, T) constant: the rollout carries no graph
    logp = token_logp(student_logits, torch.where(mask, rollout.completion_ids, 0))  # (B, T) with grad
    return -torch.exp(logp - logp_old) * advantage


def token_losses(student_logits: Tensor, rollout: Rollout, kind: str,
                 teacher_logits: Tensor | None = None) -> Tensor:
    """Per-token loss (B, T) float32, exactly 0 outside ``rollout.loss_mask``. See `opd_loss`."""
    mask = rollout.loss_mask.to(student_logits.device).bool()  # (B, T)
    return torch.where(mask, _unmasked_losses(student_logits, rollout, kind, teacher_logits), 0.0)


def _unmasked_losses(student_logits: Tensor, rollout: Rollout, kind: str,
                     teacher_logits: Tensor | None) -> Tensor:
    """(B, T) per-token loss before ``loss_mask`` is applied; for ``full`` it is d_t everywhere."""
    if kind not in LOSSES:
        raise ValueError(f"loss kind must be one of {LOSSES}, got {kind!r}")
    mask = rollout.loss_mask.to(student_logits.device).bool()  # (B, T)
    if kind == "full":
        if teacher_logits is None:
            raise ValueError("loss 'full' needs teacher_logits (B, T, V): run the teacher over the rollout "
                             "with `completion_logits` under torch.no_grad()")
        return _full_kl(student_logits, teacher_logits.to(student_logits.device))
    if kind == "topk":
        if rollout.topk_ids is None or rollout.teacher_topk_logp is None:
            raise ValueError("loss 'topk' needs rollout.topk_ids and rollout.teacher_topk_logp: sample with topk > 0")
        return _topk_kl(student_logits, rollout.topk_ids.to(mask.device),
                        rollout.teacher_topk_logp.to(mask.device), mask)
    return _sampled_pg(student_logits, rollout.to(mask.device), mask)


def opd_loss(student_logits: Tensor, rollout: Rollout, kind: str,
             teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum of the OPD loss over ``rollout.loss_mask`` and the number of tokens it covers.

    Args:
        student_logits: (B, T, V) from `completion_logits(student, rollout)`, with gradient.
        rollout: the batch; ``loss_mask`` selects the positions that count.
        kind: "full" | "topk" | "sampled" (see the module docstring).
        teacher_logits: (B, T, V), required for "full" only; treated as a constant.
    Returns:
        (loss_sum, n_tokens): a float32 scalar with gradient and a long scalar. Divide by the
        global token count, not per micro-batch, to weight every token equally.
    """
    loss = token_losses(student_logits, rollout, kind, teacher_logits)
    return loss.sum(), rollout.loss_mask.sum()


def kept_teacher_logits(rollout: Rollout, device=None) -> Tensor:
    """(B, T, V): ``rollout.teacher_logits`` (the kept positions, packed) unpacked onto loss_mask.

    Positions outside loss_mask get logits 0: the loss there is masked, and any finite value keeps
    its (zero) gradient finite.
    """
    mask = rollout.loss_mask.to(device).bool()  # (B, T)
    kept = rollout.teacher_logits.to(device)  # (N, V)
    if kept.shape[0] != int(mask.sum()):
        raise ValueError(f"rollout.teacher_logits has {kept.shape[0]} rows but loss_mask selects {int(mask.sum())} "
                         "positions; it must hold the teacher's logits at exactly the loss_mask positions, "
                         "row-major (or be None, and the learner runs the teacher)")
    out = kept.new_zeros(*mask.shape, kept.shape[-1])  # (B, T, V)
    out[mask] = kept
    return out


def _backward_micro_batch(student, teacher, part: Rollout, kind: str, accelerator, scale: float,
                          use_kept: bool = False) -> tuple[Tensor, Tensor | None]:
    """Backpropagate scale * loss_sum of one micro-batch.

    Returns its per-row loss sums (b,) and, for ``full``, d_t at every generated position (b, T)
    (0 elsewhere), both detached. A function of its own so the micro-batch's logits are freed
    before the next one is computed. `use_kept`: the ``full`` target is the rollout's kept
    teacher logits instead of a teacher forward.
    """
    student_logits = completion_logits(student, part)  # (b, T, V)
    teacher_logits = None
    if kind == "full" and use_kept:
        teacher_logits = kept_teacher_logits(part, student_logits.device)  # (b, T, V)
    elif kind == "full":
        with torch.no_grad():
            teacher_logits = completion_logits(teacher, part)  # (b, T, V)
    loss = _unmasked_losses(student_logits, part, kind, teacher_logits)  # (b, T); full: d_t
    token_kl = None
    if kind == "full":
        # cut positions have no kept teacher logits; there d_t is the lockstep KL the rollout holds
        d = torch.where(part.loss_mask.bool(), loss.detach(), part.kl) if use_kept else loss.detach()
        token_kl = torch.where(part.completion_mask.bool(), d, 0.0)
    row_loss = torch.where(part.loss_mask.bool(), loss, 0.0).sum(-1)  # (b,)
    accelerator.backward(row_loss.sum() * scale)
    return row_loss.detach(), token_kl


@torch.no_grad()
def _token_kl(student, teacher, rollout: Rollout, micro_batch_size: int, device) -> Tensor:
    """d_t at every generated position (B, T), 0 elsewhere, without gradient."""
    out = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32, device=device)  # (B, T)
    for rows in micro_batches(rollout, micro_batch_size):
        part = rollout.select(rows).trim().to(device)
        kl = _full_kl(completion_logits(student, part), completion_logits(teacher, part))  # (b, T')
        out[rows, : kl.shape[1]] = torch.where(part.completion_mask.bool(), kl, 0.0)
    return out


def micro_batches(rollout: Rollout, micro_batch_size: int) -> list[slice | Tensor]:
    """The rows of each micro-batch. With more than one, rows are grouped by completion length, so
    that each micro-batch, trimmed to its own extent (`Rollout.trim`), carries little padding; the
    accumulated gradient is the same sum over tokens in any grouping. One micro-batch keeps the
    rows' order (a slice: `select` then takes views)."""
    B = rollout.prompt_ids.shape[0]
    if micro_batch_size >= B:
        return [slice(0, B)]
    order = rollout.lengths.cpu().argsort(stable=True)  # (B,)
    return list(order.split(micro_batch_size))


def _result(loss: float, grad_norm: float, n_tokens: float, bad_rows: list[int], token_kl: list[Tensor],
            finite: bool = True) -> dict:
    """What `learn` returns, built in one place for the step taken and for each way of skipping it."""
    out = {"loss": loss, "grad_norm": grad_norm, "n_tokens": int(n_tokens), "finite": finite, "bad_rows": bad_rows}
    if token_kl:
        out["token_kl"] = token_kl[0]  # (B, T)
    return out


def _accumulate(student, teacher, rollout: Rollout, kind: str, accelerator, micro_batch_size: int, *,
                scale: float, use_kept: bool) -> tuple[Tensor, list[int], list[Tensor]]:
    """Backpropagate every micro-batch (gradients synchronised on the last one only). Returns the
    summed loss, the rows (of `rollout`) whose loss is not finite and, for ``full``, [d_t (B, T)]."""
    device = accelerator.device
    parts = micro_batches(rollout, micro_batch_size)
    row_index = torch.arange(rollout.prompt_ids.shape[0])  # (B,)
    loss_total = torch.zeros((), dtype=torch.float32, device=device)
    bad_rows: list[int] = []
    token_kl = None  # ``full``: d_t (B, T)
    if kind == "full":
        token_kl = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32, device=device)
    for n, rows in enumerate(parts):
        part = rollout.select(rows).trim().to(device)
        with contextlib.nullcontext() if n == len(parts) - 1 else accelerator.no_sync(student):
            row_loss, kl = _backward_micro_batch(student, teacher, part, kind, accelerator, scale=scale,
                                                 use_kept=use_kept)  # (b,), (b, T')
        bad_rows += row_index[rows][~torch.isfinite(row_loss).cpu()].tolist()
        loss_total += row_loss.sum()
        if kl is not None:
            token_kl[rows, : kl.shape[1]] = kl
    return loss_total, sorted(bad_rows), [] if token_kl is None else [token_kl]


def learn(student: torch.nn.Module, rollout: Rollout, optimizer, scheduler, accelerator, *, kind: str,
          micro_batch_size: int, teacher: torch.nn.Module | None = None,
          max_grad_norm: float | None = 1.0) -> dict:
    """One optimiser step on the rollout, in micro-batches of `micro_batch_size` rows.

    With N the number of loss tokens on all processes, every micro-batch backpropagates
        loss_sum / N * num_processes
    because DDP averages gradients over processes; the accumulated gradient is then
    sum over all tokens / N. Gradients are synchronised on the last micro-batch only. A step whose
    loss (or, without an fp16 loss scaler, gradient norm) is not finite is skipped on every process
    (gradients zeroed, no optimiser or scheduler step), and the rows at fault here are reported.

    Returns plain values: loss (global mean per token), grad_norm, n_tokens (global), finite,
    bad_rows (this process's row indices with a non-finite loss); for ``full`` also token_kl,
    the (B, T) float32 d_t of this process's rows at the pre-step parameters (0 where not
    generated): the rollout's KL when it was sampled with ``score=False``.

    ``full`` with rollouts that hold the teacher's kept logits (``rollout.teacher_logits``, on
    every process) takes its target from them and does not run the teacher; token_kl at cut
    positions is then the rollout's own lockstep KL, which no kept logits cover.
    """
    _check_learn_args(kind, teacher, micro_batch_size, accelerator, rollout)
    device = accelerator.device
    # One collective for the global token count and for the processes without kept teacher logits:
    # if any lacks them, every process runs the teacher, so all run the same forwards.
    missing = float(kind == "full" and rollout.teacher_logits is None)
    counts = torch.stack([rollout.loss_mask.sum().to(device, torch.float32),
                          torch.tensor(missing, device=device)])  # (2,)
    n_global, n_missing = accelerator.reduce(counts, "sum").tolist()
    use_kept = kind == "full" and n_missing == 0
    if kind == "full" and not use_kept and teacher is None:
        raise ValueError("loss 'full' needs the teacher model (teacher=...): not every process's rollout holds "
                         "the teacher's kept logits")
    if n_global == 0:  # nothing to learn anywhere: every process skips alike
        optimizer.zero_grad(set_to_none=True)
        kl = []
        if use_kept:  # a scored lockstep rollout: its KL is d_t already
            kl = [torch.where(rollout.completion_mask.bool(), rollout.kl, 0.0).to(device)]
        elif kind == "full":
            kl = [_token_kl(student, teacher, rollout, micro_batch_size, device)]
        return _result(0.0, 0.0, 0, [], kl)

    loss_total, bad_rows, token_kl = _accumulate(student, teacher, rollout, kind, accelerator, micro_batch_size,
                                                 scale=accelerator.num_processes / n_global, use_kept=use_kept)

    # Every process must agree to skip, or their parameters would drift apart.
    n_bad = accelerator.reduce(torch.tensor(float(len(bad_rows)), device=device), "sum").item()
    loss = accelerator.reduce(loss_total, "sum").item() / n_global
    if n_bad > 0:
        optimizer.zero_grad(set_to_none=True)
        return _result(loss, float("nan"), n_global, bad_rows, token_kl, finite=False)
    # max_grad_norm None: no clipping, but the norm is still measured for logging.
    grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), max_grad_norm or float("inf")))
    # (with an fp16 loss scaler an overflow is routine: its optimizer step skips by itself)
    finite = math.isfinite(grad_norm) or accelerator.scaler is not None
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return _result(loss, grad_norm, n_global, [], token_kl, finite=finite)


def _check_learn_args(kind: str, teacher, micro_batch_size: int, accelerator, rollout: Rollout) -> None:
    if kind not in LOSSES:
        raise ValueError(f"loss kind must be one of {LOSSES}, got {kind!r}")
    if kind == "full" and teacher is None and rollout.teacher_logits is None:
        raise ValueError("loss 'full' needs the teacher model (teacher=...) to recompute its logits")
    check_value("micro_batch_size", micro_batch_size)
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError("learn() accumulates over micro-batches itself; create the Accelerator with "
                         f"gradient_accumulation_steps=1 (got {accelerator.gradient_accumulation_steps})")


def build_optimizer(model: torch.nn.Module, lr: float, steps: int, warmup_ratio: float,
                    weight_decay: float = 0.0):
    """AdamW and a cosine schedule with linear warm-up over `warmup_ratio * steps` steps."""
    from transformers import get_cosine_schedule_with_warmup

    for name, value in (("lr", lr), ("steps", steps), ("warmup_ratio", warmup_ratio), ("weight_decay", weight_decay)):
        check_value(name, value)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(warmup_ratio * steps), steps)
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# The normalisation control

class ScaledBackward:
    """An Accelerator whose backward scales every loss by `scale` (everything else passes through).

    The normalisation control (cfg.norm_from): with scale = N_own / N_matched the step's loss is
    sum(loss) / N_matched instead of sum(loss) / N_own, gradient clipping included, while every
    token stays in the loss. The logged loss stays the mean over this run's own tokens.
    """

    def __init__(self, accelerator, scale: float):
        self._accelerator, self._scale = accelerator, scale

    def backward(self, loss, **kw) -> None:
        self._accelerator.backward(loss * self._scale, **kw)

    def __getattr__(self, name: str):
        return getattr(self._accelerator, name)


def matched_kept_tokens(path: str) -> dict[int, float]:
    """step (0-based) -> kept tokens per rollout that a matched run logged (its metrics.jsonl)."""
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {r["step"] - 1: r["kept_length"] for r in rows if "kept_length" in r}


class KeptTokenNormaliser:
    """The normalisation control: OPD whose loss at step k is divided by the kept-token count that a
    matched run (`path`, its metrics.jsonl) logged at step k, instead of this run's own count.

    The matched run's counts are read once, here; a file without one of steps 1..`steps` is refused
    now, before any training. `accelerator(acc, step, rollout)` is what `learn` takes for that step.
    """

    def __init__(self, path: str, steps: int):
        self.path = path
        self.kept = matched_kept_tokens(path)
        missing = [step for step in range(steps) if step not in self.kept]
        if missing:
            raise ConfigError(f"norm_from: {path!r} has no step {missing[0] + 1}; point it at the metrics.jsonl "
                              "of a finished run with at least as many steps")

    def accelerator(self, accelerator, step: int, rollout: Rollout) -> ScaledBackward:
        """The ScaledBackward whose loss is normalised by the matched run's kept tokens at `step`
        (the same number of rows per step)."""
        own = accelerator.reduce(rollout.loss_mask.sum().to(accelerator.device, torch.float32), "sum").item()
        rows = accelerator.reduce(torch.tensor(float(rollout.stop.numel()), device=accelerator.device),
                                  "sum").item()
        return ScaledBackward(accelerator, own / max(self.kept[step] * rows, 1.0))  # N_own / N_matched
