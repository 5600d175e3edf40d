"""The door of the engine: a request is checked here and becomes a `Request` record, or is
refused with a `ValueError` naming the value and the limit; nothing is allocated yet.

Host side, no JAX.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Container, Mapping, Sequence

import numpy as np

from kvjax.cache.manager import KVCacheManager
from kvjax.cache.multimodal import MultimodalItem, splice_multimodal_tokens
from kvjax.serving.request import Request, SamplingParams
from kvjax.serving.scheduler import SchedulerConfig

__all__ = ["RequestIntake"]


class RequestIntake:
    """Checks requests against the engine's limits and makes their records.

    Not thread-safe: the engine calls it from the thread that adds requests.

    Args:
        manager: the target's cache manager (its `max_seq_len` bounds prompt and outputs).
        config: the scheduler's budgets (a prompt must fit one step without chunked prefill).
        vocab_size: multimodal items take synthetic key ids from it upward.
        lora_pages: the known LoRA adapters; a request naming another is refused.
        seed: draws the seeds of requests that give none.
    """

    def __init__(
        self,
        manager: KVCacheManager,
        config: SchedulerConfig,
        vocab_size: int,
        lora_pages: Mapping[int, int],
        seed: int,
    ) -> None:
        self.manager = manager
        self.config = config
        self.vocab_size = vocab_size
        self.lora_pages = lora_pages
        self._rng = np.random.default_rng(seed)
        self._next_id = 0

    def make_request(
        self,
        prompt_token_ids: Sequence[int] | np.ndarray,
        sampling_params: SamplingParams | None,
        *,
        live: Container[int],
        request_id: int | None = None,
        lora_id: int | None = None,
        salt: int | bytes | str | None = None,
        priority: int | None = None,
        multimodal_items: Sequence[MultimodalItem] = (),
    ) -> Request:
        """The record of a new request whose id is not in `live` (see `Engine.add_request`)."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={params!r} is not a SamplingParams")
        prompt = [int(t) for t in np.asarray(prompt_token_ids).reshape(-1)]
        self._check_prompt_length(len(prompt))
        key_tokens = splice_multimodal_tokens(prompt, multimodal_items, self.vocab_size)
        if lora_id is not None and lora_id not in self.lora_pages:
            raise ValueError(f"lora_id={lora_id!r} is unknown; known: {sorted(self.lora_pages)}")
        if request_id is None:
            request_id = self._next_id
        if request_id in live:
            raise ValueError(f"request_id={request_id} is already live")
        self._next_id = max(self._next_id, request_id + 1)
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._rng.integers(2**32)))
        return Request(
            request_id, prompt, params, lora_id=lora_id, salt=salt, priority=priority,
            multimodal_items=tuple(multimodal_items), key_tokens=key_tokens,
            arrival_time=time.perf_counter(),
        )  # fmt: skip

    def _check_prompt_length(self, length: int) -> None:
        max_seq_len = self.manager.max_seq_len
        if not 1 <= length < max_seq_len:
            raise ValueError(
                f"a prompt of {length} tokens must have 1 to {max_seq_len - 1} tokens "
                f"(max_seq_len={max_seq_len} leaves room for one generated token)"
            )
        config = self.config
        if not config.enable_chunked_prefill and length > min(
            config.context_limit, config.max_num_tokens or np.inf
        ):
            raise ValueError(
                f"a prompt of {length} tokens exceeds the per-step token budget "
                f"{config.max_num_tokens} and chunked prefill is off"
            )
