"""Where a continuous-batching decode step spends its time: join (prefill) and step costs at
a few batch sizes, then torch profiler tables of one batch's steps and of one join.

    python -m benchmarks.decode_profile [--model-dir .bench/qwen3-8b-realvocab] [--tiny]
                                        [--burst | --breakdown [--compile] | --join-only
                                         | --returning]

Same model and prompt shape as ``arrivals_bench`` (run that once first to prepare the model):
a ~1,200-token shared persona prefix plus ~200 unique tokens per row. ``--returning``: joins
of returning viewers, as the runtime's prompts are (a viewer's last prompt kept in the prefix
cache, ~330 new tokens past it), beside new viewers' joins of the same length, in the
runtime's slot width (``--width``, default 2112: ``max_length`` 2048).
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from pathlib import Path
from typing import Any

from benchmarks.engine_bench import log


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(work: Any) -> float:
    _sync()
    started = time.perf_counter()
    work()
    _sync()
    return time.perf_counter() - started


NEW_TOKENS = 200


def _rows(model: Any, prefix: list[int], rows: int, sampled: bool, vocab: int,
          graphs: bool, slots: int | None = None, compiled: bool = False,
          width: int | None = None) -> Any:
    from engine.serving.continuous import ContinuousBatch
    from engine.types import SamplingParams

    rng = random.Random(rows)
    slots = slots or rows
    batch = ContinuousBatch(model, slots=slots)
    if graphs:
        batch.make_static(slots, width or len(prefix) + 200 + NEW_TOKENS + 64,
                          lambda done, total: None, compile_step=compiled)
    batch.set_prefix(prefix)
    params = SamplingParams(max_new_tokens=NEW_TOKENS) if sampled else None
    joins = []
    for index in range(rows):
        prompt = prefix + [rng.randrange(10, vocab) for _ in range(200)]
        joins.append(_timed(lambda p=prompt, i=index: batch.join(  # type: ignore[misc]
            f"r{i}", p, NEW_TOKENS, frozenset(), params)))
    return batch, joins


def measure(model: Any, prefix: list[int], vocab: int, sizes: list[int]) -> None:
    import gc

    import torch

    print("\n| decode step | rows | sampling | join ms (mean) | step ms (mean of 20) | tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for graphs in (False, True):
        for rows in sizes:
            for sampled in (False, True):
                batch, joins = _rows(model, prefix, rows, sampled, vocab, graphs)
                batch.step()  # first step after joins: allocation, warm kernels
                steps = [_timed(batch.step) for _ in range(20)]
                step_ms = sum(steps) / len(steps) * 1000
                kind = ("CUDA graphs" if batch.captured else "static, eager") if graphs else (
                    "eager (baseline)")
                print(f"| {kind} | {rows} | {'default' if sampled else 'greedy'} | "
                      f"{sum(joins) / len(joins) * 1000:.1f} | {step_ms:.1f} | "
                      f"{rows / step_ms * 1000:.0f} |", flush=True)
                del batch
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


def breakdown(model: Any, prefix: list[int], vocab: int, sizes: list[int],
              compiled: bool = False, width: int | None = None) -> None:
    """Where a captured step's wall time goes: the graph replay alone (the model), then the
    whole ``step()`` (sampling, reading the tokens back, bookkeeping), greedy and sampled.
    One bucket per size (``rows`` slots), compiled as the runtime does with ``compiled``."""
    import torch

    import engine.serving.decode_graphs

    # one capture (and compile) each
    engine.serving.decode_graphs.buckets_for = lambda slots: [slots]
    print(f"\n| rows | replay ms (GPU) | step ms, greedy | step ms, default sampling |"
          f" (compiled: {compiled}, width {width or 'prompt + 264'})")
    print("| --- | --- | --- | --- |")
    for rows in sizes:
        batch, _ = _rows(model, prefix, rows, True, vocab, graphs=True, compiled=compiled,
                         width=width)
        batch.step()
        replay = torch.inference_mode()(
            functools.partial(batch._graphs.run, batch._last, batch._positions))
        timings = [_mean_ms(replay)]
        params = [row.params for row in batch.rows]
        for row in batch.rows:
            row.params = None  # greedy: argmax only
        timings.append(_mean_ms(batch.step))
        for row, chosen in zip(batch.rows, params, strict=True):
            row.params = chosen
        timings.append(_mean_ms(batch.step))
        print(f"| {rows} | " + " | ".join(f"{t:.2f}" for t in timings) + " |", flush=True)
        _profile_steps(batch, rows)
        del batch


def _mean_ms(work: Any, times: int = 20) -> float:
    return sum(_timed(work) for _ in range(times)) / times * 1000


def sampler(vocab: int, sizes: list[int]) -> None:
    """``pick_tokens`` alone with the default sampling on random logits: the device time of
    50 calls queued back to back, and the host's time for one call."""
    import torch

    from engine.serving.sampling import pick_tokens
    from engine.types import SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print("\n| rows | sampler, 50 calls back to back: ms per call | host ms for one call |")
    print("| --- | --- | --- |")
    for rows in sizes:
        logits = torch.randn((rows, vocab), device=device, dtype=torch.bfloat16) * 4
        seen = torch.zeros((rows, vocab), dtype=torch.bool, device=device)
        seen[:, :300] = True
        params: list[SamplingParams | None] = [SamplingParams()] * rows

        def call(logits: Any = logits, seen: Any = seen, params: Any = params,
                 rows: int = rows) -> Any:
            return pick_tokens(logits, params, seen, [10] * rows, [2], [None] * rows)

        for _ in range(5):
            call()
        _sync()
        host = time.perf_counter()
        call()
        host = time.perf_counter() - host
        device_ms = _mean_ms(lambda: [call() for _ in range(50)], 3) / 50
        print(f"| {rows} | {device_ms:.3f} | {host * 1000:.3f} |", flush=True)


