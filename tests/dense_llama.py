"""The Llama forward in plain jnp with full causal attention and no paging: the reference the paged
model is checked against. Reads the NNX model's parameters; float32 throughout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.llama import Llama


def _rms_norm(x, scale, eps):
    x = x.astype(jnp.float32)
    return x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)) * scale


def _linear(x, module):
    out = x @ module.kernel.get_value().astype(jnp.float32)
    return out if module.bias is None else out + module.bias.get_value().astype(jnp.float32)


def dense_logits(model: Llama, tokens, embeddings=None, embedding_mask=None) -> np.ndarray:
    """f32[len(tokens), vocab]: logits at every position of one sequence."""
    return np.asarray(dense_logits_jnp(model, tokens, embeddings, embedding_mask))


def dense_greedy(model: Llama, prompt, num_tokens: int, padded_length: int = 64) -> list[int]:
    """Greedy continuation of one prompt by the dense forward (jitted once per model and
    `padded_length`: causal attention leaves a row unaffected by the padding after it)."""
    forward = _jitted_forward(model, padded_length)
    tokens = [int(t) for t in prompt]
    for _ in range(num_tokens):
        if len(tokens) > padded_length:
            raise ValueError(f"{len(tokens)} tokens exceed padded_length={padded_length}")
        padded = np.zeros(padded_length, np.int32)
        padded[: len(tokens)] = tokens
        tokens.append(int(np.argmax(np.asarray(forward(padded)[len(tokens) - 1]))))
    return tokens[len(prompt) :]


@functools.cache
def _jitted_forward(model: Llama, padded_length: int):
    return jax.jit(lambda tokens: dense_logits_jnp(model, tokens))


def dense_logits_jnp(model: Llama, tokens, embeddings=None, embedding_mask=None):
    c = model.config
    tokens = jnp.asarray(tokens, jnp.int32)
    length = tokens.shape[0]
    positions = jnp.arange(length, dtype=jnp.int32)
    x = model.embed_tokens.embedding.get_value().astype(jnp.float32)[tokens]
    if embeddings is not None:
        x = jnp.where(jnp.asarray(embedding_mask)[:, None], jnp.asarray(embeddings, x.dtype), x)
    causal = jnp.tril(jnp.ones((length, length), bool))
    windowed = causal
    if c.sliding_window is not None:  # each position sees its last `sliding_window` ones
        windowed = causal & ~jnp.tril(jnp.ones((length, length), bool), -c.sliding_window)
    inv_freq = _inverse_frequencies(c)
    group = c.num_heads // c.num_kv_heads
    for index, window in enumerate(c.layer_windows):
        layer = model.layer(index)
        mask = causal if window is None else windowed
        attn = layer.self_attn
        h = _rms_norm(x, layer.input_layernorm.scale.get_value(), c.rms_norm_eps)
        q = _linear(h, attn.q_proj).reshape(length, c.num_heads, c.head_dim)
        k = _linear(h, attn.k_proj).reshape(length, c.num_kv_heads, c.head_dim)
        v = _linear(h, attn.v_proj).reshape(length, c.num_kv_heads, c.head_dim)
        q = _rope(q, positions, inv_freq)
        k = jnp.repeat(_rope(k, positions, inv_freq), group, axis=1)
        v = jnp.repeat(v, group, axis=1)
        scores = jnp.einsum("qhd,khd->hqk", q, k) * c.head_dim**-0.5
        weights = jax_softmax(jnp.where(mask[None], scores, -jnp.inf))
        out = jnp.einsum("hqk,khd->qhd", weights, v).reshape(length, -1)
        x = x + _linear(out, attn.o_proj)
        h = _rms_norm(x, layer.post_attention_layernorm.scale.get_value(), c.rms_norm_eps)
        mlp = layer.mlp
        x = x + _linear(
            jnp.asarray(_silu(_linear(h, mlp.gate_proj))) * _linear(h, mlp.up_proj), mlp.down_proj
        )
    x = _rms_norm(x, model.norm.scale.get_value(), c.rms_norm_eps)
    if model.lm_head is None:
        return x @ model.embed_tokens.embedding.get_value().astype(jnp.float32).T
    return _linear(x, model.lm_head)


def jax_softmax(scores):
    scores = scores - jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _silu(x):
    return x / (1 + jnp.exp(-x))


def _rope(x, positions, inv_freq):
    """Rotate-half RoPE written out: pairs (i, i + d/2) turn by position * inv_freq[i]."""
    half = x.shape[-1] // 2
    angle = positions[:, None, None].astype(jnp.float32) * inv_freq[None, None, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate(
        [first * jnp.cos(angle) - second * jnp.sin(angle),
         second * jnp.cos(angle) + first * jnp.sin(angle)], axis=-1,
    )  # fmt: skip


def _inverse_frequencies(config):
    """Hugging Face's `_compute_llama3_parameters`, in float32 like it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if config.rope_scaling is None:
        return jnp.asarray(inv_freq)
    s = dict(config.rope_scaling)
    old = s["original_max_position_embeddings"]
    low_wavelen = old / s["low_freq_factor"]
    high_wavelen = old / s["high_freq_factor"]
    wavelen = 2 * np.pi / inv_freq
    llama = np.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * llama / s["factor"] + smooth * llama
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.asarray(np.where(medium, smoothed, llama), jnp.float32)
