"""Config: defaults < YAML < command line, and errors that name the field and what is allowed."""

import math
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from kat.config import Config, ConfigError, help_text, load_config, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layering_yaml_then_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\neta: 0.2\nloss: topk\n")
    cfg = load_config(["--config", str(path), "--eta", "0.1", "--shadow"])
    assert (cfg.steps, cfg.eta, cfg.loss, cfg.shadow) == (7, 0.1, "topk", True)
    assert cfg.window == Config().window  # untouched fields keep their defaults


def test_equals_form_and_dashes():
    path, over = parse_overrides(["--max-new-tokens=12", "--config", "x.yaml"])
    assert path == "x.yaml" and over == {"max_new_tokens": "12"}


@pytest.mark.parametrize("argv,message", [
    (["--stepz", "3"], "did you mean 'steps'"),
    (["--loss", "kl"], "loss: 'kl' is not allowed; choose one of 'full', 'topk', 'sampled'"),
    (["--eta", "0"], "eta: 0.0 is out of range; it must be > 0.0"),
    (["--eta", "1.5"], "eta: 1.5 is out of range; it must be < 1.0"),  # the detector's (0, 1)
    (["--steps", "1.5"], "steps: expected an integer"),
    (["--shadow", "maybe"], "shadow: expected true or false"),
    (["--window", "4", "--stride", "8"], "stride: 8 is larger than window"),
    (["--termination", "sometimes"], "termination: 'sometimes' is not allowed"),
    (["--steps"], "--steps needs a value"),
    (["steps", "3"], "unexpected argument 'steps'"),
    (["--chat_template_kwargs", "enable_thinking"], "chat_template_kwargs: expected a mapping"),
])
def test_errors_name_the_field(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        load_config(argv)


def test_mapping_field_from_yaml_and_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("chat_template_kwargs:\n  enable_thinking: false\n")
    assert load_config(["--config", str(path)]).chat_template_kwargs == {"enable_thinking": False}
    cli = load_config(["--config", str(path), "--chat_template_kwargs", '{"enable_thinking": true, "x": 1}'])
    assert cli.chat_template_kwargs == {"enable_thinking": True, "x": 1}  # JSON is YAML too
    assert Config().chat_template_kwargs == {} and Config().chat_template_kwargs is not Config().chat_template_kwargs


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("windw: 8\n")
    with pytest.raises(ConfigError, match="unknown field 'windw' in .*did you mean 'window'"):
        load_config(["--config", str(bad)])
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(["--config", str(notmap)])


def test_shipped_configs_are_valid():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".yaml"):
            load_config(["--config", os.path.join(ROOT, "configs", name)])


# ---------------------------------------------------------------------------------------------
# One set of bounds: every ranged or choice field, through `kat train`, and the classes that take
# the same settings

RANGED = [f for f in fields(Config) if f.metadata["choices"] or f.metadata["low"] is not None]
_FIELDS_BY_NAME = {f.name: f for f in fields(Config)}


def out_of_range(f) -> list:
    """Values just outside field f's choices and range (an open bound itself is outside; nothing
    lies beyond an infinite bound)."""
    m, step = f.metadata, 1 if isinstance(f.default, int) and not isinstance(f.default, bool) else 0.5
    bad = ["no-such-choice"] if m["choices"] else []
    if m["low"] is not None:
        bad.append(m["low"] if m["low_open"] else m["low"] - step)
    if m["high"] is not None and not math.isinf(m["high"]):
        bad.append(m["high"] if m["high_open"] else m["high"] + step)
    return bad


def edges(f) -> list:
    """Values just inside field f's range (a closed bound itself is inside, an infinite one too)."""
    m, tiny = f.metadata, 1e-6
    good = []
    if m["low"] is not None:
        good.append(m["low"] + tiny if m["low_open"] else m["low"])
    if m["high"] is not None:
        good.append(m["high"] - tiny if m["high_open"] else m["high"])
    return good


def one_error_line(argv, capsys, monkeypatch) -> str:
    """`kat train argv` must stop with status 2 and one `error:` line before any training."""
    import kat.train as kat_train

    monkeypatch.setattr(kat_train, "train", lambda cfg: pytest.fail(f"{argv} passed validation"))
    assert kat_train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("name,value", [(f.name, v) for f in RANGED for v in out_of_range(f)])
