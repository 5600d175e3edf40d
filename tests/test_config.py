import numpy as np
import pytest

from kvjax.cache import CacheConfig

GEOMETRY = dict(num_layers=2, num_kv_heads=4, head_dim=8, tokens_per_block=16, dtype="bfloat16")
PAGE_BYTES = 2 * 2 * 4 * 16 * 8 * 2  # layers * (K, V) * heads * tokens * head_dim * bytes


def test_page_geometry_and_byte_quotas():
    config = CacheConfig(**GEOMETRY, device_bytes=10 * PAGE_BYTES + 7, host_bytes=3 * PAGE_BYTES)
    assert config.dtype == np.dtype("bfloat16")
    assert config.page_shape == (2, 2, 4, 16, 8)
    assert config.page_bytes == PAGE_BYTES
    assert config.num_device_pages == 10
    assert config.num_host_pages == 3
    assert config.num_disk_pages == 0


def test_page_quotas_and_defaults():
    config = CacheConfig(**GEOMETRY, device_pages=5)
    assert config.num_device_pages == 5
    assert config.num_host_pages is None  # provision automatically
    assert config.enable_partial_reuse is True
    assert config.max_util_for_resume == 0.97
    assert CacheConfig(**GEOMETRY, device_pages=5, host_pages=0).num_host_pages == 0


def test_dtype_given_as_dtype_object():
    config = CacheConfig(**{**GEOMETRY, "dtype": np.float16}, device_pages=4)
    assert config.dtype == np.dtype("float16")
    assert config.page_bytes == PAGE_BYTES


def test_auto_host_pages_is_min_of_device_quota_and_half_free_memory():
    config = CacheConfig(**GEOMETRY, device_pages=100)
    assert config.auto_host_pages(available_host_bytes=10**12) == 100
    assert config.auto_host_pages(available_host_bytes=20 * PAGE_BYTES + 1) == 10
    assert config.auto_host_pages(available_host_bytes=0) == 0


def test_disk_tier(tmp_path):
    config = CacheConfig(**GEOMETRY, device_pages=4, disk_dir=tmp_path, disk_bytes=5 * PAGE_BYTES)
    assert config.disk_dir == tmp_path
    assert config.num_disk_pages == 5


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(num_layers=0), "num_layers"),
        (dict(num_kv_heads=-1), "num_kv_heads"),
        (dict(head_dim=2.0), "head_dim"),
        (dict(tokens_per_block=12), "tokens_per_block"),
        (dict(tokens_per_block=True), "tokens_per_block"),
        (dict(dtype="int8"), "dtype"),
        (dict(dtype="not-a-dtype"), "dtype"),
        (dict(device_pages=None), "device_pages"),
        (dict(device_bytes=1024), "device_pages"),
        (dict(device_pages=1), "device_pages"),
        (dict(device_pages=None, device_bytes=PAGE_BYTES), "device_bytes"),
        (dict(host_pages=-2), "host_pages"),
        (dict(host_pages=1, host_bytes=PAGE_BYTES), "host_pages"),
        (dict(host_bytes=PAGE_BYTES - 1), "host_bytes"),
        (dict(disk_pages=3), "disk_dir"),
        (dict(disk_dir="/nonexistent/kvjax-disk", disk_pages=3), "disk_dir"),
        (dict(enable_partial_reuse=1), "enable_partial_reuse"),
        (dict(max_util_for_resume=0.0), "max_util_for_resume"),
        (dict(max_util_for_resume=1.5), "max_util_for_resume"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=2**32), "vocab_size"),
        (dict(dtype=">f2"), "native byte order"),
        (dict(disk_dir="", disk_pages=3), "disk_dir"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    kwargs = {**GEOMETRY, "device_pages": 8, **overrides}
    with pytest.raises(ValueError, match=field):
        CacheConfig(**kwargs)


def test_disk_dir_without_quota_and_quota_too_small(tmp_path):
    with pytest.raises(ValueError, match="disk_pages or disk_bytes"):
        CacheConfig(**GEOMETRY, device_pages=4, disk_dir=tmp_path)
    with pytest.raises(ValueError, match="disk_bytes"):
        CacheConfig(**GEOMETRY, device_pages=4, disk_dir=tmp_path, disk_bytes=PAGE_BYTES - 1)


def test_config_is_frozen_and_keyword_only():
    config = CacheConfig(**GEOMETRY, device_pages=4)
    with pytest.raises(AttributeError):
        config.device_pages = 8
    with pytest.raises(TypeError):
        CacheConfig(2, 4, 8)
