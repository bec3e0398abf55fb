"""Sampling-based evaluation: avg@k, unbiased pass@k, and answer graders.

For each problem the model samples k completions; c of them are correct.

    avg@k  = mean over problems of c / k
    pass@k = mean over problems of 1 - C(n - c, k) / C(n, k)      (here n = k samples)

Graders, by the config's name for them (`GRADER_FUNCTIONS`: where each one's answer extraction
and grading live, imported on first use, so this module depends on no task):
- ``exact``: the toy world's (kat.toy.world): the final ``A=<int>``, compared as integers. A
  completion without a parsable answer is wrong, and counted.
- ``math``: math-verify's parse + verify (``\\boxed{}``, LaTeX, plain numbers, symbolic
  equivalence). Its default timeouts use ``signal.alarm``, which only works in the main thread,
  so outside the main thread the grader runs without them.

`evaluate` samples and grades one list of problems; `run_eval` runs every evaluation set of a
training run with its protocol, problems sharded across processes, and returns the logged
``NAME/avg@k``, ``NAME/pass@k`` and ``NAME/mean_length``.

Command line: ``python -m kat eval --model PATH --data SPEC -k 8 [--out FILE.json]``, where PATH
is a model directory, a hub name or a LoRA adapter directory (loaded onto its base and merged), and
SPEC is anything ``kat train --eval_data`` takes (a local json/jsonl/parquet file, a directory or a hub
dataset, with ``[split=..., prompt=..., answer=..., k=..., limit=...]``; several comma-separated),
read by `kat.data`. ``python -m kat eval --config FILE --model PATH`` evaluates as ``kat train`` does
with that training config (its sets, k, limit, sampling, grader, seed and prompts; `CONFIG_DEFAULTS`);
a flag given on the command line wins over the config.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from collections.abc import Sequence

import torch

from kat.config import allowed

GRADERS = allowed("grader")  # ("exact", "math")
# name -> (module, its answer extractor, its grader): extract(completion) -> str | None, grade(completion, answer)
GRADER_FUNCTIONS = {"exact": ("kat.toy.world", "extract_answer", "grade"),
                    "math": ("kat.evaluate", "_math_answer", "_math_grade")}


# ---------------------------------------------------------------------------------------------
# Metrics

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct.

        pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{j=0}^{k-1} (n - c - j) / (n - j)

    The product form never builds the (huge) binomial coefficients.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for j in range(k):
        miss *= (n - c - j) / (n - j)
    return 1.0 - miss


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (``correct[i][j]``: problem i, sample j)."""
    if len(correct) == 0:
        raise ValueError("avg_at_k needs at least one problem")
    return sum(sum(map(bool, row)) / len(row) for row in correct) / len(correct)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems, each with n = len(row) >= k samples."""
    if len(correct) == 0:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


# ---------------------------------------------------------------------------------------------
# Graders

def _grader_function(grader: str, which: int):
    if grader not in GRADER_FUNCTIONS:
        raise ValueError(f"unknown grader {grader!r}; choose one of {GRADERS}")
    module, *names = GRADER_FUNCTIONS[grader]
    return getattr(importlib.import_module(module), names[which])


def extract_answer(completion: str, grader: str = "exact") -> str | None:
    """The final answer a grader would read from ``completion``, or None if there is none."""
    return _grader_function(grader, 0)(completion)


def grade(completion: str, answer: str, grader: str = "exact") -> bool:
    """True when ``completion``'s final answer matches the reference ``answer``.

    Never raises on a malformed completion: an answer that cannot be read is wrong.
    """
    return _grader_function(grader, 1)(completion, str(answer))


# Seconds math-verify may spend parsing or comparing one answer. Generous on purpose: the first
# symbolic comparison in a process also pays for sympy's lazy set-up, which took over 5 s on a
# busy CPU and turned a correct answer into a timeout (graded wrong).
MATH_TIMEOUT_S = 30


def _timeout_s() -> int | None:
    # math-verify's timeouts use signal.alarm, which Python allows in the main thread only.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_parse(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    try:
        return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                     parsing_timeout=_timeout_s())
    except Exception:  # a parser failure on model output is a wrong answer, not a crash
        return []


def _math_answer(completion: str) -> str | None:
    parsed = _math_parse(completion)
    return str(parsed[-1]) if parsed else None


def _math_grade(completion: str, answer: str) -> bool:
    from math_verify import verify

    ref = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    gold, pred = _math_parse(ref), _math_parse(completion)
    if not gold or not pred:
        return False
    try:
        return bool(verify(gold, pred, timeout_seconds=_timeout_s()))
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Sampling

def render_prompts(tokenizer, prompts: Sequence[str], system_prompt: str = "", instruction: str = "",
                   template_kw: dict | None = None) -> list[str]:
    """Each question as the model sees it in training (`kat.data.render_prompt`): an optional system
    turn, then one user turn (question + instruction) through the chat template (with `template_kw`)."""
    from kat.data import render_prompt

    return [render_prompt(tokenizer, p, system_prompt=system_prompt, instruction=instruction, template_kw=template_kw)
            for p in prompts]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, system_prompt: str = "", instruction: str = "", template_kw: dict | None = None,
             synced_gpus: bool = False) -> tuple[list[str], list[int], list[bool]]:
    """Sample one completion per prompt (greedy at temperature 0), rendered as in `render_prompts`.

    `synced_gpus`: every process calls this together and each keeps running forwards until all
    are done (under FSDP every forward is a collective). Returns (texts without special tokens,
    token counts including EOS, ended-with-EOS flags).
    """
    device = next(model.parameters()).device
    enc = tokenizer(render_prompts(tokenizer, prompts, system_prompt, instruction, template_kw), return_tensors="pt",
                    padding=True, padding_side="left", add_special_tokens=False).to(device)
    # transformers fills an unset top_k with 50; top_k=0 switches it off, so sampling draws from
    # the model's full distribution (at temperature / top_p) as the evaluation protocol says.
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        sampling = dict(do_sample=False)
    from kat.models import eos_ids

    stop = eos_ids(tokenizer, model)  # EOS and the chat template's end-of-turn (a base model's EOS is not it)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=stop, synced_gpus=synced_gpus, **sampling)
    new = out[:, enc["input_ids"].shape[1]:]  # (B, T') generated ids, padded after EOS
    is_eos = torch.isin(new, torch.tensor(stop, device=new.device))  # (B, T')
    ended = is_eos.any(-1)  # (B,)
    # length = index of the first EOS + 1 for rows that ended, else all generated tokens
    lengths = torch.where(ended, is_eos.int().argmax(-1) + 1, torch.full_like(ended, new.shape[1], dtype=torch.long))
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(new.tolist(), lengths.tolist())]
    return texts, lengths.tolist(), ended.tolist()


def evaluate(model, tokenizer, problems: Sequence[dict], k: int, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64, grader: str = "exact",
             seed: int = 0, system_prompt: str = "", instruction: str = "", template_kw: dict | None = None,
             synced_gpus: bool = False) -> dict:
    """Sample ``k`` completions for each problem and grade them.

    Args:
        problems: dicts with ``prompt`` (the question text) and ``answer`` (reference string).
        k: samples per problem; avg@k and pass@k are computed from them.
        temperature: sampling temperature; 0 means greedy decoding (then all k samples agree).
        system_prompt, instruction, template_kw: prompt rendering, as in training (`kat.data.render_prompt`).
        synced_gpus: every process evaluates together, on as many problems each (see `run_eval`).
    Returns:
        ``avg@k``, ``pass@k``, ``k``, ``n_problems``, ``mean_length`` (completion tokens including
        EOS), ``eos_rate``, ``unparsed_rate`` (completions without a readable answer), the
        settings, and ``problems``: per problem its prompt, answer, completions, lengths, correct.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; choose one of {GRADERS}")
    for i, p in enumerate(problems):
        if "prompt" not in p or "answer" not in p:
            raise ValueError(f"problem {i} needs the fields 'prompt' and 'answer', has {sorted(p)}")
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    flat = [(i, p) for i, p in enumerate(problems) for _ in range(k)]  # k copies of each problem
    texts, lengths, ended = [], [], []
    for s in range(0, len(flat), batch_size):
        chunk = [p["prompt"] for _, p in flat[s:s + batch_size]]
        t, n, e = generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, system_prompt=system_prompt, instruction=instruction, template_kw=template_kw,
                           synced_gpus=synced_gpus)
        texts += t
        lengths += n
        ended += e
    model.train(was_training)

    rows = []
    for i, p in enumerate(problems):
        idx = range(i * k, (i + 1) * k)
        rows.append({
            "prompt": p["prompt"],
            "answer": str(p["answer"]),
            "completions": [texts[j] for j in idx],
            "lengths": [lengths[j] for j in idx],
            "correct": [grade(texts[j], str(p["answer"]), grader) for j in idx],
        })
    correct = [r["correct"] for r in rows]
    n = len(texts)
    return {
        "avg@k": avg_at_k(correct),
        "pass@k": mean_pass_at_k(correct, k),
        "k": k,
        "n_problems": len(problems),
        "mean_length": sum(lengths) / n,
        "eos_rate": sum(ended) / n,
        "unparsed_rate": sum(extract_answer(t, grader) is None for t in texts) / n,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "grader": grader,
        "seed": seed,
        "problems": rows,
    }


