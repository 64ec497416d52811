"""Sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router scores every expert per token; each token goes to its top-k experts and the block's
output is the routing-weighted sum of those experts' SwiGLU MLPs, plus (Qwen2-MoE) a shared
expert that every token passes through, scaled by a sigmoid gate.

Dense expert weights are stacked into two tensors, `gate_up_proj` [E, 2*I, H] (gate rows first)
and `down_proj` [E, H, I], the layout transformers v5 keeps in memory. Quantized ones (a GGUF
file's, or int8/int4 quantization at load) are packed per expert instead (`PackedExpert`: our
block kernel's layout where the extension builds), and the dense tensors are never filled. The
forward pass sorts the (token, expert) assignments by expert and runs one pair of matmuls per
expert that received tokens, over all of its tokens in the batch at once. The router and the
shared expert's gate stay dense (`DenseLinear`). With block-packed experts the whole block
also exists in native code (`SparseMoeBlock.native_ffn`, `quant/csrc/moe_ffn.h`), for the fused
decoder.

Under tensor parallelism every rank holds all experts, each cut along its intermediate dim (its
gate/up rows, the matching down columns, in whole quantization groups of 32 where it divides);
the ranks' partial outputs are summed by one all-reduce per block.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from lmserve import parallel
from lmserve.layers.activation import SiluAndMul
from lmserve.layers.linear import Linear, merge_rows, take_cols
from lmserve.quant.gguf_blocks import GroupQuantized
from lmserve.quant.packed import BlockWeight, pack, quantize_int4, quantize_int8

logger = logging.getLogger("lmserve")


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, then the top-k: (weights [T, k] in fp32, expert ids [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class PackedExpert(nn.Module):
    """One expert's SwiGLU MLP on packed weights (`quant.packed.pack`): gate_up [2I, H], gate rows
    first, and down [H, I]; each picks its kernel or the dequantize-then-GEMM path by rows."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        super().__init__()
        self.gate_up = gate_up
        self.down = down
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate_up(x)))


