"""Prompts and evaluation problems: local json/jsonl/parquet files or hub datasets, via `datasets`.

A problem is a dict ``{"prompt": str, "answer": str}``. A dataset's own columns are mapped onto these
two by a field mapping; a dotted name reaches into a struct column (DAPO-Math-17k keeps its answer
in ``reward_model.ground_truth``). Prompts stored as a chat (a list of ``{role, content}``) keep
their user text; answers stored as numbers or lists become strings. Identical rows are dropped
(the hub copy of DAPO-Math-17k repeats each of its ~17.9k problems about 100 times).

A config names a dataset with a small spec, so that one string can hold several evaluation sets,
each with its own columns, split and k (YAML's folded ``>-`` keeps it readable):

    eval_data: >-
      amc=AI-MO/aimo-validation-amc[split=train],
      math500=HuggingFaceH4/MATH-500[split=test],
      minerva=math-ai/minervamath[split=test, prompt=question],
      aime24=HuggingFaceH4/aime_2024[split=train, k=32]

Each comma-separated entry is ``[name=]source[key=value, ...]``. The source is a local
.json/.jsonl/.parquet file, a directory, or a hub dataset name; the name (default: the source's
base name) labels the metrics. Keys, each defaulting to the matching config field:
``split``, ``subset`` (hub config name), ``prompt`` and ``answer`` (columns), ``k`` (samples per
problem), ``limit`` (first N problems; 0 = all), ``unwrap`` (remove a dataset's own answer-format
instruction, see ``ANSWER_FORMATS``, so that the config's ``instruction`` is the only one).

`kat train` (train_data, eval_data) and `kat eval --data` read data only through `load_problems` /
`load_eval_sets` here, so both accept the same sources and specs. Prompts are rendered with the
tokenizer's chat template and left-padded, which cached decoding needs.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# Answer-format instructions some datasets bake into every prompt: (text before the problem, text after).
ANSWER_FORMATS = {
    "dapo": ("Solve the following math problem step by step. The last line of your response should be of "
             "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.",
             'Remember to put your answer on its own line after "Answer:".'),
}

SPEC_KEYS = ("split", "subset", "prompt", "answer", "k", "limit", "unwrap")


class DataError(ValueError):
    """A dataset that cannot be used: missing file, missing column, no rows, a malformed spec."""


# ---------------------------------------------------------------------------------------------
# Dataset specs: "[name=]source[key=value, ...]"

@dataclass(frozen=True)
class DataSpec:
    """One dataset as a config names it: where it lives and how its columns map onto a problem."""

    name: str
    source: str
    split: str = "train"
    subset: str = ""
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    k: int = 1
    limit: int = 0
    unwrap: str = ""


@dataclass
class EvalSet:
    """An evaluation set ready to run: its spec (name, k, ...) and its problems."""

    spec: DataSpec
    problems: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def k(self) -> int:
        return self.spec.k


def _split_top_level(text: str) -> list[str]:
    """Split on commas and newlines that are not inside [...]."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DataError(f"dataset spec {text!r} has a ']' without its '['")
        if ch in ",\n" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise DataError(f"dataset spec {text!r} has a '[' that is never closed")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def default_name(source: str) -> str:
    """Metric label of a source without an explicit name: its base name without extension."""
    base = os.path.basename(source.rstrip("/\\"))
    return os.path.splitext(base)[0] if os.path.splitext(base)[1].lower() in _LOCAL_FORMATS else base


