"""Paged decode attention: Pallas (interpret on CPU, compiled under -m gpu) and the XLA path against
the jnp reference, which is itself checked against a float64 NumPy golden."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference
from tests.attention_cases import (
    BF16,
    F16,
    F32,
    GPU_TOLERANCE,
    TOLERANCE,
    golden_attention,
    paged_batch,
    relative_error,
    sequence_kv,
)

# (group size, head_dim, tokens per block, dtype): every value of each axis appears at least once.
CASES = [
    (1, 64, 8, F32),
    (4, 128, 16, BF16),
    (8, 64, 16, F32),
    (4, 64, 8, BF16),
    (8, 128, 8, BF16),
    (3, 64, 16, F32),  # a group that is not a power of two
    (16, 64, 16, F32),  # wide enough for the dot path
    (2, 64, 16, F16),
]


def decode_inputs(rng, group, head_dim, tokens_per_block, dtype, num_kv_heads=2):
    max_blocks = 6
    lengths = [
        1,
        tokens_per_block - 1,
        tokens_per_block,
        tokens_per_block + 1,
        max_blocks * tokens_per_block,
        0,
    ]
    batch = paged_batch(
        rng, lengths, num_layers=2, num_kv_heads=num_kv_heads, tokens_per_block=tokens_per_block,
        head_dim=head_dim, dtype=dtype, max_blocks=max_blocks,
    )  # fmt: skip
    q = rng.standard_normal((len(lengths), num_kv_heads * group, head_dim)).astype(dtype)
    return batch, q


def golden_decode(batch, q, layer, sm_scale, soft_cap=None):
    num_kv_heads = batch.pool.shape[3]
    group = q.shape[1] // num_kv_heads
    out = np.zeros(q.shape, np.float64)
    for seq in range(q.shape[0]):
        if not batch.kv_lens[seq]:
            continue
        for head in range(num_kv_heads):
            keys, values = sequence_kv(batch, seq, layer, head)
            rows = slice(head * group, (head + 1) * group)
            out[seq, rows] = golden_attention(
                q[seq, rows], keys, values, sm_scale=sm_scale, soft_cap=soft_cap
            )
    return out


def run(batch, q, *, layer, sm_scale, **kwargs):
    return paged_decode_attention(
        jnp.asarray(q), jnp.asarray(batch.pool), jnp.asarray(batch.page_table),
        jnp.asarray(batch.kv_lens), layer=layer, sm_scale=sm_scale, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(("group", "head_dim", "tokens_per_block", "dtype"), CASES, ids=str)
def test_pallas_decode_matches_the_golden(group, head_dim, tokens_per_block, dtype, interpret):
    rng = np.random.default_rng(group * head_dim + tokens_per_block)
    batch, q = decode_inputs(rng, group, head_dim, tokens_per_block, dtype)
    golden = golden_decode(batch, q, layer=1, sm_scale=head_dim**-0.5)
    out = run(batch, q, layer=1, sm_scale=head_dim**-0.5, interpret=interpret)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out).any(), "NaN from an unused page or slot leaked"
    assert np.all(out[-1] == 0), "a padding row (kv_len 0) must give zeros"
    tolerance = (TOLERANCE if interpret else GPU_TOLERANCE)[dtype]
    assert relative_error(out[:-1], golden[:-1]) <= tolerance


@pytest.mark.parametrize("num_splits", [1, 2, 4, 6])
def test_every_split_count_gives_the_same_answer(num_splits, interpret):
    rng = np.random.default_rng(num_splits)
    batch, q = decode_inputs(rng, 4, 64, 8, F32)
    golden = golden_decode(batch, q, layer=0, sm_scale=0.125, soft_cap=5.0)
    out = run(
        batch, q, layer=0, sm_scale=0.125, soft_cap=5.0, num_splits=num_splits,
        interpret=interpret,
    )  # fmt: skip
    assert relative_error(out[:-1], golden[:-1]) <= (1e-5 if interpret else 1e-3)


@pytest.mark.parametrize(("group", "head_dim", "tokens_per_block", "dtype"), CASES[:3], ids=str)
def test_reference_and_xla_path_match_the_golden(group, head_dim, tokens_per_block, dtype):
    rng = np.random.default_rng(7)
    batch, q = decode_inputs(rng, group, head_dim, tokens_per_block, dtype)
    golden = golden_decode(batch, q, layer=1, sm_scale=0.2, soft_cap=3.0)
    args = (jnp.asarray(q), jnp.asarray(batch.pool), jnp.asarray(batch.page_table))
    args += (jnp.asarray(batch.kv_lens),)
    reference = paged_decode_attention_reference(*args, layer=1, sm_scale=0.2, soft_cap=3.0)
    xla = paged_decode_attention(*args, layer=1, sm_scale=0.2, soft_cap=3.0, impl="xla")
    for out in (reference, xla):
        assert not np.isnan(np.asarray(out.astype(jnp.float32))).any()
        assert relative_error(out[:-1], golden[:-1]) <= TOLERANCE[dtype]


def test_bad_inputs_name_the_shapes():
    pool = jnp.zeros((4, 1, 2, 2, 8, 64), jnp.float32)
    q = jnp.zeros((2, 4, 64), jnp.float32)
    table, lens = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="layer=1 is outside"):
        paged_decode_attention(q, pool, table, lens, layer=1, sm_scale=1.0)
    with pytest.raises(ValueError, match=r"q \[2, 3, 64\] must be"):
        paged_decode_attention(q[:, :3], pool, table, lens, layer=0, sm_scale=1.0)
    with pytest.raises(ValueError, match="need 2 rows"):
        paged_decode_attention(q, pool, table[:1], lens, layer=0, sm_scale=1.0)
    with pytest.raises(ValueError, match="powers of two"):
        paged_decode_attention(
            jnp.zeros((2, 4, 48)), jnp.zeros((4, 1, 2, 2, 8, 48)), table, lens, layer=0,
            sm_scale=1.0,
        )  # fmt: skip
    with pytest.raises(ValueError, match="page_table"):
        paged_decode_attention(q, pool, table.astype(jnp.float32), lens, layer=0, sm_scale=1.0)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize(
    ("window", "sink_tokens", "pages_per_chunk", "num_splits"),
    [(5, 0, 1, None), (9, 3, 2, 3), (10, 5, 2, 1), (3, 1, 4, 2), (100, 0, None, None)],
)
def test_windowed_decode_reads_only_sinks_and_window(
    window, sink_tokens, pages_per_chunk, num_splits, impl, interpret
):
    """A decode step of a sliding-window layer: the masked golden, with the pages of stale
    blocks NaN-poisoned (released) and never read, across chunk sizes and splits."""
    from tests.test_ragged_paged_attention import golden_ragged, release_stale_pages

    rng = np.random.default_rng(window + sink_tokens)
    batch, q = decode_inputs(rng, 2, 64, 4, F32)
    live = batch.kv_lens > 0
    num_live = int(live.sum())  # the live sequences come first, one query token each
    cu_q_lens = np.arange(num_live + 1, dtype=np.int32)
    released = release_stale_pages(batch, cu_q_lens, num_live, window, sink_tokens)
    assert released or window == 100
    golden = golden_ragged(
        batch, q[live], cu_q_lens, num_live, 1, 0.125, window=window, sink_tokens=sink_tokens
    )
    out = paged_decode_attention(
        jnp.asarray(q), jnp.asarray(batch.pool), jnp.asarray(batch.page_table),
        jnp.asarray(batch.kv_lens), layer=1, sm_scale=0.125, impl=impl, interpret=interpret,
        window=window, sink_tokens=sink_tokens, pages_per_chunk=pages_per_chunk,
        num_splits=num_splits,
    )  # fmt: skip
    out = np.asarray(out.astype(jnp.float32))
    assert not np.isnan(out[live]).any(), "a released page was read"
    assert np.all(out[~live] == 0)
    assert relative_error(out[live], golden) <= (TOLERANCE if interpret else GPU_TOLERANCE)[F32]
