"""Life cycles: what each layer's attention needs of the past, and the layer groups they form.

The reference system's `_life_cycle_registry`: every layer declares its attention window (None
for full attention) and its sink tokens (always attended, windowed layers only). Layers with the
same (window, sink blocks) share a life cycle, the *layer group* whose pages of a block are
allocated and released together. For history length h, a windowed group no longer needs the
blocks of its *stale range* (`LifeCycle.stale_range`); sink blocks and the live window never go
stale, and full attention never drops anything.

Host side: imports no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvjax.cache.checks import check_int

__all__ = ["LayerAttention", "LayerGroups", "LifeCycle", "usable_prefix", "windows_by_layer"]


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """One layer's attention: `window` tokens (the token itself included) or None for all of
    them, and `sink_tokens` first tokens always attended (they require a window).

    Raises:
        ValueError: a window below 1, negative sinks, or sinks without a window.
    """

    window: int | None = None
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        if self.window is not None:
            check_int("window", self.window, minimum=1)
        check_int("sink_tokens", self.sink_tokens, minimum=0)
        if self.sink_tokens and self.window is None:
            raise ValueError(
                f"sink_tokens={self.sink_tokens} needs a window: full attention sees every token"
            )

    def clamped(self, max_seq_len: int) -> LayerAttention:
        """The same attention for sequences of at most `max_seq_len` tokens: a window that
        covers them all is full attention (its sinks then add nothing)."""
        check_int("max_seq_len", max_seq_len, minimum=1)
        if self.window is not None and self.window >= max_seq_len:
            return LayerAttention()
        return self


@dataclasses.dataclass(frozen=True, order=True)
class LifeCycle:
    """When a layer group's page of a block stops being needed: `window` tokens (None: never)
    and the number of leading blocks holding sink tokens (never stale)."""

    window: int | None
    num_sink_blocks: int

    @property
    def is_windowed(self) -> bool:
        return self.window is not None

    def stale_range(self, history_length: int, tokens_per_block: int) -> tuple[int, int]:
        """`[start, end)`: the blocks no token at or after `history_length` attends to.

        The in-flight token at position h sees `[h + 1 - window, h]`, so blocks wholly before
        `h + 1 - window` are stale; sink blocks never are, and full attention has none.
        """
        check_int("history_length", history_length, minimum=0)
        num_blocks = -(-history_length // tokens_per_block)
        start = min(num_blocks, self.num_sink_blocks)
        if self.window is None:
            return start, start
        return start, max(start, (history_length + 1 - self.window) // tokens_per_block)

    def needed_blocks(self, history_length: int, tokens_per_block: int) -> range:
        """The blocks past the sinks that attention at `history_length` still reads."""
        _, end = self.stale_range(history_length, tokens_per_block)
        return range(end, -(-history_length // tokens_per_block))


def usable_prefix(
    pages: Sequence[object | None], num_tokens: int, life_cycle: LifeCycle, tokens_per_block: int
) -> tuple[int, int]:
    """The longest part of a match whose attention has every page it reads.

    A windowed group's tree may keep a block whose page was evicted (later blocks stay
    reusable); a match may pass through such blocks but must not end where attention still
    reads them.

    Args:
        pages: the page of each matched block (None: evicted), in order.
        num_tokens: tokens matched; the last block may be matched in part.

    Returns:
        `(num_blocks, num_tokens)` of the usable prefix: the match itself, or the longest
        shorter one ending at a block boundary.
    """
    tpb = tokens_per_block
    missing = [ordinal for ordinal, page in enumerate(pages) if page is None]
    if not missing:
        return len(pages), num_tokens
    sinks = life_cycle.num_sink_blocks
    end = num_tokens
    while end > 0:
        num_blocks = -(-end // tpb)
        _, stale_end = life_cycle.stale_range(end, tpb)
        # Needed: the sink blocks and [stale_end, num_blocks); missing blocks are sorted.
        needed = [m for m in missing if m < num_blocks and (m < sinks or m >= stale_end)]
        if not needed:
            return num_blocks, end
        end = needed[-1] * tpb  # a match ending there no longer reads the missing block...
        end = min(end, (num_blocks - 1) * tpb)  # ...and always shrinks
    return 0, 0


class LayerGroups:
    """Layers deduplicated into layer groups, one per distinct `LifeCycle` (the reference's
    `LifeCycleRegistry`). Groups are numbered in order of their first layer. Immutable: safe
    to share between threads.

    Args:
        layers: each layer's attention, in layer order.
        tokens_per_block: tokens of a block (sinks are counted in blocks: a partly filled sink
            block is a sink block).
        max_seq_len: windows that reach it are full attention.
    """

    def __init__(
        self, layers: Sequence[LayerAttention], tokens_per_block: int, max_seq_len: int
    ) -> None:
        check_int("tokens_per_block", tokens_per_block, minimum=1)
        if not layers:
            raise ValueError("a model needs at least one layer")
        for index, layer in enumerate(layers):
            if not isinstance(layer, LayerAttention):
                raise ValueError(f"layer {index}: {layer!r} is not a LayerAttention")
        self.tokens_per_block = tokens_per_block
        self.layers = tuple(layer.clamped(max_seq_len) for layer in layers)
        self.life_cycles: list[LifeCycle] = []
        self.group_of_layer: list[int] = []
        for layer in self.layers:
            sink_blocks = -(-layer.sink_tokens // tokens_per_block)
            life_cycle = LifeCycle(layer.window, sink_blocks)
            if life_cycle not in self.life_cycles:
                self.life_cycles.append(life_cycle)
            self.group_of_layer.append(self.life_cycles.index(life_cycle))

    def __len__(self) -> int:
        return len(self.life_cycles)

    def layers_of(self, group: int) -> list[int]:
        """The layers of `group`, in order."""
        return [layer for layer, g in enumerate(self.group_of_layer) if g == group]

    def stale_ranges(self, history_length: int) -> list[tuple[int, int]]:
        """Each group's stale block range at `history_length`."""
        tpb = self.tokens_per_block
        return [cycle.stale_range(history_length, tpb) for cycle in self.life_cycles]

    @property
    def page_life_cycle(self) -> LifeCycle:
        """The life cycle of a page that holds every layer of a block: stale once stale for
        every group (the widest window and the most sinks; never with a full-attention group)."""
        cycles = self.life_cycles
        if not all(cycle.is_windowed for cycle in cycles):
            return LifeCycle(None, 0)
        return LifeCycle(max(c.window for c in cycles), max(c.num_sink_blocks for c in cycles))

    @property
    def is_uniform(self) -> bool:
        """One group of full attention: today's single page layout."""
        return len(self.life_cycles) == 1 and not self.life_cycles[0].is_windowed

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{cycle.window or 'full'}/{cycle.num_sink_blocks} sink blocks: "
            f"{len(self.layers_of(g))} layers"
            for g, cycle in enumerate(self.life_cycles)
        )
        return f"LayerGroups({groups})"


def windows_by_layer(
    num_layers: int, windows: Sequence[int | None], sink_tokens: int = 0
) -> list[LayerAttention]:
    """TensorRT-LLM's `max_attention_window` convention: layer i attends with
    `windows[i % len(windows)]` (None is full attention); windowed layers keep `sink_tokens`."""
    check_int("num_layers", num_layers, minimum=1)
    if not windows:
        raise ValueError("windows must name at least one window (None for full attention)")
    return [
        LayerAttention(w, sink_tokens if w is not None else 0)
        for w in (windows[i % len(windows)] for i in range(num_layers))
    ]
