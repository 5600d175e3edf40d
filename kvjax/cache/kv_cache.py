"""KVCache: the pages of one sequence, its three lengths, and its share of the radix tree.

A cache owns one page per block of its capacity. Blocks it reused or committed are tree blocks
whose pages it shares; the others are private. While ACTIVE every page is locked on the device;
while SUSPENDED its pages are only held, so they may move to colder tiers but never leave.
Lengths: `num_committed_tokens <= history_length <= capacity`, `num_blocks == ceil(capacity /
tokens_per_block)`. Created by `KVCacheManager.create_kv_cache`; host side, no JAX.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvjax.cache.blocks import Block, InsertOutcome
from kvjax.cache.cache_status import (
    CacheOwner,
    CacheStatus,
    CommitState,
    OutOfPagesError,
    check_block,
    checked_lengths,
)
from kvjax.cache.keys import ReuseScope, Token, check_tokens, token_list
from kvjax.cache.pages import NULL_PAGE, Page, Tier

__all__ = ["CacheStatus", "CommitState", "KVCache", "OutOfPagesError"]


class KVCache:
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
        self._status = CacheStatus.SUSPENDED
        self._commit_state = CommitState.ALLOWED
        self._tokens: list[Token] = reused_tokens
        self._history = self._capacity = len(reused_tokens)
        self.num_reused_tokens = len(reused_tokens)
        self._pages: list[Page] = []
        self._tree_blocks: list[Block | None] = []  # the committed block of each ordinal
        for block in reused:
            self._tiers.hold(block.page)
            self._pages.append(block.page)
            self._tree_blocks.append(block)
        # A match ending mid-block shares that page until the first resume copies it.
        self._shared_ordinal: int | None = None
        if len(reused_tokens) % self._tpb:
            self._shared_ordinal = len(reused) - 1
            self._tree_blocks[-1] = None

    # -- lengths and state --------------------------------------------------------------------

    @property
    def status(self) -> CacheStatus:
        return self._status

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

    @property
    def tokens_per_block(self) -> int:
        return self._tpb

    def page_ids(self) -> list[int]:
        """Device page id of each block; all `NULL_PAGE` unless ACTIVE (a suspended cache's pages
        may move at any time, so their ids must not reach a kernel)."""
        if self._status is not CacheStatus.ACTIVE:
            return [NULL_PAGE] * len(self._pages)
        return [page.page_id for page in self._pages]

    def pages(self) -> tuple[Page, ...]:
        """The page of each block (for checks and debugging)."""
        return tuple(self._pages)

    def __repr__(self) -> str:
        return (
            f"KVCache({self._status.name}, committed={len(self._tokens)}, "
            f"history={self._history}, capacity={self._capacity}, blocks={len(self._pages)})"
        )

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
        num_copies = int(self._shared_ordinal is not None)
        # The threshold keeps a nearly full device from thrashing. A resume that takes nothing
        # others could use (every page on the device and unevictable, no copy) is always
        # allowed: else suspended caches filling a device with no colder tier never run again.
        takes_room = num_copies or any(
            page.tier is not Tier.DEVICE or tiers.is_evictable(page) for page in self._pages
        )
        if takes_room and tiers.utilization(Tier.DEVICE) > self._owner.max_util_for_resume:
            return False
        new_pages = tiers.acquire(self._pages, num_copies, priority=self.priority)
        if new_pages is None:
            return False
        if self._shared_ordinal is not None:
            shared, private = self._pages[self._shared_ordinal], new_pages[0]
            tiers.record_copy(shared, private)
            tiers.unlock(shared)
            tiers.release(shared)
            self._pages[self._shared_ordinal] = private
            self._shared_ordinal = None
        self._status = CacheStatus.ACTIVE
        self._owner.apply_moves()
        return True

    def suspend(self) -> None:
        """Unlocks every page: they stay held (never dropped) but may move to colder tiers."""
        self._require(CacheStatus.ACTIVE, "suspend")
        for page in reversed(self._pages):  # the tail becomes the first to move
            self._tiers.unlock(page)
        self._status = CacheStatus.SUSPENDED

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
        self._history = history
        return True

    def commit(self, tokens: Sequence[Token]) -> None:
        """Appends tokens whose KV is written; each block that becomes full enters the tree.

        History moves up to at least the committed length.

        Raises:
            RuntimeError: the cache is not ACTIVE, or `stop_committing()` was called.
            ValueError: a bad token, or more committed tokens than capacity.
        """
        if self._status is not CacheStatus.ACTIVE:
            self._require(CacheStatus.ACTIVE, "commit")
        if self._commit_state is CommitState.USER_STOP:
            raise RuntimeError("commit() after stop_committing(); use resize(history_length=)")
        if type(tokens) is not list:  # lists (the common case) are only read
            tokens = token_list(tokens)
        old_length = len(self._tokens)
        check_tokens(tokens, old_length)
        new_length = old_length + len(tokens)
        if new_length > self._capacity:
            raise ValueError(
                f"committing {len(tokens)} tokens makes {new_length} > capacity={self._capacity}"
            )
        self._tokens += tokens
        if new_length > self._history:
            self._history = new_length
        first, end = old_length // self._tpb, new_length // self._tpb
        if first < end and self._commit_state is CommitState.ALLOWED:
            for ordinal in range(first, end):
                if not self._commit_block(ordinal):
                    break
            self._owner.apply_moves()  # a rebase may have brought a tree page up

    def stop_committing(self) -> None:
        """Commits a trailing partial block, then refuses further commits. Idempotent."""
        self._require_open("stop_committing")
        if self._commit_state is CommitState.USER_STOP:
            return
        ordinal, remainder = divmod(len(self._tokens), self._tpb)
        # A still-shared partial block already is a prefix of a tree block: nothing to add.
        allowed = self._commit_state is CommitState.ALLOWED
        if allowed and remainder and ordinal != self._shared_ordinal:
            self._commit_block(ordinal)
        self._commit_state = CommitState.USER_STOP
        self._owner.apply_moves()

    def close(self) -> None:
        """Stops committing and releases every page, last block first: committed pages stay in
        the tree as DROPPABLE cache, private ones are freed. Idempotent."""
        if self._status is CacheStatus.CLOSED:
            return
        self.stop_committing()
        for page in reversed(self._pages):
            if self._status is CacheStatus.ACTIVE:
                self._tiers.unlock(page)
            self._tiers.release(page)
        self._pages.clear()
        self._tree_blocks.clear()
        self._shared_ordinal = None
        self._status = CacheStatus.CLOSED
        self._owner.forget(self)
        self._owner.apply_moves()

    # -- internals ----------------------------------------------------------------------------

    def _commit_block(self, ordinal: int) -> bool:
        """Offers block `ordinal` (full, or the partial last one) to the tree.

        New: our page becomes the tree's. Identical and both full: rebase onto the tree's page
        and free ours. Anything else (a partial block, the `is_full` guard of the seed PR, a hash
        collision): keep the private page and stop committing (VIRTUAL_STOP).
        """
        start = ordinal * self._tpb
        tokens = self._tokens[start : start + self._tpb]
        parent = self.scope if ordinal == 0 else self._tree_blocks[ordinal - 1]
        if parent is None or (isinstance(parent, Block) and not parent.is_attached):
            return self._stop_virtually()
        own = self._pages[ordinal]
        result = self._tiers.commit(own, parent, tokens)
        if result.outcome is InsertOutcome.NEW:
            self._tree_blocks[ordinal] = result.block
            self._owner.block_stored(result.block, tokens)
            return True
        existing = result.outcome is InsertOutcome.EXISTING
        if existing and len(tokens) == self._tpb and result.block.is_full:  # the is_full guard
            return self._rebase(ordinal, result.block) or self._stop_virtually()
        return self._stop_virtually()

    def _stop_virtually(self) -> bool:
        """A block could not enter the tree: later ones cannot either (returns False)."""
        self._commit_state = CommitState.VIRTUAL_STOP
        return False

    def _rebase(self, ordinal: int, block: Block) -> bool:
        """Swaps our private page of `ordinal` for the identical full tree block's page."""
        tree_page, own = block.page, self._pages[ordinal]
        self._tiers.hold(tree_page)
        if self._status is CacheStatus.ACTIVE:
            if self._tiers.acquire([tree_page]) is None:
                self._tiers.release(tree_page)
                return False
            self._tiers.unlock(own)
        self._tiers.release(own)
        self._pages[ordinal] = tree_page
        self._tree_blocks[ordinal] = block
        self._owner.count(rebased_blocks=1)
        return True

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
            shared = ordinal == self._shared_ordinal
            check_block(ordinal, page, block, active, shared, allowed, committed, self._tpb)
