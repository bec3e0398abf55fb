"""KAT: on-policy distillation with KL Agreement Trap Termination, in one file.

On-policy distillation (OPD). The student pi_s samples its own completion y for a prompt x, a
frozen teacher pi_t scores every position of it, and the student minimises the per-token reverse KL

    J(theta) = E_{x, y ~ pi_s} [ sum_t d_t ],   d_t = KL(pi_s(.|x,y<t) || pi_t(.|x,y<t))
                                                    = sum_v p(v) (log p(v) - log q(v)).

The agreement trap. Once the student drifts into an unrecoverable prefix (a wrong step, a loop),
the teacher, conditioned on the same broken prefix, agrees with it: d_t stays low, yet those tokens
teach nothing. One low d_t is also healthy agreement; low KL that persists is the signature.

KAT (arXiv 2606.09471). The teacher scores the growing rollout online, chunk by chunk, and
  1. smooths d with a window mean      z_t = (1/W) sum_{i=t-W+1..t} d_i  (evaluated every `stride`),
  2. calibrates a threshold            s = Q_{1-eta}(B), B = FIFO of per-rollout minima min_t z_t,
  3. waits                             off until |B| >= min_buffer and step >= warmup_steps,
  4. exempts the start                 windows starting before position E never count,
  5. fires after `patience` consecutive windows with z < s, and
  6. cuts at the start of the first low window: generation stops, and the cut segment and all
     after it leave the loss (not an end of sequence: no EOS is appended or trained).

Beyond the paper: `--loss full` (exact KL, the default) besides the paper's top-64 + tail
(`--loss topk`); `stride` reads "4 consecutive windows" (stride = W: non-overlapping); the teacher
scores C = `chunk` tokens per cached forward, so a trap stops within C tokens at near prefill cost;
`--termination none` is plain OPD and `--shadow true` records would-be cuts without cutting.

Run (kat/ is the same maths as a package; tests check that both agree):
    python kat.py --help                                        # every setting, one line each
    accelerate launch kat.py                                    # the toy world, on CPU
    accelerate launch --multi_gpu --num_processes 4 kat.py --config my_run.yaml
    python -m kat eval --config my_run.yaml --model runs/kat_py/student    # avg@k, pass@k
    python -m kat plot runs/kat_py                              # the KL traces of the last step
kat.py reads JSON-lines data ({"prompt": ..., "answer": ...} a line) and model folders, which
`python -m kat export --config FILE --out DIR` writes from hub datasets and GGUF files. kat/ adds
evaluation in training, the zscore rule, the drift gate, the controls, the sampled-token loss,
LoRA, checkpoints and trackers; kat.py names what it skips.
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
# Why a rollout ended: its end-of-sequence token, the length limit, a trap (numbered as in kat/).
STOP_EOS = 0
STOP_LENGTH = 1
STOP_TRAP = 2

class UserError(ValueError):
    """A mistake in the settings or files a user gave: one line on stderr, exit status 2."""

# ==== Config: defaults < --config FILE < --key value =============================================
def arg(default, help: str, bounds: str = "", choices: tuple | None = None):
    """A Config field, its `--help` line, its range ("[0, 1)", ">= 1") and its allowed values."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "choices": choices})