def profile(model: Any, prefix: list[int], vocab: int, rows: int) -> None:
    batch, _ = _rows(model, prefix, rows, True, vocab, graphs=True)
    batch.step()
    _profile_steps(batch, rows)


def _profile_steps(batch: Any, rows: int) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        for _ in range(5):
            batch.step()
        _sync()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"\n5 steps of {rows} rows, default sampling, static decode step:")
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def profile_join(model: Any, prefix: list[int], vocab: int, running: int,
                 joining: int) -> None:
    """Where one join's time goes: ``joining`` requests prefilled together while ``running``
    rows sit in static slots (the pause every running row feels)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from engine.serving.continuous import Joining

    batch, _ = _rows(model, prefix, running, True, vocab, graphs=True,
                     slots=running + joining)
    rng = random.Random(7)

    def group(tag: str) -> list[Any]:
        return [Joining(f"{tag}{i}", prefix + [rng.randrange(10, vocab) for _ in range(200)],
                        NEW_TOKENS, frozenset(), None) for i in range(joining)]

    for attempt in range(2):  # warm: allocator, kernels; the rows leave again
        batch.join_many(group(f"warm{attempt}-"))
        batch.leave({r.request_id for r in batch.rows[running:]})
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    timed = group("timed-")
    with torch_profile(activities=activities) as prof:
        took = _timed(lambda: batch.join_many(timed))
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"\njoin of {joining} request(s) past the prefix beside {running} running rows: "
          f"{took * 1000:.1f} ms")
    print(prof.key_averages().table(sort_by=sort, row_limit=20))


def profile_returning(model: Any, prefix: list[int], vocab: int, running: int,
                      joining: int, width: int) -> None:
    """Where a join of ``joining`` returning viewers goes beside ``running`` rows: the
    prefill alone, the whole join (first tokens, slots, the prefix cache's copy), and new
    viewers' prompts of the same length for comparison; then the profiler's tables."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from engine.serving.continuous import Joining
    from engine.serving.prefix_cache import PrefixCache
    from engine.types import SamplingParams

    batch, _ = _rows(model, prefix, running, True, vocab, graphs=True,
                     slots=running + joining, width=width)
    batch.prefix_cache = PrefixCache(8 * 2**30)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    rng = random.Random(11)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(count)]

    def joined(group: list[Any]) -> None:
        batch.join_many(group)
        batch.leave({j.request_id for j in group})

    def returning(tag: str) -> list[Any]:
        firsts = [prefix + tokens(300) for _ in range(joining)]
        joined([Joining(f"{tag}a{i}", p, NEW_TOKENS, frozenset(), params)
                for i, p in enumerate(firsts)])
        return [Joining(f"{tag}b{i}", p + tokens(330), NEW_TOKENS, frozenset(), params)
                for i, p in enumerate(firsts)]

    def new(tag: str) -> list[Any]:
        return [Joining(f"{tag}n{i}", prefix + tokens(630), NEW_TOKENS, frozenset(), params)
                for i in range(joining)]

    for attempt in range(2):  # warm: kernels, allocator, both paths
        joined(returning(f"w{attempt}"))
        joined(new(f"w{attempt}"))
    group = returning("p")
    starts = [batch.prefiller.reusable(j.prompt_ids) for j in group]
    prefill_ms = _timed(lambda: batch.prefiller.prefill(group, starts)) * 1000
    again, fresh = returning("j"), new("n")
    join_ms = _timed(lambda: joined(again)) * 1000
    new_ms = _timed(lambda: joined(fresh)) * 1000
    print(f"\n{joining} returning viewer(s) beside {running} rows, slots {width} wide: "
          f"prefill {prefill_ms:.1f} ms, whole join {join_ms:.1f} ms; {joining} new "
          f"viewer(s), same length: whole join {new_ms:.1f} ms "
          f"(cached {sum(s[1] for s in starts if s)} tokens of "
          f"{sum(len(j.prompt_ids) for j in group)})", flush=True)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    group = returning("q")
    with torch_profile(activities=activities) as prof:
        joined(group)
        _sync()
    for sort in ("cuda_time_total", "cpu_time_total") if torch.cuda.is_available() else (
            "cpu_time_total",):
        print(prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)


