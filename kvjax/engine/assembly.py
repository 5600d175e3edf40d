"""Building an engine's parts once its configuration passed the preflight checks: the cache
manager on its storage, the request caches and the scheduler, the drafter bound to the engine's
limits, the step registry, and every step shape compiled."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

from flax import nnx

from kvjax.cache.config import CacheConfig
from kvjax.cache.grouped import GroupedKVCacheManager, group_configs, grouped_max_seq_len
from kvjax.cache.life_cycles import LayerAttention, LayerGroups
from kvjax.cache.manager import KVCacheManager
from kvjax.engine.compile import CompileCounter, model_registry, warm_up
from kvjax.runtime.buckets import Buckets
from kvjax.runtime.step import StepRegistry
from kvjax.runtime.storage import KVStorage
from kvjax.serving.resources import CacheResources
from kvjax.serving.scheduler import Scheduler, SchedulerConfig, SchedulerPolicy
from kvjax.serving.speculative import DraftLimits, SpeculativeConfig

__all__ = ["EngineOptions", "EngineParts", "assemble", "new_cache_manager", "new_manager"]


def new_manager(config: CacheConfig, mesh=None, **options) -> KVCacheManager:
    """A `KVCacheManager` (with `options`) on a new `KVStorage` for `config`; the storage is
    closed again when the manager refuses it."""
    storage = KVStorage.for_config(config, mesh=mesh)
    try:
        return KVCacheManager(config, storage, **options)
    except BaseException:
        storage.close()
        raise


def new_cache_manager(config: CacheConfig, mesh, chunk_tokens: int, *, groups=True, **options):
    """The engine's manager: one per layer group (`GroupedKVCacheManager`) when the layers
    attend differently, so a windowed group gives back its pages while a full-attention one
    keeps its own; else one `KVCacheManager` (also with `groups=False`, and under tensor
    parallelism: not grouped yet)."""
    layers = config.layer_attention or (LayerAttention(),) * config.num_layers
    requested, tpb = options.pop("max_seq_len", None), config.tokens_per_block
    length = requested or config.num_device_pages * tpb
    for _ in range(3):  # until the groups at the length they hold are those they were built as
        layer_groups = LayerGroups(layers, tpb, length)
        if len(layer_groups) == 1 or mesh is not None or not groups:
            break
        configs = group_configs(config, max_seq_len=length, chunk_tokens=chunk_tokens)
        limit = grouped_max_seq_len(configs, length)
        if LayerGroups(layers, tpb, limit).life_cycles == layer_groups.life_cycles:
            if requested is not None and limit < requested:
                warnings.warn(f"max_seq_len={requested} is clamped to {limit}", stacklevel=3)
            return _grouped(configs, limit, layer_groups.group_of_layer, options)
        length = limit
    return new_manager(config, mesh, max_seq_len=requested, **options)


def _grouped(configs, max_seq_len: int, group_of_layer, options) -> GroupedKVCacheManager:
    storages = []
    try:
        storages += [KVStorage.for_config(group_config) for group_config in configs]
        return GroupedKVCacheManager(
            configs, storages, max_seq_len=max_seq_len, group_of_layer=group_of_layer, **options
        )
    except BaseException:
        for storage in storages:
            storage.close()
        raise


@dataclasses.dataclass(frozen=True)
class EngineParts:
    manager: KVCacheManager
    resources: CacheResources
    scheduler: Scheduler
    registry: StepRegistry
    params: list  # the model's arrays, flat (`model_registry`)
    compiles: CompileCounter


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """The `Engine` options the parts are built from (see `Engine`)."""

    max_seq_len: int | None
    enable_block_reuse: bool
    commit_generated: bool
    lora_pages: Mapping[int, int]
    impl: str | None
    interpret: bool | None
    sampler_variants: tuple[str, ...] = ()

    def agreement_key(self) -> tuple:
        """What every process must share, in an order-independent form."""
        return (
            self.max_seq_len, self.enable_block_reuse, self.commit_generated, self.impl,
            self.interpret, sorted(self.lora_pages.items()),
        )  # fmt: skip


def assemble(
    model: nnx.Module,
    cache_config: CacheConfig,
    config: SchedulerConfig,
    buckets: Buckets,
    options: EngineOptions,
    speculative: SpeculativeConfig | None,
    max_draft_tokens: int,
    mesh=None,
) -> EngineParts:
    """The engine's parts, warmed up; on any failure, what was built is released."""
    # A whole-life reservation (GUARANTEED_NO_EVICT) grows every group by the whole sequence,
    # which a windowed group's pool is not sized for: such engines keep one pool.
    no_evict = config.policy is SchedulerPolicy.GUARANTEED_NO_EVICT
    manager = new_cache_manager(
        cache_config, mesh, config.max_num_tokens or 2048, groups=not no_evict,
        max_seq_len=options.max_seq_len, max_total_draft_tokens=max_draft_tokens,
    )  # fmt: skip
    drafter = speculative and speculative.drafter
    bind = getattr(drafter, "bind", None)  # drafters without their own cache need no limits
    bound = False
    try:
        resources = CacheResources(
            manager, enable_block_reuse=options.enable_block_reuse,
            commit_generated=options.commit_generated, max_draft_tokens=max_draft_tokens,
        )  # fmt: skip
        scheduler = Scheduler(config, resources, options.lora_pages)
        if bind is not None:
            bind(
                DraftLimits(
                    max_draft_tokens, manager.max_seq_len, config.max_batch_size,
                    config.max_num_tokens,
                )
            )  # fmt: skip
            bound = True
        registry, params, compiles = _compiled(model, options, manager, buckets, config, mesh)
    except BaseException:
        if bound:
            drafter.shutdown()
        manager.shutdown()
        raise
    return EngineParts(manager, resources, scheduler, registry, params, compiles)


def _compiled(model, options: EngineOptions, manager, buckets: Buckets, config, mesh):
    """The model's step registry and params with every bucket compiled, and the counter of
    compilations after that."""
    feed_size = max(key.num_seqs for key in buckets.keys)
    registry, params = model_registry(
        model, impl=options.impl, interpret=options.interpret, mesh=mesh, feed_size=feed_size,
        layer_groups=getattr(manager, "group_of_layer", None),
    )  # fmt: skip
    compiles = CompileCounter()
    try:
        warm_up(
            registry,
            params,
            manager,
            buckets,
            config.max_batch_size,
            config.max_num_tokens,
            mesh,
            options.sampler_variants,
        )
    except BaseException:
        compiles.close()
        raise
    compiles.mark_warm()
    return registry, params, compiles
