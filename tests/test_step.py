"""Buckets and the step registry: ahead-of-time compilation, no compile while serving, padding
fallback for unseen keys, and a donated pool."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.runtime.buckets import BucketKey, Buckets
from kvjax.runtime.step import StepInputs, StepRegistry, allow_compile

MAX_BLOCKS = 4
POOL_SHAPE = (16, 2, 2, 1, 4, 8)


def toy_step(params, pool, inputs):
    """Logits from the tokens each sequence needs; the pool gains the step's token sum."""
    live = jnp.arange(inputs.kv_lens.shape[0]) < inputs.num_seqs[0]
    picked = inputs.tokens[inputs.logits_indices].astype(jnp.float32)
    logits = picked[:, None] * params["w"][None, :]
    del live
    total = jnp.sum(inputs.tokens).astype(pool.dtype)
    return logits, pool.at[1].add(total)


def host_inputs(q_lens, num_seqs_bucket=None, num_tokens=None):
    """Inputs of sequences with these query lengths, optionally padded by hand."""
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_seqs_bucket = num_seqs_bucket or len(q_lens)
    num_tokens = num_tokens or int(cu[-1])
    tokens = np.zeros(num_tokens, np.int32)
    tokens[: cu[-1]] = np.arange(1, cu[-1] + 1)
    pad = num_seqs_bucket - len(q_lens)
    return StepInputs(
        tokens=tokens,
        page_table=np.pad(np.ones((len(q_lens), MAX_BLOCKS), np.int32), ((0, pad), (0, 0))),
        kv_lens=np.pad(np.array(q_lens, np.int32), (0, pad)),
        cu_q_lens=np.pad(cu, (0, pad), mode="edge"),
        num_seqs=np.array([len(q_lens)], np.int32),
        logits_indices=np.pad(cu[1:] - 1, (0, pad)),
    )


def example(key: BucketKey) -> StepInputs:
    inputs = host_inputs([1] * key.num_seqs, key.num_seqs, key.num_tokens)
    return inputs.padded(key)


def test_buckets():
    buckets = Buckets(batch_sizes=[4, 1, 2], token_counts=[16, 8], draft_lengths=[0, 3])
    assert buckets.batch_sizes == (1, 2, 4)
    # Mixed keys return 1 + 3 logit rows per sequence (prompt chunks next to verification).
    assert BucketKey(2, 8, 8) in buckets.keys and BucketKey(4, 16, 16) in buckets.keys
    assert BucketKey(2, 2, 2) in buckets.keys  # decode: one token per sequence
    assert BucketKey(4, 16, 16) in buckets.keys  # verification: 1 + 3 draft tokens each
    assert buckets.pad(3, 3) == BucketKey(4, 4, 4)
    assert buckets.pad(1, 9) == BucketKey(1, 16, 4)
    assert buckets.pad(3, 12, 12, draft_len=3) == BucketKey(4, 16, 16)
    assert buckets.pad(1, 2, 2, draft_len=1) == BucketKey(1, 4, 4)  # not (2, 2, 2): 1 row each
    assert buckets.pad(2, 8, 8) == BucketKey(2, 8, 8)
    with pytest.raises(ValueError, match="fits no allowed bucket; the largest is"):
        buckets.pad(5, 5)
    with pytest.raises(ValueError, match="batch_sizes=0 must be >= 1"):
        Buckets(batch_sizes=[0], token_counts=[8])


def test_after_warmup_a_varied_workload_never_compiles():
    buckets = Buckets(batch_sizes=[1, 2, 4], token_counts=[8, 16])
    registry = StepRegistry(toy_step)
    params = {"w": jnp.arange(3, dtype=jnp.float32)}
    pool = jnp.zeros(POOL_SHAPE, jnp.float32)
    with registry.allow_compile():
        registry.warmup(params, pool, example, buckets.keys)
    assert registry.stats.compiled == len(buckets.keys)
    expected_total = 0
    with jax.no_tracing():
        for q_lens in ([1], [1, 1], [3, 5], [1, 1, 1, 1], [2, 9, 1], [4]):
            key = buckets.pad(len(q_lens), sum(q_lens))
            inputs = host_inputs(q_lens, key.num_seqs, key.num_tokens).padded(key)
            logits, pool = registry(params, pool, inputs)
            expected_total += sum(range(1, sum(q_lens) + 1))
            ends = np.cumsum(q_lens)
            np.testing.assert_array_equal(np.asarray(logits)[: len(q_lens), 2], 2.0 * ends)
    assert registry.stats.compiled == len(buckets.keys)
    assert registry.stats.fallbacks == 0
    assert float(pool[1, 0, 0, 0, 0, 0]) == expected_total


