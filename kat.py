"""KAT: on-policy distillation with KL Agreement Trap Termination, in one file.

On-policy distillation (OPD). The student pi_s samples its own completion y for a prompt x; a
frozen teacher pi_t scores every position of it; the student minimises the summed per-token
reverse KL

    J(theta) = E_{x, y ~ pi_s} [ sum_t d_t ],   d_t = KL(pi_s(.|x,y<t) || pi_t(.|x,y<t))
                                                    = sum_v p(v) (log p(v) - log q(v)).

The agreement trap. Once the student drifts into an unrecoverable prefix (a wrong step, a loop),
the teacher, conditioned on the same broken prefix, agrees with it: d_t stays low, yet those tokens
teach nothing. One low d_t cannot tell this from healthy agreement; low KL that persists is the
signature.

KAT (arXiv 2606.09471). The teacher scores the growing rollout online, chunk by chunk, and
  1. smooths d with a window mean      z_t = (1/W) sum_{i=t-W+1..t} d_i  (evaluated every `stride`),
  2. calibrates a threshold            s = Q_{1-eta}(B), B = FIFO of per-rollout minima min_t z_t,
  3. waits                             off until |B| >= min_buffer and step >= warmup_steps,
  4. exempts the start                 windows starting before position E never count,
  5. fires after `patience` consecutive windows with z < s, and
  6. cuts at the start of the first low window: generation stops, and the cut segment and all
     after it leave the loss (not an end of sequence: no EOS is appended or trained).

Choices beyond the paper. `--loss full` (exact KL, the default) besides the paper's top-64 + tail
(`--loss topk`); `stride` reads "4 consecutive windows" (stride = W: non-overlapping); the teacher
scores C = `chunk` tokens per cached forward, so a trap stops within C tokens at near prefill
cost. `--gate drift`: a low run counts only after the rollout drifted (a token past E with teacher
probability < `drift_prob`), so flat low KL is never cut. Controls: `--termination random` (cuts
calibrated to a target mean length, which the paper's RandomTerm was not), `none` (plain OPD;
FixedPrefix: smaller `--max_new_tokens`), `--shadow true` (no cut). `kat/` (`python -m kat train`)
adds the zscore rule (s = running mean - kappa * std of z), the gate's controls
(`termination: drift`, `norm_from`), the sampled-token loss, scoring after decoding, LoRA,
checkpoints and trackers; kat.py reads the same configs and names what it skips.

Run (`kat/` is the same maths as a package; tests check that both agree):
    python kat.py --help                                        # every setting, one line each
    accelerate launch kat.py                                    # toy world, CPU
    accelerate launch --multi_gpu --num_processes 4 kat.py --config my_run.yaml
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 kat.py   # two CPU processes
kat.py reads local JSON-lines data ({"prompt": ..., "answer": ...} a line) and models that
transformers loads; `python -m kat export` writes those from hub datasets, GGUF files and whole
configs, e.g. `python -m kat export --config configs/qwen3_1.7b.yaml --out exported/qwen3_1.7b`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kat", "toy", "rich")
# Why a rollout ended: its own end-of-sequence token, the length limit, a trap, a random cut.
STOP_EOS = 0
STOP_LENGTH = 1
STOP_TRAP = 2
STOP_RANDOM = 3

class UserError(SystemExit):
    """A mistake in the settings or files a user gave: one line on stderr, exit status 2."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2

# ==== Config: defaults < --config FILE < --key value =============================================
def arg(default, help: str, bounds: str = "", choices: tuple | None = None):
    """A Config field, its `--help` line, its range ("[0, 1)", ">= 1") and its allowed values."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "choices": choices})

@dataclass
class Config:
    teacher: str = arg(os.path.join(TOY, "teacher"), "teacher model: a folder or hub name")
    student: str = arg(os.path.join(TOY, "student"), "student model: a folder or hub name")
    train_data: str = arg(os.path.join(TOY, "data", "train.jsonl"), "training prompts (.jsonl)")
    eval_data: str = arg(os.path.join(TOY, "data", "test.jsonl"),
                         "evaluation sets: [name=]file.jsonl[k=N], comma-separated")
    system_prompt: str = arg("", "system message before every question")
    instruction: str = arg("", "text appended to every question (e.g. ask for \\boxed{})")
    chat_template_kwargs: str = arg("", "chat template variables, e.g. '{enable_thinking: false}'")
    max_prompt_length: int = arg(512, "skip training prompts longer than this (tokens)", ">= 1")
    steps: int = arg(30, "optimiser steps", ">= 1")
    batch_size: int = arg(16, "prompts per step on each process", ">= 1")
    samples_per_prompt: int = arg(4, "rollouts sampled per prompt", ">= 1")
    max_new_tokens: int = arg(96, "completion length limit", ">= 1")
    temperature: float = arg(1.0, "student sampling temperature (0: greedy)", ">= 0")
    top_p: float = arg(1.0, "nucleus sampling mass", "(0, 1]")
    chunk: int = arg(8, "C: tokens per chunk the teacher scores in one forward", ">= 1")
    loss: str = arg("full", "exact KL (full) or top-K + tail (topk)", choices=("full", "topk"))
    topk: int = arg(64, "K of the topk loss", ">= 1")
    micro_batch_size: int = arg(16, "rows per forward/backward (gradients accumulate)", ">= 1")
    gradient_checkpointing: bool = arg(False, "recompute the student's activations in backward")
    lr: float = arg(1e-3, "peak learning rate (cosine schedule, linear warm-up)", "> 0")
    warmup_ratio: float = arg(0.03, "share of steps with linear warm-up", "[0, 1)")
    weight_decay: float = arg(0.0, "AdamW weight decay", ">= 0")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (inf: no clipping)", "(0, inf]")
    termination: str = arg("kat", "what ends a rollout early: the trap detector, nothing, random",
                           choices=("kat", "none", "random"))
    rule: str = arg("quantile", "threshold rule (zscore is in kat/)", choices=("quantile",))
    window: int = arg(8, "W: tokens per window mean z", ">= 1")
    stride: int = arg(4, "judge a window every `stride` tokens", ">= 1")
    patience: int = arg(2, "consecutive low windows that confirm a trap", ">= 1")
    exempt: int = arg(8, "E: windows starting before this position never count", ">= 0")
    eta: float = arg(0.3, "threshold = (1 - eta) quantile of the minima buffer", "(0, 1)")
    buffer_size: int = arg(1024, "FIFO size of per-rollout minima", ">= 1")
    min_buffer: int = arg(128, "the detector is off until the buffer holds this many", ">= 0")
    warmup_steps: int = arg(5, "the detector is off for this many steps", ">= 0")
    shadow: bool = arg(False, "detect and record would-be cuts without cutting")
    random_target_length: float = arg(0.0, "random: target mean length (0: half the limit)", ">= 0")
    gate: str = arg("none", "drift: a low run counts only after drift", choices=("none", "drift"))
    drift_prob: float = arg(0.02, "a token with teacher probability below this drifts", "(0, 1)")
    eval_every: int = arg(0, "also evaluate every N steps (0: only before and after)", ">= 0")
    eval_k: int = arg(4, "samples per evaluation problem (avg@k, pass@k)", ">= 1")
    eval_limit: int = arg(64, "evaluate the first N problems of each set (0: all)", ">= 0")
    eval_temperature: float = arg(1.0, "evaluation sampling temperature (0: greedy)", ">= 0")
    eval_top_p: float = arg(1.0, "evaluation nucleus mass", "(0, 1]")
    eval_max_new_tokens: int = arg(0, "evaluation length limit (0: max_new_tokens)", ">= 0")
    output_dir: str = arg("runs/kat_py", "metrics.jsonl, kl_traces.png and student/ go here")
    overwrite_output_dir: bool = arg(False, "replace the run already in output_dir")
    grader: str = arg("exact", "exact (the toy's A=n) or math (math-verify)",
                      choices=("exact", "math"))
    seed: int = arg(0, "random seed", "[0, 4294967295]")
    dtype: str = arg("auto", "teacher dtype and student mixed precision",
                     choices=("auto", "float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        for f in fields(self):
            check_value(f.name, getattr(self, f.name))
        if self.stride > self.window:
            raise UserError(f"error: stride: {self.stride} is larger than window ({self.window})")
        if self.min_buffer > self.buffer_size:
            raise UserError(f"error: min_buffer: {self.min_buffer} is larger than buffer_size "
                            f"({self.buffer_size}), so the detector never starts")

# Fields of kat/config.py that kat.py accepts in a config file and does not use.
PACKAGE_ONLY = ("kappa", "ema", "max_bad_steps", "save_every", "keep_last", "resume", "log_with",
                "project_name", "n_traces", "plot", "lora_r", "lora_alpha", "lora_dropout",
                "lora_target_modules", "teacher_cache_mb", "norm_from", "rollout_slots", "decode",
                "train_split", "eval_split", "prompt_field", "answer_field", "teacher_gguf",
                "student_gguf", "random_target_cut_rate")
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}
EXPORT = "`python -m kat export"  # writes the local files kat.py reads
FIELDS = {f.name: f for f in fields(Config)}

def parse_bounds(text: str) -> dict:
    """"[0, 1)" -> {low: 0, high: 1, low_open: False, high_open: True}; ">= 1" -> low 1, no high."""
    bounds = {"low": None, "high": None, "low_open": False, "high_open": False}
    if text.startswith(">"):
        bounds["low"] = float(text.lstrip(">= "))
        bounds["low_open"] = not text.startswith(">=")
    elif text:
        low, high = text[1:-1].split(",")
        bounds = {"low": float(low), "high": float(high),
                  "low_open": text[0] == "(", "high_open": text[-1] == ")"}
    return bounds

def check_value(name: str, value) -> None:
    """A value of the field's own type that lies in its range and among its choices."""
    kind = type(FIELDS[name].default)
    expected = (int, float) if kind is float else kind  # an int is a fine float
    if isinstance(value, bool) and kind is not bool or not isinstance(value, expected):
        raise UserError(f"error: {name}: expected {kind.__name__}, got {value!r}")
    bounds = parse_bounds(FIELDS[name].metadata["bounds"])
    low = bounds["low"]
    high = bounds["high"]
    infinity_allowed = high == math.inf and not bounds["high_open"]  # max_grad_norm: inf
    if kind is float and not math.isfinite(value) and not (value == high and infinity_allowed):
        raise UserError(f"error: {name}: {value!r} is not a finite number")
    choices = FIELDS[name].metadata["choices"]
    if choices is not None and value not in choices:
        raise UserError(f"error: {name}: {value!r} is not one of {choices} "
                        "(`python -m kat train` has more)")
    too_low = low is not None and (value < low or bounds["low_open"] and value == low)
    too_high = high is not None and (value > high or bounds["high_open"] and value == high)
    if too_low or too_high:
        raise UserError(f"error: {name}: {value!r} is out of range; "
                        f"allowed: {FIELDS[name].metadata['bounds']}")