@dataclass
class Config:
    teacher: str = arg(os.path.join(TOY, "teacher"), "teacher model: a folder or hub name")
    student: str = arg(os.path.join(TOY, "student"), "student model: a folder or hub name")
    train_data: str = arg(os.path.join(TOY, "data", "train.jsonl"), "training prompts (.jsonl)")
    instruction: str = arg("", "text appended to every question (e.g. ask for \\boxed{})")
    chat_template_kwargs: str = arg("", "chat template variables, e.g. '{enable_thinking: false}'")
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
    lr: float = arg(1e-3, "peak learning rate (cosine schedule, linear warm-up)", "> 0")
    warmup_ratio: float = arg(0.03, "share of steps with linear warm-up", "[0, 1)")
    weight_decay: float = arg(0.0, "AdamW weight decay", ">= 0")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (inf: no clipping)", "(0, inf]")
    termination: str = arg("kat", "kat: the detector cuts; none: OPD", choices=("kat", "none"))
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
    output_dir: str = arg("runs/kat_py", "metrics.jsonl, kl_traces.png and student/ go here")
    overwrite_output_dir: bool = arg(False, "replace the run already in output_dir")
    seed: int = arg(0, "random seed", "[0, 4294967295]")
    dtype: str = arg("auto", "teacher dtype, student autocast",
                     choices=("auto", "float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        for f in fields(self):
            check_value(f.name, getattr(self, f.name))
        if self.stride > self.window:
            raise UserError(f"error: stride: {self.stride} is larger than window ({self.window})")
        if self.min_buffer > self.buffer_size:
            raise UserError(f"error: min_buffer: {self.min_buffer} > buffer_size: it never starts")

# Fields of kat/config.py that kat.py accepts in a config file and does not use.
PACKAGE_ONLY = (
    "eval_data", "eval_every", "eval_k", "eval_limit", "eval_temperature", "eval_top_p", "grader",
    "eval_max_new_tokens", "train_split", "eval_split", "prompt_field", "answer_field", "kappa",
    "ema", "max_bad_steps", "save_every", "keep_last", "resume", "log_with", "project_name",
    "n_traces", "plot", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "decode",
    "teacher_cache_mb", "norm_from", "rollout_slots", "teacher_gguf", "student_gguf", "gate",
    "random_target_length", "random_target_cut_rate", "drift_prob", "system_prompt",
    "gradient_checkpointing", "max_prompt_length")
# Package-only fields kat.py refuses unless they hold their default: (default, the way out).
PACKAGE = "it is a setting of `python -m kat train` alone"
GGUF = "write a model folder with `python -m kat export --model`"
REFUSED = {"resume": ("", "kat.py keeps no checkpoints; resume with `python -m kat train`"),
           "teacher_gguf": ("", GGUF), "student_gguf": ("", GGUF), "gate": ("none", PACKAGE),
           "norm_from": ("", PACKAGE), "lora_r": (0, PACKAGE), "system_prompt": ("", PACKAGE)}
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}
EXPORT = "`python -m kat export"  # writes the local files kat.py reads
FIELDS = {f.name: f for f in fields(Config)}

def parse_bounds(text: str) -> dict:
    """"[0, 1)" -> low 0 (closed), high 1 (open); "> 0" -> low 0 (open), no high; "": no bounds."""
    bounds = {"low": None, "high": None, "low_open": False, "high_open": False}
    if text.startswith(">"):
        bounds.update(low=float(text.lstrip(">= ")), low_open="=" not in text)
    elif text:
        low, high = text[1:-1].split(",")
        bounds.update(low=float(low), high=float(high), low_open=text[0] == "(")
        bounds.update(high_open=text[-1] == ")")
    return bounds

def is_mapping(text: str) -> bool:
    with contextlib.suppress(yaml.YAMLError):
        return isinstance(yaml.safe_load(text or "{}"), dict)
    return False

def check_value(name: str, value) -> None:
    """A value of the field's own type that lies in its range and among its choices."""
    kind = type(FIELDS[name].default)
    meta = FIELDS[name].metadata
    expected = (int, float) if kind is float else kind  # an int is a fine float
    if isinstance(value, bool) and kind is not bool or not isinstance(value, expected):
        raise UserError(f"error: {name}: expected {kind.__name__}, got {value!r}")
    if name == "chat_template_kwargs" and not is_mapping(value):
        raise UserError(f"error: {name}: {value!r} is no mapping like '{{enable_thinking: false}}'")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError(f"error: {name}: {value!r} is not one of {meta['choices']} (kat/ has more)")
    if kind not in (int, float):
        return
    bounds = parse_bounds(meta["bounds"])
    infinity_allowed = bounds["high"] == math.inf and not bounds["high_open"]  # max_grad_norm
    if not math.isfinite(value) and not (value == math.inf and infinity_allowed):
        raise UserError(f"error: {name}: {value!r} is not a finite number")
    low = bounds["low"]
    high = bounds["high"]
    too_low = low is not None and (value < low or bounds["low_open"] and value == low)
    too_high = high is not None and (value > high or bounds["high_open"] and value == high)
    if too_low or too_high:
        raise UserError(f"error: {name}: {value!r} is out of range; allowed: {meta['bounds']}")

def convert(name: str, value):
    """A YAML or command-line value as the field's type, read from its text: "ture" is no bool,
    and YAML's `steps: 1.5` or `steps: true` no int."""
    kind = type(FIELDS[name].default)
    if isinstance(value, dict):  # chat_template_kwargs: the mapping kept as YAML text
        value = json.dumps(value)
    text = "" if value is None else str(value)
    try:
        return BOOLEANS[text.lower()] if kind is bool else kind(text)
    except (KeyError, ValueError):
        raise UserError(f"error: {name}: expected {kind.__name__}, got {value!r}") from None

def read_config_file(path: str) -> dict:
    """The mapping of field: value in a YAML file, or one line saying what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except OSError as err:
        raise UserError(f"error: config file {path!r}: {err.strerror}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"error: config file {path!r} is not valid YAML text: {reason}") from None
    if values is not None and not isinstance(values, dict):
        raise UserError(f"error: config file {path!r} holds a {type(values).__name__}, not fields")
    return values or {}

def print_help() -> None:
    print("usage: kat.py [--config FILE] [--field value ...]\n\nfields (YAML file < command line):")
    for f in fields(Config):
        allowed = f.metadata["bounds"] or "|".join(f.metadata["choices"] or ())
        print(f"  --{f.name} {type(f.default).__name__} {allowed} (default {f.default!r})")
        print(f"      {f.metadata['help']}")

def parse_config(argv: list[str]) -> Config:
    """`--config FILE` (YAML), then `--field value` / `--field=value` pairs (a bare `--flag` is
    true); `--help` lists the fields."""
    if "-h" in argv or "--help" in argv:
        print_help()
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
    for key, (default, way_out) in REFUSED.items():  # refused, never skipped
        if values.get(key) not in (None, default) and str(values[key]) != str(default):
            raise UserError(f"error: {key}: {values[key]!r}: {way_out}")
    for role in ("teacher", "student"):
        if str(values.get(role, "")).startswith("pkg:"):
            raise UserError(f"error: {role}: write a model folder with {EXPORT} --config FILE`")
    unknown = sorted(set(values) - set(FIELDS) - set(PACKAGE_ONLY))
    if unknown:
        raise UserError(f"error: unknown field {unknown[0]!r}; kat.py --help lists them")
    unused = sorted(set(values) & set(PACKAGE_ONLY))
    if unused and os.environ.get("RANK", "0") == "0":  # said once, not dropped silently
        print(f"kat.py does not use: {', '.join(unused)}; kat/ does", file=sys.stderr)
    return Config(**{key: convert(key, value) for key, value in values.items() if key in FIELDS})

def check_output_dir(cfg: Config) -> None:
    """Refuse a folder that holds a run unless asked to replace it."""
    names = os.listdir(cfg.output_dir) if os.path.isdir(cfg.output_dir) else []
    run_files = ("config.yaml", "metrics.jsonl", "traces.jsonl", "progress.json", "student")
    held = [n for n in names if n in run_files or re.fullmatch(r"checkpoint-\d+", n)]
    if held and not cfg.overwrite_output_dir:
        raise UserError(f"error: output_dir {cfg.output_dir!r} holds a run ({', '.join(held)}); "
                        "give another one, or replace it with --overwrite_output_dir true")

def clear_own_files(cfg: Config) -> None:
    """With overwrite_output_dir: remove what an earlier kat.py run wrote, nothing else."""
    shutil.rmtree(os.path.join(cfg.output_dir, "student"), ignore_errors=True)
    for name in ("metrics.jsonl", "traces.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cfg.output_dir, name))

# ==== Score: reverse KL and the top-K targets; fp16/bf16 logits in, fp32 accumulation ==========
def chunk_rows(vocab: int) -> int:
    """Rows per chunk: a (16k tokens x 152k vocab) fp32 buffer is 10 GB, so chunks of ~64 MiB."""
    return max(1, (1 << 24) // vocab)

def kl_terms(x: Tensor, y: Tensor, kl: Tensor | float = 0.0) -> Tensor:
    """p_v (log p_v - log q_v - kl) in fp32 for rows of logits x, y; 0, not 0 * inf, at p_v = 0."""
    logp = torch.log_softmax(x.float(), -1)  # (r, V)
    logq = torch.log_softmax(y.float(), -1)  # (r, V)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq - kl), 0.0)

class ReverseKL(torch.autograd.Function):
    """d = sum_v p (log p - log q), p = softmax(x), q = softmax(y) for student logits x and teacher
    logits y (a constant target: no gradient flows into y). Rows are taken in chunks, and backward
    recomputes p and q instead of storing them: dd/dx_v = p_v (log p_v - log q_v - d)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, rows_per_chunk: int) -> Tensor:  # (R, V) any float dtype
        starts = range(0, x.shape[0], rows_per_chunk)
        chunks = [slice(i, i + rows_per_chunk) for i in starts]
        out = torch.cat([kl_terms(x[rows], y[rows]).sum(-1) for rows in chunks])  # (R,) fp32
        ctx.save_for_backward(x, y, out)
        ctx.chunks = chunks
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, y, kl = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        for rows in ctx.chunks:
            dkl_dx = kl_terms(x[rows], y[rows], kl[rows, None])  # (r, V)
            grad_x[rows] = (grad_out[rows, None].float() * dkl_dx).to(x.dtype)
        return grad_x, None, None

