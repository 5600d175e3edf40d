"""Applying one step's sampled tokens to its requests: the cache advances with the tokens whose
KV was written, rejected drafts are rewound, and each emitted token may finish the request.

Host side, no JAX: the picks arrive as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np

from kvjax.serving.request import FinishReason, Request, RequestState
from kvjax.serving.resources import CacheResources
from kvjax.serving.sampling_params import TokenLogprob

__all__ = [
    "advance_dispatched",
    "append_token",
    "apply_picks",
    "apply_results",
    "emitted_tokens",
    "record_prompt_logprobs",
    "token_logprob",
]


def _context_computed(
    request: Request, resources: CacheResources, chunk: int, start: float
) -> bool:
    """Advances the cache by a computed prompt chunk; True when the prompt ended with it (its
    logit row then gives a token)."""
    if request.metrics.first_scheduled_time is None:
        request.metrics.first_scheduled_time = start
    resources.context_computed(request, chunk)
    if request.context_remaining:
        return False  # a non-last chunk: its logit row is not a token
    request.state = RequestState.GENERATION_IN_PROGRESS
    return True


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
        if not _context_computed(request, resources, chunk, start):
            return picks[:0]
        if request.metrics.first_token_time is None:  # not a recomputation
            request.metrics.first_token_time = now
        return picks[:1]
    # The input token and the accepted drafts have KV; the rest is rewound.
    computed = [*request.output_token_ids[-1:], *request.draft_tokens[:num_accepted]]
    resources.tokens_computed(request, computed, num_rejected=draft_len - num_accepted)
    return picks[: num_accepted + 1]


def advance_dispatched(
    requests: Sequence[Request],
    chunk_sizes: Sequence[int],
    resources: CacheResources,
    *,
    finish: Callable[[Request, float], None],
    start: float,
) -> list[int]:
    """The overlapped loop's first half of applying a step without drafts, once it is
    dispatched: each row's cache advances by the KV the step writes (a prompt chunk, or a
    generation row's input token), and the token the row will emit is marked pending. Rows of
    requests that ended meanwhile are skipped; a request whose update raises ends with
    `FinishReason.ERROR`. Returns the rows that emit a token (`apply_picks` takes them)."""
    emitting = []
    for row, request in enumerate(requests):
        if request.state is RequestState.COMPLETE:
            continue  # finished by the previous step's tokens, or aborted: its row is void
        try:
            if chunk_sizes[row]:
                if not _context_computed(request, resources, chunk_sizes[row], start):
                    continue
            else:
                resources.tokens_computed(request, request.output_token_ids[-1:])
        except Exception as error:  # this request's failure: it ends alone
            request.fail(error)
            finish(request, start)
            continue
        request.num_pending_tokens += 1
        emitting.append(row)
    return emitting


def apply_picks(
    requests: Sequence[Request],
    emitting: Sequence[int],
    tokens: np.ndarray,
    *,
    eos_token_ids: Collection[int],
    max_seq_len: int,
    finish: Callable[[Request, float], None],
    now: float,
    logprobs=None,
) -> int:
    """The second half (`advance_dispatched`): each emitting row's pending token reaches its
    request, which may finish; the token of a request that ended meanwhile is dropped (its
    cache, closed, took the KV the step wrote for it along). Returns the tokens kept.

    Args:
        tokens: int32[rows, 1] the step's picks.
        logprobs: their log-probabilities where a row asked (`token_logprob`), else None.
    """
    num_generated = 0
    for row in emitting:
        request = requests[row]
        if request.state is RequestState.COMPLETE:
            continue
        request.num_pending_tokens -= 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        num_generated += 1
        token = int(tokens[row, 0])
        logprob = token_logprob(request, token, logprobs, row, 0)
        if append_token(request, token, eos_token_ids, max_seq_len, logprob):
            finish(request, now)
    return num_generated


def token_logprob(
    request: Request, token: int, logprobs, row: int, position: int
) -> TokenLogprob | None:
    """The `TokenLogprob` of a pick where its request asks for log-probabilities, else None.

    Args:
        logprobs: the step's host arrays (`chosen` f32[rows, 1 + W], `top_ids` int32 and `top`
            f32 [rows, 1 + W, K]), or None when no row asked.
    """
    wanted = request.sampling_params.logprobs
    if wanted is None or logprobs is None:
        return None
    return _entry(token, logprobs, (row, position), wanted)


def _entry(token: int, logprobs, index: tuple, wanted: int) -> TokenLogprob:
    """`token`'s `TokenLogprob` from the host arrays at `index`, with `wanted` alternatives."""
    top_ids = logprobs.top_ids[index][:wanted].tolist()
    top = tuple(zip(top_ids, logprobs.top[index][:wanted].tolist(), strict=True))
    return TokenLogprob(token, float(logprobs.chosen[index]), top)


