"""The `triton` backend: GPTQ layers computed by the Triton kernels (kernels/triton_gptq.py).

4- and 8-bit, any group size: act-order rows are regrouped at load
(backends/packed_linear.py); groups the kernels cannot tile are read through
g_idx. gptq_matmul picks the GEMV, the fused tl.dot kernel or dequantize +
cuBLAS by the number of rows.
"""

from __future__ import annotations

import torch
from backends.base import Backend, GPTQTensors
from backends.packed_linear import PackedGPTQLinear, kernel_unavailable_reason
from backends.quant_config import QuantConfig


class TritonLinear(PackedGPTQLinear):
    """The packed layer as it is: kernels.triton_gptq.gptq_matmul picks the kernel by the number of rows."""


class TritonBackend(Backend):
    name = "triton"
    description = "fused GPTQ dequant+matmul Triton kernel (CUDA GPU)"

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        return kernel_unavailable_reason(device, qconfig)

    def make_linear(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device) -> TritonLinear:
        return TritonLinear(tensors, qconfig, dtype, device)
