"""The training loop end to end on tiny models: outputs, interruption and exact resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from kat.config import ConfigError, load_config
from kat.train import TrainingError, main, train

from conftest import ROOT, tiny_args


def read_rows(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def weights(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "student", "model.safetensors"))


def test_run_writes_everything(tiny_world, tmp_path):
    out = tmp_path / "run"
    results = train(load_config([], **tiny_args(tiny_world, out, eval_data=tiny_world["test"], eval_limit=4,
                                                eval_k=2, eval_every=2, plot=True, n_traces=3)))
    rows = read_rows(out / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["eval"] for r in rows if "eval" in r] == ["before", "periodic", "after"]
    assert 0 <= results["after"]["test/avg@k"] <= results["after"]["test/pass@k"] <= 1
    for r in steps:
        assert r["kl"] > 0 and r["kept_length"] <= r["mean_length"] <= 20
        assert (r["loss"] > 0) == (r["kept_length"] > 0)  # a fully cut batch has nothing to learn
        assert r["tokens"] == pytest.approx(r["mean_length"] * 4)  # 2 prompts x 2 samples
    # the detector becomes active after its warm-up and cuts something in this configuration
    assert not steps[0]["active"] and any(r["cut_rate"] > 0 for r in steps[1:])
    traces = read_rows(out / "traces.jsonl")
    assert {t["step"] for t in traces} == {2, 4}
    assert all(len(t["kl"]) == len(t["tokens"]) == len(t["z"]) for t in traces)
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(out / "student")
    assert torch.equal(trained.model.embed_tokens.weight, weights(out)["model.embed_tokens.weight"])
    assert (out / "kl_traces.png").stat().st_size > 5000 and (out / "curves.png").stat().st_size > 5000
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-000004"]


def test_traces_record_the_threshold_their_step_used(tiny_world, tmp_path):
    """A trace's threshold is the one in its step's metrics row, not the next step's."""
    out = tmp_path / "run"
    train(load_config([], **tiny_args(tiny_world, out, steps=5, eval_every=1, n_traces=2)))
    thresholds = {r["step"]: r["threshold"] for r in read_rows(out / "metrics.jsonl")}
    traces = read_rows(out / "traces.jsonl")
    assert sorted({t["step"] for t in traces}) == [1, 2, 3, 4, 5] and len(traces) == 10
    assert all(t["threshold"] == thresholds[t["step"]] for t in traces)
    moved = [s for s in range(1, 5) if thresholds[s] is not None and thresholds[s] != thresholds[s + 1]]
    assert len(moved) >= 2  # the detector moved, so the next step's value would have been wrong


def test_keep_last_and_resume_latest_finishes_identically(tiny_world, tmp_path):
    full = tmp_path / "full"
    train(load_config([], **tiny_args(tiny_world, full, steps=4)))
    part = tmp_path / "part"
    train(load_config([], **tiny_args(tiny_world, part, steps=4, save_every=1, keep_last=2)))
    kept = sorted(p.name for p in part.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-000003", "checkpoint-000004"]
    # resume from step 3 into a fresh directory holding only that checkpoint
    again = tmp_path / "again"
    again.mkdir()
    os.rename(part / "checkpoint-000003", again / "checkpoint-000003")
    with open(part / "metrics.jsonl") as src, open(again / "metrics.jsonl", "w") as dst:
        dst.writelines(src.readlines()[:3])
    train(load_config([], **tiny_args(tiny_world, again, steps=4, resume="latest")))
    a, b = weights(full), weights(again)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    ra, rb = read_rows(full / "metrics.jsonl"), read_rows(again / "metrics.jsonl")
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-6)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tiny_world, tmp_path, monkeypatch):
    """SIGTERM after step 3 checkpoints and stops; resuming lands on the uninterrupted result.

    The signal is raised from inside the run when step 3's metrics row is written, so the test
    does not race the training speed of the machine it runs on.
    """
    import kat.train as kat_train

    write = kat_train.append_jsonl

    def append_and_signal(path, rows):
        write(path, rows)
        if path.endswith("metrics.jsonl") and any(r.get("step") == 3 and "loss" in r for r in rows):
            os.kill(os.getpid(), signal.SIGTERM)

    killed = tmp_path / "killed"
    monkeypatch.setattr(kat_train, "append_jsonl", append_and_signal)
    result = train(load_config([], **tiny_args(tiny_world, killed, steps=8, max_new_tokens=24)))
    monkeypatch.setattr(kat_train, "append_jsonl", write)
    assert result["stopped_at"] == 3
    assert len(read_rows(killed / "metrics.jsonl")) == 3
    assert (killed / "checkpoint-000003").is_dir() and not (killed / "student").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again

    train(load_config([], **tiny_args(tiny_world, killed, steps=8, max_new_tokens=24, resume="latest")))
    straight = tmp_path / "straight"
    train(load_config([], **tiny_args(tiny_world, straight, steps=8, max_new_tokens=24)))
    a, b = weights(killed), weights(straight)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    ra, rb = read_rows(killed / "metrics.jsonl"), read_rows(straight / "metrics.jsonl")
    assert [r["step"] for r in ra] == list(range(1, 9))
    for x, y in zip(ra, rb):
        assert (x["threshold"] is None) == (y["threshold"] is None)
        for key in ("loss", "kl", "cut_rate", "mean_length", "threshold"):
            if y[key] is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (x["step"], key)


