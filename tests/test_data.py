"""Data: dataset specs, field mapping on files shaped like the real datasets, normalisation, the
length filter and its warning, several evaluation sets each with its own k."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from kat.data import (DataError, DataSpec, answer_text, encode_prompts, filter_long_prompts, load_eval_sets,
                      load_problems, parse_data_spec, parse_data_specs, prompt_lengths, render_prompt,
                      unwrap_prompt, word_problems)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parents[1]
DAPO = str(FIXTURES / "dapo_math_17k.jsonl")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    from fixtures.tiny_qwen import byte_tokenizer

    return byte_tokenizer()


# ---------------------------------------------------------------------------------------------
# Specs

def test_spec_options_override_defaults():
    spec = parse_data_spec("aime24 = HuggingFaceH4/aime_2024[split=train, k=32, prompt=problem]",
                           split="test", prompt_field="question", answer_field="answer", k=8, limit=5)
    assert spec == DataSpec(name="aime24", source="HuggingFaceH4/aime_2024", split="train", subset="",
                            prompt_field="problem", answer_field="answer", k=32, limit=5, unwrap="")


def test_spec_list_names_and_defaults():
    text = """
      amc=AI-MO/aimo-validation-amc[split=train],
      HuggingFaceH4/MATH-500,
      minerva=math-ai/minervamath[prompt=question, answer=answer]
      data/runs=1/local.jsonl
    """
    specs = parse_data_specs(text, split="test", prompt_field="problem", k=8)
    assert [(s.name, s.source, s.split, s.prompt_field, s.k) for s in specs] == [
        ("amc", "AI-MO/aimo-validation-amc", "train", "problem", 8),
        ("MATH-500", "HuggingFaceH4/MATH-500", "test", "problem", 8),
        ("minerva", "math-ai/minervamath", "test", "question", 8),
        ("local", "data/runs=1/local.jsonl", "test", "problem", 8),  # '=' inside a path is no label
    ]


@pytest.mark.parametrize("text,message", [
    ("x.jsonl[kk=3]", "unknown option 'kk'; did you mean 'k'"),
    ("x.jsonl[k=0]", "k must be >= 1"),
    ("x.jsonl[k=many]", "k must be an integer"),
    ("x.jsonl[split]", "must look like key=value"),
    ("x.jsonl[split=a", "never closed"),
    ("x.jsonl]", "without its"),
    ("a/x.jsonl, b/x.jsonl", r"two evaluation sets are called \['x'\]"),
    ("x.jsonl[unwrap=gsm8k]", "not a known answer format"),
    ("name=[k=2]", "names no source"),
])
def test_spec_errors(text, message):
    with pytest.raises(DataError, match=message):
        parse_data_specs(text)


# ---------------------------------------------------------------------------------------------
# Reading datasets shaped like the real ones

def test_dapo_chat_prompt_nested_answer_unwrap_and_dedupe():
    with pytest.warns(UserWarning, match="dropped 3 duplicate rows .* 5 problems remain"):
        problems = load_problems(f"{DAPO}[answer=reward_model.ground_truth, unwrap=dapo]")
    raw = rows(FIXTURES / "dapo_math_17k.jsonl")
    assert len(problems) == 5
    assert [p["answer"] for p in problems] == [r["reward_model"]["ground_truth"] for r in raw[:5]]
    assert problems[0]["prompt"] == "What is the remainder when $7^{10}$ is divided by $5$?"
    assert not any("Answer:" in p["prompt"] for p in problems)


def test_dapo_without_unwrap_keeps_the_user_turn():
    with pytest.warns(UserWarning, match="duplicate"):
        problems = load_problems(DAPO, answer_field="reward_model.ground_truth")
    assert problems[1]["prompt"] == rows(FIXTURES / "dapo_math_17k.jsonl")[1]["prompt"][0]["content"]


def test_missing_columns_name_what_exists():
    with pytest.raises(DataError, match=r"has no column 'question'; its columns are \[.*'problem'.*\]"):
        load_problems(str(FIXTURES / "math500.jsonl"), prompt_field="question")
    with pytest.raises(DataError, match=r"reward_model has no key 'answer' \(it holds \['ground_truth', 'style'\]\)"):
        load_problems(DAPO, answer_field="reward_model.answer")
    with pytest.raises(DataError, match="does not exist"):
        load_problems(str(FIXTURES / "nope.jsonl"))


def test_load_problems_reads_jsonl_and_limit(tmp_path):
    """The one loader (`kat eval --data` uses it too): rows in order, a limit, a clear missing-file error."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}+1", "answer": str(i + 1)}) for i in range(5)) + "\n")
    first_two = [{"prompt": "0+1", "answer": "1"}, {"prompt": "1+1", "answer": "2"}]
    assert load_problems(str(path), limit=2) == load_problems(f"{path}[limit=2]") == first_two
    with pytest.raises(DataError, match="missing.jsonl' does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))


def test_parquet_and_saved_dataset_give_the_same_problems(tmp_path):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(FIXTURES / "minervamath.jsonl"), split="train")
    ds.to_parquet(str(tmp_path / "minerva.parquet"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    from_json = load_problems(str(FIXTURES / "minervamath.jsonl"), prompt_field="question")
    from_parquet = load_problems(str(tmp_path / "minerva.parquet"), prompt_field="question")
    from_disk = load_problems(str(tmp_path / "saved"), split="test", prompt_field="question")
    assert from_json == from_parquet == from_disk
    assert from_json[2] == {"prompt": "How many seconds are in $2.5$ minutes?", "answer": "150"}


def test_rows_without_answer_are_skipped_and_counted(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": None},
                                                      {"prompt": None, "answer": 2}, {"prompt": "c", "answer": 3}]))
    with pytest.warns(UserWarning, match="skipped 2 rows without a prompt or an answer"):
        problems = load_problems(str(path))
    assert problems == [{"prompt": "a", "answer": "1"}, {"prompt": "c", "answer": "3"}]


