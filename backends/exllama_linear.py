"""The `exllama` backend's layer: ExLlama's strategy for 4-bit GPTQ on the GPU.

At load, act-order checkpoints get ``q_perm`` (rows sorted by group) and
``q_invperm``; rows are repacked in that order so every group is a contiguous
run, and the activations are permuted to match at run time (the layout is
shared with the triton backend, backends/packed_linear.py).

One or two rows (decode) run the CUDA GEMV (kernels/q4_gemv.cu, built with nvcc
on first use), which also finishes the layer's neighbours in the same kernel:
the residual add after o_proj and down_proj, and SiLU(gate) * up after the
fused gate/up projection, whose columns are interleaved in 128-column tiles
for it. Where the CUDA kernels cannot be built (no nvcc) or cannot run (the
CPU under TRITON_INTERPRET=1, as in the tests), the Triton GEMV takes its place
and says so in the load report. 3 to 32 rows (a batch of decoding sequences)
run the CUDA tensor-core matmul (kernels/q4_mma.cu) on the same tensors, more
rows the Triton matmul, and long inputs dequantize the layer to fp16 and use
cuBLAS, as ExLlama does above its row threshold.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from backends.base import GPTQTensors
from backends.packed_linear import PackedGPTQLinear
from backends.quant_config import QuantConfig
from backends.weights import WeightsError
from kernels import cuda_lib, q4_gemv, q4_mma, triton_gptq
from kernels.silu_mul import silu_mul_tiles

# Up to here the CUDA GEMV; above, the tensor-core matmul. A 7B step of 4 rows took 4.59 ms with the GEMV
# and 4.07 with the matmul (its norm, SiLU and residual add then separate kernels); 2 rows 3.46 against 3.77
# (benchmarks/experiments/step_kernels.py, H200, 2026-12-02). The GEMV runs up to q4_gemv.MAX_ROWS.
GEMV_MAX_ROWS = 2
# Up to here the tensor-core matmul; above, the Triton matmul and, past its range, dequantize + cuBLAS
# (kernels.triton_gptq). At 64 rows the tensor-core kernel was slower than Triton's on the H200.
MMA_MAX_ROWS = 32


@functools.cache
def cuda_gemv_unavailable(device: torch.device) -> str | None:
    """Why the CUDA GEMV cannot run on ``device`` (building it on first use), or None."""
    return cuda_lib.unavailable_reason(device)


class ExllamaLinear(PackedGPTQLinear):
    """A 4-bit layer whose decode GEMV folds in the input's RMSNorm (``forward(x, norm)``), the residual add
    (:meth:`forward_add`) and, for gate/up fused by :meth:`fuse_glu`, SiLU(gate) * up (:meth:`silu_mul`)."""

    SHARED = ("g_idx", "perm", "q_invperm", "q_perm32")

    def __init__(self, t: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device):
        super().__init__(t, qconfig, dtype, device)
        if self.group_size == 0:
            raise WeightsError(f"'{t.name}': its act-order groups cannot be made contiguous runs; "
                               "load the model with the triton backend")
        self.register_buffer("q_invperm", torch.argsort(self.perm) if self.perm is not None else None)
        self.register_buffer("q_perm32", self.perm.to(torch.int32) if self.perm is not None else None)
        self.glu = False  # gate/up fused with interleaved tiles: see fuse_glu
        self.workspace: q4_gemv.Workspace | None = None

    @property
    def q_perm(self) -> torch.Tensor | None:
        return self.perm

    @classmethod
    def fuse(cls, parts: list["ExllamaLinear"]) -> "ExllamaLinear | None":
        fused = super().fuse(parts)
        if fused is not None:
            fused.glu, fused.workspace = False, None
        return fused

    @classmethod
    def fuse_glu(cls, gate: "ExllamaLinear", up: "ExllamaLinear") -> "ExllamaLinear | None":
        """gate and up as one layer whose :meth:`silu_mul` is ``silu(gate(x)) * up(x)`` -- in the GEMV's
        epilogue for decode. Columns alternate 128-column tiles of gate and up."""
        if gate.bias is not None or up.bias is not None or gate.out_features % q4_gemv.TILE_N:
            return None
        fused = cls.fuse([gate, up])
        if fused is None:
            return None
        fused.qweight = q4_gemv.interleave_glu(fused.qweight)
        fused.scales = q4_gemv.interleave_glu(fused.scales)
        fused.qzeros = q4_gemv.interleave_glu(fused.qzeros, 8)
        fused.glu = True
        return fused

    def dequantize(self) -> torch.Tensor:
        """The fp16 weight ``[in_features, out_features]`` in the checkpoint's row (and column) order."""
        w = triton_gptq.gptq_dequantize(self.packed)
        w = w[self.q_invperm] if self.q_invperm is not None else w
        return self._deinterleave(w) if self.glu else w

    def _deinterleave(self, y: torch.Tensor) -> torch.Tensor:
        """Interleaved gate/up tiles -> [gate | up] along the last dimension."""
        tiles = y.reshape(*y.shape[:-1], -1, 2, q4_gemv.TILE_N)
        return torch.cat((tiles[..., 0, :].flatten(-2), tiles[..., 1, :].flatten(-2)), dim=-1)

    def _cuda_rows(self, x: torch.Tensor) -> bool:
        """Whether a CUDA kernel takes these rows ``[M, K]`` (once cast to fp16): the GEMV or the tensor-core
        matmul, both of which gather the rows through q_perm themselves."""
        m = x.shape[0]
        if not x.is_cuda or m > MMA_MAX_ROWS or cuda_gemv_unavailable(x.device) is not None:
            return False
        if m <= GEMV_MAX_ROWS:
            return q4_gemv.supports(self.out_features, self.in_features, self.group_size)
        return q4_mma.supports(self.out_features, self.in_features, self.group_size)

    def cuda_matmul(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """``norm(x) @ W`` by the CUDA kernels for rows in checkpoint order: the GEMV up to 4 rows, the
        tensor-core matmul up to 64."""
        if x.shape[0] <= GEMV_MAX_ROWS:
            return self.cuda_gemv(x, norm)
        if norm is not None:
            raise ValueError("the tensor-core matmul takes normalized rows")
        return q4_mma.q4_mma(x, self.qweight, self.scales, self.qzeros, self.zero_offset, self.group_size,
                             perm=self.q_perm32)

    def cuda_gemv(self, x: torch.Tensor | None, norm: nn.Module | None = None, **options) -> torch.Tensor:
        """The CUDA GEMV of rows ``x`` in checkpoint order (it gathers them through q_perm itself), RMS-normed
        by ``norm`` in the kernel if given; ``options``: kernels.q4_gemv.q4_gemv's epilogue and input options."""
        if self.workspace is None:  # on the first (eager) decode step, before any graph capture
            self.workspace = q4_gemv.Workspace(self.out_features, self.qweight.device)
        folded = (norm.weight, norm.eps) if norm is not None else None
        return q4_gemv.q4_gemv(x, self.qweight, self.scales, self.qzeros, self.zero_offset, self.group_size,
                               self.workspace, perm=self.q_perm32, norm=folded, **options)

    def _rows(self, x: torch.Tensor, norm: nn.Module | None = None) -> tuple[torch.Tensor, bool, nn.Module | None]:
        """fp16 rows ``[M, K]`` of ``norm(x)``, whether a CUDA kernel takes them (then in checkpoint order,
        for the kernels gather through q_perm while staging them; else already permuted), and the norm the
        GEMV still has to apply (None where it was applied here)."""
        x2 = x.reshape(-1, self.in_features)
        cuda = self._cuda_rows(x2)  # on the device, row count and shape: the cast below changes none of them
        gemv = cuda and x2.shape[0] <= GEMV_MAX_ROWS
        if norm is not None and not (gemv and x2.dtype == norm.weight.dtype == torch.float16):
            x2, norm = norm(x2), None
        x2 = x2.to(torch.float16).contiguous()
        if cuda:
            return x2, True, norm
        return (x2[:, self.perm].contiguous() if self.perm is not None else x2), False, None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Rows already permuted (see :meth:`_rows`; the CUDA GEMV path does not come here)."""
        packed = self.packed
        if x.shape[0] == 1:
            return triton_gptq.gptq_gemv(x, packed)
        return triton_gptq.gptq_matmul(x, packed)  # the fused kernel for a batch, dequantize + cuBLAS for more

    def _project(self, x: torch.Tensor, x2: torch.Tensor, cuda: bool, norm: nn.Module | None) -> torch.Tensor:
        """The layer's output for input ``x`` from its prepared rows ``x2`` (see :meth:`_rows`)."""
        y = self.cuda_matmul(x2, norm) if cuda else self.matmul(x2)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return self._deinterleave(y) if self.glu else y

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """``self(norm(x))`` (RMSNorm keeps the dtype of x)."""
        return self._project(x, *self._rows(x, norm))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``, the add in the GEMV's epilogue where it can be."""
        x2, cuda, _ = self._rows(x)
        if cuda and x2.shape[0] <= GEMV_MAX_ROWS and self.bias is None and residual.dtype == torch.float16:
            return self.cuda_gemv(x2, residual=residual.contiguous()).view(residual.shape)
        return residual + self._project(x, x2, cuda, None)

    def silu_mul(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """``silu(gate) * up`` for input ``norm(x)``, ``[..., out_features / 2]``; in the GEMV's epilogue for a
        :meth:`fuse_glu` layer."""
        if not self.glu:
            return super().silu_mul(x, norm)
        x2, cuda, norm = self._rows(x, norm)
        half = self.out_features // 2
        if cuda and x2.shape[0] <= GEMV_MAX_ROWS:
            y = self.cuda_gemv(x2, norm, silu_mul=True)
        else:
            y = silu_mul_tiles(self.cuda_matmul(x2, norm) if cuda else self.matmul(x2), q4_gemv.TILE_N)
        return y.to(x.dtype).view(*x.shape[:-1], half)
