"""Ragged paged attention on mixed batches: decode rows, prefill chunks over a cached prefix, whole
prompts and verification rows (q_len = 1 + draft), plus padding sequences with garbage metadata.
Pallas (interpret on CPU, compiled under -m gpu) and the XLA path against a float64 golden."""

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
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

CASES = [
    (1, 64, 8, F32),
    (4, 128, 16, BF16),
    (8, 64, 16, F32),
    (4, 64, 8, BF16),
    (3, 64, 16, F32),
    (2, 64, 16, F16),
]


def mixed_batch(
    rng, group, head_dim, tokens_per_block, dtype, *, num_kv_heads=2, num_tokens=48, scale=1
):
    """(kv_len, q_len) per live sequence, then 2 padding sequences with garbage metadata;
    `scale` lengthens the cached contexts (scale 2: up to 7 blocks)."""
    p = tokens_per_block
    sequences = [
        (scale * p + 1, 1),  # decode
        (3 * scale * p + 2 - (scale - 1) * p, p + 3),  # a prefill chunk over a cached prefix
        (p - 1, p - 1),  # a whole prompt
        (2 * scale * p, 4),  # verification: 1 + 3 draft tokens
        (1, 1),  # the shortest sequence
    ]
    num_seqs, seqs = len(sequences), len(sequences) + 2
    kv_lens = [kv for kv, _ in sequences] + [7 * p, 3]  # garbage for the padding sequences
    batch = paged_batch(
        rng, kv_lens, num_layers=2, num_kv_heads=num_kv_heads, tokens_per_block=p,
        head_dim=head_dim, dtype=dtype, max_blocks=8,
    )  # fmt: skip
    cu_q_lens = np.zeros(seqs + 1, np.int32)
    cu_q_lens[1 : num_seqs + 1] = np.cumsum([q for _, q in sequences])
    cu_q_lens[num_seqs + 1 :] = [5, 999]  # garbage past num_seqs
    q = rng.standard_normal((num_tokens, num_kv_heads * group, head_dim)).astype(dtype)
    return batch, q, cu_q_lens, num_seqs


def golden_ragged(
    batch, q, cu_q_lens, num_seqs, layer, sm_scale, soft_cap=None, window=None, sink_tokens=0
):
    """float64 attention of each live sequence's rows: causal, and with a window each query
    sees its last `window` positions and the first `sink_tokens` keys only."""
    num_kv_heads = batch.pool.shape[3]
    group = q.shape[1] // num_kv_heads
    out = np.zeros(q.shape, np.float64)
    for seq in range(num_seqs):
        start, end = cu_q_lens[seq], cu_q_lens[seq + 1]
        kv_len, q_len = int(batch.kv_lens[seq]), int(end - start)
        positions = kv_len - q_len + np.arange(q_len)[:, None]
        keys_at = np.arange(kv_len)[None, :]
        visible = keys_at <= positions
        if window is not None:
            visible &= (keys_at > positions - window) | (keys_at < sink_tokens)
        for head in range(num_kv_heads):
            keys, values = sequence_kv(batch, seq, layer, head)
            keys, values = np.nan_to_num(keys), np.nan_to_num(values)  # released pages: unused
            for j in range(group):
                out[start:end, head * group + j] = golden_attention(
                    q[start:end, head * group + j], keys, values,
                    sm_scale=sm_scale, soft_cap=soft_cap, visible=visible,
                )  # fmt: skip
    return out


