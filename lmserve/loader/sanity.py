"""Cheap consistency checks shared by the GGUF and safetensors loaders.

A checkpoint's config must agree with the tensors it ships: the layer count with the layers
present, the sizes that shape the model (vocabulary, hidden size, heads, MLP width, experts) with
the shapes of the tensors they size, and its special token ids must lie in the vocabulary. The
checks read tensor names and shapes only, so a config that is absurd but consistent in itself
(a billion layers, a million-wide hidden size) is refused before the engine allocates anything
for it, with the checkpoint's path and the bad value in the message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lmserve.config import ModelConfig
from lmserve.errors import ModelLoadError


def check_layers(path, key: str, num_layers: int, layer_of: Mapping[str, int], pattern: str) -> None:
    """Every layer 0..num_layers-1 has tensors and none lies beyond; `layer_of` maps each per-layer
    tensor's name to its layer index, `key` names the config entry that gave `num_layers` and
    `pattern` how the format names a layer's tensors (`blk.{}.*`)."""
    beyond = [(index, name) for name, index in layer_of.items() if index >= num_layers]
    if beyond:
        index, name = min(beyond)
        raise ModelLoadError(path, f"{key} is {num_layers}, but tensor {name!r} belongs to layer {index}")
    present = set(layer_of.values())
    if len(present) < num_layers:
        first = next(index for index in range(num_layers) if index not in present)
        raise ModelLoadError(path, f"{key} is {num_layers}, but only {len(present)} layer(s) have tensors "
                                   f"(none named {pattern.format(first)})")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shapes ([out, in] order) the config gives the weights it sizes, by llama.cpp's name for
    the kind of tensor (`token_embd`, `attn_q`, ...), each with the config values behind it."""
    hidden, vocab, inner = config.hidden_size, config.vocab_size, config.intermediate_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    by_vocab = f"vocab_size {vocab}, hidden_size {hidden}"
    by_heads = f"num_heads {config.num_heads} x head_dim {config.head_dim}, hidden_size {hidden}"
    by_kv_heads = f"num_kv_heads {config.num_kv_heads} x head_dim {config.head_dim}, hidden_size {hidden}"
    by_mlp = f"intermediate_size {inner}, hidden_size {hidden}"
    shapes = {
        "token_embd": ((vocab, hidden), by_vocab), "output": ((vocab, hidden), by_vocab),
        "output_norm": ((hidden,), f"hidden_size {hidden}"), "attn_norm": ((hidden,), f"hidden_size {hidden}"),
        "attn_q": ((q_rows, hidden), by_heads), "attn_output": ((hidden, q_rows), by_heads),
        "attn_k": ((kv_rows, hidden), by_kv_heads), "attn_v": ((kv_rows, hidden), by_kv_heads),
        "attn_q_norm": ((config.head_dim,), f"head_dim {config.head_dim}"),
        "attn_k_norm": ((config.head_dim,), f"head_dim {config.head_dim}"),
        "ffn_gate": ((inner, hidden), by_mlp), "ffn_down": ((hidden, inner), by_mlp),
    }
    if config.architecture == "gpt2":  # the only family with a learned position table
        shapes["position_embd"] = ((config.max_position_embeddings, hidden),
                                   f"max_position_embeddings {config.max_position_embeddings}, hidden_size {hidden}")
    if config.num_experts:
        experts, expert_inner = config.num_experts, config.moe_intermediate_size
        by_experts = f"num_experts {experts}, moe_intermediate_size {expert_inner}, hidden_size {hidden}"
        shapes |= {"ffn_gate_inp": ((experts, hidden), f"num_experts {experts}, hidden_size {hidden}"),
                   "ffn_gate_exps": ((experts, expert_inner, hidden), by_experts),
                   "ffn_up_exps": ((experts, expert_inner, hidden), by_experts),
                   "ffn_down_exps": ((experts, hidden, expert_inner), by_experts)}
    return shapes


def check_shapes(path, config: ModelConfig, tensors: Iterable[tuple[str, str, tuple[int, ...]]]) -> None:
    """`tensors`: (name, llama.cpp kind, shape in [out, in] order) of the weights to check; kinds
    the config does not size are skipped."""
    shapes = expected_shapes(config)
    for name, kind, shape in tensors:
        expected = shapes.get(kind)
        if expected is not None and tuple(shape) != expected[0]:
            raise ModelLoadError(path, f"tensor {name!r} has shape {list(shape)}, but the config "
                                       f"({expected[1]}) gives it {list(expected[0])}")


def check_token_ids(path, token_ids: Mapping[str, object], vocab_size: int) -> None:
    """Each special token id given (key -> id, None for absent) lies in [0, vocab_size)."""
    for key, value in token_ids.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
            raise ModelLoadError(path, f"{key} is {value!r}, outside the vocabulary of {vocab_size} tokens")
