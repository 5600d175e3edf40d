"""In-kernel tile math shared by the paged attention kernels: scores, online softmax, masking.

Tiles are `[rows, tokens]` of float32 scores for `rows` query rows (query heads of one KV group,
times query positions) against one page of `tokens` keys. Triton's `dot` needs at least 16 rows
and 16 columns; smaller tiles (a decode group of 1 to 8 heads, pages of 8 tokens) use a
broadcast-multiply-reduce instead of padding the rows to 16, which would waste the tile.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["MASK_VALUE", "empty_state", "finish", "online_softmax_step", "page_scores"]

# A large finite negative: exp(MASK_VALUE - m) is 0 without inf - inf = NaN (as upstream does).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_MIN_DOT = 16


def _uses_dot(rows: int, cols: int, depth: int) -> bool:
    return rows >= _MIN_DOT and cols >= _MIN_DOT and depth >= _MIN_DOT


def page_scores(q, k, *, sm_scale: float, soft_cap: float | None, k_scale=None):
    """float32[rows, tokens] scores of q[rows, head_dim] against k[tokens, head_dim]; dequantized
    keys (fp8 cast to q's dtype, exact) come with `k_scale` f32[tokens], their rows' scales,
    applied to the scores' columns."""
    if _uses_dot(q.shape[0], k.shape[0], q.shape[1]):
        scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        scores = jnp.sum(
            q[:, None, :].astype(jnp.float32) * k[None, :, :].astype(jnp.float32), axis=-1
        )
    scores = scores * sm_scale if k_scale is None else scores * (k_scale * sm_scale)[None, :]
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    return scores


def _weighted_values(p, v):
    """float32[rows, head_dim] = p[rows, tokens] @ v[tokens, head_dim]."""
    if _uses_dot(p.shape[0], p.shape[1], v.shape[1]):
        return lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
    return jnp.sum(p[:, :, None] * v[None, :, :].astype(jnp.float32), axis=1)


def empty_state(rows: int, head_dim: int):
    """(running max, running sum, unnormalized output) before any key."""
    return (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )


def online_softmax_step(state, scores, visible, v, v_valid, v_scale=None):
    """Folds one page into the state.

    Args:
        state: (max float32[rows], sum float32[rows], out float32[rows, head_dim]).
        scores: float32[rows, tokens].
        visible: bool[rows, tokens], which keys each row may see.
        v: [tokens, head_dim] values of the page.
        v_valid: bool[tokens], keys inside the sequence; V past it is zeroed, so NaN in unused
            slots cannot reach the output through 0 * NaN.
        v_scale: f32[tokens] scales of dequantized values (fp8 cast to the compute dtype;
            None: not quantized); they weight the probabilities, so the values are only cast.
    """
    running_max, running_sum, out = state
    scores = jnp.where(visible, scores, MASK_VALUE)
    new_max = jnp.maximum(running_max, jnp.max(scores, axis=1))
    rescale = jnp.exp(running_max - new_max)
    p = jnp.where(visible, jnp.exp(scores - new_max[:, None]), 0.0)
    v = jnp.where(v_valid[:, None], v, jnp.zeros_like(v))
    weights = p if v_scale is None else p * jnp.where(v_valid, v_scale, 0.0)[None, :]
    out = out * rescale[:, None] + _weighted_values(weights, v)
    return new_max, running_sum * rescale + jnp.sum(p, axis=1), out


def finish(state):
    """Normalized float32[rows, head_dim]; rows that saw no key give 0."""
    _, running_sum, out = state
    return out / jnp.where(running_sum > 0, running_sum, 1.0)[:, None]
