"""Act-order GPTQ layers: the row order that makes each group a contiguous run, as the kernels read them."""

from __future__ import annotations

import torch


class IrregularGroups(ValueError):
    """Act-order groups that no row order makes contiguous runs of the group size."""


def group_order(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """The row order that makes every group a contiguous run of ``group_size`` rows (the last run may be
    shorter); None where the rows already are. Raises IrregularGroups where no order can."""
    g = g_idx.long()
    if torch.equal(g, torch.arange(g.numel(), device=g.device) // group_size):
        return None
    counts = torch.bincount(g)
    if not bool((counts[:-1] == group_size).all()) or int(counts[-1]) > group_size:
        raise IrregularGroups(f"the act-order groups are not runs of {group_size} rows")
    return torch.argsort(g, stable=True)
