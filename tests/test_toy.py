"""The toy world: generator, solutions, tracing, tokenizer, and the shipped checkpoints."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from kat.toy.tokenizer import CHARS, build_tokenizer, vocab
from kat.toy.world import (FORMS, SEPS, WorldSpec, extract_answer, grade, make_split, parse_prompt,
                           read_jsonl, sample_problem, trace, world_specs, write_solution, write_step)

TOY_DIR = Path(__file__).resolve().parents[1] / "kat" / "toy"
WORLDS = ("rich", "plain", "repeat", "sticky")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


# ---------------------------------------------------------------------------------------------
# generator

def test_generator_is_deterministic_for_a_seed():
    a = make_split(50, seed=3)
    assert a == make_split(50, seed=3)
    assert a != make_split(50, seed=4)
    spec = world_specs("rich")[1]
    def sols(seed):
        return [write_solution(sample_problem(rng := random.Random(seed)), spec, rng) for _ in range(20)]
    assert sols(5) == sols(5)


def test_problems_respect_the_difficulty_knobs_and_stay_non_negative():
    rng = random.Random(0)
    for _ in range(500):
        p = sample_problem(rng, min_ops=2, max_ops=4, digits=3)
        assert 2 <= len(p.ops) <= 4 and len(p.numbers) == len(p.ops) + 1
        assert all(100 <= n <= 999 for n in p.numbers)
        assert all(c >= 0 for _, _, _, c in p.steps())
        assert parse_prompt(p.prompt) == p
        assert p.answer == eval(p.prompt)  # left-to-right + and - is Python's order too


def test_a_split_has_distinct_prompts_and_avoids_excluded_ones():
    test = make_split(200, seed=1)
    train = make_split(500, seed=2, exclude={r["prompt"] for r in test})
    assert len({r["prompt"] for r in train}) == 500
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(r["answer"] == str(eval(r["prompt"])) for r in train)


def test_written_steps_are_arithmetically_true_in_every_form():
    rng = random.Random(1)
    for _ in range(200):
        for r, op, b, c in sample_problem(rng).steps():
            for form in FORMS:
                lhs, rhs = write_step(r, op, b, c, form).split("=")
                assert eval(lhs) == int(rhs) == c


def test_plain_solution_is_the_single_canonical_one():
    p = parse_prompt("37+48-19+25")
    text, eos = write_solution(p, world_specs("plain")[0], random.Random(0))
    assert (text, eos) == ("37+48=85;85-19=66;66+25=91;A=91", True)


def test_rich_teacher_and_student_data_prefer_opposite_spellings():
    def shares(spec: WorldSpec) -> tuple[float, float, float]:
        rng, fwd, semi, steps, rep = random.Random(0), 0, 0, 0, 0
        for _ in range(3000):
            p = sample_problem(rng)
            text, eos = write_solution(p, spec, rng)
            rep += not eos
            for step in p.steps():
                for form in FORMS:
                    for sep in SEPS:
                        if write_step(*step, form) + sep in text:
                            fwd, semi, steps = fwd + (form == "fwd"), semi + (sep == ";"), steps + 1
                            break
                    else:
                        continue
                    break
        return fwd / steps, semi / steps, rep / 3000

    teacher, student = world_specs("rich")
    t_fwd, t_semi, t_rep = shares(teacher)
    s_fwd, s_semi, s_rep = shares(student)
    assert t_fwd == pytest.approx(0.75, abs=0.03) and t_semi == pytest.approx(0.75, abs=0.03)
    assert s_fwd == pytest.approx(0.25, abs=0.03) and s_semi == pytest.approx(0.25, abs=0.03)
    assert t_rep == pytest.approx(teacher.p_repeat, abs=0.01)
    assert s_rep == pytest.approx(student.p_repeat, abs=0.02)


def test_degenerate_solution_repeats_one_step_to_the_length_limit():
    spec = WorldSpec("test", p_fwd=1.0, p_semicolon=1.0, p_repeat=1.0)
    p = parse_prompt("37+48-19+25")
    text, eos = write_solution(p, spec, random.Random(0), max_chars=60)
    assert not eos and len(text) == 60 and extract_answer(text) is None
    tr = trace(text, p)
    assert not tr.correct and tr.repeat_start is not None and tr.first_error == tr.repeat_start
    step = text[tr.repeat_start: tr.repeat_start + tr.repeat_len]
    assert text[:tr.repeat_start].endswith(step)  # the step before is the same text
    assert text[tr.repeat_start:] == (step * 20)[: 60 - tr.repeat_start]


# ---------------------------------------------------------------------------------------------
# grading and tracing

def test_grading_reads_the_last_answer():
    assert grade("37+48=85;A=85", "85") and not grade("37+48=85;A=84", "85")
    assert not grade("37+48=85;85-19=", "66") and extract_answer("no answer") is None


@pytest.mark.parametrize("completion, first_error, correct", [
    ("37+48=85;85-19=66;66+25=91;A=91", None, True),
    ("48+37=85,-19+85=66;25+66=91,A=91", None, True),  # any spelling of any world is valid
    ("37+48=86;86-19=67;67+25=92;A=92", 7, False),  # slip at the last digit of the first result
    ("37+48=85;85-19=66;66+25=91;A=9", 30, False),  # answer cut short: error where it stops
    ("37+48=85;85-19=66;66+25=91;A=91;", 31, True),  # text after the answer is an error
    ("37+48=85;85-19=66;85-19=66;85-19=66;", 18, False),
])
def test_trace_locates_the_first_error(completion, first_error, correct):
    tr = trace(completion, parse_prompt("37+48-19+25"))
    assert tr.first_error == first_error and tr.correct is correct


def test_trace_finds_repetitions_after_an_error_too():
    tr = trace("37+48=86;86-19=67;67-19=48;67-19=48;67-19", parse_prompt("37+48-19+25"))
    assert tr.first_error == 7 and tr.repeat_start == 27 and tr.repeat_len == 9


# ---------------------------------------------------------------------------------------------
# tokenizer

def test_tokenizer_round_trip_one_token_per_character():
    tok = build_tokenizer()
    text = "48+37=85,-19+85=66;A=66"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert ids == [vocab()[ch] for ch in text]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_tokenizer_special_tokens_and_unknown_characters():
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(CHARS)
    assert tok("<bos>1<eos>", add_special_tokens=False)["input_ids"] == [1, vocab()["1"], 2]
    assert tok("1x", add_special_tokens=False)["input_ids"] == [vocab()["1"], 3]


def test_chat_template_renders_the_question():
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "37+48-19+25"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == "<bos>Q:37+48-19+25\n"
    full = msgs + [{"role": "assistant", "content": "37+48=85;A=85"}]
    assert tok.apply_chat_template(full, tokenize=False) == "<bos>Q:37+48-19+25\n37+48=85;A=85<eos>"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "<bos>Q:37+48-19+25\n"


def test_tokenizer_saves_and_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left" and tok.eos_token == "<eos>"
    msgs = [{"role": "user", "content": "1+2"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == "<bos>Q:1+2\n"


# ---------------------------------------------------------------------------------------------
# shipped files

@pytest.mark.parametrize("world", WORLDS)
def test_shipped_prompt_files(world):
    data = TOY_DIR / world / "data"
    if not data.exists():
        pytest.skip(f"the {world} world is not built")
    train, test = read_jsonl(data / "train.jsonl"), read_jsonl(data / "test.jsonl")
    assert len(train) >= 2000 and len(test) == 200
    assert set(train[0]) == {"prompt", "answer"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(r["answer"] == str(parse_prompt(r["prompt"]).answer) for r in train + test)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_shipped_checkpoints_load_offline(world, role, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = TOY_DIR / world / role
    if not path.exists():
        pytest.skip(f"the {world} world is not built")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / name).exists(), name
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert len(tok) == model.config.vocab_size == len(vocab())
    ids = tok.apply_chat_template([{"role": "user", "content": "12+34"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(vocab())) and torch.isfinite(logits).all()


def test_shipped_rich_teacher_solves_test_problems_greedily():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kat.evaluate import evaluate

    path = TOY_DIR / "rich" / "teacher"
    if not path.exists():
        pytest.skip("the rich world is not built")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    problems = read_jsonl(TOY_DIR / "rich" / "data" / "test.jsonl")[:16]
    res = evaluate(model, tok, problems, 1, max_new_tokens=96, temperature=0)
    assert res["avg@k"] >= 14 / 16
    # Greedy decoding mostly takes the teacher's preferred spelling (r op b, then ';', each
    # 75% of its training data), so most correct greedy solutions are the canonical plain ones.
    canonical = world_specs("plain")[0]
    solved = [r for r in res["problems"] if r["correct"][0]]
    same = [r["completions"][0] == write_solution(parse_prompt(r["prompt"]), canonical, random.Random(0))[0]
            for r in solved]
    assert sum(same) >= 0.75 * len(solved)


# ---------------------------------------------------------------------------------------------
# statistics helpers

def test_window_means_match_a_direct_loop():
    from kat.terminators import window_means  # the one the stats and the plots use

    g = torch.Generator().manual_seed(0)
    kl = torch.rand(30, generator=g, dtype=torch.float64).float()
    z = window_means(kl[:25], 8)
    expected = [sum(kl[t - 7: t + 1].double().tolist()) / 8 for t in range(7, 25)]
    assert z[7:].tolist() == pytest.approx(expected, abs=1e-6)
    assert z[:7].isnan().all() and window_means(kl[:5], 8).isnan().all()


def test_offline_detector_cuts_a_long_low_stretch_at_its_first_window():
    from experiments.toy_stats import replay_detector

    healthy = torch.full((64,), 0.3)
    trapped = torch.full((64,), 0.3)
    trapped[24:] = 0.0  # agreement from token 24 on
    kl = torch.stack([healthy, healthy, healthy, trapped])
    cuts, threshold = replay_detector(kl, [64] * 4, window=8, stride=8, patience=2, exempt=8, eta=0.3)
    # minima 0.3, 0.3, 0.3, 0.0 -> 70% quantile is 0.3; z < 0.3 only in the trapped row
    assert threshold == pytest.approx(0.3)
    # windows end at 7, 15, ...; the first all-low window is [24, 31], the second confirms
    assert cuts == [None, None, None, 24]


def reference_windows(rows: list[list[float]], lengths: list[int], window: int, stride: int) -> list[dict]:
    """Per row, z_t by window end t at the positions the detector evaluates (float64)."""
    return [{t: sum(row[t - window + 1: t + 1]) / window for t in range(window - 1, n) if (t + 1) % stride == 0}
            for row, n in zip(rows, lengths)]


def reference_cuts(rows: list[list[float]], lengths: list[int], *, window: int, stride: int, patience: int,
                   exempt: int, eta: float) -> tuple[list[int | None], float]:
    """The detector's rules in plain float64 Python, the threshold calibrated on the same rollouts."""
    zs = reference_windows(rows, lengths, window, stride)
    minima = sorted(min(z.values()) for z in zs if z)  # every evaluated window, exempt ones too
    pos = (1 - eta) * (len(minima) - 1)  # numpy's linear quantile
    lo = math.floor(pos)
    s = minima[lo] + (pos - lo) * (minima[min(lo + 1, len(minima) - 1)] - minima[lo])
    cuts = []
    for z in zs:
        run, start, cut = 0, None, None
        for t in sorted(z):
            if t - window + 1 < exempt:  # a window decides only if it starts at or after exempt
                continue
            run = run + 1 if z[t] < s else 0
            start = t - window + 1 if run == 1 else start
            if run == patience:
                cut = start
                break
        cuts.append(cut)
    return cuts, s


