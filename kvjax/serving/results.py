"""Applying one step's sampled tokens to its requests: the cache advances with the tokens whose
KV was written, rejected drafts are rewound, and each emitted token may finish the request.

Host side, no JAX: the picks arrive as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np

from kvjax.serving.request import FinishReason, Request, RequestState
from kvjax.serving.resources import CacheResources

__all__ = ["append_token", "apply_results", "emitted_tokens"]


def emitted_tokens(
    request: Request,
    resources: CacheResources,
    *,
    chunk: int,
    num_accepted: int,
    picks: np.ndarray,
    draft_len: int,
    start: float,
    now: float,
) -> np.ndarray:
    """Advances the cache of one row of a step and returns the tokens it emits.

    Args:
        chunk: prompt tokens the row computed (0 for a generation row).
        num_accepted: drafts the target accepted (a generation row).
        picks: int32[1 + draft_len] the target's picks after the input token and each draft.
        draft_len: the step's padded draft length (the rest past the accepted is rewound).
        start, now: when the step started and ended (request metrics).
    """
    if chunk:
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = start
        resources.context_computed(request, chunk)
        if request.context_remaining:
            return picks[:0]  # a non-last chunk: its logit row is not a token
        request.state = RequestState.GENERATION_IN_PROGRESS
        if request.metrics.first_token_time is None:  # not a recomputation
            request.metrics.first_token_time = now
        return picks[:1]
    # The input token and the accepted drafts have KV; the rest is rewound.
    computed = [*request.output_token_ids[-1:], *request.draft_tokens[:num_accepted]]
    resources.tokens_computed(request, computed, num_rejected=draft_len - num_accepted)
    return picks[: num_accepted + 1]


def append_token(
    request: Request, token: int, eos_token_ids: Collection[int], max_seq_len: int
) -> bool:
    """Adds a sampled token to the outputs; True when it finishes the request (a stop token,
    EOS unless ignored, `max_new_tokens`, or `max_seq_len` reached)."""
    request.output_token_ids.append(token)
    params = request.sampling_params
    num_generated = len(request.output_token_ids)
    if token in params.stop_token_ids or (token in eos_token_ids and not params.ignore_eos):
        request.finish_reason = FinishReason.STOP
    elif num_generated >= params.max_new_tokens or (
        request.prompt_length + num_generated >= max_seq_len
    ):
        request.finish_reason = FinishReason.LENGTH
    return request.finish_reason is not None


def apply_results(
    requests: Sequence[Request],
    chunk_sizes: Sequence[int],
    accepted: np.ndarray,
    tokens: np.ndarray,
    draft_len: int,
    resources: CacheResources,
    *,
    eos_token_ids: Collection[int],
    max_seq_len: int,
    finish: Callable[[Request, float], None],
    start: float,
    now: float,
) -> tuple[int, int]:
    """Advances every row's cache and outputs (`emitted_tokens`, `append_token`), calling
    `finish` for each request that ends (one whose update raises ends with
    `FinishReason.ERROR`, the others go on); returns (tokens generated, drafts accepted).

    Args:
        accepted: int32[rows] drafts accepted per row; tokens: int32[rows, 1 + W] picks.
    """
    num_generated = num_accepted = 0
    for row, request in enumerate(requests):
        try:
            new_tokens = emitted_tokens(
                request, resources, chunk=chunk_sizes[row], num_accepted=int(accepted[row]),
                picks=tokens[row], draft_len=draft_len, start=start, now=now,
            )  # fmt: skip
        except Exception as error:  # this request's failure: it ends alone
            request.fail(error)
            finish(request, now)
            continue
        for index, token in enumerate(new_tokens):
            num_generated += 1
            num_accepted += index < len(new_tokens) - 1  # a draft (not the last pick)
            if append_token(request, int(token), eos_token_ids, max_seq_len):
                finish(request, now)
                break
    return num_generated, num_accepted
