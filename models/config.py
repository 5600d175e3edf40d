"""Configuration of the Llama family (Llama 2/3, Qwen2, Mistral, Gemma 3 text) and its Hugging
Face reading."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["SUPPORTED_MODEL_TYPES", "LlamaConfig", "rope_frequencies"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shapes and options of one model.

    `qkv_bias` is Qwen2's (and Llama's `attention_bias`) bias on q/k/v; `o_bias` Llama's bias on
    the output projection under `attention_bias`. `rope_scaling` is None or Llama 3's parameters
    as sorted `(name, value)` pairs (`factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`), so the config stays hashable. `sliding_window`: the
    layers flagged in `windowed_layers` (default: all; Mistral's) attend to their last
    `sliding_window` positions, the token itself included; the others to all of them.

    Gemma 3's options (defaults are Llama's): `norm_offset` scales norms by `1 + w` in float32;
    `sandwich_norms` normalizes the attention and MLP outputs too (pre- and post-feedforward
    norms); `qk_norm` normalizes each head's queries and keys; `embedding_scale` multiplies the
    embeddings by `sqrt(hidden_size)`; `query_pre_attn_scalar` sets the attention scale to its
    inverse square root (default `head_dim`); `local_rope_theta` is the RoPE base of windowed
    layers (default `rope_theta`; RoPE scaling then applies to the full-attention layers only);
    `hidden_act` is the MLP's gate activation.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()  # tokens that end generation (the engine's default)
    sliding_window: int | None = None
    windowed_layers: tuple[bool, ...] | None = None  # per layer; None: every layer
    hidden_act: str = "silu"
    norm_offset: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    embedding_scale: bool = False
    query_pre_attn_scalar: float | None = None
    local_rope_theta: float | None = None

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use {ACTIVATIONS}")
        if self.windowed_layers is not None:
            flags = tuple(bool(flag) for flag in self.windowed_layers)
            if len(flags) != self.num_layers:
                raise ValueError(
                    f"windowed_layers has {len(flags)} flags for num_layers={self.num_layers}"
                )
            object.__setattr__(self, "windowed_layers", flags)
        if self.sliding_window is not None and not (
            isinstance(self.sliding_window, int) and self.sliding_window >= 1
        ):
            raise ValueError(f"sliding_window={self.sliding_window!r} must be an int >= 1")
        eos = self.eos_token_ids
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in eos))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        scaling = dict(self.rope_scaling or {})
        kind = scaling.pop("rope_type", scaling.pop("type", None))
        scaling.pop("rope_theta", None)
        if kind is None and set(scaling) >= _LLAMA3_KEYS:
            kind = "llama3"  # already normalized (e.g. `dataclasses.replace` of a config)
        if kind in (None, "default") and not {"factor"} & set(scaling):
            object.__setattr__(self, "rope_scaling", None)
        elif kind == "llama3":
            object.__setattr__(self, "rope_scaling", tuple(sorted(scaling.items())))
        elif kind == "linear" or (kind is None and set(scaling) == {"factor"}):
            object.__setattr__(self, "rope_scaling", (("factor", float(scaling["factor"])),))
        else:
            raise ValueError(
                f"rope_scaling={self.rope_scaling} is not supported (only llama3 and linear)"
            )

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (None: full attention)."""
        flags = self.windowed_layers or (True,) * self.num_layers
        return tuple(self.sliding_window if flag else None for flag in flags)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face `config.json` dict (transformers 4 or 5 layout); raises naming an
        unsupported architecture or option."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if model_type == "gemma3_text":
            return cls.from_hf_gemma3(hf)
        for key, supported in (("hidden_act", "silu"), ("mlp_bias", False)):
            if hf.get(key, supported) != supported:
                raise ValueError(f"{key}={hf[key]!r} is not supported (only {supported!r})")
        rope = hf.get("rope_parameters") or {}  # transformers 5 moved the RoPE fields here
        num_heads = hf["num_attention_heads"]
        bias = hf.get("attention_bias", False)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=hf.get("rope_scaling") or rope or None,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bias,
            o_bias=model_type != "qwen2" and bias,
            eos_token_ids=hf.get("eos_token_id"),
            **_sliding_window(hf, model_type),
        )

    @classmethod
    def from_hf_gemma3(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Gemma 3's text model (`Gemma3ForCausalLM`): interleaved local and global layers,
        from `layer_types` or every `sliding_window_pattern`-th layer global."""
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise ValueError(f"{key}={hf[key]!r} is not supported (Gemma 2's; only None)")
        rope = hf.get("rope_parameters") or {}
        if "full_attention" in rope:  # transformers 5: RoPE per layer type
            full, local = rope["full_attention"], rope.get("sliding_attention", {})
        else:
            full = {
                "rope_theta": hf.get("rope_theta", 1_000_000.0),
                **(hf.get("rope_scaling") or {}),
            }
            local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
        num_layers = hf["num_hidden_layers"]
        if hf.get("layer_types") is None and hf.get("sliding_window") is not None:
            pattern = hf.get("sliding_window_pattern", 6)
            kinds = ("full_attention", "sliding_attention")
            hf = {**hf, "layer_types": [kinds[bool((i + 1) % pattern)] for i in range(num_layers)]}
        num_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim", 256), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=full.get("rope_theta", 1_000_000.0),
            rope_scaling={k: v for k, v in full.items() if k != "rope_theta"} or None,
            local_rope_theta=local.get("rope_theta", 10_000.0),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            qkv_bias=hf.get("attention_bias", False), o_bias=hf.get("attention_bias", False),
            eos_token_ids=hf.get("eos_token_id"),
            hidden_act=hf.get("hidden_activation", "gelu_pytorch_tanh"),
            norm_offset=True, sandwich_norms=True, qk_norm=True, embedding_scale=True,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            **_sliding_window({**hf, "use_sliding_window": True}, "gemma3_text"),
        )  # fmt: skip


def _sliding_window(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """`sliding_window` and `windowed_layers` from `layer_types`, or Qwen2's
    `max_window_layers` (layers from it on use the window)."""
    window = hf.get("sliding_window")
    if window is None or not hf.get("use_sliding_window", model_type != "qwen2"):
        return {}
    types = hf.get("layer_types")
    if types is not None:
        flags = tuple(kind == "sliding_attention" for kind in types)
    else:
        first = hf.get("max_window_layers", 0) if model_type == "qwen2" else 0
        flags = tuple(layer >= first for layer in range(hf["num_hidden_layers"]))
    if not any(flags):
        return {}
    return {"sliding_window": int(window), "windowed_layers": None if all(flags) else flags}


_LLAMA3_KEYS = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}


def rope_frequencies(config: LlamaConfig, *, local: bool = False) -> np.ndarray:
    """float32[head_dim // 2] inverse frequencies, with Llama 3's long-context scaling or a
    linear one if set; `local`: those of windowed layers (`local_rope_theta`, unscaled)."""
    dim = config.head_dim
    if local and config.local_rope_theta is not None:
        exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
        return (1.0 / config.local_rope_theta**exponents).astype(np.float32)
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if config.rope_scaling is not None and len(config.rope_scaling) == 1:  # linear
        inv_freq = inv_freq / dict(config.rope_scaling)["factor"]
    elif config.rope_scaling is not None:
        scaling = dict(config.rope_scaling)
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        inv_freq = np.where(medium, blended, scaled)
    return inv_freq.astype(np.float32)
