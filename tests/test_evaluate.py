"""Metrics (against brute force), graders (exact and math-verify) and the sampling loop."""

from __future__ import annotations

import itertools
import json
import threading
from fractions import Fraction

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kat.evaluate import avg_at_k, evaluate, extract_answer, generate, grade, mean_pass_at_k, pass_at_k
from kat.toy.tokenizer import build_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread


# ---------------------------------------------------------------------------------------------
# pass@k and avg@k

def brute_pass_at_k(outcomes: list[bool], k: int) -> Fraction:
    """Share of the k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration_of_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(outcomes, k)), abs=1e-12)


def test_pass_at_k_edge_values_and_large_n():
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # n = 200 would overflow a float binomial ratio; the product stays exact to rounding
    from math import comb
    assert pass_at_k(200, 13, 50) == pytest.approx(1 - comb(187, 50) / comb(200, 50), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_and_mean_pass_at_k_over_problems():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert avg_at_k(correct) == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))  # pass@1 = avg
    expected = (float(brute_pass_at_k(correct[0], 2)) + 1.0 + 0.0) / 3
    assert mean_pass_at_k(correct, 2) == pytest.approx(expected)
    with pytest.raises(ValueError):
        avg_at_k([])


# ---------------------------------------------------------------------------------------------
# exact grader (toy)

@pytest.mark.parametrize("completion, answer, expected", [
    ("37+48=85;85-19=66;A=66", "66", True),
    ("37+48=85;A=85", "66", False),
    ("A=12;A=066", "66", True),  # the last answer counts, compared as integers
    ("A=-3", "-3", True),
    ("", "5", False),
    ("A=", "5", False),
    ("37+48=85;85-19=66;66-19=47;66-19=47;66-19=", "47", False),  # a repetition never answers
    ("A=x1", "1", False),
    ("???<unk>A", "1", False),
    ("A=7", "seven", False),  # a non-integer reference is compared as a string
])
def test_exact_grader_on_wellformed_and_malformed_outputs(completion, answer, expected):
    assert grade(completion, answer, "exact") is expected


def test_exact_extraction_reports_unparsable_as_none():
    assert extract_answer("37+48=85;", "exact") is None
    assert extract_answer("A=007", "exact") == "7"


def test_unknown_grader_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown grader 'fuzzy'"):
        grade("A=1", "1", "fuzzy")


# ---------------------------------------------------------------------------------------------
# math grader (math-verify)

EQUIVALENT = [
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("so $x = \\boxed{2}$", "2"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("The result is $\\boxed{10\\%}$", "10\\%"),
    ("\\boxed{\\sqrt{4}}", "2"),
    ("\\boxed{2\\pi}", "2\\pi"),
    ("\\boxed{1,2,3}", "\\{1,2,3\\}"),
    ("\\boxed{(1,2)}", "(1,2)"),
    ("Final: \\boxed{-7}", "-7"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("$\\boxed{\\frac{6}{4}}$", "\\frac{3}{2}"),
    ("The answer is 42.", "42"),
    ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{[0,1)}", "[0,1)"),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}"),
    ("\\boxed{0.25}", "\\frac14"),
    ("\\boxed{e^{0}}", "1"),
    ("\\boxed{1000}", "1000"),
]
NOT_EQUIVALENT = [
    ("\\boxed{2}", "3"),
    ("\\boxed{\\frac{1}{2}}", "0.2"),
    ("\\boxed{-7}", "7"),
    ("no answer here", "5"),
    ("\\boxed{x+1}", "x-1"),
    ("\\boxed{(1,2)}", "(2,1)"),
    ("\\boxed{\\sqrt{2}}", "2"),
    ("\\boxed{1000}", "100"),
    ("\\boxed{[0,1]}", "(0,1)"),
    ("\\boxed{", "3"),
    ("", "0"),
    ("\\boxed{2\\pi}", "\\pi"),
]


@pytest.mark.parametrize("completion, answer", EQUIVALENT)
def test_math_grader_accepts_equivalent_answers(completion, answer):
    assert grade(completion, answer, "math") is True


@pytest.mark.parametrize("completion, answer", NOT_EQUIVALENT)
def test_math_grader_rejects_different_answers(completion, answer):
    assert grade(completion, answer, "math") is False


def test_math_grader_works_in_worker_threads():
    # math-verify's default timeouts use signal.alarm, which raises outside the main thread
    pairs = EQUIVALENT[:6] + NOT_EQUIVALENT[:6]
    expected = [True] * 6 + [False] * 6
    results: dict[int, list[bool]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = [grade(c, a, "math") for c, a in pairs]
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == {i: expected for i in range(3)}


# ---------------------------------------------------------------------------------------------
# sampling loop

@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tokenizer


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny):
    model, tokenizer = tiny
    prompts = ["1+2", "37+48-19+25-61", "5-3+99"]  # different lengths -> left padding
    batched, batched_len, _ = generate(model, tokenizer, prompts, max_new_tokens=12, temperature=0)
    for i, p in enumerate(prompts):
        alone, alone_len, _ = generate(model, tokenizer, [p], max_new_tokens=12, temperature=0)
        assert alone == [batched[i]] and alone_len == [batched_len[i]]


def test_evaluate_greedy_metrics_agree_with_its_own_grading(tiny):
    model, tokenizer = tiny
    problems = [{"prompt": "1+2", "answer": "3"}, {"prompt": "20-5+1", "answer": "16"}]
    res = evaluate(model, tokenizer, problems, 3, max_new_tokens=10, temperature=0, batch_size=4)
    assert res["k"] == 3 and res["n_problems"] == 2
    for row, p in zip(res["problems"], problems):
        assert len(set(row["completions"])) == 1  # greedy: all k samples agree
        assert row["correct"] == [grade(c, p["answer"]) for c in row["completions"]]
        assert all(1 <= n <= 10 for n in row["lengths"])
    assert res["avg@k"] == pytest.approx(avg_at_k([r["correct"] for r in res["problems"]]))
    assert res["pass@k"] == pytest.approx(res["avg@k"])  # identical samples: pass@k = avg@k
    lengths = [n for r in res["problems"] for n in r["lengths"]]
    assert res["mean_length"] == pytest.approx(sum(lengths) / len(lengths))


def test_evaluate_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    problems = [{"prompt": "12+34", "answer": "46"}] * 3
    a = evaluate(model, tokenizer, problems, 2, max_new_tokens=8, seed=7)
    b = evaluate(model, tokenizer, problems, 2, max_new_tokens=8, seed=7)
    assert [r["completions"] for r in a["problems"]] == [r["completions"] for r in b["problems"]]


def test_evaluate_names_the_missing_field(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="'prompt' and 'answer'"):
        evaluate(model, tokenizer, [{"question": "1+1", "answer": "2"}], 1, max_new_tokens=4)


def test_evaluation_renders_prompts_as_training_does(tiny, monkeypatch):
    """System prompt and instruction reach the evaluated model exactly as kat.data renders them."""
    import copy

    import kat.evaluate as ev
    from kat.data import render_prompt

    model, tokenizer = tiny
    seen = []
    original = ev.render_prompts
    monkeypatch.setattr(ev, "render_prompts", lambda *a: seen.extend(original(*a)) or original(*a))
    evaluate(model, tokenizer, [{"prompt": "1+2", "answer": "3"}], 1, max_new_tokens=4, temperature=0,
             instruction="+0")  # the toy vocabulary has no letters
    assert seen == [render_prompt(tokenizer, "1+2", instruction="+0")] and "1+2+0" in seen[0]
    plain = copy.copy(tokenizer)
    plain.chat_template = None  # (the toy template knows no system role)
    assert original(plain, ["1+2"], "Be exact.", " Answer with A=.") == ["Be exact.\n\n1+2 Answer with A=."]


def test_evaluate_returns_one_name_per_metric(tiny):
    model, tokenizer = tiny
    res = evaluate(model, tokenizer, [{"prompt": "1+2", "answer": "3"}], 2, max_new_tokens=4, temperature=0)
    assert not any("@" in key and key not in ("avg@k", "pass@k") for key in res)  # no avg@2 beside avg@k


# ---------------------------------------------------------------------------------------------
# `python -m kat eval`: the data through kat.data, as `kat train --eval_data` reads it

@pytest.fixture
def renamed(tiny_world, tmp_path) -> dict:
    """The tiny world's test problems under other column names, as jsonl, parquet and a saved dataset
    whose split is `test` (what a hub dataset looks like offline)."""
    import datasets

    rows = [json.loads(line) for line in open(tiny_world["test"])][:5]
    table = datasets.Dataset.from_list([{"question": r["prompt"], "final": r["answer"], "id": i}
                                        for i, r in enumerate(rows)])
    table.to_json(str(tmp_path / "renamed.jsonl"))
    table.to_parquet(str(tmp_path / "renamed.parquet"))
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "saved"))
    return {"rows": rows, "dir": tmp_path}


def run_cli(argv: list[str], capsys) -> tuple[int | dict, str, str]:
    from kat.evaluate import main as eval_main

    result = eval_main(argv)  # what `python -m kat eval` runs (its exit status is checked below)
    out = capsys.readouterr()
    return result, out.out, out.err


def test_cli_reads_specs_like_training(tiny_world, renamed, tmp_path, capsys):
    from kat.data import load_eval_sets
    from kat.models import load_model, load_tokenizer

    d = renamed["dir"]
    data = (f"jl={d / 'renamed.jsonl'}[prompt=question, answer=final, limit=3], "
            f"pq={d / 'renamed.parquet'}[prompt=question, answer=final, limit=3, k=3], "
            f"hub={d / 'saved'}[split=test, prompt=question, answer=final, limit=3]")
    common = ["--model", tiny_world["student"], "-k", "2", "--max-new-tokens", "6", "--seed", "5"]
    result, out, _ = run_cli([*common, "--data", data, "--out", str(tmp_path / "r.json")], capsys)
    assert list(result) == ["jl", "pq", "hub"] and json.loads((tmp_path / "r.json").read_text()).keys() == result.keys()
    want = [{"prompt": r["prompt"], "answer": r["answer"]} for r in renamed["rows"][:3]]
    for name, k in (("jl", 2), ("pq", 3), ("hub", 2)):
        assert [{"prompt": p["prompt"], "answer": p["answer"]} for p in result[name]["problems"]] == want
        assert result[name]["k"] == k and f"avg@{k}" in out
    # the same problems through kat.data and `evaluate` directly: the same completions and metrics
    sets = load_eval_sets(data, k=2)
    model, tokenizer = load_model(tiny_world["student"], "", torch.float32, "m"), load_tokenizer(tiny_world["student"])
    for name, eval_set in sets.items():
        direct = evaluate(model, tokenizer, eval_set.problems, eval_set.k, max_new_tokens=6, seed=5)
        assert direct["problems"] == result[name]["problems"]
        assert (direct["avg@k"], direct["pass@k"]) == (result[name]["avg@k"], result[name]["pass@k"])


@pytest.mark.parametrize("data,message", [
    ("/nonexistent/test.jsonl", "data file '/nonexistent/test.jsonl' does not exist"),
    ("{dir}/renamed.jsonl", "'{dir}/renamed.jsonl' has no column 'prompt'; its columns are ['question', 'final'"),
    ("{dir}/renamed.jsonl[promt=question]", "unknown option 'promt'; did you mean 'prompt'?"),
])
def test_cli_data_errors_are_one_line_and_status_2(tiny_world, renamed, capsys, data, message):
    from kat.__main__ import main as kat_main

    data, message = data.format(dir=renamed["dir"]), message.format(dir=renamed["dir"])
    status = kat_main(["eval", "--model", tiny_world["student"], "--data", data])
    err = capsys.readouterr().err  # may also hold the datasets library's progress bars
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert status == 2 and len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], err


def test_cli_chat_template_kwargs_reach_the_template(tiny_world, capsys, monkeypatch):
    import kat.evaluate as ev

    seen = []
    original = ev.render_prompts
    monkeypatch.setattr(ev, "render_prompts", lambda *a: seen.append(a[4]) or original(*a))
    argv = ["--model", tiny_world["student"], "--data", f"{tiny_world['test']}[limit=2]", "-k", "1",
            "--max-new-tokens", "4"]
    run_cli([*argv, "--chat-template-kwargs", "{enable_thinking: false, depth: 2}"], capsys)
    assert seen and all(kw == {"enable_thinking": False, "depth": 2} for kw in seen)
    status, _, err = run_cli([*argv, "--chat-template-kwargs", "[1, 2]"], capsys)
    assert status == 2 and err.startswith("error: chat_template_kwargs: expected a mapping") and err.count("\n") == 1


def test_graders_are_named_in_one_registry_and_exact_is_the_toy_worlds():
    from kat.evaluate import GRADER_FUNCTIONS, GRADERS, extract_answer, grade
    from kat.toy import world

    assert set(GRADER_FUNCTIONS) == set(GRADERS)
    for text, answer in (("x=3; A=12", "12"), ("A=12 A=-4", "-4"), ("A=7", "8"), ("no answer", "1"), ("A=5", "5.0")):
        assert grade(text, answer, "exact") == world.grade(text, answer)
        assert extract_answer(text, "exact") == world.extract_answer(text)
    assert grade("A=12", " 12 ") and not grade("A=5", "5.0") and extract_answer("none") is None
    with pytest.raises(ValueError, match="unknown grader"):
        grade("A=1", "1", "fuzzy")


# ---------------------------------------------------------------------------------------------
# `python -m kat eval --config FILE`: the evaluation of `kat train --config FILE`

def toy_config(tmp_path, **fields) -> str:
    """A training config on the toy world whose evaluation settings all differ from kat eval's defaults."""
    import yaml

    from kat.config import TOY_DIR

    test = f"{TOY_DIR}/data/test.jsonl"
    values = {"eval_data": f"t={test}, u={test}[k=3, limit=2]", "eval_k": 2, "eval_limit": 3,
              "eval_temperature": 0.7, "eval_top_p": 0.9, "max_new_tokens": 64, "eval_max_new_tokens": 0,
              "grader": "exact", "seed": 11, "dtype": "float32", **fields}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_cli_with_a_training_config_evaluates_as_training_does(tmp_path, capsys):
    """`kat eval --config F --model M` gives the numbers of kat.train's evaluation (run_eval) with F on M."""
    from accelerate import Accelerator

    from kat.config import load_config
    from kat.evaluate import run_eval
    from kat.train import load_data, load_models

    path = toy_config(tmp_path)
    cfg = load_config(["--config", path])
    accelerator = Accelerator(cpu=True)
    _, eval_sets = load_data(cfg)  # the sets training evaluates on, and its student, as it prepares them
    tokenizer, student, _, _ = load_models(cfg, accelerator.device)
    trained = run_eval(accelerator, accelerator.prepare(student), tokenizer, eval_sets, cfg, "after")
    capsys.readouterr()

    result, out, err = run_cli(["--config", path, "--model", cfg.student, "--device", "cpu", "--threads", "1"],
                               capsys)
    assert isinstance(result, dict), err
    assert list(result) == ["t", "u"] == list(eval_sets)
    for name, k, n in (("t", 2, 3), ("u", 3, 2)):  # the config's eval_k / eval_limit unless the spec sets its own
        res = result[name]
        assert (res["k"], res["n_problems"]) == (k, n) and f"avg@{k}" in out
        assert (res["temperature"], res["top_p"], res["max_new_tokens"], res["seed"]) == (0.7, 0.9, 64, 11)
        for metric in ("avg@k", "pass@k", "mean_length"):
            assert res[metric] == trained[f"{name}/{metric}"], (name, metric, res[metric], trained)
    # the sampled completions are not all right or all wrong, so equal numbers say something
    assert any(0 < result[name]["avg@k"] < 1 for name in result), {n: r["avg@k"] for n, r in result.items()}


