"""Engine under live-chat arrivals: the micro-batcher against continuous batching, one run.

    python -m benchmarks.arrivals_bench [--model-dir .bench/qwen3-8b-realvocab] [--tiny]
    python -m benchmarks.engine_bench --phase arrivals [the same options]

Random Qwen3-8B-shaped weights (bf16) with Qwen3-8B's 151,936-id vocabulary
(``bench_tokenizer``: every id decodes to text, so time to first token is measured from the
stream; ``--tiny``: the test tokenizer), a shared
~1,200-token persona system prompt, 50-250 unique tokens per viewer, 60-token replies
(the runtime's default sampling, fixed length), through ``TransformersBackend`` exactly as
the runtime drives it.
Loads: Poisson arrivals at 4, 12 and 24 msg/s, then a burst of 32. Requests still running
``--cap`` seconds after the last arrival are cancelled and counted as over the cap.
Printed per variant and load: TTFT p50/p95, reply p50/p95/max, aggregate tok/s, dynamo
recompiles in the measured window, peak GPU memory.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.bench_tokenizer import build_bench_tokenizer
from benchmarks.engine_bench import QWEN3_8B, log

# (label, rate, amount): Poisson arrivals at ``rate`` msg/s for ``amount`` seconds; rate 0:
# ``amount`` at once; rate -1: ``amount`` one after the other (each after the last reply).
LOADS = (("one viewer at a time", -1.0, 8.0), ("poisson 4 msg/s", 4.0, 12.0),
         ("poisson 12 msg/s", 12.0, 10.0), ("poisson 24 msg/s", 24.0, 8.0),
         ("burst of 32", 0.0, 32.0))
NEW_TOKENS = 60


def prepare(model_dir: Path, tiny: bool) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from tests.tiny_model import build_tiny_qwen3

    if (model_dir / "config.json").exists():
        return
    if tiny:
        build_tiny_qwen3(model_dir)
        return
    if not (model_dir / "tokenizer.json").exists():  # it may be built elsewhere and carried
        build_bench_tokenizer(model_dir)
    vocab = len(AutoTokenizer.from_pretrained(model_dir))
    config = Qwen3Config(**{**QWEN3_8B, "vocab_size": vocab}, eos_token_id=2, pad_token_id=0,
                         bos_token_id=None)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    model.save_pretrained(model_dir)
    log(f"prepared {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params")


def _text_of(tokenizer: Any, rng: random.Random, tokens: int) -> str:
    """Words until the tokenizer counts ``tokens`` tokens."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words.extend(rng.choice(["hello", "there", "stars", "maps", "lighthouse", "night",
                                 "你好", "星星", "燈塔"]) for _ in range(8))
    return " ".join(words)


def _request(tokenizer: Any, rng: random.Random, index: int, system: str,
             new_tokens: int = NEW_TOKENS) -> Any:
    from engine.types import ChatMessage, GenerationRequest, SamplingParams

    words = _text_of(tokenizer, rng, rng.randint(50, 250))
    # The runtime's default sampling (temperature 0.7, top-p 0.9, top-k 50, penalty 1.1).
    return GenerationRequest(
        (ChatMessage("system", system), ChatMessage("user", f"{words} #{index}")),
        SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens))


async def _one(backend: Any, request: Any, ttft: list[float], total: list[float]) -> None:
    started = time.perf_counter()
    first = None
    async for _chunk in backend.generate(request):
        first = first or time.perf_counter() - started
    ttft.append(first or float("nan"))
    total.append(time.perf_counter() - started)


async def _load(backend: Any, label: str, rate: float, amount: float, cap: float,
                system: str, seed: int = 7, new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    rng = random.Random(seed)
    ttft: list[float] = []
    total: list[float] = []
    tasks = []
    count = int(amount) if rate <= 0 else int(rate * amount)
    # Made before the clock starts: writing the texts (tokenizing as they grow) is the
    # benchmark's own work, and a burst's requests arrive together.
    requests = [_request(backend.tokenizer, rng, index, system, new_tokens)
                for index in range(count)]
    gaps = [rng.expovariate(rate) if rate > 0 else 0.0 for _ in range(count)]
    started = time.perf_counter()
    for request, gap in zip(requests, gaps, strict=True):
        if rate > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(_one(backend, request, ttft, total)))
        if rate < 0:
            await asyncio.wait(tasks[-1:], timeout=cap)
    _done, late = await asyncio.wait(tasks, timeout=cap)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    wall = time.perf_counter() - started
    return {"load": label, "requests": count, "over_cap": len(late),
            **_stats("ttft", ttft), **_stats("reply", total),
            "tok_s": round(len(total) * new_tokens / wall, 1)}


