"""Nodes of the block radix tree: a root per reuse scope, committed blocks below it, the sorted
index of a wide node's children, and what matching and inserting return.

The tree (`kvjax.cache.radix_tree`) links and unlinks these nodes; `TieredPages` gives each block
its page.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from sortedcontainers import SortedDict

from kvjax.cache.keys import (
    BlockKey,
    ReuseScope,
    Token,
    decode_payload,
    is_tagged,
    tagged_payload,
)
from kvjax.cache.pages import Page

__all__ = [
    "Block",
    "InsertOutcome",
    "InsertResult",
    "MatchResult",
    "Node",
    "RootBlock",
    "SortedChildren",
    "check_scope",
    "common_tokens",
    "order_key",
]


class Node:
    """Children of a root or block by payload (their encoded tokens), plus the partial ones and
    an optional sorted index."""

    __slots__ = ("children", "key", "partial_children", "sorted_children")

    def __init__(self, key: BlockKey) -> None:
        self.key = key
        self.children: dict[bytes, Block] = {}
        self.partial_children: dict[bytes, Block] | None = None  # partial children, by payload
        self.sorted_children: SortedChildren | None = None


class RootBlock(Node):
    """The root of one reuse scope; it exists in the tree while it has children."""

    __slots__ = ("is_attached", "scope", "tree")
    ordinal = -1
    is_full = True

    def __init__(self, scope: ReuseScope, tree: object) -> None:
        super().__init__(scope.root_key)
        self.scope = scope
        self.tree = tree  # blocks of another tree must never become parents here
        self.is_attached = False

    @property
    def root(self) -> RootBlock:
        return self


class Block(Node):
    """One committed block: `num_tokens` tokens (`tokens_per_block` unless it is a partial leaf).

    Attributes:
        payload: the encoded tokens (see `kvjax.cache.keys.encode_block`).
        parent: the block or root before it; None once the block left the tree.
        page: its page on some tier, set by `TieredPages`.
    """

    __slots__ = ("is_full", "num_tokens", "ordinal", "page", "parent", "payload", "root")

    def __init__(
        self, key: BlockKey, payload: bytes, num_tokens: int, parent: Node, is_full: bool
    ) -> None:
        super().__init__(key)
        self.payload = payload
        self.num_tokens = num_tokens
        self.parent: Node | None = parent
        self.root: RootBlock = parent.root
        self.ordinal: int = parent.ordinal + 1
        self.is_full = is_full
        self.page: Page | None = None

    @property
    def is_attached(self) -> bool:
        return self.parent is not None

    @property
    def tokens(self) -> list[Token]:
        return decode_payload(self.payload, self.num_tokens)

    def __repr__(self) -> str:
        state = "" if self.is_attached else ", detached"
        return f"Block(#{self.ordinal}, {self.num_tokens} tokens, {self.key[:4].hex()}{state})"


class SortedChildren:
    """Children ordered by tagged payload: token prefixes are contiguous in this order.

    For a query q, the child with the longest common prefix is next to q's insertion point, and the
    children that q is a prefix of start right at it. A `SortedDict` keeps add and remove at
    O(log n) even for a root with a million children (a list insert would be O(n)).
    """

    __slots__ = ("by_order",)

    def __init__(self, blocks: Sequence[Block]) -> None:
        self.by_order: SortedDict[bytes, Block] = SortedDict(
            (order_key(block), block) for block in blocks
        )

    def add(self, block: Block) -> None:
        self.by_order[order_key(block)] = block

    def remove(self, block: Block) -> None:
        removed = self.by_order.pop(order_key(block))
        assert removed is block, "sorted children out of sync"

    def neighbors(self, order_key: bytes) -> list[Block]:
        after = next(self.by_order.irange(minimum=order_key), None)
        before = next(self.by_order.irange(maximum=order_key, reverse=True), None)
        return [self.by_order[key] for key in (before, after) if key is not None]

    def first_extending(self, order_key: bytes) -> Block | None:
        after = next(self.by_order.irange(minimum=order_key), None)
        if after is not None and after.startswith(order_key):
            return self.by_order[after]
        return None


def order_key(block: Block) -> bytes:
    return tagged_payload(block.payload, block.num_tokens)


def common_bytes(a: bytes, b: bytes) -> int:
    size = min(len(a), len(b))
    if a[:size] == b[:size]:
        return size
    low, high = 0, size  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


def common_tokens(a: bytes, a_tokens: int, b: bytes, b_tokens: int) -> int:
    """Length in tokens of the common prefix of two payloads."""
    if not is_tagged(a, a_tokens) and not is_tagged(b, b_tokens):
        return common_bytes(a, b) >> 2
    common = 0
    for x, y in zip(decode_payload(a, a_tokens), decode_payload(b, b_tokens), strict=False):
        if x != y:
            break
        common += 1
    return common


def check_scope(scope: object) -> ReuseScope:
    if not isinstance(scope, ReuseScope):
        raise ValueError(f"scope={scope!r} is not a ReuseScope")
    return scope


class InsertOutcome(enum.Enum):
    NEW = "new"  # the block entered the tree
    EXISTING = "existing"  # an identical block was there; use it
    COVERED = "covered"  # partial, and a sibling already holds these tokens and more: useless
    # Another block (or another scope's root) has this key: a hash collision. The tokens stay
    # out of the tree; the caller stops committing that sequence.
    COLLIDED = "collided"


@dataclasses.dataclass(frozen=True)
class InsertResult:
    """What `insert` did: the block now standing for the tokens (None after a collision), and
    partial siblings it replaced.

    Replaced blocks have left the tree; the caller releases their pages.
    """

    block: Block | None
    outcome: InsertOutcome
    replaced: tuple[Block, ...] = ()


@dataclasses.dataclass(frozen=True)
class MatchResult:
    """The reusable prefix: its blocks in order and its length. The last block may be used only
    in part (a partial match), when `num_tokens` ends before that block does."""

    blocks: tuple[Block, ...]
    num_tokens: int
