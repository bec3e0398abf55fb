"""The fused Triton reverse KL against a float64 reference and against the PyTorch path.

Runs on CPU under Triton's interpreter: TRITON_INTERPRET=1 must be set when the kernels are
decorated (when kat.kernels is imported) and when they first run. It is set for exactly those
two moments, so that it does not leak into other test modules. The whole module skips where
triton is not installed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

from kat.scorer import reverse_kl


def _import_interpreted():
    """kat.kernels with its kernels built for Triton's interpreter."""
    pytest.importorskip("triton", reason="triton is not installed; the fused KL kernel is optional")
    if "kat.kernels" in sys.modules:  # imported earlier in this session without the interpreter
        return importlib.reload(sys.modules["kat.kernels"])
    return importlib.import_module("kat.kernels")


@contextlib.contextmanager
def _interpreter_env():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


with _interpreter_env():
    kernels = _import_interpreted()


@pytest.fixture(autouse=True, scope="module")
def _interpreter():
    # Triton reads the variable again when a kernel first runs (lazy imports): keep it set while
    # this module's tests run, and only then.
    with _interpreter_env():
        yield


reverse_kl_triton = kernels.reverse_kl_triton

# The interpreter evaluates both branches of tl.where on numpy arrays, so lanes that the kernel
# masks out (-inf - -inf) raise numpy's warning although their values are discarded.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

INF = float("inf")


def ref_kl(s, t):
    """float64 reference: sum_v p (log p - log q), with 0 log 0 = 0 where the student masks a token."""
    logp, logq = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def logits(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype), (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_close_scaled(got, want, tol):
    """|got - want| <= tol * max(1, max |want|): relative to the largest value, as fp32 sums are."""
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_available_under_interpreter():
    assert kernels.triton_available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 4099])  # a partial last block; a 3-entry tail after 4096
