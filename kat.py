"""KAT: on-policy distillation with KL Agreement Trap Termination, in one file.

On-policy distillation (OPD). The student pi_s samples its own completion y for a prompt x; a frozen
teacher pi_t scores every position of it; the student minimises the summed per-token reverse KL

    J(theta) = E_{x, y ~ pi_s} [ sum_t d_t ],   d_t = KL(pi_s(.|x,y<t) || pi_t(.|x,y<t))
                                                    = sum_v p(v) (log p(v) - log q(v)).

The agreement trap. Once the student drifts into an unrecoverable prefix (a wrong step, a loop), the
teacher, conditioned on the same broken prefix, agrees with it: d_t stays low, yet those tokens teach
nothing. One low d_t cannot tell this from healthy agreement; low KL that persists is the signature.

KAT (arXiv 2606.09471). The teacher scores the growing rollout online, chunk by chunk, and
  1. smooths d with a window mean      z_t = (1/W) sum_{i=t-W+1..t} d_i  (evaluated every `stride`),
  2. calibrates a threshold            s = Q_{1-eta}(B), B = FIFO of per-rollout minima min_t z_t,
  3. waits                             off until |B| >= min_buffer and step >= warmup_steps,
  4. exempts the start                 windows starting before position E never count,
  5. fires after `patience` consecutive windows with z < s, and
  6. cuts at the start of the first low window: generation stops, and the cut segment and all after
     it leave the loss (not an end of sequence: no EOS is appended or trained).

Choices beyond the paper. `--loss full` (exact KL, the default) besides the paper's top-64 + tail (`--loss topk`);
`stride` reads "4 consecutive windows" (stride = W: non-overlapping); the teacher scores C = `chunk` tokens per cached
forward, so a trap stops within C tokens at near prefill cost. `--gate drift`: a low run counts only after the rollout
drifted (a token past E with teacher probability < `drift_prob`), so flat low KL is never cut. Controls:
`--termination random` (cuts calibrated to a target mean length, which the paper's RandomTerm was not), `none` (plain
OPD; FixedPrefix: smaller `--max_new_tokens`), `--shadow true` (no cut). `kat/` (`python -m kat train`) adds the zscore
rule (s = running mean - kappa * std of z), the gate's controls (`termination: drift`, `norm_from`), the sampled-token
loss, scoring after decoding, LoRA, checkpoints and trackers; kat.py reads the same configs and names what it skips.

Run (`kat/` is the same maths as a package; tests check that both agree):
    accelerate launch kat.py                                   # toy world, CPU, a few minutes
    accelerate launch kat.py --config configs/qwen3_1.7b.yaml   # one GPU
    accelerate launch --multi_gpu --num_processes 4 kat.py --config configs/qwen3_1.7b.yaml
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 kat.py   # two CPU processes
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kat", "toy", "rich")
STOP_EOS, STOP_LENGTH, STOP_TRAP, STOP_RANDOM = 0, 1, 2, 3

# ==== Config: defaults < --config FILE < --key value ================================================
@dataclass
class Config:
    teacher: str = os.path.join(TOY, "teacher")  # teacher model: local path, hub name or pkg:<package>
    student: str = os.path.join(TOY, "student")  # student model: local path, hub name or pkg:<package>
    teacher_gguf: str = ""  # GGUF file inside `teacher` (de-quantised to dtype); "": none
    student_gguf: str = ""  # GGUF file inside `student`; "": none
    train_data: str = os.path.join(TOY, "data", "train.jsonl")  # prompts: file or hub name[key=value, ...]
    train_split: str = "train"  # split of a hub training dataset
    eval_data: str = os.path.join(TOY, "data", "test.jsonl")  # comma-separated [name=]source[...]; "": none
    eval_split: str = "test"  # split of hub evaluation datasets
    prompt_field: str = "prompt"  # column holding the question (a.b reaches into a struct)
    answer_field: str = "answer"  # column holding the reference answer
    system_prompt: str = ""  # system message before every question
    instruction: str = ""  # text appended to every question (e.g. ask for a \boxed{} answer)
    chat_template_kwargs: str = ""  # YAML mapping of chat template variables, e.g. "{enable_thinking: false}"
    max_prompt_length: int = 512  # training prompts longer than this many tokens are skipped
    steps: int = 30  # optimiser steps
    batch_size: int = 16  # prompts per step on each process
    samples_per_prompt: int = 4  # rollouts sampled per prompt
    max_new_tokens: int = 96  # completion length limit
    temperature: float = 1.0  # student sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling mass
    chunk: int = 8  # tokens per lockstep chunk C: the teacher scores C new tokens per cached forward
    loss: str = "full"  # OPD loss: full | topk
    topk: int = 64  # K for the topk loss
    micro_batch_size: int = 16  # rows per forward/backward; gradients accumulate over the step
    gradient_checkpointing: bool = False  # recompute the student's activations in backward (less memory)
    lr: float = 1e-3  # peak learning rate (cosine schedule, linear warm-up)
    warmup_ratio: float = 0.03  # share of steps with linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    termination: str = "kat"  # kat | none | random
    rule: str = "quantile"  # threshold rule: quantile (the paper's; zscore is in kat/)
    window: int = 8  # W: tokens per window mean z
    stride: int = 4  # evaluate a window every `stride` tokens
    patience: int = 2  # consecutive low windows that confirm a trap
    exempt: int = 8  # E: windows starting before this position never count
    eta: float = 0.3  # threshold = (1 - eta) quantile of the minima buffer
    buffer_size: int = 1024  # FIFO size of per-rollout minima
    min_buffer: int = 128  # the detector stays off until the buffer holds this many minima
    warmup_steps: int = 5  # the detector stays off for this many steps
    shadow: bool = False  # detect and record would-be cuts without cutting
    random_target_length: float = 0.0  # random termination: target mean length (0: max_new_tokens / 2)
    gate: str = "none"  # none (the paper's rule) | drift: a low run counts only after a drift token
    drift_prob: float = 0.02  # a sampled token past `exempt` with teacher probability below this is a drift token
    eval_every: int = 0  # also evaluate every N steps (0: only before and after training)
    eval_k: int = 4  # samples per evaluation problem (avg@k, pass@k); a set's own k=... wins
    eval_limit: int = 64  # evaluate on the first N problems of each set (0: all)
    eval_temperature: float = 1.0  # evaluation sampling temperature (0: greedy)
    eval_top_p: float = 1.0  # evaluation nucleus mass
    eval_max_new_tokens: int = 0  # completion length limit when evaluating (0: max_new_tokens)
    output_dir: str = "runs/kat_py"  # metrics.jsonl, kl_traces.png and the trained student go here
    overwrite_output_dir: bool = False  # replace the run an output_dir holds (else: refused)
    grader: str = "exact"  # answer checker: exact (toy) | math (math-verify)
    seed: int = 0  # random seed
    dtype: str = "auto"  # teacher dtype / student mixed precision: auto | float32 | bfloat16 | float16

CHOICES = {"loss": ("full", "topk"), "termination": ("kat", "none", "random"), "rule": ("quantile",),
           "gate": ("none", "drift"), "grader": ("exact", "math"), "dtype": ("auto", "float32", "bfloat16", "float16")}
PACKAGE_ONLY = ("kappa", "ema", "max_bad_steps", "save_every", "keep_last", "resume", "log_with", "project_name",
                "n_traces", "plot", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "decode",
                "teacher_cache_mb", "norm_from", "random_target_cut_rate", "rollout_slots")

def parse_config(argv: list[str]) -> Config:
    """`--config FILE` (YAML) then `--field value` / `--field=value` pairs; `--help` lists the fields."""
    if "-h" in argv or "--help" in argv:  # the fields as written below: name, type, default and what it does
        source = open(__file__).read().split("class Config:\n")[1]
        sys.exit("usage: kat.py [--config FILE] [--field value ...]\n" + source[:source.index("\n\n")])
    pairs, i = {}, 0
    while i < len(argv):
        key, eq, value = argv[i].removeprefix("--").partition("=")
        if not eq:  # "--key value", or a bare "--flag" meaning true
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i, value = i + has_value, argv[i + 1] if has_value else "true"
        pairs[key.replace("-", "_")], i = value, i + 1
    path = pairs.pop("config", None)
    if path and not os.path.isfile(path):
        sys.exit(f"error: config file {path!r} does not exist; give --config an existing YAML file")
    values = {**(yaml.safe_load(open(path)) or {} if path else {}), **pairs}
    types, unused = {f.name: type(f.default) for f in fields(Config)}, sorted(set(values) & set(PACKAGE_ONLY))
    if unused and os.environ.get("RANK", "0") == "0":  # said once, not silently dropped
        print(f"kat.py does not use: {', '.join(unused)}; `python -m kat train` does", file=sys.stderr)
    for key, value in [(k, v) for k, v in values.items() if k not in unused]:
        if key not in types:
            sys.exit(f"error: unknown field {key!r}; kat.py --help lists them")
        try:
            if types[key] is bool and isinstance(value, str):  # "ture" is an error, not False
                value = ("1", "true", "yes", "on", "0", "false", "no", "off").index(value.lower()) < 4
            value = json.dumps(value) if isinstance(value, dict) else "" if value is None else value  # YAML maps
            values[key] = types[key](value)
        except ValueError:
            sys.exit(f"error: {key}: expected {types[key].__name__}, got {value!r}")
        if values[key] not in CHOICES.get(key, (values[key],)):
            sys.exit(f"error: {key}: {value!r} is not one of {CHOICES[key]} (`python -m kat train` has more)")
    return Config(**{k: v for k, v in values.items() if k not in unused})

# ==== Score: reverse KL and log-probs, fp16/bf16 logits in, fp32 accumulation, chunked over rows ====
def chunk_rows(vocab: int) -> int:  # a (16k tokens x 152k vocab) fp32 buffer is 10 GB: chunks of ~64 MiB
    return max(1, (1 << 24) // vocab)

class ReverseKL(torch.autograd.Function):
    """d = sum_v p (log p - log q), p = softmax(x), q = softmax(y) for student logits x and teacher
    logits y (a constant target: no gradient flows into y); backward recomputes p, q per chunk instead
    of storing them: dd/dx_j = p_j (log p_j - log q_j - d)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, n: int) -> Tensor:  # x, y: (R, V) any float dtype
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)  # (R,)
        for i in range(0, x.shape[0], n):
            logp, logq = (torch.log_softmax(a[i:i + n].float(), -1) for a in (x, y))  # (r, V) fp32 each
            p = logp.exp()  # where p = 0 (a masked -inf logit) the term is 0, not 0 * inf
            out[i:i + n] = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
        ctx.save_for_backward(x, y, out)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (x, y, kl), n, gx = ctx.saved_tensors, ctx.n, torch.empty_like(ctx.saved_tensors[0])
        for i in range(0, x.shape[0], n):
            logp, logq = (torch.log_softmax(a[i:i + n].float(), -1) for a in (x, y))
            p, gi = logp.exp(), g[i:i + n].float().unsqueeze(-1)  # (r, V), (r, 1)
            gx[i:i + n] = (gi * torch.where(p > 0, p * (logp - logq - kl[i:i + n].unsqueeze(-1)), 0.0)).to(x.dtype)
        return gx, None, None

