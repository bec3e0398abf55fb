"""One-step influence of what KAT drops: does a step on the would-be-cut tokens help or harm imitation
of clean teacher solutions?

A shadow KAT run (the detector records `shadow_cut` and cuts nothing, so it trains as OPD does). At
each probe step, after sampling and at the parameters the step starts from, a copy of the student
takes ONE optimiser step on the OPD loss of one set of that step's tokens, and the change of a
held-out loss is measured:

- cut:    the would-be-cut segments, positions shadow_cut .. end of every flagged rollout;
- random: as many segments of the same token counts, each a contiguous span placed blind to the
          detector anywhere in the step's generated tokens, one per rollout where possible
          (`matched_random_mask`), several draws: the cut tokens make up about 40% of a step's
          tokens on the toy, too many for spans of their lengths to fit in the unflagged ones alone;
          a blind span overlaps the cut tokens at about their base rate (reported as `overlap`);
- kept:   every unflagged token (KAT's own step); all: every generated token (OPD's step).

The step: a fresh AdamW (the run's betas, eps, weight decay) at the config's peak learning rate (the
same at every probe step, so that late probes, where the cosine schedule has decayed, weigh alike),
on the segment's loss summed over its tokens and divided by their count (the learner's per-token
normalisation), its gradient clipped to max_grad_norm as in the run. A fresh optimiser
isolates the segment's own update: the run's state would carry beta1 = 0.9 of the earlier steps'
momentum into every arm alike. The first AdamW step is lr * g / (|g| + eps) per coordinate, so it
does not depend on the scale of the gradient: cut and random steps have the same per-coordinate size
whatever their token counts and gradient norms (neither the per-token normalisation nor the clip
changes it beyond eps). An empty set takes no step.

Held-out loss: on fresh problems of the world's generator (disjoint from train.jsonl and test.jsonl),
the teacher samples one completion each at temperature 1 and the grader keeps the correct ones. On
those, `nll` is the student's mean negative log-likelihood of the teacher's tokens (EOS included) and
`rkl` the mean reverse KL(student || teacher) at the same prefixes, both per token. Delta = after -
before the one step: negative helps, positive harms. `first_order` is -cos(g_S, grad nll): the sign a
small gradient step on S would give the held-out NLL (negative: S's gradient descends it).

    python -m experiments influence --config configs/toy.yaml --world rich --seeds 3 [--heldout 1024]
        [--probe-steps 6,12,18,24,30] [--draws 4] [--out DIR]
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import replace

import numpy as np
import torch

from kat.config import Config, ConfigError
from kat.hooks import StepContext
from experiments.arms import STATIC_ARMS, base_config, seed_list, world_name
from experiments.report import write_report
from experiments.runs import git_commit, restart, same_config

PROBE_ARMS = ("cut", "random", "kept", "all")
METRICS = ("nll", "rkl", "first_order")


# --- the token sets ---------------------------------------------------------------------------------

def cut_mask(rollout) -> torch.Tensor:
    """(B, T) bool: generated positions at or after each row's shadow cut (rows without one: none)."""
    gen = rollout.completion_mask.bool().cpu()  # (B, T)
    cut = rollout.shadow_cut
    if cut is None:
        return torch.zeros_like(gen)
    cut = cut.cpu()
    pos = torch.arange(gen.shape[1])  # (T,)
    return gen & (cut[:, None] >= 0) & (pos[None, :] >= cut[:, None])


def _starts(free_row: np.ndarray, length: int) -> np.ndarray:
    """Start positions of every window of `length` consecutive free positions in one row."""
    if length > free_row.size:
        return np.zeros(0, dtype=np.int64)
    run = np.convolve(free_row.astype(np.int64), np.ones(length, dtype=np.int64), mode="valid")  # (T - L + 1,)
    return np.flatnonzero(run == length)


