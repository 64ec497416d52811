"""Text <-> token ids.

:class:`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer`, built either from the
`tokenizer.ggml.*` metadata of a GGUF file (byte-level BPE or SentencePiece-style vocabularies)
or from the `tokenizer.json` of a Hugging Face model directory. It also knows the model's
special ids (BOS, EOS, the end-of-turn tokens that stop generation) and its chat template,
rendered by `lmserve.chat_template`.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from lmserve.errors import ModelLoadError

# Pre-tokenizer split patterns, keyed by the vocabularies that were trained with them.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# `tokenizer.ggml.model` values we build a tokenizer for: byte-level BPE ("gpt2") and
# SentencePiece-style ("llama") vocabularies, whatever the model family.
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")

# GGUF token types (llama.cpp's llama_token_type).
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = 1, 2, 3, 4, 5, 6

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>")
SPIECE_SPACE = "\u2581"


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, unk_token_id: int | None = None,
                 pad_token_id: int | None = None, add_bos_token: bool = False, add_eos_token: bool = False,
                 chat_template: str | None = None, extra_stop_token_ids=(), vocab_size: int | None = None):
        """`add_bos_token`/`add_eos_token` ask :meth:`encode` to add those ids itself (on top of
        whatever the backend's post-processor adds)."""
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        self.add_eos_token = add_eos_token and eos_token_id is not None
        self.chat_template = chat_template or None
        self.vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)
        self.stop_token_ids = self._collect_stop_ids(extra_stop_token_ids)
        self._compiled_template = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict, path: str) -> Tokenizer:
        """Build from the `tokenizer.ggml.*` keys of GGUF metadata read from `path`."""
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise ModelLoadError(path, "GGUF metadata has no tokenizer ('tokenizer.ggml.model' is missing)")
        if kind not in GGUF_TOKENIZER_MODELS:
            raise ModelLoadError(path, f"unsupported tokenizer model {kind!r} "
                                       f"(supported: {', '.join(GGUF_TOKENIZER_MODELS)})")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ModelLoadError(path, "GGUF metadata lacks the token list 'tokenizer.ggml.tokens'")
        token_types = meta.get("tokenizer.ggml.token_type") or [_TYPE_NORMAL] * len(tokens)
        if len(token_types) != len(tokens):
            raise ModelLoadError(path, f"GGUF metadata has {len(token_types)} token types for {len(tokens)} tokens")

        def token_id(name):
            value = meta.get(f"tokenizer.ggml.{name}_token_id")
            return value if isinstance(value, int) and 0 <= value < len(tokens) else None

        unk = token_id("unknown")
        try:
            if kind == "gpt2":
                backend = _byte_level_backend(tokens, meta.get("tokenizer.ggml.merges"),
                                              meta.get("tokenizer.ggml.pre"), path)
                default_add_bos = False
            else:
                add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
                backend = _sentencepiece_backend(tokens, meta.get("tokenizer.ggml.scores"), token_types,
                                                 tokens[unk] if unk is not None else None, add_prefix)
                default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
            _add_gguf_special_tokens(backend, tokens, token_types)
        except ModelLoadError:
            raise
        except Exception as exc:  # tokenizers reports bad vocabularies with assorted exceptions
            raise ModelLoadError(path, f"cannot build the tokenizer ({type(exc).__name__}: {exc})") from None
        extra_stops = [i for i in (token_id("eot"), token_id("eom")) if i is not None]
        return cls(backend, bos_token_id=token_id("bos"), eos_token_id=token_id("eos"), unk_token_id=unk,
                   pad_token_id=token_id("padding"),
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
                   add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), extra_stop_token_ids=extra_stops,
                   vocab_size=len(tokens))

    @classmethod
    def from_hf_dir(cls, path) -> Tokenizer:
        """Build from a Hugging Face model directory; its `tokenizer.json` is required."""
        directory = Path(path)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise ModelLoadError(directory, "no tokenizer.json (a Hugging Face fast tokenizer is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(file, f"cannot read tokenizer: {exc}") from None
        config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        generation = _read_json(directory / "generation_config.json")

        def special(name):
            return _token_id(backend, config.get(name, special_map.get(name)))

        generation_eos = _id_list(generation.get("eos_token_id"))
        eos = special("eos_token")
        if eos is None and generation_eos:
            eos = generation_eos[0]
        bos = special("bos_token")
        probe = backend.encode("", add_special_tokens=True).ids
        return cls(backend, bos_token_id=bos, eos_token_id=eos, unk_token_id=special("unk_token"),
                   pad_token_id=special("pad_token"),
                   # only add what the tokenizer.json post-processor does not already add
                   add_bos_token=bool(config.get("add_bos_token")) and bos not in probe[:1],
                   add_eos_token=bool(config.get("add_eos_token")) and eos not in probe[-1:],
                   chat_template=_hf_chat_template(directory, config), extra_stop_token_ids=generation_eos)

    @classmethod
    def maybe_from_hf_dir(cls, path) -> Tokenizer | None:
        """Like :meth:`from_hf_dir`, but None when the directory has no tokenizer.json."""
        if not (Path(path) / "tokenizer.json").is_file():
            return None
        return cls.from_hf_dir(path)

    # ---- encoding -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode holds it throughout), so a long text tokenized
        # in a worker thread does not stall the server's event loop.
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos_token:
            ids.insert(0, self.bos_token_id)
        if add_special_tokens and self.add_eos_token:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str | None]:
        return [self.backend.id_to_token(i) for i in ids]

    def _collect_stop_ids(self, extra) -> frozenset[int]:
        special_ids = {token.content: i for i, token in self.backend.get_added_tokens_decoder().items()
                       if token.special}
        stops = {special_ids[name] for name in END_OF_TURN_TOKENS if name in special_ids}
        stops.update(extra)
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        return frozenset(stops)

    # ---- chat ---------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render `messages` with the model's chat template into a prompt string. `tools` (function
        tools as JSON-schema dicts, `{"type": "function", "function": {...}}`) reach the template as
        transformers passes them; a template without a tools section ignores them."""
        from lmserve.chat_template import ChatTemplateError, compile_template, render

        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template, so chat messages cannot be formatted; "
                                    "send a plain text prompt instead")
        if self._compiled_template is None:
            self._compiled_template = compile_template(self.chat_template)
        bos = self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.backend.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""
        return render(self._compiled_template, messages, add_generation_prompt, bos or "", eos or "", tools)


# ---- GGUF vocabularies ----------------------------------------------------------------------

def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a duplicated string keeps its first id
    return vocab


def _byte_level_pre_tokenizer(pre: str | None):
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pattern = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(pre)
    if pattern is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 pattern
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_level_backend(tokens, merges, pre, path) -> tokenizers.Tokenizer:
    if not isinstance(merges, list):
        raise ModelLoadError(path, "GGUF metadata lacks the BPE merges 'tokenizer.ggml.merges'")
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    # llama.cpp looks a whole pre-token up in the vocabulary before merging for Llama 3.
    model = models.BPE(_vocab_dict(tokens), pairs, ignore_merges=pre in ("llama-bpe", "llama3"))
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_scores(tokens, scores, token_types) -> list[tuple[str, str]]:
    """SentencePiece vocabularies carry scores, not merges. Greedily merging the adjacent pair
    whose union has the best score (llama.cpp's algorithm) is BPE whose merges are ranked by the
    score of the merged token, so derive those merges."""
    vocab = _vocab_dict(tokens)
    ranked = []
    for index, token in enumerate(tokens):
        if token_types[index] in (_TYPE_CONTROL, _TYPE_BYTE, _TYPE_UNKNOWN) or vocab[token] != index:
            continue
        score = scores[index] if scores else -index
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_backend(tokens, scores, token_types, unk_token, add_prefix) -> tokenizers.Tokenizer:
    merges = _merges_from_scores(tokens, scores, token_types)
    model = models.BPE(_vocab_dict(tokens), merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    replace_space = normalizers.Replace(" ", SPIECE_SPACE)
    backend.normalizer = (normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), replace_space])
                          if add_prefix else replace_space)
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_gguf_special_tokens(backend, tokens, token_types) -> None:
    """Control/unknown tokens become special tokens and user-defined ones added tokens, so the
    text forms are matched whole; both keep their GGUF ids because they are already in the vocab."""
    special, added = [], []
    for token, kind in zip(tokens, token_types):
        if not token:
            continue
        if kind in (_TYPE_CONTROL, _TYPE_UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == _TYPE_USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(special)
    backend.add_tokens(added)


# ---- Hugging Face directories ---------------------------------------------------------------

def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(file, f"invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(file, "expected a JSON object")
    return data


def _token_id(backend, value) -> int | None:
    """A token given as a string or as a serialized AddedToken dict -> its id."""
    if isinstance(value, dict):
        value = value.get("content")
    return backend.token_to_id(value) if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _hf_chat_template(directory: Path, config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(directory / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None

