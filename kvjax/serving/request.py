"""Requests as the scheduler and the engine see them: sampling parameters, state, metrics, output.

Plain host-side records (no JAX). The engine owns every `Request`; the scheduler reads them and
returns its decisions as plain data; `CacheResources` keeps each request's `KVCache` and context
position.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvjax.cache.eviction import check_priority
from kvjax.cache.keys import Token
from kvjax.cache.kv_cache import KVCache
from kvjax.cache.multimodal import MultimodalItem
from kvjax.serving.sampling_params import SamplingParams, TokenLogprob

if TYPE_CHECKING:  # the text layer loads only where a tokenizer is used
    from kvjax.text.detokenizer import IncrementalDetokenizer

__all__ = [
    "FinishReason",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "RequestState",
    "SamplingParams",
]


class RequestState(enum.Enum):
    """Where a request is in its life. A request whose cache is suspended is *paused* in its
    state (`Request.is_paused`); it stays queued and resumes when memory allows."""

    CONTEXT_INIT = 0  # prompt not fully computed (possibly chunked, possibly started)
    GENERATION_IN_PROGRESS = 1
    GENERATION_TO_COMPLETE = 2  # its last token is sampled; resources not released yet
    COMPLETE = 3


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token (or EOS) was sampled
    LENGTH = "length"  # max_new_tokens reached, or the sequence reached max_seq_len
    ERROR = "error"  # it failed inside a step (`RequestOutput.error` says why); others ran on


@dataclasses.dataclass
class RequestMetrics:
    """Times are `time.perf_counter()` seconds."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_reused_tokens: int = 0  # prompt tokens whose KV came from the radix tree
    num_preemptions: int = 0  # times the scheduler suspended it
    num_recomputations: int = 0  # times it was preempted by dropping its KV (recomputed)

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]  # generated tokens
    finish_reason: FinishReason | None  # None while unfinished
    metrics: RequestMetrics
    error: str | None = None  # why it failed (FinishReason.ERROR)
    text: str | None = None  # the generated text (an engine with a tokenizer), cut at a stop
    # What this output adds to the previous one reported for the request (a streamed request
    # gets one per step it progressed in; others only their final output: everything).
    new_token_ids: tuple[int, ...] = ()
    new_text: str | None = None
    # One per generated token where `SamplingParams.logprobs` asked (else None), and the new ones.
    logprobs: tuple[TokenLogprob, ...] | None = None
    new_logprobs: tuple[TokenLogprob, ...] = ()
    # Where `SamplingParams.prompt_logprobs` asked, once the prompt is computed: one per
    # prompt token, the first None (nothing scores it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        m = self.metrics
        if m.finish_time is None or m.first_token_time is None or len(self.token_ids) < 2:
            return None
        return (m.finish_time - m.first_token_time) / (len(self.token_ids) - 1)


