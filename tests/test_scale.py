"""Scale: what sharded training asks of the package, proven with several CPU processes (gloo).

Under FSDP every student forward is a collective, so every process must run the same number of
forwards while sampling and evaluating, whatever lengths its own rollouts reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}


def torchrun(script, args: list[str], n_proc: int = 2, env: dict | None = None, timeout: int = 600):
    """Run `script` on `n_proc` CPU processes; fail with the processes' errors."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n_proc),
           str(script), *args]
    proc = subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    failed = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    assert proc.returncode == 0, "\n".join(failed[-40:]) or proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------
# Sampling: rows that end at different lengths on the two processes

# What both sampling scripts start with: gloo, this rank, both models from the paths in argv
SAMPLING_PRELUDE = r"""
import json, sys
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from kat.terminators import TrapDetector
from kat.sampler import sample

dist.init_process_group("gloo")
rank = dist.get_rank()
student_dir, teacher_dir, prompts_path, out = sys.argv[1:5]
student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
"""

COUNT_FORWARDS = SAMPLING_PRELUDE + r"""
calls = {"student": 0, "teacher": 0}
for name, model in (("student", student), ("teacher", teacher)):
    model.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
ids, mask = torch.load(prompts_path)
ids, mask = ids[2 * rank: 2 * rank + 2], mask[2 * rank: 2 * rank + 2]
vocab = student.config.vocab_size
# process 0: every token ends a row (length 1); process 1: no token does (length max_new_tokens)
eos = list(range(vocab)) if rank == 0 else []
result = {}
for mode, kw in (("lockstep", dict(terminator=TrapDetector(window=2, stride=1, patience=1, exempt=0,
                                                             min_buffer=0, warmup_steps=0))),
                 ("post-hoc", dict(score=True)), ("unscored", dict(score=False))):
    calls.update(student=0, teacher=0)
    rollout, _ = sample(student, teacher, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                        chunk=4, generator=torch.Generator().manual_seed(5), global_rows=(2 * rank, 4), **kw)
    torch.save(rollout, f"{out}/{mode}_{rank}.pt")
    result[mode] = dict(calls, lengths=rollout.completion_mask.sum(-1).tolist())
json.dump(result, open(f"{out}/calls_{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_every_process_runs_the_same_forwards_while_sampling(tiny_world, tmp_path, one_thread):
    """Process 0's rows end after one token, process 1's run to max_new_tokens: both processes still
    run the same student and teacher forwards (process 0 feeds a pad row), and process 0's rollout
    is the one it samples alone."""
    from transformers import AutoModelForCausalLM

    from kat.data import encode_prompts
    from kat.terminators import TrapDetector
    from kat.sampler import sample

    tok = tiny_world["tokenizer"]
    ids, mask = encode_prompts(tok, ["1+2", "37+48-19", "5-3+8", "90-45"])
    torch.save((ids, mask), tmp_path / "prompts.pt")
    script = tmp_path / "count.py"
    script.write_text(COUNT_FORWARDS)
    torchrun(script, [tiny_world["student"], tiny_world["teacher"], str(tmp_path / "prompts.pt"), str(tmp_path)])
    calls = [json.loads((tmp_path / f"calls_{r}.json").read_text()) for r in (0, 1)]
    # 12 tokens in chunks of 4: the prefill + 4 + 4 + 3 student forwards (the last token needs no
    # logits); the teacher's prefill + one forward per chunk in lockstep, one forward post hoc
    expected = {"lockstep": (12, 4), "post-hoc": (12, 1), "unscored": (12, 0)}
    for mode, (n_student, n_teacher) in expected.items():
        assert calls[0][mode]["lengths"] == [1, 1] and calls[1][mode]["lengths"] == [12, 12], mode
        for rank in (0, 1):
            assert (calls[rank][mode]["student"], calls[rank][mode]["teacher"]) == (n_student, n_teacher), \
                (mode, rank, calls[rank][mode])

    # the pad row changes nothing that process 0 returns
    student = AutoModelForCausalLM.from_pretrained(tiny_world["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world["teacher"]).eval()
    for mode, kw in (("lockstep", dict(terminator=TrapDetector(window=2, stride=1, patience=1, exempt=0,
                                                                 min_buffer=0, warmup_steps=0))),
                     ("post-hoc", dict(score=True)), ("unscored", dict(score=False))):
        alone, _ = sample(student, teacher, ids[:2], mask[:2], max_new_tokens=12, eos_token_id=list(range(len(tok))),
                          pad_token_id=0, chunk=4, generator=torch.Generator().manual_seed(5), global_rows=(0, 4),
                          **kw)
        synced = torch.load(tmp_path / f"{mode}_0.pt", weights_only=False)
        assert torch.equal(alone.completion_ids, synced.completion_ids), mode
        assert torch.equal(alone.stop, synced.stop) and torch.equal(alone.loss_mask, synced.loss_mask), mode
        assert torch.allclose(alone.kl, synced.kl, atol=1e-6, rtol=0, equal_nan=True), mode


NON_FINITE_ON_ONE = SAMPLING_PRELUDE + r"""
if rank == 0:  # only this process's teacher gives non-finite logits
    with torch.no_grad():
        teacher.model.norm.weight.fill_(float("nan"))
