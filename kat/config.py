"""One `Config` dataclass for every run: defaults < YAML file < `--key value` overrides.

    cfg = load_config(["--config", "configs/toy.yaml", "--steps", "20", "--eta", "0.1"])

Every field is validated (type, range, allowed values) and so are the rules between fields; a user
error raises `ConfigError`, whose message names the field, the value given and what is allowed.
Unknown keys are rejected with the closest valid name suggested. The ranges live in the fields'
metadata, and `check_value` / `check_stride` / `check_min_buffer` / `check_random_target` apply
them: the detector, the sampler and the optimiser call the same functions for the same settings,
so a value that passes here is never rejected later by a class (and the reverse).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad setting, in a config file, on the command line, or given to a class that takes the same
    setting (see `check_value`); `kat train` shows it as one line without a traceback."""


def _f(default: Any, help: str, choices: tuple | None = None, low: float | None = None,
       high: float | None = None, low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field with its `--help` text and validation rule (`check_value` reads the rule).
    A float field is finite unless a closed bound is infinite (``high=math.inf``: inf is allowed);
    NaN is never allowed. A dict default (a mapping-valued field) becomes a factory, so no two
    configs share one dict."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


# Accelerate's trackers (accelerate.utils.LoggerType); "all" is every one that is installed.
TRACKERS = ("all", "aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb")


TOY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "rich")