def run_eval(accelerator, model, tokenizer, eval_sets: dict, cfg, tag: str) -> dict:
    """Evaluate `model` on every set of `eval_sets` (name -> kat.data.EvalSet, each with its own k)
    with the training run's protocol (`cfg`: a kat.config.Config), problems sharded across processes.

    Every process runs the same generate calls (under FSDP each forward is a collective): a process
    with fewer problems than another pads its share with copies of its first problem, whose results
    are dropped, and generation is synced across processes.
    Returns ``NAME/avg@k``, ``NAME/pass@k`` and ``NAME/mean_length`` per set (the logged names).
    """
    unwrapped = accelerator.unwrap_model(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    out = {}
    for name, eval_set in eval_sets.items():
        mine = eval_set.problems[rank::world]
        share = -(-len(eval_set.problems) // world)  # the largest process's share
        padded = mine + [eval_set.problems[0]] * (share - len(mine))
        res = evaluate(unwrapped, tokenizer, padded, eval_set.k,
                       max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                       temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, grader=cfg.grader,
                       seed=cfg.seed + 7919 * rank, system_prompt=cfg.system_prompt, instruction=cfg.instruction,
                       template_kw=cfg.chat_template_kwargs, synced_gpus=world > 1)
        rows = accelerator.gather_for_metrics(res["problems"][: len(mine)], use_gather_object=True)
        correct = [r["correct"] for r in rows]
        lengths = [n for r in rows for n in r["lengths"]]
        out[f"{name}/avg@k"] = avg_at_k(correct)
        out[f"{name}/pass@k"] = mean_pass_at_k(correct, eval_set.k)
        out[f"{name}/mean_length"] = sum(lengths) / max(len(lengths), 1)
    accelerator.print(f"[eval {tag}] " + "  ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out


# ---------------------------------------------------------------------------------------------
# Command line

# `kat eval` option -> (the training config's field that is its default under --config, its default
# without a config). These are the settings `run_eval` reads from the config, so `kat eval --config F`
# evaluates as `kat train --config F` does.
CONFIG_DEFAULTS = {
    "data": ("eval_data", None),
    "k": ("eval_k", 8),
    "limit": ("eval_limit", 0),
    "split": ("eval_split", "test"),
    "prompt_field": ("prompt_field", "prompt"),
    "answer_field": ("answer_field", "answer"),
    "max_new_tokens": ("eval_max_new_tokens", 96),  # the config's 0 means its max_new_tokens
    "temperature": ("eval_temperature", 1.0),
    "top_p": ("eval_top_p", 1.0),
    "grader": ("grader", "exact"),
    "seed": ("seed", 0),
    "system_prompt": ("system_prompt", ""),
    "instruction": ("instruction", ""),
    "chat_template_kwargs": ("chat_template_kwargs", ""),
    "dtype": ("dtype", "auto"),
}


def _default(dest: str, text: str = "") -> str:
    """The help text's default: the built-in one, and the config field that replaces it under --config."""
    field, value = CONFIG_DEFAULTS[dest]
    shown = text or str(value)
    return f"default {shown}; with --config its {field}"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="kat eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory, hub name or pkg:<package>")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a training config (YAML, as `kat train --config` reads it): its evaluation settings "
                        "become the defaults, so the model is evaluated as `kat train` evaluates with it; a flag "
                        "given here wins over the config")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="what `kat train --eval_data` takes: a json/jsonl/parquet file, directory or hub dataset, "
                        "optionally [name=]source[split=..., prompt=..., answer=..., k=..., limit=..., unwrap=...]; "
                        "several comma-separated (see kat.data). Required without --config; with it, its eval_data")
    p.add_argument("-k", type=int, default=None, help=f"samples per problem, unless a spec sets k= ({_default('k')})")
    p.add_argument("--split", default=None,
                   help=f"split of hub datasets, unless a spec sets split= ({_default('split')})")
    p.add_argument("--prompt-field", default=None, help=f"column holding the question ({_default('prompt_field')})")
    p.add_argument("--answer-field", default=None,
                   help=f"column holding the reference answer ({_default('answer_field')})")
    p.add_argument("--limit", type=int, default=None,
                   help=f"evaluate the first N problems of each set, 0: all ({_default('limit')})")
    p.add_argument("--out", default=None, help="write the full results (with completions) as JSON here")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"completion length limit ({_default('max_new_tokens')}, or max_new_tokens when it is 0)")
    p.add_argument("--temperature", type=float, default=None, help=f"0 = greedy ({_default('temperature')})")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass ({_default('top_p')})")
    p.add_argument("--grader", choices=GRADERS, default=None,
                   help=f"exact (toy) or math (math-verify) ({_default('grader')})")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (default 64)")
    p.add_argument("--seed", type=int, default=None, help=f"sampling seed ({_default('seed')})")
    p.add_argument("--system-prompt", default=None,
                   help=f"system turn before each question ({_default('system_prompt', 'none')})")
    p.add_argument("--instruction", default=None,
                   help=f"text appended to each question ({_default('instruction', 'none')})")
    p.add_argument("--chat-template-kwargs", default=None,
                   help="chat template variables as YAML, e.g. '{enable_thinking: false}' "
                        f"({_default('chat_template_kwargs', 'none')})")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16", "float16"),
                   help=f"model dtype, auto: bf16 on CUDA, fp32 on CPU ({_default('dtype')})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def apply_config(args: argparse.Namespace) -> None:
    """Fill in every `CONFIG_DEFAULTS` option not given on the command line: from the training config
    of --config (read and validated by kat.config, as `kat train` reads it), else its built-in default.
    Raises ConfigError for a config that cannot be used, or when there is no evaluation data."""
    from kat.config import ConfigError, load_config

    cfg = None
    if args.config is not None:
        try:
            cfg = load_config([f"--config={args.config}"])
        except ConfigError as err:
            text = " ".join(str(err).split())
            raise ConfigError(text if repr(args.config) in text else f"--config {args.config!r}: {text}") from None
    for dest, (field, default) in CONFIG_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default if cfg is None else getattr(cfg, field))
            if cfg is not None and dest == "max_new_tokens":  # eval_max_new_tokens 0: the training limit
                args.max_new_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    if not args.data:
        if cfg is None:
            raise ConfigError("--data: no evaluation data given; pass --data SPEC, or --config FILE to evaluate "
                              "on the eval_data of a training config")
        raise ConfigError(f"--config {args.config!r}: its eval_data is empty (no evaluation sets); set eval_data "
                          "there, or pass --data SPEC")


