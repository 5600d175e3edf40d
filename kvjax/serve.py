"""An OpenAI-compatible HTTP server.

    python -m kvjax.serve --model smollm2 [--port 8000] [--device-mib 512] [--max-batch-size 32]

`--model` is a known model (`smollm2`), a GGUF file or a Hugging Face directory with a tokenizer.
Endpoints: `/v1/completions`, `/v1/chat/completions` (`stream=true` for server-sent events),
`/v1/models`, `/health`, `/metrics` (Prometheus). SIGTERM or Ctrl-C stops taking connections,
lets running requests finish for up to `--drain-seconds`, then cancels the rest (their
requests are aborted and their pages freed).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import jax
import jax.numpy as jnp
import uvicorn

from kvjax.engine.checkpoints import KNOWN_MODELS, load_model
from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.server.app import build_app
from kvjax.server.engine_loop import EngineLoop
from kvjax.server.metrics import ServerMetrics
from kvjax.serving.scheduler import SchedulerConfig

__all__ = ["build_engine", "build_server", "main"]

_log = logging.getLogger("uvicorn.error")  # uvicorn's configured logger: the line shows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", help=f"{sorted(KNOWN_MODELS)}, .gguf or a dir")
    p.add_argument("--served-model-name", default=None, help="default: the --model name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device-mib", type=int, default=512, help="device memory for KV pages")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: what the device holds")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-num-tokens", type=int, default=512, help="tokens per step")
    p.add_argument("--max-waiting", type=int, default=1024, help="more are answered 429")
    p.add_argument("--drain-seconds", type=float, default=30.0)
    p.add_argument("--switch-interval-ms", type=float, default=0.5, help="Python's GIL switch")
    return p.parse_args(argv)


def build_engine(args) -> Engine:
    """The engine the server runs for `args` (`parse_args`' fields)."""
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    model, tokenizer = load_model(args.model, dtype=dtype)
    if tokenizer is None:
        raise SystemExit(f"{args.model}: the server needs a tokenizer (a tokenizer.json)")
    cache = cache_config_for(model, device_bytes=args.device_mib << 20)
    scheduler = SchedulerConfig(
        max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens
    )
    return Engine(
        model, cache, scheduler, max_seq_len=args.max_seq_len, tokenizer=tokenizer,
        # Requests may ask for any: compile them ahead, so that serving never compiles.
        sampler_variants=("logprobs", "penalties", "prompt_logprobs"),
    )  # fmt: skip


def build_server(args) -> tuple[EngineLoop, object]:
    """The engine loop and the ASGI app for `args`."""
    engine = build_engine(args)
    metrics = ServerMetrics(engine)
    loop = EngineLoop(engine, max_waiting=args.max_waiting, on_finished=metrics.observe)
    name = args.served_model_name or os.path.basename(os.path.normpath(str(args.model)))
    return loop, build_app(loop, metrics, name)


class _Server(uvicorn.Server):
    """uvicorn's server, which closes the engine loop when it shuts down: after a SIGTERM
    uvicorn re-raises the signal once shut down, so a `finally` after `run()` would not run."""

    def __init__(self, config: uvicorn.Config, loop: EngineLoop, drain_seconds: float) -> None:
        super().__init__(config)
        self.engine_loop, self.drain_seconds = loop, drain_seconds

    async def shutdown(self, sockets=None) -> None:
        try:  # connections drain, then open streams are cancelled (their requests aborted)
            await super().shutdown(sockets)
        finally:
            await asyncio.to_thread(self.engine_loop.close, self.drain_seconds)
            _log.info("kvjax: the engine loop is closed and the engine shut down")


def main(argv=None) -> None:
    args = parse_args(argv)
    # The engine thread waits on the device without the GIL, then must win it back from the
    # event loop: by default after up to 5 ms (a whole decode step of a small model).
    sys.setswitchinterval(args.switch_interval_ms / 1000)
    loop, app = build_server(args)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info",
        timeout_graceful_shutdown=args.drain_seconds,
    )  # fmt: skip
    try:  # uvicorn handles SIGTERM and Ctrl-C: it stops taking connections and shuts down
        _Server(config, loop, args.drain_seconds).run()
    finally:
        loop.close(timeout=args.drain_seconds)  # idempotent


if __name__ == "__main__":
    main()
