import blake3
import pytest

from kvjax.cache import BlockRadixTree, MultimodalItem, ReuseScope
from kvjax.cache.multimodal import multimodal_key_tokens, splice_multimodal_tokens

VOCAB = 1000
CAT = blake3.blake3(b"cat.png").digest()
DOG = blake3.blake3(b"dog.png").digest()
IMAGE_TOKEN = 7


def test_key_tokens_carry_digest_then_synthetic_ids():
    assert multimodal_key_tokens(CAT, 4, VOCAB) == [CAT, 1001, 1002, 1003]
    assert multimodal_key_tokens(CAT, 1, VOCAB) == [CAT]


@pytest.mark.parametrize("offset", [0, 1, 2, 5, 6])
def test_chunk_starting_inside_item_equals_slice_of_whole_item(offset):
    whole = multimodal_key_tokens(DOG, 6, VOCAB)
    assert multimodal_key_tokens(DOG, 6, VOCAB, token_offset=offset) == whole[offset:]


def test_item_from_content_hashes_with_blake3():
    item = MultimodalItem.from_content(b"cat.png", position=2, length=3)
    assert item.digest == CAT and item.end == 5


def test_splice_replaces_item_positions_for_any_range():
    prompt = [1, 2, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 3, IMAGE_TOKEN, IMAGE_TOKEN, 4]
    items = [MultimodalItem(DOG, 6, 2), MultimodalItem(CAT, 2, 3)]  # any order
    whole = splice_multimodal_tokens(prompt, items, VOCAB)
    assert whole == [1, 2, CAT, 1001, 1002, 3, DOG, 1001, 4]
    for start in range(len(prompt) + 1):
        for end in range(start, len(prompt) + 1):
            assert splice_multimodal_tokens(prompt, items, VOCAB, start, end) == whole[start:end]


def test_different_images_behind_same_placeholders_never_match_past_item_start():
    tree = BlockRadixTree(4)
    prompt = [1, 2, 3, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 9, 9]
    cat_tokens = splice_multimodal_tokens(prompt, [MultimodalItem(CAT, 3, 5)], VOCAB)
    dog_tokens = splice_multimodal_tokens(prompt, [MultimodalItem(DOG, 3, 5)], VOCAB)
    parent = ReuseScope()
    for start in range(0, len(cat_tokens), 4):
        parent = tree.insert(parent, cat_tokens[start : start + 4]).block
    assert tree.match(ReuseScope(), cat_tokens).num_tokens == len(prompt)
    assert tree.match(ReuseScope(), dog_tokens).num_tokens == 3  # the item's first position
    assert tree.match(ReuseScope(), prompt).num_tokens == 3  # raw placeholders match nothing more
    no_partial = BlockRadixTree(4, enable_partial_reuse=False)
    parent = ReuseScope()
    for start in range(0, 8, 4):
        parent = no_partial.insert(parent, cat_tokens[start : start + 4]).block
    assert no_partial.match(ReuseScope(), dog_tokens).num_tokens == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: multimodal_key_tokens(b"x" * 31, 3, VOCAB), "31 bytes; expected 32"),
        (lambda: multimodal_key_tokens("x" * 32, 3, VOCAB), "is str; expected 32"),
        (lambda: multimodal_key_tokens(CAT, 0, VOCAB), "length=0"),
        (lambda: multimodal_key_tokens(CAT, 3, VOCAB, token_offset=4), "token_offset=4"),
        (lambda: multimodal_key_tokens(CAT, 3, 2**32 - 1), "passes the largest token id"),
        (lambda: MultimodalItem(CAT, -1, 2), "position=-1"),
        (lambda: MultimodalItem(CAT, 0, 0), "length=0"),
        (lambda: MultimodalItem(CAT[:16], 0, 2), "16 bytes"),
        (lambda: MultimodalItem.from_content("text", 0, 2), "must be bytes"),
        (lambda: MultimodalItem(CAT, True, 2), "position=True must be an int"),
        (lambda: multimodal_key_tokens(CAT, 3, None), "vocab_size=None must be an int"),
        (lambda: splice_multimodal_tokens([1], [], 0), "vocab_size=0 must be >= 1"),
    ],
)
def test_bad_items_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("tokens", "items", "start", "end", "message"),
    [
        ([1, 2, 3], [MultimodalItem(CAT, 2, 2)], 0, None, "ends at 4, past the 3 prompt tokens"),
        ([1] * 6, [MultimodalItem(CAT, 0, 3), MultimodalItem(DOG, 2, 2)], 0, None, "overlaps"),
        ([1, 2, 3], [], 2, 1, "range \\[2, 1\\)"),
        ([1, 2, 3], [], 0, 4, "range \\[0, 4\\)"),
        ([1, VOCAB, 3], [], 0, None, "token 1000 at index 1 is outside the vocabulary"),
        ([1, -2, 3], [], 0, None, "token -2 at index 1"),
        ([1, 2.0, 3], [], 0, None, "token 2.0 at index 1 is not an int"),
        ([1, 2, 3], [(CAT, 0, 2)], 0, None, "is not a MultimodalItem"),
        ([1, 2, 3], [None], 0, None, "None is not a MultimodalItem"),
        ([1, 2, 3], [], True, None, "start=True must be an int"),
    ],
)
def test_bad_splices_raise(tokens, items, start, end, message):
    with pytest.raises(ValueError, match=message):
        splice_multimodal_tokens(tokens, items, VOCAB, start, end)
