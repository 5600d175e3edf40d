"""The paged Llama forward equals the dense reference for prefill, chunked prefill over a cached
prefix, decode, verification rows and embedding overrides; the HF loader round-trips."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax.runtime.step import StepInputs
from models.config import LlamaConfig, rope_frequencies
from models.llama import Llama
from models.loader import load_hf_checkpoint, save_hf_checkpoint
from tests.dense_llama import dense_greedy, dense_logits

TPB, MAX_BLOCKS = 4, 6
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_config(**overrides):
    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=500.0, rope_scaling=LLAMA3_SCALING,
    )  # fmt: skip
    fields.update(overrides)
    return LlamaConfig(**fields)


def random_model(config, dtype=jnp.float32, seed=0):
    model = Llama(config, dtype=dtype, rngs=nnx.Rngs(seed))
    # Norm scales start at one; perturb them so a wrong norm weight shows.
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and variable.get_value().ndim == 1:
            noise = jax.random.uniform(jax.random.key(seed), variable.get_value().shape, minval=0.5)
            variable.set_value((noise * 1.5).astype(variable.get_value().dtype))
    return model


class Sequences:
    """Each sequence owns MAX_BLOCKS pages of a permuted pool; tracks its tokens."""

    def __init__(self, count, rng):
        pages = 1 + rng.permutation(count * MAX_BLOCKS)
        self.tables = pages.reshape(count, MAX_BLOCKS).astype(np.int32)
        self.tokens = [[] for _ in range(count)]

    def step(self, new_tokens, all_logits=()):
        """Inputs appending `new_tokens[i]` to sequence i (the first len(new_tokens) step); logits
        of each sequence's last row, or of every new row for the sequences in `all_logits`."""
        q_lens = [len(t) for t in new_tokens]
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        rows = []
        for seq in range(len(q_lens)):
            rows += list(range(cu[seq], cu[seq + 1])) if seq in all_logits else [cu[seq + 1] - 1]
            self.tokens[seq] += list(new_tokens[seq])
        return StepInputs(
            tokens=jnp.asarray(np.concatenate(new_tokens).astype(np.int32)),
            page_table=jnp.asarray(self.tables[: len(q_lens)]),
            kv_lens=jnp.asarray([len(t) for t in self.tokens[: len(q_lens)]], jnp.int32),
            cu_q_lens=jnp.asarray(cu),
            num_seqs=jnp.array([len(q_lens)], jnp.int32),
            logits_indices=jnp.asarray(rows, jnp.int32),
        )


def make_forward(model, impl):
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=1)
    def forward(state, pool, inputs, embeddings=None, mask=None):
        return nnx.merge(graphdef, state)(
            inputs, pool, embeddings=embeddings, embedding_mask=mask, impl=impl
        )

    return functools.partial(forward, state)


def expected_rows(model, seqs, new_tokens, all_logits=(), overrides=None):
    """Dense logits at the rows a step returns."""
    rows = []
    for seq, new in enumerate(new_tokens):
        dense = dense_logits(model, seqs.tokens[seq], *(overrides or {}).get(seq, ()))
        rows += list(dense[-len(new) :]) if seq in all_logits else [dense[-1]]
    return np.stack(rows)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_paged_forward_matches_dense_at_f32(impl):
    rng = np.random.default_rng(0)
    config = tiny_config()
    model = random_model(config)
    forward = make_forward(model, impl)
    pool = jnp.full((1 + 2 * MAX_BLOCKS, 2, 2, 2, TPB, 16), jnp.nan, jnp.float32)
    seqs = Sequences(2, rng)
    image = rng.standard_normal((3, config.hidden_size)).astype(np.float32)

    # Sequence 0's positions 2..4 carry an image's embeddings (given in the first step only).
    image_embeddings = np.zeros((64, config.hidden_size), np.float32)
    image_embeddings[2:5] = image
    image_mask = np.zeros(64, bool)
    image_mask[2:5] = True

    def check(new_tokens, all_logits=(), with_image=False):
        nonlocal pool
        inputs = seqs.step(new_tokens, all_logits)
        embeddings = mask = None
        if with_image:
            embeddings = np.zeros((inputs.tokens.shape[0], config.hidden_size), np.float32)
            mask = np.zeros(inputs.tokens.shape[0], bool)
            count = len(new_tokens[0])
            embeddings[:count], mask[:count] = image_embeddings[:count], image_mask[:count]
        logits, pool = forward(pool, inputs, embeddings, mask)
        length = len(seqs.tokens[0])
        overrides = {0: (image_embeddings[:length], image_mask[:length])}
        expected = expected_rows(model, seqs, new_tokens, all_logits, overrides)
        assert np.allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)
        assert (np.asarray(logits).argmax(-1) == expected.argmax(-1)).all()  # greedy tokens

    prompts = [rng.integers(0, 64, 10).tolist(), rng.integers(0, 64, 7).tolist()]
    check(prompts, with_image=True)  # two whole prompts, one with an image
    check([rng.integers(0, 64, 5).tolist(), [3]])  # a chunk over a cached prefix; a decode row
    check([rng.integers(0, 64, 3).tolist(), [9]], all_logits=(0,))  # verification rows
    check([[1], [2]])  # decode


