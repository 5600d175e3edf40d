"""OpenAI's response bodies and stream chunks, as plain dicts, from the engine's outputs: one
choice per parallel sample, log-probabilities in the completions or the chat API's layout.
No HTTP here (`kvjax.server.app` serves it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kvjax.server.protocol import ParsedRequest
from kvjax.serving.request import FinishReason, RequestOutput
from kvjax.serving.sampling_params import TokenLogprob
from kvjax.text.tokenizer import Tokenizer

__all__ = ["chunk", "completion", "usage_chunk"]

_LOWEST_LOGPROB = -9999.0  # JSON has no -inf; what a float32 underflow becomes (as vLLM does)


def _finish_reason(output: RequestOutput) -> str | None:
    if output.finish_reason is None:
        return None
    return "length" if output.finish_reason is FinishReason.LENGTH else "stop"


def usage(outputs: Sequence[RequestOutput]) -> dict:
    """Token counts of a request's samples: the prompt once, every sample's completion."""
    prompt = len(outputs[0].prompt_token_ids)
    generated = sum(len(output.token_ids) for output in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": outputs[0].metrics.num_reused_tokens},
    }


def _header(request: ParsedRequest, request_id: int, model: str, created: int) -> dict:
    kind = "chatcmpl" if request.chat else "cmpl"
    return {"id": f"{kind}-{request_id}", "created": created, "model": model}


def _logprob(value: float) -> float:
    return max(value, _LOWEST_LOGPROB)


def _token_string(tokenizer: Tokenizer, token_id: int, data: bytes | None = None) -> str:
    """A token's text (`data`: its bytes, if known); a token holding part of a character is
    shown by its bytes, as OpenAI does ("bytes:\\xe6\\x97"), so that distinct tokens never
    share a string."""
    data = tokenizer.token_bytes(token_id) if data is None else data
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def _chat_logprobs(entries: Sequence[TokenLogprob], tokenizer: Tokenizer) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        data = tokenizer.token_bytes(token_id)
        return {
            "token": _token_string(tokenizer, token_id, data),
            "logprob": _logprob(logprob),
            "bytes": list(data),
        }

    content = [
        {**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
        for e in entries
    ]
    return {"content": content}


def _completion_logprobs(entries: Sequence[TokenLogprob], tokenizer: Tokenizer, offset: int):
    """The completions API's layout; `text_offset` counts characters of the token strings."""
    tokens = [_token_string(tokenizer, e.token_id) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(e.logprob) for e in entries],
        "top_logprobs": [
            {_token_string(tokenizer, t): _logprob(lp) for t, lp in e.top} for e in entries
        ],
        "text_offset": offsets,
    }


def prompt_logprobs(request: ParsedRequest, output: RequestOutput, tokenizer: Tokenizer):
    """vLLM's layout of the prompt's log-probabilities: per prompt token None (the first) or
    {token id: {logprob, decoded_token}} for the token and its alternatives."""
    if request.params.prompt_logprobs is None or output.prompt_logprobs is None:
        return None

    def scored(entry: TokenLogprob) -> dict:
        pairs = [(entry.token_id, entry.logprob), *entry.top]
        return {
            str(token): {"logprob": _logprob(lp), "decoded_token": tokenizer.token_text(token)}
            for token, lp in pairs
        }

    return [None if entry is None else scored(entry) for entry in output.prompt_logprobs]


def _choice_logprobs(request: ParsedRequest, entries, tokenizer: Tokenizer, offset: int = 0):
    if request.params.logprobs is None:
        return None
    if request.chat:
        return _chat_logprobs(entries, tokenizer)
    return _completion_logprobs(entries, tokenizer, offset)


def completion(
    request: ParsedRequest, outputs: Sequence[RequestOutput], model: str, tokenizer: Tokenizer
) -> dict:
    """The response body of a finished, non-streamed request (its samples in index order)."""
    choices = []
    for index, output in enumerate(outputs):  # the first sample scored the prompt for all
        choice: dict[str, Any] = {
            "index": index,
            "logprobs": _choice_logprobs(request, output.logprobs, tokenizer),
            "finish_reason": _finish_reason(output),
        }
        if request.chat:
            choice["message"] = {"role": "assistant", "content": output.text}
        else:
            choice["text"] = output.text
            choice["prompt_logprobs"] = prompt_logprobs(request, outputs[0], tokenizer)
        choices.append(choice)
    kind = "chat.completion" if request.chat else "text_completion"
    header = _header(request, outputs[0].request_id, model, int(time.time()))
    body = {**header, "object": kind, "choices": choices, "usage": usage(outputs)}
    if request.chat:  # vLLM gives the chat API's at the top
        body["prompt_logprobs"] = prompt_logprobs(request, outputs[0], tokenizer)
    return body


def chunk(
    request: ParsedRequest,
    index: int,
    output: RequestOutput,
    model: str,
    created: int,
    tokenizer: Tokenizer,
    first_id: int,
    offset: int = 0,
) -> dict:
    """A stream chunk with what `output` (sample `index` of the request whose first sample is
    `first_id`) adds; a sample's first chat chunk also gives the role. `offset`: characters of
    the sample's token strings in its earlier chunks (the completions API's `text_offset`)."""
    logprobs = _choice_logprobs(request, output.new_logprobs, tokenizer, offset)
    choice: dict[str, Any] = {
        "index": index,
        "logprobs": logprobs,
        "finish_reason": _finish_reason(output),
    }
    if request.chat:
        choice["delta"] = {"content": output.new_text or ""}
        if len(output.token_ids) == len(output.new_token_ids):  # the sample's first chunk
            choice["delta"]["role"] = "assistant"
        kind = "chat.completion.chunk"
    else:
        choice["text"] = output.new_text or ""
        kind = "text_completion"
    if len(output.token_ids) == len(output.new_token_ids) and index == 0:  # the first chunk
        choice["prompt_logprobs"] = prompt_logprobs(request, output, tokenizer)
    return {**_header(request, first_id, model, created), "object": kind, "choices": [choice]}


def usage_chunk(
    request: ParsedRequest, outputs: Sequence[RequestOutput], model: str, created: int
) -> dict:
    """The last chunk of a stream that asked for usage: no choices, the token counts."""
    kind = "chat.completion.chunk" if request.chat else "text_completion"
    return {**_header(request, outputs[0].request_id, model, created), "object": kind,
            "choices": [], "usage": usage(outputs)}  # fmt: skip
