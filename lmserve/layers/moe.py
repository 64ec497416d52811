"""Sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every expert per token; each token goes to its top-k experts and the block's
output is the routing-weighted sum of those experts' SwiGLU MLPs, plus (Qwen2-MoE) a shared
expert that every token passes through, scaled by a sigmoid gate.

Expert weights are stacked into two tensors, `gate_up_proj` [E, 2*I, H] (gate rows first) and
`down_proj` [E, H, I], the layout transformers v5 keeps in memory. They are plain tensors, not
`Linear` layers, so they are stored dense in the compute dtype. The forward pass sorts the
(token, expert) assignments by expert and runs one pair of matmuls per expert that received
tokens, over all of its tokens in the batch at once.

Under tensor parallelism every rank holds all experts, each cut along its intermediate dim (its
gate/up rows, the matching down columns); the ranks' partial outputs are summed by one
all-reduce per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve import parallel
from lmserve.layers.activation import SiluAndMul
from lmserve.layers.linear import Linear


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, then the top-k: (weights [T, k] in fp32, expert ids [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class StackedExperts(nn.Module):
    """E SwiGLU MLPs in two stacked tensors, run grouped by expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.tp = parallel.current()
        self.full_size = intermediate_size
        self.local = self.tp.part(intermediate_size)  # this rank's slice of the intermediate dim
        size = self.local.stop - self.local.start
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * size, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, size), requires_grad=False)
        self.shard_rows = {"gate": slice(0, size), "up": slice(size, 2 * size)}
        self.act = SiluAndMul()

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: str | None = None,
                   expert: int | None = None) -> None:
        """Copy a checkpoint tensor into `param_name`: one expert's matrix (`expert` given) or all
        experts stacked, either whole or only its gate or up rows (`shard`)."""
        tensor = self._local_part(param_name, tensor, shard)
        target = getattr(self, param_name).data
        if expert is not None:
            if not 0 <= expert < self.num_experts:
                raise ValueError(f"expert index {expert} out of range [0, {self.num_experts})")
            target = target[expert]
        if shard is not None:
            target = target[..., self.shard_rows[shard], :]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {param_name}[{shard or 'all'}]: checkpoint has "
                             f"{tuple(tensor.shape)}, model expects {tuple(target.shape)}")
        target.copy_(tensor)

    def _local_part(self, param_name: str, tensor: torch.Tensor, shard: str | None) -> torch.Tensor:
        """This rank's rows (gate, up) or columns (down) of a checkpoint tensor."""
        if self.tp.size == 1:
            return tensor
        if param_name == "down_proj":
            return tensor[..., self.local]
        if shard is not None:
            return tensor[..., self.local, :]
        gate, up = tensor.split(self.full_size, dim=-2)  # gate and up stacked in one tensor
        return torch.cat([gate[..., self.local, :], up[..., self.local, :]], dim=-2)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights and experts [T, k]: token t gets sum_j weights[t, j] * expert_{experts[t, j]}(x[t])."""
        top_k = experts.shape[1]
        flat_experts = experts.flatten()
        order = flat_experts.argsort(stable=True)  # assignments grouped by expert
        token_of = order // top_k
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        grouped_in = x[token_of]
        grouped_out = torch.empty_like(grouped_in)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            hidden = self.act(F.linear(grouped_in[rows], self.gate_up_proj[expert]))
            grouped_out[rows] = F.linear(hidden, self.down_proj[expert])
            start += count
        grouped_out *= weights.flatten()[order].unsqueeze(1).to(x.dtype)
        return self.tp.all_reduce(torch.zeros_like(x).index_add_(0, token_of, grouped_out))


class SparseMoeBlock(nn.Module):
    """Router (`gate`) + stacked experts + optional gated shared expert.

    Parameter names follow the transformers checkpoints: `gate`, `experts`, `shared_expert`,
    `shared_expert_gate`."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Linear(hidden_size, num_experts)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
