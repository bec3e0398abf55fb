"""The sampler against full forwards of both models over the sequences it produced.

Tiny random Llama models (vocab 24, initialiser scale 0.2 so that the distributions are far from
uniform and the two models disagree with a KL around 1). EOS is an ordinary token, so some rows
stop early and others run to max_new_tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kat.rollout import STOP_EOS, STOP_LENGTH, STOP_RANDOM, STOP_TRAP
from kat.sampler import Mode, sample, sample_token, sampling_mode
from kat.scorer import topk_tail

V, EOS, PAD, MAX_NEW = 24, 1, 0, 24
PROMPT_LENGTHS = (7, 3, 5, 1, 6, 2)  # left-padded to P = 7


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return tiny_llama(0), tiny_llama(1)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(123)
    P = max(PROMPT_LENGTHS)
    ids = torch.randint(4, V, (len(PROMPT_LENGTHS), P), generator=g)  # no EOS inside prompts
    mask = torch.arange(P)[None, :] >= P - torch.tensor(PROMPT_LENGTHS)[:, None]  # (B, P) left-padded
    return ids.masked_fill(~mask, PAD), mask


class FakeTerminator:
    """The terminator interface with scripted decisions; records everything it observes.

    `fire_at[row] = (decide_at, cut)`: the row fires in the chunk containing completion position
    `decide_at`, with that cut. In shadow mode the decision is only recorded in `would_cut`.
    """

    def __init__(self, fire_at=None, needs_kl=True, stop_code=STOP_TRAP, shadow=False):
        self.fire_at = fire_at or {}
        self.needs_kl, self.stop_code, self.shadow = needs_kl, stop_code, shadow

    def start(self, batch, device=None):
        return SimpleNamespace(fired=torch.zeros(batch, dtype=torch.bool, device=device),
                               cut=torch.full((batch,), -1, device=device),
                               would_cut=torch.full((batch,), -1, device=device),
                               pos=0, kl=[], valid=[])

    def observe(self, state, kl_chunk, valid_chunk):
        batch, c = kl_chunk.shape
        fired = torch.zeros(batch, dtype=torch.bool)
        cut = torch.full((batch,), -1)
        for row, (decide_at, row_cut) in self.fire_at.items():
            if state.pos <= decide_at < state.pos + c and valid_chunk[row, decide_at - state.pos]:
                if self.shadow:
                    state.would_cut[row] = row_cut
                elif not state.fired[row]:
                    fired[row], cut[row] = True, row_cut
        state.fired |= fired
        state.cut = torch.where(fired, cut, state.cut)
        state.kl.append(kl_chunk.clone())
        state.valid.append(valid_chunk.clone())
        state.pos += c
        return fired, cut


def full_forward(model, r) -> torch.Tensor:
    """Logits (B, T, V) for every completion position from one uncached forward over prompt + completion."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    P = r.prompt_ids.shape[1]
    return logits[:, P - 1 : -1]  # index P-1+t predicts completion token t


def reference_scores(student, teacher, r):
    """float64 kl, student_logp, teacher_logp from full forwards, zero outside completion_mask."""
    logp = torch.log_softmax(full_forward(student, r).double(), -1)  # (B, T, V)
    logq = torch.log_softmax(full_forward(teacher, r).double(), -1)  # (B, T, V)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    y = r.completion_ids[..., None]
    m = r.completion_mask
    return tuple(torch.where(m, x, 0.0) for x in (kl, logp.gather(-1, y)[..., 0], logq.gather(-1, y)[..., 0]))


def check_completion_structure(r):
    """Right-padded completions; EOS only as the last token of STOP_EOS rows; cut / loss_mask consistent."""
    lengths = r.completion_mask.sum(-1)
    T = r.completion_ids.shape[1]
    assert T == int(lengths.max())
    assert torch.equal(r.completion_mask, torch.arange(T)[None, :] < lengths[:, None])
    assert (r.completion_ids[~r.completion_mask] == PAD).all()
    for b in range(len(lengths)):
        n = int(lengths[b])
        is_eos = r.completion_ids[b, :n] == EOS
        assert not is_eos[:-1].any()
        assert bool(is_eos[-1]) == (int(r.stop[b]) == STOP_EOS)
    uncut = (r.stop == STOP_EOS) | (r.stop == STOP_LENGTH)
    assert torch.equal(r.cut[uncut], lengths[uncut])
    assert torch.equal(r.loss_mask, r.completion_mask & (torch.arange(T)[None, :] < r.cut[:, None]))


def run(models, prompts, seed=0, **kw):
    student, teacher = models
    kw = {"max_new_tokens": MAX_NEW, "eos_token_id": EOS, "pad_token_id": PAD, **kw}
    return sample(student, teacher, *prompts, generator=torch.Generator().manual_seed(seed), **kw)