@dataclass
class Config:
    # --- models and data -------------------------------------------------------------------------
    teacher: str = _f(os.path.join(TOY_DIR, "teacher"), "teacher model: local path or hub name")
    student: str = _f(os.path.join(TOY_DIR, "student"), "student model: local path or hub name")
    teacher_gguf: str = _f("", "GGUF file name inside `teacher` (transformers de-quantises it); empty: none")
    student_gguf: str = _f("", "GGUF file name inside `student`; empty: none")
    train_data: str = _f(os.path.join(TOY_DIR, "data", "train.jsonl"),
                         "training prompts: json/jsonl/parquet file, directory or hub dataset, optionally "
                         "source[prompt=..., answer=a.b, split=..., subset=..., unwrap=dapo] (see kat.data)")
    train_split: str = _f("train", "split of a hub training dataset")
    eval_data: str = _f(os.path.join(TOY_DIR, "data", "test.jsonl"),
                        "evaluation sets, comma-separated [name=]source[split=..., prompt=..., answer=..., "
                        "k=..., limit=...] (see kat.data); empty: no evaluation")
    eval_split: str = _f("test", "split of hub evaluation datasets")
    prompt_field: str = _f("prompt", "dataset column holding the question")
    answer_field: str = _f("answer", "dataset column holding the reference answer")
    system_prompt: str = _f("", "optional system message placed before every question")
    instruction: str = _f("", "text appended to every question (e.g. ask for the answer in \\boxed{})")
    chat_template_kwargs: dict = _f({}, "extra variables for the chat template, e.g. {enable_thinking: false} "
                                     "for Qwen3 (on the command line as YAML: '{enable_thinking: false}')")
    max_prompt_length: int = _f(512, "prompts longer than this (in tokens) are skipped with a warning", low=1)
    grader: str = _f("exact", "answer checker for evaluation", choices=("exact", "math"))

    # --- rollouts --------------------------------------------------------------------------------
    steps: int = _f(30, "optimiser steps", low=1)
    batch_size: int = _f(16, "prompts per step on each process", low=1)
    samples_per_prompt: int = _f(4, "rollouts sampled per prompt", low=1)
    max_new_tokens: int = _f(96, "completion length limit", low=1)
    temperature: float = _f(1.0, "student sampling temperature (0: greedy)", low=0.0)
    top_p: float = _f(1.0, "nucleus sampling mass", low=0.0, high=1.0, low_open=True)
    chunk: int = _f(8, "tokens per lockstep chunk C: the teacher scores C new tokens per cached forward", low=1)
    rollout_slots: int = _f(0, "S > 0: a step's rollouts stream through S slots per process of fixed-shape KV "
                            "caches, and the slot of a row that ended (EOS, length, cut) takes the next waiting "
                            "prompt at a chunk boundary (kat.engine); 0: every row at once. Same tokens either way",
                            low=0)
    decode: str = _f("dynamic", "decoding caches: dynamic (DynamicCache, rows leave it as they end; with "
                     "rollout_slots > 0 the slot caches) or static (the slot caches, S = rollout_slots or every "
                     "row, the decode step compiled with CUDA graphs on a GPU)", choices=("dynamic", "static"))

    # --- loss and optimiser ----------------------------------------------------------------------
    loss: str = _f("full", "OPD loss: exact reverse KL, the paper's top-k + tail, or sampled-token PG",
                   choices=("full", "topk", "sampled"))
    topk: int = _f(64, "K for the topk loss", low=1)
    micro_batch_size: int = _f(16, "rows per forward/backward; gradients accumulate over the step", low=1)
    lr: float = _f(1e-3, "peak learning rate", low=0.0, low_open=True)
    warmup_ratio: float = _f(0.03, "share of steps with linear learning-rate warm-up", low=0.0, high=1.0,
                             high_open=True)
    weight_decay: float = _f(0.0, "AdamW weight decay", low=0.0)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (inf: no clipping)", low=0.0, low_open=True,
                              high=math.inf)
    gradient_checkpointing: bool = _f(False, "recompute the student's activations in the backward pass "
                                      "(less memory, more compute; same gradients)")
    lora_r: int = _f(0, "rank of a LoRA student through peft (0: train every weight)", low=0)
    lora_alpha: int = _f(16, "LoRA scaling numerator: the update is (lora_alpha / lora_r) B A", low=1)
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input", low=0.0, high=1.0, high_open=True)
    lora_target_modules: str = _f("all-linear", "modules that get LoRA adapters: comma-separated names, or "
                                  "all-linear (every linear layer but the output head)")
    max_bad_steps: int = _f(3, "stop after this many consecutive steps with a non-finite loss", low=1)
    teacher_cache_mb: float = _f(1024.0, "loss full with a terminator that reads the KL: keep the lockstep "
                                 "teacher's logits of the generated tokens while they fit in this many MiB per "
                                 "process, so the learner does not run the teacher again (0: off, inf: no limit)",
                                 low=0.0, high=math.inf)

    # --- termination -----------------------------------------------------------------------------
    termination: str = _f("kat", "kat: trap detector; random: length-matched random cuts; none: plain OPD; "
                          "drift: cut right after the first drift token (see drift_prob); oracle (toy world "
                          "only): cut one past the world's ground-truth first error or loop start",
                          choices=("kat", "none", "random", "drift", "oracle"))
    rule: str = _f("quantile", "adaptive threshold: quantile of per-rollout minima, or running mean - kappa*std",
                   choices=("quantile", "zscore"))
    window: int = _f(8, "W: tokens per window mean z", low=1)
    stride: int = _f(4, "evaluate a window every `stride` tokens (stride = window: non-overlapping)", low=1)
    patience: int = _f(2, "consecutive low windows that confirm a trap", low=1)
    exempt: int = _f(8, "E: no window starting before this position counts", low=0)
    eta: float = _f(0.3, "threshold = (1 - eta) quantile of the minima buffer", low=0.0, high=1.0,
                    low_open=True, high_open=True)
    buffer_size: int = _f(1024, "FIFO size of per-rollout minimum window means", low=1)
    min_buffer: int = _f(128, "detector stays off until the buffer holds this many minima (<= buffer_size)",
                         low=0)
    warmup_steps: int = _f(5, "detector stays off for this many training steps", low=0)
    kappa: float = _f(1.0, "zscore rule: threshold = mean - kappa * std", low=0.0)
    ema: float = _f(0.1, "zscore rule: weight of each batch in the running mean/variance", low=0.0,
                    high=1.0, low_open=True)
    shadow: bool = _f(False, "detect and record would-be cuts without cutting")
    random_target_length: float = _f(0.0, "random termination: target mean rollout length (0: max_new_tokens/2)",
                                     low=0.0)
    random_target_cut_rate: float = _f(0.0, "random termination: also match this share of cut rollouts "
                                       "(0: off, the cut rate follows from the hazard)", low=0.0, high=1.0,
                                       high_open=True)
    gate: str = _f("none", "kat: none (the paper's rule) or drift (a low run counts only after a drift token)",
                   choices=("none", "drift"))
    drift_prob: float = _f(0.02, "a sampled token at or after exempt to which the teacher gives a probability "
                           "below this is a drift token (gate drift, termination drift)", low=0.0, high=1.0,
                           low_open=True, high_open=True)
    norm_from: str = _f("", "normalisation control: divide each step's loss by the kept-token count that this "
                        "metrics.jsonl (a matched run) logged at that step, not by this run's own; empty: own")

    # --- evaluation, logging, checkpoints --------------------------------------------------------
    eval_every: int = _f(0, "evaluate every N steps (0: only before and after training)", low=0)
    eval_k: int = _f(4, "samples per evaluation problem (avg@k, pass@k)", low=1)
    eval_limit: int = _f(64, "evaluate on the first N problems of each set (0: all)", low=0)
    eval_temperature: float = _f(1.0, "evaluation sampling temperature", low=0.0)
    eval_top_p: float = _f(1.0, "evaluation nucleus mass", low=0.0, high=1.0, low_open=True)
    eval_max_new_tokens: int = _f(0, "completion length limit when evaluating (0: max_new_tokens)", low=0)
    save_every: int = _f(0, "write a resumable checkpoint every N steps (0: only at the end)", low=0)
    keep_last: int = _f(2, "resumable checkpoints kept on disk", low=1)
    output_dir: str = _f("runs/toy", "where metrics, traces, plots, checkpoints and the student go")
    resume: str = _f("", "checkpoint directory to continue from, or `latest` in output_dir")
    overwrite_output_dir: bool = _f(False, "a new run into an output_dir that holds a run: remove the files and "
                                    "folders a run writes there (other files stay); without it the run is refused")
    log_with: str = _f("", "extra tracker through Accelerate (its package must be installed); empty: none",
                       choices=("", *TRACKERS))
    project_name: str = _f("kat", "the trackers' project (wandb project; tensorboard: output_dir/project_name)")
    n_traces: int = _f(8, "KL traces written per evaluation (tokens, d, z, threshold, cut)", low=0)
    plot: bool = _f(True, "render kl_traces.png and curves.png at the end")
    seed: int = _f(0, "random seed (numpy's seeding takes 0 .. 2**32 - 1)", low=0, high=2**32 - 1)
    dtype: str = _f("auto", "teacher compute dtype and student mixed precision (auto: bf16 on CUDA, fp32 on CPU)",
                    choices=("auto", "float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the field."""
    f = _FIELDS[name]
    kind = dict if f.default_factory is not MISSING else type(f.default)
    if kind is dict:
        return _mapping(name, value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return str(value)


def _mapping(name: str, value: Any) -> dict:
    """A mapping field's value: a dict (YAML), or its YAML/JSON text (the command line)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value.strip() else {}
        except yaml.YAMLError:
            value = None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{name}: expected a mapping of names to values such as "
                          f"'{{enable_thinking: false}}', got {value!r}")
    return dict(value)


def allowed(name: str) -> tuple:
    """The choices of field `name` (e.g. the loss kinds), for modules that dispatch on it."""
    return _FIELDS[name].metadata["choices"]


def _range_text(m: dict) -> str:
    """A field's allowed range in interval notation, e.g. '(0.0, 1.0)' or '>= 1'."""
    low, high = m["low"], m["high"]
    if high is None:
        return f"{'>' if m['low_open'] else '>='} {low}"
    return f"{'(' if m['low_open'] else '['}{low}, {high}{')' if m['high_open'] else ']'}"


def check_value(name: str, value: Any) -> Any:
    """`value` converted to field `name`'s type and checked against its choices and range.

    The one place a single setting is validated: `Config` calls it for every field, and the
    classes that take the same settings (`TrapDetector`, `RandomTerminator`, `sample`,
    `build_optimizer`, `learn`) call it for theirs, so a value passes everywhere or nowhere.
    Raises ConfigError naming the field and what is allowed.
    """
    value = _coerce(name, value)
    m = _FIELDS[name].metadata
    if m["choices"] is not None and value not in m["choices"]:
        allowed = ", ".join(repr(c) for c in m["choices"])
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {allowed}")
    if isinstance(value, float):
        _check_finite(name, value, m)
    low, high = m["low"], m["high"]
    if low is not None and (value < low or (m["low_open"] and value == low)):
        raise ConfigError(f"{name}: {value!r} is out of range; it must be {'>' if m['low_open'] else '>='} {low}")
    if high is not None and (value > high or (m["high_open"] and value == high)):
        raise ConfigError(f"{name}: {value!r} is out of range; it must be {'<' if m['high_open'] else '<='} {high}")
    return value


def _check_finite(name: str, value: float, m: dict) -> None:
    """NaN is never a setting (it passes every comparison); +-inf only where a closed bound is infinite.
    Without this, `value < low` is False for NaN and the value would slip through the range checks."""
    if math.isfinite(value) or (math.isinf(value) and value in (m["low"], m["high"]) and
                                not (m["low_open"] if value == m["low"] else m["high_open"])):
        return
    what = "is not a number" if math.isnan(value) else "is out of range"
    if m["low"] is None:
        allowed = "a finite number"
    elif m["high"] is None:
        allowed = f"a finite number {_range_text(m)}"
    else:
        allowed = f"a number in {_range_text(m)}"
    raise ConfigError(f"{name}: {value!r} {what}; it must be {allowed}")


# Rules between fields, each a function so that the classes holding both settings apply the same rule.

def check_stride(stride: int, window: int) -> None:
    if stride > window:
        raise ConfigError(f"stride: {stride} is larger than window ({window}); positions between "
                          "windows would never be looked at. Use stride <= window")


def check_min_buffer(min_buffer: int, buffer_size: int) -> None:
    if min_buffer > buffer_size:
        raise ConfigError(f"min_buffer: {min_buffer} is larger than buffer_size ({buffer_size}), so the detector "
                          "would never become active; use min_buffer <= buffer_size")


def check_random_target(target_length: float, exempt: int, max_new_tokens: int | None) -> None:
    """A length-matched random cut needs exempt < target_length < max_new_tokens (and a finite target)."""
    target_length = check_value("random_target_length", target_length)
    if not target_length > exempt:
        raise ConfigError(f"random_target_length: {target_length} does not exceed exempt ({exempt}), and no "
                          "row is cut before position exempt; use a target above exempt (0 means "
                          "max_new_tokens / 2) or a smaller exempt")
    if max_new_tokens is not None and not target_length < max_new_tokens:
        raise ConfigError(f"random_target_length: {target_length} is not below max_new_tokens ({max_new_tokens}), "
                          "so no cut is needed; lower it, or use termination 'none'")


def validate(cfg: Config) -> None:
    """Check every field's type, range and allowed values, and the relations between fields."""
    for name in _FIELDS:
        setattr(cfg, name, check_value(name, getattr(cfg, name)))
    check_stride(cfg.stride, cfg.window)
    check_min_buffer(cfg.min_buffer, cfg.buffer_size)
    if cfg.termination == "random":
        check_random_target(random_target(cfg), cfg.exempt, cfg.max_new_tokens)
    if cfg.norm_from and not os.path.isfile(cfg.norm_from):
        raise ConfigError(f"norm_from: {cfg.norm_from!r} is not a file; give the metrics.jsonl of a finished "
                          "run to normalise by, or leave it empty")
    if cfg.resume and cfg.resume != "latest" and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume: {cfg.resume!r} is not a directory; give a checkpoint directory "
                          "or `latest`")


def random_target(cfg: Config) -> float:
    """The random terminator's target mean length: the field, or max_new_tokens / 2 when it is 0."""
    return cfg.random_target_length or cfg.max_new_tokens / 2


def suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(_FIELDS), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else "; run with --help for the list of fields"


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in _FIELDS:
            raise ConfigError(f"unknown field {key!r} in {where}{suggest(str(key))}")


def read_yaml(path: str) -> dict:
    """The mapping in YAML file `path`; a missing, unreadable, binary or malformed file, or one that
    holds anything but field: value pairs, raises ConfigError naming the file."""
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; pass a YAML file to --config")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass an existing YAML file to --config")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (a binary file?); pass a YAML file "
                          "to --config") from None
    except OSError as err:
        raise ConfigError(f"config file {path!r} cannot be read ({err.strerror or err}); check its "
                          "permissions") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of field: value, got {type(data).__name__}")
    _check_keys(data, path)
    return data