def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(..., V) x (..., V) -> (...) float32: KL(student || teacher) at temperature 1 (the same value
    as F.kl_div(teacher_logp, student_logp, log_target=True): kl_div swaps the order)."""
    vocab = student_logits.shape[-1]
    flat = (student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab))  # (R, V) each
    return ReverseKL.apply(*flat, chunk_rows(vocab)).reshape(student_logits.shape[:-1])

@torch.no_grad()
def topk_tail(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The student's top-k ids (..., k), and the teacher's log-probs on them plus the pooled tail
    log(1 - sum_S q) (..., k+1), the tail as a log-sum-exp over the complement (accurate near 1)."""
    ids = student_logits.topk(min(k, student_logits.shape[-1]), -1).indices  # (..., k)
    logq = torch.log_softmax(teacher_logits.float(), -1)  # (..., V)
    tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), -1, keepdim=True)  # (..., 1)
    return ids, torch.cat([logq.gather(-1, ids), tail], -1)

def score_into(scores: dict, rows: Tensor, t0: int, logits: Tensor, teacher_logits: Tensor,
               valid: Tensor) -> None:
    """d_t of one chunk (and for the topk loss the student's top-K ids with the teacher's log-probs
    on them and on the tail) into the rollout's tensors, 0 where a position was not generated."""
    span = slice(t0, t0 + valid.shape[1])
    kl = reverse_kl(logits, teacher_logits)  # (A, c)
    if (valid & ~kl.isfinite()).any():
        raise FloatingPointError(f"non-finite KL at positions {t0}-{span.stop}: use bfloat16")
    scores["kl"][rows, span] = torch.where(valid, kl, 0.0)
    if "topk_ids" in scores:
        ids, logq = topk_tail(logits, teacher_logits, scores["topk_ids"].shape[-1])
        scores["topk_ids"][rows, span] = torch.where(valid[..., None], ids, 0)  # (A, c, K)
        scores["teacher_topk_logp"][rows, span] = torch.where(valid[..., None], logq, 0.0)