def convert(name: str, value):
    """A YAML or command-line value as the field's type; "ture" is an error, not False, and YAML's
    `steps: true` or `steps: 1.5` is no int."""
    kind = type(FIELDS[name].default)
    wrong = UserError(f"error: {name}: expected {kind.__name__}, got {value!r}")
    if kind is bool and str(value).lower() not in BOOLEANS:
        raise wrong
    if kind is bool:
        return BOOLEANS[str(value).lower()]
    if isinstance(value, bool) or kind is int and isinstance(value, float) and value % 1:
        raise wrong
    if name == "chat_template_kwargs":  # held as YAML text of a mapping
        text = json.dumps(value) if isinstance(value, dict) else str(value or "")
        with contextlib.suppress(yaml.YAMLError):
            if isinstance(yaml.safe_load(text or "{}"), dict):
                return text
        raise UserError(f"error: {name}: expected a mapping such as '{{enable_thinking: false}}', "
                        f"got {value!r}")
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)):
        raise wrong
    try:
        return kind(value)
    except ValueError:
        raise wrong from None

def read_config_file(path: str) -> dict:
    """The mapping of field: value in a YAML file, or one line saying what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"error: config file {path!r} does not exist; give --config a YAML file")
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"error: config file {path!r} is not valid YAML text: {reason}") from None
    if values is not None and not isinstance(values, dict):
        raise UserError(f"error: config file {path!r} must hold a mapping of field: value, "
                        f"not a {type(values).__name__}")
    return values or {}

def parse_config(argv: list[str]) -> Config:
    """`--config FILE` (YAML), then `--field value` / `--field=value` pairs (a bare `--flag` is
    true); `--help` lists the fields."""
    if "-h" in argv or "--help" in argv:
        print("usage: kat.py [--config FILE] [--field value ...]\n")
        for f in fields(Config):
            allowed = f.metadata["bounds"] or "|".join(f.metadata["choices"] or ())
            print(f"  --{f.name} {type(f.default).__name__} {allowed} (default {f.default!r})")
            print(f"      {f.metadata['help']}")
        sys.exit(0)
    pairs = {}
    i = 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            raise UserError(f"error: {argv[i]!r} is not a --field; kat.py --help lists them")
        key, has_equals, value = argv[i].removeprefix("--").partition("=")
        if not has_equals:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else "true"
            i += has_value
        pairs[key.replace("-", "_")] = value
        i += 1
    path = pairs.pop("config", None)
    values = read_config_file(path) if path else {}
    values.update(pairs)
    if values.get("resume"):  # kat.py writes no checkpoints, so a resume would retrain over the run
        raise UserError("error: resume: kat.py keeps no checkpoints; resume a run with "
                        "`python -m kat train --resume latest`")
    for role in ("teacher", "student"):
        if values.get(f"{role}_gguf") or str(values.get(role, "")).startswith("pkg:"):
            raise UserError(f"error: {role}: kat.py reads no GGUF or pkg: model; write a folder "
                            f"with {EXPORT} --config FILE --out DIR` (or --model, --gguf)")
    unused = sorted(set(values) & set(PACKAGE_ONLY))
    if unused and os.environ.get("RANK", "0") == "0":  # said once, not dropped silently
        print(f"kat.py does not use: {', '.join(unused)}; `python -m kat train` does",
              file=sys.stderr)
    settings = {}
    for key, value in values.items():
        if key not in FIELDS and key not in unused:
            raise UserError(f"error: unknown field {key!r}; kat.py --help lists them")
        if key in FIELDS:
            settings[key] = convert(key, value)
    return Config(**settings)

def check_output_dir(cfg: Config) -> None:
    """Refuse a folder that holds a run unless asked to replace it; with overwrite_output_dir,
    remove only what kat.py writes (the user's own files stay)."""
    names = os.listdir(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []
    run_files = ("config.yaml", "metrics.jsonl", "progress.json", "student")
    held = [n for n in names if n in run_files or re.fullmatch(r"checkpoint-\d+", n)]
    if held and not cfg.overwrite_output_dir:
        raise UserError(f"error: output_dir {cfg.output_dir!r} holds a run ({', '.join(held)}); "
                        "give another --output_dir, resume it with `python -m kat train --resume "
                        "latest`, or replace it with --overwrite_output_dir true")

def clear_own_files(cfg: Config) -> None:
    """With overwrite_output_dir: remove what an earlier kat.py run wrote, nothing else."""
    for name in ("metrics.jsonl", "kl_traces.png", "student"):
        path = os.path.join(cfg.output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

# ==== Score: reverse KL and log-probs; fp16/bf16 logits in, fp32 accumulation, chunked over rows ==
def chunk_rows(vocab: int) -> int:
    """Rows per chunk: a (16k tokens x 152k vocab) fp32 buffer is 10 GB, so chunks of ~64 MiB."""
    return max(1, (1 << 24) // vocab)

class ReverseKL(torch.autograd.Function):
    """d = sum_v p (log p - log q), p = softmax(x), q = softmax(y) for student logits x and teacher
    logits y (a constant target: no gradient flows into y). Backward recomputes p, q per chunk
    instead of storing them: dd/dx_j = p_j (log p_j - log q_j - d)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, rows_per_chunk: int) -> Tensor:  # (R, V) any float dtype
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)  # (R,)
        for i in range(0, x.shape[0], rows_per_chunk):
            rows = slice(i, i + rows_per_chunk)
            logp = torch.log_softmax(x[rows].float(), -1)  # (r, V) fp32
            logq = torch.log_softmax(y[rows].float(), -1)  # (r, V) fp32
            p = logp.exp()  # where p = 0 (a masked -inf logit) the term is 0, not 0 * inf
            out[rows] = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
        ctx.save_for_backward(x, y, out)
        ctx.rows_per_chunk = rows_per_chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, y, kl = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        for i in range(0, x.shape[0], ctx.rows_per_chunk):
            rows = slice(i, i + ctx.rows_per_chunk)
            logp = torch.log_softmax(x[rows].float(), -1)  # (r, V)
            logq = torch.log_softmax(y[rows].float(), -1)  # (r, V)
            p = logp.exp()
            grad_rows = grad_out[rows].float().unsqueeze(-1)  # (r, 1)
            dkl_dx = torch.where(p > 0, p * (logp - logq - kl[rows].unsqueeze(-1)), 0.0)
            grad_x[rows] = (grad_rows * dkl_dx).to(x.dtype)
        return grad_x, None, None

def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(..., V) x (..., V) -> (...) float32: KL(student || teacher) at temperature 1.
    (F.kl_div(input, target) is KL(target || input): the same value is
    kl_div(teacher_logp, student_logp, log_target=True).)"""
    vocab = student_logits.shape[-1]
    flat_student = student_logits.reshape(-1, vocab)
    flat_teacher = teacher_logits.reshape(-1, vocab)
    out = ReverseKL.apply(flat_student, flat_teacher, chunk_rows(vocab))
    return out.reshape(student_logits.shape[:-1])

class TokenLogp(torch.autograd.Function):
    """log softmax(x)[ids] per row; d/dx = onehot(ids) - softmax(x)."""

    @staticmethod
    def forward(ctx, x: Tensor, ids: Tensor, rows_per_chunk: int) -> Tensor:  # (R, V), (R,)
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)  # (R,)
        for i in range(0, x.shape[0], rows_per_chunk):
            rows = slice(i, i + rows_per_chunk)
            logits = x[rows].float()  # (r, V)
            out[rows] = logits.gather(-1, ids[rows, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        ctx.save_for_backward(x, ids)
        ctx.rows_per_chunk = rows_per_chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, ids = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        for i in range(0, x.shape[0], ctx.rows_per_chunk):
            rows = slice(i, i + ctx.rows_per_chunk)
            grad_rows = grad_out[rows].float().unsqueeze(-1)  # (r, 1)
            grad_chunk = -grad_rows * torch.softmax(x[rows].float(), -1)  # (r, V)
            grad_x[rows] = grad_chunk.scatter_add_(-1, ids[rows, None], grad_rows).to(x.dtype)
        return grad_x, None, None

def token_logp(logits: Tensor, ids: Tensor) -> Tensor:
    """log p(ids): (..., V), (...) -> (...) float32."""
    vocab = logits.shape[-1]
    flat = TokenLogp.apply(logits.reshape(-1, vocab), ids.reshape(-1).long(), chunk_rows(vocab))
    return flat.reshape(ids.shape)

@torch.no_grad()
def topk_tail(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The student's top-k ids (..., k), and the teacher's log-probs on them plus the pooled tail
    log(1 - sum_S q) (..., k+1), the tail as a log-sum-exp over the complement (accurate near 1)."""
    vocab = student_logits.shape[-1]
    k = min(k, vocab)
    rows_per_chunk = chunk_rows(vocab)
    x = student_logits.reshape(-1, vocab)
    y = teacher_logits.reshape(-1, vocab)
    ids = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)  # (R, k)
    out = torch.empty(x.shape[0], k + 1, dtype=torch.float32, device=x.device)  # (R, k+1)
    for i in range(0, x.shape[0], rows_per_chunk):
        rows = slice(i, i + rows_per_chunk)
        ids[rows] = x[rows].topk(k, -1).indices
        logq = torch.log_softmax(y[rows].float(), -1)  # (r, V)
        out[rows, :k] = logq.gather(-1, ids[rows])
        out[rows, k] = torch.logsumexp(logq.scatter(-1, ids[rows], float("-inf")), -1)
    lead = student_logits.shape[:-1]
    return ids.reshape(*lead, k), out.reshape(*lead, k + 1)

def score_into(scores: dict, topk_ids, topk_logq, rows: Tensor, t0: int, logits: Tensor,
               teacher_logits: Tensor, tokens: Tensor, valid: Tensor) -> None:
    """d_t, log p(y_t), log q(y_t) (and the top-k + tail) of one chunk, at temperature 1, 0 where
    a position was not generated."""
    chunk_len = tokens.shape[1]
    chunk_scores = {"kl": reverse_kl(logits, teacher_logits),  # (A, c)
                    "student_logp": token_logp(logits, tokens),  # (A, c)
                    "teacher_logp": token_logp(teacher_logits, tokens)}  # (A, c)
    for key, value in chunk_scores.items():
        bad = valid & ~value.isfinite()
        if bad.any():
            where = [(int(rows[a]), t0 + int(b)) for a, b in bad.nonzero().tolist()][:8]
            raise FloatingPointError(f"non-finite {key} at (row, position) {where}: "
                                     "fp16 overflow? use bf16")
        scores[key][rows, t0:t0 + chunk_len] = torch.where(valid, value, 0.0)
    if topk_ids is not None:
        chunk_ids, chunk_logq = topk_tail(logits, teacher_logits, topk_ids.shape[-1])
        topk_ids[rows, t0:t0 + chunk_len] = torch.where(valid[..., None], chunk_ids, 0)
        topk_logq[rows, t0:t0 + chunk_len] = torch.where(valid[..., None], chunk_logq, 0.0)

# ==== Sample: the student decodes C tokens, the teacher scores them in one cached forward =========
def sample_token(logits: Tensor, uniform: Tensor | None, temperature: float,
                 top_p: float) -> Tensor:
    """Inverse-CDF draw from softmax(logits / T) within the top-p nucleus; `uniform` (A,) holds one
    draw per row, so a row's tokens do not depend on which other rows are still in the batch."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)  # (A, V)
    probs, order = probs.sort(dim=-1, descending=True, stable=True)
    if top_p < 1.0:  # keep token i while the mass before it is < top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)  # (A, V) unnormalised
    total = cdf[:, -1:].contiguous()  # (A, 1)
    index = torch.searchsorted(cdf, uniform[:, None].to(cdf.dtype) * total, right=True)  # (A, 1)
    # Rounding guard: never past the last token with mass.
    index = torch.minimum(index, torch.searchsorted(cdf, total))
    return order.gather(-1, index).squeeze(-1)  # (A,)

def forward(model, ids: Tensor, mask: Tensor, positions: Tensor, cache, last: bool = True):
    """HF forward with explicit mask and positions (prompts are left-padded): the last logits
    (A, V), or all of them (A, c, V), and the cache."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=int(last))
    if last:
        return out.logits[:, -1], out.cache
    return out.logits, out.cache

def gather_cat(x: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of any length from every process (rank order), on the CPU."""
    return torch.cat(gather_object([x.cpu()]))

@torch.no_grad()
def sample(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, terminator, cfg: Config,
           eos: Tensor, pad: int, generator: torch.Generator, first: int = 0,
           world_rows: int | None = None) -> tuple[dict, object]:
    """Lockstep chunked decoding. The teacher's output at token t predicts t+1, so a chunk's teacher
    logits are the carried last logits plus the first C-1 outputs of its forward over the chunk.
    Every process runs the same forwards (under FSDP each is a collective): decoding goes on while
    a row is alive on ANY process, and a process whose rows all ended feeds pads through one
    placeholder row. Rows first..first+B-1 of the world_rows rows of all processes are ours."""
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    max_len = cfg.max_new_tokens
    world_rows = world_rows or B
    state = terminator.start(B, device=device)
    scores = {key: torch.zeros(B, max_len, device=device)  # (B, T) each
              for key in ("kl", "student_logp", "teacher_logp")}
    ids = torch.full((B, max_len), pad, dtype=torch.long, device=device)  # (B, T)
    gen_mask = torch.zeros(B, max_len, dtype=torch.bool, device=device)  # (B, T)
    stop = torch.full((B,), STOP_LENGTH, device=device)  # (B,)
    cut = torch.full((B,), -1, device=device)  # (B,) -1: not cut

    rows = torch.arange(B, device=device)  # (A,) original row of each active row
    live = torch.ones(B, dtype=torch.bool, device=device)  # (A,) False: the placeholder row
    attn = prompt_mask.long()  # (A, P + t)
    next_pos = attn.sum(-1)  # (A,) position id of the next token
    prefill_pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (A, P)
    # p: the student's side; q: the teacher's.
    p_last, p_cache = forward(student, prompt_ids, attn, prefill_pos, None)  # (A, V)
    q_last, q_cache = forward(teacher, prompt_ids, attn, prefill_pos, None)  # (A, V)
    topk_ids = None
    topk_logq = None
    if cfg.loss == "topk":  # K >= V: the whole vocabulary
        k = min(cfg.topk, p_last.shape[-1])
        topk_ids = torch.zeros(B, max_len, k, dtype=torch.long, device=device)  # (B, T, K)
        topk_logq = torch.zeros(B, max_len, k + 1, device=device)  # (B, T, K+1)
    t = 0  # completion position of the chunk's first token
    while gather_cat(live.any().reshape(1)).any():  # a row is alive on some process
        chunk_len = min(cfg.chunk, max_len - t)
        n_active = rows.numel()
        alive = live.clone()
        tokens = torch.full((n_active, chunk_len), pad, device=device)  # (A, c)
        valid = torch.zeros(n_active, chunk_len, dtype=torch.bool, device=device)  # (A, c)
        p_chunk = []
        # --- the student samples c tokens (pads after its EOS, masked out)
        for j in range(chunk_len):
            uniform = None
            if cfg.temperature > 0:  # one draw per row of the GLOBAL batch, ours picked out
                draws = torch.rand(world_rows, generator=generator, device=generator.device)
                uniform = draws.to(device)[first + rows]  # (A,)
            token = sample_token(p_last, uniform, cfg.temperature, cfg.top_p)  # (A,)
            tokens[:, j] = torch.where(alive, token, pad)
            valid[:, j] = alive
            alive = alive & ~torch.isin(token, eos)
            p_chunk.append(p_last)
            attn = torch.cat([attn, valid[:, j:j + 1].long()], 1)
            if t + j + 1 < max_len:
                new_pos = (next_pos + j)[:, None]
                p_last, p_cache = forward(student, tokens[:, j:j + 1], attn, new_pos, p_cache)
        ids[rows, t:t + chunk_len] = tokens
        gen_mask[rows, t:t + chunk_len] = valid
        # --- the teacher reads the chunk in one cached forward; score it
        chunk_pos = next_pos[:, None] + torch.arange(chunk_len, device=device)  # (A, c)
        q_out, q_cache = forward(teacher, tokens, attn, chunk_pos, q_cache, last=False)  # (A, c, V)
        q_chunk = torch.cat([q_last[:, None], q_out[:, :-1]], 1)  # (A, c, V) positions t..t+c-1
        q_last = q_out[:, -1]
        p_chunk = torch.stack(p_chunk, 1)  # (A, c, V)
        score_into(scores, topk_ids, topk_logq, rows, t, p_chunk, q_chunk, tokens, valid)
        next_pos = next_pos + chunk_len
        # --- which rows end: EOS, length, or the terminator
        ended = ~alive | (t + chunk_len >= max_len)
        stop[rows[live & ~alive]] = STOP_EOS
        kl_chunk = scores["kl"][:, t:t + chunk_len]  # (B, c): all B rows
        valid_chunk = gen_mask[:, t:t + chunk_len]  # (B, c)
        teacher_logp_chunk = scores["teacher_logp"][:, t:t + chunk_len]  # (B, c)
        fired, fired_cut = terminator.observe(state, kl_chunk, valid_chunk, teacher_logp_chunk)
        fired = fired[rows]
        stop[rows[fired]] = terminator.stop_code
        cut[rows[fired]] = fired_cut[rows[fired]]
        ended |= fired
        t += chunk_len
        # --- ended rows leave both caches: later chunks cost less
        if ended.any():
            keep = (~ended).nonzero().squeeze(-1)
            live = live[keep]
            if keep.numel() == 0:  # none left here: a placeholder row keeps the forwards in step
                keep = keep.new_zeros(1)
                live = live.new_zeros(1)
            p_cache.batch_select_indices(keep)
            q_cache.batch_select_indices(keep)
            rows = rows[keep]
            attn = attn[keep]
            next_pos = next_pos[keep]
            p_last = p_last[keep]
            q_last = q_last[keep]
    lengths = gen_mask.sum(-1)  # (B,)
    T = int(lengths.max())
    cut = torch.where(cut < 0, lengths, cut)
    rollout = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                   completion_ids=ids[:, :T], completion_mask=gen_mask[:, :T], stop=stop, cut=cut,
                   loss_mask=gen_mask[:, :T] & (torch.arange(T, device=device) < cut[:, None]),
                   topk_ids=None, teacher_topk_logp=None, shadow_cut=None,
                   scored=True, teacher_logits=None)
    for key, value in scores.items():
        rollout[key] = value[:, :T]  # (B, T)
    if topk_ids is not None:
        rollout["topk_ids"] = topk_ids[:, :T]  # (B, T, K)
        rollout["teacher_topk_logp"] = topk_logq[:, :T]  # (B, T, K+1)
    if terminator.shadow:
        rollout["shadow_cut"] = state.would_cut.clone()
    return rollout, state

# ==== Detect: KAT's trap detector, and the two controls behind the same interface =================
#   state = terminator.start(B)
#   fired, cut = terminator.observe(state, kl, valid, teacher_logp)   # once per chunk
#   terminator.end_batch(state, step)                                  # once per batch
class State:
    """Per-batch running state: `fired`, `cut` (-1: none), `would_cut` (what a shadow run would
    cut), the position reached, and whether the detector judges this batch."""

    def __init__(self, B: int, device, active: bool = False, threshold: float | None = None):
        self.fired = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        self.cut = torch.full((B,), -1, device=device)  # (B,)
        self.would_cut = self.cut.clone()  # (B,)
        self.pos = 0
        self.active = active
        self.threshold = threshold

class TrapDetector:
    """z_t = mean(d_{t-W+1..t}), evaluated when (t+1) % stride == 0 and t+1 >= W over fully
    generated windows. Active (fixed per batch) once the buffer holds min_buffer minima and
    warmup_steps passed; windows starting before `exempt` never count; `patience` consecutive
    z < s = Q_{1-eta}(B) fire; the cut is that run's start.
    gate drift (beyond the paper): a row drifts at its first position e >= exempt with
    log q(y_e) < log(drift_prob), and only windows starting after e decide; a row that never
    drifts is never cut, however low its KL."""

    stop_code = STOP_TRAP

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.shadow = cfg.shadow
        self.buffer = torch.empty(0, dtype=torch.float64)  # FIFO of per-rollout minima
        self.steps_done = 0

    @property
    def threshold(self) -> float | None:
        """s = Q_{1-eta}(B); torch's default linear interpolation is numpy's default quantile."""
        if self.buffer.numel() == 0:
            return None
        return torch.quantile(self.buffer, 1 - self.cfg.eta).item()

    @property
    def active(self) -> bool:
        """A threshold exists, and the buffer and the step count are past their warm-ups."""
        full_enough = self.buffer.numel() >= max(self.cfg.min_buffer, 1)
        return full_enough and self.steps_done >= self.cfg.warmup_steps

    def start(self, B: int, device=None) -> State:
        state = State(B, device, active=self.active, threshold=self.threshold)
        state.ring = torch.zeros(B, self.cfg.window, dtype=torch.float64, device=device)  # last W d
        state.ring_ok = torch.zeros(B, self.cfg.window, dtype=torch.bool, device=device)  # (B, W)
        state.run = torch.zeros(B, dtype=torch.long, device=device)  # low windows in a row
        state.decided = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) fired once
        state.run_start = torch.full((B,), -1, device=device)  # (B,) start of the low run
        state.min_z = torch.full((B,), math.inf, dtype=torch.float64, device=device)  # (B,)
        # The first drift position: 2**62 means none yet; -1 (no gate) counts every window.
        no_drift_yet = -1 if self.cfg.gate == "none" else 2**62
        state.drift = torch.full((B,), no_drift_yet, device=device)  # (B,)
        return state

    def observe(self, state: State, kl: Tensor, valid: Tensor, teacher_logp=None):
        """Read one chunk of d (B, c) position by position; returns (fired now (B,), cut (B,))."""
        window = self.cfg.window
        fired_now = torch.zeros_like(state.fired)
        for j in range(kl.shape[1]):
            t = state.pos
            live = valid[:, j] & ~state.fired
            if self.cfg.gate == "drift" and t >= self.cfg.exempt:
                # the first token the teacher finds unlikely
                unlikely = teacher_logp[:, j].double() < math.log(self.cfg.drift_prob)
                drifts = live & (state.drift > t) & unlikely
                state.drift = torch.where(drifts, t, state.drift)
            state.ring[:, t % window] = torch.where(live, kl[:, j].double(), 0.0)
            state.ring_ok[:, t % window] = live
            state.pos += 1
            if (t + 1) % self.cfg.stride == 0 and t + 1 >= window:
                fired_now |= self.window_done(state, t)
        return fired_now, state.cut

    def window_done(self, state: State, t: int) -> Tensor:
        """The window ending at t: update each row's minimum, then judge it against s."""
        complete = state.ring_ok.all(-1)  # (B,) all W positions generated
        z = state.ring.sum(-1) / self.cfg.window  # (B,)  z_t = (1/W) sum_{i=t-W+1..t} d_i
        state.min_z = torch.where(complete, torch.minimum(state.min_z, z), state.min_z)
        start = t - self.cfg.window + 1
        if not state.active or start < self.cfg.exempt:
            return torch.zeros_like(complete)
        decide = complete & ~state.decided & (state.drift < start)  # drift gate: only after drift
        low = z < state.threshold
        run = torch.where(low, state.run + 1, 0)  # a window with z >= s resets the run
        state.run = torch.where(decide, run, state.run)
        state.run_start = torch.where(decide & low & (run == 1), start, state.run_start)
        fire = decide & (state.run >= self.cfg.patience)
        state.decided |= fire
        state.would_cut = torch.where(fire, state.run_start, state.would_cut)
        if self.shadow:  # record, never stop
            return torch.zeros_like(fire)
        state.fired |= fire
        state.cut = torch.where(fire, state.run_start, state.cut)
        return fire

    def end_batch(self, state: State, step: int) -> None:
        """Minima of every process join the FIFO buffer, so every process holds one threshold."""
        minima = gather_cat(state.min_z[state.min_z < math.inf])
        self.buffer = torch.cat([self.buffer, minima])[-self.cfg.buffer_size:]
        self.steps_done = step + 1

class RandomTerminator:
    """Length-matched control: cut = exempt + G, G geometric with hazard h, P(G >= g) = (1-h)^g;
    after each batch h <- h * clamp((mean_len - E) / (target - E), 1/4, 4) ** 0.5."""

    stop_code = STOP_RANDOM
    shadow = False
    threshold = None
    active = True

    def __init__(self, cfg: Config, seed: int):
        self.exempt = cfg.exempt
        self.target = cfg.random_target_length or cfg.max_new_tokens / 2
        self.generator = torch.Generator().manual_seed(seed)
        span = cfg.max_new_tokens - self.exempt
        excess = self.target - self.exempt
        # The initial h: bisect E[min(G, span)] = (1-h)(1-(1-h)^span)/h = excess.
        low = 1e-6
        high = 1.0
        for _ in range(100):
            mid = (low + high) / 2
            if (1 - mid) * (1 - (1 - mid) ** span) / mid > excess:
                low = mid
            else:
                high = mid
        self.hazard = (low + high) / 2
        self.steps_done = 0

    def start(self, B: int, device=None) -> State:
        draws = torch.rand(B, generator=self.generator, dtype=torch.float64)  # (B,) in [0, 1)
        uniform = 1.0 - draws  # (B,) in (0, 1]
        gap = torch.floor(torch.log(uniform) / math.log1p(-min(self.hazard, 1 - 1e-12)))  # G
        state = State(B, device, active=True)
        state.planned = (self.exempt + gap.clamp(max=2**40)).long().to(device)  # (B,)
        state.length = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
        return state

    def observe(self, state: State, kl: Tensor, valid: Tensor, teacher_logp=None):
        chunk_len = valid.shape[1]
        offset = state.planned - state.pos  # (B,) column of the planned cut in this chunk
        generated = valid.gather(1, offset.clamp(0, chunk_len - 1)[:, None]).squeeze(1)
        fire = (offset >= 0) & (offset < chunk_len) & generated & ~state.fired
        state.length += (valid & ~state.fired[:, None]).sum(1)
        state.fired |= fire
        state.cut = torch.where(fire, state.planned, state.cut)
        state.would_cut = state.cut
        state.pos += chunk_len
        return fire, state.cut

    def end_batch(self, state: State, step: int) -> None:
        lengths = torch.where(state.fired, state.cut, state.length).double()
        mean_length = gather_cat(lengths).mean().item()
        ratio = (mean_length - self.exempt) / (self.target - self.exempt)
        ratio = min(max(ratio, 0.25), 4.0)
        self.hazard = min(max(self.hazard * ratio ** 0.5, 1e-6), 1.0)
        self.steps_done = step + 1

class NoTerminator:
    """Plain OPD: never cuts."""

    stop_code = STOP_LENGTH  # never given: this terminator never fires
    shadow = False
    threshold = None
    active = False

    def start(self, B: int, device=None) -> State:
        return State(B, device)

    def observe(self, state: State, kl: Tensor, valid: Tensor, teacher_logp=None):
        return state.fired, state.cut  # all False

    def end_batch(self, state: State, step: int) -> None:
        pass

# ==== Learn: the OPD loss on the kept tokens, normalised by the global token count ================
def completion_logits(model, rollout: dict) -> Tensor:
    """(B, T, V) logits predicting each completion token, from one forward over prompt +
    completion: the logits at column P-1+t predict token t, so keep the last T+1 columns and drop
    the final one."""
    T = rollout["completion_ids"].shape[1]
    ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], 1)  # (B, P + T)
    mask = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], 1).long()  # (B, P + T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                logits_to_keep=T + 1)
    return out.logits[:, -(T + 1):-1]  # (B, T, V)

