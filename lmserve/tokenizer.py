"""Text <-> token ids and chat formatting.

:class:`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer`, built either from the
`tokenizer.ggml.*` metadata of a GGUF file (byte-level BPE or SentencePiece-style vocabularies)
or from the `tokenizer.json` of a Hugging Face model directory. It also knows the model's
special ids (BOS, EOS, the end-of-turn tokens that stop generation) and renders its chat
template in a Jinja sandbox, within a time limit and a size limit on what the template builds.
"""

from __future__ import annotations

import contextvars
import json
import time
from datetime import datetime
from pathlib import Path

import tokenizers
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from lmserve.errors import InvalidParameterError, LmserveError, ModelLoadError


class ChatTemplateError(LmserveError):
    """The model has no chat template, or its template is unsafe or fails to render."""


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
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
SPIECE_SPACE = "\u2581"

# A chat template is a program from the model file: one that loops (nearly) forever or builds a
# huge string is stopped rather than allowed to stall or exhaust the process.
CHAT_TEMPLATE_TIME_LIMIT = 1.0  # seconds per rendering
CHAT_TEMPLATE_MAX_SIZE = 16 * 2**20  # characters of output; items of a string or list built with + or *


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

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` with the model's chat template into a prompt string."""
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template, so chat messages cannot be formatted; "
                                    "send a plain text prompt instead")
        messages = validate_messages(messages)
        template = self._template()
        bos = self.backend.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.backend.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""
        deadline = _render_deadline.set(time.monotonic() + CHAT_TEMPLATE_TIME_LIMIT)
        try:
            # tools/documents are None, not undefined, as transformers renders them, because
            # templates test `tools is not none`.
            parts = template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                      bos_token=bos or "", eos_token=eos or "", tools=None, documents=None)
            return "".join(_bounded_output(parts))
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template is unsafe and was refused: {exc}") from None
        except LmserveError:
            raise
        except Exception as exc:  # a template can fail in any way its expressions allow
            raise ChatTemplateError(f"chat template failed to render ({type(exc).__name__}: {exc})") from None
        finally:
            _render_deadline.reset(deadline)

    def _template(self):
        if self._compiled_template is None:
            try:
                self._compiled_template = _chat_environment().from_string(self.chat_template)
            except TemplateError as exc:
                raise ChatTemplateError(f"chat template is invalid: {exc}") from None
        return self._compiled_template


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


# ---- chat templates -------------------------------------------------------------------------

def validate_messages(messages) -> list[dict]:
    """Check chat messages: a non-empty list of {role, content: str} dicts."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "must be a non-empty list of {role, content} objects")
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidParameterError("messages", f"item {position} is not an object with role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidParameterError("messages", f"item {position} has role {role!r} "
                                                    f"(allowed: {', '.join(sorted(CHAT_ROLES))})")
        if not isinstance(message.get("content"), str):
            raise InvalidParameterError("messages", f"item {position} content must be a string")
    return [dict(message) for message in messages]


_render_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("_render_deadline", default=None)


def _check_deadline() -> None:
    deadline = _render_deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError(f"chat template ran longer than {CHAT_TEMPLATE_TIME_LIMIT:g} s and was stopped")


def _check_size(size: int) -> None:
    if size > CHAT_TEMPLATE_MAX_SIZE:
        raise ChatTemplateError(f"chat template builds {size:,} characters or items, over the limit of "
                                f"{CHAT_TEMPLATE_MAX_SIZE:,}")


def _bounded_output(parts):
    size = 0
    for part in parts:
        size += len(part)
        _check_size(size)
        _check_deadline()
        yield part


class _TimedRange:
    """The templates' `range`: at most MAX_RANGE items (jinja's `safe_range`), and iterating it
    checks the rendering's deadline, so nested loops cannot run for hours."""

    def __init__(self, *args):
        self.values = safe_range(*args)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        return self.values[index]

    def __iter__(self):
        for value in self.values:
            _check_deadline()
            yield value


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The stock sandbox hands back a silent Undefined for a forbidden attribute, which prints
    as ''; refuse outright so a probing template fails loudly instead of half-rendering. Calls,
    lookups, `+` and `*` check the rendering's deadline, and `+` / `*` refuse to build a string or
    list over the size limit (intercepting them also stops jinja folding `'x' * 3000000000` at
    compile time)."""

    intercepted_binops = frozenset({"+", "*"})

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        sized = (str, list, tuple)
        if operator == "+" and isinstance(left, sized) and isinstance(right, sized):
            _check_size(len(left) + len(right))
        elif operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, sized) and isinstance(count, int):
                    _check_size(len(sequence) * count)
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_deadline()
        return super().getitem(obj, argument)


def _raise_exception(message):
    raise InvalidParameterError("messages", f"rejected by the chat template: {message}")


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON, as transformers renders it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _TimedRange
    return env
