"""The cache geometry a model needs: `cache_config_for` derives it, `check_model_geometry`
refuses a `CacheConfig` whose pages do not fit the model."""

from __future__ import annotations

import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.cache.life_cycles import LayerAttention

__all__ = ["cache_config_for", "check_model_geometry", "model_layer_attention"]


def model_layer_attention(config) -> tuple[LayerAttention, ...] | None:
    """Each layer's attention from a model config's `layer_windows` (None: full everywhere)."""
    windows = getattr(config, "layer_windows", None)
    if windows is None or all(window is None for window in windows):
        return None
    return tuple(LayerAttention(window) for window in windows)


def cache_config_for(model, *, tokens_per_block: int = 16, dtype=None, **quotas) -> CacheConfig:
    """A `CacheConfig` with the model's geometry (layers, KV heads, head size, vocabulary, dtype)
    and its layers' attention windows (stale pages go back as decoding advances).

    Device quotas count `NULL_PAGE`: `device_pages=N` gives N - 1 usable pages.

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
        tokens_per_block=tokens_per_block, dtype=dtype, vocab_size=config.vocab_size,
        **{"layer_attention": model_layer_attention(config), **quotas},
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
                "build it with kvjax.cache_config_for(model, ...)"
            )
    wanted = model_layer_attention(config) or (LayerAttention(),) * config.num_layers
    given = cache_config.layer_attention or (LayerAttention(),) * config.num_layers
    for layer, (want, have) in enumerate(zip(wanted, given, strict=True)):
        # The cache may keep more than a layer reads, never less.
        keeps_enough = have.window is None or (
            want.window is not None
            and have.window >= want.window
            and have.sink_tokens >= want.sink_tokens
        )
        if not keeps_enough:
            raise ValueError(
                f"cache_config.layer_attention[{layer}]={have} releases pages that layer "
                f"{layer} of the model reads ({want}); build it with kvjax.cache_config_for"
            )
