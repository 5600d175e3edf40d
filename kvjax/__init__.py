"""kvjax: a paged KV cache for JAX with TensorRT-LLM KVCacheManagerV2 semantics.

The names a user starts from. They load on first use, so `import kvjax.cache` (plain Python and
numpy) does not pull in JAX through this package.
"""

import importlib

_PUBLIC = {
    "CacheConfig": "kvjax.cache.config",
    "KVCacheManager": "kvjax.cache.manager",
    "Engine": "kvjax.engine.engine",
    "cache_config_for": "kvjax.engine.geometry",
    "SamplingParams": "kvjax.serving.request",
    "RequestOutput": "kvjax.serving.request",
    "SchedulerConfig": "kvjax.serving.scheduler",
    "SchedulerPolicy": "kvjax.serving.scheduler",
    "SpeculativeConfig": "kvjax.serving.speculative",
    "NgramDrafter": "kvjax.serving.speculative",
    "DraftModelDrafter": "kvjax.engine.draft_model",
    "KVStorage": "kvjax.runtime.storage",
    "load_hf_checkpoint": "models.loader",
    "load_gguf_checkpoint": "models.gguf_loader",
    "load_model": "kvjax.engine.checkpoints",
    "load_tokenizer": "kvjax.text.tokenizer",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kvjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
