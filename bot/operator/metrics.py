"""``/metrics``: Prometheus text format from a registry of this runtime's own (no globals, so
two runtimes in one process, as in tests, never share counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bot.signals import FinalState, ReplyProgress

MESSAGES_HELP = ("Chat events by final state and reason (a redelivered event counts as "
                 "dropped, reason duplicate; the store keeps one row for it)")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)


# The engine's numbers (``Engine.counters``) as metrics: running totals, then gauges.
ENGINE_TOTALS = {
    "decode_steps": ("vtuber_engine_decode_steps", "Decode steps of the batching loop"),
    "decode_s": ("vtuber_engine_decode_seconds", "Time spent in decode steps"),
    "prefill_s": ("vtuber_engine_prefill_seconds", "Time spent prefilling prompts"),
    "prompt_tokens": ("vtuber_engine_prompt_tokens", "Prompt tokens of the requests served"),
    "cached_tokens": ("vtuber_engine_cached_prompt_tokens",
                      "Prompt tokens taken from the prefix cache instead of prefilled"),
}
ENGINE_GAUGES = {
    "queued": ("vtuber_engine_queued_requests", "Requests waiting for the engine"),
    "in_flight": ("vtuber_engine_requests_in_flight", "Requests the engine is generating"),
    "max_batch_size": ("vtuber_engine_max_batch_size", "Rows the engine batches now"),
}


class _Live(Collector):
    """Values read at scrape time: adapter readiness, GPU memory, the engine's numbers."""

    def __init__(self, adapters: Callable[[], dict[str, bool]],
                 gpu_memory: Callable[[], dict[str, int]],
                 engine: Callable[[], dict[str, float]]) -> None:
        self._adapters = adapters
        self._gpu_memory = gpu_memory
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        numbers = self._engine()
        for key, (name, description) in ENGINE_TOTALS.items():
            if key in numbers:
                yield CounterMetricFamily(name, description, value=numbers[key])
        for key, (name, description) in ENGINE_GAUGES.items():
            if key in numbers:
                yield GaugeMetricFamily(name, description, value=numbers[key])
        ready = GaugeMetricFamily("vtuber_adapter_ready",
                                  "1 when the adapter's platform session is ready",
                                  labels=["adapter"])
        for name, is_ready in self._adapters().items():
            ready.add_metric([name], 1.0 if is_ready else 0.0)
        yield ready
        memory = GaugeMetricFamily("vtuber_gpu_memory_used_bytes",
                                   "GPU memory in use on each device", labels=["device"])
        for device, allocated in self._gpu_memory().items():
            memory.add_metric([device], float(allocated))
        yield memory


class Metrics:
    """An observer of the conversation service that keeps Prometheus metrics."""

    def __init__(self, pending: Callable[[], int], store_up: Callable[[], bool],
                 adapters: Callable[[], dict[str, bool]],
                 gpu_memory: Callable[[], dict[str, int]],
                 engine: Callable[[], dict[str, float]] = dict,
                 build: dict[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("vtuber_build", "What is running: version, git commit, backend, model",
             registry=self.registry).info(build or {})
        self.messages = Counter("vtuber_messages", MESSAGES_HELP,
                                ["platform", "status", "reason"], registry=self.registry)
        self.reply_seconds = Histogram(
            "vtuber_reply_seconds", "Answered messages: from arrival to the reply recorded",
            ["platform"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait_seconds = Histogram(
            "vtuber_queue_wait_seconds", "Answered messages: waiting for a generation slot",
            ["platform"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token_seconds = Histogram(
            "vtuber_first_token_seconds", "Answered messages: generation start to first text",
            ["platform"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter("vtuber_generated_tokens", "Tokens generated",
                                        ["platform"], registry=self.registry)
        Gauge("vtuber_pending_messages", "Admitted messages not final yet",
              registry=self.registry).set_function(lambda: float(pending()))
        Gauge("vtuber_store_up", "1 while the store answers",
              registry=self.registry).set_function(lambda: 1.0 if store_up() else 0.0)
        self.registry.register(_Live(adapters, gpu_memory, engine))

    def message_final(self, state: FinalState) -> None:
        self.messages.labels(state.platform, state.status, state.reason or "").inc()
        if state.status == "answered":
            self.reply_seconds.labels(state.platform).observe(state.latency_s)

    def reply_progress(self, progress: ReplyProgress) -> None:
        if not progress.done:
            return
        timings: dict[str, Any] = progress.timings_ms
        if "queue_wait" in timings:
            self.queue_wait_seconds.labels(progress.platform).observe(timings["queue_wait"] / 1000)
        if "first_token" in timings:
            self.first_token_seconds.labels(progress.platform).observe(
                timings["first_token"] / 1000)
        if "tokens" in timings:
            self.generated_tokens.labels(progress.platform).inc(timings["tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
