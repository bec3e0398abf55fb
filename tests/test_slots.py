"""The slot KV cache (kat.slots) against transformers' DynamicCache, and the refill engine's schedule independence."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kat.slots import SlotCache
from tests.conftest import tiny_llama as conftest_llama
from tests.test_sampler import tiny_llama
from tests.test_scale import SAMPLING_PRELUDE, torchrun


def _dynamic(model, ids, mask):
    """Prefill then decode `ids`'s last columns one by one with DynamicCache and a 2D mask; logits (b, L, V)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask.long(), position_ids=pos, cache=DynamicCache(), use_cache=True)
    return out.logits


def _grow(mask, n: int):
    return torch.cat([mask, torch.ones(mask.shape[0], n, dtype=torch.bool)], 1)


def _pos(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _prompts(vocab: int, lengths: list[int], width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = True
    return torch.where(mask, ids, 0), mask


def _slot_forward(model, cache: SlotCache, rows, ids, new_valid, positions):
    attn = cache.plan(rows, new_valid, model.dtype)
    return model(input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache, use_cache=True).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slot_cache_matches_dynamic_cache_with_refill(dtype):
    model = conftest_llama(40, seed=5, layers=2, hidden=32).to(dtype)
    P, steps, S = 6, 5, 3
    ids, mask = _prompts(40, [6, 3, 1], P, seed=0)
    g = torch.Generator().manual_seed(1)
    gen = torch.randint(3, 40, (S, steps), generator=g)  # teacher-forced continuations
    full_ids, full_mask = torch.cat([ids, gen], 1), torch.cat([mask, torch.ones(S, steps, dtype=torch.bool)], 1)
    ref = _dynamic(model, full_ids, full_mask)  # (S, P + steps, V)

    cache = SlotCache.for_model(model, S, P + steps + 3)
    base = mask.sum(-1)  # (S,) real prompt lengths
    logits = _slot_forward(model, cache, None, ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0))
    real = mask
    torch.testing.assert_close(logits[real], ref[:, :P][real], atol=1e-5, rtol=0)
    for t in range(steps):
        out = _slot_forward(model, cache, None, gen[:, t : t + 1], torch.ones(S, 1, dtype=torch.bool),
                            (base + t)[:, None])
        torch.testing.assert_close(out[:, 0], ref[:, P + t], atol=1e-5, rtol=0)

    # empty slot 1 and refill it with a new prompt; the other slots go on decoding as before
    new_ids, new_mask = _prompts(40, [4], P, seed=7)
    new_gen = torch.randint(3, 40, (1, 3), generator=g)
    new_ref = _dynamic(model, torch.cat([new_ids, new_gen], 1), _grow(new_mask, 3))
    cache.reset(torch.tensor([1]))
    out = _slot_forward(model, cache, torch.tensor([1]), new_ids, new_mask, _pos(new_mask))
    torch.testing.assert_close(out[new_mask], new_ref[:, :P][new_mask], atol=1e-5, rtol=0)
    # a fresh (teacher-forced) continuation for slots 0 and 2 checked against a longer dynamic run
    more = torch.randint(3, 40, (S, 3), generator=g)
    ref2 = _dynamic(model, torch.cat([full_ids, more], 1), _grow(full_mask, 3))
    for t in range(3):
        tok = more[:, t : t + 1].clone()
        tok[1] = new_gen[0, t]
        positions = torch.stack([base[0] + steps + t, new_mask.sum() + t, base[2] + steps + t])[:, None]
        out = _slot_forward(model, cache, None, tok, torch.ones(S, 1, dtype=torch.bool), positions)
        torch.testing.assert_close(out[0, 0], ref2[0, P + steps + t], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[2, 0], ref2[2, P + steps + t], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1, 0], new_ref[0, P + t], atol=1e-5, rtol=0)


def test_slot_cache_chunk_forward_matches_token_by_token():
    """A (S, C) forward through the cache (the teacher's chunk) equals C single-token forwards, with
    a row whose last chunk positions are not real (after its EOS) hidden from later queries."""
    model = conftest_llama(40, seed=6, layers=2, hidden=32)
    P, C, S = 5, 4, 2
    ids, mask = _prompts(40, [5, 2], P, seed=3)
    chunk = torch.randint(3, 40, (S, C), generator=torch.Generator().manual_seed(4))
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    base = mask.sum(-1)
    caches = [SlotCache.for_model(model, S, P + C + 1) for _ in range(2)]
    for cache in caches:
        _slot_forward(model, cache, None, ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0))
    positions = base[:, None] + torch.arange(C)
    whole = _slot_forward(model, caches[0], None, chunk, valid, positions)
    for j in range(C):
        one = _slot_forward(model, caches[1], None, chunk[:, j : j + 1], valid[:, j : j + 1], positions[:, j : j + 1])
        torch.testing.assert_close(whole[valid[:, j], j], one[valid[:, j], 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[0].valid, caches[1].valid)
    torch.testing.assert_close(caches[0].length, torch.full((S,), P + C))


# --- the slot engine against the DynamicCache loop --------------------------------------------

V, EOS, PAD, MAX_NEW, N = 24, 1, 0, 22, 8


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2, 4, 7])
    ids = torch.randint(4, V, (N, 7), generator=torch.Generator().manual_seed(123))
    mask = torch.arange(7)[None, :] >= 7 - lengths[:, None]
    return tiny_llama(0), tiny_llama(1), ids.masked_fill(~mask, PAD), mask


