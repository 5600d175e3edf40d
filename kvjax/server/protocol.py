"""OpenAI's completions and chat completions requests: a body checked and turned into a prompt,
`SamplingParams` and request options (`kvjax.server.responses` writes the answers). No HTTP here
(`kvjax.server.app` serves it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvjax.serving.request import SamplingParams
from kvjax.serving.request_queue import MAX_SAMPLES
from kvjax.serving.sampling_params import MAX_LOGPROBS

__all__ = ["MAX_SAMPLES", "BadRequest", "ParsedRequest", "parse_request"]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's legacy completions default


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    prompt: Any  # a string, token ids, or chat messages
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    salt: str | None  # `cache_salt`, else `user`: tenants never share cached prefixes
    n: int = 1  # parallel samples (choices)


def _number(body: Mapping, name: str, default, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name}={value!r} must be a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(f"{name}={value!r} must be finite")
    if kind is int and value != int(value):
        raise BadRequest(f"{name}={value!r} must be an integer")
    return kind(value)


def _flag(body: Mapping, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name}={value!r} must be a boolean")
    return value


def _token_ids(body: Mapping, name: str) -> tuple[int, ...]:
    value = body.get(name) or []
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise BadRequest(f"{name}={value!r} must be a list of token ids")
    return tuple(value)


def _prompt(body: Mapping, chat: bool):
    if chat:
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(message, Mapping) for message in messages)
        ):
            raise BadRequest("messages must be a non-empty list of {role, content} objects")
        return [_text_message(message, index) for index, message in enumerate(messages)]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    raise BadRequest("prompt must be a non-empty string or list of token ids (one prompt)")


def _text_message(message: Mapping, index: int) -> dict:
    """The message with a list of content parts joined into its text (newline-separated, as
    vLLM does); parts other than text are refused by name."""
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(
                f"messages[{index}].content[{number}]: type={kind!r} is not supported (text only)"
            )
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


def _refuse_unsupported(body: Mapping) -> None:
    if _number(body, "best_of", 1, int) not in (1, _number(body, "n", 1, int)):
        raise BadRequest(f"best_of={body['best_of']!r}: only best_of == n is supported")
    for name in ("echo", "suffix", "tools", "functions", "logit_bias"):
        if body.get(name) not in (None, False, [], {}):
            raise BadRequest(f"{name}={body[name]!r} is not supported")


def _logprobs(body: Mapping, chat: bool) -> int | None:
    """How many alternatives per token (None: no log-probabilities): the completions API's
    `logprobs: int`, the chat API's `logprobs: bool` with `top_logprobs: int`."""
    if not chat:
        value = _number(body, "logprobs", None, int)
    elif body.get("logprobs") not in (None, False, True):
        raise BadRequest(f"logprobs={body['logprobs']!r} must be a boolean")
    else:
        value = _number(body, "top_logprobs", 0, int) if body.get("logprobs") else None
        if not body.get("logprobs") and body.get("top_logprobs") is not None:
            raise BadRequest("top_logprobs needs logprobs=true")
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        name = "logprobs" if not chat else "top_logprobs"
        raise BadRequest(f"{name}={value!r} must be in [0, {MAX_LOGPROBS}]")
    return value


def parse_request(body: object, *, chat: bool, max_seq_len: int) -> ParsedRequest:
    """The request a completions (`chat=False`) or chat completions body asks for.

    Raises:
        BadRequest: a malformed body, naming the field and the value.
    """
    if not isinstance(body, Mapping):
        raise BadRequest("the body must be a JSON object")
    _refuse_unsupported(body)
    default_tokens = max_seq_len if chat else DEFAULT_COMPLETION_TOKENS
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = _number(body, "max_tokens", default_tokens, int) if max_tokens is None else (
        _number(body, "max_completion_tokens", default_tokens, int))  # fmt: skip
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise BadRequest(f"stop={body.get('stop')!r} must be a string or a list of strings")
    seed = body.get("seed")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=max(_number(body, "top_k", 0, int), 0),  # vLLM's extension; -1 is "all"
            seed=None if seed is None else _number(body, "seed", 0, int),
            stop=tuple(stop),
            stop_token_ids=_token_ids(body, "stop_token_ids"),
            ignore_eos=_flag(body, "ignore_eos"),
            logprobs=_logprobs(body, chat),
            prompt_logprobs=_number(body, "prompt_logprobs", None, int),  # vLLM's extension
            presence_penalty=_number(body, "presence_penalty", 0.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),  # vLLM's extension
        )
    except ValueError as error:
        raise BadRequest(str(error).replace("max_new_tokens", "max_tokens")) from None
    options = body.get("stream_options") or {}
    salt = body.get("cache_salt") or body.get("user")
    if salt is not None and not isinstance(salt, str):
        raise BadRequest(f"cache_salt/user={salt!r} must be a string")
    n = _number(body, "n", 1, int)
    if not 1 <= n <= MAX_SAMPLES:
        raise BadRequest(f"n={n!r} must be in [1, {MAX_SAMPLES}]")
    return ParsedRequest(
        chat=chat, prompt=_prompt(body, chat), params=params, stream=_flag(body, "stream"),
        include_usage=bool(isinstance(options, Mapping) and options.get("include_usage")),
        salt=salt, n=n,
    )  # fmt: skip
