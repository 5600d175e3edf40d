"""Holding Ctrl-C back while the host updates its books, so an interrupt never lands between
two halves of one change (a cache advanced without its token appended writes that token's KV
twice on the next step).

Host side, no JAX.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["interrupts_deferred"]


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Defers SIGINT to the end of the block, then delivers it to the handler that was in place
    (a `KeyboardInterrupt` by default). Only the main thread receives signals, so elsewhere, or
    when the handler cannot be replaced, the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # e.g. an embedding that owns the signal handlers
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)