class StackedExperts(nn.Module):
    """E SwiGLU MLPs, run grouped by expert: dense in two stacked tensors, or packed per expert.

    Quantized checkpoint tensors (GGUF) are packed as soon as an expert's gate, up and down have
    arrived, and `quantize_` packs dense ones at load; once every expert is packed the stacked
    tensors are dropped (they were never touched, so they cost no memory). A projection that
    arrives dense among packed ones turns the whole block dense."""

    accepts_packed = True  # the loader hands over GGUF tensors still quantized (`GroupQuantized`)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.tp = parallel.current()
        self.full_size = intermediate_size
        # This rank's slice of the intermediate dim, in whole quantization groups of down's input.
        self.local = self.tp.part(intermediate_size, unit=32)
        size = self.local.stop - self.local.start
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * size, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, size), requires_grad=False)
        self.shard_rows = {"gate": slice(0, size), "up": slice(size, 2 * size)}
        self.act = SiluAndMul()
        self.packed: nn.ModuleList | None = None  # PackedExpert per expert, once all are packed
        # While loading: quantized shards of each (projection, expert) not yet complete, and the
        # packed projections of each expert.
        self._pending: dict[tuple[str, int], dict[str | None, GroupQuantized]] = {}
        self._packed_parts: dict[tuple[str, int], nn.Module] = {}
        self._dense = False  # some projection arrived dense: everything is kept dense

    def load_shard(self, param_name: str, tensor: torch.Tensor | GroupQuantized, shard: str | None = None,
                   expert: int | None = None) -> None:
        """Place a checkpoint tensor of `param_name`: one expert's matrix (`expert` given) or all
        experts stacked, either whole or only its gate or up rows (`shard`); quantized ones are
        collected per expert and packed."""
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} out of range [0, {self.num_experts})")
        if isinstance(tensor, GroupQuantized) and not self._dense:
            if expert is None:  # GGUF's stacked [E, rows, cols]
                if len(tensor.shape) != 3 or tensor.shape[0] != self.num_experts:
                    raise ValueError(f"shape mismatch for {param_name}: checkpoint has {tuple(tensor.shape)}, "
                                     f"model expects {self.num_experts} stacked experts")
                for index in range(self.num_experts):
                    self._collect(param_name, tensor.map_rows(lambda a, index=index: a[index]), shard, index)
            else:
                self._collect(param_name, tensor, shard, expert)
            return
        if isinstance(tensor, GroupQuantized):
            tensor = torch.from_numpy(tensor.dequantize())
        elif self._pending or self._packed_parts:
            self._unpack()
        self._dense = True
        tensor = self._local_part(param_name, tensor, shard)
        target = getattr(self, param_name).data
        if expert is not None:
            target = target[expert]
        if shard is not None:
            target = target[..., self.shard_rows[shard], :]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {param_name}[{shard or 'all'}]: checkpoint has "
                             f"{tuple(tensor.shape)}, model expects {tuple(target.shape)}")
        target.copy_(tensor)

    def _collect(self, param_name: str, gq: GroupQuantized, shard: str | None, expert: int) -> None:
        """Keep one expert's quantized shard (this rank's part of it); pack the projection once whole."""
        if param_name == "gate_up_proj" and shard is None:  # gate and up fused in one tensor
            gate, up = (gq.map_rows(lambda a, rows=rows: a[rows])
                        for rows in (slice(0, self.full_size), slice(self.full_size, None)))
            self._collect(param_name, gate, "gate", expert)
            self._collect(param_name, up, "up", expert)
            return
        if self.tp.size > 1:
            gq = take_cols(gq, self.local) if param_name == "down_proj" else gq.map_rows(lambda a: a[self.local])
        size = self.local.stop - self.local.start
        expected = (self.hidden_size, size) if param_name == "down_proj" else (size, self.hidden_size)
        if tuple(gq.shape) != expected:
            raise ValueError(f"shape mismatch for {param_name}[{shard or 'all'}] of expert {expert}: checkpoint "
                             f"has {tuple(gq.shape)}, model expects {expected}")
        shards = self._pending.setdefault((param_name, expert), {})
        shards[shard] = gq
        needed = [None] if param_name == "down_proj" else ["gate", "up"]
        if set(shards) == set(needed):
            del self._pending[(param_name, expert)]
            self._packed_parts[(param_name, expert)] = pack(merge_rows([shards[s] for s in needed]))

    def _unpack(self) -> None:
        """Dequantize what arrived quantized into the dense tensors (a checkpoint mixing dense and
        quantized expert projections)."""
        for (param_name, expert), weight in self._packed_parts.items():
            getattr(self, param_name).data[expert].copy_(weight.dequantize())
        for (param_name, expert), shards in self._pending.items():
            for shard, gq in shards.items():
                target = getattr(self, param_name).data[expert]
                target = target if shard is None else target[self.shard_rows[shard]]
                target.copy_(torch.from_numpy(gq.dequantize()))
        self._packed_parts, self._pending = {}, {}

    def finish_loading(self) -> None:
        """Every expert packed: drop the stacked tensors. Partly packed: dense after all."""
        parts = self._packed_parts
        if len(parts) == 2 * self.num_experts:
            self._use_packed([(parts[("gate_up_proj", e)], parts[("down_proj", e)]) for e in range(self.num_experts)])
            self._packed_parts = {}
        elif parts or self._pending:
            self._unpack()

    def quantize_(self, mode: str) -> None:
        """Weight-only quantization of dense experts (`Linear.quantize_`'s formats), per expert."""
        if self.packed is not None:
            return
        if self.hidden_size % 32 or self.down_proj.shape[-1] % 32:
            logger.info("%s needs expert sizes divisible by 32; experts [%d, %d] kept dense", mode,
                        self.hidden_size, self.down_proj.shape[-1])
            return
        quantize = quantize_int4 if mode == "int4" else quantize_int8
        self._use_packed([(pack(quantize(self.gate_up_proj.data[e])), pack(quantize(self.down_proj.data[e])))
                          for e in range(self.num_experts)])

    def _use_packed(self, weights: list[tuple[nn.Module, nn.Module]]) -> None:
        self.packed = nn.ModuleList(PackedExpert(gate_up, down) for gate_up, down in weights)
        del self.gate_up_proj, self.down_proj
        self.gate_up_proj = self.down_proj = None

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
            if self.packed is not None:
                grouped_out[rows] = self.packed[expert](grouped_in[rows])
            else:
                hidden = self.act(F.linear(grouped_in[rows], self.gate_up_proj[expert]))
                grouped_out[rows] = F.linear(hidden, self.down_proj[expert])
            start += count
        grouped_out *= weights.flatten()[order].unsqueeze(1).to(x.dtype)
        return self.tp.all_reduce(torch.zeros_like(x).index_add_(0, token_of, grouped_out))


