"""The Llama forward in plain jnp with full causal attention and no paging: the reference the paged
model is checked against. Reads the NNX model's parameters; float32 throughout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels.kv_quant import dequantize, quantize
from models.llama import Llama


def _rms_norm(x, scale, eps, offset=False):
    x = x.astype(jnp.float32)
    scale = 1.0 + scale if offset else scale  # Gemma's norms scale by 1 + w
    return x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)) * scale


def _norm(module, x, config):
    return _rms_norm(x, module.scale.get_value(), config.rms_norm_eps, config.norm_offset)


def _linear(x, module):
    out = x @ module.kernel.get_value().astype(jnp.float32)
    return out if module.bias is None else out + module.bias.get_value().astype(jnp.float32)


def dense_logits(model: Llama, tokens, embeddings=None, embedding_mask=None) -> np.ndarray:
    """f32[len(tokens), vocab]: logits at every position of one sequence."""
    return np.asarray(dense_logits_jnp(model, tokens, embeddings, embedding_mask))


def dense_greedy(
    model: Llama, prompt, num_tokens: int, padded_length: int = 64, kv_dtype=None
) -> list[int]:
    """Greedy continuation of one prompt by the dense forward (jitted once per model and
    `padded_length`: causal attention leaves a row unaffected by the padding after it);
    `kv_dtype` (fp8) quantizes K and V as fp8 pages store them."""
    forward = _jitted_forward(model, padded_length, kv_dtype)
    tokens = [int(t) for t in prompt]
    for _ in range(num_tokens):
        if len(tokens) > padded_length:
            raise ValueError(f"{len(tokens)} tokens exceed padded_length={padded_length}")
        padded = np.zeros(padded_length, np.int32)
        padded[: len(tokens)] = tokens
        tokens.append(int(np.argmax(np.asarray(forward(padded)[len(tokens) - 1]))))
    return tokens[len(prompt) :]


@functools.cache
def _jitted_forward(model: Llama, padded_length: int, kv_dtype=None):
    return jax.jit(lambda tokens: dense_logits_jnp(model, tokens, kv_dtype=kv_dtype))


def dense_logits_jnp(model: Llama, tokens, embeddings=None, embedding_mask=None, kv_dtype=None):
    """`kv_dtype` (an fp8 dtype): K and V each token row quantized and dequantized as
    `kernels.kv_quant` stores them in fp8 pages."""
    c = model.config
    tokens = jnp.asarray(tokens, jnp.int32)
    length = tokens.shape[0]
    positions = jnp.arange(length, dtype=jnp.int32)
    x = model.embed_tokens.embedding.get_value().astype(jnp.float32)[tokens]
    if c.embedding_scale:
        x = x * np.float32(np.sqrt(c.hidden_size))
    if embeddings is not None:
        x = jnp.where(jnp.asarray(embedding_mask)[:, None], jnp.asarray(embeddings, x.dtype), x)
    causal = jnp.tril(jnp.ones((length, length), bool))
    windowed = causal
    if c.sliding_window is not None:  # each position sees its last `sliding_window` ones
        windowed = causal & ~jnp.tril(jnp.ones((length, length), bool), -c.sliding_window)
    group = c.num_heads // c.num_kv_heads
    scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
    for index, window in enumerate(c.layer_windows):
        layer = model.layer(index)
        mask = causal if window is None else windowed
        inv_freq = _inverse_frequencies(c, local=window is not None)
        attn = layer.self_attn
        h = _norm(layer.input_layernorm, x, c)
        q = _linear(h, attn.q_proj).reshape(length, c.num_heads, c.head_dim)
        k = _linear(h, attn.k_proj).reshape(length, c.num_kv_heads, c.head_dim)
        v = _linear(h, attn.v_proj).reshape(length, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = _norm(attn.q_norm, q, c), _norm(attn.k_norm, k, c)
        q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
        if kv_dtype is not None:
            k, v = (dequantize(*quantize(x, kv_dtype)) for x in (k, v))
        k = jnp.repeat(k, group, axis=1)
        v = jnp.repeat(v, group, axis=1)
        scores = jnp.einsum("qhd,khd->hqk", q, k) * scale
        weights = jax_softmax(jnp.where(mask[None], scores, -jnp.inf))
        out = _linear(jnp.einsum("hqk,khd->qhd", weights, v).reshape(length, -1), attn.o_proj)
        if c.sandwich_norms:  # Gemma: the attention and MLP outputs are normalized too
            x = x + _norm(layer.post_attention_layernorm, out, c)
            h = _norm(layer.pre_feedforward_layernorm, x, c)
            x = x + _norm(layer.post_feedforward_layernorm, _mlp(layer.mlp, h, c), c)
        else:
            x = x + out
            x = x + _mlp(layer.mlp, _norm(layer.post_attention_layernorm, x, c), c)
    x = _norm(model.norm, x, c)
    if model.lm_head is None:
        return x @ model.embed_tokens.embedding.get_value().astype(jnp.float32).T
    return _linear(x, model.lm_head)


def jax_softmax(scores):
    scores = scores - jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def _silu(x):
    return x / (1 + jnp.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mlp(mlp, h, config):
    activation = _silu if config.hidden_act == "silu" else _gelu_tanh
    return _linear(activation(_linear(h, mlp.gate_proj)) * _linear(h, mlp.up_proj), mlp.down_proj)


def _rope(x, positions, inv_freq):
    """Rotate-half RoPE written out: pairs (i, i + d/2) turn by position * inv_freq[i]."""
    half = x.shape[-1] // 2
    angle = positions[:, None, None].astype(jnp.float32) * inv_freq[None, None, :]
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate(
        [first * jnp.cos(angle) - second * jnp.sin(angle),
         second * jnp.cos(angle) + first * jnp.sin(angle)], axis=-1,
    )  # fmt: skip


def _inverse_frequencies(config, local=False):
    """Hugging Face's `_compute_llama3_parameters` (or linear scaling), in float32 like it;
    `local`: Gemma's windowed layers, with their own base and no scaling."""
    dim = config.head_dim
    base = config.local_rope_theta if local and config.local_rope_theta else config.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if config.rope_scaling is None or (local and config.local_rope_theta):
        return jnp.asarray(inv_freq)
    if len(config.rope_scaling) == 1:
        return jnp.asarray(inv_freq / dict(config.rope_scaling)["factor"])
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
