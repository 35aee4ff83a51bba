"""A running batch's rows and the decode steps queued for them on the device.

A step's tokens are read back through pinned memory after an event, so reading one step's
tokens waits for that step only: the next one can already be queued behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.types import SamplingParams


@dataclass
class Row:
    """One request's place in the batch."""

    request_id: str
    max_new_tokens: int
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # generated so far
    params: SamplingParams | None = None  # None: greedy, no penalty
    generator: torch.Generator | None = None  # a seeded request's own random stream
    pending: int = 0  # launched steps whose token is not read yet
    left: bool = False

    @property
    def finished(self) -> bool:
        return bool(self.tokens) and (self.tokens[-1] in self.eos_ids
                                      or len(self.tokens) >= self.max_new_tokens)


@dataclass
class LaunchedStep:
    """A decode step queued on the device: its rows in order, and their new tokens, on the
    host once ``done`` has passed."""

    rows: list[Row]
    tokens: torch.Tensor
    done: Any  # torch.cuda.Event on a GPU, None on the CPU (the copy was synchronous)

    @classmethod
    def queue(cls, rows: list[Row], tokens: torch.Tensor) -> LaunchedStep:
        on_gpu = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=on_gpu)
        host.copy_(tokens, non_blocking=on_gpu)
        done: Any = None
        if on_gpu:
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        for row in rows:
            row.pending += 1
        return cls(list(rows), host, done)

    def collect(self) -> list[tuple[str, int]]:
        """(request id, token) for each row still running; waits for this step only."""
        if self.done is not None:
            self.done.synchronize()
        produced = []
        for row, token in zip(self.rows, self.tokens.tolist(), strict=True):
            row.pending -= 1
            if not row.finished and not row.left:
                row.tokens.append(int(token))
                produced.append((row.request_id, int(token)))
        return produced
