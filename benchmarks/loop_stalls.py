"""What the event loop was doing while it was late: a watchdog thread samples the loop
thread's stack whenever the loop has not ticked for ``threshold_s``.

Each sample is the innermost frames of the project's own code plus the frame that was running,
so a table of the most frequent stacks says where the late time went (each sample is
``interval_s`` of a stall).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])


class LoopStalls:
    """``beat()`` from the loop; ``start()``/``stop()`` the watchdog; ``table()`` the result."""

    def __init__(self, threshold_s: float = 0.05, interval_s: float = 0.01) -> None:
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self.samples: Counter[str] = Counter()
        self._last = time.perf_counter()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-stalls", daemon=True)

    def beat(self) -> None:
        self._last = time.perf_counter()

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self._last = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            if time.perf_counter() - self._last < self.threshold_s:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is not None:
                self.samples[_where(frame)] += 1

    def table(self, top: int = 8) -> str:
        total = sum(self.samples.values())
        lines = [f"event-loop stalls: {total} samples of {self.interval_s * 1000:.0f} ms"]
        for stack, count in self.samples.most_common(top):
            lines.append(f"  {count:5d}  {stack}")
        return "\n".join(lines)


def _where(frame: object) -> str:
    stack = traceback.extract_stack(frame)  # type: ignore[arg-type]
    ours = [f for f in stack if f.filename.startswith(ROOT) and "/benchmarks/" not in f.filename]
    picked = [*ours[-3:], stack[-1]] if stack else []
    return " > ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in picked)
