"""The OPD + KAT training loop on Accelerate: sample -> learn -> log -> evaluate -> save.

    python -m kat train --config configs/toy.yaml [--key value ...]
    accelerate launch -m kat train --config configs/qwen3_1.7b.yaml

Mirrors `main()` in kat.py; the maths lives in kat.scorer / sampler / detector / learner.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from kat.config import Config, ConfigError, help_text, load_config
from kat.data import (DataError, encode_prompts, filter_long_prompts, load_eval_sets, load_problems, render_prompt,
                      step_generator, step_prompts)
from kat.detector import make_terminator, window_means
from kat.models import align_vocab, check_tokenizers, eos_ids, load_model, load_tokenizer
from kat.learner import build_optimizer, learn
from kat.rollout import STOP_EOS, STOP_LENGTH, Rollout
from kat.sampler import sample


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps in a row)."""


# ----------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------

def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, cfg.dtype)


def mixed_precision(cfg: Config) -> str:
    """Accelerate's mixed-precision name for the student (fp32 master weights in every case)."""
    if cfg.dtype == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[cfg.dtype]


def build_terminator(cfg: Config, rank: int = 0):
    if cfg.termination == "kat":
        return make_terminator("kat", rule=cfg.rule, window=cfg.window, stride=cfg.stride,
                               patience=cfg.patience, exempt=cfg.exempt, eta=cfg.eta,
                               buffer_size=cfg.buffer_size, min_buffer=cfg.min_buffer,
                               warmup_steps=cfg.warmup_steps, kappa=cfg.kappa, ema=cfg.ema, shadow=cfg.shadow)
    if cfg.termination == "random":
        return make_terminator("random", target_length=cfg.random_target_length or cfg.max_new_tokens / 2,
                               exempt=cfg.exempt, max_new_tokens=cfg.max_new_tokens,
                               seed=cfg.seed + rank)  # independent cut positions on each process
    return make_terminator("none")


# ----------------------------------------------------------------------------------------------
# Metrics and traces
# ----------------------------------------------------------------------------------------------

def rollout_metrics(r: Rollout, terminator) -> dict:
    """Per-process sums; the loop reduces them across processes before dividing."""
    gen = r.completion_mask
    cut = (r.stop != STOP_EOS) & (r.stop != STOP_LENGTH)
    out = {
        "rows": float(r.stop.numel()),
        "tokens": float(gen.sum()),
        "loss_tokens": float(r.loss_mask.sum()),
        "kl_sum": float((r.kl * gen).sum()),
        "kl_loss_sum": float((r.kl * r.loss_mask).sum()),
        "cut_rows": float(cut.sum()),
        "eos_rows": float((r.stop == STOP_EOS).sum()),
    }
    if r.shadow_cut is not None:
        out["shadow_rows"] = float((r.shadow_cut >= 0).sum())
    return out


def make_traces(r: Rollout, tokenizer, terminator, cfg: Config, step: int) -> list[dict]:
    traces = []
    for b in range(min(cfg.n_traces, r.stop.numel())):
        n = int(r.completion_mask[b].sum())
        kl = r.kl[b, :n].float().cpu()
        traces.append({
            "step": step,
            "tokens": [tokenizer.decode([t]) for t in r.completion_ids[b, :n].tolist()],
            "kl": [round(x, 6) for x in kl.tolist()],
            "z": [None if math.isnan(x) else round(x, 6) for x in window_means(kl, cfg.window).tolist()],
            "threshold": terminator.threshold,
            "window": cfg.window, "stride": cfg.stride, "exempt": cfg.exempt,
            "cut": int(r.cut[b]) if int(r.cut[b]) < n else None,
            "shadow_cut": int(r.shadow_cut[b]) if r.shadow_cut is not None and int(r.shadow_cut[b]) >= 0 else None,
            "stop": int(r.stop[b]),
        })
    return traces


def append_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------
# Evaluation (problems sharded across processes)
# ----------------------------------------------------------------------------------------------

