"""What a training run writes to disk: resumable checkpoints and the trained student.

- A checkpoint (`save_checkpoint`) is Accelerate's `save_state` (student, optimiser, schedule,
  every process's RNG state; under FSDP the shards as the launcher's state-dict type says) plus
  the terminator's statistics, the step and the counters, and a loadable copy of the student. It
  is written under a temporary name and renamed when complete; the last `keep_last` are kept.
- The student (`save_student`) is written in Hugging Face format. Saving is collective: every
  process calls it, Accelerate's `get_state_dict` gathers the full state dict (under FSDP an
  all-gather of the shards), and the main process writes it. A LoRA student writes its adapter
  (small; `adapter/` beside `student/`) and, at the end of training, a merged copy in `student/`
  that loads like any model.
- A model card (README.md beside the final student) says what the student is: base models, data,
  the command, the final evaluation and the whole config.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import yaml

from kat.config import Config, ConfigError
from kat.models import is_lora
from kat.rundir import CHECKPOINT_NAME, check_output_dir, check_resume, check_tracker, is_checkpoint

ADAPTER_DIR = "adapter"


def save_student(accelerator, student, tokenizer, where: str, *, merge: bool = False, card: str = "") -> None:
    """Write the student into directory `where` (every process calls this; the main process writes).

    `where/student` holds the model in Hugging Face format. A LoRA student writes its adapter to
    `where/adapter` and, with `merge` (the end of training), its merged weights to `where/student`;
    without `merge` (a checkpoint) only the adapter is written. The model card `card` (markdown)
    becomes `where/student/README.md`.
    """
    state = accelerator.get_state_dict(student)  # collective: the full weights on the main process
    model = accelerator.unwrap_model(student)
    if not accelerator.is_main_process:
        return
    # a gathered state dict holds tied weights (e.g. the output head tied to the embeddings) as
    # separate copies, which save_pretrained would write twice: keep the first name of each
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    state = {k: v for k, v in state.items() if k not in tied}
    out = os.path.join(where, "student")
    if is_lora(model):
        model.save_pretrained(os.path.join(where, ADAPTER_DIR), state_dict=state)
        tokenizer.save_pretrained(os.path.join(where, ADAPTER_DIR))
        if not merge:
            return
        model = model.merge_and_unload()  # training is over: merging in place costs no copy of the weights
        state = None
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if card:
        with open(os.path.join(out, "README.md"), "w") as fh:
            fh.write(card)


def checkpoints(output_dir: str, complete: bool = False) -> list[str]:
    """Checkpoint folders in `output_dir` (named exactly checkpoint-NNNNNN), oldest first; with
    `complete` only those holding their progress.json (kat.rundir.is_checkpoint). A user's
    `checkpoint-important/` or `checkpoint-0.txt` is neither."""
    if not os.path.isdir(output_dir):
        return []
    found = sorted(d for d in os.listdir(output_dir)
                   if CHECKPOINT_NAME.fullmatch(d) and os.path.isdir(os.path.join(output_dir, d)))
    return [d for d in found if is_checkpoint(os.path.join(output_dir, d))] if complete else found


def save_checkpoint(accelerator, cfg: Config, step: int, terminator, counters: dict, student=None,
                    tokenizer=None) -> str:
    """Write checkpoint-<step> (every process calls this) and prune old ones; returns its path."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{step:06d}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if student is not None:
        save_student(accelerator, student, tokenizer, tmp)
    accelerator.wait_for_everyone()  # every process writes its own RNG state into tmp first
    if accelerator.is_main_process:
        torch.save(terminator.state_dict(), os.path.join(tmp, "terminator.pt"))
        with open(os.path.join(tmp, "progress.json"), "w") as fh:
            json.dump({"step": step, **counters, "config": cfg.to_dict()}, fh, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)  # a checkpoint directory exists only once it is complete
        for old in checkpoints(cfg.output_dir, complete=True)[:-cfg.keep_last]:  # only what a run wrote
            shutil.rmtree(os.path.join(cfg.output_dir, old))
    accelerator.wait_for_everyone()
    return final


def _instead(path: str) -> str:
    """Which checkpoint to resume from when `path` cannot be used: the newest complete one before it."""
    where, name = os.path.split(os.path.normpath(path))
    older = [d for d in checkpoints(where, complete=True) if d < name]
    if older:
        return f"resume from the one before it with --resume {os.path.join(where, older[-1])}"
    return f"no complete checkpoint precedes it in {where!r}; start a new run"


def find_checkpoint(cfg: Config) -> str | None:
    """The checkpoint `cfg.resume` names (`latest`: the newest in output_dir), or None."""
    if not cfg.resume:
        return None
    if cfg.resume != "latest":
        path = cfg.resume
    else:
        done = checkpoints(cfg.output_dir)
        if not done:
            raise ConfigError(f"resume: no checkpoint found in {cfg.output_dir!r}; train without --resume first")
        path = os.path.join(cfg.output_dir, done[-1])
    if not os.path.isfile(os.path.join(path, "progress.json")):
        raise ConfigError(f"resume: {path!r} is not a complete checkpoint (progress.json missing); "
                          f"it may be partial from an interrupted save; {_instead(path)}")
    return path


