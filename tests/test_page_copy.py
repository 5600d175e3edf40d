"""Page copy, gather and scatter: both implementations against NumPy, bit for bit."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels.common import NULL_PAGE
from kernels.page_copy import copy_pages, gather_pages, scatter_pages
from tests.bits import assert_same_bytes, padded_ids, random_bits
from tests.gpu_lowering import lower_for_gpu

PAGE_SHAPE = (2, 2, 2, 4, 8)  # num_layers, K/V, num_kv_heads, tokens_per_block, head_dim
DTYPES = [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)]
IMPLS = ["pallas", "xla"]


def random_pages(rng, num_pages, dtype):
    return random_bits(rng, (num_pages, *PAGE_SHAPE), dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_valid", [1, 5, 7])
def test_copy_pages_is_a_parallel_copy_of_the_valid_entries(dtype, num_valid, impl, interpret):
    rng = np.random.default_rng(num_valid)
    pool = random_pages(rng, 16, dtype)
    pages = rng.permutation(np.arange(1, 16))  # a batch never reads a page it writes
    src, dst = pages[:num_valid], pages[num_valid : 2 * num_valid]
    src[0] = NULL_PAGE  # reading the null page is allowed
    expected = pool.copy()
    expected[dst] = pool[src]
    padding = [NULL_PAGE, 15, 3, 9, 1, 2, 4]
    out = copy_pages(
        jnp.asarray(pool),
        padded_ids(src, 8, padding),
        padded_ids(dst, 8, padding),
        num_valid,
        impl=impl,
        interpret=interpret,
    )
    assert_same_bytes(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_valid", [1, 3, 4])
def test_gather_pages_reads_the_valid_entries(dtype, num_valid, impl, interpret):
    rng = np.random.default_rng(num_valid)
    pool = random_pages(rng, 8, dtype)
    ids = rng.permutation(8)[:num_valid]
    staging = gather_pages(
        jnp.asarray(pool),
        padded_ids(ids, 4, [5, 6, 7]),
        np.int32(num_valid),
        impl=impl,
        interpret=interpret,
    )
    assert staging.shape == (4, *PAGE_SHAPE)
    assert_same_bytes(np.asarray(staging)[:num_valid], pool[ids])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_valid", [1, 3, 4])
def test_scatter_pages_writes_only_the_valid_entries(dtype, num_valid, impl, interpret):
    rng = np.random.default_rng(num_valid)
    pool = random_pages(rng, 8, dtype)
    staging = random_pages(rng, 4, dtype)
    ids = rng.permutation(np.arange(1, 8))[:num_valid]
    expected = pool.copy()
    expected[ids] = staging[:num_valid]
    padding = [NULL_PAGE, 7, 2]
    out = scatter_pages(
        jnp.asarray(pool),
        jnp.asarray(staging),
        padded_ids(ids, 4, padding),
        np.int32(num_valid),
        impl=impl,
        interpret=interpret,
    )
    assert_same_bytes(out, expected)


def test_ops_refuse_mismatched_shapes():
    pool = jnp.zeros((4, *PAGE_SHAPE), jnp.float32)
    ids = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match=r"src \[2\] and dst \[4\] differ in length"):
        copy_pages(pool, ids, np.zeros(4, np.int32), 1)
    with pytest.raises(ValueError, match="int32"):
        copy_pages(pool, ids.astype(np.float32), ids, 1)
    with pytest.raises(ValueError, match="impl='triton' must be one of"):
        copy_pages(pool, ids, ids, 1, impl="triton")
    with pytest.raises(ValueError, match="staging"):
        scatter_pages(pool, jnp.zeros((4, *PAGE_SHAPE), jnp.float32), ids, 1)


def pool_sized_copies(compiled_text, shape):
    pool_type = f"f32[{','.join(map(str, shape))}]"
    return [line for line in compiled_text.splitlines() if pool_type in line and " copy(" in line]


def donating_op(op, shape, impl, interpret=None):
    """The jitted op, its undonated twin and abstract arguments for a pool of `shape`."""
    pool = jax.ShapeDtypeStruct(shape, jnp.float32)
    ids = jax.ShapeDtypeStruct((8,), jnp.int32)
    num_valid = jax.ShapeDtypeStruct((), jnp.int32)
    fn = {"copy_pages": copy_pages, "scatter_pages": scatter_pages}[op]
    if op == "copy_pages":
        args = (pool, ids, ids, num_valid)
    else:
        args = (pool, jax.ShapeDtypeStruct((8, *shape[1:]), jnp.float32), ids, num_valid)
    bound = functools.partial(fn.__wrapped__, impl=impl, interpret=interpret)
    return jax.jit(bound, donate_argnums=0), jax.jit(bound), args


@pytest.mark.parametrize("op", ["copy_pages", "scatter_pages"])
def test_xla_path_updates_the_donated_pool_in_place(op):
    shape = (64, 2, 2, 2, 16, 64)
    donated, undonated, args = donating_op(op, shape, "xla")
    text = donated.lower(*args).compile().as_text()
    assert "input_output_alias" in text
    assert pool_sized_copies(text, shape) == []
    # The same op without donation must fail both checks, or the checks prove nothing.
    text = undonated.lower(*args).compile().as_text()
    assert "input_output_alias" not in text
    assert pool_sized_copies(text, shape) != []


@pytest.mark.parametrize("op", ["copy_pages", "scatter_pages"])
def test_pallas_path_aliases_the_pool_for_the_gpu(op):
    """Without a GPU, XLA:GPU's copy insertion cannot run; the lowered module must at least alias
    the donated pool to the kernel's output (the -m gpu twin compiles and checks for copies)."""
    shape = (1024, 32, 2, 8, 16, 128)
    donated, _, args = donating_op(op, shape, "pallas", interpret=False)
    text = lower_for_gpu(donated, *args).as_text()
    assert "tf.aliasing_output = 0" in text
    assert "output_operand_aliases" in text


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["copy_pages", "scatter_pages"])
def test_pallas_path_compiles_without_pool_copies(op):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a CUDA device")
    shape = (256, 4, 2, 8, 16, 128)
    donated, _, args = donating_op(op, shape, "pallas", interpret=False)
    text = donated.lower(*args).compile().as_text()
    assert pool_sized_copies(text, shape) == []