def test_prompt_setup_has_early_and_full_length_rows(models, prompts):
    r, _ = run(models, prompts, chunk=8, terminator=FakeTerminator())
    assert (r.stop == STOP_EOS).sum() >= 2 and (r.stop == STOP_LENGTH).sum() >= 2
    assert (r.lengths[r.stop == STOP_EOS] < MAX_NEW).all()


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "posthoc"])
def test_scores_equal_full_forward(models, prompts, chunk, lockstep):
    term = FakeTerminator(needs_kl=True) if lockstep else None
    r, state = run(models, prompts, chunk=chunk, terminator=term)
    check_completion_structure(r)
    kl, student_logp, teacher_logp = reference_scores(*models, r)
    for got, want in ((r.kl, kl), (r.student_logp, student_logp), (r.teacher_logp, teacher_logp)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert r.topk_ids is None and r.teacher_topk_logp is None and r.shadow_cut is None
    if lockstep:  # the terminator saw exactly the rollout's KL, over all B rows, per chunk
        seen_kl, seen_valid = torch.cat(state.kl, 1), torch.cat(state.valid, 1)
        assert all(k.shape == (len(PROMPT_LENGTHS), min(chunk, MAX_NEW - i * chunk))
                   for i, k in enumerate(state.kl))
        T = r.completion_ids.shape[1]
        assert torch.equal(seen_valid[:, :T], r.completion_mask) and not seen_valid[:, T:].any()
        assert torch.equal(seen_kl[:, :T], r.kl)
    else:
        assert state is None


def test_chunk_sizes_and_posthoc_give_identical_tokens(models, prompts):
    ref, _ = run(models, prompts, chunk=1, terminator=FakeTerminator())
    for chunk in (3, 8):
        for term in (FakeTerminator(), None):
            r, _ = run(models, prompts, chunk=chunk, terminator=term)
            assert torch.equal(r.completion_ids, ref.completion_ids)
            assert torch.equal(r.completion_mask, ref.completion_mask)
            assert torch.equal(r.stop, ref.stop)
            torch.testing.assert_close(r.kl, ref.kl, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r.teacher_logp, ref.teacher_logp, rtol=1e-5, atol=1e-5)
    other, _ = run(models, prompts, seed=1, chunk=8)
    assert not torch.equal(other.completion_ids[:, :4], ref.completion_ids[:, :4])


def test_posthoc_with_position_only_terminator_calls_observe_with_zero_kl(models, prompts):
    lock, _ = run(models, prompts, chunk=4, terminator=FakeTerminator())
    r, state = run(models, prompts, chunk=4, terminator=FakeTerminator(needs_kl=False))
    assert torch.equal(r.completion_ids, lock.completion_ids)
    torch.testing.assert_close(r.kl, lock.kl, rtol=1e-5, atol=1e-5)
    assert len(state.kl) == MAX_NEW // 4 and all((k == 0).all() for k in state.kl)
    assert torch.equal(torch.cat(state.valid, 1)[:, : r.completion_ids.shape[1]], r.completion_mask)


@pytest.mark.parametrize("term", [None, "position_only"])
def test_unscored_sampling_never_runs_the_teacher(models, prompts, term):
    """score=False: the same tokens as a scored run, no teacher forward, scores marked absent."""
    student, teacher = models
    def make():
        return None if term is None else FakeTerminator({2: (5, 4)}, needs_kl=False, stop_code=STOP_RANDOM)

    ref, _ = run(models, prompts, chunk=4, terminator=make())
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        r, _ = run(models, prompts, chunk=4, terminator=make(), score=False)
    finally:
        hook.remove()
    assert calls == [] and ref.scored and not r.scored
    for name in ("completion_ids", "completion_mask", "loss_mask", "stop", "cut"):
        assert torch.equal(getattr(r, name), getattr(ref, name)), name
    for name in ("kl", "student_logp", "teacher_logp"):
        assert getattr(r, name).isnan().all(), name
    with pytest.raises(ValueError, match="score=True"):
        run(models, prompts, chunk=4, topk=3, score=False)


@pytest.mark.parametrize("needs_kl,score,mode", [(True, True, "lockstep"), (True, False, "lockstep"),
                                                (False, True, "post-hoc"), (False, False, "unscored")])
def test_the_mode_decides_when_the_teacher_runs(models, prompts, needs_kl, score, mode):
    """lockstep: prefill + one forward per chunk; post-hoc: one forward; unscored: none."""
    student, teacher = models
    term = FakeTerminator(needs_kl=needs_kl)
    assert sampling_mode(term, score) == mode and sampling_mode(None, score) == ("post-hoc" if score else "unscored")
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(a[2].logits.shape[1]))  # positions scored
    try:
        r, _ = run(models, prompts, chunk=4, terminator=term, score=score)
    finally:
        hook.remove()
    T = r.completion_ids.shape[1]
    expected = {"lockstep": [1] + [4] * -(-T // 4), "post-hoc": [T + 1], "unscored": []}[mode]
    assert calls == expected and r.scored == (mode != Mode.UNSCORED)


def test_finished_rows_leave_both_caches(models, prompts):
    student, teacher = models
    sizes = {"student": [], "teacher": []}
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw, name=name: sizes[name].append(kw["input_ids"].shape),
                                         with_kwargs=True)
             for name, m in (("student", student), ("teacher", teacher))]
    try:
        r, _ = run(models, prompts, chunk=4, terminator=FakeTerminator())
    finally:
        for h in hooks:
            h.remove()
    lengths = r.lengths
    # teacher: prefill, then one (A, 4) forward per chunk, A = rows still running at the chunk start
    want = [(len(PROMPT_LENGTHS), max(PROMPT_LENGTHS))] + [
        (int((lengths > t0).sum()), 4) for t0 in range(0, MAX_NEW, 4) if (lengths > t0).any()]
    assert sizes["teacher"] == want
    # student: prefill, then one (A, 1) step per position, except after the rollout's last position
    want = [(len(PROMPT_LENGTHS), max(PROMPT_LENGTHS))] + [
        (int((lengths > t - t % 4).sum()), 1) for t in range(MAX_NEW - 1) if (lengths > t - t % 4).any()]
    assert sizes["student"] == want
    assert (lengths < MAX_NEW).any()  # rows did leave


