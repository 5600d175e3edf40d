"""From the scheduler's decisions to one step's host inputs (plain numpy; nothing traces)."""

from __future__ import annotations

import dataclasses

import numpy as np

from kvjax.manager import KVCacheManager
from kvjax.request import Request
from kvjax.scheduler import SchedulerOutput
from kvjax.step import Buckets, StepInputs

__all__ = ["StepBatch", "build_step_batch"]


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One step's sequences in row order and their padded inputs."""

    requests: list[Request]  # row order: context chunks, then generation
    chunk_sizes: list[int]  # prompt tokens per context row; 0 for generation rows
    inputs: StepInputs  # padded to a bucket key


def build_step_batch(
    output: SchedulerOutput, manager: KVCacheManager, buckets: Buckets
) -> StepBatch:
    """Packs the scheduled sequences back to back: each context request's chunk of its prompt,
    each generation request's last sampled token; the logit row of each is its last token."""
    requests: list[Request] = []
    chunk_sizes: list[int] = []
    pieces: list[np.ndarray] = []
    kv_lens: list[int] = []
    for scheduled in output.context_requests:
        request, start = scheduled.request, scheduled.request.context_position
        end = start + scheduled.chunk_size
        pieces.append(np.asarray(request.prompt_token_ids[start:end], np.int32))
        requests.append(request)
        chunk_sizes.append(scheduled.chunk_size)
        kv_lens.append(end)
    for request in output.generation_requests:
        pieces.append(np.asarray(request.output_token_ids[-1:], np.int32))
        requests.append(request)
        chunk_sizes.append(0)
        kv_lens.append(request.cache.history_length + 1)
    q_lens = np.array([len(piece) for piece in pieces], np.int32)
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_seqs, num_tokens = len(requests), int(cu_q_lens[-1])
    key = buckets.pad(num_seqs, num_tokens)
    inputs = StepInputs(
        tokens=np.concatenate(pieces),
        page_table=manager.page_table([r.cache for r in requests], num_seqs),
        kv_lens=np.array(kv_lens, np.int32),
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([num_seqs], np.int32),
        logits_indices=cu_q_lens[1:] - 1,
    )
    return StepBatch(requests, chunk_sizes, inputs.padded(key, manager.max_blocks))
