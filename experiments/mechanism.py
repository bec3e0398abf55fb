"""Why cutting matters or not: the gradient that the tokens a rule would cut carry, step by step.

A shadow KAT run (nothing is cut, so it trains exactly as OPD does) whose every step, before the
optimiser step and at the parameters that step starts from, splits the step's loss over three
segments of the rollout:

- paper: positions at and after the paper rule's would-be cut (the recorded shadow decision);
- gated: the same for the drift-gated rule (replayed with the step's threshold);
- drift:  positions after each rollout's first drift token (the cut-after-drift contrast).

With l_t the per-token loss (for `full`, d_t) and G_S = grad sum_{t in S} l_t the summed gradient of
a set of tokens S, the step's OPD gradient is G_all / N and the gradient of a rule that drops S is
G_rest / N_rest, G_rest = G_all - G_S (the loss is linear in the tokens). Per step and segment:

    token share  N_S / N                  loss share  sum_S l / sum_all l
    grad share   |G_S| / |G_all|          cos(G_all, G_rest): the step's direction with vs without S
    cos(G_S, G_rest): whether S pushes the way the kept tokens do (> 0) or against them (< 0)
    norm ratio   (|G_rest| / N_rest) / (|G_all| / N): what dropping S does to the gradient's size

The loss is normalised and then clipped to max_grad_norm before AdamW; when both gradients are
longer than the clip (`clipped` = both norms above it), dropping S changes the update's direction
only, whatever the normaliser. Steps where a segment is empty count as zero share and are left
out of the cosines' means.

    python -m experiments mechanism --config configs/toy.yaml --world rich [--seeds 1] [--out DIR]
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import replace

import torch

from kat.config import Config
from kat.hooks import StepContext
from experiments.arms import STATIC_ARMS, base_config, seed_list, world_name
from experiments.report import plan_line, setup_line, write_report
from experiments.runs import git_commit, restart, same_config
from kat.plot import read_jsonl

SEGMENTS = ("paper", "gated", "drift")


def segment_masks(rollout, replayed: dict) -> dict[str, torch.Tensor]:
    """(B, T) bool masks of the tokens each rule would drop (generated positions >= its cut)."""
    pos = torch.arange(rollout.completion_ids.shape[1])  # (T,)
    gen = rollout.completion_mask.bool()  # (B, T)
    cuts = {"paper": rollout.shadow_cut, "gated": replayed.get("cut_gated"), "drift": replayed["cut_drift"]}
    out = {}
    for name, cut in cuts.items():
        if cut is None:
            cut = torch.full_like(rollout.stop, -1)
        cut = cut.cpu()
        out[name] = gen & (cut[:, None] >= 0) & (pos[None, :] >= cut[:, None])  # (B, T)
    return out


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = a.norm().item(), b.norm().item()
    return (a @ b).item() / (na * nb) if na > 0 and nb > 0 else None


def gradient_split(student, teacher, rollout, masks: dict[str, torch.Tensor], kind: str,
                   max_grad_norm: float) -> dict:
    """The step's gradient split over each segment's tokens (see the module docstring), in float64.

    One forward of each model over the whole rollout (the toy's batches fit in one piece); the
    student's gradients are taken with torch.autograd.grad, so its .grad fields stay untouched.
    """
    from kat.learner import completion_logits, token_losses

    params = [p for p in student.parameters() if p.requires_grad]
    teacher_logits = None
    if kind == "full":
        with torch.no_grad():
            teacher_logits = completion_logits(teacher, rollout)  # (B, T, V)
    loss = token_losses(completion_logits(student, rollout), rollout, kind, teacher_logits)  # (B, T)
    gen = rollout.completion_mask.bool()  # (B, T) shadow mode: the loss mask is every generated token
    n_all, loss_all = gen.sum().item(), loss.detach()[gen].double().sum().item()
    g_all = _flat_grad(loss[gen].sum(), params)
    norm_all = g_all.norm().item()
    out = {"tokens": n_all, "grad_norm": norm_all / max(n_all, 1)}
    for name, seg in masks.items():
        n_seg = seg.sum().item()
        g_seg = _flat_grad(loss[seg].sum(), params) if n_seg else torch.zeros_like(g_all)
        g_rest = g_all - g_seg
        n_rest = n_all - n_seg
        rest_norm = g_rest.norm().item() / max(n_rest, 1)  # the dropping rule's gradient, normalised
        out[name] = {
            "token_share": n_seg / max(n_all, 1),
            "loss_share": loss.detach()[seg].double().sum().item() / loss_all if loss_all else 0.0,
            "grad_share": g_seg.norm().item() / norm_all if norm_all else 0.0,
            "cos_with_without": _cos(g_all, g_rest) if n_seg else None,
            "cos_segment_rest": _cos(g_seg, g_rest) if n_seg else None,
            "norm_ratio": rest_norm / out["grad_norm"] if out["grad_norm"] else None,
            "clipped": min(rest_norm, out["grad_norm"]) > max_grad_norm,
        }
    return out


def mechanism_run(cfg: Config, log=print) -> str:
    """A shadow KAT run with `gradient_split` measured at every step: DIR/mechanism.jsonl (one row per
    step) beside the run's own files. Reused when finished with the same config."""
    from kat.train import train

    path = os.path.join(cfg.output_dir, "mechanism.jsonl")
    if os.path.isfile(path) and os.path.isfile(os.path.join(cfg.output_dir, "results.json")) \
            and same_config(cfg.output_dir, cfg):
        log(f"  mechanism seed {cfg.seed}: reusing {cfg.output_dir}")
        return cfg.output_dir
    restart(cfg)
    t0 = time.perf_counter()
    rows = []
    train(cfg, hooks=[lambda ctx: measure_step(ctx, rows)])
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    log(f"  mechanism seed {cfg.seed}: {len(rows)} steps in {time.perf_counter() - t0:.0f} s")
    return cfg.output_dir


def measure_step(ctx: StepContext, rows: list[dict]) -> None:
    """The training loop's hook: after sampling, the step's gradient split (at the parameters the step
    starts from) as a new row; after learning, the learner's own gradient norm, to check it against."""
    from experiments.shadow import replay_cuts

    if ctx.stage == "sampled":
        cfg, rollout = ctx.run.cfg, ctx.rollout
        replayed = replay_cuts(rollout, ctx.threshold if ctx.active else None, cfg)
        split = gradient_split(ctx.run.accelerator.unwrap_model(ctx.run.student), ctx.run.teacher, rollout,
                               segment_masks(rollout, replayed), cfg.loss, cfg.max_grad_norm)
        rows.append({"step": ctx.step + 1, "active": ctx.active, "threshold": ctx.threshold, **split})
    else:
        rows[-1]["logged_grad_norm"] = ctx.stats["grad_norm"]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def mechanism_summary(rows: list[dict], first_step: int = 1, last_step: int | None = None) -> dict:
    """Means over steps first_step..last_step of each segment's numbers (cosines over steps where the
    segment was not empty), and the share of steps where both gradients were clipped."""
    rows = [r for r in rows if r["step"] >= first_step and (last_step is None or r["step"] <= last_step)]
    out = {"steps": len(rows), "grad_norm": _mean([r["grad_norm"] for r in rows])}
    for seg in SEGMENTS:
        segs = [r[seg] for r in rows]
        out[seg] = {k: _mean([float(s[k]) if isinstance(s[k], bool) else s[k] for s in segs])
                    for k in segs[0]} if segs else {}
        out[seg]["steps_nonempty"] = sum(s["token_share"] > 0 for s in segs)
    return out


MECHANISM_ROWS = (("token_share", "tokens in the segment", 100), ("loss_share", "share of the loss", 100),
                  ("grad_share", "norm of G_S / norm of G_all", 100),
                  ("cos_with_without", "cos(G_all, G_all - G_S): the step with vs without S", None),
                  ("cos_segment_rest", "cos(G_S, G_all - G_S)", None),
                  ("norm_ratio", "gradient norm after dropping S / before (each normalised)", None),
                  ("clipped", "steps where both are clipped (norm > max_grad_norm)", 100),
                  ("steps_nonempty", "steps where the segment is not empty", None))


def mechanism_markdown(summaries: dict[str, dict]) -> str:
    """One column per (label, segment), one row per statistic."""
    cols = [(label, seg) for label in summaries for seg in SEGMENTS]
    names = {"paper": "paper's cut", "gated": "gated cut", "drift": "after drift"}
    lines = ["| | " + " | ".join(f"{names[seg]}, {label}" for label, seg in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for key, name, scale in MECHANISM_ROWS:
        cells = []
        for label, seg in cols:
            v = summaries[label][seg].get(key)
            cells.append("-" if v is None else f"{scale * v:.1f}%" if scale else
                         str(v) if isinstance(v, int) else f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_mechanism(argv: list[str], seeds: int | list[int], out: str, worlds: list[str | None],
                  dry_run: bool = False, command: str = "", log=print) -> dict:
    """Mechanism runs per world and seed; DIR/mechanism.md and mechanism.json with the means over the
    steps where the detector was active, split into the first and second half of those steps."""
    result = {"command": command, "commit": git_commit(), "worlds": {}}
    md = ["# Mechanism: the gradient of the tokens each rule would cut", "",
          f"`{command}` at commit {result['commit']}", "", "\n\n".join(__doc__.split("\n\n")[1:6]), ""]
    for world in worlds:
        base = replace(base_config(argv, world), **STATIC_ARMS["shadow"])
        if "--eval_every" not in argv:  # the measurement needs no learning curve: evaluate before and after only
            base = replace(base, eval_every=base.steps)
        label = world or world_name(base)
        log(plan_line("mechanism", ["shadow"], seeds, base, label) + "; gradient split at every step")
        if dry_run:
            continue
        rows = []
        for seed in seed_list(base, seeds):
            cfg = replace(base, seed=seed, output_dir=os.path.join(out, label, "mechanism", f"seed{seed}"))
            rows += read_jsonl(os.path.join(mechanism_run(cfg, log), "mechanism.jsonl"))
        first = min([r["step"] for r in rows if r["active"]], default=1)
        mid = first + math.ceil((base.steps - first + 1) / 2) - 1
        parts = {f"steps {first}-{mid}": mechanism_summary(rows, first, mid),
                 f"steps {mid + 1}-{base.steps}": mechanism_summary(rows, mid + 1)}
        result["worlds"][label] = {"config": base.to_dict(), "summary": parts, "rows": rows}
        md += [f"## {label} world (seeds {', '.join(map(str, seed_list(base, seeds)))})", "", setup_line(base), "",
               f"Mean norm of the step's OPD gradient G_all / N: {_mean([r['grad_norm'] for r in rows]):.3f} "
               f"(max_grad_norm {base.max_grad_norm}).", "", mechanism_markdown(parts), ""]
    if not dry_run:
        write_report(out, "mechanism", result, md, log)
    return result
