"""Choosing next tokens for a batch whose rows have their own sampling parameters: what
``generate()`` does (repetition penalty, no end before ``min_new_tokens``, temperature, top-k,
top-p), done for all rows at once on the device: one decode loop serves viewers with
different settings, and per-row Python work would cost more than the step itself."""

from __future__ import annotations

import torch

from engine.types import SamplingParams


def pick_tokens(logits: torch.Tensor, params: list[SamplingParams | None], seen: torch.Tensor,
                generated: list[int], eos_ids: list[int],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row. ``logits`` [rows, vocab]; ``seen`` [rows, vocab] marks the ids of
    each row's prompt and output (for the repetition penalty); ``generated`` how many tokens
    each row has; a row's generator makes its samples repeatable (a seeded request)."""
    scores = logits.float()
    device = scores.device
    chosen = [p or SamplingParams(temperature=0.0, repetition_penalty=1.0) for p in params]
    # Decided from the parameters, not from device tensors: reading one back would wait for
    # the decode step the GPU is still running.
    if any(p.repetition_penalty != 1.0 for p in chosen):
        penalty = _on(device, [p.repetition_penalty for p in chosen])[:, None]
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(seen, penalized, scores)
    early = [n < p.min_new_tokens for n, p in zip(generated, chosen, strict=True)]
    if eos_ids and any(early):
        eos = torch.zeros(scores.shape[1], dtype=torch.bool, device=device)
        eos[_on(device, eos_ids)] = True
        scores = scores.masked_fill(_on(device, early)[:, None] & eos[None, :], float("-inf"))
    tokens = scores.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(chosen) if not p.greedy]
    if sampled_rows:
        rows = _on(device, sampled_rows)
        picked = _sample([chosen[i] for i in sampled_rows], scores[rows],
                         [generators[i] for i in sampled_rows])
        tokens[rows] = picked
    return tokens


def _sample(params: list[SamplingParams], scores: torch.Tensor,
            generators: list[torch.Generator | None]) -> torch.Tensor:
    device = scores.device
    vocab = scores.shape[1]
    temperature = _on(device, [p.temperature for p in params])[:, None]
    scores = scores / temperature
    top_k = _on(device, [p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    probabilities = torch.softmax(ordered, dim=-1)
    before = probabilities.cumsum(dim=-1) - probabilities  # mass of the better tokens
    top_p = _on(device, [p.top_p for p in params])[:, None]
    drop = (ranks >= top_k[:, None]) | (before > top_p)
    ordered = ordered.masked_fill(drop, float("-inf"))
    probabilities = torch.softmax(ordered, dim=-1)
    picks = torch.empty(len(params), dtype=torch.long, device=device)
    free = [i for i, g in enumerate(generators) if g is None]
    if free:
        index = _on(device, free)
        picks[index] = torch.multinomial(probabilities[index], 1)[:, 0]
    for i, generator in enumerate(generators):
        if generator is not None:  # seeded: its own random stream, on the CPU
            picks[i] = torch.multinomial(probabilities[i].cpu(), 1, generator=generator)[0]
    return order.gather(1, picks[:, None])[:, 0]


def _on(device: torch.device, values: list[float] | list[int] | list[bool]) -> torch.Tensor:
    """A small host list on ``device`` without waiting: from pinned memory the copy is queued
    behind the running step instead of blocking the host until the GPU is idle."""
    pinned = device.type == "cuda"
    return torch.tensor(values, pin_memory=pinned).to(device, non_blocking=pinned)
