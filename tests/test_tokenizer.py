"""Tokenizers (GGUF and Hugging Face directory), GGUF metadata reading, chat templates,
incremental detokenization and stop strings.

References are independent implementations: transformers' GGUF tokenizer, the sentencepiece
library, and hand-written expectations of the documented formats.
"""

import io
import json
import random
import time

import pytest

from lmserve.detokenizer import IncrementalDetokenizer, StopStringMatcher
from lmserve.errors import InvalidParameterError, LmserveError, ModelLoadError
from lmserve.loader.gguf_layout import read_gguf
from lmserve.loader.gguf_metadata import read_gguf_metadata
from lmserve.tokenizer import Tokenizer

VARIED_TEXTS = [
    "Hello, world! This is a test.",
    "def square(x):\n    return x ** 2  # comment\n\n\tprint(square(12))",
    "12345 and 3.14159 and 1,000,000 and 0x1F",
    "Café, naïve, résumé, Zürich, ñandú, Ångström",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 🙂👍🏽🇫🇷 and a family 👨‍👩‍👧 here",
    "   leading spaces\n\n\n  trailing   \t\t",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't I'LL we're they've",
    "<|endoftext|><repo_name>x<file_sep>",
    "",
]


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_meta(smollm2_path):
    return read_gguf(smollm2_path).metadata  # what the loader reads (tests/test_gguf_reader.py: gguf-py's too)


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_meta, smollm2_path):
    return Tokenizer.from_gguf_metadata(smollm2_meta, str(smollm2_path))