def test_value_matches_float64_and_pytorch_path(dtype, vocab):
    s, t = logits((2, 3, vocab), dtype)
    got = reverse_kl_triton(s, t)
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    assert_close_scaled(got, ref_kl(s, t), 1e-5)  # the reference sees the same rounded inputs
    assert_close_scaled(got, reverse_kl(s, t), 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("vocab", [1000, 4099])
def test_gradients_match_float64_and_pytorch_path(dtype, tol, vocab):
    s0, t0 = logits((4, vocab), dtype, seed=1)
    w = torch.tensor([0.5, -1.0, 2.0, 0.0])  # per-row upstream gradient, one of them zero
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    (reverse_kl_triton(s, t) * w).sum().backward()
    assert s.grad.dtype == dtype and t.grad.dtype == dtype

    s64, t64 = s0.double().requires_grad_(True), t0.double().requires_grad_(True)
    (ref_kl(s64, t64) * w.double()).sum().backward()
    # Gradients are stored in the input dtype: compare at that dtype's resolution.
    assert_close_scaled(s.grad, s64.grad, tol)
    assert_close_scaled(t.grad, t64.grad, tol)

    s_pt, t_pt = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    (reverse_kl(s_pt, t_pt) * w).sum().backward()
    assert_close_scaled(s.grad, s_pt.grad, tol)
    assert_close_scaled(t.grad, t_pt.grad, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_half_precision_logits(dtype):
    # e^{3000} overflows every float format: only max-shifted exponents keep this finite.
    s, t = logits((3, 1000), dtype, scale=3000.0, seed=2)
    s[0, 7], t[1, 9] = 3000.0, -3000.0
    s.requires_grad_(True)
    got = reverse_kl_triton(s, t)
    assert torch.isfinite(got).all()
    assert_close_scaled(got, ref_kl(s.detach(), t), 1e-5)
    got.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("order", ["rising", "falling", "random"])
def test_online_max_across_blocks(monkeypatch, order):
    # 64-wide blocks over 1000 logits: 16 blocks, and with rising logits every block raises the
    # running max, so Z and A are rescaled at every step.
    monkeypatch.setattr(kernels, "_MAX_BLOCK_V", 64)
    g = torch.Generator().manual_seed(3)
    base = {"rising": torch.linspace(-20, 20, 1000), "falling": torch.linspace(20, -20, 1000),
            "random": torch.randn(1000, generator=g) * 5}[order]
    s0 = torch.stack([base, base + torch.randn(1000, generator=g)])  # (2, 1000)
    t0 = torch.stack([base.flip(0), base + torch.randn(1000, generator=g)])
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    got = reverse_kl_triton(s, t)
    assert_close_scaled(got, ref_kl(s0, t0), 1e-5)
    got.sum().backward()
    s64, t64 = s0.double().requires_grad_(True), t0.double().requires_grad_(True)
    ref_kl(s64, t64).sum().backward()
    assert_close_scaled(s.grad, s64.grad, 1e-5)
    assert_close_scaled(t.grad, t64.grad, 1e-5)


def test_masked_vocabulary(monkeypatch):
    monkeypatch.setattr(kernels, "_MAX_BLOCK_V", 64)  # a fully masked block sits in the middle
    s0, t0 = logits((3, 300), torch.float32, seed=4)
    masked = torch.zeros(300, dtype=torch.bool)
    masked[64:128] = True  # one whole block
    masked[[0, 5, 299]] = True
    s0[:, masked], t0[:, masked] = -INF, -INF
    s, t = s0.clone().requires_grad_(True), t0.clone().requires_grad_(True)
    got = reverse_kl_triton(s, t)
    got.sum().backward()
    # Independent check: the KL over the kept vocabulary alone, and its gradients (the float64
    # reference cannot be differentiated through -inf itself: 0 * inf).
    s64, t64 = s0[:, ~masked].double().requires_grad_(True), t0[:, ~masked].double().requires_grad_(True)
    want = ref_kl(s64, t64)
    want.sum().backward()
    assert_close_scaled(got, want, 1e-5)
    assert_close_scaled(s.grad[:, ~masked], s64.grad, 1e-5)
    assert_close_scaled(t.grad[:, ~masked], t64.grad, 1e-5)
    assert (s.grad[:, masked] == 0).all() and (t.grad[:, masked] == 0).all()


def test_masked_by_one_side():
    s, t = logits((2, 300), torch.float32, seed=7)
    # The student ruling out a token the teacher keeps: it contributes nothing (0 log 0 = 0).
    s_masked = s.clone()
    s_masked[0, 10] = -INF
    assert_close_scaled(reverse_kl_triton(s_masked, t), ref_kl(s_masked, t), 1e-5)
    # The teacher ruling out a token the student can sample: the divergence is infinite.
    t_masked = t.clone()
    t_masked[1, 10] = -INF
    assert reverse_kl_triton(s, t_masked).tolist() == [pytest.approx(ref_kl(s, t)[0].item(), rel=1e-5), INF]


def test_teacher_frozen_and_strided_inputs():
    s0, t0 = logits((5, 700), torch.float16, seed=5)
    padded = torch.cat([s0, torch.zeros(5, 24, dtype=torch.float16)], dim=-1)  # a padded embedding
    s = padded[:, :700].detach().requires_grad_(True)  # row stride 724
    t = t0.t().contiguous().t()  # column-major: copied to rows with unit stride
    got = reverse_kl_triton(s, t)
    assert_close_scaled(got, ref_kl(s0, t0), 1e-5)
    got.sum().backward()
    assert t.grad is None and s.grad.shape == (5, 700)
    s_pt = s0.clone().requires_grad_(True)
    reverse_kl(s_pt, t0).sum().backward()
    assert_close_scaled(s.grad, s_pt.grad, 2e-3)


def test_mixed_input_dtypes():
    s, _ = logits((3, 500), torch.bfloat16, seed=6)
    _, t = logits((3, 500), torch.float16, seed=6)
    assert_close_scaled(reverse_kl_triton(s, t), ref_kl(s, t), 1e-5)


def test_supports():
    s, t = logits((2, 10), torch.float16)
    assert kernels.supports(s, t) and kernels.supports(s.float(), t.bfloat16())
    assert not kernels.supports(s.double(), t)  # float64 stays on the PyTorch path
    assert not kernels.supports(s, t[:, :9])


def test_errors_name_the_argument():
    s, t = logits((2, 10), torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        reverse_kl_triton(s, t[:, :9])
    with pytest.raises(ValueError, match="teacher_logits has dtype torch.float64"):
        reverse_kl_triton(s, t.double())