@pytest.mark.parametrize("seed", range(4))
def test_stats_cuts_equal_trap_detectors_on_the_same_kl(seed):
    """The stats replay (shadow mode, chunks of 8) cuts where a cutting TrapDetector fed in other
    chunks cuts once its buffer holds the same minima, and where the float64 rules say."""
    from kat.terminators import TrapDetector
    from experiments.toy_stats import replay_detector

    g = torch.Generator().manual_seed(seed)
    batch, width = 23, 70  # 0.7 * 22 is not an integer: the threshold lies strictly between two minima
    kl = torch.rand(batch, width, generator=g) ** 3 * 2  # (B, T) heavy near zero, like d_t
    for b in range(0, batch, 3):  # planted low stretches at random places
        a = int(torch.randint(0, width - 20, (1,), generator=g))
        kl[b, a: a + int(torch.randint(8, 40, (1,), generator=g))] *= 0.01
    lengths = torch.randint(5, width + 1, (batch,), generator=g).tolist()
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    kl = kl * valid
    settings = [dict(window=8, stride=4, patience=2, exempt=8, eta=0.3),
                dict(window=8, stride=8, patience=1, exempt=0, eta=0.3),
                dict(window=6, stride=4, patience=3, exempt=5, eta=0.5)]
    fired_somewhere = False
    for kw in settings:
        cuts, threshold = replay_detector(kl, lengths, **kw)
        ref_cuts, ref_s = reference_cuts(kl.double().tolist(), lengths, **kw)
        assert threshold == pytest.approx(ref_s, rel=1e-12) and cuts == ref_cuts

        # the detector as training runs it: cutting, fed 3 tokens at a time, these minima buffered
        det = TrapDetector(rule="quantile", buffer_size=64, min_buffer=1, warmup_steps=0, **kw)
        minima = [min(z.values()) for z in reference_windows(kl.double().tolist(), lengths, kw["window"],
                                                             kw["stride"]) if z]
        det.load_state_dict({"rule": "quantile", "buffer": torch.tensor(minima, dtype=torch.float64),
                             "steps_done": 1, "z_mean": None, "z_var": None})
        state = det.start(batch)
        for t0 in range(0, width, 3):
            det.observe(state, kl[:, t0: t0 + 3], valid[:, t0: t0 + 3])
        assert state.threshold == pytest.approx(threshold, rel=1e-12)
        assert [int(c) if f else None for c, f in zip(state.cut.tolist(), state.fired.tolist())] == cuts
        fired_somewhere |= any(c is not None for c in cuts)
    assert fired_somewhere


