"""The `exllama` backend: ExLlama's strategy for 4-bit GPTQ on the GPU.

At load, act-order checkpoints get ``q_perm`` (rows sorted by group) and
``q_invperm``; rows are repacked in that order so every group is a contiguous
run, and the activations are permuted to match at run time (the layout is
shared with the triton backend, backends/packed_linear.py). Decode (a few
rows) runs the GEMV kernel once per row; longer inputs dequantize the layer
to fp16 and use cuBLAS, as ExLlama does above its row threshold. Both kernels
are Triton (kernels/triton_gptq.py), so there is nothing to build; on the CPU
they run under TRITON_INTERPRET=1, which is how the tests check them.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.base import GPTQTensors
from backends.packed_linear import PackedGPTQLinear, kernel_unavailable_reason
from backends.quant_config import QuantConfig
from backends.weights import WeightsError

GEMV_MAX_ROWS = 4  # up to here, one GEMV per row; above, dequantize + cuBLAS


class ExllamaLinear(PackedGPTQLinear):
    SHARED = ("g_idx", "perm", "q_invperm")

    def __init__(self, t: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device):
        super().__init__(t, qconfig, dtype, device)
        if self.group_size == 0:
            raise WeightsError(f"'{t.name}': its act-order groups cannot be made contiguous runs; "
                               "load the model with the triton backend")
        self.register_buffer("q_invperm", torch.argsort(self.perm) if self.perm is not None else None)

    @property
    def q_perm(self) -> torch.Tensor | None:
        return self.perm

    def dequantize(self) -> torch.Tensor:
        """The fp16 weight ``[in_features, out_features]`` in the checkpoint's row order."""
        w = self._kernels.gptq_dequantize(self.qweight, self.scales, self.qzeros, None, 4, self.zero_offset,
                                          self.group_size)
        return w[self.q_invperm] if self.q_invperm is not None else w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernels
        if x.shape[0] <= GEMV_MAX_ROWS:
            rows = [k.gptq_gemv(x[i : i + 1], self.qweight, self.scales, self.qzeros, 4, self.zero_offset,
                                self.group_size) for i in range(x.shape[0])]
            return rows[0] if len(rows) == 1 else torch.cat(rows)
        return x @ k.gptq_dequantize(self.qweight, self.scales, self.qzeros, None, 4, self.zero_offset,
                                     self.group_size)


class ExllamaBackend:
    name = "exllama"
    description = "ExLlama-style 4-bit: act-order permuted at load, GEMV decode, dequantize + cuBLAS prefill"

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        if qconfig is not None and qconfig.bits != 4:
            return f"it runs 4-bit GPTQ only (this model is {qconfig.bits}-bit; use triton)"
        if qconfig is not None and qconfig.group_size != -1 and qconfig.group_size % 32:
            return f"group size {qconfig.group_size} is not a multiple of 32 (use triton)"
        return kernel_unavailable_reason(device, qconfig)

    def make_linear(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return ExllamaLinear(tensors, qconfig, dtype, device)
