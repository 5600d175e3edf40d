"""Cache geometry and tier quotas: the frozen, validated description a cache manager is built from.

Host side: imports numpy and ml_dtypes, never JAX.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so it can be named by string)
import numpy as np

from kvjax.cache.checks import check_int
from kvjax.cache.life_cycles import LayerAttention

__all__ = ["FP8_KV_DTYPES", "KV_DTYPES", "SCALE_BYTES", "CacheConfig"]

# The dtypes the attention kernels read. fp8 pages carry a bfloat16 scale per token row of each
# KV head (`kernels.kv_quant`), stored with the page on every tier.
FP8_KV_DTYPES = ("float8_e4m3fn", "float8_e5m2")
KV_DTYPES = ("float32", "float16", "bfloat16", *FP8_KV_DTYPES)
SCALE_BYTES = 2  # one bfloat16 scale per token row of an fp8 page

_MAX_TOKEN_ID = 2**32 - 1  # keys encode token ids as uint32


def _check_optional_int(field: str, value: object, *, minimum: int) -> int | None:
    return None if value is None else check_int(field, value, minimum=minimum)


def _resolve_dtype(value: object) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError as error:
        raise ValueError(f"dtype={value!r} is not a dtype; use one of {KV_DTYPES}") from error
    if dtype.name not in KV_DTYPES:
        raise ValueError(f"dtype={dtype.name} is not supported; use one of {KV_DTYPES}")
    if not dtype.isnative:
        raise ValueError(f"dtype={dtype.str} is not in native byte order")
    return dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Geometry of the paged KV pool and the quota of each tier.

    One page holds one block of `tokens_per_block` tokens for every layer, K and V:
    `[num_layers, 2, num_kv_heads, tokens_per_block, head_dim]` of `dtype`, `page_bytes` in all.
    An fp8 `dtype` ("float8_e4m3fn", "float8_e5m2") also stores one bfloat16 scale per token
    row of each layer, K/V and KV head, counted in `page_bytes` (so in every byte quota): an
    fp8 page of head_dim 64 takes 66/128 of a bfloat16 one.

    Tiers: the device quota is given as `device_pages` or `device_bytes` (exactly one); the device
    pool counts `NULL_PAGE`, so it holds one page fewer than that for requests. The host tier is
    `host_pages` or `host_bytes`; both None means "provision automatically" (see
    `auto_host_pages`), 0 means "no host tier". The disk tier exists when `disk_dir` names an
    existing directory and `disk_pages` or `disk_bytes` is given. Byte quotas count whole pages:
    under tensor parallelism each device (and each host) holds its share of every page.

    Args:
        enable_partial_reuse: reuse the first mismatching block at token granularity.
        max_util_for_resume: `resume()` refuses while device utilization is above this fraction.
        vocab_size: token ids must be below it; multimodal key tokens use ids from it upward.
        layer_attention: each layer's `LayerAttention` (window and sinks); None is full
            attention everywhere. A block's page is released once it is stale for every layer.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int = 16
    dtype: str | np.dtype = "bfloat16"
    device_pages: int | None = None
    device_bytes: int | None = None
    host_pages: int | None = None
    host_bytes: int | None = None
    disk_dir: str | os.PathLike | None = None
    disk_pages: int | None = None
    disk_bytes: int | None = None
    enable_partial_reuse: bool = True
    max_util_for_resume: float = 0.97
    vocab_size: int | None = None
    layer_attention: tuple[LayerAttention, ...] | None = None

    def __post_init__(self) -> None:
        set_field = object.__setattr__.__get__(self)
        for field in ("num_layers", "num_kv_heads", "head_dim", "tokens_per_block"):
            set_field(field, check_int(field, getattr(self, field), minimum=1))
        tpb = self.tokens_per_block
        if tpb & (tpb - 1):
            # Triton tiles need power-of-two extents, and a page is one tile of tokens.
            raise ValueError(f"tokens_per_block={tpb} must be a power of two")
        set_field("dtype", _resolve_dtype(self.dtype))
        self._validate_tiers(set_field)
        if not isinstance(self.enable_partial_reuse, bool):
            raise ValueError(f"enable_partial_reuse={self.enable_partial_reuse!r} must be a bool")
        util = self.max_util_for_resume
        if isinstance(util, bool) or not isinstance(util, int | float) or not 0 < util <= 1:
            raise ValueError(f"max_util_for_resume={util!r} must be a number in (0, 1]")
        if self.vocab_size is not None:
            vocab = check_int("vocab_size", self.vocab_size, minimum=1)
            if vocab > _MAX_TOKEN_ID:
                raise ValueError(f"vocab_size={vocab} must be <= {_MAX_TOKEN_ID}")
            set_field("vocab_size", vocab)
        if self.layer_attention is not None:
            layers = tuple(self.layer_attention)
            if len(layers) != self.num_layers:
                raise ValueError(
                    f"layer_attention names {len(layers)} layers; num_layers={self.num_layers}"
                )
            for index, layer in enumerate(layers):
                if not isinstance(layer, LayerAttention):
                    raise ValueError(f"layer_attention[{index}]={layer!r} is not a LayerAttention")
            set_field("layer_attention", layers)

    def _validate_tiers(self, set_field) -> None:
        for field in (
            "device_pages",
            "device_bytes",
            "host_pages",
            "host_bytes",
            "disk_pages",
            "disk_bytes",
        ):
            set_field(field, _check_optional_int(field, getattr(self, field), minimum=0))
        if (self.device_pages is None) == (self.device_bytes is None):
            raise ValueError(
                f"give exactly one of device_pages={self.device_pages} and "
                f"device_bytes={self.device_bytes}"
            )
        if self.num_device_pages < 2:
            raise ValueError(
                f"device quota ({self._quota_text('device')}) holds {self.num_device_pages} "
                f"pages of {self.page_bytes} bytes; it needs at least 2 (page 0 is NULL_PAGE)"
            )
        if self.host_pages is not None and self.host_bytes is not None:
            raise ValueError(
                f"give at most one of host_pages={self.host_pages} and host_bytes={self.host_bytes}"
            )
        if self.host_bytes and self.host_bytes < self.page_bytes:
            raise ValueError(
                f"host_bytes={self.host_bytes} holds no page of {self.page_bytes} bytes; "
                "use 0 for no host tier"
            )
        self._validate_disk(set_field)

    def _validate_disk(self, set_field) -> None:
        if self.disk_pages is not None and self.disk_bytes is not None:
            raise ValueError(
                f"give at most one of disk_pages={self.disk_pages} and disk_bytes={self.disk_bytes}"
            )
        quota_given = bool(self.disk_pages or self.disk_bytes)
        if self.disk_dir is None:
            if quota_given:
                raise ValueError(f"a disk quota ({self._quota_text('disk')}) needs disk_dir")
            return
        if str(self.disk_dir) == "":
            raise ValueError("disk_dir='' names no directory")
        path = Path(self.disk_dir)
        if not path.is_dir():
            raise ValueError(f"disk_dir={str(path)!r} is not an existing directory")
        if not quota_given:
            raise ValueError(f"disk_dir={str(path)!r} needs disk_pages or disk_bytes > 0")
        if self.num_disk_pages == 0:
            raise ValueError(
                f"disk_bytes={self.disk_bytes} holds no page of {self.page_bytes} bytes"
            )
        set_field("disk_dir", path)

    def _quota_text(self, tier: str) -> str:
        pages, quota_bytes = getattr(self, f"{tier}_pages"), getattr(self, f"{tier}_bytes")
        return f"{tier}_pages={pages}" if pages is not None else f"{tier}_bytes={quota_bytes}"

    @property
    def page_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one page: `[num_layers, 2, num_kv_heads, tokens_per_block, head_dim]`."""
        return (self.num_layers, 2, self.num_kv_heads, self.tokens_per_block, self.head_dim)

    @property
    def quantized(self) -> bool:
        """Whether pages are fp8 with per-row scales."""
        return self.dtype.name in FP8_KV_DTYPES

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (every layer, K and V, of one block; fp8 scales included)."""
        values = math.prod(self.page_shape) * self.dtype.itemsize
        return values + (math.prod(self.page_shape[:-1]) * SCALE_BYTES if self.quantized else 0)

    @property
    def num_device_pages(self) -> int:
        """Pages of the device pool, `NULL_PAGE` included."""
        if self.device_pages is not None:
            return self.device_pages
        return self.device_bytes // self.page_bytes

    @property
    def num_host_pages(self) -> int | None:
        """Pages of the host tier; None when it is to be provisioned automatically."""
        if self.host_pages is not None:
            return self.host_pages
        if self.host_bytes is not None:
            return self.host_bytes // self.page_bytes
        return None

    @property
    def num_disk_pages(self) -> int:
        """Pages of the disk tier; 0 when there is none."""
        if self.disk_dir is None:
            return 0
        if self.disk_pages is not None:
            return self.disk_pages
        return (self.disk_bytes or 0) // self.page_bytes

    def auto_host_pages(self, available_host_bytes: int) -> int:
        """Host pages to provision when none were configured: min(device quota, half of free RAM).

        MAX_UTILIZATION scheduling suspends requests to make room; without a host tier their pages
        would have nowhere to go and the scheduler would deadlock (the seed PR's fix).
        """
        available = check_int("available_host_bytes", available_host_bytes, minimum=0)
        return min(self.num_device_pages, available // 2 // self.page_bytes)