def burst(model: Any, prefix: list[int], vocab: int, rows: int = 32) -> None:
    """A burst joining an idle batch in one prefill, as ``arrivals_bench``'s burst does:
    ``rows`` prompts of 50-250 tokens past the prefix, into static slots (median of 5), for
    a few pack sizes (``engine.serving.packed_prefill.PACK_TOKENS``)."""
    import statistics

    from engine.serving import packed_prefill
    from engine.serving.continuous import ContinuousBatch, Joining

    rng = random.Random(1)
    rests = [[rng.randrange(10, vocab) for _ in range(rng.randint(50, 250))]
             for _ in range(rows)]
    batch = ContinuousBatch(model, slots=rows)
    batch.make_static(rows, len(prefix) + 250 + NEW_TOKENS + 64)
    batch.set_prefix(prefix)

    def join_all() -> None:
        batch.join_many([Joining(f"b{i}", prefix + rest, NEW_TOKENS, frozenset(), None)
                         for i, rest in enumerate(rests)])
        _sync()
        batch.leave({row.request_id for row in batch.rows})

    chosen = packed_prefill.PACK_TOKENS
    print(f"\n{rows} prompts ({sum(map(len, rests))} tokens past a {len(prefix)}-token "
          f"prefix) joining an idle batch:")
    print("| pack tokens | packs | join ms (median of 5) |")
    print("| --- | --- | --- |")
    for limit in sorted({1024, 2048, 4096, chosen}):
        packed_prefill.PACK_TOKENS = limit
        join_all()  # warm: kernels and allocator for this shape
        took = statistics.median(_timed(join_all) for _ in range(5)) * 1000
        mark = " (the runtime's)" if limit == chosen else ""
        print(f"| {limit}{mark} | {len(packed_prefill.split(rests))} | {took:.1f} |",
              flush=True)
    packed_prefill.PACK_TOKENS = chosen


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.arrivals_bench import _text_of, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".bench/qwen3-8b-realvocab"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sizes", default="1,8,32")
    parser.add_argument("--join-only", action="store_true",
                        help="only the join (prefill) profiles")
    parser.add_argument("--returning", action="store_true",
                        help="only joins of returning viewers (prefix cache) and new ones")
    parser.add_argument("--burst", action="store_true",
                        help="only a burst of 32 joining an idle batch, per pack size")
    parser.add_argument("--breakdown", action="store_true",
                        help="only the sampler, the step's breakdown and one profile per size")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step as the runtime does (breakdown)")
    parser.add_argument("--width", type=int, default=None,
                        help="slot columns (the runtime: max_length + 1, rounded up to 64)")
    args = parser.parse_args()
    prepare(args.model_dir, args.tiny)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    log(f"model on {device}, attention {model.config._attn_implementation}")
    text = _text_of(tokenizer, random.Random(1), 100 if args.tiny else 1200)
    prefix = tokenizer.encode(text, add_special_tokens=False)
    vocab = len(tokenizer)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.burst:
        burst(model, prefix, vocab)
        return
    if args.returning:
        for running, joining in ((0, 1), (16, 1), (16, 4), (16, 8)):
            profile_returning(model, prefix, vocab, running, joining, args.width or 2112)
        return
    if args.breakdown:
        sampler(vocab, sizes)
        breakdown(model, prefix, vocab, sizes, args.compile, args.width)
        return
    if not args.join_only:
        measure(model, prefix, vocab, sizes)
        profile(model, prefix, vocab, max(sizes))
    for joining in (1, 8):
        profile_join(model, prefix, vocab, max(sizes) - joining, joining)


if __name__ == "__main__":
    main()