def test_every_bad_value_ends_with_one_line_naming_the_field(name, value, capsys, monkeypatch):
    line = one_error_line([f"--{name}", str(value)], capsys, monkeypatch)
    assert line.startswith(f"error: {name}: ") and "; " in line, line  # the field, then the fix


# NaN passes every comparison (nan < low is False), so a range check alone lets it through; inf
# passes every one-sided range. Every float field, present and future, is tried with both.

FLOATS = [f for f in fields(Config) if type(f.default) is float]


def infinity_allowed(f, value: float) -> bool:
    """Whether field f's range itself includes the infinite `value` (a closed infinite bound)."""
    m = f.metadata
    return (value == m["high"] and not m["high_open"]) or (value == m["low"] and not m["low_open"])


@pytest.mark.parametrize("name,value", [(f.name, v) for f in FLOATS for v in ("nan", "inf", "-inf")])
def test_every_float_field_rejects_nan_and_infinity(name, value, capsys, monkeypatch):
    from kat.config import _range_text

    f = _FIELDS_BY_NAME[name]
    if value != "nan" and infinity_allowed(f, float(value)):
        assert getattr(load_config([f"--{name}", value]), name) == float(value)
        return
    line = one_error_line([f"--{name}", value], capsys, monkeypatch)
    what = "is not a number" if value == "nan" else "is out of range"
    assert line.startswith(f"error: {name}: {value} {what}; it must be ") and line.endswith(_range_text(f.metadata))


def test_infinity_is_allowed_only_where_it_means_no_limit():
    """max_grad_norm inf: no clipping; teacher_cache_mb inf: keep every logit. Nowhere else."""
    assert len(FLOATS) >= 15
    assert {f.name for f in FLOATS if infinity_allowed(f, math.inf) or infinity_allowed(f, -math.inf)} == {
        "max_grad_norm", "teacher_cache_mb"}
    assert "(0.0, inf]" in help_text()


