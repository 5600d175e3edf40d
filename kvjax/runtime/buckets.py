"""Allowed step shapes: a bucket key is (sequences, tokens, logit rows) of one compiled step.

`Buckets` lists the allowed keys and pads a batch up to the smallest that holds it;
`default_buckets` derives them from a batch and token budget (powers of two, and the budget).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from kvjax.cache.checks import check_int

__all__ = ["BucketKey", "Buckets", "default_buckets", "powers_of_two", "smallest_holding"]


@dataclasses.dataclass(frozen=True, order=True)
class BucketKey:
    """Static shapes of one compiled step."""

    num_seqs: int
    num_tokens: int
    num_logits: int  # rows of logits: one per sequence, or every row of a verification step

    @property
    def logits_per_seq(self) -> int:
        """Logit rows of each sequence when a step lays them out per sequence (1 + drafts)."""
        return self.num_logits // self.num_seqs


def _sorted_sizes(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
    sizes = tuple(sorted({check_int(name, value, minimum=minimum) for value in values}))
    if not sizes:
        raise ValueError(f"{name} is empty")
    return sizes


class Buckets:
    """Allowed step shapes.

    Args:
        batch_sizes: sequence counts a step may be padded to.
        token_counts: token counts of mixed or prefill steps.
        draft_lengths: draft tokens per sequence of decode steps; each adds the exact decode
            shapes `(b, b * (1 + draft))` so verification rows need no token padding. With
            drafts, mixed keys return `1 + max(draft_lengths)` logit rows per sequence, so a
            step that mixes prompt chunks and verification rows fits them too.
    """

    def __init__(
        self,
        batch_sizes: Sequence[int],
        token_counts: Sequence[int],
        draft_lengths: Sequence[int] = (0,),
    ) -> None:
        self.batch_sizes = _sorted_sizes("batch_sizes", batch_sizes, 1)
        self.token_counts = _sorted_sizes("token_counts", token_counts, 1)
        self.draft_lengths = _sorted_sizes("draft_lengths", draft_lengths, 0)
        per_seq = 1 + self.draft_lengths[-1]
        keys = {
            BucketKey(batch, tokens, batch * per_seq)
            for batch, tokens in itertools.product(self.batch_sizes, self.token_counts)
            if tokens >= batch
        }
        keys |= {  # decode and verification: logits for every row
            BucketKey(batch, batch * (1 + draft), batch * (1 + draft))
            for batch, draft in itertools.product(self.batch_sizes, self.draft_lengths)
        }
        self.keys: tuple[BucketKey, ...] = tuple(sorted(keys))

    def pad(
        self, num_seqs: int, num_tokens: int, num_logits: int | None = None, *, draft_len: int = 0
    ) -> BucketKey:
        """The smallest allowed key holding the batch (fewest tokens, then fewest sequences);
        `num_logits` defaults to one row per sequence; `draft_len` asks for `1 + draft_len`
        logit rows per sequence of the key (a verification layout)."""
        wanted = BucketKey(num_seqs, num_tokens, num_seqs if num_logits is None else num_logits)
        return smallest_holding(self.keys, wanted, "allowed", min_logits_per_seq=1 + draft_len)


def smallest_holding(
    keys, wanted: BucketKey, what: str, *, min_logits_per_seq: int = 1
) -> BucketKey:
    fits = [
        k
        for k in keys
        if k.num_seqs >= wanted.num_seqs
        and k.num_tokens >= wanted.num_tokens
        and k.num_logits >= wanted.num_logits
        and k.logits_per_seq >= min_logits_per_seq
    ]
    if not fits:
        largest = max(keys, key=lambda k: (k.num_tokens, k.num_seqs), default=None)
        raise ValueError(
            f"a step of {wanted.num_seqs} sequences, {wanted.num_tokens} tokens and "
            f"{wanted.num_logits} logit rows fits no {what} bucket; the largest is {largest}"
        )
    return min(fits, key=lambda k: (k.num_tokens, k.num_seqs, k.num_logits))


def powers_of_two(low: int, high: int) -> list[int]:
    """Powers of two in [low, high), then high: bucket sizes."""
    sizes, size = [], 1
    while size < high:
        if size >= low:
            sizes.append(size)
        size *= 2
    return [*sizes, high]


def default_buckets(
    max_batch_size: int, max_num_tokens: int, draft_lengths=(0,), min_tokens: int = 16
) -> Buckets:
    """Batch sizes: powers of two up to `max_batch_size`, and it; token counts: powers of two
    from `min_tokens` up to `max_num_tokens`, and it; `draft_lengths` as given."""
    batch_sizes = powers_of_two(1, max_batch_size)
    low = min(min_tokens, max_num_tokens)
    return Buckets(batch_sizes, powers_of_two(low, max_num_tokens), draft_lengths)
