"""Weight-only int4 (engine.serving.int4) against bf16 on one GPU: kernels, prefill, memory.

    python -m benchmarks.int4_bench [--model-dir .bench/qwen3-8b-realvocab]

1. The CUDA kernel computes with the dequantized weight (max error printed).
2. The linear layers of one Qwen3-8B decoder step, all 36 layers, at 1 to 1,024 rows: ms
   for bf16 ``F.linear``, int4 through tinygemm and int4 dequantized for cuBLAS (group 128),
   each replayed from a CUDA graph (so launch overhead is not counted).
3. The whole model loaded through the runtime's loader (``quantization: int4``): resident GPU
   memory, and a 1,024-token prefill (eager, and replayed from a CUDA graph as the runtime's
   prefills are), against the bf16 model.
Decode end to end (compiled, graph-captured) is ``arrivals_bench --variants int4``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks.arrivals_bench import prepare
from benchmarks.engine_bench import QWEN3_8B, log

ROWS = (1, 2, 4, 8, 16, 32, 1024)


def _shapes() -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's linear layers."""
    hidden, inter = QWEN3_8B["hidden_size"], QWEN3_8B["intermediate_size"]
    heads, kv, head_dim = (QWEN3_8B["num_attention_heads"], QWEN3_8B["num_key_value_heads"],
                           QWEN3_8B["head_dim"])
    return [(hidden, heads * head_dim), (hidden, kv * head_dim), (hidden, kv * head_dim),
            (heads * head_dim, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]


def _time_ms(fn: Any, repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _replay_ms(work: Any, repeats: int) -> float:
    """``work`` captured as a CUDA graph (after three warm-up runs), one replay's ms: the
    device's time without the host's per-call cost (launches, dynamo's guards)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            work()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return _time_ms(graph.replay, repeats)


def _graph_ms(layers: list[Any], inputs: dict[int, Any], repeats: int) -> float:
    """One replay of a CUDA graph that runs each layer once."""
    def run() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    return _replay_ms(run, repeats)


def _time_prefill(model: Any, ids: Any) -> float:
    return _time_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), 5)


def _time_captured_prefill(model: Any, ids: Any) -> float:
    """The same forward replayed from a CUDA graph, as the runtime's prefills run."""
    return _replay_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), 5)


def check_kernel() -> None:
    import torch
    from torch import nn

    from engine.serving.int4 import Int4Linear, dequantize, quantize_groups

    torch.manual_seed(0)
    linear = nn.Linear(4096, 1024, bias=False, dtype=torch.bfloat16, device="cuda")
    layer = Int4Linear(linear, 128, 8, torch.device("cuda"))
    codes, scales = quantize_groups(linear.weight, 128)
    x = torch.randn(5, 4096, dtype=torch.bfloat16, device="cuda")
    reference = x.float() @ dequantize(codes, scales.float(), 128).T
    error = (layer(x).float() - reference).abs().max().item()
    log(f"kernel check: max |int4 - dequantized reference| = {error:.4f} "
        f"(reference max {reference.abs().max().item():.2f})")
    assert error < 0.05 * reference.abs().max().item(), "int4 kernel disagrees"


def linear_layers() -> list[dict[str, Any]]:
    import torch
    from torch import nn

    from engine.serving import int4

    layers = QWEN3_8B["num_hidden_layers"]
    bf16 = [nn.Linear(i, o, bias=False, dtype=torch.bfloat16, device="cuda")
            for i, o in _shapes()]
    packed = [int4.Int4Linear(m, 128, 8, torch.device("cuda")) for m in bf16]
    rows = []
    default = int4.TINYGEMM_MAX_ROWS
    try:
        for m in ROWS:
            inputs = {i: torch.randn(m, i, dtype=torch.bfloat16, device="cuda")
                      for i, _ in _shapes()}
            repeats = 100 if m < 64 else 10
            row: dict[str, Any] = {"rows": m, "bf16_ms": _graph_ms(bf16, inputs, repeats)}
            for name, limit in (("tinygemm_ms", 1 << 30), ("dequant_cublas_ms", 0)):
                int4.TINYGEMM_MAX_ROWS = limit
                row[name] = _graph_ms(packed, inputs, repeats)
            rows.append({k: v if k == "rows" else round(v * layers, 2) for k, v in row.items()})
            log(f"linear layers of one step: {rows[-1]}")
    finally:
        int4.TINYGEMM_MAX_ROWS = default
    return rows


def whole_model(model_dir: Path) -> list[dict[str, Any]]:
    import torch

    from engine.gpu_manager import discover_devices, plan_placement
    from engine.model_loader import LoadReport, load_llm

    placement = plan_placement(discover_devices(), "cuda:0")
    rows = []
    for mode in ("int4", "none"):
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        report = LoadReport()
        model, _tokenizer = load_llm(model_dir, mode, placement, report)
        resident = (torch.cuda.memory_allocated() - before) / 2**30
        ids = torch.randint(10, 300, (1, 1024), device="cuda")
        with torch.no_grad():
            prefill = _time_prefill(model, ids)
            captured = _time_captured_prefill(model, ids)
        rows.append({"mode": report.mode, "load_s": round(report.seconds, 1),
                     "resident_gb": round(resident, 2), "prefill_1k_ms": round(prefill, 1),
                     "captured_prefill_1k_ms": round(captured, 1)})
        log(f"whole model: {rows[-1]}")
        del model
    return rows


def _table(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".bench/qwen3-8b-realvocab"))
    args = parser.parse_args()
    import torch

    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    check_kernel()
    kernels = linear_layers()
    prepare(args.model_dir, tiny=False)
    models = whole_model(args.model_dir)
    _table(kernels)
    _table(models)


if __name__ == "__main__":
    main()
