"""Shared pieces of the kernels: backend choice, Triton compiler parameters, input checks.

Imports nothing of kvjax: page 0 of a pool is the null page by convention (`NULL_PAGE` there).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pl_triton

from kernels.kv_quant import FP8_DTYPES, SCALE_DTYPE, split_pool

NULL_PAGE = 0  # the pool's scratch page: padding rows read and write only here
IMPLS = ("pallas", "xla")


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means interpret mode on CPU (the only way Pallas GPU kernels run there)."""
    return jax.default_backend() == "cpu" if interpret is None else interpret


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
    return impl


def compiler_params(num_warps: int = 4, num_stages: int = 2) -> pl_triton.CompilerParams:
    """Explicit Triton parameters: they also select the Triton lowering over Mosaic GPU."""
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_pool(kv_pool, *, layer: int | None = None) -> tuple[int, ...]:
    """`kv_pool[num_pages, num_layers, 2, num_kv_heads, tokens_per_block, head_dim]` (an array,
    or a `kv_quant.QuantizedPool` of fp8 values and their scales); returns the shape. Triton
    tiles need power-of-two tokens per block and head dims."""
    values, scales = split_pool(kv_pool)
    if values.ndim != 6 or values.shape[2] != 2:
        raise ValueError(
            f"kv_pool {list(values.shape)} must be [pages, layers, 2, kv_heads, tokens, head_dim]"
        )
    if scales is None and values.dtype.itemsize not in (2, 4):
        raise ValueError(
            f"kv_pool dtype {values.dtype} must be float32, float16 or bfloat16 (fp8 pages come "
            "as a QuantizedPool with their scales)"
        )
    if scales is not None:
        if kv_pool.dtype not in FP8_DTYPES or values.dtype != jnp.uint8:
            raise ValueError(
                f"QuantizedPool values {values.dtype} of format {kv_pool.format} must be the "
                "uint8 bits of float8_e4m3fn or float8_e5m2"
            )
        if scales.shape != values.shape[:-1] or scales.dtype != SCALE_DTYPE:
            raise ValueError(
                f"QuantizedPool scales {scales.dtype}{list(scales.shape)} must be bfloat16"
                f"{list(values.shape[:-1])}"
            )
    _, num_layers, _, _, tokens_per_block, head_dim = values.shape
    if not is_power_of_two(tokens_per_block) or not is_power_of_two(head_dim):
        raise ValueError(
            f"tokens_per_block={tokens_per_block} and head_dim={head_dim} must be powers of two"
        )
    if layer is not None and not 0 <= layer < num_layers:
        raise ValueError(f"layer={layer} is outside [0, {num_layers})")
    return values.shape


def check_triton_offsets(kv_pool) -> None:
    """For the Pallas path: a pool Triton can index (`check_byte_array_size` of 1-byte values)."""
    values, _ = split_pool(kv_pool)
    if values.dtype.itemsize == 1:
        check_byte_array_size("the fp8 pool's values", values.shape)


def check_byte_array_size(name: str, shape) -> None:
    """Triton indexes an array with 32-bit signed offsets unless it exceeds 2**32 bytes: a
    1-byte array of (2**31, 2**32] bytes would overflow them."""
    size = math.prod(shape)
    if 2**31 < size <= 2**32:
        raise ValueError(
            f"{name} of {size} bytes: a 1-byte array between 2 GiB and 4 GiB overflows Triton's "
            "32-bit offsets; size the pool at most 2 GiB or over 4 GiB"
        )


def check_window(window: int | None, sink_tokens: int) -> None:
    """A static attention window (None: full attention) and its sink tokens."""
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be an int >= 1, or None for full attention")
    if not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens={sink_tokens!r} must be an int >= 0")
    if sink_tokens and window is None:
        raise ValueError(f"sink_tokens={sink_tokens} needs a window")


def in_window(key_positions, query_positions, window: int | None, sink_tokens: int):
    """bool[queries, keys]: causal, and within the query's `window` (the query itself
    included) or among the first `sink_tokens` keys."""
    causal = key_positions[None, :] <= query_positions[:, None]
    if window is None:
        return causal
    recent = key_positions[None, :] > query_positions[:, None] - window
    return causal & (recent | (key_positions[None, :] < sink_tokens))


def check_int32(name: str, array: jax.Array, ndim: int) -> None:
    if array.ndim != ndim or array.dtype != jnp.int32:
        raise ValueError(f"{name} {array.dtype}{list(array.shape)} must be int32 with {ndim} dims")


def num_valid_array(num_valid) -> jax.Array:
    """The live count as int32[1] (a device value: changing it never recompiles)."""
    return jnp.asarray(num_valid, jnp.int32).reshape(1)


def check_soft_cap(soft_cap: float | None) -> None:
    """None turns the cap off; 0 would silently flatten every score (0 * tanh(x / 0))."""
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap={soft_cap} must be > 0, or None for no cap")
