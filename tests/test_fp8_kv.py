"""fp8 KV pages through the engine with a tiny Llama: greedy tokens equal a dense reference that
quantizes K and V alike (each token row, as the pages store it) in both loops, under prefix reuse
with copy-on-write and chunked prefill; pages suspended to the host and spilled to the disk come
back with their scales; a byte quota holds ~1.94x the tokens of bfloat16."""

import jax
import numpy as np
import pytest

from kernels.kv_quant import is_quantized
from kvjax.cache.config import CacheConfig
from kvjax.cache.grouped import GroupedKVCacheManager
from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.runtime.storage import KVStorage
from kvjax.serving.request import SamplingParams
from kvjax.serving.scheduler import SchedulerConfig
from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig
from tests.dense_llama import dense_greedy
from tests.test_engine import (
    TPB,
    assert_all_pages_free,
    make_engine,
    prompts_with_shared_prefix,
    serve_checked,
)
from tests.test_llama import random_model, tiny_config

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64))


def quantized_greedy(model, prompt, kv_dtype, num_tokens=GREEDY.max_new_tokens):
    return tuple(dense_greedy(model, prompt, num_tokens, kv_dtype=kv_dtype))


@pytest.mark.parametrize(
    ("kv_dtype", "overlap"),
    [
        ("float8_e4m3fn", True),
        ("float8_e4m3fn", False),
        pytest.param("float8_e5m2", False, marks=pytest.mark.slow),  # the kernels test e5m2
    ],
)
def test_greedy_tokens_equal_a_dense_reference_that_quantizes_alike(model, kv_dtype, overlap):
    rng = np.random.default_rng(0)
    # A 13-token shared prefix (reuse ends mid-block: copy-on-write of an fp8 page and its
    # scales); a 42-token prompt is prefilled in chunks over pages written earlier.
    prompts = prompts_with_shared_prefix(rng, 13, [4, 29, 9])
    engine = make_engine(model, kv_dtype=kv_dtype, overlap=overlap)
    assert is_quantized(engine.manager.pool)
    first = serve_checked(engine, prompts[:1], GREEDY)
    rest = serve_checked(engine, prompts[1:], GREEDY)
    assert min(o.metrics.num_reused_tokens for o in rest) >= 12
    for prompt, output in zip(prompts, first + rest, strict=True):
        assert output.token_ids == quantized_greedy(model, prompt, kv_dtype)
    assert_all_pages_free(engine)


def test_fp8_pages_keep_their_scales_on_the_host_and_the_disk(model, tmp_path):
    config = cache_config_for(
        model, tokens_per_block=TPB, device_pages=12, host_pages=3, disk_pages=64,
        disk_dir=tmp_path, dtype="float8_e4m3fn",
    )  # fmt: skip
    engine = Engine(model, config, SchedulerConfig(max_batch_size=4, max_num_tokens=32))
    rng = np.random.default_rng(9)
    prompts = prompts_with_shared_prefix(rng, 8, [5, 12, 3, 9, 14, 6])
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    outputs = serve_checked(engine, prompts, params)
    stats = engine.manager.stats
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert stats.spilled_pages > 0 and stats.onboarded_pages > 0  # host -> disk, and back
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == quantized_greedy(model, prompt, "float8_e4m3fn", 16)
    assert_all_pages_free(engine)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_byte_quota_holds_nearly_twice_the_tokens_in_fp8(head_dim):
    """Scales count: an fp8 page of head_dim 64 is (64 + 2) / 128 of a bfloat16 page."""
    geometry = dict(num_layers=32, num_kv_heads=8, head_dim=head_dim, device_bytes=2**30)
    bf16 = CacheConfig(dtype="bfloat16", **geometry)
    fp8 = CacheConfig(dtype="float8_e4m3fn", **geometry)
    assert fp8.page_bytes == bf16.page_bytes // 2 + 32 * 2 * 8 * 16 * 2
    ratio = (fp8.num_device_pages - 1) / (bf16.num_device_pages - 1)
    assert ratio >= 1.9
    assert ratio == pytest.approx(2 * head_dim / (head_dim + 2), rel=2e-3)
    # The host-side formula and the storage's arrays agree on a page's bytes.
    small = CacheConfig(dtype="float8_e4m3fn", **{**geometry, "device_bytes": 4 * fp8.page_bytes})
    storage = KVStorage.for_config(small, auto_host_tier=False)
    assert storage.page_bytes == small.page_bytes
    assert sum(a.nbytes for a in jax.tree.leaves(storage.pool)) == 4 * small.page_bytes
    storage.close()


def test_the_serving_benchmark_compares_requests_that_fit_a_byte_quota(model):
    from benchmarks.kv_capacity import fixed_quota_bytes, kv_capacity

    quota = fixed_quota_bytes(model, TPB, device_pages=65, device_mib=None)
    sequences = [[0] * 30, [0] * 50]  # 8 and 13 pages of 4 tokens
    capacity = kv_capacity(model, TPB, "float8_e4m3fn", quota, sequences)
    assert capacity["pages_per_request"] == 10.5
    bf16, fp8 = capacity["dtypes"]["bfloat16"], capacity["dtypes"]["float8_e4m3fn"]
    assert bf16["pages"] == 64 and bf16["requests_that_fit"] == 6  # 64 // 10.5
    # head_dim 16: an fp8 page is (16 + 2) / 32 of a bf16 one.
    assert fp8["page_bytes"] * 32 == bf16["page_bytes"] * 18
    assert fp8["requests_that_fit"] == int(fp8["pages"] // 10.5) > bf16["requests_that_fit"]


@pytest.mark.slow  # 25 s of compilation; CI keeps the pages' paths, speculation is tested at f32
def test_speculative_decoding_over_fp8_pages_keeps_the_tokens(model):
    """A row's scale depends on that row only: drafts written and rejected change nothing."""
    rng = np.random.default_rng(3)
    phrase = list(rng.integers(0, 64, 6))
    prompts = [phrase * 4, list(rng.integers(0, 64, 20)) + phrase * 2]
    speculative = SpeculativeConfig(NgramDrafter(3, 1), 3)
    engine = make_engine(model, kv_dtype="float8_e4m3fn", speculative=speculative)
    outputs = serve_checked(engine, prompts, SamplingParams(max_new_tokens=16, temperature=0.0))
    assert engine.metrics.summary()["acceptance_rate"] > 0  # drafts were accepted
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == quantized_greedy(model, prompt, "float8_e4m3fn", 16)
    assert_all_pages_free(engine)


@pytest.mark.slow  # 25 s of compilation; the grouped pools are tested at f32 in CI
def test_gemma_layer_groups_keep_fp8_pages_in_each_groups_pool():
    """Gemma's windowed and global layers in their own pools, both fp8, under suspensions."""
    from tests.test_gemma import random_gemma

    gemma = random_gemma()
    rng = np.random.default_rng(12)
    prompts = prompts_with_shared_prefix(rng, 13, [5, 20, 17])
    scheduler = SchedulerConfig(max_batch_size=4, max_num_tokens=16, chunk_unit=4)
    engine = make_engine(gemma, device_pages=12, host_pages=64, scheduler=scheduler,
                         kv_dtype="float8_e4m3fn")  # fmt: skip
    assert isinstance(engine.manager, GroupedKVCacheManager)
    assert all(is_quantized(pool) for pool in engine.manager.pool)
    outputs = serve_checked(engine, prompts, SamplingParams(max_new_tokens=14, temperature=0.0))
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = quantized_greedy(gemma, prompt, "float8_e4m3fn", len(output.token_ids))
        assert output.token_ids == expected
    assert_all_pages_free(engine)
