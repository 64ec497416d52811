"""Runs the model for one scheduled step.

Owns the model and its paged KV cache. `execute(SchedulerOutput)` first runs the step's block
copies and swaps, then flattens the scheduled tokens of all sequences into one unpadded batch,
builds the attention metadata (slot mapping from the block tables, padded attention groups with
context slots gathered through the block tables) and returns logits only for the positions that
sample a new token. Where the model family describes a fused layout and the model qualifies,
steps go instead through the fused native decoder, whose metadata is just the tokens, their
positions, which sequence each belongs to and the block tables; the engine passes the family's
decoder factory in, so the runner knows no model family. With LoRA enabled, a step's sequences
are laid out grouped by adapter and the adapters' row spans go to the fused decoder or, when it
does not hold every module an adapter changes, to the modules' shared LoRA state.
"""

from __future__ import annotations

import itertools
import logging
import math
import mmap
from dataclasses import dataclass, field

import torch

from collections.abc import Callable

from lmserve.config import EngineConfig, ModelConfig
from lmserve.engine.scheduler_output import BlockOp, BlockOpKind, ScheduledSequence, SchedulerOutput
from lmserve.layers.attention import AttentionGroup, AttentionMetadata
from lmserve.lora.manager import LoRABatch, adapter_spans

logger = logging.getLogger("lmserve")

_PAD_POSITION = 1 << 40  # key position larger than any query: masked by causality


def _block_tables(seqs: list, width: int) -> torch.Tensor:
    """[len(seqs), width] int64: each sequence's first `width` cache blocks, padded with block 0."""
    tables = [s.block_table[:width] for s in seqs]
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)


