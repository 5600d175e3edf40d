"""Streaming detokenization: the text each new batch of tokens adds, never a broken UTF-8
character, cut before the first stop string and never streaming half of one."""

from collections.abc import Iterable

from kvjax.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

REPLACEMENT_CHAR = "\ufffd"  # what decoding an incomplete UTF-8 byte sequence ends with


class IncrementalDetokenizer:
    """The text of one generated sequence, delivered piece by piece as tokens arrive.

    Decodes a short window of recent tokens (the prefix/read-offset method): the window
    `ids[prefix_offset:read_offset]` was already emitted, and what `ids[prefix_offset:]` decodes to
    beyond it is new, emitted once it does not end in a broken character. The emitted pieces
    join to `tokenizer.decode(ids)` whenever the ids end on a complete character. A trailing piece
    that could begin a stop string is held back until it proves to be one (the text is cut before
    it and `stopped` names it) or not (it is released).

    One per sequence and not thread-safe: a single caller feeds it (the engine, under its step
    lock). Its tokenizer may be shared.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True, stop: Iterable[str] = ()
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = _validated_stops(stop)
        self._longest_stop = max((len(stop) for stop in self._stops), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._held = ""  # decoded but not emitted: it may begin a stop string
        self._text = ""
        self._stopped: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far (cut before the stop string once one matched)."""
        return self._text

    @property
    def stopped(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._stopped

    def add(self, token_ids: Iterable[int]) -> str:
        """Appends generated tokens; returns the text they complete ("" once stopped)."""
        if self._stopped is not None:
            return ""
        self._ids.extend(token_ids)
        return self._emit(self._decode_new_text(final=False), final=False)

    def finish(self) -> str:
        """Flushes what was held back (a stop-string prefix, a trailing incomplete character as
        decoded) when the request ends; returns it."""
        if self._stopped is not None:
            return ""
        return self._emit(self._decode_new_text(final=True), final=True)

    def _decode_new_text(self, *, final: bool) -> str:
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(emitted) or (window.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, new_text: str, *, final: bool) -> str:
        if not self._stops:  # nothing to hold back or search (the common case)
            self._text += new_text
            return new_text
        # Text emitted earlier cannot hold the start of a stop string: the longest such tail is
        # always held back, so searching the held text and the new text is enough.
        pending, self._held = self._held + new_text, ""
        match = self._earliest_stop(pending)
        if match is not None:
            start, self._stopped = match
            piece = pending[:start]
        elif final:
            piece = pending
        else:
            keep = self._stop_prefix_length(pending)
            piece, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self._text += piece
        return piece

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        found = [(text.find(stop), order, stop) for order, stop in enumerate(self._stops)]
        found = [f for f in found if f[0] >= 0]
        if not found:
            return None
        start, _, stop = min(found)
        return start, stop

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-length:]
            if any(len(stop) > length and stop.startswith(tail) for stop in self._stops):
                return length
        return 0


def _validated_stops(stop: Iterable[str]) -> tuple[str, ...]:
    if isinstance(stop, str):
        raise ValueError(f"stop must be a list of strings, not the string {stop!r}")
    stops = tuple(stop)
    for value in stops:
        if not isinstance(value, str) or not value:
            raise ValueError(f"stop strings must be non-empty str, got {value!r}")
    return stops