def _stats(name: str, samples: list[float]) -> dict[str, float]:
    ordered = sorted(s for s in samples if s == s)
    if not ordered:
        return {f"{name}_p50": float("nan"), f"{name}_p95": float("nan")}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    row = {f"{name}_p50": round(pick(0.5), 3), f"{name}_p95": round(pick(0.95), 3)}
    if name == "reply":
        row["reply_max"] = round(ordered[-1], 3)
    return row


async def _variant(model_dir: Path, label: str, mode: str, quantization: str, cap: float,
                   tiny: bool, loads: tuple[tuple[str, float, float], ...]
                   ) -> list[dict[str, Any]]:
    import torch

    from engine.backends.transformers_backend import TransformersBackend
    from engine.config import EngineConfig

    llm = EngineConfig.from_mapping({"models": {"llm": {
        "model_path": str(model_dir), "max_length": 2048, "max_batch_size": 32,
        "batch_window_ms": 10, "continuous_batching": mode, "quantization": quantization,
        "device": "cpu" if tiny else "auto"}}}).llm
    backend = TransformersBackend(llm, model_dir.parent / "cache")
    await backend.start()
    # ~1,200 tokens of persona, the same for every viewer (the prefix continuous batching
    # prefills once).
    system = _text_of(backend.tokenizer, random.Random(1), 100 if tiny else 1200)
    rows = []
    try:
        log(f"{label}: warm-up (a burst, so compiles happen before the measured window)")
        await _load(backend, "warm-up", 0.0, 8 if tiny else 32, cap, system)
        for load, rate, amount in loads:
            counter = _recompiles()
            timings_before = _worker_timings(backend)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            log(f"{label}: {load}")
            row = await _load(backend, load, rate, amount / (4 if tiny else 1), cap, system)
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
            rows.append({"variant": label, **row, "recompiles": _recompiles() - counter,
                         "peak_gb": round(peak, 1),
                         **_loop_summary(_worker_timings(backend) - timings_before)})
            log(f"{label}: {rows[-1]}")  # as it comes: a run cut short keeps what it had
    finally:
        await backend.close()
    return rows


def _worker_timings(backend: Any) -> Counter[str]:
    worker = getattr(backend, "continuous", None)
    if worker is None:
        return Counter()
    return Counter({**worker.timings, "steps": worker.steps})


def _loop_summary(spent: Counter[str]) -> dict[str, float]:
    """The decode loop in the window: ms per step, rows per step, ms per prefill."""
    if not spent.get("steps"):
        return {}
    return {"step_ms": round(spent["step_s"] / spent["steps"] * 1000, 1),
            "rows_per_step": round(spent["rows_stepped"] / spent["steps"], 1),
            "prefill_ms": round(spent["admit_s"] / max(1, spent["prefills"]) * 1000, 1),
            # of which: the prompts' tokenization, and join_many to the first tokens read
            "tokenize_ms": round(spent["tokenize_s"] / max(1, spent["prefills"]) * 1000, 1),
            "join_ms": round(spent["join_s"] / max(1, spent["prefills"]) * 1000, 1),
            "per_prefill": round(spent["joined"] / max(1, spent["prefills"]), 1)}


def _recompiles() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(sum(counters["stats"].get(k, 0) for k in ("unique_graphs",)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".bench/qwen3-8b-realvocab"))
    parser.add_argument("--cap", type=float, default=40.0)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test, tiny model")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval for the run (Python's default: 5 ms)")
    parser.add_argument("--variants", default="continuous,micro",
                        help="which to run, in order: continuous, int4, micro (the baseline)")
    parser.add_argument("--loads", default="",
                        help="comma-separated start of load names (default: all)")
    args = parser.parse_args(argv)
    wanted = [w.strip() for w in args.loads.split(",") if w.strip()]
    loads = tuple(load for load in LOADS
                  if not wanted or any(load[0].startswith(w) for w in wanted))
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    prepare(args.model_dir, args.tiny)
    variants = {"micro": ("baseline: micro-batcher", "off", "none"),
                "continuous": ("ours: continuous", "on", "none"),
                "int4": ("ours: continuous, int4 weight-only", "on", "int4")}
    rows = []
    for name in args.variants.split(","):
        label, mode, quantization = variants[name.strip()]
        rows += asyncio.run(_variant(args.model_dir, label, mode, quantization, args.cap,
                                     args.tiny, loads))
    keys = ["variant", "load", "requests", "over_cap", "ttft_p50", "ttft_p95", "reply_p50",
            "reply_p95", "reply_max", "tok_s", "recompiles", "peak_gb", "step_ms",
            "rows_per_step", "prefill_ms", "tokenize_ms", "join_ms", "per_prefill"]
    print("\n| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
