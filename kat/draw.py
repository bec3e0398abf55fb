"""Drawing tokens from logits, the uniforms behind them, and position ids for left-padded rows.

Shared by the DynamicCache loop (kat.sampler) and the slot engine (kat.engine), so that both draw a
row's token the same way from the same uniform: by inverse CDF over the row's probabilities sorted in
descending order (nucleus-filtered with top_p < 1), which makes a row's tokens independent of which
other rows share its batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_token(logits: Tensor, u: Tensor | None, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """Draw one token per row from softmax(logits / temperature) restricted to the top-p nucleus.

    Args:
        logits: (A, V) next-token logits, any float dtype.
        u: (A,) uniforms in [0, 1), one per row; the token is the inverse CDF of u over the row's
            probabilities sorted in descending order. Ignored (may be None) when temperature == 0.
        temperature: 0 means greedy (argmax of the raw logits).
        top_p: keep the smallest set of most likely tokens whose mass reaches top_p.
    Returns:
        (A,) long token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # (A,)
    logits = logits.float()
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # (A, V)
    probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (A, V) each
    if top_p < 1.0:
        # nucleus: keep token i while the mass strictly before it is < top_p (the first one always stays)
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)  # (A, V)
    cdf = probs.cumsum(dim=-1)  # (A, V) unnormalised; the kept mass is cdf[:, -1]
    total = cdf[:, -1:].contiguous()  # (A, 1)
    # inverse CDF: the first i with cdf_i > u * total; rounding can land u * total on the end of the
    # cdf, so clamp to the first index reaching the total, which is a token with positive mass
    idx = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * total, right=True)  # (A, 1)
    idx = torch.minimum(idx, torch.searchsorted(cdf, total))  # (A, 1)
    return order.gather(-1, idx).squeeze(-1)  # (A,)


def uniforms(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(n,) uniforms from `generator` (or the global RNG), drawn on the generator's own device."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids for a left-padded mask: real tokens count 0, 1, ...; pads get 0 (never attended)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (A, L)
