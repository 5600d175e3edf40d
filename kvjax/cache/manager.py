"""KVCacheManager: the tiers, the radix tree, the storage it is given and every `KVCache` on them.

The manager decides; the storage carries out. Every operation records the page moves its
decisions need (offload, onload, copy-on-write, relocation) and applies them to the storage in
order before returning, so the pool value the engine reads next is always current. The module
imports no JAX: build the storage with `kvjax.runtime.storage.KVStorage.for_config(config)`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvjax.cache.blocks import MatchResult
from kvjax.cache.checks import check_int
from kvjax.cache.config import CacheConfig
from kvjax.cache.eviction import PRIORITY_DEFAULT, check_priority
from kvjax.cache.keys import ReuseScope, Token, token_list
from kvjax.cache.kv_cache import KVCache
from kvjax.cache.ledger import CacheLedger, PageStorage
from kvjax.cache.life_cycles import LayerAttention, LayerGroups, usable_prefix
from kvjax.cache.manager_reports import ManagerReports
from kvjax.cache.pages import Tier, fill_rows
from kvjax.cache.radix_tree import BlockRadixTree
from kvjax.cache.tiers import TieredPages

__all__ = ["KVCacheManager"]


def _tier_sizes(config: CacheConfig, storage: PageStorage) -> dict[Tier, int]:
    """The pages of each tier, from the storage; raises where they contradict the config."""
    layout, wanted = (tuple(storage.page_shape), storage.dtype), (config.page_shape, config.dtype)
    if layout != wanted:
        raise ValueError(f"storage pages are {layout}; config needs {wanted}")
    sizes = {tier: storage.num_pages(tier) for tier in Tier}
    expected = {
        Tier.DEVICE: config.num_device_pages,
        Tier.HOST: config.num_host_pages,  # None: the storage's own choice
        Tier.DISK: config.num_disk_pages,
    }
    for tier, size in expected.items():
        if size is not None and sizes[tier] != size:
            raise ValueError(f"storage has {sizes[tier]} {tier.name} pages; config needs {size}")
    return sizes


class KVCacheManager(ManagerReports):
    """Paged KV storage on tiers, shared through a radix tree by the caches it creates.

    Not thread-safe: one thread drives a manager and its caches (the engine's stepping thread).

    Args:
        config: geometry and quotas.
        storage: the page bytes of every tier, sized as `config` says
            (`KVStorage.for_config(config)`, which also provisions the automatic host tier).
        max_seq_len: the longest sequence the page tables must fit (default: what the device
            holds; a larger one is clamped to it, with a warning); with `num_extra_kv_tokens`
            and `max_total_draft_tokens` it sets `max_blocks`, the width of `page_table` and
            the most blocks a cache may have. Lookups longer than `max_seq_len` are refused.
        max_events: KV events kept for `take_events` (0 turns them off).
    """

    def __init__(
        self,
        config: CacheConfig,
        storage: PageStorage,
        *,
        max_seq_len: int | None = None,
        num_extra_kv_tokens: int = 0,
        max_total_draft_tokens: int = 0,
        max_events: int = 1024,
    ) -> None:
        if not isinstance(config, CacheConfig):
            raise ValueError(f"config={config!r} is not a CacheConfig")
        sizes = _tier_sizes(config, storage)
        if max_seq_len is not None:
            check_int("max_seq_len", max_seq_len, minimum=1)
        self.config = config
        self._tree = BlockRadixTree(
            config.tokens_per_block, enable_partial_reuse=config.enable_partial_reuse
        )
        tiers = TieredPages(self._tree, sizes[Tier.DEVICE], sizes[Tier.HOST], sizes[Tier.DISK])
        self._ledger = CacheLedger(config, tiers, storage, max_events)
        self._is_shut_down = False
        self._requested_lengths = (max_seq_len, num_extra_kv_tokens, max_total_draft_tokens)
        self._set_life_cycle()
        self._set_max_lengths()
        if max_seq_len is not None and self.max_seq_len < max_seq_len:
            warnings.warn(
                f"max_seq_len={max_seq_len} is clamped to {self.max_seq_len}: the tokens "
                f"{self.pages.num_usable(Tier.DEVICE)} usable device pages hold",
                stacklevel=2,
            )

    def _set_max_lengths(self) -> None:
        """`max_seq_len` clamped to the device (default: all of it) and `max_blocks` from it."""
        requested, extra, draft = self._requested_lengths
        wanted = requested or self.pages.num_usable(Tier.DEVICE) * self.config.tokens_per_block
        self.max_seq_len = self.clamp_max_seq_len(1, wanted)
        self.max_blocks = self.max_blocks_per_seq(self.max_seq_len, extra, draft)
        self._ledger.max_blocks = self.max_blocks

    def _set_life_cycle(self) -> None:
        """When a page stops being needed, fixed for the manager's life (a quota resize keeps
        it: the tree may hold blocks a window let go). A page holds every layer of a block: it
        goes once every group is done with it."""
        tpb, requested = self.config.tokens_per_block, self._requested_lengths[0]
        length = requested or self.pages.num_usable(Tier.DEVICE) * tpb
        layers = self.config.layer_attention or (LayerAttention(),) * self.config.num_layers
        self.layer_groups = LayerGroups(layers, tpb, length)
        self._ledger.life_cycle = self.pages.life_cycle = self.layer_groups.page_life_cycle

    # -- the pool and the tiers ---------------------------------------------------------------

    @property
    def pool(self) -> Any:
        """The device pool `[num_pages, *page_shape]`; assign back the one a step returns."""
        return self.storage.pool

    @pool.setter
    def pool(self, value: Any) -> None:
        self.storage.pool = value

    @property
    def storage(self) -> PageStorage:
        return self._ledger.storage

    @property
    def pages(self) -> TieredPages:
        """Page bookkeeping of every tier (read it; change it only through caches and this
        manager)."""
        return self._ledger.tiers

    @property
    def live_caches(self) -> list[KVCache]:
        return list(self._ledger.caches.values())

    def quota(self, tier: Tier) -> int:
        """Bytes of `tier` (the device's `NULL_PAGE` included)."""
        return self.pages.num_pages(tier) * self.config.page_bytes

    def resize_quota(
        self, tier: Tier, *, num_pages: int | None = None, num_bytes: int | None = None
    ) -> bool:
        """Changes the size of a tier while every cache is suspended.

        Shrinking evicts down the cascade (and drops cached blocks from the coldest tier) until
        the held pages fit. A device resize gives the pool a new shape (jitted steps recompile)
        and recomputes `max_seq_len` and `max_blocks`.

        Returns:
            False, with nothing changed, when the held pages would not fit.
        """
        self._require_running()
        if (num_pages is None) == (num_bytes is None):
            raise ValueError(f"give exactly one of num_pages={num_pages} and num_bytes={num_bytes}")
        page_bytes = self.config.page_bytes
        minimum = 2 if tier is Tier.DEVICE else 1
        if num_pages is None:
            check_int("num_bytes", num_bytes, minimum=minimum * page_bytes)
            num_pages = num_bytes // page_bytes
        active = next((cache for cache in self.live_caches if cache.is_active), None)
        if active is not None:
            raise RuntimeError(f"resize_quota needs every cache suspended; {active!r} is active")
        if not self.pages.resize_tier(tier, num_pages):
            return False
        self._ledger.apply_moves()  # relocations run before the array shrinks
        self.storage.resize(tier, num_pages)
        if tier is Tier.DEVICE:
            self._set_max_lengths()
        return True

    # -- caches -------------------------------------------------------------------------------

    def create_kv_cache(
        self,
        tokens: Sequence[Token] | np.ndarray | None = None,
        *,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
        priority: int | None = None,
    ) -> KVCache:
        """A SUSPENDED cache holding the longest reusable prefix of `tokens` in its scope.

        Pass the tokens whose KV may be reused: a caller that must recompute the last prompt
        token (to get its logits) leaves it out. Call `resume()` before growing the cache.

        Args:
            tokens: lookup token ids (or 32-byte digests), or None for no reuse.
            lora_id, salt: the reuse scope; caches of different scopes never share blocks.
            priority: eviction priority of this cache's pages, 0..100 (default 35).
        """
        self._require_running()
        priority = PRIORITY_DEFAULT if priority is None else check_priority(priority)
        scope = ReuseScope(lora_id, salt)
        tokens = [] if tokens is None else tokens
        if len(tokens) > self.max_seq_len:
            raise ValueError(f"{len(tokens)} lookup tokens exceed max_seq_len={self.max_seq_len}")
        match = self._match(scope, tokens)
        reused = token_list(tokens[: match.num_tokens])  # a new list: the slice
        cache = KVCache(self._ledger, scope, match.blocks, reused, priority)
        tpb = self.config.tokens_per_block
        partial = int(match.num_tokens % tpb != 0)
        self._ledger.count(
            reused_blocks=len(match.blocks),
            partially_reused_blocks=partial,
            missed_blocks=math.ceil(len(tokens) / tpb) - len(match.blocks),
        )
        self._ledger.register(cache)
        return cache

    def probe_reuse(
        self,
        tokens: Sequence[Token] | np.ndarray,
        *,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
    ) -> int:
        """How many leading tokens `create_kv_cache` would reuse now; takes nothing."""
        self._require_running()
        return self._match(ReuseScope(lora_id, salt), tokens).num_tokens

    def _match(self, scope: ReuseScope, tokens: Sequence[Token] | np.ndarray) -> MatchResult:
        """The tree's match, cut where attention would read a block whose page a window let
        go (see `usable_prefix`)."""
        match, cycle = self._tree.match(scope, tokens), self.pages.life_cycle
        if not cycle.is_windowed:
            return match
        pages, tpb = [block.page for block in match.blocks], self.config.tokens_per_block
        num_blocks, num_tokens = usable_prefix(pages, match.num_tokens, cycle, tpb)
        return MatchResult(match.blocks[:num_blocks], num_tokens)

    def clamp_max_seq_len(self, batch_size: int, upper_bound: int) -> int:
        """The longest sequence (<= `upper_bound`) the device holds next to `batch_size - 1`
        others of one block each; under a window (stale pages go back) any length."""
        check_int("upper_bound", upper_bound, minimum=1)
        num_pages = self.pages.num_usable(Tier.DEVICE)
        check_int("batch_size", batch_size, minimum=1, maximum=num_pages)
        if self.pages.life_cycle.is_windowed:
            return upper_bound
        return min(upper_bound, (num_pages - batch_size + 1) * self.config.tokens_per_block)

    def max_blocks_per_seq(
        self, max_seq_len: int, num_extra_kv_tokens: int = 0, max_total_draft_tokens: int = 0
    ) -> int:
        """Page-table width: `max_seq_len` clamped to the device first, plus extra KV tokens,
        draft tokens and the decode token, in blocks (the seed PR's fix of an undercount)."""
        check_int("num_extra_kv_tokens", num_extra_kv_tokens, minimum=0)
        check_int("max_total_draft_tokens", max_total_draft_tokens, minimum=0)
        clamped = self.clamp_max_seq_len(1, max_seq_len)
        tokens = clamped + num_extra_kv_tokens + max_total_draft_tokens + 1
        return -(-tokens // self.config.tokens_per_block)

    @property
    def page_table_width(self) -> int:
        """Columns of a step's page table (`max_blocks`)."""
        return self.max_blocks

    def page_table(
        self, caches: Sequence[KVCache], num_rows: int, num_columns: int | None = None, *, out=None
    ) -> np.ndarray:
        """int32[num_rows, num_columns] of device page ids, one row per ACTIVE cache, padded with
        `NULL_PAGE` (`num_columns` defaults to `max_blocks`); written into `out`, a zeroed
        int32[num_rows, num_columns] array, when given."""
        num_columns = self.max_blocks if num_columns is None else num_columns
        check_int("num_rows", num_rows, minimum=len(caches))
        check_int("num_columns", num_columns, minimum=1)
        table = np.zeros((num_rows, num_columns), np.int32) if out is None else out
        return fill_rows(table, self.get_batch_cache_indices(caches))

    def get_batch_cache_indices(self, caches: Sequence[KVCache]) -> list[list[int]]:
        """Device page ids of each ACTIVE cache, block by block."""
        self._ledger.release_orphans()
        for cache in caches:
            if not self._ledger.is_live(cache):
                raise ValueError(f"{cache!r} is not a live cache of this manager")
            if not cache.is_active:
                raise ValueError(f"{cache!r} is not ACTIVE; resume it first")
        return [cache.page_ids() for cache in caches]

    def clear_reusable_blocks(self, tier: Tier | None = None) -> None:
        """Empties the radix tree, or drops only the blocks whose pages are on `tier` (and
        their subtrees): cached pages are freed; pages live caches hold stay theirs."""
        self._require_running()
        if tier is None:
            self.pages.clear()
        else:
            self.pages.drop_blocks_on(tier)
        self._ledger.apply_moves()

    def shutdown(self) -> None:
        """Clears the tree and releases the storage; every cache must be closed. Idempotent."""
        if self._is_shut_down:
            return
        self._ledger.release_orphans()
        if self._ledger.caches:
            num_open = len(self._ledger.caches)
            raise RuntimeError(f"shutdown with {num_open} caches still open; close them")
        self.pages.clear()
        self.storage.close()
        self._is_shut_down = True

    def _require_running(self) -> None:
        if self._is_shut_down:
            raise RuntimeError("this KVCacheManager was shut down")
        self._ledger.release_orphans()
