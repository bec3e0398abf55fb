"""Config: defaults < YAML < command line, and errors that name the field and what is allowed."""

import os

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
])
def test_errors_name_the_field(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        load_config(argv)


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
