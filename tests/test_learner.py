"""OPD losses against float64 references, and the optimiser step's invariances."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import LlamaConfig, LlamaForCausalLM

from kat.learner import build_optimizer, completion_logits, learn, micro_batches, opd_loss
from kat.rollout import STOP_EOS, STOP_LENGTH, STOP_TRAP, Rollout
from kat.scorer import topk_tail

V = 23  # vocabulary of the tiny models


def tiny_llama(seed: int, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def row_logits(model, prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Logits predicting each completion token, from a forward over one unpadded sequence."""
    ids = torch.cat([prompt, completion])[None]  # (1, p + n)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (p + n, V)
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]  # (n, V)


def make_rollout(student, teacher, batch: int = 4, prompt_len: int = 5, completion_len: int = 7, k: int = 4,
                 seed: int = 0) -> Rollout:
    """A hand-built Rollout: random left-padded prompts, right-padded completions, some rows cut.

    Log-probs, KL and top-k are computed from per-row forwards over the unpadded sequences, which
    is how the sampler's numbers are defined and independent of `completion_logits`.
    """
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.zeros(batch, prompt_len, dtype=torch.long)
    prompt_mask = torch.zeros(batch, prompt_len, dtype=torch.bool)
    completion_ids = torch.zeros(batch, completion_len, dtype=torch.long)
    completion_mask = torch.zeros(batch, completion_len, dtype=torch.bool)
    s_logits = torch.zeros(batch, completion_len, V)
    t_logits = torch.zeros(batch, completion_len, V)
    stop = torch.full((batch,), STOP_LENGTH)
    cut = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        p = int(torch.randint(1, prompt_len + 1, (1,), generator=g))
        n = completion_len if b == 0 else int(torch.randint(1, completion_len + 1, (1,), generator=g))
        prompt = torch.randint(1, V, (p,), generator=g)
        completion = torch.randint(1, V, (n,), generator=g)
        prompt_ids[b, prompt_len - p :], prompt_mask[b, prompt_len - p :] = prompt, True
        completion_ids[b, :n], completion_mask[b, :n] = completion, True
        s_logits[b, :n] = row_logits(student, prompt, completion)
        t_logits[b, :n] = row_logits(teacher, prompt, completion)
        cut[b] = n
        if b % 2 == 1 and n > 1:  # odd rows are cut by the detector somewhere inside
            cut[b] = int(torch.randint(1, n, (1,), generator=g))
            stop[b] = STOP_TRAP
        elif n < completion_len:
            stop[b] = STOP_EOS
    loss_mask = completion_mask & (torch.arange(completion_len) < cut[:, None])
    logp64, logq64 = s_logits.double().log_softmax(-1), t_logits.double().log_softmax(-1)
    topk_ids, teacher_topk_logp = topk_tail(s_logits, t_logits, k)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, loss_mask=loss_mask,
        student_logp=logp64.gather(-1, completion_ids[..., None]).squeeze(-1).float(),
        teacher_logp=logq64.gather(-1, completion_ids[..., None]).squeeze(-1).float(),
        kl=(logp64.exp() * (logp64 - logq64)).sum(-1).float(),
        stop=stop, cut=cut, topk_ids=topk_ids, teacher_topk_logp=teacher_topk_logp)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1, layers=3)


@pytest.fixture(scope="module")
def rollout(models):
    return make_rollout(*models)


def logits_pair(rollout: Rollout, seed: int = 3, scale: float = 2.0):
    """Random (B, T, V) student (leaf, requires grad) and teacher logits of the rollout's shape."""
    g = torch.Generator().manual_seed(seed)
    shape = (*rollout.completion_ids.shape, V)
    s0 = torch.randn(shape, generator=g) * scale
    t0 = torch.randn(shape, generator=g) * scale
    return s0, t0


def grad_of(fn, s0: torch.Tensor, dtype=torch.float32):
    s = s0.clone().to(dtype).requires_grad_(True)
    value = fn(s)
    value.backward()
    return value.detach().double(), s.grad.double()


def ref_full(s, t, mask):
    """float64 sum over mask of KL(p || q)."""
    logp, logq = s.double().log_softmax(-1), t.double().log_softmax(-1)
    return ((logp.exp() * (logp - logq)).sum(-1) * mask).sum()


# -- completion_logits ------------------------------------------------------------------------


def test_completion_logits_equal_unpadded_forwards(models, rollout):
    student, _ = models
    with torch.no_grad():
        got = completion_logits(student, rollout)  # (B, T, V)
    assert got.shape == (*rollout.completion_ids.shape, V)
    for b in range(rollout.prompt_ids.shape[0]):
        prompt = rollout.prompt_ids[b][rollout.prompt_mask[b]]
        completion = rollout.completion_ids[b][rollout.completion_mask[b]]
        want = row_logits(student, prompt, completion)
        torch.testing.assert_close(got[b, : len(completion)], want, rtol=1e-5, atol=1e-5)