calls = {"student": 0, "teacher": 0}
for name, model in (("student", student), ("teacher", teacher)):
    model.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
ids, mask = torch.load(prompts_path)
try:
    sample(student, teacher, ids[2 * rank: 2 * rank + 2], mask[2 * rank: 2 * rank + 2], max_new_tokens=12,
           eos_token_id=[], pad_token_id=0, chunk=4, generator=torch.Generator().manual_seed(5),
           global_rows=(2 * rank, 4), terminator=TrapDetector(window=2, stride=1, patience=1, exempt=0))
    calls["error"] = None
except FloatingPointError as err:
    calls["error"] = str(err)
json.dump(calls, open(f"{out}/nan_{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_a_non_finite_chunk_on_one_process_is_raised_after_decoding(tiny_world, tmp_path):
    """The process that meets non-finite logits keeps decoding with the others (which would otherwise
    wait for it forever) and raises once every process has ended."""
    from kat.data import encode_prompts

    ids, mask = encode_prompts(tiny_world["tokenizer"], ["1+2", "37+48-19", "5-3+8", "90-45"])
    torch.save((ids, mask), tmp_path / "prompts.pt")
    script = tmp_path / "nan.py"
    script.write_text(NON_FINITE_ON_ONE)
    torchrun(script, [tiny_world["student"], tiny_world["teacher"], str(tmp_path / "prompts.pt"), str(tmp_path)])
    calls = [json.loads((tmp_path / f"nan_{r}.json").read_text()) for r in (0, 1)]
    assert calls[0]["error"].startswith("non-finite reverse KL or log-prob at (row, completion position) [(0, 0)")
    assert "teacher logits are non-finite" in calls[0]["error"] and calls[1]["error"] is None
    assert [(c["student"], c["teacher"]) for c in calls] == [(12, 4), (12, 4)]


def test_one_process_exchanges_nothing(monkeypatch):
    """Without torch.distributed `any_process` is the flag itself and no collective is called."""
    import torch.distributed as dist

    from kat.distributed import any_process, draw_range

    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("all_reduce called"))
    assert any_process(True) is True and any_process(False) is False
    assert draw_range(None, 3) == (0, 3) and draw_range((2, 6), 4) == (2, 6)
    with pytest.raises(ValueError, match="offset \\+ B <= total"):
        draw_range((3, 6), 4)


# ---------------------------------------------------------------------------------------------
# Training under FSDP (configs/accelerate/fsdp.yaml) against DDP, two CPU processes

TRAIN = r"""
import json, os, sys
import accelerate, torch
import kat.train as kat_train

rank = int(os.environ["RANK"])
args, out = json.loads(sys.argv[1]), sys.argv[2]
if os.environ.get("ACCELERATE_USE_FSDP") == "true":
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class CpuFsdpAccelerator(accelerate.Accelerator):
        # Accelerate switches FSDP on for accelerator devices only; torch's FSDP2 runs on CPU with
        # gloo too, so the FSDP the launcher asked for (its FSDP_* variables) is switched on here
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            for shared in (PartialState._shared_state, AcceleratorState._shared_state):
                shared["distributed_type"] = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()

    kat_train.Accelerator = CpuFsdpAccelerator

# every forward of the student on this process, and each step's longest rollout here
seen = {"forwards": 0, "lengths": [], "fsdp": False}
setup, sample = kat_train.setup, kat_train.sample

def counted_setup(cfg):
    run = setup(cfg)
    model = run.accelerator.unwrap_model(run.student)
    seen["fsdp"] = type(model).__name__.startswith("FSDP")
    model.register_forward_hook(lambda *a: seen.__setitem__("forwards", seen["forwards"] + 1))
    return run

def recorded_sample(*a, **kw):
    rollout, state = sample(*a, **kw)
    seen["lengths"].append(int(rollout.completion_mask.sum(-1).max()))
    return rollout, state

kat_train.setup, kat_train.sample = counted_setup, recorded_sample
assert kat_train.main([f"--{k}={v}" for k, v in args.items()]) == 0
json.dump(seen, open(f"{out}/seen_{rank}.json", "w"))
"""

FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, args: dict, out, fsdp: bool):
    """DDP: torchrun; FSDP: `accelerate launch` with the shipped FSDP config (no GPU: gloo)."""
    out.mkdir(parents=True, exist_ok=True)
    if not fsdp:
        return torchrun(script, [json.dumps(args), str(out)])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG), "--num_processes",
           "2", "--mixed_precision", "no", "--main_process_port", str(free_port()), str(script), json.dumps(args),
           str(out)]
    # ACCELERATE_USE_CPU=1 (not --cpu, which would launch one process) makes each process a gloo CPU one
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    failed = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    assert proc.returncode == 0, "\n".join(failed[-40:]) or proc.stderr[-3000:]