def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(..., V) x (..., V) -> (...) float32: KL(student || teacher) at temperature 1. (F.kl_div(input, target)
    is KL(target || input): the same value is kl_div(teacher_logp, student_logp, log_target=True).)"""
    V = student_logits.shape[-1]
    out = ReverseKL.apply(student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), chunk_rows(V))
    return out.reshape(student_logits.shape[:-1])

class TokenLogp(torch.autograd.Function):
    """log softmax(x)[ids] per row; d/dx = onehot(ids) - softmax(x)."""

    @staticmethod
    def forward(ctx, x: Tensor, ids: Tensor, n: int) -> Tensor:  # (R, V), (R,)
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], n):
            xi = x[i:i + n].float()
            out[i:i + n] = xi.gather(-1, ids[i:i + n, None]).squeeze(-1) - torch.logsumexp(xi, -1)
        ctx.save_for_backward(x, ids)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (x, ids), grad = ctx.saved_tensors, torch.empty_like(ctx.saved_tensors[0])
        for i in range(0, x.shape[0], ctx.n):
            gi = g[i:i + ctx.n].float().unsqueeze(-1)
            chunk = -gi * torch.softmax(x[i:i + ctx.n].float(), -1)
            grad[i:i + ctx.n] = chunk.scatter_add_(-1, ids[i:i + ctx.n, None], gi).to(x.dtype)
        return grad, None, None

def token_logp(logits: Tensor, ids: Tensor) -> Tensor:
    """log p(ids): (..., V), (...) -> (...) float32."""
    V = logits.shape[-1]
    return TokenLogp.apply(logits.reshape(-1, V), ids.reshape(-1).long(), chunk_rows(V)).reshape(ids.shape)

@torch.no_grad()
def topk_tail(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The student's top-k ids (..., k) and the teacher's log-probs on them plus the pooled tail
    log(1 - sum_S q) (..., k+1), the tail as a log-sum-exp over the complement (accurate near 1)."""
    V = student_logits.shape[-1]
    k, n = min(k, V), chunk_rows(V)
    x, y = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    ids = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    out = torch.empty(x.shape[0], k + 1, dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], n):
        ids[i:i + n] = x[i:i + n].topk(k, -1).indices
        logq = torch.log_softmax(y[i:i + n].float(), -1)  # (r, V)
        out[i:i + n, :k] = logq.gather(-1, ids[i:i + n])
        out[i:i + n, k] = torch.logsumexp(logq.scatter(-1, ids[i:i + n], float("-inf")), -1)
    return ids.reshape(*student_logits.shape[:-1], k), out.reshape(*student_logits.shape[:-1], k + 1)