def opd_loss(logits: Tensor, rollout: dict, kind: str, teacher_logits: Tensor | None = None):
    """(sum of the per-token OPD loss over loss_mask, the number of those tokens)."""
    mask = rollout["loss_mask"]  # (B, T)
    if kind == "full":  # exact d_t, the teacher a constant target
        loss = reverse_kl(logits, teacher_logits.detach())  # (B, T)
    elif kind == "topk":
        # sum_{v in S} p log(p/q) + p_tail log(p_tail/q_tail), S = the student's top-K
        ids = torch.where(mask[..., None], rollout["topk_ids"], 0)  # (B, T, K)
        logq = torch.where(mask[..., None], rollout["teacher_topk_logp"], 0.0)  # (B, T, K+1)
        # log p(v) = x_v - x_a + log p(a), a the top token: no (B, T, V) fp32 buffer
        x = logits.gather(-1, ids).float()  # (B, T, K)
        logp = x - x[..., :1] + token_logp(logits, ids[..., 0])[..., None]  # (B, T, K)
        head = (logp.exp() * (logp - logq[..., :-1])).sum(-1)  # (B, T)
        p_tail = -torch.expm1(torch.logsumexp(logp, -1))  # 1 - sum_S p, accurate near full coverage
        # K >= V: no tail; its term is 0 (and its gradient not NaN)
        has_tail = (p_tail > 0) & logq[..., -1].isfinite()
        p_tail = torch.where(has_tail, p_tail, 1.0)
        logq_tail = torch.where(has_tail, logq[..., -1], 0.0)
        loss = head + torch.where(has_tail, p_tail * (p_tail.log() - logq_tail), 0.0)  # (B, T)
    else:
        raise ValueError(f"loss must be one of {FIELDS['loss'].metadata['choices']} "
                         f"(the package has `sampled` too), got {kind!r}")
    return torch.where(mask, loss, 0.0).sum(), mask.sum()