# ==== Sample: the student decodes C tokens, the teacher scores them in one cached forward =========
def sample_token(logits: Tensor, uniform: Tensor | None, temperature: float, top_p: float):
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
    """Explicit mask and positions (prompts are left-padded): the last logits (A, V) or all of
    them (A, c, V), and the cache."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=int(last))
    return out.logits[:, -1] if last else out.logits, out.cache

def gather_cat(x: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of any length from every process (rank order), on the CPU."""
    return torch.cat(gather_object([x.cpu()]))

@torch.no_grad()
def sample(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, terminator, cfg: Config,
           eos: Tensor, pad: int, generator: torch.Generator, first: int = 0,
           world_rows: int | None = None) -> tuple[dict, object]:
    """Lockstep chunked decoding. The teacher's output at token t predicts t+1: a chunk's teacher
    logits are the carried last logits and the first C-1 outputs of its forward over the chunk.
    Every process runs the same forwards (under FSDP each is a collective) while a row is alive on
    ANY process, feeding pads through a placeholder row; our rows are first..first+B-1 of all."""
    B = prompt_ids.shape[0]
    device = prompt_ids.device
    max_len = cfg.max_new_tokens
    world_rows = world_rows or B
    state = terminator.start(B, device=device)
    scores = {"kl": torch.zeros(B, max_len, device=device)}  # (B, T)
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
    if cfg.loss == "topk":  # K >= V: the whole vocabulary
        k = min(cfg.topk, p_last.shape[-1])
        scores["topk_ids"] = torch.zeros(B, max_len, k, dtype=torch.long, device=device)
        scores["teacher_topk_logp"] = torch.zeros(B, max_len, k + 1, device=device)
    t = 0  # completion position of the chunk's first token
    while gather_cat(live.any().reshape(1)).any():  # a row is alive on some process
        chunk_len = min(cfg.chunk, max_len - t)
        alive = live.clone()
        tokens = torch.full((rows.numel(), chunk_len), pad, device=device)  # (A, c)
        valid = torch.zeros_like(tokens, dtype=torch.bool)  # (A, c)
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
        score_into(scores, rows, t, p_chunk, q_chunk, valid)
        next_pos = next_pos + chunk_len
        # --- which rows end: EOS, length, or the terminator
        ended = ~alive | (t + chunk_len >= max_len)
        stop[rows[live & ~alive]] = STOP_EOS
        kl_chunk = scores["kl"][:, t:t + chunk_len]  # (B, c): all B rows
        valid_chunk = gen_mask[:, t:t + chunk_len]  # (B, c)
        fired, fired_cut = terminator.observe(state, kl_chunk, valid_chunk)
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
                   topk_ids=None, teacher_topk_logp=None,
                   shadow_cut=state.would_cut.clone() if terminator.shadow else None)
    for key, value in scores.items():
        rollout[key] = value[:, :T]  # (B, T, ...)
    return rollout, state

