"""Building an engine's parts once its configuration passed the preflight checks: the cache
manager on its storage, the request caches and the scheduler, the drafter bound to the engine's
limits, the step registry, and every step shape compiled."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from flax import nnx

from kvjax.cache.config import CacheConfig
from kvjax.cache.manager import KVCacheManager
from kvjax.engine.compile import CompileCounter, model_registry, warm_up
from kvjax.runtime.buckets import Buckets
from kvjax.runtime.step import StepRegistry
from kvjax.runtime.storage import KVStorage
from kvjax.serving.resources import CacheResources
from kvjax.serving.scheduler import Scheduler, SchedulerConfig
from kvjax.serving.speculative import DraftLimits, SpeculativeConfig

__all__ = ["EngineParts", "assemble"]


@dataclasses.dataclass(frozen=True)
class EngineParts:
    manager: KVCacheManager
    resources: CacheResources
    scheduler: Scheduler
    registry: StepRegistry
    params: nnx.State
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
    storage = KVStorage.for_config(cache_config, mesh=mesh)
    manager = KVCacheManager(
        cache_config, storage, max_seq_len=options.max_seq_len,
        max_total_draft_tokens=max_draft_tokens,
    )  # fmt: skip
    drafter = speculative and speculative.drafter
    bound = False
    try:
        resources = CacheResources(
            manager, enable_block_reuse=options.enable_block_reuse,
            commit_generated=options.commit_generated, max_draft_tokens=max_draft_tokens,
        )  # fmt: skip
        scheduler = Scheduler(config, resources, options.lora_pages)
        if drafter:
            limits = DraftLimits(
                max_draft_tokens, manager.max_seq_len, config.max_batch_size, config.max_num_tokens
            )
            drafter.bind(limits)
            bound = True
        registry, params = model_registry(
            model, impl=options.impl, interpret=options.interpret, mesh=mesh
        )
        compiles = CompileCounter()
        try:
            warm_up(
                registry, params, manager, buckets, config.max_batch_size, config.max_num_tokens,
                mesh,
            )  # fmt: skip
        except BaseException:
            compiles.close()
            raise
        compiles.mark_warm()
    except BaseException:
        if bound:
            drafter.shutdown()
        manager.shutdown()
        raise
    return EngineParts(manager, resources, scheduler, registry, params, compiles)
