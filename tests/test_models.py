"""Models: tokenizer compatibility errors, pad and stop tokens, logit-width alignment, layer
pruning, and a short training run on tiny Qwen3-architecture models with math-shaped data."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from kat.config import ConfigError, load_config
from kat.models import (align_vocab, check_tokenizers, end_of_turn_id, eos_ids, evenly_spaced, load_model,
                        load_tokenizer, prune_layers, resolve_path, vocab_width)

from fixtures.tiny_qwen import byte_tokenizer, save_pair, tiny_qwen3

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    return save_pair(tmp_path_factory.mktemp("qwen_pair"), student_pad=False)


# ---------------------------------------------------------------------------------------------
# Tokenizers

def test_same_vocabulary_passes_and_differences_are_named():
    check_tokenizers(byte_tokenizer(), byte_tokenizer(pad=False, eos="<|im_end|>"))  # specials may differ
    with pytest.raises(ConfigError, match=r"student has 260 tokens, teacher 259; 1 only in the student "
                                          r"\(e.g. <think>\).*one model family"):
        check_tokenizers(byte_tokenizer(extra_tokens=("<think>",)), byte_tokenizer())
    swapped = byte_tokenizer()
    swapped_core = json.loads(swapped.backend_tokenizer.to_str())
    vocab = swapped_core["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(swapped_core)))
    a, b = swapped.convert_tokens_to_ids(["a", "b"])
    with pytest.raises(ConfigError, match=f"2 with different ids \\(e.g. 'a': student {a} / teacher {b}, "
                                          f"'b': student {b} / teacher {a}\\)"):
        check_tokenizers(swapped, other)


def test_missing_pad_token_falls_back_to_eos(pair):
    tok = load_tokenizer(pair["student"])
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "left"
    assert load_tokenizer(pair["teacher"]).pad_token_id == tok.pad_token_id


def test_stop_ids_include_the_chat_end_of_turn(pair):
    tok = load_tokenizer(pair["student"])
    model = load_model(pair["student"], "", torch.float32, "student")
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert end_of_turn_id(tok) == im_end
    assert eos_ids(tok, model) == sorted({im_end, eot})
    plain = byte_tokenizer()
    plain.chat_template = None
    assert end_of_turn_id(plain) is None and eos_ids(plain, model) == [eot]


def test_paths_and_load_errors(pair, tmp_path):
    assert resolve_path("pkg:json") == os.path.dirname(json.__file__)
    assert resolve_path(pair["student"]) == pair["student"]
    with pytest.raises(ConfigError, match="no installed package 'no_such_pkg_kat'"):
        resolve_path("pkg:no_such_pkg_kat")
    with pytest.raises(ConfigError, match="teacher: 'nowhere' is neither a local directory nor a hub name"):
        load_model("nowhere", "", torch.float32, "teacher")
    (tmp_path / "m.Q4.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"student_gguf: 'x.gguf' is not in .*GGUF files there: \['m.Q4.gguf'\]"):
        load_tokenizer(str(tmp_path), "x.gguf", "student")


# ---------------------------------------------------------------------------------------------
# GGUF files (teacher_gguf / student_gguf): read through transformers' GGUF loader

@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory) -> dict:
    pytest.importorskip("gguf")
    from fixtures.tiny_gguf import save_gguf_pair

    return save_gguf_pair(tmp_path_factory.mktemp("gguf_pair"))


def test_a_gguf_model_loads_as_the_model_written_to_it_and_can_be_saved(gguf_pair, tmp_path):
    model = load_model(gguf_pair["student"], gguf_pair["gguf"], torch.float32, "student")
    source = gguf_pair["student_model"].state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    tok = load_tokenizer(gguf_pair["student"], gguf_pair["gguf"], "student")
    assert tok.get_vocab() == gguf_pair["tokenizer"].get_vocab() and tok.eos_token == "<|endoftext|>"
    # transformers marks a model read from GGUF as quantized unless told to de-quantise it, and
    # refuses to save a marked model: a student trained from a GGUF file could not be written
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "saved")
    again = load_model(str(tmp_path / "saved"), "", torch.float32, "student").state_dict()
    assert all(torch.equal(again[k], source[k]) for k in source)


def test_kat_export_writes_a_gguf_model_as_safetensors(gguf_pair, tmp_path):
    from kat.export import export_model

    export_model(gguf_pair["student"], gguf_pair["gguf"], str(tmp_path / "student"))
    assert (tmp_path / "student" / "model.safetensors").is_file()
    exported = load_model(str(tmp_path / "student"), "", torch.float32, "student").state_dict()
    source = gguf_pair["student_model"].state_dict()
    assert all(torch.equal(exported[k], source[k]) for k in source)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_train_a_student_read_from_gguf_writes_the_trained_student(gguf_pair, tmp_path, lora_r):
    """The end of `kat train` saves the student (merged with its adapter under LoRA) in Hugging Face
    format; with a GGUF student this is where a run on the Qwen2.5-Coder pair failed."""
    if lora_r:
        pytest.importorskip("peft")
    from kat.train import train

    out = tmp_path / "run"
    cfg = load_config([], teacher=gguf_pair["teacher"], teacher_gguf=gguf_pair["gguf"],
                      student=gguf_pair["student"], student_gguf=gguf_pair["gguf"],
                      train_data=f"{FIXTURES / 'math500.jsonl'}[prompt=problem]", eval_data="",
                      max_prompt_length=200, steps=2, batch_size=2, samples_per_prompt=2, max_new_tokens=8,
                      chunk=4, window=4, stride=4, patience=1, exempt=0, min_buffer=2, warmup_steps=1, lr=1e-2,
                      lora_r=lora_r, output_dir=str(out), plot=False, n_traces=0, seed=1)
    train(cfg)
    assert (out / "checkpoint-000002").is_dir()
    assert (out / "adapter" / "adapter_config.json").is_file() == bool(lora_r)
    trained = load_model(str(out / "student"), "", torch.float32, "student").state_dict()
    source = gguf_pair["student_model"].state_dict()
    assert trained.keys() == source.keys()
    assert any(not torch.equal(trained[k], source[k]) for k in source)
    assert load_tokenizer(str(out / "student")).get_vocab() == gguf_pair["tokenizer"].get_vocab()


# ---------------------------------------------------------------------------------------------
# Logit widths: one tokenizer, embedding matrices padded to different sizes

def test_align_vocab_trims_the_wider_teacher_to_the_same_logits():
    tok = byte_tokenizer()
    n = len(tok)
    teacher, student = tiny_qwen3(n + 13, seed=1, layers=2, tie=False), tiny_qwen3(n + 5, seed=2)
    ids = torch.randint(0, n, (2, 9), generator=torch.Generator().manual_seed(0))
    before = teacher(input_ids=ids).logits  # (2, 9, n + 13)
    assert align_vocab(student, teacher, tok) == n + 5
    after = teacher(input_ids=ids).logits  # (2, 9, n + 5)
    assert vocab_width(teacher) == vocab_width(student) == teacher.config.vocab_size == n + 5
    torch.testing.assert_close(after, before[..., : n + 5], rtol=0, atol=0)  # the shared columns, unchanged


def test_align_vocab_trims_a_wider_student_with_a_warning():
    tok = byte_tokenizer()
    n = len(tok)
    teacher, student = tiny_qwen3(n, seed=1, tie=False), tiny_qwen3(n + 7, seed=2, tie=True)
    emb = student.get_input_embeddings().weight[:n].clone()
    with pytest.warns(UserWarning, match=f"output layer trimmed from {n + 7} to the teacher's {n} rows"):
        assert align_vocab(student, teacher, tok) == n
    assert torch.equal(student.get_input_embeddings().weight, emb)
    assert student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    assert student.config.vocab_size == n


def test_align_vocab_rejects_a_model_narrower_than_the_tokenizer():
    tok = byte_tokenizer()
    with pytest.raises(ConfigError, match=f"teacher: its output layer has 200 rows but the tokenizer has {len(tok)}"):
        align_vocab(tiny_qwen3(len(tok), seed=1), tiny_qwen3(200, seed=2), tok)


# ---------------------------------------------------------------------------------------------
# Layer pruning

def test_evenly_spaced():
    assert evenly_spaced(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3] and evenly_spaced(5, 2) == [0, 4] and evenly_spaced(5, 1) == [4]
    with pytest.raises(ValueError, match="n_keep"):
        evenly_spaced(3, 4)


def test_prune_layers_equals_dropping_the_layers(tmp_path):
    model = tiny_qwen3(259, seed=3, layers=4, tie=False)
    pruned = prune_layers(model, [0, 2, 3])
    ids = torch.randint(0, 259, (2, 7), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in (0, 2, 3)])
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits
        got = pruned(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert pruned.config.num_hidden_layers == 3 and model.config.num_hidden_layers == 4
    # layer indices are renumbered, so cached decoding matches a full forward
    out = pruned.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        full = pruned(input_ids=out[:, :-1], use_cache=False).logits[:, -5:]
    assert torch.equal(full.argmax(-1), out[:, -5:])
    pruned.save_pretrained(tmp_path / "p")
    again = load_model(str(tmp_path / "p"), "", torch.float32, "student")
    torch.testing.assert_close(again(input_ids=ids).logits, got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="distinct layer indices"):
        prune_layers(model, [0, 0])


def test_kat_models_prune_command_writes_the_pruned_model(pair, tmp_path, capsys):
    """`python -m kat models prune` (the same as `python -m kat.models prune`) equals prune_layers."""
    from kat.__main__ import main as kat_main

    out = tmp_path / "pruned"
    assert kat_main(["models", "prune", "--model", pair["teacher"], "--layers", "2", "--out", str(out)]) == 0
    assert f"kept layers [0, 2] of 3; wrote {out}" in capsys.readouterr().out
    written = load_model(str(out), "", torch.float32, "student")
    want = prune_layers(load_model(pair["teacher"], "", torch.float32, "teacher"), [0, 2])
    ids = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(written(input_ids=ids).logits, want(input_ids=ids).logits, rtol=0, atol=0)
    assert load_tokenizer(str(out)).get_vocab() == load_tokenizer(pair["teacher"]).get_vocab()
    # a bad model path or layer count: one line, status 2
    for argv, message in ((["--model", str(tmp_path / "none"), "--layers", "1"], "model: cannot load a model from"),
                          (["--model", pair["teacher"], "--layers", "4"], "n_keep must be in [1, 3], got 4")):
        assert kat_main(["models", "prune", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err  # may also hold transformers' progress bars
        errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], err


def test_prune_never_writes_over_a_model_or_claims_a_write_it_did_not_make(pair, tmp_path, capsys):
    import shutil

    from kat.__main__ import main as kat_main

    source = tmp_path / "teacher"
    shutil.copytree(pair["teacher"], source)
    weights = (source / "model.safetensors").read_bytes()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    for out, message in ((source, "is, or lies inside or around, the --model folder"),
                         (source / "sub", "is, or lies inside or around, the --model folder"),
                         (tmp_path, "is, or lies inside or around, the --model folder"),
                         (tmp_path / "afile", "is a file"),
                         (tmp_path / "taken", "already holds a model (config.json)")):
        assert kat_main(["models", "prune", "--model", str(source), "--layers", "2", "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "wrote" not in captured.out, (out, captured.err)
    assert (source / "model.safetensors").read_bytes() == weights and not (source / "sub").exists()
    assert (tmp_path / "taken" / "config.json").read_text() == "{}"
    # allowed when asked for: the folder then holds the pruned model
    assert kat_main(["models", "prune", "--model", str(source), "--layers", "2", "--out", str(tmp_path / "taken"),
                     "--overwrite"]) == 0
    assert json.loads((tmp_path / "taken" / "config.json").read_text())["num_hidden_layers"] == 2


# ---------------------------------------------------------------------------------------------
# The training loop on tiny Qwen3 models and DAPO/MATH500-shaped files

def test_train_two_steps_on_tiny_qwen3_with_math_grader(pair, tmp_path):
    from kat.train import train

    out = tmp_path / "run"
    cfg = load_config([], teacher=pair["teacher"], student=pair["student"],
                      train_data=f"{FIXTURES / 'dapo_math_17k.jsonl'}[answer=reward_model.ground_truth, unwrap=dapo]",
                      eval_data=f"{FIXTURES / 'math500.jsonl'}[prompt=problem]", eval_limit=2, eval_k=2,
                      instruction="\nPut the final answer in \\boxed{}.", max_prompt_length=100, grader="math",
                      steps=2, batch_size=2, samples_per_prompt=2, max_new_tokens=12, chunk=4, window=4, stride=4,
                      patience=1, exempt=0, min_buffer=2, warmup_steps=1, loss="topk", topk=8, lr=1e-2,
                      output_dir=str(out), plot=False, n_traces=2, seed=1)
    with pytest.warns(UserWarning) as caught:
        results = train(cfg)
    messages = [str(w.message) for w in caught]
    assert any("dropped 3 duplicate rows" in m for m in messages)
    # 2 of the 5 DAPO prompts are longer than 100 tokens once rendered with the instruction
    assert any("train_data: skipped 2 of 5 prompts longer than max_prompt_length=100" in m for m in messages)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["kl"] > 0 and 0 < r["mean_length"] <= 12 and r["tokens"] == pytest.approx(4 * r["mean_length"])
    for when in ("before", "after"):
        assert 0 <= results[when]["math500/avg@k"] <= results[when]["math500/pass@k"] <= 1
    saved = load_tokenizer(str(out / "student"))
    assert saved.pad_token == "<|endoftext|>"
    before = load_model(pair["student"], "", torch.float32, "student").state_dict()
    after = load_model(str(out / "student"), "", torch.float32, "student").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
