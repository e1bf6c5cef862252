"""The `cpu` backend: GPTQ weights kept packed on the CPU, activations in bf16.

- 4-bit, where the CPU has AVX-512 VNNI and a C++ compiler builds kernels/cpu_q4.cpp: that kernel (int8
  activations in blocks of 32 against the 4-bit weights, 16 columns a vector), about twice as fast as torch's.
  A layer's steps around it run in the same call (the input's RMSNorm, the act-order gather, the residual add,
  SiLU(gate) * up), rounded to bf16 where the torch steps would round: a decode step was otherwise hundreds
  of small tensor operations.
- 4-bit otherwise: torch's int4 CPU kernel (``aten._weight_int4pack_mm_for_cpu``), weights converted once at load.
  It computes ``(q - 8) * scale + zero`` per group; GPTQ's ``(q - z) * scale`` is that with
  ``zero = (8 - z) * scale``. The kernel takes that zero in bf16, whose rounding is one error shared by a
  whole group's rows (without groups, a whole column's), so it gets zero = 0 and the term is added in fp32:
  each group's sum of x times ``(8 - z) * scale``, a small matmul of G = K / group columns.
  The kernel's group must divide K; a GPTQ group it cannot take (no groups, or 128 where K = 576) is split
  into smaller kernel groups that repeat the scale.
- 8-bit: without groups through torch's int8 kernel (``aten._weight_int8pack_mm``, one scale per column; the
  zero point is a rank-one correction); with groups, each call dequantizes its one layer to bf16.
- Act-order rows are sorted by group at load (the activations permuted to match), as the exllama backend
  does, so every group is a contiguous run of rows.
A layer the kernels cannot take is refused with the reason, never run on a slow path.
"""

from __future__ import annotations

import torch
from torch import nn

from backends.base import Backend, DenseLinear, GPTQTensors, Linear, concat_bias, same_tensor
from backends.model import RMSNorm, TorchOps
from backends.quant_config import QuantConfig
from backends.weights import WeightsError
from kernels import cpu_q4
from kernels.act_order import IrregularGroups, group_order
from kernels.gptq_format import unpack_rows, unpack_zeros

KERNEL_GROUPS = (256, 128, 64, 32)  # what the int4 kernel takes, largest first
INT4_N_MULTIPLE = 16
ACTIVATIONS = torch.bfloat16


def kernel_group(in_features: int, group_size: int) -> int | None:
    """The largest int4-kernel group that divides both K and the GPTQ group, or None."""
    return next((g for g in KERNEL_GROUPS if in_features % g == 0 and group_size % g == 0), None)


def sorted_by_group(g_idx: torch.Tensor, group_size: int, name: str) -> torch.Tensor | None:
    try:
        return group_order(g_idx, group_size)
    except IrregularGroups as exc:
        raise WeightsError(f"'{name}': {exc}; the cpu backend cannot regroup them (use the reference backend)") from exc


