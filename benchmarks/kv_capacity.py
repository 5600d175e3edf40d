"""What a KV dtype buys under a fixed byte quota: page bytes (fp8 scales included), the pages a
quota holds, the pages a request of the served workload needs, and how many such requests fit,
for the run's dtype against bfloat16. `benchmarks.serve --kv-dtype` reports it."""

from __future__ import annotations

import numpy as np

from kvjax.engine.geometry import cache_config_for

__all__ = ["KV_DTYPE_NAMES", "fixed_quota_bytes", "kv_capacity", "report_capacity"]

# --kv-dtype names: "model" keeps the model's dtype (and a quota in pages).
KV_DTYPE_NAMES = {
    "fp8": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}


def fixed_quota_bytes(model, tokens_per_block: int, device_pages: int, device_mib) -> int:
    """The device quota every KV dtype is compared under: `device_mib`, or else the bytes of
    `device_pages` bfloat16 pages."""
    if device_mib is not None:
        return int(device_mib * 2**20)
    bf16 = cache_config_for(model, tokens_per_block=tokens_per_block, dtype="bfloat16",
                            device_pages=device_pages)  # fmt: skip
    return device_pages * bf16.page_bytes


def kv_capacity(model, tokens_per_block: int, kv_dtype: str, quota_bytes: int, sequences):
    """Pages per request (the KV each served sequence wrote, in blocks) and, for `kv_dtype` and
    bfloat16, the page bytes, usable pages and requests of that mean size the quota holds."""
    pages = [-(-len(sequence) // tokens_per_block) for sequence in sequences]
    mean_pages = float(np.mean(pages))
    result = {"quota_bytes": quota_bytes, "pages_per_request": mean_pages, "dtypes": {}}
    for name in dict.fromkeys((kv_dtype, "bfloat16")):
        config = cache_config_for(model, tokens_per_block=tokens_per_block, dtype=name,
                                  device_bytes=quota_bytes)  # fmt: skip
        usable = config.num_device_pages - 1  # NULL_PAGE
        result["dtypes"][name] = {
            "page_bytes": config.page_bytes,
            "pages": usable,
            "tokens": usable * tokens_per_block,
            "requests_that_fit": int(usable // mean_pages),
        }
    dtypes = result["dtypes"]
    result["tokens_vs_bf16"] = dtypes[kv_dtype]["tokens"] / dtypes["bfloat16"]["tokens"]
    return result


def report_capacity(capacity: dict) -> None:
    quota = capacity["quota_bytes"] / 2**20
    print(f"KV under {quota:.1f} MiB  {capacity['pages_per_request']:.1f} pages per request")
    for name, row in capacity["dtypes"].items():
        print(f"  {name:14s} {row['page_bytes']:7d} B/page  {row['pages']:6d} pages  "
              f"{row['tokens']:7d} tokens  {row['requests_that_fit']:5d} requests fit")  # fmt: skip
    print(f"  tokens per quota vs bfloat16: {capacity['tokens_vs_bf16']:.3f}x")
