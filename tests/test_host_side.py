import subprocess
import sys

HOST_MODULES = [
    "kvjax.cache.checks",
    "kvjax.cache.config",
    "kvjax.cache.keys",
    "kvjax.cache.multimodal",
    "kvjax.cache.pages",
    "kvjax.cache.eviction",
    "kvjax.cache.radix_tree",
    "kvjax.cache.tiers",
    "kvjax.cache.kv_cache",
    "kvjax.cache.stats",
    "kvjax.cache.manager",
    "kvjax.serving.request",
    "kvjax.serving.scheduler",
    "kvjax.serving.resources",
    "kvjax.serving.speculative",
    "kvjax.serving.metrics",
    "kvjax",
]


def test_host_side_modules_import_no_jax():
    """The host side must stay plain Python and numpy: fast to test, impossible to trace."""
    code = (
        f"import sys\nfor name in {HOST_MODULES!r}:\n    __import__(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.'))\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
