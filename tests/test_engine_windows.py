"""Sliding-window attention end to end (Mistral's: every layer attends to its last W tokens;
Qwen2's and Gemma's: some layers windowed, the others full):
the engine's greedy tokens equal a dense windowed reference for prompts and generations several
windows long, under prefix reuse, chunked prefill, scarce pages (suspend and resume) and
speculative decoding; a checkpoint with a window round-trips through the loader."""

import numpy as np
import pytest

from kvjax.serving.request import SamplingParams
from kvjax.serving.scheduler import SchedulerConfig
from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig
from models.loader import load_hf_checkpoint, save_hf_checkpoint
from tests.test_engine import dense_greedy, make_engine, prompts_with_shared_prefix, serve_checked
from tests.test_llama import random_model, tiny_config

WINDOW = 6  # tokens; blocks hold 4, so a window spans two or three pages
LONG = SamplingParams(max_new_tokens=14, temperature=0.0)


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64, sliding_window=WINDOW), seed=3)


def test_a_window_changes_the_tokens(model):
    """The reference really windows: the same weights without the window decode otherwise."""
    full = random_model(tiny_config(vocab_size=64), seed=3)
    prompt = list(np.random.default_rng(0).integers(0, 64, 20))
    assert dense_greedy(model, prompt, 8) != dense_greedy(full, prompt, 8)


@pytest.mark.parametrize("device_pages", [60, 11])
def test_windowed_greedy_equals_the_dense_reference(model, device_pages):
    """Prompts of 3 to 6 windows with a shared 13-token prefix (partial-block reuse), chunked
    over the 16-token budget; 11 device pages for four requests at once (stale pages go back,
    so each holds about 3 between chunks) force suspensions to the host."""
    rng = np.random.default_rng(device_pages)
    prompts = prompts_with_shared_prefix(rng, 13, [5, 20, 17, 24, 11, 22])
    scheduler = SchedulerConfig(max_batch_size=4, max_num_tokens=16, chunk_unit=4)
    engine = make_engine(model, device_pages=device_pages, host_pages=64, scheduler=scheduler)
    outputs = serve_checked(engine, prompts, LONG)
    cap = engine.manager.max_seq_len  # 40 tokens with 11 pages: long requests end there
    for prompt, output in zip(prompts, outputs, strict=True):
        assert len(prompt) + len(output.token_ids) >= min(cap, len(prompt) + 14)
        assert output.token_ids == dense_greedy(model, prompt, len(output.token_ids))
    assert max(o.metrics.num_reused_tokens for o in outputs) >= 13
    if device_pages == 11:
        assert sum(o.metrics.num_preemptions for o in outputs) > 0
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_windowed_speculative_decoding_is_exact(model):
    rng = np.random.default_rng(9)
    base = list(rng.integers(0, 64, 5))
    prompts = [base * 4, [*base[:3], *base] * 3]  # repetitive: the n-gram drafter hits
    engine = make_engine(model, speculative=SpeculativeConfig(NgramDrafter(), 3))
    outputs = serve_checked(engine, prompts, LONG)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt, LONG.max_new_tokens)
    assert engine.metrics.totals.accepted > 0
    engine.shutdown()


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_a_windowed_checkpoint_round_trips(model, tmp_path, model_type):
    source = random_model(
        tiny_config(vocab_size=64, sliding_window=WINDOW, rope_scaling=None), seed=4
    )
    if model_type == "qwen2":
        source = random_model(
            tiny_config(vocab_size=64, sliding_window=WINDOW, rope_scaling=None, qkv_bias=True),
            seed=4,
        )
    save_hf_checkpoint(source, tmp_path, model_type=model_type)
    loaded = load_hf_checkpoint(tmp_path, dtype=np.float32)
    assert loaded.config.sliding_window == WINDOW
    prompt = list(np.random.default_rng(1).integers(0, 64, 17))
    assert dense_greedy(loaded, prompt, 6) == dense_greedy(source, prompt, 6)


