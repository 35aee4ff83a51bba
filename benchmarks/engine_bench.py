"""Engine benchmark: Qwen3-8B-shaped random weights on one GPU (see docs/PERFORMANCE.md).

Per-token cost does not depend on weight values, so a random model of the real shape is
enough. The naive baseline (HF eager ``generate``, dynamic cache, one request at a time — the
upstream's path) is always measured in the same run as ours.

    python -m benchmarks.engine_bench --phase prepare     # random model → .bench/qwen3-8b
    python -m benchmarks.engine_bench --phase bf16        # baseline vs static cache + compile
    python -m benchmarks.engine_bench --phase serve       # our backend, N concurrent requests
    python -m benchmarks.engine_bench --phase nf4         # bitsandbytes 4-bit
    python -m benchmarks.engine_bench --phase arrivals    # live-chat loads (arrivals_bench)
    python -m benchmarks.engine_bench --phase all --tiny  # CPU smoke test of the script

Results are printed as a table and appended as JSON lines to --out (default
.bench/results.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

QWEN3_8B = {
    "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
}
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 400,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prepare(model_dir: Path, tiny: bool) -> None:
    """Random weights of the real shape, saved with a small ChatML tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.tiny_model import build_tiny_qwen3

    if (model_dir / "config.json").exists():
        log(f"{model_dir} exists")
        return
    build_tiny_qwen3(model_dir)  # tokenizer + chat template (ids stay within any vocab)
    if tiny:
        return
    shape = QWEN3_8B
    config = Qwen3Config(**shape, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(0)
    started = time.monotonic()
    with torch.device(device()):
        torch.set_default_dtype(torch.bfloat16)
        model = Qwen3ForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    for param in model.parameters():  # init scale that keeps activations finite
        param.data.normal_(0, 0.02)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(model_dir)
    log(f"prepared {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params "
        f"in {time.monotonic() - started:.0f} s")


def load(model_dir: Path, quant: str = "none", tiny: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": {"": str(device())}}
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if tiny:
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    if not tiny:  # random ids never hit eos on purpose: fix the decode length
        model.generation_config.eos_token_id = None
    return model


def timed_generate(model: Any, batch: int, prompt: int, new: int, **kwargs: Any) -> float:
    import torch

    ids = torch.randint(10, 300, (batch, prompt), device=model.device)
    mask = torch.ones_like(ids)
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
    sync()
    assert out.shape[1] == prompt + new, out.shape
    return time.perf_counter() - started


def decode_rate(model: Any, batch: int, prompt: int, new: int, repeats: int,
                **kwargs: Any) -> dict[str, float]:
    """TTFT = time for 1 new token; decode tok/s from the difference to ``new`` tokens."""
    ttft = statistics.median(timed_generate(model, batch, prompt, 1, **kwargs)
                             for _ in range(repeats))
    full = statistics.median(timed_generate(model, batch, prompt, new, **kwargs)
                             for _ in range(repeats))
    return {
        "batch": batch, "prompt": prompt, "new_tokens": new,
        "ttft_ms": round(ttft * 1000, 1),
        "total_s": round(full, 3),
        "decode_tok_s_per_seq": round((new - 1) / max(full - ttft, 1e-9), 1),
        "aggregate_tok_s": round(batch * new / full, 1),
    }


def peak_gb() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return round(torch.cuda.max_memory_allocated() / 1024**3, 2)


def phase_bf16(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    model = load(model_dir, tiny=args.tiny)
    rows = []
    for batch in (1, 8, 32):
        log(f"eager batch {batch}")
        timed_generate(model, batch, args.prompt, 4)  # warm-up
        rows.append({"variant": "baseline: HF eager, dynamic cache", "dtype": "bf16",
                     **decode_rate(model, batch, args.prompt, args.new, args.repeats)})
    for batch in (1, 8, 32):
        log(f"static cache + compile batch {batch} (compiling)")
        for _ in range(2):  # compile + settle
            timed_generate(model, batch, args.prompt, args.new, cache_implementation="static")
        rows.append({"variant": "ours: static cache + torch.compile", "dtype": "bf16",
                     **decode_rate(model, batch, args.prompt, args.new, args.repeats,
                                   cache_implementation="static")})
    for row in rows:
        row["peak_gb"] = peak_gb()
    return rows


def _fresh_memory() -> float:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def phase_nf4(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    before = _fresh_memory()
    model = load(model_dir, "4bit", tiny=args.tiny)
    resident = round((torch.cuda.memory_allocated() - before) / 1024**3, 2)
    rows = []
    for label, extra in (("baseline: nf4 eager, dynamic cache", {}),
                         ("ours: nf4, static cache", {"cache_implementation": "static"})):
        for batch in (1, 8):
            log(f"{label} batch {batch}")
            timed_generate(model, batch, args.prompt, 4, **extra)
            row = decode_rate(model, batch, args.prompt, args.new, args.repeats, **extra)
            rows.append({"variant": label, "dtype": "nf4", **row,
                         "resident_gb": resident, "peak_gb": peak_gb()})
    return rows


def _torchao_int4_config() -> Any:
    from transformers import TorchAoConfig

    try:
        from torchao.quantization import Int4WeightOnlyConfig

        # tile_packed_to_4d = torch's tinygemm kernel (no extra kernel package needed)
        return TorchAoConfig(quant_type=Int4WeightOnlyConfig(
            group_size=128, int4_packing_format="tile_packed_to_4d"))
    except ImportError:
        return TorchAoConfig("int4_weight_only", group_size=128)


def phase_int4(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """A 4-bit path that compiles: torchao int4 weight-only (tinygemm) + static cache."""
    import torch
    from transformers import AutoModelForCausalLM

    before = _fresh_memory()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.bfloat16, device_map={"": str(device())},
            quantization_config=_torchao_int4_config()).eval()
    except (RuntimeError, ImportError, ValueError, TypeError) as exc:
        log(f"torchao int4 unavailable: {type(exc).__name__}: {str(exc)[:300]}")
        return []
    model.generation_config.eos_token_id = None
    resident = round((torch.cuda.memory_allocated() - before) / 1024**3, 2)
    rows = []
    for batch in (1, 8):
        log(f"torchao int4 static cache + compile batch {batch} (compiling)")
        for _ in range(2):
            timed_generate(model, batch, args.prompt, args.new, cache_implementation="static")
        row = decode_rate(model, batch, args.prompt, args.new, args.repeats,
                          cache_implementation="static")
        rows.append({"variant": "ours: torchao int4 weight-only, static cache + compile",
                     "dtype": "int4", **row, "resident_gb": resident, "peak_gb": peak_gb()})
    return rows


async def _serve(backend: Any, concurrency: int, new: int, prompt_words: int) -> list[float]:
    from engine.types import ChatMessage, GenerationRequest, SamplingParams

    async def one(index: int) -> float:
        text = " ".join(["hello there"] * prompt_words) + f" #{index}"
        request = GenerationRequest(
            (ChatMessage("system", "You are Pell."), ChatMessage("user", text)),
            SamplingParams(max_new_tokens=new, min_new_tokens=new, temperature=0.0),
        )
        started = time.perf_counter()
        async for _chunk in backend.generate(request):
            pass
        return time.perf_counter() - started

    return list(await asyncio.gather(*(one(i) for i in range(concurrency))))


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_s": round(pick(0.5), 3), "p95_s": round(pick(0.95), 3)}


async def _serve_run(backend: Any, label: str, warm: int, n: int, new: int, words: int,
                     tiny: bool) -> tuple[list[float], float]:
    await backend.start()
    if not tiny:
        backend.model.generation_config.eos_token_id = None
    try:
        log(f"{label}: warm-up")
        await _serve(backend, warm, new, words)
        log(f"{label}: {n} concurrent requests")
        started = time.perf_counter()
        latencies = await _serve(backend, n, new, words)
        return latencies, time.perf_counter() - started
    finally:
        await backend.close()


def phase_serve(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """End to end through TransformersBackend: N concurrent 60-token replies."""
    from engine.backends.transformers_backend import TransformersBackend
    from engine.config import EngineConfig

    rows = []
    n, new = args.concurrency, 60
    for label, max_batch, static in (("baseline: one request at a time, eager", 1, "off"),
                                     ("ours: micro-batched, static cache + compile", n, "on")):
        config = {"models": {"llm": {"model_path": str(model_dir), "max_length": 2048,
                                     "max_batch_size": max_batch, "batch_window_ms": 20,
                                     "static_cache": "off" if args.tiny else static}}}
        llm = EngineConfig.from_mapping(config).llm
        backend = TransformersBackend(llm, model_dir.parent / "cache")

        warm = n if max_batch > 1 else 1
        latencies, wall = asyncio.run(
            _serve_run(backend, label, warm, n, new, args.prompt // 4, args.tiny)
        )
        rows.append({"variant": label, "dtype": "bf16", "concurrency": n, "new_tokens": new,
                     **_percentiles(latencies), "wall_s": round(wall, 2),
                     "aggregate_tok_s": round(n * new / wall, 1), "peak_gb": peak_gb()})
    return rows


def phase_cb(model_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """transformers' own continuous batching (paged attention), N concurrent 60-token replies."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = None
    for attn in ("paged|sdpa", "sdpa_paged"):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32 if args.tiny else torch.bfloat16,
                device_map={"": str(device())}, attn_implementation=attn).eval()
            break
        except ValueError as exc:
            log(f"attn_implementation {attn} refused: {exc}")
    if model is None:
        return []
    n, new = args.concurrency, 60
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    prompts = [torch.randint(10, 300, (args.prompt,)).tolist() for _ in range(n)]
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        log("continuous batching: warm-up")
        for rid in [manager.add_request(p, max_new_tokens=new) for p in prompts[:4]]:
            manager.get_result(rid, timeout=600)
        log(f"continuous batching: {n} concurrent requests")
        started = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=new) for p in prompts]
        finished: dict[str, float] = {}
        while len(finished) < n:
            result = manager.get_result(timeout=600)
            if result is None:
                break
            if result.request_id in ids:
                finished[result.request_id] = time.perf_counter() - started
        wall = time.perf_counter() - started
    finally:
        manager.stop(block=True)
    latencies = list(finished.values())
    return [{"variant": "transformers ContinuousBatchingManager (paged)", "dtype": "bf16",
             "concurrency": n, "new_tokens": new, **_percentiles(latencies),
             "wall_s": round(wall, 2), "aggregate_tok_s": round(len(latencies) * new / wall, 1),
             "peak_gb": peak_gb()}]


def print_table(rows: list[dict[str, Any]]) -> None:
    keys = ["variant", "dtype", "batch", "concurrency", "ttft_ms", "decode_tok_s_per_seq",
            "aggregate_tok_s", "p50_s", "p95_s", "resident_gb", "peak_gb"]
    shown = [k for k in keys if any(k in row for row in rows)]
    print(" | ".join(shown))
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in shown))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", default="all",
                        help="prepare, bf16, nf4, serve, cb, a comma list, or all; or "
                             "arrivals (benchmarks.arrivals_bench, its options after it)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="default: .bench/qwen3-8b (arrivals: its own default)")
    parser.add_argument("--out", type=Path, default=Path(".bench/results.jsonl"))
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    args, rest = parser.parse_known_args()
    if args.phase == "arrivals":  # its options (--cap, --variants, --loads) go along
        from benchmarks import arrivals_bench

        model = ["--model-dir", str(args.model_dir)] if args.model_dir else []
        arrivals_bench.main([*rest, *model, *(["--tiny"] if args.tiny else [])])
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.model_dir = args.model_dir or Path(".bench/qwen3-8b")
    if args.tiny:
        args.model_dir = Path(".bench/tiny")
        args.prompt, args.new, args.repeats, args.concurrency = 64, 8, 1, 4
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    log(f"environment: {env}")
    prepare(args.model_dir, args.tiny)
    phases = {"bf16": phase_bf16, "nf4": phase_nf4, "int4": phase_int4, "serve": phase_serve,
              "cb": phase_cb}
    chosen = list(phases) if args.phase == "all" else args.phase.split(",")
    if args.tiny or not torch.cuda.is_available():
        chosen = [p for p in chosen if p not in ("nf4", "int4")]
    rows: list[dict[str, Any]] = []
    for name in chosen if args.phase != "prepare" else []:
        phase_rows = phases[name](args.model_dir, args)
        rows.extend(phase_rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as handle:
            for row in phase_rows:
                handle.write(json.dumps({**env, "phase": name, **row}) + "\n")
        print_table(phase_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
