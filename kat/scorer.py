"""KL maths on logits: exact reverse KL, top-k + tail, log-probs of given tokens, and the scores of
one chunk of sampled tokens (`score_chunk`, `check_finite`) that kat.sampler records.

Every function takes logits of shape (..., V) in fp32, fp16 or bf16 and accumulates in fp32.
Rows are processed in chunks of ``chunk_rows`` so that no fp32 buffer larger than
(chunk_rows, V) exists at once: at V = 152k a full (tokens, V) fp32 copy of 16k tokens would
be 10 GB. Gradients (where a loss needs them) are recomputed chunk by chunk in the backward pass
instead of being kept from the forward, which is what autograd would do.

Direction: ``reverse_kl(student, teacher)`` is KL(p_student || q_teacher), the quantity OPD
minimises. ``torch.nn.functional.kl_div(input, target)`` computes KL(target || input), so the
same value in that API is ``kl_div(teacher_logp, student_logp, log_target=True)``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

# Rows per chunk such that one fp32 (rows, V) buffer holds about 2**24 floats (64 MiB).
_CHUNK_FLOATS = 1 << 24


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_FLOATS // max(1, vocab_size))


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}; the two models must share one vocabulary "
            "(slice the larger embedding to the shared vocabulary if one model pads it)"
        )


def _kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """p(v) (log p(v) - log q(v)), with 0 where p(v) = 0 (a masked -inf student logit gives
    0 * (-inf) otherwise)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0)


def _kl_rows(s: Tensor, t: Tensor) -> Tensor:
    """d = sum_v p(v) (log p(v) - log q(v)) for 2-D (rows, V) logits, computed in fp32."""
    logp = torch.log_softmax(s.float(), dim=-1)  # (R, V)
    logq = torch.log_softmax(t.float(), dim=-1)  # (R, V)
    return _kl_terms(logp, logq).sum(-1)  # (R,)


class _ReverseKL(torch.autograd.Function):
    """Chunked KL(p || q) with a chunked, recomputing backward.

    d KL / d s_j = p_j * ((log p_j - log q_j) - KL)      (student logits s)
    d KL / d t_j = q_j - p_j                              (teacher logits t)
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, chunk_rows: int) -> Tensor:  # s, t: (R, V)
        out = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk_rows):
            out[i : i + chunk_rows] = _kl_rows(s[i : i + chunk_rows], t[i : i + chunk_rows])
        ctx.save_for_backward(s, t, out)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        s, t, kl = ctx.saved_tensors
        n = ctx.chunk_rows
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s = torch.empty_like(s) if need_s else None
        grad_t = torch.empty_like(t) if need_t else None
        for i in range(0, s.shape[0], n):
            logp = torch.log_softmax(s[i : i + n].float(), dim=-1)
            logq = torch.log_softmax(t[i : i + n].float(), dim=-1)
            p = logp.exp()
            g = grad_out[i : i + n].float().unsqueeze(-1)  # (r, 1)
            if need_s:
                d = torch.where(p > 0, p * (logp - logq - kl[i : i + n].unsqueeze(-1)), 0.0)
                grad_s[i : i + n] = (g * d).to(s.dtype)
            if need_t:
                grad_t[i : i + n] = (g * (logq.exp() - p)).to(t.dtype)
        return grad_s, grad_t, None


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Exact per-token reverse KL at temperature 1.

        d_t = sum_v p(v) * (log p(v) - log q(v)),  p = softmax(student), q = softmax(teacher)

    Args:
        student_logits, teacher_logits: (..., V), any float dtype, same shape.
        chunk_rows: rows per fp32 chunk (default: about 64 MiB of fp32 per buffer).
    Returns:
        (...) float32. Differentiable w.r.t. both inputs (the `full` OPD loss).

    On CUDA with triton installed and ``chunk_rows`` unset, the fused kernel of kat.kernels
    computes the same value in one pass over the logits; ``KAT_TRITON=0`` keeps the PyTorch path.
    """
    _check_pair(student_logits, teacher_logits)
    if chunk_rows is None and student_logits.is_cuda and os.environ.get("KAT_TRITON") != "0":
        from kat.kernels import reverse_kl_triton, supports

        if supports(student_logits, teacher_logits):
            return reverse_kl_triton(student_logits, teacher_logits)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    out = _ReverseKL.apply(s, t, chunk_rows or default_chunk_rows(vocab))
    return out.reshape(lead)


class _TokenLogp(torch.autograd.Function):
    """log softmax(logits)[id], chunked; d/d logits = onehot(id) - softmax(logits)."""

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, chunk_rows: int) -> Tensor:  # (R, V), (R,)
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for i in range(0, logits.shape[0], chunk_rows):
            x = logits[i : i + chunk_rows].float()
            picked = x.gather(-1, ids[i : i + chunk_rows, None]).squeeze(-1)
            out[i : i + chunk_rows] = picked - torch.logsumexp(x, dim=-1)
        ctx.save_for_backward(logits, ids)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, ids = ctx.saved_tensors
        n = ctx.chunk_rows
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], n):
            g = grad_out[i : i + n].float().unsqueeze(-1)
            probs = torch.softmax(logits[i : i + n].float(), dim=-1)
            chunk = -g * probs
            chunk.scatter_add_(-1, ids[i : i + n, None], g)
            grad[i : i + n] = chunk.to(logits.dtype)
        return grad, None, None


