"""The door of the engine: a request is checked here and becomes a `Request` record, or is
refused with a `ValueError` naming the value and the limit; nothing is allocated yet.

Host side, no JAX.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Container, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from kvjax.cache.checks import check_int
from kvjax.cache.eviction import check_priority
from kvjax.cache.keys import ReuseScope
from kvjax.cache.manager import KVCacheManager
from kvjax.cache.multimodal import MultimodalItem, splice_multimodal_tokens
from kvjax.serving.request import Request, SamplingParams
from kvjax.serving.scheduler import SchedulerConfig

if TYPE_CHECKING:  # the text layer loads only where a tokenizer is used
    from kvjax.text.tokenizer import Tokenizer

__all__ = ["RequestIntake", "encode_prompt", "prompt_ids"]

Prompt = Sequence[int] | np.ndarray | str | Sequence[Mapping[str, object]]


def encode_prompt(prompt: Prompt, tokenizer: Tokenizer | None) -> list[int] | np.ndarray:
    """Token ids of `prompt`: a string is encoded, a list of chat messages (dicts with `role`
    and `content`) rendered by the chat template with the generation prompt and encoded; ids
    pass through (checked by `prompt_ids`).

    Raises:
        ValueError: text without a tokenizer, a template error or malformed messages.
    """
    is_text = isinstance(prompt, str)
    is_chat = isinstance(prompt, list | tuple) and bool(prompt) and isinstance(prompt[0], Mapping)
    if not (is_text or is_chat):
        return prompt
    if tokenizer is None:
        kind = "text" if is_text else "chat messages"
        raise ValueError(f"a prompt of {kind} needs an engine with a tokenizer (tokenizer=...)")
    return tokenizer.encode(prompt) if is_text else tokenizer.encode_chat(list(prompt))


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
        tokenizer: gives each request its detokenizer (`RequestOutput.text`, stop strings).
        speculative: the engine drafts (prompt log-probabilities are refused).
    """

    def __init__(
        self,
        manager: KVCacheManager,
        config: SchedulerConfig,
        vocab_size: int,
        lora_pages: Mapping[int, int],
        seed: int,
        tokenizer: Tokenizer | None = None,
        speculative: bool = False,
    ) -> None:
        self.manager = manager
        self.speculative = speculative
        self.tokenizer = tokenizer
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
        stream: bool = False,
    ) -> Request:
        """The record of a new request whose id is not in `live` (see `Engine.add_request`)."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params={params!r} is not a SamplingParams")
        if params.prompt_logprobs is not None and self.speculative:
            raise ValueError(
                f"prompt_logprobs={params.prompt_logprobs} is not supported with speculative "
                "decoding (its steps have no logit row per prompt token)"
            )
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
        detokenizer = self._detokenizer(params)
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._rng.integers(2**32)))
        return Request(
            request_id, prompt, params, lora_id=lora_id, salt=salt, priority=priority,
            multimodal_items=tuple(multimodal_items), key_tokens=key_tokens,
            arrival_time=time.perf_counter(), detokenizer=detokenizer, stream=bool(stream),
        )  # fmt: skip

    def _detokenizer(self, params: SamplingParams):
        if self.tokenizer is None:
            if params.stop:
                raise ValueError(f"stop={params.stop!r:.80} needs an engine with a tokenizer")
            return None
        from kvjax.text.detokenizer import IncrementalDetokenizer

        specials = self.tokenizer.special_tokens if params.stop else {}
        for stop in params.stop:
            if stop in specials:
                raise ValueError(
                    f"stop string {stop!r} is a special token, which the text leaves out; "
                    f"use stop_token_ids=({specials[stop]},)"
                )

        return IncrementalDetokenizer(self.tokenizer, stop=params.stop)

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
