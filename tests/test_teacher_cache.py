"""KAT + `full` with one teacher pass: the lockstep teacher's logits kept for the learner.

The kept logits are checked against a full teacher forward over the finished rollout, the step
that uses them against the step that runs the teacher again (exactly, when both see the same
teacher logits; to float tolerance and against float64 when they come from lockstep), and the
teacher's forwards are counted with hooks.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from kat.config import ConfigError, load_config
from kat.learner import build_optimizer, completion_logits, kept_teacher_logits, learn, micro_batches
from kat.rollout import STOP_TRAP
from kat.rollout import RolloutBuffer
from kat.sampler import sample

from test_learner import make_rollout, one_step
from test_learner import tiny_llama as learner_llama
from test_sampler import EOS, MAX_NEW, PAD, FakeTerminator, full_forward
from test_sampler import tiny_llama as sampler_llama

CUTS = {1: (9, 4), 4: (14, 11)}  # row: (decided at position, cut): two rows cut inside a chunk


class Calls:
    """Counts forward calls of a module (a hook), for as long as the context is open."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.n = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return sampler_llama(0), sampler_llama(1)


@pytest.fixture(scope="module")
def prompts():
    lengths = (7, 3, 5, 1, 6, 2)
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(4, 24, (len(lengths), 7), generator=g)
    mask = torch.arange(7)[None, :] >= 7 - torch.tensor(lengths)[:, None]  # (B, P) left-padded
    return ids.masked_fill(~mask, PAD), mask


def lockstep(models, prompts, teacher_cache_mb, chunk=4, cuts=CUTS):
    student, teacher = models
    return sample(student, teacher, *prompts, max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD,
                  chunk=chunk, terminator=FakeTerminator(dict(cuts)), generator=torch.Generator().manual_seed(0),
                  teacher_cache_mb=teacher_cache_mb)[0]


# -- the sampler keeps the teacher's logits of the kept positions -------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 24])
def test_kept_logits_are_the_teachers_at_the_kept_positions(models, prompts, chunk):
    r = lockstep(models, prompts, 64.0, chunk)
    assert (r.stop == STOP_TRAP).sum() == 2 and r.loss_mask.sum() < r.completion_mask.sum()
    assert r.teacher_logits.dtype == torch.float32 and r.teacher_logits.shape == (int(r.loss_mask.sum()), 24)
    with torch.no_grad():
        want = full_forward(models[1], r)[r.loss_mask]  # (N, V) one uncached forward
    torch.testing.assert_close(r.teacher_logits, want, rtol=1e-5, atol=1e-5)
    # keeping them changes nothing else
    plain = lockstep(models, prompts, 0.0, chunk)
    assert plain.teacher_logits is None
    for f in dataclasses.fields(r):
        if f.name != "teacher_logits" and isinstance(getattr(r, f.name), torch.Tensor):
            assert torch.equal(getattr(r, f.name), getattr(plain, f.name)), f.name


def test_only_lockstep_keeps_logits(models, prompts):
    student, teacher = models
    for term, score in ((None, True), (None, False), (FakeTerminator(needs_kl=False), True)):
        r, _ = sample(student, teacher, *prompts, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD,
                      terminator=term, score=score, generator=torch.Generator().manual_seed(0),
                      teacher_cache_mb=64.0)
        assert r.teacher_logits is None


def test_budget_bounds_what_is_held():
    """Chunks are held while their total fits; the first one over the budget drops everything."""
    V, c = 5, 3
    chunk_bytes = 4 * c * V * 4  # 4 active rows, fp32
    for budget_chunks, kept in ((2, True), (1.99, False)):
        buf = RolloutBuffer(4, 6, 0, PAD, torch.device("cpu"), teacher_cache_mb=budget_chunks * chunk_bytes / 2**20)
        rows = torch.arange(4)
        buf.completion_mask[:, :6] = True
        for t0 in (0, 3):
            buf.keep_teacher_logits(rows, t0, torch.randn(4, c, V))
        r = buf.to_rollout(torch.ones(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.bool),
                           torch.zeros(4, dtype=torch.long), torch.full((4,), -1), None, True)
        assert (r.teacher_logits is not None) is kept
        if kept:
            assert r.teacher_logits.shape == (24, V)


def test_budget_too_small_falls_back_to_the_teacher(models, prompts):
    r = lockstep(models, prompts, 1e-4)  # 105 bytes: not even one chunk
    assert r.teacher_logits is None
    with pytest.raises(ConfigError, match="teacher_cache_mb"):
        lockstep(models, prompts, -1.0)
    with pytest.raises(ConfigError, match="teacher_cache_mb"):
        load_config(["--teacher_cache_mb", "-5"])
    assert load_config([]).teacher_cache_mb == 1024.0


