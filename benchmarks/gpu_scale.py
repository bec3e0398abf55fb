"""Speed and memory at the paper's per-GPU shape: a Qwen3-8B teacher and a Qwen3-1.7B student.

    python benchmarks/gpu_scale.py --out docs/results/gpu_scale     # one GPU; fits in ~6 minutes
    python benchmarks/gpu_scale.py --tiny                          # the same code on CPU, tiny models

Both models are built with random weights from the exact architectures in configs/models/ (nothing
is downloaded) in bf16, and the shape is the paper's per GPU: 4 prompts x 2 samples = 8 rows,
1024-token prompts, up to 4096 new tokens, chunk 64. Random weights never emit EOS, so every row
runs to its budget (EOS is disabled); a stand-in terminator that cuts a set share of rows at
random positions takes the place of KAT's decisions (their positions do not matter for cost, only
how many tokens are generated and trained).

Sections, each a table whose ratios are against a baseline measured in the same run:

1. decode: student tokens per second, `kat.sampler.sample` (student alone, unscored) vs
   `model.generate` with the same dynamic cache and sampling settings; on CUDA both also with the
   other attention choice (the sampler's decode loop leaves cuDNN attention out, generate keeps
   PyTorch's choice); the student as `kat.train` samples it (fp32 master weights under bf16
   autocast) and, last and only if time is left, `generate` with a static cache compiled by
   torch.compile.
2. teacher: teacher time inside `sample` in lockstep (chunk 1, 8, 64) vs post-hoc scoring (one
   teacher forward over the finished rollout), with the largest KL difference between the two;
   then (phases) one post-hoc and one lockstep rollout timed phase by phase: model forwards,
   token draw, scoring, terminator, cache row selection, and what lies outside them.
3. learner: one `kat.learner.learn` step (micro-batch 1, AdamW) for the `topk` and `full` losses,
   with and without gradient checkpointing: time and peak memory beyond the models and optimiser.
0. engine (kat.engine, the slot caches): decode ms per step of the sampler's DynamicCache loop,
   the slot engine eager, the slot engine compiled with CUDA graphs (decode static; CUDA only) and
   `generate` with its static cache + compile (CUDA only), beside the floor: the student's bytes
   plus its KV cache read once, at the copy bandwidth measured in the same run; peak memory of each.
   engine_step: whole steps OPD vs the KAT stand-in with 4x the rows (N = 32) through S = 8 and
   S = 32 slots, with decode_steps and occupancy.
4. step: one whole OPD step (post-hoc scoring, loss topk) and one OPD + KAT step (lockstep chunk
   64, the stand-in cutting 60% of rows), each with its rollout and learner phases and their peaks.

Decoding dominates a step. `--budget-s` bounds the whole run: sections that would not fit are
skipped, and the step section shortens its rollouts to what the measured decode speed allows
(each table says what it ran). Results go to stdout and, with `--out PREFIX`, to PREFIX.md and
PREFIX.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from rollout import ForwardTimer  # noqa: E402

MODELS = common.ROOT / "configs" / "models"
SECTIONS = ("decode", "teacher", "phases", "profile", "learner", "step", "compiled", "engine", "engine_step")
# profile: on request; engine first, so a short GPU loan measures the slot engine before anything else
DEFAULT_SECTIONS = ("engine", "engine_step", "decode", "teacher", "phases", "learner", "step", "compiled")
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=1024, max_position_embeddings=4096)


# ---------------------------------------------------------------------------------------------
# Set-up

@dataclass
class Shape:
    rows: int = 8  # 4 prompts x 2 samples
    prompt_len: int = 1024
    new_tokens: int = 4096  # the step section's rollout budget
    decode_tokens: int = 256  # rollout length of the decode and teacher sections
    chunk: int = 64
    topk: int = 64
    cut_rate: float = 0.6
    exempt: int = 128


@dataclass
class Run:
    device: torch.device
    dtype: torch.dtype
    shape: Shape
    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    results: dict = field(default_factory=dict)
    tables: list = field(default_factory=list)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    out: Path | None = None
    head: str = ""

    def emit(self, title: str, text: str) -> None:
        """Print a table and rewrite the output files, so a run stopped later keeps what it measured."""
        block = f"## {title}\n\n{text}\n"
        self.tables.append(block)
        print(block, flush=True)
        self.save()

    def save(self, footer: str = "") -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_suffix(".md").write_text(self.head + "\n\n" + "\n".join(self.tables) + "\n" + footer + "\n")
        self.out.with_suffix(".json").write_text(json.dumps(self.results, indent=1, default=str) + "\n")


def model_config(name: str, tiny: bool, layers: int | None = None):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(MODELS / f"{name}.json")
    if tiny:
        for key, value in TINY.items():
            setattr(cfg, key, value)
        cfg.num_hidden_layers = layers
    return cfg


def build_model(cfg, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights, created directly on the device (an 8B model initialises in seconds on a GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: rows run to their budget
    return model.eval()


def prompts(shape: Shape, vocab: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, prompt_len) random ids, left-padded to a common width: rows of a pair share a prompt and
    the 4 prompts have lengths from 3/4 of prompt_len up to prompt_len."""
    g = torch.Generator().manual_seed(seed)
    n_prompts = max(1, shape.rows // 2)
    lengths = torch.linspace(0.75 * shape.prompt_len, shape.prompt_len, n_prompts).round().long()
    ids = torch.zeros(shape.rows, shape.prompt_len, dtype=torch.long)
    mask = torch.zeros(shape.rows, shape.prompt_len, dtype=torch.bool)
    for p in range(n_prompts):
        seq = torch.randint(10, vocab, (int(lengths[p]),), generator=g)
        for r in (2 * p, 2 * p + 1):
            if r < shape.rows:
                ids[r, -len(seq):], mask[r, -len(seq):] = seq, True
    return ids.to(device), mask.to(device)


class RandomCuts:
    """Stands in for KAT on random weights: needs the KL while decoding (so the teacher runs in
    lockstep, as under KAT) and runs the real detector's bookkeeping, but cuts each row with
    probability `rate` at a uniform position in [exempt, max_new_tokens)."""

    needs_kl, shadow = True, False

    def __init__(self, rate: float, exempt: int, max_new_tokens: int, seed: int, window: int = 64):
        self.rate, self.exempt, self.max_new_tokens, self.seed = rate, exempt, max_new_tokens, seed
        detector = common.import_kat("terminators")
        self.stop_code = common.import_kat("rollout").STOP_TRAP
        self.detector = detector.TrapDetector(window=window, stride=window, exempt=exempt)  # never active

    def start(self, batch_size: int, device=None):
        state = self.detector.start(batch_size, device=device)
        g = torch.Generator().manual_seed(self.seed)
        planned = torch.randint(self.exempt, self.max_new_tokens, (batch_size,), generator=g)
        planned[torch.rand(batch_size, generator=g) >= self.rate] = self.max_new_tokens + 1  # never cut
        state._planned = planned.to(device)
        return state

    def observe(self, state, kl_chunk: torch.Tensor, valid_chunk: torch.Tensor):
        end = state.pos + kl_chunk.shape[1]  # self.detector.observe advances state.pos
        self.detector.observe(state, kl_chunk, valid_chunk)
        fire = ~state.fired & (state._planned < end)
        state.cut = torch.where(fire, state._planned, state.cut)
        state.fired |= fire
        return fire, state.cut


@contextlib.contextmanager
def cudnn_attention():
    """The sampler with PyTorch's own choice of attention backend (cuDNN included on Hopper)."""
    sampler = common.import_kat("sampler")
    saved, sampler.DECODE_SDPA_BACKENDS = sampler.DECODE_SDPA_BACKENDS, None
    try:
        yield
    finally:
        sampler.DECODE_SDPA_BACKENDS = saved


def synchronize(device: torch.device) -> None:
    common.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device, out: dict, key: str):
    synchronize(device)
    t0 = time.perf_counter()
    yield
    synchronize(device)
    out[key] = time.perf_counter() - t0


