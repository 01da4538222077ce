"""The working tree against an earlier revision: the same outputs, and the time side by side.

    .venv/bin/python benchmarks/compare_revisions.py 2f56fe6             # bytes, then timings
    .venv/bin/python benchmarks/compare_revisions.py 2f56fe6 --repeats 5 --no-bytes
    .venv/bin/python benchmarks/compare_revisions.py 3c05311 --compiled --repeats 5

The revision is checked out in a temporary git worktree; each command runs with PYTHONPATH
pointing at one source tree or the other, in this project's environment. The working tree runs
as it is installed (compiled when `make build` is current); the revision runs interpreted, or
with `--compiled` compiled too (its core built in its worktree first: about a minute). Each
side's engine is printed.

* Bytes: the runs below write `summary.json`, `requests.csv` and `config.yaml` under each
  revision; every file must be the same bytes (the wall time is not in them). A difference is
  printed and the script exits 1.
* Time: the whole `llmsched simulate` command of issue 16's case (the first 10,000 Azure-conv
  requests, 8 instances, round-robin; needs the shared data) and of 20,000 synthetic requests on
  64 instances, alternating revisions, `--repeats` times each; medians and their ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmsched.data import data_dir  # noqa: E402

AZURE = "traces/azure2023/AzureLLMInferenceTrace_conv.csv"
SYNTHETIC_64 = [
    "--num-requests", "20000", "--rate", "300", "--instances", "64",
    "--router", "least-outstanding", "--policy", "fcfs",
]  # fmt: skip


def byte_runs() -> dict[str, list[str]]:
    """The runs whose outputs must not change: the README's kinds of run and each mechanism."""
    runs = {
        "default": [],
        "agents": ["--config", "configs/agents/swe-programs.yaml"],
        "pascal-swap": ["--num-requests", "3000", "--policy", "pascal", "--preemption", "swap",
                        "--instances", "2"],
        "slai-detailed": ["--num-requests", "3000", "--policy", "slai", "--instances", "2",
                          "--save-detailed"],
        "pars-least-kv": ["--num-requests", "3000", "--policy", "pars", "--scores", "oracle",
                          "--instances", "4", "--router", "least-kv"],
        "synthetic-64": SYNTHETIC_64,
    }  # fmt: skip
    azure = azure_case()
    if azure is not None:
        runs["azure-10k"] = azure
    return runs


def azure_case() -> list[str] | None:
    data = data_dir()
    if data is None or not (data / AZURE).is_file():
        return None
    return [
        "--config", "configs/azure-conv-llama2-70b.yaml", "--trace", str(data / AZURE),
        "--num-requests", "10000", "--router", "round-robin",
    ]  # fmt: skip


def simulate(src: Path, args: list[str], out: Path) -> float:
    """Run `llmsched simulate` from the source tree `src`; returns its wall time."""
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "llmsched.cli", "simulate", "--no-progress", *args, "--out",
         str(out)],
        cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    return time.perf_counter() - start


def engine(src: Path) -> str:
    """How the source tree `src` runs: compiled or interpreted (llmsched.native.MODE)."""
    code = "import llmsched.native as n; print(n.MODE)"
    env = dict(os.environ, PYTHONPATH=str(src))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return run.stdout.strip()


def digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def compare_bytes(sources: dict[str, Path], tmp: Path) -> bool:
    same = True
    for name, args in byte_runs().items():
        outs = {rev: tmp / rev / name for rev in sources}
        for rev, src in sources.items():
            simulate(src, args, outs[rev])
        for file in ("summary.json", "requests.csv", "config.yaml"):
            digests = {rev: digest(out / file) for rev, out in outs.items()}
            ok = len(set(digests.values())) == 1
            same &= ok
            print(f"  {name}/{file}: {'same' if ok else 'DIFFERENT ' + str(digests)}")
    return same


def compare_times(sources: dict[str, Path], tmp: Path, repeats: int) -> None:
    cases = {"synthetic 20k, 64 instances": SYNTHETIC_64}
    azure = azure_case()
    if azure is not None:
        cases = {"Azure conv first 10k, 8 instances": azure, **cases}
    else:
        print("  shared data not found (LLMSCHED_DATA): the Azure case is skipped")
    for case, args in cases.items():
        times: dict[str, list[float]] = {rev: [] for rev in sources}
        for _ in range(repeats):
            for rev, src in sources.items():  # alternating: the machine's moods hit both
                times[rev].append(simulate(src, args, tmp / "timing"))
        medians = {rev: statistics.median(t) for rev, t in times.items()}
        base, new = medians.values()
        runs = "; ".join(f"{rev} {', '.join(f'{t:.2f}' for t in ts)}" for rev, ts in times.items())
        print(f"  {case}: {base:.2f} s against {new:.2f} s, medians of {repeats}: "
              f"{base / new:.2f}x  ({runs})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", help="the git revision to compare the working tree with")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per revision and case")
    parser.add_argument("--no-bytes", action="store_true", help="skip the byte comparison")
    parser.add_argument("--no-times", action="store_true", help="skip the timings")
    parser.add_argument(
        "--compiled", action="store_true", help="build the revision's compiled core and use it"
    )
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmsched-compare-") as tmp_name:
        tmp = Path(tmp_name)
        tree = tmp / "revision"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), opts.revision],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        try:
            if opts.compiled:
                subprocess.run(
                    [sys.executable, "setup.py", "build_ext", "--inplace"],
                    cwd=tree, check=True, capture_output=True,
                )  # fmt: skip
            sources = {opts.revision: tree / "src", "working tree": ROOT / "src"}
            for rev, src in sources.items():
                print(f"{rev}: {engine(src)}")
            same = True
            if not opts.no_bytes:
                print(f"outputs, {opts.revision} against the working tree:")
                same = compare_bytes(sources, tmp)
            if not opts.no_times:
                print(f"whole command, {opts.revision} against the working tree:")
                compare_times(sources, tmp, opts.repeats)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    flags = " --compiled" if opts.compiled else ""
    print(f"reproduce: .venv/bin/python benchmarks/compare_revisions.py {opts.revision}{flags}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