def test_sft_is_deterministic_for_a_seed():
    from experiments.toy_build import Recipe, train

    tok = build_tokenizer()
    recipe = Recipe(layers=1, hidden=16, ffn=32, heads=2, steps=3, lr=1e-3, warmup=1, batch_size=8, eval_every=3)
    spec = world_specs("rich")[0]
    dev = make_split(4, seed=9)
    runs = [train("t", recipe, spec, tok, seed=5, exclude=set(), dev=dev, log=lambda _: None) for _ in range(2)]
    (a, hist_a), (b, hist_b) = runs
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
    c, _ = train("t", recipe, spec, tok, seed=6, exclude=set(), dev=dev, log=lambda _: None)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_build_with_a_shared_teacher_names_it_and_trains_only_the_student(tmp_path):
    import json

    from experiments.arms import world_name, world_overrides
    from kat.toy import teacher_dir
    from experiments.toy_build import Recipe, build

    tiny = Recipe(layers=1, hidden=16, ffn=32, heads=2, steps=2, lr=1e-3, warmup=1, batch_size=4, eval_every=2)
    (tmp_path / "rich" / "teacher").mkdir(parents=True)  # stands for the shared teacher
    record = build("repeat", out=tmp_path, teacher=tiny, student=tiny, log=lambda _: None,
                   teacher_from=tmp_path / "rich" / "teacher")
    assert record["teacher"] == {"from": "rich/teacher"} and "parameters" in record["student"]
    assert not (tmp_path / "repeat" / "teacher").exists() and (tmp_path / "repeat" / "student").is_dir()
    assert json.loads((tmp_path / "repeat" / "build.json").read_text())["teacher"] == {"from": "rich/teacher"}
    assert teacher_dir(tmp_path, "repeat") == tmp_path / "rich" / "teacher"
    assert teacher_dir(tmp_path, "rich") == tmp_path / "rich" / "teacher"
    over = world_overrides("repeat", root=str(tmp_path))
    assert over["teacher"] == str(tmp_path / "rich" / "teacher")
    assert over["student"] == str(tmp_path / "repeat" / "student")
    from kat.config import Config

    assert world_name(Config(**over)) == "custom"  # not under the package's toy/ directory


