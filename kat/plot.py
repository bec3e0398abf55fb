"""Every picture of the project: KL traces, a run's curves, learning curves of arms, cut positions.

KL traces show the detector's decisions; learning curves compare experiment arms over seeds; cut
positions show where shadow-mode cuts would fall.

    python -m kat plot RUN_DIR        # writes RUN_DIR/kl_traces.png and RUN_DIR/curves.png
    python -m kat plot PICTURE.json   # redraws PICTURE.png from the data saved beside it

Each picture has a ``*_figure`` function that returns the matplotlib Figure (what the tests inspect)
and a ``plot_*`` function that saves it and returns the path; with ``keep_data`` it also writes the
numbers it was drawn from beside it (``<name>.json``), so experiment pictures can be redrawn from
stored results without the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

from kat.rollout import STOP_NAMES

KL_FLOOR = 1e-4  # on the log axis, d and z below this (exact agreement, rounding) are drawn at it
# (line style, marker) per arm: arms whose numbers coincide stay visible on top of each other
ARM_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "P"), (":", "X"),
              ("-.", "<"), ("-", ">"), ("--", "*"), (":", "h"))


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file ([] when it does not exist); ValueError naming the file and the
    line that is not one JSON object (e.g. a row cut short when a run was killed while writing it)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {n}: not a JSON row ({err.msg}); it may be cut short by a run "
                                 "stopped while writing it: delete that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: a {type(row).__name__}, not a JSON object; delete that line")
            rows.append(row)
    return rows


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def data_path(path: str) -> str:
    """Where a picture's data file goes: beside it, .json for .png."""
    return os.path.splitext(path)[0] + ".json"


def _save(fig, path: str, dpi: int, data: dict | None = None) -> str:
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    if data is not None:  # what the picture is drawn from, so it can be redrawn without the runs (`redraw`)
        with open(data_path(path), "w") as fh:
            json.dump(data, fh, separators=(",", ":"))
    return path


# ---------------------------------------------------------------------------------------------
# KL traces

def decision_windows(tr: dict) -> list[int]:
    """Start positions of the windows the detector evaluates: it scores z_t every `stride` tokens,
    (t + 1) % stride == 0 and t + 1 >= W, and the window of end t starts at t - W + 1."""
    w, n = tr["window"], len(tr["kl"])
    return [t - w + 1 for t in range(w - 1, n) if (t + 1) % tr["stride"] == 0]


def _panel_title(i: int, tr: dict) -> str:
    parts = [f"rollout {i}"] + ([f"prompt {tr['prompt']}"] if tr.get("prompt") else [])
    parts.append(f"{len(tr['kl'])} tokens, ended by {STOP_NAMES[tr['stop']]}")
    if tr.get("correct") is not None:
        parts.append("answer correct" if tr["correct"] else "answer wrong")
    if tr.get("cut") is not None:
        parts.append(f"cut at {tr['cut']}")
    if tr.get("shadow_cut") is not None:
        parts.append(f"would be cut at {tr['shadow_cut']} (shadow)")
    thr = tr.get("threshold")
    parts.append("no threshold yet (warm-up)" if thr is None else f"threshold s = {thr:.3g}")
    if thr is not None and thr <= 0:  # the zscore rule's mean - kappa * std can be negative
        parts.append("not drawn: below the log axis, z >= 0 never falls under it")
    return "; ".join(parts)


def _trace_panel(ax, i: int, tr: dict, floor: float) -> None:
    """d_t per position; z drawn at the START of its window, where the detector puts a cut."""
    w, n, exempt, thr = tr["window"], len(tr["kl"]), tr.get("exempt") or 0, tr.get("threshold")
    ax.plot(range(n), [max(v, floor) for v in tr["kl"]], lw=0.7, color="0.55", label="d_t  per-token reverse KL")
    if "z" in tr:
        z = [float("nan") if v is None else v for v in tr["z"][w - 1:]]  # z[s]: mean of d over [s, s+W-1]
    else:  # kat.py's traces carry d only
        z = [sum(tr["kl"][s:s + w]) / w for s in range(n - w + 1)]
    ax.plot(range(len(z)), [max(v, floor) for v in z], lw=1.4, color="C0",
            label=f"z  mean of d over the W={w} tokens\n    from this position (window start)")
    starts = decision_windows(tr)
    ax.plot(starts, [max(z[s], floor) for s in starts], ls="none", marker="o", ms=3, mfc="none", color="C0",
            label=f"windows the detector scores\n    (every stride={tr['stride']} tokens)")
    if thr is not None and thr > 0:
        ax.axhline(thr, color="C3", ls="--", lw=1, label="threshold s used for this batch")
        low = [s for s in starts if s >= exempt and z[s] < thr]
        ax.plot(low, [max(z[s], floor) for s in low], ls="none", marker="o", ms=3.5, color="C3",
                label="scored windows with z < s\n    (outside the exempt span)")
    if exempt:
        ax.axvspan(0, min(exempt, n), color="0.92", zorder=0, label="exempt: windows starting here\n    never decide")
    for key, style, label in (("cut", "-", "cut (tokens from here\n    left out of the loss)"),
                              ("shadow_cut", ":", "would-be cut (shadow mode)")):
        if tr.get(key) is not None:
            ax.axvline(tr[key], color="k", ls=style, lw=1.2, label=label)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_ylabel("d_t and z\n(nats, log)", fontsize=8)
    ax.set_title(_panel_title(i, tr), fontsize=8, loc="left")
    ax.tick_params(labelsize=7)