@pytest.mark.parametrize("value,text", [
    (142.0, "142"), (0.25, "0.25"), (-3.0, "-3"), (7, "7"), (" 12 ", "12"), (["3"], "3"), ([1, 2], "1, 2"),
    ("\\frac{2}{3}", "\\frac{2}{3}"), (None, None), (float("nan"), None), ("", None), ([], None),
])
def test_answer_text(value, text):
    assert answer_text(value) == text


def test_unwrap_reports_whether_the_wrapper_was_there():
    assert unwrap_prompt("Solve it: 1+1", "dapo") == ("Solve it: 1+1", False)
    text = rows(FIXTURES / "dapo_math_17k.jsonl")[4]["prompt"][0]["content"]
    assert unwrap_prompt(text, "dapo") == ("A square has area $49$. What is its perimeter?", True)


# ---------------------------------------------------------------------------------------------
# Several evaluation sets, each with its own columns, split and k

def test_eval_sets_with_their_own_k_and_fields():
    text = (f"amc={FIXTURES / 'amc.jsonl'}, math500={FIXTURES / 'math500.jsonl'}, "
            f"minerva={FIXTURES / 'minervamath.jsonl'}[prompt=question], aime24={FIXTURES / 'aime24.jsonl'}[k=32]")
    sets = load_eval_sets(text, prompt_field="problem", answer_field="answer", k=8, limit=2)
    assert list(sets) == ["amc", "math500", "minerva", "aime24"]
    assert [s.k for s in sets.values()] == [8, 8, 8, 32]
    assert [len(s.problems) for s in sets.values()] == [2, 2, 2, 2]
    assert [p["answer"] for p in sets["amc"].problems] == ["55", "6"]  # float64 column -> integer strings
    assert sets["math500"].problems[1]["answer"] == "\\frac{2}{3}"
    assert sets["minerva"].problems[0]["prompt"].startswith("A car travels")
    assert sets["aime24"].problems[1] == {"prompt": "Find the remainder when $2^{10}$ is divided by $1000$.",
                                          "answer": "24"}


# ---------------------------------------------------------------------------------------------
# Rendering, length filter, padding

def byte_tokenizer_with_flag():
    """A template with a switch, like Qwen3's `enable_thinking`."""
    from fixtures.tiny_qwen import CHATML, byte_tokenizer

    tok = byte_tokenizer()
    tok.chat_template = CHATML.replace("assistant\n{% endif %}",
                                       "assistant\n{% if enable_thinking is not defined or enable_thinking %}"
                                       "<think>{% endif %}{% endif %}")
    return tok


def test_render_prompt_chat_template_and_plain(tokenizer):
    text = render_prompt(tokenizer, "What is 2+2?", system_prompt="Be brief.", instruction=" Use \\boxed{}.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2? Use \\boxed{}."
                    "<|im_end|>\n<|im_start|>assistant\n")

    thinking = byte_tokenizer_with_flag()
    assert render_prompt(thinking, "Q").endswith("<|im_start|>assistant\n<think>")
    assert render_prompt(thinking, "Q", template_kw={"enable_thinking": False}).endswith("<|im_start|>assistant\n")

    class NoTemplate:
        chat_template = None

    assert render_prompt(NoTemplate(), "Q", instruction="!") == "Q!"
    assert render_prompt(NoTemplate(), "Q", system_prompt="S") == "S\n\nQ"


