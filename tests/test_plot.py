"""Pictures, checked on the matplotlib objects: what is drawn where, on which scale, with which labels."""

from __future__ import annotations

import json
import statistics

import matplotlib
import pytest
import torch
import yaml

from kat.terminators import TrapDetector, window_means
from kat.plot import cut_positions_figure, curves_figure, learning_curves_figure, plot_run, run_title, traces_figure
from kat.rollout import STOP_NAMES, STOP_TRAP

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def line(ax, label: str):
    found = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(found) == 1, f"{label!r} in {[ln.get_label() for ln in ax.get_lines()]}"
    return found[0]


def trapped_trace(threshold: float = 0.005, shadow: bool = False) -> dict:
    """A rollout whose KL drops to ~1e-4 from position 24 on, judged by a real TrapDetector."""
    g = torch.Generator().manual_seed(0)
    kl = 0.05 + torch.rand(64, generator=g)  # (T,)
    kl[24:] = 1e-4 * torch.rand(40, generator=g)
    kl[30] = 0.0  # exact agreement: must still be on the (log) axis
    det = TrapDetector(window=8, stride=4, patience=2, exempt=8, min_buffer=1, warmup_steps=0, shadow=shadow)
    det.load_state_dict({"rule": "quantile", "buffer": torch.full((1,), threshold, dtype=torch.float64),
                         "steps_done": 1, "z_mean": None, "z_var": None})
    state = det.start(1)
    det.observe(state, kl[None], torch.ones(1, 64, dtype=torch.bool))
    cut = int(state.would_cut[0])
    assert cut >= 0
    z = window_means(kl, 8)
    return {"step": 3, "tokens": ["x"] * 64, "kl": kl.tolist(), "z": [None if v != v else v for v in z.tolist()],
            "threshold": state.threshold, "window": 8, "stride": 4, "exempt": 8,
            "cut": None if shadow else cut, "shadow_cut": cut if shadow else None,
            "stop": 0 if shadow else STOP_TRAP, "correct": False, "prompt": "12+34"}


# ---------------------------------------------------------------------------------------------
# KL traces

def test_trace_panel_draws_the_threshold_used_on_a_log_axis_with_a_floor():
    tr = trapped_trace(threshold=0.005)
    other = {**trapped_trace(threshold=0.02), "step": 3}
    fig = traces_figure([tr, other])
    for ax, t in zip(fig.axes, (tr, other)):
        assert ax.get_yscale() == "log"  # never symlog: d and z are never negative
        bottom, top = ax.get_ylim()
        assert 0 < bottom < t["threshold"] < top  # a 0.005 threshold is well inside the axis
        thr = line(ax, "threshold s used for this batch")
        assert set(thr.get_ydata()) == {t["threshold"]}
        assert "d_t" in ax.get_ylabel() and "z" in ax.get_ylabel()
        assert not any(name in ax.get_ylabel() for name in STOP_NAMES)
        assert f"ended by {STOP_NAMES[STOP_TRAP]}" in ax.get_title("left") and "answer wrong" in ax.get_title("left")
        assert f"cut at {t['cut']}" in ax.get_title("left") and "prompt 12+34" in ax.get_title("left")
        d = line(ax, "d_t  per-token reverse KL")
        assert list(d.get_xdata()) == list(range(64)) and min(d.get_ydata()) == bottom  # 0 drawn at the floor
    assert "d and z below" in " ".join(t.get_text() for t in fig.texts)


def test_z_is_drawn_at_window_starts_so_the_cut_sits_on_the_first_low_window():
    tr = trapped_trace()
    ax = traces_figure([tr]).axes[0]
    z = line(ax, "z  mean of d over the W=8 tokens\n    from this position (window start)")
    x, y = list(z.get_xdata()), list(z.get_ydata())
    assert x[0] == 0 and y[0] == pytest.approx(statistics.fmean(tr["kl"][:8]))
    assert len(x) == 64 - 8 + 1
    cut = tr["cut"]
    assert y[cut] < tr["threshold"] <= y[cut - 4]  # the window starting at the cut is the first low one
    cut_line = line(ax, "cut (tokens from here\n    left out of the loss)")
    assert set(cut_line.get_xdata()) == {cut}
    low = line(ax, "scored windows with z < s\n    (outside the exempt span)")
    assert min(low.get_xdata()) == cut
    scored = line(ax, "windows the detector scores\n    (every stride=4 tokens)")
    assert list(scored.get_xdata()) == list(range(0, 64 - 8 + 1, 4))


