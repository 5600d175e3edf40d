import pytest
from scopes import DISTINCT_SCOPES

from kvjax.cache import BlockRadixTree, InsertOutcome, ReuseScope
from kvjax.cache.keys import encode_block

SCOPE = ReuseScope()


def commit(tree, tokens, scope=SCOPE):
    """Inserts every block of `tokens` like a cache committing them; returns the insert results."""
    results, parent = [], scope
    tpb = tree.tokens_per_block
    for start in range(0, len(tokens), tpb):
        result = tree.insert(parent, tokens[start : start + tpb])
        results.append(result)
        if result.outcome is InsertOutcome.COVERED:
            break
        parent = result.block
    tree.check_invariants()
    return results


def test_full_blocks_match_by_key_then_partial_in_first_mismatching_block():
    tree = BlockRadixTree(4)
    blocks = [r.block for r in commit(tree, list(range(12)))]
    assert len(tree) == 3
    match = tree.match(SCOPE, list(range(12)))
    assert match.blocks == tuple(blocks) and match.num_tokens == 12
    match = tree.match(SCOPE, [0, 1, 2, 3, 4, 5, 99, 7, 8])
    assert match.blocks == tuple(blocks[:2]) and match.num_tokens == 6
    assert tree.match(SCOPE, [0, 1, 2, 3, 4]).num_tokens == 5  # query ends mid-block
    assert tree.match(SCOPE, [5, 1, 2]).num_tokens == 0
    assert tree.match(SCOPE, []).num_tokens == 0


def test_partial_leaf_matches_exactly_and_as_prefix():
    tree = BlockRadixTree(4)
    commit(tree, [0, 1, 2, 3, 4, 5])  # block 1 is a partial leaf [4, 5]
    assert tree.match(SCOPE, [0, 1, 2, 3, 4, 5]).num_tokens == 6
    assert tree.match(SCOPE, [0, 1, 2, 3, 4, 5, 6, 7, 8]).num_tokens == 6
    assert tree.match(SCOPE, [0, 1, 2, 3, 4, 9]).num_tokens == 5


def test_without_partial_reuse_only_full_blocks_match():
    tree = BlockRadixTree(4, enable_partial_reuse=False)
    commit(tree, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert tree.match(SCOPE, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]).num_tokens == 10  # same tail key
    assert tree.match(SCOPE, [0, 1, 2, 3, 4, 5, 6]).num_tokens == 4
    assert tree.match(SCOPE, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).num_tokens == 8


def test_duplicate_insert_returns_existing_block():
    tree = BlockRadixTree(4)
    first = commit(tree, [1, 2, 3, 4, 5])
    again = commit(tree, [1, 2, 3, 4, 5])
    assert [r.outcome for r in again] == [InsertOutcome.EXISTING] * 2
    assert [r.block for r in again] == [r.block for r in first]
    assert len(tree) == 2


def test_partial_block_covered_by_sibling_is_useless():
    tree = BlockRadixTree(4)
    full = commit(tree, [1, 2, 3, 4])[0].block
    result = tree.insert(SCOPE, [1, 2])
    assert result.outcome is InsertOutcome.COVERED and result.block is full
    assert len(tree) == 1


def test_longer_block_replaces_shorter_partial_siblings():
    tree = BlockRadixTree(4)
    short = tree.insert(SCOPE, [1]).block
    longer = tree.insert(SCOPE, [1, 2, 3])
    assert longer.outcome is InsertOutcome.NEW and longer.replaced == (short,)
    assert not short.is_attached
    full = tree.insert(SCOPE, [1, 2, 3, 4])
    assert full.replaced == (longer.block,)
    other = tree.insert(SCOPE, [2, 2])  # not a prefix: stays
    assert other.replaced == () and len(tree) == 2
    tree.check_invariants()


def test_many_partial_siblings_are_found_by_prefix_keys():
    tree = BlockRadixTree(4)
    partials = [tree.insert(SCOPE, tokens).block for tokens in ([1], [2], [3], [5, 6])]
    result = tree.insert(SCOPE, [1, 7, 8, 9])
    assert result.replaced == (partials[0],)
    assert tree.insert(SCOPE, [5, 6, 7]).replaced == (partials[3],)
    tree.check_invariants()