def traces_figure(traces: list[dict], max_rows: int = 6, title: str = ""):
    """One panel per rollout of the last step in `traces` (rows of traces.jsonl or shadow records).

    Each trace: kl (d_t per position), z (window mean by window end t, None before W-1), window,
    stride, exempt, threshold (the one the batch was judged against), cut, shadow_cut, stop, and
    optionally correct and prompt.
    """
    plt = _pyplot()
    last_step = max(t["step"] for t in traces)
    rows = [t for t in traces if t["step"] == last_step][:max_rows]
    thresholds = [t["threshold"] for t in rows if t.get("threshold") is not None and t["threshold"] > 0]
    floor = min([KL_FLOOR] + [s / 10 for s in thresholds])  # the threshold line always stays on the axis
    fig, axes = plt.subplots(len(rows), 1, figsize=(13, 1.5 + 1.9 * len(rows)), sharex=True, squeeze=False)
    for i, (ax, tr) in enumerate(zip(axes[:, 0], rows)):
        _trace_panel(ax, i, tr, floor)
    axes[-1, 0].set_xlim(0, max(len(t["kl"]) for t in rows))  # shared by every panel
    axes[-1, 0].set_xlabel("completion position t")
    handles: dict[str, object] = {}
    for ax in axes[:, 0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    # beside the panels, never over the data
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(0.765, 0.5), fontsize=7,
               frameon=False)
    fig.suptitle(title or f"KL traces at step {last_step}", fontsize=10)
    fig.text(0.01, 0.005, f"d and z below {floor:.0e} are drawn at {floor:.0e}", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 0.76, 1))
    return fig


def plot_traces(traces: list[dict], path: str, max_rows: int = 6, title: str = "",
                keep_data: bool = False) -> str | None:
    """traces_figure saved to `path` (and its data beside it with `keep_data`); None when there is
    nothing to draw."""
    if not traces:
        return None
    data = {"plot": "traces", "args": {"traces": traces, "max_rows": max_rows, "title": title}}
    return _save(traces_figure(traces, max_rows, title), path, 110, data if keep_data else None)


# ---------------------------------------------------------------------------------------------
# A run's training curves