def _print_table(name: str, res: dict, k: int) -> None:
    table = [("set", name), ("model", res["model"]), ("data", res["data"]), ("problems", res["n_problems"]), ("k", k),
             (f"avg@{k}", f"{100 * res['avg@k']:.2f}%"), (f"pass@{k}", f"{100 * res['pass@k']:.2f}%"),
             ("mean length", f"{res['mean_length']:.1f} tokens"), ("ended with EOS", f"{100 * res['eos_rate']:.1f}%"),
             ("no answer", f"{100 * res['unparsed_rate']:.1f}%"), ("seconds", res["seconds"])]
    width = max(len(name) for name, _ in table)
    for name, value in table:
        print(f"{name:<{width}}  {value}")


def check_args(args: argparse.Namespace) -> None:
    """Raise ConfigError for a value `kat eval` cannot use, before any model loads or sample is drawn."""
    from kat.config import ConfigError, check_value

    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("-k", args.k, 1), ("--limit", args.limit, 0)):
        if value < low:
            raise ConfigError(f"{flag}: {value} is out of range; it must be >= {low}")
    for name in ("temperature", "top_p"):
        try:
            check_value(name, getattr(args, name))
        except ConfigError as err:
            raise ConfigError(f"--{name.replace('_', '-')}{str(err)[len(name):]}") from None
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise ConfigError(f"--out: {args.out!r} is a folder; give the path of the JSON file to write")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--out: cannot create the folder of {args.out!r} ({err.strerror or err}); give a "
                              "path you can write to") from None
        if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise ConfigError(f"--out: {args.out!r} is not writable; give a path you can write to")