def test_select_picks_the_packed_rows(models, prompts):
    r = lockstep(models, prompts, 64.0)
    dense = kept_teacher_logits(r)  # (B, T, V)
    B = r.completion_ids.shape[0]
    for rows in (slice(0, 3), slice(2, 6), slice(1, 6, 2), slice(5, 5), torch.tensor([4, 0, 1]),
                 torch.tensor([True, False, True, True, False, True])):
        part = r.select(rows)
        assert part.teacher_logits.shape[0] == int(part.loss_mask.sum())
        assert torch.equal(part.teacher_logits, dense[rows][r.loss_mask[rows]]), rows
    assert torch.equal(kept_teacher_logits(r)[r.loss_mask], r.teacher_logits)
    assert torch.equal(r.select(slice(0, B)).teacher_logits, r.teacher_logits)


# -- the learner uses them instead of a second teacher pass ---------------------------------------


@pytest.fixture(scope="module")
def learner_models():
    return learner_llama(0), learner_llama(1, layers=3)


def with_teacher_logits(rollout, teacher, micro_batch_size=None):
    """The rollout carrying the teacher's logits of its kept positions, from `completion_logits` over
    the learner's own micro-batches (same rows, same trimmed widths: the two-pass path's target bit
    for bit)."""
    B, T = rollout.completion_ids.shape
    logits = torch.zeros(B, T, teacher.config.vocab_size)  # (B, T, V)
    with torch.no_grad():
        for rows in micro_batches(rollout, micro_batch_size or B):
            part_logits = completion_logits(teacher, rollout.select(rows).trim())  # (b, T', V)
            logits[rows, : part_logits.shape[1]] = part_logits
    return dataclasses.replace(rollout, teacher_logits=logits[rollout.loss_mask])


