"""Page-table functions against a plain Python walk, inside jit (one trace per shape)."""

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.runtime.page_table import slot_mapping, token_positions, token_sequences

TPB = 4


def layout():
    """Three live sequences (decode, chunk over a prefix, whole prompt) and one padding one."""
    q_lens, kv_lens = [1, 3, 5], [6, 9, 5]
    cu = np.array([0, 1, 4, 9, 77], np.int32)  # garbage past num_seqs
    table = np.array(
        [[3, 7, 0, 0], [2, 5, 9, 0], [4, 8, 0, 0], [99, 99, 99, 99]], np.int32
    )  # the padding row is garbage too
    return q_lens, np.array([*kv_lens, 123], np.int32), cu, table


def expected_slots(q_lens, kv_lens, cu, table, num_tokens):
    seqs, positions, slots = [-1] * num_tokens, [0] * num_tokens, [0] * num_tokens
    for s, q_len in enumerate(q_lens):
        for r in range(q_len):
            t = cu[s] + r
            position = kv_lens[s] - q_len + r
            seqs[t], positions[t] = s, position
            slots[t] = table[s, position // TPB] * TPB + position % TPB
    return seqs, positions, slots


def test_sequences_positions_and_slots_of_a_mixed_batch():
    q_lens, kv_lens, cu, table = layout()
    num_tokens = 12  # 9 live tokens, 3 padding
    args = (jnp.asarray(cu), jnp.asarray(kv_lens), jnp.array([3], jnp.int32))
    seqs, positions, slots = expected_slots(q_lens, kv_lens, cu, table, num_tokens)
    assert token_sequences(args[0], args[2], num_tokens).tolist() == seqs
    assert token_positions(*args, num_tokens).tolist() == positions
    jitted = jax.jit(slot_mapping, static_argnums=(4, 5))
    got = jitted(jnp.asarray(table), *args, num_tokens, TPB)
    assert got.tolist() == slots
    assert got.dtype == jnp.int32 and got[-3:].tolist() == [0, 0, 0]  # padding -> NULL_PAGE
    # Fewer live sequences: the same shapes, no retrace, and their tokens become padding.
    got = jitted(jnp.asarray(table), args[0], args[1], jnp.array([1], jnp.int32), num_tokens, TPB)
    assert got.tolist() == [slots[0]] + [0] * (num_tokens - 1)
    assert jitted._cache_size() == 1


def test_positions_outside_the_table_write_only_to_the_null_page():
    table = jnp.array([[3, 7]], jnp.int32)  # room for 8 tokens
    cu = jnp.array([0, 3], jnp.int32)
    num_seqs = jnp.array([1], jnp.int32)
    # kv_len 10 puts the tokens at positions 7, 8, 9: only the first fits the table.
    assert slot_mapping(table, cu, jnp.array([10], jnp.int32), num_seqs, 3, TPB).tolist() == [
        7 * TPB + 3, 0, 0,
    ]  # fmt: skip
    # kv_len 1 < q_len 3 gives negative positions: never the table's last column.
    assert slot_mapping(table, cu, jnp.array([1], jnp.int32), num_seqs, 3, TPB).tolist() == [
        0, 0, 3 * TPB,
    ]  # fmt: skip
