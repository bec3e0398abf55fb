"""Pictures of a run: KL traces with the detector's cuts, and learning curves.

    python -m kat plot RUN_DIR        # writes RUN_DIR/kl_traces.png and RUN_DIR/curves.png
"""

from __future__ import annotations

import argparse
import json
import os

STOP_LABELS = {0: "eos", 1: "length", 2: "trap", 3: "random"}


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_traces(traces: list[dict], path: str, max_rows: int = 6, title: str = "") -> str | None:
    """One panel per rollout: d_t, the window mean z_t, the threshold and the cut."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not traces:
        return None
    last_step = max(t["step"] for t in traces)
    rows = [t for t in traces if t["step"] == last_step][:max_rows]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.9 * len(rows)), sharex=True, squeeze=False)
    for ax, tr in zip(axes[:, 0], rows):
        x = list(range(len(tr["kl"])))
        ax.plot(x, tr["kl"], lw=0.8, color="0.6", label="d_t (per-token reverse KL)")
        z = [float("nan") if v is None else v for v in tr["z"]]
        ax.plot(x, z, lw=1.6, color="C0", label=f"z_t (mean over W={tr['window']})")
        if tr.get("threshold") is not None:
            ax.axhline(tr["threshold"], color="C3", ls="--", lw=1, label="threshold s")
        if tr.get("exempt"):
            ax.axvspan(0, min(tr["exempt"], len(x)), color="0.9", zorder=0, label="exempt")
        for key, style in (("cut", "-"), ("shadow_cut", ":")):
            if tr.get(key) is not None:
                ax.axvline(tr[key], color="k", ls=style, lw=1.2, label=key.replace("_", " "))
        ax.set_ylabel(STOP_LABELS.get(tr["stop"], "?"), fontsize=8)
        ax.set_yscale("symlog", linthresh=0.05)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper right")
    axes[-1, 0].set_xlabel("completion position t")
    fig.suptitle(title or f"KL traces at step {last_step}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(metrics: list[dict], path: str) -> str | None:
    """Loss, KL, cut rate and length against step; evaluation accuracy against tokens generated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "eval" not in m and "skipped" not in m]
    evals = [m for m in metrics if "eval" in m]
    if not train:
        return None
    steps = [m["step"] for m in train]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    axes[0].plot(steps, [m["loss"] for m in train], label="loss")
    axes[0].plot(steps, [m["kl"] for m in train], label="mean d (all tokens)")
    axes[0].set_title("loss / KL")
    axes[1].plot(steps, [m["cut_rate"] for m in train], label="cut rate")
    if any("shadow_rate" in m for m in train):
        axes[1].plot(steps, [m.get("shadow_rate", 0.0) for m in train], label="shadow cut rate")
    axes[1].set_title("terminations")
    axes[2].plot(steps, [m["mean_length"] for m in train], label="generated")
    axes[2].plot(steps, [m["kept_length"] for m in train], label="kept in loss")
    axes[2].set_title("tokens per rollout")
    tokens = {m["step"]: m["tokens_total"] for m in train}
    for key in sorted({k for m in evals for k in m if k.endswith("avg@k") or k.endswith("pass@k")}):
        pts = [(tokens.get(m["step"], 0.0), m[key]) for m in evals if key in m]
        axes[3].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    axes[3].set_title("evaluation vs tokens generated")
    axes[3].set_xlabel("tokens generated")
    for ax in axes[:3]:
        ax.set_xlabel("step")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: str) -> list[str]:
    made = [plot_traces(read_jsonl(os.path.join(run_dir, "traces.jsonl")), os.path.join(run_dir, "kl_traces.png")),
            plot_curves(read_jsonl(os.path.join(run_dir, "metrics.jsonl")), os.path.join(run_dir, "curves.png"))]
    return [p for p in made if p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kat plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's output_dir (holds metrics.jsonl and traces.jsonl)")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.run_dir, "metrics.jsonl")):
        parser.error(f"{args.run_dir!r} holds no metrics.jsonl; give the output_dir of a training run")
    for p in plot_run(args.run_dir):
        print(p)
    return 0
