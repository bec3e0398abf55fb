"""The slot KV cache (kat.slots) against transformers' DynamicCache, and the refill engine's schedule independence."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kat.slots import SlotCache
from tests.conftest import tiny_llama


def _dynamic(model, ids, mask):
    """Prefill then decode `ids`'s last columns one by one with DynamicCache and a 2D mask; logits (b, L, V)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask.long(), position_ids=pos, cache=DynamicCache(), use_cache=True)
    return out.logits


def _grow(mask, n: int):
    return torch.cat([mask, torch.ones(mask.shape[0], n, dtype=torch.bool)], 1)


def _pos(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _prompts(vocab: int, lengths: list[int], width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = True
    return torch.where(mask, ids, 0), mask


def _slot_forward(model, cache: SlotCache, rows, ids, new_valid, positions):
    attn = cache.plan(rows, new_valid, model.dtype)
    return model(input_ids=ids, attention_mask=attn, position_ids=positions, cache=cache, use_cache=True).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slot_cache_matches_dynamic_cache_with_refill(dtype):
    model = tiny_llama(40, seed=5, layers=2, hidden=32).to(dtype)
    P, steps, S = 6, 5, 3
    ids, mask = _prompts(40, [6, 3, 1], P, seed=0)
    g = torch.Generator().manual_seed(1)
    gen = torch.randint(3, 40, (S, steps), generator=g)  # teacher-forced continuations
    full_ids, full_mask = torch.cat([ids, gen], 1), torch.cat([mask, torch.ones(S, steps, dtype=torch.bool)], 1)
    ref = _dynamic(model, full_ids, full_mask)  # (S, P + steps, V)

    cache = SlotCache.for_model(model, S, P + steps + 3)
    base = mask.sum(-1)  # (S,) real prompt lengths
    logits = _slot_forward(model, cache, None, ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0))
    real = mask
    torch.testing.assert_close(logits[real], ref[:, :P][real], atol=1e-5, rtol=0)
    for t in range(steps):
        out = _slot_forward(model, cache, None, gen[:, t : t + 1], torch.ones(S, 1, dtype=torch.bool),
                            (base + t)[:, None])
        torch.testing.assert_close(out[:, 0], ref[:, P + t], atol=1e-5, rtol=0)

    # empty slot 1 and refill it with a new prompt; the other slots go on decoding as before
    new_ids, new_mask = _prompts(40, [4], P, seed=7)
    new_gen = torch.randint(3, 40, (1, 3), generator=g)
    new_ref = _dynamic(model, torch.cat([new_ids, new_gen], 1), _grow(new_mask, 3))
    cache.reset(torch.tensor([1]))
    out = _slot_forward(model, cache, torch.tensor([1]), new_ids, new_mask, _pos(new_mask))
    torch.testing.assert_close(out[new_mask], new_ref[:, :P][new_mask], atol=1e-5, rtol=0)
    # a fresh (teacher-forced) continuation for slots 0 and 2 checked against a longer dynamic run
    more = torch.randint(3, 40, (S, 3), generator=g)
    ref2 = _dynamic(model, torch.cat([full_ids, more], 1), _grow(full_mask, 3))
    for t in range(3):
        tok = more[:, t : t + 1].clone()
        tok[1] = new_gen[0, t]
        positions = torch.stack([base[0] + steps + t, new_mask.sum() + t, base[2] + steps + t])[:, None]
        out = _slot_forward(model, cache, None, tok, torch.ones(S, 1, dtype=torch.bool), positions)
        torch.testing.assert_close(out[0, 0], ref2[0, P + steps + t], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[2, 0], ref2[2, P + steps + t], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1, 0], new_ref[0, P + t], atol=1e-5, rtol=0)


def test_slot_cache_chunk_forward_matches_token_by_token():
    """A (S, C) forward through the cache (the teacher's chunk) equals C single-token forwards, with
    a row whose last chunk positions are not real (after its EOS) hidden from later queries."""
    model = tiny_llama(40, seed=6, layers=2, hidden=32)
    P, C, S = 5, 4, 2
    ids, mask = _prompts(40, [5, 2], P, seed=3)
    chunk = torch.randint(3, 40, (S, C), generator=torch.Generator().manual_seed(4))
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    base = mask.sum(-1)
    caches = [SlotCache.for_model(model, S, P + C + 1) for _ in range(2)]
    for cache in caches:
        _slot_forward(model, cache, None, ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0))
    positions = base[:, None] + torch.arange(C)
    whole = _slot_forward(model, caches[0], None, chunk, valid, positions)
    for j in range(C):
        one = _slot_forward(model, caches[1], None, chunk[:, j : j + 1], valid[:, j : j + 1], positions[:, j : j + 1])
        torch.testing.assert_close(whole[valid[:, j], j], one[valid[:, j], 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[0].valid, caches[1].valid)
    torch.testing.assert_close(caches[0].length, torch.full((S,), P + C))
