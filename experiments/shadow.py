"""Shadow-mode diagnostics: does the detector cut rollouts that would have ended correct?

A KAT run with `shadow=True` (rollouts run to their end, would-be cuts only recorded), then fresh
batches of training prompts sampled from the student before training and from the trained student,
each rollout graded: of the rollouts KAT would cut, how many still end correct, and the cut rate on
rollouts that end wrong vs right. The batches are the ones training would draw (kat.data.step_prompts,
kat.data.step_generator), prompts loaded, filtered and rendered as kat.train does.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import replace

import torch

from kat.config import Config, render_kw
from kat.terminators import DriftTerminator
from kat.data import filter_long_prompts, load_problems, step_batch, step_generator
from kat.terminators import TrapDetector, window_means
from experiments.arms import STATIC_ARMS, base_config, seed_list, world_name
from experiments.report import plan_line, setup_line, shadow_markdown, shadow_summary, write_report
from experiments.runs import git_commit, run_arm, summarize_run
from kat.plot import plot_cut_positions, plot_traces, read_jsonl
from kat.rollout import STOP_NAMES

POINTS = ("before", "after")


# ---------------------------------------------------------------------------------------------
# The training loop's prompts

def train_problems(tokenizer, cfg: Config) -> list[dict]:
    """The training prompts as kat.train.train reads them: loaded, and those whose rendered prompt
    exceeds max_prompt_length dropped (with kat.data's warning)."""
    return filter_long_prompts(tokenizer, load_problems(cfg.train_data, split=cfg.train_split,
                               prompt_field=cfg.prompt_field, answer_field=cfg.answer_field),
                               cfg.max_prompt_length, render_kw=render_kw(cfg), name="train_data")


def step_inputs(tokenizer, problems: list[dict], step: int, cfg: Config, rank: int = 0, world: int = 1,
                device: torch.device | str = "cpu"):
    """What kat.train.train samples at `step` on process `rank`: the rows' problems (each prompt
    repeated samples_per_prompt times), their encoded prompts (B, P) and the step's generator."""
    rows, prompt_ids, prompt_mask = step_batch(tokenizer, problems, step, cfg, rank, world, device)  # (B, P) x 2
    return rows, prompt_ids, prompt_mask, step_generator(cfg.seed, step, device)


# ---------------------------------------------------------------------------------------------
# Graded shadow rollouts

def toy_positions(text: str, prompt: str, grader: str) -> dict:
    """First error and first repetition of a toy completion (one character = one token)."""
    if grader != "exact":
        return {}
    from kat.toy.world import parse_prompt, trace

    try:
        tr = trace(text, parse_prompt(prompt))
    except ValueError:  # not a toy prompt
        return {}
    return {"first_error": tr.first_error, "repeat_start": tr.repeat_start}


RULES = {"shadow_cut": "paper's rule", "cut_gated": "drift-gated", "cut_drift": "cut after drift"}


def fixed_threshold_detector(threshold: float, cfg: Config, gate: str = "none") -> TrapDetector:
    """A shadow TrapDetector with cfg's window settings whose threshold is `threshold` and stays there
    (a one-value quantile buffer: Q of one value is that value), active at once."""
    det = TrapDetector(window=cfg.window, stride=cfg.stride, patience=cfg.patience, exempt=cfg.exempt, eta=cfg.eta,
                       buffer_size=1, min_buffer=1, warmup_steps=0, shadow=True, gate=gate, drift_prob=cfg.drift_prob)
    det.buffer = torch.tensor([threshold], dtype=torch.float64)
    return det


def replay_cuts(rollout, threshold: float | None, cfg: Config, gates: tuple[str, ...] = ("drift",),
                drift_probs: tuple[float, ...] = ()) -> dict:
    """Would-be cuts of other rules on a shadow rollout, fed exactly as the sampler fed the recorded
    detector (the rollout's d_t and log q(y_t), chunk by chunk) with its threshold held fixed.

    Returns {"cut_gated": (B,), "cut_drift": (B,), "drift": (B,)} long tensors (-1: none): the
    drift-gated detector's cut (for each gate in `gates`; gate "none" replays the paper's rule as
    "cut_none"), the cut-after-drift rule's cut, and the first drift position >= exempt, all at
    cfg.drift_prob; for each p in `drift_probs` also "cut_gated@p" and "drift@p" at that drift_prob.
    """
    kl, valid, logp = rollout.kl, rollout.completion_mask, rollout.teacher_logp  # (B, T) each
    B, T = kl.shape
    dets = {("cut_gated" if g == "drift" else f"cut_{g}"): fixed_threshold_detector(threshold, cfg, g)
            for g in gates if threshold is not None}
    dets["cut_drift"] = DriftTerminator(exempt=cfg.exempt, drift_prob=cfg.drift_prob, warmup_steps=0, shadow=True)
    for p in drift_probs:
        if threshold is not None:
            dets[f"cut_gated@{p:g}"] = fixed_threshold_detector(threshold, replace(cfg, drift_prob=p), "drift")
        dets[f"cut_drift@{p:g}"] = DriftTerminator(exempt=cfg.exempt, drift_prob=p, warmup_steps=0, shadow=True)
    states = {k: d.start(B) for k, d in dets.items()}
    for t0 in range(0, T, cfg.chunk):
        for k, d in dets.items():
            d.observe(states[k], kl[:, t0:t0 + cfg.chunk], valid[:, t0:t0 + cfg.chunk],
                      teacher_logp_chunk=logp[:, t0:t0 + cfg.chunk])
    out = {k: st.would_cut for k, st in states.items() if not k.startswith("cut_drift@")}
    out["drift"] = states["cut_drift"]._drift
    out.update({f"drift@{p:g}": states[f"cut_drift@{p:g}"]._drift for p in drift_probs})
    return out


def graded_records(rollout, rows: list[dict], step: int, threshold: float | None, tokenizer, cfg: Config,
                   drift_probs: tuple[float, ...] = ()) -> list[dict]:
    """One record per row: completion, grade, would-be cut, the threshold it was judged against, d,
    z and log q(y_t); and where the drift-gated and cut-after-drift rules would cut it (`replay_cuts`)."""
    from kat.evaluate import grade

    replayed = {k: v.tolist() for k, v in replay_cuts(rollout, threshold, cfg, drift_probs=drift_probs).items()}
    records = []
    for b, p in enumerate(rows):
        n = int(rollout.completion_mask[b].sum())
        kl = rollout.kl[b, :n].float()  # (n,)
        # decoded as kat.evaluate decodes completions for grading: special tokens dropped
        text = tokenizer.decode(rollout.completion_ids[b, :n].tolist(), skip_special_tokens=True)
        cut = int(rollout.shadow_cut[b])
        records.append({
            "step": step, "prompt": p["prompt"], "answer": str(p["answer"]), "completion": text,
            "ids": rollout.completion_ids[b, :n].tolist(),
            "length": n, "stop": STOP_NAMES[int(rollout.stop[b])], "shadow_cut": cut if cut >= 0 else None,
            "correct": grade(text, str(p["answer"]), cfg.grader), "threshold": threshold,
            "kl": [round(x, 6) for x in kl.tolist()],
            "z": [None if math.isnan(x) else round(x, 6) for x in window_means(kl, cfg.window).tolist()],
            "teacher_logp": [round(x, 4) for x in rollout.teacher_logp[b, :n].tolist()],
            **{k: (v[b] if v[b] >= 0 else None) for k, v in replayed.items()},
            **toy_positions(text, p["prompt"], cfg.grader)})
    return records


@torch.no_grad()
def shadow_rollouts(student, teacher, tokenizer, problems: list[dict], cfg: Config, detector, *, batches: int,
                    first_step: int = 0, max_calibration: int = 100, drift_probs: tuple[float, ...] = ()) -> list[dict]:
    """Sample training batches with a shadow detector; one graded record per rollout.

    The prompts are those training would see at steps first_step, first_step + 1, ... . While the
    detector is not active yet (a fresh detector), batches only calibrate it (`end_batch` fills its
    buffer); then `batches` batches are recorded with the threshold held fixed, so every recorded
    decision uses the same threshold, the one each record carries.
    """
    from kat.models import eos_ids
    from kat.sampler import sample

    if not getattr(detector, "shadow", False):
        raise ValueError("detector: shadow_rollouts needs a TrapDetector built with shadow=True")
    eos = eos_ids(tokenizer, student)
    records, step, calibrated = [], first_step, 0
    while len(records) < batches * cfg.batch_size * cfg.samples_per_prompt:
        rows, ids, mask, gen = step_inputs(tokenizer, problems, step, cfg)
        rollout, state = sample(student, teacher, ids, mask, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                                chunk=cfg.chunk, terminator=detector, generator=gen)
        step += 1
        if not state.active:
            if calibrated >= max_calibration:
                raise RuntimeError(f"detector still inactive after {calibrated} calibration batches; check "
                                   "min_buffer and warmup_steps")
            detector.end_batch(state, calibrated)
            calibrated += 1
            continue
        records += graded_records(rollout, rows, step - 1, state.threshold, tokenizer, cfg, drift_probs)
    return records


def diagnose(run_dir: str, cfg: Config, point: str, teacher, tokenizer, problems: list[dict], batches: int,
             log=print) -> list[dict]:
    """Graded shadow rollouts of the student before (`point` 'before') or after ('after') a shadow run.

    Before: the initial student, a fresh detector calibrated on its own rollouts. After: the run's
    trained student and the detector state of its last checkpoint. Cached in the run directory.
    """
    from kat.models import align_vocab, load_model
    from kat.train import build_terminator

    path = os.path.join(run_dir, "diagnostics", f"rollouts_{point}.jsonl")
    if os.path.isfile(path):
        return read_jsonl(path)
    detector, student_path = build_terminator(cfg), cfg.student
    if point == "after":
        ckpt = os.path.join(run_dir, f"checkpoint-{cfg.steps:06d}", "terminator.pt")
        detector.load_state_dict(torch.load(ckpt, weights_only=False))
        student_path = os.path.join(run_dir, "student")
    student = load_model(student_path, "", torch.float32, "student").eval()
    align_vocab(student, teacher, tokenizer)  # as kat.train.train does: one logit width for both models
    t0 = time.perf_counter()
    records = shadow_rollouts(student, teacher, tokenizer, problems, cfg, detector, batches=batches,
                              first_step=cfg.steps)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    log(f"  shadow seed {cfg.seed} {point}: {len(records)} rollouts in {time.perf_counter() - t0:.0f} s")
    return records


# ---------------------------------------------------------------------------------------------
# Pictures

def as_traces(records: list[dict], cfg: Config) -> list[dict]:
    """Records in the format of traces.jsonl (plus outcome and prompt), for kat.plot.plot_traces."""
    return [{"step": 0, "tokens": [""] * r["length"], "kl": r["kl"], "z": r["z"], "threshold": r["threshold"],
             "window": cfg.window, "stride": cfg.stride, "exempt": cfg.exempt, "cut": None,
             "shadow_cut": r["shadow_cut"], "stop": STOP_NAMES.index(r["stop"]), "correct": r["correct"],
             "prompt": r["prompt"]} for r in records]


def pick_examples(records: list[dict], correct: bool, n: int = 4) -> list[dict]:
    """Up to n rollouts of different prompts that end correct (or wrong), would-be-cut ones first."""
    rows = [r for r in records if r["correct"] == correct]
    picked, prompts = [], set()
    for r in [r for r in rows if r["shadow_cut"] is not None] + [r for r in rows if r["shadow_cut"] is None]:
        if r["prompt"] not in prompts and len(picked) < n:
            picked.append(r)
            prompts.add(r["prompt"])
    return picked


def shadow_plots(records: dict[str, list[dict]], cfg: Config, out: str, label: str) -> dict:
    """The cut-position histogram and, per point and outcome, example traces; name -> path. The data
    of each picture is written beside it (kat.plot.redraw)."""
    positions = {f"student {p} training": [{k: r.get(k) for k in ("length", "correct", "shadow_cut", "first_error")}
                                           for r in recs] for p, recs in records.items()}
    plots = {"cut_positions": plot_cut_positions(positions, os.path.join(out, f"shadow_{label}_cut_positions.png"),
                                                 f"would-be cuts, {label} world", keep_data=True)}
    students = {"before": f"the initial student ({cfg.student})",
                "after": f"the student after the {cfg.steps}-step shadow run"}
    for point, recs in records.items():
        for ok in (True, False):
            name = f"shadow_{label}_{point}_traces_{'correct' if ok else 'wrong'}.png"
            title = (f"{label} world: shadow rollouts of {students.get(point, point)} that end "
                     f"{'correct' if ok else 'wrong'} (would-be cuts first); threshold held fixed")
            plots[name] = plot_traces(as_traces(pick_examples(recs, ok), cfg), os.path.join(out, name), title=title,
                                      keep_data=True)
    return plots


# ---------------------------------------------------------------------------------------------
# The experiment

def shadow_world(base: Config, seeds: int | list[int], out: str, label: str, batches: int,
                 log=print) -> tuple[dict, list[str]]:
    """Shadow runs and graded rollouts of one world: its entry of shadow.json and its markdown lines."""
    from kat.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(base.student, base.student_gguf)
    teacher = load_model(base.teacher, base.teacher_gguf, torch.float32, "teacher").eval()
    problems = train_problems(tokenizer, base)
    records: dict[str, list[dict]] = {p: [] for p in POINTS}
    runs = []
    for seed in seed_list(base, seeds):
        cfg = replace(base, seed=seed)
        cfg = replace(cfg, output_dir=os.path.join(out, label, "shadow", f"seed{cfg.seed}"))
        runs.append(summarize_run(run_arm(cfg, "shadow", cfg.seed, log)))
        for point in records:
            records[point] += diagnose(cfg.output_dir, cfg, point, teacher, tokenizer, problems, batches, log)
    summary = {p: shadow_summary(r) for p, r in records.items()}
    rules = {p: {rule: shadow_summary(r, rule) for rule in RULES} for p, r in records.items()}
    plots = shadow_plots(records, base, out, label)
    training_rate = statistics.fmean(r["shadow_rate"] for r in runs)
    entry = {"config": base.to_dict(), "summary": summary, "rules": rules, "plots": plots,
             "shadow_runs": [r["run_dir"] for r in runs], "shadow_rate_during_training": training_rate}
    columns = {f"{name}, {p}": rules[p][rule] for rule, name in RULES.items() for p in rules}
    md = [f"## {label} world (seeds {', '.join(map(str, seed_list(base, seeds)))}; {batches} batches of "
          f"{base.batch_size * base.samples_per_prompt} rollouts per seed and point)", "", setup_line(base), "",
          shadow_markdown(summary), "",
          f"The same rollouts judged by the drift-gated rule (drift_prob {base.drift_prob}) and by the cut-after-drift "
          "contrast, replayed on each rollout's recorded d_t and log q(y_t) with the same threshold:", "",
          shadow_markdown(columns, prefix=""), "",
          f"Would-be cut rate over the shadow run's own training rollouts (warm-up included): "
          f"{100 * training_rate:.1f}%.", "",
          f"![cut positions]({os.path.basename(plots['cut_positions'])})", ""]
    return entry, md


def run_shadow(argv: list[str], seeds: int | list[int], out: str, worlds: list[str | None], batches: int = 8,
               dry_run: bool = False, command: str = "", log=print) -> dict:
    """Shadow KAT runs, then graded shadow rollouts of the student before and after training.

    Finished runs and graded rollouts found under `out` are reused (`run_arm`, `diagnose`).
    """
    result = {"command": command, "commit": git_commit(), "worlds": {}}
    md = ["# Shadow-mode diagnostics", "", f"`{command}` at commit {result['commit']} (runs and graded rollouts "
          "found in the output directory are reused, not redone)", "",
          "A KAT run with shadow=True (nothing cut, would-be cuts recorded). Then, with its settings, batches "
          "of training prompts sampled by the student before training (detector calibrated on that student's "
          "own rollouts first) and by the student after the shadow run (detector state of its last checkpoint), "
          "threshold held fixed, every rollout graded.", ""]
    if not dry_run:
        os.makedirs(out, exist_ok=True)
    for world in worlds:
        base = replace(base_config(argv, world), **STATIC_ARMS["shadow"])
        label = world or world_name(base)
        log(plan_line("shadow", ["shadow"], seeds, base, label) + f"; then {batches} graded batches of "
            f"{base.batch_size * base.samples_per_prompt} rollouts per seed before and after training")
        if dry_run:
            continue
        result["worlds"][label], lines = shadow_world(base, seeds, out, label, batches, log)
        md += lines
    if dry_run:
        return result
    write_report(out, "shadow", result, md, log)
    return result
