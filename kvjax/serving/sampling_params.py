"""What a request asks of sampling (`SamplingParams`), and the log-probabilities it gets back.

Plain host-side records (no JAX); `kvjax.runtime.sampling` applies them on the device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from kvjax.cache.checks import check_int

__all__ = ["INT32_MAX", "MAX_LOGPROBS", "SamplingParams", "TokenLogprob"]

MAX_LOGPROBS = 20  # alternatives per token (kvjax.runtime.sampling.MAX_TOP_LOGPROBS)


INT32_MAX = 2**31 - 1


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token.

    Args:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 is greedy; otherwise logits are divided by it before sampling.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of tokens whose probability reaches p (1.0: all).
        seed: makes the request's samples reproducible whatever it is batched with; None draws
            one from the engine's seed.
        stop_token_ids: tokens that end the request (kept in the output).
        ignore_eos: keep generating past the model's EOS tokens.
        stop: strings that end the request, matched on its detokenized text (an engine with a
            tokenizer): the text ends before the first one; the tokens stay in `token_ids`.
        logprobs: None, or report each generated token's log-probability with this many most
            likely alternatives (0 to 20; `RequestOutput.logprobs`). They are those of the
            penalized logits divided by the temperature (1 for greedy), before top-k and top-p
            truncation (`kvjax.runtime.sampling`).
        prompt_logprobs: None, or report the log-probability of each prompt token after the
            first (and this many alternatives, 0 to 20) as the model scores it
            (`RequestOutput.prompt_logprobs`): at temperature 1, without penalties. The whole
            prompt is then computed, none of it taken from the prefix cache (whose KV has no
            logits); not with speculative decoding.
        presence_penalty, frequency_penalty: in [-2, 2], subtracted from the logit of each
            generated token once, and once per occurrence (vLLM's and OpenAI's definitions).
        repetition_penalty: > 0; the logits of tokens in the prompt or the output are divided
            by it when positive, multiplied otherwise (1: none).
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        check_int("top_k", self.top_k, minimum=0, maximum=INT32_MAX)  # an int32 on the device
        if not (_is_real(self.temperature) and 0 <= self.temperature < math.inf):
            raise ValueError(f"temperature={self.temperature!r} must be a finite float >= 0")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0, maximum=2**32 - 1)
        stop = self.stop_token_ids
        if isinstance(stop, int | str | bytes) or not isinstance(stop, Iterable):
            raise ValueError(f"stop_token_ids={stop!r} must be a sequence of token ids")
        stop = tuple(check_int("stop token id", t, minimum=0, maximum=INT32_MAX) for t in stop)
        object.__setattr__(self, "stop_token_ids", stop)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r} must be a bool")
        if isinstance(self.stop, str | bytes) or not isinstance(self.stop, Iterable):
            raise ValueError(f"stop={self.stop!r:.80} must be a sequence of strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        for text in self.stop:
            if not isinstance(text, str) or not text:
                raise ValueError(f"stop string {text!r:.80} must be a non-empty str")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=0, maximum=MAX_LOGPROBS)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_real(value) and -2 <= value <= 2):
                raise ValueError(f"{name}={value!r} must be in [-2, 2]")
        value = self.repetition_penalty
        if not (_is_real(value) and 0 < value < math.inf):
            raise ValueError(f"repetition_penalty={value!r} must be a finite float > 0")

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes its logits (sampling then needs its token history)."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1
        )


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives, best first (as
    many as `SamplingParams.logprobs` asks)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