def make_terminator(name: str):
    from kat.terminators import RandomTerminator, TrapDetector

    if name == "none":
        return None
    if name == "random":
        return RandomTerminator(target_length=8, exempt=2, max_new_tokens=MAX_NEW, seed=0)
    gate = {"kat": "none", "gated": "drift"}[name]
    return TrapDetector(window=4, stride=2, patience=1, exempt=2, eta=0.5, min_buffer=1, warmup_steps=1,
                        gate=gate, drift_prob=0.2)


def run_steps(models, name: str, steps: int = 2, **kw):
    """`steps` sampling steps of one terminator (end_batch between them); the rollouts and thresholds."""
    student, teacher, ids, mask = models
    term, out = make_terminator(name), []
    for step in range(steps):
        rollout, state = sample(student, teacher, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=EOS,
                                pad_token_id=PAD, chunk=4, terminator=term,
                                generator=torch.Generator().manual_seed(7 + step), **kw)
        if term is not None:
            term.end_batch(state, step)
        out.append((rollout, getattr(term, "threshold", None), getattr(term, "hazard", None)))
    return out


def assert_same_rollouts(got, ref):
    for (r, thr, haz), (r0, thr0, haz0) in zip(got, ref):
        assert torch.equal(r.completion_ids, r0.completion_ids)
        assert torch.equal(r.completion_mask, r0.completion_mask)
        assert torch.equal(r.stop, r0.stop) and torch.equal(r.cut, r0.cut)
        torch.testing.assert_close(r.kl, r0.kl, atol=1e-5, rtol=0, equal_nan=True)
        torch.testing.assert_close(r.student_logp, r0.student_logp, atol=1e-5, rtol=0, equal_nan=True)
        assert (thr is None) == (thr0 is None) and (thr is None or abs(thr - thr0) < 1e-5)
        assert (haz is None and haz0 is None) or abs(haz - haz0) < 1e-9


from kat.sampler import sample  # noqa: E402


