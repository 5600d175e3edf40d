"""The architecture, checked: imports point down only, the cache and serving layers load no JAX,
and functions and modules stay small. See the README's architecture section for the map."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each package may import (its own modules included). Imports point down only:
# cache <- serving <- engine, text <- serving, kernels <- runtime <- engine, models uses kernels and
# the runtime.
ALLOWED = {
    "kvjax.cache": {"kvjax.cache"},
    "kvjax.text": {"kvjax.text"},
    "kvjax.serving": {"kvjax.cache", "kvjax.serving", "kvjax.text"},
    "kvjax.runtime": {"kvjax.cache", "kvjax.runtime", "kernels"},
    "kernels": {"kernels"},
    "models": {"models", "kernels", "kvjax.runtime"},
    "kvjax.engine": {
        "kvjax.engine",
        "kvjax.cache",
        "kvjax.serving",
        "kvjax.text",
        "kvjax.runtime",
        "kernels",
        "models",
    },
    # The command-line chat on top of the engine.
    "kvjax.chat": {"kvjax.chat", "kvjax.engine", "kvjax.serving", "kvjax.text"},
    # The OpenAI-compatible server on top of the engine, and its command.
    "kvjax.server": {"kvjax.server", "kvjax.engine", "kvjax.serving", "kvjax.cache", "kvjax.text"},
    "kvjax.serve": {"kvjax.serve", "kvjax.server", "kvjax.engine", "kvjax.serving"},
}
OUR_ROOTS = ("kvjax", "kernels", "models")
MAX_FUNCTION_LINES = 50
MAX_MODULE_LINES = 350


def layer_of(module: str) -> str | None:
    """The package in `ALLOWED` that `module` belongs to (None for the `kvjax` facade)."""
    return next((p for p in ALLOWED if module == p or module.startswith(p + ".")), None)


def library_modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module of kvjax, kernels and models."""
    found = []
    for root in OUR_ROOTS:
        for path in sorted((ROOT / root).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, path))
    return found


def imported_modules(path: Path, name: str) -> list[str]:
    """Every module `path` imports from our packages, at any depth (functions, TYPE_CHECKING
    blocks and relative imports included)."""
    is_package = path.name == "__init__.py"
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module
            imported.append(target)
    return [m for m in imported if m.split(".")[0] in OUR_ROOTS]


def test_every_module_belongs_to_a_layer():
    orphans = [name for name, _ in library_modules() if name != "kvjax" and layer_of(name) is None]
    assert not orphans, f"modules outside the layers of ALLOWED: {orphans}"


def test_imports_point_down_only():
    wrong = []
    for name, path in library_modules():
        layer = layer_of(name)
        if layer is None:  # the kvjax facade names its exports as strings and loads them lazily
            assert imported_modules(path, name) == [], "kvjax/__init__ must import lazily"
            continue
        for target in imported_modules(path, name):
            if target == "kvjax" or layer_of(target) not in ALLOWED[layer]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(wrong)


def test_the_direction_check_catches_an_upward_import(tmp_path):
    """The checker itself: a cache module importing the engine is caught."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from kvjax.engine.engine import Engine\n    return Engine\n")
    (target,) = imported_modules(module, "kvjax.cache.bad")
    assert layer_of(target) not in ALLOWED[layer_of("kvjax.cache.bad")]


def host_side_modules() -> list[str]:
    names = []
    for package in ("kvjax.cache", "kvjax.serving", "kvjax.text"):
        path = ROOT.joinpath(*package.split("."))
        names.append(package)
        names += [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(path)])]
    return names


def test_cache_serving_and_text_import_no_jax():
    """The host side stays plain Python and numpy: fast to test, impossible to trace. Every
    module of the three packages is found by walking them, not by a list."""
    modules = host_side_modules()
    assert "kvjax.cache.manager" in modules and "kvjax.serving.scheduler" in modules
    assert "kvjax.text.tokenizer" in modules and "kvjax.text.detokenizer" in modules
    code = (
        f"import sys\nfor name in {modules!r}:\n    __import__(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == ""


def test_the_public_api_loads_on_first_use():
    import kvjax

    for name in kvjax.__all__:
        assert getattr(kvjax, name) is not None
    from kvjax.engine.engine import Engine

    assert kvjax.Engine is Engine and "KVCacheManager" in dir(kvjax)
    with pytest.raises(AttributeError, match="has no attribute 'Enigne'"):
        kvjax.Enigne  # noqa: B018


def long_functions(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length})")
    return found


def test_library_functions_and_modules_stay_small():
    paths = sorted((ROOT / "kvjax").rglob("*.py"))
    too_long = [f for path in paths for f in long_functions(path)]
    assert not too_long, f"functions past {MAX_FUNCTION_LINES} lines: {too_long}"
    sizes = {path: len(path.read_text().splitlines()) for path in paths}
    big = [f"{p.relative_to(ROOT)} ({n})" for p, n in sizes.items() if n > MAX_MODULE_LINES]
    assert not big, f"modules past {MAX_MODULE_LINES} lines: {big}"
