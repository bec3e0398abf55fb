"""benchmarks/gpu_scale.py --tiny: the GPU scale check's own code, on CPU with tiny models of the same family."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import ROOT, load_by_path


@pytest.fixture(scope="module")
def gpu_scale():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its own `import common`
    return load_by_path("gpu_scale", ROOT / "benchmarks" / "gpu_scale.py")


def test_architectures_are_the_papers_models(gpu_scale):
    """The shipped configs build Qwen3 models of the published sizes (meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    sizes = {}
    for name in ("qwen3_1.7b", "qwen3_4b", "qwen3_8b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(gpu_scale.model_config(name, tiny=False))
        sizes[name] = sum(p.numel() for p in model.parameters())
        assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.vocab_size == 151936
    assert round(sizes["qwen3_1.7b"] / 1e9, 2) == 1.72
    assert round(sizes["qwen3_4b"] / 1e9, 2) == 4.02
    assert round(sizes["qwen3_8b"] / 1e9, 2) == 8.19


def test_random_cuts_stand_in(gpu_scale):
    """The stand-in fires each planned row once, at its planned position, within [exempt, budget)."""
    cuts = gpu_scale.RandomCuts(rate=0.5, exempt=4, max_new_tokens=40, seed=0, window=8)
    state = cuts.start(64)
    planned = state._planned.clone()
    fired_total = torch.zeros(64, dtype=torch.bool)
    for pos in range(0, 40, 8):
        fired, cut = cuts.observe(state, torch.rand(64, 8), torch.ones(64, 8, dtype=torch.bool))
        assert not (fired & fired_total).any()  # never twice
        assert (planned[fired] < pos + 8).all() and (planned[fired] >= pos).all()
        fired_total |= fired
    assert torch.equal(fired_total, planned < 40)
    assert torch.equal(state.cut[fired_total], planned[fired_total])
    assert (planned[fired_total] >= 4).all() and 16 <= int(fired_total.sum()) <= 48


def test_tiny_run_measures_every_section(gpu_scale, tmp_path):
    out = tmp_path / "scale"
    sections = "decode,teacher,phases,profile,learner,step"
    assert gpu_scale.main(["--tiny", "--threads", "1", "--sections", sections, "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    shape = gpu_scale.Shape(rows=4, decode_tokens=24, new_tokens=48)
    # decode: every decoder produced rows x tokens (EOS disabled on random weights)
    assert {v["tokens"] for v in res["decode"].values()} == {shape.rows * shape.decode_tokens}
    # teacher: lockstep at every chunk draws the same tokens as post-hoc, and scores them alike
    teacher = res["teacher"]
    assert set(teacher) == {"post-hoc (baseline)", "lockstep, chunk 1", "lockstep, chunk 8"}
    assert all(m["same_tokens"] and m["kl_diff"] < 1e-4 for m in teacher.values())
    assert teacher["lockstep, chunk 1"]["calls"] == shape.decode_tokens + 1  # prefill + one per token
    assert teacher["lockstep, chunk 8"]["calls"] == shape.decode_tokens // 8 + 1
    assert teacher["post-hoc (baseline)"]["calls"] == 1
    assert 0 < res["profile"]["outside_share"] < 1
    # phases: both models' forwards are booked in both modes, each mode's own scoring path in its own,
    # and the exclusive times leave a non-negative remainder that is a small part of the wall
    phases = res["phases"]
    assert set(phases) == {"post-hoc", "lockstep, chunk 8"}
    for name, o in phases.items():
        booked = o["phases"]
        assert booked["student forward"] > 0 and booked["teacher forward"] > 0
        assert ("teacher chunk: bookkeeping" in booked) == name.startswith("lockstep")
        assert ("post-hoc scoring: bookkeeping" in booked) == (name == "post-hoc")
        assert 0 <= booked["outside the timed calls"] < 0.5 * o["wall"]
    # learner: both losses, with and without checkpointing, finite, on every token
    assert set(res["learner"]) == {f"{k}/ckpt={c}" for k in ("topk", "full") for c in (False, True)}
    assert all(m["finite"] and m["tokens"] == shape.rows * shape.new_tokens for m in res["learner"].values())
    # step: plain OPD generates and trains every token; the KAT stand-in cuts, so it generates fewer
    opd, kat = (res["step"][k] for k in res["step"] if k != "max_new_tokens")
    assert res["step"]["max_new_tokens"] == shape.new_tokens
    assert opd["generated"] == opd["trained"] == shape.rows * shape.new_tokens and opd["cut_rate"] == 0
    assert kat["cut_rate"] > 0 and kat["trained"] < kat["generated"] < opd["generated"]
    text = out.with_suffix(".md").read_text()
    assert text.count("\n## ") == 6 and "gpu_scale finished" in text


def test_tiny_run_measures_the_slot_engine(gpu_scale, tmp_path):
    """The engine sections on CPU: every decoder decodes, the floor is positive, and through fewer
    slots than rows OPD and the KAT stand-in generate what they do with every row in a slot, the
    stand-in taking fewer decode forwards through the small S."""
    out = tmp_path / "engine"
    assert gpu_scale.main(["--tiny", "--threads", "1", "--sections", "engine,engine_step", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    engine = res["engine"]
    assert engine["floor_ms"] > 0 and engine["bandwidth_GBps"] > 0
    decoders = {k: v for k, v in engine.items() if isinstance(v, dict)}
    assert set(decoders) == {"kat.sampler.sample, DynamicCache (baseline)", "slot engine, eager"}  # CPU
    assert all(v["ms_per_step"] > 0 and v["steps"] >= 23 for v in decoders.values())
    step = res["engine_step"]
    assert step["rows"] == 16 and step["max_new_tokens"] == 48
    for S in (4, 16):
        opd, kat = step[f"OPD, S={S}"], step[f"KAT stand-in, S={S}"]
        assert opd["generated"] == 16 * 48 and kat["generated"] < opd["generated"]
    assert step["KAT stand-in, S=4"]["generated"] == step["KAT stand-in, S=16"]["generated"]
    assert step["KAT stand-in, S=4"]["decode_steps"] < step["OPD, S=4"]["decode_steps"]
    assert step["OPD, S=4"]["decode_steps"] == 4 * step["OPD, S=16"]["decode_steps"]