def main(argv: Sequence[str] | None = None) -> dict | int:
    """``python -m kat eval``: a results table per evaluation set; with --out also the JSON.

    Returns {set name: results of `evaluate`}, or 2 after printing one ``error: ...`` line when the
    model or the data cannot be used.
    """
    from kat.config import ConfigError, check_value
    from kat.data import DataError, load_eval_sets
    from kat.models import load_model, load_tokenizer, torch_dtype

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        apply_config(args)
        check_args(args)
        template_kw = check_value("chat_template_kwargs", args.chat_template_kwargs)
        eval_sets = load_eval_sets(args.data, split=args.split, prompt_field=args.prompt_field,
                                   answer_field=args.answer_field, k=args.k, limit=args.limit)
        tokenizer = load_tokenizer(args.model, "", "model")
        model = load_model(args.model, "", torch_dtype(args.dtype, device), "model").to(device)
    except (ConfigError, DataError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    results = {}
    for name, eval_set in eval_sets.items():
        t0 = time.time()
        res = evaluate(model, tokenizer, eval_set.problems, eval_set.k, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                       grader=args.grader, seed=args.seed, system_prompt=args.system_prompt,
                       instruction=args.instruction, template_kw=template_kw)
        res.update(model=str(args.model), data=eval_set.spec.source, config=args.config,
                   seconds=round(time.time() - t0, 1))
        _print_table(name, res, eval_set.k)
        results[name] = res
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return results
