"""Fused Triton kernels for the exact reverse KL over the vocabulary, forward and backward.

Same contract as ``kat.scorer.reverse_kl``: logits (..., V) in fp32, fp16 or bf16, the value
d = KL(p || q) per row as float32, differentiable w.r.t. the student and the teacher logits.
The PyTorch path materialises fp32 (chunk, V) buffers several times; these kernels read each
logit once in the forward pass and once more in the backward pass, and keep nothing per row
but three floats.

Forward: one pass with an online log-sum-exp
--------------------------------------------
With p = softmax(s), q = softmax(t), lse_s = log sum_v e^{s_v}, lse_t = log sum_v e^{t_v}:

    log p_v = s_v - lse_s,   log q_v = t_v - lse_t

    d = sum_v p_v (log p_v - log q_v)
      = sum_v p_v (s_v - t_v) - (lse_s - lse_t)                 (sum_v p_v = 1)

Write p_v = e^{s_v - m} / Z with any reference m (the running max, for range safety) and
Z = sum_v e^{s_v - m}, so lse_s = m + log Z, and define A = sum_v e^{s_v - m} (s_v - t_v):

    d = A / Z - (lse_s - lse_t)

A and Z carry the same factor e^{-m}. Streaming over the vocabulary in blocks, a block whose
maximum raises the reference from m to m' rescales both by e^{m - m'} before adding its terms:

    m' = max(m, max_block s)
    Z' = Z e^{m - m'} + sum_block e^{s_v - m'}
    A' = A e^{m - m'} + sum_block e^{s_v - m'} (s_v - t_v)

and lse_t streams the same way with its own running max. After the last block,
lse_s = m + log Z, lse_t = m_t + log Z_t and d = A / Z - (lse_s - lse_t). Every exponent is
<= 0, so fp16 logits of +-3000 (or any finite value) cannot overflow.

Masked vocabulary: a student logit of -inf has p_v = 0 and contributes nothing, whatever the
teacher says (0 log 0 = 0); a teacher logit of -inf where the student has mass gives d = +inf,
which is the true value. Before the first finite logit the reference is taken as 0 rather than
-inf so that e^{-inf - (-inf)} never appears.

Backward: recompute p and q from the saved lse
----------------------------------------------
    d d / d s_j = p_j ((log p_j - log q_j) - d)
    d d / d t_j = q_j - p_j

each times the incoming gradient of the row. The forward pass saves lse_s, lse_t and d (three
floats a row), so the backward is a second streaming pass over s and t with no reductions.

The kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), which is how the tests check them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path in kat.scorer needs no Triton
    triton = None

# Triton decides at decoration time whether a kernel is compiled or interpreted.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Vocabulary entries one program handles per step. Larger blocks mean fewer rescales of the
# running sums; 4096 fp16 logits is 8 KiB per input per step.
_MAX_BLOCK_V = 4096


def triton_available() -> bool:
    """True when the kernels can run here: Triton imports and a CUDA device is present, or the
    kernels were built under ``TRITON_INTERPRET=1`` (CPU tensors, for tests)."""
    return triton is not None and (_INTERPRET or torch.cuda.is_available())


def supports(student_logits: Tensor, teacher_logits: Tensor) -> bool:
    """Whether ``reverse_kl_triton`` takes these inputs: Triton usable, both on CUDA (or
    interpreted), float32/float16/bfloat16, same shape, a non-empty vocabulary."""
    return (triton_available()
            and all((x.is_cuda or _INTERPRET) and x.dtype in _DTYPES for x in (student_logits, teacher_logits))
            and student_logits.shape == teacher_logits.shape and student_logits.shape[-1:] != (0,)
            and student_logits.device == teacher_logits.device)


def _launch_config(vocab: int) -> tuple[int, int]:
    """(block_v, num_warps) for a row of ``vocab`` logits: one warp per 512 logits of a block.

    Not critical: on an H100 at 16384 x 152064 fp16, blocks of 2048-8192 with 4 or 8 warps all
    stream the forward at 2.5-2.8 TB/s, and the backward is flat across configurations; 16 warps,
    or 8 on 1024-wide blocks, are slower (the sweep in benchmarks/gpu_check.py).
    """
    block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
    return block_v, max(1, min(16, block_v // 512))


if triton is not None:

    @triton.jit
    def _kl_forward_kernel(s_ptr, t_ptr, kl_ptr, lse_s_ptr, lse_t_ptr,
                           stride_s, stride_t, vocab, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 at 16k x 152k logits
        s_ptr += row * stride_s
        t_ptr += row * stride_t
        m_s = float("-inf")  # running max of s
        z_s = 0.0  # Z = sum e^{s - m_s}
        a = 0.0  # A = sum e^{s - m_s} (s - t)
        m_t = float("-inf")
        z_t = 0.0  # Z_t = sum e^{t - m_t}
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < vocab
            s = tl.load(s_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
            t = tl.load(t_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)

            # Student: m' = max(m, max s); Z' = Z e^{m - m'} + sum e^{s - m'}; A likewise.
            new_m_s = tl.maximum(m_s, tl.max(s, axis=0))
            ref_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)  # all -inf so far: avoid -inf - -inf
            rescale_s = tl.exp(m_s - ref_s)
            w = tl.exp(s - ref_s)  # (BLOCK_V,) e^{s - m'}, 0 where s = -inf
            gap = tl.where(s == float("-inf"), 0.0, s - t)  # p_v = 0 adds 0 even where t_v = -inf
            z_s = z_s * rescale_s + tl.sum(w, axis=0)
            a = a * rescale_s + tl.sum(w * gap, axis=0)
            m_s = new_m_s

            # Teacher: only its log-sum-exp is needed.
            new_m_t = tl.maximum(m_t, tl.max(t, axis=0))
            ref_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
            z_t = z_t * tl.exp(m_t - ref_t) + tl.sum(tl.exp(t - ref_t), axis=0)
            m_t = new_m_t

        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
        tl.store(kl_ptr + row, a / z_s - (lse_s - lse_t))  # d = A / Z - (lse_s - lse_t)
        tl.store(lse_s_ptr + row, lse_s)
        tl.store(lse_t_ptr + row, lse_t)

    @triton.jit
    def _kl_backward_kernel(s_ptr, t_ptr, lse_s_ptr, lse_t_ptr, kl_ptr, grad_out_ptr,
                            grad_s_ptr, grad_t_ptr, stride_s, stride_t, stride_gs, stride_gt, vocab,
                            BLOCK_V: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_ptr += row * stride_s
        t_ptr += row * stride_t
        grad_s_ptr += row * stride_gs
        grad_t_ptr += row * stride_gt
        lse_s = tl.load(lse_s_ptr + row)
        lse_t = tl.load(lse_t_ptr + row)
        kl = tl.load(kl_ptr + row)
        g = tl.load(grad_out_ptr + row)
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < vocab
            s = tl.load(s_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
            t = tl.load(t_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
            logp = s - lse_s
            logq = t - lse_t
            p = tl.exp(logp)
            if NEED_S:
                # d d / d s_j = p_j ((log p_j - log q_j) - d); 0 where p_j = 0
                grad_s = tl.where(s == float("-inf"), 0.0, g * p * (logp - logq - kl))
                tl.store(grad_s_ptr + cols, grad_s.to(grad_s_ptr.dtype.element_ty), mask=inside)
            if NEED_T:
                grad_t = g * (tl.exp(logq) - p)  # d d / d t_j = q_j - p_j
                tl.store(grad_t_ptr + cols, grad_t.to(grad_t_ptr.dtype.element_ty), mask=inside)


def _forward(s: Tensor, t: Tensor, block_v: int | None = None,
             num_warps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(kl, lse_s, lse_t), each (R,) float32, for 2-D (R, V) logits with unit stride along V."""
    rows, vocab = s.shape
    default_block, default_warps = _launch_config(vocab)
    kl, lse_s, lse_t = (torch.empty(rows, dtype=torch.float32, device=s.device) for _ in range(3))
    _kl_forward_kernel[(rows,)](s, t, kl, lse_s, lse_t, s.stride(0), t.stride(0), vocab,
                                BLOCK_V=block_v or default_block, num_warps=num_warps or default_warps)
    return kl, lse_s, lse_t


