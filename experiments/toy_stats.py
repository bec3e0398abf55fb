"""Does low KL tell healthy from trapped rollouts in the toy world?

    python -m experiments toy stats [--world rich|plain|repeat] [--n 200]

The student samples one completion per test prompt (temperature 1). One forward pass of each
model over the finished sequences gives the per-token reverse KL

    d_t = sum_v p_s(v | x, y_<t) (log p_s(v | x, y_<t) - log p_t(v | x, y_<t))

Each rollout is traced against the world's rules (``kat.toy.world.trace``): where its first
error is, and where it starts repeating a step. The command prints mean d on correct rollouts,
before / at / after the first error of wrong ones, and inside repetitions; the completion-length
distribution; and what `TrapDetector` (quantile rule, replayed in shadow mode over the finished
rollouts, threshold calibrated on them) would cut.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from kat.terminators import TrapDetector
from kat.data import render_prompt
from kat.scorer import reverse_kl
from kat.toy import TOY_DIR
from kat.toy.world import MAX_COMPLETION_CHARS, Trace, parse_prompt, read_jsonl, trace



@dataclass
class Scored:
    """Student rollouts and their per-token KL; one character is one token."""

    texts: list[str]  # completions without EOS
    kl: Tensor  # (B, T) reverse KL per completion token, 0 after the end
    mask: Tensor  # (B, T) bool: generated tokens (EOS included)
    ended: Tensor  # (B,) bool: the rollout emitted EOS


@torch.no_grad()
def sample_and_score(student, teacher, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                     temperature: float = 1.0, seed: int = 0) -> Scored:
    """Student rollouts at ``temperature``, then one forward of each model over the whole sequences."""
    torch.manual_seed(seed)
    texts = [render_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    out = student.generate(**enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,  # 0: no top-k cut
                           max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    n_prompt = enc["input_ids"].shape[1]
    completion = out[:, n_prompt:]  # (B, T)
    is_eos = completion == tokenizer.eos_token_id  # (B, T)
    ended = is_eos.any(-1)  # (B,)
    # generated = up to and including the first EOS: no EOS strictly before position t
    mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # (B, T)
    attention = torch.cat([enc["attention_mask"].bool(), mask], dim=-1)  # (B, P+T)
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)  # (B, P+T) as generate numbers them
    kw = dict(input_ids=out, attention_mask=attention.long(), position_ids=position_ids)
    # logits at position P-1+t predict completion token t
    student_logits = student(**kw).logits[:, n_prompt - 1: -1]  # (B, T, V)
    teacher_logits = teacher(**kw).logits[:, n_prompt - 1: -1]  # (B, T, V)
    kl = reverse_kl(student_logits, teacher_logits) * mask  # (B, T)
    # Text position t must stay token t: a special token other than the closing EOS becomes '?'.
    texts = []
    for row, n, e in zip(completion.tolist(), mask.sum(-1).tolist(), ended.tolist()):
        tokens = tokenizer.convert_ids_to_tokens(row[: n - int(e)])
        texts.append("".join(t if len(t) == 1 else "?" for t in tokens))
    return Scored(texts, kl, mask, ended)


def feed(detector: TrapDetector, kl: Tensor, valid: Tensor, chunk: int = 8):
    """One batch through the detector as the sampler feeds it: start, observe C positions at a time."""
    state = detector.start(kl.shape[0])
    for t0 in range(0, kl.shape[1], chunk):
        detector.observe(state, kl[:, t0: t0 + chunk], valid[:, t0: t0 + chunk])  # (B, C), (B, C)
    return state


def replay_detector(kl: Tensor, lengths: Sequence[int], *, window: int, stride: int, patience: int, exempt: int,
                    eta: float, chunk: int = 8) -> tuple[list[int | None], float]:
    """Would-be cut positions (None = kept) of `TrapDetector` (quantile rule, shadow mode) on a batch
    of finished rollouts, and the threshold they were judged against.

    Training calibrates the threshold on earlier batches; here it comes from this batch: the
    detector sees the batch once (end_batch pushes its per-rollout minima into an empty buffer,
    s = Q_{1-eta} of them) and then again with s fixed, its decisions recorded. Everything else is
    the detector's own rules (windows every `stride` tokens, minima over all of them, decisions only
    for windows starting at or after `exempt`, cut at the start of the first of `patience` low ones).
    """
    valid = torch.arange(kl.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]  # (B, T)
    detector = TrapDetector(rule="quantile", window=window, stride=stride, patience=patience, exempt=exempt,
                            eta=eta, buffer_size=max(1, kl.shape[0]), min_buffer=1, warmup_steps=0, shadow=True)
    detector.end_batch(feed(detector, kl, valid, chunk), step=0)
    if not detector.active:  # no rollout as long as one window: nothing to calibrate on
        return [None] * kl.shape[0], float("nan")
    state = feed(detector, kl, valid, chunk)
    return [int(c) if c >= 0 else None for c in state.would_cut.tolist()], float(state.threshold)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def kl_table(scored: Scored, traces: list[Trace]) -> dict:
    """Per-token KL by region: token-weighted mean, median, share of tokens with d < 0.05, count."""
    regions: dict[str, list[float]] = {k: [] for k in (
        "correct: all tokens", "wrong: before first error", "wrong: at first error",
        "wrong, no repetition: after first error", "repetition: from its start",
        "repetition: after one full copy")}
    for row, n, tr in zip(scored.kl, scored.mask.sum(-1).tolist(), traces):
        d = row[:n].tolist()
        if tr.correct:
            regions["correct: all tokens"] += d
            continue
        if tr.first_error is not None and tr.first_error < n:
            e = tr.first_error
            regions["wrong: before first error"] += d[:e]
            regions["wrong: at first error"].append(d[e])
            if tr.repeat_start is None:
                regions["wrong, no repetition: after first error"] += d[e + 1:]
        if tr.repeat_start is not None:
            regions["repetition: from its start"] += d[tr.repeat_start:]
            regions["repetition: after one full copy"] += d[tr.repeat_start + tr.repeat_len:]
    return {k: {"mean_kl": _mean(v), "median_kl": statistics.median(v) if v else float("nan"),
                "share_below_0.05": _mean([x < 0.05 for x in v]), "tokens": len(v)} for k, v in regions.items()}


def length_summary(lengths: list[int]) -> dict:
    """Mean, quantiles and a 16-token histogram of completion lengths."""
    q = statistics.quantiles(lengths, n=10) if len(lengths) > 1 else lengths * 9
    bins: dict[int, int] = {}
    for n in lengths:
        bins[n // 16 * 16] = bins.get(n // 16 * 16, 0) + 1
    return {"mean": _mean(lengths), "min": min(lengths), "p10": q[0], "median": statistics.median(lengths),
            "p90": q[-1], "max": max(lengths), "histogram": {f"{lo}-{lo + 15}": bins[lo] for lo in sorted(bins)}}


DETECTOR_GRID = [dict(window=w, stride=s, patience=p, exempt=e, eta=0.3)
                 for w, s in ((8, 8), (8, 4), (16, 8), (16, 16)) for p in (2, 3) for e in (8, 16)]


def detector_table(scored: Scored, traces: list[Trace], grid: list[dict] = DETECTOR_GRID) -> list[dict]:
    """For each setting: share of correct / wrong / repeating rollouts cut, and cut placement."""
    lengths = scored.mask.sum(-1).tolist()
    rows = []
    for setting in grid:
        cuts, threshold = replay_detector(scored.kl, lengths, **setting)
        correct = [c for c, tr in zip(cuts, traces) if tr.correct]
        wrong = [(c, tr) for c, tr in zip(cuts, traces) if not tr.correct and tr.repeat_start is None]
        rep = [(c, tr) for c, tr in zip(cuts, traces) if tr.repeat_start is not None]
        wrong_cut = [(c, tr) for c, tr in wrong if c is not None]
        rep_cut = [(c, tr) for c, tr in rep if c is not None]
        rows.append({**setting, "threshold": threshold,
                     "cut_correct": _mean([c is not None for c in correct]),
                     "cut_wrong": _mean([c is not None for c, _ in wrong]),
                     "cut_repeating": _mean([c is not None for c, _ in rep]),
                     "wrong_cut_after_error": _mean([c >= (tr.first_error or 0) for c, tr in wrong_cut]),
                     "repeat_cut_in_repeat": _mean([c >= tr.repeat_start for c, tr in rep_cut])})
    return rows


def toy_stats(world: str = "rich", root: str | Path = TOY_DIR, n: int = 200, seed: int = 0,
              max_new_tokens: int = MAX_COMPLETION_CHARS, threads: int | None = None) -> dict:
    """Sample ``n`` student rollouts on test prompts, score them with the teacher, summarise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    from kat.toy import teacher_dir

    base, teacher_path = Path(root) / world, teacher_dir(root, world)
    if not teacher_path.exists():
        raise FileNotFoundError(f"no toy checkpoints under {base}; "
                                f"run `python -m experiments toy build --world {world}`")
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    student = AutoModelForCausalLM.from_pretrained(base / "student").eval()
    rows = read_jsonl(base / "data" / "test.jsonl")
    rows = (rows * (n // len(rows) + 1))[:n]  # one rollout per prompt; cycle if n > split size
    scored = sample_and_score(student, teacher, tokenizer, [r["prompt"] for r in rows],
                              max_new_tokens=max_new_tokens, seed=seed)
    traces = [trace(text, parse_prompt(r["prompt"])) for text, r in zip(scored.texts, rows)]
    lengths = scored.mask.sum(-1).tolist()
    return {
        "world": world, "n": n, "seed": seed,
        "accuracy": _mean([t.correct for t in traces]),
        "repeat_rate": _mean([t.repeat_start is not None for t in traces]),
        "eos_rate": float(scored.ended.float().mean()),
        "mean_kl_all_tokens": float(scored.kl.sum() / scored.mask.sum()),
        "kl": kl_table(scored, traces),
        "lengths": length_summary(lengths),
        "detector": detector_table(scored, traces),
        "examples": [{"prompt": r["prompt"], "completion": t, "correct": tr.correct, "first_error": tr.first_error,
                      "repeat_start": tr.repeat_start} for r, t, tr in list(zip(rows, scored.texts, traces))[:8]],
    }


def print_stats(res: dict) -> None:
    print(f"world {res['world']}: {res['n']} student rollouts (T=1) scored by the teacher")
    print(f"student accuracy {100 * res['accuracy']:.1f}%   repeating {100 * res['repeat_rate']:.1f}%   "
          f"ended with EOS {100 * res['eos_rate']:.1f}%   mean d over all tokens {res['mean_kl_all_tokens']:.4f}")
    print("\nper-token reverse KL d by region")
    print(f"  {'region':<42} {'mean':>8} {'median':>8} {'d<0.05':>7} {'tokens':>7}")
    for name, v in res["kl"].items():
        print(f"  {name:<42} {v['mean_kl']:8.4f} {v['median_kl']:8.4f} {100 * v['share_below_0.05']:6.1f}% "
              f"{v['tokens']:7d}")
    L = res["lengths"]
    print(f"\ncompletion length (tokens, EOS included): mean {L['mean']:.1f}  min {L['min']}  p10 {L['p10']:.0f}  "
          f"median {L['median']:.0f}  p90 {L['p90']:.0f}  max {L['max']}")
    print("  " + "  ".join(f"{k}:{v}" for k, v in L["histogram"].items()))
    print("\nTrapDetector replayed in shadow mode over these rollouts (threshold = Q_{1-eta} of their per-rollout\n"
          "minima of z; decisions from windows starting at or after exempt)")
    print(f"  {'W':>3} {'stride':>6} {'pat':>3} {'exempt':>6} {'thresh':>7} {'cut correct':>11} {'cut wrong':>9} "
          f"{'cut repeat':>10} {'wrong: cut>=err':>15} {'rep: cut in rep':>15}")
    for r in res["detector"]:
        print(f"  {r['window']:>3} {r['stride']:>6} {r['patience']:>3} {r['exempt']:>6} {r['threshold']:7.4f} "
              f"{100 * r['cut_correct']:10.1f}% {100 * r['cut_wrong']:8.1f}% {100 * r['cut_repeating']:9.1f}% "
              f"{100 * r['wrong_cut_after_error']:14.1f}% {100 * r['repeat_cut_in_repeat']:14.1f}%")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m experiments toy stats", description=__doc__.split("\n")[0])
    p.add_argument("--world", choices=("rich", "plain", "repeat", "sticky"), default="rich",
                   help="which toy world (default rich)")
    p.add_argument("--root", default=str(TOY_DIR), help="directory holding <world>/ (default: the package's toy/)")
    p.add_argument("--n", type=int, default=200, help="student rollouts, one per test prompt (default 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_COMPLETION_CHARS, help="rollout length limit")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="also write the statistics as JSON here")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    res = toy_stats(args.world, args.root, args.n, args.seed, args.max_new_tokens, args.threads)
    print_stats(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"\nwrote {args.out}")
    return res