def test_length_filter_counts_what_it_skips(tokenizer):
    with pytest.warns(UserWarning, match="duplicate"):
        problems = load_problems(f"{DAPO}[answer=reward_model.ground_truth, unwrap=dapo]")
    render_kw = {"system_prompt": "", "instruction": "\nPut the final answer in \\boxed{}."}
    lengths = prompt_lengths(tokenizer, problems, render_kw=render_kw)
    # the byte tokenizer: one token per byte of the rendered text (the specials are one token each)
    def byte_count(text: str) -> int:
        return len(text.encode()) - sum(text.count(s) * (len(s) - 1) for s in ("<|im_start|>", "<|im_end|>"))

    expected = [byte_count(render_prompt(tokenizer, p["prompt"], **render_kw)) for p in problems]
    assert lengths == expected
    limit = sorted(lengths)[2]  # keeps the 3 shortest (lengths are distinct here)
    with pytest.warns(UserWarning, match=f"train_data: skipped 2 of 5 prompts longer than max_prompt_length={limit} "
                                         f"tokens \\(longest: {max(lengths)}\\)"):
        kept = filter_long_prompts(tokenizer, problems, limit, render_kw=render_kw, name="train_data")
    assert kept == [p for p, n in zip(problems, lengths) if n <= limit]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing over the limit: no warning
        assert filter_long_prompts(tokenizer, problems, max(lengths), render_kw=render_kw) == problems
    with pytest.raises(DataError, match=f"every prompt is longer .* \\(shortest: {min(lengths)} tokens\\)"):
        filter_long_prompts(tokenizer, problems, min(lengths) - 1, render_kw=render_kw)


def test_encode_prompts_left_pads(tokenizer):
    ids, mask = encode_prompts(tokenizer, ["ab", "abcd"])
    pad = tokenizer.pad_token_id
    a, b, c, d = tokenizer("abcd", add_special_tokens=False)["input_ids"]
    assert torch.equal(ids, torch.tensor([[pad, pad, a, b], [a, b, c, d]]))
    assert torch.equal(mask, torch.tensor([[False, False, True, True], [True] * 4]))


# ---------------------------------------------------------------------------------------------
# The word problems of the CPU example

def test_word_problems_are_correct_and_reproducible():
    problems = word_problems(300, seed=3)
    assert problems == word_problems(300, seed=3) and problems != word_problems(300, seed=4)
    for p in problems:
        numbers = [int(w) for w in p["prompt"].replace("?", " ").replace(".", " ").replace(",", " ").split()
                   if w.isdigit()]
        q, ans = p["prompt"], int(p["answer"])
        if "more. How many" in q and "gives away" not in q:
            assert ans == numbers[0] + numbers[1]
        elif "to a friend" in q:
            assert ans == numbers[0] - numbers[1] >= 0
        elif "in each box" in q:
            assert ans == numbers[0] * numbers[1]
        elif "share equally" in q:
            assert ans * numbers[1] == numbers[0]
        else:
            assert ans == numbers[0] - numbers[1] + numbers[2] > 0


def test_shipped_word_problem_files_match_the_generator():
    train = word_problems(200, seed=1)
    seen = {p["prompt"] for p in train}
    test = [p for p in word_problems(64, seed=2) if p["prompt"] not in seen][:48]
    assert rows(ROOT / "configs" / "data" / "word_problems_train.jsonl") == train
    assert rows(ROOT / "configs" / "data" / "word_problems_test.jsonl") == test


@pytest.mark.parametrize("name", ["qwen3_1.7b.yaml", "qwen3_4b.yaml"])
def test_paper_configs_name_the_benchmarks_with_their_columns_and_k(name):
    from kat.config import load_config

    cfg = load_config(["--config", str(ROOT / "configs" / name)])
    specs = parse_data_specs(cfg.eval_data, split=cfg.eval_split, prompt_field=cfg.prompt_field,
                             answer_field=cfg.answer_field, k=cfg.eval_k, limit=cfg.eval_limit)
    assert [(s.name, s.source, s.split, s.prompt_field, s.answer_field, s.k) for s in specs] == [
        ("amc", "AI-MO/aimo-validation-amc", "train", "problem", "answer", 8),
        ("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", 8),
        ("minerva", "math-ai/minervamath", "test", "question", "answer", 8),
        ("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", 32),
    ]
    train = parse_data_spec(cfg.train_data, split=cfg.train_split, prompt_field=cfg.prompt_field,
                            answer_field=cfg.answer_field)
    assert (train.source, train.split, train.prompt_field, train.answer_field, train.unwrap) == (
        "BytedTsinghua-SIA/DAPO-Math-17k", "train", "prompt", "reward_model.ground_truth", "dapo")
    # the fixture has the hub dataset's columns: the same spec reads it
    with pytest.warns(UserWarning, match="duplicate"):
        problems = load_problems(DAPO + cfg.train_data[cfg.train_data.index("["):], split=cfg.train_split,
                                 prompt_field=cfg.prompt_field, answer_field=cfg.answer_field)
    assert problems[3] == {"prompt": "If $x + 2y = 7$ and $2x - y = 4$, what is $x$?", "answer": "3"}
