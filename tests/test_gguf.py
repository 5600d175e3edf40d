"""GGUF loading: files the tests write from a known float model, in every supported tensor type,
give that model's logits (exactly for F32; for a quantized file, exactly those of the float model
with its weights rounded as the file stores them, and near the float model's)."""

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_files import Q, permute_rotary, round_trip, write_gguf

from models.config import rope_frequencies
from models.gguf_loader import _unpermute_rotary, gguf_config, load_gguf_checkpoint, open_gguf
from models.loader import build_model, hf_tensors
from tests.dense_llama import dense_logits
from tests.test_llama import random_model, tiny_config

TOKENS = [1, 5, 9, 13, 2, 60, 33, 7]
# max |logits - float model's| / max |float model's logits| that each type's rounding allows.
TOLERANCE = {Q.F16: 0.01, Q.BF16: 0.03, Q.Q8_0: 0.05, Q.Q6_K: 0.1, Q.Q5_0: 0.2, Q.Q5_1: 0.2,
             Q.Q4_0: 0.4, Q.Q4_1: 0.4, Q.Q4_K: 0.4}  # fmt: skip


def gguf_ready_config(**overrides):
    """Rows of 256 so that every type, K-quants included, fits whole blocks."""
    fields = dict(hidden_size=256, intermediate_size=512, head_dim=64, eos_token_ids=(2,))
    return tiny_config(**{**fields, **overrides})


def test_f32_file_gives_the_float_models_logits_exactly(tmp_path):
    config = gguf_ready_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = random_model(config, seed=4)
    loaded = load_gguf_checkpoint(write_gguf(model, tmp_path / "m.gguf"), dtype=jnp.float32)
    assert loaded.config == config
    np.testing.assert_array_equal(dense_logits(loaded, TOKENS), dense_logits(model, TOKENS))


def test_qwen2_files_keep_their_rotary_rows_and_biases(tmp_path):
    # llama.cpp permutes Q and K for the Llama architecture only; Qwen2 has q/k/v biases.
    config = gguf_ready_config(rope_scaling=None, qkv_bias=True, tie_word_embeddings=True)
    model = random_model(config, seed=12)
    path = write_gguf(model, tmp_path / "qwen2.gguf", arch="qwen2")
    loaded = load_gguf_checkpoint(path, dtype=jnp.float32)
    assert loaded.config == config
    np.testing.assert_array_equal(dense_logits(loaded, TOKENS), dense_logits(model, TOKENS))


def test_llama3_rope_scaling_comes_from_the_rope_freqs_tensor(tmp_path):
    model = random_model(gguf_ready_config(num_layers=1), seed=4)  # Llama 3 scaling
    loaded = load_gguf_checkpoint(write_gguf(model, tmp_path / "m.gguf"), dtype=jnp.float32)
    # llama.cpp keeps only the per-frequency factors, so the config shows no scaling.
    assert loaded.config == dataclasses.replace(model.config, rope_scaling=None)
    np.testing.assert_allclose(loaded.inv_freq.get_value(), model.inv_freq.get_value(), rtol=1e-6)
    assert not np.allclose(loaded.inv_freq.get_value(), rope_frequencies(loaded.config))


@pytest.mark.parametrize("kind", sorted(TOLERANCE, key=lambda kind: kind.value))
def test_quantized_files_give_the_rounded_models_logits(tmp_path, kind):
    config = gguf_ready_config(rope_scaling={"rope_type": "linear", "factor": 2.0},
                               tie_word_embeddings=True, num_layers=1)  # fmt: skip
    model = random_model(config, seed=5)
    loaded = load_gguf_checkpoint(write_gguf(model, tmp_path / "m.gguf", kind), dtype=jnp.float32)
    assert loaded.config == config
    rounded_tensors = {
        name: round_trip(value, kind) if value.ndim == 2 else value
        for name, value in hf_tensors(model).items()
    }
    rounded = build_model(config, rounded_tensors, dtype=jnp.float32, source="rounded")
    logits = dense_logits(loaded, TOKENS)
    np.testing.assert_allclose(logits, dense_logits(rounded, TOKENS), rtol=1e-5, atol=1e-5)
    exact = dense_logits(model, TOKENS)
    assert np.abs(logits - exact).max() / np.abs(exact).max() < TOLERANCE[kind]