def learn(student, teacher, rollout: dict, optimizer, scheduler, accelerator: Accelerator,
          cfg: Config) -> dict:
    """One optimiser step in micro-batches. Each adds grad(sum_t l_t / N * processes), N = kept
    tokens on ALL processes (DDP averages over processes), so neither micro-batching nor the number
    of processes changes the update. Nothing kept, or a non-finite loss on any process: every
    process skips the step."""
    n_kept = accelerator.reduce(rollout["loss_mask"].sum().float(), "sum").item()
    B = len(rollout["stop"])
    total = torch.zeros(()).to(accelerator.device)
    if n_kept == 0:
        return {"loss": 0.0, "grad_norm": 0.0, "finite": True}
    for i in range(0, B, cfg.micro_batch_size):
        micro = {}
        for key, value in rollout.items():
            micro[key] = value[i:i + cfg.micro_batch_size] if isinstance(value, Tensor) else value
        last_micro_batch = i + cfg.micro_batch_size >= B
        # gradients are averaged over processes once, at the last micro-batch
        sync = contextlib.nullcontext() if last_micro_batch else accelerator.no_sync(student)
        with sync:
            teacher_logits = None
            if cfg.loss == "full":  # the target: the teacher's whole distribution
                with torch.no_grad():
                    teacher_logits = completion_logits(teacher, micro)  # (b, T, V)
            student_logits = completion_logits(student, micro)  # (b, T, V)
            loss, _ = opd_loss(student_logits, micro, cfg.loss, teacher_logits)
            accelerator.backward(loss / n_kept * accelerator.num_processes)
        total += loss.detach()
    loss = accelerator.reduce(total, "sum").item() / n_kept
    if not math.isfinite(loss):  # never step on NaN
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": float("nan"), "finite": False}
    grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "finite": True}

