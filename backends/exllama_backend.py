"""The `exllama` backend: 4-bit GPTQ with ExLlama's layout and a CUDA GEMV chain for decode.

The layers are backends/exllama_linear.py's; a batch-1 decode step runs through all of them at once where
backends/exllama_decode.py can chain them.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.base import Backend, GPTQTensors
from backends.exllama_decode import SumsDecoder
from backends.exllama_linear import ExllamaLinear, cuda_gemv_unavailable
from backends.packed_linear import kernel_unavailable_reason
from backends.quant_config import QuantConfig

class ExllamaBackend(Backend):
    name = "exllama"
    description = "ExLlama-style 4-bit: act-order permuted at load, CUDA GEMV decode, dequantize + cuBLAS prefill"

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        if qconfig is not None and qconfig.bits != 4:
            return f"it runs 4-bit GPTQ only (this model is {qconfig.bits}-bit; use triton)"
        if qconfig is not None and qconfig.group_size != -1 and qconfig.group_size % 32:
            return f"group size {qconfig.group_size} is not a multiple of 32 (use triton)"
        return kernel_unavailable_reason(device, qconfig)

    def note(self, device: torch.device) -> str:
        """Which decode kernel runs, for the load report."""
        reason = cuda_gemv_unavailable(device)
        if reason is None:
            return "decode GEMV: CUDA (kernels/q4_gemv.cu)"
        return f"decode GEMV: Triton, because the CUDA GEMV is unavailable: {reason}"

    def make_linear(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device) -> ExllamaLinear:
        return ExllamaLinear(tensors, qconfig, dtype, device)

    def decode_chain(self, model: nn.Module) -> SumsDecoder | None:
        """The batch-1 decode step without the GEMVs' finishing tails (backends/exllama_decode.py), or None."""
        return SumsDecoder.build(model)
