"""The modules of one decoder layer of the Llama family: RoPE, RMSNorm (Llama's and Gemma's
`1 + w`), attention projections with an optional per-head QK norm, the gated MLP, and the layer
that joins them (Llama's pre-norms, or Gemma's sandwich of pre- and post-norms)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig

__all__ = ["MLP", "Attention", "DecoderLayer", "RMSNorm", "apply_rope", "make_norm"]


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in Hugging Face's half-split layout.

    Args:
        x: [tokens, heads, head_dim]; positions: int32[tokens]; inv_freq: f32[head_dim // 2].
    """
    angles = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # [tokens, head_dim/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Hugging Face's order: normalize in float32, cast back to the input dtype, then scale;
    with `offset` (Gemma's), scale by `1 + w` in float32, then cast."""

    def __init__(self, size: int, *, epsilon: float, dtype, offset: bool = False) -> None:
        self.scale = nnx.Param((jnp.zeros if offset else jnp.ones)((size,), dtype))
        self.epsilon = epsilon
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        if self.offset:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...] * normed.astype(x.dtype)


def make_norm(config: LlamaConfig, size: int, dtype) -> RMSNorm:
    return RMSNorm(size, epsilon=config.rms_norm_eps, dtype=dtype, offset=config.norm_offset)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs) -> None:
        hidden, head_dim = config.hidden_size, config.head_dim

        def linear(in_features, out_features, use_bias):
            return nnx.Linear(
                in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=dtype,
                rngs=rngs,
            )  # fmt: skip

        self.q_proj = linear(hidden, config.num_heads * head_dim, config.qkv_bias)
        self.k_proj = linear(hidden, config.num_kv_heads * head_dim, config.qkv_bias)
        self.v_proj = linear(hidden, config.num_kv_heads * head_dim, config.qkv_bias)
        self.o_proj = linear(config.num_heads * head_dim, hidden, config.o_bias)
        self.q_norm = self.k_norm = nnx.data(None)
        if config.qk_norm:  # Gemma 3: each head's queries and keys normalized before RoPE
            self.q_norm = make_norm(config, head_dim, dtype)
            self.k_norm = make_norm(config, head_dim, dtype)
        self.config = config


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs) -> None:
        hidden, inner = config.hidden_size, config.intermediate_size
        kwargs = {"use_bias": False, "dtype": dtype, "param_dtype": dtype, "rngs": rngs}
        self.gate_proj = nnx.Linear(hidden, inner, **kwargs)
        self.up_proj = nnx.Linear(hidden, inner, **kwargs)
        self.down_proj = nnx.Linear(inner, hidden, **kwargs)
        self.hidden_act = config.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.gate_proj(x)
        # Gemma's gelu_pytorch_tanh is the tanh approximation of GELU.
        gate = jax.nn.silu(gate) if self.hidden_act == "silu" else jax.nn.gelu(gate, True)
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs) -> None:
        size = config.hidden_size
        self.input_layernorm = make_norm(config, size, dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        # Llama: the norm before the MLP; Gemma (sandwich): the norm of the attention output.
        self.post_attention_layernorm = make_norm(config, size, dtype)
        self.pre_feedforward_layernorm = self.post_feedforward_layernorm = nnx.data(None)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(config, size, dtype)
            self.post_feedforward_layernorm = make_norm(config, size, dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def attention_output(self, x: jax.Array, attended: jax.Array) -> jax.Array:
        """The residual stream after attention ([tokens, hidden]), then after the MLP."""
        out = self.self_attn.o_proj(attended.astype(x.dtype))
        if self.pre_feedforward_layernorm is None:
            x = x + out
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(out)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