# ==== Evaluate: avg@k = mean accuracy of k samples per problem; pass@k = share with one correct ===
def grade(text: str, answer: str, grader: str = "exact") -> bool:
    """exact: the integer after the last `A=` (the toy); math: math-verify on LaTeX, boxed or plain
    answers. An answer that cannot be read is wrong, never a crash."""
    if grader == "exact":
        found = re.findall(r"A=(-?\d+)", text)
        with contextlib.suppress(ValueError):
            return bool(found) and int(found[-1]) == int(answer)
        return bool(found) and str(int(found[-1])) == answer.strip()
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    is_latex = "$" in answer or "\\boxed" in answer
    reference = answer if is_latex else f"${answer}$"  # a bare 55 read as LaTeX
    extraction = [LatexExtractionConfig(), ExprExtractionConfig()]
    with contextlib.suppress(Exception):  # the timeouts use signal.alarm: main thread only
        gold = parse(reference, extraction_config=extraction, parsing_timeout=30)
        predicted = parse(text, extraction_config=extraction, parsing_timeout=30)
        return bool(gold and predicted and verify(gold, predicted, timeout_seconds=30))
    return False

@torch.no_grad()
def evaluate(model, tokenizer, eval_sets: dict, cfg: Config, accelerator: Accelerator,
             eos: list[int]) -> dict:
    """Each set's problems shared out over processes, k samples each, 64 sequences per generate
    call. Every process makes the same calls (with no problems left it samples a stand-in and drops
    it), and generate keeps the processes in step: under FSDP every forward is a collective."""
    model = accelerator.unwrap_model(model).eval()
    out = {}
    sampling = dict(do_sample=False)
    if cfg.eval_temperature > 0:  # top_k=0: no hidden top-50 cut
        sampling = dict(do_sample=True, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                        top_k=0)
    max_new_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    rank = accelerator.process_index
    world = accelerator.num_processes
    for name, (k, problems) in eval_sets.items():
        torch.manual_seed(cfg.seed + 7919 * rank)
        mine = [p for p in problems[rank::world] for _ in range(k)]  # k copies of each problem
        graded = []  # (correct, length) per sample
        for i in range(0, math.ceil(len(problems) / world) * k, 64):
            batch = mine[i:i + 64] or problems[:1]  # a stand-in keeps the calls in step
            texts = [render(tokenizer, p["prompt"], cfg) for p in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(accelerator.device)
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                       synced_gpus=world > 1)
            new = generated[:, enc["input_ids"].shape[1]:]  # (b, T')
            is_eos = torch.isin(new, torch.tensor(eos, device=new.device))  # (b, T')
            # a length counts up to and with the first EOS
            first_eos = is_eos.int().argmax(-1)  # (b,)
            lengths = torch.where(is_eos.any(-1), first_eos + 1, new.shape[1]).tolist()
            for problem, completion, length in zip(mine[i:i + 64], new.tolist(), lengths):
                text = tokenizer.decode(completion[:length], skip_special_tokens=True)
                graded.append((grade(text, problem["answer"], cfg.grader), length))
        graded = gather_object(graded)  # k consecutive samples per problem, from every process
        correct = [[ok for ok, _ in graded[j:j + k]] for j in range(0, len(graded), k)]
        out[f"{name}/avg@k"] = sum(sum(c) / k for c in correct) / len(correct)
        out[f"{name}/pass@k"] = sum(any(c) for c in correct) / len(correct)
        out[f"{name}/mean_length"] = sum(length for _, length in graded) / len(graded)
    return out  # the model stays in eval mode: the loop sets train mode before each learning step