def test_partial_block_not_rebased_onto_full_tree_block():
    """Port of TRT-LLM test_branch_reuse::TestPartialBlockRebase at tree level (tpb 8)."""
    tree = BlockRadixTree(8)
    prefix = list(range(100, 113))  # 13 tokens: block 1 partial with 5
    a0 = commit(tree, prefix)
    a = commit(tree, [*prefix, 113, 114, 115])  # block 1 full: replaces A0's partial block
    assert a[1].replaced == (a0[1].block,)
    match = tree.match(SCOPE, prefix[:12])  # request B reuses 12 tokens, partially of block 1
    assert match.num_tokens == 12 and match.blocks[1] is a[1].block
    b_block1 = tree.insert(a[0].block, prefix[8:13])  # B stops committing with 5 tokens
    assert b_block1.outcome is InsertOutcome.COVERED  # so B keeps its private page
    assert b_block1.block is a[1].block and b_block1.block.is_full


def test_hash_hit_is_verified_against_stored_tokens():
    tree = BlockRadixTree(4)
    block = commit(tree, [1, 2, 3, 4])[0].block
    block.payload = encode_block([9, 9, 9, 9])  # as if another sequence had the same key
    assert tree.match(SCOPE, [1, 2, 3, 4, 5]).num_tokens == 0
    result = tree.insert(SCOPE, [1, 2, 3, 4])  # a collision: refused, nothing changes
    assert result.outcome is InsertOutcome.COLLIDED and result.block is None and len(tree) == 1


def test_remove_prunes_subtree_and_empty_root():
    tree = BlockRadixTree(2)
    a = commit(tree, [1, 2, 3, 4, 5, 6])
    b = commit(tree, [1, 2, 3, 4, 7, 8])
    c = commit(tree, [1, 2, 9])
    removed = tree.remove(a[1].block)
    assert removed == [a[1].block, a[2].block, b[2].block]
    assert all(not block.is_attached and not block.children for block in removed)
    assert len(tree) == 2
    tree.check_invariants()
    assert tree.match(SCOPE, [1, 2, 3, 4, 5, 6]).num_tokens == 2
    with pytest.raises(ValueError, match="not in the tree"):
        tree.remove(a[1].block)
    tree.remove(a[0].block)
    assert c[1].block.parent is None
    assert tree.root(SCOPE) is None and len(tree) == 0 and tree.roots() == []
    tree.check_invariants()


def test_clear_removes_everything():
    tree = BlockRadixTree(2)
    commit(tree, [1, 2, 3])
    commit(tree, [1, 2, 3], ReuseScope(lora_id=1))
    assert len(tree.clear()) == 4
    assert len(tree) == 0 and tree.roots() == []
    tree.check_invariants()