def test_fsdp_trains_saves_and_resumes_like_ddp(tiny_world, tmp_path):
    """Two processes under FSDP2 (gloo) finish a run whose processes' rollouts end at different
    lengths, run the same student forwards, save a student that loads with from_pretrained, resume
    from a sharded checkpoint, and end where the same run under DDP ends."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    args = dict(teacher=tiny_world["teacher"], student=tiny_world["student"], train_data=tiny_world["train"],
                eval_data=tiny_world["test"], eval_limit=3, eval_k=2, steps=3, batch_size=2, samples_per_prompt=2,
                max_new_tokens=20, chunk=4, window=4, stride=2, patience=1, exempt=4, eta=0.5, min_buffer=2,
                warmup_steps=1, lr=3e-3, seed=3, save_every=1, keep_last=3, plot=False)
    runs = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        runs[name] = tmp_path / name
        launch(script, {**args, "output_dir": str(runs[name])}, runs[name], fsdp)
    seen = [json.loads((runs["fsdp"] / f"seen_{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["fsdp"] and seen[1]["fsdp"]
    assert seen[0]["lengths"] != seen[1]["lengths"], "the processes' rollouts must end at different lengths"
    assert seen[0]["forwards"] == seen[1]["forwards"] > 0  # sampling, learning and evaluation alike

    rows = {n: [json.loads(line) for line in open(runs[n] / "metrics.jsonl")] for n in runs}
    steps = {n: [r for r in rows[n] if "loss" in r] for n in runs}
    assert len(steps["fsdp"]) == len(steps["ddp"]) == 3
    for a, b in zip(steps["ddp"], steps["fsdp"]):
        assert a["tokens"] == b["tokens"] and a["cut_rate"] == b["cut_rate"], a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["kl"] == pytest.approx(b["kl"], rel=1e-5)
    evals = {n: [r for r in rows[n] if "eval" in r] for n in runs}
    assert [r["eval"] for r in evals["fsdp"]] == ["before", "after"]
    ddp, fsdp = load_file(runs["ddp"] / "student" / "model.safetensors"), load_file(
        runs["fsdp"] / "student" / "model.safetensors")
    assert sorted(ddp) == sorted(fsdp)
    assert all(torch.allclose(ddp[k], fsdp[k], atol=1e-5, rtol=0) for k in ddp)
    assert any(not torch.equal(ddp[k], load_file_initial(tiny_world, k)) for k in ddp)  # it trained
    for d in (runs["fsdp"] / "student", runs["fsdp"] / "checkpoint-000002" / "student"):
        model = AutoModelForCausalLM.from_pretrained(d)
        saved = load_file(d / "model.safetensors")
        assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved), d
    assert "## Final evaluation" in (runs["fsdp"] / "student" / "README.md").read_text()

    # resume the FSDP run from its sharded checkpoint after step 2
    again = tmp_path / "again"
    again.mkdir()
    os.rename(runs["fsdp"] / "checkpoint-000002", again / "checkpoint-000002")
    (again / "metrics.jsonl").write_text("".join(open(runs["fsdp"] / "metrics.jsonl").readlines()[:3]))
    launch(script, {**args, "output_dir": str(again), "resume": "latest"}, again, True)
    resumed = load_file(again / "student" / "model.safetensors")
    assert all(torch.allclose(resumed[k], fsdp[k], atol=1e-6, rtol=0) for k in fsdp)


def load_file_initial(tiny_world, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(os.path.join(tiny_world["student"], "model.safetensors"))[key]


# ---------------------------------------------------------------------------------------------
# Memory switches: gradient checkpointing, a LoRA student

def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def student_weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "student", "model.safetensors"))


@pytest.mark.parametrize("kind", ["full", "topk"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_world, one_thread, kind):
    """The OPD loss's gradient with activations recomputed equals the one with them stored."""
    from transformers import AutoModelForCausalLM

    from kat.data import encode_prompts
    from kat.learner import completion_logits, opd_loss
    from kat.models import prepare_student
    from kat.sampler import sample

    teacher = AutoModelForCausalLM.from_pretrained(tiny_world["teacher"]).eval()
    ids, mask = encode_prompts(tiny_world["tokenizer"], ["1+2", "37+48-19", "5-3+8"])
    rollout, _ = sample(AutoModelForCausalLM.from_pretrained(tiny_world["student"]).eval(), teacher, ids, mask,
                        max_new_tokens=16, eos_token_id=2, pad_token_id=0, chunk=4, topk=8 if kind == "topk" else 0,
                        generator=torch.Generator().manual_seed(0))
    grads = {}
    for checkpointing in (False, True):
        student = prepare_student(AutoModelForCausalLM.from_pretrained(tiny_world["student"]),
                                  gradient_checkpointing=checkpointing).train()
        assert student.is_activation_checkpointing == checkpointing
        with torch.no_grad():
            target = completion_logits(teacher, rollout) if kind == "full" else None
        loss, n = opd_loss(completion_logits(student, rollout), rollout, kind, target)
        (loss / n).backward()
        grads[checkpointing] = {k: p.grad.clone() for k, p in student.named_parameters()}
    assert grads[True].keys() == grads[False].keys()
    for k in grads[False]:
        assert torch.allclose(grads[True][k], grads[False][k], atol=1e-7, rtol=1e-6), k
    assert any(g.abs().sum() > 0 for g in grads[False].values())


