"""Prompts and evaluation problems: local json/jsonl/parquet files or hub datasets, via `datasets`.

A problem is a dict ``{"prompt": str, "answer": str}``; the dataset's own column names are mapped
onto these two by ``prompt_field`` / ``answer_field``. Prompts are rendered with the tokenizer's chat
template and left-padded, which is what cached decoding needs.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset that cannot be used: missing file, missing column, no rows."""


def load_problems(source: str, *, split: str = "train", prompt_field: str = "prompt",
                  answer_field: str = "answer", limit: int = 0) -> list[dict]:
    """Read problems from a local file (json, jsonl, parquet) or a hub dataset name."""
    import datasets  # imported here: `datasets` is slow to import and not needed by the maths

    ext = os.path.splitext(source)[1].lower()
    if ext in _LOCAL_FORMATS:
        if not os.path.isfile(source):
            raise DataError(f"data file {source!r} does not exist; check the path (train_data / eval_data)")
        ds = datasets.load_dataset(_LOCAL_FORMATS[ext], data_files=source, split="train")
    elif os.path.isdir(source):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as err:  # noqa: BLE001 - the hub raises many types; all mean "not loadable"
            raise DataError(f"cannot load dataset {source!r} (split {split!r}): {err}. Give a local "
                            ".json/.jsonl/.parquet file or a reachable hub dataset name") from None
    for col, what in ((prompt_field, "prompt_field"), (answer_field, "answer_field")):
        if col not in ds.column_names:
            raise DataError(f"{source!r} has no column {col!r}; its columns are {ds.column_names}. "
                            f"Set {what} to the column that holds it")
    if len(ds) == 0:
        raise DataError(f"{source!r} holds no rows; give a dataset with at least one problem")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [{"prompt": _as_text(p), "answer": _as_text(a)} for p, a in zip(ds[prompt_field], ds[answer_field])]


def _as_text(value) -> str:
    """Datasets store prompts as a string or as a chat (list of {role, content}); keep the user text."""
    if isinstance(value, list):
        return "\n".join(m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user")
    return str(value)


def render_prompt(tokenizer, question: str, *, system_prompt: str = "", instruction: str = "") -> str:
    """The text the model sees: chat template + generation prompt."""
    content = f"{question}{instruction}" if instruction else question
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return content


def encode_prompts(tokenizer, texts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Tokenise rendered prompts, left-padded: (B, P) ids and (B, P) bool mask."""
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    return ids.to(device), mask.to(device)


def filter_long_prompts(tokenizer, problems: list[dict], max_prompt_length: int, *, render_kw: dict,
                        name: str = "dataset") -> list[dict]:
    """Drop problems whose rendered prompt exceeds the limit, with one warning that counts them."""
    kept = [p for p in problems
            if len(tokenizer(render_prompt(tokenizer, p["prompt"], **render_kw),
                             add_special_tokens=False)["input_ids"]) <= max_prompt_length]
    if len(kept) < len(problems):
        warnings.warn(f"{name}: skipped {len(problems) - len(kept)} of {len(problems)} prompts longer than "
                      f"max_prompt_length={max_prompt_length} tokens", stacklevel=2)
    if not kept:
        raise DataError(f"{name}: every prompt is longer than max_prompt_length={max_prompt_length}; "
                        "raise max_prompt_length")
    return kept
