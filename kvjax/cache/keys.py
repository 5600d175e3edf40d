"""Block keys: blake3 hashes chained from a reuse-scope root over each block's tokens.

A key names a block together with everything before it, so equal keys mean equal prefixes. Three
blake3 modes keep the three encodings apart: the root key uses `derive_key` mode over the scope,
blocks of integer token ids hash `parent_key || uint32-LE ids` in plain mode, and blocks holding a
multimodal digest hash `parent_key || tagged tokens` in keyed mode. The encoding of a block (its
*payload*) is also what the radix tree stores and compares, so a hash hit is verified cheaply.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import sys
from collections.abc import Iterator, Sequence

import blake3
import numpy as np

from kvjax.cache.checks import check_int

__all__ = [
    "DIGEST_SIZE",
    "MAX_TOKEN_ID",
    "BlockHasher",
    "BlockKey",
    "ReuseScope",
    "Token",
    "block_key",
    "block_keys",
    "block_payloads",
    "check_tokens",
    "decode_payload",
    "encode_block",
    "is_tagged",
    "iter_block_keys",
    "payload_bytes",
    "tagged_payload",
]

DIGEST_SIZE = 32
MAX_TOKEN_ID = 2**32 - 1

Token = int | bytes  # a token id, or the 32-byte content digest of a multimodal item
BlockKey = bytes  # 32 bytes

_ROOT_CONTEXT = "kvjax 2026-11 reuse scope root key"
_MIXED_BLOCK_KEY = blake3.blake3(b"kvjax mixed block", derive_key_context=_ROOT_CONTEXT).digest()
_INT_TAG = b"\x00"
_DIGEST_TAG = b"\x01"
_U32 = np.dtype("<u4")
_ARRAY_IS_LE_U32 = array.array("I").itemsize == 4 and sys.byteorder == "little"


@dataclasses.dataclass(frozen=True)
class ReuseScope:
    """Which requests may share blocks: same LoRA adapter and same cache salt (None != 0).

    Args:
        lora_id: adapter id (int >= 0) or None for the base model.
        salt: tenant isolation salt (int, str or bytes) or None.
    """

    lora_id: int | None = None
    salt: int | str | bytes | None = None

    def __post_init__(self) -> None:
        lora = self.lora_id
        if lora is not None and (isinstance(lora, bool) or not isinstance(lora, int)):
            raise ValueError(f"lora_id={lora!r} must be an int or None")
        if lora is not None and not 0 <= lora < 2**63:
            raise ValueError(f"lora_id={lora} must be in [0, 2**63)")
        salt = self.salt
        if isinstance(salt, bool) or not isinstance(salt, int | str | bytes | type(None)):
            raise ValueError(f"salt={salt!r} must be an int, str, bytes or None")
        if isinstance(salt, int) and not -(2**63) <= salt < 2**63:
            raise ValueError(f"salt={salt} must fit in 64 bits")

    @functools.cached_property
    def root_key(self) -> BlockKey:
        """The key every chain of this scope starts from."""
        presence = (self.lora_id is not None) | ((self.salt is not None) << 1)
        parts = [bytes([presence])]
        if self.lora_id is not None:
            parts.append(self.lora_id.to_bytes(8, "little"))
        if self.salt is not None:
            if isinstance(self.salt, int):
                tag, raw = b"i", self.salt.to_bytes(8, "little", signed=True)
            elif isinstance(self.salt, str):
                tag, raw = b"s", self.salt.encode()
            else:
                tag, raw = b"b", self.salt
            parts += [tag, len(raw).to_bytes(8, "little"), raw]
        return blake3.blake3(b"".join(parts), derive_key_context=_ROOT_CONTEXT).digest()


def _token_error(index: int, token: object) -> ValueError:
    if isinstance(token, bytes):
        return ValueError(
            f"token at index {index} is a {len(token)}-byte string; "
            f"digests have {DIGEST_SIZE} bytes"
        )
    if isinstance(token, int | np.integer):
        return ValueError(f"token {token} at index {index} is outside [0, {MAX_TOKEN_ID}]")
    return ValueError(f"token {token!r} at index {index} is not an int id or a 32-byte digest")


def _check_token(index: int, token: object) -> None:
    if isinstance(token, bytes):
        if len(token) != DIGEST_SIZE:
            raise _token_error(index, token)
    elif not isinstance(token, int | np.integer) or not 0 <= token <= MAX_TOKEN_ID:
        raise _token_error(index, token)


def token_list(tokens: Sequence[Token] | np.ndarray) -> list[Token]:
    """`tokens` as a list of Python ints and digests (a list is returned as it is)."""
    if type(tokens) is list:  # the common case: only read
        return tokens
    if isinstance(tokens, bytes | str):
        raise ValueError(f"tokens={tokens[:8]!r}... is not a token sequence; use [digest]")
    return tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)


def check_tokens(tokens: Sequence[Token], first_index: int = 0) -> None:
    """Raises `ValueError` naming the first token that is neither an id in `[0, MAX_TOKEN_ID]`
    nor a 32-byte digest (`first_index` offsets the index in the message)."""
    for index, token in enumerate(tokens, first_index):
        if type(token) is not int or not 0 <= token <= MAX_TOKEN_ID:  # fast path: plain ids
            _check_token(index, token)


def _encode_ids(tokens: Sequence[Token] | np.ndarray) -> bytes | None:
    """uint32-LE bytes of all tokens when every one is an in-range int id; None when some is not."""
    if isinstance(tokens, bytes | bytearray | memoryview | str):
        # A bytes object is a buffer to `array`, not a sequence of token ids.
        raise ValueError(
            f"tokens must be a sequence of token ids, not {type(tokens).__name__}; "
            "wrap a digest token in a list"
        )
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iuO":
            raise ValueError(
                f"token array of dtype {tokens.dtype} and shape {tokens.shape}: "
                "expected a 1-D integer array"
            )
        if tokens.dtype.kind == "O":
            return _encode_ids(tokens.tolist())
        if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID):
            bad = int(np.flatnonzero((tokens < 0) | (tokens > MAX_TOKEN_ID))[0])
            raise _token_error(bad, int(tokens[bad]))
        return tokens.astype(_U32).tobytes()
    if not _ARRAY_IS_LE_U32:
        return None
    try:
        encoded = array.array("I", tokens)
    except (TypeError, OverflowError):
        return None
    return encoded.tobytes()


def _encode_tagged(tokens: Sequence[Token], first_index: int) -> bytes:
    parts = []
    for offset, token in enumerate(tokens):
        _check_token(first_index + offset, token)
        if isinstance(token, bytes):
            parts += [_DIGEST_TAG, token]
        else:
            parts += [_INT_TAG, int(token).to_bytes(4, "little")]
    return b"".join(parts)


def encode_block(tokens: Sequence[Token]) -> bytes:
    """The payload of one block: uint32-LE ids, or the tagged form when it holds a digest.

    Raises:
        ValueError: a token is negative, above `MAX_TOKEN_ID`, not an int, or a digest of the wrong
            length; the message names its index.
    """
    encoded = _encode_ids(tokens)
    if encoded is not None:
        return encoded
    if not any(isinstance(token, bytes) for token in tokens):
        for index, token in enumerate(tokens):
            _check_token(index, token)
    return _encode_tagged(tokens, 0)


def is_tagged(payload: bytes, num_tokens: int) -> bool:
    """Whether a payload uses the tagged (digest-holding) form."""
    return len(payload) != 4 * num_tokens


def decode_payload(payload: bytes, num_tokens: int) -> list[Token]:
    """The tokens a payload encodes."""
    if not is_tagged(payload, num_tokens):
        return np.frombuffer(payload, dtype=_U32).tolist()
    tokens: list[Token] = []
    position = 0
    while position < len(payload):
        if payload[position : position + 1] == _DIGEST_TAG:
            tokens.append(payload[position + 1 : position + 1 + DIGEST_SIZE])
            position += 1 + DIGEST_SIZE
        else:
            tokens.append(int.from_bytes(payload[position + 1 : position + 5], "little"))
            position += 5
    return tokens


def tagged_payload(payload: bytes, num_tokens: int) -> bytes:
    """The tagged form of a payload: it sorts token by token, so siblings can be bisected."""
    if is_tagged(payload, num_tokens):
        return payload
    tagged = np.zeros((num_tokens, 5), dtype=np.uint8)
    tagged[:, 1:] = np.frombuffer(payload, dtype=np.uint8).reshape(num_tokens, 4)
    return tagged.tobytes()


def block_payloads(
    tokens: Sequence[Token] | np.ndarray, tokens_per_block: int
) -> list[tuple[bytes, int]]:
    """`(payload, num_tokens)` of each block of `tokens`; the last block may be short.

    Raises:
        ValueError: on a bad token (see `encode_block`).
    """
    payloads, last_count = payload_bytes(tokens, tokens_per_block)
    counts = [tokens_per_block] * len(payloads)
    if payloads:
        counts[-1] = last_count
    return list(zip(payloads, counts, strict=True))


def payload_bytes(
    tokens: Sequence[Token] | np.ndarray, tokens_per_block: int
) -> tuple[list[bytes], int]:
    """The payload of each block of `tokens`, and the token count of the last one (every other
    block is full): `block_payloads` without a tuple per block, for the hot path of a match.

    Raises:
        ValueError: on a bad token (see `encode_block`).
    """
    encoded = _encode_ids(tokens)
    if encoded is not None:
        step = 4 * tokens_per_block
        payloads = [encoded[start : start + step] for start in range(0, len(encoded), step)]
        return payloads, (len(encoded) % step >> 2) or tokens_per_block
    for index, token in enumerate(tokens):
        _check_token(index, token)
    blocks = [
        tokens[start : start + tokens_per_block]
        for start in range(0, len(tokens), tokens_per_block)
    ]
    return [encode_block(block) for block in blocks], len(blocks[-1]) if blocks else 0


class BlockHasher:
    """Computes block keys, reusing its blake3 states (a third cheaper than new ones per block).

    Not thread-safe: use one per thread, or per call as `block_key` does.
    """

    __slots__ = ("_digest", "_reset", "_tagged", "_update")

    def __init__(self) -> None:
        ids = blake3.blake3()
        # Bound methods: this is the hot loop of hashing and matching.
        self._reset, self._update, self._digest = ids.reset, ids.update, ids.digest
        self._tagged: blake3.blake3 | None = None

    def __call__(self, parent_key: BlockKey, payload: bytes, num_tokens: int) -> BlockKey:
        """Key of the block with this payload under the block (or root) keyed `parent_key`."""
        if len(payload) != num_tokens << 2:  # tagged: holds a digest
            if self._tagged is None:
                self._tagged = blake3.blake3(key=_MIXED_BLOCK_KEY)
            self._tagged.reset()
            self._tagged.update(parent_key + payload)
            return self._tagged.digest()
        self._reset()
        self._update(parent_key + payload)
        return self._digest()


def block_key(parent_key: BlockKey, payload: bytes, num_tokens: int) -> BlockKey:
    """Key of the block with this payload under the block (or root) keyed `parent_key`."""
    return BlockHasher()(parent_key, payload, num_tokens)


def iter_block_keys(
    parent_key: BlockKey, payloads: Sequence[tuple[bytes, int]]
) -> Iterator[BlockKey]:
    """Keys of consecutive blocks chained from `parent_key`, computed as they are consumed."""
    ids = blake3.blake3()
    # Bound methods, inlined for id-only blocks: this is the hot loop of hashing and matching.
    reset, update, digest = ids.reset, ids.update, ids.digest
    hasher = None
    for payload, num_tokens in payloads:
        if len(payload) == num_tokens << 2:
            reset()
            update(parent_key + payload)
            parent_key = digest()
        else:
            hasher = hasher or BlockHasher()
            parent_key = hasher(parent_key, payload, num_tokens)
        yield parent_key


def block_keys(
    scope: ReuseScope, tokens: Sequence[Token] | np.ndarray, tokens_per_block: int
) -> list[BlockKey]:
    """Keys of every block of `tokens` under `scope`, the last one possibly of a partial block."""
    check_int("tokens_per_block", tokens_per_block, minimum=1)
    encoded = _encode_ids(tokens)
    if encoded is None:
        return list(iter_block_keys(scope.root_key, block_payloads(tokens, tokens_per_block)))
    # Id-only tokens, the bulk case: the loop of `iter_block_keys` without a generator, about 20%
    # faster per token.
    ids = blake3.blake3()
    reset, update, digest = ids.reset, ids.update, ids.digest
    keys = []
    parent = scope.root_key
    step = 4 * tokens_per_block
    for start in range(0, len(encoded), step):
        reset()
        update(parent + encoded[start : start + step])
        parent = digest()
        keys.append(parent)
    return keys
