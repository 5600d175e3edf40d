"""Bit-level helpers for tests of copies and writes: random bit patterns (NaN payloads included, so
a copy that converts values shows) and byte-for-byte comparison."""

import numpy as np


def random_bits(rng, shape, dtype):
    dtype = np.dtype(dtype)
    bits = rng.integers(0, 2 ** (8 * dtype.itemsize), shape, dtype=np.uint64)
    return bits.astype(f"u{dtype.itemsize}").view(dtype)


def assert_same_bytes(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual.view(np.uint8), expected.view(np.uint8))


def padded_ids(ids, bucket, padding):
    """int32[bucket]: the ids, then `padding` (real page ids, which the op must not touch)."""
    return np.array([*ids, *padding[: bucket - len(ids)]], np.int32)
