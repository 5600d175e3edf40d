"""Multimodal items in block keys: a content digest at the item's start, synthetic ids after.

Different images behind identical placeholder ids must never share KV (the seed PR's multimodal
false-reuse fix), so key tokens carry the item's content digest, offset-correct for a chunk that
starts inside an item.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import blake3
import numpy as np

from kvjax.cache.checks import check_int
from kvjax.cache.keys import DIGEST_SIZE, MAX_TOKEN_ID, Token

__all__ = ["MultimodalItem", "multimodal_key_tokens", "splice_multimodal_tokens"]


def _digest_of(digest: object) -> bytes:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        size = f"{len(digest)} bytes" if isinstance(digest, bytes) else type(digest).__name__
        raise ValueError(f"multimodal digest is {size}; expected {DIGEST_SIZE} bytes")
    return digest


def multimodal_key_tokens(
    digest: bytes, length: int, vocab_size: int, token_offset: int = 0
) -> list[Token]:
    """Key tokens of item positions `[token_offset, length)` of one multimodal item.

    Position 0 carries the item's content digest, position i > 0 the synthetic id
    `vocab_size + i`. Only the first position must be unique: a block matches only when every
    token before it matched, so a different digest stops reuse at the item's first position. With
    `token_offset`, a chunk that starts inside an item gets exactly the slice of the whole item.

    Raises:
        ValueError: digest not 32 bytes, `length < 1`, offset outside `[0, length]`, or ids that
            would pass `MAX_TOKEN_ID`.
    """
    _digest_of(digest)
    check_int("length", length, minimum=1)
    check_int("vocab_size", vocab_size, minimum=1)
    check_int("token_offset", token_offset, minimum=0)
    if token_offset > length:
        raise ValueError(f"token_offset={token_offset} must be in [0, length={length}]")
    if vocab_size + length - 1 > MAX_TOKEN_ID:
        raise ValueError(
            f"vocab_size={vocab_size} + length={length} passes the largest token id {MAX_TOKEN_ID}"
        )
    first = max(token_offset, 1)
    synthetic: list[Token] = list(range(vocab_size + first, vocab_size + length))
    return [digest, *synthetic] if token_offset == 0 else synthetic


@dataclasses.dataclass(frozen=True)
class MultimodalItem:
    """One image, audio clip or video of a request: its digest and the prompt positions it fills.

    Args:
        digest: 32-byte content digest (use `from_content` to hash the raw bytes with blake3).
        position: index of the item's first placeholder token in the prompt.
        length: number of placeholder tokens the item occupies.
    """

    digest: bytes
    position: int
    length: int

    def __post_init__(self) -> None:
        _digest_of(self.digest)
        check_int("multimodal item position", self.position, minimum=0)
        check_int("multimodal item length", self.length, minimum=1)

    @classmethod
    def from_content(cls, content: bytes, position: int, length: int) -> MultimodalItem:
        """An item whose digest is the blake3 hash of its content bytes."""
        if not isinstance(content, bytes | bytearray | memoryview):
            raise ValueError(f"multimodal content must be bytes, not {type(content).__name__}")
        return cls(blake3.blake3(content).digest(), position, length)

    @property
    def end(self) -> int:
        """One past the item's last prompt position."""
        return self.position + self.length


def splice_multimodal_tokens(
    tokens: Sequence[int],
    items: Sequence[MultimodalItem],
    vocab_size: int,
    start: int = 0,
    end: int | None = None,
) -> list[Token]:
    """Key tokens of prompt positions `[start, end)`: prompt ids, with item positions replaced.

    Args:
        tokens: the request's prompt token ids, each in `[0, vocab_size)`.
        items: its multimodal items, in any order; they must not overlap and must lie inside
            `tokens`.
        vocab_size: the model's vocabulary size; synthetic ids start there.
        start, end: the range of positions wanted (a chunk); `end` defaults to `len(tokens)`.

    Raises:
        ValueError: a range, item or token that does not fit, naming the value and the limit.
    """
    check_int("vocab_size", vocab_size, minimum=1)
    num_tokens = len(tokens)
    end = num_tokens if end is None else end
    check_int("start", start, minimum=0)
    check_int("end", end, minimum=0)
    if not start <= end <= num_tokens:
        raise ValueError(f"range [{start}, {end}) must lie within [0, {num_tokens}]")
    ordered = _ordered_items(items, num_tokens)
    spliced: list[Token] = list(tokens[start:end])
    for offset, token in enumerate(spliced):
        if isinstance(token, bool) or not isinstance(token, int | np.integer):
            raise ValueError(f"token {token!r} at index {start + offset} is not an int id")
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"token {token} at index {start + offset} is outside the vocabulary "
                f"[0, {vocab_size})"
            )
    for item in ordered:
        lo, hi = max(item.position, start), min(item.end, end)
        if lo >= hi:
            continue
        key_tokens = multimodal_key_tokens(
            item.digest, item.length, vocab_size, token_offset=lo - item.position
        )
        spliced[lo - start : hi - start] = key_tokens[: hi - lo]
    return spliced


def _ordered_items(items: Sequence[MultimodalItem], num_tokens: int) -> list[MultimodalItem]:
    """`items` by position; raises unless each is a `MultimodalItem` inside the prompt of
    `num_tokens` tokens and none overlaps another."""
    for item in items:
        if not isinstance(item, MultimodalItem):
            raise ValueError(f"{item!r} is not a MultimodalItem")
    ordered = sorted(items, key=lambda item: item.position)
    previous_end = 0
    for item in ordered:
        if item.end > num_tokens:
            raise ValueError(
                f"multimodal item at {item.position} of length {item.length} ends at {item.end}, "
                f"past the {num_tokens} prompt tokens"
            )
        if item.position < previous_end:
            raise ValueError(
                f"multimodal item at {item.position} overlaps the previous item ending at "
                f"{previous_end}"
            )
        previous_end = item.end
    return ordered