def peak(device: torch.device):
    return common.PeakMemory(device)


def gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f}"


# ---------------------------------------------------------------------------------------------
# 1. Decode

def ours_decode(student, ids, mask, n: int, chunk: int, seed: int) -> torch.Tensor:
    sampler = common.import_kat("sampler")
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    rollout, _ = sampler.sample(student, None, ids, mask, max_new_tokens=n, eos_token_id=[], pad_token_id=0,
                                temperature=1.0, top_p=0.95, chunk=chunk, generator=gen, score=False)
    return rollout.completion_mask.sum()


def generate_decode(student, ids, mask, n: int, **kw) -> int:
    out = student.generate(input_ids=ids, attention_mask=mask.long(), do_sample=True, temperature=1.0, top_p=0.95,
                           top_k=None, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None, **kw)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


def decode_section(run: Run, student, student_fp32, ids, mask) -> float:
    """Returns the sampler's seconds per decode step, for sizing the step section."""
    s, dev = run.shape, run.device
    cases = {"generate, dynamic cache (baseline)": lambda n: generate_decode(student, ids, mask, n),
             "kat.sampler.sample, unscored": lambda n: ours_decode(student, ids, mask, n, s.chunk, 0)}
    if dev.type == "cuda":  # the sampler leaves cuDNN attention out of its decode loop (DECODE_SDPA_BACKENDS)
        def generate_no_cudnn(n):
            with common.import_kat("sampler").decode_attention(dev):
                return generate_decode(student, ids, mask, n)

        def ours_cudnn(n):
            with cudnn_attention():
                return ours_decode(student, ids, mask, n, s.chunk, 0)
        cases["generate, dynamic cache, SDPA without cuDNN (as the sampler decodes)"] = generate_no_cudnn
        cases["kat.sampler.sample, unscored, cuDNN attention allowed (PyTorch's choice)"] = ours_cudnn
    if student_fp32 is not None:
        def as_trained(n):
            with torch.autocast(dev.type, dtype=run.dtype):
                return ours_decode(student_fp32, ids, mask, n, s.chunk, 0)
        cases["kat.sampler.sample, fp32 weights + bf16 autocast (as kat.train samples)"] = as_trained
    times, tokens = {}, {}
    with torch.no_grad():
        for fn in cases.values():  # warm-up: kernels, allocator
            fn(min(8, s.decode_tokens))
        for name, fn in cases.items():
            with timed(dev, times, name):
                tokens[name] = int(fn(s.decode_tokens))
    rate = {name: tokens[name] / times[name] for name in cases}
    base = next(iter(cases))
    table = [[name, tokens[name], f"{times[name]:.2f}", f"{rate[name]:.0f}", common.fmt_ratio(rate[name] / rate[base])]
             for name in cases]
    run.results["decode"] = {name: {"seconds": times[name], "tokens": tokens[name]} for name in cases}
    run.emit(f"Decode: {s.rows} rows, {s.prompt_len}-token prompts, {s.decode_tokens} new tokens (top-p 0.95)",
             common.markdown_table(["decoder", "tokens", "seconds", "tokens/s", "vs generate"], table))
    return times["kat.sampler.sample, unscored"] / s.decode_tokens


