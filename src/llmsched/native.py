"""The compiled core: the engine's mechanics compiled with mypyc, used only while it matches its
sources.

setup.py compiles the modules in :data:`COMPILED` from these same Python sources (mypyc) into
extension modules beside them, and records each source's hash in ``_compiled.json``. Python
imports an extension module before a source of the same name, so an extension older than its
source would silently run old code: when llmsched is imported, every compiled module's source
is compared with the one it was built from, and if any differs (or nothing was compiled, or
``LLMSCHED_PURE_PYTHON`` is set), the sources of all of them are imported instead (compiled
modules call each other natively: all or none). Both ways run the same code and give the same
results (tests/test_native.py); the compiled one is faster (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

ENV_VAR = "LLMSCHED_PURE_PYTHON"
PACKAGE = Path(__file__).resolve().parent
MANIFEST = "_compiled.json"

# The modules that run for every request of every step. The policies are not among them: they
# stay interpreted Python, and anyone's subclass of them works.
COMPILED = (
    "llmsched.engine.state",
    "llmsched.engine.kv",
    "llmsched.engine.prefix_cache",
    "llmsched.engine.plan",
    "llmsched.engine.instance",
    "llmsched.hardware.latency",
    "llmsched.hardware.roofline",
    "llmsched.cluster.cluster",
)


def source_of(module: str, package: Path = PACKAGE) -> Path:
    """The source file of one of llmsched's modules."""
    return package.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stale_modules(package: Path = PACKAGE) -> list[str] | None:
    """The compiled modules whose source changed since they were built (empty: none); None
    when no compiled core was built."""
    manifest = package / MANIFEST
    if not manifest.exists():
        return None
    built = json.loads(manifest.read_text())
    return [m for m in COMPILED if built.get(m) != source_hash(source_of(m, package))]


class _Sources:
    """A finder that imports the compiled modules from their sources."""

    def find_spec(self, name: str, path=None, target=None):
        if name not in COMPILED:
            return None
        return importlib.util.spec_from_file_location(name, source_of(name))


def _choose() -> str:
    """Import the compiled modules only if they match their sources; returns how llmsched runs."""
    if os.environ.get(ENV_VAR):
        why = f"pure Python ({ENV_VAR} is set)"
    else:
        stale = stale_modules()
        if stale is None:
            why = "pure Python (no compiled core was built)"
        elif stale:
            why = f"pure Python (the compiled core is older than {', '.join(stale)}: rebuild it)"
        else:
            return "compiled (mypyc)"
    sys.meta_path.insert(0, _Sources())
    return why


MODE = _choose()


def compiled() -> bool:
    """Whether the engine runs compiled (for benchmarks to say which they measured)."""
    mod = sys.modules.get("llmsched.engine.instance")
    if mod is None:
        import llmsched.engine.instance as mod
    return not isinstance(mod.__loader__, importlib.machinery.SourceFileLoader)
