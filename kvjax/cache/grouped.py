"""Layer groups with pages of their own: one `KVCacheManager` per group, one `KVCache` per group
for each sequence, kept in step.

A model whose layers attend differently (Gemma 3's five local layers per global one) forms
several layer groups (`kvjax.cache.life_cycles.LayerGroups`). With one page per block for every
layer, a block's page goes only when every layer is done with it, so one full-attention layer
keeps the whole history of all layers. Here each group has its own pool, tiers and radix tree:
a windowed group gives back its stale pages as decoding advances (its tree keeps blocks whose
pages were evicted, so later ones stay reusable), while a full-attention group keeps its pages
and drops a subtree when it evicts a page. A sequence's caches are created with the same reused
prefix (the longest one every group can serve at its end), grow, commit, suspend and resume
together, all or nothing, so their lengths are always equal.

Host side, no JAX: the storages are given, one per group (`KVStorage.for_config` of each of
`group_configs(...)`).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import blake3
import numpy as np

from kvjax.cache.cache_status import CacheStatus, checked_lengths
from kvjax.cache.checks import check_int
from kvjax.cache.config import CacheConfig
from kvjax.cache.group_quotas import group_configs, grouped_max_seq_len
from kvjax.cache.grouped_views import GroupedPages, GroupedStorage
from kvjax.cache.keys import Token
from kvjax.cache.kv_cache import KVCache
from kvjax.cache.manager import KVCacheManager
from kvjax.cache.pages import Page, Tier

__all__ = ["GroupedKVCache", "GroupedKVCacheManager", "group_configs"]  # group_configs: quotas


class GroupedKVCacheManager:
    """A `KVCacheManager` per layer group, driven as one (its interface, for grouped caches).

    Not thread-safe, like the manager: one thread drives it and its caches.

    Args:
        configs: each group's geometry and quotas (`group_configs`).
        storages: each group's page bytes, sized as its config says.
        max_seq_len: the longest sequence; clamped to what the full-attention groups' devices
            hold (a windowed group holds any length), with a warning.
        group_of_layer: the model's layer -> group map, for the step (`LayerGroups`).
    """

    def __init__(
        self,
        configs: Sequence[CacheConfig],
        storages: Sequence[Any],
        *,
        max_seq_len: int | None = None,
        num_extra_kv_tokens: int = 0,
        max_total_draft_tokens: int = 0,
        max_events: int = 1024,
        group_of_layer: Sequence[int] | None = None,
    ) -> None:
        if not configs or len(configs) != len(storages):
            raise ValueError(f"{len(configs)} configs for {len(storages)} storages")
        if max_seq_len is not None:
            check_int("max_seq_len", max_seq_len, minimum=1)
        limit = grouped_max_seq_len(configs, max_seq_len)
        if max_seq_len is not None and limit < max_seq_len:
            warnings.warn(
                f"max_seq_len={max_seq_len} is clamped to {limit}: the tokens the "
                "full-attention groups' device pages hold",
                stacklevel=2,
            )
        options = {"max_seq_len": limit, "num_extra_kv_tokens": num_extra_kv_tokens}
        options.update(max_total_draft_tokens=max_total_draft_tokens, max_events=max_events)
        self.managers = [
            KVCacheManager(config, storage, **options)
            for config, storage in zip(configs, storages, strict=True)
        ]
        if len({manager.max_blocks for manager in self.managers}) > 1:
            # A window reaching `limit` is full attention in its group, whose quota was sized
            # for the window: build the groups at `limit` (`group_configs(max_seq_len=limit)`).
            lengths = [manager.max_seq_len for manager in self.managers]
            raise ValueError(f"layer groups hold sequences of {lengths} tokens, not {limit}")
        self.config = configs[0]
        self.group_of_layer = None if group_of_layer is None else tuple(group_of_layer)
        self.max_seq_len = limit
        self.max_blocks = self.managers[0].max_blocks
        self.pages = GroupedPages(self.managers)
        self.storage = GroupedStorage(self.managers)
        self._caches: weakref.WeakValueDictionary[int, GroupedKVCache] = (
            weakref.WeakValueDictionary()
        )

    # -- pools --------------------------------------------------------------------------------

    @property
    def pool(self) -> tuple[Any, ...]:
        """Each group's device pool, in group order; assign back the tuple a step returns."""
        return tuple(manager.pool for manager in self.managers)

    @pool.setter
    def pool(self, pools: Sequence[Any]) -> None:
        for manager, pool in zip(self.managers, pools, strict=True):
            manager.pool = pool

    # -- caches -------------------------------------------------------------------------------

    def create_kv_cache(
        self,
        tokens: Sequence[Token] | np.ndarray | None = None,
        *,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
        priority: int | None = None,
    ) -> GroupedKVCache:
        """A SUSPENDED grouped cache holding the longest prefix of `tokens` every group can
        serve (see `KVCacheManager.create_kv_cache`)."""
        tokens = [] if tokens is None else tokens
        scope = {"lora_id": lora_id, "salt": salt}
        length = self.probe_reuse(tokens, **scope)
        caches = [
            manager.create_kv_cache(tokens[:length], priority=priority, **scope)
            for manager in self.managers
        ]
        assert {cache.num_reused_tokens for cache in caches} == {length}, "groups disagree"
        for cache in caches:  # one group dropping its shared partial block would be shorter
            cache.may_shorten = False
        grouped = GroupedKVCache(caches, self.max_blocks)
        self._caches[id(grouped)] = grouped
        return grouped

    def probe_reuse(
        self,
        tokens: Sequence[Token] | np.ndarray,
        *,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
    ) -> int:
        """Tokens `create_kv_cache` would reuse now: the longest prefix whose end every group
        can serve (a partial block is copied in each group on resume; a group short of a page
        for it fails the resume rather than drop it, so the lengths stay equal)."""
        if len(tokens) > self.max_seq_len:
            raise ValueError(f"{len(tokens)} lookup tokens exceed max_seq_len={self.max_seq_len}")
        length = len(tokens)
        while True:  # each group's match may end earlier at a shorter end: until all agree
            matched = min(
                manager.probe_reuse(tokens[:length], lora_id=lora_id, salt=salt)
                for manager in self.managers
            )
            if matched == length:
                return length
            length = matched

    @property
    def live_caches(self) -> list[GroupedKVCache]:
        return [cache for cache in self._caches.values() if cache.status is not CacheStatus.CLOSED]

    @property
    def page_table_width(self) -> int:
        """Columns of a step's page table: each group's `max_blocks`, side by side."""
        return len(self.managers) * self.max_blocks

    @property
    def stats(self) -> Any:
        """The first group's counters (reuse counts are the same in every group)."""
        return self.managers[0].stats

    def reset_stats(self) -> None:
        for manager in self.managers:
            manager.reset_stats()

    def take_events(self) -> list[Any]:
        """KV events of a full-attention group's tree (the one whose drops end reuse), else
        of the first group's."""
        return self._event_source.take_events()

    @property
    def num_lost_events(self) -> int:
        return self._event_source.num_lost_events

    @property
    def _event_source(self) -> KVCacheManager:
        full = [m for m in self.managers if not m.pages.life_cycle.is_windowed]
        return (full or self.managers)[0]

    def page_table(self, caches: Sequence[GroupedKVCache], num_rows: int, *, out=None):
        """int32[num_rows, groups * max_blocks]: each group's page table of the ACTIVE caches,
        side by side (group g in columns `[g * max_blocks, (g + 1) * max_blocks)`); written
        into `out`, a zeroed array of that shape, when given."""
        width = self.max_blocks
        table = np.zeros((num_rows, self.page_table_width), np.int32) if out is None else out
        for group, manager in enumerate(self.managers):  # each fills its own columns, in place
            part = table[:, group * width : (group + 1) * width]
            manager.page_table([cache.caches[group] for cache in caches], num_rows, out=part)
        return table

    def take_lost_caches(self) -> list[GroupedKVCache]:
        """Grouped caches any of whose groups lost KV on a failed disk move."""
        lost = {id(cache) for manager in self.managers for cache in manager.take_lost_caches()}
        return [cache for cache in self.live_caches if any(id(c) in lost for c in cache.caches)]

    def clear_reusable_blocks(self, tier: Tier | None = None) -> None:
        for manager in self.managers:
            manager.clear_reusable_blocks(tier)

    def shutdown(self) -> None:
        for manager in self.managers:
            manager.shutdown()

    @property
    def moves_digest(self) -> bytes:
        return blake3.blake3(b"".join(m.moves_digest for m in self.managers)).digest()

    def check_invariants(self) -> None:
        """Every group's manager's invariants, and equal lengths across each cache's groups."""
        for manager in self.managers:
            manager.check_invariants()
        for cache in self.live_caches:
            cache.check_invariants()

    def check_no_leaks(self) -> None:
        for manager in self.managers:
            manager.check_no_leaks()


