"""A plain jitted decode loop of a `models.llama.Llama`: one dense KV array per layer
`[batch, max_len, kv_heads, head_dim]`, no pages, no scheduler, greedy tokens. The reference the
engine's decode throughput is compared with (`benchmarks.bench_engine`)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import Llama, apply_rope

__all__ = ["dense_decode_tokens_per_second"]


def _decode_step(model: Llama, layers, cache, tokens, position):
    """One token per sequence at `position`: (next greedy tokens int32[batch], cache).
    `layers`: the model's layers as modules of their own (`Llama.layer`)."""
    config = model.config
    batch = tokens.shape[0]
    keys, values = cache
    x = model.embed_tokens(tokens)
    positions = jnp.full(batch, position, jnp.int32)
    visible = jnp.arange(keys.shape[2]) <= position
    group = config.num_heads // config.num_kv_heads
    new_keys, new_values = [], []
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = apply_rope(attn.q_proj(h).reshape(batch, config.num_heads, config.head_dim),
                       positions, model.inv_freq.get_value())  # fmt: skip
        k = apply_rope(attn.k_proj(h).reshape(batch, config.num_kv_heads, config.head_dim),
                       positions, model.inv_freq.get_value())  # fmt: skip
        v = attn.v_proj(h).reshape(batch, config.num_kv_heads, config.head_dim)
        layer_keys = jax.lax.dynamic_update_slice_in_dim(keys[index], k[:, None], position, 1)
        layer_values = jax.lax.dynamic_update_slice_in_dim(values[index], v[:, None], position, 1)
        new_keys.append(layer_keys)
        new_values.append(layer_values)
        grouped = q.reshape(batch, config.num_kv_heads, group, config.head_dim)
        scores = jnp.einsum("bhgd,bthd->bhgt", grouped, layer_keys) * config.head_dim**-0.5
        weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
        out = jnp.einsum("bhgt,bthd->bhgd", weights, layer_values).reshape(batch, -1)
        x = x + attn.o_proj(out.astype(x.dtype))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = model.logits(x)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), (jnp.stack(new_keys),
                                                           jnp.stack(new_values))  # fmt: skip


def dense_decode_tokens_per_second(model: Llama, batch: int, context: int, steps: int) -> float:
    """Greedy decode tokens/s of `batch` sequences from position `context` for `steps` steps
    (the cache before `context` is zeros: the cost of attention is the same)."""
    config = model.config
    graphdef, state = nnx.split(model)
    # Each layer's arrays sliced out of the stack once, here, not inside every step.
    layers = [nnx.split(model.layer(index)) for index in range(config.num_layers)]
    layer_graph, layer_states = layers[0][0], [layer_state for _, layer_state in layers]
    max_len = context + steps + 1
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    cache = (jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))

    def step(state, layer_states, cache, tokens, position):
        layers = [nnx.merge(layer_graph, layer_state) for layer_state in layer_states]
        return _decode_step(nnx.merge(graphdef, state), layers, cache, tokens, position)

    step = jax.jit(step, donate_argnums=2)
    tokens = jnp.zeros(batch, jnp.int32)
    tokens, cache = step(state, layer_states, cache, tokens, jnp.int32(context))  # compiles
    jax.block_until_ready(tokens)
    start = time.perf_counter()
    for offset in range(1, steps + 1):
        tokens, cache = step(state, layer_states, cache, tokens, jnp.int32(context + offset))
        np.asarray(tokens)  # the host reads every step's tokens, as a server must
    return batch * steps / (time.perf_counter() - start)
