"""The commit path of a `KVCache`: committed tokens, and each block that becomes full entering
the radix tree (new: the page becomes the tree's; identical and full: rebased onto the tree's
page; otherwise the cache stops committing).

A base class of `KVCache` and nothing else: it works on the cache's own fields, set up by
`KVCache.__init__` (`_tokens`, `_pages`, `_tree_blocks`, `_status`, `_commit_state`, ...).
Host side, no JAX.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvjax.cache.blocks import Block, InsertOutcome
from kvjax.cache.cache_status import CacheOwner, CacheStatus, CommitState
from kvjax.cache.keys import ReuseScope, Token, check_tokens, token_list
from kvjax.cache.pages import Page
from kvjax.cache.tiers import TieredPages

__all__ = ["BlockCommits"]


class BlockCommits:
    """Committing tokens and blocks; see `KVCache`."""

    # The fields of `KVCache` this half reads and writes.
    scope: ReuseScope
    _owner: CacheOwner
    _tiers: TieredPages
    _tpb: int
    _status: CacheStatus
    _commit_state: CommitState
    _tokens: list[Token]
    _history: int
    _capacity: int
    _pages: list[Page | None]
    _tree_blocks: list[Block | None]
    _shared_ordinal: int | None

    def _release_stale(self) -> None: ...  # KVCache's

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
        self._release_stale()  # history moved, and committed stale blocks may go now

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
        self._release_stale()  # stale blocks no longer wait to be committed
        self._owner.apply_moves()

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
        if existing and result.block.page is None:  # a window's block whose page was evicted
            self._tiers.adopt(own, result.block)
            self._tree_blocks[ordinal] = result.block
            return True
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
