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

Deviations from / choices beyond the paper:
  - Loss `full` (exact reverse KL over the vocabulary) is the default here; the paper's top-64 + tail
    (`--loss topk`) and the sampled-token policy gradient (`--loss sampled`) are both available.
  - "4 consecutive windows" is ambiguous in the paper; `stride` sets how often z is evaluated
    (stride = W: non-overlapping windows, the paper-scale configs' choice).
  - The teacher scores C = `chunk` new tokens per cached forward (C = 1 is exact token lockstep), so
    a trap is stopped within C tokens of its confirmation at close to prefill cost.
  - `--rule zscore` gives the review's reading of the threshold: running mean - kappa * std of z.
  - `--termination random` cuts at random positions calibrated to a target mean length (the
    length-matched control the paper lacks); `--shadow true` detects without cutting.

Run (the package `kat/` holds the same maths for import and multi-GPU use; tests check both agree):
    accelerate launch kat.py                                   # toy world, CPU, a few minutes
    accelerate launch kat.py --config configs/qwen3_1.7b.yaml   # one GPU
    accelerate launch --multi_gpu --num_processes 8 kat.py --config configs/qwen3_1.7b.yaml
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 kat.py   # two CPU processes
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kat", "toy", "rich")
STOP_EOS, STOP_LENGTH, STOP_TRAP, STOP_RANDOM = 0, 1, 2, 3


# =====================================================================================================
# Config: defaults < --config FILE < --key value
# =====================================================================================================

@dataclass
class Config:
    teacher: str = os.path.join(TOY, "teacher")  # teacher model: local path or hub name
    student: str = os.path.join(TOY, "student")  # student model: local path or hub name
    train_data: str = os.path.join(TOY, "data", "train.jsonl")  # prompts: json/jsonl/parquet, `prompt`, `answer`
    eval_data: str = os.path.join(TOY, "data", "test.jsonl")  # evaluation problems (same schema); "": none
    steps: int = 30  # optimiser steps
    batch_size: int = 16  # prompts per step on each process
    samples_per_prompt: int = 4  # rollouts sampled per prompt
    max_new_tokens: int = 96  # completion length limit
    temperature: float = 1.0  # student sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling mass
    chunk: int = 8  # tokens per lockstep chunk C: the teacher scores C new tokens per cached forward
    loss: str = "full"  # OPD loss: full | topk | sampled
    topk: int = 64  # K for the topk loss
    micro_batch_size: int = 16  # rows per forward/backward; gradients accumulate over the step
    lr: float = 1e-3  # peak learning rate (cosine schedule, linear warm-up)
    warmup_ratio: float = 0.03  # share of steps with linear warm-up
    max_grad_norm: float = 1.0  # gradient clipping norm
    termination: str = "kat"  # kat | none | random
    rule: str = "quantile"  # threshold rule: quantile (paper) | zscore (running mean - kappa * std)
    window: int = 8  # W: tokens per window mean z
    stride: int = 4  # evaluate a window every `stride` tokens
    patience: int = 2  # consecutive low windows that confirm a trap
    exempt: int = 8  # E: windows starting before this position never count
    eta: float = 0.3  # threshold = (1 - eta) quantile of the minima buffer
    buffer_size: int = 1024  # FIFO size of per-rollout minima
    min_buffer: int = 128  # the detector stays off until the buffer holds this many minima
    warmup_steps: int = 5  # the detector stays off for this many steps
    kappa: float = 1.0  # zscore rule: threshold = mean - kappa * std
    ema: float = 0.1  # zscore rule: weight of each batch in the running mean/variance
    shadow: bool = False  # detect and record would-be cuts without cutting
    random_target_length: float = 0.0  # random termination: target mean length (0: max_new_tokens / 2)
    eval_k: int = 4  # samples per evaluation problem (avg@k, pass@k)
    eval_limit: int = 64  # evaluate on the first N problems (0: all)
    output_dir: str = "runs/kat_py"  # metrics.jsonl, kl_traces.png and the trained student go here
    grader: str = "exact"  # answer checker: exact (toy) | math (math-verify)
    seed: int = 0  # random seed
    dtype: str = "auto"  # teacher dtype / student mixed precision: auto | float32 | bfloat16 | float16


CHOICES = {"loss": ("full", "topk", "sampled"), "termination": ("kat", "none", "random"),
           "rule": ("quantile", "zscore"), "grader": ("exact", "math"),
           "dtype": ("auto", "float32", "bfloat16", "float16")}


def parse_config(argv: list[str]) -> Config:
    """`--config FILE` (YAML) then `--field value` / `--field=value` pairs; `--help` lists the fields."""
    source = open(__file__).read()  # each field's comment is its help text
    docs = dict(re.findall(r"^    (\w+): \w+ = .*?  # (.*)$", source[source.index("class Config"):], re.M))
    if "-h" in argv or "--help" in argv:
        sys.exit("usage: kat.py [--config FILE] [--field value ...]\n" + "\n".join(
            f"  --{f.name} ({f.default!r}): {docs[f.name]}" for f in fields(Config)))
    pairs, i = {}, 0
    while i < len(argv):
        key, eq, value = argv[i].removeprefix("--").replace("-", "_").partition("=")
        if not eq:  # "--key value", or a bare "--flag" meaning true
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            i, value = i + has_value, argv[i + 1] if has_value else "true"
        pairs[key], i = value, i + 1
    values = {}
    if "config" in pairs:
        with open(pairs.pop("config")) as fh:
            values = yaml.safe_load(fh) or {}
    values.update(pairs)
    types = {f.name: type(f.default) for f in fields(Config)}
    for key, value in values.items():
        if key not in types:
            sys.exit(f"error: unknown field {key!r}; kat.py --help lists them")
        if types[key] is bool and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        try:
            values[key] = types[key](value)
        except ValueError:
            sys.exit(f"error: {key}: expected {types[key].__name__}, got {value!r}")
        if values[key] not in CHOICES.get(key, (values[key],)):
            sys.exit(f"error: {key}: {value!r} is not one of {CHOICES[key]}")
    return Config(**values)


# =====================================================================================================
# Score: reverse KL and log-probs, fp16/bf16 logits in, fp32 accumulation, chunked over rows
# =====================================================================================================
# A (16k tokens x 152k vocab) fp32 buffer is 10 GB; chunks of rows keep each one near 64 MiB.

def chunk_rows(vocab: int) -> int:
    return max(1, (1 << 24) // vocab)


class ReverseKL(torch.autograd.Function):
    """d = sum_v p (log p - log q); backward recomputes p, q per chunk instead of storing them:
    dd/ds_j = p_j (log p_j - log q_j - d),   dd/dt_j = q_j - p_j."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, n: int) -> Tensor:  # s, t: (R, V) any float dtype
        out = torch.empty(s.shape[0], dtype=torch.float32, device=s.device)  # (R,)
        for i in range(0, s.shape[0], n):
            logp = torch.log_softmax(s[i:i + n].float(), -1)  # (r, V) fp32
            logq = torch.log_softmax(t[i:i + n].float(), -1)
            p = logp.exp()  # where p = 0 (a masked -inf logit) the term is 0, not 0 * inf
            out[i:i + n] = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)
        ctx.save_for_backward(s, t, out)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        s, t, kl = ctx.saved_tensors
        n, need_s, need_t = ctx.n, *ctx.needs_input_grad[:2]
        gs = torch.empty_like(s) if need_s else None
        gt = torch.empty_like(t) if need_t else None
        for i in range(0, s.shape[0], n):
            logp = torch.log_softmax(s[i:i + n].float(), -1)
            logq = torch.log_softmax(t[i:i + n].float(), -1)
            p, gi = logp.exp(), g[i:i + n].float().unsqueeze(-1)  # (r, V), (r, 1)
            if need_s:
                d = torch.where(p > 0, p * (logp - logq - kl[i:i + n].unsqueeze(-1)), 0.0)
                gs[i:i + n] = (gi * d).to(s.dtype)
            if need_t:
                gt[i:i + n] = (gi * (logq.exp() - p)).to(t.dtype)
        return gs, gt, None


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """(..., V) x (..., V) -> (...) float32: KL(student || teacher) at temperature 1.
    (F.kl_div(input, target) computes KL(target || input): the same value is
    kl_div(teacher_logp, student_logp, log_target=True).)"""
    V = student_logits.shape[-1]
    out = ReverseKL.apply(student_logits.reshape(-1, V), teacher_logits.reshape(-1, V), chunk_rows(V))
    return out.reshape(student_logits.shape[:-1])


class TokenLogp(torch.autograd.Function):
    """log softmax(x)[y] per row; d/dx = onehot(y) - softmax(x)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, n: int) -> Tensor:  # (R, V), (R,)
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], n):
            xi = x[i:i + n].float()
            out[i:i + n] = xi.gather(-1, y[i:i + n, None]).squeeze(-1) - torch.logsumexp(xi, -1)
        ctx.save_for_backward(x, y)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y = ctx.saved_tensors
        grad = torch.empty_like(x)
        for i in range(0, x.shape[0], ctx.n):
            gi = g[i:i + ctx.n].float().unsqueeze(-1)
            chunk = -gi * torch.softmax(x[i:i + ctx.n].float(), -1)
            grad[i:i + ctx.n] = chunk.scatter_add_(-1, y[i:i + ctx.n, None], gi).to(x.dtype)
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
    s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    ids = torch.empty(s.shape[0], k, dtype=torch.long, device=s.device)
    out = torch.empty(s.shape[0], k + 1, dtype=torch.float32, device=s.device)
    for i in range(0, s.shape[0], n):
        ids[i:i + n] = s[i:i + n].topk(k, -1).indices
        logq = torch.log_softmax(t[i:i + n].float(), -1)  # (r, V)
        out[i:i + n, :k] = logq.gather(-1, ids[i:i + n])
        out[i:i + n, k] = torch.logsumexp(logq.scatter(-1, ids[i:i + n], float("-inf")), -1)
    return ids.reshape(*student_logits.shape[:-1], k), out.reshape(*student_logits.shape[:-1], k + 1)