def test_unpermute_inverts_llama_cpps_rotary_permutation():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        permuted = permute_rotary(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(_unpermute_rotary(permuted, heads), weight)


def test_bad_files_raise_naming_the_file_and_the_problem(tmp_path):
    model = random_model(gguf_ready_config(num_layers=1), seed=6)
    with pytest.raises(ValueError, match=r"missing.gguf: no such GGUF file"):
        load_gguf_checkpoint(tmp_path / "missing.gguf")
    path = write_gguf(model, tmp_path / "m.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.gguf: not a readable GGUF file"):
        load_gguf_checkpoint(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ValueError, match=r"text.gguf: not a readable GGUF file"):
        load_gguf_checkpoint(tmp_path / "text.gguf")
    yarn = {"llama.rope.scaling.type": "yarn"}
    write_gguf(model, tmp_path / "yarn.gguf", metadata=yarn)
    with pytest.raises(ValueError, match=r"yarn.gguf: llama.rope.scaling.type='yarn' is not"):
        load_gguf_checkpoint(tmp_path / "yarn.gguf")
    heads = {"llama.attention.head_count_kv": (4, gguf.GGUFValueType.UINT32)}
    write_gguf(model, tmp_path / "heads.gguf", metadata=heads)
    with pytest.raises(ValueError, match=r"heads.gguf: tensor model.layers.0.self_attn.k_proj"):
        load_gguf_checkpoint(tmp_path / "heads.gguf")


def test_unsupported_architecture_and_tensor_type_are_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.close):
        write()
    with pytest.raises(ValueError, match=r"general.architecture='phi3' is not supported"):
        gguf_config(open_gguf(tmp_path / "phi.gguf"))
    model = random_model(gguf_ready_config(num_layers=1), seed=7)
    path = write_gguf(model, tmp_path / "q2.gguf", Q.Q2_K)  # bytes the loader does not decode
    with pytest.raises(ValueError, match=r"q2.gguf: tensor token_embd.weight has type Q2_K; supp"):
        load_gguf_checkpoint(path)


def test_a_missing_metadata_key_is_named(tmp_path):
    model = random_model(gguf_ready_config(num_layers=1), seed=8)
    path = write_gguf(model, tmp_path / "m.gguf")
    reader = open_gguf(path)
    del reader.fields["llama.block_count"]
    with pytest.raises(ValueError, match=r"m.gguf: metadata key 'llama.block_count' is missing"):
        gguf_config(reader)


def test_each_tensor_is_dequantized_once(tmp_path, monkeypatch):
    model = random_model(gguf_ready_config(num_layers=2), seed=9)
    path = write_gguf(model, tmp_path / "m.gguf", Q.Q8_0)
    reader = open_gguf(path)
    calls = []
    dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: calls.append(1) or dequantize(*a))
    load_gguf_checkpoint(path, dtype=jnp.float32, reader=reader)
    assert len(calls) == len(reader.tensors)  # rope_freqs included


def test_load_model_refuses_a_sentencepiece_vocabulary_before_the_weights(tmp_path, monkeypatch):
    from kvjax.engine import checkpoints

    model = random_model(gguf_ready_config(num_layers=1), seed=10)
    path = write_gguf(
        model, tmp_path / "spm.gguf", tokenizer=lambda w: w.add_tokenizer_model("llama")
    )
    monkeypatch.setattr(checkpoints, "load_gguf_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"spm.gguf: tokenizer.ggml.model 'llama' is not supp"):
        checkpoints.load_model(path)
