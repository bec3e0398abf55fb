"""KAT: on-policy distillation with KL Agreement Trap Termination.

The public pieces work on plain tensors and Hugging Face models, so they drop into other trainers:

    from kat import reverse_kl, TrapDetector, sample, opd_loss

- scorer: `reverse_kl`, `token_logp`, `topk_tail` (fp16/bf16 logits in, fp32 accumulation, chunked)
- sampler: `sample` (chunked decoding of student + teacher with online termination; its modes
  lockstep / post-hoc / unscored are `Mode`, chosen by `sampling_mode`)
- terminators: `TrapDetector`, `RandomTerminator`, `NoTerminator`, `make_terminator`
- learner: `opd_loss`, `learn`, `completion_logits`, `build_optimizer`
- config / train / evaluate: `Config`, `load_config`, `check_value` (the bounds every class shares),
  `train`, `evaluate`, `pass_at_k`, `avg_at_k`
"""

from kat.terminators import NoTerminator, RandomTerminator, TerminatorState, TrapDetector, make_terminator
from kat.rollout import STOP_EOS, STOP_LENGTH, STOP_NAMES, STOP_RANDOM, STOP_TRAP, Rollout, stop_name
from kat.sampler import Mode, sample, sampling_mode
from kat.scorer import reverse_kl, token_logp, topk_tail

__version__ = "0.1.0"

_LAZY = {  # heavier modules (transformers, datasets, accelerate) load on first use
    "opd_loss": "kat.learner", "learn": "kat.learner", "completion_logits": "kat.learner",
    "build_optimizer": "kat.learner", "Config": "kat.config", "load_config": "kat.config",
    "ConfigError": "kat.config", "check_value": "kat.config", "train": "kat.train", "evaluate": "kat.evaluate",
    "pass_at_k": "kat.evaluate", "avg_at_k": "kat.evaluate", "grade": "kat.evaluate",
}

__all__ = ["reverse_kl", "token_logp", "topk_tail", "sample", "sampling_mode", "Mode", "Rollout", "TrapDetector",
           "RandomTerminator", "NoTerminator", "TerminatorState", "make_terminator", "STOP_EOS", "STOP_LENGTH",
           "STOP_TRAP", "STOP_RANDOM", "STOP_NAMES", "stop_name", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kat' has no attribute {name!r}")
