"""The device runtime (JAX): the storage arrays and their page moves, page tables, step buckets and
the step registry, sharding over a mesh, and sampling.

Imports `kernels` and `kvjax.cache` (its configuration, tiers and page moves); never the serving
layer.
"""