def read_progress(path: str) -> dict:
    """A checkpoint's progress.json: the step, the counters and the config it was written with."""
    try:
        with open(os.path.join(path, "progress.json")) as fh:
            progress = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"resume: {path!r} has an unreadable progress.json ({err}); {_instead(path)}") from None
    need = {"step": int, "tokens_total": (int, float), "bad_in_a_row": int, "config": dict}
    bad = [k for k, kind in need.items() if not isinstance(progress, dict) or not isinstance(progress.get(k), kind)]
    if bad or isinstance(progress["step"], bool) or progress["step"] < 0:
        raise ConfigError(f"resume: {os.path.join(path, 'progress.json')!r} is not a checkpoint's progress "
                          f"(missing or wrong: {', '.join(bad) or 'step'}); {_instead(path)}")
    return progress


def check_start(cfg) -> tuple[list[str], str]:
    """(what overwrite_output_dir removes, the checkpoint to resume or ""), every check made before
    the models load: the tracker, the output folder, the checkpoint and its config against cfg."""
    check_tracker(cfg.log_with)
    overwrite = check_output_dir(cfg)
    ckpt = find_checkpoint(cfg) or ""
    if ckpt:
        check_resume(cfg, ckpt, read_progress(ckpt))
    return overwrite, ckpt


def load_checkpoint(accelerator, path: str, terminator, output_dir: str) -> dict:  # noqa: ARG001
    """Restore a checkpoint's states into the prepared objects and the terminator; returns its progress."""
    try:
        accelerator.load_state(path)
        terminator.load_state_dict(torch.load(os.path.join(path, "terminator.pt"), weights_only=False))
    except Exception as err:  # noqa: BLE001 - any unreadable piece means the same thing
        raise ConfigError(f"resume: checkpoint {path!r} is corrupt or incomplete ({type(err).__name__}: "
                          f"{err}); {_instead(path)}") from None
    return read_progress(path)


def model_card(cfg: Config, results: dict, command: str, processes: int) -> str:
    """README.md of the saved student: what it was distilled from, on what, how, and how it scores."""
    hub = [s for s in (cfg.train_data.split("[")[0],) if "/" in s and not os.path.exists(s)]
    front = {"base_model": cfg.student, "library_name": "transformers",
             "tags": ["kat", "on-policy-distillation", "knowledge-distillation"], **({"datasets": hub} if hub else {})}
    after = results.get("after") or {}
    rows = sorted({k.rsplit("/", 1)[0] for k in after})
    table = ["| set | avg@k | pass@k | mean length |", "|---|---|---|---|"] + [
        f"| {s} | {100 * after[f'{s}/avg@k']:.2f}% | {100 * after[f'{s}/pass@k']:.2f}% | "
        f"{after[f'{s}/mean_length']:.1f} |" for s in rows]
    method = {"kat": "KAT (KL Agreement Trap Termination)" + (" with the drift gate" if cfg.gate == "drift" else ""),
              "random": "random termination (length-matched control)", "none": "no termination (plain OPD)",
              "drift": "a cut right after the first drift token (the drift gate's contrast)",
              "oracle": "the oracle cut at the toy world's ground-truth first error or loop start"}[cfg.termination]
    lora = f" as a LoRA adapter (r = {cfg.lora_r}, alpha = {cfg.lora_alpha}), merged here" if cfg.lora_r else ""
    return "\n".join([
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {os.path.basename(os.path.normpath(cfg.output_dir))}: a student distilled on-policy", "",
        f"`{cfg.student}` distilled on-policy from the teacher `{cfg.teacher}`{lora}: the student samples "
        f"its own completions, the frozen teacher scores every token, and the student minimises the per-token "
        f"reverse KL (`{cfg.loss}` loss), with {method}. {cfg.steps} steps of {cfg.batch_size} prompts x "
        f"{cfg.samples_per_prompt} samples on each of {processes} process(es), at most {cfg.max_new_tokens} "
        "new tokens per rollout.", "",
        "## Data", "", f"- training prompts: `{cfg.train_data}` (split `{cfg.train_split}`)",
        f"- evaluation: `{cfg.eval_data or 'none'}`", "",
        "## Final evaluation", "",
        *(table if rows else ["No evaluation set was configured."]),
        "", f"k samples per problem at temperature {cfg.eval_temperature}, top-p {cfg.eval_top_p}, grader "
        f"`{cfg.grader}`.", "",
        "## Command", "", "```bash", command, "```", "",
        "## Config", "", "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip(), "```", ""])
