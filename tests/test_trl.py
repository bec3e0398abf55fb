"""KAT inside TRL's DistillationTrainer (kat.integrations.trl), on the shipped toy models.

The scoring pass against a float64 reference and against TRL's own divergence kernel; the
detector replayed over whole completions against chunk-by-chunk feeding and against the lockstep
sampler; TRL's masked loss and gradient against kat.learner.opd_loss on the same tokens and cut;
a 2-step run whose first update is checked against the kept-token gradient; two processes
against one; checkpoints; every user error.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from kat.terminators import RandomTerminator, TrapDetector
from kat.rollout import STOP_TRAP

from conftest import ROOT

TOY = ROOT / "kat" / "toy" / "rich"
# Settings scaled to completions of <= 32 tokens; threshold 0.02 cuts some rows of the toy, not all.
DETECTOR = dict(window=4, stride=2, patience=2, exempt=4, eta=0.3, buffer_size=256)
THRESHOLD = 0.02


@pytest.fixture(scope="module")
def trl():
    return pytest.importorskip("trl")


@pytest.fixture(scope="module")
def toy():
    if not (TOY / "teacher" / "model.safetensors").is_file():
        pytest.skip("the toy checkpoints are not built (python -m experiments toy build)")
    return load_toy()


def load_toy() -> dict:
    """The toy tokenizer (left padding, as TRL wants it), the frozen teacher, 64 training problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOY / "student")
    tok.padding_side = "left"
    teacher = AutoModelForCausalLM.from_pretrained(TOY / "teacher", dtype=torch.float32).eval().requires_grad_(False)
    with open(TOY / "data" / "train.jsonl") as fh:
        problems = [json.loads(line) for line in fh][:64]
    return {"tok": tok, "teacher": teacher, "problems": problems}


def toy_student():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TOY / "student", dtype=torch.float32)


def armed(threshold: float = THRESHOLD, **kw) -> TrapDetector:
    """A detector past warm-up whose quantile threshold is exactly `threshold`."""
    det = TrapDetector(**{**DETECTOR, "min_buffer": 1, "warmup_steps": 0, **kw})
    det.load_state_dict({"rule": det.rule, "buffer": torch.full((1,), threshold, dtype=torch.float64),
                         "steps_done": 0, "z_mean": None, "z_var": None})
    return det


def sampled(toy, student, n: int, max_new_tokens: int = 32, seed: int = 0, first: int = 0, terminator=None):
    """(rollout, TRL batch): n toy prompts sampled by kat's sampler, in the tensors TRL's generation
    returns (prompts left-padded, completions right-padded, long masks)."""
    from kat.data import encode_prompts, render_prompt
    from kat.sampler import sample

    tok = toy["tok"]
    texts = [render_prompt(tok, p["prompt"]) for p in toy["problems"][first:first + n]]
    ids, mask = encode_prompts(tok, texts)
    r, state = sample(student.eval(), toy["teacher"], ids, mask, max_new_tokens=max_new_tokens,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, chunk=3,
                      terminator=terminator, generator=torch.Generator().manual_seed(seed))
    batch = {"prompt_ids": r.prompt_ids, "prompt_mask": r.prompt_mask.long(),
             "completion_ids": r.completion_ids, "completion_mask": r.completion_mask.long()}
    return r, batch, state


