"""Normalisation layers: RMSNorm (Llama style, or Gemma's (offset + weight) form) and LayerNorm."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32.

    `weight_offset=None` is Llama's form: the normalised input is cast back to its dtype, then
    scaled by the weight. A number c gives Gemma's form: the scale is (c + weight), applied in
    fp32 before the cast (c = 1 for checkpoints storing w, 0 for those storing 1 + w).
    """

    def __init__(self, dim: int, eps: float, weight_offset: float | None = None):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.weight_offset is None and dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset is None:
            return self.weight * x32.to(dtype)
        return (x32 * (self.weight_offset + self.weight.float())).to(dtype)


class LayerNorm(nn.Module):
    """Mean-and-variance norm with a learned scale and bias (GPT-2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