def run(fn, batch, q, cu_q_lens, num_seqs, **kwargs):
    return fn(
        jnp.asarray(q), jnp.asarray(batch.pool), jnp.asarray(batch.page_table),
        jnp.asarray(batch.kv_lens), jnp.asarray(cu_q_lens), jnp.array([num_seqs], jnp.int32),
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(("group", "head_dim", "tokens_per_block", "dtype"), CASES, ids=str)
def test_pallas_ragged_matches_the_golden(group, head_dim, tokens_per_block, dtype, interpret):
    rng = np.random.default_rng(group * head_dim + tokens_per_block)
    batch, q, cu_q_lens, num_seqs = mixed_batch(rng, group, head_dim, tokens_per_block, dtype)
    golden = golden_ragged(batch, q, cu_q_lens, num_seqs, layer=1, sm_scale=head_dim**-0.5)
    out = run(
        ragged_paged_attention, batch, q, cu_q_lens, num_seqs, layer=1,
        sm_scale=head_dim**-0.5, interpret=interpret,
    )  # fmt: skip
    valid = int(cu_q_lens[num_seqs])
    out = np.asarray(out.astype(jnp.float32))[:valid]
    assert not np.isnan(out).any(), "NaN from an unused page or slot leaked"
    tolerance = (TOLERANCE if interpret else GPU_TOLERANCE)[dtype]
    assert relative_error(out, golden[:valid]) <= tolerance


@pytest.mark.parametrize("tile_q", [1, 2, 8, 16])
def test_every_query_tile_gives_the_same_answer(tile_q, interpret):
    """Blocks smaller than, equal to and larger than the sequences' query lengths."""
    rng = np.random.default_rng(tile_q)
    batch, q, cu_q_lens, num_seqs = mixed_batch(rng, 2, 64, 8, F32, num_tokens=40)
    golden = golden_ragged(batch, q, cu_q_lens, num_seqs, layer=0, sm_scale=0.1, soft_cap=4.0)
    out = run(
        ragged_paged_attention, batch, q, cu_q_lens, num_seqs, layer=0, sm_scale=0.1,
        soft_cap=4.0, tile_q=tile_q, interpret=interpret,
    )  # fmt: skip
    valid = int(cu_q_lens[num_seqs])
    assert relative_error(out[:valid], golden[:valid]) <= (1e-5 if interpret else 1e-3)


@pytest.mark.parametrize("num_live", [0, 1, 2, 3, 4, 5])
def test_programs_never_write_rows_past_the_live_sequences(num_live):
    """Interpret mode runs programs in order and leaves unwritten rows NaN: with the first
    `num_live` sequences live, every row past them must stay NaN (a missing row mask in the store
    would spill the last live sequence's block into them), and the live rows must be right."""
    rng = np.random.default_rng(num_live)
    batch, q, cu_q_lens, _ = mixed_batch(rng, 2, 64, 8, F32, num_tokens=48)
    golden = golden_ragged(batch, q, cu_q_lens, num_live, layer=0, sm_scale=0.1)
    out = run(
        ragged_paged_attention, batch, q, cu_q_lens, num_live, layer=0, sm_scale=0.1,
        tile_q=4, interpret=True,
    )  # fmt: skip
    out = np.asarray(out)
    live = int(cu_q_lens[num_live])
    assert np.isnan(out[live:]).all(), "a program wrote rows past its sequence"
    if live:
        assert relative_error(out[:live], golden[:live]) <= TOLERANCE[F32]


def test_soft_cap_must_be_positive():
    rng = np.random.default_rng(0)
    batch, q, cu_q_lens, num_seqs = mixed_batch(rng, 2, 64, 8, F32, num_tokens=48)
    with pytest.raises(ValueError, match=r"soft_cap=0\.0 must be > 0"):
        run(ragged_paged_attention, batch, q, cu_q_lens, num_seqs, layer=0, sm_scale=0.1,
            soft_cap=0.0)  # fmt: skip


@pytest.mark.parametrize(("group", "head_dim", "tokens_per_block", "dtype"), CASES[:2], ids=str)
def test_reference_and_xla_path_match_the_golden(group, head_dim, tokens_per_block, dtype):
    rng = np.random.default_rng(11)
    batch, q, cu_q_lens, num_seqs = mixed_batch(rng, group, head_dim, tokens_per_block, dtype)
    golden = golden_ragged(batch, q, cu_q_lens, num_seqs, layer=1, sm_scale=0.2, soft_cap=3.0)
    valid = int(cu_q_lens[num_seqs])
    for fn, extra in (
        (ragged_paged_attention_reference, {}),
        (ragged_paged_attention, {"impl": "xla"}),
    ):
        out = run(fn, batch, q, cu_q_lens, num_seqs, layer=1, sm_scale=0.2, soft_cap=3.0, **extra)
        assert not np.isnan(np.asarray(out.astype(jnp.float32))[:valid]).any()
        assert relative_error(out[:valid], golden[:valid]) <= TOLERANCE[dtype]
        assert np.all(np.asarray(out.astype(jnp.float32))[valid:] == 0)


def test_bad_inputs_name_the_shapes():
    pool = jnp.zeros((4, 1, 2, 2, 8, 64), jnp.float32)
    q = jnp.zeros((8, 4, 64), jnp.float32)
    table, lens = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32)
    cu, num = jnp.zeros((3,), jnp.int32), jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match=r"cu_q_lens \[2\]"):
        ragged_paged_attention(q, pool, table, lens, cu[:2], num, layer=0, sm_scale=1.0)
    with pytest.raises(ValueError, match="tile_q=3 must be a power of two"):
        ragged_paged_attention(q, pool, table, lens, cu, num, layer=0, sm_scale=1.0, tile_q=3)
    with pytest.raises(ValueError, match="num_seqs"):
        ragged_paged_attention(q, pool, table, lens, cu, num[0], layer=0, sm_scale=1.0)


