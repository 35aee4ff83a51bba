"""Choosing next tokens for a batch whose rows have their own sampling parameters: what
``generate()`` does (repetition penalty, no end before ``min_new_tokens``, temperature, top-k,
top-p), done for all rows at once on the device: one decode loop serves viewers with
different settings, and per-row Python work would cost more than the step itself."""

from __future__ import annotations

import torch

from engine.types import SamplingParams

TOPK_CANDIDATES = 1024  # up to this top-k, only the candidates are ordered, not the vocabulary
GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)
PENALTY, EARLY, TEMPERATURE, TOP_K, TOP_P, SAMPLED = range(6)  # columns of a row's settings


def pick_tokens(logits: torch.Tensor, params: list[SamplingParams | None], seen: torch.Tensor,
                generated: list[int], eos_ids: list[int],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row. ``logits`` [rows, vocab]; ``seen`` [rows, vocab] marks the ids of
    each row's prompt and output (for the repetition penalty); ``generated`` how many tokens
    each row has; a row's generator makes its samples repeatable (a seeded request).

    Nothing here waits for the device: what to do is decided from the parameters, and the
    rows' settings reach the device in one copy from pinned memory, so the host can queue
    the next decode step while the GPU still runs this one."""
    scores = logits.to(torch.float32, copy=True)  # written in place below
    chosen = [p or GREEDY for p in params]
    early = [n < p.min_new_tokens for n, p in zip(generated, chosen, strict=True)]
    sampled = [not p.greedy for p in chosen]
    host = _host_settings(chosen, early, sampled, scores.shape[1])
    settings = on_device(host, scores.device)
    if any(p.repetition_penalty != 1.0 for p in chosen):
        penalty = settings[:, PENALTY, None]
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(seen, penalized, scores)
    if eos_ids and any(early):
        too_early = settings[:, EARLY] > 0
        for eos in eos_ids:  # a plain index: a list or tensor index would copy and wait
            scores[:, eos] = scores[:, eos].masked_fill(too_early, float("-inf"))
    tokens = scores.argmax(dim=-1)
    if not any(sampled):
        return tokens
    picked = _sample(settings, scores, generators, max(int(row[TOP_K]) for row in host))
    return torch.where(settings[:, SAMPLED] > 0, picked, tokens)


def _host_settings(params: list[SamplingParams], early: list[bool], sampled: list[bool],
                   vocab: int) -> list[list[float]]:
    """One row of numbers per request; a greedy row samples its best token alone (the pick
    is not used)."""
    return [[p.repetition_penalty, float(e), p.temperature if s else 1.0,
             float(p.top_k if 0 < p.top_k < vocab else vocab) if s else 1.0,
             p.top_p if s else 1.0, float(s)]
            for p, e, s in zip(params, early, sampled, strict=True)]


def _sample(settings: torch.Tensor, scores: torch.Tensor,
            generators: list[torch.Generator | None], widest: int) -> torch.Tensor:
    probabilities, order = _candidates(settings, scores, widest)
    picks = torch.multinomial(probabilities, 1)[:, 0]
    for i, generator in enumerate(generators):
        if generator is not None:  # seeded: its own random stream, on the CPU
            picks[i] = torch.multinomial(probabilities[i].cpu(), 1, generator=generator)[0]
    return order.gather(1, picks[:, None])[:, 0]


def candidates(params: list[SamplingParams], scores: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidate tokens (``order``, vocabulary ids, best first) and their
    unnormalised probabilities (0 = not allowed), as ``pick_tokens`` samples them."""
    host = _host_settings(params, [False] * len(params), [True] * len(params), scores.shape[1])
    settings = on_device(host, scores.device)
    return _candidates(settings, scores, max(int(row[TOP_K]) for row in host))


def _candidates(settings: torch.Tensor, scores: torch.Tensor, widest: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' warpers in their order: temperature, top-k, then top-p over what top-k
    kept. Only the best ``widest`` are ordered when every row has a top-k (the default 50):
    sorting a 151k vocabulary costs more."""
    scores = scores / settings[:, TEMPERATURE, None]
    if widest <= TOPK_CANDIDATES:
        ordered, order = torch.topk(scores, widest, dim=-1)
    else:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
    ranks = torch.arange(ordered.shape[1], device=scores.device)[None, :]
    ordered = ordered.masked_fill(ranks >= settings[:, TOP_K, None], float("-inf"))
    probabilities = torch.softmax(ordered, dim=-1)
    before = probabilities.cumsum(dim=-1) - probabilities  # mass of the better tokens
    return probabilities.masked_fill(before > settings[:, TOP_P, None], 0.0), order


def seen_in_prompts(prompts: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[rows, vocab]``, True where a row's prompt has the token (what the repetition
    penalty remembers), from one copy for all rows."""
    flat = [row * vocab + token for row, prompt in enumerate(prompts) for token in prompt]
    seen = torch.zeros((len(prompts), vocab), dtype=torch.bool, device=device)
    seen.view(-1).index_fill_(0, on_device(flat, device), True)
    return seen


def on_device(values: list[int] | list[list[int]] | list[list[float]],
              device: torch.device) -> torch.Tensor:
    """A small host list on ``device`` without waiting: from pinned memory the copy is queued
    behind the running step instead of blocking the host until the GPU is idle."""
    pinned = device.type == "cuda"
    return torch.tensor(values, pin_memory=pinned).to(device, non_blocking=pinned)
