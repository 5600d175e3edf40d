"""The serving loop on top of every layer: preflight checks, assembly and compilation, step
batches, the engine and the draft model."""

from kvjax.engine.engine import Engine

__all__ = ["Engine"]
