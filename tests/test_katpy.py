"""kat.py as a user runs it: every config file it is offered, the paper's data and stop tokens,
evaluation, memory switches, the KL-trace picture, and two processes that finish at different times.

The tutorial's maths against the package's lives in test_parity.py; here kat.py's own set-up (data
specs, stop ids, evaluation) is checked against the package where both have it, and end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from fixtures.tiny_qwen import save_pair

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOY = ROOT / "kat" / "toy" / "rich"
# The configs the README offers to kat.py; every training config in configs/ must be one of them.
CONFIGS = ["toy.yaml", "toy_persistent.yaml", "toy_lowlr.yaml", "qwen3_1.7b.yaml", "qwen3_4b.yaml", "smollm2_cpu.yaml",
           "smollm2_shadow.yaml"]
# Configs that need what only kat/ has (field -> the choice kat.py lacks): kat.py refuses them in one line
PACKAGE_CONFIGS = {"toy_harm.yaml": ("loss", "sampled")}
# Local stand-ins in the hub datasets' schemas (DAPO's answer in reward_model.ground_truth, ...)
HUB = {"BytedTsinghua-SIA/DAPO-Math-17k": "dapo_math_17k.jsonl", "AI-MO/aimo-validation-amc": "amc.jsonl",
       "HuggingFaceH4/MATH-500": "math500.jsonl", "math-ai/minervamath": "minervamath.jsonl",
       "HuggingFaceH4/aime_2024": "aime24.jsonl"}
RUN_SIZE = dict(steps=1, batch_size=2, samples_per_prompt=2, max_new_tokens=8, micro_batch_size=2, eval_limit=2,
                warmup_steps=0, min_buffer=1)
BYTES_PER_TOKEN = 4  # the stand-ins' byte tokenizer spends about 4x the tokens of a real BPE one on a prompt


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    """Tiny Qwen3-architecture teacher and student; the student's tokenizer lacks a pad token, as a
    base checkpoint's often does, and the chat template ends a turn with <|im_end|>, not EOS."""
    return save_pair(tmp_path_factory.mktemp("katpy_pair"), student_pad=False)


@pytest.fixture
def fresh_accelerator():
    """Each kat.py run builds its own Accelerator, possibly with another mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def local(text: str) -> str:
    """A config's dataset string with every hub dataset replaced by its local stand-in."""
    for name, file in HUB.items():
        text = text.replace(name, str(FIXTURES / file))
    return text


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# (a) every config kat.py is offered runs one step, with only the models, data and run size changed

def test_every_training_config_is_covered():
    offered = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert offered == sorted(CONFIGS + list(PACKAGE_CONFIGS)), \
        "a new config file must be run by test_config_runs_one_step or listed in PACKAGE_CONFIGS"