def release_stale_pages(batch, cu_q_lens, num_seqs, window, sink_tokens):
    """NaN-poisons every page a windowed layer group releases at each sequence's history (the
    step's first position): a kernel that reads one leaks NaN into the output."""
    from kvjax.cache.life_cycles import LifeCycle

    tpb = batch.pool.shape[4]
    cycle = LifeCycle(window, -(-sink_tokens // tpb))
    released = 0
    for seq in range(num_seqs):
        history = int(batch.kv_lens[seq]) - int(cu_q_lens[seq + 1] - cu_q_lens[seq])
        start, end = cycle.stale_range(history, tpb)
        for block in range(start, end):
            batch.pool[batch.page_table[seq, block]] = np.nan
            released += 1
    return released


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize(("window", "sink_tokens"), [(5, 0), (5, 3), (12, 5), (3, 1), (60, 0)])
def test_windowed_attention_reads_only_sinks_and_window(window, sink_tokens, impl, interpret):
    """Sliding windows with sink tokens: the output is the masked golden, and the pages of
    stale blocks (NaN here, released in a real cache) are never read."""
    rng = np.random.default_rng(window * 10 + sink_tokens)
    batch, q, cu_q_lens, num_seqs = mixed_batch(rng, 2, 64, 8, F32, scale=2)
    released = release_stale_pages(batch, cu_q_lens, num_seqs, window, sink_tokens)
    assert released or window == 60  # a 60-token window covers every sequence here
    golden = golden_ragged(
        batch, q, cu_q_lens, num_seqs, 1, 0.125, window=window, sink_tokens=sink_tokens
    )
    out = run(
        ragged_paged_attention, batch, q, cu_q_lens, num_seqs, layer=1, sm_scale=0.125,
        impl=impl, interpret=interpret, window=window, sink_tokens=sink_tokens,
    )  # fmt: skip
    valid = int(cu_q_lens[num_seqs])
    out = np.asarray(out.astype(jnp.float32))[:valid]
    assert not np.isnan(out).any(), "a released page was read"
    assert relative_error(out, golden[:valid]) <= (TOLERANCE if interpret else GPU_TOLERANCE)[F32]


def test_bad_windows_are_refused():
    rng = np.random.default_rng(0)
    batch, q, cu_q_lens, num_seqs = mixed_batch(rng, 2, 64, 8, F32)
    for kwargs, message in (
        (dict(window=0), "window=0 must be an int >= 1"),
        (dict(sink_tokens=4), "sink_tokens=4 needs a window"),
        (dict(window=8, sink_tokens=-1), "sink_tokens=-1"),
    ):
        with pytest.raises(ValueError, match=message):
            run(ragged_paged_attention, batch, q, cu_q_lens, num_seqs, layer=0, sm_scale=0.1,
                **kwargs)  # fmt: skip
