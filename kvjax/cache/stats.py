"""Counters and KV events of a `KVCacheManager`: what was reused, moved and published.

Host side, no JAX. Events follow the KV-event streams of vLLM and TensorRT-LLM (a block stored with
its parent key, tokens and tier; a block removed), so a router can track what each server caches.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from kvjax.cache.keys import BlockKey, Token
from kvjax.cache.pages import Tier

__all__ = ["BlockRemoved", "BlockStored", "CacheStats", "EventBuffer", "KVEvent"]


@dataclasses.dataclass
class CacheStats:
    """Counters since the manager was built (or since `reset_stats`).

    Blocks: `new_blocks` private pages allocated to caches; `reused_blocks` blocks served from the
    tree at creation, `partially_reused_blocks` of them matched only in part (copied on resume);
    `missed_blocks` lookup blocks the tree could not serve; `rebased_blocks` private blocks swapped
    for an identical tree block at commit; `stored_blocks` blocks that entered the tree;
    `dropped_blocks` blocks removed from the tree by eviction; `allocated_blocks` new plus reused;
    `lost_pages` pages whose bytes a failed disk read or write lost.
    Pages and bytes moved: onto the device (`onboarded`), off it (`offloaded`), device to device
    (`copied`: copy-on-write and relocation), and between host and disk (`spilled`).
    """

    new_blocks: int = 0
    reused_blocks: int = 0
    partially_reused_blocks: int = 0
    missed_blocks: int = 0
    rebased_blocks: int = 0
    stored_blocks: int = 0
    dropped_blocks: int = 0
    lost_pages: int = 0
    onboarded_pages: int = 0
    onboarded_bytes: int = 0
    offloaded_pages: int = 0
    offloaded_bytes: int = 0
    copied_pages: int = 0
    copied_bytes: int = 0
    spilled_pages: int = 0
    spilled_bytes: int = 0

    @property
    def allocated_blocks(self) -> int:
        return self.new_blocks + self.reused_blocks

    @property
    def hit_rate(self) -> float:
        """Reused over looked-up blocks; 0.0 before any lookup."""
        looked_up = self.reused_blocks + self.missed_blocks
        return self.reused_blocks / looked_up if looked_up else 0.0

    def count_move(self, src_tier: Tier, dst_tier: Tier, num_pages: int, page_bytes: int) -> None:
        """Adds `num_pages` pages moved from `src_tier` to `dst_tier`."""
        if src_tier is Tier.DEVICE and dst_tier is Tier.DEVICE:
            kind = "copied"
        elif dst_tier is Tier.DEVICE:
            kind = "onboarded"
        elif src_tier is Tier.DEVICE:
            kind = "offloaded"
        else:
            kind = "spilled"
        setattr(self, f"{kind}_pages", getattr(self, f"{kind}_pages") + num_pages)
        setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + num_pages * page_bytes)


@dataclasses.dataclass(frozen=True)
class BlockStored:
    """A block entered the tree. `parent_key` is the previous block's key, or the reuse scope's
    root key for a first block."""

    key: BlockKey
    parent_key: BlockKey
    tokens: tuple[Token, ...]
    tier: Tier
    priority: int


@dataclasses.dataclass(frozen=True)
class BlockRemoved:
    """A block left the tree (dropped, replaced by a longer partial block, or cleared)."""

    key: BlockKey


KVEvent = BlockStored | BlockRemoved


class EventBuffer:
    """The most recent `max_events` KV events; older ones are counted in `num_lost` and gone.

    Args:
        max_events: capacity; 0 turns events off.
    """

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._events: deque[KVEvent] = deque(maxlen=max_events or None)
        self.num_lost = 0

    def append(self, event: KVEvent) -> None:
        if not self.max_events:
            return
        if len(self._events) == self.max_events:
            self.num_lost += 1
        self._events.append(event)

    def __len__(self) -> int:
        return len(self._events)

    def take(self) -> list[KVEvent]:
        """Drains the buffer, oldest event first."""
        events = list(self._events)
        self._events.clear()
        return events