class PackedCpuLinear(Linear):
    def __init__(self, t: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features, self.out_features, self.bits = t.in_features, t.out_features, qconfig.bits
        self.vnni = False
        group = qconfig.effective_group_size(t.in_features)
        q = unpack_rows(t.qweight, qconfig.bits)[: t.in_features]  # [K, N]
        zeros = unpack_zeros(t.qzeros, qconfig.bits, qconfig.zero_offset).float()  # [G, N]
        scales = t.scales.float()
        g_idx = t.group_index(qconfig).cpu()
        perm = None if qconfig.group_size == -1 else sorted_by_group(g_idx, group, t.name)
        if perm is not None:
            q = q[perm]
        self.register_buffer("perm", perm)
        rows_group = torch.arange(t.in_features) // group  # after sorting, row k is in group k // group
        self.register_buffer("bias", t.bias.to(dtype=ACTIVATIONS) if t.bias is not None else None)
        if qconfig.bits == 4:
            self._init_int4(q, scales, zeros, rows_group, group, t.name)
        else:
            self._init_int8(q, scales, zeros, rows_group, group)

    def _init_int4(self, q, scales, zeros, rows_group, group, name) -> None:
        k, n = q.shape
        step = kernel_group(k, group if group < k else k)
        if step is None or n % INT4_N_MULTIPLE:
            raise WeightsError(f"'{name}': the int4 CPU kernel cannot take K={k}, N={n} with group size {group} "
                               f"(it needs N a multiple of {INT4_N_MULTIPLE} and a group of {KERNEL_GROUPS} "
                               "dividing K); use the reference backend")
        self.kernel_group = step
        starts = rows_group[torch.arange(0, k, step)]  # each kernel group's GPTQ group
        self.vnni = cpu_q4.load() is not None and cpu_q4.takes(k, n, step)
        self.register_buffer("rows_group", rows_group)
        if self.vnni:
            self.register_buffer("packed", cpu_q4.pack(q))
            self.register_buffer("tile_scales", cpu_q4.tile_params(scales[starts], torch.float16))
            # A symmetric checkpoint's zero points are one value: the kernel takes it, not a table as large
            # as the scales (that table was an eighth of the bytes a token read).
            one_zero = bool((zeros == zeros.flatten()[0]).all())
            self.tile_zeros = float(zeros.flatten()[0]) if one_zero else None
            self.register_buffer("tile_zero_scales", None if one_zero else cpu_q4.tile_params((zeros * scales)[starts]))
            self.register_buffer("zero_terms", None)  # the kernel takes the zero points itself
            return
        s = scales[starts]  # the GPTQ group's scale for each kernel group
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.t().contiguous().to(torch.int32), 2))
        self.register_buffer("scales_and_zeros", torch.stack([s, torch.zeros_like(s)], dim=-1).to(ACTIVATIONS)
                             .contiguous())
        zero_terms = (8 - zeros) * scales  # fp32 [G, N]; none in a symmetric checkpoint (z = 8)
        self.register_buffer("zero_terms", zero_terms if bool(zero_terms.any()) else None)

    def _init_int8(self, q, scales, zeros, rows_group, group) -> None:
        k, _ = q.shape
        self.one_group = group >= k
        if self.one_group:  # (q - z) s = (q - 128) s + (128 - z) s: the int8 kernel plus a rank-one term
            self.register_buffer("weight_int8", (q - 128).t().contiguous().to(torch.int8))
            self.register_buffer("column_scales", scales[0].to(ACTIVATIONS))
            self.register_buffer("zero_term", ((128 - zeros[0]) * scales[0]).float())
        else:
            self.register_buffer("q8", q.to(torch.uint8))
            self.register_buffer("rows_group", rows_group)
            self.register_buffer("scales", scales.to(ACTIVATIONS))
            self.register_buffer("zeros", zeros.to(torch.int16))

    def _fused_takes(self, x: torch.Tensor, norm: nn.Module | None = None) -> bool:
        """Whether kernels/cpu_q4.cpp's one-call layer step takes this input (and this norm, folded in)."""
        return (self.bits == 4 and self.vnni and self.bias is None and x.dtype == ACTIVATIONS
                and (norm is None or (type(norm) is RMSNorm and norm.weight.dtype == ACTIVATIONS)))

    def _fused(self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None,
               glu: bool = False) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = cpu_q4.linear(rows, self.packed, self.tile_scales, self._zeros(), self.kernel_group,
                          norm=(norm.weight, norm.eps) if norm is not None else None, perm=self.perm,
                          residual=residual.reshape(rows.shape[0], -1).contiguous() if residual is not None else None,
                          glu=glu)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _zeros(self) -> torch.Tensor | float:
        return self.tile_zero_scales if self.tile_zero_scales is not None else self.tile_zeros

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        if self._fused_takes(x, norm):
            return self._fused(x, norm)
        return super().forward(x, norm)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self._fused_takes(x) and residual.dtype == ACTIVATIONS:
            return self._fused(x, residual=residual)
        return super().forward_add(x, residual)

    def silu_mul(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        if self._fused_takes(x, norm):
            return self._fused(x, norm, glu=True)
        return super().silu_mul(x, norm)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(ACTIVATIONS)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        x2 = x2.contiguous()
        if self.bits == 4 and self.vnni:
            y = cpu_q4.matmul(x2, self.packed, self.tile_scales, self._zeros(), self.kernel_group)
        elif self.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.kernel_group, self.scales_and_zeros)
            if self.zero_terms is not None:
                group_sums = x2.new_zeros((x2.shape[0], self.zero_terms.shape[0]), dtype=torch.float32)
                group_sums.index_add_(1, self.rows_group, x2.float())
                y = (y.float() + group_sums @ self.zero_terms).to(ACTIVATIONS)
        elif self.one_group:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.column_scales)
            y = (y.float() + x2.float().sum(-1, keepdim=True) * self.zero_term).to(ACTIVATIONS)
        else:  # this layer alone in bf16, for this call; q - z is exact, one rounding
            g = self.rows_group
            w = (self.q8.to(torch.int16) - self.zeros[g]).to(ACTIVATIONS) * self.scales[g]
            y = x2 @ w
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


    @classmethod
    def fuse(cls, parts: list["PackedCpuLinear"]) -> "PackedCpuLinear | None":
        """4-bit projections of one input (q/k/v, gate/up) as one kernel call: the packed rows of W^T (N) and
        the scales stack along N."""
        first = parts[0]
        if (any(p.bits != 4 or p.kernel_group != first.kernel_group or p.vnni != first.vnni for p in parts)
                or not same_tensor([p.perm for p in parts]) or not same_tensor([p.rows_group for p in parts])
                or len({p.zero_terms is None for p in parts}) > 1
                or len({getattr(p, "tile_zeros", None) for p in parts}) > 1):
            return None
        bias = concat_bias(parts)
        if bias is False:
            return None
        fused = cls.__new__(cls)
        Linear.__init__(fused)
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.bits, fused.kernel_group, fused.vnni = 4, first.kernel_group, first.vnni
        fused.register_buffer("perm", first.perm)
        fused.register_buffer("rows_group", first.rows_group)
        fused.register_buffer("bias", bias)
        fused.register_buffer("packed", torch.cat([p.packed for p in parts]))
        if first.vnni:  # tiles of 16 columns: the parts' tiles one after the other
            fused.register_buffer("tile_scales", torch.cat([p.tile_scales for p in parts]))
            fused.tile_zeros = first.tile_zeros
            fused.register_buffer("tile_zero_scales", None if first.tile_zeros is not None
                                  else torch.cat([p.tile_zero_scales for p in parts]))
            return fused
        fused.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], dim=1))
        zero_terms = None if first.zero_terms is None else torch.cat([p.zero_terms for p in parts], dim=1)
        fused.register_buffer("zero_terms", zero_terms)
        return fused