@pytest.fixture(scope="module")
def hf_smollm2_tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def spm_pair():
    """A SentencePiece BPE model (byte fallback) trained here, and the GGUF-style metadata
    llama.cpp's converter would write for it."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog token model engine hello world stream text".split()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    corpus += ["café naïve résumé 12345 67890"] * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, vocab_size=420, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())

    def token_type(i):
        checks = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6), (sp.is_unused, 5)]
        return next((kind for check, kind in checks if check(i)), 1)

    n = sp.get_piece_size()
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [token_type(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    return sp, meta


@pytest.fixture(scope="module")
def spm_tok(spm_pair):
    return Tokenizer.from_gguf_metadata(spm_pair[1], "spm.gguf")


# ---- GGUF metadata ---------------------------------------------------------------------------

def _plain(value):
    if isinstance(value, list):
        return all(type(v) in (str, int, float, bool) for v in value)
    return type(value) in (str, int, float, bool)


def test_smollm2_metadata_is_plain_python(smollm2_meta):
    assert all(_plain(v) for v in smollm2_meta.values())
    tokens = smollm2_meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 == smollm2_meta["llama.vocab_size"]
    assert tokens[1] == "<|im_start|>"
    assert smollm2_meta["tokenizer.ggml.add_bos_token"] is False
    assert all(type(t) is int for t in smollm2_meta["tokenizer.ggml.token_type"])


def test_metadata_conversion_is_fast(smollm2_path):
    import gguf

    reader = gguf.GGUFReader(str(smollm2_path))
    start = time.perf_counter()
    read_gguf_metadata(reader)
    assert time.perf_counter() - start < 2.0


def test_metadata_types_round_trip(tmp_path):
    import gguf

    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bool("t.flag", True)
    writer.add_float32("t.eps", 0.5)
    writer.add_uint32("t.count", 7)
    writer.add_string("t.name", "héllo")
    writer.add_array("t.words", ["a", "ß", "🙂"])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.25, -1.5])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = {"t.flag": True, "t.eps": 0.5, "t.count": 7, "t.name": "héllo", "t.words": ["a", "ß", "🙂"],
                "t.ints": [1, -2, 3], "t.floats": [0.25, -1.5]}
    for meta in (read_gguf(path).metadata, read_gguf_metadata(gguf.GGUFReader(str(path)))):
        assert {k: meta[k] for k in expected} == expected
        assert type(meta["t.flag"]) is bool and type(meta["t.count"]) is int
        assert all(_plain(v) for v in meta.values())


# ---- GGUF byte-level BPE (SmolLM2) ----------------------------------------------------------

@pytest.mark.parametrize("add_special", [True, False])
def test_gguf_tokenizer_matches_transformers(smollm2_tok, hf_smollm2_tok, add_special):
    for text in VARIED_TEXTS:
        expected = hf_smollm2_tok.encode(text, add_special_tokens=add_special)
        assert smollm2_tok.encode(text, add_special_tokens=add_special) == expected, text


def test_gguf_decode_matches_transformers(smollm2_tok, hf_smollm2_tok):
    for text in VARIED_TEXTS:
        ids = hf_smollm2_tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert smollm2_tok.decode(ids, skip_special_tokens=skip) == \
                hf_smollm2_tok.decode(ids, skip_special_tokens=skip), text


def test_special_tokens_and_ids(smollm2_tok, smollm2_meta):
    tokens = smollm2_meta["tokenizer.ggml.tokens"]
    assert smollm2_tok.vocab_size == len(tokens)
    assert tokens[smollm2_tok.bos_token_id] == "<|im_start|>"
    assert tokens[smollm2_tok.eos_token_id] == "<|im_end|>"
    # EOS plus <|endoftext|>, the other end-of-turn token SmolLM2 may emit
    assert smollm2_tok.stop_token_ids == frozenset({tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")})
    # special tokens in text are matched whole, and skipped on decode
    ids = smollm2_tok.encode("a<|im_start|>b")
    assert tokens.index("<|im_start|>") in ids
    assert smollm2_tok.decode(ids) == "ab"
    assert smollm2_tok.convert_ids_to_tokens(ids) == [tokens[i] for i in ids]


@pytest.mark.parametrize("text", ["Café naïve Ångström", "日本語のテキスト 中文", "🙂👍🏽🇫🇷 👨‍👩‍👧", "mixed é 中 🙂 end"])
def test_round_trip(smollm2_tok, spm_tok, text):
    assert smollm2_tok.decode(smollm2_tok.encode(text)) == text
    assert spm_tok.decode(spm_tok.encode(text)) == text


def test_gguf_bos_eos_flags(smollm2_meta):
    meta = dict(smollm2_meta, **{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    tok = Tokenizer.from_gguf_metadata(meta, "x.gguf")
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.encode("hello", add_special_tokens=False) == ids[1:-1]


def test_gguf_eot_ids_are_stop_tokens(smollm2_meta):
    meta = dict(smollm2_meta, **{"tokenizer.ggml.eot_token_id": 7, "tokenizer.ggml.eom_token_id": 8})
    assert {7, 8} <= Tokenizer.from_gguf_metadata(meta, "x.gguf").stop_token_ids


@pytest.mark.parametrize("pre, pieces", [
    ("smollm", ["1", "2", "3", "4", "5"]),
    ("llama-bpe", ["123", "45"]),
    ("qwen2", ["1", "2", "3", "4", "5"]),
    ("gpt2", ["12345"]),
])
def test_pre_tokenizer_digit_splitting(smollm2_meta, pre, pieces):
    tok = Tokenizer.from_gguf_metadata(dict(smollm2_meta, **{"tokenizer.ggml.pre": pre}), "x.gguf")
    assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("12345")] == pieces


def test_llama3_pre_tokenizer_keeps_punctuation_with_letters(smollm2_meta):
    tok = Tokenizer.from_gguf_metadata(dict(smollm2_meta, **{"tokenizer.ggml.pre": "llama3"}), "x.gguf")
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("(hello")]
    assert pieces == ["(hello"]  # GPT-2's pattern would give "(" and "hello"


# ---- GGUF SentencePiece ("llama") ------------------------------------------------------------

SPM_TEXTS = ["the quick brown fox", " leading space", "two  spaces", "café 你好 🙂", "token\nnewline",
             "12345 67890", "hello world stream", ""]


def test_sentencepiece_gguf_matches_sentencepiece(spm_pair, spm_tok):
    sp, _ = spm_pair
    for text in SPM_TEXTS:
        assert spm_tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert spm_tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_sentencepiece_gguf_defaults(spm_pair, spm_tok):
    sp, _ = spm_pair
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
    assert spm_tok.encode("hello") == [sp.bos_id()] + sp.encode("hello")
    assert spm_tok.vocab_size == sp.get_piece_size()
    assert spm_tok.eos_token_id == sp.eos_id() and sp.eos_id() in spm_tok.stop_token_ids


def test_sentencepiece_without_space_prefix(spm_pair):
    sp, meta = spm_pair
    tok = Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.add_space_prefix": False}), "x.gguf")
    ids = tok.encode("hello world", add_special_tokens=False)
    assert not tok.convert_ids_to_tokens(ids)[0].startswith("\u2581")
    assert tok.decode(ids) == "hello world"


# ---- bad tokenizer metadata ----------------------------------------------------------------

def test_unsupported_tokenizer_model(smollm2_meta):
    meta = dict(smollm2_meta, **{"tokenizer.ggml.model": "bert"})
    with pytest.raises(ModelLoadError) as err:
        Tokenizer.from_gguf_metadata(meta, "/models/m.gguf")
    assert str(err.value) == "/models/m.gguf: unsupported tokenizer model 'bert' (supported: gpt2, llama)"


def test_missing_tokenizer_metadata(smollm2_meta):
    meta = {k: v for k, v in smollm2_meta.items() if not k.startswith("tokenizer.")}
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf_metadata(meta, "m.gguf")


def test_missing_tokens_or_merges(smollm2_meta):
    no_tokens = {k: v for k, v in smollm2_meta.items() if k != "tokenizer.ggml.tokens"}
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata(no_tokens, "m.gguf")
    no_merges = {k: v for k, v in smollm2_meta.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(no_merges, "m.gguf")


def test_merge_out_of_vocabulary(smollm2_meta):
    meta = dict(smollm2_meta, **{"tokenizer.ggml.merges": ["nothere alsonot"]})
    with pytest.raises(ModelLoadError, match="cannot build the tokenizer"):
        Tokenizer.from_gguf_metadata(meta, "m.gguf")


# ---- incremental detokenization --------------------------------------------------------------

STREAM_TEXT = "Réponse: 你好世界！ Emoji 🙂👍🏽 and 🇫🇷 done. 日本語"


class _RecordingTokenizer:
    """Passes decode through, remembering the longest window decoded."""

    def __init__(self, inner):
        self.inner = inner
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream(tokenizer, prompt_ids, output_ids, skip=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    return [detok.add(i) for i in output_ids]


def test_incremental_matches_full_decode(smollm2_tok):
    prompt = smollm2_tok.encode("<|im_start|>assistant\n")
    output = smollm2_tok.encode(STREAM_TEXT * 3)
    # the test means something only if some tokens end inside a character
    assert any("\ufffd" in smollm2_tok.decode(output[:n]) for n in range(1, len(output)))
    recorder = _RecordingTokenizer(smollm2_tok)
    deltas = _stream(recorder, prompt, output)
    assert "".join(deltas) == smollm2_tok.decode(output)
    assert not any("\ufffd" in d for d in deltas)
    assert recorder.longest <= 12  # a short window, not the whole sequence


def test_incremental_special_tokens(smollm2_tok):
    output = smollm2_tok.encode("Hi 🙂<|im_end|>\n<|im_start|>user 你好")
    for skip in (True, False):
        deltas = _stream(smollm2_tok, [], output, skip)
        assert "".join(deltas) == smollm2_tok.decode(output, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)


def test_incremental_flush_releases_unfinished_character(smollm2_tok):
    output = smollm2_tok.encode("ok 你")
    cut = next(n for n in range(1, len(output) + 1) if smollm2_tok.decode(output[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(smollm2_tok, [])
    text = "".join(detok.add(i) for i in output[:cut])
    assert "\ufffd" not in text
    assert text + detok.flush() == smollm2_tok.decode(output[:cut])


def test_incremental_sentencepiece_keeps_word_spaces(spm_tok):
    prompt = spm_tok.encode("the quick")
    output = spm_tok.encode("brown fox 你好 🙂 jumps", add_special_tokens=False)  # "▁brown ..."
    assert any(spm_tok.convert_ids_to_tokens([i])[0].startswith("<0x") for i in output)  # byte fallback used
    deltas = _stream(spm_tok, prompt, output)
    # the continuation of the prompt text, including the space before "brown"
    full, head = spm_tok.decode(prompt + output), spm_tok.decode(prompt)
    assert full.startswith(head)
    assert "".join(deltas) == full[len(head):] == " brown fox 你好 🙂 jumps"
    assert not any("\ufffd" in d for d in deltas)


# ---- stop strings ----------------------------------------------------------------------------

def test_stop_spanning_deltas_is_cut():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hello S") == ("Hello ", False)
    assert matcher.feed("TO") == ("", False)
    assert matcher.feed("P and more") == ("", True)
    assert matcher.matched == "STOP"
    assert matcher.feed("later") == ("", True)


def test_near_miss_is_released():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hello ST") == ("Hello ", False)
    assert matcher.feed("OX") == ("STOX", False)
    assert matcher.matched is None


def test_holds_at_most_longest_stop_minus_one():
    matcher = StopStringMatcher(["</answer>", "##"])
    emitted, stopped = matcher.feed("text </answer")
    assert (emitted, stopped) == ("text ", False)
    assert matcher.flush() == "</answer"
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xxab") == ("xx", False)
    assert matcher.feed("") == ("", False)
    assert matcher.flush() == "ab"
    assert matcher.flush() == ""


def test_multiple_stops_earliest_wins():
    matcher = StopStringMatcher(["END", "STOP"])
    assert matcher.feed("one STOP two END") == ("one ", True)
    assert matcher.matched == "STOP"


def test_stop_choice_does_not_depend_on_chunking():
    text, stops = "xxabcdyy", ["bc", "abcd"]
    whole = StopStringMatcher(stops)
    emitted_whole, _ = whole.feed(text)
    stepwise = StopStringMatcher(stops)
    emitted = ""
    for char in text:
        piece, stopped = stepwise.feed(char)
        emitted += piece
        if stopped:
            break
    assert (emitted_whole, whole.matched) == (emitted, stepwise.matched) == ("xxa", "bc")


def test_stop_at_start_of_stream():
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("\n") == ("", False)
    assert matcher.feed("\nrest") == ("", True)


# ---- chat templates --------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "What is 2+2?"}]


def test_smollm2_chat_template(smollm2_tok, hf_smollm2_tok):
    conversation = [{"role": "system", "content": "Be brief."}, *CHAT,
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "Et 3+3 ? 🙂"}]
    for messages in (CHAT, conversation):
        for add_prompt in (True, False):
            ours = smollm2_tok.apply_chat_template(messages, add_generation_prompt=add_prompt)
            assert ours == hf_smollm2_tok.apply_chat_template(messages, tokenize=False,
                                                              add_generation_prompt=add_prompt)
    rendered = smollm2_tok.apply_chat_template(CHAT)
    assert rendered.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith("<|im_start|>system\n")
    assert smollm2_tok.apply_chat_template(CHAT, add_generation_prompt=False).endswith("<|im_end|>\n")


def _with_template(base, template):
    return Tokenizer(base.backend, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                     chat_template=template)


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ messages.__class__.__subclasses__() }}",
    "{% for m in messages %}{{ m.__class__ }}{% endfor %}",
])
def test_sandbox_refuses_attack_templates(smollm2_tok, attack):
    tok = _with_template(smollm2_tok, attack)
    with pytest.raises(LmserveError, match="unsafe"):
        tok.apply_chat_template(CHAT)


def test_immutable_sandbox_refuses_mutation(smollm2_tok):
    tok = _with_template(smollm2_tok, "{{ messages.append({'role': 'user', 'content': 'x'}) }}")
    with pytest.raises(LmserveError, match="unsafe"):
        tok.apply_chat_template(CHAT)


def test_template_helpers(smollm2_tok):
    template = ("{{ bos_token }}#{{ eos_token }}#{{ messages | tojson }}#{{ strftime_now('%Y') }}"
                "{% for m in messages %}{% if loop.index > 0 %}{% break %}{% endif %}{% endfor %}")
    rendered = _with_template(smollm2_tok, template).apply_chat_template([{"role": "user", "content": "é"}])
    bos, eos, messages, year = rendered.split("#")
    assert (bos, eos) == ("<|im_start|>", "<|im_end|>")
    assert json.loads(messages) == [{"role": "user", "content": "é"}] and "é" in messages
    assert year == str(time.localtime().tm_year)


def test_template_sees_no_tools(smollm2_tok):
    tok = _with_template(smollm2_tok, "{% if tools is not none %}TOOLS{% endif %}{{ messages[0].content }}")
    assert tok.apply_chat_template(CHAT) == CHAT[0]["content"]


def test_template_raise_exception(smollm2_tok):
    tok = _with_template(smollm2_tok, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidParameterError, match="roles must alternate"):
        tok.apply_chat_template(CHAT)


def test_broken_template_is_reported(smollm2_tok):
    with pytest.raises(LmserveError, match="chat template"):
        _with_template(smollm2_tok, "{% for %}").apply_chat_template(CHAT)


def test_missing_chat_template(smollm2_tok):
    tok = _with_template(smollm2_tok, None)
    with pytest.raises(LmserveError, match="no chat template"):
        tok.apply_chat_template(CHAT)


@pytest.mark.parametrize("messages", [
    "hello",
    [],
    ["hello"],
    [{"role": "robot", "content": "x"}],
    [{"content": "x"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": ["list"]}],
])
def test_invalid_messages(smollm2_tok, messages):
    with pytest.raises(InvalidParameterError) as err:
        smollm2_tok.apply_chat_template(messages)
    assert err.value.field == "messages"


# ---- Hugging Face directories ----------------------------------------------------------------

HF_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
               "{% if add_generation_prompt %}[assistant] {% endif %}")


def _train_hf_tokenizer(post_processor_bos=False):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, the tokenizer speaks"] * 50 + ["café 🙂 日本"] * 10, trainer)
    if post_processor_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _hf_dir(tmp_path, config, post_processor_bos=False, generation=None):
    _train_hf_tokenizer(post_processor_bos).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_hf_dir_tokenizer(tmp_path):
    config = {"bos_token": "<s>", "add_bos_token": True, "chat_template": HF_TEMPLATE,
              "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}}
    tok = Tokenizer.from_hf_dir(_hf_dir(tmp_path, config, generation={"eos_token_id": [2, 3]}))
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.stop_token_ids == frozenset({2, 3})
    ids = tok.encode("hello world")
    assert ids[0] == 1 and ids.count(1) == 1
    assert tok.decode(ids) == "hello world"
    assert tok.decode(tok.encode("café 🙂 日本")) == "café 🙂 日本"
    assert tok.apply_chat_template(CHAT) == "<s>[user] What is 2+2?</s>[assistant] "
    assert Tokenizer.maybe_from_hf_dir(tmp_path).chat_template == HF_TEMPLATE


def test_hf_dir_bos_not_doubled_by_post_processor(tmp_path):
    tok = Tokenizer.from_hf_dir(_hf_dir(tmp_path, {"bos_token": "<s>", "add_bos_token": True},
                                        post_processor_bos=True))
    ids = tok.encode("hello")
    assert ids[0] == 1 and ids.count(1) == 1
    assert 1 not in tok.encode("hello", add_special_tokens=False)


def test_hf_dir_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    directory = _hf_dir(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"})
    ours, theirs = Tokenizer.from_hf_dir(directory), AutoTokenizer.from_pretrained(str(directory))
    for text in ["hello world", "café 🙂 日本", "the<|eot_id|>tokenizer", "  spaces  "]:
        assert ours.encode(text) == theirs.encode(text), text


def test_hf_dir_separate_template_files(tmp_path):
    _hf_dir(tmp_path, {"chat_template": "from config"})
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "from config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == "from jinja"


def test_hf_dir_eos_from_generation_config(tmp_path):
    tok = Tokenizer.from_hf_dir(_hf_dir(tmp_path, {}, generation={"eos_token_id": 3}))
    assert tok.eos_token_id == 3 and tok.stop_token_ids == frozenset({3})
    assert tok.chat_template is None


def test_hf_dir_special_end_of_turn_tokens_stop(tmp_path):
    tok = Tokenizer.from_hf_dir(_hf_dir(tmp_path, {"eos_token": "</s>"}))
    assert tok.stop_token_ids == frozenset({2, 3})  # </s> and <|eot_id|>


def test_hf_dir_missing_or_bad_files(tmp_path):
    assert Tokenizer.maybe_from_hf_dir(tmp_path) is None
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        Tokenizer.from_hf_dir(tmp_path)
    _train_hf_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="tokenizer_config.json"):
        Tokenizer.from_hf_dir(tmp_path)
