import subprocess
import sys

HOST_MODULES = [
    "kvjax.checks",
    "kvjax.config",
    "kvjax.keys",
    "kvjax.multimodal",
    "kvjax.pages",
    "kvjax.eviction",
    "kvjax.radix_tree",
    "kvjax.tiers",
    "kvjax.kv_cache",
    "kvjax.stats",
    "kvjax.manager",
    "kvjax.request",
    "kvjax.scheduler",
    "kvjax.resources",
    "kvjax.speculative",
    "kvjax.serving_metrics",
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
