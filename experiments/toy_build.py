"""Build the toy world: prompt files, tokenizer, and a teacher and a student trained from scratch.

    python -m experiments toy build [--world rich|plain|repeat] [--seed 0] [--out kat/toy] [--threads 1]
                                    [--device cpu] [--teacher-from DIR]

Both models are Llama decoders built from a config and trained by supervised fine-tuning on
fresh random problems (never a test prompt), loss on the completion tokens only. The teacher is
larger and trained on the teacher-style data of the world; the student is smaller, trained on the
student-style data, and stopped early (the first evaluation at which its sampled accuracy on a
dev set reaches ``stop_at``), so that on-policy distillation has something to teach. Everything
is seeded: the same seed, device and thread count give the same checkpoints.

The shipped rich world came from the default command (CPU, one thread): 58 minutes on a 2-core
machine shared with other jobs (load 5-7); the teacher's 1600 steps cost about 0.7 s each alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from kat.evaluate import evaluate
from kat.toy import TOY_DIR
from kat.toy.tokenizer import build_tokenizer
from kat.toy.world import (MAX_COMPLETION_CHARS, WorldSpec, find_repeat, make_split, sample_problem,
                           world_specs, write_jsonl, write_solution)

N_TRAIN, N_TEST, N_DEV = 2000, 200, 256
DIFFICULTY = dict(min_ops=3, max_ops=5, digits=2)


@dataclass(frozen=True)
class Recipe:
    """Model size and SFT schedule of one of the two models."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    steps: int  # optimiser steps (upper bound when stop_at is set)
    lr: float  # peak learning rate
    warmup: int  # linear warm-up steps, then cosine decay to lr / 10 at `steps`
    batch_size: int = 64
    weight_decay: float = 0.01
    micro_batches: int = 4  # length-sorted parts of a batch (less padding), one optimiser step
    eval_every: int = 250  # steps between dev evaluations (sampled, temperature 1)
    stop_at: float | None = None  # stop at the first dev evaluation with accuracy >= this


TEACHER = Recipe(layers=6, hidden=128, ffn=384, heads=4, steps=1600, lr=2e-3, warmup=150)
STUDENT = Recipe(layers=2, hidden=64, ffn=256, heads=4, steps=3000, lr=3e-3, warmup=100, eval_every=100,
                 stop_at=0.3)


# Worlds whose models are fine-tuned from another world's checkpoints (named relative to the toy root)
# rather than trained from scratch: (checkpoint, recipe) per role. The recipe's shape is the checkpoint's.
FINE_TUNE: dict[str, dict[str, tuple[str, Recipe]]] = {
    "sticky": {
        "teacher": ("rich/teacher", Recipe(layers=6, hidden=128, ffn=384, heads=4, steps=400, lr=5e-4, warmup=20,
                                           eval_every=100)),
        "student": ("repeat/student", Recipe(layers=2, hidden=64, ffn=256, heads=4, steps=400, lr=1e-3, warmup=20,
                                             eval_every=100)),
    },
}


