"""Random paged-attention inputs for the kernel tests: permuted page tables, NaN everywhere a kernel
must not read, and a float64 NumPy golden to check the jnp references themselves."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_dtypes
import numpy as np

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
# Relative Frobenius error over valid rows (reference doc, section 7.5).
TOLERANCE = {F32: 1e-5, F16: 5e-3, BF16: 1e-2}
GPU_TOLERANCE = {F32: 1e-3, F16: 5e-3, BF16: 1e-2}  # TF32 dots


@dataclasses.dataclass
class PagedBatch:
    """Pages of `len(kv_lens)` sequences in a NaN-poisoned pool (host copies, float64 kept)."""

    pool: np.ndarray  # [pages, layers, 2, kv_heads, tokens_per_block, head_dim]
    page_table: np.ndarray  # int32[seqs, max_blocks], unused entries garbage (in range)
    kv_lens: np.ndarray  # int32[seqs]


def paged_batch(
    rng, kv_lens, *, num_layers, num_kv_heads, tokens_per_block, head_dim, dtype, max_blocks
):
    """Each sequence's pages are a random permutation of the pool; every byte no valid key owns
    is NaN (free pages, slots past kv_len)."""
    kv_lens = np.asarray(kv_lens, np.int32)
    needed = [-(-int(n) // tokens_per_block) for n in kv_lens]
    num_pages = 1 + sum(needed) + 3  # NULL_PAGE, the sequences' pages, some free ones
    pool = np.full(
        (num_pages, num_layers, 2, num_kv_heads, tokens_per_block, head_dim), np.nan, dtype
    )
    pages = rng.permutation(np.arange(1, num_pages))
    page_table = rng.integers(0, num_pages, (len(kv_lens), max_blocks)).astype(np.int32)
    used = 0
    for seq, (length, count) in enumerate(zip(kv_lens, needed, strict=True)):
        own = pages[used : used + count]
        used += count
        page_table[seq, :count] = own
        for block, page in enumerate(own):
            valid = min(tokens_per_block, int(length) - block * tokens_per_block)
            shape = (num_layers, 2, num_kv_heads, valid, head_dim)
            pool[page, :, :, :, :valid] = rng.standard_normal(shape).astype(dtype)
    return PagedBatch(pool, page_table, kv_lens)


def golden_attention(q, keys, values, *, sm_scale, soft_cap=None, visible=None):
    """float64 attention of q[rows, d] over keys/values [context, d] (visible: bool[rows, ctx])."""
    scores = q.astype(np.float64) @ keys.astype(np.float64).T * sm_scale
    if soft_cap is not None:
        scores = soft_cap * np.tanh(scores / soft_cap)
    if visible is not None:
        scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return weights @ values.astype(np.float64)


def sequence_kv(batch: PagedBatch, seq: int, layer: int, head: int):
    """The valid keys and values of one sequence and KV head: two [kv_len, head_dim] arrays."""
    tokens_per_block = batch.pool.shape[4]
    length = int(batch.kv_lens[seq])
    pages = batch.page_table[seq, : -(-length // tokens_per_block)]
    keys = batch.pool[pages, layer, 0, head].reshape(-1, batch.pool.shape[5])[:length]
    values = batch.pool[pages, layer, 1, head].reshape(-1, batch.pool.shape[5])[:length]
    return keys, values


def relative_error(actual, expected) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