def test_paged_forward_at_bf16_is_within_tolerance():
    rng = np.random.default_rng(1)
    model = random_model(tiny_config(), dtype=jnp.bfloat16)
    forward = make_forward(model, "pallas")
    pool = jnp.zeros((1 + 2 * MAX_BLOCKS, 2, 2, 2, TPB, 16), jnp.bfloat16)
    seqs = Sequences(2, rng)
    for new_tokens in ([rng.integers(0, 64, 9).tolist(), [5, 6]], [[7], [8]]):
        inputs = seqs.step(new_tokens)
        logits, pool = forward(pool, inputs)
        expected = expected_rows(model, seqs, new_tokens)
        error = np.linalg.norm(np.asarray(logits) - expected) / np.linalg.norm(expected)
        assert error < 3e-2


def test_llama3_rope_scaling_slows_only_long_wavelengths():
    plain = rope_frequencies(tiny_config(rope_scaling=None))
    scaled = rope_frequencies(tiny_config())
    wavelength = 2 * np.pi / plain
    assert np.allclose(scaled[wavelength < 16 / 4], plain[wavelength < 16 / 4])
    assert np.allclose(scaled[wavelength > 16], plain[wavelength > 16] / 8)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_hf_checkpoint_round_trip(tmp_path, model_type):
    config = tiny_config(
        qkv_bias=True, o_bias=model_type == "llama", tie_word_embeddings=True, eos_token_ids=(7, 9)
    )
    model = random_model(config, seed=3)
    save_hf_checkpoint(model, tmp_path, model_type=model_type)
    loaded = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    assert loaded.config == config
    tokens = [1, 5, 9, 13, 2]
    np.testing.assert_array_equal(dense_logits(loaded, tokens), dense_logits(model, tokens))


def test_hf_loader_rejects_broken_checkpoints(tmp_path):
    model = random_model(tiny_config(), seed=4)
    save_hf_checkpoint(model, tmp_path)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight is missing"):
        load_hf_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"has no config\.json"):
        load_hf_checkpoint(tmp_path / "nowhere")


def test_served_model_steps_never_compile_and_keep_the_pool_in_place():
    from kvjax.engine.compile import model_registry
    from kvjax.runtime.buckets import Buckets
    from kvjax.runtime.step import allow_compile

    rng = np.random.default_rng(2)
    model = random_model(tiny_config())
    registry, params = model_registry(model, impl="xla")
    buckets = Buckets(batch_sizes=[1, 2], token_counts=[1, 2, 8, 16], draft_lengths=[0, 2])
    pool = jnp.zeros((1 + 2 * MAX_BLOCKS, 2, 2, 2, TPB, 16), jnp.float32)
    seqs = Sequences(2, rng)

    def example(key):
        return StepInputs.placeholder(key, MAX_BLOCKS)

    with allow_compile():
        registry.warmup(params, pool, example, buckets.keys)
    # The donated pool is updated in place: no copy of it, of its rows (the layers' loop
    # carries `[pages * layers, ...]`, seen by the kernels as a pool of one layer) or of the
    # transposed embedding table, in any bucket (a one-token write is a dynamic-update-slice).
    pool_shapes = ("f32[13,2,2,2,4,16]", "f32[26,2,2,4,16]", "f32[26,1,2,2,4,16]")
    for key in registry.keys:
        text = registry._executables[key].as_text()
        copies = [line for line in text.splitlines() if " copy(" in line or "wrapped_copy" in line]
        assert not [line for line in copies if any(shape in line for shape in pool_shapes)], key
    compiled = registry.stats.compiled
    workload = [
        ([rng.integers(0, 64, 6).tolist()], ()),  # one prompt
        ([rng.integers(0, 64, 3).tolist(), rng.integers(0, 64, 9).tolist()], ()),  # chunk + prompt
        ([[1], [2]], ()),  # decode
        ([[3, 4, 5], [6, 7, 8]], (0, 1)),  # verification rows, 2 draft tokens each
    ]
    for new_tokens, all_logits in workload:
        host = jax.tree.map(np.asarray, seqs.step(new_tokens, all_logits))
        num_logits = host.logits_indices.shape[0]
        key = buckets.pad(len(new_tokens), host.tokens.shape[0], num_logits)
        with jax.no_tracing():  # serving: host inputs in, compiled executable out
            logits, pool = registry(params, pool, host.padded(key))
        expected = expected_rows(model, seqs, new_tokens, all_logits)
        got = np.asarray(logits)[:num_logits]
        assert np.allclose(got, expected, rtol=2e-4, atol=2e-4)
    assert registry.stats.compiled == compiled and registry.stats.fallbacks == 0


