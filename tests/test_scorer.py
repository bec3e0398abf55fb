"""The KL maths against an independent float64 reference."""

import pytest
import torch

from kat.scorer import reverse_kl, token_logp, topk_tail


def ref_kl(s, t):
    """float64 reference: sum_v p (log p - log q)."""
    logp, logq = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("dtype,scale,tol", [
    (torch.float32, 3.0, 1e-5),
    (torch.float16, 3.0, 1e-5),
    (torch.bfloat16, 3.0, 1e-5),
    (torch.float16, 3000.0, 1e-3),  # large logits: fp16 exp would overflow without fp32 accumulation
])
def test_reverse_kl_matches_float64(dtype, scale, tol):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 7, 211, generator=g) * scale).to(dtype)
    t = (torch.randn(3, 7, 211, generator=g) * scale).to(dtype)
    got = reverse_kl(s, t)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    want = ref_kl(s, t)  # the reference sees the same rounded half-precision inputs
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_reverse_kl_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(37, 50, generator=g), torch.randn(37, 50, generator=g)
    whole = reverse_kl(s, t, chunk_rows=10_000)
    for n in (1, 4, 36):
        assert torch.equal(reverse_kl(s, t, chunk_rows=n), whole)


def test_reverse_kl_matches_kl_div_direction():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    # F.kl_div(input, target) = KL(target || input): reverse KL(p_s || q_t) puts the teacher as input.
    via_kl_div = torch.nn.functional.kl_div(t.log_softmax(-1), s.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1)
    torch.testing.assert_close(reverse_kl(s, t), via_kl_div, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reverse_kl_gradient_matches_float64_autograd(dtype):
    g = torch.Generator().manual_seed(3)
    s0, t0 = torch.randn(6, 13, generator=g), torch.randn(6, 13, generator=g)
    w = torch.rand(6, generator=g)
    s = s0.clone().to(dtype).requires_grad_(True)
    t = t0.clone().to(dtype).requires_grad_(True)
    (reverse_kl(s, t, chunk_rows=4) * w.to(dtype)).sum().backward()
    s64, t64 = s0.double().requires_grad_(True), t0.double().requires_grad_(True)
    (ref_kl(s64, t64) * w.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-6)


def test_token_logp_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 5, 17, generator=g) * 4
    ids = torch.randint(0, 17, (4, 5), generator=g)
    x = x0.clone().requires_grad_(True)
    got = token_logp(x, ids, chunk_rows=3)
    x64 = x0.double().requires_grad_(True)
    want = torch.log_softmax(x64, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    w = torch.randn(4, 5, generator=g)
    (got * w).sum().backward()
    (want * w.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def test_token_logp_half_precision_large_logits():
    x = torch.tensor([[3000.0, 2990.0, -3000.0]], dtype=torch.float16)
    got = token_logp(x, torch.tensor([1]))
    want = torch.log_softmax(x.double(), -1)[0, 1]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double()[0], want, rtol=1e-5, atol=1e-5)


def test_topk_tail_against_float64():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 40, generator=g), torch.randn(2, 3, 40, generator=g) * 2
    ids, tl = topk_tail(s, t, k=5, chunk_rows=2)
    assert ids.shape == (2, 3, 5) and tl.shape == (2, 3, 6)
    assert torch.equal(ids, s.topk(5, -1).indices)
    logq = torch.log_softmax(t.double(), -1)
    torch.testing.assert_close(tl[..., :5].double(), logq.gather(-1, ids), rtol=1e-6, atol=1e-6)
    tail = torch.log(1 - logq.gather(-1, ids).exp().sum(-1))
    torch.testing.assert_close(tl[..., 5].double(), tail, rtol=1e-6, atol=1e-6)


def test_topk_tail_full_vocab_has_empty_tail():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    ids, tl = topk_tail(s, t, k=100)
    assert ids.shape == (4, 8) and torch.isneginf(tl[:, -1]).all()
    torch.testing.assert_close(tl[:, :-1].exp().sum(-1), torch.ones(4))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        reverse_kl(torch.randn(2, 5), torch.randn(2, 6))


def test_masked_vocabulary_entries():
    """-inf logits (masked tokens) contribute nothing when both models mask them; the teacher
    masking a token the student uses makes the KL infinite, as the maths says."""
    s = torch.tensor([[1.0, 2.0, float("-inf"), 0.5]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, float("-inf"), 2.0]])
    got = reverse_kl(s, t)
    want = ref_kl(s.detach()[:, [0, 1, 3]], t[:, [0, 1, 3]])
    torch.testing.assert_close(got.double(), want)
    got.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 2] == 0
    assert torch.isinf(reverse_kl(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, float("-inf")]]))).all()


def test_randomised_shapes_dtypes_and_chunks():
    """Random leading shapes, vocab sizes, scales, dtypes and chunk sizes against float64."""
    g = torch.Generator().manual_seed(6)
    for trial in range(40):
        lead = tuple(int(n) for n in torch.randint(1, 5, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g))
        V = int(torch.randint(2, 300, (1,), generator=g))
        dtype = (torch.float32, torch.float16, torch.bfloat16)[trial % 3]
        scale = float(torch.empty(1).uniform_(0.1, 30.0, generator=g))
        s = (torch.randn(*lead, V, generator=g) * scale).to(dtype)
        t = (torch.randn(*lead, V, generator=g) * scale).to(dtype)
        chunk = int(torch.randint(1, 7, (1,), generator=g))
        got = reverse_kl(s, t, chunk_rows=chunk)
        want = ref_kl(s, t)
        assert got.shape == lead and (got >= -1e-6).all()
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * max(1.0, float(want.abs().max())))
        ids = torch.randint(0, V, lead, generator=g)
        want_logp = torch.log_softmax(s.double(), -1).gather(-1, ids[..., None]).squeeze(-1)
        torch.testing.assert_close(token_logp(s, ids, chunk_rows=chunk).double(), want_logp, rtol=1e-5, atol=1e-4)
