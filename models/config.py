"""Configuration of the Llama family (Llama 2/3, Qwen2, Mistral) and its Hugging Face reading."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["SUPPORTED_MODEL_TYPES", "LlamaConfig", "rope_frequencies"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shapes and options of one model.

    `qkv_bias` is Qwen2's (and Llama's `attention_bias`) bias on q/k/v; `o_bias` Llama's bias on
    the output projection under `attention_bias`. `rope_scaling` is None or Llama 3's parameters
    as sorted `(name, value)` pairs (`factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings`), so the config stays hashable. `sliding_window`: the
    layers flagged in `windowed_layers` (default: all; Mistral's) attend to their last
    `sliding_window` positions, the token itself included; the others to all of them.
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

    def __post_init__(self) -> None:
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
        else:
            raise ValueError(f"rope_scaling={self.rope_scaling} is not supported (only llama3)")

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


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """float32[head_dim // 2] inverse frequencies, with Llama 3's long-context scaling if set."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if config.rope_scaling is not None:
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
