"""The serving layer (no JAX): request records and sampling parameters, the two-phase scheduler,
the caches of requests on the manager, speculative planning and serving metrics.

Imports only `kvjax.cache`.
"""