def test_cli_flags_win_over_the_config(tmp_path, capsys, monkeypatch):
    """A flag given on the command line, even 0 or an empty string, replaces the config's value; the
    settings not given still come from the config."""
    import kat.evaluate as ev
    from kat.config import TOY_DIR

    seen = []
    original = ev.render_prompts
    monkeypatch.setattr(ev, "render_prompts", lambda *a: seen.extend(original(*a)) or original(*a))
    path = toy_config(tmp_path, instruction="+0", eval_max_new_tokens=6)
    model = f"{TOY_DIR}/student"
    result, _, err = run_cli(["--config", path, "--model", model, "--threads", "1"], capsys)
    assert isinstance(result, dict), err
    assert result["t"]["max_new_tokens"] == 6 and seen and all("+0" in s for s in seen)  # the config's

    seen.clear()
    data = f"{TOY_DIR}/data/test.jsonl[limit=1]"
    argv = ["--config", path, "--model", model, "--threads", "1", "--data", data, "-k", "1",
            "--temperature", "0", "--max-new-tokens", "4", "--seed", "0", "--instruction", ""]
    result, _, err = run_cli(argv, capsys)
    assert isinstance(result, dict) and list(result) == ["test"], err  # --data replaces the config's sets
    res = result["test"]
    assert (res["k"], res["n_problems"], res["temperature"], res["max_new_tokens"], res["seed"]) == (1, 1, 0.0, 4, 0)
    assert res["top_p"] == 0.9 and seen and not any("+0" in s for s in seen)  # not given: the config's top_p