@pytest.mark.parametrize("chunk", [1, 4])
def test_terminator_fires(models, prompts, chunk):
    free, _ = run(models, prompts, chunk=chunk, terminator=FakeTerminator())
    row = int(torch.nonzero(free.lengths == MAX_NEW)[0])  # a row that would run to the end
    decide_at, row_cut = 10, 6
    r, state = run(models, prompts, chunk=chunk,
                   terminator=FakeTerminator({row: (decide_at, row_cut)}, stop_code=STOP_RANDOM))
    check_completion_structure(r)
    end = (decide_at // chunk + 1) * chunk  # the row stops at the end of the chunk where it fired
    assert int(r.lengths[row]) == end and int(r.stop[row]) == STOP_RANDOM and int(r.cut[row]) == row_cut
    assert torch.equal(r.loss_mask[row], torch.arange(r.completion_ids.shape[1]) < row_cut)
    assert torch.equal(r.completion_mask[row], torch.arange(r.completion_ids.shape[1]) < end)
    # no EOS appended: the generated tokens are those of the free run, then pads
    assert torch.equal(r.completion_ids[row, :end], free.completion_ids[row, :end])
    assert (r.completion_ids[row, end:] == PAD).all()
    torch.testing.assert_close(r.kl[row, :end], free.kl[row, :end], rtol=1e-5, atol=1e-5)
    assert (r.kl[row, end:] == 0).all()
    assert bool(state.fired[row]) and int(state.cut[row]) == row_cut
    others = torch.arange(len(PROMPT_LENGTHS)) != row
    T = r.completion_ids.shape[1]
    assert torch.equal(r.completion_ids[others], free.completion_ids[others, :T])
    assert torch.equal(r.loss_mask[others], free.loss_mask[others, :T])
    assert torch.equal(r.stop[others], free.stop[others]) and torch.equal(r.cut[others], free.cut[others])
    torch.testing.assert_close(r.kl[others], free.kl[others, :T], rtol=1e-5, atol=1e-5)


def test_shadow_mode_records_without_cutting(models, prompts):
    free, _ = run(models, prompts, chunk=4, terminator=FakeTerminator())
    row = int(torch.nonzero(free.lengths == MAX_NEW)[0])
    r, _ = run(models, prompts, chunk=4, terminator=FakeTerminator({row: (10, 6)}, shadow=True))
    assert torch.equal(r.completion_ids, free.completion_ids) and torch.equal(r.loss_mask, free.loss_mask)
    assert torch.equal(r.stop, free.stop) and torch.equal(r.cut, free.cut)
    want = torch.full((len(PROMPT_LENGTHS),), -1)
    want[row] = 6
    assert torch.equal(r.shadow_cut, want)


def greedy_by_hand(model, prompts, max_new):
    """Uncached argmax decoding of each row on its own, unpadded prompt."""
    ids, mask = prompts
    out = []
    for b in range(ids.shape[0]):
        seq = ids[b, mask[b]].tolist()
        done = []
        for _ in range(max_new):
            nxt = int(model(torch.tensor([seq + done])).logits[0, -1].argmax())
            done.append(nxt)
            if nxt == EOS:
                break
        out.append(done)
    return out


def test_greedy_and_tiny_top_p_equal_argmax_by_hand(models, prompts):
    want = greedy_by_hand(models[0], prompts, MAX_NEW)
    greedy, _ = run(models, prompts, chunk=3, temperature=0.0)
    nucleus, _ = run(models, prompts, chunk=3, top_p=1e-6)
    for r in (greedy, nucleus):
        got = [r.completion_ids[b, : int(n)].tolist() for b, n in enumerate(r.lengths)]
        assert got == want


def test_sample_token_inverse_cdf_and_nucleus():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))  # sorted: 1 (.5), 3 (.25), 2 (.15), 0 (.1)
    def draw(u, **kw):
        return int(sample_token(logits, torch.tensor([u]), **kw))
    assert [draw(u) for u in (0.0, 0.49, 0.51, 0.74, 0.76, 0.89, 0.91, 0.999999)] == [1, 1, 3, 3, 2, 2, 0, 0]
    # top_p = 0.7: mass before token 2 is 0.75 >= 0.7, so only {1, 3} remain, renormalised to 2/3, 1/3
    assert [draw(u, top_p=0.7) for u in (0.0, 0.66, 0.67, 0.999999)] == [1, 1, 3, 3]
    # temperature 2 flattens: probs proportional to sqrt(p)
    p = torch.tensor([0.1, 0.5, 0.15, 0.25]).sqrt()
    first = float(p[1] / p.sum())
    assert draw(first - 1e-4, temperature=2.0) == 1 and draw(first + 1e-4, temperature=2.0) == 3
    assert int(sample_token(logits, None, temperature=0.0)) == 1