def test_hf_loader_reads_sharded_checkpoints_and_per_layer_windows(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = random_model(tiny_config(), seed=5)
    save_hf_checkpoint(model, tmp_path, model_type="mistral")
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, tmp_path / shard)
        weight_map.update(dict.fromkeys(shard_names, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_hf_checkpoint(tmp_path, dtype=jnp.float32)
    np.testing.assert_array_equal(dense_logits(loaded, [4, 2]), dense_logits(model, [4, 2]))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": 4096}))
    assert load_hf_checkpoint(tmp_path).config.sliding_window == 4096  # Mistral's window
    mixed = {**config, "sliding_window": 8, "layer_types": ["sliding_attention", "full"]}
    (tmp_path / "config.json").write_text(json.dumps(mixed))
    assert load_hf_checkpoint(tmp_path).config.layer_windows == (8, None)


def test_hf_configs_of_transformers_5_and_unsupported_options():
    base = {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    }  # fmt: skip
    v5 = LlamaConfig.from_hf(
        {**base, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3_SCALING}}
    )
    assert v5.rope_theta == 500000.0 and dict(v5.rope_scaling)["factor"] == 8.0
    default = LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "default"}})
    assert default.rope_scaling is None and default.rms_norm_eps == 1e-6
    assert default.eos_token_ids == ()
    assert LlamaConfig.from_hf({**base, "eos_token_id": [128001, 128009]}).eos_token_ids == (
        128001,
        128009,
    )
    assert LlamaConfig.from_hf({**base, "eos_token_id": 2}).eos_token_ids == (2,)
    assert hash(v5) != hash(default)  # hashable: usable as a static argument
    qwen2 = LlamaConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 4096})
    assert qwen2.qkv_bias and not qwen2.o_bias  # Qwen2's window is off unless asked for
    assert qwen2.sliding_window is None
    windowed = {**base, "model_type": "qwen2", "sliding_window": 64, "use_sliding_window": True}
    assert LlamaConfig.from_hf({**windowed, "max_window_layers": 0}).sliding_window == 64
    assert LlamaConfig.from_hf({**windowed, "max_window_layers": 1}).sliding_window is None
    qwen2_mixed = LlamaConfig.from_hf({**windowed, "num_hidden_layers": 2, "max_window_layers": 1})
    assert qwen2_mixed.layer_windows == (None, 64)  # Qwen2: windows from max_window_layers on
    with pytest.raises(ValueError, match="windowed_layers has 1 flags for num_layers=2"):
        LlamaConfig(**{**tiny_config().__dict__, "sliding_window": 4, "windowed_layers": (True,)})
    with pytest.raises(ValueError, match="sliding_window=0 must be an int >= 1"):
        LlamaConfig(**{**tiny_config().__dict__, "sliding_window": 0})
    for key, value in (("hidden_act", "gelu"), ("mlp_bias", True)):
        with pytest.raises(ValueError, match=f"{key}="):
            LlamaConfig.from_hf({**base, key: value})
    with pytest.raises(ValueError, match="only llama3"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_hf_loader_refuses_misshapen_and_unknown_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = random_model(tiny_config(), seed=6)
    save_hf_checkpoint(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    good = dict(tensors)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"model.norm.weight has shape \[31\]; the config needs \[32\]"
    ):
        load_hf_checkpoint(tmp_path)
    save_file(
        {**good, "model.layers.0.mlp.up_proj.bias": np.zeros(64, np.float32)},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(ValueError, match="no place for"):
        load_hf_checkpoint(tmp_path)


def test_tied_qwen2_style_model_through_the_paged_forward():
    rng = np.random.default_rng(4)
    config = tiny_config(qkv_bias=True, tie_word_embeddings=True, rope_scaling=None)
    model = random_model(config, seed=7)
    forward = make_forward(model, "xla")
    pool = jnp.full((1 + 2 * MAX_BLOCKS, 2, 2, 2, TPB, 16), jnp.nan, jnp.float32)
    seqs = Sequences(2, rng)
    for new_tokens in ([rng.integers(0, 64, 6).tolist(), [1, 2, 3]], [[4], [5]]):
        logits, pool = forward(pool, seqs.step(new_tokens))
        expected = expected_rows(model, seqs, new_tokens)
        assert np.allclose(np.asarray(logits), expected, rtol=2e-4, atol=2e-4)


def test_truncated_draft_shares_the_first_layers_and_matches_a_dense_truncation():
    from models.llama import truncated_draft

    model = random_model(tiny_config(num_layers=2))
    draft = truncated_draft(model, 1)
    # The whole stack is shared (nothing copied); the draft's layer loop stops after one.
    assert draft.config.num_layers == 1 and draft.layers is model.layers
    assert draft.embed_tokens is model.embed_tokens and draft.lm_head is model.lm_head
    prompt = [3, 1, 4, 1, 5]
    short = random_model(tiny_config(num_layers=1))  # a one-layer model of the same weights
    nnx.update(short, nnx.state(draft, nnx.Not(nnx.PathContains("layers"))))
    nnx.update(short.layers, jax.tree.map(lambda array: array[:1], nnx.state(model.layers)))
    assert dense_greedy(draft, prompt, 4) == dense_greedy(short, prompt, 4)
    with pytest.raises(ValueError, match=r"num_layers=3 must be in \[1, 2\]"):
        truncated_draft(model, 3)
