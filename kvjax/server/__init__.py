"""The OpenAI-compatible server: request parsing and responses (protocol), the engine driven by
one background thread (engine_loop), Prometheus metrics, and the Starlette app (app).
`python -m kvjax.serve` runs it."""
