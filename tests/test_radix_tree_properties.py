"""Long random insert/match/remove sequences against brute-force models of the radix tree."""

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvjax.cache import BlockRadixTree, InsertOutcome, ReuseScope

TPB = 3
SCOPE = ReuseScope()
DIGESTS = [blake3.blake3(bytes([i])).digest() for i in range(2)]
token = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.sampled_from(DIGESTS))
sequence = st.lists(token, min_size=1, max_size=4 * TPB)
operation = st.one_of(
    st.tuples(st.just("insert"), sequence),
    st.tuples(st.just("match"), st.lists(token, max_size=4 * TPB)),
    st.tuples(st.just("remove"), st.integers(0, 10**6)),
)
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def chunks(tokens):
    return [tuple(tokens[i : i + TPB]) for i in range(0, len(tokens), TPB)]


def common_prefix(a, b):
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


class FlatModel:
    """Stored blocks as a flat set of (path of full blocks, tokens), with the insertion rules."""

    def __init__(self, partial_reuse):
        self.partial_reuse = partial_reuse
        self.stored = set()

    def insert(self, tokens):
        path = ()
        for block in chunks(tokens):
            siblings = [t for p, t in self.stored if p == path]
            if block in siblings:
                path += (block,)
                continue
            if len(block) < TPB and any(
                len(t) > len(block) and t[: len(block)] == block for t in siblings
            ):
                return
            for t in siblings:
                if len(t) < len(block) and block[: len(t)] == t:
                    self.stored.remove((path, t))
            self.stored.add((path, block))
            path += (block,)

    def match(self, query):
        best = 0
        for path, block in self.stored:
            prefix = sum(path, ())
            if tuple(query[: len(prefix)]) != prefix:
                continue
            rest = tuple(query[len(prefix) : len(prefix) + TPB])
            if self.partial_reuse:
                best = max(best, len(prefix) + common_prefix(block, rest))
            elif rest == block:  # a full block, or an identical partial tail
                best = max(best, len(prefix) + len(block))
            else:
                best = max(best, len(prefix))
        return best

    def remove(self, path, block):
        gone = (*path, block)
        self.stored = {(p, t) for p, t in self.stored if (*p, t)[: len(gone)] != gone}


def path_of(block):
    blocks = []
    while block is not None and hasattr(block, "payload"):
        blocks.append(tuple(block.tokens))
        block = block.parent
    blocks.reverse()
    return tuple(blocks[:-1]), blocks[-1]


def insert_like_a_cache(tree, tokens):
    parent = SCOPE
    for block in chunks(tokens):
        result = tree.insert(parent, list(block))
        if result.outcome is InsertOutcome.COVERED or len(block) < TPB:
            return
        parent = result.block


def check_match(tree, query, expected):
    match = tree.match(SCOPE, query)
    assert match.num_tokens == expected, (query, match)
    served = []
    parent = tree.root(SCOPE)
    for block in match.blocks:  # the blocks form a chain and hold exactly the reused tokens
        assert block.parent is parent and block.is_attached
        served += block.tokens
        parent = block
    assert match.num_tokens <= len(served) < match.num_tokens + TPB or not match.blocks
    assert served[: match.num_tokens] == list(query[: match.num_tokens])


@pytest.mark.parametrize("partial_reuse", [True, False])
@pytest.mark.parametrize("index_threshold", [0, 8])
@PROPERTY_SETTINGS
@given(operations=st.lists(operation, max_size=60))
def test_tree_agrees_with_flat_model(partial_reuse, index_threshold, operations):
    tree = BlockRadixTree(TPB, enable_partial_reuse=partial_reuse, index_threshold=index_threshold)
    model = FlatModel(partial_reuse)
    for kind, argument in operations:
        if kind == "insert":
            insert_like_a_cache(tree, argument)
            model.insert(argument)
        elif kind == "match":
            check_match(tree, argument, model.match(argument))
        elif tree.num_blocks:
            blocks = sorted(tree.iter_blocks(), key=lambda b: repr(path_of(b)))
            victim = blocks[argument % len(blocks)]
            path, tokens = path_of(victim)
            assert (path, tokens) in model.stored
            tree.remove(victim)
            model.remove(path, tokens)
        tree.check_invariants()
        assert len(tree) == len(model.stored)
        assert {path_of(block) for block in tree.iter_blocks()} == model.stored


@pytest.mark.parametrize("partial_reuse", [True, False])
@PROPERTY_SETTINGS
@given(
    committed=st.lists(sequence, min_size=1, max_size=25),
    queries=st.lists(st.lists(token, max_size=5 * TPB), min_size=1, max_size=20),
)
def test_reusable_length_is_longest_common_prefix_with_any_committed_sequence(
    partial_reuse, committed, queries
):
    tree = BlockRadixTree(TPB, enable_partial_reuse=partial_reuse, index_threshold=2)
    model = FlatModel(partial_reuse)
    for tokens in committed:
        insert_like_a_cache(tree, tokens)
        model.insert(tokens)
    for query in queries + committed:
        longest = max(common_prefix(tokens, query) for tokens in committed)
        if not partial_reuse:  # whole blocks only: full ones, or an identical partial tail
            assert longest // TPB * TPB <= model.match(query) <= longest
            longest = model.match(query)
        check_match(tree, query, longest)
