import blake3
import numpy as np
import pytest
from scopes import DISTINCT_SCOPES

from kvjax.cache.keys import (
    DIGEST_SIZE,
    MAX_TOKEN_ID,
    ReuseScope,
    block_key,
    block_keys,
    block_payloads,
    decode_payload,
    encode_block,
    tagged_payload,
)

SCOPES = DISTINCT_SCOPES
DIGEST = blake3.blake3(b"an image").digest()


def test_distinct_scopes_have_distinct_root_keys():
    root_keys = [scope.root_key for scope in SCOPES]
    assert all(len(key) == 32 for key in root_keys)
    assert len(set(root_keys)) == len(SCOPES)
    more = [ReuseScope(salt="0"), ReuseScope(salt=b"0"), ReuseScope(salt=-1), ReuseScope(lora_id=1)]
    assert len({scope.root_key for scope in SCOPES + more}) == len(SCOPES) + len(more)


def test_root_key_is_deterministic():
    assert ReuseScope(lora_id=7, salt=11).root_key == ReuseScope(lora_id=7, salt=11).root_key
    # Pinned encoding: keys must not change between releases, or persisted caches stop matching.
    assert (
        ReuseScope().root_key
        == blake3.blake3(b"\x00", derive_key_context="kvjax 2026-11 reuse scope root key").digest()
    )


def test_block_keys_chain_over_parent_key_and_uint32_tokens():
    tokens = list(range(10))
    keys = block_keys(ReuseScope(), tokens, 4)
    assert len(keys) == 3  # 4 + 4 + 2 tokens
    parent = ReuseScope().root_key
    for start, key in zip(range(0, 10, 4), keys, strict=True):
        payload = np.asarray(tokens[start : start + 4], dtype="<u4").tobytes()
        assert key == blake3.blake3(parent + payload).digest()
        parent = key


def test_same_scope_same_chain_and_other_salt_other_chain():
    tokens = list(range(100, 140))
    assert block_keys(ReuseScope(salt=3), tokens, 8) == block_keys(ReuseScope(salt=3), tokens, 8)
    salted = set(block_keys(ReuseScope(salt=4), tokens, 8))
    assert salted.isdisjoint(block_keys(ReuseScope(salt=3), tokens, 8))


def test_key_depends_on_every_earlier_token():
    base = block_keys(ReuseScope(), list(range(32)), 16)
    changed = block_keys(ReuseScope(), [99, *range(1, 32)], 16)
    assert base[0] != changed[0] and base[1] != changed[1]


def test_numpy_and_list_tokens_give_the_same_keys():
    tokens = np.arange(50, 90, dtype=np.int64)
    assert block_keys(ReuseScope(), tokens, 16) == block_keys(ReuseScope(), tokens.tolist(), 16)


def test_digest_tokens_are_fed_raw_and_never_collide_with_ids():
    with_digest = [1, DIGEST, 2]
    payload = encode_block(with_digest)
    assert payload == b"\x00" + (1).to_bytes(4, "little") + b"\x01" + DIGEST + b"\x00" + (
        2
    ).to_bytes(4, "little")
    assert decode_payload(payload, 3) == with_digest
    # Twelve ids whose bytes spell the same 48-byte payload still get another key (other mode).
    lookalike = np.frombuffer(payload + b"\x00" * 9, dtype="<u4")[:12].tolist()
    parent = ReuseScope().root_key
    assert block_key(parent, payload, 3) != block_key(parent, encode_block(lookalike), 12)


def test_tagged_payload_sorts_like_the_token_sequences():
    def token_order(tokens):  # ids before digests; ids by their little-endian bytes
        return [(0, t.to_bytes(4, "little")) if isinstance(t, int) else (1, t) for t in tokens]

    blocks = [[1, 2], [1, 3], [2], [256], [1, DIGEST], [0, 5, 5], [1], [1, 2, 9], [DIGEST, 1]]
    by_payload = sorted(blocks, key=lambda b: tagged_payload(encode_block(b), len(b)))
    assert by_payload == sorted(blocks, key=token_order)
    assert tagged_payload(encode_block([1, 2]), 2) == encode_block([1, DIGEST])[:5] + b"\x00" + (
        2
    ).to_bytes(4, "little")


def test_block_payloads_splits_mixed_sequences_per_block():
    tokens = [1, 2, 3, DIGEST, 5, 6, 7]
    chunks = list(block_payloads(tokens, 3))
    assert [count for _, count in chunks] == [3, 3, 1]
    assert [decode_payload(p, c) for p, c in chunks] == [[1, 2, 3], [DIGEST, 5, 6], [7]]
    assert len(chunks[0][0]) == 12  # an id-only block keeps the compact form


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1, -1], "token -1 at index 1"),
        ([1, MAX_TOKEN_ID + 1], f"outside \\[0, {MAX_TOKEN_ID}\\]"),
        ([1.5], "token 1.5 at index 0"),
        (["a"], "token 'a' at index 0"),
        ([1, b"short"], f"index 1 is a 5-byte string; digests have {DIGEST_SIZE} bytes"),
        (np.array([1.0, 2.0]), "dtype float64"),
        (np.array([[1, 2]]), "shape \\(1, 2\\)"),
        (np.array([3, -4]), "token -4 at index 1"),
        (b"\x01\x02\x03\x04", "not bytes; wrap a digest token in a list"),
        ("abcd", "not str"),
    ],
)
def test_bad_tokens_raise_naming_index_and_limit(tokens, message):
    with pytest.raises(ValueError, match=message):
        block_keys(ReuseScope(), tokens, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lora_id=-1), "lora_id=-1"),
        (dict(lora_id=1.0), "lora_id=1.0"),
        (dict(lora_id=True), "lora_id=True"),
        (dict(salt=2**70), "salt="),
        (dict(salt=[1]), "salt=\\[1\\]"),
    ],
)
def test_bad_scopes_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReuseScope(**kwargs)


@pytest.mark.parametrize("tokens_per_block", [0, 2.0, True])
def test_bad_tokens_per_block_raises(tokens_per_block):
    with pytest.raises(ValueError, match="tokens_per_block"):
        block_keys(ReuseScope(), [1, 2], tokens_per_block)
