"""Weight-only int4 (engine.serving.int4) on the CPU kernel: layout, layer, whole model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.serving.int4 import Int4Linear, dequantize, quantize_groups, quantize_int4


def test_codes_and_scales_reconstruct_each_group_within_half_a_step() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 256)
    codes, scales_and_zeros = quantize_groups(weight, 64)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= 15
    assert scales_and_zeros.shape == (256 // 64, 16, 2)
    step = scales_and_zeros[..., 0].transpose(0, 1).repeat_interleave(64, dim=1)
    error = (dequantize(codes, scales_and_zeros, 64) - weight).abs()
    assert bool((error <= step / 2 + 1e-5).all())


def test_int4_linear_computes_with_the_dequantized_weight() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, bias=True)
    layer = Int4Linear(linear, group_size=64, inner_k_tiles=8, device=torch.device("cpu"))
    codes, scales_and_zeros = quantize_groups(linear.weight.detach(), 64)
    reference = nn.functional.linear(
        x := torch.randn(2, 3, 128), dequantize(codes, scales_and_zeros, 64), linear.bias)
    assert layer(x).shape == (2, 3, 48)
    torch.testing.assert_close(layer(x), reference, atol=1e-4, rtol=1e-4)
    assert not any(True for _ in layer.parameters())  # packed weights are buffers, not trained


def _dequantize_like(reference: Any, quantized: Any) -> Any:
    """The float model the int4 kernels are meant to compute: each Int4Linear's weight
    rounded the same way, in an nn.Linear."""
    groups = {name: m.group_size for name, m in quantized.named_modules()
              if isinstance(m, Int4Linear)}
    for name, child in reference.named_modules():
        if name in groups:
            codes, scales = quantize_groups(child.weight.detach(), groups[name])
            child.weight.data = dequantize(codes, scales, groups[name])
    return reference


def test_a_quantized_model_decodes_like_its_dequantized_weights(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    original = copy.deepcopy(model)
    quantized = quantize_int4(model, "cpu")
    reference = _dequantize_like(original, quantized)
    layers = [m for m in quantized.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 2 * 7 and {m.group_size for m in layers} == {64, 128}
    assert isinstance(quantized.lm_head, nn.Linear)
    prompt = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        ours = quantized.generate(prompt, max_new_tokens=12, do_sample=False)
        expected = reference.generate(prompt, max_new_tokens=12, do_sample=False)
    assert ours.tolist() == expected.tolist()


def test_no_quantizable_layer_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no linear layer"):
        quantize_int4(nn.Sequential(nn.Linear(60, 7)), "cpu")


def _fake_cuda_pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """A stand-in for the CUDA kernel's layout: each 8 × (16 · tiles) block's codes in a fixed
    shuffled order, eight to an int32 (the real order is the kernel's own business)."""
    out_features, in_features = codes.shape
    cols = 16 * inner_k_tiles
    shuffle = torch.randperm(8 * cols, generator=torch.Generator().manual_seed(3))
    blocks = codes.reshape(out_features // 8, 8, in_features // cols, cols).permute(0, 2, 1, 3)
    slots = blocks.reshape(out_features // 8, in_features // cols, 8 * cols)[..., shuffle]
    nibbles = slots.reshape(*slots.shape[:2], -1, 8)
    words = sum((nibbles[..., i].to(torch.int64) << (4 * i)) for i in range(8))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(out_features // 8, in_features // cols, 32, inner_k_tiles // 2)


def test_large_batches_unpack_the_packed_layout_found_by_probes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.serving import int4

    monkeypatch.setattr(int4, "_pack", _fake_cuda_pack)
    int4._block_order.cache_clear()
    try:
        order = int4._block_order(4, torch.device("cpu"))
        assert order is not None
        torch.manual_seed(0)
        weight = torch.randn(24, 256)
        codes, scales_and_zeros = quantize_groups(weight, 64)
        unpacked = int4._unpack(_fake_cuda_pack(codes, 4), order, scales_and_zeros, 64)
        torch.testing.assert_close(unpacked, dequantize(codes, scales_and_zeros, 64))
    finally:
        int4._block_order.cache_clear()


def test_an_unknown_layout_keeps_tinygemm_for_every_batch(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    from engine.serving import int4

    def not_blockwise(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
        return _fake_cuda_pack(codes.roll(1, dims=0), inner_k_tiles)  # rows cross blocks

    monkeypatch.setattr(int4, "_pack", not_blockwise)
    int4._block_order.cache_clear()
    try:
        assert int4._block_order(4, torch.device("cpu")) is None
        assert "unknown tinygemm layout" in caplog.text
    finally:
        int4._block_order.cache_clear()


def test_the_loader_quantizes_int4_itself_instead_of_asking_bitsandbytes(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``quantization: int4`` loads the weights on the CPU and quantizes them onto the GPU
    (here the CPU stands in for it); it is reported as int4 and needs no bitsandbytes."""
    from engine import serving
    from engine.gpu_manager import GIB, DeviceInfo, plan_placement
    from engine.model_loader import LoadReport, _load_kwargs, load_llm

    gpu = plan_placement([DeviceInfo(0, "H100", 80 * GIB, 79 * GIB)])
    kwargs = _load_kwargs("int4", gpu)
    assert kwargs["device_map"] == {"": "cpu"} and "quantization_config" not in kwargs
    targets: list[str] = []

    def onto_cpu(model: Any, device: str) -> Any:
        targets.append(device)
        return quantize_int4(model, "cpu")

    monkeypatch.setattr(serving, "quantize_int4", onto_cpu)
    report = LoadReport()
    model, _tokenizer = load_llm(tiny_model_dir, "int4", gpu, report)
    assert targets == ["cuda:0"] and report.mode == "int4"
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)


def test_a_failed_int4_step_lets_go_of_its_model_before_the_next_step(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory half way through quantizing: the half-quantized model must be freed
    before the fallback loads another copy (the error's traceback held it)."""
    import weakref

    from engine import model_loader, serving
    from engine.gpu_manager import GIB, DeviceInfo, plan_placement
    from engine.model_loader import LoadReport, load_llm

    half_done: list[weakref.ref[Any]] = []
    alive_at_next_step: list[bool] = []

    def out_of_memory(model: Any, device: str) -> Any:
        half_done.append(weakref.ref(model))
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    real_kwargs = model_loader._load_kwargs

    def cpu_fallback(step: str, placement: Any) -> dict[str, Any]:
        if half_done:
            alive_at_next_step.append(half_done[0]() is not None)
        kwargs = real_kwargs(step, placement)
        return kwargs if step == "int4" else real_kwargs("cpu", placement)

    monkeypatch.setattr(serving, "quantize_int4", out_of_memory)
    monkeypatch.setattr(model_loader, "_load_kwargs", cpu_fallback)
    gpu = plan_placement([DeviceInfo(0, "H100", 80 * GIB, 79 * GIB)])
    report = LoadReport()
    model, _tokenizer = load_llm(tiny_model_dir, "int4", gpu, report)
    assert model is not None
    assert report.steps[0]["step"] == "int4" and not report.steps[0]["ok"]
    assert alive_at_next_step and not alive_at_next_step[0]
