"""Token and learned position embeddings, and the LM head that may share the token table.

A table loaded from a quantized GGUF tensor stays packed (`quant.packed.pack_table`: our block
kernel's layout, or int8 groups without it) and lookups dequantize only the rows they gather. An
LM head whose weight is quantized multiplies through a packed kernel; a head tied to a table in
our kernel's layout uses that same storage, otherwise it keeps its own packed copy.

Under tensor parallelism the token table and the LM head are split along the vocabulary: each
rank holds `rows` of it; a lookup zeroes the ids another rank holds and sums the ranks' rows, and
the head's logits are gathered from all ranks.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lmserve import parallel
from lmserve.layers.linear import copy_checked
from lmserve.quant.gguf_blocks import GroupQuantized
from lmserve.quant.packed import BlockWeight, GroupWeight, Int4Weight, pack, pack_table



class _VocabMatrix(nn.Module):
    """A [vocab, dim] weight that is dense, or packed by `_pack` when the checkpoint's is quantized;
    of it this rank holds `rows` (all of them unless `vocab_parallel` and tensor parallelism)."""

    accepts_packed = True

    def __init__(self, vocab_size: int, vocab_parallel: bool = True):
        super().__init__()
        self.tp = parallel.current() if vocab_parallel else parallel.SINGLE
        parts = self.tp.parts(vocab_size)
        self.rows = parts[self.tp.rank]
        self.part_sizes = [part.stop - part.start for part in parts]

    def _pack(self, tensor: GroupQuantized) -> nn.Module:
        raise NotImplementedError

    def load_shard(self, param_name: str, tensor, shard: str | None = None) -> None:
        if self.tp.size > 1:
            rows = self.rows
            tensor = tensor.map_rows(lambda a: a[rows]) if isinstance(tensor, GroupQuantized) else tensor[rows]
        if isinstance(tensor, GroupQuantized):
            self.packed = self._pack(tensor)
            del self.weight
            self.weight = None
        else:
            copy_checked(self.weight.data, tensor, param_name)


class VocabEmbedding(_VocabMatrix):
    """Looks up one row per token id."""

    def __init__(self, vocab_size: int, dim: int, vocab_parallel: bool = True):
        super().__init__(vocab_size, vocab_parallel)
        self.weight = nn.Parameter(torch.empty(self.rows.stop - self.rows.start, dim), requires_grad=False)
        self.packed: BlockWeight | GroupWeight | None = None
        self.dtype = torch.get_default_dtype()

    def _pack(self, tensor: GroupQuantized) -> nn.Module:
        return pack_table(tensor)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(token_ids)
        mine = (token_ids >= self.rows.start) & (token_ids < self.rows.stop)
        rows = self._lookup(torch.where(mine, token_ids - self.rows.start, 0))
        return self.tp.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))

    def _lookup(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.dequantize_rows(token_ids, self.dtype)
        return F.embedding(token_ids, self.weight)


class LearnedPositionEmbedding(VocabEmbedding):
    """Absolute position embeddings (GPT-2): one learned row per position below `num_positions`,
    looked up by position instead of token id. The engine's context limit (max_model_len never
    exceeds the model's max_position_embeddings) keeps positions inside the table."""

    def __init__(self, num_positions: int, dim: int):
        super().__init__(num_positions, dim, vocab_parallel=False)


class LMHead(_VocabMatrix):
    """Projects hidden states to vocabulary logits; `tied_to` reuses the embedding table."""

    def __init__(self, vocab_size: int, dim: int, tied_to: VocabEmbedding | None = None):
        super().__init__(vocab_size)
        self.tied_to = tied_to
        self.weight = None if tied_to is not None else nn.Parameter(
            torch.empty(self.rows.stop - self.rows.start, dim), requires_grad=False)
        self.packed: nn.Module | None = None

    def _pack(self, tensor: GroupQuantized) -> nn.Module:
        return pack(tensor)

    def finish_loading(self) -> None:
        if self.tied_to is not None and self.tied_to.packed is not None and self.packed is None:
            self.packed = _head_from_table(self.tied_to.packed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            logits = self.packed(hidden)
        else:
            logits = F.linear(hidden, self.tied_to.weight if self.tied_to is not None else self.weight)
        return self.tp.all_gather_last(logits, self.part_sizes)


def _head_from_table(table: BlockWeight | GroupWeight) -> torch.nn.Module:
    if isinstance(table, BlockWeight):
        return table  # the kernel multiplies with the table's own storage
    if table.group % 32:
        return table  # no int4 layout for groups this small: dequantize-then-matmul
    return Int4Weight(table.group_quantized(), dense=table)  # the head dequantizes the table itself