def test_trace_legend_sits_beside_the_panels_and_shadow_cuts_are_dotted():
    tr = trapped_trace(shadow=True)
    fig = traces_figure([tr, {**tr, "threshold": None, "shadow_cut": None}], title="rich world, student before")
    assert fig._suptitle.get_text() == "rich world, student before"
    ax0, ax1 = fig.axes
    assert line(ax0, "would-be cut (shadow mode)").get_linestyle() == ":"
    assert "would be cut at" in ax0.get_title("left") and "no threshold yet" in ax1.get_title("left")
    assert not [ln for ln in ax1.get_lines() if ln.get_label().startswith("threshold")]
    fig.canvas.draw()
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert all(not box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    assert len(legend.get_texts()) >= 6


def test_a_negative_threshold_is_named_not_drawn():
    tr = {**trapped_trace(), "threshold": -0.14, "cut": None, "stop": 0}
    ax = traces_figure([tr]).axes[0]
    assert ax.get_ylim()[0] == pytest.approx(1e-4) and ax.get_yscale() == "log"
    assert not [ln for ln in ax.get_lines() if ln.get_label().startswith(("threshold", "scored windows with"))]
    assert "threshold s = -0.14; not drawn: below the log axis" in ax.get_title("left")


# ---------------------------------------------------------------------------------------------
# Learning curves

def curve(values: list[float]) -> list[dict]:
    return [{"step": 10 * i, "tokens": 1000.0 * i, "test/avg@k": v, "test/pass@k": min(1.0, 2 * v)}
            for i, v in enumerate(values)]


def test_learning_curves_keep_coinciding_arms_visible_and_say_what_the_band_is():
    same = [curve([0.2, 0.4, 0.5]), curve([0.3, 0.4, 0.7])]
    fig = learning_curves_figure({"OPD": same, "KAT zscore": same, "KAT": [curve([0.1, 0.2, 0.3])] * 2},
                                 title="sensitivity, rich world", references={"teacher test/avg@k": 0.9})
    assert "±1 std over seeds" in fig._suptitle.get_text() and "2 seeds" in fig._suptitle.get_text()
    ax = fig.axes[0]  # avg@k against step
    assert ax.get_ylabel() == "test/avg@k (%)" and ax.get_xlabel() == "step"
    opd, zscore = line(ax, "OPD"), line(ax, "KAT zscore")
    assert list(opd.get_ydata()) == list(zscore.get_ydata()) == pytest.approx([25.0, 40.0, 60.0])
    assert (opd.get_linestyle(), opd.get_marker()) != (zscore.get_linestyle(), zscore.get_marker())
    assert opd.get_markersize() > zscore.get_markersize()  # the later, smaller marker shows inside the earlier
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    std = statistics.stdev([20.0, 30.0])
    assert max(band) == pytest.approx(60.0 + statistics.stdev([50.0, 70.0]))
    assert min(band) == pytest.approx(25.0 - std)
    tokens = line(fig.axes[1], "OPD")
    assert list(tokens.get_xdata()) == [0.0, 1000.0, 2000.0]
    assert set(line(ax, "teacher").get_ydata()) == {90.0}
    (legend,) = fig.legends
    fig.canvas.draw()
    assert all(not legend.get_window_extent().overlaps(a.get_window_extent()) for a in fig.axes)


def test_one_seed_says_there_is_no_band():
    fig = learning_curves_figure({"OPD": [curve([0.2, 0.4])]})
    assert "one seed: no band" in fig._suptitle.get_text()


# ---------------------------------------------------------------------------------------------
# Cut positions

def test_cut_histogram_and_first_errors_are_on_separate_axes():
    recs = ([{"length": 60, "correct": True, "shadow_cut": 20, "first_error": None}] * 3
            + [{"length": 60, "correct": False, "shadow_cut": 36, "first_error": 30}] * 2
            + [{"length": 60, "correct": False, "shadow_cut": None, "first_error": e} for e in range(40)])
    fig = cut_positions_figure({"student before training": recs}, title="rich world")
    cuts_ax, errors_ax = fig.axes
    heights = [p.get_height() for p in cuts_ax.patches]
    assert sum(heights) == 5  # only the cut rollouts on this axis
    assert cuts_ax.get_ylim()[1] < 10  # not scaled to the 42 first errors
    assert sum(p.get_height() for p in errors_ax.patches) == 42
    assert cuts_ax.get_ylabel() == "cut rollouts" and errors_ax.get_ylabel() == "wrong rollouts"
    texts = [t.get_text() for t in cuts_ax.get_legend().get_texts()]
    assert texts == ["ending correct: 3 of 3 cut", "ending wrong: 2 of 42 cut"]
    assert "first error" in errors_ax.get_title()


def test_cut_histogram_without_toy_positions_has_one_row():
    recs = [{"length": 30, "correct": ok, "shadow_cut": c} for ok, c in ((True, 8), (False, 12), (False, None))]
    fig = cut_positions_figure({"a": recs, "b": recs})
    assert len(fig.axes) == 2 and all(sum(p.get_height() for p in ax.patches) == 2 for ax in fig.axes)


# ---------------------------------------------------------------------------------------------
# A run directory

def test_plot_run_draws_the_runs_traces_and_curves(tmp_path):
    tr = trapped_trace()
    rows = [{"step": s, "loss": 1.0 / s, "kl": 2.0 / s, "cut_rate": 0.1 * s, "mean_length": 50.0,
             "kept_length": 40.0, "tokens_total": 100.0 * s} for s in (1, 2, 3)]
    rows.append({"step": 3, "eval": "after", "test/avg@k": 0.5, "test/pass@k": 0.75})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "traces.jsonl").write_text(json.dumps(tr) + "\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"student": "kat/toy/rich/student", "teacher": "T"}))
    made = plot_run(str(tmp_path))
    assert made == [str(tmp_path / "kl_traces.png"), str(tmp_path / "curves.png")]
    assert all((tmp_path / name).stat().st_size > 5000 for name in ("kl_traces.png", "curves.png"))
    assert run_title(str(tmp_path)) == "student kat/toy/rich/student, teacher T"
    fig = curves_figure(rows)
    assert list(line(fig.axes[0], "loss").get_ydata()) == [1.0, 0.5, 1 / 3]
    assert list(line(fig.axes[3], "test/avg@k").get_xdata()) == [300.0]


# ---------------------------------------------------------------------------------------------
# Pictures redrawn from their data files

def test_experiment_pictures_redraw_from_the_data_saved_beside_them(tmp_path, capsys):
    from kat.plot import data_path, main, plot_cut_positions, plot_learning_curves, plot_traces, redraw

    curves = {"OPD": [curve([0.2, 0.4]), curve([0.3, 0.5])], "KAT": [curve([0.1, 0.3])] * 2}
    recs = [{"length": 40, "correct": ok, "shadow_cut": c, "first_error": e}
            for ok, c, e in ((True, 8, None), (False, 12, 10), (False, None, 3))]
    made = [plot_learning_curves(curves, str(tmp_path / "curves.png"), "t", {"teacher test/avg@k": 0.9},
                                 keep_data=True),
            plot_cut_positions({"before": recs}, str(tmp_path / "cuts.png"), "c", keep_data=True),
            plot_traces([trapped_trace()], str(tmp_path / "traces.png"), title="tr", keep_data=True)]
    assert json.loads((tmp_path / "curves.json").read_text())["args"]["curves"] == curves
    assert json.loads((tmp_path / "cuts.json").read_text())["args"]["records"] == {"before": recs}
    for png in made:
        first = (tmp_path / png).read_bytes()
        (tmp_path / png).unlink()
        assert redraw(data_path(png)) == png and (tmp_path / png).read_bytes() == first  # the same picture
    assert main([str(tmp_path / "curves.json")]) == 0 and capsys.readouterr().out.strip() == made[0]

    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "other.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "other.json: not a picture's data file" in err and "traces, learning_curves, cut_positions" in err