def test_repeat_world_student_data_degenerate_more_often():
    rich, repeat = world_specs("rich"), world_specs("repeat")
    assert repeat[0] == rich[0]  # the same teacher data (and so the same teacher)
    assert repeat[1].p_repeat == 3 * rich[1].p_repeat and repeat[1].p_fwd == rich[1].p_fwd


def test_sft_batch_masks_the_prompt_and_ends_healthy_rows_with_eos():
    from experiments.toy_build import sft_batch

    tok = build_tokenizer()
    batch = sft_batch(world_specs("plain")[0], random.Random(0), 4, set(), tok)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        text = tok.decode(ids[:n])
        prompt_end = text.index("\n") + 1  # '<bos>Q:...\n' is 5 characters longer than its token count
        n_prompt = len(tok(text[:prompt_end], add_special_tokens=False)["input_ids"])
        assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:n] == ids[n_prompt:n]).all()
        assert (labels[n:] == -100).all() and ids[n - 1] == tok.eos_token_id
        prompt = text[len("<bos>Q:"): prompt_end - 1]
        assert grade(tok.decode(ids[n_prompt:n], skip_special_tokens=True), str(parse_prompt(prompt).answer))


# ---------------------------------------------------------------------------------------------
# the sticky world: a teacher that continues loops, a student whose loops escape

