"""Decode speed of a random mixture-of-experts model against a dense model with the same number of
active parameters per token, both through lmserve's `LLM` API.

The MoE is a Mixtral-style model (hidden 512, 8 experts, top-2); the dense model is a Llama with
the same attention and an MLP as wide as the two experts a token uses, so both do about the same
arithmetic per token while the MoE holds about four times the MLP weights. Prints total and active
parameter counts and decode tokens/s at batch 1 and 16.

    .venv/bin/python benchmarks/bench_moe.py [--threads 2] [--decode-tokens 32] [--layers 4]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from bench_smollm2 import random_prompts
from lmserve import LLM, SamplingParams

HIDDEN, EXPERTS, TOP_K, EXPERT_WIDTH, VOCAB = 512, 8, 2, 1024, 4096


def build_models(directory: Path, layers: int) -> dict[str, tuple[Path, int, int]]:
    """Save both random models under `directory`: name -> (path, total params, active params)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False)
    configs = {
        f"MoE {EXPERTS} experts top-{TOP_K}": MixtralConfig(**common, intermediate_size=EXPERT_WIDTH,
                                                            num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
        "dense, same active params": LlamaConfig(**common, intermediate_size=TOP_K * EXPERT_WIDTH),
    }
    models = {}
    for index, (name, config) in enumerate(configs.items()):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        path = directory / str(index)
        model.save_pretrained(path)
        total = sum(p.numel() for p in model.parameters())
        idle_experts = (EXPERTS - TOP_K) * 3 * HIDDEN * EXPERT_WIDTH * layers if "MoE" in name else 0
        models[name] = (path, total, total - idle_experts)
    return models


def decode_tok_s(llm: LLM, batch: int, decode_tokens: int) -> float:
    """Aggregate decode rate: tokens after the first, over the time after the last first token."""
    prompts = random_prompts(batch, 32, VOCAB, 2 + batch)
    params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    first = max(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    return batch * (decode_tokens - 1) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"random models, hidden {HIDDEN}, {args.layers} layers, {args.dtype}, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print(f"{'model':<28}{'total params':>14}{'active params':>15}{'tok/s b=1':>11}{'tok/s b=16':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, total, active) in build_models(Path(tmp), args.layers).items():
            llm = LLM(str(path), dtype=args.dtype, max_num_seqs=16)
            llm.generate(random_prompts(1, 8, VOCAB, 0), SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
            rates = [decode_tok_s(llm, batch, args.decode_tokens) for batch in (1, 16)]
            print(f"{name:<28}{total / 1e6:>13.1f}M{active / 1e6:>14.1f}M{rates[0]:>11.1f}{rates[1]:>12.1f}")
            del llm


if __name__ == "__main__":
    main()