class CpuOps(TorchOps):
    """The head (final RMSNorm and a dense bf16 lm_head) in one kernel call: torch's bf16 matmul read the
    weight at about two thirds of the memory's rate, and it is a 7B decode step's largest single read."""

    def head(self, x: torch.Tensor, lm_head: Linear, norm: RMSNorm) -> torch.Tensor:
        if (isinstance(lm_head, DenseLinear) and lm_head.bias is None and x.dtype == ACTIVATIONS
                and lm_head.weight.dtype == ACTIVATIONS and type(norm) is RMSNorm
                and norm.weight.dtype == ACTIVATIONS and cpu_q4.load() is not None):
            rows = x.reshape(-1, x.shape[-1])
            logits = cpu_q4.norm_head(rows, norm.weight, norm.eps, lm_head.weight)
            return logits.view(*x.shape[:-1], lm_head.weight.shape[0])  # (a step may have no logit rows)
        return super().head(x, lm_head, norm)


class CpuBackend(Backend):
    name = "cpu"
    description = "packed GPTQ on the CPU: torch's int4 kernel (4-bit), int8 or per-layer bf16 (8-bit), bf16 activations"

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        if device.type != "cpu":
            return "it runs on the CPU"
        if qconfig is None:
            return "the model is not GPTQ-quantized"
        if qconfig.bits == 4 and qconfig.group_size != -1 and qconfig.group_size % min(KERNEL_GROUPS):
            return f"the int4 CPU kernel cannot take group size {qconfig.group_size} (use reference)"
        return None

    def preferred_dtype(self, device: torch.device) -> torch.dtype | None:
        return ACTIVATIONS

    def model_ops(self, device: torch.device) -> TorchOps:
        return CpuOps()

    def note(self, device: torch.device) -> str:
        """Which 4-bit kernel runs, for the load report."""
        if cpu_q4.load() is not None:
            return "4-bit matmul: AVX-512 VNNI (kernels/cpu_q4.cpp)"
        return f"4-bit matmul: torch's int4 kernel, because {cpu_q4.why_not()}"

    def make_linear(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype,
                    device: torch.device) -> PackedCpuLinear:
        return PackedCpuLinear(tensors, qconfig, dtype, device)
