"""Trap statistics of a real language model pair in shadow mode: where would the rules cut, and are
those cuts inside repetition loops?

    python -m experiments lm --config configs/smollm2_shadow.yaml [--batches 8] [--out DIR]
    python -m experiments lm --config CONFIG --pool DIR,DIR --out DIR   # one report over several runs

The student samples training prompts with a shadow detector (`experiments.shadow.shadow_rollouts`:
the detector is first calibrated on the student's own rollouts, then `batches` batches are recorded
with its threshold held fixed), every rollout is graded, and the paper's rule, the drift-gated rule
and the cut-after-drift contrast are compared on the same rollouts. A repetition loop is found in
the completion's token ids by `find_loop` (no world rules to lean on, unlike the toy world). When the
config's student directory does not exist, it is made from the teacher by keeping `--student-layers`
evenly spaced decoder layers (kat.models.prune_layers), as `python -m kat models prune` does.
"""

from __future__ import annotations

import json
import os
import textwrap
import time

import torch

from kat.config import Config, ConfigError, load_config
from experiments.report import shadow_markdown, shadow_summary, write_report
from experiments.runs import git_commit
from experiments.shadow import RULES, shadow_rollouts, train_problems


def find_loop(ids: list[int], min_repeats: int = 3, min_span: int = 12, max_period: int = 64) -> tuple[int, int] | None:
    """The first repetition loop of a token sequence: (start, period), or None.

    A segment [s, e) is a loop of period p when every token equals the one p positions earlier,
        ids[t] == ids[t - p]   for t in [s + p, e),
    it holds at least `min_repeats` copies of its unit ((e - s) >= min_repeats * p) and spans at
    least `min_span` tokens (so "1, 1, 1" or a short run of one token is not a loop). The loop is
    reported from its first REPEATED copy, start = s + p (the tokens a loop adds beyond its first
    statement, as the toy world's `repeat_start` counts them); among periods the earliest start wins,
    ties going to the shorter period.
    """
    n, best = len(ids), None
    for p in range(1, min(max_period, n // max(min_repeats, 1)) + 1):
        need = max(min_repeats * p, min_span) - p  # matching positions a loop of period p needs
        run = 0
        for t in range(p, n):
            run = run + 1 if ids[t] == ids[t - p] else 0
            if run == need:
                start = t - need + 1  # first position equal to the one p earlier
                if best is None or start < best[0]:
                    best = (start, p)
                break
    return best


DRIFT_PROBS = (0.005, 0.001, 0.0001)  # the gate at stricter drift thresholds than the config's, replayed


def lm_records(cfg: Config, batches: int, student_layers: int, log=print, path: str = "") -> list[dict]:
    """Graded shadow rollouts of the config's student (made by pruning the teacher when missing; a
    given student, a directory or a GGUF file in one, must share the teacher's tokenizer), each with
    its loop start (`repeat_start`, None without a loop) and loop period. With `path`, each recorded
    batch is appended to that JSON-lines file as soon as it is done."""
    from kat.models import align_vocab, check_tokenizers, evenly_spaced, load_model, load_tokenizer, prune_layers
    from kat.train import build_terminator

    torch.manual_seed(cfg.seed)
    teacher = load_model(cfg.teacher, cfg.teacher_gguf, torch.float32, "teacher").eval()
    tokenizer = load_tokenizer(cfg.teacher, cfg.teacher_gguf, "teacher")
    if not os.path.isdir(cfg.student):
        keep = evenly_spaced(teacher.config.num_hidden_layers, student_layers)
        prune_layers(teacher, keep).save_pretrained(cfg.student)
        tokenizer.save_pretrained(cfg.student)
        log(f"  student: layers {keep} of the teacher's {teacher.config.num_hidden_layers} -> {cfg.student}")
    else:
        check_tokenizers(load_tokenizer(cfg.student, cfg.student_gguf, "student"), tokenizer)
    student = load_model(cfg.student, cfg.student_gguf, torch.float32, "student").eval()
    align_vocab(student, teacher, tokenizer)
    problems, detector, records = train_problems(tokenizer, cfg), build_terminator(cfg), []
    for b in range(batches):  # one batch a call: the detector, once calibrated, keeps its threshold
        t0 = time.perf_counter()
        first = records[-1]["step"] + 1 if records else 0
        batch = shadow_rollouts(student, teacher, tokenizer, problems, cfg, detector, batches=1, first_step=first,
                                drift_probs=DRIFT_PROBS)
        for r in batch:
            loop = find_loop(r["ids"])
            r["repeat_start"], r["loop_period"] = (loop if loop else (None, None))
            r["tokens"] = [tokenizer.decode([i]) for i in r["ids"]]
        records += batch
        if path:
            with open(path, "a") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in batch)
        log(f"  batch {b + 1}/{batches} (step {batch[0]['step']}): {len(batch)} rollouts, "
            f"{sum(r['correct'] for r in batch)} correct, {time.perf_counter() - t0:.0f} s")
    return records


def pool_records(dirs: list[str]) -> tuple[list[dict], float]:
    """The rollouts of several finished lm runs (their lm_rollouts.jsonl), each tagged with its run's
    seed, and the runs' minutes summed. Every run was calibrated on its own rollouts, so each record's
    would-be cuts are its own run's; pooled, the report counts them over all runs. Two runs of one
    seed would repeat rollouts, so they are refused."""
    from kat.plot import read_jsonl

    records, seen, minutes = [], {}, 0.0
    for d in dirs:
        path, meta = os.path.join(d, "lm_rollouts.jsonl"), os.path.join(d, "lm.json")
        if not (os.path.isfile(path) and os.path.isfile(meta)):
            raise ConfigError(f"--pool: {d} holds no finished lm run (lm_rollouts.jsonl and lm.json); "
                              "run `python -m experiments lm --out DIR` there first")
        with open(meta) as fh:
            run = json.load(fh)
        seed, minutes = run["config"]["seed"], minutes + run["minutes"]
        if seed in seen:
            raise ConfigError(f"--pool: {d} and {seen[seed]} are both seed {seed}, so they sampled the same "
                              "prompts and tokens; pool runs of different seeds")
        seen[seed] = d
        records += [{**r, "seed": seed} for r in read_jsonl(path)]
    return records, minutes


# ---------------------------------------------------------------------------------------------
# Pictures: the trace with the text under it

MARKS = {"shadow_cut": ("k", "-", "paper's would-be cut"), "cut_gated": ("C2", "--", "gated would-be cut"),
         "drift": ("C1", ":", "first drift token"), "repeat_start": ("C4", "-.", "loop starts repeating")}


def marked_text(r: dict, width: int = 150) -> str:
    """The completion with a bracketed mark before the token at each marked position."""
    tags = {"shadow_cut": "[CUT]", "cut_gated": "[GATED CUT]", "drift": "[DRIFT]", "repeat_start": "[LOOP]"}
    out = []
    for t, tok in enumerate(r["tokens"]):
        out += [tag for key, tag in tags.items() if r.get(key) == t]
        out.append(tok)
    text = "".join(out).replace("\n", " / ")
    return "\n".join(textwrap.wrap(text, width, replace_whitespace=False, drop_whitespace=False)[:9])


def text_traces_figure(records: list[dict], window: int, title: str = ""):
    """One panel per rollout: d_t and z (log axis), the threshold, the rules' cuts, the first drift
    token and the loop start; under each panel the completion text with the same marks."""
    from kat.plot import KL_FLOOR, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2 * len(records), 1, figsize=(14, 4.6 * len(records)), squeeze=False,
                             gridspec_kw={"height_ratios": [1.3, 1.0] * len(records)})
    for i, r in enumerate(records):
        ax, tx = axes[2 * i, 0], axes[2 * i + 1, 0]
        n = r["length"]
        ax.plot(range(n), [max(v, KL_FLOOR) for v in r["kl"]], lw=0.7, color="0.55", label="d_t")
        z = [float("nan") if v is None else max(v, KL_FLOOR) for v in r["z"][window - 1:]]
        ax.plot(range(len(z)), z, lw=1.4, color="C0", label=f"z (window {window}, drawn at its start)")
        if r.get("threshold"):
            ax.axhline(r["threshold"], color="C3", ls="--", lw=1, label="threshold s")
        for key, (color, style, label) in MARKS.items():
            if r.get(key) is not None:
                ax.axvline(r[key], color=color, ls=style, lw=1.3, label=label)
        ax.set_yscale("log")
        ax.set_xlim(0, n)
        ax.set_title(f"rollout {i + 1}: {n} tokens, answer {'correct' if r['correct'] else 'wrong'} "
                     f"(reference {r['answer']}); prompt: {r['prompt'][:90]}", fontsize=8, loc="left")
        ax.legend(fontsize=6, loc="upper right", ncol=3)
        ax.tick_params(labelsize=7)
        tx.axis("off")
        tx.text(0, 1, marked_text(r), fontsize=6.5, family="monospace", va="top", ha="left", wrap=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig


def pick_lm_examples(records: list[dict], n: int = 4) -> list[dict]:
    """Rollouts to draw: a looping one cut by the paper's rule, one cut but not looping, one the
    gate vetoes, and a correct one, each the first of its kind (when a kind is absent, fewer, but at
    least two rollouts)."""
    kinds = [lambda r: r["repeat_start"] is not None and r["shadow_cut"] is not None,
             lambda r: r["repeat_start"] is None and r["shadow_cut"] is not None,
             lambda r: r["shadow_cut"] is not None and r.get("cut_gated") is None,
             lambda r: r["correct"]]
    picked = []
    for kind in kinds[:n]:
        hit = next((r for r in records if kind(r) and r not in picked), None)
        if hit is not None:
            picked.append(hit)
    return picked + [r for r in records if r not in picked][:max(0, 2 - len(picked))]  # at least two panels


def answer_position(tokens: list[str], marker: str = "answer is") -> int | None:
    """The first token position at which the decoded completion contains `marker` (case-insensitive):
    where the rollout states its answer; None when it never does."""
    text = ""
    for t, tok in enumerate(tokens):
        text += tok
        if marker in text.lower():
            return t
    return None


def pair_statistics(records: list[dict]) -> dict:
    """Pooled over the rollouts: mean d_t per completion token, share of tokens above 1 nat, mean
    length, share stopped by the length cap, share that state an answer."""
    kl = [v for r in records for v in r["kl"]]
    return {"rollouts": len(records), "tokens": len(kl), "mean_kl": sum(kl) / len(kl),
            "share_kl_above_1": sum(v > 1 for v in kl) / len(kl),
            "mean_length": sum(r["length"] for r in records) / len(records),
            "truncated": sum(r["stop"] == "length" for r in records) / len(records),
            "states_answer": sum(answer_position(r["tokens"]) is not None for r in records) / len(records)}


def rollout_table(records: list[dict]) -> str:
    """One row per rollout: grade, length and stop, where it states its answer, the loop start, the
    paper's and the gated would-be cut, the first drift token, and its d_t (mean, max)."""
    def cell(v):
        return "-" if v is None else str(v)
    rows = ["| # | (seed/) step | grade (reference) | length, stop | answer stated at | loop start (period) "
            "| paper's cut | gated cut | first drift | mean d | max d |", "|---" * 11 + "|"]
    for i, r in enumerate(records, start=1):
        loop = "-" if r.get("repeat_start") is None else f"{r['repeat_start']} ({r['loop_period']})"
        step = f"{r['seed']}/{r['step']}" if "seed" in r else str(r["step"])
        rows.append(f"| {i} | {step} | {'correct' if r['correct'] else 'wrong'} ({r['answer']}) | "
                    f"{r['length']}, {r['stop']} | {cell(answer_position(r['tokens']))} | {loop} | "
                    f"{cell(r['shadow_cut'])} | {cell(r.get('cut_gated'))} | {cell(r.get('drift'))} | "
                    f"{sum(r['kl']) / max(len(r['kl']), 1):.3f} | {max(r['kl'], default=0):.2f} |")
    return "\n".join(rows)


def run_lm(argv: list[str], out: str, batches: int = 8, student_layers: int = 28, dry_run: bool = False,
           command: str = "", log=print, pool: list[str] | None = None) -> dict:
    """Record, summarise and draw; DIR/lm.md, lm.json, lm_rollouts.jsonl and lm_traces.png. With
    `pool` (finished runs' directories) nothing is sampled: the report covers their rollouts."""
    cfg = load_config(argv, shadow=True, termination="kat")
    n = batches * cfg.batch_size * cfg.samples_per_prompt
    if pool:
        log(f"[lm] pooling the rollouts of {len(pool)} runs: {', '.join(pool)}")
    else:
        log(f"[lm] teacher {cfg.teacher} {cfg.teacher_gguf}, student {cfg.student}: {n} rollouts of <= "
            f"{cfg.max_new_tokens} tokens after calibration; detector W={cfg.window} stride={cfg.stride} "
            f"patience={cfg.patience} exempt={cfg.exempt} eta={cfg.eta}, drift_prob {cfg.drift_prob}")
    if dry_run:
        return {}
    pooled, pooled_minutes = pool_records(pool) if pool else (None, 0.0)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "lm_rollouts.jsonl")
    t0 = time.perf_counter()
    if pooled is not None:
        if os.path.isfile(path):
            raise ConfigError(f"--out {out} already holds lm_rollouts.jsonl; pool into a new directory")
        records = pooled
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    elif os.path.isfile(path):
        from kat.plot import read_jsonl
        records = read_jsonl(path)
    else:
        open(path + ".partial", "w").close()  # a partial file of an earlier, interrupted run starts over
        records = lm_records(cfg, batches, student_layers, log, path + ".partial")
        os.replace(path + ".partial", path)
    minutes = pooled_minutes if pooled is not None else (time.perf_counter() - t0) / 60
    names = {**RULES, "cut_gated": f"drift-gated, drift_prob {cfg.drift_prob:g}"}
    rules = {names[key]: shadow_summary(records, key) for key in RULES}
    for p in DRIFT_PROBS:  # the gate with a stricter drift_prob; its drift rates at that drift_prob
        if f"cut_gated@{p:g}" in records[0]:
            recs = [{**r, "drift": r[f"drift@{p:g}"]} for r in records]
            rules[f"drift-gated, drift_prob {p:g}"] = shadow_summary(recs, f"cut_gated@{p:g}")
    picture = os.path.join(out, "lm_traces.png")
    fig = text_traces_figure(pick_lm_examples(records), cfg.window,
                             f"{cfg.student} sampled, {cfg.teacher_gguf or cfg.teacher} scoring (shadow mode)")
    fig.savefig(picture, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    stats = pair_statistics(records)
    result = {"command": command, "commit": git_commit(), "config": cfg.to_dict(), "minutes": minutes,
              "summary": rules, "pair": stats, "picture": picture}
    md = ["# Trap statistics of a real model pair (shadow mode)", "", f"`{command}` at commit {result['commit']}, "
          f"{minutes:.1f} minutes", "", __doc__.split("\n\n")[2].replace("\n", " "), "",
          shadow_markdown(rules, prefix=""), "",
          f"{stats['rollouts']} rollouts, {stats['tokens']} completion tokens: mean d_t {stats['mean_kl']:.3f} "
          f"nats/token, {100 * stats['share_kl_above_1']:.1f}% of tokens above 1 nat; mean length "
          f"{stats['mean_length']:.0f} tokens, {100 * stats['truncated']:.0f}% stopped by the length cap, "
          f"{100 * stats['states_answer']:.0f}% state an answer (\"answer is\").", "",
          f"![traces]({os.path.basename(picture)})", "", "Per rollout (positions are completion tokens):", "",
          rollout_table(records), ""]
    write_report(out, "lm", result, md, log)
    return result
