"""Which kernels a captured decode step should run: the same static step captured with each
attention kernel PyTorch offers, and with the model compiled (fused elementwise kernels), at a
few batch sizes. Same model and prompt shape as ``arrivals_bench``.

    python -m benchmarks.decode_variants [--model-dir DIR] [--sizes 1,32]
                                         [--variants cudnn,compile-fused,...]

Printed: per variant and size, the graph replay (the model alone) and the whole step, in ms,
and the first greedy tokens of one row (the variants should agree on them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import random
import time
from pathlib import Path
from typing import Any

from benchmarks.decode_profile import NEW_TOKENS, _sync, _timed
from benchmarks.engine_bench import log

SLOTS = 32


def _kernel_context(variant: str) -> Any:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    if variant in backends:
        return sdpa_kernel([backends[variant]])
    return contextlib.nullcontext()


@contextlib.contextmanager
def _attention_outside_compile(active: bool) -> Any:
    """Compile everything but attention, which keeps the eager SDPA kernel (a graph break
    per layer costs nothing once the step is a CUDA graph)."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not active:
        yield
        return
    ALL_ATTENTION_FUNCTIONS["sdpa"] = torch.compiler.disable(ALL_ATTENTION_FUNCTIONS["sdpa"])
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]  # the library's own again


REFERENCE: dict[int, Any] = {}  # rows -> the first variant's logits for the same inputs


def _batch(model: Any, prefix: list[int], variant: str, sizes: list[int]) -> Any:
    import torch

    from engine.serving.continuous import ContinuousBatch

    batch = ContinuousBatch(model, slots=SLOTS)
    batch.make_static(SLOTS, len(prefix) + 200 + NEW_TOKENS + 64)  # slots, nothing captured
    graphs = batch._graphs
    graphs.buckets = sorted(set(sizes))
    if variant.startswith("compile"):
        model.forward = torch.compile(model.forward)
    started = time.perf_counter()
    with _kernel_context(variant), _attention_outside_compile(variant == "compile-fused"):
        graphs.capture(lambda done, total: None)
    log(f"{variant}: captured {graphs.buckets} in {time.perf_counter() - started:.1f} s")
    batch.set_prefix(prefix)
    return batch


def measure(model: Any, prefix: list[int], vocab: int, variant: str,
            sizes: list[int]) -> None:
    import torch

    original = model.forward
    try:
        batch = _batch(model, prefix, variant, sizes)
    except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
        model.forward = original
        print(f"| {variant} | - | failed: {type(exc).__name__}: {str(exc)[:150]} | | |")
        return
    rng = random.Random(3)
    for rows in sizes:
        for index in range(rows):
            prompt = prefix + [rng.randrange(10, vocab) for _ in range(200)]
            batch.join(f"{variant}-{rows}-{index}", prompt, NEW_TOKENS, frozenset(), None)
        batch.step()
        with torch.inference_mode():
            replay_once = functools.partial(batch._graphs.run, batch._last, batch._positions)
            logits = replay_once().float().clone()
            replay = [_timed(replay_once) for _ in range(20)]
        reference = REFERENCE.setdefault(rows, logits)
        drift = (logits - reference).abs().max().item()
        steps = [_timed(batch.step) for _ in range(20)]
        first = batch.rows[0].tokens[:6]
        print(f"| {variant} | {rows} | {sum(replay) / 20 * 1000:.2f} | "
              f"{sum(steps) / 20 * 1000:.2f} | {drift:.4f} | {first} |", flush=True)
        batch.leave({row.request_id for row in batch.rows})
    model.forward = original
    batch = None
    gc.collect()
    _sync()
    torch.cuda.empty_cache()


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.arrivals_bench import _text_of, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".bench/qwen3-8b-realvocab"))
    parser.add_argument("--sizes", default="1,32")
    parser.add_argument("--variants", default="cudnn,efficient,math,compile,compile-fused",
                        help="cudnn, efficient, math: the SDPA kernel; compile: the model "
                             "compiled; compile-fused: compiled but attention")
    args = parser.parse_args()
    prepare(args.model_dir, tiny=False)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16)
    model = model.to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prefix = tokenizer.encode(_text_of(tokenizer, random.Random(1), 1200),
                              add_special_tokens=False)
    vocab = len(tokenizer)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"\nGPU {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"prefix {len(prefix)} tokens, ~200 more per row, {SLOTS} slots")
    print("\n| variant | rows | replay ms | step ms (greedy) | max logit difference to the "
          "first variant | first tokens of row 0 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant in args.variants.split(","):
        measure(model, prefix, vocab, variant, sizes)


if __name__ == "__main__":
    main()
