"""The HTTP side of the OpenAI-compatible server (Starlette, async): `/v1/completions`,
`/v1/chat/completions` (both streamed as server-sent events with `stream=true`), `/v1/models`,
`/health` and `/metrics`. The engine runs in `EngineLoop`'s thread; handlers only await it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvjax.server.engine_loop import EngineLoop, Overloaded
from kvjax.server.metrics import ServerMetrics
from kvjax.server.protocol import BadRequest, ParsedRequest, parse_request
from kvjax.server.responses import chunk, completion, usage_chunk

__all__ = ["build_app"]


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status)


class _Handlers:
    """The endpoints, over one engine loop."""

    def __init__(self, loop: EngineLoop, metrics: ServerMetrics, model_name: str) -> None:
        self.loop, self.metrics, self.model_name = loop, metrics, model_name
        self.tokenizer = loop.engine.tokenizer

    async def _parse(self, request: Request, chat: bool) -> ParsedRequest:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(f"the body is not JSON: {error}") from None
        if isinstance(body, dict) and body.get("model") not in (None, self.model_name):
            raise BadRequest(
                f"model={body['model']!r} is unknown; this server has {self.model_name!r}"
            )
        max_seq_len = self.loop.engine.manager.max_seq_len
        return parse_request(body, chat=chat, max_seq_len=max_seq_len)

    async def _serve(self, request: Request, chat: bool) -> Response:
        try:
            parsed = await self._parse(request, chat)
            outputs = self.loop.generate(
                parsed.prompt, parsed.params, parsed.n, salt=parsed.salt, stream=parsed.stream
            )
            # Until a stream starts, only a watcher notices a client leaving: it cancels the
            # wait, and `outputs` aborts the request.
            wait = anext(outputs) if parsed.stream else _finals(outputs, parsed.n)
            result = await _unless_disconnected(request, wait)
        except (BadRequest, ValueError, OverflowError) as error:
            return _error(400, str(error), "invalid_request_error")
        except Overloaded as error:
            return _error(429, str(error), "overloaded")
        except RuntimeError as error:
            return _error(503, str(error), "unavailable")
        if result is None:  # the client left
            return Response(status_code=499)
        answered = [result[1]] if parsed.stream else result  # the first output, or every final
        error = next((output.error for output in answered if output.error), None)
        if error is not None:  # it failed inside a step (the others ran on)
            if parsed.stream:
                await outputs.aclose()  # its other samples are aborted
            return _error(500, error, "server_error")
        if parsed.stream:
            events = _events(parsed, result, outputs, self.model_name, self.tokenizer)
            return StreamingResponse(events, media_type="text/event-stream")
        return JSONResponse(completion(parsed, result, self.model_name, self.tokenizer))

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    async def models(self, _: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "kvjax"}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, _: Request) -> Response:
        return Response(status_code=200 if self.loop.alive else 503)

    async def prometheus(self, _: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def build_app(loop: EngineLoop, metrics: ServerMetrics, model_name: str) -> Starlette:
    """The ASGI app serving `loop`'s engine as `model_name`."""
    handlers = _Handlers(loop, metrics, model_name)
    routes = [
        Route("/v1/completions", handlers.completions, methods=["POST"]),
        Route("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
        Route("/v1/models", handlers.models),
        Route("/health", handlers.health),
        Route("/metrics", handlers.prometheus),
    ]
    return Starlette(routes=routes)


async def _finals(outputs, n: int) -> list:
    """Each sample's finished output, in sample order."""
    finals = [None] * n
    async for index, output in outputs:
        if output.finished:
            finals[index] = output
    return finals


async def _unless_disconnected(request: Request, wait):
    """The result of `wait`, or None when the client disconnects first (`wait` cancelled)."""
    task = asyncio.ensure_future(wait)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if not done and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return task.result()


async def _events(parsed: ParsedRequest, first, outputs, model: str, tokenizer):
    """Server-sent events: a chunk per output of each sample, the usage chunk if asked, then
    `[DONE]`; an error event instead when a sample fails. A client that goes away cancels this
    generator, whose `outputs` then aborts the samples still running."""
    created = int(time.time())
    finals = [None] * parsed.n
    offsets = [0] * parsed.n  # characters of each sample's token strings sent so far
    first_id = first[1].request_id - first[0]  # samples have consecutive ids

    def event(index, output) -> str:
        if output.finished:
            finals[index] = output
        body = chunk(parsed, index, output, model, created, tokenizer, first_id, offsets[index])
        logprobs = body["choices"][0]["logprobs"]
        if logprobs is not None and "tokens" in logprobs:
            offsets[index] += sum(map(len, logprobs["tokens"]))
        return _event(body)

    try:
        yield event(*first)
        async for index, output in outputs:
            if output.error is not None:
                raise RuntimeError(output.error)
            yield event(index, output)
    except RuntimeError as error:  # the request or the engine failed mid-stream
        yield _event({"error": {"message": str(error), "type": "server_error", "code": 500}})
        return
    finally:
        await outputs.aclose()
    if parsed.include_usage:
        yield _event(usage_chunk(parsed, finals, model, created))
    yield "data: [DONE]\n\n"


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
