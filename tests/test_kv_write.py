"""KV write: both paths store each token's K and V at its slot, bit for bit, and touch nothing else
(padding tokens write only into NULL_PAGE)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels.common import NULL_PAGE
from kernels.kv_write import write_kv
from tests.bits import random_bits

DTYPES = [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)]


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens_per_block", [8, 16])
def test_write_kv_stores_every_token_at_its_slot(impl, dtype, tokens_per_block, interpret):
    rng = np.random.default_rng(tokens_per_block)
    num_pages, num_layers, num_kv_heads, head_dim = 6, 3, 2, 64
    pool = random_bits(
        rng, (num_pages, num_layers, 2, num_kv_heads, tokens_per_block, head_dim), dtype
    )
    # Real tokens in random free slots of pages 1..5, then 3 padding tokens into NULL_PAGE.
    real = rng.permutation(np.arange(tokens_per_block, num_pages * tokens_per_block))[:9]
    slots = np.concatenate([real, [NULL_PAGE * tokens_per_block + i for i in (0, 1, 0)]]).astype(
        np.int32
    )
    k = random_bits(rng, (len(slots), num_kv_heads, head_dim), dtype)
    v = random_bits(rng, (len(slots), num_kv_heads, head_dim), dtype)
    expected = pool.copy()
    for token, slot in enumerate(real):
        page, offset = divmod(int(slot), tokens_per_block)
        expected[page, 2, 0, :, offset] = k[token]
        expected[page, 2, 1, :, offset] = v[token]
    out = write_kv(
        jnp.asarray(pool), jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots), layer=2,
        impl=impl, interpret=interpret,
    )  # fmt: skip
    out = np.asarray(out)
    assert out.dtype == dtype
    # Every page but NULL_PAGE is exactly as expected: written slots and untouched bytes alike.
    np.testing.assert_array_equal(out[1:].view(np.uint8), expected[1:].view(np.uint8))


def test_bad_inputs_name_the_shapes():
    pool = jnp.zeros((4, 2, 2, 2, 8, 64), jnp.float32)
    k = jnp.zeros((3, 2, 64), jnp.float32)
    slots = jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match=r"k bfloat16\[3, 2, 64\] must be float32\[3, 2, 64\]"):
        write_kv(pool, k.astype(jnp.bfloat16), k, slots, layer=0)
    with pytest.raises(ValueError, match=r"v float32\[3, 1, 64\]"):
        write_kv(pool, k, k[:, :1], slots, layer=0)
    with pytest.raises(ValueError, match="layer=2 is outside"):
        write_kv(pool, k, k, slots, layer=2)
    with pytest.raises(ValueError, match="slots"):
        write_kv(pool, k, k, slots.astype(jnp.float32), layer=0)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_slots_outside_the_pool_go_to_the_null_page(impl, interpret):
    rng = np.random.default_rng(1)
    pool = random_bits(rng, (3, 1, 2, 1, 8, 16), DTYPES[0])
    new = random_bits(rng, (3, 1, 16), DTYPES[0])
    slots = np.array([-1, 3 * 8, 9], np.int32)  # vLLM's -1 padding, one past the end, a real one
    out = np.asarray(
        write_kv(
            jnp.asarray(pool), jnp.asarray(new), jnp.asarray(new), jnp.asarray(slots), layer=0,
            impl=impl, interpret=interpret,
        )
    )  # fmt: skip
    expected = pool.copy()
    expected[1, 0, :, 0, 1] = new[2]
    np.testing.assert_array_equal(out[1:].view(np.uint8), expected[1:].view(np.uint8))
