"""Shared fixtures: a tiny teacher/student pair with the toy tokenizer, saved like real checkpoints."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Triton decorates its own library functions when it is first imported, by whichever module
# imports it first; on a machine without CUDA they must be built for the interpreter, or the
# fused-kernel tests (tests/test_kernels.py) fail depending on test order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(vocab: int, seed: int, layers: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """Random tiny teacher and student (toy tokenizer) saved to disk, plus toy prompt files."""
    from kat.toy.tokenizer import build_tokenizer
    from kat.toy.world import make_split, write_jsonl

    root = tmp_path_factory.mktemp("tiny_world")
    tok = build_tokenizer()
    for name, seed, layers, hidden in (("teacher", 1, 2, 32), ("student", 2, 1, 32)):
        model = tiny_llama(len(tok), seed, layers, hidden)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    train, test = make_split(64, seed=0), make_split(16, seed=1)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(test, root / "test.jsonl")
    return {"root": root, "teacher": str(root / "teacher"), "student": str(root / "student"),
            "train": str(root / "train.jsonl"), "test": str(root / "test.jsonl"), "tokenizer": tok}


def tiny_args(world: dict, out, **over) -> dict:
    """`kat.train` config fields for a short run on the tiny world (4 steps), writing to `out`."""
    args = dict(teacher=world["teacher"], student=world["student"], train_data=world["train"], eval_data="",
                steps=4, batch_size=2, samples_per_prompt=2, max_new_tokens=20, chunk=4, window=4, stride=2,
                patience=1, exempt=4, eta=0.5, min_buffer=4, warmup_steps=1, lr=3e-3, seed=3,
                output_dir=str(out), plot=False)
    args.update(over)
    return args


def tiny_models(world: dict, questions: tuple[str, ...], repeat: int):
    """The tiny world's student and teacher, loaded, and its chat-rendered prompts (the questions
    `repeat` times), left-padded: (student, teacher, input_ids (B, P), attention mask (B, P) bool)."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(world["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(world["teacher"]).eval()
    tok = world["tokenizer"]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions] * repeat
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return student, teacher, enc["input_ids"], enc["attention_mask"].bool()


def load_by_path(name: str, path: Path):
    """The script at `path` imported as module `name` (registered first: dataclasses resolve
    annotations through sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def single_file():
    """kat.py loaded by path (`import kat` finds the package, not the file)."""
    return load_by_path("kat_single_file", ROOT / "kat.py")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("ACCELERATE_USE_CPU", "1")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from more threads, and several threads on a busy CPU spin at every
    barrier (measured here: 30x slower generation on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
