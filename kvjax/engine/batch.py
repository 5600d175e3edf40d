"""From the scheduler's decisions to one step's host inputs (plain numpy; nothing traces)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from itertools import chain

import numpy as np

from kvjax.cache.manager import KVCacheManager
from kvjax.runtime.buckets import BucketKey, Buckets
from kvjax.runtime.step import StepInputs
from kvjax.serving.request import Request
from kvjax.serving.scheduler import SchedulerOutput

__all__ = ["StepBatch", "build_step_batch", "pack_rows"]


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One step's sequences in row order, their padded inputs and what verification needs.

    The step returns `1 + W` logit rows per sequence (`W = key.logits_per_seq - 1`): row
    `r * (1 + W) + j` scores the token after the j-th draft of sequence r (a context row uses
    j = 0 only).
    """

    requests: list[Request]  # row order: context chunks, then generation
    chunk_sizes: list[int]  # prompt tokens per context row; 0 for generation rows
    inputs: StepInputs  # padded to a bucket key
    draft_len: int  # every generation row's drafts are padded to this many tokens
    draft_tokens: np.ndarray  # int32[num_seqs_bucket, W]: real drafts, then padding 0
    num_drafts: np.ndarray  # int32[num_seqs_bucket]: real drafts per row (0 for context)
    # A step that scores prompt tokens (`SamplingParams.prompt_logprobs`) returns a logit row
    # per token: each sequence samples from row `sample_rows[r]`, and row i scores the prompt
    # token `next_tokens[i]` (-1: none).
    sample_rows: np.ndarray | None = None  # int32[num_seqs_bucket]
    next_tokens: np.ndarray | None = None  # int32[num_tokens_bucket]

    @property
    def num_draft_padding(self) -> int:
        """Padding tokens fed after the real drafts of the generation rows."""
        generation = [row for row, chunk in enumerate(self.chunk_sizes) if not chunk]
        return sum(self.draft_len - int(self.num_drafts[row]) for row in generation)


def pack_rows(
    pieces: Sequence[Sequence[int]],
    kv_lens: Sequence[int],
    caches,
    manager: KVCacheManager,
    key: BucketKey,
) -> StepInputs:
    """Inputs of `key`'s shapes for rows fed back to back (`pieces[i]` the new tokens of
    `caches[i]`, which has `kv_lens[i]` keys after them), logits at each row's last token;
    written straight into one packed buffer (`StepInputs.empty`), padding past the rows."""
    inputs = StepInputs.empty(key, manager.page_table_width)
    num_seqs = len(pieces)
    cu_q_lens = inputs.cu_q_lens
    np.cumsum(np.fromiter(map(len, pieces), np.int32, num_seqs), out=cu_q_lens[1 : num_seqs + 1])
    cu_q_lens[num_seqs + 1 :] = cu_q_lens[num_seqs]
    inputs.tokens[: cu_q_lens[num_seqs]] = list(chain.from_iterable(pieces))
    inputs.kv_lens[:num_seqs] = kv_lens
    inputs.num_seqs[0] = num_seqs
    inputs.logits_indices[:num_seqs] = cu_q_lens[1 : num_seqs + 1] - 1
    manager.page_table(caches, key.num_seqs, out=inputs.page_table)
    return inputs


def build_step_batch(
    output: SchedulerOutput,
    manager: KVCacheManager,
    buckets: Buckets,
    draft_len: int = 0,
    feeds: Mapping[int, int] | None = None,
) -> StepBatch:
    """Packs the scheduled sequences back to back: each context request's chunk of its prompt;
    each generation request's last sampled token, its drafts and padding up to `draft_len`
    (whose KV lands in the request's own pages: capacity was extended to cover it).

    `feeds`: for each request whose last token is still pending on the device, its row in the
    step in flight; its input token is then `-(row + 1)`, read from that step's `fed` tokens.
    """
    requests, chunk_sizes, pieces, kv_lens = _scheduled_rows(output, draft_len, feeds or {})
    num_context = len(output.context_requests)
    num_seqs, num_tokens = len(requests), sum(map(len, pieces))
    if not draft_len and any(r.needs_prompt_logprobs for r in requests[:num_context]):
        return _scoring_batch(requests, chunk_sizes, pieces, kv_lens, manager, buckets)
    key = buckets.pad(num_seqs, num_tokens, num_seqs * (1 + draft_len), draft_len=draft_len)
    inputs = pack_rows(pieces, kv_lens, [r.cache for r in requests], manager, key)
    width = key.logits_per_seq
    draft_tokens = np.zeros((key.num_seqs, width - 1), np.int32)
    num_drafts = np.zeros(key.num_seqs, np.int32)
    if width > 1:  # a verification layout: 1 + W logit rows per sequence
        logits_indices = _logit_layout(
            requests, num_context, inputs.cu_q_lens, draft_len, draft_tokens, num_drafts
        )
        inputs.logits_indices[:] = logits_indices.reshape(-1)
    return StepBatch(requests, chunk_sizes, inputs, draft_len, draft_tokens, num_drafts)


