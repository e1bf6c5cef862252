"""GPTQ (Frantar et al., 2022): quantize one weight matrix using its inputs' Hessian.

Follows AutoGPTQ's algorithm: optional act-order (columns in order of
decreasing Hessian diagonal), lazy block updates, per-group scales and zero
points found as the columns are reached. Scales are rounded to fp16 before
use, so the integers written to disk reproduce exactly the weights whose
error was compensated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedWeight:
    q: torch.Tensor  # int32 [out, in], values in [0, 2**bits)
    scales: torch.Tensor  # fp16 [groups, out]
    zeros: torch.Tensor  # int32 [groups, out], the real zero points
    g_idx: torch.Tensor  # int32 [in]

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[out, in]``."""
        g = self.g_idx.long()
        return (self.q.float() - self.zeros.t()[:, g].float()) * self.scales.t()[:, g].float()


def _grid_params(xmin, xmax, bits, sym, min_zero):
    maxq = 2**bits - 1
    scale = ((xmax - xmin) / maxq).half().to(xmax.dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, 2**-14), scale)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero


def find_params(
    w: torch.Tensor, bits: int, sym: bool, min_zero: int, clip_grid: int = 0, max_shrink: float = 0.8, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (fp16-representable, in w's dtype) and integer zero for ``w`` ``[rows, cols]``.

    With ``clip_grid`` > 0, the range is also shrunk in ``clip_grid`` steps (down
    to ``1 - max_shrink``) and the one with the least ``|error|**norm`` kept,
    as GPTQ's reference quantizer does with ``mse=True``.
    """
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, torch.full_like(xmin, -1), xmin)
    xmax = torch.where(both_zero, torch.full_like(xmax, 1), xmax)
    scale, zero = _grid_params(xmin, xmax, bits, sym, min_zero)
    if clip_grid <= 0:
        return scale, zero
    maxq = 2**bits - 1
    best = torch.full_like(scale, float("inf"))
    for i in range(int(max_shrink * clip_grid)):
        p = 1 - i / clip_grid
        s1, z1 = _grid_params(p * xmin, p * xmax, bits, sym, min_zero)
        q = torch.clamp(torch.round(w / s1[:, None]) + z1[:, None], 0, maxq)
        err = (s1[:, None] * (q - z1[:, None]) - w).abs().pow(norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s1, scale)
        zero = torch.where(better, z1, zero)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    damp_percent: float = 0.01,
    block_size: int = 128,
    min_zero: int = 0,
    clip_grid: int = 0,
) -> QuantizedWeight:
    """``weight`` ``[out, in]`` fp32; ``hessian`` ``[in, in]`` = 2/n * X^T X.

    ``min_zero=1`` keeps asymmetric zero points writable in the v1 format,
    which stores ``zero - 1`` and cannot hold a zero point of 0.
    """
    W = weight.detach().clone().double()  # float64 throughout: the same choices on every CPU's BLAS
    H = hessian.detach().clone().double()
    rows, cols = W.shape
    maxq = 2**bits - 1
    gsize = cols if group_size == -1 else group_size

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.arange(cols)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    invperm = torch.argsort(perm)

    damp = damp_percent * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W, dtype=torch.int32)
    n_groups = -(-cols // gsize)
    scales = torch.zeros(n_groups, rows, dtype=torch.float64)
    zeros = torch.zeros(n_groups, rows, dtype=torch.float64)
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gsize == 0:
                # Group parameters from the columns as they stand now, error feedback included.
                block = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : gsize]
                scale, zero = find_params(block, bits, sym, min_zero, clip_grid)
                scales[col // gsize], zeros[col // gsize] = scale, zero
            w = W1[:, i]
            q = quantize_column(w, scale, zero, maxq)
            Q[:, col] = q.to(torch.int32)
            dq = scale * (q - zero)
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = (torch.arange(cols) // gsize)[invperm].to(torch.int32)
    return QuantizedWeight(
        q=Q[:, invperm].contiguous(),
        scales=scales.half(),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx,
    )