@pytest.mark.parametrize("name", sorted(PACKAGE_CONFIGS))
def test_package_only_configs_are_refused_in_one_line(single_file, name):
    from kat.config import load_config

    field, choice = PACKAGE_CONFIGS[name]
    path = str(ROOT / "configs" / name)
    assert getattr(load_config(["--config", path]), field) == choice  # the package takes it
    with pytest.raises(SystemExit, match=f"error: {field}: '{choice}' is not one of .*python -m kat train"):
        single_file.parse_config(["--config", path])


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_one_step(single_file, pair, tmp_path, name, capsys, monkeypatch, one_thread,
                              fresh_accelerator):
    monkeypatch.chdir(ROOT)  # configs name local files relative to the repository
    path = ROOT / "configs" / name
    raw = yaml.safe_load(path.read_text()) or {}
    over = {"teacher": pair["teacher"], "student": pair["student"], "teacher_gguf": "", "student_gguf": "",
            **RUN_SIZE, "output_dir": str(tmp_path / "run")}
    for key in ("train_data", "eval_data"):
        if key in raw:
            over[key] = local(raw[key])
    if "max_prompt_length" in raw:
        over["max_prompt_length"] = raw["max_prompt_length"] * BYTES_PER_TOKEN
    argv = ["--config", str(path)] + [f"--{k}={v}" for k, v in over.items()]
    cfg = single_file.parse_config(argv)
    unused = sorted(set(raw) & set(single_file.PACKAGE_ONLY))
    err = capsys.readouterr().err
    if unused:
        assert f"kat.py does not use: {', '.join(unused)}; `python -m kat train` does" in err
    else:
        assert "does not use" not in err
    for key, value in raw.items():  # every other value of the file reaches the run unchanged
        if key not in unused and key not in over:
            got = getattr(cfg, key)
            assert (yaml.safe_load(got) if key == "chat_template_kwargs" else got) == value, key
    rows = single_file.main(cfg)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 1 and 0 < steps[0]["mean_length"] <= 8 and steps[0]["kl"] > 0
    names = [s["name"] for s in single_file.parse_specs(cfg.eval_data, cfg, cfg.eval_split)]
    for when in ("before", "after"):
        row = next(r for r in rows if r.get("eval") == when)
        assert sorted(k for k in row if "@" in k or "length" in k) == sorted(
            f"{n}/{m}" for n in names for m in ("avg@k", "pass@k", "mean_length"))
        assert all(0 <= row[f"{n}/avg@k"] <= row[f"{n}/pass@k"] <= 1 for n in names)
    assert metrics(tmp_path / "run") == rows
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert saved.config.num_hidden_layers == 2 and (tmp_path / "run" / "kl_traces.png").stat().st_size > 1000


def test_configs_read_as_the_package_reads_them(single_file, monkeypatch):
    """Every field both have gets the same value from each config file in kat.py and in kat.config."""
    from kat.config import load_config

    monkeypatch.chdir(ROOT)
    for name in CONFIGS:
        ours, pkg = (parse(["--config", str(ROOT / "configs" / name)]) for parse in (single_file.parse_config,
                                                                                     load_config))
        shared = [f for f in ours.__dataclass_fields__ if hasattr(pkg, f)]
        assert len(shared) == len(ours.__dataclass_fields__)

        def value(cfg, f):  # kat.py holds the template variables as YAML text
            v = getattr(cfg, f)
            return yaml.safe_load(v or "{}") if f == "chat_template_kwargs" and isinstance(v, str) else v
        differ = [f for f in shared if f != "output_dir" and value(ours, f) != value(pkg, f)]
        assert differ == [], name


# ------------------------------------------------------------------------------------------------
# Data: the same problems as kat.data from the same spec strings

@pytest.mark.parametrize("config", ["qwen3_1.7b.yaml", "smollm2_cpu.yaml"])
def test_problems_equal_the_package(single_file, config, recwarn, monkeypatch):
    from kat.data import load_eval_sets, load_problems

    monkeypatch.chdir(ROOT)
    cfg = single_file.parse_config(["--config", str(ROOT / "configs" / config), "--eval_limit", "0"])
    train, evals = local(cfg.train_data), local(cfg.eval_data)
    ours = [p for s in single_file.parse_specs(train, cfg, cfg.train_split) for p in single_file.load_problems(s)]
    assert ours == load_problems(train, split=cfg.train_split, prompt_field=cfg.prompt_field,
                                 answer_field=cfg.answer_field)
    specs = single_file.parse_specs(evals, cfg, cfg.eval_split, cfg.eval_k, cfg.eval_limit)
    pkg = load_eval_sets(evals, split=cfg.eval_split, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                         k=cfg.eval_k, limit=cfg.eval_limit)
    assert [(s["name"], s["k"]) for s in specs] == [(name, e.k) for name, e in pkg.items()]
    for s in specs:
        assert single_file.load_problems(s) == pkg[s["name"]].problems, s["name"]
    if config.startswith("qwen"):  # the hub layouts: nested answer, chat prompt, floats, own k
        assert ours[0] == {"prompt": "What is the remainder when $7^{10}$ is divided by $5$?", "answer": "4"}
        assert len(ours) == 5 and [s["k"] for s in specs] == [8, 8, 8, 32]
        assert [p["answer"] for p in single_file.load_problems(specs[0])] == ["55", "6", "0.25"]