def matched_random_mask(cut: torch.Tensor, gen: torch.Tensor, rng: np.random.Generator,
                        avoid_cut: bool = False) -> tuple[torch.Tensor, dict]:
    """Segments matched to the cut ones: for each cut segment (longest first), a contiguous span of the
    same length in the free tokens (every generated token; with `avoid_cut` only the unflagged ones,
    gen & ~cut), in a rollout that holds no span yet where one fits (uniform over such rollouts, then
    over start positions), else in any rollout with room; when no contiguous span fits, the segment's
    tokens are drawn uniformly from the free tokens left (counted as `scattered`). Returns the (B, T)
    mask and {"segments", "tokens", "scattered", "short", "overlap"}: `short` tokens could not be
    placed (only when the free tokens are fewer than the cut ones), `overlap` tokens are cut ones."""
    cut, gen = cut.cpu().numpy(), gen.cpu().numpy().astype(bool)
    free = gen & ~cut if avoid_cut else gen.copy()  # (B, T)
    out = np.zeros_like(free)
    used = np.zeros(free.shape[0], dtype=bool)
    lengths = sorted((int(n) for n in cut.sum(1) if n > 0), reverse=True)
    scattered = short = 0
    for length in lengths:
        fits = {b: s for b in range(free.shape[0]) if (s := _starts(free[b], length)).size}
        rows = [b for b in fits if not used[b]] or list(fits)
        if rows:
            b = rows[rng.integers(len(rows))]
            s = fits[b][rng.integers(fits[b].size)]
            out[b, s:s + length] = True
            free[b, s:s + length] = False
            used[b] = True
            continue
        scattered += 1
        left = np.flatnonzero(free.reshape(-1))
        take = rng.choice(left, size=min(length, left.size), replace=False)
        short += length - take.size
        out.reshape(-1)[take] = True
        free.reshape(-1)[take] = False
    info = {"segments": len(lengths), "tokens": int(out.sum()), "scattered": scattered, "short": short,
            "overlap": int((out & cut).sum())}
    return torch.from_numpy(out), info


# --- the held-out loss --------------------------------------------------------------------------------

def clean_solutions(teacher, tokenizer, eos, problems: list[dict], cfg: Config, seed: int):
    """The teacher's own completions of `problems` (one each, temperature 1) that the grader marks
    correct, as a Rollout whose loss_mask is every generated token. Returns (rollout, n sampled)."""
    from kat.config import render_kw
    from kat.data import encode_prompts, render_prompt
    from kat.evaluate import grade
    from kat.sampler import sample

    texts = [render_prompt(tokenizer, p["prompt"], **render_kw(cfg)) for p in problems]
    ids, mask = encode_prompts(tokenizer, texts)
    rollout, _ = sample(teacher, teacher, ids, mask, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                        pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0, chunk=cfg.chunk,
                        generator=torch.Generator().manual_seed(seed), score=False)
    lengths = rollout.lengths.tolist()
    keep = [i for i, (row, n, p) in enumerate(zip(rollout.completion_ids.tolist(), lengths, problems))
            if grade(tokenizer.decode(row[:n], skip_special_tokens=True), str(p["answer"]), cfg.grader)]
    clean = rollout.select(torch.tensor(keep, dtype=torch.long)).trim()
    return replace(clean, loss_mask=clean.completion_mask.clone(), teacher_logits=None), len(problems)


@torch.no_grad()
def teacher_logits_of(teacher, rollout, batch: int = 256) -> torch.Tensor:
    """(B, T, V) float32 teacher logits predicting each completion token."""
    from kat.learner import completion_logits

    B = rollout.prompt_ids.shape[0]
    return torch.cat([completion_logits(teacher, rollout.select(slice(s, s + batch))).float()
                      for s in range(0, B, batch)])