def test_an_unseen_key_pads_up_to_a_compiled_one_and_is_counted():
    registry = StepRegistry(toy_step)
    params = {"w": jnp.ones(2)}
    pool = jnp.zeros(POOL_SHAPE, jnp.float32)
    with allow_compile():
        registry.warmup(params, pool, example, [BucketKey(4, 16, 4)])
    with jax.no_tracing():
        logits, pool = registry(params, pool, host_inputs([2, 3]))  # key (2, 5): not compiled
    assert logits.shape == (4, 2) and np.asarray(logits)[:2, 0].tolist() == [2.0, 5.0]
    assert registry.stats.fallbacks == 1 and registry.stats.compiled == 1
    with pytest.raises(ValueError, match="fits no compiled bucket"):
        registry(params, pool, host_inputs([9, 9]))
    narrow = host_inputs([2, 3])
    narrow = dataclasses.replace(narrow, page_table=narrow.page_table[:, :2])
    logits, pool = registry(params, pool, narrow)  # widened with NULL_PAGE columns
    assert registry.stats.fallbacks == 2
    wide = dataclasses.replace(narrow, page_table=np.ones((2, MAX_BLOCKS + 1), np.int32))
    with pytest.raises(ValueError, match="wider than max_blocks=4"):
        registry(params, pool, wide)
    with pytest.raises(RuntimeError, match="outside allow_compile"):
        registry.warmup(params, pool, example, [BucketKey(1, 1, 1)])


def test_the_compiled_step_updates_the_donated_pool_in_place():
    registry = StepRegistry(toy_step)
    params = {"w": jnp.ones(2)}
    pool = jax.ShapeDtypeStruct((256, 4, 2, 2, 16, 64), jnp.float32)
    with allow_compile():
        registry.warmup(params, pool, example, [BucketKey(2, 8, 2)])
    text = registry._executables[BucketKey(2, 8, 2)].as_text()
    assert "input_output_alias" in text
    pool_type = "f32[256,4,2,2,16,64]"
    assert not [line for line in text.splitlines() if pool_type in line and " copy(" in line]


def test_persistent_cache_keeps_compiled_steps_on_disk(tmp_path):
    """In a subprocess: the cache is process-wide state."""
    import subprocess
    import sys

    code = f"""
import jax, jax.numpy as jnp
from kvjax.runtime.buckets import BucketKey
from kvjax.runtime.compile_cache import enable_persistent_cache
from kvjax.runtime.step import StepRegistry, allow_compile
from tests.test_step import example, toy_step
enable_persistent_cache({str(tmp_path)!r})
registry = StepRegistry(toy_step)
with allow_compile():
    pool = jnp.zeros((4, 1, 2, 1, 4, 8))
    registry.warmup({{"w": jnp.ones(2)}}, pool, example, [BucketKey(2, 4, 2)])
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parent.parent))
    assert any(tmp_path.iterdir()), "nothing was written to the compilation cache"


def test_engines_turn_the_compile_cache_on_in_a_per_user_directory(tmp_path, monkeypatch):
    import jax

    from kvjax.runtime.compile_cache import configure_compile_cache, default_cache_dir

    monkeypatch.setenv("KVJAX_COMPILE_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("KVJAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kvjax" / "xla"
    configured = jax.config.jax_compilation_cache_dir  # the session's (tests/conftest.py)
    try:
        assert configure_compile_cache(True) == configured  # a configured cache is kept
        assert configure_compile_cache(False) == configured  # False changes nothing
        jax.config.update("jax_compilation_cache_dir", None)
        assert configure_compile_cache(False) is None
        assert configure_compile_cache(True) == str(tmp_path / "xdg" / "kvjax" / "xla")
        assert (tmp_path / "xdg" / "kvjax" / "xla").is_dir()
        assert configure_compile_cache(tmp_path / "mine") == str(tmp_path / "mine")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        with pytest.raises(ValueError, match="compile_cache=3"):
            configure_compile_cache(3)
        (tmp_path / "file").write_text("")  # a directory cannot be made below a file
        jax.config.update("jax_compilation_cache_dir", None)
        with pytest.warns(RuntimeWarning, match="no compilation cache: cannot create"):
            assert configure_compile_cache(tmp_path / "file" / "cache") is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", configured)


def test_step_inputs_travel_packed_in_one_buffer():
    rng = np.random.default_rng(3)
    key = BucketKey(4, 8, 4)
    inputs = StepInputs(
        tokens=rng.integers(0, 99, 8).astype(np.int32),
        page_table=rng.integers(0, 99, (4, 5)).astype(np.int32),
        kv_lens=rng.integers(0, 99, 4).astype(np.int32),
        cu_q_lens=np.arange(5, dtype=np.int32) * 2,
        num_seqs=np.array([3], np.int32),
        logits_indices=rng.integers(0, 8, 4).astype(np.int32),
    )
    packed = inputs.pack()
    assert packed.shape == (StepInputs.packed_size(key, 5),) and packed.dtype == np.int32
    unpacked = StepInputs.unpack(packed, key, 5)
    for name in ("tokens", "page_table", "kv_lens", "cu_q_lens", "num_seqs", "logits_indices"):
        np.testing.assert_array_equal(getattr(unpacked, name), getattr(inputs, name))
