"""A GGUF file's tokenizer metadata (`tokenizer.ggml.*`) rebuilt as a Hugging Face `tokenizers`
byte-level BPE that encodes as the original tokenizer did, with the pre-tokenizer chosen by
`tokenizer.ggml.pre` the way llama.cpp's `llama-vocab.cpp` chooses its regexes."""

import dataclasses
import os

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

__all__ = ["SUPPORTED_PRE_TYPES", "GGUFVocab", "read_gguf_vocab"]

# Llama 3's split regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_LLAMA3): numbers in groups of up to three.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2): every digit on its own.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's "default" (also what a file without the key gets) splits differently from GPT-2's
# regex; it is refused rather than approximated.
GPT2_PRE_TYPES = ("gpt-2",)
DIGITS_PRE_TYPES = ("smollm", "starcoder", "refact")
LLAMA3_PRE_TYPES = ("llama-bpe", "llama3")
QWEN2_PRE_TYPES = ("qwen2",)
SPLIT_REGEX = {"llama-bpe": LLAMA3_REGEX, "llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}
# Control tokens llama.cpp treats as ends of generation whatever the metadata names.
END_OF_GENERATION_TEXTS = frozenset(
    ["<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
     "<EOT>", "_<EOT>"]
)  # fmt: skip
SUPPORTED_PRE_TYPES = GPT2_PRE_TYPES + DIGITS_PRE_TYPES + LLAMA3_PRE_TYPES + QWEN2_PRE_TYPES

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer a GGUF file describes, with the special ids and chat template beside it."""

    backend: BackendTokenizer
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    add_bos: bool
    chat_template: str | None
    source: str


def read_gguf_vocab(gguf_file: str | os.PathLike | gguf.GGUFReader) -> GGUFVocab:
    """Builds the tokenizer of a GGUF file from its metadata.

    Args:
        gguf_file: the file's path, or a `gguf.GGUFReader` already open on it (reading a large
            file takes seconds, so a model loader can share its reader).

    Raises:
        ValueError: a required key is missing, or the tokenizer model or pre-tokenizer kind is
            not supported (only "gpt2", byte-level BPE, is).
    """
    reader = gguf_file if isinstance(gguf_file, gguf.GGUFReader) else gguf.GGUFReader(gguf_file)
    source = str(getattr(reader.data, "filename", None) or gguf_file)
    fields = _Fields(reader, source)
    model = fields.required("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model {model!r} is not supported; only 'gpt2' "
            "(byte-level BPE) is (SentencePiece 'llama' and others are not)"
        )
    pre_type = fields.optional("tokenizer.ggml.pre", "default")  # llama.cpp's fallback
    tokens = fields.required("tokenizer.ggml.tokens")
    merges = [_split_merge(m, source) for m in fields.required("tokenizer.ggml.merges")]
    token_types = fields.optional("tokenizer.ggml.token_type", [TOKEN_TYPE_NORMAL] * len(tokens))
    backend = _byte_level_bpe(tokens, merges, pre_type, source)
    _add_special_tokens(backend, tokens, token_types)
    eos_keys = ("eos", "eot", "eom")
    eos_ids = [fields.optional(f"tokenizer.ggml.{key}_token_id") for key in eos_keys]
    # As llama.cpp: control tokens known to end a turn end generation too.
    eos_ids += [i for i, (text, kind) in enumerate(zip(tokens, token_types, strict=True))
                if kind == TOKEN_TYPE_CONTROL and text in END_OF_GENERATION_TEXTS]  # fmt: skip
    return GGUFVocab(
        backend=backend,
        bos_token_id=fields.optional("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        # llama.cpp's default: only Llama 3 vocabularies prepend BOS unless the file says so.
        add_bos=bool(fields.optional("tokenizer.ggml.add_bos_token", pre_type in LLAMA3_PRE_TYPES)),
        chat_template=fields.optional("tokenizer.chat_template"),
        source=source,
    )


class _Fields:
    """Typed access to a reader's metadata, with errors that name the file and the key."""

    def __init__(self, reader: gguf.GGUFReader, source: str):
        self._reader = reader
        self._source = source

    def required(self, key: str):
        if key not in self._reader.fields:
            raise ValueError(f"{self._source}: GGUF metadata has no key {key!r}")
        return self._reader.fields[key].contents()

    def optional(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()


def _split_merge(merge: str, source: str) -> tuple[str, str]:
    # As llama.cpp: the separator is the first space after the first character.
    split_at = merge.find(" ", 1)
    if split_at < 0:
        raise ValueError(f"{source}: merge {merge!r} is not two tokens separated by a space")
    return merge[:split_at], merge[split_at + 1 :]


def _byte_level_bpe(
    tokens: list[str], merges: list[tuple[str, str]], pre_type: str, source: str
) -> BackendTokenizer:
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # a duplicated token keeps its first id, as llama.cpp
    model = models.BPE(vocab, merges, ignore_merges=pre_type in LLAMA3_PRE_TYPES)
    backend = BackendTokenizer(model)
    backend.pre_tokenizer = _pre_tokenizer(pre_type, source)
    backend.decoder = decoders.ByteLevel()
    if pre_type in QWEN2_PRE_TYPES:
        backend.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
    return backend


def _pre_tokenizer(pre_type: str, source: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre_type in GPT2_PRE_TYPES:
        return byte_level
    if pre_type in DIGITS_PRE_TYPES:
        digits = pre_tokenizers.Digits(individual_digits=True)
        return pre_tokenizers.Sequence([digits, byte_level])
    if pre_type in SPLIT_REGEX:
        split = pre_tokenizers.Split(
            Regex(SPLIT_REGEX[pre_type]), behavior="isolated", invert=False
        )
        bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, bytes_only])
    raise ValueError(
        f"{source}: tokenizer.ggml.pre {pre_type!r} is not supported; "
        f"supported: {', '.join(SUPPORTED_PRE_TYPES)}"
    )


def _add_special_tokens(backend: BackendTokenizer, tokens: list[str], token_types: list[int]):
    """Control tokens become special added tokens (`skip_special_tokens` drops them); user-defined
    ones become plain added tokens. Both are then matched whole in the raw text."""
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == TOKEN_TYPE_CONTROL]
    user = [
        t for t, kind in zip(tokens, token_types, strict=True) if kind == TOKEN_TYPE_USER_DEFINED
    ]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
