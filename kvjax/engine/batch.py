"""From the scheduler's decisions to one step's host inputs (plain numpy; nothing traces)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from kvjax.cache.manager import KVCacheManager
from kvjax.runtime.buckets import Buckets
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

    @property
    def num_draft_padding(self) -> int:
        """Padding tokens fed after the real drafts of the generation rows."""
        generation = [row for row, chunk in enumerate(self.chunk_sizes) if not chunk]
        return sum(self.draft_len - int(self.num_drafts[row]) for row in generation)


def pack_rows(
    pieces: list[np.ndarray], kv_lens: list[int], caches, manager: KVCacheManager
) -> StepInputs:
    """Unpadded inputs of rows fed back to back (`pieces[i]` the new tokens of `caches[i]`,
    which has `kv_lens[i]` keys after them); logits at each row's last token."""
    q_lens = np.array([len(piece) for piece in pieces], np.int32)
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return StepInputs(
        tokens=np.concatenate(pieces),
        page_table=manager.page_table(caches, len(caches)),
        kv_lens=np.array(kv_lens, np.int32),
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([len(caches)], np.int32),
        logits_indices=cu_q_lens[1:] - 1,
    )


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
    inputs = pack_rows(pieces, kv_lens, [r.cache for r in requests], manager)
    num_seqs, num_tokens = len(requests), int(inputs.cu_q_lens[-1])
    key = buckets.pad(num_seqs, num_tokens, num_seqs * (1 + draft_len), draft_len=draft_len)
    logits_indices, draft_tokens, num_drafts = _logit_layout(
        requests, num_context, inputs.cu_q_lens, key.num_seqs, key.logits_per_seq, draft_len
    )
    inputs = dataclasses.replace(inputs, logits_indices=logits_indices.reshape(-1))
    padded = inputs.padded(key, manager.max_blocks)
    return StepBatch(requests, chunk_sizes, padded, draft_len, draft_tokens, num_drafts)


def _scheduled_rows(output: SchedulerOutput, draft_len: int, feeds: Mapping[int, int]):
    """(requests, chunk sizes, new tokens, KV lengths) of each row: context rows first."""
    requests: list[Request] = []
    chunk_sizes: list[int] = []
    pieces: list[np.ndarray] = []
    kv_lens: list[int] = []
    for scheduled in output.context_requests:
        request, start = scheduled.request, scheduled.request.context_position
        end = start + scheduled.chunk_size
        pieces.append(np.asarray(request.context_token_ids(start, end), np.int32))
        requests.append(request)
        chunk_sizes.append(scheduled.chunk_size)
        kv_lens.append(end)
    for request in output.generation_requests:
        drafts = request.draft_tokens
        if len(drafts) > draft_len:
            raise ValueError(
                f"request {request.request_id} has {len(drafts)} drafts > draft_len={draft_len}"
            )
        padding = [0] * (draft_len - len(drafts))
        if request.num_pending_tokens:
            last = [-(feeds[request.request_id] + 1)]
        else:
            last = request.output_token_ids[-1:]
        pieces.append(np.asarray([*last, *drafts, *padding], np.int32))
        requests.append(request)
        chunk_sizes.append(0)
        kv_lens.append(request.cache.history_length + 1 + draft_len)
    return requests, chunk_sizes, pieces, kv_lens


def _logit_layout(
    requests: list[Request],
    num_context: int,
    cu_q_lens: np.ndarray,
    num_rows: int,
    width: int,
    draft_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32[num_rows, width] logit positions (a context row's last token; a generation row's
    input token and drafts), int32[num_rows, width - 1] drafts and int32[num_rows] counts."""
    num_seqs = len(requests)
    logits_indices = np.zeros((num_rows, width), np.int32)
    logits_indices[:num_context, 0] = cu_q_lens[1 : num_context + 1] - 1
    positions = cu_q_lens[num_context:-1, None] + np.arange(1 + draft_len)
    logits_indices[num_context:num_seqs, : 1 + draft_len] = positions
    draft_tokens = np.zeros((num_rows, width - 1), np.int32)
    num_drafts = np.zeros(num_rows, np.int32)
    for row, request in enumerate(requests[num_context:], start=num_context):
        draft_tokens[row, : request.num_draft_tokens] = request.draft_tokens
        num_drafts[row] = request.num_draft_tokens
    return logits_indices, draft_tokens, num_drafts
