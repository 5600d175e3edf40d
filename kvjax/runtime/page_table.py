"""Pure jnp functions from a step's ragged layout to per-token positions and KV slots.

A step's new tokens are concatenated: sequence s owns token rows `cu_q_lens[s]:cu_q_lens[s + 1]`
(only the first `num_seqs` sequences are live) and has `kv_lens[s]` keys once the step's tokens are
written, so its token r sits at position `kv_lens[s] - q_len + r`. No Python branch on values and
no host sync: everything traces once per shape. Padding tokens (past `cu_q_lens[num_seqs]`) get
position 0 and a slot in `NULL_PAGE`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.cache.pages import NULL_PAGE

__all__ = ["slot_mapping", "token_positions", "token_sequences"]


def token_sequences(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int) -> jax.Array:
    """int32[num_tokens]: the sequence of each token row, -1 for padding rows.

    Args:
        cu_q_lens: int32[seqs + 1]; entries past `num_seqs` may be garbage.
        num_seqs: int32[1] live sequences.
        num_tokens: static padded token count.
    """
    seqs = cu_q_lens.shape[0] - 1
    ends = jnp.where(jnp.arange(seqs) < num_seqs[0], cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(ends, token, side="right").astype(jnp.int32)
    live = token < cu_q_lens[num_seqs[0]]
    return jnp.where(live, seq, -1)


def token_positions(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_tokens: int
) -> jax.Array:
    """int32[num_tokens]: the position of each new token in its sequence (0 for padding)."""
    seq = token_sequences(cu_q_lens, num_seqs, num_tokens)
    safe = jnp.maximum(seq, 0)
    start, end = cu_q_lens[safe], cu_q_lens[safe + 1]
    position = kv_lens[safe] - (end - start) + jnp.arange(num_tokens, dtype=jnp.int32) - start
    return jnp.where(seq >= 0, position, 0)


def slot_mapping(
    page_table: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    num_seqs: jax.Array,
    num_tokens: int,
    tokens_per_block: int,
) -> jax.Array:
    """int32[num_tokens]: `page_id * tokens_per_block + offset` of each new token's K/V.

    Padding tokens map into `NULL_PAGE` (slot 0), the scratch page nobody reads.

    Args:
        page_table: int32[seqs, max_blocks].
    """
    seq = token_sequences(cu_q_lens, num_seqs, num_tokens)
    position = token_positions(cu_q_lens, kv_lens, num_seqs, num_tokens)
    # A position outside the table (kv_len < q_len, or past max_blocks) must not land in some
    # other block of the sequence: it goes to the null page like padding.
    inside = (seq >= 0) & (position >= 0) & (position < page_table.shape[1] * tokens_per_block)
    block = jnp.clip(position // tokens_per_block, 0, page_table.shape[1] - 1)
    page = page_table[jnp.maximum(seq, 0), block]
    slot = page * tokens_per_block + position % tokens_per_block
    return jnp.where(inside, slot, NULL_PAGE * tokens_per_block)
