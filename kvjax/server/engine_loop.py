"""One background thread steps the engine; asyncio tasks await their request's progress.

The HTTP side never calls `Engine.step()`: it submits a request with an id it chose (so that its
listener is in place before the first step can report), then awaits the outputs the loop thread
hands over with `call_soon_threadsafe` (once per step and listener). A consumer that falls
behind gets the outputs that piled up merged into one (their deltas joined), so a busy server
sends fewer, larger stream chunks instead of falling further behind. A task that stops listening
(a client gone) aborts its request, which frees its pages at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from kvjax.engine.engine import Engine
from kvjax.serving.request import RequestOutput, SamplingParams

__all__ = ["EngineLoop", "Overloaded"]

_log = logging.getLogger(__name__)


def _put(listener: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> None:
    loop, queue = listener
    with contextlib.suppress(RuntimeError):  # its event loop closed: nobody waits any more
        loop.call_soon_threadsafe(queue.put_nowait, item)


class Overloaded(RuntimeError):
    """More requests wait than the server accepts (HTTP 429)."""


class EngineLoop:
    """Drives `engine` from a thread of its own.

    Thread safety: `generate` from any event loop (several at once), `close` and `num_waiting`
    from any thread; nothing else may step the engine.

    Args:
        max_waiting: requests this loop serves at once at most; one more raises `Overloaded`.
        on_finished: called in the loop thread with each finished output (metrics).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_waiting: int = 1024,
        on_finished: Callable[[RequestOutput], Any] | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._on_finished = on_finished
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._closing = False  # new requests are refused
        self._stopped = False  # the thread ends
        self._thread = threading.Thread(target=self._run, name="kvjax-engine", daemon=True)
        self._thread.start()

    @property
    def num_waiting(self) -> int:
        return self.engine.num_unfinished

    @property
    def alive(self) -> bool:
        """The loop thread runs (a server whose loop died should fail its health check)."""
        return self._thread.is_alive() and not self._stopped

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.num_unfinished:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # no request can progress: each listener learns why
                _log.exception("an engine step failed; aborting the requests being served")
                self._fail_all(error)
                continue
            try:
                self._deliver(outputs)
            except Exception:  # one listener's trouble must not stop the loop
                _log.exception("delivering a step's outputs failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hands each listener its outputs of this step, in one call per listener."""
        batches: dict[int, tuple[tuple, list]] = {}
        with self._lock:
            for output in outputs:
                listener = self._listeners.get(output.request_id)
                if listener is not None:
                    batches.setdefault(id(listener[1]), (listener, []))[1].append(output)
        for listener, batch in batches.values():
            _put(listener, batch)
        if self._on_finished is not None:
            for output in outputs:
                if output.finished:
                    try:
                        self._on_finished(output)
                    except Exception:
                        _log.exception("observing request %d failed", output.request_id)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            listeners = list(self._listeners.items())
        for request_id, listener in listeners:
            self._abort([request_id])
            _put(listener, error)

    async def generate(
        self, prompt, params: SamplingParams, n: int = 1, **request_options
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Submits `n` samples of a request (`Engine.add_samples`) and yields (sample index,
        output) as they progress (with `stream=True` in `request_options`; else only their
        ends), until every sample finished. Leaving early (the consumer cancelled or closed)
        aborts the samples still running.

        Raises:
            Overloaded: `max_waiting` requests already wait.
            ValueError: a bad request (nothing is queued).
            RuntimeError: the engine failed while serving it.
        """
        with self._lock:  # consecutive: a response's id is its first sample's
            ids = [next(self._ids) for _ in range(n)]
        queue = self._listen(ids)
        # The prompt is tokenized in a worker thread, off the event loop. A cancel while it
        # runs waits for it, so that the abort below finds the requests it submitted.
        submit = asyncio.ensure_future(asyncio.to_thread(
            self.engine.add_samples, prompt, params, n, request_ids=ids, **request_options
        ))  # fmt: skip
        unfinished = set(ids)
        try:
            await asyncio.shield(submit)
            self._wake.set()
            while unfinished:
                for output in _merged(await _take_all(queue)):
                    if output.finished:
                        unfinished.discard(output.request_id)
                    yield output.request_id - ids[0], output  # consecutive ids
        finally:
            with self._lock:
                for request_id in ids:
                    self._listeners.pop(request_id, None)
            if unfinished:
                with contextlib.suppress(BaseException):
                    await submit
                await asyncio.shield(asyncio.to_thread(self._abort, unfinished))

    def _listen(self, request_ids: list[int]) -> asyncio.Queue:
        """One queue for the outputs of a request's samples, registered before they are
        submitted (so that no output can come first); raises when the server is closing, dead
        or full (`max_waiting` counts samples)."""
        if self._closing or not self._thread.is_alive():
            raise RuntimeError("the server is shutting down or its engine loop stopped")
        queue: asyncio.Queue = asyncio.Queue()
        listener = (asyncio.get_running_loop(), queue)
        with self._lock:  # the count and the registration together: the bound is exact
            if len(self._listeners) + len(request_ids) > self.max_waiting:
                extra = f" (and n={len(request_ids)} asked)" if len(request_ids) > 1 else ""
                raise Overloaded(
                    f"{len(self._listeners)} requests wait (max {self.max_waiting}){extra}"
                )
            self._listeners.update(dict.fromkeys(request_ids, listener))
        return queue

    def _abort(self, request_ids) -> None:
        for request_id in request_ids:
            with contextlib.suppress(ValueError):  # never queued (refused), or finished
                self.engine.abort(request_id)

    def close(self, timeout: float = 30.0) -> None:
        """Refuses new requests, lets running ones finish for up to `timeout` seconds, aborts
        the rest (their listeners get an error), stops the thread and shuts the engine down."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while self.engine.num_unfinished and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopped = True
        self._wake.set()
        self._thread.join()
        self._fail_all(RuntimeError("the server shut down"))
        self.engine.shutdown()


async def _take_all(queue: asyncio.Queue) -> list[RequestOutput]:
    """Every output waiting in `queue` (at least one; waits for it); raises an engine failure."""
    items = [await queue.get()]
    while not queue.empty():
        items.append(queue.get_nowait())
    outputs = []
    for item in items:
        if isinstance(item, Exception):
            raise RuntimeError(f"the engine failed: {item}") from item
        outputs += item
    return outputs


def _merged(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """One output per request: its latest, carrying the deltas of all (in first-seen order)."""
    latest: dict[int, RequestOutput] = {}
    for output in outputs:
        earlier = latest.get(output.request_id)
        if earlier is not None:
            output = dataclasses.replace(
                output,
                new_token_ids=earlier.new_token_ids + output.new_token_ids,
                new_text=None
                if output.new_text is None
                else (earlier.new_text or "") + output.new_text,
                new_logprobs=earlier.new_logprobs + output.new_logprobs,
            )
        latest[output.request_id] = output
    return list(latest.values())