@pytest.mark.parametrize("args,message", [
    (["--config", "/nonexistent/train.yaml"],
     "error: config file '/nonexistent/train.yaml' does not exist; pass an existing YAML file to --config"),
    ([], "error: --data: no evaluation data given; pass --data SPEC, or --config FILE"),
    (["--config", "{bad}"], "error: --config '{bad}': eval_k: 0 is out of range; it must be >= 1"),
    (["--config", "{empty}"], "error: --config '{empty}': its eval_data is empty (no evaluation sets); set "
                              "eval_data there, or pass --data SPEC"),
])
def test_cli_config_errors_are_one_line_and_status_2(tiny_world, tmp_path, capsys, monkeypatch, args, message):
    import kat.models
    from kat.__main__ import main as kat_main

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(kat.models, "load_model", refuse)
    files = {"bad": toy_config(tmp_path, eval_k=0)}
    (tmp_path / "empty.yaml").write_text("eval_data: ''\n")
    files["empty"] = str(tmp_path / "empty.yaml")
    args, message = [a.format(**files) for a in args], message.format(**files)
    status = kat_main(["eval", "--model", tiny_world["student"], *args])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith(message), err


def test_cli_without_data_or_config_exits_2_from_the_shell(tiny_world):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kat", "eval", "--model", tiny_world["student"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: --data: no evaluation data given; pass --data SPEC, or --config FILE "
                                        "to evaluate on the eval_data of a training config"], proc.stderr
