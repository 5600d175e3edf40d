"""KVCache: the pages of one sequence, its three lengths, and its share of the radix tree.

A cache owns one page per block of its capacity, except stale blocks under a window: once no
later token attends to a block, its page goes back (to the tree when committed). Blocks it
reused or committed are tree blocks whose pages it shares; the others are private. While ACTIVE
every page is locked on the device; while SUSPENDED its pages are only held, so they may move
to colder tiers but never leave.
Lengths: `num_committed_tokens <= history_length <= capacity`, `num_blocks == ceil(capacity /
tokens_per_block)`. Created by `KVCacheManager.create_kv_cache`; host side, no JAX.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from kvjax.cache.block_commits import BlockCommits
from kvjax.cache.blocks import Block
from kvjax.cache.cache_status import (
    CacheOwner,
    CacheStatus,
    CommitState,
    Holdings,
    OutOfPagesError,
    check_block,
    checked_lengths,
)
from kvjax.cache.keys import ReuseScope, Token
from kvjax.cache.pages import NULL_PAGE, Page, Tier

__all__ = ["CacheStatus", "CommitState", "KVCache", "OutOfPagesError"]


class KVCache(BlockCommits):
    """One sequence's KV pages. Not built directly: use `KVCacheManager.create_kv_cache`.

    Args:
        owner: what it reports to: its manager's `CacheLedger` (see `CacheOwner`).
        scope: the reuse scope of its blocks (LoRA id and cache salt).
        reused: tree blocks matching a prefix of the lookup tokens, in order.
        reused_tokens: the matched prefix; the last block may be matched in part.
        priority: eviction priority of its pages once released.
    """

    def __init__(
        self,
        owner: CacheOwner,
        scope: ReuseScope,
        reused: Sequence[Block],
        reused_tokens: list[Token],
        priority: int,
    ) -> None:
        self._owner = owner
        self._tiers = owner.tiers
        self._tpb = owner.tokens_per_block
        self.scope = scope
        self.priority = priority
        # What a finalizer releases should the cache be dropped without close().
        self._holdings = Holdings()
        self._finalizer = weakref.finalize(self, owner.adopt_orphan, self._holdings)
        self._status, self._commit_state = CacheStatus.SUSPENDED, CommitState.ALLOWED
        self._kv_lost = False
        self._tokens: list[Token] = reused_tokens
        self._history = self._capacity = len(reused_tokens)
        self.num_reused_tokens = len(reused_tokens)
        self._pages: list[Page | None] = self._holdings.pages  # None: released (stale)
        self._tree_blocks: list[Block | None] = []  # the committed block of each ordinal
        self._life_cycle = owner.life_cycle
        # The stale blocks whose pages went back, [sink blocks, end): the range only grows.
        start, end = self._life_cycle.stale_range(len(reused_tokens), self._tpb)
        self._released = range(start, end)
        pages = [None if ordinal in self._released else block.page for ordinal, block in
                 enumerate(reused)]  # fmt: skip
        self._tiers.hold_all([page for page in pages if page is not None])
        self._pages.extend(pages)
        self._tree_blocks.extend(reused)
        # A match ending mid-block shares that page until the first resume copies it (or, short
        # of a page, drops it when `may_shorten`: not in a group, whose lengths must agree).
        self._shared_ordinal: int | None = None
        self.may_shorten = True
        if len(reused_tokens) % self._tpb:
            self._shared_ordinal = len(reused) - 1
            self._tree_blocks[-1] = None

    # -- lengths and state --------------------------------------------------------------------

    @property
    def status(self) -> CacheStatus:
        return self._status

    @property
    def kv_lost(self) -> bool:
        """Whether a failed disk read or write lost bytes of this cache's pages: its KV is not
        to be read again; close it and recompute the sequence."""
        return self._kv_lost

    def mark_kv_lost(self) -> None:
        """Called by the manager when bytes of this cache's pages were lost: nothing more is
        committed (later blocks would hang off a block the tree dropped)."""
        self._kv_lost = True
        if self._commit_state is CommitState.ALLOWED:
            self._commit_state = CommitState.VIRTUAL_STOP

    @property
    def is_active(self) -> bool:
        return self._status is CacheStatus.ACTIVE

    @property
    def commit_state(self) -> CommitState:
        return self._commit_state

    @property
    def num_committed_tokens(self) -> int:
        return len(self._tokens)

    @property
    def committed_tokens(self) -> tuple[Token, ...]:
        return tuple(self._tokens)

    @property
    def history_length(self) -> int:
        return self._history

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        """`resize(capacity=value)`, raising `OutOfPagesError` when the device is full."""
        if not self.resize(capacity=value):
            raise OutOfPagesError(f"no device pages for capacity={value}")

    @history_length.setter
    def history_length(self, value: int) -> None:
        self.resize(history_length=value)

    @property
    def num_blocks(self) -> int:
        return len(self._pages)

    tokens_per_block = property(lambda self: self._tpb)

    def page_ids(self) -> list[int]:
        """Device page id of each block; all `NULL_PAGE` unless ACTIVE (a suspended cache's pages
        may move at any time, so their ids must not reach a kernel)."""
        if self._status is not CacheStatus.ACTIVE:
            return [NULL_PAGE] * len(self._pages)
        if self._released:
            return [NULL_PAGE if page is None else page.page_id for page in self._pages]
        return [page.page_id for page in self._pages]

    def pages(self) -> tuple[Page | None, ...]:
        """The page of each block, None where a stale block's page went back (for checks and
        debugging)."""
        return tuple(self._pages)

    def held_pages(self) -> list[Page]:
        """The pages this cache holds, block by block."""
        if self._released:
            return [page for page in self._pages if page is not None]
        return list(self._pages)

    @property
    def released_blocks(self) -> range:
        """The stale blocks whose pages went back: no later token attends to them."""
        return self._released

    def __repr__(self) -> str:
        lengths = f"committed={len(self._tokens)}, history={self._history}, capacity="
        return f"KVCache({self._status.name}, {lengths}{self._capacity}, blocks={len(self._pages)})"

    # -- life cycle ---------------------------------------------------------------------------

    def resume(self) -> bool:
        """Locks every page on the device, moving held ones back up; all or nothing.

        The first resume of a cache whose reuse ended mid-block copies that shared page into a
        private one, so nothing ever writes into a page another cache may read.

        Returns:
            False, with nothing changed, when device utilization is above `max_util_for_resume`
            or the device cannot take every page.
        """
        self._require(CacheStatus.SUSPENDED, "resume")
        tiers = self._tiers
        pages = self.held_pages()
        num_copies = int(self._shared_ordinal is not None)
        # The threshold keeps a nearly full device from thrashing. A resume that takes nothing
        # others could use (every page on the device and unevictable, no copy) is always
        # allowed: else suspended caches filling a device with no colder tier never run again.
        takes_room = num_copies or any(
            page.tier is not Tier.DEVICE or tiers.is_evictable(page) for page in pages
        )
        if takes_room and tiers.utilization(Tier.DEVICE) > self._owner.max_util_for_resume:
            return False
        new_pages = tiers.acquire(pages, num_copies, priority=self.priority)
        if new_pages is None:
            if not num_copies or not self.may_shorten or not self._resume_full_blocks_only():
                return False
        elif self._shared_ordinal is not None:
            shared, private = self._pages[self._shared_ordinal], new_pages[0]
            tiers.record_copy(shared, private)
            tiers.unlock(shared)
            tiers.release(shared)
            self._pages[self._shared_ordinal] = private
            self._shared_ordinal = None
        self._set_status(CacheStatus.ACTIVE)
        self._owner.apply_moves()
        return True

    def _resume_full_blocks_only(self) -> bool:
        """Locks the full reused blocks and gives up the shared partial one (its copy takes one
        page more than a cold run would): its tokens are computed again. False, with nothing
        changed, when even the full blocks do not fit, or the shorter history's window reads a
        block given back."""
        ordinal = self._shared_ordinal  # the last block: a suspended cache never grew
        if self._released.stop > self._life_cycle.stale_range(ordinal * self._tpb, self._tpb)[1]:
            return False
        full_blocks = [page for page in self._pages[:ordinal] if page is not None]
        if self._tiers.acquire(full_blocks, priority=self.priority) is None:
            return False
        self._tiers.release(self._pages.pop())
        self._tree_blocks.pop()
        del self._tokens[ordinal * self._tpb :]
        self._history = self._capacity = self.num_reused_tokens = len(self._tokens)
        self._shared_ordinal = None
        self._owner.count(reused_blocks=-1, partially_reused_blocks=-1, missed_blocks=1)
        return True

    def suspend(self) -> None:
        """Unlocks every page: they stay held (never dropped) but may move to colder tiers."""
        self._require(CacheStatus.ACTIVE, "suspend")
        for page in reversed(self.held_pages()):  # the tail becomes the first to move
            self._tiers.unlock(page)
        self._set_status(CacheStatus.SUSPENDED)

    def resize(self, capacity: int | None = None, history_length: int | None = None) -> bool:
        """Sets the capacity (grow allocates, shrink frees trailing blocks: the speculative
        rewind) and/or moves the history cursor forward.

        Returns:
            False, with nothing changed, when the device cannot hold the new blocks.

        Raises:
            RuntimeError: the cache is not ACTIVE.
            ValueError: history would decrease, or capacity fall below history.
        """
        if self._status is not CacheStatus.ACTIVE:
            self._require(CacheStatus.ACTIVE, "resize")
        current = (self._history, self._capacity)
        history, new_capacity = checked_lengths(
            current, history_length, capacity, self._tpb, self._owner.max_blocks
        )
        num_blocks = -(-new_capacity // self._tpb)
        have = len(self._pages)
        if num_blocks > have:
            new_pages = self._tiers.allocate(num_blocks - have, priority=self.priority)
            if new_pages is None:
                return False
            self._pages += new_pages
            self._tree_blocks += [None] * len(new_pages)
            self._owner.count(new_blocks=len(new_pages))
            self._owner.apply_moves()
        elif num_blocks < have:
            # Past capacity there is no committed token (committed <= history <= capacity), so
            # every trailing page is private and is freed.
            for page in reversed(self._pages[num_blocks:]):
                self._tiers.unlock(page)
                self._tiers.release(page)
            del self._pages[num_blocks:], self._tree_blocks[num_blocks:]
        self._capacity = new_capacity
        if history != self._history:
            self._history = history
            self._release_stale()
        return True

    def _release_stale(self) -> None:
        """Gives back the pages of blocks no later token attends to (see `LifeCycle`): committed
        ones stay in the tree as cache; a block that may still be committed waits for it."""
        cycle = self._life_cycle
        if not cycle.is_windowed:
            return
        start, end = cycle.stale_range(self._history, self._tpb)
        if self._commit_state is CommitState.ALLOWED:
            end = min(end, len(self._tokens) // self._tpb)
        if end <= max(start, self._released.stop):
            return
        active = self._status is CacheStatus.ACTIVE
        for ordinal in range(max(start, self._released.stop), end):
            page = self._pages[ordinal]
            if active:
                self._tiers.unlock(page)
            self._tiers.release(page)
            self._pages[ordinal] = None
        self._released = range(start, end)

    def close(self) -> None:
        """Stops committing and releases every page, last block first: committed pages stay in
        the tree as DROPPABLE cache, private ones are freed. Idempotent."""
        if self._status is CacheStatus.CLOSED:
            return
        self.stop_committing()
        for page in reversed(self.held_pages()):
            if self._status is CacheStatus.ACTIVE:
                self._tiers.unlock(page)
            self._tiers.release(page)
        self._pages.clear()
        self._tree_blocks.clear()
        self._shared_ordinal = None
        self._set_status(CacheStatus.CLOSED)
        self._finalizer.detach()
        self._owner.forget(self)
        self._owner.apply_moves()

    # -- internals ----------------------------------------------------------------------------

    def _set_status(self, status: CacheStatus) -> None:
        self._status = status
        self._holdings.locked = status is CacheStatus.ACTIVE

    def _require(self, status: CacheStatus, operation: str) -> None:
        if self._status is not status:
            raise RuntimeError(
                f"{operation}() needs a {status.name} cache; this one is {self._status.name}"
            )

    def _require_open(self, operation: str) -> None:
        if self._status is CacheStatus.CLOSED:
            raise RuntimeError(f"{operation}() on a CLOSED cache")

    def check_invariants(self) -> None:
        """Raises `AssertionError` unless the lengths, blocks and page states agree."""
        if self._status is CacheStatus.CLOSED:
            assert not self._pages, "a closed cache kept pages"
            return
        committed, history, capacity = len(self._tokens), self._history, self._capacity
        assert committed <= history <= capacity, f"lengths {committed}, {history}, {capacity}"
        assert len(self._pages) == -(-capacity // self._tpb), f"{self!r} has a wrong block count"
        assert len(self._tree_blocks) == len(self._pages), "tree blocks out of step with pages"
        active = self._status is CacheStatus.ACTIVE
        assert not (active and self._shared_ordinal is not None), "copy-on-write left undone"
        allowed = self._commit_state is CommitState.ALLOWED
        for ordinal, (page, block) in enumerate(zip(self._pages, self._tree_blocks, strict=True)):
            if page is None:
                assert ordinal in self._released, f"block {ordinal} lost its page"
                continue
            assert ordinal not in self._released, f"block {ordinal} kept a stale page"
            shared = ordinal == self._shared_ordinal
            check_block(ordinal, page, block, active, shared, allowed, committed, self._tpb)