# ==== Sample: the student decodes C tokens, the teacher scores them in one cached forward ============
def sample_token(logits: Tensor, u: Tensor | None, temperature: float, top_p: float) -> Tensor:
    """Inverse-CDF draw from softmax(logits / T) within the top-p nucleus; u (A,) one uniform per row,
    so a row's tokens do not depend on which other rows are still in the batch."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits.float() / temperature, -1).sort(dim=-1, descending=True, stable=True)
    if top_p < 1.0:  # keep token i while the mass before it is < top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)  # (A, V) unnormalised
    total = cdf[:, -1:].contiguous()
    idx = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * total, right=True)
    idx = torch.minimum(idx, torch.searchsorted(cdf, total))  # rounding guard: a token with mass
    return order.gather(-1, idx).squeeze(-1)

def forward(model, ids: Tensor, mask: Tensor, positions: Tensor, cache, last: bool = True):
    """HF forward with explicit mask and positions (prompts are left-padded): last (A, V) or all (A, c, V) logits."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=int(last))
    return out.logits[:, -1] if last else out.logits, out.cache

@torch.no_grad()
def sample(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, terminator, cfg: Config,
           eos: Tensor, pad: int, generator: torch.Generator, first: int = 0,
           world_rows: int | None = None) -> tuple[dict, object]:
    """Lockstep chunked decoding. The teacher's output at token t predicts t+1, so a chunk's teacher
    logits are the carried last logits plus the first C-1 outputs of its forward over the chunk.
    Every process runs the same forwards (under FSDP each is a collective): decoding goes on while a
    row is alive on ANY process, and a process whose rows all ended feeds pads through one placeholder."""
    B, dev, T_max = prompt_ids.shape[0], prompt_ids.device, cfg.max_new_tokens
    world_rows = world_rows or B  # rows first..first+B-1 of the batch over all processes
    state = terminator.start(B, device=dev)
    out = {k: torch.zeros(B, T_max, device=dev) for k in ("kl", "student_logp", "teacher_logp")}
    ids = torch.full((B, T_max), pad, dtype=torch.long, device=dev)  # (B, T)
    gen_mask = torch.zeros(B, T_max, dtype=torch.bool, device=dev)  # (B, T)
    stop, cut = torch.full((B,), STOP_LENGTH, device=dev), torch.full((B,), -1, device=dev)  # (B,) each
    rows = torch.arange(B, device=dev)  # original row of each active row
    live = torch.ones(B, dtype=torch.bool, device=dev)  # (A,) False: the placeholder row
    attn = prompt_mask.long()  # (A, P + t)
    pos = attn.sum(-1)  # (A,) position id of the next token
    prefill_pos = (attn.cumsum(-1) - 1).clamp(min=0)
    p_last, p_cache = forward(student, prompt_ids, attn, prefill_pos, None)  # (A, V); p: the student's side
    q_last, q_cache = forward(teacher, prompt_ids, attn, prefill_pos, None)  # q: the teacher's side
    K = min(cfg.topk, p_last.shape[-1]) if cfg.loss == "topk" else 0  # K >= V: the whole vocabulary
    topk_ids = torch.zeros(B, T_max, K, dtype=torch.long, device=dev) if K else None
    topk_logq = torch.zeros(B, T_max, K + 1, device=dev) if K else None
    t = 0  # completion position of the chunk's first token
    while gather_cat(live.any().reshape(1)).any():  # a row alive on any process
        c, A = min(cfg.chunk, T_max - t), rows.numel()
        alive = live.clone()
        tokens, valid = torch.full((A, c), pad, device=dev), torch.zeros(A, c, dtype=torch.bool, device=dev)  # (A, c)
        p_chunk = []
        for j in range(c):  # --- the student samples c tokens (pads after its EOS, masked out)
            u = torch.rand(world_rows, generator=generator, device=generator.device).to(dev)[first + rows] \
                if cfg.temperature > 0 else None  # one uniform per row of the GLOBAL batch
            token = sample_token(p_last, u, cfg.temperature, cfg.top_p)  # (A,)
            tokens[:, j], valid[:, j] = torch.where(alive, token, pad), alive
            alive, p_chunk = alive & ~torch.isin(token, eos), p_chunk + [p_last]
            attn = torch.cat([attn, valid[:, j:j + 1].long()], 1)
            if t + j + 1 < T_max:
                p_last, p_cache = forward(student, tokens[:, j:j + 1], attn, (pos + j)[:, None], p_cache)
        ids[rows, t:t + c], gen_mask[rows, t:t + c] = tokens, valid
        # --- the teacher reads the chunk in one cached forward; score it
        q_out, q_cache = forward(teacher, tokens, attn, pos[:, None] + torch.arange(c, device=dev), q_cache, False)
        q_chunk = torch.cat([q_last[:, None], q_out[:, :-1]], 1)  # (A, c, V) positions t..t+c-1
        q_last = q_out[:, -1]
        score_into(out, topk_ids, topk_logq, rows, t, torch.stack(p_chunk, 1), q_chunk, tokens, valid)
        pos = pos + c
        ended = ~alive | (t + c >= T_max)  # --- which rows end: EOS, length, or the terminator
        stop[rows[live & ~alive]] = STOP_EOS
        scored = [x[:, t:t + c] for x in (out["kl"], gen_mask, out["teacher_logp"])]  # (B, c) each: all B rows
        fired, fired_cut = terminator.observe(state, *scored)
        fired = fired[rows]
        stop[rows[fired]], cut[rows[fired]] = terminator.stop_code or 0, fired_cut[rows[fired]]
        ended |= fired
        t += c
        if ended.any():  # --- ended rows leave both caches: later chunks cost less
            keep = (~ended).nonzero().squeeze(-1)
            live = live[keep]
            if keep.numel() == 0:  # nothing left here: one placeholder row keeps the forwards in step
                keep, live = keep.new_zeros(1), live.new_zeros(1)
            p_cache.batch_select_indices(keep)
            q_cache.batch_select_indices(keep)
            rows, attn, pos, p_last, q_last = rows[keep], attn[keep], pos[keep], p_last[keep], q_last[keep]
    lengths = gen_mask.sum(-1)
    T, cut = int(lengths.max()), torch.where(cut < 0, lengths, cut)
    rollout = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids[:, :T],
                   completion_mask=gen_mask[:, :T], stop=stop, cut=cut,
                   loss_mask=gen_mask[:, :T] & (torch.arange(T, device=dev) < cut[:, None]),
                   topk_ids=None if topk_ids is None else topk_ids[:, :T],
                   teacher_topk_logp=None if topk_logq is None else topk_logq[:, :T],
                   shadow_cut=state.would_cut.clone() if terminator.shadow else None,
                   scored=True, teacher_logits=None, **{k: v[:, :T] for k, v in out.items()})
    return rollout, state

