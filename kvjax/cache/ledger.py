"""CacheLedger: what a manager shares with its caches, behind the `CacheOwner` interface.

Each `KVCache` reports to its manager's ledger, never to the manager itself: the pages on tiers,
the page moves to carry out on the storage, counters, KV events and the set of live caches. Host
side, no JAX: the storage is any object with the `PageStorage` methods.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

import blake3
import numpy as np

from kvjax.cache.blocks import Block
from kvjax.cache.cache_status import Holdings
from kvjax.cache.checks import check_int
from kvjax.cache.config import CacheConfig
from kvjax.cache.keys import Token
from kvjax.cache.pages import Tier
from kvjax.cache.stats import BlockRemoved, BlockStored, CacheStats, EventBuffer
from kvjax.cache.tier import PageMove, PageMoveError
from kvjax.cache.tiers import TieredPages

__all__ = ["CacheLedger", "PageStorage"]


class PageStorage(Protocol):
    """The bytes of every tier, as the manager drives them (`kvjax.runtime.storage.KVStorage`).

    `pool` is the device array that steps read and return; `apply` carries out page moves in
    order; `num_pages(tier)` counts `NULL_PAGE` on the device and is 0 for an absent tier.
    """

    page_shape: tuple[int, ...]
    dtype: np.dtype
    pool: Any

    def num_pages(self, tier: Tier) -> int: ...

    def apply(self, moves: Sequence[PageMove]) -> Any: ...

    def resize(self, tier: Tier, num_pages: int) -> None: ...

    def reset_pool(self) -> None: ...

    def close(self) -> None: ...


class CacheLedger:
    """The state a manager's caches share: `tiers`, `storage`, stats, events and live caches.

    It is the `CacheOwner` each `KVCache` is given. Not thread-safe, like the manager.

    Args:
        config: geometry and the options caches read (`tokens_per_block`,
            `max_util_for_resume`).
        tiers: the page bookkeeping over the radix tree.
        storage: the bytes the recorded page moves are applied to.
        max_events: KV events kept until taken (0 turns them off).
    """

    def __init__(
        self, config: CacheConfig, tiers: TieredPages, storage: PageStorage, max_events: int
    ) -> None:
        self.config = config
        self.tiers = tiers
        self.storage = storage
        self.tokens_per_block = config.tokens_per_block
        self.max_util_for_resume = config.max_util_for_resume
        self.max_blocks = 0  # set by the manager from max_seq_len
        self.life_cycle = tiers.life_cycle  # when a cache's stale pages go back
        self.stats = CacheStats()
        self.events = EventBuffer(check_int("max_events", max_events, minimum=0))
        self.moves_digest = b""  # chained over every page move applied
        # Live caches by id(), in creation order; weak, so a cache dropped unclosed is found.
        self.caches: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.orphans: list[Holdings] = []  # of caches dropped unclosed, not released yet
        self.lost_caches: list[weakref.ref] = []  # marked kv_lost, not taken yet
        self._num_dropped_seen = 0
        tiers.on_blocks_removed = self._blocks_removed

    def apply_moves(self) -> None:
        """Applies the recorded page moves to the storage, in order, and counts them."""
        moves = self.tiers.take_moves()
        if moves:
            try:
                self.storage.apply(moves)
            except PageMoveError as error:
                self._lose_pages(moves, error)
            record = [(m.src_tier, m.src_page, m.dst_tier, m.dst_page) for m in moves]
            record = np.asarray(record, np.int64).tobytes()
            self.moves_digest = blake3.blake3(self.moves_digest + record).digest()
            kinds = Counter((move.src_tier, move.dst_tier) for move in moves)
            for (src, dst), count in kinds.items():
                self.stats.count_move(src, dst, count, self.config.page_bytes)
        dropped = self.tiers.num_dropped_blocks
        self.stats.dropped_blocks += dropped - self._num_dropped_seen
        self._num_dropped_seen = dropped

    def _lose_pages(self, moves: list[PageMove], error: PageMoveError) -> None:
        """Forgets the pages whose bytes a failed move left unwritten: their blocks leave the
        tree (with their subtrees) and every cache holding one is marked `kv_lost`."""
        failed, tainted = set(error.failed), set()
        for index, move in enumerate(moves):  # follow the bad bytes through later moves
            src, dst = (move.src_tier, move.src_page), (move.dst_tier, move.dst_page)
            # A copy keeps its source, a relocation leaves it: a slot stays suspect either way
            # (at worst a new page there is counted lost and its cache recomputes).
            (tainted.add if index in failed or src in tainted else tainted.discard)(dst)
        lost = [page for slot in tainted if (page := self.tiers.page(*slot)) is not None]
        lost_ids = {id(page) for page in lost}
        holders = [
            c for c in self.caches.values() if any(id(p) in lost_ids for p in c.held_pages())
        ]
        for cache in holders:
            cache.mark_kv_lost()
            self.lost_caches.append(weakref.ref(cache))
        for page in lost:
            if page.block is not None and page.block.is_attached:  # not pruned already
                self.tiers.drop_block(page.block)
        self.stats.lost_pages += len(lost)
        warnings.warn(
            f"{error}: {len(lost)} pages lost; their blocks left the radix tree and "
            f"{len(holders)} caches holding them must be recomputed",
            RuntimeWarning,
            stacklevel=4,
        )

    def take_lost_caches(self) -> list[Any]:
        """Live caches marked `kv_lost` since the last call."""
        caches = [cache for ref in self.lost_caches if (cache := ref()) is not None]
        self.lost_caches = []
        return [cache for cache in caches if self.is_live(cache)]

    def count(self, **deltas: int) -> None:
        """Adds to the named `CacheStats` counters."""
        for name, delta in deltas.items():
            setattr(self.stats, name, getattr(self.stats, name) + delta)

    def block_stored(self, block: Block, tokens: Sequence[Token]) -> None:
        """A cache committed a new block to the tree."""
        self.stats.stored_blocks += 1
        if self.events.max_events:
            page = block.page
            self.events.append(
                BlockStored(block.key, block.parent.key, tuple(tokens), page.tier, page.priority)
            )

    def _blocks_removed(self, blocks: Sequence[Block]) -> None:
        for block in blocks:
            self.events.append(BlockRemoved(block.key))

    def register(self, cache: Any) -> None:
        self.caches[id(cache)] = cache

    def forget(self, cache: Any) -> None:
        """A cache closed: it is no longer live."""
        del self.caches[id(cache)]

    def is_live(self, cache: Any) -> bool:
        return self.caches.get(id(cache)) is cache

    def adopt_orphan(self, holdings: Holdings) -> None:
        # A finalizer may run in the middle of any operation: only queue the pages here.
        self.orphans.append(holdings)

    def release_orphans(self) -> None:
        """Releases the pages of caches dropped without `close()`, with a warning."""
        while self.orphans:
            holdings = self.orphans.pop()
            for page in reversed([page for page in holdings.pages if page is not None]):
                if holdings.locked:
                    self.tiers.unlock(page)
                self.tiers.release(page)
            warnings.warn(
                f"a KVCache was dropped without close(): its {len(holdings.pages)} pages are "
                "released now; close caches when their sequence ends",
                ResourceWarning,
                stacklevel=3,
            )
            holdings.pages.clear()
            self.apply_moves()
