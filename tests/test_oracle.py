"""The oracle cut (termination: oracle) and random termination matched on cut rate and kept length."""

import random

import pytest
import torch

from kat.terminators import RandomTerminator
from kat.rollout import STOP_EOS, STOP_LENGTH, STOP_TRAP, Rollout
from kat.toy.oracle import apply_cuts, oracle_positions
from kat.toy.tokenizer import build_tokenizer
from kat.toy.world import Problem, oracle_cut, trap_start

P = Problem((37, 48, 19), ("+", "-"))  # 37+48=85; 85-19=66; A=66
GOOD = "37+48=85;85-19=66;A=66"


@pytest.mark.parametrize("text,start", [
    (GOOD, None),                                   # a valid solution
    ("48+37=85,-19+85=66;A=66", None),              # other valid spellings
    ("37+48=86;86-19=67;A=67", 7),                  # slip in the first result: '6' where '5' belongs
    ("37+48=85;85-19=66;A=67", 21),                 # wrong final answer
    ("37+48=85;37+48=85;37+48=85;", 9),             # a loop: the repeat starts at 9, and so does the error
    ("37+48=85;85-19=66;", 18),                     # eos where the answer belongs
    ("37+48=85;85-1", 13),                          # a valid prefix cut off by the length limit
])
def test_trap_start(text, start):
    assert trap_start(text, P) == start


def test_loop_start_before_first_error():
    # a step repeated whose first characters a valid next step shares: the loop starts before the error
    q = Problem((10, 10, 10), ("+", "+"))  # 10+10=20; 20+10=30
    text = "10+10=20;10+10=20;10+10=20;"      # the swap form of step 2 is 10+20=30: shares '10+'
    assert trap_start(text, q) == 9 and oracle_cut(text, q, ended=False) == 10


@pytest.mark.parametrize("text,ended,cut", [
    (GOOD, True, None), ("37+48=86;86-19=67;A=67", True, 8), ("37+48=85;85-19=66;", True, 19),
    ("37+48=85;85-1", False, None), ("37+48=85;37+48=85;37+48=85;", False, 10),
])
def test_oracle_cut_keeps_the_error_token(text, ended, cut):
    assert oracle_cut(text, P, ended) == cut


def _rollout(texts: list[str], ended: list[bool], tok) -> Rollout:
    ids = [tok.convert_tokens_to_ids(list(t)) + ([tok.eos_token_id] if e else []) for t, e in zip(texts, ended)]
    B, T = len(ids), max(map(len, ids))
    comp = torch.full((B, T), tok.pad_token_id)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, row in enumerate(ids):
        comp[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = True
    z = torch.zeros(B, T)
    stop = torch.tensor([STOP_EOS if e else STOP_LENGTH for e in ended])
    return Rollout(prompt_ids=torch.ones(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
                   completion_ids=comp, completion_mask=mask, loss_mask=mask.clone(), student_logp=z, teacher_logp=z,
                   kl=z, stop=stop, cut=mask.sum(1))


def test_oracle_positions_equal_the_worlds_ground_truth():
    tok = build_tokenizer()
    rng = random.Random(0)
    texts, ended = [GOOD, "37+48=86;86-19=67;A=67", "37+48=85;37+48=85;37+48=85;", "37+48=85;85-19=66;"], \
        [True, True, False, True]
    for _ in range(40):  # random corruptions of the valid solution
        t = list(GOOD[:rng.randrange(1, len(GOOD) + 1)])
        i = rng.randrange(len(t))
        t[i] = rng.choice("0123456789+-=;,A")
        texts.append("".join(t))
        ended.append(rng.random() < 0.5)
    r = _rollout(texts, ended, tok)
    got = oracle_positions(r, ["37+48-19"] * len(texts), tok).tolist()
    want = []
    for t, e in zip(texts, ended):
        c = oracle_cut(t, P, e)
        want.append(-1 if c is None or c >= len(t) + e else c)
    assert got == want
    assert got[:4] == [-1, 8, 10, -1]  # the early eos is the last token: nothing after it
    out = apply_cuts(r, torch.tensor(got))
    for b, c in enumerate(got):
        n = len(texts[b]) + ended[b]
        kept = n if c < 0 else c
        assert out.loss_mask[b].tolist() == [t < kept for t in range(r.loss_mask.shape[1])]
        assert out.cut[b].item() == kept
        assert out.stop[b].item() == (STOP_TRAP if c >= 0 else r.stop[b].item())


def test_apply_cuts_keeps_the_earlier_cut_and_repacks_teacher_logits():
    tok = build_tokenizer()
    r = _rollout([GOOD, GOOD], [True, True], tok)
    T = r.loss_mask.shape[1]
    r.loss_mask[0, 5:] = False
    r.cut[0] = 5
    logits = torch.arange(int(r.loss_mask.sum()), dtype=torch.float32)[:, None]  # packed row-major
    r.teacher_logits = logits
    out = apply_cuts(r, torch.tensor([9, 3]))
    assert out.cut.tolist() == [5, 3]
    assert out.loss_mask.sum(1).tolist() == [5, 3]
    assert out.teacher_logits[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # row 0's 5, then row 1's first 3
    assert T == len(GOOD) + 1


def _stream(term: RandomTerminator, batches: int, rng: torch.Generator, chunk: int = 8, max_len: int = 96):
    """Feed batches of rows whose natural lengths are uniform on 20..max_len; (cut rate, kept length) per batch."""
    out = []
    for step in range(batches):
        lengths = torch.randint(20, max_len + 1, (64,), generator=rng)
        state = term.start(64)
        for t0 in range(0, max_len, chunk):
            alive = torch.arange(t0, t0 + chunk)[None, :] < lengths[:, None]
            valid = alive & ~state.fired[:, None]
            if not valid.any():
                break
            term.observe(state, torch.zeros(64, chunk), valid)
        out.append((state.fired.double().mean().item(), term.lengths(state).double().mean().item()))
        term.end_batch(state, step)
    return out


@pytest.mark.parametrize("rate,length", [(0.5, 40.0), (0.3, 48.0), (0.7, 30.0)])  # feasible: see _stream
def test_random_matched_on_cut_rate_and_kept_length(rate, length):
    term = RandomTerminator(target_length=length, exempt=8, max_new_tokens=96, seed=1, target_cut_rate=rate)
    hist = _stream(term, 300, torch.Generator().manual_seed(2))
    tail = hist[150:]
    mean_rate = sum(h[0] for h in tail) / len(tail)
    mean_len = sum(h[1] for h in tail) / len(tail)
    assert abs(mean_rate - rate) < 0.03, mean_rate
    assert abs(mean_len - length) < 1.5, mean_len


def test_random_without_rate_target_misses_the_rate():
    # the length-only control: same kept length, but its cut rate is whatever the hazard gives
    term = RandomTerminator(target_length=30.0, exempt=8, max_new_tokens=96, seed=1)
    tail = _stream(term, 300, torch.Generator().manual_seed(2))[150:]
    assert abs(sum(h[1] for h in tail) / len(tail) - 30.0) < 1.5
    assert sum(h[0] for h in tail) / len(tail) > 0.75  # the matched arm reaches 0.5 at kept length 40


def test_special_token_inside_a_completion_is_an_error_at_its_position():
    tok = build_tokenizer()
    r = _rollout(["37+48=85;"], [False], tok)
    r.completion_ids[0, 3] = tok.bos_token_id
    assert oracle_positions(r, ["37+48-19"], tok).tolist() == [4]