# -- the three losses -------------------------------------------------------------------------


def test_full_loss_value_and_gradient_match_float64(rollout):
    s0, t0 = logits_pair(rollout)
    mask = rollout.loss_mask
    got, got_grad = grad_of(lambda s: opd_loss(s, rollout, "full", t0)[0], s0)
    want, want_grad = grad_of(lambda s: ref_full(s, t0, mask), s0, torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert opd_loss(s0, rollout, "full", t0)[1].item() == mask.sum().item()


@pytest.mark.parametrize("k", [V, V + 5])
def test_topk_with_full_vocabulary_equals_full(rollout, k):
    s0, t0 = logits_pair(rollout)
    ids, teacher_topk_logp = topk_tail(s0, t0, k)
    assert torch.isneginf(teacher_topk_logp[..., -1]).all()  # the tail is empty
    r = copy.copy(rollout)
    r.topk_ids, r.teacher_topk_logp = ids, teacher_topk_logp
    topk, topk_grad = grad_of(lambda s: opd_loss(s, r, "topk")[0], s0)
    full, full_grad = grad_of(lambda s: opd_loss(s, r, "full", t0)[0], s0)
    assert torch.isfinite(topk_grad).all()
    torch.testing.assert_close(topk, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(topk_grad, full_grad, rtol=1e-5, atol=1e-6)


def ref_topk(s, t, ids, mask):
    """float64 top-k + tail: sum_S p log(p/q) + p_tail log(p_tail/q_tail), tails as 1 - head mass."""
    p, q = s.double().softmax(-1), t.double().softmax(-1)
    p_s, q_s = p.gather(-1, ids), q.gather(-1, ids)
    p_tail, q_tail = 1 - p_s.sum(-1), 1 - q_s.sum(-1)
    d = (p_s * (p_s.log() - q_s.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return (d * mask).sum()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_small_k_matches_float64(rollout, k):
    s0, t0 = logits_pair(rollout, seed=4)
    ids, teacher_topk_logp = topk_tail(s0, t0, k)
    r = copy.copy(rollout)
    r.topk_ids, r.teacher_topk_logp = ids, teacher_topk_logp
    got, got_grad = grad_of(lambda s: opd_loss(s, r, "topk")[0], s0)
    want, want_grad = grad_of(lambda s: ref_topk(s, t0, ids, rollout.loss_mask), s0, torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    # the estimate is a lower bound of the exact KL (data processing: pooling the tail)
    assert got.item() <= ref_full(s0, t0, rollout.loss_mask).item() + 1e-6


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_sampled_value_and_gradient_match_hand_computation(rollout, shift):
    s0, _ = logits_pair(rollout, seed=5)
    r = copy.copy(rollout)
    ids, mask = rollout.completion_ids, rollout.loss_mask
    # shift != 0: the behaviour log-probs differ from the current ones (importance weight != 1)
    r.student_logp = s0.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) - shift

    def ref(s):
        logp = s.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)  # (B, T) float64
        old, teacher = r.student_logp.double(), r.teacher_logp.double()
        advantage = -(old - teacher)
        return (-torch.exp(logp - old) * advantage * mask).sum()

    got, got_grad = grad_of(lambda s: opd_loss(s, r, "sampled")[0], s0)
    want, want_grad = grad_of(ref, s0, torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    if shift == 0.0:  # on-policy, the value is sum of (log p - log q) on the sampled tokens
        want_value = ((r.student_logp - r.teacher_logp).double() * mask).sum()
        torch.testing.assert_close(got, want_value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["full", "topk", "sampled"])
def test_loss_mask_gives_zero_gradient_and_ignores_garbage(rollout, kind):
    s0, t0 = logits_pair(rollout, seed=6)
    r = copy.copy(rollout)
    outside = ~rollout.loss_mask
    # whatever the rollout holds outside the mask must not leak in (not even NaN)
    r.student_logp = rollout.student_logp.masked_fill(outside, float("nan"))
    r.teacher_logp = rollout.teacher_logp.masked_fill(outside, float("-inf"))
    r.teacher_topk_logp = rollout.teacher_topk_logp.masked_fill(outside[..., None], float("nan"))
    r.completion_ids = rollout.completion_ids.masked_fill(outside, -100)
    r.topk_ids = rollout.topk_ids.masked_fill(outside[..., None], -100)
    value, grad = grad_of(lambda s: opd_loss(s, r, kind, t0)[0], s0)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert (grad[outside] == 0).all() and (grad[rollout.loss_mask] != 0).any()
    clean, _ = grad_of(lambda s: opd_loss(s, rollout, kind, t0)[0], s0)
    torch.testing.assert_close(value, clean, rtol=0, atol=0)


def test_unknown_kind_and_missing_teacher(rollout, models):
    s0, t0 = logits_pair(rollout)
    with pytest.raises(ValueError, match="full.*topk.*sampled"):
        opd_loss(s0, rollout, "reverse", t0)
    with pytest.raises(ValueError, match="teacher_logits"):
        opd_loss(s0, rollout, "full")
    student, _ = models
    opt, sched = build_optimizer(student, 1e-3, 10, 0.1)
    with pytest.raises(ValueError, match="teacher"):
        learn(student, rollout, opt, sched, Accelerator(cpu=True), kind="full", micro_batch_size=2)


# -- the optimiser step -----------------------------------------------------------------------


def one_step(student, teacher, rollout, kind, micro_batch_size, lr=1e-3):
    model = copy.deepcopy(student).train()
    opt, sched = build_optimizer(model, lr, steps=10, warmup_ratio=0.0)
    accelerator = Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    stats = learn(model, rollout, opt, sched, accelerator, kind=kind, micro_batch_size=micro_batch_size,
                  teacher=teacher)
    return accelerator.unwrap_model(model), stats


@pytest.mark.parametrize("kind", ["full", "topk", "sampled"])
def test_micro_batches_do_not_change_the_step(models, rollout, kind):
    student, teacher = models
    whole, stats_whole = one_step(student, teacher, rollout, kind, micro_batch_size=4)
    split, stats_split = one_step(student, teacher, rollout, kind, micro_batch_size=1)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    moved = max((a - b).abs().max().item() for a, b in zip(whole.parameters(), student.parameters()))
    assert moved > 1e-4  # the step did something
    n = rollout.loss_mask.sum().item()
    assert stats_whole["n_tokens"] == stats_split["n_tokens"] == n and stats_whole["finite"]
    assert stats_whole["loss"] == pytest.approx(stats_split["loss"], rel=1e-5)
    assert stats_whole["grad_norm"] == pytest.approx(stats_split["grad_norm"], rel=1e-4)
    if kind == "full":  # before the step the student is the rollout's policy: loss = mean kept KL
        assert stats_whole["loss"] == pytest.approx((rollout.kl * rollout.loss_mask).sum().item() / n, rel=1e-5)


@pytest.mark.parametrize("micro_batch_size", [4, 3])
def test_full_step_returns_the_rollouts_kl_and_unscored_rollouts_learn_the_same(models, rollout, micro_batch_size):
    """token_kl is d_t at every generated position (cut ones too); an unscored rollout gives the same step."""
    student, teacher = models
    scored, stats = one_step(student, teacher, rollout, "full", micro_batch_size)
    assert rollout.loss_mask.sum() < rollout.completion_mask.sum()  # some generated tokens are cut
    expect = torch.where(rollout.completion_mask, rollout.kl, 0.0)
    torch.testing.assert_close(stats["token_kl"], expect, rtol=1e-5, atol=1e-6)
    nan = torch.full_like(rollout.kl, float("nan"))
    bare = dataclasses.replace(rollout, kl=nan, student_logp=nan, teacher_logp=nan, scored=False)
    unscored, stats_bare = one_step(student, teacher, bare, "full", micro_batch_size)
    assert torch.equal(stats_bare["token_kl"], stats["token_kl"]) and stats_bare["loss"] == stats["loss"]
    for a, b in zip(scored.parameters(), unscored.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="sample with score=True"):
        one_step(student, teacher, bare, "sampled", micro_batch_size)
    # nothing kept anywhere: no step, but the KL of what was generated is still returned
    empty = dataclasses.replace(bare, loss_mask=torch.zeros_like(rollout.loss_mask))
    _, stats_empty = one_step(student, teacher, empty, "full", micro_batch_size)
    assert stats_empty["n_tokens"] == 0
    torch.testing.assert_close(stats_empty["token_kl"], stats["token_kl"], rtol=1e-6, atol=1e-7)


def test_micro_batches_group_rows_by_length_and_trim_drops_only_padding(models):
    """Several micro-batches: every row once, by completion length; each trimmed part loses only
    columns that are padding in all its rows, and its logits still equal unpadded per-row forwards."""
    student, teacher = models
    r = make_rollout(student, teacher, batch=8, prompt_len=6, completion_len=9, seed=5)
    assert micro_batches(r, 8) == [slice(0, 8)] and micro_batches(r, 100) == [slice(0, 8)]
    parts = micro_batches(r, 3)
    order = torch.cat(parts)
    assert [len(p) for p in parts] == [3, 3, 2] and sorted(order.tolist()) == list(range(8))
    assert (r.lengths[order][1:] >= r.lengths[order][:-1]).all()
    narrower = 0
    for rows in parts:
        part, trimmed = r.select(rows), r.select(rows).trim()
        dropped_p = part.prompt_ids.shape[1] - trimmed.prompt_ids.shape[1]
        T = trimmed.completion_ids.shape[1]
        assert not part.prompt_mask[:, :dropped_p].any() and trimmed.prompt_mask[:, 0].any()
        assert not part.completion_mask[:, T:].any() and trimmed.completion_mask[:, -1].any()
        assert torch.equal(trimmed.loss_mask, part.loss_mask[:, :T]) and torch.equal(trimmed.kl, part.kl[:, :T])
        narrower += dropped_p + r.completion_ids.shape[1] - T
        with torch.no_grad():
            got = completion_logits(student, trimmed)  # (b, T, V)
        for j, b in enumerate(rows.tolist()):
            n = int(r.lengths[b])
            want = row_logits(student, r.prompt_ids[b][r.prompt_mask[b]], r.completion_ids[b, :n])
            torch.testing.assert_close(got[j, :n], want, rtol=1e-5, atol=1e-5)
    assert narrower > 0  # the grouping left something to trim


def test_non_finite_loss_skips_the_step_and_names_the_rows(models, rollout):
    student, teacher = models
    r = copy.copy(rollout)
    r.teacher_logp = rollout.teacher_logp.clone()
    r.teacher_logp[2, 0] = float("nan")  # row 2, a position inside its loss mask
    assert rollout.loss_mask[2, 0]
    after, stats = one_step(student, teacher, r, "sampled", micro_batch_size=3)
    assert stats["finite"] is False and stats["bad_rows"] == [2]
    for a, b in zip(after.parameters(), student.parameters()):
        assert torch.equal(a, b) and a.grad is None


def test_every_path_returns_the_same_keys(models, rollout):
    """A step taken, a step with nothing to learn and a skipped step report the same fields."""
    student, teacher = models
    base = {"loss", "grad_norm", "n_tokens", "finite", "bad_rows"}
    empty = dataclasses.replace(rollout, loss_mask=torch.zeros_like(rollout.loss_mask))
    broken = dataclasses.replace(rollout, teacher_logp=rollout.teacher_logp.clone())
    broken.teacher_logp[2, 0] = float("nan")
    for r, kind, finite in ((rollout, "full", True), (empty, "full", True), (rollout, "sampled", True),
                            (empty, "topk", True), (broken, "sampled", False)):
        _, stats = one_step(student, teacher, r, kind, micro_batch_size=3)
        assert set(stats) == base | ({"token_kl"} if kind == "full" else set()), (kind, sorted(stats))
        assert stats["finite"] is finite and isinstance(stats["n_tokens"], int)
        assert stats["n_tokens"] == int(r.loss_mask.sum())


def test_build_optimizer_schedule():
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(model, lr=1.0, steps=100, warmup_ratio=0.1, weight_decay=0.01)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=1e-9) and lrs[-1] < 1e-3  # cosine from 10 to 100
    assert opt.param_groups[0]["weight_decay"] == 0.01


# -- several processes ------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, student, teacher, rollout, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), ACCELERATE_USE_CPU="1",
                      OMP_NUM_THREADS="1")  # one thread: OpenMP pools do not survive a fork
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)  # forked: drop the parent's one-process state
    half = rollout.prompt_ids.shape[0] // world
    local = rollout.select(slice(rank * half, (rank + 1) * half))
    model = copy.deepcopy(student).train()
    opt, sched = build_optimizer(model, 1e-3, steps=10, warmup_ratio=0.0)
    accelerator = Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    stats = learn(model, local, opt, sched, accelerator, kind="full", micro_batch_size=1, teacher=teacher)
    out[rank] = ([p.detach().clone() for p in accelerator.unwrap_model(model).parameters()], stats,
                 accelerator.num_processes)
    torch.distributed.destroy_process_group()


def test_two_processes_equal_one_process(models, rollout):
    """Each process holds half the rows, with different token counts: the step is the same."""
    student, teacher = models
    single, stats = one_step(student, teacher, rollout, "full", micro_batch_size=2)
    port = 29700 + os.getpid() % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_ddp_worker, args=(2, port, student, teacher, rollout, out), nprocs=2,
                           start_method="fork")
        out = dict(out)
    assert rollout.loss_mask[:2].sum() != rollout.loss_mask[2:].sum()
    for rank in (0, 1):
        params, rank_stats, world = out[rank]
        assert world == 2
        assert rank_stats["n_tokens"] == stats["n_tokens"]
        assert rank_stats["loss"] == pytest.approx(stats["loss"], rel=1e-5)
        for a, b in zip(params, single.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