# =====================================================================================================
# Sample: the student decodes C tokens, the teacher scores them in one cached forward, the terminator
# looks at the chunk, and rows that ended leave both KV caches.
# =====================================================================================================

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


def forward(model, ids: Tensor, mask: Tensor, positions: Tensor, cache, keep: int = 0):
    """HF causal LM forward with an explicit mask and position ids (prompts are left-padded)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=keep)
    return out.logits, out.cache


@torch.no_grad()
def sample(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, terminator, cfg: Config,
           eos: Tensor, pad: int, generator: torch.Generator, first: int = 0,
           world_rows: int | None = None, score: bool = True) -> tuple[dict, object]:
    """Lockstep chunked decoding. The teacher's output at token t predicts t+1, so a chunk's teacher
    logits are the carried last logits plus the first C-1 outputs of its forward over the chunk.
    score=False (no KL-driven terminator, `full` loss): the teacher never runs here, the learner's
    teacher pass yields the KL; kl / student_logp / teacher_logp stay NaN ("scored" False)."""
    B, dev, T_max = prompt_ids.shape[0], prompt_ids.device, cfg.max_new_tokens
    world_rows = world_rows or B  # rows first..first+B-1 of the batch over all processes
    lockstep = terminator.needs_kl
    posthoc = score and not lockstep  # one teacher forward over the finished rollouts
    state = terminator.start(B, device=dev)
    out = {k: torch.full((B, T_max), 0.0 if lockstep or posthoc else float("nan"), device=dev)
           for k in ("kl", "student_logp", "teacher_logp")}
    ids = torch.full((B, T_max), pad, dtype=torch.long, device=dev)  # (B, T)
    gen_mask = torch.zeros(B, T_max, dtype=torch.bool, device=dev)  # (B, T)
    stop = torch.full((B,), STOP_LENGTH, dtype=torch.long, device=dev)
    cut = torch.full((B,), -1, dtype=torch.long, device=dev)
    held = []  # without lockstep: (rows, t0, student chunk logits) scored after decoding

    rows = torch.arange(B, device=dev)  # original row of each active row
    attn = prompt_mask.long()  # (A, P + t)
    pos = attn.sum(-1)  # (A,) position id of the next token
    prefill_pos = (attn.cumsum(-1) - 1).clamp(min=0)
    s_last, s_cache = forward(student, prompt_ids, attn, prefill_pos, None, keep=1)
    s_last, t_cache, t_last = s_last[:, -1], None, None  # (A, V)
    K = min(cfg.topk, s_last.shape[-1]) if cfg.loss == "topk" else 0  # K >= V: the whole vocabulary
    topk_ids = torch.zeros(B, T_max, K, dtype=torch.long, device=dev) if K else None
    topk_logq = torch.zeros(B, T_max, K + 1, device=dev) if K else None
    if lockstep:
        t_last, t_cache = forward(teacher, prompt_ids, attn, prefill_pos, None, keep=1)
        t_last = t_last[:, -1]
    t = 0
    while rows.numel() > 0:
        c, A = min(cfg.chunk, T_max - t), rows.numel()
        alive = torch.ones(A, dtype=torch.bool, device=dev)
        tokens = torch.full((A, c), pad, dtype=torch.long, device=dev)  # (A, c)
        valid = torch.zeros(A, c, dtype=torch.bool, device=dev)  # (A, c)
        s_chunk = []
        for j in range(c):  # --- the student samples c tokens (pads after its EOS, masked out)
            u = torch.rand(world_rows, generator=generator, device=generator.device).to(dev)[first + rows] \
                if cfg.temperature > 0 else None  # one uniform per row of the GLOBAL batch
            token = sample_token(s_last, u, cfg.temperature, cfg.top_p)  # (A,)
            tokens[:, j], valid[:, j] = torch.where(alive, token, pad), alive
            alive = alive & ~torch.isin(token, eos)
            if lockstep or posthoc:  # unscored rollouts keep no student logits
                s_chunk.append(s_last)
            attn = torch.cat([attn, valid[:, j:j + 1].long()], 1)
            if t + j + 1 < T_max:
                s_last, s_cache = forward(student, tokens[:, j:j + 1], attn, (pos + j)[:, None], s_cache)
                s_last = s_last[:, -1]
        ids[rows, t:t + c], gen_mask[rows, t:t + c] = tokens, valid
        kl_full = torch.zeros(B, c, device=dev)
        if lockstep:  # --- the teacher reads the chunk in one cached forward; score it
            t_out, t_cache = forward(teacher, tokens, attn, pos[:, None] + torch.arange(c, device=dev), t_cache)
            t_chunk = torch.cat([t_last[:, None], t_out[:, :-1]], 1)  # (A, c, V) positions t..t+c-1
            t_last = t_out[:, -1]
            score_into(out, topk_ids, topk_logq, rows, t, torch.stack(s_chunk, 1), t_chunk, tokens, valid)
            kl_full[rows] = out["kl"][rows, t:t + c]
        elif posthoc:
            held.append((rows, t, torch.stack(s_chunk, 1)))  # (A, c, V)
        pos = pos + c
        ended = ~alive | (t + c >= T_max)  # --- which rows end: EOS, length, or the terminator
        stop[rows[~alive]] = STOP_EOS
        valid_full = torch.zeros(B, c, dtype=torch.bool, device=dev)
        valid_full[rows] = valid
        fired, fired_cut = terminator.observe(state, kl_full, valid_full)
        fired = fired[rows]
        stop[rows[fired]], cut[rows[fired]] = terminator.stop_code or 0, fired_cut[rows[fired]]
        ended |= fired
        t += c
        if ended.any():  # --- ended rows leave both caches: later chunks cost less
            keep = (~ended).nonzero().squeeze(-1)
            for cache in (s_cache, t_cache):
                if cache is not None:
                    cache.batch_select_indices(keep)
            rows, attn, pos, s_last = rows[keep], attn[keep], pos[keep], s_last[keep]
            t_last = t_last[keep] if t_last is not None else None
    T = int(gen_mask.sum(-1).max())
    if posthoc:  # one teacher forward over the finished sequences
        full = torch.cat([prompt_mask.long(), gen_mask[:, :T].long()], 1)
        t_logits, _ = forward(teacher, torch.cat([prompt_ids, ids[:, :T]], 1), full,
                              (full.cumsum(-1) - 1).clamp(min=0), None, keep=T + 1)
        for r, t0, s_chunk in held:
            c = min(s_chunk.shape[1], T - t0)
            score_into(out, topk_ids, topk_logq, r, t0, s_chunk[:, :c], t_logits[r, t0:t0 + c],
                       ids[r, t0:t0 + c], gen_mask[r, t0:t0 + c])
    lengths = gen_mask.sum(-1)
    cut = torch.where(cut < 0, lengths, cut)
    rollout = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids[:, :T],
                   completion_mask=gen_mask[:, :T], stop=stop, cut=cut,
                   loss_mask=gen_mask[:, :T] & (torch.arange(T, device=dev) < cut[:, None]),
                   topk_ids=None if topk_ids is None else topk_ids[:, :T],
                   teacher_topk_logp=None if topk_logq is None else topk_logq[:, :T],
                   shadow_cut=state.would_cut.clone() if terminator.shadow else None,
                   scored=lockstep or posthoc, **{k: v[:, :T] for k, v in out.items()})
    return rollout, state


def score_into(out: dict, topk_ids, topk_logq, rows: Tensor, t0: int, s: Tensor, t: Tensor,
               tokens: Tensor, valid: Tensor) -> None:
    """d_t, log p(y_t), log q(y_t) (and top-k + tail) of one chunk, at temperature 1, 0 where invalid."""
    c = tokens.shape[1]
    for key, value in (("kl", reverse_kl(s, t)), ("student_logp", token_logp(s, tokens)),
                       ("teacher_logp", token_logp(t, tokens))):
        bad = valid & ~value.isfinite()
        if bad.any():
            where = [(int(rows[a]), t0 + int(b)) for a, b in bad.nonzero().tolist()][:8]
            raise FloatingPointError(f"non-finite {key} at (row, position) {where}: check the models' "
                                     "dtype (fp16 overflow: use bf16 or fp32) and weights")
        out[key][rows, t0:t0 + c] = torch.where(valid, value, 0.0)
    if topk_ids is not None:
        k_ids, k_logq = topk_tail(s, t, topk_ids.shape[-1])
        topk_ids[rows, t0:t0 + c] = torch.where(valid[..., None], k_ids, 0)
        topk_logq[rows, t0:t0 + c] = torch.where(valid[..., None], k_logq, 0.0)


# =====================================================================================================
# Detect: KAT's trap detector, and the two controls behind the same interface
#   state = t.start(B); fired, cut = t.observe(state, kl_chunk, valid_chunk); t.end_batch(state, step)
# =====================================================================================================

class State:
    """Per-batch running state: `fired`, `cut` (-1: none), `would_cut` (what a shadow run would cut)."""

    def __init__(self, B: int, dev, **extra):
        self.fired = torch.zeros(B, dtype=torch.bool, device=dev)
        self.cut = torch.full((B,), -1, dtype=torch.long, device=dev)
        self.would_cut = self.cut.clone()
        self.pos, self.active, self.threshold = 0, False, None
        self.__dict__.update(extra)


def gather_cat(x: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of any length from every process (rank order), returned on the CPU."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x.cpu()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    x, world = x.to(dev), dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.numel()], device=dev))
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), dtype=x.dtype, device=dev)
    padded[:x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


class TrapDetector:
    """z_t = mean(d_{t-W+1..t}), evaluated when (t+1) % stride == 0 and t+1 >= W over fully generated
    windows. Active (fixed per batch) once the buffer holds min_buffer minima and warmup_steps passed;
    windows starting before `exempt` never count; `patience` consecutive z < s fire, cut = the start
    of the run's first window. quantile: s = Q_{1-eta}(B); zscore: s = mean - kappa * std (EMA)."""

    needs_kl, stop_code = True, STOP_TRAP

    def __init__(self, cfg: Config):
        self.c, self.shadow = cfg, cfg.shadow
        self.buffer = torch.empty(0, dtype=torch.float64)  # FIFO of per-rollout minima
        self.steps_done, self.z_mean, self.z_var = 0, None, None

    @property
    def threshold(self) -> float | None:
        if self.c.rule == "quantile":  # torch's default linear interpolation = numpy's default quantile
            return torch.quantile(self.buffer, 1 - self.c.eta).item() if self.buffer.numel() else None
        return None if self.z_mean is None else self.z_mean - self.c.kappa * math.sqrt(self.z_var)

    @property
    def active(self) -> bool:
        return (self.buffer.numel() >= self.c.min_buffer and self.steps_done >= self.c.warmup_steps
                and self.threshold is not None)

    def start(self, B: int, device=None) -> State:
        z = lambda dtype, fill=0: torch.full((B,), fill, dtype=dtype, device=device)  # noqa: E731
        st = State(B, device, ring=torch.zeros(B, self.c.window, dtype=torch.float64, device=device),
                   ring_ok=torch.zeros(B, self.c.window, dtype=torch.bool, device=device),
                   run=z(torch.long), run_start=z(torch.long, -1), decided=z(torch.bool),
                   min_z=z(torch.float64, math.inf), z_values=[])
        st.active, st.threshold = self.active, self.threshold
        return st

    def observe(self, st: State, kl: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        W, fired_now = self.c.window, torch.zeros_like(st.fired)
        for j in range(kl.shape[1]):
            t, live = st.pos, valid[:, j] & ~st.fired
            st.ring[:, t % W] = torch.where(live, kl[:, j].double(), 0.0)  # the last W values of d
            st.ring_ok[:, t % W] = live
            st.pos += 1
            if (t + 1) % self.c.stride == 0 and t + 1 >= W:
                fired_now |= self.window_done(st, t)
        return fired_now, st.cut

    def window_done(self, st: State, t: int) -> Tensor:
        ok = st.ring_ok.all(-1)  # (B,) all W positions generated
        z = st.ring.sum(-1) / self.c.window  # (B,)  z_t = (1/W) sum_{i=t-W+1..t} d_i
        st.min_z = torch.where(ok, torch.minimum(st.min_z, z), st.min_z)
        st.z_values.append(z[ok])
        start = t - self.c.window + 1
        if not st.active or start < self.c.exempt:
            return torch.zeros_like(ok)
        decide, low = ok & ~st.decided, z < st.threshold
        run = torch.where(low, st.run + 1, 0)  # a window with z >= s resets the run
        st.run = torch.where(decide, run, st.run)
        st.run_start = torch.where(decide & low & (run == 1), start, st.run_start)
        fire = decide & (st.run >= self.c.patience)
        st.decided |= fire
        st.would_cut = torch.where(fire, st.run_start, st.would_cut)
        if self.shadow:  # record, never stop
            return torch.zeros_like(fire)
        st.fired |= fire
        st.cut = torch.where(fire, st.run_start, st.cut)
        return fire

    def end_batch(self, st: State, step: int) -> None:
        """Minima of every process join the FIFO buffer, so every process holds one threshold."""
        self.buffer = torch.cat([self.buffer, gather_cat(st.min_z[st.min_z < math.inf])])[-self.c.buffer_size:]
        if self.c.rule == "zscore":
            z = gather_cat(torch.cat(st.z_values) if st.z_values else torch.empty(0, dtype=torch.float64))
            if z.numel():
                m, v, a = z.mean().item(), z.var(unbiased=False).item(), self.c.ema
                self.z_mean, self.z_var = (m, v) if self.z_mean is None else \
                    ((1 - a) * self.z_mean + a * m, (1 - a) * self.z_var + a * v)
        self.steps_done = step + 1


class RandomTerminator:
    """Length-matched control: cut = exempt + G, G geometric with hazard h, P(G >= g) = (1-h)^g;
    after each batch h <- h * clamp((mean_len - E) / (target - E), 1/4, 4) ** 0.5."""

    needs_kl, stop_code, shadow, threshold, active = False, STOP_RANDOM, False, None, True

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

    def observe(self, st: State, kl: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
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

    needs_kl, stop_code, shadow, threshold, active = False, None, False, None, False

    def start(self, B: int, device=None) -> State:
        return State(B, device)

    def observe(self, st: State, kl: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        st.pos += kl.shape[1]
        return torch.zeros_like(st.fired), st.cut

    def end_batch(self, st: State, step: int) -> None:
        pass


# =====================================================================================================
# Learn: the OPD loss on the kept tokens, normalised by the global token count
# =====================================================================================================

def completion_logits(model, r: dict) -> Tensor:
    """(B, T, V) logits predicting each completion token: one forward over prompt + completion; the
    logits at column P-1+t predict token t, so keep the last T+1 columns and drop the final one."""
    T = r["completion_ids"].shape[1]
    ids = torch.cat([r["prompt_ids"], r["completion_ids"]], 1)  # (B, P + T)
    mask = torch.cat([r["prompt_mask"], r["completion_mask"]], 1).long()
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False, logits_to_keep=T + 1)
    return out.logits[:, -(T + 1):-1]


def token_losses(logits: Tensor, r: dict, kind: str, teacher_logits: Tensor | None) -> Tensor:
    """Per-token OPD loss (B, T), 0 outside loss_mask."""
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
    elif kind == "sampled":  # -exp(logp - logp_old) * A_t,  A_t = -(logp_old - teacher_logp)
        logp_old = torch.where(m, r["student_logp"], 0.0)
        advantage = -(logp_old - torch.where(m, r["teacher_logp"], 0.0))
        loss = -torch.exp(token_logp(logits, torch.where(m, r["completion_ids"], 0)) - logp_old) * advantage
    else:
        raise ValueError(f"loss must be one of {CHOICES['loss']}, got {kind!r}")
    return torch.where(m, loss, 0.0)


def opd_loss(logits: Tensor, r: dict, kind: str, teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum of the per-token loss over loss_mask, number of those tokens)."""
    return token_losses(logits, r, kind, teacher_logits).sum(), r["loss_mask"].sum()


def learn(student, teacher, r: dict, optimizer, scheduler, acc: Accelerator, cfg: Config) -> dict:
    """One optimiser step in micro-batches. Each adds grad(sum_t l_t / N * processes), N = kept tokens on
    ALL processes (DDP averages over processes), so neither micro-batching nor the number of processes
    changes the update. A non-finite loss anywhere skips the step on every process."""
    n = acc.reduce(r["loss_mask"].sum().float(), "sum").item()
    if n == 0 and cfg.loss != "full":
        return {"loss": 0.0, "grad_norm": 0.0, "finite": True, "bad_rows": []}
    B = r["completion_ids"].shape[0]
    starts, total, bad = list(range(0, B, cfg.micro_batch_size)), torch.zeros((), device=acc.device), []
    kls = []  # full loss: d_t at every generated position, the rollout's KL when sampled unscored
    for i in starts:
        mb = {k: v[i:i + cfg.micro_batch_size] if isinstance(v, Tensor) else v for k, v in r.items()}
        with contextlib.nullcontext() if i == starts[-1] else acc.no_sync(student), torch.set_grad_enabled(n > 0):
            logits = completion_logits(student, mb)  # (b, T, V)
            if cfg.loss == "full":  # the per-token loss IS d_t, the teacher a constant target
                with torch.no_grad():
                    t_logits = completion_logits(teacher, mb)  # (b, T, V)
                kl = reverse_kl(logits, t_logits)  # (b, T)
                kls.append(torch.where(mb["completion_mask"], kl.detach(), 0.0))
                row_loss = torch.where(mb["loss_mask"], kl, 0.0).sum(-1)  # (b,)
            else:
                row_loss = token_losses(logits, mb, cfg.loss, None).sum(-1)  # (b,)
            if n > 0:
                acc.backward(row_loss.sum() / n * acc.num_processes)
        bad += (torch.nonzero(~row_loss.detach().isfinite()).squeeze(-1) + i).tolist()
        total += row_loss.sum().detach()
    extra = {"token_kl": torch.cat(kls)} if kls else {}
    if n == 0:  # nothing kept anywhere: no step (every process skips alike)
        return {"loss": 0.0, "grad_norm": 0.0, "finite": True, "bad_rows": [], **extra}
    loss = acc.reduce(total, "sum").item() / n
    if acc.reduce(torch.tensor(float(len(bad)), device=acc.device), "sum").item() > 0:
        optimizer.zero_grad(set_to_none=True)  # never step on NaN: report and skip
        return {"loss": loss, "grad_norm": float("nan"), "finite": False, "bad_rows": bad, **extra}
    grad_norm = float(acc.clip_grad_norm_(student.parameters(), cfg.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "finite": True, "bad_rows": [], **extra}


# =====================================================================================================
# Evaluate: avg@k = mean accuracy of k samples per problem; pass@k = share of problems with one correct
# (with n = k samples the unbiased estimator 1 - C(n-c, k) / C(n, k) is exactly that)
# =====================================================================================================

def grade(text: str, answer: str, grader: str = "exact") -> bool:
    """exact: the integer after the last `A=` (the toy); math: math-verify on boxed/LaTeX answers.
    An answer that cannot be read is wrong, never a crash."""
    if grader == "exact":
        found = re.findall(r"A=(-?\d+)", text)
        return bool(found) and str(int(found[-1])) == answer.strip()
    try:
        from math_verify import parse, verify
        return bool(verify(parse(answer, parsing_timeout=None), parse(text, parsing_timeout=None),
                           timeout_seconds=None))
    except Exception:  # noqa: BLE001
        return False


@torch.no_grad()
def evaluate(model, tok, problems: list[dict], cfg: Config, acc: Accelerator) -> dict:
    mine = problems[acc.process_index::acc.num_processes]  # each process evaluates its share
    model, rows = acc.unwrap_model(model).eval(), []
    torch.manual_seed(cfg.seed + acc.process_index)
    for i in range(0, len(mine), 16):
        batch = mine[i:i + 16]
        texts = [render(tok, p["prompt"]) for p in batch for _ in range(cfg.eval_k)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(acc.device)
        gen = model.generate(**enc, do_sample=True, temperature=cfg.temperature or 1.0, top_p=cfg.top_p, top_k=None,
                             max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        lengths = (new != tok.pad_token_id).sum(-1).tolist()
        outs = tok.batch_decode(new, skip_special_tokens=True)
        for j, p in enumerate(batch):
            sl = slice(j * cfg.eval_k, (j + 1) * cfg.eval_k)
            rows.append(([grade(o, str(p["answer"]), cfg.grader) for o in outs[sl]], lengths[sl]))
    model.train()
    rows = acc.gather_for_metrics(rows, use_gather_object=True)
    return {"avg@k": sum(sum(c) / len(c) for c, _ in rows) / len(rows),
            "pass@k": sum(any(c) for c, _ in rows) / len(rows),
            "mean_length": sum(sum(n) for _, n in rows) / sum(len(n) for _, n in rows)}


# =====================================================================================================
# Main: sample -> detect -> learn -> log, with evaluation before and after
# =====================================================================================================

def render(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)


def read_problems(path: str, limit: int = 0) -> list[dict]:
    from datasets import load_dataset
    ds = load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train")
    return [dict(prompt=p, answer=str(a)) for p, a in zip(ds["prompt"], ds["answer"])][:limit or None]


def step_prompts(problems: list[dict], step: int, n: int, rank: int, world: int, seed: int) -> list[dict]:
    """Batch of `step` for process `rank`: a seeded permutation per epoch, a pure function of the step."""
    out = []
    for j in range(n * world * step + n * rank, n * world * step + n * (rank + 1)):
        epoch, i = divmod(j, len(problems))
        perm = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(problems[perm[i].item()])
    return out


def main(cfg: Config | None = None) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    cfg = cfg or parse_config(sys.argv[1:])
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, cfg.dtype) if cfg.dtype != "auto" else (torch.bfloat16 if cuda else torch.float32)
    acc = Accelerator(mixed_precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no"),
                      step_scheduler_with_optimizer=False)  # else the schedule advances once per process
    set_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)

    # --- models: trained student (fp32 master weights); frozen teacher in the compute dtype (fp16/bf16
    # on GPU: the KL maths upcasts its logits chunk by chunk, so half precision costs no accuracy)
    tok = AutoTokenizer.from_pretrained(cfg.student, padding_side="left")
    tok.pad_token = tok.pad_token or tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=dtype).to(acc.device).eval().requires_grad_(False)
    eos = torch.tensor([tok.eos_token_id], device=acc.device)
    problems = read_problems(cfg.train_data)
    tests = read_problems(cfg.eval_data, cfg.eval_limit) if cfg.eval_data else []
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * cfg.steps), cfg.steps)
    student, optimizer, scheduler = acc.prepare(student, optimizer, scheduler)
    terminator = {"kat": lambda: TrapDetector(cfg), "none": NoTerminator,
                  "random": lambda: RandomTerminator(cfg, cfg.seed + acc.process_index)}[cfg.termination]()

    # --- evaluate before training
    log, rows = os.path.join(cfg.output_dir, "metrics.jsonl"), []
    if tests:
        rows.append({"step": 0, "eval": "before", **evaluate(student, tok, tests, cfg, acc)})
        acc.print(f"before: {rows[-1]}")

    bar = tqdm(range(cfg.steps), desc="kat.py", disable=not acc.is_local_main_process)
    for step in bar:
        # --- 1. rollouts: the student samples, the teacher scores each chunk, the terminator cuts
        batch = step_prompts(problems, step, cfg.batch_size, acc.process_index, acc.num_processes, cfg.seed)
        texts = [render(tok, p["prompt"]) for p in batch for _ in range(cfg.samples_per_prompt)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(acc.device)
        gen = torch.Generator(device=acc.device).manual_seed(cfg.seed * 1_000_003 + step * 1009)
        threshold = terminator.threshold
        score = cfg.loss != "full" or terminator.needs_kl  # else the learner's teacher pass gives the KL
        student.eval()
        r, state = sample(acc.unwrap_model(student), teacher, enc["input_ids"], enc["attention_mask"].bool(),
                          terminator, cfg, eos, tok.pad_token_id, gen, acc.process_index * len(texts),
                          acc.num_processes * len(texts), score)
        student.train()

        # --- 2. detect: this batch's minima (from every process) move the threshold for the next one
        terminator.end_batch(state, step)

        # --- 3. learn: one step on the kept tokens
        stats = learn(student, teacher, r, optimizer, scheduler, acc, cfg)
        if not score:
            r["kl"] = stats["token_kl"]

        # --- 4. log: sums over processes, then ratios
        m = r["completion_mask"]
        s = acc.reduce(torch.stack([m.sum(), (r["kl"] * m).sum(), r["loss_mask"].sum(),
                                    ((r["stop"] > STOP_LENGTH).sum()), torch.tensor(m.shape[0], device=m.device)])
                       .float(), "sum").tolist()
        rows.append({"step": step + 1, "loss": stats["loss"], "kl": s[1] / max(s[0], 1), "threshold": threshold,
                     "cut_rate": s[3] / s[4], "mean_length": s[0] / s[4], "kept_length": s[2] / s[4]})
        bar.set_postfix(loss=f"{stats['loss']:.3f}", kl=f"{rows[-1]['kl']:.3f}", cut=f"{rows[-1]['cut_rate']:.2f}",
                        thr="-" if threshold is None else f"{threshold:.3f}", len=f"{rows[-1]['mean_length']:.0f}")
        if acc.is_main_process:
            with open(log, "a" if step else "w") as fh:
                fh.write(json.dumps(rows[-1]) + "\n")

    # --- evaluate after, save the student and a picture of the last batch's KL traces
    if tests:
        rows.append({"step": cfg.steps, "eval": "after", **evaluate(student, tok, tests, cfg, acc)})
        acc.print(f"after: {rows[-1]}")
    acc.wait_for_everyone()
    if acc.is_main_process:
        acc.unwrap_model(student).save_pretrained(os.path.join(cfg.output_dir, "student"))
        tok.save_pretrained(os.path.join(cfg.output_dir, "student"))
        plot_traces(r, terminator, cfg, os.path.join(cfg.output_dir, "kl_traces.png"))
    acc.end_training()
    return rows


def plot_traces(r: dict, terminator, cfg: Config, path: str, n: int = 6) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(n, 1, figsize=(10, 1.8 * n), sharex=True)
    for b, ax in enumerate(axes[:r["kl"].shape[0]]):
        d = r["kl"][b, :int(r["completion_mask"][b].sum())].cpu()
        ax.plot(d, lw=0.8, color="0.6", label="d_t")
        if d.numel() >= cfg.window:
            ax.plot(range(cfg.window - 1, d.numel()), d.unfold(0, cfg.window, 1).mean(-1), color="C0", label="z_t")
        if terminator.threshold is not None:
            ax.axhline(terminator.threshold, color="C3", ls="--", lw=1, label="threshold")
        if r["cut"][b] < d.numel():
            ax.axvline(int(r["cut"][b]), color="k", lw=1.2, label="cut")
        ax.set_yscale("symlog", linthresh=0.05)
    axes[0].legend(fontsize=7, ncol=4)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
