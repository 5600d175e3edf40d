"""Surviving a failed step that consumed the donated KV pool: every page of the device is lost,
so the requests holding KV are preempted by recomputation, the radix tree forgets the blocks
stored on the device, and the storage gets a fresh pool. Host and disk pages stay valid."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from kvjax.cache.manager import KVCacheManager
from kvjax.cache.pages import Tier
from kvjax.serving.request import Request
from kvjax.serving.resources import CacheResources

__all__ = ["recover_lost_pool"]


def recover_lost_pool(
    error: BaseException,
    requests: Sequence[Request],
    resources: CacheResources,
    manager: KVCacheManager,
) -> int:
    """Recovers from `error`, a step that failed after its pool was donated; returns how many
    requests recompute their KV. Their outputs stay exactly those they would have had."""
    started = [request for request in requests if request.cache is not None]
    for request in started:
        resources.recompute_request(request)
    manager.clear_reusable_blocks(Tier.DEVICE)
    manager.storage.reset_pool()
    warnings.warn(
        f"a step failed after donating the KV pool ({error!r}): the pool was rebuilt and "
        f"{len(started)} requests recompute their KV",
        RuntimeWarning,
        stacklevel=3,
    )
    return len(started)
