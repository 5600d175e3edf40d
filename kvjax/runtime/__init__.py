"""The device runtime (JAX): the storage arrays and their page moves, page tables, step buckets and
the step registry, sharding over a mesh, and sampling.

Imports `kernels` and the vocabulary of `kvjax.cache` (tiers, page moves); never the serving layer.
"""