class DenseLinear(Linear):
    """A Linear that stays dense: the router and the shared expert's gate decide which experts
    run and how much each counts, from few weights. A quantized checkpoint tensor is dequantized
    (exactly) and quantization at load leaves it as it is."""

    def load_shard(self, param_name: str, tensor, shard: str | None = None) -> None:
        if isinstance(tensor, GroupQuantized):
            tensor = torch.from_numpy(tensor.dequantize())
        super().load_shard(param_name, tensor, shard)

    def quantize_(self, mode: str) -> None:
        pass


class SparseMoeBlock(nn.Module):
    """Router (`gate`) + stacked experts + optional gated shared expert.

    Parameter names follow the transformers checkpoints: `gate`, `experts`, `shared_expert`,
    `shared_expert_gate`."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = DenseLinear(hidden_size, num_experts)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = DenseLinear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def native_ffn(self, ext) -> tuple[object | None, str | None]:
        """This block as the native extension's `MoeFeedForward` (`ext` from `quant.native.load()`):
        (the bound object, None), or (None, why it cannot run natively). It holds the block's own
        packed tensors, and its `forward(x [rows, H] fp32)` equals this module's up to fp32
        summation order."""
        if ext is None:
            return None, "the native extension is unavailable"
        if self.experts.tp.size > 1:
            return None, "the experts are split for tensor parallelism"
        if self.experts.packed is None or not all(
                isinstance(w, BlockWeight) for e in self.experts.packed for w in (e.gate_up, e.down)):
            return None, "the experts are not block-quantized"
        experts, formats = _block_parts(w for e in self.experts.packed for w in (e.gate_up, e.down))
        shared, shared_formats, shared_gate = [], [], torch.empty(0)
        if self.shared_expert is not None:
            mlp = self.shared_expert
            linears = [getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)]
            if not all(isinstance(m, Linear) and isinstance(m.packed, BlockWeight) and m.bias is None
                       for m in linears):
                return None, "the shared expert is not a block-quantized SwiGLU MLP without biases"
            if any(m.lora is not None for m in linears):
                return None, "LoRA adapters may apply to the shared expert"
            shared, shared_formats = _block_parts(m.packed for m in linears)
            shared_gate = self.shared_expert_gate.weight.data.float().contiguous()
        router = self.gate.weight.data.float().contiguous()
        ffn = ext.MoeFeedForward(router, experts, formats, self.top_k, self.renormalize, shared, shared_formats,
                                 shared_gate)
        return ffn, None


def _block_parts(weights) -> tuple[list[torch.Tensor], list[int]]:
    """(q, scale, offset) tensors and (group, bits, rows) of each BlockWeight, in order."""
    tensors, formats = [], []
    for w in weights:
        tensors += [w.q, w.scale, w.bias]
        formats += [w.group, w.bits, w.out_features]
    return tensors, formats
