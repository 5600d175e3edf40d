"""Loading a local Hugging Face checkpoint directory into a `Llama` (and writing one, for tests and
for users who fine-tune in JAX).

A directory holds `config.json` and `model.safetensors`, or shards named by
`model.safetensors.index.json`. Hugging Face stores linear weights `[out, in]`; NNX kernels are
`[in, out]`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from models.config import LlamaConfig, rope_frequencies
from models.llama import Llama

__all__ = ["build_model", "hf_tensors", "load_hf_checkpoint", "save_hf_checkpoint"]


def _targets(model: Llama) -> dict[str, tuple[nnx.Variable, bool, int | None]]:
    """Hugging Face name -> (the model's variable, whether the tensor is a transposed kernel,
    its layer in the variable's stack or None for a variable of its own)."""
    targets = {"model.embed_tokens.weight": (model.embed_tokens.embedding, False, None)}
    targets["model.norm.weight"] = (model.norm.scale, False, None)
    if model.lm_head is not None:
        targets["lm_head.weight"] = (model.lm_head.kernel, True, None)
    layers = model.layers  # every array stacks the layers on axis 0
    for index in range(model.config.num_layers):
        prefix = f"model.layers.{index}."
        norms = ["input_layernorm", "post_attention_layernorm"]
        if model.config.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for name in norms:
            targets[f"{prefix}{name}.weight"] = (getattr(layers, name).scale, False, index)
        if model.config.qk_norm:
            for name in ("q_norm", "k_norm"):
                norm = getattr(layers.self_attn, name)
                targets[f"{prefix}self_attn.{name}.weight"] = (norm.scale, False, index)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(layers.self_attn, name)
            targets[f"{prefix}self_attn.{name}.weight"] = (linear.kernel, True, index)
            if linear.bias is not None:
                targets[f"{prefix}self_attn.{name}.bias"] = (linear.bias, False, index)
        for name in ("gate_proj", "up_proj", "down_proj"):
            targets[f"{prefix}mlp.{name}.weight"] = (getattr(layers.mlp, name).kernel, True, index)
    return targets


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return load_file(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            if not (path / shard).exists():
                raise ValueError(f"{path}: shard {shard} named by the index is missing")
            tensors.update(load_file(path / shard))
        return tensors
    raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def load_hf_checkpoint(path: str | Path, *, dtype=jnp.bfloat16, mesh=None) -> Llama:
    """A `Llama` with the checkpoint's weights cast to `dtype`; its config travels with it.

    Args:
        mesh: tensor parallelism (`kvjax.runtime.sharding.tensor_parallel_mesh`): each weight
            goes from host memory straight to its shards (`Llama.partition_specs`), so no
            device ever holds the whole model. Default: the default device.

    Raises:
        ValueError: an unsupported architecture, a missing file, or a missing or misshapen tensor
            (named, with the expected shape).
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise ValueError(f"{path} has no config.json")
    config = LlamaConfig.from_hf(json.loads(config_path.read_text()))
    return build_model(config, _read_tensors(path), dtype=dtype, mesh=mesh, source=path)


def build_model(
    config: LlamaConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    dtype=jnp.bfloat16,
    mesh=None,
    source: str | Path,
    inv_freq: np.ndarray | None = None,
) -> Llama:
    """A `Llama` of `config` holding `tensors` (Hugging Face names and `[out, in]` layouts, read
    once each: a lazy mapping keeps one tensor in float32 at a time), cast to `dtype`;
    `inv_freq` overrides the RoPE frequencies the config gives (a GGUF file's `rope_freqs`).
    Errors name `source`."""
    # Shapes only: the weights come from the checkpoint, so none are drawn at random.
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    model.inv_freq.set_value(rope_frequencies(config) if inv_freq is None else inv_freq)
    model.local_inv_freq.set_value(rope_frequencies(config, local=True))
    targets = _targets(model)
    unused = sorted(
        name
        for name in set(tensors) - set(targets)
        if not name.endswith("rotary_emb.inv_freq")
        and not (name == "lm_head.weight" and config.tie_word_embeddings)
    )
    if unused:
        raise ValueError(f"{source}: tensors the model has no place for: {unused[:5]}")
    stacks: dict[int, tuple[nnx.Variable, np.ndarray]] = {}  # id -> (variable, host stack)
    for name, (variable, transposed, index) in targets.items():
        shape = variable.get_value().shape[0 if index is None else 1 :]
        hf_shape = list(shape[::-1] if transposed else shape)
        if name not in tensors:
            raise ValueError(f"{source}: tensor {name} is missing (shape {hf_shape})")
        tensor = tensors[name]
        value = tensor.T if transposed else tensor
        if value.shape != shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {list(tensor.shape)}; the config "
                f"needs {hf_shape}"
            )
        if index is None:
            variable.set_value(np.asarray(value, dtype))  # host memory until placed below
            continue
        if id(variable) not in stacks:
            full = (config.num_layers, *shape)
            stacks[id(variable)] = (variable, np.empty(full, jnp.dtype(dtype)))
        stacks[id(variable)][1][index] = value
    for variable, stack in stacks.values():
        variable.set_value(stack)
    return _place(model, mesh)


def _place(model: Llama, mesh) -> Llama:
    """Moves the host weights to the default device, or straight to their shards on `mesh`."""
    state = nnx.state(model)
    if mesh is None:
        state = jax.tree.map(jnp.asarray, state)
    else:
        from kvjax.runtime.sharding import shard_params

        state = shard_params(state, model.partition_specs(), mesh)
    nnx.update(model, state)
    return model


def hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The model's weights under Hugging Face names and layouts (float32 numpy)."""
    tensors = {}
    for name, (variable, transposed, index) in _targets(model).items():
        value = np.asarray(variable.get_value(), np.float32)
        value = value if index is None else value[index]
        tensors[name] = np.ascontiguousarray(value.T if transposed else value)
    return tensors


def save_hf_checkpoint(model: Llama, path: str | Path, *, model_type: str = "llama") -> None:
    """Writes `config.json` and `model.safetensors` that `load_hf_checkpoint` (and Hugging Face
    transformers) read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf_config = {
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None
        if c.rope_scaling is None
        else {
            "rope_type": "llama3" if len(c.rope_scaling) > 1 else "linear",
            **dict(c.rope_scaling),
        },
        "tie_word_embeddings": c.tie_word_embeddings,
        # Qwen2 always has q/k/v bias; Llama's attention_bias covers q/k/v and o together.
        "attention_bias": False if model_type == "qwen2" else c.o_bias,
    }
    if c.sliding_window is not None:
        if model_type == "llama":
            raise ValueError("model_type='llama' has no sliding window; use 'mistral'")
        hf_config.update(sliding_window=c.sliding_window, use_sliding_window=True)
        if model_type == "qwen2":
            hf_config["max_window_layers"] = 0
        if c.windowed_layers is not None:
            kinds = ("full_attention", "sliding_attention")
            hf_config["layer_types"] = [kinds[flag] for flag in c.windowed_layers]
    gemma = (c.norm_offset, c.sandwich_norms, c.qk_norm, c.embedding_scale)
    if gemma != ((model_type == "gemma3_text"),) * 4:
        raise ValueError(f"model_type={model_type!r} cannot express the norms and scales {gemma}")
    if model_type == "gemma3_text":
        hf_config.update(
            hidden_activation=c.hidden_act,
            query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
            rope_local_base_freq=c.local_rope_theta or c.rope_theta,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
        )
    elif c.hidden_act != "silu" or c.local_rope_theta or c.query_pre_attn_scalar:
        raise ValueError(f"model_type={model_type!r} has no hidden_act, local RoPE or query scalar")
    if c.eos_token_ids:
        eos = c.eos_token_ids
        hf_config["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    qwen2 = model_type == "qwen2"
    if not ((c.qkv_bias and not c.o_bias) if qwen2 else c.qkv_bias == c.o_bias):
        raise ValueError(
            f"model_type={model_type!r} cannot express qkv_bias={c.qkv_bias}, o_bias={c.o_bias}"
        )
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(hf_tensors(model), path / "model.safetensors")
