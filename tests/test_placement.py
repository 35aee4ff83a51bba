"""Fitting the LLM to the offered GPUs (pure functions, faked devices): a model that fits one
GPU stays on one; a larger one takes the fewest GPUs, its layers spread by their memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.gpu_manager import GIB, DeviceInfo, plan_placement
from engine.model_fit import estimate_model_bytes, fit_to_model, layer_device_map


def _gpus(count: int, total_gib: int = 80) -> list[DeviceInfo]:
    return [DeviceInfo(i, "H100", total_gib * GIB, (total_gib - 1) * GIB) for i in range(count)]


def _model_dir(tmp_path: Path, layers: int, bf16_gib: float) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": layers,
        "torch_dtype": "bfloat16"}), encoding="utf-8")
    with (tmp_path / "model.safetensors").open("wb") as handle:  # a sparse file of that size
        handle.truncate(int(bf16_gib * GIB))
    return tmp_path


def test_a_4bit_8b_model_stays_on_one_gpu(tmp_path: Path) -> None:
    """The case measured on 4 GPUs: "auto" split it 0 / 3 / 15 / 22 layers."""
    model = _model_dir(tmp_path, layers=36, bf16_gib=16.4)
    devices = _gpus(4)
    placement = fit_to_model(plan_placement(devices), devices,
                             estimate_model_bytes(model, "4bit"), model)
    assert placement.llm_gpus == (0,) and placement.llm_device == "cuda:0"
    assert placement.layer_map is None and list(placement.llm_max_memory) == [0]
    assert placement.embedder_device == "cuda:3"  # the embedder's place is unchanged


def test_a_model_larger_than_one_gpu_takes_the_fewest_and_spreads_its_layers(
        tmp_path: Path) -> None:
    model = _model_dir(tmp_path, layers=80, bf16_gib=131.0)  # a 70B model in bf16
    devices = _gpus(4)
    placement = fit_to_model(plan_placement(devices), devices,
                             estimate_model_bytes(model, "none"), model)
    assert placement.llm_gpus == (0, 1, 2)  # 131 GiB + headroom does not fit two 72 GiB
    layer_map = placement.layer_map
    assert layer_map is not None
    per_gpu = [sum(1 for k, v in layer_map.items() if k.startswith("model.layers.") and v == g)
               for g in (0, 1, 2)]
    assert per_gpu == [27, 27, 26] and sum(per_gpu) == 80
    assert layer_map["model.embed_tokens"] == 0 and layer_map["lm_head"] == 2
    layers = [layer_map[f"model.layers.{i}"] for i in range(80)]
    assert layers == sorted(layers)  # contiguous: one hop per GPU boundary


@pytest.mark.parametrize(("layers", "weights"), [(2, [1.0, 1.0, 1.0]), (5, [10.0, 1.0]),
                                                 (36, [1.0, 3.0])])
def test_every_gpu_gets_a_layer_and_every_layer_a_gpu(layers: int,
                                                      weights: list[float]) -> None:
    gpus = list(range(len(weights)))
    mapping = layer_device_map(max(layers, len(gpus)), gpus, weights)
    placed = [v for k, v in mapping.items() if k.startswith("model.layers.")]
    assert len(placed) == max(layers, len(gpus)) and set(placed) == set(gpus)


def test_unknown_architectures_and_single_gpus_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5Model"]}),
                                          encoding="utf-8")
    devices = _gpus(4)
    big = fit_to_model(plan_placement(devices), devices, 200 * GIB, tmp_path)
    assert big.layer_map is None and len(big.llm_gpus) == 4  # accelerate's "auto" decides
    one = plan_placement(_gpus(1))
    assert fit_to_model(one, _gpus(1), 200 * GIB, tmp_path) == one


def test_the_layer_map_places_every_parameter_of_a_real_qwen3(tiny_model_dir: Path) -> None:
    """Every weight of the real model class falls under exactly one mapped module name."""
    from transformers import AutoModelForCausalLM

    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    mapping = layer_device_map(layers, [0, 1], [1.0, 1.0])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, _ in model.named_parameters():
        owners = [m for m in mapping if name == m or name.startswith(m + ".")]
        assert len(owners) == 1, name