def _of_first(name: str) -> property:
    return property(lambda self: getattr(self.caches[0], name), doc=f"`KVCache.{name}`")


class GroupedKVCache:
    """One sequence's `KVCache` in each layer group, driven as one `KVCache`: lengths, state and
    commits are the same in every group; resume and resize are all or nothing. Not built
    directly: use `GroupedKVCacheManager.create_kv_cache`. Not thread-safe."""

    def __init__(self, caches: Sequence[KVCache], max_blocks: int) -> None:
        self.caches = list(caches)
        self._max_blocks = max_blocks

    # Lengths, status and commit state are equal in every group: the first group's.
    status = _of_first("status")
    is_active = _of_first("is_active")
    commit_state = _of_first("commit_state")
    num_committed_tokens = _of_first("num_committed_tokens")
    committed_tokens = _of_first("committed_tokens")
    history_length = _of_first("history_length")
    capacity = _of_first("capacity")
    num_blocks = _of_first("num_blocks")
    num_reused_tokens = _of_first("num_reused_tokens")
    tokens_per_block = _of_first("tokens_per_block")

    @property
    def kv_lost(self) -> bool:
        return any(cache.kv_lost for cache in self.caches)

    def held_pages(self) -> list[Page]:
        return [page for cache in self.caches for page in cache.held_pages()]

    def page_ids(self) -> list[list[int]]:
        """Each group's device page ids, block by block."""
        return [cache.page_ids() for cache in self.caches]

    def resume(self) -> bool:
        """Resumes every group, or none: a group that cannot suspends the others again."""
        for index, cache in enumerate(self.caches):
            if not cache.resume():
                for resumed in self.caches[:index]:
                    resumed.suspend()
                return False
        return True

    def suspend(self) -> None:
        for cache in self.caches:
            cache.suspend()

    def resize(self, capacity: int | None = None, history_length: int | None = None) -> bool:
        """`KVCache.resize` in every group, all or nothing: a group out of pages shrinks the
        others back. Raises as `KVCache.resize` does, before anything changed."""
        first = self.caches[0]
        if not first.is_active:
            first.resize(capacity, history_length)  # raises: not ACTIVE
        current = (first.history_length, first.capacity)
        checked_lengths(current, history_length, capacity, first.tokens_per_block, self._max_blocks)
        if capacity is not None:
            for index, cache in enumerate(self.caches):
                if not cache.resize(capacity=capacity):
                    for grown in self.caches[:index]:
                        grown.resize(capacity=current[1])
                    return False
        if history_length is not None:
            for cache in self.caches:
                cache.resize(history_length=history_length)
        return True

    def commit(self, tokens: Sequence[Token]) -> None:
        for cache in self.caches:  # the first raises on bad input before any changed
            cache.commit(tokens)

    def stop_committing(self) -> None:
        for cache in self.caches:
            cache.stop_committing()

    def close(self) -> None:
        for cache in self.caches:
            cache.close()

    def check_invariants(self) -> None:
        lengths = {
            (c.status, c.num_committed_tokens, c.history_length, c.capacity) for c in self.caches
        }
        assert len(lengths) == 1, f"groups of one cache disagree: {lengths}"

    def __repr__(self) -> str:
        return f"Grouped{self.caches[0]!r}"
