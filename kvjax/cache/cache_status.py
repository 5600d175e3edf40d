"""The states of a `KVCache`, the checks of its lengths, and `CacheOwner`: all a cache needs from
the manager that made it.

Host side, no JAX.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol

from kvjax.cache.blocks import Block
from kvjax.cache.keys import Token
from kvjax.cache.life_cycles import LifeCycle
from kvjax.cache.pages import Page, Tier
from kvjax.cache.tiers import TieredPages

__all__ = [
    "CacheOwner",
    "CacheStatus",
    "CommitState",
    "Holdings",
    "OutOfPagesError",
    "check_block",
    "checked_lengths",
]


class OutOfPagesError(RuntimeError):
    """The `capacity` setter could not get pages (`resize` returns False instead)."""


class CacheStatus(enum.Enum):
    ACTIVE = "active"  # pages locked on the device; may grow, commit and run
    SUSPENDED = "suspended"  # pages held anywhere; resume() brings them back
    CLOSED = "closed"


class CommitState(enum.Enum):
    ALLOWED = "allowed"  # each block that becomes full enters the tree
    VIRTUAL_STOP = "virtual_stop"  # a block could not enter the tree: tokens still count
    USER_STOP = "user_stop"  # stop_committing() was called: commit() is refused


class Holdings:
    """The pages a cache holds (the same list the cache grows) and whether it locks them: what
    its finalizer hands back should the cache be dropped without `close()`."""

    __slots__ = ("locked", "pages")

    def __init__(self) -> None:
        self.pages: list[Page | None] = []  # None: a stale block's page went back
        self.locked = False


class CacheOwner(Protocol):
    """What a `KVCache` uses of its manager (the manager's `kvjax.cache.ledger.CacheLedger`)."""

    tiers: TieredPages  # the pages it holds, locks, allocates and commits
    tokens_per_block: int
    max_util_for_resume: float  # resume() refuses above this device utilization
    max_blocks: int  # the most blocks a cache may have
    life_cycle: LifeCycle  # when a block's page stops being needed

    def apply_moves(self) -> None:
        """Carries out the page moves recorded so far (before the pool is read again)."""
        ...

    def count(self, **deltas: int) -> None:
        """Adds to the named `CacheStats` counters."""
        ...

    def block_stored(self, block: Block, tokens: Sequence[Token]) -> None:
        """A block the cache committed entered the tree."""
        ...

    def forget(self, cache: Any) -> None:
        """The cache closed."""
        ...

    def adopt_orphan(self, holdings: Holdings) -> None:
        """A cache was dropped unclosed (called by its finalizer, at any time): release its
        pages at the owner's next operation."""
        ...


def _is_int(value: object) -> bool:
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))


def checked_lengths(
    current: tuple[int, int],
    history_length: object,
    capacity: object,
    tokens_per_block: int,
    max_blocks: int,
) -> tuple[int, int]:
    """The (history, capacity) a `KVCache.resize` from `current` (history, capacity) asks for
    (None keeps a length); raises `ValueError` naming a bad value or the limit it passes."""
    history, current_capacity = current
    if history_length is not None:
        if not _is_int(history_length):
            raise ValueError(f"history_length={history_length!r} is not an int")
        if history_length < history:
            raise ValueError(f"history_length={history_length} must not decrease below {history}")
        history = history_length
    new_capacity = current_capacity if capacity is None else capacity
    if type(new_capacity) is not int and not _is_int(new_capacity):
        raise ValueError(f"capacity={new_capacity!r} is not an int")
    if new_capacity < history:
        raise ValueError(f"capacity={new_capacity} must be >= history_length={history}")
    num_blocks = -(-new_capacity // tokens_per_block)
    if num_blocks > max_blocks:
        raise ValueError(
            f"capacity={new_capacity} needs {num_blocks} blocks > max_blocks={max_blocks} "
            f"({max_blocks * tokens_per_block} tokens; see KVCacheManager(max_seq_len=))"
        )
    return history, new_capacity


def check_block(
    ordinal: int,
    page: Page,
    block: Block | None,
    active: bool,
    shared: bool,
    commit_allowed: bool,
    num_committed: int,
    tokens_per_block: int,
) -> None:
    """Raises `AssertionError` unless block `ordinal` of a cache agrees with its page: held
    (locked on the device while `active`), linked to its tree `block`, or private (unless it is
    the `shared` partial block) and not full of committed tokens while commits are allowed."""
    assert page.num_holders >= 1, f"block {ordinal}: {page!r} is not held"
    assert not active or (page.tier is Tier.DEVICE and page.num_locks), (
        f"block {ordinal}: {page!r} is not locked on the device"
    )
    end = (ordinal + 1) * tokens_per_block
    if block is not None:
        assert page.block is block, f"block {ordinal}: page and tree block disagree"
        assert end <= num_committed or not block.is_full, (
            f"block {ordinal} is committed past the committed tokens"
        )
    elif not shared:
        assert not page.is_committed, f"block {ordinal}: {page!r} is not private"
        assert not commit_allowed or end > num_committed, (
            f"block {ordinal} is full of committed tokens but not in the tree"
        )