def make_trainer(toy, student, tmp_path, detector=None, n_prompts: int = 16, score_batch_size=None,
                 reuse_teacher: bool = True, trainer_class=None, **overrides):
    """KATDistillationTrainer on the toy (or `trainer_class`, e.g. TRL's own DistillationTrainer)."""
    from datasets import Dataset
    from trl import DistillationConfig

    from kat.integrations.trl import KATDistillationTrainer

    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                max_completion_length=32, learning_rate=1e-3, beta=1.0, gradient_checkpointing=False,
                bf16=False, use_cpu=True, logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, shuffle_dataset=False, seed=0, dataloader_pin_memory=False)
    args.update(overrides)
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in toy["problems"][:n_prompts]]
    kat = {} if trainer_class is not None else dict(detector=detector, score_batch_size=score_batch_size,
                                                     reuse_teacher=reuse_teacher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames gradient_checkpointing
        return (trainer_class or KATDistillationTrainer)(
            model=student, teacher_model=toy["teacher"], args=DistillationConfig(**args),
            train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=toy["tok"], **kat)


def reference_kl(student, teacher, batch, temperature: float = 1.0) -> torch.Tensor:
    """d_t in float64 from full forwards: KL(softmax(s / tau) || softmax(t / tau)), 0 off the mask."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    T = batch["completion_ids"].shape[1]
    with torch.no_grad():
        s, t = (m(input_ids=ids, attention_mask=mask).logits[:, -T - 1 : -1].double() / temperature
                for m in (student, teacher))
    logp, logq = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(batch["completion_mask"].bool(), kl, 0.0)


# -- the scoring pass ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_kl_matches_float64_and_trl_kernel(trl, toy, one_thread, temperature):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from kat.integrations.trl import completion_kl

    student = toy_student().eval()
    r, batch, _ = sampled(toy, student, 6)
    assert r.lengths.min() < r.lengths.max() or r.prompt_mask.all(dim=1).sum() < 6  # padding on one side at least
    kl = completion_kl(student, toy["teacher"], *batch.values(), temperature=temperature)
    ref = reference_kl(student, toy["teacher"], batch, temperature)
    assert kl.dtype == torch.float32 and kl.shape == r.completion_ids.shape
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-6)
    # rows scored in pieces: the same values
    torch.testing.assert_close(completion_kl(student, toy["teacher"], *batch.values(), temperature=temperature,
                                             rows=4), kl, rtol=1e-5, atol=1e-6)
    # TRL's loss kernel at beta = 1 from the models' last hidden states and heads: the same d_t
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    T = r.completion_ids.shape[1]
    with torch.no_grad():
        h_s, h_t = (m.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -T - 1 : -1]
                    for m in (student, toy["teacher"]))
        d, _ = ChunkedDivergenceFunction.apply(
            h_s.reshape(-1, h_s.shape[-1]), student.get_output_embeddings().weight, None,
            h_t.reshape(-1, h_t.shape[-1]), toy["teacher"].get_output_embeddings().weight, None,
            1.0, temperature, 1.0, None, 1.0, None)
    valid = r.completion_mask
    torch.testing.assert_close(kl[valid], d.view(kl.shape)[valid].float(), rtol=1e-4, atol=1e-5)
    if temperature == 1.0:  # the sampler's lockstep capture, at temperature 1
        torch.testing.assert_close(kl[valid], r.kl[valid], rtol=1e-4, atol=1e-4)


# -- replaying the detector over whole completions ------------------------------------------------


@pytest.mark.parametrize("shadow", [False, True])
def test_whole_completion_replay_equals_chunk_by_chunk(trl, shadow):
    from kat.integrations.trl import trap_mask

    g = torch.Generator().manual_seed(0)
    B, T = 12, 90
    kl = torch.where(torch.rand(B, T, generator=g) < 0.5, 0.01, 1.0) * torch.rand(B, T, generator=g)  # (B, T)
    kl[:4, 30:] = 0.001 * torch.rand(4, T - 30, generator=g)  # long agreement stretches
    valid = torch.arange(T)[None] < torch.randint(5, T + 1, (B, 1), generator=g)  # right-padded completions
    valid[0] = True
    kw = dict(window=8, stride=4, patience=2, exempt=8, shadow=shadow)
    whole = armed(0.05, **kw)
    state_w, kept = trap_mask(whole, kl, valid)
    for chunk in (1, 3, 8, 29):
        online = armed(0.05, **kw)
        state_o = online.start(B)
        for t in range(0, T, chunk):
            online.observe(state_o, kl[:, t : t + chunk], valid[:, t : t + chunk])
        assert torch.equal(state_w.fired, state_o.fired) and torch.equal(state_w.cut, state_o.cut)
        assert torch.equal(state_w.would_cut, state_o.would_cut)
        assert torch.equal(whole._row_minima(state_w), online._row_minima(state_o))
    assert 0 < int((state_w.would_cut >= 0).sum()) < B
    cut = torch.where(state_w.fired, state_w.cut, T)
    assert torch.equal(kept, valid & (torch.arange(T)[None] < cut[:, None]))
    if shadow:
        assert torch.equal(kept, valid)
    whole.end_batch(state_w, 0)
    online.end_batch(state_o, 0)
    assert torch.equal(whole.buffer, online.buffer) and whole.threshold == online.threshold


DRIFT_PROB = 0.2  # the toy's rollouts: some rows drift after position 4 and some do not


def terminator(name: str):
    """Every terminator of kat's registry (kat.terminators.TERMINATORS, both rules, the drift gate),
    set so that it decides from the first step on the toy's 32-token completions."""
    from kat.terminators import DriftTerminator, NoTerminator

    return {"quantile": lambda: armed(),
            "zscore": lambda: armed_zscore(),
            "gated": lambda: armed(gate="drift", drift_prob=DRIFT_PROB),
            "drift": lambda: DriftTerminator(exempt=4, drift_prob=DRIFT_PROB, warmup_steps=0),
            "random": lambda: RandomTerminator(target_length=12, exempt=4, max_new_tokens=32, seed=0),
            "none": lambda: NoTerminator()}[name]()


def armed_zscore() -> TrapDetector:
    """The zscore rule past warm-up, threshold mean - kappa * std = THRESHOLD exactly."""
    det = TrapDetector(**{**DETECTOR, "rule": "zscore", "min_buffer": 1, "warmup_steps": 0, "kappa": 1.0})
    det.load_state_dict({"rule": "zscore", "buffer": torch.full((1,), THRESHOLD, dtype=torch.float64),
                         "steps_done": 0, "z_mean": THRESHOLD + 0.01, "z_var": 0.01 ** 2})
    return det


@pytest.mark.parametrize("name", ["quantile", "gated", "drift"])
def test_replay_cuts_where_the_lockstep_sampler_stops(trl, toy, one_thread, name):
    """kat's sampler stops trapped rows while decoding; replaying a terminator in the same state over
    the finished completions' d_t and teacher log-probs (recomputed by the TRL path) cuts at the
    same positions. The drift gate and the drift cut read log q(y_t), which the TRL path passes."""
    from kat.integrations.trl import score_completions, trap_mask

    student = toy_student().eval()
    online, replay = terminator(name), terminator(name)
    r, batch, state_o = sampled(toy, student, 8, terminator=online)
    trapped = r.stop == STOP_TRAP
    assert 0 < int(trapped.sum()) < 8
    scores = score_completions(student, toy["teacher"], *batch.values(), teacher_logp=True)
    valid = r.completion_mask
    with torch.no_grad():  # log q(y_t) in float64 from a full forward of the teacher
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        T = r.completion_ids.shape[1]
        logq = toy["teacher"](input_ids=ids, attention_mask=mask).logits[:, -T - 1 : -1].double().log_softmax(-1)
        ref = logq.gather(-1, r.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(scores.teacher_logp[valid].double(), ref[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(scores.teacher_logp[~valid], torch.zeros_like(scores.teacher_logp[~valid]))
    torch.testing.assert_close(scores.teacher_logp[valid], r.teacher_logp[valid], rtol=1e-4, atol=1e-4)
    state_r, kept = trap_mask(replay, scores.kl, valid, scores.teacher_logp)
    assert torch.equal(state_r.fired, trapped) and torch.equal(state_r.cut[trapped], r.cut[trapped])
    assert torch.equal(kept, r.loss_mask)  # the tokens kat's sampler hands to its learner
    online.end_batch(state_o, 0)
    replay.end_batch(state_r, 0)
    if name != "drift":  # the drift cut keeps no statistics
        torch.testing.assert_close(replay.buffer, online.buffer, rtol=1e-4, atol=1e-6)
    if name != "quantile":  # the log-probs are required where they are read
        with pytest.raises(ValueError, match="reads the teacher's log-prob of each sampled token"):
            trap_mask(terminator(name), scores.kl, valid)


# -- TRL's loss on the kept tokens ----------------------------------------------------------------


def test_masked_trl_loss_equals_opd_loss(trl, toy, tmp_path, one_thread):
    from dataclasses import replace

    from kat.learner import completion_logits, opd_loss

    student = toy_student()
    r, batch, _ = sampled(toy, student, 8)
    trainer = make_trainer(toy, student, tmp_path, detector=armed())
    student.train()
    out = trainer.select_tokens(dict(batch))
    kept = out["tool_mask"].bool()
    n_cut = int((kept.sum(1) < r.lengths).sum())
    assert 0 < n_cut < 8, "the fixed batch must have cut and uncut rows"
    assert int(out["num_items_in_batch"]) == int(kept.sum())
    assert trainer.detector.steps_done == 1 and trainer.detector.buffer.numel() == 1 + 8

    loss_trl = trainer.compute_loss(student, out)  # TRL's chunked generalised JSD at beta = 1
    loss_trl.backward()
    grads_trl = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    rk = replace(r, loss_mask=kept)
    with torch.no_grad():
        teacher_logits = completion_logits(toy["teacher"], rk)
    loss_sum, n = opd_loss(completion_logits(student, rk), rk, "full", teacher_logits)
    loss_kat = loss_sum / n
    loss_kat.backward()
    assert int(n) == int(kept.sum())
    assert loss_trl.item() == pytest.approx(loss_kat.item(), rel=1e-5)
    for p, g in zip(student.parameters(), grads_trl):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    # and the loss really excludes the cut tokens: over all tokens it differs
    full_sum, full_n = opd_loss(completion_logits(student, r), r, "full", completion_logits(toy["teacher"], r))
    assert abs((full_sum / full_n).item() - loss_kat.item()) > 1e-3


def test_reused_teacher_hidden_states_give_trls_loss_without_a_second_teacher_pass(trl, toy, tmp_path, one_thread):
    from kat.integrations.trl import TEACHER_HIDDEN

    student = toy_student().train()
    _, batch, _ = sampled(toy, student, 8)
    calls = []
    hook = toy["teacher"].base_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        trainer = make_trainer(toy, student, tmp_path, detector=armed(), score_batch_size=3)
        out = trainer.select_tokens(dict(batch))
        assert len(calls) == 3  # the scoring pass, in pieces of 3 rows
        hidden = out[TEACHER_HIDDEN]
        T = batch["completion_ids"].shape[1]
        assert hidden.shape == (8, T, toy["teacher"].config.hidden_size)
        # what TRL's loss would compute from the teacher for these tokens
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        with torch.no_grad():
            own = super(type(trainer), trainer)._get_last_hidden_state(toy["teacher"], ids, mask, T)
        torch.testing.assert_close(hidden, own, rtol=1e-5, atol=1e-5)
        del calls[:]
        losses, grads = [], []
        for inputs in (out, {k: v for k, v in out.items() if k != TEACHER_HIDDEN}):
            loss = trainer.compute_loss(student, inputs)
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad.clone() for p in student.parameters()])
            student.zero_grad()
        assert len(calls) == 1  # only the loss without the kept states ran the teacher
    finally:
        hook.remove()
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    no_reuse = make_trainer(toy, student, tmp_path, detector=armed(), reuse_teacher=False)
    assert TEACHER_HIDDEN not in no_reuse.select_tokens(dict(batch))


@pytest.mark.parametrize("kat_detector", ["shadow", "cutting"])
def test_bf16_with_an_fp32_teacher_gives_trls_own_step(trl, toy, tmp_path, one_thread, kat_detector):
    """bf16=True (Accelerate's autocast on the prepared models' forward) with an fp32 teacher: TRL's
    loss runs both models around that autocast, so the scoring pass must too, or the teacher states
    it hands over differ from TRL's. One SGD step's loss and update equal, bit for bit, TRL's own
    DistillationTrainer (shadow detector: every token kept) or KAT without reuse (cutting detector:
    TRL's loss on the same kept tokens, the teacher run by TRL)."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(TOY / "teacher", dtype=torch.float32).eval().requires_grad_(False)
    world = {**toy, "teacher": teacher}  # its own teacher: preparing it for bf16 wraps its forward for good
    kw = dict(max_steps=1, bf16=True, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
              max_grad_norm=0.0, weight_decay=0.0)
    runs = {}
    for arm in ("kat", "reference"):
        student = toy_student()
        if kat_detector == "shadow":
            det = armed(shadow=True)
            extra = {} if arm == "kat" else {"trainer_class": trl.DistillationTrainer}
        else:
            det, extra = armed(), {"reuse_teacher": arm == "kat"}
        trainer = make_trainer(world, student, tmp_path / arm, detector=det, **kw, **extra)
        assert trainer.accelerator.mixed_precision == "bf16" and "_original_forward" in teacher.__dict__
        trainer.train()
        loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        runs[arm] = (loss, [p.detach().clone() for p in student.parameters()])
        if arm == "kat" and kat_detector == "cutting":
            cut_rate = next(h["kat/cut_rate"] for h in trainer.state.log_history if "kat/cut_rate" in h)
            assert 0 < cut_rate < 1  # some rows cut, some not
    assert runs["kat"][0] == runs["reference"][0]
    assert all(torch.equal(a, b) for a, b in zip(runs["kat"][1], runs["reference"][1]))


def test_two_step_run_trains_on_kept_tokens_over_micro_batches(trl, toy, tmp_path, one_thread):
    """2 optimiser steps, each over 2 micro-batches of 4 rows (gradient accumulation), plain SGD:
    the first update equals -lr times the gradient of sum_kept d_t / (kept tokens of the step)."""

    from kat.learner import completion_logits, opd_loss
    from kat.rollout import Rollout

    student = toy_student()
    start = copy.deepcopy(student)
    lr = 0.1
    trainer = make_trainer(toy, student, tmp_path, detector=armed(), gradient_accumulation_steps=2, optim="sgd",
                           learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)
    seen, after_first = [], {}
    select = trainer.select_tokens

    def recording(batch):
        if trainer.state.global_step == 1 and not after_first:  # parameters after the first update
            after_first.update({k: v.detach().clone() for k, v in student.named_parameters()})
        out = select(batch)
        seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()})
        return out

    trainer.select_tokens = recording
    rows = []  # rows through the teacher's decoder, per call
    hook = toy["teacher"].base_model.register_forward_hook(lambda m, a, out: rows.append(out[0].shape[0]))
    try:
        trainer.train()
    finally:
        hook.remove()
    assert sum(rows) == 16  # each row once: the scoring pass, whose states both micro-batches' loss reuse
    assert trainer.state.global_step == 2 and len(seen) == 2 and all(b["completion_ids"].shape[0] == 8 for b in seen)
    assert trainer.detector.steps_done == 2 and trainer.detector.buffer.numel() == 1 + 16

    b = seen[0]
    kept = b["tool_mask"].bool()
    lengths = b["completion_mask"].sum(1)
    assert 0 < int((kept.sum(1) < lengths).sum()) < 8, "step 1 must cut some rows, not all"
    rows = b["prompt_ids"].shape[0]
    nan = torch.full(kept.shape, float("nan"))
    r = Rollout(prompt_ids=b["prompt_ids"], prompt_mask=b["prompt_mask"].bool(), completion_ids=b["completion_ids"],
                completion_mask=b["completion_mask"].bool(), loss_mask=kept, student_logp=nan, teacher_logp=nan,
                kl=nan, stop=torch.zeros(rows, dtype=torch.long), cut=lengths, scored=False)
    with torch.no_grad():
        teacher_logits = completion_logits(toy["teacher"], r)
    loss_sum, n = opd_loss(completion_logits(start, r), r, "full", teacher_logits)
    (loss_sum / n).backward()
    for name, p0 in start.named_parameters():
        step = after_first[name] - p0.detach()
        torch.testing.assert_close(step, -lr * p0.grad, rtol=1e-3, atol=1e-4 * lr * p0.grad.abs().max().item())
    assert any(not torch.equal(after_first[k], v) for k, v in student.named_parameters())  # step 2 moved too

    logs = [h for h in trainer.state.log_history if "kat/cut_rate" in h]
    assert len(logs) == 2
    for h, b in zip(logs, seen):
        kept, lengths = b["tool_mask"].bool(), b["completion_mask"].sum(1)
        assert h["kat/cut_rate"] == pytest.approx(float((kept.sum(1) < lengths).float().mean()))
        assert h["kat/kept_length"] == pytest.approx(float(kept.sum()) / 8)
        assert h["kat/active"] == 1.0
        assert h["kat/kl_kept"] == pytest.approx(h["loss"], rel=1e-4)  # TRL's loss: mean d_t over kept tokens
    assert logs[0]["kat/threshold"] == pytest.approx(THRESHOLD)
    assert logs[1]["kat/threshold"] != pytest.approx(THRESHOLD)  # moved by step 1's minima


def recorded(trainer) -> list:
    """The trainer's select_tokens, recording (batch in, batch out) of every call."""
    seen, select = [], trainer.select_tokens

    def recording(batch):
        before = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
        out = select(batch)
        seen.append((before, {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}))
        return out

    trainer.select_tokens = recording
    return seen


@pytest.mark.parametrize("name", ["quantile", "zscore", "gated", "drift", "random", "none"])
def test_a_training_step_with_every_terminator(trl, toy, tmp_path, one_thread, name):
    """One step of trainer.train() with each terminator of the registry: it trains, and keeps what
    the same terminator, replayed from the step's start over the same completions, keeps (the drift
    gate and the drift cut read the teacher's log-probs of the sampled tokens)."""
    from kat.integrations.trl import score_completions, trap_mask

    student = toy_student()
    start, det = copy.deepcopy(student).eval(), terminator(name)
    replay = copy.deepcopy(det)
    trainer = make_trainer(toy, student, tmp_path, detector=det, max_steps=1)
    seen = recorded(trainer)
    trainer.train()
    assert trainer.state.global_step == 1 and len(seen) == 1
    before, out = seen[0]
    valid = before["completion_mask"].bool()
    scores = score_completions(start, toy["teacher"], before["prompt_ids"], before["prompt_mask"],
                               before["completion_ids"], before["completion_mask"], teacher_logp=True)
    state, kept = trap_mask(replay, scores.kl, valid, scores.teacher_logp)
    assert torch.equal(out["tool_mask"].bool(), kept)
    assert int(out["num_items_in_batch"]) == int(kept.sum()) > 0
    log = next(h for h in trainer.state.log_history if "kat/cut_rate" in h)
    assert log["kat/cut_rate"] == pytest.approx(float(state.fired.float().mean()))
    assert math.isfinite(log["loss"]) and any(not torch.equal(p, q) for p, q in zip(student.parameters(),
                                                                                   start.parameters()))
    assert (log["kat/cut_rate"] > 0) == (name != "none")  # each one cuts on this step, but the control
    if name == "none":
        assert torch.equal(kept, valid)


def test_scoring_ignores_dropout_and_restores_training_mode(trl, toy, tmp_path, one_thread):
    from kat.integrations.trl import completion_kl

    student = toy_student()
    for layer in student.model.layers:
        layer.self_attn.attention_dropout = 0.5  # a student that trains with dropout
    _, batch, _ = sampled(toy, student, 4)
    trainer = make_trainer(toy, student, tmp_path, detector=armed())
    student.train()
    for _ in range(2):
        trainer.select_tokens(dict(batch))
        assert student.training
    kl_logged = trainer._metrics["train"]["kat/kl"]
    assert kl_logged[0] == kl_logged[1]  # no dropout noise in d_t
    valid = batch["completion_mask"].bool()
    expected = completion_kl(student.eval(), toy["teacher"], *batch.values())[valid].mean().item()
    assert kl_logged[0] == pytest.approx(expected, rel=1e-6)


def test_random_terminator_skips_scoring_and_keeps_its_lengths(trl, toy, tmp_path, one_thread):
    student = toy_student()
    _, batch, _ = sampled(toy, student, 8)
    det = RandomTerminator(target_length=12, exempt=4, max_new_tokens=32, seed=0)
    trainer = make_trainer(toy, student, tmp_path, detector=det)
    calls = []
    hook = toy["teacher"].register_forward_hook(lambda *a: calls.append(1))
    try:
        replay = copy.deepcopy(det)
        state = replay.start(8)
        replay.observe(state, torch.zeros(batch["completion_mask"].shape), batch["completion_mask"].bool())
        out = trainer.select_tokens(dict(batch))
    finally:
        hook.remove()
    assert calls == []  # no d_t needed: no teacher forward
    assert torch.equal(out["tool_mask"].sum(1), replay.lengths(state))
    assert "kat/kl" not in trainer._metrics["train"]


# -- processes, checkpoints, errors ---------------------------------------------------------------

TWO_PROC = r"""
import json, os, sys, warnings
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import test_trl as t
from pathlib import Path
toy = t.load_toy()
student = t.toy_student()
_, batch, _ = t.sampled(toy, student, 8)
trainer = t.make_trainer(toy, student, Path(sys.argv[1]), detector=t.armed())
rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
for step in range(2):  # the same global batch twice: step 2 cuts with the threshold of step 1
    out = trainer.select_tokens({{k: v[rows] for k, v in batch.items()}})
    kept = trainer.accelerator.gather(out["tool_mask"])
    res = {{"kept": kept.tolist(), "n": int(out["num_items_in_batch"]), "buffer": trainer.detector.buffer.tolist(),
           "metrics": {{k: v[-1] for k, v in trainer._metrics["train"].items()}}}}
    with open(os.path.join(sys.argv[1], f"rank{{rank}}_step{{step}}.json"), "w") as fh:
        json.dump(res, fh)
# tear the process group down before exit: gloo threads alive at interpreter exit can abort it
trainer.accelerator.end_training()
"""


def test_two_processes_share_threshold_and_kept_count(trl, toy, tmp_path):
    """The global batch split over 2 gloo processes gives the same cuts, kept-token count, buffer
    and logged rates as 1 process, on both processes."""
    script = tmp_path / "run.py"
    script.write_text(TWO_PROC.format(root=str(ROOT), tests=str(ROOT / "tests")))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for n_proc in (1, 2):
        out = tmp_path / f"p{n_proc}"
        out.mkdir()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(n_proc), str(script), str(out)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for step in range(2):
        one = json.loads((tmp_path / "p1" / f"rank0_step{step}.json").read_text())
        assert 0 < sum(map(sum, one["kept"])) < sum(len(k) for k in one["kept"])
        for rank in range(2):
            two = json.loads((tmp_path / "p2" / f"rank{rank}_step{step}.json").read_text())
            assert two["kept"] == one["kept"]  # gathered in rank order = the rows of the global batch
            assert two["n"] == one["n"]
            assert two["buffer"] == pytest.approx(one["buffer"], rel=1e-5)
            assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-5)


def test_checkpoint_carries_the_detector(trl, toy, tmp_path, one_thread):
    from kat.integrations.trl import DETECTOR_FILE

    student = toy_student()
    trainer = make_trainer(toy, student, tmp_path, detector=armed(), max_steps=1, save_strategy="steps",
                           save_steps=1)
    trainer.train()
    path = tmp_path / "out" / "checkpoint-1" / DETECTOR_FILE
    saved = torch.load(path, weights_only=False)
    assert saved["steps_done"] == 1 and torch.equal(saved["buffer"], trainer.detector.buffer)
    fresh = make_trainer(toy, toy_student(), tmp_path / "b", detector=TrapDetector(**DETECTOR, min_buffer=1))
    fresh.create_optimizer_and_scheduler(num_training_steps=1)
    fresh._load_optimizer_and_scheduler(str(path.parent))
    assert torch.equal(fresh.detector.buffer, trainer.detector.buffer) and fresh.detector.steps_done == 1
    assert fresh.detector.threshold == trainer.detector.threshold
    path.unlink()
    with pytest.warns(UserWarning, match="kat_detector.pt not found"):
        fresh._load_optimizer_and_scheduler(str(path.parent))


def test_user_errors_name_the_fix(trl, toy, tmp_path, one_thread):
    student = toy_student()
    with pytest.raises(TypeError, match="detector: dict lacks"):
        make_trainer(toy, student, tmp_path, detector={"window": 8})
    with pytest.raises(ValueError, match="score_batch_size must be a positive integer, got 0"):
        make_trainer(toy, student, tmp_path, score_batch_size=0)
    trainer = make_trainer(toy, student, tmp_path, detector=armed())
    _, batch, _ = sampled(toy, student, 4)
    with pytest.raises(ValueError, match="text-only batches.*pixel_values"):
        trainer.select_tokens({**batch, "pixel_values": torch.zeros(4, 3, 2, 2)})
    broken = copy.deepcopy(toy["teacher"])
    with torch.no_grad():
        broken.get_output_embeddings().weight[5] = float("nan")
    trainer.teacher_model = broken
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite reverse KL .* rows \[0, 1, 2, 3\]"):
        trainer.select_tokens(dict(batch))


def test_teacher_is_required(trl, toy, tmp_path):
    from datasets import Dataset
    from trl import DistillationConfig

    from kat.integrations.trl import KATDistillationTrainer

    with pytest.raises(ValueError, match="needs teacher_model"):
        KATDistillationTrainer(model=toy_student(), args=DistillationConfig(output_dir=str(tmp_path), use_cpu=True,
                                                                             report_to="none"),
                               train_dataset=Dataset.from_dict({"prompt": ["1+2"]}), processing_class=toy["tok"])


def test_import_without_trl_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "kat.integrations.trl", raising=False)
    import kat.integrations  # the package itself needs nothing

    assert "trl" in kat.integrations.__doc__
    with pytest.raises(ImportError, match=r"needs TRL >= 1.16 .*pip install 'kat\[trl\]'"):
        import kat.integrations.trl  # noqa: F401


def test_example_runs_as_written(trl, toy, tmp_path, capsys, monkeypatch):
    """examples/trl_kat.py on a tiny budget: it trains, prints its step lines and saves the student."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_kat_example", ROOT / "examples" / "trl_kat.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        example.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_train_batch_size", "8",
                      "--max_completion_length", "24", "--eval_limit", "4", "--eval_k", "1", "--kat_min_buffer", "8",
                      "--kat_warmup_steps", "1", "--use_cpu", "true"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1", "2", "3"]
    assert "before: avg@1" in out and "after: avg@1" in out
    step2 = next(line for line in out.splitlines() if line.startswith("step    2"))
    assert "threshold -" not in step2  # the detector calibrated on step 1's 8 completions
    assert (tmp_path / "run" / "model.safetensors").is_file()
