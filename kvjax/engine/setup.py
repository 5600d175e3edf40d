"""What the engine sets up before it serves: cache geometry from the model, default buckets,
ahead-of-time compilation of every step shape, and a count of compilations after that."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from kvjax.cache.config import CacheConfig
from kvjax.cache.manager import KVCacheManager
from kvjax.runtime.page_ops import default_impl
from kvjax.runtime.sampling import verify_tokens
from kvjax.runtime.sharding import place, replicated, shard_params
from kvjax.runtime.step import Buckets, StepInputs, StepRegistry, allow_compile
from kvjax.serving.scheduler import SchedulerConfig
from kvjax.serving.speculative import SpeculativeConfig

__all__ = [
    "CompileCounter",
    "cache_config_for",
    "check_model_geometry",
    "check_speculative",
    "compile_steps",
    "default_buckets",
    "model_registry",
    "powers_of_two",
    "warm_up",
]

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def cache_config_for(model, *, tokens_per_block: int = 16, dtype=None, **quotas) -> CacheConfig:
    """A `CacheConfig` with the model's geometry (layers, KV heads, head size, vocabulary, dtype).

    Args:
        model: a model with a `config` like `models.config.LlamaConfig` (and a `dtype`).
        dtype: of the KV pages (default the model's).
        quotas: `device_pages` or `device_bytes`, and optionally host and disk ones, and any
            other `CacheConfig` option (`enable_partial_reuse`, `disk_dir`, ...).
    """
    config = model.config
    dtype = np.dtype(dtype or getattr(model, "dtype", np.float32)).name
    return CacheConfig(
        num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
        tokens_per_block=tokens_per_block, dtype=dtype, vocab_size=config.vocab_size, **quotas,
    )  # fmt: skip


def check_model_geometry(model, cache_config: CacheConfig) -> None:
    """Raises naming the first field where the cache's pages do not fit the model."""
    if not isinstance(cache_config, CacheConfig):
        raise ValueError(f"cache_config={cache_config!r} is not a CacheConfig")
    config = model.config
    for field in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
        want, have = getattr(config, field), getattr(cache_config, field)
        if have != want:
            raise ValueError(
                f"cache_config.{field}={have} but the model has {field}={want}; "
                "build it with kvjax.engine.setup.cache_config_for(model, ...)"
            )


def powers_of_two(low: int, high: int) -> list[int]:
    """Powers of two in [low, high), then high: bucket sizes."""
    sizes, size = [], 1
    while size < high:
        if size >= low:
            sizes.append(size)
        size *= 2
    return [*sizes, high]


def check_speculative(
    speculative: SpeculativeConfig | None, config: SchedulerConfig
) -> tuple[int, ...]:
    """The draft lengths steps may pad to ((0,) without speculation); raises when a step
    budget cannot hold one request's verification row."""
    if speculative is None:
        return (0,)
    if not isinstance(speculative, SpeculativeConfig):
        raise ValueError(f"speculative={speculative!r} is not a SpeculativeConfig")
    most = speculative.max_draft_tokens
    if config.max_num_tokens is not None and config.max_num_tokens < 1 + most:
        raise ValueError(
            f"max_num_tokens={config.max_num_tokens} cannot hold one verification row of "
            f"1 + max_draft_tokens={most} tokens"
        )
    return speculative.draft_lengths


def default_buckets(config: SchedulerConfig, draft_lengths=(0,), min_tokens: int = 16) -> Buckets:
    """Batch sizes: powers of two up to `max_batch_size`, and it; token counts: powers of two
    from `min_tokens` up to `max_num_tokens`, and it; `draft_lengths` as given."""
    if config.max_num_tokens is None:
        raise ValueError("the engine needs SchedulerConfig.max_num_tokens to size its buckets")
    batch_sizes = powers_of_two(1, config.max_batch_size)
    low = min(min_tokens, config.max_num_tokens)
    return Buckets(batch_sizes, powers_of_two(low, config.max_num_tokens), draft_lengths)


def warm_up(
    registry: StepRegistry,
    params,
    manager: KVCacheManager,
    buckets: Buckets,
    config: SchedulerConfig,
    mesh=None,
) -> None:
    """Compiles every bucket's step, the sampler for each logit layout and the page moves.

    Raises:
        ValueError: the buckets cannot hold a full step of `config`.
    """
    max_tokens = config.max_num_tokens
    if max_tokens is None:
        raise ValueError("the engine needs SchedulerConfig.max_num_tokens to size its buckets")
    buckets.pad(min(config.max_batch_size, max_tokens), max_tokens)  # raises if none holds it
    with allow_compile():
        compile_steps(registry, params, manager, buckets.keys)
        vocab = manager.config.vocab_size
        for rows, width in sorted({(k.num_seqs, k.logits_per_seq) for k in buckets.keys}):
            zeros = np.zeros(rows, np.float32)
            ints = np.zeros(rows, np.int32)
            # Placed as the step returns them (replicated over a mesh), so serving reuses it.
            logits = np.zeros((rows * width, vocab), np.float32)
            logits = place(logits, mesh and replicated(mesh))
            drafts = np.zeros((rows, width - 1), np.int32)
            verify_tokens(
                logits, drafts, ints, zeros, ints, zeros + 1, ints.astype(np.uint32), ints
            )


def model_registry(model, *, impl=None, interpret=None, mesh=None, on_logits=None):
    """`model`'s step as a `StepRegistry`, and the params it runs on: split from the NNX module,
    and sharded by `model.partition_specs()` over `mesh` when given. `on_logits` maps the
    logits the step returns (e.g. to argmax tokens).

    Returns:
        (registry, params).
    """
    options = {"impl": impl or default_impl(), "interpret": interpret}
    graphdef, params = nnx.split(model)
    if mesh is not None:
        params = shard_params(params, model.partition_specs(), mesh)
        options["mesh"] = mesh

    def step(params, kv_pool, inputs):
        logits, kv_pool = nnx.merge(graphdef, params)(inputs, kv_pool, **options)
        return (logits if on_logits is None else on_logits(logits)), kv_pool

    return StepRegistry(step, mesh), params


def compile_steps(registry: StepRegistry, params, manager: KVCacheManager, keys) -> None:
    """Compiles a step per key from shapes (page tables `manager.max_blocks` wide) and the
    manager's page moves; must run inside `allow_compile()`."""
    registry.warmup(
        params, manager.pool, lambda key: StepInputs.placeholder(key, manager.max_blocks), keys
    )
    manager.storage.warmup()


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