def compiled_section(run: Run, student, ids, mask) -> None:
    """generate with a static cache; transformers compiles the decode step when the model allows it."""
    s, dev, times = run.shape, run.device, {}
    n = s.decode_tokens
    table = []
    try:
        with torch.no_grad():
            with timed(dev, times, "eager"):
                tokens = generate_decode(student, ids, mask, n)
            with timed(dev, times, "first"):  # includes compilation
                generate_decode(student, ids, mask, n, cache_implementation="static")
            with timed(dev, times, "second"):
                generate_decode(student, ids, mask, n, cache_implementation="static")
    except Exception as err:  # noqa: BLE001 - report, do not lose the other tables
        run.emit("Decode with a compiled static cache", f"not measured: {type(err).__name__}: {err}")
        return
    labels = {"eager": "generate, dynamic cache (baseline)", "second": "generate, static cache, compiled"}
    for name in ("eager", "second"):
        table.append([labels[name], tokens, f"{times[name]:.2f}", f"{tokens / times[name]:.0f}",
                      common.fmt_ratio(times["eager"] / times[name])])
    times["compiled"] = hasattr(student, "_compiled_call")  # set by transformers when it compiled the step
    run.results["compiled"] = times
    run.emit(f"Decode with a static cache ({n} new tokens; first call {times['first']:.1f} s; "
             f"{'compiled by transformers' if times['compiled'] else 'NOT compiled (transformers declined)'})",
             common.markdown_table(["decoder", "tokens", "seconds", "tokens/s", "vs dynamic"], table))


# ---------------------------------------------------------------------------------------------
# 2. Teacher in lockstep vs post-hoc

def teacher_section(run: Run, student, teacher, ids, mask, chunks: list[int]) -> None:
    sampler, detector = common.import_kat("sampler"), common.import_kat("terminators")
    s, dev = run.shape, run.device
    timer = ForwardTimer(teacher, dev)
    modes = [("post-hoc (baseline)", None)] + [(f"lockstep, chunk {c}", c) for c in chunks]
    res, ref = {}, None
    for name, chunk in modes:
        w = min(64, s.decode_tokens)
        term = None if chunk is None else detector.TrapDetector(window=w, stride=w, exempt=s.exempt)  # inactive
        gen = torch.Generator(device=dev).manual_seed(1)
        timer.reset()
        out = {}
        with timed(dev, out, "wall"):
            r, _ = sampler.sample(student, teacher, ids, mask, max_new_tokens=s.decode_tokens, eos_token_id=[],
                                  pad_token_id=0, temperature=1.0, top_p=0.95, chunk=chunk or s.chunk,
                                  terminator=term, generator=gen, score=True)
        out.update(teacher=timer.seconds(), calls=timer.calls, tokens=int(r.completion_mask.sum()))
        if ref is None:
            ref = r
        out["same_tokens"] = bool(torch.equal(r.completion_ids, ref.completion_ids))
        out["kl_diff"] = (r.kl - ref.kl).abs().max().item()
        out["kl_mean"] = r.kl[r.completion_mask].mean().item()
        res[name] = out
    timer.remove()
    base = res[modes[0][0]]
    table = [[name, o["tokens"], f"{o['wall']:.2f}", f"{o['teacher']:.2f}",
              common.fmt_ratio(o["teacher"] / base["teacher"]), o["calls"], "yes" if o["same_tokens"] else "NO",
              f"{o['kl_diff']:.1e}"] for name, o in res.items()]
    run.results["teacher"] = res
    run.emit(f"Teacher: lockstep vs post-hoc ({s.rows} rows, {s.decode_tokens} new tokens; mean KL of the random "
             f"pair {base['kl_mean']:.2f})",
             common.markdown_table(["mode", "tokens", "sample s", "teacher s", "teacher vs post-hoc",
                                    "teacher calls", "same tokens", "max |KL - post-hoc KL|"], table))