def run_eval(accelerator: Accelerator, model, tokenizer, eval_sets: dict, cfg: Config, tag: str) -> dict:
    from kat.evaluate import avg_at_k, evaluate, mean_pass_at_k

    unwrapped = accelerator.unwrap_model(model)
    out = {}
    for name, eval_set in eval_sets.items():  # each set with its own k (kat.data.EvalSet)
        mine = eval_set.problems[accelerator.process_index::accelerator.num_processes]
        res = evaluate(unwrapped, tokenizer, mine, eval_set.k,
                       max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                       temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, grader=cfg.grader,
                       seed=cfg.seed + 7919 * accelerator.process_index, system_prompt=cfg.system_prompt,
                       instruction=cfg.instruction) if mine else {"problems": []}
        rows = accelerator.gather_for_metrics(res["problems"], use_gather_object=True)
        correct = [r["correct"] for r in rows]
        lengths = [n for r in rows for n in r["lengths"]]
        out[f"{name}/avg@k"] = avg_at_k(correct)
        out[f"{name}/pass@k"] = mean_pass_at_k(correct, eval_set.k)
        out[f"{name}/mean_length"] = sum(lengths) / max(len(lengths), 1)
    accelerator.print(f"[eval {tag}] " + "  ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic, resumable, the last `keep_last` kept
# ----------------------------------------------------------------------------------------------

def save_checkpoint(accelerator: Accelerator, cfg: Config, step: int, terminator, counters: dict) -> str:
    final = os.path.join(cfg.output_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process writes its own RNG state into tmp first
    if accelerator.is_main_process:
        torch.save(terminator.state_dict(), os.path.join(tmp, "terminator.pt"))
        with open(os.path.join(tmp, "progress.json"), "w") as fh:
            json.dump({"step": step, **counters, "config": cfg.to_dict()}, fh, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)  # a checkpoint directory exists only once it is complete
        done = sorted(d for d in os.listdir(cfg.output_dir)
                      if d.startswith("checkpoint-") and not d.endswith(".tmp"))
        for old in done[:-cfg.keep_last]:
            shutil.rmtree(os.path.join(cfg.output_dir, old))
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(cfg: Config) -> str | None:
    if not cfg.resume:
        return None
    if cfg.resume != "latest":
        path = cfg.resume
    else:
        done = sorted(d for d in os.listdir(cfg.output_dir) if d.startswith("checkpoint-")
                      and not d.endswith(".tmp")) if os.path.isdir(cfg.output_dir) else []
        if not done:
            raise ConfigError(f"resume: no checkpoint found in {cfg.output_dir!r}; train without --resume first")
        path = os.path.join(cfg.output_dir, done[-1])
    if not os.path.isfile(os.path.join(path, "progress.json")):
        raise ConfigError(f"resume: {path!r} is not a complete checkpoint (progress.json missing); "
                          "it may be partial from an interrupted save. Pick another checkpoint")
    return path


@contextmanager
def stop_requests():
    """SIGTERM / Ctrl-C set a flag; the loop checkpoints at the end of the current step and exits."""
    flag = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def train(cfg: Config) -> dict:
    # step_scheduler_with_optimizer=False: Accelerate would otherwise advance the schedule once per
    # process at every step (it assumes each process's batch is a shard of one data loader)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), log_with=cfg.log_with or None,
                              project_dir=cfg.output_dir, step_scheduler_with_optimizer=False)
    set_seed(cfg.seed)
    device = accelerator.device
    dtype = compute_dtype(cfg, device)
    os.makedirs(cfg.output_dir, exist_ok=True)

    # --- models: the student is trained (fp32 master weights), the teacher frozen in the compute dtype
    tokenizer = load_tokenizer(cfg.student, cfg.student_gguf, "student")
    check_tokenizers(tokenizer, load_tokenizer(cfg.teacher, cfg.teacher_gguf, "teacher"))
    student = load_model(cfg.student, cfg.student_gguf, torch.float32, "student")
    teacher = load_model(cfg.teacher, cfg.teacher_gguf, dtype, "teacher").to(device).eval().requires_grad_(False)
    align_vocab(student, teacher, tokenizer)  # one logit width: padded embedding rows past the tokenizer trimmed
    eos = eos_ids(tokenizer, student)

    # --- data
    render_kw = {"system_prompt": cfg.system_prompt, "instruction": cfg.instruction}
    problems = filter_long_prompts(tokenizer, load_problems(cfg.train_data, split=cfg.train_split,
                                   prompt_field=cfg.prompt_field, answer_field=cfg.answer_field),
                                   cfg.max_prompt_length, render_kw=render_kw, name="train_data")
    eval_sets = load_eval_sets(cfg.eval_data, split=cfg.eval_split, prompt_field=cfg.prompt_field,
                               answer_field=cfg.answer_field, k=cfg.eval_k, limit=cfg.eval_limit)

    optimizer, scheduler = build_optimizer(student, cfg.lr, cfg.steps, cfg.warmup_ratio, cfg.weight_decay)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    terminator = build_terminator(cfg, accelerator.process_index)

    # --- resume
    start, counters = 0, {"tokens_total": 0.0, "bad_in_a_row": 0}
    ckpt = find_checkpoint(cfg)
    if ckpt:
        try:
            accelerator.load_state(ckpt)
            terminator.load_state_dict(torch.load(os.path.join(ckpt, "terminator.pt"), weights_only=False))
            with open(os.path.join(ckpt, "progress.json")) as fh:
                progress = json.load(fh)
        except Exception as err:  # noqa: BLE001 - any unreadable piece means the same thing
            raise ConfigError(f"resume: checkpoint {ckpt!r} is corrupt or incomplete ({type(err).__name__}: "
                              f"{err}); resume from an older checkpoint in {cfg.output_dir!r}") from None
        start = progress["step"]
        counters = {k: progress[k] for k in counters}
        accelerator.print(f"resumed from {ckpt} at step {start}")
    if cfg.log_with:
        accelerator.init_trackers("kat", config=cfg.to_dict())
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    traces_path = os.path.join(cfg.output_dir, "traces.jsonl")
    if accelerator.is_main_process and start == 0:
        for p in (metrics_path, traces_path):
            if os.path.exists(p):
                os.remove(p)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as fh:
            import yaml
            yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)

    def log(row: dict) -> None:
        if accelerator.is_main_process:
            append_jsonl(metrics_path, [row])
        if cfg.log_with:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def skip(step: int, reason: str) -> None:
        """A step with non-finite numbers changes nothing; too many in a row end the run."""
        counters["bad_in_a_row"] += 1
        accelerator.print(f"warning: {reason}; step skipped")
        log({"step": step + 1, "skipped": reason})
        if counters["bad_in_a_row"] >= cfg.max_bad_steps:
            raise TrainingError(f"{counters['bad_in_a_row']} steps in a row met non-finite values (last: step "
                                f"{step + 1}: {reason}). Check the models' weights and dtype, or lower lr")

    results = {}
    if eval_sets and start == 0:
        results["before"] = run_eval(accelerator, student, tokenizer, eval_sets, cfg, "before")
        log({"step": 0, "eval": "before", **results["before"]})

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="kat",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    with stop_requests() as stop:
        for step in bar:
            # --- 1. rollouts: student samples, teacher scores chunk by chunk, terminator cuts
            t0 = time.perf_counter()
            batch = step_prompts(problems, step, cfg.batch_size, accelerator.process_index,
                                 accelerator.num_processes, cfg.seed)
            texts = [render_prompt(tokenizer, p["prompt"], **render_kw)
                     for p in batch for _ in range(cfg.samples_per_prompt)]
            prompt_ids, prompt_mask = encode_prompts(tokenizer, texts, device)
            # one generator seed per step on every process; each process takes its rows' uniforms
            # (global_rows), so the tokens do not depend on how many processes share the batch
            gen = step_generator(cfg.seed, step, device)
            rows = prompt_ids.shape[0]
            # with the `full` loss and no KL-driven terminator, the learner's teacher pass gives
            # the KL: sampling skips its own post-hoc teacher pass (score=False)
            scored = cfg.loss != "full" or terminator.needs_kl
            student.eval()
            try:
                rollout, state = sample(accelerator.unwrap_model(student), teacher, prompt_ids, prompt_mask,
                                        max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                        pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature,
                                        top_p=cfg.top_p, chunk=cfg.chunk, terminator=terminator,
                                        topk=cfg.topk if cfg.loss == "topk" else 0, generator=gen,
                                        global_rows=(accelerator.process_index * rows,
                                                     accelerator.num_processes * rows), score=scored)
                problem = None
            except FloatingPointError as err:  # non-finite logits or KL: reported with rows and positions
                problem = f"step {step + 1}, process {accelerator.process_index}: {err}"
            student.train()
            # every process must skip together, or their parameters and buffers would drift apart
            if accelerator.reduce(torch.tensor(float(problem is not None), device=device), "sum").item() > 0:
                skip(step, problem or "another process met non-finite values while sampling")
                continue
            # every process pushes its rollouts' minima; all hold the same threshold afterwards
            threshold_used, active_used = terminator.threshold, terminator.active
            terminator.end_batch(state, step)
            t1 = time.perf_counter()

            # --- 2. learn: one optimiser step on the loss-masked tokens, globally normalised
            stats = learn(student, rollout, optimizer, scheduler, accelerator, kind=cfg.loss,
                          micro_batch_size=cfg.micro_batch_size, teacher=teacher,
                          max_grad_norm=cfg.max_grad_norm)
            t2 = time.perf_counter()
            if not stats["finite"]:
                skip(step, f"step {step + 1}: non-finite loss in rows {stats['bad_rows']} "
                           f"(process {accelerator.process_index})")
                continue
            counters["bad_in_a_row"] = 0
            if not scored:
                rollout = replace(rollout, kl=stats["token_kl"].to(rollout.kl.device))

            # --- 3. log (sums reduced over processes, then divided)
            sums = rollout_metrics(rollout, terminator)
            keys = sorted(sums)
            total = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=device), "sum")
            sums = dict(zip(keys, total.tolist()))
            counters["tokens_total"] += sums["tokens"]
            row = {
                "step": step + 1,
                "loss": stats["loss"],
                "kl": sums["kl_sum"] / max(sums["tokens"], 1.0),
                "kl_kept": sums["kl_loss_sum"] / max(sums["loss_tokens"], 1.0),
                "threshold": threshold_used,
                "active": bool(active_used),
                "cut_rate": sums["cut_rows"] / sums["rows"],
                "eos_rate": sums["eos_rows"] / sums["rows"],
                "mean_length": sums["tokens"] / sums["rows"],
                "kept_length": sums["loss_tokens"] / sums["rows"],
                "tokens": sums["tokens"],
                "tokens_total": counters["tokens_total"],
                "grad_norm": stats["grad_norm"],
                "lr": scheduler.get_last_lr()[0],
                "time_rollout": t1 - t0,
                "time_learn": t2 - t1,
            }
            if "shadow_rows" in sums:
                row["shadow_rate"] = sums["shadow_rows"] / sums["rows"]
            log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", kl=f"{row['kl']:.3f}",
                            thr="-" if threshold_used is None else f"{threshold_used:.3f}",
                            cut=f"{row['cut_rate']:.2f}", len=f"{row['mean_length']:.0f}")

            # --- 4. evaluate, write traces, checkpoint
            done = step + 1
            if cfg.eval_every and eval_sets and done % cfg.eval_every == 0 and done < cfg.steps:
                ev = run_eval(accelerator, student, tokenizer, eval_sets, cfg, f"step {done}")
                log({"step": done, "eval": "periodic", **ev})
            if accelerator.is_main_process and cfg.n_traces and (
                    done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                append_jsonl(traces_path, make_traces(rollout, tokenizer, terminator, cfg, done))
            if (cfg.save_every and done % cfg.save_every == 0) or stop["stop"] or done == cfg.steps:
                save_checkpoint(accelerator, cfg, done, terminator, counters)
            if stop["stop"]:
                accelerator.print(f"stopped by signal after step {done}; resume with --resume latest")
                accelerator.end_training()
                return {"stopped_at": done, **results}
    bar.close()

    # --- 5. final evaluation and the trained student
    if eval_sets:
        results["after"] = run_eval(accelerator, student, tokenizer, eval_sets, cfg, "after")
        log({"step": cfg.steps, "eval": "after", **results["after"]})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out = os.path.join(cfg.output_dir, "student")
        accelerator.unwrap_model(student).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if cfg.plot:
            from kat.plot import plot_run
            plot_run(cfg.output_dir)
        with open(os.path.join(cfg.output_dir, "results.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    accelerator.end_training()
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        train(load_config(argv))
    except (ConfigError, DataError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
