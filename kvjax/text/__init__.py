"""The text layer (no JAX): tokenizers loaded from Hugging Face directories or GGUF metadata, chat
templates rendered as transformers renders them, and streaming detokenization with stop strings.

Imports nothing else of kvjax; the serving and engine layers use it to turn requests into tokens and
tokens back into text.
"""

from kvjax.text.chat_template import render_chat_template, validate_messages
from kvjax.text.detokenizer import IncrementalDetokenizer
from kvjax.text.gguf_vocab import SUPPORTED_PRE_TYPES, GGUFVocab, read_gguf_vocab
from kvjax.text.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "SUPPORTED_PRE_TYPES",
    "GGUFVocab",
    "IncrementalDetokenizer",
    "Tokenizer",
    "load_tokenizer",
    "read_gguf_vocab",
    "render_chat_template",
    "validate_messages",
]
