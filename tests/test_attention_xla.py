"""The XLA attention path loops over chunks of table columns up to the longest context: it
matches the dense reference that gathers every column, across several chunks."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention_reference import dense_paged_attention
from kernels.attention_xla import context_paged_attention


@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_chunked_loop_matches_the_dense_reference_over_many_chunks(soft_cap):
    rng = np.random.default_rng(0)
    pages, layers, kv_heads, tpb, head_dim, q_heads = 80, 2, 2, 4, 8, 4
    pool = jnp.asarray(rng.normal(size=(pages, layers, 2, kv_heads, tpb, head_dim)), jnp.float32)
    width = 75  # 300 keys: three chunks of 128 keys (32 columns of 4)
    tables = jnp.asarray(rng.integers(1, pages, size=(6, width)), jnp.int32)
    kv_lens = jnp.asarray([0, 5, 128, 129, 300, 260], jnp.int32)
    positions = jnp.asarray([0, 4, 127, 60, 299, 200], jnp.int32)  # causal cuts mid-chunk
    q = jnp.asarray(rng.normal(size=(6, q_heads, head_dim)), jnp.float32)
    args = (q, pool, tables, kv_lens, positions)
    options = {"layer": 1, "sm_scale": 0.3, "soft_cap": soft_cap}
    expected = np.asarray(dense_paged_attention(*args, **options))
    got = np.asarray(context_paged_attention(*args, **options))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    assert not np.any(got[0])  # a row that sees no key gives zeros
