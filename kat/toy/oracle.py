"""The oracle cut: a toy-only arm (termination: oracle) that cuts each rollout at the trap start the
toy world knows (`kat.toy.world.oracle_cut`), with KAT's bookkeeping: the cut segment and
everything after it leave the loss; no eos is appended and nothing is trained to stop there.

The cut is applied to the finished rollout (a mask over the generated tokens), not while decoding.
The loss is the same either way: the loss of position t reads only the prefix y_<t+1 and the teacher
at t, so tokens generated past the cut change no kept term. What differs is the compute, the
generated-token counts and the random stream of later rows' tokens; the oracle is an upper bound
on what a cut can win in accuracy, not a cost measurement.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kat.rollout import STOP_TRAP, Rollout
from kat.toy.world import oracle_cut, parse_prompt


def oracle_positions(rollout: Rollout, prompts: list[str], tokenizer) -> torch.Tensor:
    """(B,) long: the oracle's cut position per row, -1 where the row is not cut.

    One character is one toy token, so a character position is a completion position. A special
    token inside a completion (say an early <bos>) is read as a character no solution has.
    """
    eos, special = tokenizer.eos_token_id, set(tokenizer.all_special_tokens)
    out = []
    for b, prompt in enumerate(prompts):
        n = int(rollout.completion_mask[b].sum())
        ids = rollout.completion_ids[b, :n].tolist()
        ended = bool(ids) and ids[-1] == eos
        # a special token inside a completion is no character of any solution: '?' holds its place
        chars = ["?" if t in special else t for t in tokenizer.convert_ids_to_tokens(ids[:n - int(ended)])]
        if any(len(c) != 1 for c in chars):
            raise ValueError(f"oracle: row {b} has tokens of several characters; the oracle needs the toy "
                             "world's one-character tokenizer")
        text = "".join(chars)
        cut = oracle_cut(text, parse_prompt(prompt), ended)
        out.append(-1 if cut is None or cut >= n else cut)
    return torch.tensor(out, dtype=torch.long, device=rollout.cut.device)


def apply_cuts(rollout: Rollout, cuts: torch.Tensor) -> Rollout:
    """The rollout with rows cut at `cuts` (-1: not cut): loss_mask drops positions >= cut, `cut` and
    `stop` (STOP_TRAP) record it. A row already cut keeps the earlier of the two cuts."""
    T = rollout.loss_mask.shape[1]
    has = cuts >= 0
    new_cut = torch.where(has, torch.minimum(cuts, rollout.cut), rollout.cut)
    keep = torch.arange(T, device=cuts.device)[None, :] < new_cut[:, None]
    mask = rollout.loss_mask & keep
    logits = rollout.teacher_logits
    if logits is not None:  # packed at the old mask's positions: keep those the new mask keeps
        logits = logits[mask[rollout.loss_mask]]
    stop = torch.where(has & (new_cut < rollout.lengths), torch.full_like(rollout.stop, STOP_TRAP), rollout.stop)
    return replace(rollout, loss_mask=mask, cut=new_cut, stop=stop, teacher_logits=logits)


def oracle_rollout(rollout: Rollout, prompts: list[str], tokenizer) -> Rollout:
    """`rollout` cut where the oracle cuts it."""
    return apply_cuts(rollout, oracle_positions(rollout, prompts, tokenizer))