# ==== Data and models: local JSON-lines files, the chat template, stop ids ======================
def read_problems(path: str, field_name: str, limit: int = 0) -> list[dict]:
    """The first `limit` (0: all) {"prompt", "answer"} rows of a .jsonl file; repeats drop."""
    if not path.endswith(".jsonl"):
        raise UserError(f"error: {field_name}: kat.py reads .jsonl files, not {path!r}; "
                        f"write one with {EXPORT} --spec '{path}' --out data/NAME.jsonl`")
    if not os.path.isfile(path):
        raise UserError(f"error: {field_name}: {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    problems = []
    seen = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        is_problem = isinstance(row, dict) and isinstance(row.get("prompt"), str)
        if not is_problem or not isinstance(row.get("answer"), str):
            raise UserError(f"error: {path}, line {number}: expected prompt and answer strings; "
                            f"{EXPORT} --spec '{path}[prompt=..., answer=...]'` writes them")
        problem = {"prompt": row["prompt"], "answer": row["answer"].strip()}
        if problem["prompt"] and problem["answer"] and tuple(problem.values()) not in seen:
            seen.add(tuple(problem.values()))
            problems.append(problem)
        if len(problems) == limit:
            break
    if not problems:
        raise UserError(f"error: {field_name}: {path!r} holds no problem")
    return problems

def eval_specs(text: str, k: int) -> list[tuple[str, str, int]]:
    """`[name=]file.jsonl[k=N], ...` -> (name, file, k): the name defaults to the file's, k to
    eval_k (AIME is sampled 32 times, the other sets 8)."""
    specs = []
    for entry in filter(None, map(str.strip, text.split(","))):
        match = re.fullmatch(r"(?:(\w[\w.-]*)=)?([^=\[\]]+?)\s*(?:\[k=([1-9]\d*)\])?", entry)
        if match is None:
            raise UserError(f"error: eval_data: write {entry!r} as [name=]file.jsonl[k=N]")
        name = match[1] or os.path.basename(match[2]).removesuffix(".jsonl")
        specs.append((name, match[2], int(match[3] or k)))
    return specs

def render(tokenizer, question: str, cfg: Config) -> str:
    """The prompt as the model sees it: [system turn,] question + instruction, the assistant's
    turn opened."""
    content = question + cfg.instruction
    if not getattr(tokenizer, "chat_template", None):
        return f"{cfg.system_prompt}\n\n{content}" if cfg.system_prompt else content
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": content})
    template_kwargs = yaml.safe_load(cfg.chat_template_kwargs or "{}")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **template_kwargs)