def score_into(out: dict, topk_ids, topk_logq, rows: Tensor, t0: int, logits: Tensor, teacher_logits: Tensor,
               tokens: Tensor, valid: Tensor) -> None:
    """d_t, log p(y_t), log q(y_t) (and top-k + tail) of one chunk, at temperature 1, 0 where invalid."""
    c = tokens.shape[1]
    for key, value in (("kl", reverse_kl(logits, teacher_logits)), ("student_logp", token_logp(logits, tokens)),
                       ("teacher_logp", token_logp(teacher_logits, tokens))):
        bad = valid & ~value.isfinite()
        if bad.any():
            where = [(int(rows[a]), t0 + int(b)) for a, b in bad.nonzero().tolist()][:8]
            raise FloatingPointError(f"non-finite {key} at (row, position) {where}: fp16 overflow? use bf16")
        out[key][rows, t0:t0 + c] = torch.where(valid, value, 0.0)
    if topk_ids is not None:
        k_ids, k_logq = topk_tail(logits, teacher_logits, topk_ids.shape[-1])
        topk_ids[rows, t0:t0 + c] = torch.where(valid[..., None], k_ids, 0)
        topk_logq[rows, t0:t0 + c] = torch.where(valid[..., None], k_logq, 0.0)

# ==== Detect: KAT's trap detector, and the two controls behind the same interface ===================
#   state = term.start(B); fired, cut = term.observe(state, kl, valid, teacher_logp); term.end_batch(state, step)

class State:
    """Per-batch running state: `fired`, `cut` (-1: none), `would_cut` (what a shadow run would cut)."""

    def __init__(self, B: int, dev, **extra):
        self.fired, self.cut = torch.zeros(B, dtype=torch.bool, device=dev), torch.full((B,), -1, device=dev)
        self.would_cut, self.pos, self.active, self.threshold = self.cut.clone(), 0, False, None
        self.__dict__.update(extra)