def test_spec_grammar_equals_the_package(single_file):
    from kat.data import parse_data_specs

    cfg = single_file.Config(prompt_field="problem")
    text = """
      amc=AI-MO/aimo-validation-amc[split=train],
      HuggingFaceH4/MATH-500,
      minerva=math-ai/minervamath[prompt=question, answer=answer, limit=3]
      data/runs=1/local.jsonl, x.parquet[subset=s, unwrap=dapo, k=32]
    """
    ours = single_file.parse_specs(text, cfg, "test", 8)
    pkg = parse_data_specs(text, split="test", prompt_field="problem", k=8)
    assert [(s["name"], s["source"], s["split"], s["subset"], s["prompt"], s["answer"], s["k"], s["limit"],
             s["unwrap"]) for s in ours] == [(p.name, p.source, p.split, p.subset, p.prompt_field, p.answer_field,
                                              p.k, p.limit, p.unwrap) for p in pkg]


@pytest.mark.parametrize("text,message", [
    ("x.jsonl[kk=3]", r"kk='3' is not one of split="), ("x.jsonl[k=0]", r"k='0' is not one of"),
    ("x.jsonl[unwrap=gsm8k]", "unwrap='gsm8k'"), ("name=[k=2]", "write it as"),
])
def test_spec_errors_name_the_entry(single_file, text, message):
    with pytest.raises(SystemExit, match=message):
        single_file.parse_specs(text, single_file.Config(), "test")


def test_data_and_model_errors_are_one_line(single_file):
    cfg = single_file.Config()
    spec = single_file.parse_specs(f"{FIXTURES / 'math500.jsonl'}[prompt=question]", cfg, "test")[0]
    with pytest.raises(SystemExit, match=r"has columns \[.*'problem'.*\]; name the question and answer columns"):
        single_file.load_problems(spec)
    spec = single_file.parse_specs(str(FIXTURES / "nope.jsonl"), cfg, "test")[0]
    with pytest.raises(SystemExit, match="nope.jsonl.* cannot be loaded"):
        single_file.load_problems(spec)
    with pytest.raises(SystemExit, match="cannot load a model from '/no/such/model' \\(teacher / student\\)"):
        single_file.load_model("/no/such/model", "", torch.float32)


# ------------------------------------------------------------------------------------------------
# (b) stop tokens: EOS and the chat template's end of turn, as kat.models.eos_ids

def test_stop_ids_equal_the_package_and_end_a_rollout(single_file, pair):
    from kat.models import eos_ids

    for path in (pair["student"], pair["teacher"], str(TOY / "student")):
        tok, model = single_file.load_model(path, "", torch.float32)
        assert single_file.stop_ids(tok, model) == eos_ids(tok, model), path
    tok, student = single_file.load_model(pair["student"], "", torch.float32)
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert single_file.stop_ids(tok, student) == sorted({im_end, eot}) and tok.pad_token == "<|endoftext|>"

    # a student biased towards <|im_end|>: every rollout ends on it, recorded as EOS
    head = student.lm_head
    student.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        student.lm_head.weight.copy_(head.weight)
        student.lm_head.bias.zero_()
        student.lm_head.bias[im_end] = 12.0
    cfg = single_file.Config(max_new_tokens=16, chunk=4, loss="full")
    enc = tok([single_file.render(tok, q, cfg) for q in ("1+1", "What is 2+3?")], return_tensors="pt",
              padding=True, add_special_tokens=False)
    r, _ = single_file.sample(student.eval(), student, enc["input_ids"], enc["attention_mask"].bool(),
                              single_file.NoTerminator(), cfg, torch.tensor(single_file.stop_ids(tok, student)),
                              tok.pad_token_id, torch.Generator().manual_seed(0))
    lengths = r["completion_mask"].sum(-1)
    assert (r["stop"] == single_file.STOP_EOS).all() and (lengths < 16).all()
    assert all(int(r["completion_ids"][b, n - 1]) == im_end for b, n in enumerate(lengths.tolist()))


