"""The door of the engine: a request is checked here and becomes a `Request` record, or is
refused with a `ValueError` naming the value and the limit; nothing is allocated yet.

Host side, no JAX.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Container, Mapping, Sequence

import numpy as np

from kvjax.cache.checks import check_int
from kvjax.cache.eviction import check_priority
from kvjax.cache.keys import ReuseScope
from kvjax.cache.manager import KVCacheManager
from kvjax.cache.multimodal import MultimodalItem, splice_multimodal_tokens
from kvjax.serving.request import Request, SamplingParams
from kvjax.serving.scheduler import SchedulerConfig

__all__ = ["RequestIntake", "prompt_ids"]


def prompt_ids(tokens: object) -> list[int]:
    """`tokens` as a list of Python ints: a 1-D sequence of ints or a 1-D numpy integer array.

    Raises:
        ValueError: anything else (strings, floats, bools, nested lists, other arrays), naming
            the first offending value.
    """
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(
                f"prompt_token_ids: an array of dtype {tokens.dtype} and shape {tokens.shape}; "
                "expected a 1-D integer array"
            )
        return tokens.tolist()
    if isinstance(tokens, str | bytes) or not isinstance(tokens, Sequence):
        raise ValueError(f"prompt_token_ids={tokens!r:.80} must be a sequence of token ids")
    for index, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, int | np.integer):
            raise ValueError(f"prompt token {token!r:.40} at index {index} is not an int id")
    return [int(token) for token in tokens]


class RequestIntake:
    """Checks requests against the engine's limits and makes their records.

    Not thread-safe by itself: `RequestQueue.submit` calls it under the queue's lock.

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
        prompt = prompt_ids(prompt_token_ids)
        self._check_prompt_length(len(prompt))
        key_tokens = splice_multimodal_tokens(prompt, multimodal_items, self.vocab_size)
        ReuseScope(lora_id, salt)  # raises naming a bad LoRA id or salt
        if lora_id is not None and lora_id not in self.lora_pages:
            raise ValueError(f"lora_id={lora_id!r} is unknown; known: {sorted(self.lora_pages)}")
        if priority is not None:
            check_priority(priority)
        if request_id is None:
            request_id = self._next_id
        check_int("request_id", request_id, minimum=0)
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