def test_escaping_repetition_repeats_a_step_once_or_twice_then_answers():
    spec = WorldSpec("test", p_fwd=1.0, p_semicolon=1.0, p_repeat=1.0, p_escape=1.0)
    p = parse_prompt("37+48-19+25")
    steps = [write_step(*s, "fwd") + ";" for s in p.steps()]
    copies = set()
    for seed in range(40):
        text, eos = write_solution(p, spec, random.Random(seed))
        assert eos and grade(text, str(p.answer))
        tr = trace(text, p)
        assert tr.repeat_start is not None and tr.first_error == tr.repeat_start
        step = text[tr.repeat_start: tr.repeat_start + tr.repeat_len]
        n = next(k for k in (2, 1) if text.count(step * (k + 1)) == 1)  # copies beyond the first
        copies.add(n)
        assert text == "".join(steps).replace(step, step * (n + 1), 1) + f"A={p.answer}"
    assert copies == {1, 2}


def test_escape_copies_shrink_to_fit_the_length_limit():
    spec = WorldSpec("test", p_fwd=1.0, p_semicolon=1.0, p_repeat=1.0, p_escape=1.0)
    p = parse_prompt("37+48-19+25")  # 37+48=85;85-19=66;66+25=91;A=91: 31 characters
    for seed in range(20):
        text, eos = write_solution(p, spec, random.Random(seed), max_chars=40)  # room for one copy of 9
        assert eos and len(text) <= 40 and grade(text, "91")


def test_a_spec_without_escape_draws_what_it_drew_before_escapes_existed():
    """p_escape = 0 draws nothing extra, so the shipped worlds' SFT streams are unchanged: a degenerate
    sample draws once for whether it repeats, once for where, and twice per step it writes."""
    spec = WorldSpec("test", p_fwd=1.0, p_semicolon=1.0, p_repeat=1.0)
    q = parse_prompt("37+48-19+25")  # each step is 9 characters written forward with ';'
    for seed in range(10):
        counter = _CountingRandom(seed)
        text, eos = write_solution(q, spec, counter)
        written = trace(text, q).repeat_start // 9  # the steps up to and including the repeated one
        assert not eos and counter.calls == 2 + 2 * written
    healthy = WorldSpec("test", p_fwd=0.5, p_semicolon=0.5, p_repeat=0.0)
    counter = _CountingRandom(0)
    write_solution(q, healthy, counter)
    assert counter.calls == 1 + 2 * 3


