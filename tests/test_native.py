"""The compiled core (llmsched/native.py, setup.py): the same results as the Python sources, and
never an extension module older than its source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmsched import native

ROOT = Path(__file__).resolve().parents[1]


def _simulate(out: Path, pure: bool, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != native.ENV_VAR}
    if pure:
        env[native.ENV_VAR] = "1"
    code = (
        "import sys; from llmsched import native, cli; print(native.MODE, file=sys.stderr); "
        "sys.argv = ['llmsched', *sys.argv[1:]]; cli.main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "simulate", "--no-progress", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stderr.splitlines()[0]


@pytest.mark.skipif(not native.compiled(), reason=f"the compiled core is not in use: {native.MODE}")
@pytest.mark.parametrize(
    "args",
    [
        ["--num-requests", "400", "--instances", "2", "--policy", "pascal", "--preemption", "swap"],
        ["--num-requests", "400", "--instances", "3", "--policy", "sarathi", "--rate", "30"],
        ["--config", "configs/agents/swe-programs.yaml"],
    ],
    ids=["pascal-swap", "sarathi-loaded", "agents-prefix-cache"],
)
def test_compiled_and_pure_python_give_the_same_bytes(tmp_path, args):
    modes = [_simulate(tmp_path / "compiled", False, *args)]
    modes.append(_simulate(tmp_path / "pure", True, *args))
    assert modes[0].startswith("compiled") and modes[1].startswith("pure Python"), modes
    for name in ("summary.json", "requests.csv"):
        compiled = (tmp_path / "compiled" / name).read_bytes()
        assert compiled == (tmp_path / "pure" / name).read_bytes(), name


def test_a_compiled_module_older_than_its_source_is_not_used(tmp_path):
    package = tmp_path / "llmsched"
    for module in native.COMPILED:
        source = native.source_of(module, package)
        source.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(native.source_of(module), source)
    assert native.stale_modules(package) is None  # nothing built: no manifest
    built = {m: native.source_hash(native.source_of(m, package)) for m in native.COMPILED}
    (package / native.MANIFEST).write_text(json.dumps(built))
    assert native.stale_modules(package) == []
    edited = native.source_of("llmsched.engine.plan", package)
    edited.write_text(edited.read_text() + "\n# an edit after the build\n")
    assert native.stale_modules(package) == ["llmsched.engine.plan"]
