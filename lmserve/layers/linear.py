"""Linear layers behind one interface.

Models only ask for a `Linear` (or a `MergedLinear` that fuses several projections into one
matmul); how the weight is stored is this module's business, so a quantized weight format can
be swapped in later without touching the models. Checkpoint tensors arrive through
`load_shard`, which copies a named projection into its slice of the fused weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b) with a dense weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        target = getattr(self, param_name)
        _copy_checked(target.data, tensor, param_name)


class MergedLinear(Linear):
    """Several projections of the same input fused along the output dim (q|k|v or gate|up)."""

    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(output_sizes.values()), bias)
        self.shard_slices: dict[str, slice] = {}
        offset = 0
        for name, size in output_sizes.items():
            self.shard_slices[name] = slice(offset, offset + size)
            offset += size

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        target = getattr(self, param_name).data
        if shard is not None:
            target = target[self.shard_slices[shard]]
        _copy_checked(target, tensor, f"{param_name}[{shard}]")

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        sizes = [s.stop - s.start for s in self.shard_slices.values()]
        return list(y.split(sizes, dim=-1))


def _copy_checked(target: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"shape mismatch for {what}: checkpoint has {tuple(tensor.shape)}, "
                         f"model expects {tuple(target.shape)}")
    target.copy_(tensor)