def parse_data_spec(entry: str, *, split: str = "train", prompt_field: str = "prompt",
                    answer_field: str = "answer", k: int = 1, limit: int = 0, unwrap: str = "") -> DataSpec:
    """Parse one ``[name=]source[key=value, ...]`` entry; keyword arguments are the defaults."""
    head, bracket, rest = entry.strip().partition("[")
    options: dict[str, str] = {}
    if bracket:
        if not rest.rstrip().endswith("]") or "[" in rest or rest.count("]") != 1:
            raise DataError(f"dataset spec {entry!r}: options go in one [...] at the end, "
                            "e.g. 'math500=HuggingFaceH4/MATH-500[split=test, k=8]'")
        for item in filter(None, (s.strip() for s in rest.rstrip()[:-1].split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or not value:
                raise DataError(f"dataset spec {entry!r}: option {item!r} must look like key=value")
            if key not in SPEC_KEYS:
                close = difflib.get_close_matches(key, SPEC_KEYS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise DataError(f"dataset spec {entry!r}: unknown option {key!r}{hint} "
                                f"(options: {', '.join(SPEC_KEYS)})")
            options[key] = value
    name, eq, source = head.partition("=")
    name = name.strip()
    if not eq or any(c in name for c in "/\\ "):  # no label: a path may hold '=' itself
        name, source = "", head
    name, source = name.strip(), source.strip()
    if not source:
        raise DataError(f"dataset spec {entry!r} names no source; give a file, directory or hub dataset")
    numbers = {}
    for key, default, low in (("k", k, 1), ("limit", limit, 0)):
        try:
            numbers[key] = int(options.get(key, default))
        except ValueError:
            raise DataError(f"dataset spec {entry!r}: {key} must be an integer, got {options[key]!r}") from None
        if numbers[key] < low:
            raise DataError(f"dataset spec {entry!r}: {key} must be >= {low}, got {numbers[key]}")
    spec = DataSpec(name=name or default_name(source), source=source, split=options.get("split", split),
                    subset=options.get("subset", ""), prompt_field=options.get("prompt", prompt_field),
                    answer_field=options.get("answer", answer_field), k=numbers["k"], limit=numbers["limit"],
                    unwrap=options.get("unwrap", unwrap))
    if spec.unwrap and spec.unwrap not in ANSWER_FORMATS:
        raise DataError(f"dataset spec {entry!r}: unwrap={spec.unwrap!r} is not a known answer format; "
                        f"known: {', '.join(ANSWER_FORMATS)}")
    return spec


def parse_data_specs(text: str, **defaults: Any) -> list[DataSpec]:
    """Parse a comma-separated list of dataset specs (see the module docstring); names must differ."""
    specs = [parse_data_spec(entry, **defaults) for entry in _split_top_level(text)]
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"two evaluation sets are called {twice}; label them, e.g. 'aime24=<source>'")
    return specs


# ---------------------------------------------------------------------------------------------
# Reading rows

def _open(spec: DataSpec):
    """The `datasets.Dataset` a spec points at."""
    import datasets  # imported here: `datasets` is slow to import and not needed by the maths

    source = spec.source
    ext = os.path.splitext(source)[1].lower()
    if ext in _LOCAL_FORMATS:
        if not os.path.isfile(source):
            raise DataError(f"data file {source!r} does not exist; check the path (train_data / eval_data)")
        if os.path.getsize(source) == 0 or (ext != ".parquet" and _blank(source)):
            raise DataError(f"{source!r} holds no rows; give a file with at least one problem")
        level = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse error would be a second report
        try:
            return datasets.load_dataset(_LOCAL_FORMATS[ext], data_files=source, split="train")
        except datasets.exceptions.DatasetGenerationError as err:  # the cause says little; find the line
            raise DataError(_unreadable(source, ext, err)) from None
        finally:
            datasets.logging.set_verbosity(level)
    if os.path.isdir(source) and any(os.path.isfile(os.path.join(source, f))
                                     for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(source)  # written by Dataset.save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise DataError(f"{source!r} has no split {spec.split!r}; its splits are {list(ds)}")
            ds = ds[spec.split]
        return ds
    try:  # a hub name, or a directory of data files (e.g. a cloned hub dataset)
        return datasets.load_dataset(source, spec.subset or None, split=spec.split)
    except Exception as err:  # noqa: BLE001 - the hub raises many types; all mean "not loadable"
        raise DataError(f"cannot load dataset {source!r} (subset {spec.subset or None!r}, split {spec.split!r}): "
                        f"{err}. Give a local .json/.jsonl/.parquet file or a reachable hub dataset name") from None


def _lookup(row_value: Any, path: list[str], spec: DataSpec, what: str) -> Any:
    """Follow a dotted field path below its top-level column."""
    value = row_value
    for i, key in enumerate(path):
        if not isinstance(value, dict) or key not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise DataError(f"{spec.source!r}: {'.'.join([what, *path[:i]])} has no key {key!r} (it holds {have}); "
                            "fix the field path")
        value = value[key]
    return value


def prompt_text(value: Any) -> str | None:
    """A prompt as text: strings as they are, a chat (list of {role, content}) as its user turns.
    Anything else (a number, a mapping) is not a prompt: TypeError, which `load_spec` reports."""
    if value is None:
        return None
    if isinstance(value, list):
        turns = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        if not all(isinstance(t, str) for t in turns):
            raise TypeError("a chat whose user content is not text")
        return "\n".join(turns) if turns else None
    if not isinstance(value, str):
        raise TypeError(f"{type(value).__name__} {str(value)[:60]}")
    return value


def answer_text(value: Any) -> str | None:
    """A reference answer as a string: 142.0 -> "142", ["3"] -> "3", [1, 2] -> "1, 2", None -> None."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value)
    if isinstance(value, float):
        if value != value:  # NaN: a missing number in a numeric column
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        parts = [answer_text(v) for v in value]
        parts = [p for p in parts if p]
        return ", ".join(parts) if parts else None
    text = str(value).strip()
    return text or None


def unwrap_prompt(text: str, fmt: str) -> tuple[str, bool]:
    """Remove a known answer-format instruction around the problem; (text, whether it was there)."""
    before, after = ANSWER_FORMATS[fmt]
    stripped = text.strip()
    found = stripped.startswith(before) or stripped.endswith(after)
    if stripped.startswith(before):
        stripped = stripped[len(before):]
    if stripped.endswith(after):
        stripped = stripped[: -len(after)]
    return stripped.strip(), found


def load_spec(spec: DataSpec, *, dedupe: bool = True) -> list[dict]:
    """Read a spec's problems: field mapping, text normalisation, unwrapping, de-duplication.

    Rows without a usable prompt or answer are skipped with one warning that counts them.
    """
    ds = _open(spec)
    columns = {}
    for path, what in ((spec.prompt_field, "prompt"), (spec.answer_field, "answer")):
        root, *below = path.split(".")
        if root not in ds.column_names:
            raise DataError(f"{spec.source!r} has no column {root!r}; its columns are {ds.column_names}. "
                            f"Set the {what} field (`{what}=` in the spec, or {what}_field) to the column that "
                            "holds it; a dotted name reaches into a struct, e.g. reward_model.ground_truth")
        columns[what] = (root, below)
    if len(ds) == 0:
        raise DataError(f"{spec.source!r} holds no rows; give a dataset with at least one problem")

    problems, seen = [], set()
    missing = duplicates = unwrapped = row = 0
    roots = sorted({root for root, _ in columns.values()})
    for batch in ds.select_columns(roots).iter(batch_size=4096):
        (p_root, p_path), (a_root, a_path) = columns["prompt"], columns["answer"]
        for p, a in zip(batch[p_root], batch[a_root]):
            try:
                prompt = prompt_text(_lookup(p, p_path, spec, p_root))
            except TypeError as err:
                raise DataError(f"{spec.source!r}, row {row + 1}: the prompt field {spec.prompt_field!r} holds "
                                f"{err}, not text; point the prompt field at a text column (a dotted name reaches "
                                "into a mapping, e.g. prompt=question.text)") from None
            row += 1
            answer = answer_text(_lookup(a, a_path, spec, a_root))
            if not prompt or answer is None:
                missing += 1
                continue
            if spec.unwrap:
                prompt, found = unwrap_prompt(prompt, spec.unwrap)
                unwrapped += found
            if dedupe:
                key = (prompt, answer)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
            problems.append({"prompt": prompt, "answer": answer})
            if spec.limit and len(problems) >= spec.limit:
                break
        if spec.limit and len(problems) >= spec.limit:
            break

    if missing:
        warnings.warn(f"{spec.name}: skipped {missing} rows without a prompt or an answer", stacklevel=2)
    if duplicates:
        warnings.warn(f"{spec.name}: dropped {duplicates} duplicate rows (same prompt and answer); "
                      f"{len(problems)} problems remain", stacklevel=2)
    if spec.unwrap and not unwrapped:
        warnings.warn(f"{spec.name}: unwrap={spec.unwrap} matched no prompt; the prompts are used as they are",
                      stacklevel=2)
    if not problems:
        raise DataError(f"{spec.source!r}: no row has both a prompt ({spec.prompt_field}) and an answer "
                        f"({spec.answer_field}); check the field mapping")
    return problems


def load_problems(source: str, *, split: str = "train", prompt_field: str = "prompt",
                  answer_field: str = "answer", limit: int = 0) -> list[dict]:
    """Problems of one dataset: a file, directory or hub name, optionally with a ``[key=value]`` spec.

    The keyword arguments are defaults that the spec's options override, e.g.
    ``load_problems("BytedTsinghua-SIA/DAPO-Math-17k[answer=reward_model.ground_truth, unwrap=dapo]")``.
    """
    spec = parse_data_spec(source, split=split, prompt_field=prompt_field, answer_field=answer_field)
    if limit and not spec.limit:
        spec = replace(spec, limit=limit)
    return load_spec(spec)


def load_eval_sets(text: str, *, split: str = "test", prompt_field: str = "prompt",
                   answer_field: str = "answer", k: int = 1, limit: int = 0) -> dict[str, EvalSet]:
    """Every evaluation set named in ``text`` (comma-separated specs), by name, each with its own k."""
    specs = parse_data_specs(text, split=split, prompt_field=prompt_field, answer_field=answer_field,
                             k=k, limit=limit)
    return {s.name: EvalSet(s, load_spec(s)) for s in specs}


# ---------------------------------------------------------------------------------------------
# Prompts as the models see them

def render_prompt(tokenizer, question: str, *, system_prompt: str = "", instruction: str = "",
                  template_kw: dict | None = None) -> str:
    """The text the model sees: chat template + generation prompt (plain text without a template).

    ``template_kw`` goes to the template, e.g. ``{"enable_thinking": False}`` for Qwen3's.
    """
    content = f"{question}{instruction}" if instruction else question
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **(template_kw or {}))
    return f"{system_prompt}\n\n{content}" if system_prompt else content


def encode_prompts(tokenizer, texts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Tokenise rendered prompts, left-padded: (B, P) ids and (B, P) bool mask."""
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    if pad is None:
        raise DataError("the tokenizer has no pad token; load it with kat.models.load_tokenizer, which sets one")
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    return ids.to(device), mask.to(device)


def prompt_lengths(tokenizer, problems: list[dict], *, render_kw: dict) -> list[int]:
    """Tokens in each problem's rendered prompt."""
    texts = [render_prompt(tokenizer, p["prompt"], **render_kw) for p in problems]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def filter_long_prompts(tokenizer, problems: list[dict], max_prompt_length: int, *, render_kw: dict,
                        name: str = "dataset") -> list[dict]:
    """Drop problems whose rendered prompt exceeds the limit, with one warning that counts them."""
    lengths = prompt_lengths(tokenizer, problems, render_kw=render_kw)
    kept = [p for p, n in zip(problems, lengths) if n <= max_prompt_length]
    if not kept:
        raise DataError(f"{name}: every prompt is longer than max_prompt_length={max_prompt_length} "
                        f"(shortest: {min(lengths)} tokens); raise max_prompt_length")
    if len(kept) < len(problems):
        warnings.warn(f"{name}: skipped {len(problems) - len(kept)} of {len(problems)} prompts longer than "
                      f"max_prompt_length={max_prompt_length} tokens (longest: {max(lengths)})", stacklevel=2)
    return kept


# ---------------------------------------------------------------------------------------------
# Arithmetic word problems: a small real-language task for the CPU example with a real teacher

_NAMES = ("Ana", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kofi", "Lena")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells")


def step_prompts(problems: list[dict], step: int, n: int, rank: int, world: int, seed: int) -> list[dict]:
    """The prompts of `step` for process `rank`: a fresh seeded permutation per epoch, no repeats
    within an epoch, a pure function of (step, rank) so a resumed run sees the same batches."""
    per_step = n * world
    out = []
    for j in range(per_step * step + n * rank, per_step * step + n * (rank + 1)):
        epoch, i = divmod(j, len(problems))
        perm = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(problems[perm[i].item()])
    return out


def step_batch(tokenizer, problems: list[dict], step: int, cfg, rank: int = 0, world: int = 1,
               device: torch.device | str = "cpu") -> tuple[list[dict], Tensor, Tensor]:
    """What the training loop samples at `step` on process `rank` (cfg: a kat.config.Config): the rows'
    problems (each prompt repeated samples_per_prompt times) and their encoded prompts (B, P) x 2."""
    from kat.config import render_kw

    batch = step_prompts(problems, step, cfg.batch_size, rank, world, cfg.seed)
    rows = [p for p in batch for _ in range(cfg.samples_per_prompt)]
    texts = [render_prompt(tokenizer, p["prompt"], **render_kw(cfg)) for p in rows]
    return rows, *encode_prompts(tokenizer, texts, device)


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The sampling generator of `step`: one seed per step, the same on every process (each process
    takes its rows' uniforms from the global draw), so a resumed run samples the same tokens."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 1009)


def word_problems(n: int, seed: int = 0) -> list[dict]:
    """``n`` one- or two-step arithmetic word problems with integer answers (deterministic in ``seed``)."""
    import random

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b, c = rng.randint(2, 30), rng.randint(2, 20), rng.randint(2, 9)
        kind = rng.randrange(5)
        if kind == 0:
            q, ans = f"{name} has {a} {item}. Then {name} gets {b} more. How many {item} does {name} have now?", a + b
        elif kind == 1:
            a = a + b  # keep the answer positive
            q, ans = f"{name} has {a} {item} and gives {b} of them to a friend. How many {item} are left?", a - b
        elif kind == 2:
            q, ans = (f"{name} buys {c} boxes with {b} {item} in each box. How many {item} does {name} buy "
                      "in total?"), b * c
        elif kind == 3:
            q, ans = (f"There are {b * c} {item} to share equally among {c} friends. How many {item} does each "
                      "friend get?"), b
        else:
            a = a + b
            q, ans = (f"{name} has {a} {item}, gives away {b}, and then finds {c} more. How many {item} does "
                      f"{name} have now?"), a - b + c
        out.append({"prompt": q, "answer": str(ans)})
    return out


def _unreadable(source: str, ext: str, err: Exception) -> str:
    """Why `datasets` could not read a local file: the first line that is not JSON, or the cause."""
    if ext != ".parquet":
        import json

        try:
            with open(source, encoding="utf-8") as fh:
                text = fh.read()
            json.loads(text)  # one JSON document (a list of rows): its own error names the line
        except UnicodeDecodeError:
            return f"{source!r} is not a text file (not UTF-8); give JSON lines, a JSON list of rows or parquet"
        except json.JSONDecodeError as whole:
            for n, line in enumerate(text.splitlines(), 1):
                try:
                    line.strip() and json.loads(line)
                except json.JSONDecodeError as bad:
                    where = whole if text.lstrip().startswith("[") else bad
                    line_no = whole.lineno if where is whole else n
                    return (f"{source!r}, line {line_no}: not valid JSON ({where.msg}); each line of a .jsonl "
                            "file must be one JSON object (a .json file: one list of objects, or JSON lines)")
    cause = err.__cause__ or err
    return f"cannot read {source!r}: {type(cause).__name__}: {cause}; check that it is a valid {ext[1:]} file"


def _blank(path: str) -> bool:
    """A text file holding only whitespace (datasets fails on it with a bare StopIteration)."""
    with open(path, "rb") as fh:
        return not fh.read(4096).strip()
