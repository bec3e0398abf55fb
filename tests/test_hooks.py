"""The training loop's hooks (kat.hooks): where they are called, what they see, and that a run with
hooks trains exactly as one without."""

from __future__ import annotations

import torch

from kat.config import load_config
from kat.plot import read_jsonl
from kat.train import train

from conftest import tiny_args


def _metrics(path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in read_jsonl(path) if "loss" in r]


def test_hooks_see_each_step_after_sampling_and_after_learning(tiny_world, tmp_path):
    seen = []

    def record(ctx):
        params = torch.cat([p.detach().reshape(-1) for p in ctx.run.accelerator.unwrap_model(ctx.run.student)
                            .parameters()]).clone()
        seen.append((ctx.stage, ctx.step, ctx.threshold, ctx.active, int(ctx.rollout.completion_mask.sum()),
                     ctx.row, ctx.stats, params))

    train(load_config([], **tiny_args(tiny_world, tmp_path / "hooked", steps=3)), hooks=[record])
    train(load_config([], **tiny_args(tiny_world, tmp_path / "plain", steps=3)))
    rows = _metrics(tmp_path / "hooked" / "metrics.jsonl")
    assert rows == _metrics(tmp_path / "plain" / "metrics.jsonl")  # the hook changed nothing
    assert [(s[0], s[1]) for s in seen] == [(stage, step) for step in range(3) for stage in ("sampled", "learned")]
    for step in range(3):
        sampled, learned = seen[2 * step], seen[2 * step + 1]
        assert sampled[5] is None and sampled[6] is None  # no stats or row before the optimiser step
        assert learned[5]["step"] == step + 1 and learned[5]["loss"] == rows[step]["loss"]
        assert learned[6]["grad_norm"] == rows[step]["grad_norm"]
        assert sampled[2] == rows[step]["threshold"] and sampled[3] == rows[step]["active"]
        assert sampled[4] == learned[4] == rows[step]["tokens"]
        assert not torch.equal(sampled[7], learned[7])  # the optimiser step lies between the two calls
        if step:  # "sampled" sees the parameters the step starts from: the previous step's result
            assert torch.equal(sampled[7], seen[2 * step - 1][7])