@dataclass
class StepInputs:
    """One step as a runner runs it: block operations first, then (when sequences are scheduled)
    the tokens and their metadata. Module path: flat tokens, their cache slots and attention
    groups, and LoRA spans; fused decode: tokens, positions and block tables. `sample_index`
    picks the rows that are turned into logits (None: all), `logits_order` puts those back in
    schedule order when the rows were regrouped."""

    block_ops: list[BlockOp]
    input_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    groups: list[AttentionGroup] = field(default_factory=list)
    block_tables: torch.Tensor | None = None  # set on the fused path only, one row per sequence
    seq_of_row: torch.Tensor | None = None  # fused path: each token's row in block_tables
    sample_index: torch.Tensor | None = None
    lora_spans: list[tuple[object, int]] = field(default_factory=list)  # (adapter or None, tokens) in row order
    logits_order: torch.Tensor | None = None


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose memory is committed only as it is written. On the CPU it lies in an
    anonymous private mapping: the OS maps each page (zero-filled) when it is first written, so a
    large KV cache costs resident memory only for the blocks in use (reads of untouched pages
    see zeros and commit nothing). Elsewhere, `torch.zeros`."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps `memory` alive


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, engine_config: EngineConfig,
                 num_blocks: int, fused_decoder: Callable | None = None, lora: LoRABatch | None = None):
        """`fused_decoder(model, engine_config)` builds the family's fused decoder over the bound
        KV caches, or returns None (with the reason logged) when this model cannot use it.
        `lora`: the LoRA manager's step state, when adapters are enabled."""
        self.model = model
        self.lora = lora
        self.device = engine_config.torch_device
        self.dtype = engine_config.torch_dtype
        self.block_size = engine_config.block_size
        num_slots = num_blocks * self.block_size
        layers = model.attention_layers()
        shapes = [(2, num_slots, layer.num_kv_heads, layer.head_dim) for layer in layers]  # this rank's heads
        self.kv_caches = [zeros_on_demand(shape, engine_config.kv_torch_dtype, self.device) for shape in shapes]
        self.kv_scales = [torch.ones(shape[:3], dtype=torch.float32, device=self.device)
                          if engine_config.kv_quantized else None for shape in shapes]
        for layer, cache, scales in zip(layers, self.kv_caches, self.kv_scales):
            layer.kv_cache, layer.kv_scales = cache, scales
        total = sum(t.numel() * t.element_size() for t in self.kv_caches + self.kv_scales if t is not None)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB (%s)", num_blocks, self.block_size,
                    num_slots, total / 2**20, engine_config.kv_cache_dtype)
        if engine_config.kv_torch_dtype != self.dtype:
            plain = model_config.kv_bytes_per_token(self.dtype.itemsize)
            packed = model_config.kv_bytes_per_token(engine_config.kv_torch_dtype.itemsize, engine_config.kv_quantized)
            logger.info("%s KV cache holds %.2fx the tokens of a %s cache in the same memory",
                        engine_config.kv_cache_dtype, plain / packed, str(self.dtype).replace("torch.", ""))
        if fused_decoder is None:
            logger.info("steps run through PyTorch modules (no fused decoder for this family)")
        self.fused_decode = fused_decoder(model, engine_config) if fused_decoder is not None else None

    def _group(self, rows: list[ScheduledSequence], starts: list[int]) -> AttentionGroup:
        n = torch.tensor([r.num_tokens for r in rows])
        ctx_before = torch.tensor([r.seq.num_computed_tokens for r in rows])
        ctx = ctx_before + n
        q_len, k_len = int(n.max()), int(ctx.max())
        j = torch.arange(q_len)
        query_valid = j[None, :] < n[:, None]
        token_index = torch.tensor(starts)[:, None] + torch.minimum(j[None, :], (n - 1)[:, None])
        query_pos = ctx_before[:, None] + j[None, :]
        tables = _block_tables([r.seq for r in rows], -(-k_len // self.block_size))
        k = torch.arange(k_len)
        key_valid = k[None, :] < ctx[:, None]
        kv_slots = tables[:, k // self.block_size] * self.block_size + k % self.block_size
        kv_slots = torch.where(key_valid, kv_slots, 0)
        key_pos = torch.where(key_valid, k[None, :], _PAD_POSITION)
        dev = self.device
        return AttentionGroup(token_index.to(dev), query_valid.to(dev), query_pos.to(dev),
                              kv_slots.to(dev), key_pos.to(dev))

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> torch.Tensor | None:
        """Run the step's block operations, then forward its tokens; returns fp32 logits
        [num sampling rows, vocab] in schedule order (None when no sequence is scheduled): one row
        per sampling sequence, 1 + k for one verifying k proposals."""
        return self.run(self.prepare(output))

    def prepare(self, output: SchedulerOutput) -> StepInputs:
        """The step's inputs as plain tensors: all a runner needs to run it (`run`), so that the
        ranks of a tensor-parallel group run a step prepared once, on rank 0."""
        scheduled = output.scheduled
        inputs = StepInputs(output.block_ops)
        if not scheduled:
            return inputs
        if self.lora is not None and any(r.seq.request.lora is not None for r in scheduled):
            return self._prepare_lora(scheduled, inputs)
        if self.fused_decode is not None:
            return self._prepare_fused(scheduled, inputs)
        return self._prepare_modules(scheduled, inputs)

    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        for op in inputs.block_ops:
            self._run_block_op(op)
        if inputs.input_ids is None:
            return None
        if inputs.block_tables is not None:
            hidden = self.fused_decode.forward(inputs.input_ids, inputs.positions, inputs.seq_of_row,
                                               inputs.block_tables, self.block_size, adapter_spans(inputs.lora_spans))
        else:
            if inputs.lora_spans:
                self.lora.begin_step(inputs.lora_spans)
            try:
                meta = AttentionMetadata(inputs.slot_mapping, inputs.groups, inputs.input_ids.numel())
                hidden = self.model(inputs.input_ids, inputs.positions, meta)
            finally:
                if inputs.lora_spans:
                    self.lora.end_step()
        if inputs.sample_index is not None:
            hidden = hidden[inputs.sample_index]
        logits = self.model.compute_logits(hidden)
        return logits if inputs.logits_order is None else logits[inputs.logits_order]

    def _prepare_lora(self, scheduled: list[ScheduledSequence], inputs: StepInputs) -> StepInputs:
        """A step with LoRA rows: the sequences are laid out grouped by adapter, so each adapter's
        tokens are one span of rows (its factors read once per step), and the logits come back in
        schedule order. The fused decoder runs it when it holds every module the adapters change."""
        groups: dict[object, int] = {}
        order = sorted(range(len(scheduled)),
                       key=lambda i: groups.setdefault(scheduled[i].seq.request.lora, len(groups)))
        grouped = [scheduled[i] for i in order]
        if self.fused_decode is not None and all(a is None or self.fused_decode.runs_lora(a) for a in groups):
            self._prepare_fused(grouped, inputs)
        else:
            self._prepare_modules(grouped, inputs)
        inputs.lora_spans = [(r.seq.request.lora, r.num_tokens) for r in grouped]
        if order != sorted(order):
            first_row = dict(zip(order, itertools.accumulate((r.num_logits for r in grouped), initial=0)))
            rows = [first_row[i] + k for i, r in enumerate(scheduled) for k in range(r.num_logits)]
            inputs.logits_order = torch.tensor(rows, device=self.device)
        return inputs

    def _prepare_modules(self, scheduled: list[ScheduledSequence], inputs: StepInputs) -> StepInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts: list[int] = []
        sample_index: list[int] = []
        for r in scheduled:
            seq, c = r.seq, r.seq.num_computed_tokens
            starts.append(len(input_ids))
            tokens = seq.token_ids + seq.spec_token_ids if r.num_spec_tokens else seq.token_ids
            input_ids.extend(tokens[c: c + r.num_tokens])
            positions.extend(range(c, c + r.num_tokens))
            table, size = seq.block_table, self.block_size
            slots.extend(table[p // size] * size + p % size for p in range(c, c + r.num_tokens))
            sample_index.extend(range(len(input_ids) - r.num_logits, len(input_ids)))
        groups = []
        for is_decode in (True, False):
            members = [i for i, r in enumerate(scheduled) if (r.num_tokens == 1) == is_decode]
            if members:
                groups.append(self._group([scheduled[i] for i in members], [starts[i] for i in members]))
        if len(groups) == 1 and groups[0].token_index.numel() == len(input_ids):
            groups[0].covers_step = True
        dev = self.device
        inputs.input_ids = torch.tensor(input_ids, device=dev)
        inputs.positions = torch.tensor(positions, device=dev)
        inputs.slot_mapping = torch.tensor(slots, device=dev)
        inputs.groups = groups
        inputs.sample_index = torch.tensor(sample_index, dtype=torch.long, device=dev)
        return inputs

    def _prepare_fused(self, scheduled: list[ScheduledSequence], inputs: StepInputs) -> StepInputs:
        """A step through the fused native decoder: its metadata is only the tokens, their
        positions, which sequence each belongs to and the sequences' block tables. A sequence's
        new tokens (a prompt chunk, or one token plus k proposals to verify) are consecutive rows
        at consecutive positions: each layer stores every row's K/V before any row attends, and a
        row attends its sequence's positions up to its own."""
        tokens, positions, seq_of_row, sample_rows = [], [], [], []
        for i, r in enumerate(scheduled):
            seq, c = r.seq, r.seq.num_computed_tokens
            known = seq.token_ids + seq.spec_token_ids if r.num_spec_tokens else seq.token_ids
            tokens.extend(known[c: c + r.num_tokens])
            positions.extend(range(c, c + r.num_tokens))
            seq_of_row.extend([i] * r.num_tokens)
            sample_rows.extend(range(len(tokens) - r.num_logits, len(tokens)))
        seqs = [r.seq for r in scheduled]
        inputs.input_ids = torch.tensor(tokens)
        inputs.positions = torch.tensor(positions)
        inputs.seq_of_row = torch.tensor(seq_of_row)
        inputs.block_tables = _block_tables(seqs, max(len(s.block_table) for s in seqs))
        if len(sample_rows) != len(tokens):
            inputs.sample_index = torch.tensor(sample_rows, dtype=torch.long)
        return inputs

    # ---- block copies and the swap tier (decided by the scheduler, run before a forward) ----

    def _run_block_op(self, op: BlockOp) -> None:
        if op.kind is BlockOpKind.COPY:
            self.copy_blocks(op.pairs)
        elif op.kind is BlockOpKind.SWAP_OUT:
            self.swap_out(op.pairs)
        else:
            self.swap_in(op.pairs)

    def _block_slots(self, blocks: list[int]) -> torch.Tensor:
        """Cache slot indices of the given blocks, block after block."""
        offsets = torch.arange(self.block_size)
        return (torch.tensor(blocks, dtype=torch.long)[:, None] * self.block_size + offsets).flatten()

    def _kv_tensors(self) -> list[torch.Tensor]:
        """Every per-slot cache tensor (K/V and, quantized, their scales) as a byte view [2, slots, bytes]."""
        tensors = [t for t in self.kv_caches + self.kv_scales if t is not None]
        return [t.view(torch.uint8).reshape(2, t.shape[1], -1) for t in tensors]

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole cache blocks (src, dst) in every layer: copy-on-write of forked sequences.
        All sources are read before any destination is written."""
        src = self._block_slots([s for s, _ in pairs]).to(self.device)
        dst = self._block_slots([d for _, d in pairs]).to(self.device)
        for cache in self._kv_tensors():
            cache[:, dst] = cache[:, src]

    def allocate_swap_space(self, num_blocks: int) -> None:
        """Create the swap tier: `num_blocks` blocks of every layer's cache in pinned host memory
        when the cache is on a GPU, in a memory-mapped temporary file when it is on the CPU."""
        import os
        import tempfile

        layouts = [(t.shape[2], t.dtype) for t in self._kv_tensors()]
        sizes = [2 * num_blocks * self.block_size * width for width, _ in layouts]
        if self.device.type == "cpu":
            fd, path = tempfile.mkstemp(prefix="lmserve-swap-")
            try:
                os.ftruncate(fd, sum(sizes))  # sparse: disk pages are used only once written
                flat = torch.from_file(path, shared=True, size=sum(sizes), dtype=torch.uint8)
            finally:
                os.close(fd)
                os.unlink(path)  # the mapping outlives the name; the space is freed at exit
        else:
            flat = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
        self.swap_tensors = [part.view(2, num_blocks * self.block_size, width)
                             for part, (width, _) in zip(flat.split(sizes), layouts)]
        logger.info("swap space: %d blocks, %.1f MiB (%s)", num_blocks, sum(sizes) / 2**20,
                    "memory-mapped file" if self.device.type == "cpu" else "pinned host memory")

    @torch.inference_mode()
    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to swap blocks, pairs of (device block, swap block)."""
        dev = self._block_slots([d for d, _ in pairs]).to(self.device)
        swap = self._block_slots([s for _, s in pairs])
        for cache, stored in zip(self._kv_tensors(), self.swap_tensors):
            stored[:, swap] = cache[:, dev].cpu()

    @torch.inference_mode()
    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy swap blocks back to device blocks, pairs of (swap block, device block)."""
        swap = self._block_slots([s for s, _ in pairs])
        dev = self._block_slots([d for _, d in pairs]).to(self.device)
        for cache, stored in zip(self._kv_tensors(), self.swap_tensors):
            cache[:, dev] = stored[:, swap].to(self.device)