def gather_cat(x: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of any length from every process (rank order), returned on the CPU."""
    return torch.cat(gather_object([x.cpu()]))

class TrapDetector:
    """z_t = mean(d_{t-W+1..t}), evaluated when (t+1) % stride == 0 and t+1 >= W over fully generated windows.
    Active (fixed per batch) once the buffer holds min_buffer minima and warmup_steps passed; windows starting
    before `exempt` never count; `patience` consecutive z < s = Q_{1-eta}(B) fire; cut = that run's start.
    gate drift (beyond the paper): a row drifts at its first position e >= exempt with log q(y_e) < log(drift_prob),
    and only windows starting after e decide; a row that never drifts is never cut, however low its KL."""

    stop_code = STOP_TRAP

    def __init__(self, cfg: Config):
        self.cfg, self.shadow = cfg, cfg.shadow
        self.buffer, self.steps_done = torch.empty(0, dtype=torch.float64), 0  # FIFO of per-rollout minima

    @property
    def threshold(self) -> float | None:  # torch's default linear interpolation = numpy's default quantile
        return torch.quantile(self.buffer, 1 - self.cfg.eta).item() if self.buffer.numel() else None

    @property
    def active(self) -> bool:  # a threshold exists, and the buffer and the step count are past their warm-ups
        return self.buffer.numel() >= max(self.cfg.min_buffer, 1) and self.steps_done >= self.cfg.warmup_steps

    def start(self, B: int, device=None) -> State:
        ring = torch.zeros(B, self.cfg.window, dtype=torch.float64, device=device)  # the last W values of d
        drift = -1 if self.cfg.gate == "none" else 2**62  # first drift position (2**62: none yet); none: before 0
        return State(B, device, ring=ring, ring_ok=ring.bool(), run=ring[:, 0].long(), decided=ring[:, 0].bool(),
                     run_start=torch.full((B,), -1, device=device), min_z=torch.full_like(ring[:, 0], math.inf),
                     drift=torch.full((B,), drift, device=device), active=self.active, threshold=self.threshold)

    def observe(self, st: State, kl: Tensor, valid: Tensor, teacher_logp=None) -> tuple[Tensor, Tensor]:
        W, fired_now = self.cfg.window, torch.zeros_like(st.fired)
        for j in range(kl.shape[1]):
            t, live = st.pos, valid[:, j] & ~st.fired
            if self.cfg.gate == "drift" and t >= self.cfg.exempt:  # the first token the teacher finds unlikely
                drifts = live & (st.drift > t) & (teacher_logp[:, j].double() < math.log(self.cfg.drift_prob))
                st.drift = torch.where(drifts, t, st.drift)
            st.ring[:, t % W] = torch.where(live, kl[:, j].double(), 0.0)
            st.ring_ok[:, t % W] = live
            st.pos += 1
            if (t + 1) % self.cfg.stride == 0 and t + 1 >= W:
                fired_now |= self.window_done(st, t)
        return fired_now, st.cut

    def window_done(self, st: State, t: int) -> Tensor:
        ok = st.ring_ok.all(-1)  # (B,) all W positions generated
        z = st.ring.sum(-1) / self.cfg.window  # (B,)  z_t = (1/W) sum_{i=t-W+1..t} d_i
        st.min_z = torch.where(ok, torch.minimum(st.min_z, z), st.min_z)
        start = t - self.cfg.window + 1
        if not st.active or start < self.cfg.exempt:
            return torch.zeros_like(ok)
        decide, low = ok & ~st.decided & (st.drift < start), z < st.threshold  # drift gate: only after drift
        run = torch.where(low, st.run + 1, 0)  # a window with z >= s resets the run
        st.run = torch.where(decide, run, st.run)
        st.run_start = torch.where(decide & low & (run == 1), start, st.run_start)
        fire = decide & (st.run >= self.cfg.patience)
        st.decided |= fire
        st.would_cut = torch.where(fire, st.run_start, st.would_cut)
        if self.shadow:  # record, never stop
            return torch.zeros_like(fire)
        st.fired |= fire
        st.cut = torch.where(fire, st.run_start, st.cut)
        return fire

    def end_batch(self, st: State, step: int) -> None:
        """Minima of every process join the FIFO buffer, so every process holds one threshold."""
        self.buffer = torch.cat([self.buffer, gather_cat(st.min_z[st.min_z < math.inf])])[-self.cfg.buffer_size:]
        self.steps_done = step + 1

class RandomTerminator:
    """Length-matched control: cut = exempt + G, G geometric with hazard h, P(G >= g) = (1-h)^g;
    after each batch h <- h * clamp((mean_len - E) / (target - E), 1/4, 4) ** 0.5."""

    stop_code, shadow, threshold, active = STOP_RANDOM, False, None, True

    def __init__(self, cfg: Config, seed: int):
        self.E, self.target = cfg.exempt, cfg.random_target_length or cfg.max_new_tokens / 2
        self.generator = torch.Generator().manual_seed(seed)
        span, excess = cfg.max_new_tokens - self.E, self.target - self.E
        lo, hi = 1e-6, 1.0  # initial h: bisect E[min(G, span)] = (1-h)(1-(1-h)^span)/h = excess
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (1 - mid) * (1 - (1 - mid) ** span) / mid > excess else (lo, mid)
        self.hazard, self.steps_done = (lo + hi) / 2, 0

    def start(self, B: int, device=None) -> State:
        u = 1.0 - torch.rand(B, generator=self.generator, dtype=torch.float64)  # (0, 1]
        g = torch.floor(torch.log(u) / math.log1p(-min(self.hazard, 1 - 1e-12)))
        return State(B, device, planned=(self.E + g.clamp(max=2**40)).long().to(device),
                     length=torch.zeros(B, dtype=torch.long, device=device), active=True)

    def observe(self, st: State, kl: Tensor, valid: Tensor, teacher_logp=None) -> tuple[Tensor, Tensor]:
        C, offset = valid.shape[1], st.planned - st.pos  # column of the planned cut in this chunk
        generated = valid.gather(1, offset.clamp(0, C - 1)[:, None]).squeeze(1)
        fire = (offset >= 0) & (offset < C) & generated & ~st.fired
        st.length += (valid & ~st.fired[:, None]).sum(1)
        st.fired |= fire
        st.cut = st.would_cut = torch.where(fire, st.planned, st.cut)
        st.pos += C
        return fire, st.cut

    def end_batch(self, st: State, step: int) -> None:
        lengths = gather_cat(torch.where(st.fired, st.cut, st.length).double()).mean().item()
        ratio = min(max((lengths - self.E) / (self.target - self.E), 0.25), 4.0)
        self.hazard, self.steps_done = min(max(self.hazard * ratio ** 0.5, 1e-6), 1.0), step + 1

class NoTerminator:
    """Plain OPD: never cuts."""

    stop_code, shadow, threshold, active = None, False, None, False

    def start(self, B: int, device=None) -> State:
        return State(B, device)

    def observe(self, st: State, kl: Tensor, valid: Tensor, teacher_logp=None) -> tuple[Tensor, Tensor]:
        return st.fired, st.cut  # all False

    def end_batch(self, st: State, step: int) -> None:
        pass

# ==== Learn: the OPD loss on the kept tokens, normalised by the global token count ==================
def completion_logits(model, r: dict) -> Tensor:
    """(B, T, V) logits predicting each completion token: one forward over prompt + completion; the
    logits at column P-1+t predict token t, so keep the last T+1 columns and drop the final one."""
    T = r["completion_ids"].shape[1]
    ids = torch.cat([r["prompt_ids"], r["completion_ids"]], 1)  # (B, P + T)
    mask = torch.cat([r["prompt_mask"], r["completion_mask"]], 1).long()
    return model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                 use_cache=False, logits_to_keep=T + 1).logits[:, -(T + 1):-1]

def opd_loss(logits: Tensor, r: dict, kind: str, teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum of the per-token OPD loss over loss_mask, number of those tokens)."""
    m = r["loss_mask"]
    if kind == "full":  # exact d_t, the teacher a constant target
        loss = reverse_kl(logits, teacher_logits.detach())
    elif kind == "topk":  # sum_{v in S} p log(p/q) + p_tail log(p_tail/q_tail), S = student's top-K
        ids = torch.where(m[..., None], r["topk_ids"], 0)  # (B, T, K)
        logq = torch.where(m[..., None], r["teacher_topk_logp"], 0.0)  # (B, T, K+1)
        x = logits.gather(-1, ids).float()  # log p(v) = x_v - x_a + log p(a): no (B, T, V) fp32 buffer
        logp = x - x[..., :1] + token_logp(logits, ids[..., 0])[..., None]  # (B, T, K)
        head = (logp.exp() * (logp - logq[..., :-1])).sum(-1)  # (B, T)
        p_tail = -torch.expm1(torch.logsumexp(logp, -1))  # 1 - sum_S p, accurate near full coverage
        has_tail = (p_tail > 0) & logq[..., -1].isfinite()  # K >= V: no tail, term 0 (and no NaN grad)
        p_tail, logq_tail = torch.where(has_tail, p_tail, 1.0), torch.where(has_tail, logq[..., -1], 0.0)
        loss = head + torch.where(has_tail, p_tail * (p_tail.log() - logq_tail), 0.0)
    else:
        raise ValueError(f"loss must be one of {CHOICES['loss']} (the package has `sampled` too), got {kind!r}")
    return torch.where(m, loss, 0.0).sum(), m.sum()

def learn(student, teacher, r: dict, optimizer, scheduler, acc: Accelerator, cfg: Config) -> dict:
    """One optimiser step in micro-batches. Each adds grad(sum_t l_t / N * processes), N = kept tokens on
    ALL processes (DDP averages over processes), so neither micro-batching nor the number of processes
    changes the update. Nothing kept, or a non-finite loss on any process: every process skips the step."""
    n, B, total = acc.reduce(r["loss_mask"].sum().float(), "sum").item(), len(r["stop"]), torch.zeros(()).to(acc.device)
    if n == 0:
        return {"loss": 0.0, "grad_norm": 0.0, "finite": True}
    for i in range(0, B, cfg.micro_batch_size):
        mb = {k: v[i:i + cfg.micro_batch_size] if isinstance(v, Tensor) else v for k, v in r.items()}
        with contextlib.nullcontext() if i + cfg.micro_batch_size >= B else acc.no_sync(student):
            with torch.no_grad():  # the `full` loss's target: the teacher's whole distribution
                teacher_logits = completion_logits(teacher, mb) if cfg.loss == "full" else None  # (b, T, V)
            loss, _ = opd_loss(completion_logits(student, mb), mb, cfg.loss, teacher_logits)
            acc.backward(loss / n * acc.num_processes)
        total += loss.detach()
    loss = acc.reduce(total, "sum").item() / n
    if not math.isfinite(loss):  # never step on NaN
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "grad_norm": float("nan"), "finite": False}
    grad_norm = float(acc.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "finite": True}