def test_nan_and_inf_from_yaml(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("top_p: .nan\n")  # the reported case: trained, and config.yaml said top_p: .nan
    assert one_error_line(["--config", str(path)], capsys, monkeypatch) == (
        "error: top_p: nan is not a number; it must be a number in (0.0, 1.0]")
    path.write_text("lr: .inf\n")
    assert one_error_line(["--config", str(path)], capsys, monkeypatch) == (
        "error: lr: inf is out of range; it must be a finite number > 0.0")
    path.write_text("max_grad_norm: .inf\n")
    assert load_config(["--config", str(path)]).max_grad_norm == math.inf


def test_every_number_and_choice_has_a_rule():
    """Fields without a range or choices are free text, paths and flags; a new numeric
    field must declare its range (and is then covered by the test above)."""
    free = {f.name for f in fields(Config)} - {f.name for f in RANGED}
    assert free == {"teacher", "student", "teacher_gguf", "student_gguf", "train_data", "train_split", "eval_data",
                    "eval_split", "prompt_field", "answer_field", "system_prompt", "instruction", "output_dir",
                    "resume", "overwrite_output_dir", "shadow", "plot", "gradient_checkpointing",
                    "lora_target_modules",
                    "project_name", "chat_template_kwargs", "norm_from"}
    assert all(out_of_range(f) and edges(f) or f.metadata["choices"] for f in RANGED)


@pytest.mark.parametrize("argv,field", [
    (["--window", "4", "--stride", "8"], "stride"),
    (["--buffer_size", "100", "--min_buffer", "101"], "min_buffer"),
    (["--termination", "random", "--exempt", "60"], "random_target_length"),  # target 96 / 2 <= exempt
    (["--termination", "random", "--random_target_length", "96"], "random_target_length"),  # = max_new_tokens
    (["--resume", "/nonexistent/checkpoint"], "resume"),
    (["--norm_from", "/nonexistent/metrics.jsonl"], "norm_from"),
])
def test_cross_field_rules_end_with_one_line(argv, field, capsys, monkeypatch):
    assert one_error_line(argv, capsys, monkeypatch).startswith(f"error: {field}: ")


def test_eta_one_is_one_line_from_the_command_line():
    """The reported case: `kat train --eta 1` used to pass Config and die in TrapDetector."""
    proc = subprocess.run([sys.executable, "-m", "kat", "train", "--config", "configs/toy.yaml", "--eta", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    assert proc.stderr == "error: eta: 1.0 is out of range; it must be < 1.0\n"


def _takers() -> dict:
    """field -> [(the other settings it needs, callable taking the field and them)]: the classes and
    functions that take a config setting directly."""
    import torch
    from accelerate import Accelerator

    from kat.terminators import DriftTerminator, RandomTerminator, TrapDetector
    from kat.learner import build_optimizer, learn
    from kat.sampler import _check_args

    model = torch.nn.Linear(2, 2)
    prompt = (torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
    sampler = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "chunk": 1, "topk": 0, "score": True,
               "teacher_cache_mb": 0.0}
    optimizer = {"lr": 1e-3, "steps": 10, "warmup_ratio": 0.0, "weight_decay": 0.0}
    out = {n: [({}, TrapDetector)] for n in ("rule", "patience", "eta", "warmup_steps", "kappa", "ema", "stride",
                                            "min_buffer")}
    out["window"] = [({"stride": 1}, TrapDetector)]
    out["buffer_size"] = [({"min_buffer": 0}, TrapDetector)]
    out["exempt"] = [({}, TrapDetector), ({}, lambda exempt: RandomTerminator(target_length=exempt + 5, exempt=exempt))]
    out["drift_prob"] = [({}, TrapDetector), ({}, DriftTerminator)]
    out["random_target_length"] = [({}, lambda random_target_length: RandomTerminator(random_target_length))]
    for n in optimizer:
        out[n] = [({}, lambda **kw: build_optimizer(model, **{**optimizer, **kw}))]
    for n in ("max_new_tokens", "temperature", "top_p", "chunk", "topk", "teacher_cache_mb"):
        out[n] = [({}, lambda **kw: _check_args(*prompt, **{**sampler, **kw}))]
    out["micro_batch_size"] = [({}, lambda micro_batch_size: learn(model, None, None, None, Accelerator(cpu=True),
                                                                   kind="topk", micro_batch_size=micro_batch_size))]
    return out


@pytest.mark.parametrize("name", sorted(["rule", "patience", "eta", "warmup_steps", "kappa", "ema", "window",
                                         "stride", "buffer_size", "min_buffer", "exempt", "lr", "steps",
                                         "warmup_ratio", "weight_decay", "max_new_tokens", "temperature",
                                         "top_p", "chunk", "topk", "teacher_cache_mb", "micro_batch_size",
                                         "drift_prob", "random_target_length"]))
def test_classes_reject_exactly_what_config_rejects(name):
    f = next(f for f in RANGED if f.name == name)
    bad = out_of_range(f)
    if name == "topk":
        bad = [v for v in bad if v != 0] + [-1]  # the sampler's topk=0 means "no top-k capture"
    if type(f.default) is float:  # and no float setting takes NaN, or inf unless its range holds it
        bad += [v for v in (math.nan, math.inf, -math.inf) if not infinity_allowed(f, v)]
    for others, build in _takers()[name]:
        for value in bad:
            with pytest.raises(ConfigError) as from_config:
                load_config([f"--{name}", str(value)], **others)
            with pytest.raises(ConfigError) as from_class:
                build(**{name: value}, **others)
            assert str(from_class.value) == str(from_config.value)
        # learn would go on to its rollout; a random target of 0 means max_new_tokens / 2 only in the config
        for value in edges(f) if name not in ("micro_batch_size", "random_target_length") else []:
            load_config([f"--{name}", str(value)], **others)
            build(**{name: value}, **others)  # accepted by both


def test_cross_field_rules_are_the_classes_rules():
    from kat.terminators import RandomTerminator, TrapDetector

    pairs = [
        (["--window", "4", "--stride", "8"], lambda: TrapDetector(window=4, stride=8)),
        (["--buffer_size", "10", "--min_buffer", "11"], lambda: TrapDetector(buffer_size=10, min_buffer=11)),
        (["--termination", "random", "--exempt", "60"],
         lambda: RandomTerminator(target_length=48.0, exempt=60, max_new_tokens=96)),
        (["--termination", "random", "--random_target_length", "96"],
         lambda: RandomTerminator(target_length=96.0, exempt=8, max_new_tokens=96)),
    ]
    for argv, build in pairs:
        with pytest.raises(ConfigError) as from_config:
            load_config(argv)
        with pytest.raises(ConfigError) as from_class:
            build()
        assert str(from_class.value) == str(from_config.value)


# ---------------------------------------------------------------------------------------------
# The reported tracebacks, through `python -m kat train` itself: one line, status 2, before any
# model loads. The teacher does not exist, so a value that slipped through would end in a
# `teacher:` line instead (quickly), and the check on the named field would catch it.

def _config_files(root) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "list.yaml").write_text("- steps\n- 3\n")
    (root / "invalid.yaml").write_text("steps: [3\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "keys.yaml").write_text("1: 2\n")
    (root / "folder.yaml").mkdir(exist_ok=True)
    return {name: str(root / name) for name in ("list.yaml", "invalid.yaml", "binary.yaml", "keys.yaml",
                                                "folder.yaml", "missing.yaml")}


CLI_CASES = [  # (argv, the start of the one line; FILE / PATH: the config file's path quoted / as it is)
    (["--seed", "-1"], "error: seed: -1 is out of range; it must be >= 0"),
    (["--seed", str(2**32)], "error: seed: 4294967296 is out of range; it must be <= 4294967295"),
    (["--batch_size", "0"], "error: batch_size: 0 is out of range; it must be >= 1"),
    (["--max_new_tokens", "0"], "error: max_new_tokens: 0 is out of range; it must be >= 1"),
    (["--steps", "0"], "error: steps: 0 is out of range; it must be >= 1"),
    (["--micro_batch_size", "0"], "error: micro_batch_size: 0 is out of range; it must be >= 1"),
    (["--eval_k", "0"], "error: eval_k: 0 is out of range; it must be >= 1"),
    (["--lr", "-0.1"], "error: lr: -0.1 is out of range; it must be > 0.0"),
    (["--lr", "nan"], "error: lr: nan is not a number; it must be a finite number > 0.0"),
    (["--lr", "inf"], "error: lr: inf is out of range; it must be a finite number > 0.0"),
    (["--temperature", "nan"], "error: temperature: nan is not a number; it must be a finite number >= 0.0"),
    (["--warmup_ratio", "nan"], "error: warmup_ratio: nan is not a number; it must be a number in [0.0, 1.0)"),
    (["--max_grad_norm", "nan"], "error: max_grad_norm: nan is not a number; it must be a number in (0.0, inf]"),
    (["--top_p", "nan"], "error: top_p: nan is not a number; it must be a number in (0.0, 1.0]"),
    (["--eta", "nan"], "error: eta: nan is not a number; it must be a number in (0.0, 1.0)"),
    (["--config", "list.yaml"], "error: config file FILE must hold a mapping of field: value, got list"),
    (["--config", "invalid.yaml"], "error: config file FILE is not valid YAML: "),
    (["--config", "binary.yaml"], "error: config file FILE is not "),  # not UTF-8, or not YAML
    (["--config", "keys.yaml"], "error: unknown field 1 in PATH; "),
    (["--config", "folder.yaml"], "error: config file FILE is a directory; pass a YAML file to --config"),
    (["--config", "missing.yaml"], "error: config file FILE does not exist; pass an existing YAML file"),
]


# `python -m kat train ARGS` for every case in one interpreter (runpy runs the module as `-m` does):
# one interpreter start instead of one per case, and each case still goes through the whole command.
CLI_DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["kat", "train", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("kat", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> tuple[list, dict]:
    import json

    root = tmp_path_factory.mktemp("cli")
    files = _config_files(root / "configs")
    cases = [[files.get(a, a) for a in argv] + ["--teacher", str(root / "no-teacher"), "--output_dir",
                                                 str(root / "run")] for argv, _ in CLI_CASES]
    proc = subprocess.run([sys.executable, "-c", CLI_DRIVER, json.dumps(cases)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), files


@pytest.mark.parametrize("i", range(len(CLI_CASES)), ids=[" ".join(c[0]) for c in CLI_CASES])
def test_reported_tracebacks_are_one_line_from_the_command_line(i, cli_runs):
    results, files = cli_runs
    res, (argv, start) = results[i], CLI_CASES[i]
    if argv[0] == "--config":
        start = start.replace("FILE", repr(files[argv[1]])).replace("PATH", files[argv[1]])
    assert res["code"] == 2, res["stderr"][-2000:]
    assert res["stderr"].startswith(start) and res["stderr"].count("\n") == 1, res["stderr"][-2000:]
    assert "Traceback" not in res["stderr"] and res["stdout"] == ""