def record_prompt_logprobs(batch, logprobs) -> None:
    """Adds the prompt tokens a scoring step scored (`StepBatch.next_tokens`) to their
    requests' `prompt_logprobs`, skipping those already scored (a recomputed prompt) and
    requests that ended meanwhile.

    Args:
        batch: the step's `StepBatch`; logprobs: host `chosen` f32[T], `top_ids` int32 and
            `top` f32 [T, K] (None: the step scored nothing).
    """
    if logprobs is None:
        return
    cu_q_lens, kv_lens = batch.inputs.cu_q_lens, batch.inputs.kv_lens
    for row, request in enumerate(batch.requests):
        chunk = batch.chunk_sizes[row]
        scored = request.prompt_logprobs
        if not chunk or scored is None or request.state is RequestState.COMPLETE:
            continue
        start = int(kv_lens[row]) - chunk
        if start > len(scored) - 1:  # a gap (never: such prompts take nothing from the cache)
            continue
        wanted = request.sampling_params.prompt_logprobs
        for position in range(max(start, len(scored) - 1), int(kv_lens[row])):
            if position + 1 >= request.prompt_length:
                break
            index = (int(cu_q_lens[row]) + position - start,)
            token = int(request.prompt_token_ids[position + 1])
            scored.append(_entry(token, logprobs, index, wanted))


def append_token(
    request: Request,
    token: int,
    eos_token_ids: Collection[int],
    max_seq_len: int,
    logprob: TokenLogprob | None = None,
) -> bool:
    """Adds a sampled token (and its log-probability, where the request asks) to the outputs;
    True when it finishes the request (a stop token, EOS unless ignored, a stop string in its
    text, `max_new_tokens`, or `max_seq_len` reached)."""
    request.output_token_ids.append(token)
    if request.logprobs is not None and logprob is not None:
        request.logprobs.append(logprob)
    params = request.sampling_params
    stopped_by_text = False
    if request.detokenizer is not None:
        request.detokenizer.add((token,))
        stopped_by_text = request.detokenizer.stopped is not None
    if (
        stopped_by_text
        or token in params.stop_token_ids
        or (token in eos_token_ids and not params.ignore_eos)
    ):
        request.finish_reason = FinishReason.STOP
    elif request.ends_by_length(max_seq_len, len(request.output_token_ids)):
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
    logprobs=None,
) -> tuple[int, int]:
    """Advances every row's cache and outputs (`emitted_tokens`, `append_token`), calling
    `finish` for each request that ends (one whose update raises ends with
    `FinishReason.ERROR`, the others go on); returns (tokens generated, drafts accepted).

    Args:
        accepted: int32[rows] drafts accepted per row; tokens: int32[rows, 1 + W] picks.
        logprobs: their log-probabilities where a row asked (`token_logprob`), else None.
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
            logprob = token_logprob(request, int(token), logprobs, row, index)
            if append_token(request, int(token), eos_token_ids, max_seq_len, logprob):
                finish(request, now)
                break
    return num_generated, num_accepted