# ==== Detect: KAT's trap detector ===============================================================
#   state = detector.start(B)                       # once per batch
#   fired, cut = detector.observe(state, kl, valid)  # once per chunk
#   detector.end_batch(state, step)                  # once per batch: the threshold moves
class State:
    """One batch's running state: rows fired and their cuts, the last W of d, low runs, min z."""

    def __init__(self, B: int, window: int, device, active: bool, threshold: float | None):
        self.active = active  # fixed for the batch
        self.threshold = threshold
        self.pos = 0  # completion position of the next d
        self.fired = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        self.cut = torch.full((B,), -1, device=device)  # (B,)
        self.would_cut = self.cut.clone()  # (B,)
        self.ring = torch.zeros(B, window, dtype=torch.float64, device=device)  # (B, W) last W d
        self.ring_ok = torch.zeros(B, window, dtype=torch.bool, device=device)  # (B, W) generated
        self.run = torch.zeros(B, dtype=torch.long, device=device)  # (B,) low windows in a row
        self.run_start = torch.full((B,), -1, device=device)  # (B,) start of the low run
        self.decided = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) fired once
        self.min_z = torch.full((B,), math.inf, dtype=torch.float64, device=device)  # (B,)

class TrapDetector:
    """z_t = mean(d_{t-W+1..t}), evaluated when (t+1) % stride == 0 and t+1 >= W over fully
    generated windows. Active (fixed per batch) once the buffer holds min_buffer minima and
    warmup_steps passed; windows starting before `exempt` never count; `patience` consecutive
    z < s = Q_{1-eta}(B) fire; the cut is that run's start. termination none: nothing is judged."""

    stop_code = STOP_TRAP

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.enabled = cfg.termination == "kat"
        self.shadow = cfg.shadow
        self.buffer = torch.empty(0, dtype=torch.float64)  # FIFO of per-rollout minima
        self.steps_done = 0

    @property
    def threshold(self) -> float | None:
        """s = Q_{1-eta}(B); torch's default linear interpolation is numpy's default quantile."""
        if not self.enabled or self.buffer.numel() == 0:
            return None
        return torch.quantile(self.buffer, 1 - self.cfg.eta).item()

    @property
    def active(self) -> bool:
        """A threshold exists, and the buffer and the step count are past their warm-ups."""
        full_enough = self.buffer.numel() >= max(self.cfg.min_buffer, 1)
        return self.enabled and full_enough and self.steps_done >= self.cfg.warmup_steps

    def start(self, B: int, device=None) -> State:
        return State(B, self.cfg.window, device, self.active, self.threshold)

    def observe(self, state: State, kl: Tensor, valid: Tensor):
        """Read one chunk of d (B, c) position by position; returns (fired now (B,), cut (B,))."""
        window = self.cfg.window
        fired_now = torch.zeros_like(state.fired)
        for j in range(kl.shape[1]):
            t = state.pos
            live = valid[:, j] & ~state.fired
            state.ring[:, t % window] = torch.where(live, kl[:, j].double(), 0.0)
            state.ring_ok[:, t % window] = live
            state.pos += 1
            if self.enabled and (t + 1) % self.cfg.stride == 0 and t + 1 >= window:
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
        decide = complete & ~state.decided
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

