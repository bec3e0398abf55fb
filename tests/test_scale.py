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

from conftest import ROOT

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

COUNT_FORWARDS = r"""
import json, sys
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from kat.detector import TrapDetector
from kat.sampler import sample

dist.init_process_group("gloo")
rank = dist.get_rank()
student_dir, teacher_dir, prompts_path, out = sys.argv[1:5]
student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
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
    from kat.detector import TrapDetector
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


def test_one_process_exchanges_nothing(monkeypatch):
    """Without torch.distributed `any_process` is the flag itself and no collective is called."""
    import torch.distributed as dist

    from kat.distributed import any_process, draw_range

    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("all_reduce called"))
    assert any_process(True) is True and any_process(False) is False
    assert draw_range(None, 3) == (0, 3) and draw_range((2, 6), 4) == (2, 6)
    with pytest.raises(ValueError, match="offset \\+ B <= total"):
        draw_range((3, 6), 4)
