"""The serving loop on top of every layer: the engine, step batches, the draft model and setup."""

from kvjax.engine.engine import Engine

__all__ = ["Engine"]