# ==== Learn: the OPD loss on the kept tokens, normalised by the global token count ================
def completion_logits(model, rollout: dict) -> Tensor:
    """(B, T, V) logits predicting each completion token from one forward over prompt + completion:
    column P-1+t predicts token t, so the last T+1 columns are kept and the final one dropped."""
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
    else:  # topk: sum_{v in S} p log(p/q) + p_tail log(p_tail/q_tail), S = the student's top-K
        ids = torch.where(mask[..., None], rollout["topk_ids"], 0)  # (B, T, K)
        logq = torch.where(mask[..., None], rollout["teacher_topk_logp"], 0.0)  # (B, T, K+1)
        # log p(v) = x_v - logsumexp(x); autograd keeps an fp32 copy of the logits for backward
        # (kat/'s kernel does without it)
        log_normaliser = torch.logsumexp(logits.float(), -1, keepdim=True)  # (B, T, 1)
        logp = logits.gather(-1, ids).float() - log_normaliser  # (B, T, K)
        head = (logp.exp() * (logp - logq[..., :-1])).sum(-1)  # (B, T)
        p_tail = -torch.expm1(torch.logsumexp(logp, -1))  # 1 - sum_S p, accurate near full coverage
        # K >= V: no tail; its term is 0 (and its gradient not NaN)
        has_tail = (p_tail > 0) & logq[..., -1].isfinite()
        p_tail = torch.where(has_tail, p_tail, 1.0)
        logq_tail = torch.where(has_tail, logq[..., -1], 0.0)
        loss = head + torch.where(has_tail, p_tail * (p_tail.log() - logq_tail), 0.0)  # (B, T)
    return torch.where(mask, loss, 0.0).sum(), mask.sum()

