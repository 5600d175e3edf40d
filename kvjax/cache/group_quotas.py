"""Each layer group's `CacheConfig`: its layers and its share of the quotas (see
`kvjax.cache.grouped`). Host side, no JAX."""

from __future__ import annotations

import dataclasses
import math

from kvjax.cache.checks import check_int
from kvjax.cache.config import CacheConfig
from kvjax.cache.life_cycles import LayerAttention, LayerGroups

__all__ = ["group_configs", "grouped_max_seq_len"]


def group_configs(config: CacheConfig, *, max_seq_len: int, chunk_tokens: int) -> list[CacheConfig]:
    """One `CacheConfig` per layer group of `config.layer_attention`, in group order.

    Each group's pages hold its layers only. The device (and host, disk) quota is `config`'s
    bytes, shared in proportion to what one request holds in each group: every block of
    `max_seq_len` under full attention, the sinks, the window and a `chunk_tokens` prefill
    chunk under a window.
    """
    check_int("max_seq_len", max_seq_len, minimum=1)
    check_int("chunk_tokens", chunk_tokens, minimum=1)
    tpb = config.tokens_per_block
    layers = config.layer_attention or (LayerAttention(),) * config.num_layers
    groups = LayerGroups(layers, tpb, max_seq_len)
    full_blocks = -(-max_seq_len // tpb)
    needs = []  # layer-blocks one request holds in each group
    for group, cycle in enumerate(groups.life_cycles):
        blocks = full_blocks
        if cycle.is_windowed:
            window_blocks = cycle.num_sink_blocks + -(-(cycle.window + chunk_tokens) // tpb) + 1
            blocks = min(full_blocks, window_blocks)
        needs.append(blocks * len(groups.layers_of(group)))

    def share(pages: int | None, group: int, minimum: int) -> int | None:
        """Pages of the group's size holding its share of `pages` pages of every layer."""
        if pages is None:
            return None
        layer_pages = pages * config.num_layers * needs[group] / sum(needs)
        return max(minimum, math.floor(layer_pages / len(groups.layers_of(group))))

    configs = []
    for group in range(len(groups)):
        group_layers = tuple(groups.layers[layer] for layer in groups.layers_of(group))
        windowed = any(layer.window is not None for layer in group_layers)
        configs.append(
            dataclasses.replace(
                config,
                num_layers=len(group_layers),
                layer_attention=group_layers if windowed else None,
                device_pages=share(config.num_device_pages, group, 2),
                device_bytes=None,
                host_pages=share(config.num_host_pages, group, 0),
                host_bytes=None,
                disk_pages=share(config.num_disk_pages or None, group, 1),
                disk_bytes=None,
            )
        )
    return configs


def grouped_max_seq_len(configs: list[CacheConfig], requested: int | None) -> int:
    """The longest sequence every group holds: `requested` (default: what the full-attention
    groups' devices hold), clamped to it; a windowed group holds any length."""
    limits = [
        (config.num_device_pages - 1) * config.tokens_per_block
        for config in configs
        if config.layer_attention is None
    ]
    default = min(limits or [(configs[0].num_device_pages - 1) * configs[0].tokens_per_block])
    return min([requested or default, *limits])
