"""Placement on several GPUs: where the LLM's layers land, and what it costs per token.

    python -m benchmarks.placement_bench [--layers 36] [--hidden 4096]

Builds a random bf16 model of the Qwen3-8B shape (weights on local disk, nothing fetched),
then loads it three ways through the engine's own loader and decodes 60 tokens greedily,
batch 1, after a 200-token prompt:
- before: the old policy, ``device_map="auto"`` over every offered GPU (max_memory map);
- after: ``fit_to_model``, which keeps a model that fits one GPU on that GPU;
- forced split: ``fit_to_model`` told each GPU holds only 60 % of the model, so it must use
  its own contiguous layer map over two GPUs.
Printed: layers per GPU, load seconds, decode tok/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from engine.gpu_manager import GIB, DeviceInfo, discover_devices, plan_placement
from engine.model_fit import estimate_model_bytes, fit_to_model
from engine.model_loader import LoadReport, load_llm


def _build(target: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from tests.tiny_model import build_tiny_qwen3

    build_tiny_qwen3(target / "tok")  # only its tokenizer files are used
    config = Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                         tie_word_embeddings=False, dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda:0"):
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(target / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = target / "tok" / name
        if source.exists():
            (target / "model" / name).write_bytes(source.read_bytes())
    del model
    torch.cuda.empty_cache()
    return target / "model"


def _per_gpu(model: Any) -> dict[str, int]:
    mapping = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    return dict(Counter(str(v) for k, v in mapping.items() if ".layers." in k or k == ""))


def _decode_tok_s(model: Any, prompt_tokens: int = 200, new_tokens: int = 60) -> float:
    import torch

    ids = torch.randint(100, 50_000, (1, prompt_tokens), device=model.device)
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    model.generate(ids, **kwargs)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - started)


def _run(label: str, model_dir: Path, placement: Any) -> None:
    import torch

    started = time.perf_counter()
    model, _tokenizer = load_llm(model_dir, "none", placement, LoadReport())
    loaded = time.perf_counter() - started
    print(f"| {label} | {placement.llm_gpus} | {_per_gpu(model)} | {loaded:.1f} s | "
          f"{_decode_tok_s(model):.1f} |", flush=True)
    del model
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    devices = discover_devices()
    print(f"{len(devices)} GPU(s): {', '.join(d.name for d in devices)}")
    model_dir = _build(Path(tempfile.mkdtemp(prefix="placement-")), args.layers, args.hidden)
    size = estimate_model_bytes(model_dir, "none")
    print(f"model: {size / GIB:.1f} GiB bf16, {args.layers} layers\n")
    print("| placement | GPUs | decoder layers per device | load | decode tok/s (batch 1) |")
    print("| --- | --- | --- | --- | --- |")
    offered = plan_placement(devices)
    _run("before: auto over all", model_dir, offered)
    _run("after: fit_to_model", model_dir, fit_to_model(offered, devices, size, model_dir))
    small = [DeviceInfo(d.index, d.name, int(size * 0.6 / 0.9), d.free_bytes)
             for d in devices]
    forced = fit_to_model(plan_placement(small), small, size, model_dir)
    _run("forced split: layer map", model_dir, forced)


if __name__ == "__main__":
    main()