# ==== Evaluate: avg@k = mean accuracy of k samples per problem; pass@k = share with one correct =====
def grade(text: str, answer: str, grader: str = "exact") -> bool:
    """exact: the integer after the last `A=` (the toy); math: math-verify on LaTeX/boxed/plain answers.
    An answer that cannot be read is wrong, never a crash."""
    if grader == "exact":
        found = re.findall(r"A=(-?\d+)", text)
        with contextlib.suppress(ValueError):
            return bool(found) and int(found[-1]) == int(answer)
        return bool(found) and str(int(found[-1])) == answer.strip()
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    ref = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"  # a bare 55 read as LaTeX
    with contextlib.suppress(Exception):
        gold, pred = (parse(s, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                            parsing_timeout=30) for s in (ref, text))  # timeouts: main thread only (signal.alarm)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=30))
    return False

@torch.no_grad()
def evaluate(model, tok, eval_sets: dict, cfg: Config, acc: Accelerator, eos: list[int]) -> dict:
    """Each set's problems shared out over processes, k samples each, 64 sequences per generate call.
    Every process makes the same calls (with no problems left it samples a stand-in and drops it) and
    generate keeps the processes in step: under FSDP every forward is a collective."""
    model, out = acc.unwrap_model(model).eval(), {}
    sampling = dict(do_sample=True, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, top_k=0) \
        if cfg.eval_temperature > 0 else dict(do_sample=False)  # top_k=0: no hidden top-50 cut
    for name, (k, problems) in eval_sets.items():
        torch.manual_seed(cfg.seed + 7919 * acc.process_index)
        mine, rows = [p for p in problems[acc.process_index::acc.num_processes] for _ in range(k)], []
        for i in range(0, math.ceil(len(problems) / acc.num_processes) * k, 64):
            enc = tok([render(tok, p["prompt"], cfg) for p in mine[i:i + 64] or problems[:1]], return_tensors="pt",
                      padding=True, add_special_tokens=False).to(acc.device)
            new = model.generate(**enc, max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, **sampling,
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos, synced_gpus=acc.num_processes > 1
                                 )[:, enc["input_ids"].shape[1]:]  # (b, T')
            is_eos = torch.isin(new, torch.tensor(eos, device=new.device))  # length: up to and with EOS
            lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, new.shape[1]).tolist()
            rows += [(grade(tok.decode(ids[:n], skip_special_tokens=True), p["answer"], cfg.grader), n)
                     for p, ids, n in zip(mine[i:i + 64], new.tolist(), lengths)]
        rows = gather_object(rows)  # k consecutive samples per problem, in every process's share
        correct = [[c for c, _ in rows[j:j + k]] for j in range(0, len(rows), k)]
        out.update({f"{name}/avg@k": sum(sum(c) / k for c in correct) / len(correct),
                    f"{name}/pass@k": sum(any(c) for c in correct) / len(correct),  # = 1 - C(k-c, k) / C(k, k)
                    f"{name}/mean_length": sum(n for _, n in rows) / len(rows)})
    return out  # the model stays in eval mode: the loop sets train mode before each learning step

# ==== Data and models: datasets by file or hub name, the chat template, stop ids ====================
DAPO = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.",
        'Remember to put your answer on its own line after "Answer:".')  # unwrap=dapo: `instruction` asks instead

def parse_specs(text: str, cfg: Config, split: str, k: int = 1, limit: int = 0) -> list[dict]:
    """`[name=]source[key=value, ...]`, comma-separated, e.g. `aime24=HuggingFaceH4/aime_2024[split=train, k=32]`;
    keys split, subset, prompt, answer (columns; a.b: field b of struct column a), k, limit, unwrap=dapo."""
    specs, allowed = [], {"split": ".+", "subset": ".+", "prompt": ".+", "answer": ".+", "k": r"[1-9]\d*",
                          "limit": r"\d+", "unwrap": "dapo"}
    for entry in filter(None, map(str.strip, re.split(r"[,\n](?![^\[]*\])", text))):  # not inside [...]
        m = re.fullmatch(r"(?:([^/\\\s=\[]+)=)?([^\[]*?[^\[=\s])\s*(?:\[(.*)\])?", entry, re.S)
        if m is None:
            sys.exit(f"error: dataset {entry!r}: write it as [name=]source[key=value, ...]")
        specs.append(dict(name=m[1] or re.sub(r"\.(jsonl?|parquet)$", "", os.path.basename(m[2].rstrip("/"))),
                          source=m[2], split=split, subset="", prompt=cfg.prompt_field, answer=cfg.answer_field,
                          k=k, limit=limit, unwrap=""))
        for key, _, value in (map(str.strip, o.partition("=")) for o in (m[3] or "").split(",") if o.strip()):
            if not re.fullmatch(allowed.get(key, "(?!)"), value):
                sys.exit(f"error: dataset {entry!r}: {key}={value!r} is not one of split=, subset=, prompt=, "
                         "answer=, k=(>= 1), limit=(>= 0), unwrap=dapo")
            specs[-1][key] = int(value) if key in ("k", "limit") else value
    return specs

