"""JAX's persistent compilation cache, on by default for engines: a second process with the same
model geometry and step shapes loads its executables from disk instead of compiling them.

The directory is, in order: the one JAX is already configured with (by the user, or an earlier
engine of this process), the `KVJAX_COMPILE_CACHE` environment variable, then
`$XDG_CACHE_HOME/kvjax/xla` (default `~/.cache/kvjax/xla`). JAX keys each entry by the program,
the compiler version and the device, so a stale or foreign entry is never used.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

__all__ = ["configure_compile_cache", "default_cache_dir", "enable_persistent_cache"]


def default_cache_dir() -> Path:
    """`KVJAX_COMPILE_CACHE`, else `$XDG_CACHE_HOME/kvjax/xla` (default `~/.cache/kvjax/xla`)."""
    if os.environ.get("KVJAX_COMPILE_CACHE"):
        return Path(os.environ["KVJAX_COMPILE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvjax" / "xla"


def enable_persistent_cache(path: str | os.PathLike, *, min_compile_seconds: float = 0.0) -> None:
    """Keeps compiled executables in `path` across processes (every one that took at least
    `min_compile_seconds` to compile)."""
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)


def configure_compile_cache(setting: bool | str | os.PathLike) -> str | None:
    """Applies an engine's `compile_cache` option; returns the directory in use, or None.

    Args:
        setting: True: the directory JAX already uses, else `default_cache_dir()`; a path:
            that directory; False: leave JAX's configuration as it is.
    """
    if setting is False:
        return jax.config.jax_compilation_cache_dir
    if setting is True:
        configured = jax.config.jax_compilation_cache_dir
        if configured:
            return configured
        setting = default_cache_dir()
    elif not isinstance(setting, str | os.PathLike):
        raise ValueError(f"compile_cache={setting!r} must be True, False or a directory")
    try:
        Path(setting).mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. a read-only home: serve anyway, compiling every time
        warnings.warn(
            f"no compilation cache: cannot create {setting} ({error}); set KVJAX_COMPILE_CACHE "
            "or pass compile_cache=<a writable directory>",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    enable_persistent_cache(setting)
    return str(setting)
