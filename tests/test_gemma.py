"""Gemma 3 text: interleaved local (windowed) and global layers, (1 + w) RMSNorm, pre- and
post-feedforward norms, QK norm, embedding scaling, `query_pre_attn_scalar`, local and global
RoPE bases, GELU-tanh MLP and tied embeddings. The engine's greedy tokens equal a dense jnp
reference of the same weights with explicit per-layer masks, under prefix reuse, chunked
prefill, scarce pages and speculative decoding; checkpoints load from Hugging Face's layouts."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from kvjax.cache.grouped import GroupedKVCacheManager
from kvjax.serving.request import SamplingParams
from kvjax.serving.scheduler import SchedulerConfig
from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig
from models.config import LlamaConfig
from models.loader import load_hf_checkpoint, save_hf_checkpoint
from tests.dense_llama import dense_logits
from tests.test_engine import dense_greedy, make_engine, prompts_with_shared_prefix, serve_checked
from tests.test_llama import random_model

WINDOW = 6
PATTERN = (True,) * 5 + (False,)  # five local layers, then a global one
LONG = SamplingParams(max_new_tokens=14, temperature=0.0)


def gemma_config(**overrides):
    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4,
        num_kv_heads=1, head_dim=16, rope_theta=500.0, rope_scaling={"rope_type": "linear",
        "factor": 2.0}, local_rope_theta=10.0, tie_word_embeddings=True,
        hidden_act="gelu_pytorch_tanh", norm_offset=True, sandwich_norms=True, qk_norm=True,
        embedding_scale=True, query_pre_attn_scalar=24.0, sliding_window=WINDOW,
        windowed_layers=PATTERN,
    )  # fmt: skip
    fields.update(overrides)
    return LlamaConfig(**fields)


def random_gemma(config=None, seed=0):
    model = random_model(config or gemma_config(), seed=seed)
    # Gemma's norm weights start at zero (a scale of one): draw them so a wrong norm shows.
    key = jax.random.key(seed + 1)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and "scale" in map(str, path):
            key, draw = jax.random.split(key)
            value = variable.get_value()
            variable.set_value(jax.random.uniform(draw, value.shape, value.dtype, -0.5, 0.5))
    return model


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_gemma()


@pytest.mark.parametrize(
    "change",
    [
        {"local_rope_theta": 500.0},
        {"query_pre_attn_scalar": None},
        {"hidden_act": "silu"},
        {"windowed_layers": (True,) * 6},
        {"embedding_scale": False},
    ],
)
def test_every_gemma_option_changes_the_reference(model, change):
    """The dense reference is sensitive to each option the engine must get right."""
    tokens = list(np.random.default_rng(0).integers(0, 64, 24))
    other = nnx.merge(*nnx.split(model))
    other.config = dataclasses.replace(model.config, **change)
    assert not np.allclose(dense_logits(model, tokens), dense_logits(other, tokens), atol=1e-3)


@pytest.mark.parametrize("device_pages", [60, 12])
def test_gemma_greedy_equals_the_dense_reference(model, device_pages):
    """Prompts of 3 to 6 windows with a shared 13-token prefix, chunked over a 16-token
    budget; 12 device pages force suspensions to the host."""
    rng = np.random.default_rng(device_pages)
    prompts = prompts_with_shared_prefix(rng, 13, [5, 20, 17, 24])
    scheduler = SchedulerConfig(max_batch_size=4, max_num_tokens=16, chunk_unit=4)
    engine = make_engine(model, device_pages=device_pages, host_pages=64, scheduler=scheduler)
    outputs = serve_checked(engine, prompts, LONG)
    cap = engine.manager.max_seq_len
    for prompt, output in zip(prompts, outputs, strict=True):
        assert len(prompt) + len(output.token_ids) >= min(cap, len(prompt) + 14)
        assert output.token_ids == dense_greedy(model, prompt, len(output.token_ids))
    # One pool per layer group: the windowed group gives back stale pages; every group
    # reuses the 13 shared tokens, the partial block copied in each.
    assert isinstance(engine.manager, GroupedKVCacheManager)
    assert engine.manager.managers[0].pages.life_cycle.window == WINDOW
    assert max(o.metrics.num_reused_tokens for o in outputs) >= 13
    if device_pages == 12:
        assert sum(o.metrics.num_preemptions for o in outputs) > 0
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_gemma_speculative_decoding_is_exact(model):
    rng = np.random.default_rng(9)
    base = list(rng.integers(0, 64, 5))
    prompts = [base * 4, [*base[:3], *base] * 3]
    engine = make_engine(model, speculative=SpeculativeConfig(NgramDrafter(), 3))
    outputs = serve_checked(engine, prompts, LONG)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt, LONG.max_new_tokens)
    engine.shutdown()


def test_a_gemma_checkpoint_round_trips(model, tmp_path):
    save_hf_checkpoint(model, tmp_path, model_type="gemma3_text")
    loaded = load_hf_checkpoint(tmp_path, dtype=np.float32)
    assert loaded.config == model.config
    tokens = list(np.random.default_rng(1).integers(0, 64, 20))
    np.testing.assert_allclose(dense_logits(loaded, tokens), dense_logits(model, tokens), atol=1e-5)


HF_GEMMA3_1B = {  # google/gemma-3-1b-it's config.json, shrunk
    "model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "rope_scaling": None, "sliding_window": 512, "sliding_window_pattern": 6,
    "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "eos_token_id": [1, 106],
}  # fmt: skip


def test_gemma3_configs_in_each_hugging_face_layout():
    old = LlamaConfig.from_hf(HF_GEMMA3_1B)  # every sixth layer global
    assert old.layer_windows == (512,) * 5 + (None,) + (512,) * 2
    assert old.tie_word_embeddings and old.norm_offset and old.attention_scale == 256**-0.5
    assert (old.rope_theta, old.local_rope_theta, old.rope_scaling) == (1e6, 1e4, None)
    kinds = ["sliding_attention"] * 3 + ["full_attention"]
    new = LlamaConfig.from_hf(
        {**HF_GEMMA3_1B, "layer_types": kinds * 2, "rope_scaling": None, "rope_theta": None,
         "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    )  # fmt: skip
    assert new.layer_windows == ((512,) * 3 + (None,)) * 2
    assert new.rope_scaling == (("factor", 8.0),) and new.local_rope_theta == 1e4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        ({"hidden_activation": "relu"}, "hidden_act='relu' is not supported"),
        ({"model_type": "gemma3"}, "model_type='gemma3' is not supported"),
        ({"model_type": "gemma2"}, "model_type='gemma2' is not supported"),
    ],
)
def test_unsupported_gemma_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf({**HF_GEMMA3_1B, **change})


def test_a_gemma_model_saved_as_qwen2_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="model_type='qwen2' cannot express the norms"):
        save_hf_checkpoint(model, tmp_path, model_type="qwen2")


def test_a_deep_interleaved_model_scans_its_pattern_in_place(compile_cache):
    """14 layers of 5 local and 1 global: the forward scans the 6-layer pattern twice, then the
    last 2 local layers; the step keeps the donated pool in place and serves the reference's
    tokens."""
    import jax.numpy as jnp

    from kvjax.engine.compile import model_registry
    from kvjax.runtime.buckets import BucketKey
    from kvjax.runtime.step import StepInputs, allow_compile
    from models.llama import layer_plan

    flags = (PATTERN * 3)[:14]
    # Two KV heads: with one, XLA on the CPU copies the pool's rows around each layer whatever
    # the loop (a layout quirk of the unit axis; Llama's layers show it too).
    config = gemma_config(num_layers=14, windowed_layers=flags, num_kv_heads=2)
    deep = random_gemma(config, seed=5)
    windows = deep.config.layer_windows
    assert layer_plan(windows) == (6, 2, [(0, 5, WINDOW), (5, 6, None)], [(12, 14, WINDOW)])
    registry, params = model_registry(deep, impl="xla")
    pool_shape = (9, 14, 2, 2, 4, 16)
    with allow_compile():
        registry.warmup(
            params, jnp.zeros(pool_shape, jnp.float32),
            lambda key: StepInputs.placeholder(key, 8), [BucketKey(2, 8, 0)],
        )  # fmt: skip
    text = registry._executables[BucketKey(2, 8, 0)].as_text()
    pool_type = "f32[" + ",".join(map(str, pool_shape)) + "]"
    assert not [line for line in text.splitlines() if pool_type in line and " copy(" in line]
    # A pool per layer group (12 local layers, 2 global), page tables side by side: each
    # group's donated pool is updated in place too.
    groups = tuple(0 if flag else 1 for flag in flags)
    registry, params = model_registry(deep, impl="xla", layer_groups=groups)
    pools = (jnp.zeros((9, 12, 2, 2, 4, 16)), jnp.zeros((9, 2, 2, 2, 4, 16)))
    with allow_compile():
        registry.warmup(
            params, pools, lambda key: StepInputs.placeholder(key, 16), [BucketKey(2, 8, 0)]
        )
    text = registry._executables[BucketKey(2, 8, 0)].as_text()
    for pool in pools:
        pool_type = "f32[" + ",".join(map(str, pool.shape)) + "]"
        assert not [line for line in text.splitlines() if pool_type in line and " copy(" in line]
    prompts = prompts_with_shared_prefix(np.random.default_rng(4), 5, [9, 16])
    engine = make_engine(deep)
    outputs = serve_checked(engine, prompts, LONG)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(deep, prompt, LONG.max_new_tokens)
    engine.shutdown()


def test_a_long_gemma_generation_holds_its_windows_pages_and_the_global_history(model):
    """Five local layers per global one, each group in its own pool: as the engine decodes 48
    tokens past a 12-token prompt, the local group holds its window's pages while the global
    group holds every block, and the bytes held stay below half of one pool of every layer."""
    prompt = list(np.random.default_rng(5).integers(0, 64, 12))
    params = SamplingParams(max_new_tokens=48, temperature=0.0)
    engine = make_engine(model)
    engine.add_request(prompt, params)
    local, full = engine.manager.managers
    held, outputs = [], []
    while engine.num_unfinished:
        outputs += engine.step()
        engine.manager.check_invariants()
        held.append([sum(len(c.held_pages()) for c in m.live_caches) for m in (local, full)])
    assert max(local_held for local_held, _ in held[4:]) <= 4
    local_held, full_held = max(held, key=lambda pair: pair[1])
    assert full_held == -(-(12 + 48) // 4)  # every block of the sequence
    held_bytes = local_held * local.config.page_bytes + full_held * full.config.page_bytes
    every_layer = full_held * (local.config.page_bytes + full.config.page_bytes)
    assert held_bytes / every_layer < 0.5
    (output,) = [o for o in outputs if o.finished]
    assert output.token_ids == dense_greedy(model, prompt, 48)
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_guaranteed_no_evict_keeps_one_pool(model):
    """Whole-life reservations grow every group by the whole sequence, which a windowed
    group's pool is not sized for: such an engine keeps one pool, and serves exactly."""
    from kvjax.cache import KVCacheManager
    from kvjax.serving.scheduler import SchedulerPolicy

    scheduler = SchedulerConfig(
        max_batch_size=4, max_num_tokens=16, chunk_unit=4,
        policy=SchedulerPolicy.GUARANTEED_NO_EVICT,
    )  # fmt: skip
    engine = make_engine(model, scheduler=scheduler)
    assert isinstance(engine.manager, KVCacheManager)
    prompts = prompts_with_shared_prefix(np.random.default_rng(2), 5, [9, 14])
    outputs = serve_checked(engine, prompts, LONG)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt, LONG.max_new_tokens)
    engine.shutdown()
