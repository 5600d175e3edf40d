"""Ahead-of-time compilation: a model's step as a `StepRegistry`, the warm-up that compiles every
bucket's step, the sampler and the page moves, and a count of compilations after that."""

from __future__ import annotations

from collections.abc import Collection

import jax
import numpy as np
from flax import nnx

from kvjax.cache.manager import KVCacheManager
from kvjax.runtime.buckets import BucketKey, Buckets
from kvjax.runtime.page_ops import default_impl
from kvjax.runtime.penalties import no_penalties
from kvjax.runtime.sampling import score_rows, verify_and_feed
from kvjax.runtime.sharding import place, replicated, shard_params
from kvjax.runtime.step import StepInputs, StepRegistry, allow_compile

__all__ = ["CompileCounter", "compile_steps", "model_registry", "warm_up"]

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def model_registry(
    model, *, impl=None, interpret=None, mesh=None, on_logits=None, feed_size=1, layer_groups=None
):
    """`model`'s step as a `StepRegistry`, and the params it runs on: split from the NNX module,
    and sharded by `model.partition_specs()` over `mesh` when given. `on_logits` maps the
    logits the step returns (e.g. to argmax tokens). `feed_size`: see `StepRegistry`.
    `layer_groups`: each layer's group when the pool is a tuple of each group's pool.

    Returns:
        (registry, params): params as the flat list of the model's arrays, flattened once here
        rather than on every call (an `nnx.State` of a deep model takes ~0.5 ms to flatten).
    """
    options = {"impl": impl or default_impl(), "interpret": interpret}
    if layer_groups is not None:
        options["layer_groups"] = tuple(layer_groups)
    graphdef, params = nnx.split(model)
    if mesh is not None:
        params = shard_params(params, model.partition_specs(), mesh)
        options["mesh"] = mesh
    leaves, treedef = jax.tree.flatten(params)

    def step(leaves, kv_pool, inputs):
        params = jax.tree.unflatten(treedef, leaves)
        logits, kv_pool = nnx.merge(graphdef, params)(inputs, kv_pool, **options)
        return (logits if on_logits is None else on_logits(logits)), kv_pool

    return StepRegistry(step, mesh, feed_size), leaves


def compile_steps(registry: StepRegistry, params, manager: KVCacheManager, keys) -> None:
    """Compiles a step per key from shapes (page tables `manager.page_table_width` wide) and the
    manager's page moves; must run inside `allow_compile()`."""
    registry.warmup(
        params,
        manager.pool,
        lambda key: StepInputs.placeholder(key, manager.page_table_width),
        keys,
    )
    manager.storage.warmup()


def warm_up(
    registry: StepRegistry,
    params,
    manager: KVCacheManager,
    buckets: Buckets,
    max_batch_size: int,
    max_num_tokens: int,
    mesh=None,
    sampler_variants: Collection[str] = (),
) -> None:
    """Compiles every bucket's step, the sampler for each logit layout and the page moves;
    also the sampler's variants named in `sampler_variants` ("logprobs", "penalties", and
    their combination); other variants compile when first used.

    Raises:
        ValueError: the buckets cannot hold a full step of `max_batch_size` requests and
            `max_num_tokens` tokens.
    """
    buckets.pad(min(max_batch_size, max_num_tokens), max_num_tokens)  # raises if none holds it
    with allow_compile():
        compile_steps(registry, params, manager, buckets.keys)
        vocab = manager.config.vocab_size
        if "prompt_logprobs" in sampler_variants:
            _compile_scoring_steps(registry, params, manager, buckets, mesh)
        for rows, width in sorted({(k.num_seqs, k.logits_per_seq) for k in buckets.keys}):
            zeros = np.zeros(rows, np.float32)
            ints = np.zeros(rows, np.int32)
            # Placed as the step returns them (replicated over a mesh), so serving reuses it.
            logits = np.zeros((rows * width, vocab), np.float32)
            logits = place(logits, mesh and replicated(mesh))
            drafts = np.zeros((rows, width - 1), np.int32)
            args = (logits, drafts, ints, zeros, ints, zeros + 1, ints.astype(np.uint32), ints)
            penalties = [None]
            if "penalties" in sampler_variants:
                penalties.append(no_penalties(rows, manager.max_seq_len))
            for with_logprobs in {False, "logprobs" in sampler_variants}:
                for penalty in penalties:
                    verify_and_feed(
                        *args, penalty, feed_size=registry.feed_size, with_logprobs=with_logprobs
                    )


def _compile_scoring_steps(registry, params, manager, buckets: Buckets, mesh) -> None:
    """The steps that score prompt tokens (a logit row per token, `batch._scoring_batch`) and
    `score_rows`, for every bucket of one logit row per sequence."""
    keys = {
        BucketKey(k.num_seqs, k.num_tokens, k.num_tokens)
        for k in buckets.keys
        if k.logits_per_seq == 1
    }
    compile_steps(registry, params, manager, sorted(keys))
    for key in sorted(keys):
        logits = np.zeros((key.num_tokens, manager.config.vocab_size), np.float32)
        logits = place(logits, mesh and replicated(mesh))
        rows = np.zeros(key.num_seqs, np.int32)
        score_rows(logits, rows, np.zeros(key.num_tokens, np.int32))


class CompileCounter:
    """Counts XLA backend compilations in this process (every jit, not only the engine's)."""

    def __init__(self) -> None:
        self.total = 0
        self._at_warm = 0
        self._listening = True
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if self._listening and event == _BACKEND_COMPILE_EVENT:
            self.total += 1

    def mark_warm(self) -> None:
        self._at_warm = self.total

    @property
    def after_warmup(self) -> int:
        return self.total - self._at_warm

    def close(self) -> None:
        if self._listening:
            self._listening = False
            jax.monitoring.unregister_event_duration_listener(self._on_event)
