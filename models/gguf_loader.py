"""Loading a GGUF file (llama.cpp's and Ollama's format) into a `Llama`.

The `gguf` package reads the file (memory-mapped) and dequantizes its tensors; this module maps
llama.cpp's names onto Hugging Face's, undoes the converter's rotary row permutation of the Q and
K weights, and reads the hyperparameters from the metadata. Tensors are dequantized one at a
time as the model takes them, so a quantized model never sits in memory as float32 whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from models.config import LlamaConfig, rope_frequencies
from models.llama import Llama
from models.loader import build_model

__all__ = ["SUPPORTED_TENSOR_TYPES", "gguf_config", "load_gguf_checkpoint", "open_gguf"]

_Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = tuple(
    _Q[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K",
                          "Q6_K")
)  # fmt: skip
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# llama.cpp's converter reorders the rotary rows of Q and K for these only (Llama's interleaved
# RoPE in ggml); Qwen2 keeps Hugging Face's rotate-half rows (ggml's NEOX RoPE).
_PERMUTED_ARCHITECTURES = ("llama",)

# llama.cpp's per-layer tensor names -> Hugging Face's.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """The file's reader; a missing, truncated or foreign file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises bare ValueErrors, struct errors, ...
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from error


def _field(reader: gguf.GGUFReader, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{reader.data.filename}: metadata key {key!r} is missing")
        return default
    return field.contents()


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999975e-06)."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def gguf_config(reader: gguf.GGUFReader) -> LlamaConfig:
    """The model's `LlamaConfig` from the file's metadata; raises naming an unsupported
    architecture or option."""
    source = reader.data.filename
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: general.architecture={arch!r} is not supported; "
            f"supported: {SUPPORTED_ARCHITECTURES}"
        )
    hidden, heads = (
        _field(reader, f"{arch}.embedding_length"),
        _field(reader, f"{arch}.attention.head_count"),
    )
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise ValueError(f"{source}: per-layer head counts are not supported ({heads}, {kv_heads})")
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden // heads)
    rotary_dim = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(
            f"{source}: {arch}.rope.dimension_count={rotary_dim} rotates part of a head "
            f"(head_dim={head_dim}); only full rotation is supported"
        )
    names = {tensor.name for tensor in reader.tensors}
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight") if (
        "token_embd.weight" in names) else None  # fmt: skip
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size", None) or (
        int(embedding.shape[-1]) if embedding is not None else len(tokens.data) if tokens else None
    )
    eos = [_field(reader, f"tokenizer.ggml.{key}_token_id", None) for key in ("eos", "eot")]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        num_layers=_field(reader, f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_decimal(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_decimal(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        eos_token_ids=tuple(dict.fromkeys(t for t in eos if t is not None)),
        sliding_window=_field(reader, f"{arch}.attention.sliding_window", None) or None,
    )


def _rope_scaling(reader: gguf.GGUFReader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(
            f"{reader.data.filename}: {arch}.rope.scaling.type={kind!r} is not supported "
            "(only none and linear; Llama 3's scaling comes as a rope_freqs tensor)"
        )
    return {
        "rope_type": "linear",
        "factor": _decimal(_field(reader, f"{arch}.rope.scaling.factor")),
    }


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's converter, which reorders each head's rows of q_proj/k_proj from
    Hugging Face's rotate-half layout to interleaved pairs: `[out, ...]` back to HF's rows."""
    shape = weight.shape
    head_dim = shape[0] // num_heads
    pairs = weight.reshape(num_heads, head_dim // 2, 2, *shape[1:])
    return pairs.swapaxes(1, 2).reshape(shape)


class GGUFTensors(Mapping[str, np.ndarray]):
    """The file's tensors under Hugging Face names and layouts, dequantized to float32 when read
    (`[out, in]` for linear weights, as HF stores them). Reads are independent (each returns a
    new array from the read-only memory map), so threads may read different tensors."""

    def __init__(self, reader: gguf.GGUFReader, config: LlamaConfig) -> None:
        self._reader, self._config = reader, config
        self._permuted = _field(reader, "general.architecture") in _PERMUTED_ARCHITECTURES
        self._tensors: dict[str, Any] = {}
        for tensor in reader.tensors:
            if tensor.name == "rope_freqs.weight":
                continue  # RoPE frequency factors: `rope_factors`, not a weight of the model
            self._tensors[self._hf_name(tensor.name)] = tensor

    def _hf_name(self, name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        match = _LAYER_TENSOR.fullmatch(name)
        if match is None or match[2] not in _LAYER_NAMES:
            raise ValueError(
                f"{self._reader.data.filename}: tensor {name!r} has no place in a Llama"
            )
        return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{match[3]}"

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:  # Mapping's would dequantize the tensor
        return name in self._tensors

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = [kind.name for kind in SUPPORTED_TENSOR_TYPES]
            raise ValueError(
                f"{self._reader.data.filename}: tensor {tensor.name} has type "
                f"{tensor.tensor_type.name}; supported: {supported}"
            )
        value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        value = value.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # ggml: inner first
        if not self._permuted:
            return value
        if ".self_attn.q_proj." in name:
            value = _unpermute_rotary(value, self._config.num_heads)
        elif ".self_attn.k_proj." in name:
            value = _unpermute_rotary(value, self._config.num_kv_heads)
        return value


def rope_factors(reader: gguf.GGUFReader, config: LlamaConfig) -> np.ndarray | None:
    """float32[head_dim // 2] inverse frequencies divided by the file's `rope_freqs` factors
    (Llama 3's long-context scaling as llama.cpp stores it), or None without them."""
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    factors = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64).ravel()
    dim = config.head_dim
    base = rope_frequencies(config).astype(np.float64)  # a linear scaling stays on top
    if factors.shape != base.shape:
        raise ValueError(
            f"{reader.data.filename}: rope_freqs has {factors.size} factors; head_dim={dim} "
            f"needs {base.size}"
        )
    return (base / factors).astype(np.float32)


def load_gguf_checkpoint(
    path: str | Path, *, dtype=jnp.bfloat16, mesh=None, reader: gguf.GGUFReader | None = None
) -> Llama:
    """A `Llama` with the GGUF file's weights dequantized and cast to `dtype`; its config (from
    the metadata, EOS tokens included) travels with it.

    Args:
        mesh: tensor parallelism, as `load_hf_checkpoint`'s.
        reader: the file already opened by `open_gguf` (a tokenizer reads the same file).

    Raises:
        ValueError: a missing or unreadable file, an unsupported architecture, option or tensor
            type, or a missing or misshapen tensor, naming the file.
    """
    reader = open_gguf(path) if reader is None else reader
    config = gguf_config(reader)
    tensors = GGUFTensors(reader, config)
    inv_freq = rope_factors(reader, config)
    return build_model(config, tensors, dtype=dtype, mesh=mesh, source=path, inv_freq=inv_freq)
