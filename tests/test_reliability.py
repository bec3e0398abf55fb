"""What a run never loses or mixes: an existing output_dir, user files beside checkpoints, a model
pruned onto itself, a resume with another config, logs past the checkpoint; and the bad inputs that
end in one line (exit 2) instead of a traceback."""

from __future__ import annotations

import json
import os

import pytest
from conftest import tiny_args

import kat.train as kat_train
from kat.checkpoint import checkpoints, find_checkpoint, read_progress
from kat.config import _FIELDS, ConfigError, load_config
from kat.checkpoint import check_start
from kat.rundir import RESUMABLE, trim_logs
from kat.train import main, train


def read_rows(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def argv(args: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(kat_train, "load_models", refuse)


def fake_run(out, steps=(2, 3), config=None) -> None:
    """A finished run's files as a run writes them (checkpoints with their progress.json)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("steps: 3\n")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    for s in steps:
        ckpt = out / f"checkpoint-{s:06d}"
        ckpt.mkdir()
        (ckpt / "progress.json").write_text(json.dumps({"step": s, "tokens_total": 1.0, "bad_in_a_row": 0,
                                                        "config": config or {}}))


# --- 1. an existing output_dir ----------------------------------------------------------------------

def test_a_new_run_into_a_finished_run_is_refused_before_models_load(tiny_world, tmp_path, capsys, no_models):
    out = tmp_path / "run"
    fake_run(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(argv(tiny_args(tiny_world, out))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"output_dir: '{out}' already holds a run (checkpoint-000002, checkpoint-000003, config.yaml, " \
           "metrics.jsonl)" in err
    assert "--output_dir" in err and "--resume latest" in err and "--overwrite_output_dir true" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_overwrite_removes_only_what_a_run_writes(tiny_world, tmp_path):
    out = tmp_path / "run"
    fake_run(out, steps=(7, 8))  # an old run whose checkpoints sort after the new run's
    (out / "traces.jsonl").write_text('{"step": 8}\n')
    (out / "notes.txt").write_text("mine")
    train(load_config([], **tiny_args(tiny_world, out, steps=2, save_every=1, keep_last=1,
                                      overwrite_output_dir=True)))
    assert (out / "notes.txt").read_text() == "mine"
    assert checkpoints(str(out)) == ["checkpoint-000002"]  # the old 7 and 8 removed, the new 1 pruned
    assert [r["step"] for r in read_rows(out / "metrics.jsonl")] == [1, 2]  # no old rows mixed in
    assert {t["step"] for t in read_rows(out / "traces.jsonl")} == {2}


def test_pruning_spares_user_files_and_folders_named_like_checkpoints(tiny_world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint-000000-old", "checkpoint-important", "checkpoint-12"):  # not the run's six digits
        (out / name).mkdir()
        (out / name / "weights.bin").write_text("mine")
    (out / "checkpoint-0.txt").write_text("a file named like a checkpoint")
    train(load_config([], **tiny_args(tiny_world, out, steps=3, save_every=1, keep_last=1)))
    for name in ("checkpoint-000000-old", "checkpoint-important", "checkpoint-12"):
        assert (out / name / "weights.bin").read_text() == "mine"
    assert (out / "checkpoint-0.txt").is_file()
    assert checkpoints(str(out), complete=True) == ["checkpoint-000003"]


def test_checkpoint_folders_are_the_exact_name_with_its_marker(tmp_path):
    for name in ("checkpoint-000001", "checkpoint-000002", "checkpoint-important", "checkpoint-1234567",
                 "checkpoint-000003.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-000001" / "progress.json").write_text("{}")
    (tmp_path / "checkpoint-000004").write_text("a file")
    assert checkpoints(str(tmp_path)) == ["checkpoint-000001", "checkpoint-000002"]
    assert checkpoints(str(tmp_path), complete=True) == ["checkpoint-000001"]


@pytest.mark.parametrize("target,message", [
    ("file", "is a file, not a folder"),
    ("file/sub", "cannot create"),
    ("", "output_dir: empty"),
])
def test_bad_output_dirs_are_one_line(tiny_world, tmp_path, capsys, no_models, target, message):
    (tmp_path / "file").write_text("x")
    assert main(argv(tiny_args(tiny_world, tmp_path / target if target else ""))) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_one_line(tiny_world, tmp_path, capsys, no_models):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(argv(tiny_args(tiny_world, out))) == 2
    finally:
        out.chmod(0o755)
    assert "is not writable" in capsys.readouterr().err


# --- 5. resume checks, 8. each step logged once ----------------------------------------------------

def test_resume_refuses_another_definition_accepts_cadence_and_logs_each_step_once(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    base = tiny_args(tiny_world, out, steps=4, save_every=2, keep_last=5)
    train(load_config([], **base))
    assert [r["step"] for r in read_rows(out / "metrics.jsonl")] == [1, 2, 3, 4]
    ckpt = str(out / "checkpoint-000002")

    def refused(**over):
        cfg = load_config([], **{**base, "resume": ckpt, **over})
        with pytest.raises(ConfigError) as err:
            check_start(cfg)
        return " ".join(str(err.value).split())

    msg = refused(loss="topk", termination="none")
    assert "loss: 'full' -> 'topk'" in msg and "termination: 'kat' -> 'none'" in msg and "config.yaml" in msg
    assert "lr: 0.003 -> 0.1" in refused(lr=0.1)
    assert "seed: 3 -> 4" in refused(seed=4)  # another run's checkpoint: its own seed, batches and samples
    assert "steps: 4 -> 3" in refused(steps=3)
    assert "past steps=1" in refused(resume=str(out / "checkpoint-000004"), steps=1)

    # evaluation, logging and saving may change; the rows of steps 3-4 are written once
    capsys.readouterr()
    train(load_config([], **{**base, "resume": ckpt, "n_traces": 2, "save_every": 1, "plot": False}))
    assert f"resume: changed since {ckpt}: save_every: 2 -> 1; n_traces: 8 -> 2" in capsys.readouterr().out
    assert [r["step"] for r in read_rows(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted({t["step"] for t in read_rows(out / "traces.jsonl")}) == [4]


def test_resumable_fields_are_config_fields():
    assert RESUMABLE <= set(_FIELDS)
    defining = {"teacher", "student", "train_data", "loss", "termination", "eta", "lr", "steps", "seed",
                "batch_size", "samples_per_prompt", "max_new_tokens", "warmup_ratio", "window", "dtype"}
    assert not defining & RESUMABLE


def test_trim_logs_drops_rows_after_the_checkpoint_and_a_cut_line(tmp_path):
    rows = [{"step": 0, "eval": "before"}, {"step": 1}, {"step": 2}, {"step": 2, "eval": "periodic"},
            {"step": 3}, {"step": 2, "eval": "after"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    (tmp_path / "traces.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 2, 3)))
    assert trim_logs(str(tmp_path), 2) == 4
    assert read_rows(tmp_path / "metrics.jsonl") == rows[:4]
    assert read_rows(tmp_path / "traces.jsonl") == [{"step": 2}, {"step": 2}]


@pytest.mark.parametrize("text", ["{}", "[]", "not json", '{"step": -1, "config": {}}'])
def test_a_bad_progress_file_names_the_checkpoint_and_the_one_to_use(tmp_path, text):
    fake_run(tmp_path, steps=(1, 2))
    (tmp_path / "checkpoint-000002" / "progress.json").write_text(text)
    cfg = load_config([], output_dir=str(tmp_path), resume="latest")
    assert find_checkpoint(cfg) == str(tmp_path / "checkpoint-000002")
    with pytest.raises(ConfigError) as err:
        read_progress(find_checkpoint(cfg))
    assert "checkpoint-000002" in str(err.value)
    assert f"--resume {tmp_path / 'checkpoint-000001'}" in str(err.value)


# --- bad inputs: one line, status 2 ------------------------------------------------------------------

def one_error_line(capsys) -> str:
    """The error line of a failed command (transformers' progress bars may share stderr)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    return errors[0]


@pytest.mark.parametrize("text,message", [
    ('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer"\n', "bad.jsonl', line 2: not valid JSON"),
    ("question,answer\n1+1,2\n", "bad.jsonl', line 1: not valid JSON"),
    ('{"prompt": {"text": "1+1"}, "answer": "2"}\n', "bad.jsonl', row 1: the prompt field 'prompt' holds dict"),
    ('{"prompt": "1+1", "answer": "2"}\n{"prompt": 7, "answer": "2"}\n',
     "bad.jsonl', row 2: the prompt field 'prompt' holds int 7, not text"),
])
def test_unreadable_or_non_text_data_is_one_line(tiny_world, tmp_path, capsys, no_models, text, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    assert main(argv(tiny_args(tiny_world, tmp_path / "run", train_data=bad))) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: train_data: ") and message in line


def test_a_truncated_teacher_is_one_line(tiny_world, tmp_path, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_world["teacher"], teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(argv(tiny_args(tiny_world, tmp_path / "run", teacher=teacher))) == 2
    assert f"teacher: the weights in '{teacher}' cannot be read" in one_error_line(capsys)


@pytest.mark.parametrize("over,message", [
    ({"max_new_tokens": 120}, r"train_data: \d+ of \d+ prompts are longer than 8 tokens .* with max_new_tokens=120 "
                              r"they would run past the models' 128 positions"),
    ({"eval_data": "TEST", "eval_max_new_tokens": 126}, r"eval_data 'test': \d+ of \d+ prompts are longer than 2 "
                                                        r"tokens .* with eval_max_new_tokens=126"),
])
def test_prompts_past_the_models_positions_are_refused(tiny_world, tmp_path, capsys, over, message):
    over = {k: tiny_world["test"] if v == "TEST" else v for k, v in over.items()}
    assert main(argv(tiny_args(tiny_world, tmp_path / "run", **over))) == 2
    import re
    assert re.search(message, one_error_line(capsys))


def test_plot_names_a_cut_line_and_says_when_there_is_nothing(tmp_path, capsys):
    from kat.plot import main as plot_main

    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_main([str(tmp_path)]) == 2
    assert "holds no rows yet, so there is nothing to plot" in one_error_line(capsys)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert plot_main([str(tmp_path)]) == 2
    assert "metrics.jsonl, line 2: not a JSON row" in one_error_line(capsys)


@pytest.mark.parametrize("extra,message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range; it must be >= 1"),
    (["--batch-size", "0"], "--batch-size: 0 is out of range; it must be >= 1"),
    (["--top-p", "0"], "--top-p: 0.0 is out of range"),
    (["--out", "DIR"], "is a folder; give the path of the JSON file to write"),
])
def test_eval_arguments_are_checked_before_the_evaluation(tiny_world, tmp_path, capsys, monkeypatch, extra, message):
    import kat.models
    from kat.evaluate import main as eval_main

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(kat.models, "load_model", refuse)
    extra = [str(tmp_path) if a == "DIR" else a for a in extra]
    assert eval_main(["--model", tiny_world["student"], "--data", tiny_world["test"], *extra]) == 2
    assert message in one_error_line(capsys)


def test_under_a_launcher_one_process_reports_a_user_error(tiny_world, tmp_path, capsys, monkeypatch, no_models):
    """Every process meets the same bad value; only the first prints it, so a launch shows one line."""
    args = argv(tiny_args(tiny_world, tmp_path / "run", eta=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 2
    assert "eta: 2.0 is out of range" in one_error_line(capsys)