class PhaseClock:
    """Wall time of a rollout by phase: wraps the sampler's step functions (and the model forwards,
    the token draw and the scoring inside them) with synchronising timers and books each call's time
    exclusive of the timed calls nested in it, so the phases add up to the whole call."""

    FUNCTIONS = {"_prefill": "prefill (both models)", "_student_chunk": "student chunk: bookkeeping",
                 "sample_token": "student chunk: token draw", "_teacher_chunk": "teacher chunk: bookkeeping",
                 "score_chunk": "scoring (KL, log-probs, top-k)", "_terminate": "terminator",
                 "_score_posthoc": "post-hoc scoring: bookkeeping"}

    def __init__(self, student, teacher, device: torch.device):
        self.sampler, self.device = common.import_kat("sampler"), device
        self.models = {id(student): "student", id(teacher): "teacher"}
        self.seconds: dict[str, float] = {}
        self.stack: list[float] = []  # time of the timed calls nested in each open call
        self.saved = {name: getattr(self.sampler, name) for name in (*self.FUNCTIONS, "_forward")}
        for name, label in self.FUNCTIONS.items():
            setattr(self.sampler, name, self._timed(self.saved[name], lambda *a, _label=label: _label))
        forward = self.saved["_forward"]
        self.sampler._forward = self._timed(forward, lambda model, *a: f"{self.models[id(model)]} forward")
        self.keep = self.sampler._Active.keep
        self.sampler._Active.keep = self._timed(self.keep, lambda *a: "rows leave the caches (keep)")

    def _timed(self, fn, label):
        def wrapper(*args, **kwargs):
            synchronize(self.device)
            t0 = time.perf_counter()
            self.stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(self.device)
                total = time.perf_counter() - t0
                nested = self.stack.pop()
                key = label(*args)
                self.seconds[key] = self.seconds.get(key, 0.0) + total - nested
                if self.stack:
                    self.stack[-1] += total
        return wrapper

    def remove(self) -> None:
        for name, fn in self.saved.items():
            setattr(self.sampler, name, fn)
        self.sampler._Active.keep = self.keep


def phases_section(run: Run, student, teacher, ids, mask) -> None:
    """Where one rollout's wall time goes, post-hoc against lockstep (chunk 64): the same tokens,
    timed phase by phase (each phase synchronises, so the sum exceeds an untimed call a little)."""
    sampler, detector = common.import_kat("sampler"), common.import_kat("terminators")
    s, dev = run.shape, run.device
    modes = [("post-hoc", False, False), (f"lockstep, chunk {s.chunk}", True, False)]
    if dev.type == "cuda":
        modes.append((f"lockstep, chunk {s.chunk}, cuDNN attention allowed", True, True))
    res = {}
    for name, lockstep, cudnn in modes:
        w = min(64, s.decode_tokens)
        term = detector.TrapDetector(window=w, stride=w, exempt=s.exempt) if lockstep else None  # inactive
        clock = PhaseClock(student, teacher, dev)
        wall = {}
        try:
            with cudnn_attention() if cudnn else contextlib.nullcontext(), timed(dev, wall, "wall"):
                sampler.sample(student, teacher, ids, mask, max_new_tokens=s.decode_tokens, eos_token_id=[],
                               pad_token_id=0, temperature=1.0, top_p=0.95, chunk=s.chunk, terminator=term,
                               generator=torch.Generator(device=dev).manual_seed(1), score=True)
        finally:
            clock.remove()
        phases = dict(sorted(clock.seconds.items(), key=lambda kv: -kv[1]))
        phases["outside the timed calls"] = wall["wall"] - sum(clock.seconds.values())
        res[name] = {"wall": wall["wall"], "phases": phases}
    labels = list(dict.fromkeys(label for o in res.values() for label in o["phases"]))
    table = [[label] + [f"{o['phases'][label]:.2f}" if label in o["phases"] else "-" for o in res.values()]
             for label in labels]
    table.append(["**wall**"] + [f"**{o['wall']:.2f}**" for o in res.values()])
    run.results["phases"] = res
    run.emit(f"Phases of one rollout: {s.rows} rows, {s.decode_tokens} new tokens, seconds (synchronised at "
             f"every timed call)", common.markdown_table(["phase"] + list(res), table))


