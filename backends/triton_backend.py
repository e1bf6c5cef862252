"""The `triton` backend: GPTQ layers computed by the Triton kernels (kernels/triton_gptq.py).

4- and 8-bit, any group size: act-order rows are regrouped at load
(backends/packed_linear.py); groups the kernels cannot tile are read through
g_idx. gptq_matmul picks the GEMV, the fused tl.dot kernel or dequantize +
cuBLAS by the number of rows.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.base import GPTQTensors
from backends.packed_linear import PackedGPTQLinear, contiguous_layout, kernel_unavailable_reason
from backends.quant_config import QuantConfig

__all__ = ["TritonBackend", "TritonLinear", "contiguous_layout"]


class TritonLinear(PackedGPTQLinear):
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernels.gptq_matmul(x, self.qweight, self.scales, self.qzeros, self.g_idx,
                                         self.bits, self.zero_offset, self.group_size)


class TritonBackend:
    name = "triton"
    description = "fused GPTQ dequant+matmul Triton kernel (CUDA GPU)"

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        return kernel_unavailable_reason(device, qconfig)

    def make_linear(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return TritonLinear(tensors, qconfig, dtype, device)
