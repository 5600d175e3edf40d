"""The serving tokenizer: text to token ids and back, and chat messages to a prompt, loaded from a
Hugging Face tokenizer directory or from a GGUF file's metadata."""

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Tokenizer as BackendTokenizer

from kvjax.text.chat_template import render_chat_template
from kvjax.text.gguf_vocab import read_gguf_vocab

__all__ = ["Tokenizer", "load_tokenizer"]


class Tokenizer:
    """A `tokenizers.Tokenizer` with the special ids, BOS policy and chat template of its model.

    Immutable after construction; `tokenizers` encodes and decodes safely from several threads,
    so one instance can serve every request thread.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None,
        source: str,
    ):
        self._backend = backend
        # Token pieces are GPT-2's byte characters only under a byte-level decoder.
        decoder = backend.decoder
        self._byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self._add_bos = add_bos and bos_token_id is not None
        self._chat_template = chat_template
        self._source = source
        added = backend.get_added_tokens_decoder()
        self._special_token_ids = frozenset(i for i, token in added.items() if token.special)
        self._special_tokens = {added[i].content: i for i in self._special_token_ids}
        self._max_token_id = max(backend.get_vocab(with_added_tokens=True).values(), default=-1)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a Hugging Face tokenizer directory: `tokenizer.json` (required) and, when present,
        `tokenizer_config.json`, `chat_template.jinja` and `generation_config.json`."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{directory}: no tokenizer.json in the tokenizer directory")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(directory / "tokenizer_config.json")
        bos_token_id = _token_id(backend, config.get("bos_token"), directory)
        eos_token_id = _token_id(backend, config.get("eos_token"), directory)
        generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id", [])
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else generation_eos
        # A post-processor that writes BOS itself (Llama 3) counts as adding BOS, unless the
        # config turns BOS off: transformers then rebuilds that post-processor without it.
        writes_bos = bos_token_id is not None and backend.encode("").ids[:1] == [bos_token_id]
        if writes_bos and config.get("add_bos_token") is False and not config.get("add_eos_token"):
            backend.post_processor = None
            writes_bos = False
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=[i for i in (eos_token_id, *generation_eos) if i is not None],
            add_bos=bool(config.get("add_bos_token", False)) or writes_bos,
            chat_template=_chat_template(directory, config),
            source=str(directory),
        )

    @classmethod
    def from_gguf(cls, gguf_file: str | os.PathLike | gguf.GGUFReader) -> "Tokenizer":
        """Loads the tokenizer a GGUF file's metadata describes (path or an open reader)."""
        vocab = read_gguf_vocab(gguf_file)
        return cls(
            vocab.backend,
            bos_token_id=vocab.bos_token_id,
            eos_token_ids=vocab.eos_token_ids,
            add_bos=vocab.add_bos,
            chat_template=vocab.chat_template,
            source=vocab.source,
        )

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def add_bos(self) -> bool:
        """Whether `encode` prepends BOS when asked for special tokens."""
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_token_ids

    @property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the special tokens (which decoding leaves out of the text)."""
        return dict(self._special_tokens)

    @property
    def source(self) -> str:
        """The directory or file the tokenizer came from."""
        return self._source

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in it (`<|im_start|>`) become their ids.
        Prepends BOS when `add_bos` and `add_special_tokens`, unless the text already starts
        with it."""
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos and ids[:1] != [self._bos_token_id]:
            ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int | None) -> str:
        """The text of one token ("" for None or an unknown id)."""
        if token_id is None:
            return ""
        return self._backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (a token may hold part of a character, which its text
        shows as U+FFFD): a byte-level BPE piece mapped back to its bytes, a SentencePiece
        byte-fallback piece `<0xNN>` as that byte, `▁` as a space; a special token's text."""
        piece = self._backend.id_to_token(token_id) or ""
        if not piece or token_id in self._special_token_ids:
            return self.token_text(token_id).encode()
        if self._byte_level and all(char in _BYTE_OF_CHAR for char in piece):
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode()

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Renders messages with the model's chat template, as Hugging Face transformers does."""
        if self._chat_template is None:
            raise ValueError(f"{self._source}: the tokenizer has no chat template")
        eos_token_id = self._eos_token_ids[0] if self._eos_token_ids else None
        return render_chat_template(
            self._chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(self._bos_token_id),
            eos_token=self.token_text(eos_token_id),
            source=self._source,
            **extra,
        )

    def encode_chat(self, messages: list[dict], **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation; the template writes BOS itself, so none is
        added (as Hugging Face does)."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raises ValueError when the tokenizer has ids the model's embedding does not (a
        tokenizer smaller than the embedding is fine: models pad their vocabulary)."""
        if self._max_token_id >= model_vocab_size:
            raise ValueError(
                f"{self._source}: tokenizer has ids up to {self._max_token_id} "
                f"(vocab size {self.vocab_size}) but the model's vocabulary size is "
                f"{model_vocab_size}"
            )


def _byte_of_char() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character map (GPT-2's)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_of_char()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a Hugging Face tokenizer directory or a `.gguf` file."""
    path = Path(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        return Tokenizer.from_gguf(path)
    raise ValueError(f"{path}: not a tokenizer directory nor a .gguf file")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error


def _token_id(backend: BackendTokenizer, token: str | dict | None, directory: Path) -> int | None:
    """The id of a special token given as text or as {"content": text} in tokenizer_config."""
    text = token.get("content") if isinstance(token, dict) else token
    if text is None:
        return None
    token_id = backend.token_to_id(text)
    if token_id is None:
        raise ValueError(f"{directory}: special token {text!r} is not in tokenizer.json")
    return token_id


def _chat_template(directory: Path, config: dict) -> str | None:
    """chat_template.jinja when present, else tokenizer_config's template (a string, or a list
    of {name, template} from which "default" is taken)."""
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        if "default" not in named:
            raise ValueError(f"{directory}: no 'default' among chat templates {sorted(named)}")
        return named["default"]
    return template
