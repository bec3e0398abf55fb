"""Loading the teacher and the student: models, tokenizers, and the checks that they fit together."""

from __future__ import annotations

import os

import torch

from kat.config import ConfigError


def load_model(path: str, gguf_file: str, dtype: torch.dtype, role: str):
    from transformers import AutoModelForCausalLM

    if not (os.path.isdir(path) or "/" in path):
        raise ConfigError(f"{role}: {path!r} is neither a local directory nor a hub name (owner/model); "
                          f"point {role} at a saved model")
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except OSError as err:
        raise ConfigError(f"{role}: cannot load a model from {path!r}: {err}") from None


def load_tokenizer(path: str, gguf_file: str = ""):
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token_id is None:  # many base models ship without one; EOS is masked out anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_tokenizers(student_tok, teacher_tok) -> None:
    """OPD compares distributions token by token: both models must use one vocabulary."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = [k for k in sorted(set(sv) & set(tv)) if sv[k] != tv[k]][:5]
        raise ConfigError(
            f"teacher and student tokenizers differ (student {len(sv)} tokens, teacher {len(tv)}): "
            f"only in student {only_s}, only in teacher {only_t}, different ids {moved}. "
            "Use a teacher and student from one model family (same tokenizer)")


def eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)