def help_text() -> str:
    lines = ["usage: [--config FILE] [--FIELD VALUE ...]", "", "fields (default):"]
    for name, f in _FIELDS.items():
        m = f.metadata
        allowed = f" {{{','.join(map(str, m['choices']))}}}" if m["choices"] else ""
        allowed += f" {_range_text(m)}" if m["low"] is not None else ""
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        lines.append(f"  --{name}{allowed} ({default!r})\n      {m['help']}")
    return "\n".join(lines)


def parse_overrides(argv: list[str]) -> tuple[str | None, dict]:
    """Split `--config FILE --key value --key=value ...` into (config path, overrides)."""
    path, out, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --field value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                if key in _FIELDS and isinstance(_FIELDS[key].default, bool):
                    value = "true"  # a bare boolean flag
                else:
                    raise ConfigError(f"--{key} needs a value")
            else:
                i += 1
                value = argv[i]
        if key == "config":
            path = value
        else:
            _check_keys([key], "the command line")
            out[key] = value
        i += 1
    return path, out


def render_kw(cfg: Config) -> dict:
    """How prompts are rendered (kat.data.render_prompt), the same for the length filter, sampling and
    evaluation."""
    return {"system_prompt": cfg.system_prompt, "instruction": cfg.instruction,
            "template_kw": cfg.chat_template_kwargs}


def load_config(argv: list[str] | None = None, **overrides: Any) -> Config:
    """Defaults, then the YAML file given by --config, then --key value pairs, then **overrides."""
    path, cli = parse_overrides(list(argv or []))
    values = read_yaml(path) if path is not None else {}
    values.update(cli)
    _check_keys(overrides, "keyword arguments")
    values.update(overrides)
    return Config(**{k: _coerce(k, v) for k, v in values.items()})