def learn(student, teacher, rollout: dict, optimizer, scheduler, accelerator: Accelerator,
          cfg: Config) -> dict:
    """One optimiser step in micro-batches, each adding grad(sum_t l_t / N * processes), N = kept
    tokens on ALL processes (DDP averages), so micro-batches and processes leave the update as it
    is. Nothing kept, or a non-finite loss on any process: every process skips the step."""
    n_kept = accelerator.reduce(rollout["loss_mask"].sum().float(), "sum").item()
    B = len(rollout["stop"])
    total = torch.zeros(()).to(accelerator.device)
    if n_kept == 0:
        return {"loss": 0.0, "grad_norm": 0.0, "finite": True}
    for i in range(0, B, cfg.micro_batch_size):
        micro = {key: value[i:i + cfg.micro_batch_size] if isinstance(value, Tensor) else value
                 for key, value in rollout.items()}
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

# ==== Data and models: local JSON-lines files, the chat template, stop ids ======================
def read_problems(path: str) -> list[dict]:
    """The {"prompt", "answer"} rows of a .jsonl file, repeats dropped (as kat/ reads them)."""
    if not path.endswith(".jsonl") or not os.path.isfile(path):
        raise UserError(f"error: train_data: {path!r} is no .jsonl file; write one with "
                        f"{EXPORT} --spec '{path}' --out data/NAME.jsonl`")
    problems = {}  # (prompt, answer) -> None: a set that keeps the file's order
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            try:
                row = json.loads(line) if line.strip() else {"prompt": "", "answer": ""}
            except ValueError:
                row = None
            if not isinstance(row, dict) or not all(isinstance(row.get(key), str)
                                                    for key in ("prompt", "answer")):
                raise UserError(f"error: {path}, line {number}: no prompt and answer strings; "
                                f"{EXPORT} --spec '{path}[prompt=..., answer=...]'` writes them")
            if row["prompt"] and row["answer"].strip():
                problems[(row["prompt"], row["answer"].strip())] = None
    if not problems:
        raise UserError(f"error: train_data: {path!r} holds no problem")
    return [{"prompt": prompt, "answer": answer} for prompt, answer in problems]

def render(tokenizer, question: str, cfg: Config) -> str:
    """The prompt as the model sees it: question + instruction in a user turn, the assistant's
    turn opened (plain text for a tokenizer without a chat template)."""
    content = question + cfg.instruction
    if not getattr(tokenizer, "chat_template", None):
        return content
    template_kwargs = yaml.safe_load(cfg.chat_template_kwargs or "{}")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, **template_kwargs)

def step_prompts(problems: list[dict], step: int, n: int, rank: int, world: int, seed: int):
    """The n prompts of `step` for process `rank`: a seeded permutation per epoch."""
    batch = []
    first = n * world * step + n * rank
    for j in range(first, first + n):
        epoch, i = divmod(j, len(problems))
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(problems), generator=generator)
        batch.append(problems[order[i].item()])
    return batch

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
    """OPD compares the two distributions id by id: one tokenizer, one logit width covering it."""
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise UserError("error: teacher and student tokenizers differ; use a pair of one family")
    widths = [model.get_output_embeddings().weight.shape[0] for model in (student, teacher)]
    if widths[0] != widths[1] or widths[0] < len(tokenizer):
        raise UserError(f"error: student, teacher: {widths} output rows for {len(tokenizer)} "
                        "tokens; kat.py needs one width that covers the tokenizer")