def test_windows_on_some_layers_only(compile_cache, tmp_path):
    """Layer 0 windowed, layer 1 full (the forward scans each run of equal windows): greedy
    tokens equal the dense reference with per-layer masks, and a checkpoint keeps the layout
    through `layer_types`."""
    config = tiny_config(vocab_size=64, sliding_window=WINDOW, windowed_layers=(True, False))
    mixed = random_model(config, seed=3)
    rng = np.random.default_rng(11)
    prompts = prompts_with_shared_prefix(rng, 9, [7, 22])
    engine = make_engine(mixed)
    outputs = serve_checked(engine, prompts, LONG)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(mixed, prompt, LONG.max_new_tokens)
    engine.shutdown()
    assert dense_greedy(mixed, prompts[1], 8) != dense_greedy(
        random_model(tiny_config(vocab_size=64, sliding_window=WINDOW), seed=3), prompts[1], 8
    )  # the full layer matters
    from models.llama import truncated_draft

    assert truncated_draft(mixed, 1).config.layer_windows == (WINDOW,)  # its own layers' flags
    save_hf_checkpoint(mixed, tmp_path, model_type="mistral")
    loaded = load_hf_checkpoint(tmp_path, dtype=np.float32)
    assert loaded.config.layer_windows == (WINDOW, None)
    assert dense_greedy(loaded, prompts[0], 6) == dense_greedy(mixed, prompts[0], 6)


def test_a_long_windowed_generation_holds_a_bounded_number_of_pages(model):
    """Every layer windowed: as the engine decodes 48 tokens past a 12-token prompt, the pages
    the request holds stay within the window's (stale ones go back to the tree), and the tokens
    still equal the dense reference."""
    prompt = list(np.random.default_rng(5).integers(0, 64, 12))
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    engine = make_engine(model)
    request_id = engine.add_request(prompt, params)
    held, outputs = [], []
    while engine.num_unfinished:
        outputs += engine.step()
        engine.manager.check_invariants()
        held.append(sum(len(cache.held_pages()) for cache in engine.manager.live_caches))
    # The token in flight and the 5 before it span at most 3 blocks of 4; the overlapped loop
    # has grown the cache by one more token.
    assert max(held[4:]) <= 4 < -(-(12 + 48) // 4)
    (output,) = [o for o in outputs if o.request_id == request_id and o.finished]
    assert output.token_ids == dense_greedy(model, prompt, 48)
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_a_cache_config_must_keep_what_the_model_reads(model):
    from kvjax.cache.life_cycles import LayerAttention
    from kvjax.engine.engine import Engine
    from kvjax.engine.geometry import cache_config_for

    full = random_model(tiny_config(vocab_size=64), seed=3)
    windowed = cache_config_for(model, tokens_per_block=4, device_pages=20, host_pages=0)
    assert windowed.layer_attention == (LayerAttention(WINDOW),) * 2
    with pytest.raises(ValueError, match=r"layer_attention\[0\]=.*releases pages that layer 0"):
        Engine(full, windowed, SchedulerConfig(max_batch_size=2, max_num_tokens=16))


def test_a_cache_keeping_more_than_the_model_reads_splits_the_pools_by_its_groups(compile_cache):
    """Model windows (6, 6, full) and a cache that keeps a 12-token window for layer 1: three
    layer groups, so the forward's run of layers 0-1 (one window) spans two pools; each layer
    must write and read its own group's pool."""
    import dataclasses

    from kvjax.cache.grouped import GroupedKVCacheManager
    from kvjax.cache.life_cycles import LayerAttention
    from kvjax.engine.engine import Engine
    from kvjax.engine.geometry import cache_config_for

    config = tiny_config(
        vocab_size=64, num_layers=3, sliding_window=WINDOW, windowed_layers=(True, True, False)
    )
    model = random_model(config, seed=8)
    cache_config = dataclasses.replace(
        cache_config_for(model, tokens_per_block=4, device_pages=60, host_pages=0),
        layer_attention=(LayerAttention(WINDOW), LayerAttention(2 * WINDOW), LayerAttention()),
    )
    scheduler = SchedulerConfig(max_batch_size=4, max_num_tokens=16, chunk_unit=4)
    engine = Engine(model, cache_config, scheduler)
    assert isinstance(engine.manager, GroupedKVCacheManager)
    assert engine.manager.group_of_layer == (0, 1, 2)
    prompts = prompts_with_shared_prefix(np.random.default_rng(3), 9, [7, 22])
    outputs = serve_checked(engine, prompts, LONG)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt, LONG.max_new_tokens)
    engine.shutdown()