# ------------------------------------------------------------------------------------------------
# Evaluation: the same numbers as kat.evaluate on the same model, seed and settings

def test_evaluation_equals_the_package(single_file, one_thread, fresh_accelerator):
    from accelerate import Accelerator

    from kat.evaluate import evaluate

    tok, model = single_file.load_model(str(TOY / "student"), "", torch.float32)
    cfg = single_file.Config(eval_temperature=0.9, eval_top_p=0.95, eval_max_new_tokens=40, seed=3)
    problems = [json.loads(line) for line in (TOY / "data" / "test.jsonl").read_text().splitlines()[:40]]
    eos = single_file.stop_ids(tok, model)
    ours = single_file.evaluate(model, tok, {"toy": (4, problems)}, cfg, Accelerator(), eos)
    pkg = evaluate(model, tok, problems, 4, max_new_tokens=40, temperature=0.9, top_p=0.95, seed=3)
    assert ours == {"toy/avg@k": pkg["avg@k"], "toy/pass@k": pkg["pass@k"], "toy/mean_length": pkg["mean_length"]}
    assert 0 < ours["toy/avg@k"] < ours["toy/pass@k"] < 1  # a real student: some right, some wrong


def test_math_grader_equals_the_package(single_file):
    from kat.evaluate import grade

    cases = [("so \\boxed{15}", "15"), ("The answer is $\\frac{2}{3}$", "\\frac{2}{3}"), ("\\boxed{55}", "55.0"),
             ("\\boxed{0.5}", "\\frac{1}{2}"), ("no answer here", "4"), ("\\boxed{7}", "8"), ("A=12", "12")]
    for text, answer in cases:
        for grader in ("math", "exact"):
            assert single_file.grade(text, answer, grader) == grade(text, answer, grader), (text, answer, grader)
    assert [single_file.grade(t, a, "math") for t, a in cases] == [True, True, True, True, False, False, True]


# ------------------------------------------------------------------------------------------------
# Memory switch, prompt length filter, and the picture

def tiny_run(single_file, pair, out: Path, **over):
    cfg = single_file.Config(teacher=pair["teacher"], student=pair["student"], output_dir=str(out),
                             train_data=f"{FIXTURES / 'dapo_math_17k.jsonl'}[answer=reward_model.ground_truth, "
                                        "unwrap=dapo]", eval_data="", max_prompt_length=100, steps=3, batch_size=2,
                             instruction="\nPut the final answer in \\boxed{}.", samples_per_prompt=2,
                             max_new_tokens=12, chunk=4, window=4, stride=2, patience=1,
                             exempt=0, eta=0.8, min_buffer=2, warmup_steps=1, lr=1e-2, seed=1, **over)
    return single_file.main(cfg)