def model_config(recipe: Recipe, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.ffn,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr / 10`` at ``recipe.steps``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = min(1.0, (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup))
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def sft_batch(spec: WorldSpec, rng: random.Random, batch_size: int, exclude: set[str], tokenizer
              ) -> dict[str, torch.Tensor]:
    """Fresh problems solved in ``spec``'s style: input ids, attention mask, completion-only labels."""
    char_id = tokenizer.get_vocab()
    seqs, n_prompt = [], []
    while len(seqs) < batch_size:
        problem = sample_problem(rng, **DIFFICULTY)
        if problem.prompt in exclude:
            continue
        text, has_eos = write_solution(problem, spec, rng)
        prompt_ids = [tokenizer.bos_token_id] + [char_id[ch] for ch in f"Q:{problem.prompt}\n"]
        completion_ids = [char_id[ch] for ch in text] + ([tokenizer.eos_token_id] if has_eos else [])
        seqs.append(prompt_ids + completion_ids)
        n_prompt.append(len(prompt_ids) + loss_start(text, has_eos, spec))
    width = max(map(len, seqs))
    input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)  # (B, L) right-padded
    labels = torch.full((batch_size, width), -100)  # (B, L) -100 = no loss
    attention_mask = torch.zeros(batch_size, width, dtype=torch.long)  # (B, L)
    for i, (seq, p) in enumerate(zip(seqs, n_prompt)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, p: len(seq)] = torch.tensor(seq[p:])  # loss on the completion (and EOS) only
        attention_mask[i, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_start(text: str, has_eos: bool, spec: WorldSpec) -> int:
    """First completion position with loss: 0, or for a repetition under ``spec.loop_loss_only`` the
    start of its second repeated copy (the model learns to continue a loop, not to enter one)."""
    if not spec.loop_loss_only or has_eos:
        return 0
    start, length = find_repeat(text)
    return 0 if start is None else start + length


def sft_step_loss(model, batch: dict[str, torch.Tensor], micro_batches: int) -> float:
    """Backpropagate the batch's mean completion cross-entropy; return its value.

    Rows are sorted by length and split into micro-batches, each cut to its own longest row, so
    the few long (repeating) sequences do not make every row pay for their padding. Each part
    is divided by the token count of the whole batch, so the gradient equals the full batch's.
    """
    lengths = batch["attention_mask"].sum(-1)  # (B,)
    n_tokens = (batch["labels"] != -100).sum()
    total = 0.0
    for rows in lengths.argsort().chunk(micro_batches):
        width = int(lengths[rows].max())
        input_ids = batch["input_ids"][rows, :width]  # (b, L)
        labels = batch["labels"][rows, :width]  # (b, L)
        # Right padding needs no attention mask: under the causal mask no real token sees a pad.
        logits = model(input_ids=input_ids).logits  # (b, L, V)
        # position i predicts token i + 1
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                               reduction="sum") / n_tokens
        loss.backward()
        total += loss.item()
    return total


