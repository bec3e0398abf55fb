"""KAT's token selection inside TRL's `DistillationTrainer` (trl >= 1.16).

TRL's on-policy distillation generates a batch of completions with the student (`transformers`
or vLLM), then minimises a divergence to the teacher over every completion token; ``beta=1.0``
selects the reverse KL, whose per-token term is the paper's

    d_t = sum_v p(v) (log p(v) - log q(v)),   p = softmax(student logits), q = softmax(teacher logits)

`KATDistillationTrainer` inserts one stage between generation and the loss, once per optimiser
step (`select_tokens`):

1. score: one forward of the student and one of the teacher over prompt + completion, without
   gradient or dropout, give d_t at every generated position (at TRL's loss temperature, 1 by default),
   and, for the drift gate and the drift cut, the teacher's log-probability of each sampled token.
   The teacher's last hidden states are kept and handed to TRL's loss, which would otherwise
   run the teacher's decoder again for the same tokens. Both models run as TRL's loss runs them,
   outside the autocast that Accelerate's mixed precision wraps around a prepared model's forward
   (`without_autocast`), so with ``bf16=True`` the handed-over states are TRL's own;
2. detect: the `kat.terminators.TrapDetector` runs over each completion's d_t. The whole completion
   goes in as one chunk: a row's decisions depend only on its own past d_t and on the threshold,
   which is fixed during a step, so this cuts exactly where feeding it while decoding would;
3. select: the cut segment and everything after it leave the loss (through TRL's ``tool_mask``,
   which its loss multiplies into the completion mask), and the loss is normalised by the kept
   tokens of the whole step over every process and micro-batch (TRL's ``num_items_in_batch``);
4. calibrate: `detector.end_batch` with every process's per-rollout minima, so all processes
   cut with one threshold from the next step on.

What this keeps, against the lockstep sampler of `kat train`: KAT's choice of tokens (the same
detector on the same d_t). What it gives up: the generation that stopping early saves. TRL's
decoder runs every completion to EOS or ``max_completion_length`` and KAT sees d_t only after
that; in exchange it needs nothing from the decoder, so it works with TRL's vLLM generation.
It also pays for d_t before the loss: one more forward of the student without gradient and one
more pass of the teacher's head (TRL's loss computes d_t too, but inside its own forward, after
the kept-token count it divides by must already be known).

    from kat import TrapDetector
    from kat.integrations.trl import KATDistillationTrainer
    from trl import DistillationConfig

    trainer = KATDistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=prompts,
        args=DistillationConfig(output_dir="out", beta=1.0),
        detector=TrapDetector(window=64, stride=64, patience=4, exempt=256, eta=0.3))
    trainer.train()

Logged through TRL's logging (averaged over ``logging_steps``): ``kat/cut_rate``,
``kat/threshold`` (None before the detector has minima), ``kat/active``,
``kat/kept_length`` (tokens per completion that reach the loss), ``kat/kl`` and ``kat/kl_kept``
(mean d_t over generated and over kept tokens), ``kat/would_cut_rate`` in shadow mode. The
detector's state is saved in every checkpoint (``kat_detector.pt``) and restored on resume.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from kat.scorer import reverse_kl, token_logp
from kat.terminators import TerminatorState, TrapDetector

try:
    import trl
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl import DistillationTrainer
except ImportError as err:  # the rest of kat never needs TRL
    raise ImportError(f"kat.integrations.trl needs TRL >= 1.16 (its DistillationTrainer); install it with "
                      f"`pip install 'kat[trl]'` or `pip install 'trl>=1.16'` ({err})") from err
# The hook overrides these methods of TRL's trainer (private API, tested with trl 1.16.0).
_HOOKS = ("_generate_and_score_completions", "_compute_loss", "_get_last_hidden_state", "_save_checkpoint",
          "_load_optimizer_and_scheduler")
if not all(hasattr(DistillationTrainer, m) for m in _HOOKS):
    raise ImportError(f"kat.integrations.trl: trl {trl.__version__}'s DistillationTrainer lacks one of {_HOOKS}, "
                      "which KAT's hook overrides; install the tested version with `pip install 'trl==1.16.0'`")

DETECTOR_FILE = "kat_detector.pt"
TEACHER_HIDDEN = "kat_teacher_hidden"  # batch key: the teacher's (B, T, H) hidden states from the scoring pass

# Batch keys of vision-language models: the scoring forward passes text only.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")

# The default detector: the paper's settings (as in configs/qwen3_1.7b.yaml, with the paper's exempt 256);
# TrapDetector's own defaults are kat.config's, sized for the toy world.
PAPER_DETECTOR = dict(window=64, stride=64, patience=4, exempt=256, eta=0.3, buffer_size=4096, min_buffer=512,
                      warmup_steps=50)



def _completion_logits(model, input_ids: Tensor, attention_mask: Tensor, completion_len: int,
                       logits_to_keep: bool) -> Tensor:
    """(b, T, V): the logits that predict the T completion tokens, from the forward TRL's loss
    runs (ids and attention mask; the model derives positions from the mask)."""
    kw = {"logits_to_keep": completion_len + 1} if logits_to_keep else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits
    return logits[:, -(completion_len + 1) : -1]  # column P-1+t predicts completion token t


class Scores(NamedTuple):
    """What the scoring pass returns (see `score_completions`)."""

    kl: Tensor  # (B, T) float32 d_t, 0 off the completion mask
    hidden: Tensor | None  # (B, T, H) the teacher's last hidden states, or None
    teacher_logp: Tensor | None  # (B, T) float32 log q(y_t) at temperature 1, 0 off the mask, or None


@contextmanager
def without_autocast(*modules):
    """Run `modules` without the autocast wrapper that Accelerate's mixed precision puts on a
    prepared model's ``forward`` (it keeps the unwrapped forward in ``_original_forward``).

    TRL's loss never goes through that wrapper: it calls the teacher's backbone itself, and the
    student's forward is redirected around it. So the scoring pass, whose teacher hidden states
    the loss reuses and whose d_t the detector reads, runs both models the same way; with bf16 and
    an fp32 teacher the reused states would otherwise differ from the ones TRL computes.
    """
    swapped = []
    for module in modules:
        original = module.__dict__.get("_original_forward")
        if original is not None and "forward" in module.__dict__:
            swapped.append((module, module.__dict__["forward"]))
            module.forward = original
    try:
        yield
    finally:
        for module, forward in reversed(swapped):
            module.forward = forward


@torch.no_grad()
def score_completions(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                      completion_mask: Tensor, *, temperature: float = 1.0, rows: int | None = None,
                      logits_to_keep: bool = True, teacher_backbone=None, teacher_logp: bool = False) -> Scores:
    """Reverse KL d_t at every completion position, and optionally the teacher's hidden states and
    its log-probability of each sampled token.

    d_t = KL(p || q) with p = softmax(s / tau), q = softmax(t / tau) for student and teacher
    logits s, t: the per-token term of TRL's loss at ``beta=1`` (its ``temperature`` tau scales
    both). Prompts left-padded, completions right-padded, as TRL builds them. One forward of each
    model per `rows` rows (all at once by default), accumulation in fp32 (`kat.scorer.reverse_kl`).

    Returns `Scores`: kl (B, T) float32, 0 where completion_mask is 0; hidden: when
    `teacher_backbone` (the teacher's decoder stack, ``teacher.base_model``) is given and returns
    ``last_hidden_state``, the (B, T, H) hidden states that predict the completion tokens (what
    TRL's loss computes from the teacher before its head, so it need not run the teacher again),
    otherwise None; teacher_logp: with ``teacher_logp=True``, log q(y_t) (B, T) float32 of each
    completion token at temperature 1, as kat's sampler records it for the drift gate (0 off the
    mask), otherwise None.
    """
    batch, completion_len = completion_ids.shape
    rows = rows or batch
    kls, hiddens, logps = [], [], []
    captured: list = []
    hook = (teacher_backbone.register_forward_hook(lambda m, a, out: captured.append(out))
            if teacher_backbone is not None else None)
    try:
        for i in range(0, batch, rows):
            sl = slice(i, i + rows)
            ids = torch.cat([prompt_ids[sl], completion_ids[sl]], dim=1)  # (b, P + T)
            mask = torch.cat([prompt_mask[sl], completion_mask[sl]], dim=1)  # (b, P + T)
            s = _completion_logits(student, ids, mask, completion_len, logits_to_keep)  # (b, T, V)
            captured.clear()
            t = _completion_logits(teacher, ids, mask, completion_len, logits_to_keep)  # (b, T, V)
            if teacher_logp:  # on the raw logits: the drift threshold is a probability at temperature 1
                logps.append(torch.where(completion_mask[sl].bool(), token_logp(t, completion_ids[sl]), 0.0))
            if temperature != 1.0:
                s, t = s / temperature, t / temperature
            kl = reverse_kl(s, t.to(s.device))  # (b, T) KL(p_student || q_teacher)
            kls.append(torch.where(completion_mask[sl].bool(), kl, 0.0))
            h = getattr(captured[-1], "last_hidden_state", None) if captured else None  # (b, P + T, H)
            hiddens.append(None if h is None else h[:, -(completion_len + 1) : -1].contiguous())  # (b, T, H)
    finally:
        if hook is not None:
            hook.remove()
    hidden = torch.cat(hiddens) if hiddens and all(h is not None for h in hiddens) else None
    return Scores(torch.cat(kls), hidden, torch.cat(logps) if teacher_logp else None)


def completion_kl(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                  completion_mask: Tensor, *, temperature: float = 1.0, rows: int | None = None,
                  logits_to_keep: bool = True) -> Tensor:
    """Reverse KL d_t at every completion position: (B, T) float32, 0 where completion_mask is 0.

    See `score_completions`, which also returns the teacher's hidden states and log-probs.
    """
    return score_completions(student, teacher, prompt_ids, prompt_mask, completion_ids, completion_mask,
                             temperature=temperature, rows=rows, logits_to_keep=logits_to_keep).kl


def trap_mask(detector, kl: Tensor, valid: Tensor,
              teacher_logp: Tensor | None = None) -> tuple[TerminatorState, Tensor]:
    """Run a terminator over whole completions; returns its state and the kept mask.

    kl (B, T) float: d_t; valid (B, T) bool: positions the student generated; teacher_logp (B, T)
    float: log q(y_t) of the sampled tokens, required by (and passed only to) terminators whose
    ``needs_teacher_logp`` is True (the drift gate, the drift cut). The kept mask (B, T) bool is
    `valid` before each row's cut (the first excluded position; rows that were not cut keep all
    their valid positions). Call ``detector.end_batch(state, step)`` afterwards.
    """
    extra = {}
    if getattr(detector, "needs_teacher_logp", False):
        if teacher_logp is None:
            raise ValueError(f"{type(detector).__name__} reads the teacher's log-prob of each sampled token; "
                             "pass teacher_logp (score_completions(..., teacher_logp=True) gives it)")
        extra["teacher_logp_chunk"] = teacher_logp.detach().float().cpu()
    state = detector.start(kl.shape[0], "cpu")
    # The detector walks positions one by one on small (B,) tensors: cheaper on the host.
    detector.observe(state, kl.detach().float().cpu(), valid.cpu(), **extra)  # the whole completion as one chunk
    completion_len = kl.shape[1]
    cut = torch.where(state.fired, state.cut, completion_len).to(valid.device)  # (B,)
    kept = valid & (torch.arange(completion_len, device=valid.device) < cut[:, None])  # (B, T)
    return state, kept


class KATDistillationTrainer(DistillationTrainer):
    """TRL's `DistillationTrainer` trained only on the tokens KAT keeps (see the module docstring).

    Takes every argument of `trl.DistillationTrainer` (the teacher is required) and:

    detector: the terminator that chooses the tokens, a `kat.TrapDetector` by default (the
        paper's settings: window 64, stride 64, patience 4, exempt 256, eta 0.3, 50 warm-up steps).
        Any kat terminator works: `kat.RandomTerminator` gives the length-matched control (it
        needs no d_t, so the scoring forwards are skipped), ``TrapDetector(shadow=True)`` logs
        would-be cuts and trains on everything, ``TrapDetector(gate="drift")`` and
        `kat.terminators.DriftTerminator` also get log q(y_t) of the sampled tokens.
    score_batch_size: rows per scoring forward (default: ``per_device_train_batch_size``); the
        scoring pass holds (rows, completion length, vocabulary) logits of both models at once.
    reuse_teacher: keep the teacher's last hidden states from the scoring forward and hand them
        to TRL's loss instead of running the teacher's decoder again (default True). Costs one
        (generation batch, completion length, teacher hidden size) tensor per step in the
        teacher's dtype; False trades that memory for a second teacher forward.

    Evaluation runs TRL's loss over every token and leaves the detector as it is.
    """

    def __init__(self, *args, detector=None, score_batch_size: int | None = None, reuse_teacher: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if self.teacher_model is None:
            raise ValueError("KATDistillationTrainer needs teacher_model: KAT's cuts come from the teacher's "
                             "per-token KL; pass a model or a path as teacher_model=")
        detector = TrapDetector(**PAPER_DETECTOR) if detector is None else detector
        missing = [m for m in ("start", "observe", "end_batch", "state_dict", "load_state_dict")
                   if not callable(getattr(detector, m, None))]
        if missing:
            raise TypeError(f"detector: {type(detector).__name__} lacks {missing}; pass a kat.TrapDetector "
                            "(or another kat terminator)")
        if score_batch_size is not None and (int(score_batch_size) != score_batch_size or score_batch_size < 1):
            raise ValueError(f"score_batch_size must be a positive integer, got {score_batch_size!r}")
        self.detector = detector
        self.score_batch_size = int(score_batch_size or self.args.per_device_train_batch_size)
        self.reuse_teacher = bool(reuse_teacher)
        self._teacher_hidden: Tensor | None = None  # (b, T, H) for the micro-batch whose loss is running

    # -- the hook: after TRL's generation, before its loss ----------------------------------------

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return batch
        return self.select_tokens(batch)

    def select_tokens(self, batch: dict) -> dict:
        """Apply KAT to one generation batch (this process's rows of one optimiser step).

        `batch` is what TRL's generation returns: prompt_ids / prompt_mask (B, P) left-padded,
        completion_ids / completion_mask (B, T) right-padded, optional tool_mask (B, T).
        Returns it with ``tool_mask`` = the kept positions and ``num_items_in_batch`` = their
        count over all processes; updates the detector (a collective: every process calls this
        once per step, as TRL's generation does).
        """
        multimodal = [k for k in _MULTIMODAL_KEYS if k in batch]
        if multimodal:
            raise ValueError(f"KATDistillationTrainer scores text-only batches; this one carries {multimodal}. "
                             "Use trl.DistillationTrainer for vision-language models")
        valid = batch["completion_mask"].bool()  # (B, T)
        if "tool_mask" in batch:  # tool outputs were not generated by the student: never scored or kept
            valid = valid & batch["tool_mask"].bool()
        step = self.state.global_step
        if getattr(self.detector, "needs_kl", True):
            backbone = self.accelerator.unwrap_model(self.teacher_model).base_model if self.reuse_teacher else None
            # d_t of the policy itself, without dropout noise (as kat's sampler scores it); the loss's
            # own forward runs in training mode, as TRL's does
            self.teacher_model.eval()
            was_training = self.model_wrapped.training
            self.model_wrapped.eval()
            unwrapped = (self.accelerator.unwrap_model(m) for m in (self.model_wrapped, self.teacher_model))
            try:
                with without_autocast(*unwrapped):  # as TRL's loss runs both models
                    scores = score_completions(
                        self.model_wrapped, self.teacher_model, batch["prompt_ids"], batch["prompt_mask"],
                        batch["completion_ids"], batch["completion_mask"], temperature=self.temperature,
                        rows=self.score_batch_size, logits_to_keep="logits_to_keep" in self.model_kwarg_keys,
                        teacher_backbone=backbone,
                        teacher_logp=bool(getattr(self.detector, "needs_teacher_logp", False)))
            finally:
                self.model_wrapped.train(was_training)
            kl, logp = scores.kl, scores.teacher_logp  # (B, T), (B, T) or None
            self._check_finite(kl, valid, step)
            if scores.hidden is not None:  # (B, T, H) split and shuffled with the rest of the batch by TRL
                batch[TEACHER_HIDDEN] = scores.hidden
        else:
            kl, logp = torch.zeros(valid.shape, device=valid.device), None
        state, kept = trap_mask(self.detector, kl, valid, logp)
        batch["tool_mask"] = kept.to(batch["completion_mask"].dtype)
        batch["num_items_in_batch"] = self.accelerator.gather(kept.sum()).sum()
        self._log_selection(state, kl, valid, kept)
        self.detector.end_batch(state, step)
        return batch

    # -- TRL's loss: the teacher's hidden states from the scoring pass instead of a second forward ---

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        self._teacher_hidden = inputs.get(TEACHER_HIDDEN)
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._teacher_hidden = None

    def _get_last_hidden_state(self, unwrapped_model, *args, **kwargs):
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        if (self._teacher_hidden is not None and unwrapped_model is teacher
                and unwrapped_model is not self.accelerator.unwrap_model(self.model)):  # not self-distillation
            hidden, self._teacher_hidden = self._teacher_hidden, None
            return hidden
        return super()._get_last_hidden_state(unwrapped_model, *args, **kwargs)

    def _check_finite(self, kl: Tensor, valid: Tensor, step: int) -> None:
        """Stop on non-finite d_t on every process together (one alone would leave the others
        waiting in the detector's gather), naming the step and this process's rows."""
        bad_rows = (valid & ~torch.isfinite(kl)).any(dim=1)  # (B,)
        if self.accelerator.gather(bad_rows.sum()).sum().item() > 0:
            rows = bad_rows.nonzero().flatten().tolist()
            raise FloatingPointError(f"step {step + 1}: non-finite reverse KL between student and teacher in rows "
                                     f"{rows} of process {self.accelerator.process_index} (the others' are reported "
                                     "by them); check both models' weights and dtype")

    def _log_selection(self, state: TerminatorState, kl: Tensor, valid: Tensor, kept: Tensor) -> None:
        """Rates and lengths over every process's rows, into TRL's metrics (averaged at each log)."""
        local = torch.stack([
            torch.tensor(float(valid.shape[0]), device=valid.device),
            state.fired.sum().to(valid.device, torch.float32),
            (state.would_cut >= 0).sum().to(valid.device, torch.float32),
            valid.sum().float(),
            kept.sum().float(),
            (kl * valid).sum().float(),
            (kl * kept).sum().float(),
        ])
        rows, cut, would_cut, tokens, kept_tokens, kl_sum, kl_kept = (
            self.accelerator.gather(local).view(-1, local.numel()).sum(0).tolist())
        metrics = self._metrics["train"]
        metrics["kat/cut_rate"].append(cut / rows)
        metrics["kat/kept_length"].append(kept_tokens / rows)
        metrics["kat/active"].append(float(state.active))
        # TRL's averaging drops NaN: the log shows None until the detector has a threshold
        metrics["kat/threshold"].append(math.nan if state.threshold is None else state.threshold)
        if getattr(self.detector, "needs_kl", True):
            metrics["kat/kl"].append(kl_sum / max(tokens, 1.0))
            metrics["kat/kl_kept"].append(kl_kept / max(kept_tokens, 1.0))
        if getattr(self.detector, "shadow", False):
            metrics["kat/would_cut_rate"].append(would_cut / rows)

    # -- checkpoints: the detector's buffer travels with the optimiser state ------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            path = os.path.join(self._get_output_dir(trial=trial), folder, DETECTOR_FILE)
            torch.save(self.detector.state_dict(), path)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DETECTOR_FILE)
        if os.path.isfile(path):
            self.detector.load_state_dict(torch.load(path, weights_only=False))
        else:
            warnings.warn(f"{path} not found (a checkpoint without KAT's state, e.g. from trl.DistillationTrainer): "
                          "the detector starts empty and warms up again", stacklevel=2)