def curves_figure(metrics: list[dict]):
    """Loss, KL, cut rate and length against step; evaluation accuracy against tokens generated."""
    plt = _pyplot()
    train = [m for m in metrics if "eval" not in m and "skipped" not in m]
    evals = [m for m in metrics if "eval" in m]
    steps = [m["step"] for m in train]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    axes[0].plot(steps, [m["loss"] for m in train], label="loss")
    axes[0].plot(steps, [m["kl"] for m in train], ls="--", label="mean d (all tokens)")
    axes[0].set_title("loss / KL")
    axes[1].plot(steps, [m["cut_rate"] for m in train], label="cut rate")
    if any("shadow_rate" in m for m in train):
        axes[1].plot(steps, [m.get("shadow_rate", 0.0) for m in train], ls="--", label="would-be cut rate (shadow)")
    axes[1].set_title("share of rollouts cut")
    axes[2].plot(steps, [m["mean_length"] for m in train], label="generated")
    axes[2].plot(steps, [m["kept_length"] for m in train], ls="--", label="kept in loss")
    axes[2].set_title("tokens per rollout")
    tokens = {m["step"]: m.get("tokens_total", 0.0) for m in train}  # kat.py's rows carry none
    for i, key in enumerate(sorted({k for m in evals for k in m if k.endswith("avg@k") or k.endswith("pass@k")})):
        pts = [(tokens.get(m["step"], 0.0), m[key]) for m in evals if key in m]
        ls, marker = ARM_STYLES[i % len(ARM_STYLES)]
        axes[3].plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker, label=key)
    axes[3].set_title("evaluation vs tokens generated")
    axes[3].set_xlabel("tokens generated")
    for ax in axes[:3]:
        ax.set_xlabel("step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(metrics: list[dict], path: str) -> str | None:
    if not any("eval" not in m and "skipped" not in m for m in metrics):
        return None
    return _save(curves_figure(metrics), path, 110)


# ---------------------------------------------------------------------------------------------
# Learning curves of experiment arms

def _mean_band(runs: list[list[dict]], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per evaluation step: steps, mean tokens generated, mean and sample std (0 for one seed) in %."""
    steps = sorted({p["step"] for p in runs[0]})
    xs, means, stds = [], [], []
    for step in steps:
        pts = [p for curve in runs for p in curve if p["step"] == step and key in p]
        ys = [100 * p[key] for p in pts]
        xs.append(statistics.fmean(p["tokens"] for p in pts))
        means.append(statistics.fmean(ys))
        stds.append(statistics.stdev(ys) if len(ys) > 1 else 0.0)
    return steps, xs, means, stds


def learning_curves_figure(curves: dict[str, list[list[dict]]], title: str = "",
                           references: dict[str, float] | None = None):
    """avg@k and pass@k of the first evaluation set against step and against tokens generated.

    `curves`: per arm label (in drawing order), one evaluation curve per seed, each a list of
    {"step", "tokens", "<set>/avg@k", ...}. One line per arm, the mean over seeds, with a band of
    +-1 sample std over seeds; `references` ("<label> <set>/<metric>": value) as horizontal lines.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    keys = sorted({k for runs in curves.values() for c in runs for p in c for k in p
                   if k.endswith("/avg@k") or k.endswith("/pass@k")})
    keys = [k for k in keys if k.split("/")[0] == keys[0].split("/")[0]]  # first set: avg@k, pass@k
    seeds = sorted({len(runs) for runs in curves.values()})
    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 1.6 + 3.4 * len(keys)), squeeze=False)
    for i, (label, runs) in enumerate(curves.items()):
        ls, marker = ARM_STYLES[i % len(ARM_STYLES)]
        for row, key in enumerate(keys):
            steps, xs, mean, std = _mean_band(runs, key)
            for col, x in enumerate((steps, xs)):
                ax = axes[row, col]
                # open markers of decreasing size: an arm drawn later does not hide an equal one
                ax.plot(x, mean, ls=ls, marker=marker, ms=7 - 0.4 * i, mfc="none", lw=1.3, color=f"C{i}",
                        label=label)
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=f"C{i}", alpha=0.12, lw=0)
    for row, key in enumerate(keys):
        for col in range(2):
            ax = axes[row, col]
            for name, value in (references or {}).items():
                if key in name:
                    ax.axhline(100 * value, color="0.3", ls="--" if name.startswith("teacher") else ":", lw=1,
                               label=name.rsplit(" ", 1)[0])
            ax.set_ylabel(f"{key} (%)")
            ax.set_xlabel(("step", "tokens generated")[col])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    height = fig.get_size_inches()[1]
    legend_rows = math.ceil(len(labels) / 3)
    # below the panels, never over the data
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0))
    n = "/".join(map(str, seeds))
    note = (f"lines: mean over {n} seeds; shaded bands: ±1 std over seeds" if max(seeds) > 1
            else "one seed: no band")
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=10)
    fig.tight_layout(rect=(0, (0.25 + 0.2 * legend_rows) / height, 1, 1))
    return fig


def plot_learning_curves(curves: dict[str, list[list[dict]]], path: str, title: str = "",
                         references: dict[str, float] | None = None, keep_data: bool = False) -> str | None:
    """learning_curves_figure saved to `path` (and its data beside it with `keep_data`); None when
    no curve holds avg@k or pass@k."""
    if not any(k.endswith("@k") for runs in curves.values() for c in runs for p in c for k in p):
        return None
    data = {"plot": "learning_curves", "args": {"curves": curves, "title": title, "references": references}}
    return _save(learning_curves_figure(curves, title, references), path, 100, data if keep_data else None)


# ---------------------------------------------------------------------------------------------
# Would-be cut positions (shadow diagnostics)