def test_gradient_checkpointing_gives_the_same_run(single_file, pair, tmp_path, monkeypatch, capsys, one_thread,
                                                   fresh_accelerator):
    from safetensors.torch import load_file

    seen, learn = [], single_file.learn

    def spy(student, *args):
        model = getattr(student, "module", student)
        seen.append(model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing")
                    else model.is_gradient_checkpointing)
        return learn(student, *args)

    monkeypatch.setattr(single_file, "learn", spy)
    plain = tiny_run(single_file, pair, tmp_path / "plain")
    assert "warning: train_data: skipped 2 of 5 prompts longer than max_prompt_length=100" in capsys.readouterr().out
    checkpointed = tiny_run(single_file, pair, tmp_path / "ckpt", gradient_checkpointing=True)
    assert seen == [False] * 3 + [True] * 3
    assert plain == checkpointed and sum(r["cut_rate"] for r in plain) > 0
    a, b = (load_file(tmp_path / run / "student" / "model.safetensors") for run in ("plain", "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trace_picture_draws_what_the_batch_was_judged_by(single_file, pair, tmp_path, monkeypatch, one_thread,
                                                          fresh_accelerator):
    drawn, plot = [], single_file.plot_traces

    def spy(r, threshold, cfg, path):
        drawn.append((threshold, plot(r, threshold, cfg, path), r))

    monkeypatch.setattr(single_file, "plot_traces", spy)
    rows = tiny_run(single_file, pair, tmp_path / "run")
    (threshold, fig, r), = drawn
    assert threshold is not None and threshold == rows[-1]["threshold"]  # the last step's, not the next one's
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    d = r["kl"][0, :int(r["completion_mask"][0].sum())].float()
    z = [float(d[s:s + 4].mean()) for s in range(len(d) - 3)]  # z of the window that STARTS at s
    zx, zy = lines["z: mean of the 4 d from t"].get_data()
    assert list(zx) == list(range(len(z))) and zy.tolist() == pytest.approx([max(v, 1e-4) for v in z], rel=1e-6)
    assert list(lines["threshold s this batch was judged by"].get_ydata()) == [threshold, threshold]
    assert ax.get_yscale() == "log" and "nats" in ax.get_ylabel() and fig.legends and not ax.get_legend()


# ------------------------------------------------------------------------------------------------
# (c) two processes whose rollouts end at different lengths: same forwards, one threshold, a saved student

TWO_PROC = r"""
import faulthandler, importlib.util, json, os, sys
import transformers
faulthandler.dump_traceback_later(120, exit=True)  # a hung process prints where it hangs, before the test's timeout
spec = importlib.util.spec_from_file_location("kat_single_file", {katpy!r})
kp = importlib.util.module_from_spec(spec); sys.modules[spec.name] = kp; spec.loader.exec_module(kp)
calls, lengths = {{}}, []
forward = transformers.LlamaForCausalLM.forward
def counted(self, *a, **k):
    role = os.path.basename(self.name_or_path)
    calls[role] = calls.get(role, 0) + 1
    return forward(self, *a, **k)
transformers.LlamaForCausalLM.forward = counted
sample = kp.sample
def recorded(*a, **k):
    r, state = sample(*a, **k)
    lengths.append(r["completion_mask"].sum(-1).tolist())
    return r, state
kp.sample = recorded
import accelerate, gc, torch
live_ddp, end_training = [], accelerate.Accelerator.end_training
def ending(self):  # DDP wrappers still alive when the process group is torn down
    gc.collect()
    live_ddp.append(sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()))
    return end_training(self)
accelerate.Accelerator.end_training = ending
rows = kp.main(kp.parse_config(sys.argv[1:]))
with open(os.path.join(kp.parse_config(sys.argv[1:]).output_dir, f"rank{{os.environ.get('RANK', 0)}}.json"), "w") as fh:
    json.dump({{"calls": calls, "lengths": lengths, "live_ddp": live_ddp}}, fh)
"""


def test_two_processes_ending_at_different_lengths(single_file, tmp_path, one_thread, fresh_accelerator):
    # one short and one long toy problem: the two processes' rollouts end many tokens apart
    (tmp_path / "train.jsonl").write_text('{"prompt": "5+6", "answer": "11"}\n'
                                          '{"prompt": "82-18-25+67-13+44", "answer": "137"}\n')
    script = tmp_path / "run.py"
    script.write_text(TWO_PROC.format(katpy=str(ROOT / "kat.py")))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def args(batch: int, out: str) -> list[str]:  # 129 eval problems: one process gets 65, the other 64
        return ["--train_data", str(tmp_path / "train.jsonl"), "--steps", "2", "--batch_size", str(batch),
                "--samples_per_prompt", "2", "--max_new_tokens", "40", "--eval_limit", "129", "--eval_k", "1",
                "--eval_max_new_tokens", "48", "--min_buffer", "2", "--warmup_steps", "1", "--output_dir", out]

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), *args(1, str(tmp_path / "p2"))], env=env, capture_output=True, text=True,
                          timeout=300)
    failed = [line for line in proc.stderr.splitlines() if "[rank1]" in line or "Error" in line]
    assert proc.returncode == 0, "\n".join(failed[-40:]) + "\n" + proc.stderr[-6000:]
    runs = {2: ([json.loads((tmp_path / "p2" / f"rank{r}.json").read_text()) for r in range(2)],
                metrics(tmp_path / "p2")),
            1: ([None], single_file.main(single_file.parse_config(args(2, str(tmp_path / "p1")))))}
    (rank0, rank1), rows2 = runs[2]
    # the processes' rollouts end at different lengths, yet both ran the same forwards
    assert any(max(a) != max(b) for a, b in zip(rank0["lengths"], rank1["lengths"]))
    assert rank0["calls"] == rank1["calls"] and set(rank0["calls"]) == {"student", "teacher"}
    # the DDP student is gone before the process group: a reducer holding a gloo group's last reference
    # destroys it while holding the GIL its worker thread needs, and the process hangs at exit
    assert rank0["live_ddp"] == rank1["live_ddp"] == [0]
    # 2 processes x 1 prompt = 1 process x 2 prompts: the same tokens, cuts and update
    (_,), rows1 = runs[1]
    steps1, steps2 = ([r for r in rows if "loss" in r] for rows in (rows1, rows2))
    assert [r["step"] for r in steps1] == [r["step"] for r in steps2] == [1, 2]
    for a, b in zip(steps1, steps2):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
    assert steps2[1]["threshold"] is not None  # built from both processes' minima
    from transformers import AutoModelForCausalLM

    one, two = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "student") for d in ("p1", "p2"))
    start = AutoModelForCausalLM.from_pretrained(TOY / "student")
    # AdamW moves each weight by up to lr (1e-3) a step whatever its gradient's size, so weights whose
    # gradients are nearly 0 carry the rounding of the 2-process sum: 5% of a step is the tolerance
    for (name, p1), p2 in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(p1, p2, atol=5e-5, rtol=0, msg=name)
    assert any(not torch.equal(p0, p2) for p0, p2 in zip(start.parameters(), two.parameters()))
    # evaluation ran on both processes' shares of the 129 problems (one process had a stand-in call)
    assert [r.get("eval") for r in rows2] == ["before", None, None, "after"]
    assert all(0 < r["test/avg@k"] == r["test/pass@k"] < 1 for r in (rows2[0], rows2[-1]))  # k = 1