class _CountingRandom(random.Random):
    """Counts calls of random(); a subclass that overrides it makes randrange draw through it too."""

    calls = 0

    def random(self):
        self.calls += 1
        return super().random()


def test_loop_loss_only_starts_the_loss_at_the_second_repeated_copy():
    from experiments.toy_build import loss_start, sft_batch

    teacher = WorldSpec("test", p_fwd=1.0, p_semicolon=1.0, p_repeat=1.0, loop_loss_only=True)
    p = parse_prompt("37+48-19+25")
    text, eos = write_solution(p, teacher, random.Random(1))
    tr = trace(text, p)
    assert not eos and loss_start(text, eos, teacher) == tr.repeat_start + tr.repeat_len
    assert loss_start("37+48=85;85-19=66;66+25=91;A=91", True, teacher) == 0
    assert loss_start(text, eos, world_specs("rich")[0]) == 0  # the flag off: loss everywhere
    tok = build_tokenizer()
    batch = sft_batch(teacher, random.Random(2), 8, set(), tok)
    vocab_ = tok.get_vocab()
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        text = "".join(tok.convert_ids_to_tokens(ids.tolist())).split("\n", 1)[1].split(tok.pad_token)[0]
        first = int((labels != -100).nonzero()[0])
        prompt_len = int((ids == vocab_["\n"]).nonzero()[0]) + 1
        tr = find_repeat_of(text)
        assert first == prompt_len + tr  # every row here degenerates, so none has loss before its loop


def find_repeat_of(text: str) -> int:
    from kat.toy.world import find_repeat

    start, length = find_repeat(text)
    return start + length


def _next_step_probs(model, tok, problems, copies: int) -> tuple[float, float]:
    """Mean probability of repeating the first step again and of going on to the second, after the
    first step written forward with ';' and then repeated `copies` times."""
    v = tok.get_vocab()
    rep, cont, n = 0.0, 0.0, 0
    for p in problems:
        pieces = [write_step(*s, "fwd") + ";" for s in p.steps()]
        if pieces[0][0] == pieces[1][0]:
            continue  # the two continuations start alike: the first character cannot tell them apart
        ids = [tok.bos_token_id] + [v[c] for c in f"Q:{p.prompt}\n" + pieces[0] * (copies + 1)]
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
        rep, cont, n = rep + float(probs[v[pieces[0][0]]]), cont + float(probs[v[pieces[1][0]]]), n + 1
    return rep / n, cont / n


def test_shipped_sticky_teacher_continues_loops_it_rarely_starts_and_the_student_escapes():
    """The sticky world's premise, measured on its shipped checkpoints over 40 problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (TOY_DIR / "sticky" / "teacher").exists():
        pytest.skip("the sticky world is not built")
    tok = AutoTokenizer.from_pretrained(TOY_DIR / "sticky" / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(TOY_DIR / "sticky" / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(TOY_DIR / "sticky" / "student").eval()
    rich = AutoModelForCausalLM.from_pretrained(TOY_DIR / "rich" / "teacher").eval()
    rng = random.Random(5)
    problems = [sample_problem(rng) for _ in range(40)]
    enter, _ = _next_step_probs(teacher, tok, problems, 0)
    stay, leave = _next_step_probs(teacher, tok, problems, 1)
    assert enter < 0.05 and stay > 0.8 and leave < 0.1  # rarely starts a loop, continues one
    rich_stay, rich_leave = _next_step_probs(rich, tok, problems, 1)
    assert rich_stay < 0.5 and rich_leave > 0.15  # the teacher it came from leaves loops often
    s_enter, _ = _next_step_probs(student, tok, problems, 0)
    s_stay, s_leave = _next_step_probs(student, tok, problems, 1)
    assert s_enter > 2 * enter and s_stay < 0.6 and s_leave > 0.15  # starts loops more, and escapes them
