"""The pure-PyTorch backend: GPTQ weights dequantized once, then plain matmuls.

Runs anywhere torch runs (CPU or any GPU) and is the oracle for the kernels.
"""

from __future__ import annotations

import torch

from backends.base import Backend, DenseLinear, GPTQTensors, concat_bias
from backends.quant_config import QuantConfig
from kernels.gptq_format import dequantize


class DequantizedLinear(DenseLinear):
    def __init__(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device):
        w = dequantize(
            tensors.qweight.to(device),
            tensors.qzeros.to(device),
            tensors.scales.to(device),
            tensors.group_index(qconfig).to(device),
            qconfig.bits,
            qconfig.zero_offset,
            torch.float32,
        )
        bias = tensors.bias.to(device=device, dtype=dtype) if tensors.bias is not None else None
        super().__init__(w.t().contiguous().to(dtype), bias)

    @classmethod
    def fuse(cls, parts: list["DequantizedLinear"]) -> "DequantizedLinear | None":
        """One layer computing the parts' outputs side by side (they share their input)."""
        bias = concat_bias(parts)
        if bias is False:
            return None
        fused = cls.__new__(cls)
        DenseLinear.__init__(fused, torch.cat([p.weight for p in parts]), bias)
        return fused


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch, dequantized weights (CPU or any GPU)"

    def make_linear(
        self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device
    ) -> DequantizedLinear:
        return DequantizedLinear(tensors, qconfig, dtype, device)
