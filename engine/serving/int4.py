"""Weight-only int4 through PyTorch's own tinygemm kernels (no torchao, no bitsandbytes).

Each linear layer of the decoder is quantized per group of input columns, asymmetrically:
``w ≈ (q - 8) * scale + zero`` with ``q`` in 0..15, the layout the ``_weight_int4pack_mm`` kernels
expect (``zero`` is the group's value at q = 8). Embeddings and the output head stay in the
model's dtype. The model is loaded on the CPU and quantized layer by layer onto its device, so
the GPU never holds the bf16 weights (an 8B model then needs ~6 GB instead of 16 GB).

CUDA needs bf16 activations and sm80+; the CPU kernel (used by the tests) takes any float dtype.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

GROUP_SIZES = (128, 64, 32)  # the kernels' choices; the largest that divides a layer wins
INNER_K_TILES = (8, 4, 2)
SKIPPED_LAYERS = ("lm_head",)  # the output head decides every token: kept in full precision
# tinygemm is made for a few rows; above this many, the weight is dequantized for cuBLAS.
# An 8B model on an H200: a prefill of 1,024 tokens 483 ms through tinygemm, 71 ms dequantized
# (benchmarks/int4_bench.py); with 8 rather than 32 here, a burst of 32 replies took 1.84
# instead of 2.31 s (benchmarks/arrivals_bench.py, docs/performance-history.md).
TINYGEMM_MAX_ROWS = 8


def _pick(in_features: int, out_features: int) -> tuple[int, int] | None:
    """(group size, inner k tiles) the kernels accept for this shape, or None."""
    if out_features % 8:
        return None
    group = next((g for g in GROUP_SIZES if in_features % g == 0), None)
    tiles = next((t for t in INNER_K_TILES if in_features % (t * 16) == 0), None)
    return None if group is None or tiles is None else (group, tiles)


def quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes ``[out, in]`` (int32, 0..15) and scales/zeros ``[in / group, out, 2]``."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    scale = (groups.amax(dim=-1, keepdim=True) - low).clamp(min=1e-6) / 15
    codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32)
    scales_and_zeros = torch.cat([scale, low + 8 * scale], dim=-1).transpose(0, 1)
    return codes.reshape(out_features, in_features), scales_and_zeros.contiguous()


def dequantize(codes: torch.Tensor, scales_and_zeros: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """The float weight the kernels compute with (the reference for tests)."""
    out_features, in_features = codes.shape
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)
    groups = codes.float().reshape(out_features, in_features // group_size, group_size)
    return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(out_features, in_features)


def _pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    packed: torch.Tensor
    if codes.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)
    else:
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
    return packed


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit slots of a CUDA-packed weight, per 8 × (16 · tiles) block, in memory order."""
    words = packed.reshape(packed.shape[0], packed.shape[1], -1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((words.unsqueeze(-1) >> shifts) & 15).flatten(-2)


def _unpack(packed: torch.Tensor, order: torch.Tensor, scales_and_zeros: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """The dequantized ``[out, in]`` weight of a CUDA-packed layer."""
    blocks_n, blocks_k = packed.shape[0], packed.shape[1]
    block_cols = order.numel() // 8
    codes = _nibbles(packed).index_select(-1, order).reshape(blocks_n, blocks_k, 8, block_cols)
    out_features, in_features = blocks_n * 8, blocks_k * block_cols
    codes = codes.permute(0, 2, 1, 3).reshape(out_features, in_features // group_size, group_size)
    scale, zero = scales_and_zeros.transpose(0, 1).unsqueeze(-1).unbind(-2)
    weight = (codes.to(scales_and_zeros.dtype) - 8) * scale + zero
    return weight.reshape(out_features, in_features)


@functools.cache
def _compiled_unpack() -> Any:
    # One fused kernel per weight shape: read 0.5 byte, write 2 bytes per weight.
    return torch.compile(_unpack, dynamic=False, fullgraph=True)


@functools.cache
def _block_order(inner_k_tiles: int, device: torch.device) -> torch.Tensor | None:
    """Where each code of an 8 × (16 · tiles) block sits among the packed nibbles, found by
    packing probes (the kernel's tile layout is not a public format). None if the layout is
    not a permutation of whole blocks; then tinygemm serves every batch size."""
    block_cols = 16 * inner_k_tiles
    position = torch.arange(8 * block_cols, dtype=torch.int32, device=device)
    held = torch.zeros_like(position)
    for digit in range(3):  # 8 · 128 positions at most: three hex digits
        probe = ((position >> (4 * digit)) & 15).reshape(8, block_cols)
        held |= _nibbles(_pack(probe, inner_k_tiles)).reshape(-1) << (4 * digit)
    order = torch.argsort(held)
    codes = torch.randint(0, 16, (16, 2 * block_cols), dtype=torch.int32, device=device)
    ones = torch.ones(2 * block_cols // 32, 16, 2, device=device)
    ones[..., 1] = 8.0  # scale 1, zero 8: the dequantized weight is the codes
    if not torch.equal(_unpack(_pack(codes, inner_k_tiles), order, ones, 32), codes.float()):
        log.warning("int4: unknown tinygemm layout; large batches stay on tinygemm (slow)")
        return None
    return order


class Int4Linear(nn.Module):
    """A drop-in ``nn.Linear`` (same attribute names) whose weight is packed int4."""

    weight_packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, group_size: int, inner_k_tiles: int,
                 device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size
        weight = linear.weight.detach().to(device)
        codes, scales_and_zeros = quantize_groups(weight, group_size)
        self.register_buffer("weight_packed", _pack(codes, inner_k_tiles))
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(weight.dtype))
        bias = linear.bias.detach().to(device) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        on_cpu = device.type == "cpu"
        self._matmul = (torch.ops.aten._weight_int4pack_mm_for_cpu if on_cpu
                        else torch.ops.aten._weight_int4pack_mm)
        # The CPU kernel handles any row count; CUDA's tinygemm only a few (see above).
        self._order = None if on_cpu else _block_order(inner_k_tiles, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out: torch.Tensor
        if self._order is not None and rows.shape[0] > TINYGEMM_MAX_ROWS:
            weight = _compiled_unpack()(self.weight_packed, self._order, self.scales_and_zeros,
                                        self.group_size)
            out = nn.functional.linear(rows, weight)
        else:
            out = self._matmul(rows, self.weight_packed, self.group_size, self.scales_and_zeros)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}"


def quantize_int4(model: Any, device: torch.device | str) -> Any:
    """Replace the decoder's linear layers by ``Int4Linear`` on ``device``, one at a time,
    then move the rest of the model there. Returns the model."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        raise RuntimeError("int4 weight-only needs an Ampere or newer GPU (sm80+)")
    quantized, kept = 0, 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or name in SKIPPED_LAYERS:
                continue
            shape = _pick(child.in_features, child.out_features)
            if shape is None:
                kept += 1
                continue
            setattr(parent, name, Int4Linear(child, *shape, device))
            quantized += 1
    if not quantized:
        raise RuntimeError("int4: no linear layer has a shape the int4 kernels accept")
    model.to(device)
    model.hf_device_map = {"": str(device)}
    log.info("int4 weight-only: %d linear layers quantized, %d kept in %s", quantized, kept,
             next(model.parameters()).dtype)
    return model