def load_problems(spec: dict) -> list[dict]:
    """{"prompt", "answer"} strings from a json/jsonl/parquet file or a hub dataset: a chat prompt keeps its user
    turns, unwrap=dapo strips DAPO's answer format, 55.0 becomes "55"; incomplete and repeated rows drop."""
    from datasets import load_dataset
    src, local = spec["source"], spec["source"].endswith((".json", ".jsonl", ".parquet"))
    try:  # flatten(): a struct column a with field b becomes column a.b
        ds = (load_dataset("parquet" if src.endswith(".parquet") else "json", data_files=src, split="train") if local
              else load_dataset(src, spec["subset"] or None, split=spec["split"])).flatten()
    except Exception as err:  # noqa: BLE001 - a missing file, an unknown or unreachable hub name, a bad split
        sys.exit(f"error: dataset {src!r} (split {spec['split']!r}) cannot be loaded: {err}; fix train_data/eval_data")
    if {spec["prompt"], spec["answer"]} - set(ds.column_names):
        sys.exit(f"error: {src!r} has columns {ds.column_names}; name the question and answer columns with "
                 "prompt=... / answer=... in its spec, or prompt_field / answer_field")
    problems, seen, columns = [], set(), [spec["prompt"], spec["answer"]]
    batches = ds.select_columns(list(dict.fromkeys(columns))).iter(batch_size=4096)  # 9x faster than by row
    for prompt, answer in (pair for batch in batches for pair in zip(batch[columns[0]], batch[columns[1]])):
        if isinstance(prompt, list):  # a chat
            prompt = "\n".join(m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user")
        if spec["unwrap"] and prompt:
            prompt = str(prompt).strip().removeprefix(DAPO[0]).removesuffix(DAPO[1]).strip()
        if isinstance(answer, float):  # AMC stores 55.0; NaN marks a missing number
            answer = None if math.isnan(answer) else int(answer) if answer.is_integer() else answer
        row = (str(prompt), str(answer).strip())
        if prompt and answer is not None and row[1] and row not in seen:
            seen.add(row)
            problems.append({"prompt": row[0], "answer": row[1]})
            if len(problems) == spec["limit"]:
                break
    if not problems:
        sys.exit(f"error: {src!r}: no row has both a prompt ({spec['prompt']}) and an answer ({spec['answer']})")
    return problems

def render(tok, question: str, cfg: Config) -> str:
    """The prompt as the model sees it: [system turn,] question + instruction, the assistant's turn opened."""
    content = question + cfg.instruction
    if not getattr(tok, "chat_template", None):
        return f"{cfg.system_prompt}\n\n{content}" if cfg.system_prompt else content
    messages = [{"role": "system", "content": cfg.system_prompt}] * bool(cfg.system_prompt)
    return tok.apply_chat_template(messages + [{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False, **yaml.safe_load(cfg.chat_template_kwargs or "{}"))

def step_prompts(problems: list[dict], step: int, n: int, rank: int, world: int, seed: int) -> list[dict]:
    """Batch of `step` for process `rank`: a seeded permutation per epoch, a pure function of the step."""
    out = []
    for j in range(n * world * step + n * rank, n * world * step + n * (rank + 1)):
        epoch, i = divmod(j, len(problems))
        perm = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(problems[perm[i].item()])
    return out

def load_model(path: str, gguf: str, dtype: torch.dtype):
    """(tokenizer, model) from a directory, a hub name or `pkg:<package>` (a checkpoint shipped inside an
    installed package), read from the GGUF file `gguf` there if given. Left padding: cached decoding."""
    found = importlib.util.find_spec(path[4:]) if path.startswith("pkg:") else None
    path, kw = os.path.dirname(found.origin) if found else path, {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, padding_side="left", **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except (OSError, ValueError) as err:  # no such directory or hub name, no network, a bad GGUF file
        sys.exit(f"error: cannot load a model from {path!r} (teacher / student): {err}")
    tok.pad_token = tok.pad_token or tok.eos_token  # base models often have none; pads are masked anyway
    return tok, model

def stop_ids(tok, model) -> list[int]:
    """EOS, the model's generation EOS ids, and the chat template's end-of-turn token: the first special
    token after an assistant message (a base model's EOS is not the <|im_end|> its template ends a turn with)."""
    ids = {tok.eos_token_id, *torch.tensor(model.generation_config.eos_token_id or []).reshape(-1).tolist()}
    with contextlib.suppress(Exception):  # a template that refuses this exchange has no such token
        text = tok.apply_chat_template([{"role": "user", "content": "1"}, {"role": "assistant", "content": "@@"}],
                                       tokenize=False)
        first = tok(text[text.rindex("@@") + 2:], add_special_tokens=False)["input_ids"][:1]
        ids.update(set(first) & {*tok.all_special_ids, *(i for i, t in tok.added_tokens_decoder.items() if t.special)})
    return sorted(i for i in ids if i is not None)

# ==== Main: sample -> detect -> learn -> log, with evaluation before and after ======================
def main(cfg: Config | None = None) -> list[dict]:
    cfg = cfg or parse_config(sys.argv[1:])
    dtype = getattr(torch, cfg.dtype if cfg.dtype != "auto" else "bfloat16" if torch.cuda.is_available() else "float32")
    acc = Accelerator(mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no"),
                      step_scheduler_with_optimizer=False)  # else the schedule advances once per process
    set_seed(cfg.seed)
    if os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl")) and not cfg.overwrite_output_dir:
        sys.exit(f"error: {cfg.output_dir!r} holds a run; use another --output_dir or --overwrite_output_dir true")
    os.makedirs(cfg.output_dir, exist_ok=True)

    # --- models: the student trains fp32 master weights; the frozen teacher runs in half precision on GPU
    tok, student = load_model(cfg.student, cfg.student_gguf, torch.float32)
    teacher_tok, teacher = load_model(cfg.teacher, cfg.teacher_gguf, dtype)
    if tok.get_vocab() != teacher_tok.get_vocab():  # OPD compares the two distributions id by id
        sys.exit("error: teacher and student tokenizers differ; use a teacher and a student of one model family")
    teacher = teacher.to(acc.device).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:  # acts in training mode only: sampling keeps its KV caches
        getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()  # new name
    eos = stop_ids(tok, student)

    # --- data: training prompts without the too long ones; evaluation sets, each with its own k
    problems = [p for s in parse_specs(cfg.train_data, cfg, cfg.train_split) for p in load_problems(s)]
    lengths = [len(x) for x in tok([render(tok, p["prompt"], cfg) for p in problems],
                                   add_special_tokens=False).input_ids]
    kept = [p for p, n in zip(problems, lengths) if n <= cfg.max_prompt_length]
    if len(kept) < len(problems):
        acc.print(f"warning: train_data: skipped {len(problems) - len(kept)} of {len(problems)} prompts longer than "
                  f"max_prompt_length={cfg.max_prompt_length} tokens")
    problems = kept or sys.exit(f"error: max_prompt_length: all prompts are longer than {cfg.max_prompt_length}")
    tests = {s["name"]: (s["k"], load_problems(s)) for s in parse_specs(cfg.eval_data, cfg, cfg.eval_split,
                                                                          cfg.eval_k, cfg.eval_limit)}
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * cfg.steps), cfg.steps)
    student, optimizer, scheduler = acc.prepare(student, optimizer, scheduler)
    terminator = {"kat": lambda: TrapDetector(cfg), "none": NoTerminator,
                  "random": lambda: RandomTerminator(cfg, cfg.seed + acc.process_index)}[cfg.termination]()
    rows = []

    def log(row: dict) -> None:
        rows.append(row)
        if "eval" in row:
            acc.print(f"{row['eval']}: {row}")
        if acc.is_main_process:
            with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a" if len(rows) > 1 else "w") as fh:
                fh.write(json.dumps(row) + "\n")

    # --- evaluate before training
    if tests:
        log({"step": 0, "eval": "before", **evaluate(student, tok, tests, cfg, acc, eos)})

    bar = tqdm(range(cfg.steps), desc="kat.py", disable=not acc.is_local_main_process)
    for step in bar:
        # --- 1. rollouts: the student samples, the teacher scores each chunk, the terminator cuts
        batch = step_prompts(problems, step, cfg.batch_size, acc.process_index, acc.num_processes, cfg.seed)
        texts = [render(tok, p["prompt"], cfg) for p in batch for _ in range(cfg.samples_per_prompt)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(acc.device)
        gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1_000_003 + step * 1009)
        threshold = terminator.threshold  # what this batch is judged against (end_batch moves it)
        student.eval()
        r, state = sample(acc.unwrap_model(student), teacher, enc["input_ids"], enc["attention_mask"].bool(),
                          terminator, cfg, torch.tensor(eos, device=acc.device), pad=tok.pad_token_id,
                          generator=gen, first=acc.process_index * len(texts),
                          world_rows=acc.num_processes * len(texts))
        student.train()

        # --- 2. detect: this batch's minima (from every process) move the threshold for the next one
        terminator.end_batch(state, step)

        # --- 3. learn: one step on the kept tokens
        stats = learn(student, teacher, r, optimizer, scheduler, acc, cfg)
        if not stats["finite"]:
            acc.print(f"step {step + 1}: non-finite loss; step skipped (check the models' dtype and weights)")

        # --- 4. log: sums over processes, then ratios
        m = r["completion_mask"]
        sums = {"tokens": m.sum(), "kl": (r["kl"] * m).sum(), "kept": r["loss_mask"].sum(),
                "cut": (r["stop"] > STOP_LENGTH).sum(), "rows": torch.tensor(m.shape[0], device=m.device)}
        sums = dict(zip(sums, acc.reduce(torch.stack(list(sums.values())).float(), "sum").tolist()))
        log({"step": step + 1, "loss": stats["loss"], "kl": sums["kl"] / max(sums["tokens"], 1),
             "threshold": threshold, "cut_rate": sums["cut"] / sums["rows"],
             "mean_length": sums["tokens"] / sums["rows"], "kept_length": sums["kept"] / sums["rows"]})
        bar.set_postfix(loss=f"{stats['loss']:.3f}", kl=f"{rows[-1]['kl']:.3f}", cut=f"{rows[-1]['cut_rate']:.2f}",
                        thr="-" if threshold is None else f"{threshold:.3f}", len=f"{rows[-1]['mean_length']:.0f}")
        if tests and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            log({"step": step + 1, "eval": "periodic", **evaluate(student, tok, tests, cfg, acc, eos)})

    # --- evaluate after; save the student (all processes gather a sharded one's weights) and KL traces
    if tests:
        log({"step": cfg.steps, "eval": "after", **evaluate(student, tok, tests, cfg, acc, eos)})
    state_dict = acc.get_state_dict(student)
    if acc.is_main_process:
        acc.unwrap_model(student).save_pretrained(os.path.join(cfg.output_dir, "student"), state_dict=state_dict)
        tok.save_pretrained(os.path.join(cfg.output_dir, "student"))
        plot_traces(r, threshold, cfg, os.path.join(cfg.output_dir, "kl_traces.png"))
    acc.wait_for_everyone()  # no process tears down the process group while another still saves
    student = acc.free_memory(student)[0]  # DDP first: its last hold on a gloo group can deadlock at exit
    acc.end_training()
    return rows

def plot_traces(r: dict, threshold: float | None, cfg: Config, path: str, n: int = 6):
    """d_t and window means z of the first rollouts, the threshold they were judged against, the cut. z
    is drawn at its window's START, where a cut lands; the log axis shows values below 1e-4 at 1e-4."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 1.7 * min(n, len(r["kl"])) + 0.5))
    axes = fig.subplots(min(n, len(r["kl"])), 1, sharex=True, squeeze=False)[:, 0]
    for b, ax in enumerate(axes):
        d = r["kl"][b, :int(r["completion_mask"][b].sum())].float().cpu()
        ax.plot(d.clamp(min=1e-4), lw=0.8, color="0.6", label="d_t, per-token reverse KL")
        if len(d) >= cfg.window:
            ax.plot(d.unfold(0, cfg.window, 1).mean(-1).clamp(min=1e-4), label=f"z: mean of the {cfg.window} d from t")
        if threshold is not None:
            ax.axhline(max(threshold, 1e-4), color="C3", ls="--", lw=1, label="threshold s this batch was judged by")
        if r["cut"][b] < len(d):
            ax.axvline(int(r["cut"][b]), color="k", lw=1.2, label="cut")
        ax.set(yscale="log", ylabel=f"rollout {b}\nnats")
    axes[-1].set_xlabel("completion position t")
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # the legend sits above the panels
    fig.savefig(path, dpi=100)
    return fig

if __name__ == "__main__":
    main()
