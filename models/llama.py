"""A Flax NNX Llama family model (Llama 2/3, Qwen2, Mistral, Gemma 3 text) that attends through
the paged pool.

One forward is one serving step: the new tokens of all sequences back to back (`StepInputs`), the
device pool, and optionally embeddings that replace the token embedding at some rows (multimodal
placeholders). Each layer writes its new K/V into the pool (`kernels.kv_write`) and attends over
the pages (`kernels.ragged_paged_attention`); the forward returns the logits of each sequence's
`logits_indices` row and the new pool.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec
from jax.sharding import PartitionSpec as P

from kernels.common import check_impl
from kernels.kv_quant import is_quantized
from kernels.kv_write import write_kv, write_kv_rows_reference
from kernels.ragged_paged_attention import ragged_paged_attention
from kvjax.runtime.page_table import slot_mapping, token_positions
from kvjax.runtime.sharding import TP_AXIS, pool_spec
from kvjax.runtime.step import StepInputs
from models.config import LlamaConfig, rope_frequencies
from models.layers import DecoderLayer, apply_rope, make_norm

__all__ = ["Llama", "apply_rope"]


class Llama(nnx.Module):
    """The model; `config` travels with it. Parameters follow Hugging Face's names."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs) -> None:
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = _stacked(
            [DecoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = make_norm(config, config.hidden_size, dtype)
        self.lm_head = nnx.data(None)  # tied: logits use the embedding table
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                param_dtype=dtype, rngs=rngs,
            )  # fmt: skip
        self.inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(config)))
        self.local_inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(config, local=True)))

    def layer(self, index) -> DecoderLayer:
        """Layer `index` (an int, or traced) as a module of its own: its arrays sliced out of
        the stack."""
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda array: array[index], state))

    def partition_specs(self) -> nnx.State:
        """A `PartitionSpec` over `kvjax.runtime.sharding.TP_AXIS` for every array of
        `nnx.state(self)`: q/k/v, gate and up column-parallel, o and down row-parallel, the rest
        replicated."""
        return _partition_specs(self)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """f32[rows, vocab] from final hidden states [rows, hidden_size]."""
        hidden = self.norm(hidden)
        if self.lm_head is None:  # tied: the embedding table, without a float32 copy of it
            table = self.embed_tokens.embedding.get_value()
            # Contracting both on their last axis: `table.T` made XLA on the CPU copy the
            # transposed table at every step.
            return jax.lax.dot_general(
                hidden.astype(table.dtype), table, (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )  # fmt: skip
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(
        self,
        inputs: StepInputs,
        kv_pool: jax.Array,
        *,
        embeddings: jax.Array | None = None,
        embedding_mask: jax.Array | None = None,
        impl: str = "pallas",
        interpret: bool | None = None,
        mesh: Mesh | None = None,
        layer_groups: tuple[int, ...] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """One step.

        Args:
            inputs: device `StepInputs`; `kv_lens` count the keys once this step's are written.
            kv_pool: [pages, num_layers, 2, num_kv_heads, tokens_per_block, head_dim] (or a
                `kernels.kv_quant.QuantizedPool` of fp8 pages and their scales), or a tuple of
                each layer group's pool (its layers only) when `layer_groups` gives
                each layer's group; the page table then holds each group's table side by side.
            embeddings, embedding_mask: optional [tokens, hidden_size] and bool[tokens]: rows
                where the mask is set take these embeddings instead of the token's (images).
            impl, interpret: passed to the kernels.
            mesh: tensor parallelism: weights sharded by `partition_specs()`, the pool over KV
                heads; the KV write and attention then run per shard on its local heads.

        Returns:
            (f32[num_seqs_bucket, vocab] logits of each sequence's `logits_indices` row, pool).
        """
        config = self.config
        pools = kv_pool if isinstance(kv_pool, tuple) else (kv_pool,)
        groups = layer_groups or (0,) * config.num_layers
        num_tokens = inputs.tokens.shape[0]
        args = (inputs.cu_q_lens, inputs.kv_lens, inputs.num_seqs)
        positions = token_positions(*args, num_tokens)
        width = inputs.page_table.shape[1] // len(pools)
        tables = [inputs.page_table[:, g * width : (g + 1) * width] for g in range(len(pools))]
        slots = [slot_mapping(t, *args, num_tokens, pools[0].shape[4]) for t in tables]
        x = self.embed_tokens(inputs.tokens)
        if config.embedding_scale:  # Gemma: sqrt(hidden_size), rounded to the weights' dtype
            x = x * jnp.asarray(config.hidden_size**0.5, x.dtype)
        if embeddings is not None:
            x = jnp.where(embedding_mask[:, None], embeddings.astype(x.dtype), x)
        # Each layer's row in its group's pool: its rank among the group's layers.
        local = jnp.asarray([groups[:layer].count(g) for layer, g in enumerate(groups)], jnp.int32)
        layer_step = functools.partial(
            self._layer, inputs=inputs, positions=positions, slots=slots, tables=tables,
            local=local, group_sizes=tuple(pool.shape[1] for pool in pools), impl=impl,
            interpret=interpret, mesh=mesh,
        )  # fmt: skip
        # One layer traced and compiled once, looped over the stacked weights: compile time
        # does not grow with depth. The kernels take a static layer, so the loop carries the
        # pool viewed as rows [pages * layers, 2, kv_heads, tokens_per_block, head_dim] (a
        # reshape, no copy), where page p of layer l is row `p * layers + l`.
        rows = tuple(pool.reshape(-1, *pool.shape[2:]) for pool in pools)

        def scan_runs(carry, runs, first_layer=0):  # one scan per run of equal windows
            for start, end, (window, group) in runs:
                layers = first_layer + jnp.arange(start, end, dtype=jnp.int32)
                step = functools.partial(layer_step, window=window, group=group)
                carry, _ = jax.lax.scan(step, carry, layers)
            return carry

        # Runs of layers with the same window in the same pool.
        period, repeats, period_runs, tail_runs = layer_plan(
            tuple(zip(config.layer_windows, groups, strict=True))
        )
        carry = (x, rows)
        if repeats > 1:  # interleaved windows (Gemma's 5:1): a scan over the repeating pattern
            firsts = jnp.arange(repeats, dtype=jnp.int32) * period
            carry, _ = jax.lax.scan(
                lambda c, f: (scan_runs(c, period_runs, f), None), carry, firsts
            )
        x, rows = scan_runs(carry, tail_runs)
        pools = tuple(r.reshape(pool.shape) for r, pool in zip(rows, pools, strict=True))
        return self.logits(x[inputs.logits_indices]), pools if isinstance(
            kv_pool, tuple
        ) else pools[0]

    def _layer(
        self, carry, index, *, inputs, positions, slots, tables, local, group_sizes, impl,
        interpret, mesh, window, group,
    ):  # fmt: skip
        """Decoder layer `index` (traced) on hidden states [tokens, hidden_size] and the rows of
        each group's pool (`__call__`); the layer is in `group`."""
        x, pools = carry
        kv_pool = pools[group]
        config, num_tokens = self.config, x.shape[0]
        layer = self.layer(index)
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).reshape(num_tokens, config.num_heads, config.head_dim)
        k = attn.k_proj(h).reshape(num_tokens, config.num_kv_heads, config.head_dim)
        v = attn.v_proj(h).reshape(num_tokens, config.num_kv_heads, config.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        inv_freq = (self.inv_freq if window is None else self.local_inv_freq).get_value()
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        attend = functools.partial(
            _write_and_attend, num_layers=group_sizes[group], sm_scale=config.attention_scale,
            impl=impl, interpret=interpret, window=window,
        )  # fmt: skip
        if mesh is not None:
            heads = PartitionSpec(None, TP_AXIS, None)
            rows = PartitionSpec(*pool_spec()[1:])  # the pool's spec without the layer axis
            attend = jax.shard_map(
                attend, mesh=mesh, in_specs=(rows, heads, heads, heads, *[P()] * 6),
                out_specs=(heads, rows), check_vma=False,
            )  # fmt: skip
        # fp8 pages take rows of the model's dtype and quantize them as they are written.
        dtype = x.dtype if is_quantized(kv_pool) else kv_pool.dtype
        out, kv_pool = attend(
            kv_pool, q.astype(dtype), k.astype(dtype), v.astype(dtype), slots[group],
            tables[group], inputs.kv_lens, inputs.cu_q_lens, inputs.num_seqs, local[index],
        )  # fmt: skip
        x = layer.attention_output(x, out.reshape(num_tokens, -1))
        return (x, (*pools[:group], kv_pool, *pools[group + 1 :])), None


def layer_plan(windows: tuple) -> tuple[int, int, list, list]:
    """How the forward loops over layers with these windows (or any per-layer keys):
    `(period, repeats, runs of one period, runs after the repeats)`, runs as `(start, end,
    window)`. A pattern repeated (five local layers and a global one) is one scan over its
    repeats, each a scan per run: the traced layers are those of one period, however deep."""
    runs = _window_runs(windows)
    for period in range(1, len(windows) // 2 + 1):
        repeats = len(windows) // period
        if any(windows[i] != windows[i % period] for i in range(repeats * period)):
            continue
        period_runs = _window_runs(windows[:period])
        tail = [(s + repeats * period, e + repeats * period, w)
                for s, e, w in _window_runs(windows[repeats * period :])]  # fmt: skip
        if len(period_runs) + len(tail) < len(runs):
            return period, repeats, period_runs, tail
        break
    return len(windows), 1, [], runs


def _window_runs(windows: tuple) -> list[tuple]:
    """`(start, end, window)` of each run of consecutive layers with the same window."""
    runs: list[tuple] = []
    for layer, window in enumerate(windows):
        if runs and runs[-1][2] == window:
            runs[-1] = (runs[-1][0], layer + 1, window)
        else:
            runs.append((layer, layer + 1, window))
    return runs


def _stacked(layers: list[DecoderLayer]) -> DecoderLayer:
    """One `DecoderLayer` whose arrays stack those of `layers` on a leading axis."""
    graphdef, first = nnx.split(layers[0])
    states = [first, *(nnx.state(layer) for layer in layers[1:])]
    return nnx.merge(graphdef, jax.tree.map(lambda *arrays: jnp.stack(arrays), *states))


def _write_and_attend(
    rows, q, k, v, slots, page_table, kv_lens, cu_q_lens, num_seqs, layer, *, num_layers,
    sm_scale, impl, interpret, window,
):  # fmt: skip
    """One layer's KV write and ragged attention (per shard under tensor parallelism).

    `layer` is traced (the layers are a loop) and the kernels take a static one: they run on
    the pool's rows `[pages * num_layers, 2, kv_heads, tokens_per_block, head_dim]` as a pool
    of one layer, with the page table and the slots mapped to the rows of `layer`.
    """
    tokens_per_block = rows.shape[3]
    row_table = page_table * num_layers + layer
    pages, offsets = slots // tokens_per_block, slots % tokens_per_block
    row_slots = (pages * num_layers + layer) * tokens_per_block + offsets
    if check_impl(impl) == "xla":  # on the rows: a write through the unit axis copies the pool
        rows = write_kv_rows_reference(rows, k, v, row_slots)
        pool = rows[:, None]  # the kernels' [pages, layers, ...] with one layer
    else:
        pool = write_kv(rows[:, None], k, v, row_slots, layer=0, impl=impl, interpret=interpret)
    out = ragged_paged_attention(
        q, pool, row_table, kv_lens, cu_q_lens, num_seqs, layer=0, sm_scale=sm_scale,
        impl=impl, interpret=interpret, window=window,
    )  # fmt: skip
    return out, pool[:, 0]


# Megatron tensor parallelism: column-parallel projections into heads and the MLP, row-parallel
# projections out of them (XLA inserts the all-reduce); everything else replicated.
_COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
_ROW_PARALLEL = {"o_proj", "down_proj"}


def _partition_specs(model: Llama) -> nnx.State:
    def spec(path, variable):
        names = {str(p) for p in path}
        kind = str(path[-1])
        stacked = (None,) if "layers" in names else ()  # the layer axis is never split
        if names & _COLUMN_PARALLEL:
            return P(*stacked, None, TP_AXIS) if kind == "kernel" else P(*stacked, TP_AXIS)
        if names & _ROW_PARALLEL and kind == "kernel":
            return P(*stacked, TP_AXIS, None)
        return P()

    return nnx.map_state(spec, nnx.state(model))


def truncated_draft(model: Llama, num_layers: int) -> Llama:
    """A draft model of the family for speculative decoding: `model`'s first `num_layers`
    layers, its embeddings, final norm and head (self-speculation in the LayerSkip manner).
    Shares `model`'s arrays: it costs no memory but its KV pages."""
    if not 1 <= num_layers <= model.config.num_layers:
        raise ValueError(f"num_layers={num_layers} must be in [1, {model.config.num_layers}]")
    flags = model.config.windowed_layers
    config = dataclasses.replace(
        model.config, num_layers=num_layers, windowed_layers=flags and flags[:num_layers]
    )
    draft = nnx.eval_shape(lambda: Llama(config, dtype=model.dtype, rngs=nnx.Rngs(0)))
    draft.embed_tokens, draft.norm, draft.lm_head = model.embed_tokens, model.norm, model.lm_head
    draft.layers = model.layers  # the whole stack; the draft's loop stops at num_layers
    draft.inv_freq, draft.local_inv_freq = model.inv_freq, model.local_inv_freq
    return draft