def test_gradient_checkpointing_run_ends_on_the_same_student(tiny_world, tmp_path, one_thread):
    from kat.config import load_config
    from kat.train import train

    for on in (False, True):
        train(load_config([], **tiny_args(tiny_world, tmp_path / str(on), steps=2, gradient_checkpointing=on)))
    a, b = student_weights(tmp_path / "False"), student_weights(tmp_path / "True")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert [r["loss"] for r in metrics(tmp_path / "False")] == pytest.approx(
        [r["loss"] for r in metrics(tmp_path / "True")], rel=1e-6)


def mean_kl(student, teacher, rollout) -> float:
    """Mean reverse KL of `student` to `teacher` over a rollout's generated tokens."""
    from kat.learner import completion_logits
    from kat.scorer import reverse_kl

    with torch.no_grad():
        kl = reverse_kl(completion_logits(student, rollout), completion_logits(teacher, rollout))  # (B, T)
    mask = rollout.completion_mask
    return float((kl * mask).sum() / mask.sum())


def test_lora_student_starts_as_the_base_learns_and_saves_adapter_and_merged_copy(tiny_world, tmp_path, one_thread):
    """A LoRA run's first loss equals the full model's (the adapter starts as the identity), its
    loss falls, the adapter is saved beside the merged student, and `kat eval` evaluates both alike."""
    from transformers import AutoModelForCausalLM

    from kat.config import load_config
    from kat.data import encode_prompts
    from kat.evaluate import main as kat_eval
    from kat.models import load_model
    from kat.sampler import sample
    from kat.train import train

    pytest.importorskip("peft")
    args = dict(steps=10, lr=1e-2, termination="none")
    train(load_config([], **tiny_args(tiny_world, tmp_path / "full", **args)))
    train(load_config([], **tiny_args(tiny_world, tmp_path / "lora", lora_r=8, lora_alpha=16, **args)))
    full, lora = [r["loss"] for r in metrics(tmp_path / "full")], [r["loss"] for r in metrics(tmp_path / "lora")]
    assert lora[0] == pytest.approx(full[0], rel=1e-6)  # same student, same rollouts at step 1
    assert sum(lora[-3:]) / 3 < 0.8 * lora[0]
    assert lora[1:] != pytest.approx(full[1:], rel=1e-3)  # and it is not the full model that trained

    adapter, merged = tmp_path / "lora" / "adapter", tmp_path / "lora" / "student"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    saved = AutoModelForCausalLM.from_pretrained(merged).eval()
    from_adapter = load_model(str(adapter), "", torch.float32, "student").eval()  # base + adapter, merged
    for k, v in saved.state_dict().items():
        assert torch.allclose(v, from_adapter.state_dict()[k], atol=1e-6, rtol=0), k
    base = AutoModelForCausalLM.from_pretrained(tiny_world["student"]).eval()
    assert torch.equal(saved.model.embed_tokens.weight, base.model.embed_tokens.weight)  # frozen outside LoRA
    # the trained student is closer to the teacher than the base, on rollouts the base sampled
    teacher = AutoModelForCausalLM.from_pretrained(tiny_world["teacher"]).eval()
    ids, mask = encode_prompts(tiny_world["tokenizer"], ["1+2", "37+48-19", "5-3+8", "90-45+7"])
    rollout, _ = sample(base, teacher, ids, mask, max_new_tokens=20, eos_token_id=2, pad_token_id=0, chunk=4,
                        score=False, generator=torch.Generator().manual_seed(1))
    assert mean_kl(saved, teacher, rollout) < 0.8 * mean_kl(base, teacher, rollout)

    argv = ["--data", tiny_world["test"], "-k", "2", "--limit", "4", "--max-new-tokens", "20", "--seed", "1"]
    by_adapter, by_merged = kat_eval(["--model", str(adapter), *argv]), kat_eval(["--model", str(merged), *argv])
    assert by_adapter["test"]["problems"] == by_merged["test"]["problems"]


def test_lora_user_errors_are_one_line(tiny_world, tmp_path, capsys, monkeypatch):
    """No peft installed; LoRA under FSDP; target modules the student does not have."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    import kat.train as kat_train

    def run(**over) -> str:
        argv = [f"--{k}={v}" for k, v in tiny_args(tiny_world, tmp_path / "run", steps=2, lora_r=4, **over).items()]
        assert kat_train.main(argv) == 2
        err = capsys.readouterr().err  # may also hold progress bars of datasets and transformers
        errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert len(errors) == 1 and errors[0].startswith("error: "), err
        return errors[0]

    assert run(lora_target_modules="no_such_proj").startswith("error: lora_target_modules: ")

    class Sharded(Accelerator):
        @property
        def distributed_type(self):
            return DistributedType.FSDP

    with monkeypatch.context() as m:
        m.setattr(kat_train, "Accelerator", Sharded)
        assert run().startswith("error: lora_r: a LoRA student is not sharded here")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    assert run() == ("error: lora_r: a LoRA student needs peft; install it (pip install -e .[peft], or pip "
                     "install peft), or set lora_r: 0")