def step_prompts(problems: list[dict], step: int, n: int, rank: int, world: int,
                 seed: int) -> list[dict]:
    """The batch of `step` for process `rank`: a seeded permutation per epoch, a pure function of
    the step."""
    out = []
    first = n * world * step + n * rank
    for j in range(first, first + n):
        epoch, i = divmod(j, len(problems))
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(problems), generator=generator)
        out.append(problems[order[i].item()])
    return out

def load_model(path: str, dtype: torch.dtype):
    """(tokenizer, model) from a folder or a hub name; left padding, for cached decoding."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as err:  # no such folder or hub name, no network
        reason = " ".join(str(err).split())
        raise UserError(f"error: teacher / student: cannot load a model from {path!r}: {reason}; "
                        f"a GGUF or pkg: model needs {EXPORT} --model`") from None
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # pads are masked anyway
    return tokenizer, model

def check_vocabularies(tokenizer, teacher_tokenizer, student, teacher) -> None:
    """OPD compares the two distributions id by id: one tokenizer, and logits for all its ids."""
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise UserError("error: teacher and student tokenizers differ; use a teacher and a student "
                        "of one model family")
    for role, model in (("student", student), ("teacher", teacher)):
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(tokenizer):
            raise UserError(f"error: {role}: its output layer has {rows} rows, the tokenizer "
                            f"{len(tokenizer)} tokens; use the tokenizer saved with the {role}")
    student_rows = student.get_output_embeddings().weight.shape[0]
    teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    if student_rows != teacher_rows:
        raise UserError(f"error: teacher: {teacher_rows} output rows, student: {student_rows}; "
                        "kat.py needs equal widths (`python -m kat train` trims the padding rows)")

def stop_ids(tokenizer, model) -> list[int]:
    """EOS, the model's generation EOS ids, and the chat template's end-of-turn token: the first
    special token after an assistant message (a base model's EOS is not the <|im_end|> its
    template ends a turn with)."""
    generation_eos = model.generation_config.eos_token_id or []
    ids = {tokenizer.eos_token_id, *torch.tensor(generation_eos).reshape(-1).tolist()}
    exchange = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "@@"}]
    with contextlib.suppress(Exception):  # a template that refuses this exchange has no such token
        text = tokenizer.apply_chat_template(exchange, tokenize=False)
        after = text[text.rindex("@@") + 2:]
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        added = (i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
        ids.update(set(first) & {*tokenizer.all_special_ids, *added})
    return sorted(i for i in ids if i is not None)

def plot_traces(rollout: dict, threshold: float | None, cfg: Config, path: str, n: int = 6):
    """d_t and window means z of the first rollouts, the threshold they were judged against, and
    the cut. z is drawn at its window's START, where a cut lands; the log axis shows values below
    1e-4 at 1e-4."""
    from matplotlib.figure import Figure

    panels = min(n, len(rollout["kl"]))
    fig = Figure(figsize=(10, 1.7 * panels + 0.5))
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    for b, ax in enumerate(axes):
        d = rollout["kl"][b, :int(rollout["completion_mask"][b].sum())].float().cpu()  # (T_b,)
        ax.plot(d.clamp(min=1e-4), lw=0.8, color="0.6", label="d_t, per-token reverse KL")
        if len(d) >= cfg.window:
            z = d.unfold(0, cfg.window, 1).mean(-1)  # (T_b - W + 1,) z of the window from t
            ax.plot(z.clamp(min=1e-4), label=f"z: mean of the {cfg.window} d from t")
        if threshold is not None:
            ax.axhline(max(threshold, 1e-4), color="C3", ls="--", lw=1,
                       label="threshold s this batch was judged by")
        if rollout["cut"][b] < len(d):
            ax.axvline(int(rollout["cut"][b]), color="k", lw=1.2, label="cut")
        ax.set(yscale="log", ylabel=f"rollout {b}\nnats")
    axes[-1].set_xlabel("completion position t")
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=4, fontsize=7,
               frameon=False)
    legend_height = 0.3 / fig.get_figheight()  # the legend sits above the panels
    fig.tight_layout(rect=(0, 0, 1, 1 - legend_height))
    fig.savefig(path, dpi=100)
    return fig

# ==== Main: sample -> detect -> learn -> log, with evaluation before and after ====================
def main(cfg: Config | None = None) -> list[dict]:
    cfg = cfg or parse_config(sys.argv[1:])
    check_output_dir(cfg)  # before any model loads
    dtype_name = cfg.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if torch.cuda.is_available() else "float32"
    dtype = getattr(torch, dtype_name)
    mixed_precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    # step_scheduler_with_optimizer=False: otherwise the schedule advances once per process
    accelerator = Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False)
    set_seed(cfg.seed)
    if accelerator.is_main_process and cfg.overwrite_output_dir:
        clear_own_files(cfg)
    accelerator.wait_for_everyone()
    os.makedirs(cfg.output_dir, exist_ok=True)

    # --- models: the trained student (fp32 master weights), the frozen teacher in the compute dtype
    # (fp16/bf16 on GPU: the KL maths upcasts its logits chunk by chunk, so it loses no accuracy)
    tokenizer, student = load_model(cfg.student, torch.float32)
    teacher_tokenizer, teacher = load_model(cfg.teacher, dtype)
    check_vocabularies(tokenizer, teacher_tokenizer, student, teacher)
    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:  # acts in training mode only: sampling keeps its KV caches
        enable = getattr(student, "activation_checkpointing_enable", None)  # the newer name
        (enable or student.gradient_checkpointing_enable)()
    eos = stop_ids(tokenizer, student)
    eos_tensor = torch.tensor(eos, device=accelerator.device)

    # --- data: the training prompts less the too long ones; evaluation sets, each with its own k
    problems = read_problems(cfg.train_data, "train_data")
    texts = [render(tokenizer, p["prompt"], cfg) for p in problems]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    kept = [p for p, length in zip(problems, lengths) if length <= cfg.max_prompt_length]
    if not kept:
        raise UserError("error: max_prompt_length: all prompts are longer than "
                        f"{cfg.max_prompt_length}")
    if len(kept) < len(problems):
        skipped = len(problems) - len(kept)
        accelerator.print(f"warning: train_data: skipped {skipped} of {len(problems)} prompts "
                          f"longer than max_prompt_length={cfg.max_prompt_length} tokens")
    problems = kept
    eval_sets = {}
    for name, path, k in eval_specs(cfg.eval_data, cfg.eval_k):
        eval_sets[name] = (k, read_problems(path, "eval_data", cfg.eval_limit))

    # --- optimiser, schedule and terminator
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_ratio * cfg.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, cfg.steps)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if cfg.termination == "kat":
        terminator = TrapDetector(cfg)
    elif cfg.termination == "random":
        terminator = RandomTerminator(cfg, cfg.seed + accelerator.process_index)
    else:
        terminator = NoTerminator()
    rows = []

    def log(row: dict) -> None:
        rows.append(row)
        if "eval" in row:
            accelerator.print(f"{row['eval']}: {row}")
        if accelerator.is_main_process:
            mode = "a" if len(rows) > 1 else "w"
            with open(os.path.join(cfg.output_dir, "metrics.jsonl"), mode) as fh:
                fh.write(json.dumps(row) + "\n")

    # --- evaluate before training
    if eval_sets:
        scores = evaluate(student, tokenizer, eval_sets, cfg, accelerator, eos)
        log({"step": 0, "eval": "before", **scores})

    rank = accelerator.process_index
    world = accelerator.num_processes
    bar = tqdm(range(cfg.steps), desc="kat.py", disable=not accelerator.is_local_main_process)
    for step in bar:
        # --- 1. sample: the student samples, the teacher scores each chunk, the terminator cuts
        batch = step_prompts(problems, step, cfg.batch_size, rank, world, cfg.seed)
        questions = [p["prompt"] for p in batch for _ in range(cfg.samples_per_prompt)]
        texts = [render(tokenizer, question, cfg) for question in questions]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(accelerator.device)
        generator = torch.Generator(device=accelerator.device)
        generator.manual_seed(cfg.seed * 1_000_003 + step * 1009)
        threshold = terminator.threshold  # what this batch is judged against (end_batch moves it)
        student.eval()
        rollout, state = sample(accelerator.unwrap_model(student), teacher, enc["input_ids"],
                                enc["attention_mask"].bool(), terminator, cfg, eos_tensor,
                                pad=tokenizer.pad_token_id, generator=generator,
                                first=rank * len(texts), world_rows=world * len(texts))
        student.train()

        # --- 2. detect: this batch's minima (from every process) move the threshold for the next
        terminator.end_batch(state, step)

        # --- 3. learn: one step on the kept tokens
        stats = learn(student, teacher, rollout, optimizer, scheduler, accelerator, cfg)
        if not stats["finite"]:
            accelerator.print(f"step {step + 1}: non-finite loss; step skipped "
                              "(check the models' dtype and weights)")

        # --- 4. log: sums over processes, then ratios
        mask = rollout["completion_mask"]  # (B, T)
        sums = {"tokens": mask.sum(),
                "kl": (rollout["kl"] * mask).sum(),
                "kept": rollout["loss_mask"].sum(),
                "cut": (rollout["stop"] > STOP_LENGTH).sum(),
                "rows": torch.tensor(mask.shape[0], device=mask.device)}
        totals = accelerator.reduce(torch.stack(list(sums.values())).float(), "sum").tolist()
        sums = dict(zip(sums, totals))
        log({"step": step + 1, "loss": stats["loss"], "kl": sums["kl"] / max(sums["tokens"], 1),
             "threshold": threshold, "cut_rate": sums["cut"] / sums["rows"],
             "mean_length": sums["tokens"] / sums["rows"],
             "kept_length": sums["kept"] / sums["rows"]})
        shown_threshold = "-" if threshold is None else f"{threshold:.3f}"
        bar.set_postfix(loss=f"{stats['loss']:.3f}", kl=f"{rows[-1]['kl']:.3f}",
                        cut=f"{rows[-1]['cut_rate']:.2f}", thr=shown_threshold,
                        len=f"{rows[-1]['mean_length']:.0f}")
        periodic = cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps
        if eval_sets and periodic:
            log({"step": step + 1, "eval": "periodic",
                 **evaluate(student, tokenizer, eval_sets, cfg, accelerator, eos)})

    # --- evaluate after; save the student (every process gathers a sharded one) and the KL traces
    if eval_sets:
        scores = evaluate(student, tokenizer, eval_sets, cfg, accelerator, eos)
        log({"step": cfg.steps, "eval": "after", **scores})
    state_dict = accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        saved = os.path.join(cfg.output_dir, "student")
        accelerator.unwrap_model(student).save_pretrained(saved, state_dict=state_dict)
        tokenizer.save_pretrained(saved)
        plot_traces(rollout, threshold, cfg, os.path.join(cfg.output_dir, "kl_traces.png"))
    accelerator.wait_for_everyone()  # no process tears down the process group while another saves
    # DDP first: its last hold on a gloo group can deadlock at exit
    student = accelerator.free_memory(student)[0]
    accelerator.end_training()
    return rows

if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
