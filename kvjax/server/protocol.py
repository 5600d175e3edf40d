"""OpenAI's completions and chat completions, as plain dicts: a request body checked and turned
into a prompt, `SamplingParams` and request options, and outputs turned into response bodies and
stream chunks. No HTTP here (`kvjax.server.app` serves it).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from kvjax.serving.request import FinishReason, RequestOutput, SamplingParams

__all__ = ["BadRequest", "ParsedRequest", "chunk", "completion", "parse_request"]

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


def _prompt(body: Mapping, chat: bool):
    if chat:
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(message, Mapping) for message in messages)
        ):
            raise BadRequest("messages must be a non-empty list of {role, content} objects")
        return messages
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    raise BadRequest("prompt must be a non-empty string or list of token ids (one prompt)")


def _refuse_unsupported(body: Mapping) -> None:
    if _number(body, "n", 1, int) != 1:
        raise BadRequest(f"n={body['n']!r}: only n=1 is supported")
    if _number(body, "best_of", 1, int) != 1:
        raise BadRequest(f"best_of={body['best_of']!r}: only 1 is supported")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions"):
        if body.get(name) not in (None, False, []):
            raise BadRequest(f"{name}={body[name]!r} is not supported")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise BadRequest(f"{name}={body[name]!r}: penalties are not supported yet")


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
            stop_token_ids=tuple(body.get("stop_token_ids") or ()),
            ignore_eos=bool(body.get("ignore_eos", False)),
        )
    except ValueError as error:
        raise BadRequest(str(error).replace("max_new_tokens", "max_tokens")) from None
    options = body.get("stream_options") or {}
    salt = body.get("cache_salt") or body.get("user")
    if salt is not None and not isinstance(salt, str):
        raise BadRequest(f"cache_salt/user={salt!r} must be a string")
    return ParsedRequest(
        chat=chat, prompt=_prompt(body, chat), params=params, stream=bool(body.get("stream")),
        include_usage=bool(isinstance(options, Mapping) and options.get("include_usage")),
        salt=salt,
    )  # fmt: skip


def _finish_reason(output: RequestOutput) -> str | None:
    if output.finish_reason is None:
        return None
    return "length" if output.finish_reason is FinishReason.LENGTH else "stop"


def usage(output: RequestOutput) -> dict:
    prompt, generated = len(output.prompt_token_ids), len(output.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": output.metrics.num_reused_tokens},
    }


def _header(request: ParsedRequest, request_id: int, model: str, created: int) -> dict:
    kind = "chatcmpl" if request.chat else "cmpl"
    return {"id": f"{kind}-{request_id}", "created": created, "model": model}


def completion(request: ParsedRequest, output: RequestOutput, model: str) -> dict:
    """The response body of a finished, non-streamed request."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish_reason(output)}
    if request.chat:
        choice["message"] = {"role": "assistant", "content": output.text}
        kind = "chat.completion"
    else:
        choice["text"] = output.text
        kind = "text_completion"
    header = _header(request, output.request_id, model, int(time.time()))
    return {**header, "object": kind, "choices": [choice], "usage": usage(output)}


def chunk(request: ParsedRequest, output: RequestOutput, model: str, created: int) -> dict:
    """A stream chunk with what `output` adds (the first of a chat also gives the role)."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": _finish_reason(output)}
    if request.chat:
        choice["delta"] = {"content": output.new_text or ""}
        if len(output.token_ids) == len(output.new_token_ids):  # the first chunk
            choice["delta"]["role"] = "assistant"
        kind = "chat.completion.chunk"
    else:
        choice["text"] = output.new_text or ""
        kind = "text_completion"
    return {**_header(request, output.request_id, model, created), "object": kind,
            "choices": [choice]}  # fmt: skip


def usage_chunk(request: ParsedRequest, output: RequestOutput, model: str, created: int) -> dict:
    """The last chunk of a stream that asked for usage: no choices, the token counts."""
    kind = "chat.completion.chunk" if request.chat else "text_completion"
    return {**_header(request, output.request_id, model, created), "object": kind,
            "choices": [], "usage": usage(output)}  # fmt: skip
