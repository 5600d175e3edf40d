"""GGUF files written by the tests from a known float model, as llama.cpp's converter writes them
(rotary rows of Q and K permuted, llama.cpp names, quantized 2-D weights, float32 norms).

`gguf` quantizes F16, BF16, Q8_0 and the 32-wide types itself; it only dequantizes the K-quants,
so round-to-nearest encoders of Q4_K and Q6_K live here (their layouts are checked against
`gguf`'s dequantizer by the tests).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np

from models.config import rope_frequencies
from models.loader import hf_tensors

Q = gguf.GGMLQuantizationType
QK_K = 256


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """uint8[rows, 144 * cols / 256]: 8 sub-blocks of 32 per block, `d * scale * q - dmin * min`
    with 6-bit scales and mins and 4-bit q."""
    blocks = values.reshape(-1, 8, 32).astype(np.float32)
    low = np.minimum(blocks.min(axis=2), 0.0)
    scale = (blocks.max(axis=2) - low) / 15.0
    d = (scale.max(axis=1) / 63.0).astype(np.float16)
    dmin = (-low.min(axis=1) / 63.0).astype(np.float16)
    safe = lambda x: np.where(x == 0, 1.0, x.astype(np.float32))  # noqa: E731
    sc = np.clip(np.rint(scale / safe(d)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-low / safe(dmin)[:, None]), 0, 63).astype(np.uint8)
    step = safe(d)[:, None] * np.maximum(sc, 1)
    shifted = blocks + (dmin.astype(np.float32)[:, None] * mn)[:, :, None]
    q = np.clip(np.rint(shifted / step[:, :, None]), 0, 15).astype(np.uint8)
    packed = np.zeros((len(blocks), 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    raw = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                          packed, qs], axis=1)  # fmt: skip
    return raw.reshape(values.shape[0], -1)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """uint8[rows, 210 * cols / 256]: 16 sub-blocks of 16 per block, `d * scale * (q - 32)` with
    int8 scales and 6-bit q split into low nibbles and high bit pairs."""
    blocks = values.reshape(-1, 16, 16).astype(np.float32)
    scale = np.abs(blocks).max(axis=2) / 31.0
    d = (scale.max(axis=1) / 127.0).astype(np.float16)
    safe_d = np.where(d == 0, 1.0, d.astype(np.float32))
    sc = np.clip(np.rint(scale / safe_d[:, None]), 1, 127).astype(np.int8)
    step = safe_d[:, None] * sc
    q = (np.clip(np.rint(blocks / step[:, :, None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # [block, half, k, l]: value 128 * half + 32 * k + l
    ql = np.concatenate(
        [q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4],
        axis=2,
    ).reshape(-1, 128)
    qh = sum((q[:, :, k] >> 4) << (2 * k) for k in range(4)).astype(np.uint8).reshape(-1, 64)
    raw = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return raw.reshape(values.shape[0], -1)


def encode(values: np.ndarray, kind: Q) -> np.ndarray:
    """The bytes (or float array) `gguf`'s writer takes for `values` as `kind`."""
    if kind == Q.F32:
        return values.astype(np.float32)
    if kind == Q.Q4_K:
        return quantize_q4_k(values)
    if kind == Q.Q6_K:
        return quantize_q6_k(values)
    try:
        return gguf.quants.quantize(values.astype(np.float32), kind)
    except NotImplementedError:  # a type kvjax refuses: its size is enough
        return np.zeros(gguf.quants.quant_shape_to_byte_shape(values.shape, kind), np.uint8)


def permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows from rotate-half order to interleaved pairs."""
    head_dim = weight.shape[0] // num_heads
    pairs = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def gguf_name(hf_name: str) -> str:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in names:
        return names[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    parts = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[module]}.{kind}"


def model_tensors(model, permute: bool = True) -> dict[str, np.ndarray]:
    """The model's float32 weights as llama.cpp's converter leaves them (names, and for the
    Llama architecture the rotary permutation)."""
    config = model.config
    tensors = {}
    for name, value in hf_tensors(model).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if permute and ".q_proj." in name:
            value = permute_rotary(value, config.num_heads)
        elif permute and ".k_proj." in name:
            value = permute_rotary(value, config.num_kv_heads)
        tensors[gguf_name(name)] = value
    return tensors


def write_gguf(
    model, path: Path, kind: Q = Q.F32, *, metadata=None, tokenizer=None, arch: str = "llama"
) -> Path:
    """Writes `model` as llama.cpp would: 2-D weights as `kind`, vectors as F32; Llama 3's RoPE
    scaling as a `rope_freqs` tensor. `metadata` overrides keys (value, or (value, type));
    `tokenizer(writer)` adds tokenizer metadata."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    for eos in c.eos_token_ids[:1]:
        writer.add_eos_token_id(eos)
    if c.rope_scaling is not None and len(c.rope_scaling) == 1:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(dict(c.rope_scaling)["factor"])
    for key, value in (metadata or {}).items():
        value, kind_of_value = value if isinstance(value, tuple) else (value, None)
        writer.add_key_value(key, value, kind_of_value or gguf.GGUFValueType.get_type(value))
    if tokenizer is not None:
        tokenizer(writer)
    if c.rope_scaling is not None and len(c.rope_scaling) > 1:  # llama3: factors per frequency
        plain = rope_frequencies(dataclasses.replace(c, rope_scaling=None))
        writer.add_tensor("rope_freqs.weight", plain / rope_frequencies(c))
    for name, value in model_tensors(model, permute=arch == "llama").items():
        tensor_kind = kind if value.ndim == 2 else Q.F32
        encoded = encode(value, tensor_kind)
        writer.add_tensor(name, encoded, raw_dtype=None if tensor_kind == Q.F32 else tensor_kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def round_trip(values: np.ndarray, kind: Q) -> np.ndarray:
    """float32 `values` as the file stores them: quantized as `kind`, then dequantized."""
    encoded = encode(values, kind)
    return gguf.quants.dequantize(encoded, kind).reshape(values.shape).astype(np.float32)