def _scoring_batch(requests, chunk_sizes, pieces, kv_lens, manager, buckets) -> StepBatch:
    """A step with a logit row per token (see `StepBatch`): its key is a bucket's shapes with
    as many logit rows as tokens (`compile._compile_scoring_steps`)."""
    key = buckets.pad(len(requests), sum(map(len, pieces)))
    key = BucketKey(key.num_seqs, key.num_tokens, key.num_tokens)
    inputs = pack_rows(pieces, kv_lens, [r.cache for r in requests], manager, key)
    cu_q_lens = inputs.cu_q_lens
    sample_rows = np.zeros(key.num_seqs, np.int32)
    sample_rows[: len(requests)] = inputs.logits_indices[: len(requests)]
    inputs.logits_indices[:] = np.arange(key.num_tokens)
    next_tokens = np.full(key.num_tokens, -1, np.int32)
    for row, request in enumerate(requests):
        if not chunk_sizes[row] or not request.needs_prompt_logprobs:
            continue
        start = kv_lens[row] - chunk_sizes[row]
        positions = np.arange(start, min(kv_lens[row], request.prompt_length - 1))
        prompt = np.asarray(request.prompt_token_ids, np.int32)
        next_tokens[cu_q_lens[row] + positions - start] = prompt[positions + 1]
    no_drafts = np.zeros((key.num_seqs, 0), np.int32)
    return StepBatch(
        requests, chunk_sizes, inputs, 0, no_drafts, np.zeros(key.num_seqs, np.int32),
        sample_rows, next_tokens,
    )  # fmt: skip


def _scheduled_rows(output: SchedulerOutput, draft_len: int, feeds: Mapping[int, int]):
    """(requests, chunk sizes, new tokens, KV lengths) of each row: context rows first."""
    requests: list[Request] = []
    chunk_sizes: list[int] = []
    pieces: list[list[int]] = []
    kv_lens: list[int] = []
    for scheduled in output.context_requests:
        request, start = scheduled.request, scheduled.request.context_position
        end = start + scheduled.chunk_size
        pieces.append(request.context_token_ids(start, end))
        requests.append(request)
        chunk_sizes.append(scheduled.chunk_size)
        kv_lens.append(end)
    for request in output.generation_requests:
        drafts = request.draft_tokens
        if len(drafts) > draft_len:
            raise ValueError(
                f"request {request.request_id} has {len(drafts)} drafts > draft_len={draft_len}"
            )
        if request.num_pending_tokens:
            last = -(feeds[request.request_id] + 1)
        else:
            last = request.output_token_ids[-1]
        pieces.append([last, *drafts, *[0] * (draft_len - len(drafts))] if draft_len else [last])
        requests.append(request)
        chunk_sizes.append(0)
        kv_lens.append(request.cache.history_length + 1 + draft_len)
    return requests, chunk_sizes, pieces, kv_lens


def _logit_layout(
    requests: list[Request],
    num_context: int,
    cu_q_lens: np.ndarray,
    draft_len: int,
    draft_tokens: np.ndarray,
    num_drafts: np.ndarray,
) -> np.ndarray:
    """int32[num_rows, width] logit positions (a context row's last token; a generation row's
    input token and drafts); fills each row's drafts into int32[num_rows, width - 1]
    `draft_tokens` and their counts into int32[num_rows] `num_drafts`."""
    num_seqs = len(requests)
    logits_indices = np.zeros((len(num_drafts), draft_tokens.shape[1] + 1), np.int32)
    logits_indices[:num_context, 0] = cu_q_lens[1 : num_context + 1] - 1
    positions = cu_q_lens[num_context:num_seqs, None] + np.arange(1 + draft_len)
    logits_indices[num_context:num_seqs, : 1 + draft_len] = positions
    for row, request in enumerate(requests[num_context:], start=num_context):
        draft_tokens[row, : request.num_draft_tokens] = request.draft_tokens
        num_drafts[row] = request.num_draft_tokens
    return logits_indices