class Scope:
    """A profiler range around every forward call of `module` (pre-hook opens it, hook closes it)."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.name, self.open = name, []
        self.handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, module, args) -> None:
        self.open.append(torch.profiler.record_function(self.name))
        self.open[-1].__enter__()

    def _exit(self, module, args, output) -> None:
        self.open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def profile_section(run: Run, student, teacher, ids, mask, tokens: int) -> None:
    """torch.profiler over a short lockstep rollout: the time inside the two models' forwards against
    the whole call, and the operators that take the most time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    sampler, detector = common.import_kat("sampler"), common.import_kat("terminators")
    s, dev = run.shape, run.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    term = detector.TrapDetector(window=min(64, tokens), stride=min(64, tokens), exempt=0)  # inactive
    gen = torch.Generator(device=dev).manual_seed(5)
    scopes = [Scope(student, "student forward"), Scope(teacher, "teacher forward")]
    wall = {}
    with profile(activities=activities, acc_events=True) as prof, timed(dev, wall, "sample"):
        with record_function("sample"):
            sampler.sample(student, teacher, ids, mask, max_new_tokens=tokens, eos_token_id=[], pad_token_id=0,
                           temperature=1.0, top_p=0.95, chunk=s.chunk, terminator=term, generator=gen, score=True)
            synchronize(dev)
    for scope in scopes:
        scope.remove()
    events = {e.key: e for e in prof.key_averages()}
    cuda = dev.type == "cuda"
    rows, total_us = [], max(wall["sample"] * 1e6, 1.0)  # the profiler's own total can read 0 on CUDA
    for key in ("student forward", "teacher forward"):
        e = events.get(key)
        if e is None:
            continue
        device_us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) if cuda else None
        rows.append([key, e.count, f"{e.cpu_time_total / 1e3:.1f}",
                     common.fmt_share(e.cpu_time_total / total_us),
                     "-" if device_us is None else f"{device_us / 1e3:.1f}"])
    outside = total_us - sum(events[k].cpu_time_total for k in ("student forward", "teacher forward")
                                         if k in events)
    rows.append(["outside the forwards", "-", f"{outside / 1e3:.1f}", common.fmt_share(outside / total_us), "-"])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    ops = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50)
    run.results["profile"] = {"tokens": tokens, "wall_s": wall["sample"], "outside_share": outside / total_us}
    run.emit(f"Profile: one lockstep rollout of {tokens} tokens, chunk {s.chunk} ({s.rows} rows, profiler on)",
             common.markdown_table(["range", "calls", "CPU ms (incl. waits)", "share", "GPU ms"], rows)
             + f"\n\nOperators by {sort}:\n\n```\n{ops}\n```")


# ---------------------------------------------------------------------------------------------
# 3. Learner

def synthetic_rollout(shape: Shape, T: int, vocab: int, ids: torch.Tensor, mask: torch.Tensor, topk: int):
    """A full-length rollout with random tokens (the learner's cost does not depend on their values)."""
    Rollout = common.import_kat("rollout").Rollout
    g = torch.Generator().manual_seed(2)
    B, dev = ids.shape[0], ids.device
    comp = torch.randint(10, vocab, (B, T), generator=g).to(dev)
    full = torch.ones(B, T, dtype=torch.bool, device=dev)
    zeros = torch.zeros(B, T, device=dev)
    topk_ids = torch.randint(0, vocab, (B, T, topk), generator=g).to(dev)
    logq = torch.log_softmax(torch.randn(B, T, topk + 1, generator=g), -1).to(dev)
    return Rollout(prompt_ids=ids, prompt_mask=mask, completion_ids=comp, completion_mask=full, loss_mask=full,
                   student_logp=zeros, teacher_logp=zeros, kl=zeros, stop=torch.ones(B, dtype=torch.long, device=dev),
                   cut=torch.full((B,), T, device=dev), topk_ids=topk_ids, teacher_topk_logp=logq)


def learner_step(run: Run, trainer, rollout, kind: str, checkpointing: bool) -> dict:
    learner = common.import_kat("learner")
    student, teacher, optimizer, scheduler, acc = trainer
    unwrapped = acc.unwrap_model(student)
    # transformers >= 5.2x names it activation checkpointing; older 5.x gradient checkpointing
    enable = getattr(unwrapped, "activation_checkpointing_enable", None) or unwrapped.gradient_checkpointing_enable
    disable = getattr(unwrapped, "activation_checkpointing_disable", None) or unwrapped.gradient_checkpointing_disable
    if checkpointing:
        enable({"use_reentrant": False})  # the first parameter of both names: torch.utils.checkpoint kwargs
    else:
        disable()
    student.train()
    out = {}
    with peak(run.device) as mem, timed(run.device, out, "seconds"):
        stats = learner.learn(student, rollout, optimizer, scheduler, acc, kind=kind, micro_batch_size=1,
                              teacher=teacher, max_grad_norm=1.0)
    disable()
    out.update(peak=mem.bytes, loss=stats["loss"], finite=stats["finite"], tokens=stats["n_tokens"])
    return out


def learner_section(run: Run, trainer, vocab: int, ids, mask) -> None:
    s = run.shape
    rollout = synthetic_rollout(s, s.new_tokens, vocab, ids, mask, s.topk)
    learner_step(run, trainer, rollout.select(slice(0, 1)), "topk", False)  # warm-up, creates AdamW state
    res = {}
    for kind in ("topk", "full"):
        for ckpt in (False, True):
            if run.left() < 0:
                break
            res[(kind, ckpt)] = learner_step(run, trainer, rollout, kind, ckpt)
    base = res.get(("topk", False))
    table = [[kind, "on" if ckpt else "off", o["tokens"], f"{o['seconds']:.2f}",
              common.fmt_ratio(o["seconds"] / base["seconds"]), gib(o["peak"]),
              common.fmt_ratio(o["peak"] / max(base["peak"], 1)), f"{o['loss']:.3g}"]
             for (kind, ckpt), o in res.items()]
    run.results["learner"] = {f"{k}/ckpt={c}": o for (k, c), o in res.items()}
    run.emit(f"Learner: one step on {s.rows} rows x {s.new_tokens} tokens (+ {s.prompt_len}-token prompts), "
             f"micro-batch 1, AdamW; peak = GiB beyond models + optimiser state",
             common.markdown_table(["loss", "grad ckpt", "tokens", "seconds", "vs topk", "peak GiB", "vs topk",
                                    "loss value"], table))


