"""Choosing the next token for one row: what ``generate()`` does with a request's sampling
parameters (repetition penalty, no end before ``min_new_tokens``, temperature, top-k, top-p),
for a decode loop that serves rows with different parameters in one batch."""

from __future__ import annotations

import torch

from engine.types import SamplingParams


class Sampler:
    """A ``Picker`` for one request (see ``engine.continuous``)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int],
                 eos_ids: frozenset[int]) -> None:
        self._params = params
        self._prompt = prompt_ids
        self._eos = sorted(eos_ids)
        self._generator: torch.Generator | None = None
        if params.seed is not None:
            self._generator = torch.Generator().manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, generated: list[int]) -> int:
        params = self._params
        scores = logits.float().clone()
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*self._prompt, *generated}), device=scores.device)
            picked = scores[seen]
            scores[seen] = torch.where(picked < 0, picked * params.repetition_penalty,
                                       picked / params.repetition_penalty)
        if len(generated) < params.min_new_tokens and self._eos:
            scores[torch.tensor(self._eos, device=scores.device)] = float("-inf")
        if params.greedy:
            return int(scores.argmax())
        scores = scores / params.temperature
        if params.top_k and params.top_k < scores.numel():
            kth = torch.topk(scores, params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if params.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(ordered, dim=-1) > params.top_p
            scores[order[drop]] = float("-inf")
        probabilities = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probabilities, 1, generator=self._generator))