def _histogram(ax, values: list[list[int]], bins: list[int], colors: list[str], labels: list[str], title: str,
               ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    counts = ax.hist(values, bins=bins, stacked=True, color=colors, label=labels)[0]
    top = max([float(max(c)) for c in ([counts] if len(values) == 1 else counts[-1:])] + [1.0])
    ax.set_ylim(0, 1.45 * top)  # head room for the legend above the bars
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper right")


def cut_positions_figure(records: dict[str, list[dict]], title: str = "", bin_width: int = 8):
    """Per point (column): where the would-be cuts fall, rollouts ending correct vs wrong (top), and
    on its own axis, where the wrong rollouts made their first error (bottom, toy worlds only).

    Each record: length, correct, shadow_cut (None when not cut), optionally first_error.
    """
    plt = _pyplot()
    with_errors = any(r.get("first_error") is not None for recs in records.values() for r in recs)
    rows = 2 if with_errors else 1
    fig, axes = plt.subplots(rows, len(records), figsize=(5.5 * len(records), 0.6 + 2.8 * rows), squeeze=False,
                             sharex="col")
    for col, (point, recs) in enumerate(records.items()):
        top = max([r["length"] for r in recs] + [bin_width])
        bins = list(range(0, top + bin_width, bin_width))
        pos, labels = [], []
        for ok in (True, False):
            mine = [r for r in recs if r["correct"] == ok]
            pos.append([r["shadow_cut"] for r in mine if r["shadow_cut"] is not None])
            labels.append(f"ending {'correct' if ok else 'wrong'}: {len(pos[-1])} of {len(mine)} cut")
        # stacked: one population (the cut rollouts), each bar split by how its rollouts end
        _histogram(axes[0, col], pos, bins, ["C2", "C3"], labels, f"{point}: would-be cut positions", "cut rollouts")
        if with_errors:
            errors = [r["first_error"] for r in recs if not r["correct"] and r.get("first_error") is not None]
            _histogram(axes[1, col], [errors], bins, ["0.45"], [f"all {len(errors)} wrong rollouts, cut or not"],
                       f"{point}: first error of the wrong rollouts", "wrong rollouts")
        axes[-1, col].set_xlabel("completion position")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_cut_positions(records: dict[str, list[dict]], path: str, title: str = "", bin_width: int = 8,
                       keep_data: bool = False) -> str:
    """cut_positions_figure saved to `path` (and its data beside it with `keep_data`)."""
    data = {"plot": "cut_positions", "args": {"records": records, "title": title, "bin_width": bin_width}}
    return _save(cut_positions_figure(records, title, bin_width), path, 100, data if keep_data else None)


# ---------------------------------------------------------------------------------------------
# Command line

def run_title(run_dir: str) -> str:
    """Which student and teacher a run's traces come from (its config.yaml)."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return ""
    with open(path) as fh:
        cfg = yaml.safe_load(fh) or {}
    name = {k: cfg.get(f"{k}_gguf") or cfg.get(k, "?") for k in ("student", "teacher")}
    return f"student {name['student']}, teacher {name['teacher']}"


def plot_run(run_dir: str) -> list[str]:
    traces = read_jsonl(os.path.join(run_dir, "traces.jsonl"))
    title = ""
    if traces:
        title = f"KL traces at step {max(t['step'] for t in traces)}: {run_title(run_dir)}".rstrip(": ")
    made = [plot_traces(traces, os.path.join(run_dir, "kl_traces.png"), title=title),
            plot_curves(read_jsonl(os.path.join(run_dir, "metrics.jsonl")), os.path.join(run_dir, "curves.png"))]
    return [p for p in made if p]


def redraw(data_file: str) -> str:
    """Draw a picture again from the data file saved beside it; returns the picture's path."""
    with open(data_file) as fh:
        data = json.load(fh)
    draw = {"traces": plot_traces, "learning_curves": plot_learning_curves, "cut_positions": plot_cut_positions}
    if not isinstance(data, dict) or data.get("plot") not in draw:
        raise ValueError(f"{data_file}: not a picture's data file (its 'plot' must be one of {', '.join(draw)}); "
                         "give the .json written beside an experiment's picture")
    return draw[data["plot"]](**data["args"], path=os.path.splitext(data_file)[0] + ".png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kat plot", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a run's output_dir (holds metrics.jsonl and traces.jsonl), or the .json "
                        "data file beside an experiment's picture (redrawn into the .png of the same name)")
    args = parser.parse_args(argv)
    if args.target.endswith(".json") and os.path.isfile(args.target):
        try:
            print(redraw(args.target))
        except (ValueError, KeyError, TypeError) as err:
            parser.error(str(err) if isinstance(err, ValueError) else f"{args.target}: malformed picture data ({err})")
        return 0
    metrics = os.path.join(args.target, "metrics.jsonl")
    if not os.path.isfile(metrics):
        parser.error(f"{args.target!r} holds no metrics.jsonl; give the output_dir of a training run or a "
                     "picture's .json data file")
    try:
        if not read_jsonl(metrics):
            raise ValueError(f"{metrics} holds no rows yet, so there is nothing to plot; plot the run once it "
                             "has logged a step")
        made = plot_run(args.target)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in made:
        print(p)
    return 0