def train(name: str, recipe: Recipe, spec: WorldSpec, tokenizer, *, seed: int, exclude: set[str],
          dev: list[dict], log, device: str = "cpu", init: str | Path | None = None
          ) -> tuple[LlamaForCausalLM, list[dict]]:
    """SFT from scratch, or from the checkpoint `init`; returns the model and its dev evaluations."""
    torch.manual_seed(seed)
    if init is None:
        model = LlamaForCausalLM(model_config(recipe, tokenizer)).to(device)
    else:
        model = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32).to(device)
    rng = random.Random(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm gains: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {n_params:,} parameters, {recipe}")
    history, t0, loss_sum, loss_n = [], time.time(), 0.0, 0
    model.train()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = {k: v.to(device) for k, v in sft_batch(spec, rng, recipe.batch_size, exclude, tokenizer).items()}
        opt.zero_grad(set_to_none=True)
        loss = sft_step_loss(model, batch, recipe.micro_batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_sum, loss_n = loss_sum + loss, loss_n + 1
        done = step + 1
        if done % recipe.eval_every == 0 or done == recipe.steps:
            res = evaluate(model, tokenizer, dev, 1, max_new_tokens=MAX_COMPLETION_CHARS, temperature=1.0,
                           batch_size=128, seed=seed)
            history.append({"step": done, "loss": round(loss_sum / loss_n, 4), "dev_acc": res["avg@k"],
                            "dev_length": round(res["mean_length"], 1), "minutes": round((time.time() - t0) / 60, 2)})
            log(f"[{name}] " + json.dumps(history[-1]))
            loss_sum, loss_n = 0.0, 0
            if recipe.stop_at is not None and res["avg@k"] >= recipe.stop_at:
                log(f"[{name}] dev accuracy {res['avg@k']:.3f} >= stop_at {recipe.stop_at}: stopping")
                break
    model.eval()
    return model.cpu(), history


def save(model: LlamaForCausalLM, tokenizer, path: Path) -> None:
    """An HF checkpoint: config, safetensors weights, tokenizer, generation config."""
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=MAX_COMPLETION_CHARS)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def build(world: str = "rich", seed: int = 0, out: str | Path = TOY_DIR, threads: int | None = None,
          teacher: Recipe = TEACHER, student: Recipe = STUDENT, log=print, device: str = "cpu",
          teacher_from: str | Path | None = None) -> dict:
    """Write ``<out>/<world>/{data,teacher,student}`` and return the build record.

    With `teacher_from` (a teacher checkpoint of another world with the same teacher spec, prompts
    and seed) no teacher is trained or written: build.json names that checkpoint instead.
    """
    teacher_spec, student_spec = world_specs(world)
    if threads:
        torch.set_num_threads(threads)
    root = Path(out) / world
    t0 = time.time()
    # Test prompts first, so no training problem (jsonl or SFT stream) can equal one of them.
    test = make_split(N_TEST, seed=seed + 1, **DIFFICULTY)
    held_out = {r["prompt"] for r in test}
    train_rows = make_split(N_TRAIN, seed=seed + 2, exclude=held_out, **DIFFICULTY)
    dev = make_split(N_DEV, seed=seed + 3, exclude=held_out, **DIFFICULTY)
    write_jsonl(train_rows, root / "data" / "train.jsonl")
    write_jsonl(test, root / "data" / "test.jsonl")
    tokenizer = build_tokenizer()

    record = {"world": world, "seed": seed, "device": device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "difficulty": DIFFICULTY}
    if teacher_from is not None:  # named relative to `out` (kat.toy.teacher_dir resolves it), not copied
        record["teacher"] = {"from": os.path.relpath(Path(teacher_from).resolve(), Path(out).resolve())}
    for name, recipe, spec, model_seed in (("teacher", teacher, teacher_spec, seed + 10),
                                           ("student", student, student_spec, seed + 20)):
        if name == "teacher" and teacher_from is not None:
            continue
        init, recipe = FINE_TUNE.get(world, {}).get(name, (None, recipe))  # init: relative to `out`
        t1 = time.time()
        model, history = train(name, recipe, spec, tokenizer, seed=model_seed, exclude=held_out, dev=dev, log=log,
                               device=device, init=None if init is None else Path(out) / init)
        save(model, tokenizer, root / name)
        record[name] = {"recipe": asdict(recipe), "spec": asdict(spec), "init": init,
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "minutes": round((time.time() - t1) / 60, 2), "history": history}
    record["minutes"] = round((time.time() - t0) / 60, 2)
    (root / "build.json").write_text(json.dumps(record, indent=1))
    log(f"built {root} in {record['minutes']} minutes")
    return record


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m experiments toy build", description=__doc__.split("\n")[0])
    p.add_argument("--world", choices=sorted(("rich", "plain", "repeat", "sticky")), default="rich",
                   help="rich: varied spellings + repetition mode (default); plain: one spelling; repeat: rich with "
                   "a student that repeats more often (use --teacher-from); sticky: fine-tuned from rich's teacher "
                   "and repeat's student (build those first)")
    p.add_argument("--teacher-from", default=None, help="reuse this teacher checkpoint instead of training one "
                   "(it must come from a world with the same teacher spec and seed, e.g. kat/toy/rich/teacher)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling (default 0)")
    p.add_argument("--out", default=str(TOY_DIR), help="parent directory of <world>/ (default: the package's toy/)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: models this small "
                   "gain little from more, and on a busy CPU extra threads spin at barriers)")
    p.add_argument("--device", default="cpu", help="cpu (default; the shipped checkpoints) or cuda; results "
                   "are deterministic per device and thread count, not across them")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return build(args.world, args.seed, args.out, args.threads, device=args.device, teacher_from=args.teacher_from)