# ---------------------------------------------------------------------------------------------
# 4. Whole steps

def whole_step(run: Run, trainer, ids, mask, T: int, kat: bool, slots: int = 0, decode: str = "dynamic") -> dict:
    sampler, learner = common.import_kat("sampler"), common.import_kat("learner")
    student, teacher, optimizer, scheduler, acc = trainer
    s, dev, out = run.shape, run.device, {}
    term = RandomCuts(s.cut_rate, min(s.exempt, T // 4), T, seed=3) if kat else None
    gen = torch.Generator(device=dev).manual_seed(4)
    student.eval()
    clock = PhaseClock(acc.unwrap_model(student), teacher, dev)
    try:
        with peak(dev) as mem_r, timed(dev, out, "rollout"):
            r, _ = sampler.sample(acc.unwrap_model(student), teacher, ids, mask, max_new_tokens=T, eos_token_id=[],
                                  pad_token_id=0, temperature=1.0, top_p=0.95, chunk=s.chunk, terminator=term,
                                  topk=s.topk, generator=gen, score=True, slots=slots, decode=decode)
    finally:
        clock.remove()
    out["decode_steps"] = r.engine["decode_steps"]
    out["occupancy"] = int(r.completion_mask.sum()) / max(r.engine["slot_steps"], 1.0)
    out["phases"] = dict(sorted(clock.seconds.items(), key=lambda kv: -kv[1]))
    student.train()
    with peak(dev) as mem_l, timed(dev, out, "learn"):
        stats = learner.learn(student, r, optimizer, scheduler, acc, kind="topk", micro_batch_size=1,
                              teacher=teacher, max_grad_norm=1.0)
    out.update(peak_rollout=mem_r.bytes, peak_learn=mem_l.bytes, generated=int(r.completion_mask.sum()),
               trained=int(r.loss_mask.sum()),
               cut_rate=float((r.stop == term.stop_code).float().mean()) if kat else 0.0,
               finite=stats["finite"])
    return out


def step_section(run: Run, trainer, ids, mask, decode_step_s: float | None, T: int | None = None) -> None:
    s = run.shape
    T = T or s.new_tokens
    if decode_step_s is not None:  # two steps, each decoding T tokens plus teacher and learner work
        # lockstep decoding measured ~1.9x unscored decoding per token on an H200 (teacher section)
        fits = int(run.left() / (2 * 2.5 * decode_step_s))
        if fits < T:
            T = max(s.chunk, fits // s.chunk * s.chunk)
    for kat in (False, True):  # warm-up of both kinds: first-call costs (kernels, AdamW state) stay out
        whole_step(run, trainer, ids, mask, s.chunk, kat=kat)
    res = {"OPD (post-hoc scoring; baseline)": whole_step(run, trainer, ids, mask, T, kat=False)}
    res[f"OPD + KAT stand-in (lockstep chunk {s.chunk}, cuts {s.cut_rate:.0%} of rows)"] = \
        whole_step(run, trainer, ids, mask, T, kat=True)
    base = next(iter(res.values()))
    table = []
    for name, o in res.items():
        total = o["rollout"] + o["learn"]
        table.append([name, o["generated"], o["trained"], f"{o['cut_rate']:.2f}", f"{o['rollout']:.1f}",
                      f"{o['learn']:.1f}", f"{total:.1f}", common.fmt_ratio(total / (base["rollout"] + base["learn"])),
                      gib(o["peak_rollout"]), gib(o["peak_learn"])])
    run.results["step"] = {"max_new_tokens": T, **res}
    labels = list(dict.fromkeys(label for o in res.values() for label in o["phases"]))
    phase_rows = [[label] + [f"{o['phases'][label]:.2f}" if label in o["phases"] else "-" for o in res.values()]
                  for label in labels]
    note = "" if T == s.new_tokens else f" (not {s.new_tokens}: set by --step-tokens or shortened to fit --budget-s)"
    run.emit(f"One training step, loss topk (K={s.topk}): {s.rows} rows, up to {T} new tokens{note}",
             common.markdown_table(["step", "generated", "trained", "cut rate", "rollout s", "learn s", "total s",
                                    "vs OPD", "rollout peak GiB", "learn peak GiB"], table)
             + "\n\nThe rollouts by phase (seconds; every timed call synchronises, as in the phases section):\n\n"
             + common.markdown_table(["phase", "OPD", "OPD + KAT stand-in"], phase_rows))


# ---------------------------------------------------------------------------------------------
# 0. The slot engine

def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), best of 5."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def kv_bytes(model, rows: int, positions: int) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * rows * positions * cfg.num_key_value_heads * head_dim * itemsize


def engine_cases(student, ids, mask, chunk: int, cuda: bool) -> dict:
    """name -> fn(n) decoding n tokens and returning the student decode forwards it ran."""
    sampler = common.import_kat("sampler")

    def ours(**kw):
        def fn(n):
            gen = torch.Generator(device=ids.device).manual_seed(0)
            r, _ = sampler.sample(student, None, ids, mask, max_new_tokens=n, eos_token_id=[], pad_token_id=0,
                                  top_p=0.95, chunk=chunk, generator=gen, score=False, **kw)
            return r.engine["decode_steps"]
        return fn

    cases = {"kat.sampler.sample, DynamicCache (baseline)": ours(),
             "slot engine, eager": ours(slots=ids.shape[0])}
    if cuda:
        cases["slot engine, compiled with CUDA graphs (decode static)"] = ours(decode="static")
        cases["generate, static cache + compile"] = lambda n: (
            generate_decode(student, ids, mask, n, cache_implementation="static") // ids.shape[0])
    return cases


def engine_section(run: Run, student, ids, mask) -> None:
    """Decode ms per step: t(n) - t(chunk) over the decode forwards between them (the prefill and the
    first chunk drop out; the short call also warms up, compiles and captures the graphs)."""
    s, dev = run.shape, run.device
    n, short = s.decode_tokens, s.chunk
    bw = copy_bandwidth(dev, 1024 if dev.type == "cuda" else 64)
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    floor = (weights + kv_bytes(student, s.rows, s.prompt_len + n // 2)) / bw
    table, res = [], {"bandwidth_GBps": bw / 1e9, "floor_ms": floor * 1e3}
    with torch.no_grad():
        for name, fn in engine_cases(student, ids, mask, s.chunk, dev.type == "cuda").items():
            times = {}
            try:
                with timed(dev, times, "short"):
                    steps_short = fn(short)
                with peak(dev) as mem, timed(dev, times, "long"):
                    steps_long = fn(n)
            except Exception as err:  # noqa: BLE001 - report, keep the other rows
                table.append([name, "-", f"failed: {type(err).__name__}: {str(err)[:80]}", "-", "-"])
                continue
            ms = (times["long"] - times["short"]) / max(steps_long - steps_short, 1) * 1e3
            res[name] = {"ms_per_step": ms, "steps": steps_long, "peak": mem.bytes, "first_call_s": times["short"]}
            table.append([name, int(steps_long), f"{ms:.2f}", f"{ms / (floor * 1e3):.1f}x", gib(mem.bytes)])
    base = res.get("kat.sampler.sample, DynamicCache (baseline)")
    for row in table:
        if base and row[0] in res:
            row.append(common.fmt_ratio(base["ms_per_step"] / res[row[0]]["ms_per_step"]))
    run.results["engine"] = res
    run.emit(f"Decode ms per step: {s.rows} rows, {s.prompt_len}-token prompts, {n} new tokens; floor "
             f"{floor * 1e3:.2f} ms = ({gib(weights)} GiB weights + KV cache) / {bw / 1e9:.0f} GB/s copy bandwidth",
             common.markdown_table(["decoder", "decode forwards", "ms/step", "vs floor", "peak GiB",
                                    "speed vs DynamicCache"], table))


def engine_step_section(run: Run, trainer, vocab: int, T: int) -> None:
    """Whole steps, OPD vs the KAT stand-in, with 4x the rows through S = rows and S = 4 x rows slots."""
    s = run.shape
    N = 4 * s.rows
    ids, mask = prompts(Shape(rows=N, prompt_len=s.prompt_len), vocab, run.device, seed=0)
    decode = "static" if run.device.type == "cuda" else "dynamic"
    for kat in (False, True):  # warm-up, first-call and compile costs stay out
        whole_step(run, trainer, ids, mask, s.chunk, kat=kat, slots=s.rows, decode=decode)
    res, table = {}, []
    for S in (s.rows, N):
        for kat in (False, True):
            name = f"{'KAT stand-in' if kat else 'OPD'}, S={S}"
            res[name] = o = whole_step(run, trainer, ids, mask, T, kat=kat, slots=S, decode=decode)
            base = res[f"OPD, S={S}"]
            table.append([name, o["generated"], o["trained"], int(o["decode_steps"]), f"{o['occupancy']:.2f}",
                          f"{o['rollout']:.1f}", f"{o['learn']:.1f}",
                          f"{o['generated'] / base['generated']:.3f}", f"{o['rollout'] / base['rollout']:.3f}",
                          gib(o["peak_rollout"])])
    run.results["engine_step"] = {"max_new_tokens": T, "rows": N, "decode": decode, **res}
    run.emit(f"Whole steps through slots: N={N} rows, up to {T} new tokens, decode {decode}, loss topk",
             common.markdown_table(["step", "generated", "trained", "decode_steps", "occupancy", "rollout s",
                                    "learn s", "tokens vs OPD", "rollout vs OPD", "rollout peak GiB"], table))


# ---------------------------------------------------------------------------------------------

def build_trainer(cfg, device: torch.device, dtype: torch.dtype, teacher, seed: int):
    """The student as kat.train holds it: fp32 master weights, Accelerate mixed precision, AdamW."""
    from accelerate import Accelerator

    learner = common.import_kat("learner")
    mp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no") if device.type == "cuda" else "no"
    acc = Accelerator(mixed_precision=mp, cpu=device.type == "cpu", step_scheduler_with_optimizer=False)
    student = build_model(cfg, device, torch.float32, seed)
    student.config.use_cache = True
    optimizer, scheduler = learner.build_optimizer(student, 1e-6, 100, 0.03)
    student, optimizer, scheduler = acc.prepare(student, optimizer, scheduler)
    return student, teacher, optimizer, scheduler, acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models of the same family on CPU (a smoke run)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma list of {', '.join(SECTIONS)} "
                   "(default: all but profile, whose profiler slows the run far more than it measures)")
    p.add_argument("--teacher-chunks", default="1,8",
                   help="teacher section: lockstep chunk sizes besides the step's chunk (64; tiny 8)")
    p.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget of the whole run")
    p.add_argument("--new-tokens", type=int, help="step section's rollout budget (default 4096; tiny 48)")
    p.add_argument("--step-tokens", type=int, help="step section's rollout budget (default: --new-tokens, shortened "
                   "to fit --budget-s)")
    p.add_argument("--decode-tokens", type=int, help="decode/teacher sections' rollout length (default 512; tiny 24)")
    p.add_argument("--engine-tokens", type=int,
                   help="engine_step section's rollout budget (default: twice --decode-tokens)")
    p.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = Shape(rows=4, prompt_len=16, new_tokens=48, decode_tokens=24, chunk=8, topk=8, exempt=8) \
        if args.tiny else Shape()
    shape.new_tokens = args.new_tokens or shape.new_tokens
    shape.decode_tokens = args.decode_tokens or shape.decode_tokens
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.tiny and "compiled" in sections and args.sections == p.get_default("sections"):
        sections.remove("compiled")  # torch.compile on CPU takes minutes: only when asked for
    command = "python benchmarks/gpu_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    run = Run(device, dtype, shape, args.budget_s, out=Path(args.out) if args.out else None,
              head=common.header(device, command.strip()))
    print(run.head, "\n", flush=True)

    t_cfg = model_config("qwen3_8b", args.tiny, layers=3)
    s_cfg = model_config("qwen3_1.7b", args.tiny, layers=2)
    with timed(device, run.results, "build_s"):
        teacher = build_model(t_cfg, device, dtype, seed=0).requires_grad_(False)
        student = build_model(s_cfg, device, dtype, seed=1).requires_grad_(False)
    ids, mask = prompts(shape, s_cfg.vocab_size, device, seed=0)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("teacher", teacher), ("student", student))}
    print(f"teacher {n_params['teacher'] / 1e6:,.1f}M params, student {n_params['student'] / 1e6:,.1f}M params "
          f"({dtype}); built in {run.results['build_s']:.1f} s\n", flush=True)
    run.results["params"] = n_params

    trainer = None
    if {"learner", "step", "engine_step"} & set(sections) or "decode" in sections:
        trainer = build_trainer(s_cfg, device, dtype, teacher, seed=1)
    if "engine" in sections:
        engine_section(run, student, ids, mask)
    if "engine_step" in sections and run.left() > 0:
        engine_step_section(run, trainer, s_cfg.vocab_size, args.engine_tokens or 2 * shape.decode_tokens)
    decode_step_s = None
    if "decode" in sections:
        fp32 = trainer[4].unwrap_model(trainer[0]) if trainer is not None else None
        decode_step_s = decode_section(run, student, fp32 if device.type == "cuda" else None, ids, mask)
    if "teacher" in sections and run.left() > 0:
        chunks = {int(c) for c in args.teacher_chunks.split(",") if c} | {shape.chunk}
        teacher_section(run, student, teacher, ids, mask, sorted(chunks))
    if "phases" in sections and run.left() > 0:
        phases_section(run, student, teacher, ids, mask)
    if "profile" in sections and run.left() > 0:
        profile_section(run, student, teacher, ids, mask, min(32, shape.decode_tokens))  # the profiler is slow
    del student  # the sections below use the trained student (fp32 master weights)
    if "learner" in sections and run.left() > 0:
        learner_section(run, trainer, s_cfg.vocab_size, ids, mask)
    if "step" in sections and run.left() > 0:
        step_section(run, trainer, ids, mask, decode_step_s, args.step_tokens)
    if "compiled" in sections and run.left() > 150:  # compilation alone takes a minute or more
        bf16 = build_model(s_cfg, device, dtype, seed=1)
        compiled_section(run, bf16, ids, mask)
    skipped = [name for name in sections if name not in run.results]
    footer = f"gpu_scale finished in {time.perf_counter() - run.start:.0f} s" + \
        (f"; skipped for time: {', '.join(skipped)}" if skipped else "")
    print(footer, flush=True)
    run.save(footer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
