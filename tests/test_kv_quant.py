"""fp8 KV pages: the row quantization, the KV write into a `QuantizedPool`, and paged attention
over fp8 pages against float64 goldens (Pallas in interpret mode, compiled under -m gpu, and the
XLA path)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels.common import check_byte_array_size
from kernels.kv_quant import SCALE_DTYPE, QuantizedPool, dequantize, quantize
from kernels.kv_write import write_kv
from kernels.paged_attention import paged_decode_attention
from kernels.ragged_paged_attention import ragged_paged_attention
from tests.attention_cases import golden_attention, paged_batch, relative_error, sequence_kv

E4M3, E5M2 = np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
# Unit roundoff, half an ulp relative to the value: 3 and 2 mantissa bits.
UNIT_ROUNDOFF = {E4M3: 2.0**-4, E5M2: 2.0**-3}


def quantized_pool(pool: np.ndarray, dtype) -> QuantizedPool:
    """A `QuantizedPool` of a float pool; NaN rows (bytes no kernel may read) stay NaN."""
    return QuantizedPool.of(*quantize(jnp.asarray(pool), dtype))


def host(array) -> np.ndarray:
    return np.asarray(jnp.asarray(array, jnp.float32))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_rows_round_to_nearest_with_the_smallest_scale_that_cannot_overflow(dtype):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 64)).astype(np.float32)
    rows *= np.float32(10.0) ** rng.integers(-30, 30, (64, 1))  # every magnitude
    rows[0] = 0.0
    rows[1] = FP8_MAX[dtype] * 3.0  # a ratio that is exactly a bfloat16
    rows[2, 5] = -1e38  # near float32's largest
    values, scales = quantize(jnp.asarray(rows), dtype)
    assert values.dtype == dtype and scales.dtype == SCALE_DTYPE
    values, scales = host(values), host(scales)
    ratio = np.abs(rows).max(axis=1) / FP8_MAX[dtype]
    # Never below the ratio (up to the float32 rounding of the ratio itself), at most one
    # bfloat16 step (2**-7) above it.
    assert np.all(scales >= ratio * (1 - 2**-23))
    big = ratio > 2.0**-120
    assert np.all(scales[big] <= ratio[big] * (1 + 2**-7) * (1 + 2**-23))
    assert np.all(np.abs(values) <= FP8_MAX[dtype]) and not np.isnan(values).any()
    expected = np.clip(rows / scales[:, None], -FP8_MAX[dtype], FP8_MAX[dtype]).astype(dtype)
    np.testing.assert_array_equal(values, expected.astype(np.float32))
    restored = values * scales[:, None]
    bound = UNIT_ROUNDOFF[dtype] * np.abs(rows).max(axis=1, keepdims=True)
    assert np.all(np.abs(restored - rows) <= bound)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_write_kv_quantizes_each_row_independently(impl, dtype, interpret):
    rng = np.random.default_rng(1)
    shape = (5, 2, 2, 2, 8, 32)  # pages, layers, K/V, kv_heads, tokens_per_block, head_dim
    pool = QuantizedPool.zeros(shape, dtype)
    k = rng.standard_normal((6, 2, 32)).astype(np.float32) * [[1.0], [300.0]]
    v = rng.standard_normal((6, 2, 32)).astype(np.float32)
    slots = np.array([8, 9, 10, 17, 30, -1], np.int32)  # page 1, page 2, page 3, padding
    write = jax.jit(write_kv, static_argnames=("layer", "impl", "interpret"), donate_argnums=0)

    def run(pool, order):
        new = (jnp.asarray(k[order]), jnp.asarray(v[order]), jnp.asarray(slots[order]))
        return write(pool, *new, layer=1, impl=impl, interpret=interpret)

    together = run(pool, np.arange(6))
    # The same rows written one at a time, in reverse: the bytes do not depend on the order.
    pool = QuantizedPool.zeros(shape, dtype)
    for token in reversed(range(5)):
        pool = run(pool, np.array([token]))
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(pool), strict=True):
        np.testing.assert_array_equal(host(a)[1:], host(b)[1:])  # page 0 is the null page
    for kind, new in ((0, k), (1, v)):
        values, scales = quantize(jnp.asarray(new[:5]), dtype)
        pages, offsets = slots[:5] // 8, slots[:5] % 8
        np.testing.assert_array_equal(
            host(together.fp8_values[pages, 1, kind, :, offsets]), host(values)
        )
        np.testing.assert_array_equal(
            host(together.scales[pages, 1, kind, :, offsets]), host(scales)
        )
    assert not host(together.fp8_values[1:, 0]).any()  # layer 0 untouched


def attention_case(rng, dtype, tokens_per_block=8, head_dim=64):
    lengths = [1, tokens_per_block + 1, 5 * tokens_per_block, 0]
    batch = paged_batch(
        rng, lengths, num_layers=2, num_kv_heads=2, tokens_per_block=tokens_per_block,
        head_dim=head_dim, dtype=np.float32, max_blocks=6,
    )  # fmt: skip
    pool = quantized_pool(batch.pool, dtype)
    dequantized = dataclasses.replace(batch, pool=host(dequantize(pool.fp8_values, pool.scales)))
    return batch, dequantized, pool


def golden_decode(batch, q, layer, sm_scale):
    out = np.zeros(q.shape, np.float64)
    group = q.shape[1] // batch.pool.shape[3]
    for seq in range(q.shape[0]):
        if not batch.kv_lens[seq]:
            continue
        for head in range(batch.pool.shape[3]):
            keys, values = sequence_kv(batch, seq, layer, head)
            rows = slice(head * group, (head + 1) * group)
            out[seq, rows] = golden_attention(q[seq, rows], keys, values, sm_scale=sm_scale)
    return out


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("group", [2, 16])  # broadcast tiles, and the dot path
def test_decode_attention_over_fp8_pages(impl, dtype, group, interpret):
    """Against the float64 golden on the dequantized pages: the kernel's own error (float32
    tolerance). Against the golden on the original pages: the format's, within its unit
    roundoff (each K/V element is off by at most that relative to its row's largest value, and
    the output is a weighted mean of V rows whose weights the K error perturbs alike)."""
    rng = np.random.default_rng(2)
    batch, dequantized, pool = attention_case(rng, dtype)
    q = rng.standard_normal((4, 2 * group, 64)).astype(np.float32)
    out = paged_decode_attention(
        jnp.asarray(q), pool, jnp.asarray(batch.page_table), jnp.asarray(batch.kv_lens),
        layer=1, sm_scale=0.125, impl=impl, interpret=interpret,
    )  # fmt: skip
    live = batch.kv_lens > 0
    own = golden_decode(dequantized, q, 1, 0.125)
    assert relative_error(out[live], own[live]) < 1e-5
    original = golden_decode(batch, q, 1, 0.125)
    error = relative_error(out[live], original[live])
    print(f"{dtype.name} group {group}: relative error {error:.4f}")
    assert error < UNIT_ROUNDOFF[dtype], error
    assert error > 1e-4  # the pages really are fp8


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_ragged_attention_over_fp8_pages(impl, dtype, interpret):
    rng = np.random.default_rng(3)
    batch, dequantized, pool = attention_case(rng, dtype)
    q_lens = np.array([1, 5, 17, 0])
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((24, 8, 64)).astype(np.float32)  # 23 rows, one of padding
    out = ragged_paged_attention(
        jnp.asarray(q), pool, jnp.asarray(batch.page_table), jnp.asarray(batch.kv_lens),
        jnp.asarray(cu_q_lens), jnp.asarray([3], np.int32), layer=0, sm_scale=0.125,
        impl=impl, interpret=interpret,
    )  # fmt: skip
    for golden_batch, bound in ((dequantized, 1e-5), (batch, UNIT_ROUNDOFF[dtype])):
        expected = np.zeros(q.shape)
        for seq, q_len in enumerate(q_lens):
            kv_len = int(batch.kv_lens[seq])
            for head in range(2):
                keys, values = sequence_kv(golden_batch, seq, 0, head)
                for row in range(cu_q_lens[seq], cu_q_lens[seq + 1]):
                    position = kv_len - q_len + row - cu_q_lens[seq]
                    expected[row, head * 4 : head * 4 + 4] = golden_attention(
                        q[row, head * 4 : head * 4 + 4], keys[: position + 1],
                        values[: position + 1], sm_scale=0.125,
                    )  # fmt: skip
        assert relative_error(out[:23], expected[:23]) < bound


def test_fp8_pools_are_checked():
    values = jnp.zeros((4, 1, 2, 2, 8, 16), E4M3)
    bits = jnp.zeros(values.shape, jnp.uint8)
    with pytest.raises(ValueError, match=r"scales float32.* must be bfloat16"):
        paged_decode_attention(
            jnp.zeros((1, 2, 16)), QuantizedPool(bits, jnp.zeros(values.shape[:-1])),
            jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32), layer=0, sm_scale=1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="must be the uint8 bits of float8"):
        write_kv(
            QuantizedPool(values, jnp.zeros(values.shape[:-1], SCALE_DTYPE)),
            jnp.zeros((1, 2, 16)),
            jnp.zeros((1, 2, 16)),
            jnp.zeros(1, jnp.int32),
            layer=0,
        )
    with pytest.raises(ValueError, match="fp8 pages come as a QuantizedPool"):
        write_kv(values, jnp.zeros((1, 2, 16)), jnp.zeros((1, 2, 16)), jnp.zeros(1, jnp.int32),
                 layer=0)  # fmt: skip
    with pytest.raises(ValueError, match="between 2 GiB and 4 GiB"):
        check_byte_array_size("the fp8 pool's values", (3 * 2**30,))
    check_byte_array_size("the fp8 pool's values", (2**31,))
    check_byte_array_size("the fp8 pool's values", (2**32 + 1,))
