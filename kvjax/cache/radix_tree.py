"""Block radix tree: committed blocks of every reuse scope, found again by chained key.

One root per reuse scope; below it each node is a block whose key chains its parent's key with
its tokens. Interior blocks are full; only leaves may be partial. Matching walks full blocks by key
(and compares the stored payload, so a hash collision cannot serve wrong KV), then, with partial
reuse, takes the longest common token prefix among the children of the last matched node. Nodes
with many children keep them sorted by their tagged payload, so that prefix search is a bisection
instead of a scan (the original skips it past 32 children).

The tree only knows blocks; `TieredPages` links blocks to pages and frees pages of removed blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from kvjax.cache.blocks import (
    Block,
    InsertOutcome,
    InsertResult,
    MatchResult,
    Node,
    RootBlock,
    SortedChildren,
    check_scope,
    common_tokens,
    order_key,
)
from kvjax.cache.checks import check_int
from kvjax.cache.keys import (
    BlockHasher,
    BlockKey,
    ReuseScope,
    Token,
    decode_payload,
    encode_block,
    payload_bytes,
    tagged_payload,
)

__all__ = ["Block", "BlockRadixTree", "InsertOutcome", "InsertResult", "MatchResult", "RootBlock"]


class BlockRadixTree:
    """Committed blocks of all reuse scopes.

    Args:
        tokens_per_block: tokens of a full block.
        enable_partial_reuse: also match the first mismatching block at token granularity.
        index_threshold: nodes with more children than this keep a sorted index of them.
    """

    def __init__(
        self, tokens_per_block: int, *, enable_partial_reuse: bool = True, index_threshold: int = 8
    ) -> None:
        check_int("tokens_per_block", tokens_per_block, minimum=1)
        check_int("index_threshold", index_threshold, minimum=0)
        if not isinstance(enable_partial_reuse, bool):
            raise ValueError(f"enable_partial_reuse={enable_partial_reuse!r} must be a bool")
        self.tokens_per_block = tokens_per_block
        self.enable_partial_reuse = enable_partial_reuse
        self.index_threshold = index_threshold
        self.num_blocks = 0
        self._roots: dict[BlockKey, RootBlock] = {}
        # Every block by its chained key: keys stay unique (events name blocks by key), so an
        # insert whose key a different block holds is a collision. Lookups go by payload.
        self._keys: dict[BlockKey, Block] = {}

    def __len__(self) -> int:
        return self.num_blocks

    def root(self, scope: ReuseScope) -> RootBlock | None:
        """The root of `scope`, or None while no block of it is in the tree."""
        return self._root_of(check_scope(scope))

    def _root_of(self, scope: ReuseScope) -> RootBlock | None:
        """The root stored under the scope's key, when it is this scope's (keys are hashes: a
        root of another scope under the same key is a collision, never a match)."""
        root = self._roots.get(scope.root_key)
        return root if root is not None and root.scope == scope else None

    def roots(self) -> list[RootBlock]:
        return list(self._roots.values())

    def match(self, scope: ReuseScope, tokens: Sequence[Token] | np.ndarray) -> MatchResult:
        """The longest reusable prefix of `tokens` in `scope`.

        Raises:
            ValueError: a bad token (see `kvjax.cache.keys.encode_block`).
        """
        check_scope(scope)
        tpb = self.tokens_per_block
        payloads, last_count = payload_bytes(tokens, tpb)
        node: Node | None = self._root_of(scope)
        if node is None:
            return MatchResult((), 0)
        blocks: list[Block] = []
        # Children are filed by payload: a prefix is found without hashing it.
        for payload in payloads:
            child = node.children.get(payload)
            if child is None or child.payload != payload:
                break
            blocks.append(child)  # a full block, or an identical partial leaf (the query's tail)
            node = child
        matched = len(blocks)
        if matched == len(payloads):  # every block, the query's partial tail included
            return MatchResult(tuple(blocks), len(tokens))
        num_tokens = matched * tpb
        if self.enable_partial_reuse:
            # The first block that did not match fully (or the query's partial tail): the child
            # with the longest common prefix, an equal partial leaf included.
            count = last_count if matched == len(payloads) - 1 else tpb
            best, common = self._longest_common_child(node, payloads[matched], count)
            if best is not None:
                blocks.append(best)
                num_tokens += common
        return MatchResult(tuple(blocks), num_tokens)

    def _longest_common_child(
        self, node: Node, payload: bytes, count: int
    ) -> tuple[Block | None, int]:
        if node.sorted_children is not None:
            candidates = node.sorted_children.neighbors(tagged_payload(payload, count))
        else:
            candidates = node.children.values()
        best, best_common = None, 0
        for child in candidates:
            common = common_tokens(child.payload, child.num_tokens, payload, count)
            if common > best_common:
                best, best_common = child, common
        return best, best_common

    def insert(self, parent: Block | ReuseScope, tokens: Sequence[Token]) -> InsertResult:
        """Adds the block of `tokens` under `parent` (a block, or a scope for the first block).

        A duplicate returns the existing block; a partial block whose tokens a sibling already
        starts with is covered (useless); a new block replaces the partial siblings it extends.

        A hash collision (a different block, or another scope's root, under the same key) is
        `InsertOutcome.COLLIDED`: nothing changes.

        Raises:
            ValueError: the parent is partial or no longer in the tree, the token count is outside
                `[1, tokens_per_block]`, or a token is bad.
        """
        node = self._parent_node(parent)
        if node is None:  # another scope's root under this scope's key
            return InsertResult(None, InsertOutcome.COLLIDED)
        if not isinstance(tokens, Sequence | np.ndarray):
            tokens = list(tokens)
        count = len(tokens)
        if not 1 <= count <= self.tokens_per_block:
            raise ValueError(f"a block holds 1 to {self.tokens_per_block} tokens, not {count}")
        payload = encode_block(tokens)
        existing = node.children.get(payload)
        if existing is not None:
            if existing.payload != payload:  # a block changed under its payload: never share
                return InsertResult(None, InsertOutcome.COLLIDED)
            return InsertResult(existing, InsertOutcome.EXISTING)
        key = BlockHasher()(node.key, payload, count)
        if key in self._keys:  # a hash collision with another block: never share its KV
            return InsertResult(None, InsertOutcome.COLLIDED)
        is_full = count == self.tokens_per_block
        if not is_full:
            covering = self._covering_child(node, payload, count)
            if covering is not None:
                return InsertResult(covering, InsertOutcome.COVERED)
        replaced = self._extended_partials(node, payload, count)
        for sibling in replaced:
            self.remove(sibling)
        block = Block(key, payload, count, node, is_full)
        self._link(node, block)
        if isinstance(node, RootBlock) and not node.is_attached:
            node.is_attached = True
            self._roots[node.key] = node
        return InsertResult(block, InsertOutcome.NEW, tuple(replaced))

    def _parent_node(self, parent: Block | ReuseScope) -> Node | None:
        """The node to insert under; None when another scope's root holds the scope's key."""
        if isinstance(parent, ReuseScope):
            root = self._roots.get(parent.root_key)
            if root is None:
                return RootBlock(parent, self)
            return root if root.scope == parent else None
        if not isinstance(parent, Block):
            raise ValueError(f"parent {parent!r} is neither a Block nor a ReuseScope")
        if parent.root.tree is not self:
            raise ValueError(f"parent {parent!r} belongs to another tree")
        if not parent.is_attached:
            raise ValueError(f"parent {parent!r} is no longer in the tree")
        if not parent.is_full:
            raise ValueError(f"parent {parent!r} is partial; only leaves may be partial")
        return parent

    def _covering_child(self, node: Node, payload: bytes, count: int) -> Block | None:
        if node.sorted_children is not None:
            return node.sorted_children.first_extending(tagged_payload(payload, count))
        for child in node.children.values():
            if (
                child.num_tokens > count
                and common_tokens(child.payload, child.num_tokens, payload, count) == count
            ):
                return child
        return None

    def _extended_partials(self, node: Node, payload: bytes, count: int) -> list[Block]:
        """Partial children whose tokens are a proper prefix of the new block's."""
        partial = node.partial_children
        if not partial:
            return []
        if len(partial) < count:
            candidates = list(partial.values())
        else:  # many partial siblings: look up each proper prefix instead
            tokens = decode_payload(payload, count)
            candidates = []
            for length in range(1, count):
                found = partial.get(encode_block(tokens[:length]))
                if found is not None:
                    candidates.append(found)
        return [
            child
            for child in candidates
            if child.num_tokens < count
            and common_tokens(child.payload, child.num_tokens, payload, count) == child.num_tokens
        ]

    def _link(self, node: Node, block: Block) -> None:
        node.children[block.payload] = block
        self._keys[block.key] = block
        if not block.is_full:
            if node.partial_children is None:
                node.partial_children = {}
            node.partial_children[block.payload] = block
        if node.sorted_children is not None:
            node.sorted_children.add(block)
        elif len(node.children) > self.index_threshold:
            node.sorted_children = SortedChildren(list(node.children.values()))
        self.num_blocks += 1

    def _unlink(self, block: Block) -> None:
        node = block.parent
        del node.children[block.payload]
        if not block.is_full:
            del node.partial_children[block.payload]
        if node.sorted_children is not None:
            node.sorted_children.remove(block)
        if isinstance(node, RootBlock) and not node.children:
            del self._roots[node.key]
            node.is_attached = False

    def _detach_subtree(self, block: Block) -> list[Block]:
        removed = []
        stack = [block]
        while stack:
            current = stack.pop()
            removed.append(current)
            del self._keys[current.key]
            stack.extend(reversed(current.children.values()))
            current.children = {}
            current.partial_children = current.sorted_children = None
            current.parent = None
        self.num_blocks -= len(removed)
        return removed

    def remove(self, block: Block) -> list[Block]:
        """Takes `block` and its subtree out of the tree (their prefix can no longer be served).

        Returns:
            The removed blocks, `block` first, then its descendants depth first.
        """
        if not isinstance(block, Block):
            raise ValueError(f"{block!r} is not a block; roots leave with their last child")
        if block.root.tree is not self or not block.is_attached:
            raise ValueError(f"{block!r} is not in the tree")
        self._unlink(block)
        return self._detach_subtree(block)

    def clear(self) -> list[Block]:
        """Removes every block; returns them."""
        removed = []
        for root in list(self._roots.values()):
            for child in list(root.children.values()):
                removed += self.remove(child)
        return removed

    def iter_blocks(self) -> Iterator[Block]:
        """Every block in the tree, parents before children."""
        stack: list[Node] = list(self._roots.values())
        while stack:
            node = stack.pop()
            if isinstance(node, Block):
                yield node
            stack.extend(node.children.values())

    def check_invariants(self) -> None:
        """Raises `AssertionError` on a broken link, key, index, count or insertion rule."""
        count = 0
        for root_key, root in self._roots.items():
            assert root.key == root_key == root.scope.root_key, "root filed under a wrong key"
            assert root.is_attached and root.children, "an empty or detached root stayed"
        hasher = BlockHasher()
        stack: list[Node] = list(self._roots.values())
        while stack:
            node = stack.pop()
            self._check_children(node, hasher)
            count += len(node.children)
            stack.extend(node.children.values())
        assert count == self.num_blocks == len(self._keys), (
            f"num_blocks={self.num_blocks}, tree holds {count}, keys {len(self._keys)}"
        )

    def _check_children(self, node: Node, hasher: BlockHasher) -> None:
        tpb = self.tokens_per_block
        for payload, child in node.children.items():
            assert child.parent is node and child.payload == payload, f"{child!r} linked wrongly"
            assert self._keys.get(child.key) is child, f"{child!r} missing from the key index"
            assert child.root is node.root and node.root.tree is self, f"{child!r} wrong root"
            assert child.ordinal == node.ordinal + 1, f"{child!r} has a wrong ordinal"
            assert 1 <= child.num_tokens <= tpb and child.is_full == (child.num_tokens == tpb)
            key = hasher(node.key, child.payload, child.num_tokens)
            assert child.key == key, f"{child!r} key"
            assert child.is_full or not child.children, f"partial {child!r} has children"
        partial = {payload: c for payload, c in node.children.items() if not c.is_full}
        assert partial == (node.partial_children or {}), "partial children index out of sync"
        if len(node.children) > self.index_threshold:
            assert node.sorted_children is not None, "a large node lacks its sorted index"
        if node.sorted_children is not None:
            by_order = node.sorted_children.by_order
            assert {id(block) for block in by_order.values()} == {
                id(child) for child in node.children.values()
            }, "index names other blocks than the children"
            assert all(key == order_key(block) for key, block in by_order.items()), (
                "index filed a block under a wrong key"
            )
        for leaf in partial.values():
            for sibling in node.children.values():
                covers = sibling is not leaf and sibling.num_tokens > leaf.num_tokens
                assert not (
                    covers
                    and common_tokens(
                        sibling.payload, sibling.num_tokens, leaf.payload, leaf.num_tokens
                    )
                    == leaf.num_tokens
                ), f"partial {leaf!r} is covered by sibling {sibling!r}"