def test_bad_inserts_raise_and_change_nothing():
    tree = BlockRadixTree(4)
    results = commit(tree, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="partial"):
        tree.insert(results[1].block, [6])
    with pytest.raises(ValueError, match="1 to 4 tokens, not 5"):
        tree.insert(SCOPE, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="1 to 4 tokens, not 0"):
        tree.insert(SCOPE, [])
    with pytest.raises(ValueError, match="token -3 at index 1"):
        tree.insert(SCOPE, [1, -3])
    with pytest.raises(ValueError, match="neither a Block nor a ReuseScope"):
        tree.insert(None, [1])
    removed = tree.remove(results[0].block)
    with pytest.raises(ValueError, match="no longer in the tree"):
        tree.insert(removed[0], [1])
    with pytest.raises(ValueError, match="token -1 at index 2"):
        tree.match(SCOPE, [1, 2, -1])
    assert len(tree) == 0
    tree.check_invariants()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda tree: tree.match(None, [1]), "scope=None is not a ReuseScope"),
        (lambda tree: tree.match("tenant-a", [1]), "scope='tenant-a' is not a ReuseScope"),
        (lambda tree: tree.remove(tree.roots()[0]), "not a block"),
        (lambda tree: tree.insert(SCOPE, b"\x01\x02"), "not bytes"),
        (lambda tree: BlockRadixTree(2.5), "tokens_per_block=2.5"),
        (lambda tree: BlockRadixTree(True), "tokens_per_block=True"),
        (lambda tree: BlockRadixTree(4, index_threshold=None), "index_threshold=None"),
        (lambda tree: BlockRadixTree(4, enable_partial_reuse=1), "enable_partial_reuse=1"),
    ],
)
def test_bad_arguments_raise_value_error(call, message):
    tree = BlockRadixTree(4)
    commit(tree, [1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=message):
        call(tree)
    assert len(tree) == 2
    tree.check_invariants()


def test_insert_takes_any_iterable_of_tokens():
    tree = BlockRadixTree(4)
    result = tree.insert(SCOPE, iter([1, 2]))
    assert result.outcome is InsertOutcome.NEW and result.block.tokens == [1, 2]


SCOPES = DISTINCT_SCOPES


@pytest.mark.parametrize("partial", [True, False])
def test_scopes_have_distinct_roots_and_never_share_blocks(partial):
    tree = BlockRadixTree(4, enable_partial_reuse=partial)
    tokens = list(range(10))
    per_scope = {}
    for scope in SCOPES[:-1]:
        results = commit(tree, tokens, scope)
        assert all(r.outcome is InsertOutcome.NEW for r in results)
        per_scope[scope] = {id(r.block) for r in results}
    assert len(tree.roots()) == 4 and len(tree) == 12
    assert len({root.key for root in tree.roots()}) == 4
    blocks = [ids for ids in per_scope.values()]
    assert all(a.isdisjoint(b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    for scope in SCOPES[:-1]:
        match = tree.match(scope, tokens)
        assert {id(block) for block in match.blocks} <= per_scope[scope]
    assert tree.match(SCOPES[-1], tokens).num_tokens == 0  # never committed in this scope


@pytest.mark.parametrize("threshold", [0, 1, 100])
def test_prefix_search_over_many_children_agrees_with_a_scan(threshold):
    tree = BlockRadixTree(4, index_threshold=threshold)
    siblings = [[a, b, c, d] for a in (1, 2, 3) for b in (1, 300) for c in (5, 6) for d in (7,)]
    siblings += [[1, 300, 9], [2], [3, 1, 5]]
    outcomes = [tree.insert(SCOPE, tokens).outcome for tokens in siblings]
    assert outcomes.count(InsertOutcome.COVERED) == 2  # [2] and [3, 1, 5]
    tree.check_invariants()
    for query, expected in [
        ([1, 300, 5, 8], 3),
        ([1, 300, 9, 9], 3),
        ([2, 1, 6], 3),
        ([3, 1, 5, 7, 0], 4),
        ([4], 0),
        ([1, 2], 1),
        ([300], 0),
    ]:
        assert tree.match(SCOPE, query).num_tokens == expected, query
    assert tree.insert(SCOPE, [3, 1]).outcome is InsertOutcome.COVERED


def test_blocks_of_another_tree_are_refused():
    tree, other = BlockRadixTree(4), BlockRadixTree(4)
    foreign = commit(other, [1, 2, 3, 4])[0].block
    with pytest.raises(ValueError, match="belongs to another tree"):
        tree.insert(foreign, [5])
    with pytest.raises(ValueError, match="not in the tree"):
        tree.remove(foreign)
    assert len(tree) == 0 and len(other) == 1
    assert foreign.root.scope == SCOPE and foreign.root.tree is other


class ConstantHasher:
    """Forces a blake3 collision: every block gets the same key."""

    def __init__(self, key):
        self.key = key

    def __call__(self, parent_key, payload, count):
        return self.key


def test_a_block_hash_collision_changes_nothing(monkeypatch):
    import kvjax.cache.radix_tree as radix_tree

    tree = BlockRadixTree(2)
    first = tree.insert(SCOPE, [1, 2]).block
    monkeypatch.setattr(radix_tree, "BlockHasher", lambda: ConstantHasher(first.key))
    result = tree.insert(SCOPE, [3, 4])
    assert result.outcome is InsertOutcome.COLLIDED and result.block is None
    monkeypatch.undo()
    assert len(tree) == 1 and tree.match(SCOPE, [3, 4]).num_tokens == 0
    tree.check_invariants()


def test_a_scope_root_collision_is_never_a_match():
    tree = BlockRadixTree(2)
    tree.insert(SCOPE, [1, 2])
    other = ReuseScope(salt="tenant-b")
    other.__dict__["root_key"] = SCOPE.root_key  # forced: the scopes' root keys collide
    assert tree.match(other, [1, 2, 3]).num_tokens == 0 and tree.root(other) is None
    assert tree.insert(other, [1, 2]).outcome is InsertOutcome.COLLIDED
    assert len(tree) == 1 and tree.match(SCOPE, [1, 2]).num_tokens == 2
    tree.check_invariants()