@pytest.mark.parametrize("micro_batch_size", [4, 3, 1])
def test_same_target_gives_the_same_step_exactly_and_no_teacher_pass(learner_models, micro_batch_size):
    student, teacher = learner_models
    rollout = make_rollout(student, teacher)
    assert rollout.loss_mask.sum() < rollout.completion_mask.sum()  # some rows are cut
    kept = with_teacher_logits(rollout, teacher, micro_batch_size)
    with Calls(teacher) as two_pass:
        ref, ref_stats = one_step(student, teacher, rollout, "full", micro_batch_size)
    with Calls(teacher) as one_pass:
        got, stats = one_step(student, teacher, kept, "full", micro_batch_size)
    assert two_pass.n == -(-4 // micro_batch_size) and one_pass.n == 0
    assert stats["loss"] == ref_stats["loss"] and stats["grad_norm"] == ref_stats["grad_norm"]
    for a, b in zip(got.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    # token_kl: the learner's d_t where kept, the rollout's lockstep KL at cut positions
    m = rollout.loss_mask
    assert torch.equal(stats["token_kl"][m], ref_stats["token_kl"][m])
    cut = rollout.completion_mask & ~m
    assert torch.equal(stats["token_kl"][cut], rollout.kl[cut])
    assert (stats["token_kl"][~rollout.completion_mask] == 0).all()
    # without the teacher model at all
    _, alone = one_step(student, None, kept, "full", micro_batch_size)
    assert alone["loss"] == ref_stats["loss"]


def test_lockstep_kept_logits_match_float64_and_the_two_pass_step(models, prompts):
    """Lockstep's cached teacher forwards are not bitwise the full forward's: equal to float tolerance."""
    student, teacher = models
    r = lockstep(models, prompts, 64.0)
    plain = dataclasses.replace(r, teacher_logits=None)
    with Calls(teacher) as one_pass:
        got, stats = one_step(student, teacher, r, "full", 4)
    ref, ref_stats = one_step(student, teacher, plain, "full", 4)
    assert one_pass.n == 0
    with torch.no_grad():  # float64 reference: the full forwards' logits, KL in float64
        logp = full_forward(student, r).double().log_softmax(-1)
        logq = full_forward(teacher, r).double().log_softmax(-1)
    want = ((logp.exp() * (logp - logq)).sum(-1) * r.loss_mask).sum().item() / r.loss_mask.sum().item()
    assert stats["loss"] == pytest.approx(want, rel=1e-5) and ref_stats["loss"] == pytest.approx(want, rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-5)
    for a, b in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_bf16_teacher_keeps_bf16_logits(models, prompts):
    """As on a GPU: a bf16 teacher's logits are kept in bf16 (half the bytes of fp32) and the step
    matches the two-pass step to bf16 rounding of the teacher's logits (5e-4 relative here)."""
    import copy

    student, teacher = models
    teacher16 = copy.deepcopy(teacher).to(torch.bfloat16)
    r = lockstep((student, teacher16), prompts, 64.0)
    assert r.teacher_logits.dtype == torch.bfloat16
    _, stats = one_step(student, teacher16, r, "full", 4)
    _, ref = one_step(student, teacher16, dataclasses.replace(r, teacher_logits=None), "full", 4)
    assert stats["loss"] == pytest.approx(ref["loss"], rel=5e-3)


def test_nothing_kept_returns_the_rollouts_kl(models, prompts):
    student, teacher = models
    r = lockstep(models, prompts, 64.0, cuts={b: (0, 0) for b in range(6)})
    assert r.loss_mask.sum() == 0 and r.teacher_logits.shape == (0, 24)
    with Calls(teacher) as calls:
        _, stats = one_step(student, teacher, r, "full", 4)
    assert calls.n == 0 and stats["n_tokens"] == 0
    assert torch.equal(stats["token_kl"], torch.where(r.completion_mask, r.kl, 0.0))


def test_mismatched_kept_logits_are_rejected(learner_models):
    student, teacher = learner_models
    rollout = make_rollout(student, teacher)
    bad = dataclasses.replace(rollout, teacher_logits=torch.zeros(3, 23))
    with pytest.raises(ValueError, match="teacher_logits has 3 rows but loss_mask selects"):
        one_step(student, teacher, bad, "full", 4)


# -- several processes: all run the teacher unless all kept its logits -----------------------------


def _worker(rank: int, world: int, port: int, student, teacher, rollout, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    half = rollout.prompt_ids.shape[0] // world
    local = rollout.select(slice(rank * half, (rank + 1) * half))
    if rank == 1:  # this process went over its budget while sampling
        local = dataclasses.replace(local, teacher_logits=None)
    model = student.train()
    opt, sched = build_optimizer(model, 1e-3, steps=10, warmup_ratio=0.0)
    accelerator = Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    with Calls(teacher) as calls:
        stats = learn(model, local, opt, sched, accelerator, kind="full", micro_batch_size=1, teacher=teacher)
    out[rank] = ([p.detach().clone() for p in accelerator.unwrap_model(model).parameters()], stats["loss"], calls.n)
    torch.distributed.destroy_process_group()


def test_one_process_without_kept_logits_makes_every_process_run_the_teacher(learner_models):
    student, teacher = learner_models
    rollout = with_teacher_logits(make_rollout(student, teacher), teacher)
    single, stats = one_step(student, teacher, rollout, "full", micro_batch_size=2)
    port = 29700 + (os.getpid() + 500) % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_worker, args=(2, port, student, teacher, rollout, out), nprocs=2, start_method="fork")
        out = dict(out)
    for rank in (0, 1):
        params, loss, calls = out[rank]
        assert calls == 2  # both processes ran the teacher on each of their two rows
        assert loss == pytest.approx(stats["loss"], rel=1e-5)
        for a, b in zip(params, single.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)


# -- kat.train: one teacher pass per KAT + full step ----------------------------------------------


def test_training_with_kat_and_full_runs_the_teacher_only_in_lockstep(tiny_world, tmp_path, monkeypatch):
    import json

    import kat.train as train_module
    from kat.config import Config

    seen, rollouts, real = [], [], train_module.learn

    def spy(student, rollout, *args, teacher=None, **kw):
        with Calls(teacher) as calls:
            out = real(student, rollout, *args, teacher=teacher, **kw)
        seen.append((rollout.teacher_logits is not None, calls.n))
        rollouts.append(rollout)
        return out

    monkeypatch.setattr(train_module, "learn", spy)
    common = dict(termination="kat", loss="full", teacher=tiny_world["teacher"], student=tiny_world["student"],
                  train_data=tiny_world["train"], eval_data="", steps=2, batch_size=4, samples_per_prompt=2,
                  micro_batch_size=3, max_new_tokens=24, chunk=4, window=4, stride=2, patience=1, exempt=0,
                  eta=0.8, min_buffer=4, warmup_steps=1, lr=3e-3, seed=11, plot=False, n_traces=0)
    rows = {}
    for budget in (1024.0, 0.0):
        seen.clear()
        train_module.train(Config(output_dir=str(tmp_path / str(budget)), teacher_cache_mb=budget, **common))
        with open(tmp_path / str(budget) / "metrics.jsonl") as fh:
            rows[budget] = [json.loads(line) for line in fh if '"loss"' in line]
        assert seen == ([(True, 0)] * 2 if budget else [(False, 3)] * 2)  # 8 rows in micro-batches of 3
    assert all(r.teacher_logits is None for r in rollouts)  # released after each step's learn
    assert rows[1024.0][-1]["cut_rate"] > 0  # the detector cut in the second step
    # float rounding of the two teacher paths, carried through one update into step 2's rollouts
    for a, b in zip(rows[1024.0], rows[0.0]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["kl"] == pytest.approx(b["kl"], rel=1e-4)