def heldout_terms(student, clean, teacher_logits: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the clean solutions' tokens of -log p_s(y_t) and of KL(p_s || p_t), as float32 scalars
    with gradient (float64 values via .double() for the report)."""
    from kat.learner import completion_logits
    from kat.scorer import reverse_kl, token_logp

    B = clean.prompt_ids.shape[0]
    nll = torch.zeros((), dtype=torch.float64)
    rkl = torch.zeros((), dtype=torch.float64)
    for s in range(0, B, batch):
        part = clean.select(slice(s, s + batch))
        mask = part.completion_mask.bool()  # (b, T)
        logits = completion_logits(student, part)  # (b, T, V)
        logp = token_logp(logits, torch.where(mask, part.completion_ids, 0))  # (b, T)
        d = reverse_kl(logits, teacher_logits[s:s + batch].to(logits.dtype))  # (b, T)
        nll = nll + (-logp[mask]).double().sum()
        rkl = rkl + d[mask].double().sum()
    return nll, rkl


def heldout_loss(student, clean, teacher_logits: torch.Tensor) -> dict:
    """{"nll", "rkl"}: per-token means (float64) over the clean solutions' generated tokens."""
    n = int(clean.completion_mask.sum())
    with torch.no_grad():
        nll, rkl = heldout_terms(student, clean, teacher_logits)
    return {"nll": nll.item() / n, "rkl": rkl.item() / n}


def heldout_grad(student, clean, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Flat float64 gradient of the held-out mean NLL at the student's parameters (.grad untouched)."""
    params = [p for p in student.parameters() if p.requires_grad]
    nll, _ = heldout_terms(student, clean, teacher_logits)
    grads = torch.autograd.grad(nll / int(clean.completion_mask.sum()), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


# --- the one step ------------------------------------------------------------------------------------

def one_step(student, rollout, mask: torch.Tensor, kind: str, *, lr: float, max_grad_norm: float | None,
             betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
             teacher_logits: torch.Tensor | None = None) -> tuple[torch.nn.Module, dict]:
    """A copy of `student` after one fresh-AdamW step on the OPD loss of the `mask` tokens, summed and
    divided by their count, the gradient clipped to max_grad_norm. An empty mask takes no step.
    Returns (the copy, {"tokens", "grad_norm", "grad"}): grad is the flat float64 per-token-mean gradient."""
    from kat.learner import completion_logits, token_losses

    model = copy.deepcopy(student)
    params = [p for p in model.parameters() if p.requires_grad]
    n = int(mask.sum())
    if n == 0:
        return model, {"tokens": 0, "grad_norm": 0.0, "grad": None}
    part = replace(rollout, loss_mask=mask.to(rollout.completion_mask.device), teacher_logits=None)
    loss = token_losses(completion_logits(model, part), part, kind, teacher_logits).sum() / n
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    flat = torch.cat([g.reshape(-1).double() for g in grads])
    norm = flat.norm().item()
    for p, g in zip(params, grads):
        p.grad = g
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, {"tokens": n, "grad_norm": norm, "grad": flat}


def _first_order(grad: torch.Tensor | None, h: torch.Tensor) -> float | None:
    if grad is None or grad.norm() == 0 or h.norm() == 0:
        return None
    return -(grad @ h).item() / (grad.norm() * h.norm()).item()


def probe(student, teacher, rollout, clean, clean_teacher_logits, *, kind: str, lr: float,
          max_grad_norm: float | None, optim: dict, draws: int, rng: np.random.Generator) -> dict:
    """Every arm's one-step change of the held-out loss at one step (see the module docstring)."""
    from kat.learner import completion_logits

    gen = rollout.completion_mask.bool().cpu()
    cut = cut_mask(rollout)
    roll_teacher = None
    if kind == "full":
        with torch.no_grad():
            roll_teacher = completion_logits(teacher, rollout).float()  # (B, T, V)
    before = heldout_loss(student, clean, clean_teacher_logits)
    h = heldout_grad(student, clean, clean_teacher_logits)
    sets = {"cut": [cut], "kept": [gen & ~cut], "all": [gen]}
    infos = []
    sets["random"] = []
    for _ in range(draws):
        m, info = matched_random_mask(cut, gen, rng)
        sets["random"].append(m)
        infos.append(info)
    out = {"before": before, "cut_rows": int(cut.any(1).sum()), "rows": int(gen.shape[0]),
           "cut_tokens": int(cut.sum()), "tokens": int(gen.sum()), "random_match": infos}
    for arm in PROBE_ARMS:
        res = []
        for m in sets[arm]:
            model, info = one_step(student, rollout, m, kind, lr=lr, max_grad_norm=max_grad_norm,
                                   teacher_logits=roll_teacher, **optim)
            after = heldout_loss(model, clean, clean_teacher_logits)
            res.append({"tokens": info["tokens"], "grad_norm": info["grad_norm"],
                        "nll": after["nll"] - before["nll"], "rkl": after["rkl"] - before["rkl"],
                        "first_order": _first_order(info["grad"], h)})
        out[arm] = res
    return out


# --- the run -----------------------------------------------------------------------------------------

class Prober:
    """The training loop's hook: at the probe steps, `probe` on the step's rollout (stage "sampled")."""

    def __init__(self, problems: list[dict], probe_steps: list[int], draws: int, heldout_seed: int):
        self.problems, self.probe_steps, self.draws, self.heldout_seed = problems, probe_steps, draws, heldout_seed
        self.clean = self.clean_logits = None
        self.rows: list[dict] = []
        self.sampled = 0

    def __call__(self, ctx: StepContext) -> None:
        if ctx.stage != "sampled" or ctx.step + 1 not in self.probe_steps:
            return
        run, cfg = ctx.run, ctx.run.cfg
        rng_state = torch.get_rng_state()
        if self.clean is None:
            self.clean, self.sampled = clean_solutions(run.teacher, run.tokenizer, run.eos, self.problems, cfg,
                                                       self.heldout_seed)
            self.clean_logits = teacher_logits_of(run.teacher, self.clean)
        group = run.optimizer.param_groups[0]
        optim = {"betas": tuple(group["betas"]), "eps": group["eps"], "weight_decay": group["weight_decay"]}
        lr = cfg.lr
        t0 = time.perf_counter()
        res = probe(run.accelerator.unwrap_model(run.student), run.teacher, ctx.rollout, self.clean,
                    self.clean_logits, kind=cfg.loss, lr=lr, max_grad_norm=cfg.max_grad_norm, optim=optim,
                    draws=self.draws, rng=np.random.default_rng([cfg.seed, ctx.step]))
        torch.set_rng_state(rng_state)
        self.rows.append({"step": ctx.step + 1, "active": ctx.active, "threshold": ctx.threshold, "lr": lr,
                          "run_lr": run.scheduler.get_last_lr()[0],
                          "clean": int(self.clean.prompt_ids.shape[0]), "clean_sampled": self.sampled,
                          "clean_tokens": int(self.clean.completion_mask.sum()),
                          "probe_s": time.perf_counter() - t0, **res})


def influence_run(cfg: Config, problems: list[dict], probe_steps: list[int], draws: int, heldout_seed: int,
                  log=print) -> list[dict]:
    """A shadow run with the probe at `probe_steps`: DIR/influence.jsonl beside the run's files, reused
    when the run is finished with the same config and probe settings."""
    from kat.plot import read_jsonl
    from kat.train import train

    path = os.path.join(cfg.output_dir, "influence.jsonl")
    settings = {"probe_steps": probe_steps, "draws": draws, "heldout_seed": heldout_seed,
                "heldout": [p["prompt"] for p in problems]}
    spath = os.path.join(cfg.output_dir, "influence_settings.json")
    if os.path.isfile(path) and os.path.isfile(spath) and same_config(cfg.output_dir, cfg):
        with open(spath) as fh:
            if json.load(fh) == settings:
                log(f"  influence seed {cfg.seed}: reusing {cfg.output_dir}")
                return read_jsonl(path)
    restart(cfg)
    t0 = time.perf_counter()
    prober = Prober(problems, probe_steps, draws, heldout_seed)
    if "stopped_at" in train(cfg, hooks=[prober]):  # stopped by a signal: record nothing to be reused
        raise SystemExit(f"influence seed {cfg.seed}: the run was stopped; nothing recorded in {cfg.output_dir}")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in prober.rows)
    with open(spath, "w") as fh:
        json.dump(settings, fh)
    log(f"  influence seed {cfg.seed}: {len(prober.rows)} probes in {time.perf_counter() - t0:.0f} s")
    return prober.rows


# --- the report --------------------------------------------------------------------------------------

def unit_values(rows_by_seed: dict[int, list[dict]], metric: str) -> dict[int, dict[str, list[float]]]:
    """Per seed, per arm, one value per probe step that has cut tokens: the arm's change of `metric`
    (random: the mean over its draws), and "cut-random" the paired difference."""
    out = {}
    for seed, rows in rows_by_seed.items():
        per = {arm: [] for arm in (*PROBE_ARMS, "cut-random")}
        for r in rows:
            if r["cut_tokens"] == 0:
                continue
            vals = {}
            for arm in PROBE_ARMS:
                xs = [x[metric] for x in r[arm] if x[metric] is not None]
                vals[arm] = float(np.mean(xs)) if xs else float("nan")
            vals["cut-random"] = vals["cut"] - vals["random"]
            for arm, v in vals.items():
                per[arm].append(v)
        out[seed] = per
    return out


def nested_bootstrap(values: list[list[float]], n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean over all (seed, step) units and its 95% percentile interval from a two-level bootstrap:
    seeds drawn with replacement, then each drawn seed's steps with replacement."""
    values = [np.asarray([v for v in vs if np.isfinite(v)], dtype=np.float64) for vs in values]
    values = [v for v in values if v.size]
    if not values:
        return {"mean": None, "lo": None, "hi": None, "units": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b in range(n_boot):
        picked = [values[i] for i in rng.integers(0, len(values), len(values))]
        means[b] = np.concatenate([v[rng.integers(0, v.size, v.size)] for v in picked]).mean()
    lo, hi = np.quantile(means, [0.025, 0.975])
    allv = np.concatenate(values)
    return {"mean": float(allv.mean()), "lo": float(lo), "hi": float(hi), "units": int(allv.size),
            "seeds": len(values), "n_boot": n_boot}


def verdict(ci: dict, paired: bool = False) -> str:
    """From an interval of the change of the held-out loss: harmful (above 0) / useful (below 0) /
    neutral; for the paired difference cut - random: worse / better than random, or ties it."""
    if ci["mean"] is None:
        return "no data"
    if paired:
        return "worse than random" if ci["lo"] > 0 else "better than random" if ci["hi"] < 0 else "ties random"
    return "harmful" if ci["lo"] > 0 else "useful" if ci["hi"] < 0 else "neutral"


def summarise(rows_by_seed: dict[int, list[dict]]) -> dict:
    out = {}
    for metric in METRICS:
        units = unit_values(rows_by_seed, metric)
        out[metric] = {arm: nested_bootstrap([units[s][arm] for s in units])
                       for arm in (*PROBE_ARMS, "cut-random")}
        for arm in out[metric]:
            out[metric][arm]["reading"] = verdict(out[metric][arm], paired=arm == "cut-random")
    rows = [r for rs in rows_by_seed.values() for r in rs]
    out["probes"] = len(rows)
    out["probes_with_cut"] = sum(r["cut_tokens"] > 0 for r in rows)
    out["cut_token_share"] = float(np.mean([r["cut_tokens"] / r["tokens"] for r in rows])) if rows else None
    out["cut_row_share"] = float(np.mean([r["cut_rows"] / r["rows"] for r in rows])) if rows else None
    infos = [i for r in rows for i in r["random_match"]]
    out["random_scattered"] = sum(i["scattered"] for i in infos)
    out["random_segments"] = sum(i["segments"] for i in infos)
    out["random_short_tokens"] = sum(i["short"] for i in infos)
    out["random_overlap"] = sum(i["overlap"] for i in infos) / max(sum(i["tokens"] for i in infos), 1)
    return out


ARM_NAMES = {"cut": "(a) would-be-cut segments", "random": "(b) matched random segments",
             "kept": "(c) kept tokens (KAT's step)", "all": "all tokens (OPD's step)",
             "cut-random": "paired: cut minus random"}


def _cell(ci: dict, scale: float) -> str:
    if ci["mean"] is None:
        return "-"
    return f"{scale * ci['mean']:+.3f} [{scale * ci['lo']:+.3f}, {scale * ci['hi']:+.3f}]"


def influence_markdown(result: dict) -> list[str]:
    s = result["summary"]
    md = [f"`{result['command']}` at commit {result['commit']}", "",
          f"World {result['world']}; seeds {result['seeds']}; probe steps {result['probe_steps']}; "
          f"{result['draws']} random draws per probe; {result['clean']} clean teacher solutions "
          f"({result['clean_tokens']} tokens) of {result['heldout']} fresh held-out problems; "
          f"{s['probes_with_cut']} of {s['probes']} probes had cut tokens; would-be-cut share "
          f"{100 * (s['cut_row_share'] or 0):.1f}% of rollouts, {100 * (s['cut_token_share'] or 0):.1f}% of tokens; "
          f"random segments placed contiguously {s['random_segments'] - s['random_scattered']} of "
          f"{s['random_segments']} (tokens short: {s['random_short_tokens']}), "
          f"{100 * s['random_overlap']:.1f}% of their tokens in cut segments; {result['minutes']:.1f} min.", "",
          "Change of the held-out loss after one step (1e-3 nats per token; negative helps), mean over "
          "(seed, probe step) units with a 95% two-level bootstrap interval; first order: -cos(g_S, grad nll).", "",
          "| step on | d NLL x 1e3 [95% CI] | reading | d reverse KL x 1e3 [95% CI] | reading "
          "| first order [95% CI] |", "|---" * 6 + "|"]
    for arm in (*PROBE_ARMS, "cut-random"):
        n, k, f = s["nll"][arm], s["rkl"][arm], s["first_order"][arm]
        md.append(f"| {ARM_NAMES[arm]} | {_cell(n, 1e3)} | {n['reading']} | {_cell(k, 1e3)} | {k['reading']} "
                  f"| {_cell(f, 1.0)} |")
    return md + [""]


def parse_steps(text: str, steps: int) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--probe-steps: {text!r} is not a comma-separated list of steps; write e.g. "
                          "--probe-steps 6,12,18,24,30") from None
    if not out or out[0] < 1 or out[-1] > steps:
        raise ConfigError(f"--probe-steps: {text!r} must name steps between 1 and steps ({steps}); "
                          "write e.g. --probe-steps 6,12,18,24,30")
    return out


def run_influence(argv: list[str], seeds, out: str, world: str | None, n_heldout: int, probe_steps: str,
                  draws: int, heldout_seed: int = 7_000_011, dry_run: bool = False, command: str = "",
                  log=print) -> dict:
    """Shadow runs with the probe per seed; OUT/influence_<world>.md and .json."""
    from experiments.power import heldout_problems

    base = replace(base_config(argv, world), **STATIC_ARMS["shadow"])
    if "--eval_every" not in argv:  # the probe needs no learning curve
        base = replace(base, eval_every=base.steps)
    if draws < 1:
        raise ConfigError(f"--draws: {draws}; give at least 1 random draw per probe")
    steps = parse_steps(probe_steps, base.steps)
    label = world or world_name(base)
    seeds = seed_list(base, seeds)
    log(f"influence, {label}: shadow runs x seeds {seeds}, probes at steps {steps}, {draws} random draws, "
        f"{n_heldout} held-out problems")
    if dry_run:
        return {}
    files = [f for f in (base.train_data, base.eval_data) if f and os.path.isfile(f)]
    problems = heldout_problems(files, n_heldout, heldout_seed)
    t0 = time.perf_counter()
    rows = {}
    for seed in seeds:
        cfg = replace(base, seed=seed, output_dir=os.path.join(out, label, "influence", f"seed{seed}"))
        rows[seed] = influence_run(cfg, problems, steps, draws, heldout_seed, log)
    first = next(r for rs in rows.values() for r in rs)
    result = {"command": command, "commit": git_commit(), "world": label, "seeds": seeds, "probe_steps": steps,
              "draws": draws, "heldout": n_heldout, "heldout_seed": heldout_seed, "excluded": files,
              "clean": first["clean"], "clean_tokens": first["clean_tokens"], "config": base.to_dict(),
              "minutes": (time.perf_counter() - t0) / 60, "summary": summarise(rows),
              "rows": {str(s): r for s, r in rows.items()}}
    md = [f"# influence, {label} world: one step on what KAT would cut", ""] + influence_markdown(result)
    write_report(out, f"influence_{label}", result, md, log)
    return result
