"""Config: defaults < YAML < command line, and errors that name the field and what is allowed."""

import os
import subprocess
import sys
from dataclasses import fields

import pytest

from kat.config import Config, ConfigError, load_config, parse_overrides

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


def out_of_range(f) -> list:
    """Values just outside field f's choices and range (an open bound itself is outside)."""
    m, step = f.metadata, 1 if isinstance(f.default, int) and not isinstance(f.default, bool) else 0.5
    bad = ["no-such-choice"] if m["choices"] else []
    if m["low"] is not None:
        bad.append(m["low"] if m["low_open"] else m["low"] - step)
    if m["high"] is not None:
        bad.append(m["high"] if m["high_open"] else m["high"] + step)
    return bad


def edges(f) -> list:
    """Values just inside field f's range (a closed bound itself is inside)."""
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


def test_every_number_and_choice_has_a_rule():
    """Fields without a range or choices are free text, paths, flags and the seed; a new numeric
    field must declare its range (and is then covered by the test above)."""
    free = {f.name for f in fields(Config)} - {f.name for f in RANGED}
    assert free == {"teacher", "student", "teacher_gguf", "student_gguf", "train_data", "train_split", "eval_data",
                    "eval_split", "prompt_field", "answer_field", "system_prompt", "instruction", "output_dir",
                    "resume", "shadow", "plot", "seed", "gradient_checkpointing", "lora_target_modules",
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

    from kat.terminators import RandomTerminator, TrapDetector
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
                                         "top_p", "chunk", "topk", "teacher_cache_mb", "micro_batch_size"]))
def test_classes_reject_exactly_what_config_rejects(name):
    f = next(f for f in RANGED if f.name == name)
    bad = out_of_range(f)
    if name == "topk":
        bad = [v for v in bad if v != 0] + [-1]  # the sampler's topk=0 means "no top-k capture"
    for others, build in _takers()[name]:
        for value in bad:
            with pytest.raises(ConfigError) as from_config:
                load_config([f"--{name}", str(value)], **others)
            with pytest.raises(ConfigError) as from_class:
                build(**{name: value}, **others)
            assert str(from_class.value) == str(from_config.value)
        for value in edges(f) if name != "micro_batch_size" else []:  # learn would go on to its rollout
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