@dataclasses.dataclass(eq=False)
class Request:
    """One request. The engine builds it after validating the input; tests may build it bare.

    Args:
        request_id: unique among live requests.
        prompt_token_ids: the prompt.
        key_tokens: the prompt as block-key tokens (multimodal positions replaced by digests and
            synthetic ids); default the prompt itself.
        draft_tokens: speculative tokens to verify in the next step (count toward budgets).
    """

    request_id: int
    prompt_token_ids: Sequence[int]
    sampling_params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    lora_id: int | None = None
    salt: int | bytes | str | None = None
    priority: int | None = None
    multimodal_items: tuple[MultimodalItem, ...] = ()
    key_tokens: Sequence[Token] | None = None
    arrival_time: float = 0.0
    state: RequestState = RequestState.CONTEXT_INIT
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    draft_tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None  # why it failed inside a step
    # The generated text as it grows, with stop strings (an engine with a tokenizer).
    detokenizer: IncrementalDetokenizer | None = None
    stream: bool = False  # report progress after every step, not only the end
    # One per output token where `SamplingParams.logprobs` asks (`results.append_token`).
    logprobs: list[TokenLogprob] | None = None
    # Prompt tokens scored so far (`SamplingParams.prompt_logprobs`), the first None.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Tokens and characters of text already reported (`output()`), for the next delta.
    num_reported_tokens: int = 0
    num_reported_chars: int = 0
    # Kept by CacheResources: the request's cache and how many prompt tokens have KV.
    cache: KVCache | None = None
    context_position: int = 0
    context_started: bool = False  # a chunk of its prompt has run (it may now be a victim)
    # Outputs that are part of the context: a request preempted by recomputation computes the
    # KV of its prompt and of these again, and its last logits give its next token.
    num_recomputed_outputs: int = 0
    # Tokens a step in flight has sampled for it that have not reached the host yet (the
    # overlapped loop): they count as outputs for sampling keys, lengths and recomputation.
    num_pending_tokens: int = 0
    metrics: RequestMetrics = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if len(self.prompt_token_ids) < 1:
            raise ValueError(f"request {self.request_id}: the prompt is empty")
        if self.priority is not None:
            check_priority(self.priority)
        if self.key_tokens is None:
            self.key_tokens = self.prompt_token_ids
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        if self.sampling_params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]
        self._prompt_scores: tuple[TokenLogprob | None, ...] | None = None  # once complete
        # Outputs carry the prompt as a tuple of ints: made once, not at every report.
        self._prompt_tuple = tuple(int(t) for t in self.prompt_token_ids)

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft_tokens)

    @property
    def context_length(self) -> int:
        """Tokens of the context phase: the prompt, and the outputs to recompute."""
        return self.prompt_length + self.num_recomputed_outputs

    @property
    def context_remaining(self) -> int:
        """Context tokens whose KV is still to be computed."""
        return self.context_length - self.context_position

    def context_token_ids(self, start: int, end: int) -> list[int]:
        """Context tokens `[start, end)`: prompt ids, then recomputed outputs."""
        num_prompt = len(self.prompt_token_ids)
        if end - num_prompt > len(self.output_token_ids):
            raise RuntimeError(
                f"request {self.request_id}: context up to {end} needs outputs still pending"
            )
        outputs = self.output_token_ids[max(start - num_prompt, 0) : max(end - num_prompt, 0)]
        return [*self.prompt_token_ids[start:end], *outputs]

    @property
    def context_key_tokens(self) -> Sequence[Token]:
        """The context as block-key tokens (prompt keys, then recomputed outputs)."""
        if not self.num_recomputed_outputs:
            return self.key_tokens
        return [*self.key_tokens, *self.output_token_ids[: self.num_recomputed_outputs]]

    def fail(self, error: BaseException) -> None:
        """It failed inside a step: it ends with `FinishReason.ERROR` (the others run on)."""
        self.finish_reason = FinishReason.ERROR
        self.error = f"{type(error).__name__}: {error}"

    def restart_for_recompute(self) -> None:
        """Preempted by recomputation (its cache closed): back to the context phase, where the
        KV of the prompt and of every output so far is computed again."""
        self.state = RequestState.CONTEXT_INIT
        self.num_recomputed_outputs = self.num_outputs
        self.context_position = 0
        self.context_started = False
        self.draft_tokens = []
        self.metrics.num_recomputations += 1

    @property
    def num_outputs(self) -> int:
        """Tokens generated, counting those still on their way from the device."""
        return len(self.output_token_ids) + self.num_pending_tokens

    def ends_by_length(self, max_seq_len: int, num_generated: int | None = None) -> bool:
        """Whether `num_generated` outputs (default: its outputs so far, pending ones included)
        end it by length: `max_new_tokens`, or the sequence reaching `max_seq_len`."""
        num_generated = self.num_outputs if num_generated is None else num_generated
        return (
            num_generated >= self.sampling_params.max_new_tokens
            or self.prompt_length + num_generated >= max_seq_len
        )

    @property
    def is_paused(self) -> bool:
        """Started, but its cache is suspended (it holds no device page)."""
        return self.cache is not None and not self.cache.is_active

    @property
    def lifetime_tokens(self) -> int:
        """KV tokens it may need at most: prompt, outputs and drafts (the last output is never
        written)."""
        return self.prompt_length + self.sampling_params.max_new_tokens + self.num_draft_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asked for prompt log-probabilities and some prompt tokens are not scored yet."""
        scored = self.prompt_logprobs
        return scored is not None and len(scored) < self.prompt_length

    @property
    def has_news(self) -> bool:
        """It generated tokens not reported yet."""
        return len(self.output_token_ids) > self.num_reported_tokens

    def output(self) -> RequestOutput:
        """Its output so far, with what is new since the last call (which it marks reported)."""
        text = new_text = None
        if self.detokenizer is not None:
            if self.state is RequestState.COMPLETE:
                self.detokenizer.finish()  # releases text held back as a possible stop string
            text = self.detokenizer.text
            new_text = text[self.num_reported_chars :]
            self.num_reported_chars = len(text)
        reported = self.num_reported_tokens
        new_token_ids = tuple(self.output_token_ids[reported:])
        self.num_reported_tokens = len(self.output_token_ids)
        logprobs = None if self.logprobs is None else tuple(self.logprobs)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self._prompt_tuple,
            token_ids=tuple(self.output_token_ids),
            finish_reason=self.finish_reason,
            metrics=dataclasses.replace(self.metrics),
            error=self.error,
            text=text,
            new_token_ids=new_token_ids,
            new_text=new_text,
            logprobs=logprobs,
            new_logprobs=() if logprobs is None else logprobs[reported:],
            prompt_logprobs=self._scored_prompt(),
        )

    def _scored_prompt(self) -> tuple[TokenLogprob | None, ...] | None:
        """The prompt's log-probabilities once complete (made into a tuple once)."""
        if self.prompt_logprobs is None or self.needs_prompt_logprobs:
            return None
        if self._prompt_scores is None:  # complete: the list grows no more
            self._prompt_scores = tuple(self.prompt_logprobs)
        return self._prompt_scores