def test_chat_template_kwargs_reach_the_template_as_in_the_package(single_file, tmp_path):
    """`chat_template_kwargs: {enable_thinking: false}` (the Qwen3 configs) changes kat.py's prompts exactly
    as it changes the package's, from a config file and from the command line."""
    from fixtures.tiny_qwen import CHATML, byte_tokenizer

    from kat.config import load_config
    from kat.data import render_prompt
    from kat.train import render_kw

    tok = byte_tokenizer()
    tok.chat_template = CHATML.replace("assistant\n{% endif %}", "assistant\n{% if enable_thinking is not defined "
                                       "or enable_thinking %}<think>{% endif %}{% endif %}")
    config = tmp_path / "c.yaml"
    config.write_text("chat_template_kwargs: {enable_thinking: false}\ninstruction: ' Think.'\n")
    for argv in ([], ["--config", str(config)], ["--chat_template_kwargs", "{enable_thinking: false}"]):
        ours = single_file.render(tok, "1+1", single_file.parse_config(argv))
        assert ours == render_prompt(tok, "1+1", **render_kw(load_config(argv)))
        assert ours.endswith("<think>") == (argv == [])


def test_a_finished_run_is_never_replaced_silently(single_file, pair, tmp_path, one_thread, fresh_accelerator,
                                                    capsys):
    out = tmp_path / "run"
    first = tiny_run(single_file, pair, out)
    written = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="holds a run; use another --output_dir or --overwrite_output_dir true"):
        tiny_run(single_file, pair, out)
    assert (out / "metrics.jsonl").read_bytes() == written
    assert single_file.parse_config(["--overwrite_output_dir", "true"]).overwrite_output_dir is True
    assert tiny_run(single_file, pair, out, overwrite_output_dir=True) == first  # the same run again