@pytest.mark.parametrize("name", ["none", "kat", "gated", "random"])
def test_slots_give_the_dynamic_loops_tokens_cuts_and_kl(pair, name):
    ref = run_steps(pair, name)
    if name != "none":  # the setup cuts rows in the active step, and not every row
        assert 0 < int((ref[1][0].stop >= 2).sum()) < N
    for S in (N, N // 2, N // 4, N // 8):
        assert_same_rollouts(run_steps(pair, name, slots=S), ref)
    assert_same_rollouts(run_steps(pair, name, decode="static"), ref)  # S = B through the slot caches


@pytest.mark.parametrize("score", [True, False])
def test_slots_posthoc_and_unscored_match(pair, score):
    ref = run_steps(pair, "none", steps=1, score=score)
    assert_same_rollouts(run_steps(pair, "none", steps=1, score=score, slots=3), ref)
    if not score:
        assert ref[0][0].kl.isnan().all()


def test_refill_counts_fewer_slot_steps_than_rows_times_longest(pair):
    """With S < N the slot steps follow the tokens: every slot-step of a busy slot ends in a token
    or in the tail of the chunk where its row ended."""
    (r, _, _), = run_steps(pair, "none", steps=1, slots=2)
    tokens, C = int(r.completion_mask.sum()), 4
    assert r.engine["slot_steps"] == 2 * r.engine["decode_steps"]
    assert r.engine["slot_steps"] <= tokens + N * (C - 1) + 2 * C  # chunk tails and the last, half-empty chunk


TWO_PROCESSES = SAMPLING_PRELUDE + r"""
calls = {"student": 0, "teacher": 0}
for name, model in (("student", student), ("teacher", teacher)):
    model.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
ids, mask = torch.load(prompts_path)
half = ids.shape[0] // 2
ids, mask = ids[half * rank: half * (rank + 1)], mask[half * rank: half * (rank + 1)]
result = {}
for case in ("none", "kat", "uneven"):
    term = None
    if case == "kat":
        term = TrapDetector(window=4, stride=2, patience=1, exempt=2, eta=0.5, min_buffer=1, warmup_steps=0)
        term.buffer = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)  # active, one threshold everywhere
    # uneven: process 0's rows end at their first token, process 1's run on
    eos = (list(range(student.config.vocab_size)) if rank == 0 else [1]) if case == "uneven" else 1
    calls.update(student=0, teacher=0)
    rollout, _ = sample(student, teacher, ids, mask, max_new_tokens=22, eos_token_id=eos, pad_token_id=0, chunk=4,
                        terminator=term, generator=torch.Generator().manual_seed(7),
                        global_rows=(half * rank, 2 * half), slots=int(sys.argv[5]))
    torch.save(rollout, f"{out}/{case}_{rank}.pt")
    result[case] = dict(calls)
json.dump(result, open(f"{out}/calls_{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("slots", [1, 3])
def test_two_processes_run_the_same_forwards_and_sample_the_one_process_tokens(pair, tmp_path, slots):
    import json

    from kat.terminators import TrapDetector

    student, teacher, ids, mask = pair
    student.save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    torch.save((ids, mask), tmp_path / "prompts.pt")
    (tmp_path / "run.py").write_text(TWO_PROCESSES)
    torchrun(tmp_path / "run.py", [str(tmp_path / "student"), str(tmp_path / "teacher"), str(tmp_path / "prompts.pt"),
                                   str(tmp_path), str(slots)])
    calls = [json.loads((tmp_path / f"calls_{r}.json").read_text()) for r in (0, 1)]
    assert calls[0] == calls[1]  # every forward is a collective under FSDP
    for case in ("none", "kat"):
        term = None
        if case == "kat":
            term = TrapDetector(window=4, stride=2, patience=1, exempt=2, eta=0.5, min_buffer=1, warmup_steps=0)
            term.buffer = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        ref, _ = sample(student, teacher, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD,
                        chunk=4, terminator=term, generator=torch.Generator().manual_seed(7))
        parts = [torch.load(tmp_path / f"{case}_{r}.pt", weights_only=False) for r in (0, 1)]
        T = ref.completion_ids.shape[1]
        got = torch.cat([torch.nn.functional.pad(p.completion_ids, (0, T - p.completion_ids.shape[1])) for p in parts])
        assert torch.equal(got, ref.completion_ids)
        assert torch.equal(torch.cat([p.cut for p in parts]), ref.cut)
        assert torch.equal(torch.cat([p.stop for p in parts]), ref.stop)
    assert int((ref.stop >= 2).sum()) > 0  # the kat case cuts
    uneven = [torch.load(tmp_path / f"uneven_{r}.pt", weights_only=False) for r in (0, 1)]
    assert uneven[0].completion_mask.sum(-1).tolist() == [1] * (N // 2) and uneven[1].lengths.max() > 4


def test_training_with_slots_logs_decode_steps_and_matches_every_row_at_once(tiny_world, tmp_path, one_thread):
    """Two steps of KAT training: rollout_slots 2 logs the same losses, lengths and cuts as 0, with
    decode_steps and slot_occupancy in every metrics row."""
    import json

    from kat.config import Config
    from kat.train import train
    from tests.conftest import tiny_args

    rows = {}
    for S in (0, 2):
        out = tmp_path / f"s{S}"
        train(Config(**tiny_args(tiny_world, out, steps=2, rollout_slots=S, teacher_cache_mb=0, n_traces=0)))
        rows[S] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows[S] = [r for r in rows[S] if "loss" in r]
    assert len(rows[0]) == len(rows[2]) == 2
    for a, b in zip(rows[0], rows[2]):
        for key in ("loss", "kl", "cut_rate", "mean_length", "tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
        assert b["decode_steps"] >= a["decode_steps"] > 0  # 4 rows through 2 slots take more forwards
        assert 0 < b["slot_occupancy"] <= 1 and 0 < a["slot_occupancy"] <= 1


def test_the_bf16_decode_copy_is_never_stale():
    """After every optimiser step the copy holds the master weights cast to bf16, and a copy that
    missed a step is refused rather than handed out."""
    from kat.decode_copy import DecodeCopy, wants_copy

    student = tiny_llama(3)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    held = DecodeCopy(student, opt)
    ids = torch.randint(2, V, (2, 6), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        student.train()
        student(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        model = held.current()
        assert held.version == held.steps == step + 1
        for (name, p), q in zip(student.named_parameters(), model.parameters()):
            assert q.dtype == torch.bfloat16 and torch.equal(q, p.detach().to(torch.bfloat16)), name
    held.steps += 1  # as if a step ran without the hook
    with pytest.raises(RuntimeError, match="version 3 but the optimiser took 4"):
        held.current()
    held.close()
    assert not wants_copy(student, "static")  # CPU: decoding reads the student as it is


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_compiled_decode_step_is_one_graph_and_samples_the_same_tokens(pair, monkeypatch, backend):
    """The decode step (student forward + sampling + cache writes) traces as ONE graph
    (fullgraph=True: no graph break, which CUDA graphs need) and gives the eager step's rollout."""
    import kat.engine as engine

    ref = run_steps(pair, "kat", steps=1, slots=3)
    orig = engine.decode_step_fn
    monkeypatch.setattr(engine, "decode_step_fn", lambda student, compiled, backend_=None: orig(student, True, backend))
    assert_same_rollouts(run_steps(pair, "kat", steps=1, slots=3), ref)


@pytest.fixture(scope="module")
def rollout_bench():
    import sys

    from tests.conftest import ROOT, load_by_path

    sys.path.insert(0, str(ROOT / "benchmarks"))  # its own `import common`
    return load_by_path("rollout_bench", ROOT / "benchmarks" / "rollout.py")


def test_chunk_schedule_replays_a_worked_example(rollout_bench):
    """Rows of 8, 3 and 9 tokens through 2 slots at C = 4 hold their slots 2, 1 and 3 chunks: rows 0
    and 1 start, row 2 takes row 1's slot at the first boundary, and runs alone for its last two chunks."""
    sched = rollout_bench.chunk_schedule([8, 3, 9], slots=2, chunk=4)
    assert sched["profile"] == [2, 2, 1, 1] and sched["dry"] == 1
    assert sched["decode_steps"] == 16 and sched["slot_steps"] == 32 and sched["held"] == (2 + 1 + 3) * 4
    assert rollout_bench.run_lengths([16, 16, 13, 1, 1]) == "16x2 13 1x2"


@pytest.mark.parametrize("name", ["none", "kat", "random"])
def test_the_engine_spends_the_decode_steps_the_refill_rule_needs(pair, rollout_bench, name):
    """decode_steps and slot_steps equal the refill rule replayed on the rows' lengths: no slot stays
    empty while a row waits and no chunk runs after the last row ended (what benchmarks/rollout.py's
    "= replay" column checks at the toy's scale)."""
    for S in (1, 2, 3, N // 2):
        for r, _, _ in run_steps(pair, name, slots=S):  # step 2: the detector and random cut rows
            a = rollout_bench.slot_analysis(r, S, chunk=4)
            assert a["replayed"], (S, r.engine, rollout_bench.chunk_schedule(a["lengths"], S, 4))
            assert a["occupancy"] + a["tail"] + a["idle"] == pytest.approx(1.0)


def test_the_rollout_benchmarks_slots_tables_run_and_replay(rollout_bench):
    """benchmarks/rollout.py --slots on a small toy batch: every arm's decode_steps is the replay's."""
    out = rollout_bench.benchmark(torch.device("cpu"), ["toy"], batch={"toy": 12}, max_new_tokens={"toy": 24},
                                  repeats=1, slots=4, skip_modes=True, seeds=[0, 1], sweep=[2, 12])
    arm_rows = [line for line in out.splitlines() if " kept)" in line]  # the per-arm table
    assert len(arm_rows) == 4 and all("| yes " in line for line in arm_rows)
    assert "seeds [0, 1]" in out and " of 2 seeds" in out


def test_slot_buffers_are_allocated_once_per_rollout_phase(pair, monkeypatch):
    """Through prefills, refills and decoding, each layer of the student's and the teacher's slot
    caches keeps one key and one value buffer of a fixed shape (allocated once, never grown)."""
    from kat.slots import SlotLayer

    seen, orig = {}, SlotLayer.update

    def update(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        seen.setdefault(id(self), set()).add((self.keys.data_ptr(), self.values.data_ptr(), tuple(self.keys.shape)))
        return out

    monkeypatch.setattr(SlotLayer, "update", update)
    run_steps(pair, "kat", steps=1, slots=3)  # lockstep: student and teacher caches, 8 rows through 3 slots
    layers = pair[0].config.num_hidden_layers + pair[1].config.num_hidden_layers
    assert len(seen) == layers and all(len(v) == 1 for v in seen.values())


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_slot_tokens_do_not_depend_on_the_chunk(pair, chunk):
    """Without a terminator the chunk only sets the refill boundaries: the same tokens and KL."""
    student, teacher, ids, mask = pair
    ref, _ = sample(student, teacher, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD,
                    chunk=4, generator=torch.Generator().manual_seed(7))
    got, _ = sample(student, teacher, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD,
                    chunk=chunk, generator=torch.Generator().manual_seed(7), slots=3)
    assert torch.equal(got.completion_ids, ref.completion_ids) and torch.equal(got.stop, ref.stop)
    torch.testing.assert_close(got.kl, ref.kl, atol=1e-5, rtol=0, equal_nan=True)