def test_cli_stops_cleanly_on_sigterm(tiny_world, tmp_path):
    """`python -m kat train` exits 143 (128 + SIGTERM, so a scheduler can tell it from a finished run)
    with a checkpoint when the scheduler sends SIGTERM."""
    out = tmp_path / "run"
    args = tiny_args(tiny_world, out, steps=10_000)  # far more steps than the test waits for
    cmd = [sys.executable, "-m", "kat", "train"] + [f"--{k}={v}" for k, v in args.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not metrics.exists() or not read_rows(metrics)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output[-2000:]
    assert "stopped by signal" in output
    stopped_at = len(read_rows(metrics))
    assert 1 <= stopped_at < 10_000
    assert (out / f"checkpoint-{stopped_at:06d}").is_dir()


def test_corrupt_and_partial_checkpoints_are_reported(tiny_world, tmp_path):
    out = tmp_path / "run"
    train(load_config([], **tiny_args(tiny_world, out, steps=2, save_every=1)))
    (out / "checkpoint-000009.tmp").mkdir()  # a save interrupted half-way is never picked
    (out / "checkpoint-000002" / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match="checkpoint-000002' is corrupt or incomplete") as err:
        train(load_config([], **tiny_args(tiny_world, out, steps=2, resume="latest")))
    assert f"--resume {out / 'checkpoint-000001'}" in str(err.value)  # the checkpoint to use instead
    os.remove(out / "checkpoint-000001" / "progress.json")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        load_config([], **tiny_args(tiny_world, out, steps=3, resume=str(out / "checkpoint-000001")))
        train(load_config([], **tiny_args(tiny_world, out, steps=3, resume=str(out / "checkpoint-000001"))))


def test_non_finite_teacher_skips_steps_then_stops(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "nan_teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_world["teacher"])
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    tiny_world["tokenizer"].save_pretrained(broken)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"3 steps in a row met non-finite values \(last: step 3: .*teacher logits"):
        train(load_config([], **tiny_args(tiny_world, out, teacher=str(broken), max_bad_steps=3)))
    rows = read_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all("(row, completion position)" in r["skipped"] for r in rows)


@pytest.mark.parametrize("override,message", [
    ({"student": "/nonexistent/model"}, "/nonexistent/model"),
    ({"train_data": "/nonexistent/train.jsonl"}, "data file '/nonexistent/train.jsonl' does not exist"),
    ({"eta": "2"}, "eta: 2.0 is out of range"),
])
def test_user_errors_exit_2_without_traceback(tiny_world, tmp_path, capsys, override, message):
    args = tiny_args(tiny_world, tmp_path / "run")
    args.update(override)
    assert main([f"--{k}={v}" for k, v in args.items()]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_dataset_and_vocabulary_mismatch(tiny_world, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([f"--{k}={v}" for k, v in tiny_args(tiny_world, tmp_path / "a", train_data=empty).items()]) == 2
    assert "holds no rows" in capsys.readouterr().err
    other = tmp_path / "other_tok"
    tok = tiny_world["tokenizer"]
    tok.save_pretrained(other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["X"] = len(vocab["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tiny_world["teacher"]).save_pretrained(other)
    assert main([f"--{k}={v}" for k, v in tiny_args(tiny_world, tmp_path / "b", teacher=other).items()]) == 2
    assert "teacher and student tokenizers differ" in capsys.readouterr().err


TWO_PROC = r"""
import gc, json, os, sys
sys.path.insert(0, {root!r})
import accelerate, torch
from kat.config import load_config
from kat.train import train
cfg = load_config([], **json.loads(sys.argv[1]))
end_training = accelerate.Accelerator.end_training
def ending(self):  # DDP wrappers still alive when the process group is torn down
    gc.collect()
    live = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    with open(os.path.join(cfg.output_dir, f"live_ddp{{os.environ.get('RANK', 0)}}.json"), "w") as fh:
        json.dump(live, fh)
    return end_training(self)
accelerate.Accelerator.end_training = ending
train(cfg)
"""


@pytest.mark.parametrize("termination", ["kat", "none"])  # "none": unscored rollouts, KL from the learner
def test_two_processes_match_one(tiny_world, tmp_path, termination):
    """torchrun with 2 CPU processes (gloo) vs 1 process on the same global batch of prompts."""
    script = tmp_path / "run.py"
    script.write_text(TWO_PROC.format(root=str(ROOT)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for n_proc, batch in ((1, 4), (2, 2)):
        args = tiny_args(tiny_world, tmp_path / f"p{n_proc}", batch_size=batch, steps=2, min_buffer=2,
                         termination=termination)
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(n_proc), str(script), json.dumps(args)],
                              env=env, capture_output=True, text=True, timeout=300)
        failed = [line for line in proc.stderr.splitlines() if "[rank1]" in line or "Error" in line]
        assert proc.returncode == 0, "\n".join(failed[-40:]) or proc.stderr[-3000:]
    r1, r2 = read_rows(tmp_path / "p1" / "metrics.jsonl"), read_rows(tmp_path / "p2" / "metrics.jsonl")
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2]
    # the DDP student is gone before the process group (kat.train.close): else a reducer holding a
    # gloo group's last reference destroys it while holding the GIL its worker needs (a hang at exit)
    assert [json.loads((tmp_path / "p2" / f"live_ddp{r}.json").read_text()) for r in range(2)] == [0, 0]
    for a, b in zip(r1, r2):
        # same tokens and cuts: sampling draws for the global batch; the threshold is one for all
        # processes because the detector gathers every process's minima in rank order
        for key in ("mean_length", "kept_length", "cut_rate", "tokens"):
            assert a[key] == b[key], (a["step"], key)
        assert (a["threshold"] is None) == (b["threshold"] is None)
        if a["threshold"] is not None:  # KL sums over differently shaped batches: float rounding only
            assert a["threshold"] == pytest.approx(b["threshold"], rel=1e-5)
        # the loss is normalised by the global token count, not per process
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-5), a["step"]
    if termination == "kat":
        assert r1[1]["threshold"] is not None, "the second step must use a threshold built from both processes"
    else:  # nothing cut: the loss is the mean KL of all generated tokens
        assert all(r["loss"] == pytest.approx(r["kl"], rel=1e-5) for r in r1 + r2)
    wa, wb = weights(tmp_path / "p1"), weights(tmp_path / "p2")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0) for k in wa)


def test_evaluation_length_can_exceed_the_training_cap(tiny_world, tmp_path):
    """A training length cap (FixedPrefix) leaves evaluation at eval_max_new_tokens."""
    rows = {}
    for eval_cap in (0, 24):
        out = tmp_path / f"cap{eval_cap}"
        train(load_config([], **tiny_args(tiny_world, out, steps=1, max_new_tokens=4, eval_max_new_tokens=eval_cap,
                                          eval_data=tiny_world["test"], eval_limit=4, eval_k=2)))
        rows[eval_cap] = read_rows(out / "metrics.jsonl")
    assert rows[0][1]["mean_length"] <= 4 and rows[24][1]["mean_length"] <= 4  # training rollouts capped
    assert max(r["test/mean_length"] for r in rows[0] if "eval" in r) <= 4
    assert max(r["test/mean_length"] for r in rows[24] if "eval" in r) > 4


# ---------------------------------------------------------------------------------------------
# What users of Hugging Face trainers expect: trackers, a model card

def tensorboard_scalars(log_dir) -> dict:
    """{tag: {step: value}} from every TensorBoard event file under `log_dir` (TFRecord framing:
    length, its CRC, the Event proto, its CRC), read with tensorboardX's protobuf classes."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for root, _, files in os.walk(log_dir):
        for name in files:
            if "tfevents" not in name:
                continue
            data = open(os.path.join(root, name), "rb").read()
            i = 0
            while i < len(data):
                (n,) = struct.unpack("<Q", data[i:i + 8])
                event = Event.FromString(data[i + 12:i + 12 + n])
                i += 12 + n + 4
                for v in event.summary.value:
                    if v.HasField("simple_value"):
                        out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_tensorboard_tracker_logs_every_step_under_the_project_name(tiny_world, tmp_path):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    train(load_config([], **tiny_args(tiny_world, out, steps=3, log_with="tensorboard", project_name="my-distill")))
    scalars = tensorboard_scalars(out / "my-distill")
    rows = [r for r in read_rows(out / "metrics.jsonl") if "loss" in r]
    for key in ("loss", "kl", "mean_length", "cut_rate", "lr"):
        assert sorted(scalars[key]) == [1, 2, 3], key
        assert [scalars[key][r["step"]] for r in rows] == pytest.approx([r[key] for r in rows], rel=1e-6), key


def test_a_tracker_that_is_not_installed_is_one_error_line(tiny_world, tmp_path, capsys, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    args = tiny_args(tiny_world, tmp_path / "run", log_with="comet_ml")
    assert main([f"--{k}={v}" for k, v in args.items()]) == 2
    assert capsys.readouterr().err == ("error: log_with: 'comet_ml' needs its package, which is not installed; "
                                       "pip install comet-ml, or leave log_with empty\n")
    from accelerate.utils import LoggerType

    from kat.config import TRACKERS
    assert set(TRACKERS) == set(LoggerType.list())  # every tracker Accelerate knows, and no other


def test_saved_student_has_a_model_card(tiny_world, tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    args = tiny_args(tiny_world, out, steps=2, eval_data=tiny_world["test"], eval_limit=4, eval_k=2)
    argv = [f"--{k}={v}" for k, v in args.items()]
    assert main(argv) == 0
    card = (out / "student" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == tiny_world["student"] and "on-policy-distillation" in front["tags"]
    assert f"from the teacher `{tiny_world['teacher']}`" in card and f"`{tiny_world['train']}`" in card
    after = json.loads((out / "results.json").read_text())["after"]
    assert (f"| test | {100 * after['test/avg@k']:.2f}% | {100 * after['test/pass@k']:.2f}% | "
            f"{after['test/mean_length']:.1f} |") in card
    assert "python -m kat train " + " ".join(argv) in card  # the command, as given
    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config == load_config(argv).to_dict()


def test_chat_template_kwargs_from_the_config_reach_every_prompt(tmp_path, monkeypatch):
    """`chat_template_kwargs: {enable_thinking: false}` in a config file changes the prompts that
    training samples from, that the length filter measures and that evaluation renders."""
    import kat.evaluate as kat_evaluate
    import kat.train as kat_train
    from fixtures.tiny_qwen import CHATML, save_pair

    pair = save_pair(tmp_path / "pair")
    flag = CHATML.replace("assistant\n{% endif %}", "assistant\n{% if enable_thinking is not defined or "
                          "enable_thinking %}<think>{% endif %}{% endif %}")
    for role in ("teacher", "student"):  # the template, as Qwen3's, reads enable_thinking
        path = os.path.join(pair[role], "chat_template.jinja")
        open(path, "w").write(flag)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "answer": str(2 * a)}) + "\n" for a in range(6)))
    seen = {"train": [], "eval": []}
    import kat.data as kat_data

    encode, render = kat_data.encode_prompts, kat_evaluate.render_prompts
    monkeypatch.setattr(kat_data, "encode_prompts", lambda tok, texts, device: (
        seen["train"].extend(texts), encode(tok, texts, device))[1])
    monkeypatch.setattr(kat_evaluate, "render_prompts", lambda *a, **k: (
        lambda texts: (seen["eval"].extend(texts), texts)[1])(render(*a, **k)))
    for thinking in (None, False):
        config = tmp_path / f"c{thinking}.yaml"
        config.write_text("" if thinking is None else "chat_template_kwargs: {enable_thinking: false}\n")
        args = dict(teacher=pair["teacher"], student=pair["student"], train_data=data, eval_data=data, eval_limit=2,
                    eval_k=1, steps=1, batch_size=2, samples_per_prompt=1, max_new_tokens=4, termination="none",
                    output_dir=tmp_path / f"run{thinking}", plot=False, max_prompt_length=60)
        seen = {"train": [], "eval": []}
        cfg = load_config(["--config", str(config)] + [f"--{k}={v}" for k, v in args.items()])
        assert cfg.chat_template_kwargs == ({} if thinking is None else {"enable_thinking": False})
        train(cfg)
        assert len(seen["train"]) == 2 and len(seen["eval"]) == 4  # before and after training
        end = "<|im_start|>assistant\n<think>" if thinking is None else "<|im_start|>assistant\n"
        assert all(t.endswith(end) for t in seen["train"] + seen["eval"]), (thinking, seen)
    # the length filter renders with the kwargs too
    from kat.data import prompt_lengths
    from kat.models import load_tokenizer

    tok = load_tokenizer(pair["student"])
    lengths = [prompt_lengths(tok, [{"prompt": "1+1"}], render_kw=kat_train.render_kw(load_config(argv)))[0]
               for argv in ([], ["--chat_template_kwargs", "{enable_thinking: false}"])]
    assert lengths[0] == lengths[1] + len(tok("<think>", add_special_tokens=False)["input_ids"])