def token_logp(logits: Tensor, ids: Tensor, chunk_rows: int | None = None) -> Tensor:
    """log p(ids) under softmax(logits): logits (..., V), ids (...) -> (...) float32, differentiable."""
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"ids shape {tuple(ids.shape)} must equal logits shape without the vocab axis "
                         f"{tuple(logits.shape[:-1])}")
    vocab = logits.shape[-1]
    out = _TokenLogp.apply(logits.reshape(-1, vocab), ids.reshape(-1).long(),
                           chunk_rows or default_chunk_rows(vocab))
    return out.reshape(ids.shape)


@torch.no_grad()
def topk_tail(student_logits: Tensor, teacher_logits: Tensor, k: int,
              chunk_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """The student's top-k token ids and the teacher's log-probs on them plus the pooled tail.

    Returns ``ids`` (..., k) long and ``teacher_logp`` (..., k+1) float32, whose last column is
    log q_tail = log(1 - sum_{v in S} q(v)), computed as a log-sum-exp over the complement so
    it stays accurate when the top-k mass is close to 1. With k >= V the tail is empty (-inf).
    """
    _check_pair(student_logits, teacher_logits)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    k = min(k, vocab)
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    n = chunk_rows or default_chunk_rows(vocab)
    ids = torch.empty(s.shape[0], k, dtype=torch.long, device=s.device)
    out = torch.empty(s.shape[0], k + 1, dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], n):
        ids_c = s[i : i + n].topk(k, dim=-1).indices  # (r, k)
        logq = torch.log_softmax(t[i : i + n].float(), dim=-1)  # (r, V)
        out[i : i + n, :k] = logq.gather(-1, ids_c)
        out[i : i + n, k] = torch.logsumexp(logq.scatter(-1, ids_c, float("-inf")), dim=-1)
        ids[i : i + n] = ids_c
    return ids.reshape(*lead, k), out.reshape(*lead, k + 1)


# ---------------------------------------------------------------------------------------------
# One chunk of sampled tokens (kat.sampler scores each chunk with these)

class ChunkScores(NamedTuple):
    """Per-token numbers of one chunk of active rows, all at temperature 1."""

    kl: Tensor  # (A, C) float32: d_t
    student_logp: Tensor  # (A, C) float32: log p(y_t)
    teacher_logp: Tensor  # (A, C) float32: log q(y_t)
    topk_ids: Tensor | None  # (A, C, K) long
    teacher_topk_logp: Tensor | None  # (A, C, K+1) float32


def score_chunk(student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, topk: int = 0) -> ChunkScores:
    """Score the sampled tokens of one chunk: (A, C, V) logits of both models and (A, C) tokens."""
    kl = reverse_kl(student_logits, teacher_logits)  # (A, C)  d_t = sum_v p (log p - log q)
    student_logp = token_logp(student_logits, tokens)  # (A, C)  log p(y_t)
    teacher_logp = token_logp(teacher_logits, tokens)  # (A, C)  log q(y_t)
    ids = tail = None
    if topk > 0:
        ids, tail = topk_tail(student_logits, teacher_logits, topk)  # (A, C, K), (A, C, K+1)
    return ChunkScores(kl, student_logp, teacher_logp, ids, tail)


def check_finite(scores: ChunkScores, valid: Tensor, rows: Tensor, t0: int,
                 student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Raise on a non-finite KL or log-prob at a generated position (`valid`), naming the rows
    (`rows`: original row of each of the A rows) and completion positions (from `t0`)."""
    bad = valid & ~(scores.kl.isfinite() & scores.student_logp.isfinite() & scores.teacher_logp.isfinite())
    if not bad.any():
        return
    a, j = bad.nonzero(as_tuple=True)
    where = [(int(rows[x]), t0 + int(y)) for x, y in zip(a.tolist(), j.tolist())]
    culprits = []
    for name, logits in (("student", student_logits), ("teacher", teacher_logits)):
        nonfinite = ~logits[a, j].isfinite().all(dim=-1)  # (n,)
        if nonfinite.any():
            culprits.append(f"{name} logits are non-finite at {[w for w, n in zip(where, nonfinite) if n][:8]}")
    raise FloatingPointError(
        f"non-finite reverse KL or log-prob at (row, completion position) {where[:8]}"
        f"{' ...' if len(where) > 8 else ''} ({len(where)} in all); "
        + ("; ".join(culprits) if culprits else "both models' logits are finite there (extreme logits?)")
        + ". Check the models' dtype (fp16 overflow: try bf16 or fp32) and their weights."
    )