def _backward(s: Tensor, t: Tensor, lse_s: Tensor, lse_t: Tensor, kl: Tensor, grad_out: Tensor,
              need_s: bool, need_t: bool, block_v: int | None = None,
              num_warps: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """(grad_s, grad_t) in the inputs' dtypes, None where not needed, for the saved forward state."""
    rows, vocab = s.shape
    default_block, default_warps = _launch_config(vocab)
    grad_out = grad_out.float().contiguous()  # (R,); sum().backward() hands in an expanded view
    grad_s = torch.empty_like(s, memory_format=torch.contiguous_format) if need_s else None
    grad_t = torch.empty_like(t, memory_format=torch.contiguous_format) if need_t else None
    # An unused gradient pointer is never touched (its branch is compiled out); pass any tensor.
    gs = grad_s if need_s else grad_t
    gt = grad_t if need_t else grad_s
    _kl_backward_kernel[(rows,)](s, t, lse_s, lse_t, kl, grad_out, gs, gt,
                                 s.stride(0), t.stride(0), gs.stride(0), gt.stride(0), vocab,
                                 BLOCK_V=block_v or default_block, NEED_S=need_s, NEED_T=need_t,
                                 num_warps=num_warps or default_warps)
    return grad_s, grad_t


class _ReverseKLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor) -> Tensor:  # s, t: (R, V)
        kl, lse_s, lse_t = _forward(s, t)
        ctx.save_for_backward(s, t, lse_s, lse_t, kl)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        s, t, lse_s, lse_t, kl = ctx.saved_tensors
        return _backward(s, t, lse_s, lse_t, kl, grad_out, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def _as_rows(x: Tensor, vocab: int) -> Tensor:
    """(..., V) -> (R, V) with unit stride along V, copying only when the layout needs it."""
    x = x.reshape(-1, vocab)
    return x if x.stride(-1) == 1 else x.contiguous()


def reverse_kl_triton(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Exact per-token reverse KL at temperature 1, fused: a drop-in for ``kat.scorer.reverse_kl``.

        d_t = sum_v p(v) * (log p(v) - log q(v)),  p = softmax(student), q = softmax(teacher)

    Args:
        student_logits, teacher_logits: (..., V), fp32/fp16/bf16 (the two may differ), same
            shape, on a CUDA device (or on CPU when built under ``TRITON_INTERPRET=1``).
    Returns:
        (...) float32, accumulated in fp32. Differentiable w.r.t. both inputs; the gradients
        come back in each input's dtype.
    """
    if not triton_available():
        raise RuntimeError("reverse_kl_triton needs the triton package and a CUDA device "
                           "(or TRITON_INTERPRET=1 set before importing kat.kernels); "
                           "use kat.scorer.reverse_kl otherwise")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}; the two models must share one vocabulary "
            "(slice the larger embedding to the shared vocabulary if one model pads it)")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; the kernel takes float32, float16 or "
                             "bfloat16 (use kat.scorer.reverse_kl for other dtypes)")
        if not (x.is_cuda or _INTERPRET):
            raise ValueError(f"{name} is on {x.device}; the kernel runs on CUDA tensors "
                             "(use kat.scorer.reverse_kl on CPU)")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits on {student_logits.device} and teacher_logits on "
                         f"{teacher_logits.device}: move both to one device")
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary axis (last dimension 0)")
    if student_logits.numel() == 0:  # no rows: an empty result still wired to the graph
        return student_logits.float().sum(-1) + teacher_logits.float().sum(-1)
    s = _as_rows(student_logits, vocab)
    t = _as_rows(teacher_logits, vocab)
    return _ReverseKLTriton.apply(s, t).reshape(lead)
