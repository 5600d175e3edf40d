"""The engine's requests: new ones wait in a pending queue until the stepping thread admits them
at the start of a step, so that requests can be added from any thread while another steps.

Host side, no JAX.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kvjax.serving.intake import RequestIntake
from kvjax.serving.request import Request, RequestOutput

__all__ = ["RequestQueue"]


class _Taken:
    """The request ids in use, pending or live (what the door refuses to give twice)."""

    def __init__(self, *groups: dict[int, Request]) -> None:
        self._groups = groups

    def __contains__(self, request_id: object) -> bool:
        return any(request_id in group for group in self._groups)


class RequestQueue:
    """Pending and live requests, and finished outputs not yet returned.

    Thread safety: `submit`, `withdraw` of a pending request, `close` and `len()` are safe from
    any thread. `admit`, `finish`, `withdraw` of a live request and the finished outputs belong
    to the stepping thread (the engine serializes them with its step lock).

    Args:
        intake: checks and makes each request's record (called under the queue's lock).
    """

    def __init__(self, intake: RequestIntake) -> None:
        self._intake = intake
        self._lock = threading.Lock()
        self._pending: dict[int, Request] = {}  # submitted, not yet seen by a step
        self._live: dict[int, Request] = {}  # admitted, in arrival order
        self._unreturned: list[RequestOutput] = []  # finished, not yet handed to the caller
        self.closed = False

    def submit(self, *args, **options) -> int:
        """Checks and queues a request (`RequestIntake.make_request` arguments); returns its id.

        Raises:
            RuntimeError: the queue is closed (the engine shut down).
            ValueError: a bad request; nothing is queued.
        """
        with self._lock:
            if self.closed:
                raise RuntimeError("add_request() after shutdown(): this engine serves no more")
            taken = _Taken(self._pending, self._live)
            request = self._intake.make_request(*args, live=taken, **options)
            self._pending[request.request_id] = request
        return request.request_id

    def admit(self) -> list[Request]:
        """Pending requests become live; returns every live request, oldest first."""
        with self._lock:
            self._live.update(self._pending)
            self._pending.clear()
            return list(self._live.values())

    def withdraw(self, request_id: int) -> tuple[Request, bool]:
        """Takes a request out of the queue: (its record, whether it was live).

        Raises:
            ValueError: no pending or live request has this id.
        """
        with self._lock:
            request = self._pending.pop(request_id, None)
            if request is not None:
                return request, False
            request = self._live.pop(request_id, None)
        if request is None:
            raise ValueError(f"request_id={request_id!r} is not live")
        return request, True

    def finish(self, request: Request, output: RequestOutput) -> None:
        """A live request finished: its output waits in `take_finished` until returned."""
        with self._lock:
            del self._live[request.request_id]
        self._unreturned.append(output)

    def report(self, requests: Sequence[Request]) -> None:
        """Progress of streamed requests still running: returned by the next take."""
        self._unreturned += [r.output() for r in requests if r.stream and r.has_news]

    def put_back(self, outputs: Sequence[RequestOutput]) -> None:
        """Outputs taken but not for the taker (e.g. `generate`): returned by the next take."""
        self._unreturned[:0] = outputs

    def take_finished(self) -> list[RequestOutput]:
        """The outputs not returned yet (finished requests', and streamed requests' progress),
        in the order they came."""
        outputs, self._unreturned = self._unreturned, []
        return outputs

    def live(self) -> list[Request]:
        """The admitted requests, oldest first (a snapshot, for checks)."""
        with self._lock:
            return list(self._live.values())

    def counts(self) -> tuple[int, int]:
        """(running, waiting): live requests holding device pages, and the rest (queued, not
        started yet, or suspended)."""
        with self._lock:
            running = sum(
                1 for r in self._live.values() if r.cache is not None and r.cache.is_active
            )
            return running, len(self._pending) + len(self._live) - running

    def live_ids(self) -> list[int]:
        with self._lock:
            return [*self._live, *self._pending]

    def close(self) -> None:
        """Refuses later submissions."""
        with self._lock:
            self.closed = True

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._live)
