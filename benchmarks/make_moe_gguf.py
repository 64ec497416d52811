"""Write a random-weight Qwen3-MoE GGUF file that both lmserve and llama.cpp load, for running the
engines side by side on a mixture of experts (benchmarks/compare_peers.py --model FILE).

The default shape is a scaled-down Qwen3-MoE (Qwen3-30B-A3B: hidden 2048, 48 layers, 128 experts of
768, top 8): hidden 1024, 12 layers, attention with 16 query heads of 128 and 4 KV heads (q/k
norms), every layer sparse with 64 experts of width 256 and the top 8 per token (weights
renormalised), untied LM head. That is 0.77 B parameters, of which 0.19 B are read per token (25%:
the attention, 8 of 64 experts and the 49152-row LM head); 437 MB as Q4_0 (about 820 MB as Q8_0).
The weights are transformers' random initialisation (seed 0). The tokenizer is SmolLM2's
49152-token byte-level BPE, taken from the embedded SmolLM2 GGUF file, so prompts tokenize as real
text does.

The model is saved with transformers (bf16) in a temporary directory and written by
`lmserve quantize` (`quant.gguf_writer`); `--check` then runs llama.cpp's llama-bench on the file
and loads it in lmserve, asserting its experts are packed and run by the fused decoder.

    .venv/bin/python benchmarks/make_moe_gguf.py --check    # ~/.cache/lmserve-bench/qwen3moe-...-q4_0.gguf
    .venv/bin/python benchmarks/make_moe_gguf.py --type q8_0 --layers 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lmserve, not an installed one
CACHE = Path.home() / ".cache" / "lmserve-bench"
LLAMA_BIN = Path.home() / ".cache" / "lmserve-llamacpp" / "build" / "bin"


def save_smollm2_tokenizer(directory: Path) -> dict:
    """Write SmolLM2's tokenizer.json and tokenizer_config.json to `directory`; returns the
    config.json fields naming its BOS and EOS ids."""
    from lmserve.default_model import DEFAULT_MODEL, resolve_embedded
    from lmserve.loader.gguf_layout import read_gguf
    from lmserve.tokenizer import Tokenizer

    path = resolve_embedded(DEFAULT_MODEL)
    meta = read_gguf(Path(path)).metadata
    tokenizer = Tokenizer.from_gguf_metadata(meta, path)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[bos], "eos_token": tokens[eos], "add_bos_token": tokenizer.add_bos_token,
        "chat_template": tokenizer.chat_template}))
    return {"vocab_size": len(tokens), "bos_token_id": bos, "eos_token_id": eos}


def save_random_model(directory: Path, args) -> tuple[int, int]:
    """Save the random Qwen3-MoE with its tokenizer under `directory`; returns (total, active)
    parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate, norm_topk_prob=True,
        max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False,
        **save_smollm2_tokenizer(directory))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.save_pretrained(directory)
    total = sum(p.numel() for p in model.parameters())
    idle = (args.experts - args.top_k) * 3 * args.hidden * args.moe_intermediate * args.layers
    return total, total - idle - model.model.embed_tokens.weight.numel()  # a step reads a few embedding rows


def check(path: Path, llama_bin: Path) -> None:
    """llama.cpp runs the file; lmserve loads it with packed experts and the fused decoder."""
    from lmserve import LLM, SamplingParams
    from lmserve.layers.moe import SparseMoeBlock

    subprocess.run([str(llama_bin / "llama-bench"), "-m", str(path), "-p", "16", "-n", "4", "-t", "2"], check=True)
    llm = LLM(str(path), kv_cache_memory="64MiB")
    assert llm.engine.runner.fused_decode is not None, "lmserve did not build the fused decoder"
    blocks = [m for m in llm.engine.model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(b.experts.packed is not None for b in blocks), "lmserve left experts unpacked"
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    print(f"lmserve: fused decoder, {len(blocks)} MoE layers with packed experts; "
          f"generated {len(out[0].outputs[0].token_ids)} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="q4_0", help="GGML type for `lmserve quantize` (default q4_0)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help=f"GGUF file (default: under {CACHE})")
    parser.add_argument("--check", action="store_true", help="run llama-bench on the file and load it in lmserve")
    parser.add_argument("--llama-bin", type=Path, default=LLAMA_BIN, help="llama.cpp bin directory for --check")
    args = parser.parse_args()
    from lmserve.quant.gguf_writer import quantize_model

    name = f"qwen3moe-h{args.hidden}-l{args.layers}-e{args.experts}x{args.moe_intermediate}-top{args.top_k}"
    out = args.out or CACHE / f"{name}-{args.type}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        directory = Path(tmp) / name  # its name is the file's general.name
        directory.mkdir()
        total, active = save_random_model(directory, args)
        counts = quantize_model(directory, out, args.type)
    print(f"{out}: {out.stat().st_size / 1e6:.0f} MB; {total / 1e9:.3f} B parameters, {active / 1e9:.3f} B read "
          f"per token ({100 * active / total:.0f}%); tensors {dict(counts)}")
    if args.check:
        check(out, args.llama_bin)


if __name__ == "__main__":
    main()
