"""A small byte-level BPE tokenizer trained on a fixed English paragraph, saved beside a copy of a
tiny random model, so text-level commands (perplexity, quantize) can run on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A language model assigns a probability to every "
    "token that may come next, and perplexity is the exponential of the mean negative log-likelihood "
    "of the tokens that did come next. Rivers run to the sea; the sea is never full. In the morning "
    "the market opens, the bakers sell bread and the fishermen bring in their nets. "
) * 4

EOS = "<|endoftext|>"


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    """Write tokenizer.json (at most `vocab_size` tokens, id 0 is EOS) and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SAMPLE_TEXT], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))


def with_tokenizer(model_dir: Path, target: Path, vocab_size: int) -> Path:
    """Copy the model directory `model_dir` to `target` and add the tokenizer; returns `target`."""
    if not target.exists():
        shutil.copytree(model_dir, target)
        save_tokenizer(target, vocab_size)
    return target
