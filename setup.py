"""llmsched's compiled core: the engine's mechanics (requests' state, KV blocks, batch packing,
spans, the event clock, the latency model) compiled with mypyc from these same Python sources.

`pip install -e .` (the Makefile's set-up) builds it when mypyc is at hand, a build requirement;
without it, or with LLMSCHED_PURE_PYTHON=1 set at install, llmsched is pure Python and runs the
same code interpreted. Next to the extension modules the build records the hash of each source
it compiled (`_compiled.json`): llmsched/native.py uses the compiled modules only while every
source still matches. Rebuild after changing one of them: `make build`.
"""

import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# llmsched/native.py names the compiled modules (read from its file: nothing is built yet).
_spec = importlib.util.spec_from_file_location("_native", ROOT / "src/llmsched/native.py")
native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)
# The sources as mypyc translates them now (their hashes go in the manifest once built).
PACKAGE = ROOT / "src/llmsched"
HASHES = {m: native.source_hash(native.source_of(m, PACKAGE)) for m in native.COMPILED}


class BuildWithManifest(build_ext):
    """build_ext, then the manifest of the compiled sources beside the built package."""

    def run(self) -> None:
        super().run()
        if self.extensions:
            package = Path(self.get_ext_fullpath(native.COMPILED[0])).parents[1]
            (package / native.MANIFEST).write_text(json.dumps(HASHES, indent=1) + "\n")


def ext_modules() -> list:
    if os.environ.get(native.ENV_VAR):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    paths = [str(native.source_of(m, Path("src/llmsched"))) for m in native.COMPILED]
    extensions = mypycify(paths, opt_level="3")
    for ext in extensions:
        # No fused multiply-adds: each float operation rounds as Python's does, so compiled and
        # interpreted runs give the same bits on every CPU (tests/test_native.py).
        ext.extra_compile_args.append("-ffp-contract=off")
    return extensions


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildWithManifest})