def stop_ids(tokenizer, model) -> list[int]:
    """EOS, the generation config's EOS ids and the chat template's end of turn: the first special
    token after an assistant message (a base model's EOS is not the <|im_end|> ending a turn)."""
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

def write_traces(rollout: dict, threshold: float | None, cfg: Config, n: int = 6) -> None:
    """d_t, threshold and cut of the last step's first rollouts for `python -m kat plot OUT`."""
    with open(os.path.join(cfg.output_dir, "traces.jsonl"), "w") as fh:
        for b in range(min(n, len(rollout["stop"]))):
            length = int(rollout["completion_mask"][b].sum())
            cut = int(rollout["cut"][b])
            trace = {"step": cfg.steps, "kl": rollout["kl"][b, :length].tolist(),
                     "threshold": threshold, "window": cfg.window, "stride": cfg.stride,
                     "exempt": cfg.exempt, "cut": cut if cut < length else None,
                     "stop": int(rollout["stop"][b])}
            fh.write(json.dumps(trace) + "\n")

# ==== Main: sample -> detect -> learn -> log ======================================================
def main(cfg: Config | None = None) -> list[dict]:
    cfg = cfg or parse_config(sys.argv[1:])
    check_output_dir(cfg)  # before any model loads
    auto_dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    dtype = getattr(torch, auto_dtype if cfg.dtype == "auto" else cfg.dtype)
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
    eos = torch.tensor(stop_ids(tokenizer, student), device=accelerator.device)
    problems = read_problems(cfg.train_data)  # `python -m kat export` drops over-long prompts

    # --- optimiser, schedule and terminator
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_ratio * cfg.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, cfg.steps)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    terminator = TrapDetector(cfg)  # termination none: it never fires
    rank = accelerator.process_index
    world = accelerator.num_processes
    rows = []
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
                                enc["attention_mask"].bool(), terminator, cfg, eos,
                                pad=tokenizer.pad_token_id, generator=generator,
                                first=rank * len(texts), world_rows=world * len(texts))
        student.train()

        # --- 2. detect: this batch's minima (from every process) move the threshold for the next
        terminator.end_batch(state, step)

        # --- 3. learn: one step on the kept tokens
        stats = learn(student, teacher, rollout, optimizer, scheduler, accelerator, cfg)
        if not stats["finite"]:
            accelerator.print(f"step {step + 1}: non-finite loss, step skipped; check the dtype")

        # --- 4. log: sums over processes, then ratios
        mask = rollout["completion_mask"]  # (B, T)
        local = [mask.sum(), (rollout["kl"] * mask).sum(), rollout["loss_mask"].sum(),
                 (rollout["stop"] == STOP_TRAP).sum(), torch.ones_like(rollout["stop"]).sum()]
        sums = accelerator.reduce(torch.stack([x.float() for x in local]), "sum").tolist()
        tokens, kl_sum, kept, cut, n_rows = sums  # over every process
        rows.append({"step": step + 1, "loss": stats["loss"], "kl": kl_sum / max(tokens, 1),
                     "threshold": threshold, "cut_rate": cut / n_rows,
                     "mean_length": tokens / n_rows, "kept_length": kept / n_rows})
        if accelerator.is_main_process:
            with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(rows[-1]) + "\n")
        shown = {key: f"{rows[-1][key]:.3g}" for key in ("loss", "kl", "cut_rate", "mean_length")}
        bar.set_postfix(**shown, threshold="-" if threshold is None else f"{threshold:.3g}")

    # --- save the student (every process gathers a sharded one) and the last step's KL traces
    state_dict = accelerator.get_state_dict(student)
    if accelerator.is_main_process:
        saved = os.path.join(cfg.output_dir, "student")
        accelerator.unwrap_model(student).save_pretrained(saved, state_dict=state_dict)
        tokenizer.save_pretrained(saved)
        write_traces(rollout, threshold, cfg)
        print(f"saved {saved}: `python -m kat eval --config CONFIG --model {saved}` evaluates it")
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