def test_empirical_distribution_matches_softmax():
    logits = torch.randn(1, 6, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    u = torch.rand(40_000, generator=g)
    tokens = sample_token(logits.expand(40_000, 6), u)
    freq = torch.bincount(tokens, minlength=6).double() / 40_000
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), -1), atol=0.01, rtol=0)


@pytest.mark.parametrize("lockstep", [True, False], ids=["lockstep", "posthoc"])
def test_topk_capture_equals_topk_tail_on_full_forward(models, prompts, lockstep):
    r, _ = run(models, prompts, chunk=3, topk=5, terminator=FakeTerminator() if lockstep else None)
    ids, tail = topk_tail(full_forward(models[0], r), full_forward(models[1], r), 5)
    m = r.completion_mask
    assert r.topk_ids.shape == (*m.shape, 5) and r.teacher_topk_logp.shape == (*m.shape, 6)
    assert torch.equal(r.topk_ids[m], ids[m])
    torch.testing.assert_close(r.teacher_topk_logp[m], tail[m], rtol=1e-5, atol=1e-5)
    assert (r.topk_ids[~m] == 0).all() and (r.teacher_topk_logp[~m] == 0).all()


def test_non_finite_teacher_is_reported(prompts):
    student, teacher = tiny_llama(0), tiny_llama(1)
    with torch.no_grad():
        teacher.lm_head.weight[5] = float("nan")
    for term in (FakeTerminator(), None):
        with pytest.raises(FloatingPointError, match=r"teacher logits are non-finite at \[\(0, 0\)"):
            sample(student, teacher, *prompts, max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD,
                   terminator=term, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs, match", [
    ({"chunk": 0}, "chunk"), ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"eos_token_id": "x"}, "eos_token_id"),
])
def test_bad_arguments_are_named(models, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(models, prompts, **kwargs)


def test_right_padded_prompts_are_rejected(models, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="left-padded"):
        run(models, (ids, mask.flip(-1)))


def test_terminator_cut_outside_generated_positions_is_rejected(models, prompts):
    with pytest.raises(ValueError, match=r"FakeTerminator fired rows \[0\] with cut \[-1\]"):
        run(models, prompts, chunk=4, terminator=FakeTerminator({0: (2, -1)}))


def test_decode_attention_leaves_cudnn_out_on_cuda_only(monkeypatch):
    """The decode loop's backend choice: cuDNN attention off inside on a CUDA device, restored after;
    nothing changes on CPU or with DECODE_SDPA_BACKENDS = None (the flags are global, so a CPU build
    can check them)."""
    from kat import sampler

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with sampler.decode_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with sampler.decode_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    monkeypatch.setattr(sampler, "DECODE_SDPA_BACKENDS", None)
    with sampler.decode_attention(torch.device("cuda")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
